//! Per-node endpoint selection: kube-proxy's `CategorizeEndpoints`, as a filter
//! over a service's node-independent candidates.
//!
//! * Cluster set: ready endpoints, narrowed by topology hints when every ready
//!   endpoint carries a hint of the kind and some hint names this node (same node
//!   first, then same zone); if that leaves nothing, every serving-and-terminating
//!   endpoint in the cluster.
//! * Local set: this node's ready endpoints; if it has none, its serving-and-
//!   terminating ones. Topology never narrows it.
//!
//! Both are computed per IP family, as kube-proxy's per-family proxiers do, and
//! then merged in `IP:port` order.

use planproxy_crds::v1alpha1::{
    ClientIpAffinity, EndpointPlan, EndpointSelection, EndpointSet, ServicePortPlan, TrafficPolicy,
};

use crate::policy::ServiceSettings;
use crate::service::{Candidate, Candidates, ResolvedPort, ResolvedService};

/// What selection needs to know about the node.
#[derive(Clone, Copy, Debug)]
pub struct NodeView<'a> {
    /// The node name (endpoints with this `nodeName` are local).
    pub name: &'a str,
    /// The node's zone label.
    pub zone: Option<&'a str>,
}

/// Appends the plans of every port of `service` on `node` to `out`, in port order.
pub fn service_port_plans(
    service: &ResolvedService,
    node: NodeView<'_>,
    settings: &ServiceSettings,
    out: &mut Vec<ServicePortPlan>,
) {
    let session_affinity = service.affinity_timeout_seconds.map(|t| ClientIpAffinity {
        timeout_seconds: t.min(settings.max_affinity_timeout_seconds),
    });
    for port in &service.ports {
        out.push(ServicePortPlan {
            namespace: service.key.namespace.clone(),
            name: service.key.name.clone(),
            port_name: port.name.clone(),
            protocol: port.protocol,
            cluster_ips: port.cluster_ips.clone(),
            port: port.port,
            node_port: port.node_port,
            external_ips: port.external_ips.clone(),
            load_balancer_ips: port.load_balancer_ips.clone(),
            load_balancer_source_ranges: port.load_balancer_source_ranges.clone(),
            session_affinity: session_affinity.clone(),
            external_traffic_policy: policy(service.external_policy_local),
            internal_traffic_policy: policy(service.internal_policy_local),
            health_check_node_port: service.health_check_node_port,
            masquerade_all: settings.masquerade_all,
            no_endpoints_action: settings.no_endpoints_action,
            has_endpoints: port.has_endpoints,
            cluster_endpoints: port
                .uses_cluster_endpoints
                .then(|| cluster_endpoints(port, node, settings.topology_aware_routing)),
            local_endpoints: port
                .uses_local_endpoints
                .then(|| local_endpoints(port, node)),
            last_change_trigger_time: service.last_change_trigger_time.clone(),
        });
    }
}

fn policy(local: bool) -> TrafficPolicy {
    if local {
        TrafficPolicy::Local
    } else {
        TrafficPolicy::Cluster
    }
}

/// The cluster-wide set of one port on one node.
pub fn cluster_endpoints(port: &ResolvedPort, node: NodeView<'_>, topology: bool) -> EndpointSet {
    merge(
        port.families
            .iter()
            .map(|c| cluster_family(c, node, topology)),
        node,
    )
}

/// The node-local set of one port on one node.
pub fn local_endpoints(port: &ResolvedPort, node: NodeView<'_>) -> EndpointSet {
    merge(port.families.iter().map(|c| local_family(c, node)), node)
}

/// Which topology hints apply on this node, if any.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum TopologyMode {
    SameNode,
    SameZone,
}

fn topology_mode(candidates: &Candidates, node: NodeView<'_>) -> Option<TopologyMode> {
    let mut ready = candidates.endpoints.iter().filter(|e| e.ready);
    if candidates.all_ready_node_hinted
        && ready.any(|e| e.node_hints.iter().any(|n| n == node.name))
    {
        return Some(TopologyMode::SameNode);
    }
    let zone = node.zone?;
    let mut ready = candidates.endpoints.iter().filter(|e| e.ready);
    (candidates.all_ready_zone_hinted && ready.any(|e| e.zone_hints.iter().any(|z| z == zone)))
        .then_some(TopologyMode::SameZone)
}

fn cluster_family<'a>(
    candidates: &'a Candidates,
    node: NodeView<'_>,
    topology: bool,
) -> (EndpointSelection, Vec<&'a Candidate>) {
    let mode = if topology {
        topology_mode(candidates, node)
    } else {
        None
    };
    let available = |e: &Candidate| match mode {
        None => true,
        Some(TopologyMode::SameNode) => e.node_hints.iter().any(|n| n == node.name),
        Some(TopologyMode::SameZone) => node
            .zone
            .is_some_and(|z| e.zone_hints.iter().any(|h| h == z)),
    };
    let ready: Vec<&Candidate> = candidates
        .endpoints
        .iter()
        .filter(|e| e.ready && available(e))
        .collect();
    if !ready.is_empty() {
        let selection = match mode {
            None => EndpointSelection::Ready,
            Some(TopologyMode::SameNode) => EndpointSelection::TopologyNode,
            Some(TopologyMode::SameZone) => EndpointSelection::TopologyZone,
        };
        return (selection, ready);
    }
    terminating_fallback(
        candidates
            .endpoints
            .iter()
            .filter(|e| e.serving_terminating()),
    )
}

fn local_family<'a>(
    candidates: &'a Candidates,
    node: NodeView<'_>,
) -> (EndpointSelection, Vec<&'a Candidate>) {
    let local = || {
        candidates
            .endpoints
            .iter()
            .filter(|e| e.node_name.as_deref() == Some(node.name))
    };
    let ready: Vec<&Candidate> = local().filter(|e| e.ready).collect();
    if !ready.is_empty() {
        return (EndpointSelection::Ready, ready);
    }
    terminating_fallback(local().filter(|e| e.serving_terminating()))
}

fn terminating_fallback<'a>(
    endpoints: impl Iterator<Item = &'a Candidate>,
) -> (EndpointSelection, Vec<&'a Candidate>) {
    let endpoints: Vec<&Candidate> = endpoints.collect();
    if endpoints.is_empty() {
        (EndpointSelection::None, endpoints)
    } else {
        (EndpointSelection::TerminatingFallback, endpoints)
    }
}

/// Merges the per-family sets. The reason is that of the first family (in the
/// service's family order) that selected anything.
fn merge<'a>(
    families: impl Iterator<Item = (EndpointSelection, Vec<&'a Candidate>)>,
    node: NodeView<'_>,
) -> EndpointSet {
    let mut selection = EndpointSelection::None;
    let mut endpoints: Vec<EndpointPlan> = Vec::new();
    let mut sorted = true;
    for (reason, chosen) in families {
        if chosen.is_empty() {
            continue;
        }
        if selection == EndpointSelection::None {
            selection = reason;
        }
        // A second family's endpoints sort after the first's only when the first
        // is IPv4 (`[` follows every digit); otherwise sort once at the end.
        sorted &= endpoints.is_empty();
        endpoints.extend(chosen.into_iter().map(|e| EndpointPlan {
            ip: e.ip.clone(),
            port: e.port,
            local: e.node_name.as_deref() == Some(node.name),
            node_unknown: e.node_name.is_none(),
            ready: e.ready,
            serving: e.serving,
            terminating: e.terminating,
        }));
    }
    if !sorted {
        endpoints.sort_by_cached_key(address_key);
    }
    EndpointSet {
        selection,
        endpoints,
    }
}

/// The string `IP:port` (`[IP]:port` for IPv6) that kube-proxy sorts by.
pub fn address_key(e: &EndpointPlan) -> String {
    if e.ip.contains(':') {
        format!("[{}]:{}", e.ip, e.port)
    } else {
        format!("{}:{}", e.ip, e.port)
    }
}
