//! The sync loop: the one task that owns the kernel (the data plane).
//!
//! ```text
//!  plans (watch) ─► assemble ─► queue? ─► schedule ─► Kernel::sync (spawn_blocking)
//!                                                         │
//!              statuses (watch) ◄─ shard_status ◄─────────┤──► metrics, /healthz,
//!                                                         └──► health-check node ports
//! ```
//!
//! It never flushes: before the first complete plan, while the API server is
//! away, after a failed sync and at shutdown the kernel keeps the rules it has.
//! The first sync is full and rewrites our chains in place.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use planproxy_crds::v1alpha1::TrafficPolicy;
use planproxy_crds::{ProxyPlan, ProxyPlanSpec, spec_hash};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{Instrument, debug, info, info_span, warn};

use super::health::{HealthCheckServers, NodeHealth, health_check_services, listen_addresses};
use super::kernel::{Applied, ApplyError, Kernel, SettingProblem};
use super::metrics::AgentMetrics;
use super::plan_set::{DEFAULT_MIN_SYNC_PERIOD, DEFAULT_SYNC_PERIOD, NodePlan, assemble};
use super::schedule::{Due, SyncSchedule};
use super::status::{AppliedShard, DesiredStatus, ShardState, shard_status};

/// The node's ProxyPlans as the watch sees them; `None` until the first list.
pub type PlanSnapshot = Option<Vec<Arc<ProxyPlan>>>;

/// Shard name → the status it should carry (only shards whose status must change).
pub type DesiredStatuses = BTreeMap<String, DesiredStatus>;

/// Why the sync loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The blocking task running the kernel panicked; the kernel is gone.
    #[error("the data plane panicked during a sync")]
    KernelPanicked(#[source] tokio::task::JoinError),
}

/// The sync loop's inputs and outputs.
pub struct SyncLoop<K> {
    node_name: String,
    kernel: Option<K>,
    schedule: SyncSchedule,
    /// Shard name → what the kernel holds for it (from this agent's syncs).
    applied: BTreeMap<String, AppliedShard>,
    /// The last complete set the kernel took, sorted by index.
    applied_specs: Vec<Arc<ProxyPlan>>,
    last_failure: Option<ApplyError>,
    /// What the last successful sync could not make of the node.
    issues: Vec<SettingProblem>,
    /// Service port → the trigger time whose latency was already observed.
    trigger_times: BTreeMap<String, Time>,
    started_at: Timestamp,
    /// Wall time of the last event that can change a status (a sync, a new
    /// snapshot): transition times use it, so recomputing gives the same status.
    last_event_at: Timestamp,
    health: NodeHealth,
    metrics: AgentMetrics,
    health_checks: HealthCheckServers,
    statuses: watch::Sender<DesiredStatuses>,
    hashes: HashCache,
}

/// `spec_hash` of each shard, kept per uid and `metadata.generation`: the loop
/// looks at every shard on every event, and hashing a large spec means
/// serialising it.
#[derive(Default)]
struct HashCache {
    by_name: BTreeMap<String, (String, String)>,
}

impl HashCache {
    fn hash(&mut self, shard: &ProxyPlan) -> String {
        // The generation moves only with the spec (ProxyPlan status is a
        // subresource), so the agent's own status writes, echoed back by the
        // watch, hash nothing again; the uid tells a recreated shard apart.
        let meta = &shard.metadata;
        let (Some(name), Some(uid), Some(generation)) = (&meta.name, &meta.uid, meta.generation)
        else {
            return spec_hash(&shard.spec);
        };
        let version = format!("{uid}/{generation}");
        if let Some((cached_version, hash)) = self.by_name.get(name)
            && *cached_version == version
        {
            return hash.clone();
        }
        let hash = spec_hash(&shard.spec);
        self.by_name.insert(name.clone(), (version, hash.clone()));
        hash
    }

    fn retain(&mut self, shards: &[Arc<ProxyPlan>]) {
        self.by_name.retain(|name, _| {
            shards
                .iter()
                .any(|s| s.metadata.name.as_ref() == Some(name))
        });
    }
}

impl<K: Kernel> SyncLoop<K> {
    /// A loop for `node_name` owning `kernel`.
    pub fn new(
        node_name: String,
        kernel: K,
        health: NodeHealth,
        metrics: AgentMetrics,
        statuses: watch::Sender<DesiredStatuses>,
    ) -> Self {
        let now = Timestamp::now();
        Self {
            node_name,
            kernel: Some(kernel),
            schedule: SyncSchedule::new(
                Instant::now(),
                DEFAULT_MIN_SYNC_PERIOD,
                DEFAULT_SYNC_PERIOD,
            ),
            applied: BTreeMap::new(),
            applied_specs: Vec::new(),
            last_failure: None,
            issues: Vec::new(),
            trigger_times: BTreeMap::new(),
            started_at: now,
            last_event_at: now,
            health_checks: HealthCheckServers::new(health.clone(), metrics.clone()),
            health,
            metrics,
            statuses,
            hashes: HashCache::default(),
        }
    }

    /// Runs until `shutdown` completes or the plan watch ends; a sync in progress
    /// is finished first. Returns the kernel, with its rules still in place.
    pub async fn run(
        mut self,
        mut plans: watch::Receiver<PlanSnapshot>,
        shutdown: impl Future<Output = ()>,
    ) -> Result<K, Error> {
        let span = info_span!("sync", node = %self.node_name);
        async move {
            let mut shutdown = std::pin::pin!(shutdown);
            loop {
                let snapshot = plans.borrow_and_update().clone();
                let plan = snapshot
                    .as_deref()
                    .map(|objects| assemble(&self.node_name, objects));
                self.observe_plan(plan.as_ref());
                match self.schedule.due(Instant::now()) {
                    Due::Sync { full } => self.sync(plan.as_ref(), full).await?,
                    Due::Wait(until) => {
                        self.publish_statuses(plan.as_ref());
                        let sleep = async {
                            match until {
                                Some(at) => tokio::time::sleep_until(at).await,
                                None => std::future::pending().await,
                            }
                        };
                        tokio::select! {
                            changed = plans.changed() => {
                                if changed.is_err() {
                                    break;
                                }
                                self.last_event_at = Timestamp::now();
                            }
                            () = sleep => {}
                            () = &mut shutdown => break,
                        }
                    }
                }
            }
            info!("sync loop stopped; the node keeps its rules");
            Ok(self
                .kernel
                .take()
                .expect("the kernel must be home when no sync runs"))
        }
        .instrument(span)
        .await
    }

    /// Takes the plan's settings and queues a sync when its content differs from
    /// what the kernel holds.
    fn observe_plan(&mut self, plan: Option<&NodePlan>) {
        let Some(plan) = plan else {
            return;
        };
        self.metrics.set_plan_complete(plan.is_complete());
        self.hashes.retain(&plan.shards);
        if let Some(settings) = plan.settings() {
            let terminating = settings.node_terminating;
            let (min_sync_period, sync_period) = plan.periods();
            self.schedule.set_periods(min_sync_period, sync_period);
            self.health.update(|state| {
                state.node_terminating = terminating;
                state.timeout = sync_period * 2;
            });
        }
        let differs = plan.is_complete() && {
            // Compared by name, not in order: the shards come sorted by index,
            // the held ones by name, and `n-10` sorts before `n-2`.
            let hashes = &mut self.hashes;
            let desired: BTreeMap<Option<&str>, String> = plan
                .shards
                .iter()
                .map(|shard| (shard.metadata.name.as_deref(), hashes.hash(shard)))
                .collect();
            let held = self
                .applied
                .iter()
                .map(|(name, applied)| (Some(name.as_str()), applied.hash.clone()));
            !desired.into_iter().eq(held)
        };
        if differs {
            if self.schedule.queued_since().is_none() {
                let now = Timestamp::now();
                self.metrics.queued(now.as_millisecond() as f64 / 1000.0);
                self.health.update(|state| state.queued_since = Some(now));
            }
            self.schedule.queue(Instant::now());
        } else if self.schedule.queued_since().is_some() {
            self.schedule.unqueue();
            self.health.update(|state| state.queued_since = None);
        }
    }

    async fn sync(&mut self, plan: Option<&NodePlan>, full: bool) -> Result<(), Error> {
        let started = Instant::now();
        let specs: Vec<Arc<ProxyPlan>> = match plan {
            Some(plan) if plan.is_complete() => plan.shards.clone(),
            // No complete plan: a due full resync re-applies what the kernel should hold.
            _ if full && !self.applied_specs.is_empty() => self.applied_specs.clone(),
            _ => {
                self.schedule.resync_skipped(started);
                return Ok(());
            }
        };
        if self.schedule.resync_due(started) && !self.applied_specs.is_empty() {
            self.check_drift().await?;
        }

        let mut kernel = self
            .kernel
            .take()
            .expect("the kernel must be home when no sync runs");
        let input = specs.clone();
        let (kernel, result) = tokio::task::spawn_blocking(move || {
            let result = kernel.sync(&input, full);
            (kernel, result)
        })
        .await
        .map_err(Error::KernelPanicked)?;
        self.kernel = Some(kernel);
        let finished = Instant::now();
        self.last_event_at = Timestamp::now();

        match result {
            Ok(applied) => {
                self.schedule.succeeded(started, finished, full);
                self.sync_succeeded(specs, applied).await;
            }
            Err(error) => {
                let backoff = self.schedule.failed(finished);
                self.metrics.restore_failed();
                warn!(
                    full,
                    kind = error.kind,
                    %error,
                    retry_in = ?backoff,
                    "sync failed; the previous rules keep serving"
                );
                self.last_failure = Some(error);
            }
        }
        Ok(())
    }

    async fn check_drift(&mut self) -> Result<(), Error> {
        let kernel = self
            .kernel
            .take()
            .expect("the kernel must be home when no sync runs");
        let (kernel, drift) = tokio::task::spawn_blocking(move || {
            let drift = kernel.drift_detected();
            (kernel, drift)
        })
        .await
        .map_err(Error::KernelPanicked)?;
        self.kernel = Some(kernel);
        match drift {
            Ok(true) => {
                self.metrics.drift_repaired();
                warn!("our rules were changed behind our back; the full resync rewrites them");
            }
            Ok(false) => {}
            Err(error) => warn!(%error, "failed to check the rules for drift"),
        }
        Ok(())
    }

    async fn sync_succeeded(&mut self, specs: Vec<Arc<ProxyPlan>>, applied: Applied) {
        let now = self.last_event_at;
        let duration_millis = i64::try_from(applied.duration.as_millis()).unwrap_or(i64::MAX);
        let mut held = BTreeMap::new();
        for shard in &specs {
            let name = shard.metadata.name.clone().unwrap_or_default();
            let spec = &shard.spec;
            // A shard that is the same object as last time has the same hash.
            let unchanged = self
                .applied_specs
                .iter()
                .any(|previous| Arc::ptr_eq(previous, shard));
            let hash = match self.applied.get(&name) {
                Some(previous) if unchanged => previous.hash.clone(),
                _ => spec_hash(spec),
            };
            let synced_at = match self.applied.get(&name) {
                Some(previous) if previous.hash == hash => previous.synced_at.clone(),
                _ => Time(now),
            };
            let summary = applied
                .per_shard
                .get(&spec.shard.index)
                .cloned()
                .unwrap_or_default();
            held.insert(
                name,
                AppliedShard {
                    hash,
                    summary,
                    synced_at,
                    duration_millis,
                },
            );
        }
        // Periodic resyncs of unchanged content are routine: keep them out of the
        // info log, which then shows only what changed the node.
        let changed = self.applied != held || self.last_failure.is_some();
        self.applied = held;
        self.last_failure = None;
        self.issues = applied.issues.clone();
        if changed {
            info!(full = applied.full, duration = ?applied.duration, shards = specs.len(), "rules programmed");
        } else {
            debug!(full = applied.full, duration = ?applied.duration, shards = specs.len(), "rules programmed");
        }

        let unix_now = now.as_millisecond() as f64 / 1000.0;
        self.metrics.sync_succeeded(
            applied.full,
            applied.duration.as_secs_f64(),
            applied.lock_wait.as_secs_f64(),
            unix_now,
        );
        for ((ip_family, table), rules) in &applied.rules_per_table {
            self.metrics.set_rules(ip_family, table, *rules);
        }
        self.metrics
            .conntrack_deleted(applied.conntrack_entries_deleted);
        self.observe_programming_latency(&specs, now);
        let (internal, external) = no_local_endpoints(specs.iter().map(|shard| &shard.spec));
        self.metrics.set_no_local_endpoints("internal", internal);
        self.metrics.set_no_local_endpoints("external", external);

        let queued = self.schedule.queued_since().is_some();
        self.health.update(|state| {
            state.last_updated = Some(now);
            if !queued {
                state.queued_since = None;
            }
        });

        let node_port_addresses = specs
            .first()
            .map(|shard| shard.spec.settings.node_port_addresses.as_slice())
            .unwrap_or_default();
        // Read at every sync, so an address the node gains or loses is served
        // by the next one (the periodic resync at the latest).
        let interfaces = if node_port_addresses.is_empty() {
            Vec::new()
        } else {
            self.kernel
                .as_ref()
                .map(Kernel::local_addresses)
                .unwrap_or_default()
        };
        let addresses = listen_addresses(node_port_addresses, &interfaces);
        self.health_checks
            .update(
                health_check_services(&specs.iter().map(|s| &s.spec).collect::<Vec<_>>()),
                &addresses,
            )
            .await;
        self.applied_specs = specs;
    }

    /// Observes, once per service port and trigger time, how long the change took
    /// to reach this node's kernel. Changes from before the agent started are
    /// skipped: their latency would measure the agent's downtime.
    fn observe_programming_latency(&mut self, specs: &[Arc<ProxyPlan>], now: Timestamp) {
        let mut seen = BTreeMap::new();
        for port in specs.iter().flat_map(|shard| &shard.spec.service_ports) {
            let Some(trigger) = &port.last_change_trigger_time else {
                continue;
            };
            let key = format!(
                "{}/{}:{}/{}",
                port.namespace,
                port.name,
                port.port_name,
                port.protocol.as_lower_str()
            );
            if self.trigger_times.get(&key) != Some(trigger) && trigger.0 >= self.started_at {
                let latency = now.duration_since(trigger.0).as_secs_f64().max(0.0);
                self.metrics.network_programmed(latency);
            }
            seen.insert(key, trigger.clone());
        }
        self.trigger_times = seen;
    }

    fn publish_statuses(&mut self, plan: Option<&NodePlan>) {
        let Some(plan) = plan else {
            return;
        };
        let now = Time(self.last_event_at);
        let pending_reason = match (&plan.incomplete, self.schedule.failures()) {
            (Some(why), _) => why.clone(),
            (None, 0) => "waiting for the next sync (minSyncPeriod)".to_owned(),
            (None, _) => "waiting to retry the failed sync".to_owned(),
        };
        let mut desired = DesiredStatuses::new();
        for shard in &plan.shards {
            let Some(name) = shard.metadata.name.as_deref() else {
                continue;
            };
            let hash = self.hashes.hash(shard);
            let state = ShardState {
                generation: shard.metadata.generation,
                spec_hash: &hash,
                applied: self.applied.get(name),
                pending_reason: &pending_reason,
                last_failure: self.last_failure.as_ref(),
                issues: &self.issues,
            };
            let status = shard_status(shard.status.as_ref(), &state, &now);
            if Some(&status) != shard.status.as_ref() {
                desired.insert(
                    name.to_owned(),
                    DesiredStatus {
                        status,
                        differs_at: shard.metadata.resource_version.clone(),
                    },
                );
            }
        }
        self.statuses.send_if_modified(|current| {
            if *current == desired {
                false
            } else {
                *current = desired;
                true
            }
        });
    }
}

/// Service ports with endpoints but none on this node under a Local policy, as
/// (internal, external) counts.
fn no_local_endpoints<'a>(specs: impl Iterator<Item = &'a ProxyPlanSpec>) -> (usize, usize) {
    let mut internal = 0;
    let mut external = 0;
    for port in specs.flat_map(|spec| &spec.service_ports) {
        if !port.has_endpoints {
            continue;
        }
        let no_local = port
            .local_endpoints
            .as_ref()
            .is_none_or(|set| set.endpoints.is_empty());
        if no_local && port.internal_traffic_policy == TrafficPolicy::Local {
            internal += 1;
        }
        if no_local && port.external_traffic_policy == TrafficPolicy::Local {
            external += 1;
        }
    }
    (internal, external)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::run::plan_set::tests::mk_shard;
    use planproxy_crds::condition;
    use planproxy_crds::v1alpha1::ProgrammedSummary;
    use std::sync::Mutex;
    use std::time::Duration;

    /// One call the fake kernel saw.
    #[derive(Clone, Debug, PartialEq)]
    struct Call {
        at: Instant,
        full: bool,
        hashes: Vec<String>,
    }

    #[derive(Clone, Default)]
    struct FakeKernel {
        calls: Arc<Mutex<Vec<Call>>>,
        fail_next: Arc<Mutex<usize>>,
        drift: Arc<Mutex<bool>>,
        /// What every successful sync reports it could not make of the node.
        issues: Arc<Mutex<Vec<SettingProblem>>>,
    }

    impl FakeKernel {
        fn calls(&self) -> Vec<Call> {
            self.calls.lock().expect("fake kernel lock").clone()
        }
    }

    impl Kernel for FakeKernel {
        fn sync(&mut self, shards: &[Arc<ProxyPlan>], full: bool) -> Result<Applied, ApplyError> {
            self.calls.lock().expect("fake kernel lock").push(Call {
                at: Instant::now(),
                full,
                hashes: shards.iter().map(|shard| spec_hash(&shard.spec)).collect(),
            });
            let mut fail = self.fail_next.lock().expect("fake kernel lock");
            if *fail > 0 {
                *fail -= 1;
                return Err(ApplyError {
                    kind: "restore",
                    message: "ipv4 nat: iptables-restore failed at line 7".into(),
                });
            }
            Ok(Applied {
                full,
                duration: Duration::from_millis(3),
                per_shard: shards
                    .iter()
                    .map(|shard| {
                        (
                            shard.spec.shard.index,
                            ProgrammedSummary {
                                service_ports: i32::try_from(shard.spec.service_ports.len())
                                    .unwrap_or_default(),
                                rules: 10,
                                ..Default::default()
                            },
                        )
                    })
                    .collect(),
                issues: self.issues.lock().expect("fake kernel lock").clone(),
                ..Default::default()
            })
        }

        fn drift_detected(&self) -> Result<bool, ApplyError> {
            Ok(std::mem::take(
                &mut *self.drift.lock().expect("fake kernel lock"),
            ))
        }

        fn local_addresses(&self) -> Vec<std::net::IpAddr> {
            Vec::new()
        }
    }

    struct Harness {
        kernel: FakeKernel,
        plans: watch::Sender<PlanSnapshot>,
        statuses: watch::Receiver<DesiredStatuses>,
        health: NodeHealth,
        stop: Option<tokio::sync::oneshot::Sender<()>>,
        task: tokio::task::JoinHandle<Result<FakeKernel, Error>>,
    }

    impl Harness {
        fn start() -> Self {
            let kernel = FakeKernel::default();
            let (plans, plans_rx) = watch::channel(None);
            let (status_tx, statuses) = watch::channel(DesiredStatuses::new());
            let health = NodeHealth::default();
            let metrics = AgentMetrics::new(&mut prometheus_client::registry::Registry::default());
            let sync_loop = SyncLoop::new(
                "n1".into(),
                kernel.clone(),
                health.clone(),
                metrics,
                status_tx,
            );
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(sync_loop.run(plans_rx, async {
                let _ = stopped.await;
            }));
            Self {
                kernel,
                plans,
                statuses,
                health,
                stop: Some(stop),
                task,
            }
        }

        fn publish(&self, shards: Vec<Arc<ProxyPlan>>) {
            self.plans.send_replace(Some(shards));
        }

        async fn stop(mut self) -> FakeKernel {
            if let Some(stop) = self.stop.take() {
                let _ = stop.send(());
            }
            self.task
                .await
                .expect("sync loop must not panic")
                .expect("sync loop must stop cleanly")
        }
    }

    fn with_service(shard: Arc<ProxyPlan>, name: &str) -> Arc<ProxyPlan> {
        let mut shard = (*shard).clone();
        shard
            .spec
            .service_ports
            .push(planproxy_crds::v1alpha1::ServicePortPlan {
                namespace: "default".into(),
                name: name.into(),
                port: 80,
                ..Default::default()
            });
        Arc::new(shard)
    }

    async fn settle() {
        // Lets the loop run; with paused time this advances the clock only as far
        // as the loop's own timers.
        tokio::time::sleep(Duration::from_millis(1)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn first_complete_plan_is_synced_full_at_once() {
        let h = Harness::start();
        h.publish(vec![mk_shard("n1", 0, 1, 1)]);
        settle().await;
        let calls = h.kernel.calls();
        assert_eq!(calls.len(), 1);
        assert!(calls[0].full);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn changes_within_min_sync_period_coalesce_into_one_partial_sync() {
        let h = Harness::start();
        let t0 = Instant::now();
        h.publish(vec![mk_shard("n1", 0, 1, 1)]);
        settle().await;
        h.publish(vec![with_service(mk_shard("n1", 0, 1, 1), "a")]);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let last = with_service(with_service(mk_shard("n1", 0, 1, 1), "a"), "b");
        h.publish(vec![last.clone()]);
        tokio::time::sleep(Duration::from_secs(2)).await;

        let calls = h.kernel.calls();
        assert_eq!(calls.len(), 2, "{calls:?}");
        assert!(!calls[1].full);
        assert_eq!(calls[1].hashes, [spec_hash(&last.spec)]);
        let gap = calls[1].at - calls[0].at;
        assert!(
            gap >= Duration::from_secs(1),
            "min sync period respected: {gap:?}"
        );
        assert!(calls[1].at - t0 < Duration::from_millis(1100));
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_plan_of_many_shards_seen_again_unchanged_needs_no_sync() {
        // Twelve shards: `n1-10` and `n1-11` sort before `n1-2` by name.
        let h = Harness::start();
        let shards: Vec<Arc<ProxyPlan>> = (0..12).map(|i| mk_shard("n1", i, 12, 1)).collect();
        h.publish(shards.clone());
        settle().await;
        // The watch sends the same shards again, as it does for a status write.
        for _ in 0..3 {
            tokio::time::sleep(Duration::from_secs(2)).await;
            h.publish(shards.clone());
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let calls = h.kernel.calls();
        assert_eq!(calls.len(), 1, "only the first sync: {calls:?}");
        assert_eq!(h.health.snapshot().queued_since, None);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn incomplete_plan_leaves_the_kernel_alone_and_reports_pending() {
        let mut h = Harness::start();
        h.publish(vec![mk_shard("n1", 0, 2, 1)]);
        tokio::time::sleep(Duration::from_secs(100)).await;
        assert!(
            h.kernel.calls().is_empty(),
            "nothing may be written from an incomplete plan"
        );

        let statuses = h.statuses.borrow_and_update().clone();
        let status = &statuses["n1-0"].status;
        let programmed = condition::find(&status.conditions, condition::PROGRAMMED)
            .expect("Programmed condition");
        assert_eq!(programmed.status, "False");
        assert_eq!(programmed.reason, condition::reason::PENDING);
        assert!(
            programmed.message.contains("waiting for shards 1 of 2"),
            "{}",
            programmed.message
        );
        assert_eq!(
            h.health.snapshot().queued_since,
            None,
            "an incomplete plan is not a stuck sync"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn unchanged_plan_is_resynced_full_every_sync_period() {
        let h = Harness::start();
        h.publish(vec![mk_shard("n1", 0, 1, 1)]);
        settle().await;
        tokio::time::sleep(Duration::from_secs(61)).await;
        let calls = h.kernel.calls();
        assert_eq!(calls.len(), 3, "{calls:?}");
        assert!(calls.iter().all(|call| call.full));
        assert_eq!(calls[0].hashes, calls[2].hashes);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn failed_sync_is_retried_with_backoff_and_reported_degraded() {
        let mut h = Harness::start();
        *h.kernel.fail_next.lock().expect("fake kernel lock") = 3;
        h.publish(vec![mk_shard("n1", 0, 1, 1)]);
        settle().await;
        let statuses = h.statuses.borrow_and_update().clone();
        let degraded = condition::find(&statuses["n1"].status.conditions, condition::DEGRADED)
            .expect("Degraded condition");
        assert_eq!(degraded.status, "True");
        assert!(degraded.message.contains("nat"), "{}", degraded.message);

        tokio::time::sleep(Duration::from_secs(10)).await;
        let calls = h.kernel.calls();
        let gaps: Vec<u64> = calls
            .windows(2)
            .map(|w| (w[1].at - w[0].at).as_secs())
            .collect();
        assert_eq!(gaps, [1, 2, 4], "exponential backoff, then success");
        assert!(calls.iter().all(|call| call.full), "retries are full syncs");

        let statuses = h.statuses.borrow_and_update().clone();
        let status = &statuses["n1"].status;
        assert_eq!(
            condition::find(&status.conditions, condition::DEGRADED).map(|c| c.status.as_str()),
            Some("False")
        );
        assert_eq!(
            condition::find(&status.conditions, condition::PROGRAMMED).map(|c| c.status.as_str()),
            Some("True")
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_node_setting_the_sync_could_not_make_is_degraded_until_a_sync_makes_it() {
        let mut h = Harness::start();
        *h.kernel.issues.lock().expect("fake kernel lock") = vec![SettingProblem {
            reason: condition::reason::SYSCTL_FAILED,
            message: "setting net.ipv4.conf.all.route_localnet failed".into(),
        }];
        h.publish(vec![mk_shard("n1", 0, 1, 1)]);
        settle().await;
        let statuses = h.statuses.borrow_and_update().clone();
        let status = &statuses["n1"].status;
        let degraded =
            condition::find(&status.conditions, condition::DEGRADED).expect("Degraded condition");
        assert_eq!(
            (degraded.status.as_str(), degraded.reason.as_str()),
            ("True", condition::reason::SYSCTL_FAILED)
        );
        assert!(degraded.message.contains("route_localnet"), "{degraded:?}");
        assert_eq!(
            condition::find(&status.conditions, condition::PROGRAMMED).map(|c| c.status.as_str()),
            Some("True"),
            "the rules are in place"
        );

        h.kernel.issues.lock().expect("fake kernel lock").clear();
        tokio::time::sleep(Duration::from_secs(31)).await;
        let statuses = h.statuses.borrow_and_update().clone();
        assert_eq!(
            condition::find(&statuses["n1"].status.conditions, condition::DEGRADED)
                .map(|c| c.status.as_str()),
            Some("False"),
            "the periodic resync made it"
        );
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn drift_found_at_the_periodic_check_is_repaired_by_the_full_resync() {
        let h = Harness::start();
        h.publish(vec![mk_shard("n1", 0, 1, 1)]);
        settle().await;
        *h.kernel.drift.lock().expect("fake kernel lock") = true;
        tokio::time::sleep(Duration::from_secs(31)).await;
        assert!(
            !*h.kernel.drift.lock().expect("fake kernel lock"),
            "drift was checked"
        );
        assert_eq!(h.kernel.calls().len(), 2);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn node_termination_in_the_plan_reaches_healthz() {
        let h = Harness::start();
        let mut shard = (*mk_shard("n1", 0, 1, 1)).clone();
        shard.spec.settings.node_terminating = true;
        h.publish(vec![Arc::new(shard)]);
        settle().await;
        let answer = crate::run::health::node_answer(&h.health.snapshot(), Timestamp::now(), true);
        assert_eq!(answer.code, 503);
        h.stop().await;
    }

    #[tokio::test(start_paused = true)]
    async fn stopping_leaves_the_kernel_untouched() {
        let h = Harness::start();
        h.publish(vec![mk_shard("n1", 0, 1, 1)]);
        settle().await;
        let kernel = h.stop().await;
        assert_eq!(kernel.calls().len(), 1, "no cleanup or flush on stop");
    }

    #[tokio::test(start_paused = true)]
    async fn queued_change_not_applied_in_time_makes_healthz_fail() {
        let h = Harness::start();
        h.publish(vec![mk_shard("n1", 0, 1, 1)]);
        settle().await;
        *h.kernel.fail_next.lock().expect("fake kernel lock") = 100;
        h.publish(vec![with_service(mk_shard("n1", 0, 1, 1), "a")]);
        settle().await;
        tokio::time::sleep(Duration::from_secs(59)).await;
        let now = Timestamp::now();
        assert!(h.health.snapshot().proxy_healthy(now));
        tokio::time::sleep(Duration::from_secs(2)).await;
        // Paused tokio time does not move the wall clock: judge at queued + 61s.
        let state = h.health.snapshot();
        let queued = state.queued_since.expect("a change is queued");
        let later = queued + jiff::SignedDuration::from_secs(61);
        assert!(!state.proxy_healthy(later));
        h.stop().await;
    }
}
