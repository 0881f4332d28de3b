//! Work in progress.

pub mod cli;
