//! `planproxy-agent`: programs its node's ProxyPlan into iptables.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The planproxy node agent.
#[derive(Parser, Debug)]
#[command(name = "planproxy-agent", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the agent's version.
    Version,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            eprintln!("planproxy-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
    }
}
