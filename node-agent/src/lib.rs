//! Work in progress.

pub mod cli;
pub mod dataplane;
pub mod explain;
pub mod run;
