//! The incremental resolver: watch events in, changed shards out.
//!
//! `apply_*`/`delete_*` only record the new object and what it makes stale;
//! [`Index::flush`] then recomputes:
//!
//! * a changed Service or EndpointSlice: that service's node-independent part, then
//!   on every node only the one shard the service lands in;
//! * a changed Node: that node's whole plan;
//! * a changed ProxyPolicy: everything.
//!
//! The work for one changed service therefore grows with the number of nodes and
//! the shard size, never with the number of services. Shard names are settled at
//! the end of a flush that added, removed or re-split a node, because one node's
//! names can depend on the other nodes' (see [`shard::disambiguated_stems`]). Derived state (resolved
//! services, node plans, reports) always describes the last flush.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use planproxy_crds::ProxyPolicy;
use planproxy_crds::v1alpha1::{NodeSettings, ProxyPlanSpec, ShardInfo};

use crate::ingest::{self, NodeModel, ObjectKey, ServiceModel, SliceModel};
use crate::policy::{self, PolicyInForce, PolicyModel};
use crate::select::{self, NodeView};
use crate::service::{self, ResolvedService};
use crate::shard::{self, ShardSize};
use crate::{
    PlanShard, PolicyReport, Problem, ProblemKind, Resolution, ResolveOptions, ShardLayout,
};

/// Everything that changed since the last [`Index::flush`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Changes {
    /// Shards whose content is new or changed: write them.
    pub upserts: Vec<PlanShard>,
    /// Names of ProxyPlan objects that no longer belong to any plan: delete them.
    pub deletes: Vec<String>,
    /// Policy reports that changed (or are new), by policy name.
    pub policies: BTreeMap<String, PolicyReport>,
    /// Problems that appeared since the last flush.
    pub problems: Vec<Problem>,
}

impl Changes {
    /// Whether nothing changed.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty()
            && self.deletes.is_empty()
            && self.policies.is_empty()
            && self.problems.is_empty()
    }
}

/// Where a problem came from, so a later version of the same object replaces it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum ProblemSource {
    Service(ObjectKey),
    Slice(ObjectKey),
    Node(String),
    Policy(String),
    /// Slices naming a service that does not exist.
    Orphans(ObjectKey),
    /// Shards over the hard size cap.
    Plan(String),
    /// A node's settings (node addresses a policy needs).
    Settings(String),
}

/// A proxied service with the policies (indexes into the precedence order) that
/// select it.
#[derive(Debug)]
struct ServiceEntry {
    service: Arc<ResolvedService>,
    policies: Vec<usize>,
    /// The JSON size of the service's ports on a node that holds none of its
    /// endpoints: a node-independent estimate used to pick a first shard count for
    /// nodes without a previous layout.
    estimated_bytes: usize,
}

/// A node's plan as of the last flush.
#[derive(Debug)]
struct NodePlan {
    node: NodeModel,
    settings: NodeSettings,
    /// Policies selecting the node, as indexes into the precedence order (so in
    /// precedence order).
    policies: Vec<usize>,
    layout: ShardLayout,
    shards: Vec<ShardState>,
    /// What its shard names are built from: the node name, unless that would
    /// collide with another node's plan (see [`shard::disambiguated_stems`]).
    stem: String,
}

/// A node's plan with every shard it was built from, and the problems resolving
/// its settings found.
type BuiltPlan = (NodePlan, Vec<PlanShard>, Vec<Problem>);

#[derive(Debug, Clone)]
struct ShardState {
    hash: String,
    size: ShardSize,
}

/// How a node's objects were named before the current flush replaced or removed
/// its plan.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NamesBefore {
    /// It had no objects.
    Nothing,
    /// `stem` and shard count of the plan it had.
    Named(String, u32),
    /// Only a seeded layout of this count: the objects' names were never seen, so
    /// they are taken to be what the naming rule gives today.
    Seeded(u32),
}

/// What one flush has done so far; names are settled at its end, once every
/// node's shard count is known.
#[derive(Debug, Default)]
struct Pending {
    /// Shards to write, by node and index.
    upserts: BTreeMap<(String, u32), PlanShard>,
    /// Nodes whose plan was replaced or removed, with their names before.
    before: BTreeMap<String, NamesBefore>,
    /// Nodes with rebuilt shards (their size problems are re-checked).
    touched: BTreeSet<String>,
    /// Some node appeared, disappeared or changed its shard count, so any node's
    /// names may have changed.
    relabel: bool,
}

/// Incremental, pure: the runtime feeds watch events; [`Index::flush`] recomputes
/// only what changed.
#[derive(Debug, Default)]
pub struct Index {
    options: ResolveOptions,

    // Inputs, as last applied.
    services: BTreeMap<ObjectKey, ServiceModel>,
    slices: BTreeMap<ObjectKey, SliceModel>,
    slices_by_service: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    nodes: BTreeMap<String, NodeModel>,
    policies: BTreeMap<String, PolicyModel>,

    // Derived, as of the last flush.
    /// The layout of the shards that exist (or existed when seeded) per node.
    layouts: BTreeMap<String, ShardLayout>,
    precedence: Vec<PolicyInForce>,
    resolved: BTreeMap<ObjectKey, ServiceEntry>,
    by_hash: BTreeSet<(u64, ObjectKey)>,
    plans: BTreeMap<String, NodePlan>,
    /// Per policy in precedence order: how many nodes and proxied services it
    /// selects, kept up to date incrementally.
    matched_nodes: Vec<u32>,
    matched_services: Vec<u32>,
    /// Disambiguated stems in use, each with its node (plain stems are node names).
    stem_owners: BTreeMap<String, String>,
    reports: BTreeMap<String, PolicyReport>,
    problems: BTreeMap<ProblemSource, Vec<Problem>>,

    // Pending until the next flush.
    dirty_services: BTreeSet<ObjectKey>,
    dirty_nodes: BTreeSet<String>,
    policies_dirty: bool,
    new_problems: Vec<Problem>,
}

impl Index {
    /// An empty index.
    pub fn new(options: ResolveOptions) -> Self {
        Self {
            options,
            ..Default::default()
        }
    }

    /// Adds or replaces a Service.
    pub fn apply_service(&mut self, svc: Service) {
        let (model, problems) = ingest::service(&svc);
        let Some(model) = model else { return };
        let key = model.key.clone();
        self.set_problems(ProblemSource::Service(key.clone()), problems);
        if self.services.get(&key) != Some(&model) {
            self.services.insert(key.clone(), model);
            self.dirty_services.insert(key);
        }
    }

    /// Removes a Service.
    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let key = ObjectKey::new(namespace, name);
        self.set_problems(ProblemSource::Service(key.clone()), Vec::new());
        if self.services.remove(&key).is_some() {
            self.dirty_services.insert(key);
        }
    }

    /// Adds or replaces an EndpointSlice.
    pub fn apply_endpoint_slice(&mut self, s: EndpointSlice) {
        let (model, problems) = ingest::endpoint_slice(&s);
        let Some(model) = model else { return };
        let key = model.key.clone();
        self.set_problems(ProblemSource::Slice(key.clone()), problems);
        if self.slices.get(&key) == Some(&model) {
            return;
        }
        self.unlink_slice(&key);
        if let Some(service) = &model.service {
            self.slices_by_service
                .entry(service.clone())
                .or_default()
                .insert(key.clone());
            self.dirty_services.insert(service.clone());
        }
        self.slices.insert(key, model);
    }

    /// Removes an EndpointSlice.
    pub fn delete_endpoint_slice(&mut self, namespace: &str, name: &str) {
        let key = ObjectKey::new(namespace, name);
        self.set_problems(ProblemSource::Slice(key.clone()), Vec::new());
        self.unlink_slice(&key);
        self.slices.remove(&key);
    }

    fn unlink_slice(&mut self, key: &ObjectKey) {
        let Some(service) = self.slices.get(key).and_then(|s| s.service.clone()) else {
            return;
        };
        if let Some(set) = self.slices_by_service.get_mut(&service) {
            set.remove(key);
            if set.is_empty() {
                self.slices_by_service.remove(&service);
            }
        }
        self.dirty_services.insert(service);
    }

    /// Adds or replaces a Node.
    pub fn apply_node(&mut self, n: Node) {
        let (model, problems) = ingest::node(&n);
        let Some(model) = model else { return };
        let name = model.name.clone();
        self.set_problems(ProblemSource::Node(name.clone()), problems);
        if self.nodes.get(&name) != Some(&model) {
            self.nodes.insert(name.clone(), model);
            self.dirty_nodes.insert(name);
        }
    }

    /// Removes a Node (its plan shards are deleted on the next flush).
    pub fn delete_node(&mut self, name: &str) {
        self.set_problems(ProblemSource::Node(name.to_owned()), Vec::new());
        if self.nodes.remove(name).is_some() {
            self.dirty_nodes.insert(name.to_owned());
        }
    }

    /// Adds or replaces a ProxyPolicy.
    pub fn apply_policy(&mut self, p: ProxyPolicy) {
        let (model, problems) = policy::compile(&p);
        let name = model.name.clone();
        self.set_problems(ProblemSource::Policy(name.clone()), problems);
        self.policies.insert(name, model);
        self.policies_dirty = true;
    }

    /// Removes a ProxyPolicy.
    pub fn delete_policy(&mut self, name: &str) {
        self.set_problems(ProblemSource::Policy(name.to_owned()), Vec::new());
        if self.policies.remove(name).is_some() {
            self.policies_dirty = true;
        }
    }

    /// Seeds the previous layout of a node's plan (from existing ProxyPlans at
    /// startup). Shards of that layout that the node's new plan does not have are
    /// deleted on the next flush, also when the Node no longer exists.
    pub fn set_layout(&mut self, node: &str, layout: ShardLayout) {
        self.layouts.insert(node.to_owned(), layout);
        self.dirty_nodes.insert(node.to_owned());
    }

    /// The layout of every node's plan as of the last flush (plus seeded ones not
    /// yet flushed). Passing these as [`crate::Snapshot::layouts`] makes
    /// [`crate::resolve`] reproduce the next flush.
    pub fn layouts(&self) -> &BTreeMap<String, ShardLayout> {
        &self.layouts
    }

    fn set_problems(&mut self, source: ProblemSource, problems: Vec<Problem>) {
        let old = if problems.is_empty() {
            self.problems.remove(&source).unwrap_or_default()
        } else {
            self.problems
                .insert(source, problems.clone())
                .unwrap_or_default()
        };
        self.new_problems
            .extend(problems.into_iter().filter(|p| !old.contains(p)));
    }

    /// Everything that changed since the last flush: shards to write (new content),
    /// shards to delete, policy reports that changed, new problems.
    pub fn flush(&mut self) -> Changes {
        let mut changes = Changes::default();
        let everything = std::mem::take(&mut self.policies_dirty);
        if everything {
            self.precedence = policy::precedence_order(self.policies.values());
            self.dirty_nodes.extend(self.nodes.keys().cloned());
            self.dirty_nodes.extend(self.plans.keys().cloned());
            self.matched_services = vec![0; self.precedence.len()];
            for entry in self.resolved.values_mut() {
                entry.policies = matching_policies(&self.precedence, &entry.service);
                for i in &entry.policies {
                    self.matched_services[*i] += 1;
                }
            }
        }

        // Services: recompute the node-independent part; remember which hash
        // positions changed.
        let mut changed_hashes: BTreeSet<u64> = BTreeSet::new();
        for key in std::mem::take(&mut self.dirty_services) {
            if self.resolve_service(&key) {
                changed_hashes.insert(shard::service_hash(&key));
            }
        }

        // Nodes: full rebuilds.
        let dirty_nodes = std::mem::take(&mut self.dirty_nodes);
        if everything || !dirty_nodes.is_empty() {
            self.matched_nodes = self
                .precedence
                .iter()
                .map(|p| {
                    let n = self
                        .nodes
                        .values()
                        .filter(|n| policy::matches_node(p, n))
                        .count();
                    u32::try_from(n).unwrap_or(u32::MAX)
                })
                .collect();
        }
        let mut pending = Pending::default();
        self.rebuild_nodes(&dirty_nodes, &mut pending);

        // Other nodes: only the shards the changed services land in.
        if !changed_hashes.is_empty() {
            let names: Vec<String> = self
                .plans
                .keys()
                .filter(|n| !dirty_nodes.contains(*n))
                .cloned()
                .collect();
            for name in names {
                self.update_node_shards(&name, &changed_hashes, &mut pending);
            }
        }

        self.settle_names(pending, &mut changes);
        self.update_reports(&mut changes);
        changes.problems = std::mem::take(&mut self.new_problems);
        changes.problems.sort();
        changes.problems.dedup();
        changes
    }

    /// Recomputes one service; true if its resolved form changed.
    fn resolve_service(&mut self, key: &ObjectKey) -> bool {
        let slice_keys = self.slices_by_service.get(key);
        let slices = slice_keys
            .into_iter()
            .flatten()
            .filter_map(|k| self.slices.get(k));
        let model = self.services.get(key);

        let orphans: Vec<Problem> = if model.is_none() {
            slices
                .clone()
                .map(|s| Problem {
                    object: format!("EndpointSlice {}", s.key),
                    field: format!(
                        "metadata.labels[{}]",
                        planproxy_crds::labels::SERVICE_NAME_LABEL
                    ),
                    message: format!(
                        "Service {key} does not exist; the slice's endpoints are not used"
                    ),
                    kind: ProblemKind::Dangling,
                })
                .collect()
        } else {
            Vec::new()
        };

        let new = model
            .filter(|m| m.skip.is_none())
            .map(|m| service::resolve_service(m, slices));
        self.set_problems(ProblemSource::Orphans(key.clone()), orphans);

        let old = self.resolved.get(key);
        if old.map(|e| &*e.service) == new.as_ref() {
            return false;
        }
        let hash = shard::service_hash(key);
        if let Some(old) = old {
            for i in &old.policies {
                self.matched_services[*i] = self.matched_services[*i].saturating_sub(1);
            }
        }
        match new {
            Some(service) => {
                let policies = matching_policies(&self.precedence, &service);
                for i in &policies {
                    self.matched_services[*i] += 1;
                }
                let estimated_bytes = estimate_bytes(&service);
                self.resolved.insert(
                    key.clone(),
                    ServiceEntry {
                        service: Arc::new(service),
                        policies,
                        estimated_bytes,
                    },
                );
                self.by_hash.insert((hash, key.clone()));
            }
            None => {
                self.resolved.remove(key);
                self.by_hash.remove(&(hash, key.clone()));
            }
        }
        true
    }

    /// Rebuilds whole node plans: computed in parallel (each node's plan depends
    /// only on the shared, read-only state), then installed in name order so the
    /// changes come out the same whatever the thread timing.
    fn rebuild_nodes(&mut self, names: &BTreeSet<String>, pending: &mut Pending) {
        let names: Vec<&String> = names.iter().collect();
        let computed = parallel_map(&names, |name| self.compute_node(name));
        let installs: Vec<(String, Option<BuiltPlan>)> =
            names.into_iter().cloned().zip(computed).collect();
        for (name, computed) in installs {
            self.install_node(&name, computed, pending);
        }
    }

    /// Rebuilds one node's whole plan (or removes it when the Node is gone).
    fn rebuild_node(&mut self, name: &str, pending: &mut Pending) {
        let computed = self.compute_node(name);
        self.install_node(name, computed, pending);
    }

    /// A node's new plan and all its shards; `None` when the Node does not exist.
    fn compute_node(&self, name: &str) -> Option<BuiltPlan> {
        let previous = self.layouts.get(name).copied();
        let node = self.nodes.get(name)?.clone();
        let policies: Vec<usize> = self
            .precedence
            .iter()
            .enumerate()
            .filter(|(_, p)| policy::matches_node(p, &node))
            .map(|(i, _)| i)
            .collect();
        let (settings, problems) =
            policy::node_settings(&node, policies.iter().map(|i| &self.precedence[*i]));
        let mut plan = NodePlan {
            node,
            settings,
            policies,
            layout: previous.unwrap_or(ShardLayout {
                count: 1,
                generation: 0,
            }),
            shards: Vec::new(),
            // Kept until the end of the flush settles every node's names.
            stem: self
                .plans
                .get(name)
                .map_or_else(|| name.to_owned(), |p| p.stem.clone()),
        };
        let shards = self.build_plan(&mut plan, previous);
        Some((plan, shards, problems))
    }

    /// Replaces a node's plan, recording the shards to write; the names it had
    /// are remembered so the end of the flush can delete what is left of them.
    fn install_node(&mut self, name: &str, computed: Option<BuiltPlan>, pending: &mut Pending) {
        let previous = self.layouts.get(name).copied();
        let old = self.plans.remove(name);
        pending.relabel = true;
        pending
            .before
            .entry(name.to_owned())
            .or_insert_with(|| match (&old, previous) {
                (Some(plan), Some(layout)) if plan.layout.count == layout.count => {
                    NamesBefore::Named(plan.stem.clone(), layout.count)
                }
                (_, Some(layout)) => NamesBefore::Seeded(layout.count),
                (Some(plan), None) => NamesBefore::Named(plan.stem.clone(), plan.layout.count),
                (None, None) => NamesBefore::Nothing,
            });
        let Some((plan, shards, problems)) = computed else {
            self.layouts.remove(name);
            self.set_problems(ProblemSource::Plan(name.to_owned()), Vec::new());
            self.set_problems(ProblemSource::Settings(name.to_owned()), Vec::new());
            return;
        };
        self.set_problems(ProblemSource::Settings(name.to_owned()), problems);
        // With an unchanged count, shard `i` holds the same services as before and
        // is rewritten only when its content changed.
        let old_hashes: Vec<&str> = old
            .as_ref()
            .filter(|o| o.layout.count == plan.layout.count)
            .map(|o| o.shards.iter().map(|s| s.hash.as_str()).collect())
            .unwrap_or_default();
        for shard in shards {
            let index = shard.spec.shard.index;
            if old_hashes.get(index as usize) != Some(&shard.hash.as_str()) {
                pending.upserts.insert((name.to_owned(), index), shard);
            }
        }
        pending.touched.insert(name.to_owned());
        self.layouts.insert(name.to_owned(), plan.layout);
        self.plans.insert(name.to_owned(), plan);
    }

    /// Gives every node its final shard names: a node that appeared, vanished or
    /// changed its count can change other nodes' names. A node whose names
    /// changed rewrites every shard under the new names and deletes the old ones;
    /// a name that still belongs to some plan (now maybe another node's) is never
    /// deleted, so one flush never both writes and deletes a name.
    fn settle_names(&mut self, mut pending: Pending, changes: &mut Changes) {
        if pending.relabel {
            let stems = shard::disambiguated_stems(&self.plans, |p| p.layout.count);
            for (name, plan) in &mut self.plans {
                let stem = stems.get(name).unwrap_or(name);
                if plan.stem != *stem {
                    pending.before.entry(name.clone()).or_insert_with(|| {
                        NamesBefore::Named(plan.stem.clone(), plan.layout.count)
                    });
                    plan.stem.clone_from(stem);
                }
            }
            self.stem_owners = stems.into_iter().map(|(node, stem)| (stem, node)).collect();
        }

        let mut deletes: Vec<String> = Vec::new();
        for (name, before) in &pending.before {
            let now = self
                .plans
                .get(name)
                .map(|p| (p.stem.as_str(), p.layout.count));
            let old_names = match before {
                NamesBefore::Nothing => continue,
                NamesBefore::Named(stem, count) if now == Some((stem.as_str(), *count)) => continue,
                NamesBefore::Named(stem, count) => shard_names(stem, *count),
                NamesBefore::Seeded(count) => {
                    shard_names(&shard::stem_alone(name, *count, &self.plans), *count)
                }
            };
            deletes.extend(old_names);
            // Renamed: every shard is written under its new name.
            if let Some(plan) = self.plans.get(name) {
                for index in 0..plan.layout.count {
                    pending
                        .upserts
                        .entry((name.clone(), index))
                        .or_insert_with(|| self.build_shard(plan, index).0);
                }
                pending.touched.insert(name.clone());
            }
        }
        let mut seen = BTreeSet::new();
        deletes.retain(|n| !self.owns_name(n) && seen.insert(n.clone()));
        changes.deletes = deletes;

        for ((node, index), mut shard) in pending.upserts {
            if let Some(plan) = self.plans.get(&node) {
                shard.name = shard::shard_name(&plan.stem, index, plan.layout.count);
            }
            changes.upserts.push(shard);
        }
        for name in &pending.touched {
            if let Some(plan) = self.plans.remove(name) {
                self.report_oversized(&plan);
                self.plans.insert(name.clone(), plan);
            }
        }
    }

    /// Whether some current plan has an object of this name.
    fn owns_name(&self, object: &str) -> bool {
        if self.plans.get(object).is_some_and(|p| p.layout.count <= 1) {
            return true;
        }
        let Some((stem, index)) = object.rsplit_once('-') else {
            return false;
        };
        let Some(index) = index.parse::<u32>().ok().filter(|i| i.to_string() == index) else {
            return false;
        };
        let node = self.stem_owners.get(stem).map_or(stem, String::as_str);
        self.plans
            .get(node)
            .is_some_and(|p| p.stem == stem && p.layout.count > 1 && index < p.layout.count)
    }

    /// Builds every shard of a node's plan, choosing the layout: starting from the
    /// previous count, rebuilding at a new count until the count decision is
    /// stable.
    fn build_plan(&self, plan: &mut NodePlan, previous: Option<ShardLayout>) -> Vec<PlanShard> {
        // Without a previous layout, start from the count the estimated size needs,
        // so a large plan is not first built as one giant shard.
        let mut count = previous.map_or_else(
            || {
                let estimate: usize = self.resolved.values().map(|e| e.estimated_bytes).sum();
                shard::next_count(
                    1,
                    &[ShardSize {
                        bytes: estimate,
                        services: self.resolved.len(),
                    }],
                    &self.options,
                )
            },
            |l| l.count.clamp(1, shard::MAX_SHARDS),
        );
        if !count.is_power_of_two() {
            count = count.next_power_of_two().min(shard::MAX_SHARDS);
        }
        // Each round only grows (or shrinks once to what the size needs), so this
        // settles within log2(MAX_SHARDS) rounds; the bound is a backstop.
        for _ in 0..=shard::MAX_SHARDS.trailing_zeros() + 1 {
            plan.layout = ShardLayout {
                count,
                generation: generation_for(previous, count),
            };
            let built: Vec<(PlanShard, ShardSize)> =
                (0..count).map(|i| self.build_shard(plan, i)).collect();
            let sizes: Vec<ShardSize> = built.iter().map(|(_, s)| *s).collect();
            let next = shard::next_count(count, &sizes, &self.options);
            if next == count {
                plan.shards = built
                    .iter()
                    .map(|(s, size)| ShardState {
                        hash: s.hash.clone(),
                        size: *size,
                    })
                    .collect();
                return built.into_iter().map(|(s, _)| s).collect();
            }
            count = next;
        }
        // Unreachable in practice; keep the last layout rather than loop forever.
        let built: Vec<(PlanShard, ShardSize)> =
            (0..count).map(|i| self.build_shard(plan, i)).collect();
        plan.shards = built
            .iter()
            .map(|(s, size)| ShardState {
                hash: s.hash.clone(),
                size: *size,
            })
            .collect();
        built.into_iter().map(|(s, _)| s).collect()
    }

    /// Rebuilds the shards of one node that hold the changed services; falls back
    /// to a whole rebuild when the layout must change.
    fn update_node_shards(&mut self, name: &str, changed: &BTreeSet<u64>, pending: &mut Pending) {
        let Some(plan) = self.plans.get(name) else {
            return;
        };
        let count = plan.layout.count;
        let indexes: BTreeSet<u32> = changed
            .iter()
            .map(|h| shard::shard_index(*h, count))
            .collect();
        // Built aside: on a fallback the plan must still describe what was written.
        let rebuilt: Vec<(u32, PlanShard, ShardSize)> = indexes
            .into_iter()
            .map(|index| {
                let (shard, size) = self.build_shard(plan, index);
                (index, shard, size)
            })
            .collect();
        let mut sizes: Vec<ShardSize> = plan.shards.iter().map(|s| s.size).collect();
        for (index, _, size) in &rebuilt {
            sizes[*index as usize] = *size;
        }
        if shard::next_count(count, &sizes, &self.options) != count {
            self.rebuild_node(name, pending);
            return;
        }
        let Some(plan) = self.plans.get_mut(name) else {
            return;
        };
        for (index, shard, size) in rebuilt {
            let state = &mut plan.shards[index as usize];
            state.size = size;
            if state.hash != shard.hash {
                state.hash.clone_from(&shard.hash);
                pending.upserts.insert((name.to_owned(), index), shard);
            }
        }
        pending.touched.insert(name.to_owned());
    }

    /// Builds one shard of a node's plan.
    fn build_shard(&self, plan: &NodePlan, index: u32) -> (PlanShard, ShardSize) {
        let count = plan.layout.count;
        let mut keys: Vec<&ObjectKey> = self
            .by_hash
            .range(
                (
                    *shard::hash_range(index, count).start(),
                    ObjectKey::new("", ""),
                )..,
            )
            .take_while(|(h, _)| shard::hash_range(index, count).contains(h))
            .map(|(_, k)| k)
            .collect();
        keys.sort();
        let node = NodeView {
            name: &plan.node.name,
            zone: plan.node.zone.as_deref(),
        };
        let mut service_ports = Vec::new();
        let mut services = 0;
        for key in keys {
            let Some(entry) = self.resolved.get(key) else {
                continue;
            };
            let matching = plan
                .policies
                .iter()
                .filter(|i| entry.policies.binary_search(i).is_ok())
                .map(|i| &self.precedence[*i]);
            let settings = policy::service_settings(matching);
            if !settings.proxy_services {
                continue;
            }
            services += 1;
            select::service_port_plans(&entry.service, node, &settings, &mut service_ports);
        }
        let spec = ProxyPlanSpec {
            node_name: plan.node.name.clone(),
            shard: ShardInfo {
                index,
                count,
                generation: plan.layout.generation,
            },
            settings: plan.settings.clone(),
            service_ports,
        };
        let (shard, bytes) = shard::finish(shard::shard_name(&plan.stem, index, count), spec);
        (shard, ShardSize { bytes, services })
    }

    fn report_oversized(&mut self, plan: &NodePlan) {
        let problems = plan
            .shards
            .iter()
            .enumerate()
            .filter(|(_, s)| s.size.bytes > self.options.shard_max_bytes)
            .map(|(i, s)| Problem {
                object: format!(
                    "ProxyPlan {}",
                    shard::shard_name(&plan.stem, i as u32, plan.layout.count)
                ),
                field: "spec.servicePorts".to_owned(),
                message: format!(
                    "{} bytes exceed the {}-byte cap: a service in it has too many endpoints to fit one shard",
                    s.size.bytes, self.options.shard_max_bytes
                ),
                kind: ProblemKind::Oversized,
            })
            .collect();
        self.set_problems(ProblemSource::Plan(plan.node.name.clone()), problems);
    }

    fn update_reports(&mut self, changes: &mut Changes) {
        let mut reports = BTreeMap::new();
        for (name, model) in &self.policies {
            let position = self.precedence.iter().position(|p| &p.name == name);
            let count = |counts: &[u32]| position.and_then(|i| counts.get(i).copied()).unwrap_or(0);
            let report = PolicyReport {
                verdict: model.verdict.clone(),
                matched_nodes: count(&self.matched_nodes),
                matched_services: count(&self.matched_services),
            };
            if self.reports.get(name) != Some(&report) {
                changes.policies.insert(name.clone(), report.clone());
            }
            reports.insert(name.clone(), report);
        }
        self.reports = reports;
    }

    /// The full current result, same as [`crate::resolve`] over the same objects
    /// (as of the last flush).
    pub fn resolution(&self) -> Resolution {
        let nodes: Vec<(&String, &NodePlan)> = self.plans.iter().collect();
        let plans = parallel_map(&nodes, |(name, plan)| {
            let shards = (0..plan.layout.count)
                .map(|i| self.build_shard(plan, i).0)
                .collect();
            ((*name).clone(), shards)
        })
        .into_iter()
        .collect();
        Resolution {
            plans,
            policies: self.reports.clone(),
            problems: self.all_problems(),
        }
    }

    /// Every current problem, sorted.
    pub fn problems(&self) -> Vec<Problem> {
        self.all_problems()
    }

    fn all_problems(&self) -> Vec<Problem> {
        let mut problems: Vec<Problem> = self.problems.values().flatten().cloned().collect();
        problems.sort();
        problems.dedup();
        problems
    }

    /// Turns the changes of the first flush of a fresh index into the resolution,
    /// without building the shards a second time.
    pub(crate) fn first_resolution(&self, changes: Changes) -> Resolution {
        let mut plans: BTreeMap<String, Vec<PlanShard>> = BTreeMap::new();
        for shard in changes.upserts {
            plans
                .entry(shard.spec.node_name.clone())
                .or_default()
                .push(shard);
        }
        for shards in plans.values_mut() {
            shards.sort_by_key(|s| s.spec.shard.index);
        }
        Resolution {
            plans,
            policies: self.reports.clone(),
            problems: self.all_problems(),
        }
    }
}

fn matching_policies(precedence: &[PolicyInForce], service: &ResolvedService) -> Vec<usize> {
    precedence
        .iter()
        .enumerate()
        .filter(|(_, p)| policy::matches_service(p, &service.labels))
        .map(|(i, _)| i)
        .collect()
}

/// Maps `f` over `items` on up to one thread per core, keeping the order. The
/// result does not depend on the number of threads.
fn parallel_map<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = std::thread::available_parallelism().map_or(1, usize::from);
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(&f).collect();
    }
    let chunk = items.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(|| part.iter().map(&f).collect::<Vec<R>>()))
            .collect();
        handles
            .into_iter()
            .flat_map(|h| match h.join() {
                Ok(results) => results,
                // A panic in a worker is a bug in the resolver: surface it as one.
                Err(panic) => std::panic::resume_unwind(panic),
            })
            .collect()
    })
}

fn estimate_bytes(service: &ResolvedService) -> usize {
    let mut ports = Vec::new();
    let nowhere = NodeView {
        name: "",
        zone: None,
    };
    select::service_port_plans(
        service,
        nowhere,
        &policy::ServiceSettings::default(),
        &mut ports,
    );
    ports
        .iter()
        .map(|p| serde_json::to_vec(p).map_or(0, |v| v.len() + 1))
        .sum()
}

fn generation_for(previous: Option<ShardLayout>, count: u32) -> i64 {
    match previous {
        None => 1,
        Some(p) if p.count == count => p.generation.max(1),
        Some(p) => p.generation.max(0) + 1,
    }
}

fn shard_names(stem: &str, count: u32) -> Vec<String> {
    (0..count.max(1))
        .map(|i| shard::shard_name(stem, i, count))
        .collect()
}
