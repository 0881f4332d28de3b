//! Prometheus metrics of the controller runtime.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of [`Metrics::write_errors`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    /// What was written: `plan`, `plan_delete`, `policy_status` or `event`.
    pub target: &'static str,
    /// Why it failed: `conflict`, `not_found`, `forbidden`, `invalid`, `server`,
    /// `timeout`, `transport` or `other`.
    pub kind: &'static str,
}

/// Labels of [`Metrics::watch_events`] and [`Metrics::watch_errors`].
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The watched resource (`services`, `endpointslices`, …).
    pub resource: &'static str,
}

/// Every metric of the runtime. Cheap to clone (the metrics are shared handles).
#[derive(Clone, Debug)]
pub struct Metrics {
    /// Seconds one resolver flush took (the incremental resolution of one window).
    pub flush_duration: Histogram,
    /// ProxyPlans created or updated.
    pub plans_written: Counter,
    /// ProxyPlans deleted.
    pub plans_deleted: Counter,
    /// ProxyPolicy statuses written.
    pub policy_statuses_written: Counter,
    /// Kubernetes Events published.
    pub events_published: Counter,
    /// Events not published because too many were waiting.
    pub events_dropped: Counter,
    /// Writes that failed, by target and kind.
    pub write_errors: Family<ErrorLabels, Counter>,
    /// Writes waiting for the write budget.
    pub queue_depth: Gauge,
    /// Seconds from receiving a cluster change to the write that carries it.
    pub change_to_write: Histogram,
    /// 1 while this replica leads (and may write), 0 otherwise.
    pub leader: Gauge,
    /// Watch events received, by resource.
    pub watch_events: Family<KindLabels, Counter>,
    /// Watch errors (each followed by a backoff and a retry), by resource.
    pub watch_errors: Family<KindLabels, Counter>,
}

impl Metrics {
    /// Creates the metrics and registers them under `planproxy_controller_`.
    pub fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            flush_duration: Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            plans_written: Counter::default(),
            plans_deleted: Counter::default(),
            policy_statuses_written: Counter::default(),
            events_published: Counter::default(),
            events_dropped: Counter::default(),
            write_errors: Family::default(),
            queue_depth: Gauge::default(),
            change_to_write: Histogram::new(exponential_buckets(0.05, 2.0, 14)),
            leader: Gauge::default(),
            watch_events: Family::default(),
            watch_errors: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("planproxy_controller");
        r.register(
            "flush_duration_seconds",
            "Time one resolver flush took",
            metrics.flush_duration.clone(),
        );
        r.register(
            "plans_written",
            "ProxyPlans created or updated",
            metrics.plans_written.clone(),
        );
        r.register(
            "plans_deleted",
            "ProxyPlans deleted",
            metrics.plans_deleted.clone(),
        );
        r.register(
            "policy_statuses_written",
            "ProxyPolicy statuses written",
            metrics.policy_statuses_written.clone(),
        );
        r.register(
            "events_published",
            "Kubernetes Events published",
            metrics.events_published.clone(),
        );
        r.register(
            "events_dropped",
            "Events not published because too many were waiting",
            metrics.events_dropped.clone(),
        );
        r.register(
            "write_errors",
            "API writes that failed",
            metrics.write_errors.clone(),
        );
        r.register(
            "write_queue_depth",
            "Writes waiting for the write budget",
            metrics.queue_depth.clone(),
        );
        r.register(
            "change_to_write_seconds",
            "Time from receiving a cluster change to writing it",
            metrics.change_to_write.clone(),
        );
        r.register(
            "leader",
            "1 while this replica leads",
            metrics.leader.clone(),
        );
        r.register(
            "watch_events",
            "Watch events received",
            metrics.watch_events.clone(),
        );
        r.register(
            "watch_errors",
            "Watch errors (retried after a backoff)",
            metrics.watch_errors.clone(),
        );
        metrics
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_exposed_with_the_controller_prefix() {
        let mut registry = Registry::default();
        let metrics = Metrics::register(&mut registry);
        metrics.plans_written.inc();
        metrics
            .write_errors
            .get_or_create(&ErrorLabels {
                target: "plan",
                kind: "conflict",
            })
            .inc();
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).expect("encodes");
        assert!(
            text.contains("planproxy_controller_plans_written_total 1"),
            "{text}"
        );
        assert!(
            text.contains(
                r#"planproxy_controller_write_errors_total{target="plan",kind="conflict"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains("planproxy_controller_change_to_write_seconds_bucket"),
            "{text}"
        );
    }
}
