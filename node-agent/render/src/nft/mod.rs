//! The nftables emitter: the same per-service-port decisions as the iptables
//! emitter ([`crate::decide`]), rendered into one `inet` table of our own, so one
//! `nft -f` transaction covers both families and the nat and filter hooks.
//!
//! Layout, chosen by measurement (see the README's benchmark section):
//!
//! * Dispatch is one verdict-map lookup per family on
//!   `daddr . l4proto . dport` (`services4`), O(1) whatever the number of services.
//! * Rules that reference a set are costly to load and super-linear when many
//!   chains bind the same set, while set elements are cheap. A service reached only
//!   through its cluster IP and without affinity (most services) therefore gets no
//!   chain at all: its dispatch element jumps to a shared chain `lb4-<masq>-<n>`
//!   (one per protocol, endpoint count and masquerade kind) whose single rule
//!   picks the endpoint with `numgen` from one shared map per protocol keyed by
//!   the frontend (`endpoints4-tcp`: `cluster IP . port . index`). A
//!   one-endpoint change is then a few element updates.
//! * Every other service gets per-service chains like the iptables ones, with
//!   plain `numgen random mod k 0` rules (kube-proxy's probability series, which
//!   reference no set) and, under ClientIP affinity, one dynamic set with a
//!   timeout per endpoint.
//! * Hairpin masquerade is one set of `address . address` pairs checked in
//!   postrouting, not a chain per local endpoint.
//!
//! Every value in the text comes from a parsed type or a hash; nothing written
//! by a user reaches the ruleset.

use std::collections::BTreeMap;

use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::v1alpha1::ProgrammedSummary;

use crate::Family;
use crate::model::{InvalidServicePort, PlanError};

mod emit;
pub mod netlink;
mod program;
mod table;

pub use emit::{Fragment, is_dispatch_map};
pub use program::{NftChange, NftProgram};
pub use table::NftTable;

/// The table planproxy owns; nothing else in the ruleset is ever touched.
pub const TABLE: &str = "planproxy";

/// How many elements one `add element` command carries: nft parses large
/// element lists faster in chunks.
const ELEMENT_CHUNK: usize = 1000;

/// One chain of the table.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct NftChain {
    /// `type … hook … priority …; policy accept;` for base chains.
    pub hook: Option<String>,
    /// The rules, in order.
    pub rules: Vec<String>,
    /// The shard owning it; `None` for node-wide chains.
    pub owner: Option<u32>,
}

/// How a set or map is declared.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct SetDecl {
    /// `set` or `map`.
    pub keyword: &'static str,
    /// The body: `type …; flags …;`.
    pub spec: String,
    /// The kernel adds elements itself (affinity): a sync never rewrites them.
    pub dynamic: bool,
}

/// One named set or map.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftSet {
    /// `set` or `map`.
    pub keyword: &'static str,
    /// The body: `type …; flags …;`.
    pub spec: String,
    /// Key → value (`""` for plain sets).
    pub elements: BTreeMap<String, String>,
    /// The kernel adds elements itself (affinity): a sync never rewrites them.
    pub dynamic: bool,
}

/// Everything planproxy wants in its table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftRuleSet {
    /// Chains by name.
    pub chains: BTreeMap<String, NftChain>,
    /// Sets and maps by name.
    pub sets: BTreeMap<String, NftSet>,
}

impl NftRuleSet {
    /// Rules in all chains plus elements in all non-dynamic sets.
    pub fn rule_count(&self) -> usize {
        let rules: usize = self.chains.values().map(|c| c.rules.len()).sum();
        let elements: usize = self
            .sets
            .values()
            .filter(|s| !s.dynamic)
            .map(|s| s.elements.len())
            .sum();
        rules + elements
    }
}

/// The result of rendering a node's plan for nftables.
#[derive(Debug, Clone)]
pub struct RenderedNft {
    /// The table's content.
    pub rules: NftRuleSet,
    /// What each shard programs.
    pub per_shard: BTreeMap<u32, ProgrammedSummary>,
    /// Service ports that were skipped, with the reason.
    pub skipped: Vec<InvalidServicePort>,
}

/// Parses and renders a complete set of shards for `families` (both when empty).
pub fn render_nft(shards: &[ProxyPlanSpec], families: &[Family]) -> Result<RenderedNft, PlanError> {
    let shards: Vec<std::sync::Arc<ProxyPlanSpec>> =
        shards.iter().cloned().map(std::sync::Arc::new).collect();
    let mut program = NftProgram::new(families);
    program.update(&shards)?;
    Ok(RenderedNft {
        rules: program.table().rule_set(),
        per_shard: program.per_shard(),
        skipped: program.skipped(),
    })
}

/// The whole table as one `nft -f` transaction: the table is created if missing,
/// deleted and rebuilt, so the kernel holds either all of it or the old one.
pub fn full_text(rules: &NftRuleSet) -> String {
    let mut table = NftTable::default();
    table.insert(&Fragment::of_rule_set(rules));
    table.full_text()
}

/// What an incremental transaction changes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftDelta {
    /// The `nft -f` input; empty when nothing changed.
    pub text: String,
    /// Chains created or refilled.
    pub chains_written: usize,
    /// Rules and elements written.
    pub rules_written: usize,
    /// Chains and sets deleted.
    pub deleted: usize,
    /// Set elements taken out, as `(set, key)`.
    pub removed_elements: Vec<(String, String)>,
    /// Set elements put in, as `(set, key, value)`.
    pub added_elements: Vec<(String, String, String)>,
    /// The change touches set elements only (no chain, rule or set), so it can
    /// also be sent as one netlink batch of exactly those elements.
    pub elements_only: bool,
}

/// The transaction that turns a table holding `previous` into `next`: only
/// changed chains are refilled and only changed elements are touched, so its
/// size follows the change, not the table. `None` when a set's declaration
/// changed, which only a rebuild can apply.
pub fn incremental_text(previous: &NftRuleSet, next: &NftRuleSet) -> Option<NftDelta> {
    let (before, after) = (Fragment::of_rule_set(previous), Fragment::of_rule_set(next));
    let mut table = NftTable::default();
    table.insert(&before);
    table.replace(&[&before], &[&after])
}
