//! The node-independent part of a service: computed once per service, shared by
//! every node's selection.
//!
//! For each service port this holds its frontends (cluster IPs, external IPs,
//! load-balancer IPs, source ranges, already filtered to the service's families)
//! and, per family, every candidate endpoint: joined through the EndpointSlice
//! port of the same name and protocol, de-duplicated across slices (a
//! non-terminating copy wins) and sorted by the string `IP:port`, as kube-proxy
//! orders them. What a node then uses is a filter over these candidates
//! ([`crate::select`]).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use planproxy_crds::v1alpha1::Protocol;

use crate::ingest::{Family, ObjectKey, ServiceModel, SliceModel};
use crate::shard::service_hash;

/// A proxied service, resolved as far as possible without knowing the node.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedService {
    /// Namespace and name.
    pub key: ObjectKey,
    /// The stable hash placing the service in a shard.
    pub hash: u64,
    /// The service's labels (policies select by them).
    pub labels: BTreeMap<String, String>,
    /// The ports, sorted by name and protocol.
    pub ports: Vec<ResolvedPort>,
    /// ClientIP affinity timeout the service asks for (before any policy cap).
    pub affinity_timeout_seconds: Option<u32>,
    /// kube-proxy's `ExternalPolicyLocal`.
    pub external_policy_local: bool,
    /// internalTrafficPolicy Local.
    pub internal_policy_local: bool,
    /// The health-check node port.
    pub health_check_node_port: Option<u16>,
    /// The newest last-change-trigger-time of the service's slices.
    pub last_change_trigger_time: Option<Time>,
}

/// One port of a resolved service.
#[derive(Clone, Debug, PartialEq)]
pub struct ResolvedPort {
    /// The port name.
    pub name: String,
    /// The protocol.
    pub protocol: Protocol,
    /// The service port.
    pub port: u16,
    /// The node port.
    pub node_port: Option<u16>,
    /// Cluster IPs, in the service's family order.
    pub cluster_ips: Vec<String>,
    /// External IPs.
    pub external_ips: Vec<String>,
    /// Load-balancer VIPs.
    pub load_balancer_ips: Vec<String>,
    /// Load-balancer source ranges.
    pub load_balancer_source_ranges: Vec<String>,
    /// Whether some traffic uses the cluster-wide endpoint set
    /// (kube-proxy's `UsesClusterEndpoints`).
    pub uses_cluster_endpoints: bool,
    /// Whether some traffic uses the node-local endpoint set
    /// (kube-proxy's `UsesLocalEndpoints`).
    pub uses_local_endpoints: bool,
    /// Whether any usable endpoint (ready, or serving and terminating) exists.
    pub has_endpoints: bool,
    /// Candidate endpoints per family, in the service's family order.
    pub families: Vec<Candidates>,
}

/// The candidate endpoints of one port in one family.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidates {
    /// The family.
    pub family: Family,
    /// Every endpoint, de-duplicated and sorted by `IP:port`.
    pub endpoints: Vec<Candidate>,
    /// Every ready endpoint carries at least one zone hint.
    pub all_ready_zone_hinted: bool,
    /// Every ready endpoint carries at least one node hint.
    pub all_ready_node_hinted: bool,
}

/// One candidate endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// The IP, canonical.
    pub ip: String,
    /// The port (the slice's port number for this service port).
    pub port: u16,
    /// The node it runs on.
    pub node_name: Option<String>,
    /// Ready condition.
    pub ready: bool,
    /// Serving condition.
    pub serving: bool,
    /// Terminating condition.
    pub terminating: bool,
    /// Zone hints.
    pub zone_hints: Vec<String>,
    /// Node hints.
    pub node_hints: Vec<String>,
}

impl Candidate {
    /// Ready, or serving and terminating: something traffic may be sent to.
    pub fn usable(&self) -> bool {
        self.ready || (self.serving && self.terminating)
    }

    /// Serving and terminating: used only when nothing is ready.
    pub fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }
}

/// Resolves a proxied service over its EndpointSlices (given in name order).
pub fn resolve_service<'a>(
    model: &ServiceModel,
    slices: impl Iterator<Item = &'a SliceModel> + Clone,
) -> ResolvedService {
    let families = model.families();
    let strings = |ips: &[IpAddr]| ips.iter().map(IpAddr::to_string).collect::<Vec<_>>();
    let cluster_ips = strings(&model.cluster_ips);
    let external_ips = strings(&model.external_ips);
    let load_balancer_ips = strings(&model.load_balancer_ips);
    let load_balancer_source_ranges: Vec<String> = model
        .source_ranges
        .iter()
        .map(ToString::to_string)
        .collect();

    let mut ports: Vec<ResolvedPort> = Vec::new();
    for port in &model.ports {
        // The API forbids two ports with the same name and protocol; keep the first.
        if ports
            .iter()
            .any(|p| p.name == port.name && p.protocol == port.protocol)
        {
            continue;
        }
        let candidates: Vec<Candidates> = families
            .iter()
            .map(|family| candidates(*family, &port.name, port.protocol, slices.clone()))
            .collect();
        let externally_accessible =
            port.node_port.is_some() || !load_balancer_ips.is_empty() || !external_ips.is_empty();
        let has_endpoints = candidates
            .iter()
            .any(|c| c.endpoints.iter().any(Candidate::usable));
        ports.push(ResolvedPort {
            name: port.name.clone(),
            protocol: port.protocol,
            port: port.port,
            node_port: port.node_port,
            cluster_ips: cluster_ips.clone(),
            external_ips: external_ips.clone(),
            load_balancer_ips: load_balancer_ips.clone(),
            load_balancer_source_ranges: load_balancer_source_ranges.clone(),
            uses_cluster_endpoints: !model.internal_policy_local || externally_accessible,
            uses_local_endpoints: model.internal_policy_local
                || (model.external_policy_local && externally_accessible),
            has_endpoints,
            families: candidates,
        });
    }
    ports.sort_by(|a, b| a.name.cmp(&b.name).then(a.protocol.cmp(&b.protocol)));

    let last_change_trigger_time = slices
        .filter_map(|s| s.last_change_trigger_time.clone())
        .max();
    ResolvedService {
        key: model.key.clone(),
        hash: service_hash(&model.key),
        labels: model.labels.clone(),
        ports,
        affinity_timeout_seconds: model.affinity_timeout_seconds,
        external_policy_local: model.external_policy_local,
        internal_policy_local: model.internal_policy_local,
        health_check_node_port: model.health_check_node_port,
        last_change_trigger_time,
    }
}

fn candidates<'a>(
    family: Family,
    port_name: &str,
    protocol: Protocol,
    slices: impl Iterator<Item = &'a SliceModel>,
) -> Candidates {
    // Keyed by the string `IP:port`: that is both kube-proxy's identity of an
    // endpoint and its sort order.
    let mut by_address: BTreeMap<String, Candidate> = BTreeMap::new();
    for slice in slices.filter(|s| s.family == Some(family)) {
        let Some(slice_port) = slice
            .ports
            .iter()
            .find(|p| p.name == port_name && p.protocol == protocol)
        else {
            continue;
        };
        for endpoint in &slice.endpoints {
            let address = SocketAddr::new(endpoint.ip, slice_port.port).to_string();
            let candidate = Candidate {
                ip: endpoint.ip.to_string(),
                port: slice_port.port,
                node_name: endpoint.node_name.clone(),
                ready: endpoint.ready,
                serving: endpoint.serving,
                terminating: endpoint.terminating,
                zone_hints: endpoint.zone_hints.clone(),
                node_hints: endpoint.node_hints.clone(),
            };
            // A duplicate replaces the copy seen first only when that copy is
            // terminating and the new one is not.
            let replaces = by_address
                .get(&address)
                .is_none_or(|existing| existing.terminating && !candidate.terminating);
            if replaces {
                by_address.insert(address, candidate);
            }
        }
    }
    let endpoints: Vec<Candidate> = by_address.into_values().collect();
    let ready = || endpoints.iter().filter(|e| e.ready);
    Candidates {
        family,
        all_ready_zone_hinted: ready().all(|e| !e.zone_hints.is_empty()),
        all_ready_node_hinted: ready().all(|e| !e.node_hints.is_empty()),
        endpoints,
    }
}
