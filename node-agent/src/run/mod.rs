//! `planproxy-agent run`: the node agent's runtime.
//!
//! ```text
//!  API server ──watch (own node's shards)──► plans ──► sync loop ──► Kernel (iptables)
//!      ▲                                                  │
//!      └──── status writer ◄── desired statuses ◄─────────┤
//!                                                         ├──► :10256 /healthz /livez
//!                                                         ├──► health-check node ports
//!                                                         └──► :10249 /metrics
//! ```
//!
//! One task per external system: the watch reads the API server, the sync loop
//! owns the kernel, the status writer writes the API server. The pure decisions
//! (is the plan complete, when to sync, what status to report, what health
//! answers) live in [`plan_set`], [`schedule`], [`status`] and [`health`].

pub mod health;
pub mod kernel;
pub mod metrics;
pub mod plan_set;
pub mod schedule;
pub mod status;
pub mod sync;
pub mod watch;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use kube::Api;
use planproxy_crds::ProxyPlan;
use prometheus_client::registry::Registry;
use tracing::{info, warn};

pub use kernel::{Applied, ApplyError, Kernel};

/// The flags of `planproxy-agent run` (the Helm chart passes exactly these).
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The node this agent programs.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,

    /// Where `/healthz` and `/livez` are served (kube-proxy's port by default;
    /// change it to run beside a kube-proxy during a migration).
    #[arg(long, default_value = "0.0.0.0:10256")]
    pub healthz_bind_address: SocketAddr,

    /// Where Prometheus `/metrics` is served.
    #[arg(long, default_value = "127.0.0.1:10249")]
    pub metrics_bind_address: SocketAddr,

    /// How the rules are laid out: `tree` (per-service dispatch chains) or `flat`
    /// (kube-proxy's single KUBE-SERVICES-style list).
    #[arg(long, value_enum, default_value_t = Layout::Tree)]
    pub layout: Layout,

    /// The data-plane backend: `nftables`, `iptables` (the variant the host
    /// uses), `iptables-nft` or `iptables-legacy`. Switching a live node removes
    /// the other backend's rules once the new ones are in place.
    #[arg(long, env = "PLANPROXY_BACKEND", default_value = "nftables")]
    pub backend: crate::dataplane::BackendChoice,

    /// Log format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter, e.g. `info` or `planproxy=debug,warn`.
    #[arg(long, env = "PLANPROXY_LOG", default_value = "info")]
    pub log_level: String,

    /// Minimum time between two rounds of ProxyPlan status writes.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    pub status_min_interval: Duration,
}

/// The rule layout, as the data plane names it.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Per-service dispatch chains.
    Tree,
    /// One list of frontends, as kube-proxy writes it.
    Flat,
}

/// Log output format.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, planproxy_crds::duration::ParseDurationError> {
    planproxy_crds::duration::parse(s)
}

/// Why the agent stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No kubeconfig and not in a cluster.
    #[error("failed to load the Kubernetes client configuration")]
    Client(#[source] kube::Error),
    /// A health or metrics port is taken.
    #[error("failed to listen on {address} for {what}")]
    Bind {
        /// The address.
        address: SocketAddr,
        /// `healthz` or `metrics`.
        what: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Signal handlers could not be installed.
    #[error("failed to install signal handlers")]
    Signals(#[source] std::io::Error),
    /// The sync loop stopped with an error.
    #[error("the sync loop failed")]
    Sync(#[from] sync::Error),
}

/// Installs the global tracing subscriber for `format` and `filter`.
pub fn init_logging(format: LogFormat, filter: &str) {
    let (env_filter, invalid) = match tracing_subscriber::EnvFilter::try_new(filter) {
        Ok(env_filter) => (env_filter, None),
        Err(error) => (tracing_subscriber::EnvFilter::new("info"), Some(error)),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(env_filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
    if let Some(error) = invalid {
        warn!(filter, %error, "invalid --log-level; logging at info");
    }
}

/// Runs the agent with `kernel` until SIGTERM or SIGINT. The node's rules are
/// left in place on every exit path.
pub async fn run<K: Kernel>(args: RunArgs, kernel: K) -> Result<(), Error> {
    let client = kube::Client::try_default().await.map_err(Error::Client)?;
    let api: Api<ProxyPlan> = Api::all(client);

    let mut registry = Registry::default();
    let metrics = metrics::AgentMetrics::new(&mut registry);
    let node_health = health::NodeHealth::default();

    let health_listener = bind(args.healthz_bind_address, "healthz").await?;
    let metrics_listener = if args.metrics_bind_address == args.healthz_bind_address {
        None
    } else {
        Some(bind(args.metrics_bind_address, "metrics").await?)
    };
    let registry = std::sync::Arc::new(registry);
    let metrics_router = Router::new().route(
        "/metrics",
        get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        axum::http::header::CONTENT_TYPE,
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                    )],
                    metrics::encode(&registry),
                )
            }
        }),
    );
    let health_router = health::node_router(node_health.clone(), metrics.clone());
    let mut servers = Vec::new();
    match metrics_listener {
        Some(listener) => {
            servers.push(tokio::spawn(serve(health_listener, health_router)));
            servers.push(tokio::spawn(serve(listener, metrics_router)));
        }
        None => servers.push(tokio::spawn(serve(
            health_listener,
            health_router.merge(metrics_router),
        ))),
    }

    let (plans_tx, plans_rx) = tokio::sync::watch::channel(None);
    let watch_task = tokio::spawn(watch::watch_plans(
        api.clone(),
        args.node_name.clone(),
        plans_tx,
    ));

    let (status_tx, status_rx) = tokio::sync::watch::channel(BTreeMap::new());
    let writer = tokio::spawn(status::write_statuses(
        status::KubeStatusSink::new(api),
        status_rx,
        args.status_min_interval,
        metrics.clone(),
    ));

    let shutdown = shutdown_signal()?;
    info!(node = %args.node_name, healthz = %args.healthz_bind_address, metrics = %args.metrics_bind_address, "planproxy-agent started");
    let sync_loop = sync::SyncLoop::new(
        args.node_name.clone(),
        kernel,
        node_health,
        metrics,
        status_tx,
    );
    let result = sync_loop.run(plans_rx, shutdown).await;

    watch_task.abort();
    // The loop dropped its status sender: give the writer a moment for a last round.
    if tokio::time::timeout(Duration::from_secs(2), writer)
        .await
        .is_err()
    {
        warn!("gave up writing the last ProxyPlan statuses");
    }
    for server in servers {
        server.abort();
    }
    result?;
    info!("planproxy-agent stopped; the node keeps its rules");
    Ok(())
}

async fn bind(address: SocketAddr, what: &'static str) -> Result<tokio::net::TcpListener, Error> {
    tokio::net::TcpListener::bind(address)
        .await
        .map_err(|source| Error::Bind {
            address,
            what,
            source,
        })
}

async fn serve(listener: tokio::net::TcpListener, router: Router) {
    if let Err(error) = axum::serve(listener, router).await {
        warn!(%error, "HTTP server stopped");
    }
}

fn shutdown_signal() -> Result<impl std::future::Future<Output = ()>, Error> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(Error::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(Error::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => info!("SIGTERM: stopping"),
            _ = int.recv() => info!("SIGINT: stopping"),
        }
    })
}
