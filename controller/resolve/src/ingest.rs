//! Parsing API objects into the resolver's own models.
//!
//! Every user-written address goes through `planproxy_crds::validate` (IPv4 with
//! leading zeros gets kube-proxy's sloppy, decimal reading); a value that does not
//! parse is skipped and reported as a [`Problem`], never trusted and never a panic. What comes out of here is known-good: later stages do not re-check it.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};

use ipnet::{IpNet, Ipv4Net};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use planproxy_crds::labels;
use planproxy_crds::v1alpha1::Protocol;
use planproxy_crds::validate;

use crate::{Problem, ProblemKind};

/// The affinity timeout the API server fills in when a ClientIP service leaves it
/// unset.
pub const DEFAULT_AFFINITY_TIMEOUT_SECONDS: u32 = 10800;

/// The cluster autoscaler's taint on nodes it is about to delete.
pub const TO_BE_DELETED_TAINT: &str = "ToBeDeletedByClusterAutoscaler";

/// The namespace of objects that do not name one (as `kubectl apply` assumes).
pub const DEFAULT_NAMESPACE: &str = "default";

/// A namespaced object's identity.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// The namespace.
    pub namespace: String,
    /// The name.
    pub name: String,
}

impl ObjectKey {
    /// A key from its parts.
    pub fn new(namespace: &str, name: &str) -> Self {
        Self {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An IP family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Family {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl Family {
    /// The family of an address.
    pub fn of(ip: &IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => Family::V4,
            IpAddr::V6(_) => Family::V6,
        }
    }

    /// The family of a network.
    pub fn of_net(net: &IpNet) -> Self {
        match net {
            IpNet::V4(_) => Family::V4,
            IpNet::V6(_) => Family::V6,
        }
    }
}

/// Why a Service is not proxied at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SkipReason {
    /// `clusterIP: None`.
    Headless,
    /// No cluster IP allocated (only seen in manifests that were never applied).
    NoClusterIp,
    /// `type: ExternalName`.
    ExternalName,
    /// Labelled for another service proxy.
    OtherProxy,
    /// Labelled `service.kubernetes.io/headless`.
    HeadlessLabel,
    /// None of its cluster IPs parse.
    NoValidClusterIp,
}

/// A Service as the resolver needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct ServiceModel {
    /// Namespace and name.
    pub key: ObjectKey,
    /// Its labels (policies select services by them).
    pub labels: BTreeMap<String, String>,
    /// Set when the service is not proxied; the other fields are then empty.
    pub skip: Option<SkipReason>,
    /// The cluster IPs, one per family, in `spec.clusterIPs` order.
    pub cluster_ips: Vec<IpAddr>,
    /// The ports that parsed.
    pub ports: Vec<ServicePortModel>,
    /// External IPs of the service's families.
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs (VIP mode only) of the service's families.
    pub load_balancer_ips: Vec<IpAddr>,
    /// Source ranges of the service's families, canonical.
    pub source_ranges: Vec<IpNet>,
    /// kube-proxy's `ExternalPolicyLocal`: externally accessible and eTP Local.
    pub external_policy_local: bool,
    /// internalTrafficPolicy Local.
    pub internal_policy_local: bool,
    /// The health-check node port (LoadBalancer with eTP Local only).
    pub health_check_node_port: Option<u16>,
    /// The ClientIP affinity timeout the service asks for, when it asks for one.
    pub affinity_timeout_seconds: Option<u32>,
}

impl ServiceModel {
    /// The IP families the service has a cluster IP of.
    pub fn families(&self) -> Vec<Family> {
        let mut families: Vec<Family> = self.cluster_ips.iter().map(Family::of).collect();
        families.dedup();
        families
    }
}

/// One port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortModel {
    /// The port name (empty for a single unnamed port).
    pub name: String,
    /// The protocol.
    pub protocol: Protocol,
    /// The service port.
    pub port: u16,
    /// The node port, if allocated.
    pub node_port: Option<u16>,
}

/// An EndpointSlice as the resolver needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct SliceModel {
    /// Namespace and name of the slice.
    pub key: ObjectKey,
    /// The Service it belongs to (its `kubernetes.io/service-name` label).
    pub service: Option<ObjectKey>,
    /// The address family; `None` for FQDN slices, which are ignored.
    pub family: Option<Family>,
    /// The ports that are usable (named, with a number).
    pub ports: Vec<SlicePortModel>,
    /// The endpoints whose address parsed.
    pub endpoints: Vec<EndpointModel>,
    /// The `endpoints.kubernetes.io/last-change-trigger-time` annotation.
    pub last_change_trigger_time: Option<Time>,
}

/// One port of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortModel {
    /// The name joining it to a service port.
    pub name: String,
    /// The protocol joining it to a service port.
    pub protocol: Protocol,
    /// The port the endpoints listen on (the DNAT port).
    pub port: u16,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointModel {
    /// Its first address (the only one kube-proxy uses).
    pub ip: IpAddr,
    /// The node it runs on.
    pub node_name: Option<String>,
    /// `ready`: unset means true.
    pub ready: bool,
    /// `serving`: unset means true.
    pub serving: bool,
    /// `terminating`: unset means false.
    pub terminating: bool,
    /// Zones this endpoint is hinted for.
    pub zone_hints: Vec<String>,
    /// Nodes this endpoint is hinted for.
    pub node_hints: Vec<String>,
}

/// A Node as the resolver needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeModel {
    /// The node name.
    pub name: String,
    /// Its labels (policies select nodes by them).
    pub labels: BTreeMap<String, String>,
    /// The `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// Its InternalIP addresses, in listed order.
    pub internal_ips: Vec<IpAddr>,
    /// Its ExternalIP addresses, in listed order.
    pub external_ips: Vec<IpAddr>,
    /// Its `spec.podCIDRs` (or `spec.podCIDR`).
    pub pod_cidrs: Vec<IpNet>,
    /// Being deleted, or tainted for deletion by the cluster autoscaler.
    pub terminating: bool,
}

/// Collects problems for one object.
struct Reporter {
    object: String,
    problems: Vec<Problem>,
}

impl Reporter {
    fn new(object: String) -> Self {
        Self {
            object,
            problems: Vec::new(),
        }
    }

    fn report(&mut self, kind: ProblemKind, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            object: self.object.clone(),
            field: field.into(),
            message: message.into(),
            kind,
        });
    }

    fn invalid(&mut self, error: validate::FieldError, consequence: &str) {
        self.report(
            ProblemKind::InvalidValue,
            error.field,
            format!("{}; {consequence}", error.message),
        );
    }
}

fn namespace_of(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|n| !n.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

/// Parses an address as kube-proxy does (`ParseIPSloppy`): an IPv4 address may
/// also carry leading zeros, read as decimal (`10.180.00.001` is `10.180.0.1`).
/// The API server accepted such addresses before it validated IPs strictly, and
/// objects written then still hold them; kube-proxy serves them, so skipping them
/// would drop endpoints and frontends that work today. The result is canonical
/// either way.
fn parse_ip(raw: &str, field: &str) -> Result<IpAddr, validate::FieldError> {
    validate::ip(raw, field).or_else(|e| sloppy_ipv4(raw).map(IpAddr::V4).ok_or(e))
}

/// Parses a CIDR as kube-proxy does (`ParseCIDRSloppy`, after trimming spaces):
/// leading zeros in an IPv4 address are read as decimal.
fn parse_cidr(raw: &str, field: &str) -> Result<IpNet, validate::FieldError> {
    validate::cidr(raw, field).or_else(|e| {
        raw.trim()
            .split_once('/')
            .and_then(|(ip, bits)| Some((sloppy_ipv4(ip)?, bits.parse::<u8>().ok()?)))
            .and_then(|(ip, bits)| Ipv4Net::new(ip, bits).ok())
            .map(|net| IpNet::V4(net.trunc()))
            .ok_or(e)
    })
}

/// Four dot-separated decimal octets, each of at most three significant digits
/// and at most 255, leading zeros allowed.
fn sloppy_ipv4(raw: &str) -> Option<Ipv4Addr> {
    let mut octets = [0u8; 4];
    let mut parts = raw.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let significant = part.trim_start_matches('0');
        *octet = if significant.is_empty() {
            0
        } else if significant.len() > 3 {
            return None;
        } else {
            significant.parse().ok()?
        };
    }
    parts.next().is_none().then_some(Ipv4Addr::from(octets))
}

/// Converts an API port number, rejecting 0 and out-of-range values.
fn port_number(value: i32) -> Option<u16> {
    u16::try_from(value).ok().filter(|p| *p != 0)
}

/// Parses a Service. `None` when it has no name (it cannot be addressed at all).
pub fn service(svc: &Service) -> (Option<ServiceModel>, Vec<Problem>) {
    let Some(name) = svc.metadata.name.as_deref() else {
        return (None, Vec::new());
    };
    let key = ObjectKey::new(namespace_of(&svc.metadata), name);
    let mut reporter = Reporter::new(format!("Service {key}"));
    let labels = svc.metadata.labels.clone().unwrap_or_default();
    let mut model = ServiceModel {
        key,
        labels,
        skip: None,
        cluster_ips: Vec::new(),
        ports: Vec::new(),
        external_ips: Vec::new(),
        load_balancer_ips: Vec::new(),
        source_ranges: Vec::new(),
        external_policy_local: false,
        internal_policy_local: false,
        health_check_node_port: None,
        affinity_timeout_seconds: None,
    };
    let default_spec = Default::default();
    let spec = svc.spec.as_ref().unwrap_or(&default_spec);
    let service_type = spec.type_.as_deref().unwrap_or("ClusterIP");

    model.skip = skip_reason(&model.labels, spec, service_type);
    if model.skip == Some(SkipReason::NoClusterIp) {
        reporter.report(
            ProblemKind::InvalidValue,
            "spec.clusterIP",
            "no cluster IP allocated; the service is not proxied",
        );
    }
    if model.skip.is_some() {
        return (Some(model), reporter.problems);
    }

    // spec.clusterIPs is authoritative when set; spec.clusterIP is its first entry.
    let (ips, ips_field): (Vec<&str>, &str) = match spec.cluster_ips.as_deref() {
        Some(ips) if !ips.is_empty() => {
            (ips.iter().map(String::as_str).collect(), "spec.clusterIPs")
        }
        _ => (
            spec.cluster_ip.as_deref().into_iter().collect(),
            "spec.clusterIP",
        ),
    };
    for (i, raw) in ips.iter().enumerate() {
        let field = if ips_field == "spec.clusterIPs" {
            format!("{ips_field}[{i}]")
        } else {
            ips_field.to_owned()
        };
        match parse_ip(raw, &field) {
            // One cluster IP per family: a second one of a family would be ignored by
            // kube-proxy's per-family proxiers too.
            Ok(ip)
                if model
                    .cluster_ips
                    .iter()
                    .all(|c| Family::of(c) != Family::of(&ip)) =>
            {
                model.cluster_ips.push(ip);
            }
            Ok(_) => reporter.report(
                ProblemKind::InvalidValue,
                field,
                "a second cluster IP of the same family; ignored",
            ),
            Err(e) => reporter.invalid(e, "this cluster IP is ignored"),
        }
    }
    if model.cluster_ips.is_empty() {
        model.skip = Some(SkipReason::NoValidClusterIp);
        reporter.report(
            ProblemKind::InvalidValue,
            ips_field,
            "no valid cluster IP; the service is not proxied",
        );
        return (Some(model), reporter.problems);
    }
    let families = model.families();
    let in_families = |ip: &IpAddr| families.contains(&Family::of(ip));

    for (i, port) in spec.ports.iter().flatten().enumerate() {
        let field = format!("spec.ports[{i}]");
        let protocol_name = port.protocol.as_deref().unwrap_or("TCP");
        let Some(protocol) = Protocol::from_k8s(protocol_name) else {
            reporter.report(
                ProblemKind::InvalidValue,
                format!("{field}.protocol"),
                format!("{protocol_name:?} is not TCP, UDP or SCTP; the port is ignored"),
            );
            continue;
        };
        let Some(number) = port_number(port.port) else {
            reporter.report(
                ProblemKind::InvalidValue,
                format!("{field}.port"),
                format!("{} is not a port number; the port is ignored", port.port),
            );
            continue;
        };
        let node_port = match port.node_port {
            None | Some(0) => None,
            Some(n) => match port_number(n) {
                Some(p) => Some(p),
                None => {
                    reporter.report(
                        ProblemKind::InvalidValue,
                        format!("{field}.nodePort"),
                        format!("{n} is not a port number; the node port is ignored"),
                    );
                    None
                }
            },
        };
        model.ports.push(ServicePortModel {
            name: port.name.clone().unwrap_or_default(),
            protocol,
            port: number,
            node_port,
        });
    }

    for (i, raw) in spec.external_ips.iter().flatten().enumerate() {
        match parse_ip(raw, &format!("spec.externalIPs[{i}]")) {
            Ok(ip) if in_families(&ip) => model.external_ips.push(ip),
            Ok(_) => {}
            Err(e) => reporter.invalid(e, "this external IP is ignored"),
        }
    }

    let ingress = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref());
    for (i, ingress) in ingress.into_iter().flatten().enumerate() {
        // Proxy-mode load balancers deliver traffic to the node address, not to the
        // VIP, so the node must not capture the VIP. As in kube-proxy, only an unset
        // mode or `VIP` is a VIP: a mode this version does not know is not captured.
        if ingress.ip_mode.as_deref().is_some_and(|mode| mode != "VIP") {
            continue;
        }
        let Some(raw) = ingress.ip.as_deref().filter(|ip| !ip.is_empty()) else {
            continue;
        };
        match parse_ip(raw, &format!("status.loadBalancer.ingress[{i}].ip")) {
            Ok(ip) if in_families(&ip) => model.load_balancer_ips.push(ip),
            Ok(_) => {}
            Err(e) => reporter.invalid(e, "this load-balancer IP is ignored"),
        }
    }

    let ranges = spec
        .load_balancer_source_ranges
        .as_deref()
        .unwrap_or_default();
    let mut invalid_ranges = 0;
    for (i, raw) in ranges.iter().enumerate() {
        match parse_cidr(raw, &format!("spec.loadBalancerSourceRanges[{i}]")) {
            Ok(net) if in_families(&net.addr()) => model.source_ranges.push(net),
            Ok(_) => {}
            Err(e) => {
                invalid_ranges += 1;
                reporter.invalid(e, "this source range is ignored");
            }
        }
    }
    // Fail closed: ranges that all failed to parse must not open the load balancer
    // to every source.
    if invalid_ranges > 0 && invalid_ranges == ranges.len() && !model.load_balancer_ips.is_empty() {
        model.load_balancer_ips.clear();
        reporter.report(
            ProblemKind::InvalidValue,
            "spec.loadBalancerSourceRanges",
            "no source range is valid; the load-balancer IPs are not served",
        );
    }

    let externally_accessible = matches!(service_type, "NodePort" | "LoadBalancer")
        || spec
            .external_ips
            .as_ref()
            .is_some_and(|ips| !ips.is_empty());
    let etp_local = spec.external_traffic_policy.as_deref() == Some("Local");
    model.external_policy_local = externally_accessible && etp_local;
    model.internal_policy_local = spec.internal_traffic_policy.as_deref() == Some("Local");
    if service_type == "LoadBalancer" && etp_local {
        model.health_check_node_port = spec.health_check_node_port.and_then(port_number);
    }
    if spec.session_affinity.as_deref() == Some("ClientIP") {
        let timeout = spec
            .session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_SECONDS);
        model.affinity_timeout_seconds = Some(timeout);
    }
    (Some(model), reporter.problems)
}

fn skip_reason(
    labels: &BTreeMap<String, String>,
    spec: &k8s_openapi::api::core::v1::ServiceSpec,
    service_type: &str,
) -> Option<SkipReason> {
    if service_type == "ExternalName" {
        return Some(SkipReason::ExternalName);
    }
    if labels
        .get(labels::SERVICE_PROXY_NAME_LABEL)
        .is_some_and(|proxy| proxy != labels::SERVICE_PROXY_NAME)
    {
        return Some(SkipReason::OtherProxy);
    }
    if labels.contains_key(labels::HEADLESS_LABEL) {
        return Some(SkipReason::HeadlessLabel);
    }
    let first_ip = spec
        .cluster_ips
        .as_ref()
        .and_then(|ips| ips.first())
        .or(spec.cluster_ip.as_ref())
        .map(String::as_str)
        .unwrap_or_default();
    if first_ip == "None" {
        return Some(SkipReason::Headless);
    }
    if first_ip.is_empty() {
        return Some(SkipReason::NoClusterIp);
    }
    None
}

/// Parses an EndpointSlice. `None` when it has no name.
pub fn endpoint_slice(slice: &EndpointSlice) -> (Option<SliceModel>, Vec<Problem>) {
    let Some(name) = slice.metadata.name.as_deref() else {
        return (None, Vec::new());
    };
    let namespace = namespace_of(&slice.metadata);
    let key = ObjectKey::new(namespace, name);
    let mut reporter = Reporter::new(format!("EndpointSlice {key}"));
    let labels = slice.metadata.labels.as_ref();
    let service = labels
        .and_then(|l| l.get(labels::SERVICE_NAME_LABEL))
        .filter(|s| !s.is_empty())
        .map(|s| ObjectKey::new(namespace, s));
    if service.is_none() {
        reporter.report(
            ProblemKind::Dangling,
            format!("metadata.labels[{}]", labels::SERVICE_NAME_LABEL),
            "missing: the slice belongs to no service and is ignored",
        );
    }
    let family = match slice.address_type.as_str() {
        "IPv4" => Some(Family::V4),
        "IPv6" => Some(Family::V6),
        _ => None,
    };
    let last_change_trigger_time = slice
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(labels::LAST_CHANGE_TRIGGER_TIME_ANNOTATION))
        .and_then(|raw| {
            let parsed = serde_json::from_value::<Time>(serde_json::Value::String(raw.clone()));
            if parsed.is_err() {
                reporter.report(
                    ProblemKind::InvalidValue,
                    format!(
                        "metadata.annotations[{}]",
                        labels::LAST_CHANGE_TRIGGER_TIME_ANNOTATION
                    ),
                    format!("{raw:?} is not an RFC 3339 time; ignored"),
                );
            }
            parsed.ok()
        });

    let mut ports = Vec::new();
    for (i, port) in slice.ports.iter().flatten().enumerate() {
        // As in kube-proxy: a port without a name or number cannot be joined to a
        // service port and is skipped.
        let (Some(name), Some(number)) = (port.name.as_ref(), port.port) else {
            continue;
        };
        let protocol_name = port.protocol.as_deref().unwrap_or("TCP");
        let Some(protocol) = Protocol::from_k8s(protocol_name) else {
            reporter.report(
                ProblemKind::InvalidValue,
                format!("ports[{i}].protocol"),
                format!("{protocol_name:?} is not TCP, UDP or SCTP; the port is ignored"),
            );
            continue;
        };
        let Some(number) = port_number(number) else {
            reporter.report(
                ProblemKind::InvalidValue,
                format!("ports[{i}].port"),
                format!("{number} is not a port number; the port is ignored"),
            );
            continue;
        };
        ports.push(SlicePortModel {
            name: name.clone(),
            protocol,
            port: number,
        });
    }

    let mut endpoints = Vec::new();
    if family.is_some() {
        for (i, endpoint) in slice.endpoints.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[0]");
            let Some(raw) = endpoint.addresses.first() else {
                continue;
            };
            let ip = match parse_ip(raw, &field) {
                Ok(ip) if Some(Family::of(&ip)) == family => ip,
                Ok(_) => {
                    reporter.report(
                        ProblemKind::InvalidValue,
                        field,
                        format!(
                            "{raw} is not of the slice's addressType {}; the endpoint is ignored",
                            slice.address_type
                        ),
                    );
                    continue;
                }
                Err(e) => {
                    reporter.invalid(e, "the endpoint is ignored");
                    continue;
                }
            };
            let conditions = endpoint.conditions.as_ref();
            let hints = endpoint.hints.as_ref();
            endpoints.push(EndpointModel {
                ip,
                node_name: endpoint.node_name.clone().filter(|n| !n.is_empty()),
                ready: conditions.and_then(|c| c.ready).unwrap_or(true),
                serving: conditions.and_then(|c| c.serving).unwrap_or(true),
                terminating: conditions.and_then(|c| c.terminating).unwrap_or(false),
                zone_hints: hints
                    .and_then(|h| h.for_zones.as_ref())
                    .map(|z| z.iter().map(|z| z.name.clone()).collect())
                    .unwrap_or_default(),
                node_hints: hints
                    .and_then(|h| h.for_nodes.as_ref())
                    .map(|n| n.iter().map(|n| n.name.clone()).collect())
                    .unwrap_or_default(),
            });
        }
    }
    let model = SliceModel {
        key,
        service,
        family,
        ports,
        endpoints,
        last_change_trigger_time,
    };
    (Some(model), reporter.problems)
}

/// Parses a Node. `None` when it has no name.
pub fn node(node: &Node) -> (Option<NodeModel>, Vec<Problem>) {
    let Some(name) = node.metadata.name.as_deref() else {
        return (None, Vec::new());
    };
    let mut reporter = Reporter::new(format!("Node {name}"));
    let labels = node.metadata.labels.clone().unwrap_or_default();
    let zone = labels
        .get(labels::ZONE_LABEL)
        .filter(|z| !z.is_empty())
        .cloned();
    let mut internal_ips = Vec::new();
    let mut external_ips = Vec::new();
    let addresses = node.status.as_ref().and_then(|s| s.addresses.as_ref());
    for (i, address) in addresses.into_iter().flatten().enumerate() {
        let target = match address.type_.as_str() {
            "InternalIP" => &mut internal_ips,
            "ExternalIP" => &mut external_ips,
            _ => continue,
        };
        match parse_ip(&address.address, &format!("status.addresses[{i}].address")) {
            Ok(ip) => target.push(ip),
            Err(e) => reporter.invalid(e, "this address is ignored"),
        }
    }
    let spec = node.spec.as_ref();
    let (cidrs, cidrs_field): (Vec<&String>, &str) = match spec
        .and_then(|s| s.pod_cidrs.as_ref())
        .filter(|c| !c.is_empty())
    {
        Some(cidrs) => (cidrs.iter().collect(), "spec.podCIDRs"),
        None => (
            spec.and_then(|s| s.pod_cidr.as_ref()).into_iter().collect(),
            "spec.podCIDR",
        ),
    };
    let mut pod_cidrs = Vec::new();
    for (i, raw) in cidrs.into_iter().enumerate() {
        let field = if cidrs_field == "spec.podCIDRs" {
            format!("{cidrs_field}[{i}]")
        } else {
            cidrs_field.to_owned()
        };
        match parse_cidr(raw, &field) {
            Ok(net) => pod_cidrs.push(net),
            Err(e) => reporter.invalid(e, "this pod CIDR is ignored"),
        }
    }
    let tainted = spec
        .and_then(|s| s.taints.as_ref())
        .is_some_and(|taints| taints.iter().any(|t| t.key == TO_BE_DELETED_TAINT));
    let model = NodeModel {
        name: name.to_owned(),
        labels,
        zone,
        internal_ips,
        external_ips,
        pod_cidrs,
        terminating: node.metadata.deletion_timestamp.is_some() || tainted,
    };
    (Some(model), reporter.problems)
}
