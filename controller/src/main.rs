//! `planproxy-controller`: resolves cluster state into per-node ProxyPlans.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// The planproxy controller.
#[derive(Parser, Debug)]
#[command(name = "planproxy-controller", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the planproxy CRDs as YAML (identical to the chart's crds/ copy).
    Crds,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Crds => match planproxy_crds::crds_yaml() {
            Ok(yaml) => {
                #[allow(clippy::print_stdout)]
                {
                    print!("{yaml}");
                }
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("error: failed to serialise the CRDs: {error}");
                ExitCode::FAILURE
            }
        },
    }
}
