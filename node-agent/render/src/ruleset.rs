//! The typed result of rendering: families → tables → chains.

use std::collections::BTreeMap;

/// An IP family: rules go to `iptables` (V4) or `ip6tables` (V6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// Both families, IPv4 first.
    pub const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// `ipv4` / `ipv6`, as metric labels spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A netfilter table planproxy writes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Table {
    /// The filter table: REJECT/DROP for frontends without endpoints, firewall, forwarding.
    Filter,
    /// The nat table: service dispatch, DNAT, masquerade.
    Nat,
}

impl Table {
    /// Both tables, in the order they are restored.
    pub const ALL: [Table; 2] = [Table::Filter, Table::Nat];

    /// The table's name as iptables spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
        }
    }
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Every rule planproxy wants in the kernel, by family and table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuleSet {
    /// The rules of each rendered family.
    pub families: BTreeMap<Family, FamilyRules>,
}

/// One family's tables.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FamilyRules {
    /// The filter table.
    pub filter: TableRules,
    /// The nat table.
    pub nat: TableRules,
}

impl FamilyRules {
    /// The rules of `table`.
    pub fn table(&self, table: Table) -> &TableRules {
        match table {
            Table::Filter => &self.filter,
            Table::Nat => &self.nat,
        }
    }

    pub(crate) fn table_mut(&mut self, table: Table) -> &mut TableRules {
        match table {
            Table::Filter => &mut self.filter,
            Table::Nat => &mut self.nat,
        }
    }
}

/// One table's planproxy chains and the jumps into them from built-in chains.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableRules {
    /// planproxy's chains by name. Top-level chains (jumped to from built-ins) are
    /// always present, possibly empty.
    pub chains: BTreeMap<String, Chain>,
    /// Jumps from built-in chains, in the order they should appear (first = top).
    pub jumps: Vec<Jump>,
}

impl TableRules {
    /// The number of rules in all chains.
    pub fn rule_count(&self) -> usize {
        self.chains.values().map(|c| c.rules.len()).sum()
    }
}

/// One chain's rules (each rule as it follows `-A <chain> ` in restore input).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Chain {
    /// The rules, in order.
    pub rules: Vec<String>,
    /// The shard whose service port owns this chain; `None` for node-wide chains.
    pub owner: Option<u32>,
}

/// A jump from a built-in chain to one of planproxy's top-level chains. These are
/// ensured with individual iptables calls, never through iptables-restore, so a
/// restore never touches a chain planproxy does not own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Jump {
    /// The built-in chain (`PREROUTING`, `INPUT`, ...).
    pub builtin: &'static str,
    /// The target chain.
    pub target: &'static str,
    /// The whole rule spec, ending in `-j <target>`.
    pub spec: String,
}

/// The fixed chain names. Every chain planproxy owns starts with `PPX-`.
pub mod chains {
    /// nat and filter: service frontends (nat: dispatch; filter: no-endpoint REJECT/DROP).
    pub const SERVICES: &str = "PPX-SERVICES";
    /// nat: node ports; filter: health-check node ports.
    pub const NODEPORTS: &str = "PPX-NODEPORTS";
    /// nat: masquerades marked traffic.
    pub const POSTROUTING: &str = "PPX-POSTROUTING";
    /// nat: marks traffic for masquerade.
    pub const MARK_MASQ: &str = "PPX-MARK-MASQ";
    /// nat: marks hairpin traffic (a local endpoint reaching itself) for masquerade.
    pub const HAIRPIN: &str = "PPX-HAIRPIN";
    /// filter: REJECT/DROP for external frontends without (local) endpoints.
    pub const EXTERNAL_SERVICES: &str = "PPX-EXTERNAL-SERVICES";
    /// filter: accepts forwarded service traffic.
    pub const FORWARD: &str = "PPX-FORWARD";
    /// filter: drops load-balancer traffic from sources outside the allowed ranges.
    pub const PROXY_FIREWALL: &str = "PPX-PROXY-FIREWALL";
    /// filter: drops packets to 127.0.0.0/8 from elsewhere while IPv4 node
    /// ports answer there (route_localnet is on); empty otherwise.
    pub const LOCALNET_GUARD: &str = "PPX-LOCALNET-GUARD";
    /// nat and filter: an empty chain whose disappearance shows someone flushed
    /// planproxy's chains. Managed by the data plane, never part of a RuleSet.
    pub const CANARY: &str = "PPX-CANARY";

    /// The chains of `table` that built-in chains jump to or that are always
    /// present: created before any restore and never deleted by a sync.
    pub fn fixed(table: super::Table) -> &'static [&'static str] {
        match table {
            super::Table::Nat => &[SERVICES, NODEPORTS, POSTROUTING, MARK_MASQ, HAIRPIN],
            super::Table::Filter => &[
                SERVICES,
                EXTERNAL_SERVICES,
                NODEPORTS,
                FORWARD,
                PROXY_FIREWALL,
                LOCALNET_GUARD,
            ],
        }
    }
}
