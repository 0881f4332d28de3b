//! The writer: the one task that writes to the API (plans, policy status, events).
//!
//! It writes only while this replica leads, one queued write per token of the
//! write budget, freshest change first (see [`super::queue`]).

use std::sync::Arc;
use std::time::Duration;

use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::events::{Event, EventType, Recorder};
use planproxy_crds::labels::CONTROLLER_MANAGER;
use planproxy_crds::{ProxyPlan, ProxyPolicy};
use tokio::sync::watch;
use tokio::time::Instant;

use super::admin::Health;
use super::budget::WriteBudget;
use super::metrics::{ErrorLabels, Metrics};
use super::queue::Queued;
use super::reconcile::{Shared, Write, WriteKey, Written};

/// How long one write may take before it counts as failed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest pause after consecutive failures.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why a write failed, as a metric label.
pub fn error_kind(error: &kube::Error) -> &'static str {
    match error {
        kube::Error::Api(status) if status.is_conflict() => "conflict",
        kube::Error::Api(status) if status.is_not_found() => "not_found",
        kube::Error::Api(status) if status.is_forbidden() => "forbidden",
        kube::Error::Api(status) if status.is_invalid() || status.code == 400 => "invalid",
        kube::Error::Api(status) if status.code >= 500 || status.code == 429 => "server",
        kube::Error::HyperError(_) | kube::Error::Service(_) => "transport",
        _ => "other",
    }
}

/// Whether a failed write is worth retrying unchanged. Invalid writes are not:
/// they would fail forever; the next change to the object queues new content.
fn retryable(kind: &str) -> bool {
    !matches!(kind, "invalid")
}

enum Outcome {
    Done,
    Failed(&'static str, String),
}

/// Everything the writer needs.
pub struct Writer {
    /// The API client.
    pub client: kube::Client,
    /// Publishes events.
    pub recorder: Recorder,
    /// The queue.
    pub shared: Arc<Shared>,
    /// Writes per second.
    pub max_writes_per_second: u32,
    /// Metrics.
    pub metrics: Metrics,
    /// Readiness.
    pub health: Arc<Health>,
}

impl Writer {
    /// Writes queued changes while leading, until `shutdown` turns true.
    pub async fn run(
        self,
        mut leading: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let plans: Api<ProxyPlan> = Api::all(self.client.clone());
        let policies: Api<ProxyPolicy> = Api::all(self.client.clone());
        let mut budget = WriteBudget::new(self.max_writes_per_second, Instant::now());
        let mut failures: u32 = 0;
        let mut was_leading = false;
        loop {
            if *shutdown.borrow() {
                return;
            }
            let now_leading = *leading.borrow_and_update();
            if now_leading != was_leading {
                // Readiness follows what this task saw, in order: a new leader is
                // ready only after it found its queue empty.
                self.health.set_leading(now_leading);
                was_leading = now_leading;
            }
            if !now_leading {
                tokio::select! {
                    _ = leading.changed() => continue,
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
            }
            if self.shared.lock().queue.is_empty() {
                self.health.set_caught_up();
                tokio::select! {
                    () = self.shared.notify.notified() => {}
                    _ = leading.changed() => {}
                    _ = shutdown.wait_for(|stop| *stop) => return,
                }
                continue;
            }
            budget.take().await;
            // Taken after the token, so the freshest change at write time goes first.
            let next = {
                let mut pending = self.shared.lock();
                let next = pending.queue.pop(Instant::now());
                self.metrics.queue_depth.set(pending.queue.len() as i64);
                next
            };
            let Some((key, queued)) = next else { continue };
            if !*leading.borrow() {
                self.requeue(key, queued);
                continue;
            }
            let outcome = tokio::time::timeout(
                WRITE_TIMEOUT,
                self.write(&plans, &policies, &key, &queued.value),
            )
            .await;
            let outcome =
                outcome.unwrap_or_else(|_| Outcome::Failed("timeout", "timed out".into()));
            match outcome {
                Outcome::Done => {
                    failures = 0;
                    self.metrics
                        .change_to_write
                        .observe(queued.since.elapsed().as_secs_f64());
                }
                Outcome::Failed(kind, message) => {
                    let target = target(&queued.value);
                    self.metrics
                        .write_errors
                        .get_or_create(&ErrorLabels { target, kind })
                        .inc();
                    tracing::warn!(?key, kind, error = %message, "write failed");
                    if retryable(kind) {
                        self.requeue(key, queued);
                    }
                    failures = failures.saturating_add(1);
                    let backoff = Duration::from_millis(100u64 << failures.min(6)).min(MAX_BACKOFF);
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = shutdown.wait_for(|stop| *stop) => return,
                    }
                }
            }
        }
    }

    /// Puts a write back unless newer content for the same key arrived meanwhile.
    fn requeue(&self, key: WriteKey, queued: Queued<Write>) {
        let mut pending = self.shared.lock();
        if pending.queue.get(&key).is_none() {
            pending
                .queue
                .push(key, queued.value, queued.since, Instant::now());
        }
        self.metrics.queue_depth.set(pending.queue.len() as i64);
    }

    #[tracing::instrument(name = "write", skip_all, fields(key = ?key))]
    async fn write(
        &self,
        plans: &Api<ProxyPlan>,
        policies: &Api<ProxyPolicy>,
        key: &WriteKey,
        write: &Write,
    ) -> Outcome {
        match (key, write) {
            (WriteKey::Plan(name), Write::ApplyPlan { plan, hash }) => {
                let params = PatchParams::apply(CONTROLLER_MANAGER).force();
                match plans
                    .patch(name, &params, &Patch::Apply(plan.as_ref()))
                    .await
                {
                    Ok(_) => {
                        self.shared
                            .lock()
                            .written
                            .insert(name.clone(), Written::Applied(hash.clone()));
                        self.metrics.plans_written.inc();
                        tracing::debug!(plan = %name, %hash, "wrote ProxyPlan");
                        Outcome::Done
                    }
                    Err(error) => Outcome::Failed(error_kind(&error), error.to_string()),
                }
            }
            (WriteKey::Plan(name), Write::DeletePlan) => {
                match plans.delete(name, &DeleteParams::default()).await {
                    Ok(_) => {
                        self.shared
                            .lock()
                            .written
                            .insert(name.clone(), Written::Deleted);
                        self.metrics.plans_deleted.inc();
                        tracing::debug!(plan = %name, "deleted ProxyPlan");
                        Outcome::Done
                    }
                    Err(kube::Error::Api(status)) if status.is_not_found() => Outcome::Done,
                    Err(error) => Outcome::Failed(error_kind(&error), error.to_string()),
                }
            }
            (WriteKey::PolicyStatus(name), Write::PolicyStatus(status)) => {
                // Replaces the whole status: a merge patch could not drop fields
                // that the new acceptedSpec no longer sets.
                let patch = serde_json::json!([{"op": "add", "path": "/status", "value": status}]);
                let patch: json_patch::Patch = match serde_json::from_value(patch) {
                    Ok(p) => p,
                    Err(error) => return Outcome::Failed("other", error.to_string()),
                };
                let params = PatchParams::default();
                match policies
                    .patch_status(name, &params, &Patch::<()>::Json(patch))
                    .await
                {
                    Ok(_) => {
                        self.metrics.policy_statuses_written.inc();
                        Outcome::Done
                    }
                    // The policy is gone: nothing to report on.
                    Err(kube::Error::Api(status)) if status.is_not_found() => Outcome::Done,
                    Err(error) => Outcome::Failed(error_kind(&error), error.to_string()),
                }
            }
            (WriteKey::Event(_), Write::Event(event)) => {
                let ev = Event {
                    type_: EventType::Warning,
                    reason: event.reason.to_owned(),
                    note: Some(event.note.clone()),
                    action: "Resolve".into(),
                    secondary: None,
                };
                match self.recorder.publish(&ev, &event.regarding).await {
                    Ok(()) => {
                        self.metrics.events_published.inc();
                        Outcome::Done
                    }
                    Err(error) => Outcome::Failed(error_kind(&error), error.to_string()),
                }
            }
            (key, _) => {
                // The resolver pairs keys and writes; a mismatch is a bug, not input.
                tracing::error!(?key, "queued write does not match its key; dropped");
                Outcome::Done
            }
        }
    }
}

fn target(write: &Write) -> &'static str {
    match write {
        Write::ApplyPlan { .. } => "plan",
        Write::DeletePlan => "plan_delete",
        Write::PolicyStatus(_) => "policy_status",
        Write::Event(_) => "event",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api_error(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api(Box::new(Status {
            code,
            reason: reason.into(),
            ..Status::default()
        }))
    }

    #[test]
    fn write_errors_are_classified_for_metrics_and_retries() {
        assert_eq!(error_kind(&api_error(409, "Conflict")), "conflict");
        assert_eq!(error_kind(&api_error(404, "NotFound")), "not_found");
        assert_eq!(error_kind(&api_error(403, "Forbidden")), "forbidden");
        assert_eq!(error_kind(&api_error(422, "Invalid")), "invalid");
        assert_eq!(error_kind(&api_error(503, "ServiceUnavailable")), "server");
        assert_eq!(error_kind(&api_error(429, "TooManyRequests")), "server");
        assert!(retryable("conflict"));
        assert!(retryable("server"));
        assert!(!retryable("invalid"));
    }
}
