//! The node's data plane: the only code that touches the kernel (iptables,
//! iptables-restore, iptables-save, conntrack).
//!
//! [`DataPlane::sync`] renders the node's complete set of ProxyPlan shards with
//! `planproxy-render`, ensures planproxy's top-level chains and the jumps to them
//! from the built-in chains, and programs everything else with one
//! `iptables-restore --noflush` per family and table, so the kernel holds either
//! the whole new state or the old one. After the first full sync only chains whose
//! content changed are rewritten. Calls block (they spawn processes); the runtime
//! calls them from `spawn_blocking`.

use std::collections::BTreeMap;
use std::time::Duration;

use planproxy_crds::v1alpha1::ProgrammedSummary;
use planproxy_render::{Family, Layout, Table};

/// Which iptables implementation the host uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `iptables-nft`: the iptables API over nf_tables.
    NfTables,
    /// `iptables-legacy`: the x_tables kernel API.
    Legacy,
}

/// How the data plane is set up.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// Dispatch layout of the rendered rules.
    pub layout: Layout,
    /// The iptables backend; `None` detects the one the host uses.
    pub backend: Option<Backend>,
    /// The families to program; empty means every family the kernel supports.
    pub families: Vec<Family>,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            layout: Layout::Tree,
            backend: None,
            families: Vec::new(),
        }
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default)]
pub struct SyncReport {
    /// Whether every chain was rewritten (rather than only the changed ones).
    pub full: bool,
    /// Wall time of the whole sync.
    pub duration: Duration,
    /// Time spent waiting for the xtables lock, as iptables reports it.
    pub lock_wait: Duration,
    /// Rule lines written to the kernel, all families and tables.
    pub rules_written: usize,
    /// Chains (re)written, all families and tables.
    pub chains_written: usize,
    /// Chains deleted, all families and tables.
    pub chains_deleted: usize,
    /// What each shard now has programmed, by shard index.
    pub per_shard: BTreeMap<u32, ProgrammedSummary>,
    /// Service ports that were not programmed, each with its reason.
    pub skipped: Vec<String>,
    /// Stale UDP conntrack entries deleted.
    pub conntrack_entries_deleted: usize,
}

/// Why a data-plane operation failed. The kernel keeps its previous rules in
/// every case.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// iptables-restore refused the input.
    #[error("{family} {table}: iptables-restore failed{}{}: {stderr}",
        line.map(|l| format!(" at line {l}")).unwrap_or_default(),
        rule.as_deref().map(|r| format!(" ({r})")).unwrap_or_default())]
    Restore {
        /// The family whose restore failed.
        family: Family,
        /// The table whose restore failed.
        table: Table,
        /// The failing line of the restore input, when iptables-restore named it.
        line: Option<usize>,
        /// The text of that line.
        rule: Option<String>,
        /// What iptables-restore printed.
        stderr: String,
    },
    /// Another iptables command (ensure a chain or jump, save, conntrack) failed.
    #[error("{command}: {stderr}")]
    Command {
        /// The command line that failed.
        command: String,
        /// What it printed.
        stderr: String,
    },
    /// A program could not be started at all.
    #[error("cannot run {program}: {source}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No usable iptables backend was found.
    #[error("iptables backend: {0}")]
    Backend(String),
    /// The plan cannot be programmed at all (the shard set is incomplete or its
    /// node-wide settings are invalid). Invalid service ports do not cause this:
    /// they are skipped and listed in [`SyncReport::skipped`].
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    /// After a restore, the kernel does not hold what was written.
    #[error("{family} {table}: read back differs from what was written: {detail}")]
    Verify {
        /// The family.
        family: Family,
        /// The table.
        table: Table,
        /// What differs.
        detail: String,
    },
}

impl Error {
    /// A short, stable label for metrics (`restore`, `command`, `spawn`, `backend`,
    /// `invalid_plan`, `verify`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Restore { .. } => "restore",
            Error::Command { .. } => "command",
            Error::Spawn { .. } => "spawn",
            Error::Backend(_) => "backend",
            Error::InvalidPlan(_) => "invalid_plan",
            Error::Verify { .. } => "verify",
        }
    }
}

/// The node's iptables state, owned by one writer.
#[derive(Debug)]
pub struct DataPlane {
    config: DataPlaneConfig,
    backend: Backend,
    families: Vec<Family>,
}

impl DataPlane {
    /// Detects the backend and the families the kernel supports; touches no rule.
    pub fn new(config: DataPlaneConfig) -> Result<Self, Error> {
        let backend = config.backend.unwrap_or(Backend::NfTables);
        let families = if config.families.is_empty() {
            Family::ALL.to_vec()
        } else {
            config.families.clone()
        };
        Ok(Self {
            config,
            backend,
            families,
        })
    }

    /// The backend in use.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// The families programmed.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// Programs the node to exactly `shards` (a complete set of the node's
    /// ProxyPlan shards). Full when `full` or on the first call after
    /// [`DataPlane::new`]; incremental (only changed chains) otherwise. On error
    /// the kernel keeps its previous rules and the next call is a full sync.
    /// Blocking: it spawns iptables-restore.
    pub fn sync(
        &mut self,
        shards: &[planproxy_crds::ProxyPlanSpec],
        full: bool,
    ) -> Result<SyncReport, Error> {
        let _ = (shards, full, &self.config);
        Err(Error::Backend("not implemented yet".into()))
    }

    /// True when the canary chains show that someone flushed or deleted
    /// planproxy's chains, so a full sync is needed.
    pub fn drift_detected(&self) -> Result<bool, Error> {
        Err(Error::Backend("not implemented yet".into()))
    }

    /// Removes every planproxy rule and chain, and nothing else.
    pub fn cleanup(&mut self) -> Result<(), Error> {
        Err(Error::Backend("not implemented yet".into()))
    }
}
