//! Builders for ProxyPlan specs in tests and benchmarks (feature `testing`).
//!
//! Every builder starts from the plain case (TCP, port 80, traffic policies
//! Cluster, REJECT when empty, a ready and serving endpoint) so a test only
//! spells out what it is about; the chainable methods of [`NodeSettingsExt`],
//! [`ServicePortExt`] and [`EndpointExt`] change one thing at a time.

use crate::ProxyPlanSpec;
use crate::v1alpha1::{
    ClientIpAffinity, EndpointPlan, EndpointSelection, EndpointSet, LocalTrafficDetectorMode,
    NoEndpointsAction, NodeSettings, Protocol, ResolvedLocalTrafficDetector, ServicePortPlan,
    ShardInfo, TrafficPolicy,
};

/// A ready, serving, not terminating endpoint on another node.
pub fn mk_endpoint(ip: impl ToString, port: u16) -> EndpointPlan {
    EndpointPlan {
        ip: ip.to_string(),
        port,
        local: false,
        node_unknown: false,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// The endpoint set the resolver writes for these endpoints: `Ready` when
/// there are any, `None` when there are none.
pub fn mk_endpoint_set(endpoints: Vec<EndpointPlan>) -> EndpointSet {
    EndpointSet {
        selection: if endpoints.is_empty() {
            EndpointSelection::None
        } else {
            EndpointSelection::Ready
        },
        endpoints,
    }
}

/// A TCP ClusterIP service port `<namespace>/<name>` on `<cluster_ips>:80`
/// whose cluster-wide endpoint set is `endpoints` (eTP and iTP Cluster,
/// REJECT when it has none).
pub fn mk_service_port(
    namespace: &str,
    name: &str,
    cluster_ips: &[&str],
    endpoints: Vec<EndpointPlan>,
) -> ServicePortPlan {
    ServicePortPlan {
        namespace: namespace.into(),
        name: name.into(),
        protocol: Protocol::Tcp,
        cluster_ips: cluster_ips.iter().map(|ip| (*ip).to_owned()).collect(),
        port: 80,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        no_endpoints_action: NoEndpointsAction::Reject,
        has_endpoints: !endpoints.is_empty(),
        cluster_endpoints: Some(mk_endpoint_set(endpoints)),
        ..Default::default()
    }
}

/// Node settings with masquerade bit 14, a cluster-CIDR local-traffic
/// detector over `cluster_cidrs`, no node IPs and sync periods 1s/30s.
pub fn mk_settings(cluster_cidrs: &[&str]) -> NodeSettings {
    NodeSettings {
        masquerade_bit: 14,
        local_traffic_detector: ResolvedLocalTrafficDetector {
            mode: LocalTrafficDetectorMode::ClusterCidr,
            cidrs: cluster_cidrs.iter().map(|c| (*c).to_owned()).collect(),
        },
        min_sync_period: "1s".into(),
        sync_period: "30s".into(),
        ..Default::default()
    }
}

/// The single-shard (index 0 of 1, generation 1) plan of `node_name`.
pub fn mk_plan(
    node_name: &str,
    settings: NodeSettings,
    service_ports: Vec<ServicePortPlan>,
) -> ProxyPlanSpec {
    ProxyPlanSpec {
        node_name: node_name.into(),
        shard: ShardInfo {
            index: 0,
            count: 1,
            generation: 1,
        },
        settings,
        service_ports,
    }
}

/// Chainable changes to [`NodeSettings`].
pub trait NodeSettingsExt {
    /// These node IPs (in this order).
    fn with_node_ips(self, node_ips: &[&str]) -> Self;
    /// These `minSyncPeriod` and `syncPeriod` strings.
    fn with_sync_periods(self, min_sync_period: &str, sync_period: &str) -> Self;
}

impl NodeSettingsExt for NodeSettings {
    fn with_node_ips(mut self, node_ips: &[&str]) -> Self {
        self.node_ips = node_ips.iter().map(|ip| (*ip).to_owned()).collect();
        self
    }

    fn with_sync_periods(mut self, min_sync_period: &str, sync_period: &str) -> Self {
        self.min_sync_period = min_sync_period.into();
        self.sync_period = sync_period.into();
        self
    }
}

/// Chainable changes to [`ServicePortPlan`].
pub trait ServicePortExt {
    /// The same service over UDP.
    fn udp(self) -> Self;
    /// ClientIP affinity with the API's default timeout (10800s).
    fn with_affinity(self) -> Self;
    /// externalTrafficPolicy Local, the local endpoint set being the local
    /// subset of the cluster-wide one.
    fn external_local(self) -> Self;
}

impl ServicePortExt for ServicePortPlan {
    fn udp(mut self) -> Self {
        self.protocol = Protocol::Udp;
        self
    }

    fn with_affinity(mut self) -> Self {
        self.session_affinity = Some(ClientIpAffinity {
            timeout_seconds: 10800,
        });
        self
    }

    fn external_local(mut self) -> Self {
        self.external_traffic_policy = TrafficPolicy::Local;
        let local: Vec<EndpointPlan> = self
            .cluster_endpoints
            .iter()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.local)
            .cloned()
            .collect();
        self.local_endpoints = Some(mk_endpoint_set(local));
        self
    }
}

/// Chainable changes to [`EndpointPlan`].
pub trait EndpointExt {
    /// Whether the endpoint runs on the plan's own node.
    fn local(self, local: bool) -> Self;
    /// The slice named no node for the endpoint.
    fn node_unknown(self) -> Self;
}

impl EndpointExt for EndpointPlan {
    fn local(mut self, local: bool) -> Self {
        self.local = local;
        self
    }
    fn node_unknown(mut self) -> Self {
        self.node_unknown = true;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_service_port_has_no_endpoints_and_selects_none() {
        let sp = mk_service_port("ns", "web", &["10.96.0.10"], vec![]);
        assert!(!sp.has_endpoints);
        assert_eq!(
            sp.cluster_endpoints.map(|s| s.selection),
            Some(EndpointSelection::None)
        );
    }

    #[test]
    fn external_local_keeps_only_local_endpoints() {
        let sp = mk_service_port(
            "ns",
            "web",
            &["10.96.0.10"],
            vec![
                mk_endpoint("10.244.1.2", 8080).local(true),
                mk_endpoint("10.244.2.2", 8080),
            ],
        )
        .external_local();
        let local = sp.local_endpoints.map(|s| s.endpoints).unwrap_or_default();
        assert_eq!(local, vec![mk_endpoint("10.244.1.2", 8080).local(true)]);
    }
}
