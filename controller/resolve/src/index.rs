//! The incremental resolver: watch events in, changed shards out.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use planproxy_crds::ProxyPolicy;

use crate::{PlanShard, PolicyReport, Problem, Resolution, ResolveOptions, ShardLayout};

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

/// Incremental, pure: the runtime feeds watch events; [`Index::flush`] recomputes
/// only what changed.
#[derive(Debug)]
pub struct Index {
    options: ResolveOptions,
}

impl Index {
    /// An empty index.
    pub fn new(options: ResolveOptions) -> Self {
        Self { options }
    }

    /// Adds or replaces a Service.
    pub fn apply_service(&mut self, svc: Service) {
        let _ = svc;
    }

    /// Removes a Service.
    pub fn delete_service(&mut self, namespace: &str, name: &str) {
        let _ = (namespace, name);
    }

    /// Adds or replaces an EndpointSlice.
    pub fn apply_endpoint_slice(&mut self, s: EndpointSlice) {
        let _ = s;
    }

    /// Removes an EndpointSlice.
    pub fn delete_endpoint_slice(&mut self, namespace: &str, name: &str) {
        let _ = (namespace, name);
    }

    /// Adds or replaces a Node.
    pub fn apply_node(&mut self, n: Node) {
        let _ = n;
    }

    /// Removes a Node (its plan shards are deleted on the next flush).
    pub fn delete_node(&mut self, name: &str) {
        let _ = name;
    }

    /// Adds or replaces a ProxyPolicy.
    pub fn apply_policy(&mut self, p: ProxyPolicy) {
        let _ = p;
    }

    /// Removes a ProxyPolicy.
    pub fn delete_policy(&mut self, name: &str) {
        let _ = name;
    }

    /// Seeds the previous layout of a node's plan (from existing ProxyPlans at
    /// startup).
    pub fn set_layout(&mut self, node: &str, layout: ShardLayout) {
        let _ = (node, layout);
    }

    /// Everything that changed since the last flush: shards to write (new content),
    /// shards to delete, policy reports that changed, new problems.
    pub fn flush(&mut self) -> Changes {
        Changes::default()
    }

    /// The full current result, same as [`crate::resolve`] over the same objects.
    pub fn resolution(&self) -> Resolution {
        let _ = self.options;
        Resolution::default()
    }
}
