//! Work in progress.

pub mod cli;
pub mod run;
