//! Work in progress.

pub mod dataplane;
