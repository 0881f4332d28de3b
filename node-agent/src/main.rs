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
    /// Print the iptables-restore input for a plan (dry run; touches nothing).
    Render(planproxy_node_agent::cli::RenderArgs),
    /// Program a plan once into the current network namespace and verify it.
    Apply(planproxy_node_agent::cli::ApplyArgs),
    /// Remove every planproxy rule and chain, and nothing else.
    Cleanup(planproxy_node_agent::cli::CleanupArgs),
    /// Program this node from its ProxyPlans until SIGTERM (the DaemonSet's command).
    Run(planproxy_node_agent::run::RunArgs),
    /// Show what this node does for one service: frontends, chosen endpoints and
    /// why, and its chains with the kernel's packet counters.
    Explain(planproxy_node_agent::explain::ExplainArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Version => {
            eprintln!("planproxy-agent {}", env!("CARGO_PKG_VERSION"));
            ExitCode::SUCCESS
        }
        Command::Render(args) => planproxy_node_agent::cli::render(args),
        Command::Apply(args) => planproxy_node_agent::cli::apply(args),
        Command::Cleanup(args) => planproxy_node_agent::cli::cleanup(args),
        Command::Run(args) => run_agent(args),
        Command::Explain(args) => explain(args),
    }
}

fn run_agent(args: planproxy_node_agent::run::RunArgs) -> ExitCode {
    use planproxy_node_agent::dataplane::{DataPlane, DataPlaneConfig};
    use planproxy_node_agent::run;

    run::init_logging(args.log_format, &args.log_level);
    let layout = match args.layout {
        run::Layout::Tree => planproxy_render::Layout::Tree,
        run::Layout::Flat => planproxy_render::Layout::Flat,
    };
    let config = DataPlaneConfig {
        layout,
        backend: args.backend,
        ..Default::default()
    };
    let result = DataPlane::new(config)
        .map_err(anyhow::Error::from)
        .and_then(|kernel| {
            let runtime = tokio::runtime::Runtime::new()?;
            runtime
                .block_on(run::run(args, kernel))
                .map_err(anyhow::Error::from)
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!("{error:#}");
            eprintln!("planproxy-agent: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn explain(args: planproxy_node_agent::explain::ExplainArgs) -> ExitCode {
    let result = tokio::runtime::Runtime::new()
        .map_err(anyhow::Error::from)
        .and_then(|runtime| {
            runtime
                .block_on(planproxy_node_agent::explain::run(args))
                .map_err(anyhow::Error::from)
        });
    match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("planproxy-agent explain: {error:#}");
            ExitCode::FAILURE
        }
    }
}
