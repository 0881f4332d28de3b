//! The agent's Prometheus metrics.
//!
//! Where a kube-proxy metric means the same thing it keeps kube-proxy's name, so
//! existing dashboards, alerts and clusterloader2's network-programming-latency
//! measurement work unchanged. planproxy's own metrics sit beside them as
//! `planproxy_agent_*`. One sync programs both IP families at once, so the
//! kube-proxy metrics carry no `ip_family` label.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets, linear_buckets};
use prometheus_client::registry::Registry;

type Labels = Vec<(String, String)>;

/// Every metric the agent exports; cheap to clone (shared inside).
#[derive(Clone)]
pub struct AgentMetrics {
    inner: Arc<Inner>,
}

struct Inner {
    sync_duration: Histogram,
    sync_full_duration: Histogram,
    sync_partial_duration: Histogram,
    network_programming_duration: Histogram,
    last_sync_timestamp: Gauge<f64, AtomicU64>,
    last_queued_timestamp: Gauge<f64, AtomicU64>,
    rules_total: Family<Labels, Gauge>,
    restore_failures: Counter,
    no_local_endpoints: Family<Labels, Gauge>,
    healthz: Family<Labels, Counter>,
    livez: Family<Labels, Counter>,
    lock_wait: Histogram,
    drift_repairs: Counter,
    conntrack_deleted: Counter,
    plan_complete: Gauge,
    status_writes: Family<Labels, Counter>,
    health_check_listeners: Gauge,
}

/// kube-proxy's buckets for sync durations: 1ms doubling to about 16s.
fn sync_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.001, 2.0, 15)
}

/// kube-proxy's buckets for network programming latency: 0.25s, 0.5s, then 1s
/// steps to 59s, 5s steps to 115s, 30s steps to 300s.
fn programming_buckets() -> impl Iterator<Item = f64> {
    linear_buckets(0.25, 0.25, 2)
        .chain(linear_buckets(1.0, 1.0, 59))
        .chain(linear_buckets(60.0, 5.0, 12))
        .chain(linear_buckets(120.0, 30.0, 7))
}

impl AgentMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn new(registry: &mut Registry) -> Self {
        let inner = Inner {
            sync_duration: Histogram::new(sync_buckets()),
            sync_full_duration: Histogram::new(sync_buckets()),
            sync_partial_duration: Histogram::new(sync_buckets()),
            network_programming_duration: Histogram::new(programming_buckets()),
            last_sync_timestamp: Gauge::default(),
            last_queued_timestamp: Gauge::default(),
            rules_total: Family::default(),
            restore_failures: Counter::default(),
            no_local_endpoints: Family::default(),
            healthz: Family::default(),
            livez: Family::default(),
            lock_wait: Histogram::new(sync_buckets()),
            drift_repairs: Counter::default(),
            conntrack_deleted: Counter::default(),
            plan_complete: Gauge::default(),
            status_writes: Family::default(),
            health_check_listeners: Gauge::default(),
        };
        registry.register(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds",
            inner.sync_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs",
            inner.sync_full_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs",
            inner.sync_partial_duration.clone(),
        );
        registry.register(
            "kubeproxy_network_programming_duration_seconds",
            "In-cluster network programming latency in seconds, from the EndpointSlice change to the rules landing on this node",
            inner.network_programming_duration.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced",
            inner.last_sync_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued",
            inner.last_queued_timestamp.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_total",
            "Total number of iptables rules owned by the proxy, per table",
            inner.rules_total.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_iptables_restore_failures",
            "Cumulative proxy iptables restore failures",
            inner.restore_failures.clone(),
        );
        registry.register(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no local endpoints",
            inner.no_local_endpoints.clone(),
        );
        registry.register(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status",
            inner.healthz.clone(),
        );
        registry.register(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status",
            inner.livez.clone(),
        );
        registry.register(
            "planproxy_agent_xtables_lock_wait_seconds",
            "Time each sync waited for the xtables lock",
            inner.lock_wait.clone(),
        );
        registry.register(
            "planproxy_agent_drift_repairs",
            "Periodic checks that found our rules changed behind our back and rewrote them",
            inner.drift_repairs.clone(),
        );
        registry.register(
            "planproxy_agent_conntrack_entries_deleted",
            "Stale conntrack entries deleted after syncs",
            inner.conntrack_deleted.clone(),
        );
        registry.register(
            "planproxy_agent_plan_complete",
            "1 when every shard of this node's plan is present and consistent, 0 otherwise",
            inner.plan_complete.clone(),
        );
        registry.register(
            "planproxy_agent_status_writes",
            "ProxyPlan status writes, by result",
            inner.status_writes.clone(),
        );
        registry.register(
            "planproxy_agent_health_check_node_ports",
            "Health-check node ports currently served",
            inner.health_check_listeners.clone(),
        );
        Self {
            inner: Arc::new(inner),
        }
    }

    /// A successful sync took `seconds`.
    pub fn sync_succeeded(&self, full: bool, seconds: f64, lock_wait_seconds: f64, unix_now: f64) {
        let inner = &self.inner;
        inner.sync_duration.observe(seconds);
        if full {
            inner.sync_full_duration.observe(seconds);
        } else {
            inner.sync_partial_duration.observe(seconds);
        }
        inner.lock_wait.observe(lock_wait_seconds);
        inner.last_sync_timestamp.set(unix_now);
    }

    /// iptables-restore refused a sync.
    pub fn restore_failed(&self) {
        self.inner.restore_failures.inc();
    }

    /// A change was queued at `unix_now`.
    pub fn queued(&self, unix_now: f64) {
        self.inner.last_queued_timestamp.set(unix_now);
    }

    /// The rules of one family's table after a sync.
    pub fn set_rules(&self, ip_family: &str, table: &str, rules: usize) {
        let labels = vec![
            ("ip_family".to_owned(), ip_family.to_owned()),
            ("table".to_owned(), table.to_owned()),
        ];
        self.inner
            .rules_total
            .get_or_create(&labels)
            .set(i64::try_from(rules).unwrap_or(i64::MAX));
    }

    /// Services with a Local policy and no local endpoint, by policy (`internal`/`external`).
    pub fn set_no_local_endpoints(&self, traffic_policy: &str, services: usize) {
        let labels = vec![("traffic_policy".to_owned(), traffic_policy.to_owned())];
        self.inner
            .no_local_endpoints
            .get_or_create(&labels)
            .set(i64::try_from(services).unwrap_or(i64::MAX));
    }

    /// One service port's change landed `seconds` after it happened.
    pub fn network_programmed(&self, seconds: f64) {
        self.inner.network_programming_duration.observe(seconds);
    }

    /// A periodic check found drift.
    pub fn drift_repaired(&self) {
        self.inner.drift_repairs.inc();
    }

    /// Conntrack entries deleted by a sync.
    pub fn conntrack_deleted(&self, entries: usize) {
        self.inner
            .conntrack_deleted
            .inc_by(u64::try_from(entries).unwrap_or(u64::MAX));
    }

    /// Whether the node's plan is complete.
    pub fn set_plan_complete(&self, complete: bool) {
        self.inner.plan_complete.set(i64::from(complete));
    }

    /// A status write finished with `result`.
    pub fn status_write(&self, result: &str) {
        let labels = vec![("result".to_owned(), result.to_owned())];
        self.inner.status_writes.get_or_create(&labels).inc();
    }

    /// `/healthz` answered `code`.
    pub fn healthz_answered(&self, code: u16) {
        let labels = vec![("code".to_owned(), code.to_string())];
        self.inner.healthz.get_or_create(&labels).inc();
    }

    /// `/livez` answered `code`.
    pub fn livez_answered(&self, code: u16) {
        let labels = vec![("code".to_owned(), code.to_string())];
        self.inner.livez.get_or_create(&labels).inc();
    }

    /// How many health-check node ports are open.
    pub fn set_health_check_listeners(&self, listeners: usize) {
        self.inner
            .health_check_listeners
            .set(i64::try_from(listeners).unwrap_or(i64::MAX));
    }
}

/// Renders `registry` in the Prometheus text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kube_proxy_metric_names_are_exported_unchanged() {
        let mut registry = Registry::default();
        let metrics = AgentMetrics::new(&mut registry);
        metrics.sync_succeeded(true, 0.02, 0.001, 1.7e9);
        metrics.restore_failed();
        metrics.set_rules("IPv4", "nat", 42);
        metrics.network_programmed(0.7);
        let text = encode(&registry);
        for name in [
            "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
            "kubeproxy_sync_full_proxy_rules_duration_seconds_count 1",
            "kubeproxy_sync_partial_proxy_rules_duration_seconds_count 0",
            "kubeproxy_network_programming_duration_seconds_bucket{le=\"1.0\"} 1",
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds 1700000000",
            "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"} 42",
            "kubeproxy_sync_proxy_rules_iptables_restore_failures_total 1",
            "planproxy_agent_drift_repairs_total 0",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }
}
