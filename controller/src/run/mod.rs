//! `planproxy-controller run`: the production controller around the pure resolver.
//!
//! ```text
//!  5 watches ──mpsc──► resolver loop (owns the Index; coalesces for a window)
//!                          │ queues writes, keyed by object, latest content only
//!                          ▼
//!  leader election ──► writer (the only API writer; token-bucket budget; leader only)
//!  admin server: /healthz /readyz /metrics
//! ```
//!
//! Every replica watches and resolves; only the leader writes, so a standby takes
//! over with a warm index and a queue that holds only what the leader left
//! unwritten.

pub mod admin;
pub mod args;
pub mod budget;
pub mod error;
pub mod leader;
pub mod metrics;
pub mod queue;
pub mod reconcile;
pub mod status;
pub mod watch;
pub mod writer;

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::events::{Recorder, Reporter};
use planproxy_crds::labels::CONTROLLER_MANAGER;
use planproxy_resolve::{Index, ResolveOptions};
use prometheus_client::registry::Registry;
use tokio::sync::{mpsc, watch as channel};
use tokio::time::Instant;
use tracing_subscriber::EnvFilter;

pub use args::{LogFormat, RunArgs};
pub use error::Error;

/// Writes older than this leave the queue before fresher ones.
const QUEUE_AGE_CAP: Duration = Duration::from_secs(10);
/// The resolver loop beats at least this often (for `/healthz`).
const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long shutdown waits for the lease release.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(5);

/// Installs the tracing subscriber for `args`.
pub fn init_tracing(args: &RunArgs) -> Result<(), Error> {
    let filter = EnvFilter::try_new(&args.log_level).map_err(|e| Error::LogFilter {
        filter: args.log_level.clone(),
        message: e.to_string(),
    })?;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    // A subscriber may already be installed (tests); keep it then.
    let _ = match args.log_format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    Ok(())
}

/// Runs the controller until SIGTERM or SIGINT.
pub async fn run(args: RunArgs) -> Result<(), Error> {
    args.validate().map_err(Error::InvalidArguments)?;
    let client = kube::Client::try_default()
        .await
        .map_err(Error::ClientConfig)?;
    let (shutdown_tx, shutdown) = channel::channel(false);
    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .map_err(Error::Signals)?;
    tokio::spawn(async move {
        tokio::select! {
            _ = sigterm.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        let _ = shutdown_tx.send(true);
    });
    run_with(client, args, shutdown).await
}

/// Runs the controller with `client` until `shutdown` turns true.
pub async fn run_with(
    client: kube::Client,
    args: RunArgs,
    mut shutdown: channel::Receiver<bool>,
) -> Result<(), Error> {
    args.validate().map_err(Error::InvalidArguments)?;
    let identity = args
        .identity
        .clone()
        .unwrap_or_else(leader::default_identity);
    tracing::info!(%identity, "starting planproxy-controller");

    let mut registry = Registry::default();
    let metrics = metrics::Metrics::register(&mut registry);
    let health = Arc::new(admin::Health::new());
    health.beat();
    let server = admin::bind(
        args.admin_bind_address,
        health.clone(),
        Arc::new(registry),
        shutdown.clone(),
    )
    .await
    .map_err(|source| Error::AdminBind {
        address: args.admin_bind_address,
        source,
    })?;
    tokio::spawn(async move {
        if let Err(error) = server.await {
            tracing::error!(%error, "admin server failed");
        }
    });

    let (leading_tx, mut leading) = channel::channel(false);
    // Without election the sender stays here, alive until the loop ends.
    let mut always_leading = None;
    let elector_task = if args.leader_elect {
        let elector = leader::Elector::new(
            identity.clone(),
            leader::Timings {
                lease_duration: args.lease_duration,
                renew_deadline: args.renew_deadline,
                retry_period: args.retry_period,
            },
        );
        let lease = leader::LeaseRef {
            namespace: args.leader_election_namespace.clone(),
            name: args.leader_election_name.clone(),
        };
        Some(tokio::spawn(leader::run(
            client.clone(),
            lease,
            elector,
            leading_tx,
            shutdown.clone(),
        )))
    } else {
        let _ = leading_tx.send(true);
        always_leading = Some(leading_tx);
        None
    };

    let shared = Arc::new(reconcile::Shared::new(QUEUE_AGE_CAP));
    let recorder = Recorder::new(
        client.clone(),
        Reporter {
            controller: CONTROLLER_MANAGER.into(),
            instance: Some(identity.clone()),
        },
    );
    let writer = writer::Writer {
        client: client.clone(),
        recorder,
        shared: shared.clone(),
        max_writes_per_second: args.max_writes_per_second,
        metrics: metrics.clone(),
        health: health.clone(),
    };
    let writer_task = tokio::spawn(writer.run(leading.clone(), shutdown.clone()));

    let (tx, mut rx) = mpsc::channel(1024);
    let watches: Vec<_> = watch::all(&client, args.list_page_size, &tx, &metrics)
        .into_iter()
        .map(tokio::spawn)
        .collect();
    drop(tx);

    let options = ResolveOptions {
        shard_target_bytes: usize::try_from(args.shard_target_bytes).unwrap_or(usize::MAX),
        ..ResolveOptions::default()
    };
    let mut reconciler =
        reconcile::Reconciler::new(Index::new(options), shared.clone(), metrics.clone());
    let mut deadline: Option<Instant> = None;
    let mut last_flush: Option<Instant> = None;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    loop {
        let flush_at = deadline.filter(|_| reconciler.synced());
        tokio::select! {
            input = rx.recv() => {
                let Some(input) = input else {
                    tracing::error!("every watch ended");
                    break;
                };
                if reconciler.handle(input) && deadline.is_none() {
                    deadline = Some(flush_deadline(last_flush, Instant::now(), args.coalesce_window));
                }
                if reconciler.synced() && !reconciler.first_flush_done() && deadline.is_none() {
                    deadline = Some(Instant::now());
                }
            }
            () = sleep_until(flush_at) => {
                deadline = None;
                let first = !reconciler.first_flush_done();
                let now = Instant::now();
                last_flush = Some(now);
                reconciler.flush(now);
                if first {
                    health.set_synced();
                    health.set_first_flush();
                    // Wake the writer even when nothing was queued: it reports
                    // readiness once it sees the queue empty.
                    shared.notify.notify_one();
                    tracing::info!(shards = reconciler.desired_count(), "initial resolution done");
                }
            }
            _ = leading.changed() => {
                let now_leading = *leading.borrow_and_update();
                metrics.leader.set(i64::from(now_leading));
                reconciler.set_leading(now_leading);
            }
            _ = heartbeat.tick() => health.beat(),
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }

    drop(always_leading);
    for task in watches {
        task.abort();
    }
    writer_task.abort();
    if let Some(task) = elector_task {
        // The elector saw the same shutdown signal and is releasing the lease.
        let _ = tokio::time::timeout(RELEASE_TIMEOUT, task).await;
    }
    tracing::info!("stopped");
    Ok(())
}

/// When to flush a change arriving at `now`: at once after a quiet window, so
/// a lone change costs no wait; otherwise one window after the last flush, so
/// a burst still becomes one write per object per window. kube-proxy's
/// minSyncPeriod paces its syncs the same way.
fn flush_deadline(last_flush: Option<Instant>, now: Instant, window: Duration) -> Instant {
    last_flush.map_or(now, |last| (last + window).max(now))
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(1);

    #[test]
    fn a_change_after_a_quiet_window_is_flushed_at_once() {
        let start = Instant::now();
        assert_eq!(flush_deadline(None, start, WINDOW), start);
        let later = start + Duration::from_secs(5);
        assert_eq!(flush_deadline(Some(start), later, WINDOW), later);
    }

    #[test]
    fn a_change_soon_after_a_flush_waits_for_the_window_to_end() {
        let flushed = Instant::now();
        let soon = flushed + Duration::from_millis(300);
        assert_eq!(
            flush_deadline(Some(flushed), soon, WINDOW),
            flushed + WINDOW
        );
    }
}
