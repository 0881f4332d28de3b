//! ProxyPlan: everything one node must program, decided by the controller.
//!
//! A node's plan is split into shards (`<node>` when there is one, `<node>-<index>`
//! otherwise), each holding the service ports whose stable hash falls into it, so a
//! change to one service rewrites one small object per node. Every shard carries the
//! shard count and the layout generation; an agent programs the node only from a
//! complete set (all indexes present, same count and generation), as ResourceSlice
//! pools do.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{NoEndpointsAction, Protocol, TrafficPolicy, proxy_policy::LocalTrafficDetectorMode};

/// The rules one node must program for one shard of its services.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "planproxy.dev",
    version = "v1alpha1",
    kind = "ProxyPlan",
    plural = "proxyplans",
    shortname = "pplan",
    doc = "A ProxyPlan holds everything one node must program for one shard of its services; the controller writes its spec, the node agent its status.",
    status = "ProxyPlanStatus",
    printcolumn = r#"{"name":"Node","type":"string","jsonPath":".spec.nodeName"}"#,
    printcolumn = r#"{"name":"Shard","type":"integer","jsonPath":".spec.shard.index","priority":1}"#,
    printcolumn = r#"{"name":"Programmed","type":"string","jsonPath":".status.conditions[?(@.type==\"Programmed\")].status"}"#,
    printcolumn = r#"{"name":"Services","type":"integer","jsonPath":".status.programmed.servicePorts"}"#,
    printcolumn = r#"{"name":"Endpoints","type":"integer","jsonPath":".status.programmed.endpoints"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct ProxyPlanSpec {
    /// The node this plan programs.
    pub node_name: String,

    /// Which part of the node's plan this object holds.
    pub shard: ShardInfo,

    /// Node-wide settings, resolved from the ProxyPolicies that select the node.
    pub settings: NodeSettings,

    /// The service ports of this shard, sorted by namespace, name, port name and
    /// protocol.
    #[serde(default)]
    pub service_ports: Vec<ServicePortPlan>,
}

/// Plans and their specs both lend the spec, so the renderer takes either.
impl AsRef<ProxyPlanSpec> for ProxyPlanSpec {
    fn as_ref(&self) -> &ProxyPlanSpec {
        self
    }
}

impl AsRef<ProxyPlanSpec> for ProxyPlan {
    fn as_ref(&self) -> &ProxyPlanSpec {
        &self.spec
    }
}

/// Position of a shard in its node's plan.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ShardInfo {
    /// This shard's index, from 0 to count-1.
    #[schemars(range(min = 0, max = 4095))]
    pub index: u32,
    /// How many shards the node's plan has.
    #[schemars(range(min = 1, max = 4096))]
    pub count: u32,
    /// The layout generation: it changes whenever the shard count changes (services
    /// then move between shards). Shards of different generations never form a
    /// complete plan.
    #[schemars(range(min = 1))]
    pub generation: i64,
}

/// Node-wide settings, already resolved.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeSettings {
    /// The bit of the packet mark that flags traffic for masquerade.
    #[schemars(range(min = 0, max = 31))]
    pub masquerade_bit: u8,

    /// How pod traffic is recognised; the CIDRs are resolved (cluster CIDRs, or the
    /// node's own pod CIDRs).
    pub local_traffic_detector: ResolvedLocalTrafficDetector,

    /// CIDRs of the node addresses that NodePorts answer on: the node's local
    /// addresses inside them, whatever Node status lists. Empty means every local
    /// address of the node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub node_port_addresses: Vec<String>,

    /// IPv4 NodePorts also answer on 127.0.0.0/8 for the node's own connections:
    /// the agent sets `net.ipv4.conf.all.route_localnet=1` and drops packets to
    /// 127.0.0.0/8 from other sources. True when the policies' `localhostNodePorts`
    /// (default true) is on and `nodePortAddresses` is empty or covers 127.0.0.0/8.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub localhost_node_ports: bool,

    /// The node's own addresses (from Node.status.addresses), used where a source
    /// range admits the node itself.
    #[serde(default, rename = "nodeIPs", skip_serializing_if = "Vec::is_empty")]
    pub node_ips: Vec<String>,

    /// Minimum time between two syncs of the agent (a duration, e.g. `1s`).
    pub min_sync_period: String,

    /// Interval of the agent's full resyncs (a duration, e.g. `30s`).
    pub sync_period: String,

    /// True while the Node is being deleted or drained for deletion (it has a
    /// deletionTimestamp or the cluster autoscaler's `ToBeDeletedByClusterAutoscaler`
    /// taint). The agent's `/healthz` then answers 503 so load balancers drain the
    /// node, as kube-proxy's does; the agent needs no access to Node objects.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_terminating: bool,
}

/// The local traffic detector with its CIDRs resolved for this node.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedLocalTrafficDetector {
    /// Which detector the policies chose.
    pub mode: LocalTrafficDetectorMode,
    /// Sources inside these CIDRs are pods. Empty when mode is None.
    #[serde(default, rename = "cidrs", skip_serializing_if = "Vec::is_empty")]
    pub cidrs: Vec<String>,
}

/// One port of one service, with everything the node needs to program it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServicePortPlan {
    /// The service's namespace.
    pub namespace: String,
    /// The service's name.
    pub name: String,
    /// The port's name; empty for a service's single unnamed port.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub port_name: String,
    /// The transport protocol.
    pub protocol: Protocol,

    /// The service's cluster IPs (one per IP family).
    #[serde(default, rename = "clusterIPs", skip_serializing_if = "Vec::is_empty")]
    pub cluster_ips: Vec<String>,
    /// The service port.
    pub port: u16,
    /// The node port, for NodePort and LoadBalancer services.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_port: Option<u16>,
    /// External IPs the service answers on.
    #[serde(default, rename = "externalIPs", skip_serializing_if = "Vec::is_empty")]
    pub external_ips: Vec<String>,
    /// Load-balancer ingress IPs the node must answer on (`ipMode: Proxy` ingress
    /// points are already excluded).
    #[serde(
        default,
        rename = "loadBalancerIPs",
        skip_serializing_if = "Vec::is_empty"
    )]
    pub load_balancer_ips: Vec<String>,
    /// When set, only these source CIDRs may reach the load-balancer IPs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub load_balancer_source_ranges: Vec<String>,

    /// ClientIP session affinity, when the service asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_affinity: Option<ClientIpAffinity>,
    /// The service's externalTrafficPolicy (Cluster for services that are not
    /// externally reachable).
    pub external_traffic_policy: TrafficPolicy,
    /// The service's internalTrafficPolicy.
    pub internal_traffic_policy: TrafficPolicy,
    /// The port on which the node answers load-balancer health checks for this
    /// service (externalTrafficPolicy Local load balancers only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health_check_node_port: Option<u16>,

    /// Masquerade all traffic to the cluster IPs, not only off-cluster traffic.
    #[serde(default)]
    pub masquerade_all: bool,
    /// What frontends do when no usable endpoint exists.
    pub no_endpoints_action: NoEndpointsAction,
    /// Whether any usable endpoint exists anywhere in the cluster (ready, or serving
    /// and terminating). When false every frontend rejects or drops.
    pub has_endpoints: bool,

    /// The cluster-wide endpoint set: used by internal traffic under
    /// internalTrafficPolicy Cluster, by external traffic under
    /// externalTrafficPolicy Cluster, and by pod and node traffic to external
    /// frontends under externalTrafficPolicy Local. Omitted when no traffic uses it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_endpoints: Option<EndpointSet>,
    /// The node-local endpoint set, used by whichever traffic policy is Local.
    /// Omitted when neither policy is Local.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_endpoints: Option<EndpointSet>,

    /// The newest `endpoints.kubernetes.io/last-change-trigger-time` of the
    /// service's EndpointSlices: when the change behind this content happened.
    /// Agents measure network-programming latency from it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_change_trigger_time: Option<Time>,
}

/// ClientIP session affinity.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientIpAffinity {
    /// How long a client stays with its endpoint after its last new connection.
    #[schemars(range(min = 1, max = 86400))]
    pub timeout_seconds: u32,
}

/// A chosen set of endpoints and why these were chosen.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointSet {
    /// Why the set holds what it holds.
    pub selection: EndpointSelection,
    /// The endpoints, sorted as kube-proxy sorts them (by the string `IP:port`).
    #[serde(default)]
    pub endpoints: Vec<EndpointPlan>,
}

/// Why an endpoint set holds what it holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum EndpointSelection {
    /// Every ready endpoint (of the set's scope).
    #[default]
    Ready,
    /// Ready endpoints hinted for this node's zone (topology-aware routing).
    TopologyZone,
    /// Ready endpoints hinted for this node (PreferSameNode).
    TopologyNode,
    /// No endpoint was ready, so the serving-but-terminating ones are used.
    TerminatingFallback,
    /// No usable endpoint.
    None,
}

/// One endpoint a frontend may reach.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EndpointPlan {
    /// The endpoint's IP address.
    pub ip: String,
    /// The endpoint's port (the EndpointSlice port for this service port).
    pub port: u16,
    /// Whether the endpoint runs on this node. Omitted when false, as are the other
    /// usually-false flags, to keep large plans small.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub local: bool,
    /// The EndpointSlice gives the endpoint no `nodeName` (hand-written slices
    /// of selector-less services), so it may run on this node: the node keeps
    /// hairpin masquerade for it, as for a local endpoint.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub node_unknown: bool,
    /// The EndpointSlice `ready` condition.
    pub ready: bool,
    /// The EndpointSlice `serving` condition.
    pub serving: bool,
    /// The EndpointSlice `terminating` condition.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub terminating: bool,
}

/// What the node agent reports about a shard.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProxyPlanStatus {
    /// `Programmed`: True when the node's kernel holds this shard's current spec
    /// (observedGeneration says which). `Degraded`: True when the last attempt to
    /// program the node failed; the message says which table and line, and the
    /// previously programmed rules keep serving.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The content hash of the spec the node holds (see `spec_hash`); equal to the
    /// controller's `planproxy.dev/spec-hash` annotation once the node caught up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_hash: Option<String>,

    /// What the node programmed for this shard.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub programmed: Option<ProgrammedSummary>,

    /// When the node last programmed a new version of this shard (not a heartbeat:
    /// periodic resyncs that change nothing do not move it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_time: Option<Time>,

    /// How long that sync took, in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_sync_duration_millis: Option<i64>,
}

/// Counts of what a node programmed for a shard.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ProgrammedSummary {
    /// Service ports programmed.
    pub service_ports: i32,
    /// Distinct endpoints programmed.
    pub endpoints: i32,
    /// iptables rules written for this shard, all tables and families.
    pub rules: i32,
    /// iptables chains owned by this shard, all tables and families.
    pub chains: i32,
}
