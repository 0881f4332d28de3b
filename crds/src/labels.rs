//! Well-known labels, annotations and names shared by the controller and the agents.

/// The API group of every planproxy resource.
pub const GROUP: &str = "planproxy.dev";

/// Label on every ProxyPlan shard: the name of the node it programs.
/// The agent watches its own plans with this label selector.
pub const NODE_LABEL: &str = "planproxy.dev/node";

/// Label on every ProxyPlan shard: the shard index, so shards sort and list cheaply.
pub const SHARD_LABEL: &str = "planproxy.dev/shard";

/// Field manager (server-side apply) and event reporter of the controller.
pub const CONTROLLER_MANAGER: &str = "planproxy-controller";

/// Field manager of the node agent (it only ever writes ProxyPlan status).
pub const AGENT_MANAGER: &str = "planproxy-agent";

/// The name services carry to pick a service proxy; planproxy answers to this name
/// and to services without the label.
pub const SERVICE_PROXY_NAME_LABEL: &str = "service.kubernetes.io/service-proxy-name";

/// Services labelled with this key are headless and never proxied.
pub const HEADLESS_LABEL: &str = "service.kubernetes.io/headless";

/// The label joining an EndpointSlice to its Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Annotation the EndpointSlice controller sets to the time of the change that
/// triggered the slice's last update (used to measure network-programming latency).
pub const LAST_CHANGE_TRIGGER_TIME_ANNOTATION: &str =
    "endpoints.kubernetes.io/last-change-trigger-time";

/// The node label giving a node's zone, used for topology-aware routing.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// The name under which planproxy proxies services labelled with
/// [`SERVICE_PROXY_NAME_LABEL`]. Services naming any other proxy are left alone.
pub const SERVICE_PROXY_NAME: &str = "planproxy";

/// Annotation the controller sets on every ProxyPlan shard: the content hash of its
/// spec ([`crate::spec_hash`]). The agent reports the hash it programmed in
/// `status.appliedHash`, so the two compare at a glance.
pub const SPEC_HASH_ANNOTATION: &str = "planproxy.dev/spec-hash";
