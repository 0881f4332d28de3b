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

mod backend;
mod conntrack;
mod exec;
pub mod interfaces;
mod localnet;
mod netfilter;
mod nft;
pub mod parse;
mod verify;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::v1alpha1::ProgrammedSummary;
use planproxy_render::hash::CHAIN_PREFIX;
use planproxy_render::nft::{NftChange, NftProgram, NftTable};
use planproxy_render::{
    FamilyRules, Layout, PlanError, RenderOptions, RestoreInput, RuleSet, Table, chains,
    restore_full, restore_incremental,
};

pub use localnet::{ROUTE_LOCALNET, SettingProblem};
pub use netfilter::{Netfilter, Ran, System};
pub use planproxy_render::Family;

use netfilter::Iptables;

/// How the node's rules are written: one type for the CLI and the runtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Backend {
    /// `iptables-nft`: iptables rules through the iptables API over nf_tables.
    IptablesNft,
    /// `iptables-legacy`: iptables rules through the x_tables kernel API.
    IptablesLegacy,
    /// `nftables`: one `inet planproxy` table written with `nft -f`.
    Nftables,
}

/// The `--backend` value: a backend, or `iptables` to detect the iptables
/// variant the host uses (as kube-proxy does). The default is `nftables`:
/// the data-plane bench favours it (see the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BackendChoice {
    /// iptables, in the variant the host uses.
    Iptables,
    /// Exactly this backend.
    Exactly(Backend),
}

impl Default for BackendChoice {
    fn default() -> Self {
        BackendChoice::Exactly(Backend::Nftables)
    }
}

/// How the data plane is set up.
#[derive(Debug, Clone)]
pub struct DataPlaneConfig {
    /// Dispatch layout of the rendered rules.
    pub layout: Layout,
    /// The backend; `iptables` detects the variant the host uses.
    pub backend: BackendChoice,
    /// The families to program; empty means every family the kernel supports.
    pub families: Vec<Family>,
}

impl Default for DataPlaneConfig {
    fn default() -> Self {
        Self {
            layout: Layout::Tree,
            backend: BackendChoice::default(),
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
    /// Node settings the plan needs that could not be made (the rules are in place).
    pub problems: Vec<SettingProblem>,
}

/// Why a data-plane operation failed. The kernel keeps its previous rules in
/// every case.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `nft -f` refused the transaction.
    #[error("nftables: nft refused the transaction{}{}: {stderr}",
        line.map(|l| format!(" at line {l}")).unwrap_or_default(),
        statement.as_deref().map(|s| format!(" ({s})")).unwrap_or_default())]
    Transaction {
        /// The failing line of the input, when nft named it.
        line: Option<usize>,
        /// The text of that line.
        statement: Option<String>,
        /// What nft printed.
        stderr: String,
    },
    /// The kernel refused a batch of set elements sent over netlink.
    #[error("nftables: loading the {step} elements over netlink failed: {detail}")]
    Netlink {
        /// Which batch.
        step: &'static str,
        /// The kernel's error.
        detail: String,
    },
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
    InvalidPlan(#[from] PlanError),
    /// [`DataPlane::verify`] was called before any successful sync.
    #[error("nothing has been synced yet")]
    NotSynced,
    /// After a sync, the kernel does not hold what was written.
    #[error("{family} {table}: read back differs from what was written: {detail}")]
    Verify {
        /// The family.
        family: Family,
        /// The table.
        table: Table,
        /// What differs: the first rule that does (chain, position, the text
        /// written and the text the kernel reports), or a missing chain,
        /// jump, set or element.
        detail: String,
    },
}

impl Error {
    /// A short, stable label for metrics (`restore`, `command`, `spawn`, `backend`,
    /// `invalid_plan`, `not_synced`, `verify`).
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Restore { .. } | Error::Transaction { .. } | Error::Netlink { .. } => "restore",
            Error::Command { .. } => "command",
            Error::Spawn { .. } => "spawn",
            Error::Backend(_) => "backend",
            Error::InvalidPlan(_) => "invalid_plan",
            Error::NotSynced => "not_synced",
            Error::Verify { .. } => "verify",
        }
    }
}

/// The node's iptables state, owned by one writer.
#[derive(Debug)]
pub struct DataPlane {
    layout: Layout,
    backend: Backend,
    families: Vec<Family>,
    /// What the kernel holds since the last successful sync; `None` forces the
    /// next sync to be full (at start, and after any failure).
    applied: Option<AppliedRules>,
    /// The UDP frontends of the last synced plan, to clean flows of services that
    /// disappear from it.
    udp_frontends: BTreeMap<Family, BTreeSet<SocketAddr>>,
    /// Lock wait spent outside a sync (at start), added to the next report.
    unreported_lock_wait: Duration,
    /// route_localnet, set while the plan serves localhost node ports.
    route_localnet: localnet::RouteLocalnet,
    /// Where every netfilter program runs.
    nf: Arc<dyn Netfilter>,
}

/// `nft list table inet planproxy` (for `explain`).
pub fn nft_table_text() -> Result<String, String> {
    match nft::table_text(&System) {
        Ok(Some(text)) => Ok(text),
        Ok(None) => Err(format!(
            "there is no table inet {}",
            planproxy_render::nft::TABLE
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// The rules a backend last programmed.
#[derive(Debug)]
pub enum AppliedRules {
    /// iptables chains by family and table.
    Iptables(RuleSet),
    /// The nftables table, and the plan it was built from.
    Nftables(Box<NftProgram>),
}

/// The canary chain's only rule: a flush of our chains empties it, a delete
/// removes it; either way the next check sees it gone.
const CANARY_RULE: &str = "-m comment --comment \"planproxy canary\" -j RETURN";

impl DataPlane {
    /// Detects the backend and the families the kernel supports; touches no rule.
    pub fn new(config: DataPlaneConfig) -> Result<Self, Error> {
        Self::with_netfilter(config, Arc::new(System))
    }

    /// [`DataPlane::new`], running netfilter programs through `nf`.
    pub fn with_netfilter(config: DataPlaneConfig, nf: Arc<dyn Netfilter>) -> Result<Self, Error> {
        let backend = config.backend.resolve(&*nf)?;
        // The support checks below take the xtables lock too; that wait is
        // reported with the first sync.
        let lock_wait = exec::wait_for_xtables_lock(backend);
        let families: Vec<Family> = if config.families.is_empty() {
            Family::ALL
                .into_iter()
                .filter(|f| backend::supports(&*nf, backend, *f))
                .collect()
        } else {
            config.families.clone()
        };
        if families.is_empty() {
            return Err(Error::Backend(format!(
                "no IP family can be programmed with the {backend} backend here"
            )));
        }
        tracing::info!(%backend, families = ?families, layout = ?config.layout, "data plane ready");
        Ok(Self {
            layout: config.layout,
            backend,
            families,
            applied: None,
            udp_frontends: BTreeMap::new(),
            unreported_lock_wait: lock_wait,
            route_localnet: localnet::RouteLocalnet::default(),
            nf,
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

    /// The rules the kernel holds since the last successful sync.
    pub fn applied(&self) -> Option<&AppliedRules> {
        self.applied.as_ref()
    }

    /// Rules held, by (IP family, table): iptables per family and table,
    /// nftables as one `inet` table counting rules and set elements.
    pub fn rules_per_table(&self) -> BTreeMap<(String, String), usize> {
        let mut out = BTreeMap::new();
        match &self.applied {
            Some(AppliedRules::Iptables(rule_set)) => {
                for (family, rules) in &rule_set.families {
                    let family = match family {
                        Family::V4 => "IPv4",
                        Family::V6 => "IPv6",
                    };
                    for table in Table::ALL {
                        out.insert(
                            (family.to_owned(), table.as_str().to_owned()),
                            rules.table(table).rule_count(),
                        );
                    }
                }
            }
            Some(AppliedRules::Nftables(program)) => {
                out.insert(
                    ("inet".to_owned(), planproxy_render::nft::TABLE.to_owned()),
                    program.table().rule_count(),
                );
            }
            None => {}
        }
        out
    }

    fn iptables(&self, family: Family) -> Iptables<'_> {
        Iptables {
            nf: &*self.nf,
            program: self.backend.programs(family).iptables,
        }
    }

    /// Programs the node to exactly `shards` (a complete set of the node's
    /// ProxyPlan shards). Full when `full` or on the first call after
    /// [`DataPlane::new`]; incremental (only what changed) otherwise. On error
    /// the kernel keeps its previous rules and the next call is a full sync.
    /// Blocking: it spawns iptables-restore or nft.
    pub fn sync<T>(&mut self, shards: &[Arc<T>], full: bool) -> Result<SyncReport, Error>
    where
        T: AsRef<ProxyPlanSpec> + Send + Sync + 'static,
    {
        let start = Instant::now();
        let specs: Vec<&ProxyPlanSpec> = shards.iter().map(|s| (**s).as_ref()).collect();
        let node = specs
            .first()
            .map(|s| s.node_name.as_str())
            .unwrap_or_default();
        let span = tracing::info_span!("sync", node, full = tracing::field::Empty);
        let _guard = span.enter();
        // nftables: a requested full resync of an intact table is done
        // incrementally, so it neither costs a rebuild nor forgets the
        // affinity sets; a flushed or deleted table is rebuilt.
        let full = full
            && (self.backend.is_iptables()
                || self.applied.is_none()
                || self.drift_detected().unwrap_or(true));
        let previous = self.applied.take();
        let full = full || previous.is_none();
        span.record("full", full);
        let mut report = SyncReport {
            full,
            lock_wait: std::mem::take(&mut self.unreported_lock_wait),
            ..Default::default()
        };
        let (per_shard, skipped, applied) = if self.backend.is_iptables() {
            let options = RenderOptions {
                layout: self.layout,
                families: self.families.clone(),
            };
            let rendered = planproxy_render::render(&specs, &options)?;
            let previous = match previous {
                Some(AppliedRules::Iptables(p)) if !full => Some(p),
                _ => None,
            };
            self.program_iptables(&rendered.rule_set, previous.as_ref(), &mut report)?;
            self.reconcile_conntrack(
                &rendered.model.settings,
                &rendered.model.service_ports,
                &mut report,
            );
            self.ensure_node_settings(&rendered.model.settings, &mut report);
            let applied = AppliedRules::Iptables(rendered.rule_set);
            (rendered.per_shard, rendered.skipped, applied)
        } else {
            let program = match previous {
                Some(AppliedRules::Nftables(p)) if !full => p,
                _ => Box::new(NftProgram::new(&self.families)),
            };
            let program = self.program_nftables(program, shards, !full, &mut report)?;
            if let Some(settings) = program.settings() {
                self.reconcile_conntrack(settings, program.service_ports(), &mut report);
                self.ensure_node_settings(settings, &mut report);
            }
            (
                program.per_shard(),
                program.skipped(),
                AppliedRules::Nftables(program),
            )
        };
        if full {
            self.remove_other_backends();
        }
        report.per_shard = per_shard;
        report.skipped = skipped.iter().map(ToString::to_string).collect();
        for skipped in &report.skipped {
            tracing::warn!(service_port = %skipped, "service port skipped");
        }
        self.applied = Some(applied);
        report.duration = start.elapsed();
        tracing::info!(
            duration_ms = report.duration.as_millis() as u64,
            rules = report.rules_written,
            chains = report.chains_written,
            deleted = report.chains_deleted,
            "synced"
        );
        Ok(report)
    }

    /// One `iptables-restore --noflush` per family and table: everything, or
    /// only the chains that differ from `previous`.
    fn program_iptables(
        &mut self,
        next: &RuleSet,
        previous: Option<&RuleSet>,
        report: &mut SyncReport,
    ) -> Result<(), Error> {
        for family in self.families.clone() {
            let programs = self.backend.programs(family);
            let Some(next) = next.families.get(&family) else {
                continue;
            };
            if previous.is_none() {
                report.lock_wait += exec::wait_for_xtables_lock(self.backend);
                self.ensure_base(family, next)?;
            }
            let mut inputs = Vec::new();
            for table in Table::ALL {
                let next_table = next.table(table);
                let input = match previous.and_then(|p| p.families.get(&family)) {
                    Some(prev) => restore_incremental(table, prev.table(table), next_table),
                    None => {
                        let dump = exec::save(&*self.nf, &programs, table)?;
                        let stale: Vec<String> =
                            exec::chain_rule_counts(&dump).into_keys().collect();
                        restore_full(table, next_table, &stale)
                    }
                };
                if !input.is_noop() {
                    inputs.push((table, input));
                }
            }
            if inputs.is_empty() {
                continue;
            }
            // One restore for both tables, as kube-proxy does: one process and
            // one xtables lock per family and sync.
            report.lock_wait += exec::wait_for_xtables_lock(self.backend);
            exec::restore(&*self.nf, &programs, family, &inputs)?;
            for (_, input) in &inputs {
                report.rules_written += input.rules_written;
                report.chains_written += input.chains_written;
                report.chains_deleted += input.chains_deleted;
            }
        }
        Ok(())
    }

    /// Brings `program` to `shards` and the kernel along with one `nft -f`
    /// transaction: only what differs when `incremental` and the table allows
    /// it, else the whole table rebuilt.
    fn program_nftables<T>(
        &mut self,
        mut program: Box<NftProgram>,
        shards: &[Arc<T>],
        incremental: bool,
        report: &mut SyncReport,
    ) -> Result<Box<NftProgram>, Error>
    where
        T: AsRef<ProxyPlanSpec> + Send + Sync + 'static,
    {
        let change = program.update(shards)?;
        let text = match change {
            NftChange::Delta(delta) if incremental => {
                report.chains_written += delta.chains_written;
                report.rules_written += delta.rules_written;
                report.chains_deleted += delta.deleted;
                if delta.elements_only
                    && !delta.text.is_empty()
                    && change_elements(&*self.nf, program.table(), &delta)
                {
                    return Ok(program);
                }
                delta.text
            }
            _ => {
                report.full = true;
                let table = program.table();
                report.chains_written += table.chains().count();
                report.rules_written += table.rule_count();
                if !nft::table_exists(&*self.nf)? {
                    match load_fresh(&*self.nf, table) {
                        Ok(()) => return Ok(program),
                        // The kernel is back to no table: the one-transaction
                        // load below still applies.
                        Err(error) => {
                            tracing::warn!(%error, "loading the new table over netlink failed")
                        }
                    }
                }
                table.full_text()
            }
        };
        if !text.is_empty() {
            nft::transaction(&*self.nf, &text)?;
        }
        Ok(program)
    }

    /// After a full sync, removes what the other backends wrote (a node
    /// switching backends). Failures are logged: the new rules are in place.
    fn remove_other_backends(&self) {
        let result = if self.backend.is_iptables() {
            nft::delete_table(&*self.nf).map(|deleted| {
                if deleted {
                    tracing::info!("removed the nftables table of a previous backend");
                }
            })
        } else {
            [Backend::IptablesNft, Backend::IptablesLegacy]
                .into_iter()
                .try_for_each(|b| cleanup_iptables(&*self.nf, b, &Family::ALL))
        };
        if let Err(error) = result {
            tracing::warn!(%error, "failed to remove the rules of another backend");
        }
    }

    /// Deletes stale UDP flows; shared by every backend.
    fn reconcile_conntrack<'a>(
        &mut self,
        settings: &planproxy_render::model::Settings,
        ports: impl IntoIterator<Item = &'a planproxy_render::model::ServicePort> + Clone,
        report: &mut SyncReport,
    ) {
        for family in self.families.clone() {
            let targets = conntrack::UdpTargets::of(settings, ports.clone(), family);
            let now: BTreeSet<SocketAddr> = targets.frontends.keys().copied().collect();
            let before = self
                .udp_frontends
                .insert(family, now.clone())
                .unwrap_or_default();
            let gone: BTreeSet<SocketAddr> = before.difference(&now).copied().collect();
            match conntrack::reconcile(&*self.nf, family, &targets, &gone) {
                Ok(n) => report.conntrack_entries_deleted += n,
                // The rules are in place; stale flows are retried next sync.
                Err(e) => tracing::warn!(%family, error = %e, "stale UDP conntrack cleanup failed"),
            }
        }
    }

    /// Makes the node settings the rules rely on (route_localnet while IPv4
    /// node ports answer on 127.0.0.1), after the rules are in place. A
    /// failure is reported, not fatal: every other frontend works.
    fn ensure_node_settings(
        &mut self,
        settings: &planproxy_render::model::Settings,
        report: &mut SyncReport,
    ) {
        let wanted = self.families.contains(&Family::V4) && settings.localhost_node_ports;
        if let Err(problem) = self.route_localnet.ensure(&*self.nf, wanted) {
            tracing::warn!(reason = problem.reason, %problem, "node setting not made");
            report.problems.push(problem);
        }
    }

    /// Creates the fixed chains and the canary and ensures the jumps from the
    /// built-in chains, each only if missing.
    fn ensure_base(&self, family: Family, rules: &FamilyRules) -> Result<(), Error> {
        let ipt = self.iptables(family);
        for table in Table::ALL {
            let t = table.as_str();
            for chain in chains::fixed(table).iter().chain([&chains::CANARY]) {
                ipt.ensure_chain(t, chain)?;
            }
            if !ipt.exists(t, chains::CANARY, CANARY_RULE)? {
                ipt.append(t, chains::CANARY, CANARY_RULE)?;
            }
            // Inserting at the top in reverse order leaves the jumps in list order.
            for jump in rules.table(table).jumps.iter().rev() {
                if !ipt.exists(t, jump.builtin, &jump.spec)? {
                    ipt.insert_first(t, jump.builtin, &jump.spec)?;
                }
            }
        }
        Ok(())
    }

    /// True when the canary chains show that someone flushed or deleted
    /// planproxy's chains, so a full sync is needed.
    pub fn drift_detected(&self) -> Result<bool, Error> {
        if !self.backend.is_iptables() {
            // A flushed table empties this base chain; a deleted one loses it.
            let intact = nft::list_chain(&*self.nf, "nat-prerouting")?
                .is_some_and(|l| l.chains.values().any(|rules| !rules.is_empty()));
            if !intact {
                tracing::info!("planproxy's nftables table was flushed or deleted");
            }
            return Ok(!intact);
        }
        for family in &self.families {
            let ipt = self.iptables(*family);
            for table in Table::ALL {
                let listing = ipt.list(table.as_str(), chains::CANARY)?;
                let canary = listing.map(|l| parse::chains_of(&l));
                if canary.is_none_or(|c| c.get(chains::CANARY).is_none_or(Vec::is_empty)) {
                    tracing::info!(%family, %table, "canary gone: planproxy's chains were flushed");
                    return Ok(true);
                }
            }
        }
        Ok(false)
    }

    /// Checks that the kernel holds what the last sync wrote: every chain
    /// rule by rule (as canonical text, so a rule edited in place is caught),
    /// every jump from the built-in chains, every set's elements. The error
    /// names the first rule that differs, with both texts.
    pub fn verify(&self) -> Result<(), Error> {
        match &self.applied {
            None => Err(Error::NotSynced),
            Some(AppliedRules::Nftables(program)) => verify::nftables(&*self.nf, program.table()),
            Some(AppliedRules::Iptables(rule_set)) => {
                verify::iptables(&*self.nf, self.backend, rule_set)
            }
        }
    }

    /// Removes every planproxy rule, chain and table of every backend, and
    /// nothing else: the jumps it added to built-in chains, every `PPX-` chain,
    /// and the nftables table. Conntrack is left alone.
    pub fn cleanup(&mut self) -> Result<(), Error> {
        self.applied = None;
        self.udp_frontends.clear();
        for backend in [Backend::IptablesNft, Backend::IptablesLegacy] {
            cleanup_iptables(&*self.nf, backend, &Family::ALL)?;
        }
        if nft::delete_table(&*self.nf)? {
            tracing::info!("planproxy's nftables table removed");
        }
        Ok(())
    }
}

/// The most element changes sent as one netlink batch; a larger change goes
/// through `nft`, whose cost then no longer matters.
const NETLINK_CHANGE_MAX: usize = 1000;

/// Applies an elements-only change (an endpoint moved, a cluster-IP service
/// came or went) as one netlink batch, sparing the `nft` process and its cache
/// reads. False when it could not (too large, or refused): the caller then
/// writes the same change with `nft`, which names the refused statement.
fn change_elements(
    nf: &dyn Netfilter,
    table: &NftTable,
    delta: &planproxy_render::nft::NftDelta,
) -> bool {
    use planproxy_render::nft::netlink;

    if delta.removed_elements.len() + delta.added_elements.len() > NETLINK_CHANGE_MAX {
        return false;
    }
    let batch = match netlink::element_change_batch(
        table,
        &delta.removed_elements,
        &delta.added_elements,
        1,
    ) {
        Ok(Some(batch)) => batch,
        Ok(None) => return true,
        Err(error) => {
            tracing::warn!(%error, "an element change cannot be encoded for netlink");
            return false;
        }
    };
    let acked = netlink::acknowledged_seq(&batch).unwrap_or_default();
    match nf.netlink(&batch, acked) {
        Ok(Ok(())) => true,
        Ok(Err(errno)) => {
            let error = std::io::Error::from_raw_os_error(errno);
            tracing::debug!(%error, "the kernel refused the element change; retrying with nft");
            false
        }
        Err(error) => {
            tracing::debug!(%error, "netlink unavailable; writing the change with nft");
            false
        }
    }
}

/// Loads the table into a kernel that has none, without `nft` parsing every
/// element: `nft -f` writes the chains, rules and empty sets, then two netlink
/// batches add the elements: first everything a service leads to, then the
/// dispatch maps that make services reachable, so no service is reachable
/// half-loaded. Nothing served before, so nothing is disrupted meanwhile. On
/// failure the partial table is removed again.
fn load_fresh(nf: &dyn Netfilter, table: &NftTable) -> Result<(), Error> {
    use planproxy_render::nft::{is_dispatch_map, netlink};

    let result = (|| {
        nft::transaction(nf, &table.structure_text())?;
        for (step, dispatch) in [("endpoints", false), ("dispatch", true)] {
            let batch = netlink::element_batch(table, |set| is_dispatch_map(set) == dispatch, 1)
                .map_err(|e| Error::Netlink {
                    step,
                    detail: e.to_string(),
                })?;
            let Some(batch) = batch else {
                continue;
            };
            let acked = netlink::acknowledged_seq(&batch).unwrap_or_default();
            let answer = nf.netlink(&batch, acked).map_err(|source| Error::Netlink {
                step,
                detail: source.to_string(),
            })?;
            answer.map_err(|errno| Error::Netlink {
                step,
                detail: std::io::Error::from_raw_os_error(errno).to_string(),
            })?;
        }
        Ok(())
    })();
    if result.is_err()
        && let Err(error) = nft::delete_table(nf)
    {
        tracing::warn!(%error, "failed to remove a partly loaded nftables table");
    }
    result
}

/// Removes the jumps and `PPX-` chains of one iptables backend.
fn cleanup_iptables(
    nf: &dyn Netfilter,
    backend: Backend,
    families: &[Family],
) -> Result<(), Error> {
    for family in families {
        let programs = backend.programs(*family);
        let ipt = Iptables {
            nf,
            program: programs.iptables,
        };
        // A save of every table lists only the tables that exist, where `-t`
        // would create one: a backend that was never used stays untouched.
        let all = netfilter::run(nf, programs.save, &[], None)?;
        if !all.success || !all.stdout.contains(CHAIN_PREFIX) {
            continue;
        }
        // That one dump holds every table: read each from it, not again.
        let mut tables = parse::parse_save(&all.stdout);
        for table in Table::ALL {
            let t = table.as_str();
            let Some(saved) = tables.remove(t) else {
                continue;
            };
            for (chain, rules) in saved.iter().filter(|(c, _)| !c.starts_with(CHAIN_PREFIX)) {
                for rule in rules.iter().filter(|r| is_our_jump(table, &r.rule)) {
                    ipt.delete(t, chain, &rule.rule)?;
                }
            }
            let ours: Vec<String> = saved
                .into_keys()
                .filter(|c| c.starts_with(CHAIN_PREFIX))
                .collect();
            if ours.is_empty() {
                continue;
            }
            let mut text = format!("*{t}\n");
            for c in &ours {
                text.push_str(&format!(":{c} - [0:0]\n"));
            }
            for c in &ours {
                text.push_str(&format!("-X {c}\n"));
            }
            text.push_str("COMMIT\n");
            let input = RestoreInput {
                text,
                chains_deleted: ours.len(),
                ..Default::default()
            };
            exec::restore(nf, &programs, *family, &[(table, input)])?;
            tracing::info!(%backend, %family, %table, chains = ours.len(), "planproxy chains removed");
        }
    }
    Ok(())
}

/// Whether a rule in a built-in chain is one of the jumps planproxy adds: it
/// targets one of our fixed chains and carries our comment.
fn is_our_jump(table: Table, spec: &str) -> bool {
    let target = spec.rsplit_once("-j ").map(|(_, t)| t.trim());
    target.is_some_and(|t| chains::fixed(table).contains(&t))
        && spec.contains("--comment \"planproxy ")
}

#[cfg(test)]
mod tests {
    //! The data plane's decisions about what to run, against a scripted kernel.

    use planproxy_crds::testing::{mk_endpoint, mk_plan, mk_service_port, mk_settings};

    use super::netfilter::fake::{Call, FakeNetfilter};
    use super::*;

    pub(super) fn data_plane(backend: Backend, nf: &Arc<FakeNetfilter>) -> DataPlane {
        let config = DataPlaneConfig {
            backend: BackendChoice::Exactly(backend),
            families: vec![Family::V4],
            ..Default::default()
        };
        DataPlane::with_netfilter(config, nf.clone()).expect("the fake supports every backend")
    }

    /// `default/web` on 10.96.0.10:80 reaching `endpoints` on port 8080.
    pub(super) fn web(endpoints: &[&str]) -> Vec<Arc<ProxyPlanSpec>> {
        let port = mk_service_port(
            "default",
            "web",
            &["10.96.0.10"],
            endpoints.iter().map(|ip| mk_endpoint(ip, 8080)).collect(),
        );
        vec![Arc::new(mk_plan(
            "n1",
            mk_settings(&["10.244.0.0/16"]),
            vec![port],
        ))]
    }

    /// What was fed to `nft -f -`, one entry per transaction.
    fn nft_transactions(calls: &[Call]) -> Vec<String> {
        calls
            .iter()
            .filter(|c| c.program == "nft" && c.args == ["-f", "-"])
            .filter_map(|c| c.stdin.clone())
            .collect()
    }

    #[test]
    fn an_nftables_sync_after_one_endpoint_change_writes_only_that_endpoint() {
        let nf = Arc::new(FakeNetfilter::default());
        let mut dp = data_plane(Backend::Nftables, &nf);
        dp.sync(&web(&["10.244.1.5", "10.244.1.6"]), false)
            .expect("the first sync");
        let calls = nf.calls();
        let first = nft_transactions(&calls);
        assert_eq!(first.len(), 1, "nft writes the table's structure");
        assert!(!first[0].contains("add element"), "{}", first[0]);
        let batches: Vec<&Call> = calls.iter().filter(|c| c.program == "netlink").collect();
        assert_eq!(
            batches.len(),
            2,
            "the elements follow over netlink, the dispatch maps last"
        );
        nf.clear();

        let report = dp
            .sync(&web(&["10.244.1.5", "10.244.1.7"]), false)
            .expect("the second sync");
        assert!(!report.full);
        assert_eq!(report.rules_written, 1, "one element in");
        let calls = nf.calls();
        assert!(nft_transactions(&calls).is_empty(), "no nft process");
        assert_eq!(
            calls.iter().filter(|c| c.program == "netlink").count(),
            1,
            "the old endpoint out and the new one in, in one batch"
        );

        // Where netlink is refused, nft writes the same two elements.
        nf.clear();
        nf.refuse_netlink(22);
        dp.sync(&web(&["10.244.1.5", "10.244.1.8"]), false)
            .expect("the third sync");
        let third = nft_transactions(&nf.calls());
        assert_eq!(third.len(), 1);
        let lines: Vec<&str> = third[0].lines().collect();
        assert_eq!(
            lines.len(),
            2,
            "the old endpoint out, the new one in: {lines:?}"
        );
        assert!(
            lines
                .iter()
                .all(|l| l.contains("element inet planproxy endpoints4-tcp"))
        );
        assert!(lines[1].contains("10.244.1.8 . 8080"));
    }

    #[test]
    fn a_refused_nftables_transaction_is_reported_with_its_statement_and_rebuilt_next_time() {
        let nf = Arc::new(FakeNetfilter::default());
        let mut dp = data_plane(Backend::Nftables, &nf);
        dp.sync(&web(&["10.244.1.5"]), false)
            .expect("the first sync");
        nf.refuse_netlink(22);
        nf.reply(|call| {
            let refused = call
                .stdin
                .as_deref()?
                .lines()
                .position(|l| l.contains("10.244.1.9"))?;
            Some(Ran {
                success: false,
                code: Some(1),
                stdout: String::new(),
                stderr: format!(
                    "/dev/stdin:{}:1-20: Error: Could not process rule",
                    refused + 1
                ),
            })
        });
        let err = dp
            .sync(&web(&["10.244.1.9"]), false)
            .expect_err("nft refuses the change");
        match &err {
            Error::Transaction { statement, .. } => assert!(
                statement
                    .as_deref()
                    .is_some_and(|s| s.contains("10.244.1.9")),
                "the refused statement is quoted: {err}"
            ),
            other => panic!("expected a refused transaction, got {other}"),
        }
        nf.clear();
        // The kernel still holds the table: the rebuild is one transaction.
        nf.reply(|call| {
            (call.args == ["list", "tables"]).then(|| Ran {
                success: true,
                code: Some(0),
                stdout: "table inet planproxy\n".to_owned(),
                stderr: String::new(),
            })
        });
        let report = dp.sync(&web(&["10.244.1.5"]), false).expect("the retry");
        assert!(report.full, "after a failure the table is rebuilt");
        let rebuilt = nft_transactions(&nf.calls());
        assert!(rebuilt[0].contains("delete table inet planproxy"));
        assert!(rebuilt[0].contains("10.244.1.5 . 8080"), "{}", rebuilt[0]);
    }

    /// [`web`] with IPv4 node ports on 127.0.0.1 as the plan says.
    fn web_localhost(localhost: bool) -> Vec<Arc<ProxyPlanSpec>> {
        let mut plan = (*web(&["10.244.1.5"])[0]).clone();
        plan.settings.localhost_node_ports = localhost;
        vec![Arc::new(plan)]
    }

    fn sysctl_writes(calls: &[Call]) -> Vec<String> {
        calls
            .iter()
            .filter(|c| c.program == "sysctl")
            .map(Call::line)
            .collect()
    }

    #[test]
    fn route_localnet_is_set_while_the_plan_serves_localhost_node_ports_and_never_reset() {
        for backend in [Backend::Nftables, Backend::IptablesNft] {
            let nf = Arc::new(FakeNetfilter::default());
            let mut dp = data_plane(backend, &nf);
            dp.sync(&web_localhost(false), false).expect("sync");
            assert!(
                sysctl_writes(&nf.calls()).is_empty(),
                "{backend}: not asked for"
            );
            let report = dp.sync(&web_localhost(true), false).expect("sync");
            assert!(report.problems.is_empty());
            assert_eq!(
                sysctl_writes(&nf.calls()),
                ["sysctl net/ipv4/conf/all/route_localnet=1"],
                "{backend}"
            );
            nf.clear();
            dp.sync(&web_localhost(true), true).expect("sync");
            assert!(
                sysctl_writes(&nf.calls()).is_empty(),
                "{backend}: already 1"
            );
            dp.sync(&web_localhost(false), false).expect("sync");
            assert!(
                sysctl_writes(&nf.calls()).is_empty(),
                "{backend}: never reset"
            );
            assert_eq!(nf.sysctl_value(ROUTE_LOCALNET), "1");
        }
    }

    #[test]
    fn a_route_localnet_that_cannot_be_set_is_a_problem_of_a_successful_sync() {
        let nf = Arc::new(FakeNetfilter::default());
        nf.refuse_sysctl_writes(30);
        let mut dp = data_plane(Backend::Nftables, &nf);
        let report = dp
            .sync(&web_localhost(true), false)
            .expect("the rules are programmed anyway");
        assert_eq!(report.problems.len(), 1, "{:?}", report.problems);
        assert_eq!(
            report.problems[0].reason,
            planproxy_crds::condition::reason::SYSCTL_FAILED
        );
        assert!(
            report.problems[0].message.contains("route_localnet")
                && report.problems[0].message.contains("127.0.0.1"),
            "{}",
            report.problems[0]
        );
    }

    #[test]
    fn a_full_iptables_sync_inserts_only_the_jumps_that_are_missing() {
        let nf = Arc::new(FakeNetfilter::default());
        // The kernel has every jump but the one from nat PREROUTING.
        nf.reply(|call| {
            let check = call.args.iter().any(|a| a == "-C");
            let prerouting = call.args.iter().any(|a| a == "PREROUTING");
            let nat = call.args.windows(2).any(|w| w[0] == "-t" && w[1] == "nat");
            (check && prerouting && nat).then(|| Ran {
                success: false,
                code: Some(1),
                ..Default::default()
            })
        });
        let mut dp = data_plane(Backend::IptablesNft, &nf);
        dp.sync(&web(&["10.244.1.5"]), false).expect("the sync");
        let calls = nf.calls();
        let inserted: Vec<String> = calls
            .iter()
            .filter(|c| c.args.iter().any(|a| a == "-I"))
            .map(Call::line)
            .collect();
        assert!(!inserted.is_empty(), "the missing jump is inserted");
        assert!(
            inserted
                .iter()
                .all(|l| l.contains("-t nat -I PREROUTING 1")),
            "only the missing jump: {inserted:?}"
        );
        assert!(
            calls
                .iter()
                .any(|c| c.program == "iptables-nft-restore"
                    && c.args.iter().any(|a| a == "--noflush")),
            "the chains go in with one restore"
        );
    }
}
