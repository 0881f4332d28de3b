//! ProxyPolicy resolution: which policy decides each setting of a node or of a
//! node/service pair.
//!
//! Policies are ordered once (priority descending, then name ascending); a setting
//! takes its value from the first policy in that order that matches and sets it,
//! else kube-proxy's default. Node-scoped settings read only policies without a
//! serviceSelector (validation guarantees that only those set them).

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use planproxy_crds::selector::Selector;
use planproxy_crds::v1alpha1::{
    LocalTrafficDetectorMode, NoEndpointsAction, NodeSettings, ResolvedLocalTrafficDetector,
};
use planproxy_crds::{ProxyPolicy, ProxyPolicySpec, duration, validate};

use crate::ingest::{Family, NodeModel};
use crate::{PolicyVerdict, Problem, ProblemKind};

/// kube-proxy's default masquerade bit.
pub const DEFAULT_MASQUERADE_BIT: u8 = 14;
/// kube-proxy's default minimum sync period.
pub const DEFAULT_MIN_SYNC_PERIOD: &str = "1s";
/// kube-proxy's default sync period.
pub const DEFAULT_SYNC_PERIOD: &str = "30s";
/// kube-proxy's iptables-mode default for `localhostNodePorts`.
pub const DEFAULT_LOCALHOST_NODE_PORTS: bool = true;
/// The default cap on ClientIP affinity timeouts (the API's own maximum).
pub const DEFAULT_MAX_AFFINITY_TIMEOUT_SECONDS: u32 = 86400;

/// A ProxyPolicy: its verdict and the spec in force, if any.
#[derive(Clone, Debug)]
pub struct PolicyModel {
    /// The policy name.
    pub name: String,
    /// Whether its current spec is valid.
    pub verdict: PolicyVerdict,
    /// The spec that applies: the current one when valid, else the last accepted
    /// one (when it is still valid), else none.
    pub in_force: Option<PolicyInForce>,
}

/// A valid spec with its selectors parsed.
#[derive(Clone, Debug)]
pub struct PolicyInForce {
    /// The policy name.
    pub name: String,
    /// The spec.
    pub spec: ProxyPolicySpec,
    /// Its parsed node selector.
    pub node_selector: Selector,
    /// Its parsed service selector.
    pub service_selector: Selector,
}

/// Validates a policy and decides which spec is in force.
pub fn compile(policy: &ProxyPolicy) -> (PolicyModel, Vec<Problem>) {
    let name = policy.metadata.name.clone().unwrap_or_default();
    let in_force_from = |spec: &ProxyPolicySpec| {
        validate::proxy_policy(spec).map(|checked| PolicyInForce {
            name: name.clone(),
            spec: spec.clone(),
            node_selector: checked.node_selector,
            service_selector: checked.service_selector,
        })
    };
    match in_force_from(&policy.spec) {
        Ok(in_force) => (
            PolicyModel {
                name: name.clone(),
                verdict: PolicyVerdict::Accepted,
                in_force: Some(in_force),
            },
            Vec::new(),
        ),
        Err(error) => {
            let accepted = policy
                .status
                .as_ref()
                .and_then(|s| s.accepted_spec.as_ref())
                .and_then(|spec| in_force_from(spec).ok());
            let consequence = if accepted.is_some() {
                "the last accepted spec stays in force"
            } else {
                "the policy is not applied"
            };
            let problem = Problem {
                object: format!("ProxyPolicy {name}"),
                field: error.field.clone(),
                message: format!("{}; {consequence}", error.message),
                kind: ProblemKind::InvalidPolicy,
            };
            (
                PolicyModel {
                    name,
                    verdict: PolicyVerdict::Invalid(error),
                    in_force: accepted,
                },
                vec![problem],
            )
        }
    }
}

/// The policies in force, in precedence order: priority descending, then name
/// ascending.
pub fn precedence_order<'a>(
    policies: impl IntoIterator<Item = &'a PolicyModel>,
) -> Vec<PolicyInForce> {
    let mut in_force: Vec<PolicyInForce> = policies
        .into_iter()
        .filter_map(|p| p.in_force.clone())
        .collect();
    in_force.sort_by(|a, b| {
        b.spec
            .priority
            .cmp(&a.spec.priority)
            .then_with(|| a.name.cmp(&b.name))
    });
    in_force
}

/// The settings of one service on one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceSettings {
    /// Whether planproxy programs the service at all.
    pub proxy_services: bool,
    /// Masquerade all traffic to cluster IPs.
    pub masquerade_all: bool,
    /// What frontends without endpoints do.
    pub no_endpoints_action: NoEndpointsAction,
    /// Whether topology hints narrow the cluster endpoints.
    pub topology_aware_routing: bool,
    /// The cap on ClientIP affinity timeouts.
    pub max_affinity_timeout_seconds: u32,
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            proxy_services: true,
            masquerade_all: false,
            no_endpoints_action: NoEndpointsAction::Reject,
            topology_aware_routing: true,
            max_affinity_timeout_seconds: DEFAULT_MAX_AFFINITY_TIMEOUT_SECONDS,
        }
    }
}

/// Resolves the per-service settings from the policies matching both the node and
/// the service, given in precedence order.
pub fn service_settings<'a>(
    matching: impl Iterator<Item = &'a PolicyInForce> + Clone,
) -> ServiceSettings {
    let first =
        |f: &dyn Fn(&ProxyPolicySpec) -> Option<_>| matching.clone().find_map(|p| f(&p.spec));
    let defaults = ServiceSettings::default();
    ServiceSettings {
        proxy_services: first(&|s| s.proxy_services).unwrap_or(defaults.proxy_services),
        masquerade_all: first(&|s| s.masquerade.as_ref().and_then(|m| m.masquerade_all))
            .unwrap_or(defaults.masquerade_all),
        no_endpoints_action: matching
            .clone()
            .find_map(|p| p.spec.no_endpoints_action)
            .unwrap_or(defaults.no_endpoints_action),
        topology_aware_routing: first(&|s| s.topology_aware_routing)
            .unwrap_or(defaults.topology_aware_routing),
        max_affinity_timeout_seconds: matching
            .clone()
            .find_map(|p| {
                p.spec
                    .session_affinity
                    .as_ref()
                    .and_then(|a| a.max_timeout_seconds)
            })
            .and_then(|t| u32::try_from(t).ok())
            .unwrap_or(defaults.max_affinity_timeout_seconds),
    }
}

/// Resolves the node-wide settings from the policies matching the node, given in
/// precedence order, with the problems resolving them found in the node.
pub fn node_settings<'a>(
    node: &NodeModel,
    matching: impl Iterator<Item = &'a PolicyInForce> + Clone,
) -> (NodeSettings, Vec<Problem>) {
    // Only policies selecting every service may set node-scoped fields; validation
    // enforces it, and filtering here keeps that true even for a hand-built spec.
    let node_scoped = matching.filter(|p| p.service_selector.is_everything());
    let masquerade_bit = node_scoped
        .clone()
        .find_map(|p| p.spec.masquerade.as_ref().and_then(|m| m.masquerade_bit))
        .and_then(|b| u8::try_from(b).ok())
        .unwrap_or(DEFAULT_MASQUERADE_BIT);
    let detector = node_scoped.clone().find_map(|p| {
        p.spec
            .masquerade
            .as_ref()
            .and_then(|m| m.local_traffic_detector.clone())
    });
    let local_traffic_detector = match detector {
        None => ResolvedLocalTrafficDetector::default(),
        Some(d) => {
            let cidrs = match d.mode {
                LocalTrafficDetectorMode::ClusterCidr => d
                    .cluster_cidrs
                    .iter()
                    .filter_map(|c| validate::cidr(c, "").ok())
                    .map(|n| n.to_string())
                    .collect(),
                LocalTrafficDetectorMode::NodeCidr => {
                    node.pod_cidrs.iter().map(IpNet::to_string).collect()
                }
                LocalTrafficDetectorMode::None => Vec::new(),
            };
            ResolvedLocalTrafficDetector {
                mode: d.mode,
                cidrs,
            }
        }
    };
    let mut problems = Vec::new();
    let node_port_addresses = node_scoped
        .clone()
        .find_map(|p| p.spec.node_port_addresses.as_ref().map(|a| (p, a)))
        .map(|(policy, addresses)| {
            let (resolved, problem) = resolve_node_port_addresses(node, &policy.name, addresses);
            problems.extend(problem);
            resolved
        })
        .unwrap_or_default();
    let localhost_node_ports = node_scoped
        .clone()
        .find_map(|p| p.spec.localhost_node_ports)
        .unwrap_or(DEFAULT_LOCALHOST_NODE_PORTS)
        && covers_ipv4_loopback(&node_port_addresses);
    let sync_field = |f: &dyn Fn(&planproxy_crds::v1alpha1::SyncSettings) -> Option<String>| {
        node_scoped
            .clone()
            .find_map(|p| p.spec.sync.as_ref().and_then(f))
            .and_then(|d| duration::parse(&d).ok())
            .map(duration::format)
    };
    let min_sync_period = sync_field(&|s| s.min_sync_period.clone())
        .unwrap_or_else(|| DEFAULT_MIN_SYNC_PERIOD.to_owned());
    let sync_period =
        sync_field(&|s| s.sync_period.clone()).unwrap_or_else(|| DEFAULT_SYNC_PERIOD.to_owned());

    let mut node_ips: Vec<String> = Vec::new();
    for ip in node.internal_ips.iter().chain(&node.external_ips) {
        let ip = ip.to_string();
        if !node_ips.contains(&ip) {
            node_ips.push(ip);
        }
    }
    let settings = NodeSettings {
        masquerade_bit,
        local_traffic_detector,
        node_port_addresses,
        localhost_node_ports,
        node_ips,
        min_sync_period,
        sync_period,
        node_terminating: node.terminating,
    };
    (settings, problems)
}

/// Whether resolved `nodePortAddresses` leave IPv4 node ports on 127.0.0.0/8, as
/// kube-proxy judges it: no IPv4 CIDR at all (every address of the family), or an
/// IPv4 CIDR inside or around the loopback network.
fn covers_ipv4_loopback(node_port_addresses: &[String]) -> bool {
    let loopback = IpNet::from(IpAddr::from([127, 0, 0, 0]));
    let ipv4: Vec<IpNet> = node_port_addresses
        .iter()
        .filter_map(|c| c.parse::<IpNet>().ok())
        .filter(|n| matches!(n, IpNet::V4(_)))
        .collect();
    ipv4.is_empty()
        || ipv4
            .iter()
            .any(|n| n.network().is_loopback() || n.contains(&loopback.addr()))
}

/// CIDRs stay (canonical); `primary` becomes the node's primary address of each
/// family as a host route.
///
/// The primary address of a family is the node's first InternalIP of that family,
/// else its first ExternalIP of it: the addresses kube-proxy takes as the node's
/// IPs (InternalIPs first, then ExternalIPs, one per family). A node with neither
/// gives `primary` nothing, which is reported: when nothing else is listed the
/// result is empty, meaning every local address. That is what kube-proxy does when
/// it cannot learn the node's IPs, and it keeps NodePorts working on a node whose
/// addresses are not published yet; the alternative, answering on no address,
/// would silently break every NodePort of the node.
fn resolve_node_port_addresses(
    node: &NodeModel,
    policy: &str,
    addresses: &[String],
) -> (Vec<String>, Option<Problem>) {
    let mut out: Vec<String> = Vec::new();
    let mut push = |s: String| {
        if !out.contains(&s) {
            out.push(s);
        }
    };
    let mut primary_unknown = false;
    for address in addresses {
        if address == "primary" {
            let mut found = false;
            for family in [Family::V4, Family::V6] {
                let of_family =
                    |ips: &[IpAddr]| ips.iter().find(|ip| Family::of(ip) == family).copied();
                if let Some(ip) =
                    of_family(&node.internal_ips).or_else(|| of_family(&node.external_ips))
                {
                    found = true;
                    push(IpNet::from(ip).to_string());
                }
            }
            primary_unknown |= !found;
        } else if let Ok(net) = validate::cidr(address, "") {
            push(net.to_string());
        }
    }
    let problem = primary_unknown.then(|| Problem {
        object: format!("Node {}", node.name),
        field: "status.addresses".to_owned(),
        message: format!(
            "no InternalIP or ExternalIP, so ProxyPolicy {policy}'s nodePortAddresses `primary` names no address; {}",
            if out.is_empty() {
                "node ports answer on every address of the node until it has one"
            } else {
                "node ports answer only on the other listed CIDRs until it has one"
            }
        ),
        kind: ProblemKind::InvalidValue,
    });
    (out, problem)
}

/// Policy reports: how many nodes and services each policy in force selects.
pub fn matches_node(policy: &PolicyInForce, node: &NodeModel) -> bool {
    policy.node_selector.matches(&node.labels)
}

/// Whether a policy selects a service with these labels.
pub fn matches_service(policy: &PolicyInForce, labels: &BTreeMap<String, String>) -> bool {
    policy.service_selector.matches(labels)
}
