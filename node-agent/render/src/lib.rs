//! Pure rendering of a node's ProxyPlan into iptables rules (no I/O, no clock).
//!
//! ```text
//!  &[ProxyPlanSpec] ──model::parse──► NodeModel ──render──► RuleSet ──restore──► iptables-restore text
//!   (complete shard set)   (typed, validated;      (per family → table → chains,   (full, or incremental
//!                           bad ports skipped)      plus jumps from built-ins)       against the previous RuleSet)
//! ```
//!
//! Every value that reaches a rule line comes from a parsed type (IP address,
//! CIDR, port, protocol) or from a name checked against the Kubernetes naming
//! rules; plan content cannot inject a rule.

pub mod decide;
pub mod hash;
mod iptables;
pub mod model;
pub mod nft;
pub mod restore;
pub mod ruleset;
mod tree;

pub use iptables::{Rendered, probability, render, render_model};
pub use model::{InvalidServicePort, NodeModel, PlanError};
pub use restore::{RestoreInput, full_text, restore_full, restore_incremental};
pub use ruleset::{Chain, Family, FamilyRules, Jump, RuleSet, Table, TableRules, chains};
pub use tree::LEAF_MAX;

/// How service frontends are dispatched from the top-level services chain.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum Layout {
    /// A shallow tree of chains keyed by destination address prefix: a first
    /// packet walks O(log n) rules instead of one per frontend.
    #[default]
    Tree,
    /// One rule per frontend in the top-level chain, as kube-proxy does.
    Flat,
}

impl std::str::FromStr for Layout {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tree" => Ok(Layout::Tree),
            "flat" => Ok(Layout::Flat),
            other => Err(format!("unknown layout {other:?} (expected tree or flat)")),
        }
    }
}

/// Options of one rendering.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RenderOptions {
    /// Dispatch layout.
    pub layout: Layout,
    /// Families to render; empty renders both.
    pub families: Vec<Family>,
}
