//! Pure resolution of cluster state into per-node ProxyPlans.
//!
//! ```text
//!  Service ──┐                      ┌─ per node: select (topology, locality, terminating fallback)
//!  Slices ───┼─► ingest ─► service ─┤                      │
//!  Node ─────┤   (parse)  (node-     └─ policy (per node,   ▼
//!  Policy ───┘            independent)  per service) ──► shard ─► ProxyPlanSpec per shard
//! ```
//!
//! * [`ingest`] parses API objects into internal models; every user-written IP or
//!   CIDR goes through `planproxy_crds::validate`, and what does not parse becomes a
//!   [`Problem`] instead of a crash.
//! * [`service`] computes, once per service, everything that does not depend on the
//!   node: its frontends and every candidate endpoint of every port, de-duplicated
//!   and sorted as kube-proxy sorts them.
//! * [`policy`] decides, field by field, which ProxyPolicy wins for a node/service
//!   pair.
//! * [`select`] is kube-proxy's endpoint categorisation: a cheap per-node filter over
//!   the node-independent part.
//! * [`shard`] splits a node's plan into shards by a stable hash of each service.
//! * [`index`] keeps all of it incrementally: the controller feeds watch events and
//!   [`Index::flush`] recomputes only what changed. [`resolve`] is the same
//!   computation over a whole [`Snapshot`].
//!
//! Nothing here does I/O or reads a clock: the same input always gives the same
//! output.

pub mod index;
pub mod ingest;
pub mod policy;
pub mod select;
pub mod service;
pub mod shard;

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::ProxyPolicy;
use planproxy_crds::validate::FieldError;

pub use index::{Changes, Index};

/// Everything the resolver reads: the cluster's objects and the previous shard
/// layout of every node's plan.
#[derive(Clone, Debug, Default)]
pub struct Snapshot {
    /// Every Service (all namespaces).
    pub services: Vec<Service>,
    /// Every EndpointSlice (all namespaces).
    pub endpoint_slices: Vec<EndpointSlice>,
    /// Every Node. A node gets a plan only if its Node object exists.
    pub nodes: Vec<Node>,
    /// Every ProxyPolicy.
    pub policies: Vec<ProxyPolicy>,
    /// The layout each node's existing ProxyPlans have, by node name. Shard counts
    /// change with hysteresis relative to it, and the generation moves on from it.
    pub layouts: BTreeMap<String, ShardLayout>,
    /// Sizing knobs.
    pub options: ResolveOptions,
}

/// Sizing knobs of the resolver.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResolveOptions {
    /// The JSON size a shard aims for. A node's shard count grows when its plan
    /// averages more than this per shard and shrinks when it averages less than a
    /// quarter of it.
    pub shard_target_bytes: usize,
    /// No shard may be larger than this (etcd refuses requests over 1.5 MiB; this
    /// leaves room for metadata and status).
    pub shard_max_bytes: usize,
}

impl Default for ResolveOptions {
    fn default() -> Self {
        Self {
            shard_target_bytes: 32 * 1024,
            shard_max_bytes: 1024 * 1024,
        }
    }
}

/// How a node's plan is split: the shard count and the layout generation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ShardLayout {
    /// How many shards (a power of two).
    pub count: u32,
    /// Incremented exactly when the count changes, so shards of different layouts
    /// never form a complete set.
    pub generation: i64,
}

/// The result of resolving a snapshot.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Resolution {
    /// Every node's plan shards, in index order, by node name.
    pub plans: BTreeMap<String, Vec<PlanShard>>,
    /// What the controller reports in each ProxyPolicy's status, by policy name.
    pub policies: BTreeMap<String, PolicyReport>,
    /// Invalid input that was skipped, sorted by object, field and message.
    pub problems: Vec<Problem>,
}

/// One ProxyPlan object to write.
#[derive(Clone, Debug, PartialEq)]
pub struct PlanShard {
    /// The object name: `<node>` for a single shard, `<node>-<index>` otherwise;
    /// `<node>-<hash>-<index>` when `<node>-<index>` would be another node's name
    /// (see [`shard::disambiguated_stems`]). Unique across all nodes.
    pub name: String,
    /// Its spec.
    pub spec: ProxyPlanSpec,
    /// `planproxy_crds::spec_hash(&spec)`, for the `planproxy.dev/spec-hash`
    /// annotation.
    pub hash: String,
}

/// What the controller reports about one ProxyPolicy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyReport {
    /// Whether the current spec is valid and in force.
    pub verdict: PolicyVerdict,
    /// How many nodes the policy in force selects.
    pub matched_nodes: u32,
    /// How many proxied services the policy in force selects.
    pub matched_services: u32,
}

/// Whether a policy's current spec is in force.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PolicyVerdict {
    /// Valid and in force.
    Accepted,
    /// Invalid: not applied. Its `status.acceptedSpec`, when present, stays in force.
    Invalid(FieldError),
}

/// Input the resolver skipped, naming the object and field.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Problem {
    /// The object, as `<Kind> <namespace>/<name>` (`Service default/web`) or
    /// `<Kind> <name>` for cluster-scoped objects.
    pub object: String,
    /// The field path inside the object (`spec.clusterIPs[1]`).
    pub field: String,
    /// What is wrong and what the resolver did about it.
    pub message: String,
    /// What kind of problem this is.
    pub kind: ProblemKind,
}

/// The kinds of [`Problem`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ProblemKind {
    /// A value that does not parse (an IP, a CIDR, a protocol); it was skipped.
    InvalidValue,
    /// An object that refers to one that does not exist (an EndpointSlice whose
    /// Service is missing).
    Dangling,
    /// A ProxyPolicy whose spec is invalid (also reported in its verdict).
    InvalidPolicy,
    /// A service too large to fit a single shard under the hard size cap.
    Oversized,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}: {}", self.object, self.field, self.message)
    }
}

/// Resolves a whole snapshot into every node's plan shards.
///
/// Equal to feeding every object of the snapshot to a fresh [`Index`] and reading
/// [`Index::resolution`]; the index is the one implementation of both.
pub fn resolve(snapshot: &Snapshot) -> Resolution {
    let mut index = Index::new(snapshot.options);
    for (node, layout) in &snapshot.layouts {
        index.set_layout(node, *layout);
    }
    for service in &snapshot.services {
        index.apply_service(service.clone());
    }
    for slice in &snapshot.endpoint_slices {
        index.apply_endpoint_slice(slice.clone());
    }
    for node in &snapshot.nodes {
        index.apply_node(node.clone());
    }
    for policy in &snapshot.policies {
        index.apply_policy(policy.clone());
    }
    let changes = index.flush();
    index.first_resolution(changes)
}

#[cfg(test)]
mod tests;
