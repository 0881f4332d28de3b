//! A node's nftables program kept up to date plan by plan. Each service port is
//! parsed and rendered only when its plan entry differs from the one the table
//! was last built from, so a sync after one endpoint change costs a comparison
//! per service port plus the rendering of the one that changed, and writes a
//! transaction of that one port's size.
//!
//! What a plan means does not depend on the way it arrived: [`NftProgram`] fed
//! plan A and then plan B holds the same table, summaries and skipped ports as
//! one fed B alone (the property tests check it).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::v1alpha1::{ProgrammedSummary, Protocol, ServicePortPlan};

use crate::Family;
use crate::decide::{NodeDecision, PortDecision};
use crate::model::{self, InvalidServicePort, PlanError, ServicePort, Settings};

use super::{Fragment, NftDelta, NftTable};

/// A service port's identity in the plan, before parsing.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PortId {
    namespace: String,
    name: String,
    port_name: String,
    protocol: Protocol,
}

impl PortId {
    fn of(plan: &ServicePortPlan) -> Self {
        Self {
            namespace: plan.namespace.clone(),
            name: plan.name.clone(),
            port_name: plan.port_name.clone(),
            protocol: plan.protocol,
        }
    }
}

/// The fields of a [`PortId`], borrowed: the map is looked up with a plan
/// entry's own strings, so an unchanged port costs no allocation.
trait PortKey {
    fn key(&self) -> (&str, &str, &str, Protocol);
}

impl PortKey for PortId {
    fn key(&self) -> (&str, &str, &str, Protocol) {
        (&self.namespace, &self.name, &self.port_name, self.protocol)
    }
}

impl PortKey for ServicePortPlan {
    fn key(&self) -> (&str, &str, &str, Protocol) {
        (&self.namespace, &self.name, &self.port_name, self.protocol)
    }
}

impl std::hash::Hash for PortId {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl std::hash::Hash for dyn PortKey + '_ {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.key().hash(state);
    }
}

impl PartialEq for dyn PortKey + '_ {
    fn eq(&self, other: &Self) -> bool {
        self.key() == other.key()
    }
}

impl Eq for dyn PortKey + '_ {}

impl<'a> std::borrow::Borrow<dyn PortKey + 'a> for PortId {
    fn borrow(&self) -> &(dyn PortKey + 'a) {
        self
    }
}

/// A programmed service port: the plan entry it came from, and what it put
/// into the table.
#[derive(Debug, Clone)]
struct PortEntry {
    plan: ServicePortPlan,
    port: ServicePort,
    /// One per family it is rendered in; empty when it has no cluster IP in
    /// a programmed family.
    fragments: Vec<Fragment>,
    /// The last update whose plan held it.
    epoch: u64,
}

impl PortEntry {
    fn render(plan: ServicePortPlan, port: ServicePort, node: &NodeState, epoch: u64) -> Self {
        let fragments = node
            .families
            .iter()
            .filter_map(|family| PortDecision::new(&port, *family, &node.settings))
            .map(|d| Fragment::service_port(&d))
            .collect();
        Self {
            plan,
            port,
            fragments,
            epoch,
        }
    }
}

/// The node-wide part the ports were rendered against.
#[derive(Debug, Clone)]
struct NodeState {
    families: Vec<Family>,
    settings: Settings,
    fragment: Fragment,
}

impl NodeState {
    fn new(families: &[Family], settings: Settings) -> Self {
        let decisions: Vec<NodeDecision> = families
            .iter()
            .map(|f| NodeDecision::new(*f, &settings))
            .collect();
        Self {
            families: families.to_vec(),
            fragment: Fragment::node(&decisions),
            settings,
        }
    }
}

/// The table, and what it was built from.
#[derive(Default)]
pub struct NftProgram {
    families: Vec<Family>,
    node: Option<NodeState>,
    ports: HashMap<PortId, PortEntry>,
    epoch: u64,
    shards: Vec<u32>,
    /// The shards of the last update, kept alive so that their addresses
    /// identify them.
    held: BTreeMap<u32, Arc<dyn AsRef<ProxyPlanSpec> + Send + Sync>>,
    /// Ports that failed to parse, by shard.
    invalid: BTreeMap<u32, Vec<InvalidServicePort>>,
    /// Second copies of a port in the plan.
    duplicates: Vec<InvalidServicePort>,
    table: NftTable,
    /// Per shard: rendered ports, and how many of them reach each endpoint.
    endpoints: BTreeMap<u32, BTreeMap<SocketAddr, u32>>,
    summary: BTreeMap<u32, ProgrammedSummary>,
}

/// What [`NftProgram::update`] did to the table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NftChange {
    /// The transaction from the previous table.
    Delta(NftDelta),
    /// Only a rebuild applies the change (the node-wide part changed, or a
    /// set must be redeclared): write [`NftTable::full_text`].
    Rebuild,
}

impl std::fmt::Debug for NftProgram {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NftProgram")
            .field("families", &self.families)
            .field("service_ports", &self.ports.len())
            .field("shards", &self.shards)
            .field("rules", &self.table.rule_count())
            .finish_non_exhaustive()
    }
}

impl NftProgram {
    /// An empty program for `families` (both when empty).
    pub fn new(families: &[Family]) -> Self {
        Self {
            families: Family::ALL
                .into_iter()
                .filter(|f| families.is_empty() || families.contains(f))
                .collect(),
            ..Default::default()
        }
    }

    /// Brings the table to `shards` (a complete set of one node's shards). On
    /// error nothing changed.
    ///
    /// A shard given as the very allocation of the previous update is known
    /// unchanged and not looked at (the agent hands its watched objects over
    /// as they are, and a watch event replaces only the shard it is about).
    pub fn update<T>(&mut self, shards: &[Arc<T>]) -> Result<NftChange, PlanError>
    where
        T: AsRef<ProxyPlanSpec> + Send + Sync + 'static,
    {
        let specs: Vec<&ProxyPlanSpec> = shards.iter().map(|s| (**s).as_ref()).collect();
        let first = specs.first().ok_or(PlanError::NoShards)?;
        model::check_complete(&specs)?;
        let settings = model::parse_settings(first)?;
        // Every port is rendered against the node-wide settings: when they
        // change, everything is rendered afresh and the table rebuilt.
        let (node, replaced) = match self.node.take() {
            Some(n) if n.settings == settings && n.families == self.families => (n, None),
            previous => (NodeState::new(&self.families, settings), Some(previous)),
        };
        let node_changed = replaced.is_some();
        let unchanged = self.unchanged_shards(shards, node_changed);

        // Entries seen in this plan carry this epoch; the rest are gone. The
        // map is updated in place: an unchanged port costs a lookup and a
        // comparison, an unchanged shard nothing.
        self.epoch += 1;
        let epoch = self.epoch;
        let mut replaced_entries: Vec<PortEntry> = Vec::new();
        let mut changed: Vec<PortId> = Vec::new();
        let mut duplicates = Vec::new();
        let mut invalid: BTreeMap<u32, Vec<InvalidServicePort>> = BTreeMap::new();
        for shard in shards.iter().map(|s| (**s).as_ref()) {
            let index = shard.shard.index;
            if unchanged.contains(&index) {
                if let Some(kept) = self.invalid.remove(&index) {
                    invalid.insert(index, kept);
                }
                continue;
            }
            for (i, plan) in shard.service_ports.iter().enumerate() {
                let taken = match self.ports.get_mut(plan as &dyn PortKey) {
                    Some(e) if e.epoch == epoch => true,
                    Some(e) if !node_changed && e.port.shard == index && e.plan == *plan => {
                        e.epoch = epoch;
                        continue;
                    }
                    _ => false,
                };
                match model::parse_service_port(index, i, plan) {
                    Err(e) => invalid.entry(index).or_default().push(e),
                    Ok(port) if taken => duplicates.push(model::duplicate(&port)),
                    Ok(port) => {
                        let id = PortId::of(plan);
                        let entry = PortEntry::render(plan.clone(), port, &node, epoch);
                        replaced_entries.extend(self.ports.insert(id.clone(), entry));
                        changed.push(id);
                    }
                }
            }
        }
        self.invalid = invalid;
        self.duplicates = duplicates;
        replaced_entries.extend(
            self.ports
                .extract_if(|_, e| e.epoch != epoch && !unchanged.contains(&e.port.shard))
                .map(|(_, e)| e),
        );

        // `replaced_entries` holds the ports that are gone or changed,
        // `changed` the ones put in their place.
        let mut removed: Vec<&Fragment> =
            replaced_entries.iter().flat_map(|e| &e.fragments).collect();
        let mut added: Vec<&Fragment> = changed
            .iter()
            .filter_map(|id| self.ports.get(id))
            .flat_map(|e| &e.fragments)
            .collect();
        if let Some(previous) = &replaced {
            removed.extend(previous.as_ref().map(|p| &p.fragment));
            added.push(&node.fragment);
        }
        let delta = if node_changed {
            // A rebuild writes the whole table: no transaction to work out.
            for fragment in &removed {
                self.table.remove(fragment);
            }
            for fragment in &added {
                self.table.insert(fragment);
            }
            None
        } else {
            self.table.replace(&removed, &added)
        };

        for entry in &replaced_entries {
            count(&mut self.endpoints, &mut self.summary, entry, -1);
        }
        for entry in changed.iter().filter_map(|id| self.ports.get(id)) {
            count(&mut self.endpoints, &mut self.summary, entry, 1);
        }
        let mut indexes: Vec<u32> = specs.iter().map(|s| s.shard.index).collect();
        indexes.sort_unstable();
        self.shards = indexes;
        self.held = shards
            .iter()
            .map(|s| {
                let held: Arc<dyn AsRef<ProxyPlanSpec> + Send + Sync> = s.clone();
                ((**s).as_ref().shard.index, held)
            })
            .collect();
        self.node = Some(node);
        Ok(delta.map_or(NftChange::Rebuild, NftChange::Delta))
    }

    /// The table in force.
    pub fn table(&self) -> &NftTable {
        &self.table
    }

    /// What each shard programs.
    pub fn per_shard(&self) -> BTreeMap<u32, ProgrammedSummary> {
        self.shards
            .iter()
            .map(|s| {
                let mut summary = self.summary.get(s).cloned().unwrap_or_default();
                summary.endpoints = self
                    .endpoints
                    .get(s)
                    .map_or(0, |e| i32::try_from(e.len()).unwrap_or(i32::MAX));
                (*s, summary)
            })
            .collect()
    }

    /// Service ports that were skipped, with the reason.
    pub fn skipped(&self) -> Vec<InvalidServicePort> {
        self.invalid
            .values()
            .flatten()
            .chain(&self.duplicates)
            .cloned()
            .collect()
    }

    /// The shards that are the allocations the previous update was given, when
    /// skipping them gives the same result as reading them: the node-wide part
    /// is unchanged, and no port is in two shards (the first would win, and the
    /// winner could change without its shard changing).
    fn unchanged_shards<T>(&self, shards: &[Arc<T>], node_changed: bool) -> BTreeSet<u32>
    where
        T: AsRef<ProxyPlanSpec> + Send + Sync + 'static,
    {
        if node_changed || !self.duplicates.is_empty() {
            return BTreeSet::new();
        }
        let same = |s: &Arc<T>| {
            let index = (**s).as_ref().shard.index;
            self.held
                .get(&index)
                .is_some_and(|held| std::ptr::addr_eq(Arc::as_ptr(held), Arc::as_ptr(s)))
        };
        let unchanged: BTreeSet<u32> = shards
            .iter()
            .filter(|s| same(s))
            .map(|s| (**s).as_ref().shard.index)
            .collect();
        // A port that moved into a changed shard from one that is skipped
        // would be a duplicate of itself: read everything.
        let moved = shards.iter().filter(|s| !same(s)).any(|s| {
            let spec = (**s).as_ref();
            spec.service_ports.iter().any(|plan| {
                self.ports.get(plan as &dyn PortKey).is_some_and(|e| {
                    e.port.shard != spec.shard.index && unchanged.contains(&e.port.shard)
                })
            })
        });
        if moved { BTreeSet::new() } else { unchanged }
    }

    /// The node-wide settings of the last plan.
    pub fn settings(&self) -> Option<&Settings> {
        self.node.as_ref().map(|n| &n.settings)
    }

    /// The programmed service ports, in no particular order.
    pub fn service_ports(&self) -> impl Iterator<Item = &ServicePort> + Clone {
        self.ports.values().map(|e| &e.port)
    }
}

/// Adds (`sign` 1) or takes out (-1) what one port counts towards its shard.
fn count(
    endpoints: &mut BTreeMap<u32, BTreeMap<SocketAddr, u32>>,
    summary: &mut BTreeMap<u32, ProgrammedSummary>,
    entry: &PortEntry,
    sign: i32,
) {
    let shard = entry.port.shard;
    for fragment in &entry.fragments {
        for (owner, (rules, chains)) in &fragment.counts {
            let s = summary.entry(*owner).or_default();
            s.rules = s.rules.saturating_add(sign * rules);
            s.chains = s.chains.saturating_add(sign * chains);
        }
    }
    if entry.fragments.is_empty() {
        return;
    }
    let s = summary.entry(shard).or_default();
    s.service_ports = s.service_ports.saturating_add(sign);
    let reached = endpoints.entry(shard).or_default();
    let distinct: BTreeSet<SocketAddr> = entry.port.all_endpoints();
    for ep in distinct {
        if sign > 0 {
            *reached.entry(ep).or_default() += 1;
        } else if let Some(n) = reached.get_mut(&ep) {
            *n -= 1;
            if *n == 0 {
                reached.remove(&ep);
            }
        }
    }
}
