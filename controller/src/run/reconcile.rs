//! The resolver loop's state: watch events in, queued writes out.
//!
//! ```text
//!  watch events ─► Reconciler::handle ─► Index (pure, incremental)
//!                                          │ flush, once per coalescing window
//!                                          ▼
//!        desired shards (name → hash) ◄── Changes ──► policy status, events
//!                  │ compare with observed ProxyPlans (name → hash)
//!                  ▼
//!            WriteQueue ──► writer task (the only API writer)
//! ```
//!
//! A shard is queued only when its hash differs from the ProxyPlan the cluster
//! holds, so a restart or a re-list (410 Gone) that changes nothing writes
//! nothing. Standbys run the same loop; their queue empties as they watch the
//! leader's writes land, so a new leader starts with only what is really missing.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{OwnerReference, Time};
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use kube::runtime::watcher::Event;
use planproxy_crds::labels::{NODE_LABEL, SHARD_LABEL, SPEC_HASH_ANNOTATION};
use planproxy_crds::{ProxyPlan, ProxyPolicy, ProxyPolicyStatus};
use planproxy_resolve::{Changes, Index, PlanShard, PolicyReport, ShardLayout};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::metrics::Metrics;
use super::queue::WriteQueue;
use super::status::{self, EventDedupe, ProblemEvent};
use super::watch::{Input, WatchEvent};

/// What a queued write targets; one pending write per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WriteKey {
    /// A ProxyPlan, by name.
    Plan(String),
    /// A ProxyPolicy's status, by policy name.
    PolicyStatus(String),
    /// An event, by [`ProblemEvent::key`].
    Event(String),
}

/// A queued write.
#[derive(Debug, Clone)]
pub enum Write {
    /// Create or update a ProxyPlan (server-side apply).
    ApplyPlan {
        /// The object to apply.
        plan: Box<ProxyPlan>,
        /// Its spec hash.
        hash: String,
    },
    /// Delete a ProxyPlan.
    DeletePlan,
    /// Replace a ProxyPolicy's status.
    PolicyStatus(Box<ProxyPolicyStatus>),
    /// Publish an event.
    Event(ProblemEvent),
}

/// What the writer last wrote to a plan, until the watch shows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Written {
    /// Applied with this hash.
    Applied(String),
    /// Deleted.
    Deleted,
}

/// State shared by the resolver loop and the writer.
#[derive(Debug)]
pub struct Pending {
    /// Writes waiting for the budget.
    pub queue: WriteQueue<WriteKey, Write>,
    /// Plans written whose watch event has not arrived yet: events about them
    /// that predate the write are stale and must not look like drift.
    pub written: HashMap<String, Written>,
}

/// The queue and its wake-up signal.
#[derive(Debug)]
pub struct Shared {
    /// The pending writes.
    pub pending: Mutex<Pending>,
    /// Signalled when writes are queued.
    pub notify: Notify,
}

impl Shared {
    /// An empty queue promoting writes older than `age_cap`.
    pub fn new(age_cap: std::time::Duration) -> Self {
        Self {
            pending: Mutex::new(Pending {
                queue: WriteQueue::new(age_cap),
                written: HashMap::new(),
            }),
            notify: Notify::new(),
        }
    }

    /// Locks the pending writes. A panic while holding the lock cannot leave the
    /// queue inconsistent in a way that matters (it is rebuilt from the watches
    /// on the next reconcile), so a poisoned lock is used as is.
    pub fn lock(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Object keys seen by one watch, so that a re-list can tell what was deleted
/// while the watch was down.
#[derive(Debug, Default)]
struct Keys {
    known: HashSet<String>,
    relisting: Option<HashSet<String>>,
    synced: bool,
}

impl Keys {
    /// Records a listed or applied key.
    fn seen(&mut self, key: String) {
        if let Some(relisting) = self.relisting.as_mut() {
            relisting.insert(key.clone());
        }
        self.known.insert(key);
    }

    fn deleted(&mut self, key: &str) {
        self.known.remove(key);
    }

    fn init(&mut self) {
        self.relisting = Some(HashSet::new());
    }

    /// Ends a (re-)list: returns the keys that vanished.
    fn init_done(&mut self) -> Vec<String> {
        self.synced = true;
        let Some(listed) = self.relisting.take() else {
            return Vec::new();
        };
        let gone: Vec<String> = self.known.difference(&listed).cloned().collect();
        self.known = listed;
        gone
    }
}

/// A shard the resolver wants to exist.
#[derive(Debug, Clone)]
struct Desired {
    hash: String,
}

/// What the cluster holds of a ProxyPlan.
#[derive(Debug, Clone)]
struct Observed {
    node: String,
    hash: Option<String>,
    layout: ShardLayout,
}

/// The resolver loop's state.
pub struct Reconciler {
    index: Index,
    services: Keys,
    slices: Keys,
    nodes_keys: Keys,
    policies_keys: Keys,
    plans_keys: Keys,
    node_uids: HashMap<String, String>,
    /// Nodes listed before the first resolution, fed to the index in batches.
    held_nodes: BTreeMap<String, Node>,
    policies: BTreeMap<String, ProxyPolicy>,
    reports: BTreeMap<String, PolicyReport>,
    touched_policies: BTreeSet<String>,
    desired: HashMap<String, Desired>,
    observed: HashMap<String, Observed>,
    repair: BTreeSet<String>,
    first_flush_done: bool,
    leading: bool,
    pending_since: Option<Instant>,
    dedupe: EventDedupe,
    shared: Arc<Shared>,
    metrics: Metrics,
}

/// Nodes per index flush in the first resolution.
const INITIAL_NODE_BATCH: usize = 32;

/// Most events queued by one flush; the rest are dropped (and counted).
const MAX_EVENTS_PER_FLUSH: usize = 20;

fn namespaced_key(namespace: Option<&str>, name: &str) -> String {
    format!("{}/{name}", namespace.unwrap_or_default())
}

impl Reconciler {
    /// A reconciler over `index`, queueing into `shared`.
    pub fn new(index: Index, shared: Arc<Shared>, metrics: Metrics) -> Self {
        Self {
            index,
            services: Keys::default(),
            slices: Keys::default(),
            nodes_keys: Keys::default(),
            policies_keys: Keys::default(),
            plans_keys: Keys::default(),
            node_uids: HashMap::new(),
            held_nodes: BTreeMap::new(),
            policies: BTreeMap::new(),
            reports: BTreeMap::new(),
            touched_policies: BTreeSet::new(),
            desired: HashMap::new(),
            observed: HashMap::new(),
            repair: BTreeSet::new(),
            first_flush_done: false,
            leading: false,
            pending_since: None,
            dedupe: EventDedupe::new(std::time::Duration::from_secs(600)),
            shared,
            metrics,
        }
    }

    /// Whether every watch has delivered its initial list. No flush happens
    /// before: a partial view would delete the plans of unlisted services.
    pub fn synced(&self) -> bool {
        [
            &self.services,
            &self.slices,
            &self.nodes_keys,
            &self.policies_keys,
            &self.plans_keys,
        ]
        .iter()
        .all(|k| k.synced)
    }

    /// Whether the first flush ran.
    pub fn first_flush_done(&self) -> bool {
        self.first_flush_done
    }

    /// Applies one watch event. Returns true when a flush is needed.
    pub fn handle(&mut self, input: Input) -> bool {
        let received = input.received;
        let needs_flush = match input.event {
            WatchEvent::Service(event) => self.service_event(event),
            WatchEvent::EndpointSlice(event) => self.slice_event(event),
            WatchEvent::Node(event) => self.node_event(event),
            WatchEvent::Policy(event) => self.policy_event(event),
            WatchEvent::Plan(event) => {
                self.plan_event(event);
                !self.repair.is_empty()
            }
        };
        if needs_flush {
            self.pending_since.get_or_insert(received);
        }
        needs_flush
    }

    fn service_event(&mut self, event: Event<k8s_openapi::api::core::v1::Service>) -> bool {
        match event {
            Event::Apply(svc) | Event::InitApply(svc) => {
                self.services.seen(namespaced_key(
                    svc.metadata.namespace.as_deref(),
                    &svc.name_any(),
                ));
                self.index.apply_service(svc);
            }
            Event::Delete(svc) => {
                let ns = svc.metadata.namespace.clone().unwrap_or_default();
                let name = svc.name_any();
                self.services.deleted(&namespaced_key(Some(&ns), &name));
                self.index.delete_service(&ns, &name);
            }
            Event::Init => self.services.init(),
            Event::InitDone => {
                for key in self.services.init_done() {
                    if let Some((ns, name)) = key.split_once('/') {
                        self.index.delete_service(ns, name);
                    }
                }
            }
        }
        true
    }

    fn slice_event(
        &mut self,
        event: Event<k8s_openapi::api::discovery::v1::EndpointSlice>,
    ) -> bool {
        match event {
            Event::Apply(slice) | Event::InitApply(slice) => {
                self.slices.seen(namespaced_key(
                    slice.metadata.namespace.as_deref(),
                    &slice.name_any(),
                ));
                self.index.apply_endpoint_slice(slice);
            }
            Event::Delete(slice) => {
                let ns = slice.metadata.namespace.clone().unwrap_or_default();
                let name = slice.name_any();
                self.slices.deleted(&namespaced_key(Some(&ns), &name));
                self.index.delete_endpoint_slice(&ns, &name);
            }
            Event::Init => self.slices.init(),
            Event::InitDone => {
                for key in self.slices.init_done() {
                    if let Some((ns, name)) = key.split_once('/') {
                        self.index.delete_endpoint_slice(ns, name);
                    }
                }
            }
        }
        true
    }

    fn node_event(&mut self, event: Event<Node>) -> bool {
        match event {
            Event::Apply(node) | Event::InitApply(node) => {
                let name = node.name_any();
                self.nodes_keys.seen(name.clone());
                if let Some(uid) = node.metadata.uid.clone() {
                    self.node_uids.insert(name.clone(), uid);
                }
                if self.first_flush_done {
                    self.index.apply_node(node);
                } else {
                    self.held_nodes.insert(name, node);
                }
            }
            Event::Delete(node) => {
                let name = node.name_any();
                self.nodes_keys.deleted(&name);
                self.node_uids.remove(&name);
                self.held_nodes.remove(&name);
                self.index.delete_node(&name);
            }
            Event::Init => self.nodes_keys.init(),
            Event::InitDone => {
                for name in self.nodes_keys.init_done() {
                    self.node_uids.remove(&name);
                    self.held_nodes.remove(&name);
                    self.index.delete_node(&name);
                }
            }
        }
        true
    }

    fn policy_event(&mut self, event: Event<ProxyPolicy>) -> bool {
        match event {
            Event::Apply(policy) | Event::InitApply(policy) => {
                let name = policy.name_any();
                self.policies_keys.seen(name.clone());
                self.touched_policies.insert(name.clone());
                // A policy change makes the index recompute every node, and our
                // own status writes come back as events: feed it only what it reads.
                let resolved_alike = self.policies.get(&name).is_some_and(|old| {
                    old.spec == policy.spec
                        && old.metadata.generation == policy.metadata.generation
                        && old.status.as_ref().map(|s| &s.accepted_spec)
                            == policy.status.as_ref().map(|s| &s.accepted_spec)
                });
                self.policies.insert(name, policy.clone());
                if resolved_alike {
                    return true;
                }
                self.index.apply_policy(policy);
            }
            Event::Delete(policy) => {
                let name = policy.name_any();
                self.remove_policy(&name);
            }
            Event::Init => self.policies_keys.init(),
            Event::InitDone => {
                for name in self.policies_keys.init_done() {
                    self.remove_policy(&name);
                }
            }
        }
        true
    }

    fn remove_policy(&mut self, name: &str) {
        self.policies_keys.deleted(name);
        self.policies.remove(name);
        self.reports.remove(name);
        self.index.delete_policy(name);
        self.shared
            .lock()
            .queue
            .remove(&WriteKey::PolicyStatus(name.to_owned()));
    }

    fn plan_event(&mut self, event: Event<ProxyPlan>) {
        match event {
            Event::Apply(plan) | Event::InitApply(plan) => {
                let name = plan.name_any();
                self.plans_keys.seen(name.clone());
                let hash = plan.annotations().get(SPEC_HASH_ANNOTATION).cloned();
                let node = plan
                    .labels()
                    .get(NODE_LABEL)
                    .cloned()
                    .unwrap_or_else(|| plan.spec.node_name.clone());
                let layout = ShardLayout {
                    count: plan.spec.shard.count,
                    generation: plan.spec.shard.generation,
                };
                self.observed.insert(
                    name.clone(),
                    Observed {
                        node,
                        hash: hash.clone(),
                        layout,
                    },
                );
                self.plan_observed(&name, hash.as_deref());
            }
            Event::Delete(plan) => {
                let name = plan.name_any();
                self.plans_keys.deleted(&name);
                self.observed.remove(&name);
                self.plan_observed(&name, None);
            }
            Event::Init => self.plans_keys.init(),
            Event::InitDone => {
                for name in self.plans_keys.init_done() {
                    self.observed.remove(&name);
                    self.plan_observed(&name, None);
                }
                // The list is the cluster's state after every write we made before
                // it, so what we remember having written is no longer needed.
                self.shared.lock().written.clear();
                if self.first_flush_done && self.leading {
                    self.reconcile_all(Instant::now());
                }
            }
        }
    }

    /// A plan now has `hash` in the cluster (None: it does not exist).
    fn plan_observed(&mut self, name: &str, hash: Option<&str>) {
        let key = WriteKey::Plan(name.to_owned());
        let mut pending = self.shared.lock();
        // Somebody (us, or the leader while we stand by) already wrote what waits.
        let landed = match pending.queue.get(&key).map(|q| &q.value) {
            Some(Write::ApplyPlan { hash: queued, .. }) => Some(queued.as_str()) == hash,
            Some(Write::DeletePlan) => hash.is_none(),
            _ => false,
        };
        if landed {
            pending.queue.remove(&key);
        }
        // Events that predate our own last write are stale.
        match pending.written.get(name) {
            Some(Written::Applied(h)) if Some(h.as_str()) == hash => {
                pending.written.remove(name);
                return;
            }
            Some(Written::Deleted) if hash.is_none() => {
                pending.written.remove(name);
                return;
            }
            Some(_) => return,
            None => {}
        }
        let queued = pending.queue.get(&key).is_some();
        self.metrics.queue_depth.set(pending.queue.len() as i64);
        drop(pending);
        // Only the leader repairs drift: a standby may see the leader's writes
        // before it resolved the same change itself.
        if !self.leading || !self.first_flush_done || queued {
            return;
        }
        match self.desired.get(name) {
            Some(desired) if Some(desired.hash.as_str()) != hash => {
                tracing::info!(
                    plan = name,
                    "ProxyPlan differs from its resolution; rewriting it"
                );
                self.repair.insert(name.to_owned());
            }
            Some(_) => {}
            None if hash.is_some() => {
                tracing::info!(plan = name, "ProxyPlan belongs to no plan; deleting it");
                self.queue(key, Write::DeletePlan, Instant::now());
            }
            None => {}
        }
    }

    /// Leadership changed. A new leader compares everything once.
    pub fn set_leading(&mut self, leading: bool) {
        let became = leading && !self.leading;
        self.leading = leading;
        if became && self.first_flush_done {
            self.reconcile_all(Instant::now());
        }
    }

    fn queue(&self, key: WriteKey, write: Write, since: Instant) {
        let mut pending = self.shared.lock();
        pending.queue.push(key, write, since, Instant::now());
        self.metrics.queue_depth.set(pending.queue.len() as i64);
        drop(pending);
        self.shared.notify.notify_one();
    }

    fn unqueue(&self, key: &WriteKey) {
        let mut pending = self.shared.lock();
        pending.queue.remove(key);
        self.metrics.queue_depth.set(pending.queue.len() as i64);
    }

    fn plan_object(&self, shard: PlanShard) -> ProxyPlan {
        let node = shard.spec.node_name.clone();
        let index = shard.spec.shard.index;
        let mut plan = ProxyPlan::new(&shard.name, shard.spec);
        plan.labels_mut()
            .insert(NODE_LABEL.to_owned(), node.clone());
        plan.labels_mut()
            .insert(SHARD_LABEL.to_owned(), index.to_string());
        plan.annotations_mut()
            .insert(SPEC_HASH_ANNOTATION.to_owned(), shard.hash);
        if let Some(uid) = self.node_uids.get(&node) {
            // Owned by the Node, so the garbage collector removes the plan with it
            // even when no controller runs.
            plan.metadata.owner_references = Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node,
                uid: uid.clone(),
                ..OwnerReference::default()
            }]);
        }
        plan
    }

    /// Queues `shard` unless the cluster already holds its content.
    fn want(&mut self, shard: PlanShard, since: Instant) {
        let key = WriteKey::Plan(shard.name.clone());
        self.desired.insert(
            shard.name.clone(),
            Desired {
                hash: shard.hash.clone(),
            },
        );
        let held = self
            .observed
            .get(&shard.name)
            .is_some_and(|o| o.hash.as_deref() == Some(shard.hash.as_str()));
        if held {
            self.unqueue(&key);
        } else {
            let hash = shard.hash.clone();
            let plan = Box::new(self.plan_object(shard));
            self.queue(key, Write::ApplyPlan { plan, hash }, since);
        }
    }

    /// Resolves what changed since the last flush and queues the writes.
    pub fn flush(&mut self, now: Instant) {
        let since = self.pending_since.take().unwrap_or(now);
        if !self.first_flush_done {
            self.initial_flush(since, now);
            return;
        }
        let changes = self.timed_flush();
        self.process(changes, since, now);
        if !self.repair.is_empty() {
            self.run_repair(since);
        }
    }

    /// The first resolution, fed node by node in batches: one flush over every
    /// node returns every shard's full content at once, which on a large cluster
    /// is gigabytes held only to find that nearly all of it is already written.
    fn initial_flush(&mut self, since: Instant, now: Instant) {
        let mut layouts = self.observed_layouts();
        let changes = self.timed_flush();
        self.process(changes, since, now);
        let nodes: Vec<Node> = std::mem::take(&mut self.held_nodes).into_values().collect();
        let mut nodes = nodes.into_iter().peekable();
        while nodes.peek().is_some() {
            for node in nodes.by_ref().take(INITIAL_NODE_BATCH) {
                let name = node.name_any();
                // Seeded right before its node, so the node keeps its shard layout
                // (no needless re-sharding after a restart).
                if let Some(layout) = layouts.remove(&name) {
                    self.index.set_layout(&name, layout);
                }
                self.index.apply_node(node);
            }
            let changes = self.timed_flush();
            self.process(changes, since, now);
        }
        // Layouts of nodes that are gone: their shards are deleted.
        for (node, layout) in layouts {
            self.index.set_layout(&node, layout);
        }
        let changes = self.timed_flush();
        self.process(changes, since, now);
        self.first_flush_done = true;
        // Plans of nodes or shards that no longer exist.
        self.reconcile_all(now);
    }

    fn timed_flush(&mut self) -> Changes {
        let started = std::time::Instant::now();
        let changes = self.index.flush();
        self.metrics
            .flush_duration
            .observe(started.elapsed().as_secs_f64());
        tracing::debug!(
            upserts = changes.upserts.len(),
            deletes = changes.deletes.len(),
            policies = changes.policies.len(),
            problems = changes.problems.len(),
            "resolved"
        );
        changes
    }

    fn process(&mut self, changes: Changes, since: Instant, now: Instant) {
        for shard in changes.upserts {
            self.repair.remove(&shard.name);
            self.want(shard, since);
        }
        for name in changes.deletes {
            self.desired.remove(&name);
            let key = WriteKey::Plan(name.clone());
            if self.observed.contains_key(&name) {
                self.queue(key, Write::DeletePlan, since);
            } else {
                self.unqueue(&key);
            }
        }
        for (name, report) in changes.policies {
            self.reports.insert(name.clone(), report);
            self.touched_policies.insert(name);
        }
        self.report_policies(since);
        let mut queued_events = 0;
        for problem in &changes.problems {
            tracing::warn!(object = %problem.object, field = %problem.field, message = %problem.message, "skipped invalid input");
            let Some(event) = status::problem_event(problem) else {
                continue;
            };
            if !self.dedupe.admit(&event, now) {
                continue;
            }
            if queued_events >= MAX_EVENTS_PER_FLUSH {
                self.metrics.events_dropped.inc();
                continue;
            }
            queued_events += 1;
            self.queue(WriteKey::Event(event.key()), Write::Event(event), since);
        }
    }

    /// The newest shard layout of each node's existing plans.
    fn observed_layouts(&self) -> HashMap<String, ShardLayout> {
        let mut layouts: HashMap<String, ShardLayout> = HashMap::new();
        for observed in self.observed.values() {
            let entry = layouts
                .entry(observed.node.clone())
                .or_insert(observed.layout);
            if observed.layout.generation > entry.generation {
                *entry = observed.layout;
            }
        }
        layouts
    }

    fn report_policies(&mut self, since: Instant) {
        let now = Time(Timestamp::now());
        for name in std::mem::take(&mut self.touched_policies) {
            let key = WriteKey::PolicyStatus(name.clone());
            let (Some(policy), Some(report)) = (self.policies.get(&name), self.reports.get(&name))
            else {
                continue;
            };
            match status::policy_status(policy, report, now.clone()) {
                Some(status) => self.queue(key, Write::PolicyStatus(Box::new(status)), since),
                None => self.unqueue(&key),
            }
        }
    }

    /// Compares every desired shard with the cluster and queues what differs:
    /// after startup, after a re-list of the plans and when becoming leader.
    pub fn reconcile_all(&mut self, now: Instant) {
        let mut orphans = Vec::new();
        {
            let pending = self.shared.lock();
            for (name, desired) in &self.desired {
                let key = WriteKey::Plan(name.clone());
                let held = self
                    .observed
                    .get(name)
                    .is_some_and(|o| o.hash.as_deref() == Some(desired.hash.as_str()));
                if !held && pending.queue.get(&key).is_none() {
                    self.repair.insert(name.clone());
                }
            }
            for name in self.observed.keys() {
                if !self.desired.contains_key(name) {
                    orphans.push(name.clone());
                }
            }
        }
        for name in orphans {
            tracing::info!(plan = %name, "ProxyPlan belongs to no plan; deleting it");
            self.queue(WriteKey::Plan(name), Write::DeletePlan, now);
        }
        for name in self.observed.keys().cloned().collect::<Vec<_>>() {
            if self.desired.contains_key(&name) {
                let key = WriteKey::Plan(name.clone());
                let held = self.observed.get(&name).and_then(|o| o.hash.clone())
                    == self.desired.get(&name).map(|d| d.hash.clone());
                if held {
                    self.unqueue(&key);
                }
            }
        }
        if !self.repair.is_empty() {
            self.run_repair(now);
        }
    }

    /// Rewrites shards whose cluster copy drifted. Their content is not kept
    /// between flushes, so this asks the index for the whole resolution: costly,
    /// but only after an outside edit or deletion of a plan, or a failover.
    fn run_repair(&mut self, since: Instant) {
        let names = std::mem::take(&mut self.repair);
        tracing::info!(
            shards = names.len(),
            "rewriting ProxyPlans that differ from their resolution"
        );
        let resolution = self.index.resolution();
        for shard in resolution.plans.into_values().flatten() {
            if names.contains(&shard.name) {
                self.want(shard, since);
            }
        }
    }

    /// Shards the resolver wants, for tests and diagnostics.
    pub fn desired_count(&self) -> usize {
        self.desired.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn keys_after(events: &[&str]) -> (Keys, Vec<String>) {
        let mut keys = Keys::default();
        let mut gone = Vec::new();
        for e in events {
            match *e {
                "init" => keys.init(),
                "done" => gone.extend(keys.init_done()),
                name => keys.seen(name.to_owned()),
            }
        }
        (keys, gone)
    }

    #[test]
    fn a_relist_reports_objects_deleted_while_the_watch_was_down() {
        let (keys, mut gone) = keys_after(&["init", "a", "b", "c", "done", "init", "b", "done"]);
        gone.sort();
        assert_eq!(gone, ["a", "c"]);
        assert!(keys.synced);
        assert_eq!(keys.known.len(), 1);
    }

    #[test]
    fn objects_applied_outside_a_list_are_known() {
        let (keys, gone) = keys_after(&["init", "done", "x"]);
        assert!(gone.is_empty());
        assert!(keys.known.contains("x"));
    }

    #[test]
    fn a_key_holds_one_pending_write() {
        let shared = Shared::new(Duration::from_secs(30));
        let t0 = Instant::now();
        let mut pending = shared.lock();
        pending
            .queue
            .push(WriteKey::Plan("n1".into()), Write::DeletePlan, t0, t0);
        pending.queue.push(
            WriteKey::PolicyStatus("n1".into()),
            Write::DeletePlan,
            t0,
            t0,
        );
        pending
            .queue
            .push(WriteKey::Plan("n1".into()), Write::DeletePlan, t0, t0);
        assert_eq!(pending.queue.len(), 2);
    }
}

#[cfg(test)]
mod reconciler_tests {
    use super::*;
    use k8s_openapi::api::core::v1::Service;
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use planproxy_resolve::ResolveOptions;
    use prometheus_client::registry::Registry;
    use serde_json::json;
    use std::time::Duration;

    fn node(name: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "uid": format!("uid-{name}")},
            "status": {"addresses": [{"type": "InternalIP", "address": "172.20.0.1"}]},
        }))
        .expect("a Node")
    }

    fn service(name: &str) -> Service {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": name},
            "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
                     "ports": [{"name": "http", "protocol": "TCP", "port": 80}]},
        }))
        .expect("a Service")
    }

    fn slice(service: &str, ip: &str) -> EndpointSlice {
        serde_json::from_value(json!({
            "metadata": {"namespace": "default", "name": format!("{service}-1"),
                         "labels": {"kubernetes.io/service-name": service}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [ip], "conditions": {"ready": true}}],
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        }))
        .expect("an EndpointSlice")
    }

    fn input(event: WatchEvent) -> Input {
        Input {
            event,
            received: Instant::now(),
        }
    }

    struct Fixture {
        reconciler: Reconciler,
        shared: Arc<Shared>,
    }

    impl Fixture {
        fn new() -> Self {
            let shared = Arc::new(Shared::new(Duration::from_secs(10)));
            let metrics = Metrics::register(&mut Registry::default());
            let reconciler = Reconciler::new(
                Index::new(ResolveOptions::default()),
                shared.clone(),
                metrics,
            );
            Self { reconciler, shared }
        }

        fn feed(&mut self, event: WatchEvent) {
            self.reconciler.handle(input(event));
        }

        /// Lists `nodes` nodes and one service, with `plans` already in the cluster.
        fn initial_sync(&mut self, nodes: &[&str], plans: Vec<ProxyPlan>) {
            self.feed(WatchEvent::Service(Event::Init));
            self.feed(WatchEvent::Service(Event::InitApply(service("web"))));
            self.feed(WatchEvent::Service(Event::InitDone));
            self.feed(WatchEvent::EndpointSlice(Event::Init));
            self.feed(WatchEvent::EndpointSlice(Event::InitApply(slice(
                "web", "10.1.0.1",
            ))));
            self.feed(WatchEvent::EndpointSlice(Event::InitDone));
            self.feed(WatchEvent::Node(Event::Init));
            for n in nodes {
                self.feed(WatchEvent::Node(Event::InitApply(node(n))));
            }
            self.feed(WatchEvent::Node(Event::InitDone));
            self.feed(WatchEvent::Policy(Event::Init));
            self.feed(WatchEvent::Policy(Event::InitDone));
            self.feed(WatchEvent::Plan(Event::Init));
            for plan in plans {
                self.feed(WatchEvent::Plan(Event::InitApply(plan)));
            }
            self.feed(WatchEvent::Plan(Event::InitDone));
            assert!(self.reconciler.synced());
            self.reconciler.flush(Instant::now());
        }

        fn drain(&self) -> Vec<(WriteKey, Write)> {
            let mut pending = self.shared.lock();
            std::iter::from_fn(|| pending.queue.pop(Instant::now()))
                .map(|(k, q)| (k, q.value))
                .collect()
        }

        fn queued_plans(&self) -> Vec<String> {
            let mut names: Vec<String> = self
                .drain()
                .into_iter()
                .filter_map(|(k, _)| match k {
                    WriteKey::Plan(name) => Some(name),
                    _ => None,
                })
                .collect();
            names.sort();
            names
        }
    }

    /// The plans a fresh start would write, as stored objects.
    fn written_plans(nodes: &[&str]) -> Vec<ProxyPlan> {
        let mut fixture = Fixture::new();
        fixture.initial_sync(nodes, Vec::new());
        fixture
            .drain()
            .into_iter()
            .filter_map(|(_, w)| match w {
                Write::ApplyPlan { plan, .. } => Some(*plan),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_fresh_cluster_gets_a_plan_per_node_owned_by_the_node() {
        let plans = written_plans(&["a", "b"]);
        assert_eq!(plans.len(), 2);
        for plan in &plans {
            let node = plan.spec.node_name.clone();
            assert_eq!(plan.labels().get(NODE_LABEL), Some(&node));
            let owner = &plan.metadata.owner_references.as_ref().expect("owned")[0];
            assert_eq!(
                (owner.kind.as_str(), owner.uid.clone()),
                ("Node", format!("uid-{node}"))
            );
            assert_eq!(
                plan.annotations().get(SPEC_HASH_ANNOTATION),
                Some(&planproxy_crds::spec_hash(&plan.spec))
            );
        }
    }

    #[test]
    fn a_restart_with_every_plan_in_place_writes_nothing() {
        let plans = written_plans(&["a", "b", "c"]);
        let mut fixture = Fixture::new();
        fixture.initial_sync(&["a", "b", "c"], plans);
        assert!(fixture.drain().is_empty());
        assert_eq!(fixture.reconciler.desired_count(), 3);
    }

    #[test]
    fn a_restart_rewrites_only_the_plan_that_differs_and_deletes_orphans() {
        let mut plans = written_plans(&["a", "b"]);
        plans[1]
            .annotations_mut()
            .insert(SPEC_HASH_ANNOTATION.into(), "stale".into());
        let mut orphan = plans[0].clone();
        orphan.metadata.name = Some("gone-node".into());
        orphan.spec.node_name = "gone-node".into();
        orphan
            .labels_mut()
            .insert(NODE_LABEL.into(), "gone-node".into());
        plans.push(orphan);
        let stale = plans[1].name_any();

        let mut fixture = Fixture::new();
        fixture.initial_sync(&["a", "b"], plans);
        let mut writes: Vec<(String, bool)> = fixture
            .drain()
            .into_iter()
            .filter_map(|(k, w)| match k {
                WriteKey::Plan(name) => Some((name, matches!(w, Write::DeletePlan))),
                _ => None,
            })
            .collect();
        writes.sort();
        let mut expected = vec![("gone-node".to_owned(), true), (stale, false)];
        expected.sort();
        assert_eq!(writes, expected);
    }

    #[test]
    fn a_standby_forgets_writes_once_it_sees_them_land() {
        let mut fixture = Fixture::new();
        fixture.initial_sync(&["a"], Vec::new());
        let plans = {
            let pending = fixture.shared.lock();
            assert_eq!(pending.queue.len(), 1);
            written_plans(&["a"])
        };
        // The leader's write arrives through the watch.
        fixture.feed(WatchEvent::Plan(Event::Apply(plans[0].clone())));
        assert!(
            fixture.drain().is_empty(),
            "nothing left for a new leader to write"
        );
    }

    #[test]
    fn an_endpoint_change_queues_one_write_per_node() {
        let plans = written_plans(&["a", "b"]);
        let mut fixture = Fixture::new();
        fixture.initial_sync(&["a", "b"], plans);
        fixture.feed(WatchEvent::EndpointSlice(Event::Apply(slice(
            "web", "10.1.0.2",
        ))));
        fixture.reconciler.flush(Instant::now());
        assert_eq!(fixture.queued_plans(), ["a", "b"]);
        // The same content again changes nothing.
        fixture.feed(WatchEvent::EndpointSlice(Event::Apply(slice(
            "web", "10.1.0.2",
        ))));
        fixture.reconciler.flush(Instant::now());
        assert!(fixture.drain().is_empty());
    }

    #[test]
    fn a_relist_that_finds_nothing_new_writes_nothing() {
        let plans = written_plans(&["a", "b"]);
        let mut fixture = Fixture::new();
        fixture.initial_sync(&["a", "b"], plans.clone());
        fixture.reconciler.set_leading(true);
        // 410 Gone: every watch re-lists the same objects.
        fixture.feed(WatchEvent::Service(Event::Init));
        fixture.feed(WatchEvent::Service(Event::InitApply(service("web"))));
        fixture.feed(WatchEvent::Service(Event::InitDone));
        fixture.feed(WatchEvent::Plan(Event::Init));
        for plan in plans {
            fixture.feed(WatchEvent::Plan(Event::InitApply(plan)));
        }
        fixture.feed(WatchEvent::Plan(Event::InitDone));
        fixture.reconciler.flush(Instant::now());
        assert!(fixture.drain().is_empty());
    }

    #[test]
    fn a_node_deleted_while_the_watch_was_down_loses_its_plan() {
        let plans = written_plans(&["a", "b"]);
        let mut fixture = Fixture::new();
        fixture.initial_sync(&["a", "b"], plans);
        fixture.feed(WatchEvent::Node(Event::Init));
        fixture.feed(WatchEvent::Node(Event::InitApply(node("a"))));
        fixture.feed(WatchEvent::Node(Event::InitDone));
        fixture.reconciler.flush(Instant::now());
        let writes = fixture.drain();
        assert_eq!(writes.len(), 1);
        assert_eq!(writes[0].0, WriteKey::Plan("b".into()));
        assert!(matches!(writes[0].1, Write::DeletePlan));
    }

    #[test]
    fn a_deleted_plan_is_rewritten_by_the_leader() {
        let plans = written_plans(&["a"]);
        let mut fixture = Fixture::new();
        fixture.initial_sync(&["a"], plans.clone());
        fixture.reconciler.set_leading(true);
        fixture.feed(WatchEvent::Plan(Event::Delete(plans[0].clone())));
        fixture.reconciler.flush(Instant::now());
        assert_eq!(fixture.queued_plans(), ["a"]);
    }

    #[test]
    fn an_event_older_than_our_own_write_is_not_drift() {
        let plans = written_plans(&["a"]);
        let mut fixture = Fixture::new();
        fixture.initial_sync(&["a"], plans.clone());
        fixture.reconciler.set_leading(true);
        fixture.feed(WatchEvent::EndpointSlice(Event::Apply(slice(
            "web", "10.1.0.9",
        ))));
        fixture.reconciler.flush(Instant::now());
        let Some((_, Write::ApplyPlan { hash, .. })) = fixture.drain().pop() else {
            panic!("a write")
        };
        // The writer wrote it; then an event from before the write arrives
        // (say, the agent's status update of the old content).
        fixture
            .shared
            .lock()
            .written
            .insert("a".into(), Written::Applied(hash));
        fixture.feed(WatchEvent::Plan(Event::Apply(plans[0].clone())));
        fixture.reconciler.flush(Instant::now());
        assert!(fixture.drain().is_empty());
    }
}
