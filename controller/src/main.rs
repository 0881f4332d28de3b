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
    /// Resolve Kubernetes YAML into one node's ProxyPlans, offline (no cluster).
    Plan(planproxy_controller::cli::plan::PlanArgs),
    /// Time the resolver on synthetic clusters and print a table.
    BenchResolve(planproxy_controller::cli::bench::BenchArgs),
    /// Run the controller: watch the cluster and write every node's ProxyPlans.
    Run(Box<planproxy_controller::run::RunArgs>),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Plan(args) => plan(&args),
        Command::BenchResolve(args) => bench_resolve(&args),
        Command::Run(args) => run(*args),
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

fn run(args: planproxy_controller::run::RunArgs) -> ExitCode {
    if let Err(error) = planproxy_controller::run::init_tracing(&args) {
        eprintln!("error: {error}");
        return ExitCode::FAILURE;
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(planproxy_controller::run::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(%error, "controller failed");
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}

/// Exit status of `plan` for input it cannot resolve.
const EXIT_BAD_INPUT: u8 = 2;

fn plan(args: &planproxy_controller::cli::plan::PlanArgs) -> ExitCode {
    let mut out = std::io::stdout().lock();
    let mut warn = std::io::stderr().lock();
    match planproxy_controller::cli::plan::run(args, &mut out, &mut warn) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_BAD_INPUT)
        }
    }
}

fn bench_resolve(args: &planproxy_controller::cli::bench::BenchArgs) -> ExitCode {
    match planproxy_controller::cli::bench::run(args, &mut std::io::stdout().lock()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
