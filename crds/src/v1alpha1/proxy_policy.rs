//! ProxyPolicy: how planproxy behaves for the nodes and services a policy selects.
//!
//! Every setting is optional. For a node/service pair, each field takes the value
//! of the highest-priority matching policy that sets it (ties broken by name,
//! alphabetically first wins), then the built-in default, which equals kube-proxy's.
//! Node-scoped settings (`masquerade.masqueradeBit`, `masquerade.localTrafficDetector`,
//! `nodePortAddresses`, `localhostNodePorts`, `sync`) shape the whole node's rules, so only policies that
//! select every service (no `serviceSelector`) may set them.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::NoEndpointsAction;

// The CEL rule below and `validate::proxy_policy` enforce the same constraint; the
// Rust check also covers API servers that do not evaluate CEL.
const NODE_SCOPED_RULE: &str = "!has(self.serviceSelector) || (!has(self.sync) && !has(self.nodePortAddresses) && !has(self.localhostNodePorts) && (!has(self.masquerade) || (!has(self.masquerade.masqueradeBit) && !has(self.masquerade.localTrafficDetector))))";
const NODE_SCOPED_MESSAGE: &str = "node-scoped settings (masquerade.masqueradeBit, masquerade.localTrafficDetector, nodePortAddresses, localhostNodePorts, sync) may only be set by a policy without serviceSelector";

/// How planproxy proxies the services and nodes this policy selects.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "planproxy.dev",
    version = "v1alpha1",
    kind = "ProxyPolicy",
    plural = "proxypolicies",
    shortname = "ppol",
    doc = "A ProxyPolicy tunes how planproxy proxies the nodes and services it selects.",
    status = "ProxyPolicyStatus",
    printcolumn = r#"{"name":"Priority","type":"integer","jsonPath":".spec.priority"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Nodes","type":"integer","jsonPath":".status.matchedNodes"}"#,
    printcolumn = r#"{"name":"Services","type":"integer","jsonPath":".status.matchedServices"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": NODE_SCOPED_RULE, "message": NODE_SCOPED_MESSAGE}]))]
pub struct ProxyPolicySpec {
    /// Selects the nodes this policy applies to. Omitted or empty selects every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<LabelSelector>,

    /// Selects the services this policy applies to. Omitted or empty selects every
    /// service. A policy with a serviceSelector may not set node-scoped settings.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_selector: Option<LabelSelector>,

    /// Precedence among matching policies: for each setting, the highest-priority
    /// matching policy that sets it wins; equal priorities are ordered by name.
    #[serde(default)]
    #[schemars(range(min = -1000, max = 1000))]
    pub priority: i32,

    /// Whether planproxy programs the selected services at all. False leaves them to
    /// another proxy. Default true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_services: Option<bool>,

    /// Source NAT of service traffic.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade: Option<MasqueradeSettings>,

    /// Node addresses NodePorts answer on: CIDRs, or the keyword `primary` for the
    /// node's first InternalIP per family (its first ExternalIP when it has no
    /// InternalIP of that family). CIDRs are matched against the node's own local
    /// addresses, as kube-proxy matches them against its interfaces, so an address
    /// Node status does not list (a secondary NIC's) counts. Omitted means every
    /// local address (kube-proxy's default). Node-scoped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 16), inner(length(max = 64)))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.all(a, a == 'primary' || isCIDR(a))", "message": "each entry must be a CIDR or 'primary'"}]))]
    pub node_port_addresses: Option<Vec<NodePortAddress>>,

    /// Whether IPv4 NodePorts also answer on 127.0.0.1 (the whole 127.0.0.0/8)
    /// for connections from the node itself, as kube-proxy's iptables mode does
    /// by default (`localhostNodePorts`). It applies only when nodePortAddresses is
    /// omitted or one of its CIDRs covers 127.0.0.0/8; IPv6 never has it. The agent
    /// then sets `net.ipv4.conf.all.route_localnet=1` and drops packets to
    /// 127.0.0.0/8 from other sources (the CVE-2020-8558 guard). False leaves
    /// 127.0.0.0/8 out of node ports entirely, as kube-proxy's nftables mode does.
    /// Default true, on every backend. Node-scoped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub localhost_node_ports: Option<bool>,

    /// What a frontend of a service without usable endpoints does with new
    /// connections: Reject (the client sees "connection refused" at once; kube-proxy's
    /// behaviour) or Drop (the client times out). Default Reject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub no_endpoints_action: Option<NoEndpointsAction>,

    /// Whether topology hints (trafficDistribution, topology-aware routing) narrow the
    /// endpoints each node uses. Default true, as in kube-proxy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_aware_routing: Option<bool>,

    /// ClientIP session affinity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<SessionAffinitySettings>,

    /// How often the node agent reprograms the node. Node-scoped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncSettings>,
}

/// A CIDR (`10.0.0.0/8`, `fd00::/64`) or the keyword `primary`.
pub type NodePortAddress = String;

/// Source NAT of service traffic.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MasqueradeSettings {
    /// Masquerade all traffic to cluster IPs, not only traffic from outside the
    /// cluster. Default false.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub masquerade_all: Option<bool>,

    /// The bit of the packet mark that flags traffic for masquerade. Must not collide
    /// with other users of the mark (kube-proxy uses 14, kubelet 15). Default 14.
    /// Node-scoped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = 31))]
    pub masquerade_bit: Option<i32>,

    /// How the node tells pod traffic (not masqueraded) from traffic from outside the
    /// cluster (masqueraded). Node-scoped. Default: no detector.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_traffic_detector: Option<LocalTrafficDetector>,
}

/// How the node recognises traffic from local pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(extend("x-kubernetes-validations" = [{"rule": "self.mode != 'ClusterCIDR' || (has(self.clusterCIDRs) && size(self.clusterCIDRs) > 0)", "message": "mode ClusterCIDR needs clusterCIDRs"}]))]
pub struct LocalTrafficDetector {
    /// ClusterCIDR: sources inside clusterCIDRs are pods. NodeCIDR: sources inside the
    /// node's own `spec.podCIDRs` are pods. None: no source counts as a pod, so
    /// cluster-IP traffic is masqueraded only under masqueradeAll.
    pub mode: LocalTrafficDetectorMode,

    /// The cluster's pod CIDRs (at most one per IP family is typical). Used with mode
    /// ClusterCIDR.
    #[serde(
        default,
        rename = "clusterCIDRs",
        skip_serializing_if = "Vec::is_empty"
    )]
    #[schemars(length(max = 8), inner(length(max = 64)))]
    #[schemars(extend("x-kubernetes-validations" = [{"rule": "self.all(c, isCIDR(c))", "message": "each entry must be a CIDR"}]))]
    pub cluster_cidrs: Vec<String>,
}

/// See [`LocalTrafficDetector::mode`].
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum LocalTrafficDetectorMode {
    /// Pods are the sources inside the configured cluster CIDRs.
    #[serde(rename = "ClusterCIDR")]
    ClusterCidr,
    /// Pods are the sources inside the node's `spec.podCIDRs`.
    #[serde(rename = "NodeCIDR")]
    NodeCidr,
    /// No source is recognised as a pod.
    #[default]
    None,
}

/// ClientIP session affinity settings.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SessionAffinitySettings {
    /// Upper bound on a service's `sessionAffinityConfig.clientIP.timeoutSeconds`;
    /// longer timeouts are shortened to this. Default 86400 (the API's own maximum).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 86400))]
    pub max_timeout_seconds: Option<i32>,
}

/// Node agent sync timing.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SyncSettings {
    /// Minimum time between two syncs; changes arriving meanwhile are applied
    /// together. A duration such as `1s` or `500ms`. Default 1s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"), length(max = 32))]
    pub min_sync_period: Option<String>,

    /// Interval of full resyncs that repair rules someone else changed or flushed.
    /// A duration such as `30s`. Default 30s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(ms|s|m|h))+$"), length(max = 32))]
    pub sync_period: Option<String>,
}

/// What the controller observed of a ProxyPolicy.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyPolicyStatus {
    /// `Accepted`: True when the policy is valid and in force; False with reason
    /// Invalid and a message naming the offending field otherwise, in which case the
    /// last accepted version of the policy stays in force.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The metadata.generation the status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// How many nodes the policy selects.
    #[serde(default)]
    pub matched_nodes: i32,

    /// How many proxied services the policy selects.
    #[serde(default)]
    pub matched_services: i32,

    /// The spec in force: a copy of the last version of this policy that was
    /// accepted. When a later edit is invalid, this one keeps applying (also across
    /// controller restarts) until the policy is fixed or deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_spec: Option<ProxyPolicySpec>,

    /// The metadata.generation of [`Self::accepted_spec`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_generation: Option<i64>,
}
