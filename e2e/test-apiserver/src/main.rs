//! `planproxy-test-apiserver`: the e2e test API server as a process (test infrastructure, not for production).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use planproxy_test_apiserver::{Config, TestApiServer};

/// A Kubernetes API server for planproxy's e2e tests (not for production).
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// API (HTTPS) listen address.
    #[arg(long, default_value = "127.0.0.1:6443")]
    listen: SocketAddr,
    /// Admin (plain HTTP) listen address: fault injection, counters, kubeconfigs.
    #[arg(long)]
    admin_listen: Option<SocketAddr>,
    /// Address clients use when --listen is a wildcard.
    #[arg(long)]
    advertise: Option<IpAddr>,
    /// Extra certificate SANs.
    #[arg(long = "san")]
    sans: Vec<String>,
    /// Write `<dir>/<user>.kubeconfig` for each --user.
    #[arg(long)]
    kubeconfig_dir: Option<PathBuf>,
    /// Users to write kubeconfigs for.
    #[arg(long = "user")]
    users: Vec<String>,
    /// Events retained per resource type (older resourceVersions get 410).
    #[arg(long, default_value_t = 10_000)]
    event_window: usize,
    /// Check CRD CEL rules on write, as a real cluster does.
    #[arg(long)]
    enforce_cel_rules: bool,
    /// Watch bookmark interval, in milliseconds.
    #[arg(long, default_value_t = 5_000)]
    bookmark_interval_ms: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let server = TestApiServer::start(Config {
        listen: args.listen,
        admin_listen: args.admin_listen,
        advertise: args.advertise,
        extra_sans: args.sans,
        event_window: args.event_window,
        bookmark_interval: Duration::from_millis(args.bookmark_interval_ms),
        enforce_cel_rules: args.enforce_cel_rules,
        ..Config::default()
    })
    .await?;
    if let Some(dir) = &args.kubeconfig_dir {
        std::fs::create_dir_all(dir)?;
        for user in &args.users {
            std::fs::write(
                dir.join(format!("{user}.kubeconfig")),
                server.kubeconfig_for(user),
            )?;
        }
    }
    // One machine-readable line, so a harness can wait for readiness.
    println!(
        "ready url={} admin={}",
        server.url(),
        server
            .admin_addr()
            .map(|a| a.to_string())
            .unwrap_or_default()
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
