//! Test builders: API objects in a line each, and lookups into a resolution.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeSpec, NodeStatus, Service,
    ServicePort, ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{
    Endpoint, EndpointConditions, EndpointHints, EndpointPort, EndpointSlice, ForNode, ForZone,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use planproxy_crds::v1alpha1::{EndpointSet, ServicePortPlan};
use planproxy_crds::{ProxyPolicy, ProxyPolicySpec};

use crate::{Resolution, Snapshot, resolve};

pub fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn meta(namespace: Option<&str>, name: &str) -> ObjectMeta {
    ObjectMeta {
        namespace: namespace.map(str::to_owned),
        name: Some(name.to_owned()),
        ..Default::default()
    }
}

/// A ClusterIP service with one TCP port per `(name, port)`.
pub fn mk_service(ns: &str, name: &str, cluster_ip: &str, ports: &[(&str, i32)]) -> Service {
    Service {
        metadata: meta(Some(ns), name),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            cluster_ip: Some(cluster_ip.into()),
            cluster_ips: Some(vec![cluster_ip.into()]),
            selector: Some(labels(&[("app", name)])),
            ports: Some(
                ports
                    .iter()
                    .map(|(port_name, port)| ServicePort {
                        name: (!port_name.is_empty()).then(|| port_name.to_string()),
                        port: *port,
                        protocol: Some("TCP".into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
        status: None,
    }
}

/// The service's spec, for tweaking.
pub fn spec(svc: &mut Service) -> &mut ServiceSpec {
    svc.spec.get_or_insert_with(Default::default)
}

/// Sets load-balancer ingress points `(ip, ipMode)`.
pub fn with_ingress(mut svc: Service, ingress: &[(&str, Option<&str>)]) -> Service {
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(
                ingress
                    .iter()
                    .map(|(ip, mode)| LoadBalancerIngress {
                        ip: Some(ip.to_string()),
                        ip_mode: mode.map(str::to_owned),
                        ..Default::default()
                    })
                    .collect(),
            ),
        }),
        ..Default::default()
    });
    svc
}

/// An IPv4 slice of `service` with TCP ports `(name, port)`.
pub fn mk_slice(
    ns: &str,
    name: &str,
    service: &str,
    ports: &[(&str, i32)],
    endpoints: Vec<Endpoint>,
) -> EndpointSlice {
    let address_type = if endpoints
        .first()
        .is_some_and(|e| e.addresses[0].contains(':'))
    {
        "IPv6"
    } else {
        "IPv4"
    };
    EndpointSlice {
        metadata: ObjectMeta {
            labels: Some(labels(&[("kubernetes.io/service-name", service)])),
            ..meta(Some(ns), name)
        },
        address_type: address_type.into(),
        endpoints,
        ports: Some(
            ports
                .iter()
                .map(|(port_name, port)| EndpointPort {
                    name: Some(port_name.to_string()),
                    port: Some(*port),
                    protocol: Some("TCP".into()),
                    ..Default::default()
                })
                .collect(),
        ),
    }
}

/// A ready endpoint on `node`.
pub fn ep(ip: &str, node: &str) -> Endpoint {
    ep_with(ip, node, true, true, false)
}

/// An endpoint with explicit conditions.
pub fn ep_with(ip: &str, node: &str, ready: bool, serving: bool, terminating: bool) -> Endpoint {
    Endpoint {
        addresses: vec![ip.into()],
        node_name: (!node.is_empty()).then(|| node.to_owned()),
        conditions: Some(EndpointConditions {
            ready: Some(ready),
            serving: Some(serving),
            terminating: Some(terminating),
        }),
        ..Default::default()
    }
}

/// Adds zone hints.
pub fn zone_hinted(mut e: Endpoint, zones: &[&str]) -> Endpoint {
    let hints = e.hints.get_or_insert_with(EndpointHints::default);
    hints.for_zones = Some(
        zones
            .iter()
            .map(|z| ForZone {
                name: z.to_string(),
            })
            .collect(),
    );
    e
}

/// Adds node hints.
pub fn node_hinted(mut e: Endpoint, nodes: &[&str]) -> Endpoint {
    let hints = e.hints.get_or_insert_with(EndpointHints::default);
    hints.for_nodes = Some(
        nodes
            .iter()
            .map(|n| ForNode {
                name: n.to_string(),
            })
            .collect(),
    );
    e
}

/// A node in `zone` with InternalIPs.
pub fn mk_node(name: &str, zone: Option<&str>, internal_ips: &[&str]) -> Node {
    Node {
        metadata: ObjectMeta {
            labels: zone.map(|z| labels(&[("topology.kubernetes.io/zone", z)])),
            ..meta(None, name)
        },
        spec: Some(NodeSpec::default()),
        status: Some(NodeStatus {
            addresses: Some(
                internal_ips
                    .iter()
                    .map(|ip| NodeAddress {
                        type_: "InternalIP".into(),
                        address: ip.to_string(),
                    })
                    .collect(),
            ),
            ..Default::default()
        }),
    }
}

/// A policy.
pub fn mk_policy(name: &str, spec: ProxyPolicySpec) -> ProxyPolicy {
    ProxyPolicy::new(name, spec)
}

/// A selector on labels.
pub fn selector(pairs: &[(&str, &str)]) -> Option<LabelSelector> {
    Some(LabelSelector {
        match_labels: Some(labels(pairs)),
        ..Default::default()
    })
}

pub fn snapshot(
    services: Vec<Service>,
    endpoint_slices: Vec<EndpointSlice>,
    nodes: Vec<Node>,
    policies: Vec<ProxyPolicy>,
) -> Snapshot {
    Snapshot {
        services,
        endpoint_slices,
        nodes,
        policies,
        ..Default::default()
    }
}

/// Resolves services and slices on the standard two nodes (n1 in zone a, n2 in zone b).
pub fn resolve_two_nodes(services: Vec<Service>, slices: Vec<EndpointSlice>) -> Resolution {
    resolve(&snapshot(
        services,
        slices,
        vec![
            mk_node("n1", Some("a"), &["192.168.0.1"]),
            mk_node("n2", Some("b"), &["192.168.0.2"]),
        ],
        Vec::new(),
    ))
}

/// Every service port of a node's plan, across shards.
pub fn ports_on(res: &Resolution, node: &str) -> Vec<ServicePortPlan> {
    res.plans
        .get(node)
        .into_iter()
        .flatten()
        .flat_map(|s| s.spec.service_ports.clone())
        .collect()
}

/// The plan of one service port on a node; panics if absent.
pub fn port_on(
    res: &Resolution,
    node: &str,
    ns: &str,
    name: &str,
    port_name: &str,
) -> ServicePortPlan {
    ports_on(res, node)
        .into_iter()
        .find(|p| p.namespace == ns && p.name == name && p.port_name == port_name)
        .unwrap_or_else(|| panic!("{ns}/{name}:{port_name} is not in {node}'s plan"))
}

/// `IP:port` of each endpoint in a set, in order.
pub fn addrs(set: &Option<EndpointSet>) -> Vec<String> {
    set.as_ref()
        .map(|s| s.endpoints.iter().map(crate::select::address_key).collect())
        .unwrap_or_default()
}
