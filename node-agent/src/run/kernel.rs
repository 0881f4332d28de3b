//! The seam between the sync loop and the data plane: what the loop needs from
//! whatever owns the node's rules, so the loop can be tested with a fake kernel.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use planproxy_crds::ProxyPlan;
use planproxy_crds::v1alpha1::ProgrammedSummary;

pub use crate::dataplane::SettingProblem;

/// Something that programs a node's complete plan into the kernel.
///
/// Both calls block (they run `iptables-restore` / `iptables-save`), so the sync
/// loop calls them from `spawn_blocking`; it is the only caller.
pub trait Kernel: Send + 'static {
    /// Programs `shards` (a complete set, sorted by index). `full` rewrites every
    /// chain we own; otherwise only what changed since the last successful sync.
    /// On error the kernel keeps the rules it had. Shards are handed over as
    /// watched, so one that did not change is the same allocation as before.
    fn sync(&mut self, shards: &[Arc<ProxyPlan>], full: bool) -> Result<Applied, ApplyError>;

    /// Whether the kernel's rules differ from what the last sync wrote (someone
    /// flushed or edited our chains).
    fn drift_detected(&self) -> Result<bool, ApplyError>;

    /// The node's interface addresses now (health-check node ports bind those
    /// inside `nodePortAddresses`). A failure to read them is logged and
    /// reads as none.
    fn local_addresses(&self) -> Vec<std::net::IpAddr>;
}

/// What one successful sync wrote.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Applied {
    /// Whether every chain was rewritten.
    pub full: bool,
    /// Wall time of the sync, including waiting for the xtables lock.
    pub duration: Duration,
    /// Time spent waiting for the xtables lock.
    pub lock_wait: Duration,
    /// Rules the node holds, by IP family (`IPv4`, `IPv6`) and table (`nat`, `filter`).
    pub rules_per_table: BTreeMap<(String, String), usize>,
    /// What each shard (by index) programmed.
    pub per_shard: BTreeMap<u32, ProgrammedSummary>,
    /// Conntrack entries removed after the sync (stale UDP flows).
    pub conntrack_entries_deleted: usize,
    /// What the plan asks of the node that could not be made, though the rules
    /// are in place (a sysctl); the plan's status shows it as Degraded.
    pub issues: Vec<SettingProblem>,
}

/// Why a sync (or a drift check) failed. The kernel still holds the last good rules.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ApplyError {
    /// A short, bounded name for metrics and logs (e.g. `restore`).
    pub kind: &'static str,
    /// What failed, with the table and line when the kernel refused a rule.
    pub message: String,
}

// === impl Kernel for DataPlane ===

impl Kernel for crate::dataplane::DataPlane {
    fn sync(&mut self, shards: &[Arc<ProxyPlan>], full: bool) -> Result<Applied, ApplyError> {
        let report =
            crate::dataplane::DataPlane::sync(self, shards, full).map_err(ApplyError::from)?;
        for skipped in &report.skipped {
            tracing::warn!(%skipped, "service port not programmed");
        }
        let rules_per_table = self.rules_per_table();
        Ok(Applied {
            full: report.full,
            duration: report.duration,
            lock_wait: report.lock_wait,
            rules_per_table,
            per_shard: report.per_shard,
            conntrack_entries_deleted: report.conntrack_entries_deleted,
            issues: report.problems,
        })
    }

    fn drift_detected(&self) -> Result<bool, ApplyError> {
        crate::dataplane::DataPlane::drift_detected(self).map_err(ApplyError::from)
    }

    fn local_addresses(&self) -> Vec<std::net::IpAddr> {
        crate::dataplane::interfaces::local_addresses().unwrap_or_else(|error| {
            tracing::warn!(%error, "cannot read the node's interface addresses");
            Vec::new()
        })
    }
}

impl From<crate::dataplane::Error> for ApplyError {
    fn from(error: crate::dataplane::Error) -> Self {
        ApplyError {
            kind: error.kind(),
            message: error.to_string(),
        }
    }
}
