//! Fault injection: what tests can make the server do wrong, on purpose.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::error::ApiError;

/// How the server behaves during an outage.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutageMode {
    /// Connections stay open but nothing is answered (requests and watch events
    /// are held until the outage ends).
    Hang,
    /// Every connection is dropped and new connections are refused (the listener is closed).
    Refuse,
}

impl std::str::FromStr for OutageMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "hang" => Ok(OutageMode::Hang),
            "refuse" => Ok(OutageMode::Refuse),
            other => Err(format!("unknown outage mode {other:?} (hang, refuse)")),
        }
    }
}

/// Which error injected write failures answer with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// 500 InternalError.
    Internal,
    /// 409 Conflict (as if another writer won the race).
    Conflict,
}

#[derive(Debug, Clone)]
struct WriteFailures {
    fraction: f64,
    kind: WriteFailure,
    /// Only writes to this resource (`proxyplans.planproxy.dev`, or
    /// `proxyplans.planproxy.dev/status` for status writes only).
    resource: Option<String>,
}

/// The fault switches; shared by the request handlers and the test handle.
#[derive(Debug)]
pub struct Faults {
    close_watches: watch::Sender<u64>,
    drop_connections: watch::Sender<u64>,
    outages: watch::Sender<Option<(Instant, OutageMode)>>,
    expire_next_watches: AtomicU32,
    write_failures: Mutex<Option<WriteFailures>>,
    latency_micros: AtomicU64,
    rng: Mutex<u64>,
}

impl Faults {
    /// No faults; `seed` makes injected write failures reproducible.
    pub fn new(seed: u64) -> Self {
        Faults {
            close_watches: watch::channel(0).0,
            drop_connections: watch::channel(0).0,
            outages: watch::channel(None).0,
            expire_next_watches: AtomicU32::new(0),
            write_failures: Mutex::new(None),
            latency_micros: AtomicU64::new(0),
            rng: Mutex::new(seed | 1),
        }
    }

    /// Ends every open watch stream cleanly (clients re-watch from their last resourceVersion).
    pub fn close_watches(&self) {
        self.close_watches.send_modify(|g| *g += 1);
    }

    /// Answers the next `count` watch requests with a 410 Expired ERROR event.
    pub fn expire_next_watches(&self, count: u32) {
        self.expire_next_watches.store(count, Ordering::SeqCst);
    }

    /// Fails this fraction (0.0–1.0) of writes (create, update, patch, delete) with `kind`.
    pub fn fail_writes(&self, fraction: f64, kind: WriteFailure) {
        self.set_write_failures(fraction, kind, None);
    }

    /// Like [`Self::fail_writes`], for writes to one resource only: the plural,
    /// group-qualified unless core (`proxyplans.planproxy.dev` covers the
    /// object and its status; `proxyplans.planproxy.dev/status` only status writes).
    pub fn fail_writes_to(&self, resource: &str, fraction: f64, kind: WriteFailure) {
        self.set_write_failures(fraction, kind, Some(resource.to_string()));
    }

    fn set_write_failures(&self, fraction: f64, kind: WriteFailure, resource: Option<String>) {
        let fraction = fraction.clamp(0.0, 1.0);
        *lock(&self.write_failures) = (fraction > 0.0).then_some(WriteFailures {
            fraction,
            kind,
            resource,
        });
    }

    /// Delays every API request by this much.
    pub fn set_latency(&self, latency: Duration) {
        self.latency_micros.store(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::SeqCst,
        );
    }

    /// Stops answering for `duration`.
    pub fn outage(&self, duration: Duration, mode: OutageMode) {
        self.outages
            .send_replace(Some((Instant::now() + duration, mode)));
        if mode == OutageMode::Refuse {
            self.drop_connections();
        }
    }

    /// Drops every connection (including watches); data is kept. Clients reconnect.
    pub fn restart(&self) {
        self.drop_connections();
    }

    fn drop_connections(&self) {
        self.drop_connections.send_modify(|g| *g += 1);
    }

    /// Clears every fault (an outage in progress ends now).
    pub fn clear(&self) {
        self.expire_next_watches.store(0, Ordering::SeqCst);
        *lock(&self.write_failures) = None;
        self.latency_micros.store(0, Ordering::SeqCst);
        self.outages.send_replace(None);
    }

    pub(crate) fn watch_closes(&self) -> watch::Receiver<u64> {
        self.close_watches.subscribe()
    }

    pub(crate) fn connection_drops(&self) -> watch::Receiver<u64> {
        self.drop_connections.subscribe()
    }

    pub(crate) fn outage_changes(&self) -> watch::Receiver<Option<(Instant, OutageMode)>> {
        self.outages.subscribe()
    }

    /// Whether this watch must be answered with 410 (consumes one).
    pub(crate) fn take_watch_expiry(&self) -> bool {
        self.expire_next_watches
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Waits out injected latency and any hanging outage.
    pub(crate) async fn delay_request(&self) {
        let micros = self.latency_micros.load(Ordering::SeqCst);
        if micros > 0 {
            tokio::time::sleep(Duration::from_micros(micros)).await;
        }
        self.wait_while_hung().await;
    }

    /// Returns once no hanging outage is in progress.
    pub(crate) async fn wait_while_hung(&self) {
        let mut rx = self.outages.subscribe();
        loop {
            let current = *rx.borrow_and_update();
            match current {
                Some((until, OutageMode::Hang)) if until > Instant::now() => {
                    tokio::select! {
                        () = tokio::time::sleep_until(until) => {}
                        _ = rx.changed() => {}
                    }
                }
                _ => return,
            }
        }
    }

    /// An injected failure for this write, if the dice say so.
    /// `resource` is the written resource as counters name it (`plural[.group][/status]`).
    pub(crate) fn injected_write_failure(
        &self,
        resource: &str,
        conflict: impl FnOnce() -> ApiError,
    ) -> Result<(), ApiError> {
        let Some(failures) = lock(&self.write_failures).clone() else {
            return Ok(());
        };
        let targeted = failures.resource.as_deref().is_none_or(|wanted| {
            resource == wanted
                || resource
                    .strip_prefix(wanted)
                    .is_some_and(|r| r.starts_with('/'))
        });
        if !targeted || self.next_fraction() >= failures.fraction {
            return Ok(());
        }
        Err(match failures.kind {
            WriteFailure::Internal => {
                ApiError::internal("injected write failure (test API server fault)")
            }
            WriteFailure::Conflict => conflict(),
        })
    }

    fn next_fraction(&self) -> f64 {
        // xorshift64*: reproducible from the seed, good enough for fault dice.
        let mut state = lock(&self.rng);
        let mut x = *state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        *state = x;
        (x.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Locks a mutex, recovering the data if a panicking thread poisoned it
/// (the protected data is always left consistent between statements).
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_failures_hit_roughly_the_requested_fraction() {
        let faults = Faults::new(42);
        faults.fail_writes(0.3, WriteFailure::Internal);
        let failed = (0..10_000)
            .filter(|_| {
                faults
                    .injected_write_failure("configmaps", || ApiError::internal("x"))
                    .is_err()
            })
            .count();
        assert!((2_500..3_500).contains(&failed), "{failed}");
        faults.clear();
        assert!(
            faults
                .injected_write_failure("configmaps", || ApiError::internal("x"))
                .is_ok()
        );
    }

    #[test]
    fn targeted_write_failures_hit_only_their_resource() {
        let faults = Faults::new(7);
        faults.fail_writes_to(
            "proxyplans.planproxy.dev/status",
            1.0,
            WriteFailure::Internal,
        );
        let fails = |r: &str| {
            faults
                .injected_write_failure(r, || ApiError::internal("x"))
                .is_err()
        };
        assert!(fails("proxyplans.planproxy.dev/status"));
        assert!(!fails("proxyplans.planproxy.dev"));
        faults.fail_writes_to("proxyplans.planproxy.dev", 1.0, WriteFailure::Internal);
        assert!(fails("proxyplans.planproxy.dev/status"));
        assert!(fails("proxyplans.planproxy.dev"));
        assert!(!fails("proxyplans.planproxy.devx"));
        assert!(!fails("services"));
    }

    #[test]
    fn watch_expiry_is_consumed_once_per_watch() {
        let faults = Faults::new(1);
        faults.expire_next_watches(2);
        assert!(faults.take_watch_expiry());
        assert!(faults.take_watch_expiry());
        assert!(!faults.take_watch_expiry());
    }
}
