//! What the agent reports on each shard's `status`, and the one task that writes it.
//!
//! [`shard_status`] is pure: from what the kernel holds for a shard, the shard's
//! current spec and the status already on the object it computes the new status.
//! Unchanged inputs give an identical status, so the writer can skip the write:
//! nothing here is a heartbeat. [`write_statuses`] is the only writer to the API
//! server; it coalesces and rate-limits, and only ever patches the `status`
//! subresource, so it never races the controller's spec writes.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::Api;
use kube::api::{Patch, PatchParams};
use planproxy_crds::condition::{self, reason};
use planproxy_crds::labels::AGENT_MANAGER;
use planproxy_crds::v1alpha1::ProgrammedSummary;
use planproxy_crds::{ProxyPlan, ProxyPlanStatus};
use tokio::sync::watch;

use super::kernel::{ApplyError, SettingProblem};
use super::metrics::AgentMetrics;

/// What the kernel holds for one shard, as the sync loop tracks it.
#[derive(Clone, Debug, PartialEq)]
pub struct AppliedShard {
    /// `spec_hash` of the spec programmed.
    pub hash: String,
    /// What it programmed.
    pub summary: ProgrammedSummary,
    /// When this content was first programmed.
    pub synced_at: Time,
    /// How long that sync took.
    pub duration_millis: i64,
}

/// Everything [`shard_status`] needs to know about one shard.
#[derive(Clone, Copy, Debug)]
pub struct ShardState<'a> {
    /// The shard's `metadata.generation`.
    pub generation: Option<i64>,
    /// `spec_hash` of the shard's current spec.
    pub spec_hash: &'a str,
    /// What the kernel holds for this shard, if this agent programmed it.
    pub applied: Option<&'a AppliedShard>,
    /// Why the current spec is not programmed yet (used when it is not).
    pub pending_reason: &'a str,
    /// The last sync's error, while the node has not synced successfully since.
    pub last_failure: Option<&'a ApplyError>,
    /// What the last successful sync could not make of the node (its rules
    /// are in place).
    pub issues: &'a [SettingProblem],
}

/// The status a shard should carry. `prev` is the status on the object now; its
/// transition times, and its sync time when the content did not change, are kept.
pub fn shard_status(
    prev: Option<&ProxyPlanStatus>,
    state: &ShardState<'_>,
    now: &Time,
) -> ProxyPlanStatus {
    let mut status = prev.cloned().unwrap_or_default();
    let programmed = state
        .applied
        .is_some_and(|applied| applied.hash == state.spec_hash);
    let condition = |type_: &str, ok: bool, reason: &str, message: String| Condition {
        type_: type_.to_owned(),
        status: if ok {
            condition::TRUE
        } else {
            condition::FALSE
        }
        .to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: state.generation,
        last_transition_time: now.clone(),
    };

    let programmed_condition = match (programmed, state.last_failure) {
        (true, _) => condition(
            condition::PROGRAMMED,
            true,
            reason::PROGRAMMED,
            format!(
                "the node's rules hold this shard (hash {})",
                state.spec_hash
            ),
        ),
        (false, Some(failure)) => condition(
            condition::PROGRAMMED,
            false,
            reason::APPLY_FAILED,
            format!("{failure}; the previous rules keep serving"),
        ),
        (false, None) => condition(
            condition::PROGRAMMED,
            false,
            reason::PENDING,
            state.pending_reason.to_owned(),
        ),
    };
    condition::set(&mut status.conditions, programmed_condition);
    let degraded_condition = match state.last_failure {
        Some(failure) => condition(
            condition::DEGRADED,
            true,
            reason::APPLY_FAILED,
            format!("{failure}; the previous rules keep serving"),
        ),
        None => match state.issues {
            [] => condition(
                condition::DEGRADED,
                false,
                reason::HEALTHY,
                "no sync has failed since the last success".to_owned(),
            ),
            [first, ..] => condition(
                condition::DEGRADED,
                true,
                first.reason,
                state
                    .issues
                    .iter()
                    .map(|i| i.message.as_str())
                    .collect::<Vec<_>>()
                    .join("; "),
            ),
        },
    };
    condition::set(&mut status.conditions, degraded_condition);

    if let Some(applied) = state.applied {
        let same_content = status.applied_hash.as_deref() == Some(applied.hash.as_str());
        if !same_content || status.last_sync_time.is_none() {
            status.last_sync_time = Some(applied.synced_at.clone());
            status.last_sync_duration_millis = Some(applied.duration_millis);
        }
        status.applied_hash = Some(applied.hash.clone());
        status.programmed = Some(applied.summary.clone());
    }
    status
}

/// Where statuses go: the API server, or a recorder in tests.
pub trait StatusSink: Send + Sync + 'static {
    /// Replaces the status of ProxyPlan `name`.
    fn patch_status(
        &self,
        name: &str,
        status: &ProxyPlanStatus,
    ) -> impl Future<Output = Result<(), kube::Error>> + Send;
}

/// Writes through the `status` subresource with the agent's field manager.
#[derive(Clone)]
pub struct KubeStatusSink {
    api: Api<ProxyPlan>,
}

impl KubeStatusSink {
    /// A sink writing to `api` (cluster-scoped ProxyPlans).
    pub fn new(api: Api<ProxyPlan>) -> Self {
        Self { api }
    }
}

impl StatusSink for KubeStatusSink {
    async fn patch_status(&self, name: &str, status: &ProxyPlanStatus) -> Result<(), kube::Error> {
        let patch = serde_json::json!({ "status": status });
        let params = PatchParams {
            field_manager: Some(AGENT_MANAGER.to_owned()),
            ..Default::default()
        };
        self.api
            .patch_status(name, &params, &Patch::Merge(&patch))
            .await?;
        Ok(())
    }
}

/// A status a shard must carry, and the `metadata.resourceVersion` of the object
/// seen not to carry it.
#[derive(Clone, Debug, PartialEq)]
pub struct DesiredStatus {
    /// The status to write.
    pub status: ProxyPlanStatus,
    /// The version of the shard whose status differs from `status`.
    pub differs_at: Option<String>,
}

/// The writer task: writes the statuses published on `desired` (shard name →
/// status; only shards whose status must change), at most one round per
/// `min_interval`. Failed writes are retried at the next round. Returns when
/// `desired`'s sender is dropped, after a last round.
///
/// A status is skipped only when it was already written against the same
/// version of the shard: then the watch just has not shown our write yet. A
/// newer version that still differs means the server lost or replaced what we
/// wrote (the shard was recreated, or its status reset), so it is written again;
/// comparing with what we last wrote alone would leave it stale forever.
pub async fn write_statuses<S: StatusSink>(
    sink: S,
    mut desired: watch::Receiver<BTreeMap<String, DesiredStatus>>,
    min_interval: Duration,
    metrics: AgentMetrics,
) {
    let mut written: BTreeMap<String, DesiredStatus> = BTreeMap::new();
    let mut retry = false;
    loop {
        let closed = if retry {
            false
        } else {
            desired.changed().await.is_err()
        };
        let round = desired.borrow_and_update().clone();
        written.retain(|name, _| round.contains_key(name));
        retry = false;
        for (name, wanted) in &round {
            if written.get(name) == Some(wanted) {
                continue;
            }
            match sink.patch_status(name, &wanted.status).await {
                Ok(()) => {
                    metrics.status_write("ok");
                    written.insert(name.clone(), wanted.clone());
                }
                Err(kube::Error::Api(response)) if response.code == 404 => {
                    // The controller deleted the shard; nothing to report on.
                    metrics.status_write("gone");
                    written.insert(name.clone(), wanted.clone());
                }
                Err(error) => {
                    metrics.status_write("error");
                    tracing::warn!(shard = %name, %error, "failed to write ProxyPlan status; will retry");
                    retry = true;
                }
            }
        }
        if closed {
            return;
        }
        tokio::time::sleep(min_interval).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    fn time(secs: i64) -> Time {
        Time(jiff::Timestamp::from_second(secs).expect("test times must be valid"))
    }

    fn applied(hash: &str, at: i64) -> AppliedShard {
        AppliedShard {
            hash: hash.to_owned(),
            summary: ProgrammedSummary {
                service_ports: 2,
                endpoints: 3,
                rules: 40,
                chains: 7,
            },
            synced_at: time(at),
            duration_millis: 12,
        }
    }

    fn state<'a>(hash: &'a str, applied: Option<&'a AppliedShard>) -> ShardState<'a> {
        ShardState {
            generation: Some(5),
            spec_hash: hash,
            applied,
            pending_reason: "waiting for the minimum sync period",
            last_failure: None,
            issues: &[],
        }
    }

    fn cond<'a>(status: &'a ProxyPlanStatus, type_: &str) -> &'a Condition {
        condition::find(&status.conditions, type_)
            .expect("test statuses must carry both conditions")
    }

    #[test]
    fn programmed_shard_reports_true_with_observed_generation_hash_and_counts() {
        let held = applied("abc", 100);
        let status = shard_status(None, &state("abc", Some(&held)), &time(101));
        let programmed = cond(&status, condition::PROGRAMMED);
        assert_eq!(programmed.status, "True");
        assert_eq!(programmed.reason, reason::PROGRAMMED);
        assert_eq!(programmed.observed_generation, Some(5));
        assert_eq!(cond(&status, condition::DEGRADED).status, "False");
        assert_eq!(status.applied_hash.as_deref(), Some("abc"));
        assert_eq!(status.programmed.as_ref().map(|p| p.rules), Some(40));
        assert_eq!(status.last_sync_time, Some(time(100)));
        assert_eq!(status.last_sync_duration_millis, Some(12));
    }

    #[test]
    fn unchanged_inputs_give_an_identical_status_so_no_write_happens() {
        let held = applied("abc", 100);
        let first = shard_status(None, &state("abc", Some(&held)), &time(101));
        let again = shard_status(Some(&first), &state("abc", Some(&held)), &time(500));
        assert_eq!(first, again);
    }

    #[test]
    fn resync_of_the_same_content_keeps_the_last_sync_time() {
        // After a restart the agent re-programs the same content: not a new sync.
        let before = shard_status(None, &state("abc", Some(&applied("abc", 100))), &time(101));
        let after = shard_status(
            Some(&before),
            &state("abc", Some(&applied("abc", 900))),
            &time(901),
        );
        assert_eq!(after.last_sync_time, Some(time(100)));
    }

    #[test]
    fn new_content_moves_the_last_sync_time() {
        let before = shard_status(None, &state("abc", Some(&applied("abc", 100))), &time(101));
        let after = shard_status(
            Some(&before),
            &state("def", Some(&applied("def", 200))),
            &time(201),
        );
        assert_eq!(after.last_sync_time, Some(time(200)));
        assert_eq!(after.applied_hash.as_deref(), Some("def"));
    }

    #[test]
    fn spec_newer_than_the_kernel_is_pending_and_keeps_the_old_hash() {
        let held = applied("old", 100);
        let before = shard_status(None, &state("old", Some(&held)), &time(101));
        let status = shard_status(Some(&before), &state("new", Some(&held)), &time(150));
        let programmed = cond(&status, condition::PROGRAMMED);
        assert_eq!(programmed.status, "False");
        assert_eq!(programmed.reason, reason::PENDING);
        assert_eq!(programmed.message, "waiting for the minimum sync period");
        assert_eq!(programmed.last_transition_time, time(150));
        assert_eq!(
            status.applied_hash.as_deref(),
            Some("old"),
            "the kernel still holds the old content"
        );
    }

    #[test]
    fn failed_apply_is_degraded_with_the_table_and_line_and_not_programmed() {
        let failure = ApplyError {
            kind: "restore",
            message: "iptables-restore refused table nat, line 12".into(),
        };
        let held = applied("old", 100);
        let mut input = state("new", Some(&held));
        input.last_failure = Some(&failure);
        let status = shard_status(None, &input, &time(150));
        let degraded = cond(&status, condition::DEGRADED);
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, reason::APPLY_FAILED);
        assert!(
            degraded.message.contains("table nat, line 12"),
            "{}",
            degraded.message
        );
        assert_eq!(
            cond(&status, condition::PROGRAMMED).reason,
            reason::APPLY_FAILED
        );
    }

    #[test]
    fn a_node_setting_not_made_is_degraded_but_programmed() {
        let held = applied("abc", 100);
        let issues = [SettingProblem {
            reason: reason::SYSCTL_FAILED,
            message: "setting net.ipv4.conf.all.route_localnet failed (Read-only file system)"
                .into(),
        }];
        let mut input = state("abc", Some(&held));
        input.issues = &issues;
        let status = shard_status(None, &input, &time(101));
        assert_eq!(cond(&status, condition::PROGRAMMED).status, "True");
        let degraded = cond(&status, condition::DEGRADED);
        assert_eq!(degraded.status, "True");
        assert_eq!(degraded.reason, reason::SYSCTL_FAILED);
        assert!(degraded.message.contains("route_localnet"), "{degraded:?}");
    }

    #[test]
    fn unchanged_shard_stays_programmed_while_another_shard_fails() {
        let failure = ApplyError {
            kind: "restore",
            message: "boom".into(),
        };
        let held = applied("same", 100);
        let mut input = state("same", Some(&held));
        input.last_failure = Some(&failure);
        let status = shard_status(None, &input, &time(150));
        assert_eq!(cond(&status, condition::PROGRAMMED).status, "True");
        assert_eq!(cond(&status, condition::DEGRADED).status, "True");
    }

    #[test]
    fn recovery_clears_degraded_and_moves_its_transition_time() {
        let failure = ApplyError {
            kind: "restore",
            message: "boom".into(),
        };
        let held = applied("new", 200);
        let mut failing = state("new", None);
        failing.last_failure = Some(&failure);
        let degraded = shard_status(None, &failing, &time(150));
        let healed = shard_status(Some(&degraded), &state("new", Some(&held)), &time(200));
        let condition = cond(&healed, condition::DEGRADED);
        assert_eq!(condition.status, "False");
        assert_eq!(condition.last_transition_time, time(200));
    }

    #[derive(Clone, Default)]
    struct Recorder {
        writes: Arc<Mutex<Vec<(String, ProxyPlanStatus)>>>,
    }

    impl StatusSink for Recorder {
        async fn patch_status(
            &self,
            name: &str,
            status: &ProxyPlanStatus,
        ) -> Result<(), kube::Error> {
            self.writes
                .lock()
                .expect("recorder lock must not be poisoned")
                .push((name.to_owned(), status.clone()));
            Ok(())
        }
    }

    fn status_with_hash(hash: &str) -> ProxyPlanStatus {
        ProxyPlanStatus {
            applied_hash: Some(hash.to_owned()),
            ..Default::default()
        }
    }

    /// `n1` must carry applied hash `hash`; the server's object is at `version`.
    fn desired(hash: &str, version: &str) -> BTreeMap<String, DesiredStatus> {
        BTreeMap::from([(
            "n1".to_owned(),
            DesiredStatus {
                status: status_with_hash(hash),
                differs_at: Some(version.to_owned()),
            },
        )])
    }

    /// A status writer over a recording client; the returned sender feeds it the
    /// desired statuses and dropping it ends the task.
    fn spawn_writer_with_one_second_interval() -> (
        Recorder,
        watch::Sender<BTreeMap<String, DesiredStatus>>,
        tokio::task::JoinHandle<()>,
    ) {
        let recorder = Recorder::default();
        let (tx, rx) = watch::channel(BTreeMap::new());
        let metrics = AgentMetrics::new(&mut prometheus_client::registry::Registry::default());
        let task = tokio::spawn(write_statuses(
            recorder.clone(),
            rx,
            Duration::from_secs(1),
            metrics,
        ));
        (recorder, tx, task)
    }

    fn written_hashes(recorder: &Recorder) -> Vec<String> {
        recorder
            .writes
            .lock()
            .expect("recorder lock must not be poisoned")
            .iter()
            .filter_map(|(_, s)| s.applied_hash.clone())
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn writer_coalesces_changes_within_the_min_interval_and_skips_repeats() {
        let (recorder, tx, task) = spawn_writer_with_one_second_interval();

        tx.send_replace(desired("a", "1"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Three updates inside one interval: only the last is written.
        for (hash, version) in [("b", "2"), ("c", "3"), ("d", "4")] {
            tx.send_replace(desired(hash, version));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        // The same status against the same object (our write not seen yet): no write.
        tx.send_replace(desired("d", "4"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(tx);
        task.await.expect("writer must not panic");

        assert_eq!(written_hashes(&recorder), ["a", "d"]);
    }

    #[tokio::test(start_paused = true)]
    async fn writer_rewrites_a_status_the_server_lost_after_it_was_written() {
        let (recorder, tx, task) = spawn_writer_with_one_second_interval();

        tx.send_replace(desired("a", "1"));
        tokio::time::sleep(Duration::from_millis(10)).await;
        // Inside one interval the server shows our write (nothing to do), then a
        // newer object without it (the shard was recreated): the writer only
        // sees the last state, which equals what it wrote, yet must write again.
        tx.send_replace(BTreeMap::new());
        tokio::time::sleep(Duration::from_millis(100)).await;
        tx.send_replace(desired("a", "3"));
        tokio::time::sleep(Duration::from_secs(2)).await;
        drop(tx);
        task.await.expect("writer must not panic");

        assert_eq!(written_hashes(&recorder), ["a", "a"]);
    }
}
