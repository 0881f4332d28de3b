//! The admin server: `/healthz` (liveness), `/readyz` (readiness) and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long the main loop may go without a heartbeat before `/healthz` fails.
/// The loop beats at least every few seconds even when idle.
pub const STALL_LIMIT: Duration = Duration::from_secs(60);

/// What the health endpoints report, updated by the runtime's tasks.
#[derive(Debug)]
pub struct Health {
    started: Instant,
    /// Milliseconds since `started` of the main loop's last heartbeat.
    last_beat_ms: AtomicU64,
    /// Every watch delivered its initial list.
    synced: AtomicBool,
    /// The first resolution after startup was computed.
    first_flush: AtomicBool,
    /// Since leading, the writer emptied the queue at least once.
    leader_caught_up: AtomicBool,
    /// This replica leads.
    leading: AtomicBool,
}

impl Health {
    /// Fresh state: alive, not ready.
    pub fn new() -> Self {
        Self {
            started: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            synced: AtomicBool::new(false),
            first_flush: AtomicBool::new(false),
            leader_caught_up: AtomicBool::new(false),
            leading: AtomicBool::new(false),
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The main loop is turning.
    pub fn beat(&self) {
        self.last_beat_ms
            .store(self.elapsed_ms(), Ordering::Relaxed);
    }

    /// Every watch has listed its objects once.
    pub fn set_synced(&self) {
        self.synced.store(true, Ordering::Relaxed);
    }

    /// The first resolution is done and its writes are queued.
    pub fn set_first_flush(&self) {
        self.first_flush.store(true, Ordering::Relaxed);
    }

    /// Leadership changed; a new leader is ready once it caught up.
    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
        self.leader_caught_up.store(false, Ordering::Relaxed);
    }

    /// The leader's queue ran empty after the first resolution.
    pub fn set_caught_up(&self) {
        if self.first_flush.load(Ordering::Relaxed) {
            self.leader_caught_up.store(true, Ordering::Relaxed);
        }
    }

    /// Liveness: the main loop beat recently.
    pub fn live(&self) -> bool {
        let last = self.last_beat_ms.load(Ordering::Relaxed);
        self.elapsed_ms().saturating_sub(last)
            < u64::try_from(STALL_LIMIT.as_millis()).unwrap_or(u64::MAX)
    }

    /// Readiness, or why not.
    pub fn ready(&self) -> Result<(), &'static str> {
        if !self.synced.load(Ordering::Relaxed) {
            return Err("watches not yet synced");
        }
        if !self.first_flush.load(Ordering::Relaxed) {
            return Err("first resolution pending");
        }
        if self.leading.load(Ordering::Relaxed) && !self.leader_caught_up.load(Ordering::Relaxed) {
            return Err("leader still writing its first resolution");
        }
        Ok(())
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Health>,
    registry: Arc<Registry>,
}

/// The admin routes.
pub fn router(health: Arc<Health>, registry: Arc<Registry>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { health, registry })
}

async fn healthz(State(state): State<AdminState>) -> impl IntoResponse {
    if state.health.live() {
        (StatusCode::OK, "ok\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "main loop stalled\n")
    }
}

async fn readyz(State(state): State<AdminState>) -> impl IntoResponse {
    match state.health.ready() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (StatusCode::SERVICE_UNAVAILABLE, format!("{why}\n")),
    }
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        ),
        Err(_) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            [(header::CONTENT_TYPE, "text/plain")],
            "failed to encode metrics\n".to_owned(),
        ),
    }
}

/// Binds the admin address (so a bad address fails startup) and returns the
/// server future, which runs until `shutdown` turns true.
pub async fn bind(
    address: SocketAddr,
    health: Arc<Health>,
    registry: Arc<Registry>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = TcpListener::bind(address).await?;
    tracing::info!(address = %listener.local_addr()?, "admin server listening");
    let app = router(health, registry);
    Ok(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown.wait_for(|stop| *stop).await;
            })
            .await
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_until_synced_and_resolved() {
        let health = Health::new();
        health.beat();
        assert!(health.live());
        assert_eq!(health.ready(), Err("watches not yet synced"));
        health.set_synced();
        assert_eq!(health.ready(), Err("first resolution pending"));
        health.set_first_flush();
        assert_eq!(health.ready(), Ok(()));
    }

    #[test]
    fn a_new_leader_is_ready_once_its_queue_drained() {
        let health = Health::new();
        health.set_synced();
        health.set_first_flush();
        health.set_leading(true);
        assert!(health.ready().is_err());
        health.set_caught_up();
        assert_eq!(health.ready(), Ok(()));
    }

    #[tokio::test]
    async fn admin_server_answers_health_and_metrics() {
        let health = Arc::new(Health::new());
        health.beat();
        let mut registry = Registry::default();
        let metrics = super::super::metrics::Metrics::register(&mut registry);
        metrics.plans_written.inc();
        let (_stop_tx, stop_rx) = watch::channel(false);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let address = listener.local_addr().expect("address");
        drop(listener);
        let server = bind(address, health.clone(), Arc::new(registry), stop_rx)
            .await
            .expect("binds");
        tokio::spawn(server);

        let get = |path: &'static str| async move {
            let mut stream = tokio::net::TcpStream::connect(address)
                .await
                .expect("connect");
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).await.expect("write");
            let mut response = String::new();
            stream.read_to_string(&mut response).await.expect("read");
            response
        };
        assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
        let ready = get("/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
        assert!(ready.contains("watches not yet synced"));
        let metrics = get("/metrics").await;
        assert!(
            metrics.contains("planproxy_controller_plans_written_total 1"),
            "{metrics}"
        );
    }
}
