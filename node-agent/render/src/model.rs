//! Parsing a node's ProxyPlan shards into a typed, validated model.
//!
//! Rendering only ever sees these types, so every address, CIDR, port and name in
//! a rule has been parsed or checked here. A bad service port is skipped and
//! reported with the field at fault; the rest of the node is still programmed.
//! Only problems that make the whole node unprogrammable (an incomplete shard
//! set, invalid node-wide settings) fail the parse.

use std::collections::BTreeSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::v1alpha1::{
    EndpointSet, NoEndpointsAction, Protocol, ServicePortPlan, TrafficPolicy,
};

use crate::Family;

/// The node-wide problems that stop the whole node from being programmed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No shard was given.
    #[error("no ProxyPlan shard given")]
    NoShards,
    /// The shards do not form one complete set.
    #[error("incomplete shard set: {0}")]
    IncompleteShards(String),
    /// A node-wide setting is invalid.
    #[error("shard {shard}: {field}: {message}")]
    InvalidSettings {
        /// The shard whose settings are invalid.
        shard: u32,
        /// The field's path (`spec.settings.masqueradeBit`).
        field: String,
        /// What is wrong with it.
        message: String,
    },
}

/// A service port that was skipped, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{service_port} (shard {shard}): {field}: {message}")]
pub struct InvalidServicePort {
    /// `namespace/name:port` as far as it could be read (names are escaped).
    pub service_port: String,
    /// The shard holding it.
    pub shard: u32,
    /// The field's path (`spec.servicePorts[3].clusterIPs[0]`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// A DNS-1123 label: the only shape namespace, service and port names may have
/// before they appear in a rule comment.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DnsLabel(String);

impl DnsLabel {
    /// Checks `s`: 1–63 characters of `[a-z0-9-]`, starting and ending alphanumeric.
    pub fn parse(s: &str) -> Option<Self> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b.first().is_some_and(u8::is_ascii_alphanumeric)
            && b.last().is_some_and(u8::is_ascii_alphanumeric);
        ok.then(|| Self(s.to_owned()))
    }

    /// The label.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DnsLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A service port's identity: `namespace/name` plus `:port` when the port is named.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServicePortName {
    /// The service's namespace.
    pub namespace: DnsLabel,
    /// The service's name.
    pub name: DnsLabel,
    /// The port's name; `None` for a single unnamed port.
    pub port_name: Option<DnsLabel>,
}

impl fmt::Display for ServicePortName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)?;
        if let Some(port) = &self.port_name {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

/// Node-wide settings, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// The masquerade mark: `1 << masqueradeBit`.
    pub masquerade_mark: u32,
    /// Sources inside these are local pods; at most one per family.
    pub local_cidrs: Vec<IpNet>,
    /// Node addresses NodePorts answer on; empty means every local address.
    pub node_port_addresses: Vec<IpNet>,
    /// IPv4 node ports also answer on 127.0.0.0/8 (where `node_port_addresses`
    /// cover it).
    pub localhost_node_ports: bool,
    /// The node's own addresses.
    pub node_ips: Vec<IpAddr>,
}

impl Settings {
    /// The local-pod CIDR of `family`, if the detector has one.
    pub fn local_cidr(&self, family: Family) -> Option<IpNet> {
        self.local_cidrs
            .iter()
            .copied()
            .find(|c| family_of_net(c) == family)
    }
}

/// One endpoint a frontend may reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// The endpoint's address and port.
    pub addr: SocketAddr,
    /// Whether a connection from the endpoint to its own service can pass
    /// through this node: it runs here, or its slice does not say where.
    pub hairpin: bool,
}

impl Endpoint {
    /// `ip:port`, or `[ip]:port` for IPv6: the form kube-proxy hashes and sorts by.
    pub fn key(&self) -> String {
        self.addr.to_string()
    }
}

/// One service port, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePort {
    /// The shard it came from.
    pub shard: u32,
    /// Its identity.
    pub name: ServicePortName,
    /// Its protocol.
    pub protocol: Protocol,
    /// One cluster IP per family.
    pub cluster_ips: Vec<IpAddr>,
    /// The service port.
    pub port: u16,
    /// The node port, if any.
    pub node_port: Option<u16>,
    /// External IPs.
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer ingress IPs.
    pub load_balancer_ips: Vec<IpAddr>,
    /// Sources allowed to reach the load-balancer IPs; empty allows all.
    pub source_ranges: Vec<IpNet>,
    /// ClientIP affinity timeout in seconds.
    pub affinity_timeout: Option<u32>,
    /// externalTrafficPolicy is Local.
    pub external_local: bool,
    /// internalTrafficPolicy is Local.
    pub internal_local: bool,
    /// Health-check node port.
    pub health_check_node_port: Option<u16>,
    /// Masquerade all cluster-IP traffic.
    pub masquerade_all: bool,
    /// What frontends without endpoints do.
    pub no_endpoints_action: NoEndpointsAction,
    /// Some usable endpoint exists in the cluster.
    pub has_endpoints: bool,
    /// The cluster-wide endpoints, sorted as kube-proxy sorts them.
    pub cluster_endpoints: Option<Vec<Endpoint>>,
    /// The node-local endpoints, sorted likewise.
    pub local_endpoints: Option<Vec<Endpoint>>,
}

impl ServicePort {
    /// Every endpoint of either set, without duplicates.
    pub fn all_endpoints(&self) -> BTreeSet<SocketAddr> {
        self.cluster_endpoints
            .iter()
            .chain(self.local_endpoints.iter())
            .flatten()
            .map(|e| e.addr)
            .collect()
    }
}

/// A node's complete plan, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeModel {
    /// The node.
    pub node_name: String,
    /// Node-wide settings (from shard 0; every shard carries the same).
    pub settings: Settings,
    /// Every valid service port, sorted by name and protocol.
    pub service_ports: Vec<ServicePort>,
    /// Service ports that were skipped.
    pub skipped: Vec<InvalidServicePort>,
    /// The shard indexes of the set.
    pub shards: Vec<u32>,
}

/// The family an address belongs to.
pub fn family_of(ip: &IpAddr) -> Family {
    match ip {
        IpAddr::V4(_) => Family::V4,
        IpAddr::V6(_) => Family::V6,
    }
}

/// The family a CIDR belongs to.
pub fn family_of_net(net: &IpNet) -> Family {
    match net {
        IpNet::V4(_) => Family::V4,
        IpNet::V6(_) => Family::V6,
    }
}

/// Parses a complete set of shards of one node.
pub fn parse<S: AsRef<ProxyPlanSpec>>(shards: &[S]) -> Result<NodeModel, PlanError> {
    let first = shards.first().ok_or(PlanError::NoShards)?.as_ref();
    check_complete(shards)?;
    let settings = parse_settings(first)?;

    let mut service_ports = Vec::new();
    let mut skipped = Vec::new();
    for shard in shards.iter().map(AsRef::as_ref) {
        for (i, plan) in shard.service_ports.iter().enumerate() {
            match parse_service_port(shard.shard.index, i, plan) {
                Ok(sp) => service_ports.push(sp),
                Err(e) => skipped.push(e),
            }
        }
    }
    service_ports.sort_by(|a, b| (&a.name, a.protocol).cmp(&(&b.name, b.protocol)));
    // Two shards claiming the same service port would render the same chains
    // twice; keep the first and report the other.
    let mut seen = BTreeSet::new();
    service_ports.retain(|sp| {
        let fresh = seen.insert((sp.name.clone(), sp.protocol));
        if !fresh {
            skipped.push(duplicate(sp));
        }
        fresh
    });
    let mut indexes: Vec<u32> = shards.iter().map(|s| s.as_ref().shard.index).collect();
    indexes.sort_unstable();
    Ok(NodeModel {
        node_name: first.node_name.clone(),
        settings,
        service_ports,
        skipped,
        shards: indexes,
    })
}

/// Why the second of two shards' copies of one service port is skipped.
pub(crate) fn duplicate(sp: &ServicePort) -> InvalidServicePort {
    InvalidServicePort {
        service_port: format!("{} {}", sp.name, sp.protocol.as_lower_str()),
        shard: sp.shard,
        field: "spec.servicePorts".into(),
        message: "the same service port appears twice in the node's plan".into(),
    }
}

pub(crate) fn check_complete<S: AsRef<ProxyPlanSpec>>(shards: &[S]) -> Result<(), PlanError> {
    let Some(first) = shards.first().map(AsRef::as_ref) else {
        return Err(PlanError::NoShards);
    };
    let count = first.shard.count;
    let generation = first.shard.generation;
    let mut present = BTreeSet::new();
    for s in shards.iter().map(AsRef::as_ref) {
        if s.node_name != first.node_name {
            return Err(PlanError::IncompleteShards(format!(
                "shards of two nodes ({:?} and {:?})",
                first.node_name, s.node_name
            )));
        }
        if s.shard.count != count || s.shard.generation != generation {
            return Err(PlanError::IncompleteShards(format!(
                "shard {} has count {} generation {}, shard {} has count {} generation {}",
                first.shard.index,
                count,
                generation,
                s.shard.index,
                s.shard.count,
                s.shard.generation
            )));
        }
        if s.shard.index >= count {
            return Err(PlanError::IncompleteShards(format!(
                "shard index {} is not below the count {count}",
                s.shard.index
            )));
        }
        if !present.insert(s.shard.index) {
            return Err(PlanError::IncompleteShards(format!(
                "shard {} given twice",
                s.shard.index
            )));
        }
    }
    if present.len() != count as usize {
        let missing: Vec<String> = (0..count)
            .filter(|i| !present.contains(i))
            .take(8)
            .map(|i| i.to_string())
            .collect();
        return Err(PlanError::IncompleteShards(format!(
            "{} of {count} shards present; missing {}",
            present.len(),
            missing.join(", ")
        )));
    }
    Ok(())
}

pub(crate) fn parse_settings(spec: &ProxyPlanSpec) -> Result<Settings, PlanError> {
    let shard = spec.shard.index;
    let bad = |field: String, message: String| PlanError::InvalidSettings {
        shard,
        field,
        message,
    };
    let s = &spec.settings;
    if s.masquerade_bit > 31 {
        return Err(bad(
            "spec.settings.masqueradeBit".into(),
            format!("{} is not a bit of a 32-bit mark (0-31)", s.masquerade_bit),
        ));
    }
    let mut local_cidrs: Vec<IpNet> = Vec::new();
    for (i, c) in s.local_traffic_detector.cidrs.iter().enumerate() {
        let field = format!("spec.settings.localTrafficDetector.cidrs[{i}]");
        let net = parse_net(c).ok_or_else(|| bad(field.clone(), format!("{c:?} is not a CIDR")))?;
        if local_cidrs
            .iter()
            .any(|n| family_of_net(n) == family_of_net(&net))
        {
            return Err(bad(field, "at most one CIDR per IP family".into()));
        }
        local_cidrs.push(net);
    }
    let node_port_addresses = s
        .node_port_addresses
        .iter()
        .enumerate()
        .map(|(i, c)| {
            parse_net(c).ok_or_else(|| {
                bad(
                    format!("spec.settings.nodePortAddresses[{i}]"),
                    format!("{c:?} is not a CIDR"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let node_ips = s
        .node_ips
        .iter()
        .enumerate()
        .map(|(i, a)| {
            a.parse::<IpAddr>().map_err(|_| {
                bad(
                    format!("spec.settings.nodeIPs[{i}]"),
                    format!("{a:?} is not an IP address"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Settings {
        masquerade_mark: 1u32 << s.masquerade_bit,
        local_cidrs,
        node_port_addresses,
        localhost_node_ports: s.localhost_node_ports,
        node_ips,
    })
}

/// A CIDR, or a bare address as its single-address network; host bits are cleared.
fn parse_net(s: &str) -> Option<IpNet> {
    let s = s.trim();
    s.parse::<IpNet>()
        .map(|n| n.trunc())
        .ok()
        .or_else(|| s.parse::<IpAddr>().ok().map(IpNet::from))
}

/// Shows untrusted text in an error message without letting it span lines or
/// run on: control characters are escaped and the length is capped.
fn shown(s: &str) -> String {
    let mut out: String = s.chars().take(80).flat_map(char::escape_default).collect();
    if s.chars().count() > 80 {
        out.push('…');
    }
    out
}

/// Builds the errors of one service port: its shown name and field prefix.
struct PortErrors<'a> {
    display: String,
    shard: u32,
    base: String,
    plan: &'a ServicePortPlan,
}

impl PortErrors<'_> {
    fn bad(&self, field: &str, message: String) -> InvalidServicePort {
        InvalidServicePort {
            service_port: self.display.clone(),
            shard: self.shard,
            field: format!("{}.{field}", self.base),
            message,
        }
    }
}

pub(crate) fn parse_service_port(
    shard: u32,
    index: usize,
    plan: &ServicePortPlan,
) -> Result<ServicePort, InvalidServicePort> {
    let display = if plan.port_name.is_empty() {
        format!("{}/{}", shown(&plan.namespace), shown(&plan.name))
    } else {
        format!(
            "{}/{}:{}",
            shown(&plan.namespace),
            shown(&plan.name),
            shown(&plan.port_name)
        )
    };
    let errors = PortErrors {
        display,
        shard,
        base: format!("spec.servicePorts[{index}]"),
        plan,
    };
    let name = parse_name(&errors)?;
    check_ports(&errors)?;
    let cluster_ips = parse_cluster_ips(&errors)?;
    let external_ips = parse_ips(&errors, "externalIPs", &plan.external_ips)?;
    let load_balancer_ips = parse_ips(&errors, "loadBalancerIPs", &plan.load_balancer_ips)?;
    let source_ranges = parse_source_ranges(&errors)?;
    let affinity_timeout = parse_affinity(&errors)?;
    let cluster_endpoints =
        parse_endpoints(&errors, "clusterEndpoints", plan.cluster_endpoints.as_ref())?;
    let local_endpoints =
        parse_endpoints(&errors, "localEndpoints", plan.local_endpoints.as_ref())?;

    Ok(ServicePort {
        shard,
        name,
        protocol: plan.protocol,
        cluster_ips,
        port: plan.port,
        node_port: plan.node_port,
        external_ips,
        load_balancer_ips,
        source_ranges,
        affinity_timeout,
        external_local: plan.external_traffic_policy == TrafficPolicy::Local,
        internal_local: plan.internal_traffic_policy == TrafficPolicy::Local,
        health_check_node_port: plan.health_check_node_port,
        masquerade_all: plan.masquerade_all,
        no_endpoints_action: plan.no_endpoints_action,
        has_endpoints: plan.has_endpoints,
        cluster_endpoints,
        local_endpoints,
    })
}

fn parse_name(e: &PortErrors<'_>) -> Result<ServicePortName, InvalidServicePort> {
    let plan = e.plan;
    let namespace = DnsLabel::parse(&plan.namespace).ok_or_else(|| {
        e.bad(
            "namespace",
            format!("{:?} is not a DNS label", shown(&plan.namespace)),
        )
    })?;
    let name = DnsLabel::parse(&plan.name).ok_or_else(|| {
        e.bad(
            "name",
            format!("{:?} is not a DNS label", shown(&plan.name)),
        )
    })?;
    let port_name = if plan.port_name.is_empty() {
        None
    } else {
        Some(DnsLabel::parse(&plan.port_name).ok_or_else(|| {
            e.bad(
                "portName",
                format!("{:?} is not a valid port name", shown(&plan.port_name)),
            )
        })?)
    };
    Ok(ServicePortName {
        namespace,
        name,
        port_name,
    })
}

fn check_ports(e: &PortErrors<'_>) -> Result<(), InvalidServicePort> {
    let plan = e.plan;
    if plan.port == 0 {
        return Err(e.bad("port", "must be between 1 and 65535".into()));
    }
    if plan.node_port == Some(0) {
        return Err(e.bad("nodePort", "must be between 1 and 65535".into()));
    }
    if plan.health_check_node_port == Some(0) {
        return Err(e.bad("healthCheckNodePort", "must be between 1 and 65535".into()));
    }
    Ok(())
}

/// Parses a list of addresses, dropping duplicates.
fn parse_ips(
    e: &PortErrors<'_>,
    field: &str,
    list: &[String],
) -> Result<Vec<IpAddr>, InvalidServicePort> {
    let mut out: Vec<IpAddr> = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let ip = s.trim().parse::<IpAddr>().map_err(|_| {
            e.bad(
                &format!("{field}[{i}]"),
                format!("{:?} is not an IP address", shown(s)),
            )
        })?;
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    Ok(out)
}

fn parse_cluster_ips(e: &PortErrors<'_>) -> Result<Vec<IpAddr>, InvalidServicePort> {
    let cluster_ips = parse_ips(e, "clusterIPs", &e.plan.cluster_ips)?;
    if cluster_ips.is_empty() {
        return Err(e.bad("clusterIPs", "a proxied service needs a cluster IP".into()));
    }
    if cluster_ips.len() > 2
        || (cluster_ips.len() == 2 && family_of(&cluster_ips[0]) == family_of(&cluster_ips[1]))
    {
        return Err(e.bad("clusterIPs", "at most one cluster IP per IP family".into()));
    }
    Ok(cluster_ips)
}

fn parse_source_ranges(e: &PortErrors<'_>) -> Result<Vec<IpNet>, InvalidServicePort> {
    let list = &e.plan.load_balancer_source_ranges;
    let mut source_ranges = Vec::with_capacity(list.len());
    for (i, s) in list.iter().enumerate() {
        let net = parse_net(s).ok_or_else(|| {
            e.bad(
                &format!("loadBalancerSourceRanges[{i}]"),
                format!("{:?} is not a CIDR", shown(s)),
            )
        })?;
        if !source_ranges.contains(&net) {
            source_ranges.push(net);
        }
    }
    Ok(source_ranges)
}

fn parse_affinity(e: &PortErrors<'_>) -> Result<Option<u32>, InvalidServicePort> {
    match &e.plan.session_affinity {
        Some(a) if !(1..=86400).contains(&a.timeout_seconds) => Err(e.bad(
            "sessionAffinity.timeoutSeconds",
            format!("{} is not between 1 and 86400", a.timeout_seconds),
        )),
        Some(a) => Ok(Some(a.timeout_seconds)),
        None => Ok(None),
    }
}

fn parse_endpoints(
    e: &PortErrors<'_>,
    field: &str,
    set: Option<&EndpointSet>,
) -> Result<Option<Vec<Endpoint>>, InvalidServicePort> {
    let Some(set) = set else { return Ok(None) };
    let mut out: Vec<Endpoint> = Vec::with_capacity(set.endpoints.len());
    for (i, ep) in set.endpoints.iter().enumerate() {
        let ip = ep.ip.trim().parse::<IpAddr>().map_err(|_| {
            e.bad(
                &format!("{field}.endpoints[{i}].ip"),
                format!("{:?} is not an IP address", shown(&ep.ip)),
            )
        })?;
        if ep.port == 0 {
            return Err(e.bad(
                &format!("{field}.endpoints[{i}].port"),
                "must be between 1 and 65535".into(),
            ));
        }
        let addr = SocketAddr::new(ip, ep.port);
        if !out.iter().any(|o| o.addr == addr) {
            out.push(Endpoint {
                addr,
                hairpin: ep.local || ep.node_unknown,
            });
        }
    }
    // kube-proxy orders endpoints by the string `ip:port`; the order decides
    // which rule gets which probability, so keep it whatever the plan says.
    out.sort_by_cached_key(Endpoint::key);
    Ok(Some(out))
}
