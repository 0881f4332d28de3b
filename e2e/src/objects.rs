//! Kubernetes objects as the scenarios need them: Nodes, Services and the
//! EndpointSlices the real EndpointSlice controller would write.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use planproxy_crds::labels::{LAST_CHANGE_TRIGGER_TIME_ANNOTATION, SERVICE_NAME_LABEL, ZONE_LABEL};
use serde_json::{Value, json};

use crate::error::{E2eError, Result};

/// The label the EndpointSlice controller puts on the slices it manages.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// Its value for the real EndpointSlice controller.
pub const MANAGED_BY_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// The transport protocol of a service port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Udp,
}

impl Protocol {
    pub fn as_k8s(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        }
    }
}

/// One port of a service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortDef {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target_port: u16,
    /// Set to pin the node port; left empty the harness (or the real API
    /// server) allocates one.
    pub node_port: Option<u16>,
}

/// The kind of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServiceType {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_k8s(self) -> &'static str {
        match self {
            ServiceType::ClusterIp => "ClusterIP",
            ServiceType::NodePort => "NodePort",
            ServiceType::LoadBalancer => "LoadBalancer",
        }
    }
}

/// A Service as a scenario describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceDef {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub selector: BTreeMap<String, String>,
    pub type_: ServiceType,
    pub ports: Vec<PortDef>,
    /// "Local" or "Cluster"; `None` leaves the API default.
    pub external_traffic_policy: Option<String>,
    pub internal_traffic_policy: Option<String>,
    pub session_affinity_timeout: Option<u32>,
    /// `spec.trafficDistribution` (e.g. `PreferClose`); the EndpointSlice
    /// controller then hints every endpoint for its own zone.
    pub traffic_distribution: Option<String>,
    pub external_ips: Vec<String>,
    /// Both families unless restricted.
    pub dual_stack: bool,
}

impl ServiceDef {
    /// A dual-stack ClusterIP service in `namespace` selecting `app=<app>`.
    pub fn cluster_ip(namespace: &str, name: &str, app: &str) -> Self {
        ServiceDef {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            labels: BTreeMap::new(),
            selector: BTreeMap::from([("app".to_owned(), app.to_owned())]),
            type_: ServiceType::ClusterIp,
            ports: Vec::new(),
            external_traffic_policy: None,
            internal_traffic_policy: None,
            session_affinity_timeout: None,
            traffic_distribution: None,
            external_ips: Vec::new(),
            dual_stack: true,
        }
    }

    /// Adds a TCP port.
    pub fn tcp(mut self, name: &str, port: u16, target_port: u16) -> Self {
        self.ports.push(PortDef {
            name: name.to_owned(),
            protocol: Protocol::Tcp,
            port,
            target_port,
            node_port: None,
        });
        self
    }

    /// Adds a UDP port.
    pub fn udp(mut self, name: &str, port: u16, target_port: u16) -> Self {
        self.ports.push(PortDef {
            name: name.to_owned(),
            protocol: Protocol::Udp,
            port,
            target_port,
            node_port: None,
        });
        self
    }

    pub fn node_port(mut self) -> Self {
        self.type_ = ServiceType::NodePort;
        self
    }

    pub fn external_traffic_policy_local(mut self) -> Self {
        self.external_traffic_policy = Some("Local".to_owned());
        self
    }

    /// Asks for topology-aware routing (`trafficDistribution: PreferClose`).
    pub fn prefer_close(mut self) -> Self {
        self.traffic_distribution = Some("PreferClose".to_owned());
        self
    }

    pub fn label(mut self, key: &str, value: &str) -> Self {
        self.labels.insert(key.to_owned(), value.to_owned());
        self
    }

    /// The Service object. `cluster_ips` and `node_ports` (one per port, in
    /// order) are what the harness allocated; a real API server allocates
    /// them itself when they are empty.
    pub fn to_object(&self, cluster_ips: &[IpAddr], node_ports: &[u16]) -> Result<Service> {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let mut port = json!({
                    "name": p.name,
                    "protocol": p.protocol.as_k8s(),
                    "port": p.port,
                    "targetPort": p.target_port,
                });
                if let Some(node_port) = p.node_port.or_else(|| node_ports.get(i).copied()) {
                    port["nodePort"] = json!(node_port);
                }
                port
            })
            .collect();
        let mut spec = json!({
            "type": self.type_.as_k8s(),
            "selector": self.selector,
            "ports": ports,
            "ipFamilyPolicy": if self.dual_stack { "PreferDualStack" } else { "SingleStack" },
        });
        if !cluster_ips.is_empty() {
            let ips: Vec<String> = cluster_ips.iter().map(IpAddr::to_string).collect();
            let families: Vec<&str> = cluster_ips
                .iter()
                .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
                .collect();
            spec["clusterIP"] = json!(ips[0]);
            spec["clusterIPs"] = json!(ips);
            spec["ipFamilies"] = json!(families);
        }
        if let Some(policy) = &self.external_traffic_policy {
            spec["externalTrafficPolicy"] = json!(policy);
        } else if self.type_ != ServiceType::ClusterIp {
            spec["externalTrafficPolicy"] = json!("Cluster");
        }
        spec["internalTrafficPolicy"] =
            json!(self.internal_traffic_policy.as_deref().unwrap_or("Cluster"));
        if let Some(distribution) = &self.traffic_distribution {
            spec["trafficDistribution"] = json!(distribution);
        }
        if let Some(timeout) = self.session_affinity_timeout {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": timeout}});
        }
        if !self.external_ips.is_empty() {
            spec["externalIPs"] = json!(self.external_ips);
        }
        typed(json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {
                "namespace": self.namespace,
                "name": self.name,
                "labels": self.labels,
            },
            "spec": spec,
        }))
    }
}

/// One endpoint of a slice, as the EndpointSlice controller derives it from a
/// pod.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointDef {
    pub ip: IpAddr,
    pub pod_name: String,
    pub node_name: String,
    pub zone: Option<String>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
    /// Topology hints (zones), when the service asks for them.
    pub hint_zones: Vec<String>,
}

/// The EndpointSlice of `service` for one IP family, named `<service>-ipv4` or
/// `<service>-ipv6`, labelled and annotated as the real controller does.
/// `trigger_time` is the RFC 3339 time of the change behind this content.
pub fn endpoint_slice(
    service: &ServiceDef,
    ipv6: bool,
    endpoints: &[EndpointDef],
    trigger_time: &str,
) -> Result<EndpointSlice> {
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    let endpoints: Vec<Value> = endpoints
        .iter()
        .filter(|e| e.ip.is_ipv6() == ipv6)
        .map(|e| {
            let mut endpoint = json!({
                "addresses": [e.ip.to_string()],
                "conditions": {"ready": e.ready, "serving": e.serving, "terminating": e.terminating},
                "nodeName": e.node_name,
                "targetRef": {"kind": "Pod", "namespace": service.namespace, "name": e.pod_name},
            });
            if let Some(zone) = &e.zone {
                endpoint["zone"] = json!(zone);
            }
            if !e.hint_zones.is_empty() {
                let zones: Vec<Value> = e.hint_zones.iter().map(|z| json!({"name": z})).collect();
                endpoint["hints"] = json!({"forZones": zones});
            }
            endpoint
        })
        .collect();
    let ports: Vec<Value> = service
        .ports
        .iter()
        .map(|p| json!({"name": p.name, "protocol": p.protocol.as_k8s(), "port": p.target_port}))
        .collect();
    typed(json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "namespace": service.namespace,
            "name": slice_name(&service.name, ipv6),
            "labels": {
                SERVICE_NAME_LABEL: service.name,
                MANAGED_BY_LABEL: MANAGED_BY_CONTROLLER,
            },
            "annotations": {LAST_CHANGE_TRIGGER_TIME_ANNOTATION: trigger_time},
        },
        "addressType": family,
        "endpoints": endpoints,
        "ports": ports,
    }))
}

/// The Pod object of an app replica, already bound to its node (there is no
/// scheduler): the app's labels, one container declaring its ports.
pub fn app_pod(
    namespace: &str,
    name: &str,
    labels: &BTreeMap<String, String>,
    node: &str,
    tcp_ports: &[u16],
    udp_ports: &[u16],
) -> Value {
    // Named (`t8080`, `u8080`) so that Services can target them by name, as
    // the EndpointSlice controller resolves a named targetPort per pod.
    let ports: Vec<Value> = tcp_ports
        .iter()
        .map(|p| json!({"name": container_port_name(Protocol::Tcp, *p), "containerPort": p, "protocol": "TCP"}))
        .chain(udp_ports.iter().map(|p| {
            json!({"name": container_port_name(Protocol::Udp, *p), "containerPort": p, "protocol": "UDP"})
        }))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"namespace": namespace, "name": name, "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "echo", "image": "planproxy-e2e/echo", "ports": ports}],
        },
    })
}

/// The name an app pod gives its container port: `t<port>` for TCP,
/// `u<port>` for UDP (names are unique per pod and at most 15 characters).
pub fn container_port_name(protocol: Protocol, port: u16) -> String {
    match protocol {
        Protocol::Tcp => format!("t{port}"),
        Protocol::Udp => format!("u{port}"),
    }
}

/// Patches a pod's status as its kubelet would once the containers run:
/// phase Running, the pod's IPs, and Ready (with ContainersReady) as given.
pub fn mark_pod_running(
    plane: &planproxy_control_plane::ControlPlane,
    namespace: &str,
    name: &str,
    pod_ips: &[&str],
    host_ip: &str,
    ready: bool,
) -> Result<()> {
    let now = now_rfc3339();
    let ready = if ready { "True" } else { "False" };
    let condition = |type_: &str, status: &str| json!({"type": type_, "status": status, "lastTransitionTime": now});
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": host_ip,
        "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ips.first(),
        "podIPs": pod_ips.iter().map(|ip| json!({"ip": ip})).collect::<Vec<_>>(),
        "startTime": now,
        "conditions": [
            condition("PodScheduled", "True"),
            condition("Initialized", "True"),
            condition("ContainersReady", ready),
            condition("Ready", ready),
        ],
    }});
    plane
        .patch_status("v1", "Pod", Some(namespace), name, status)
        .map(|_| ())
        .map_err(|e| E2eError::ApiServer(format!("marking pod {namespace}/{name} running: {e}")))
}

/// The name the harness gives a service's slice for one family.
pub fn slice_name(service: &str, ipv6: bool) -> String {
    format!("{service}-{}", if ipv6 { "ipv6" } else { "ipv4" })
}

/// A Node object for a node of the namespace cluster: its pod CIDRs,
/// InternalIPs, hostname and zone labels, and a Ready condition.
pub fn node(
    name: &str,
    pod_cidrs: &[String],
    internal_ips: &[IpAddr],
    zone: Option<&str>,
) -> Result<Node> {
    let mut labels = BTreeMap::from([
        ("kubernetes.io/hostname".to_owned(), name.to_owned()),
        ("kubernetes.io/os".to_owned(), "linux".to_owned()),
    ]);
    if let Some(zone) = zone {
        labels.insert(ZONE_LABEL.to_owned(), zone.to_owned());
    }
    let mut addresses: Vec<Value> = internal_ips
        .iter()
        .map(|ip| json!({"type": "InternalIP", "address": ip.to_string()}))
        .collect();
    addresses.push(json!({"type": "Hostname", "address": name}));
    typed(json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels},
        "spec": {"podCIDR": pod_cidrs.first(), "podCIDRs": pod_cidrs},
        "status": {
            "addresses": addresses,
            "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        },
    }))
}

/// The current time in RFC 3339 with second precision, as the
/// `last-change-trigger-time` annotation carries it.
pub fn now_rfc3339() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map_or_else(
            |_| jiff::Timestamp::now().to_string(),
            |t| t.strftime("%Y-%m-%dT%H:%M:%SZ").to_string(),
        )
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| E2eError::Invalid(format!("building an object: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn web() -> ServiceDef {
        ServiceDef::cluster_ip("default", "web", "web")
            .tcp("http", 80, 8080)
            .udp("dns", 53, 5353)
    }

    fn endpoint(ip: &str, terminating: bool) -> EndpointDef {
        EndpointDef {
            ip: ip.parse().unwrap(),
            pod_name: format!("web-{ip}"),
            node_name: "node1".into(),
            zone: Some("zone-a".into()),
            ready: !terminating,
            serving: true,
            terminating,
            hint_zones: vec!["zone-a".into()],
        }
    }

    #[test]
    fn service_object_carries_allocated_cluster_ips_per_family() {
        let svc = web()
            .to_object(
                &["10.96.0.10".parse().unwrap(), "fd00:96::a".parse().unwrap()],
                &[],
            )
            .unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.cluster_ip.as_deref(), Some("10.96.0.10"));
        assert_eq!(spec.ip_families.unwrap(), vec!["IPv4", "IPv6"]);
        let ports = spec.ports.unwrap();
        assert_eq!(ports[1].protocol.as_deref(), Some("UDP"));
        assert_eq!(ports[0].node_port, None);
    }

    #[test]
    fn node_port_service_gets_allocated_node_ports_in_port_order() {
        let svc = web().node_port().to_object(&[], &[30001, 30002]).unwrap();
        let spec = svc.spec.unwrap();
        assert_eq!(spec.type_.as_deref(), Some("NodePort"));
        assert_eq!(spec.external_traffic_policy.as_deref(), Some("Cluster"));
        let ports = spec.ports.unwrap();
        assert_eq!(
            (ports[0].node_port, ports[1].node_port),
            (Some(30001), Some(30002))
        );
    }

    #[test]
    fn endpoint_slice_holds_one_family_with_the_controllers_labels_and_conditions() {
        let endpoints = [
            endpoint("10.244.1.2", false),
            endpoint("fd00:244:1::2", false),
            endpoint("10.244.2.2", true),
        ];
        let slice = endpoint_slice(&web(), false, &endpoints, "2026-01-01T00:00:00Z").unwrap();
        assert_eq!(slice.metadata.name.as_deref(), Some("web-ipv4"));
        assert_eq!(slice.address_type, "IPv4");
        let labels = slice.metadata.labels.unwrap();
        assert_eq!(
            labels.get(SERVICE_NAME_LABEL).map(String::as_str),
            Some("web")
        );
        let annotations = slice.metadata.annotations.unwrap();
        assert_eq!(
            annotations
                .get(LAST_CHANGE_TRIGGER_TIME_ANNOTATION)
                .map(String::as_str),
            Some("2026-01-01T00:00:00Z")
        );
        assert_eq!(slice.endpoints.len(), 2);
        let terminating = slice.endpoints[1].conditions.clone().unwrap();
        assert_eq!(
            (
                terminating.ready,
                terminating.serving,
                terminating.terminating
            ),
            (Some(false), Some(true), Some(true))
        );
        let ports = slice.ports.unwrap();
        assert_eq!(ports[0].port, Some(8080), "slices carry the target port");
        assert_eq!(
            slice.endpoints[0].hints.clone().unwrap().for_zones.unwrap()[0].name,
            "zone-a"
        );
    }

    #[test]
    fn node_object_has_pod_cidrs_addresses_and_zone() {
        let node = node(
            "node1",
            &["10.244.1.0/24".into(), "fd00:244:1::/64".into()],
            &["172.30.0.11".parse().unwrap()],
            Some("zone-a"),
        )
        .unwrap();
        assert_eq!(node.spec.unwrap().pod_cidrs.unwrap().len(), 2);
        assert_eq!(
            node.metadata
                .labels
                .unwrap()
                .get(ZONE_LABEL)
                .map(String::as_str),
            Some("zone-a")
        );
        let addresses = node.status.unwrap().addresses.unwrap();
        assert_eq!(addresses[0].type_, "InternalIP");
    }

    #[test]
    fn trigger_time_is_rfc3339_in_utc() {
        let now = now_rfc3339();
        assert!(now.ends_with('Z') && now.contains('T'), "{now}");
        assert!(now.parse::<jiff::Timestamp>().is_ok(), "{now}");
    }
}
