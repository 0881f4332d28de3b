//! Work in progress.

pub mod run;
