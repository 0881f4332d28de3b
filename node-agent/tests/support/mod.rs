//! Plan builders and helpers for the kernel tests: every test builds its own
//! isolated topology with `planproxy-netns` and programs it with the agent's own
//! binary, inside the node's namespace only.

#![allow(dead_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Output;

use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::v1alpha1::{
    ClientIpAffinity, EndpointPlan, EndpointSelection, EndpointSet, LocalTrafficDetectorMode,
    NoEndpointsAction, NodeSettings, Protocol, ResolvedLocalTrafficDetector, ServicePortPlan,
    ShardInfo, TrafficPolicy,
};
use planproxy_netns::{Attempt, Netns, Node, Pod};

/// The port every echo server listens on.
pub const ECHO_PORT: u16 = 8080;

/// A ready endpoint on `pod`, local when the pod runs on `node`.
pub fn endpoint(pod: &Pod, node: u8, ipv6: bool) -> EndpointPlan {
    let ip: IpAddr = if ipv6 {
        pod.ipv6.into()
    } else {
        pod.ipv4.into()
    };
    EndpointPlan {
        ip: ip.to_string(),
        port: ECHO_PORT,
        local: pod.node == node,
        ready: true,
        serving: true,
        terminating: false,
    }
}

/// A TCP ClusterIP service `default/<name>` on `cluster_ip:80` with these
/// endpoints (cluster-wide set; eTP and iTP Cluster).
pub fn service(name: &str, cluster_ips: &[&str], endpoints: Vec<EndpointPlan>) -> ServicePortPlan {
    ServicePortPlan {
        namespace: "default".into(),
        name: name.into(),
        protocol: Protocol::Tcp,
        cluster_ips: cluster_ips.iter().map(|s| (*s).to_owned()).collect(),
        port: 80,
        external_traffic_policy: TrafficPolicy::Cluster,
        internal_traffic_policy: TrafficPolicy::Cluster,
        no_endpoints_action: NoEndpointsAction::Reject,
        has_endpoints: !endpoints.is_empty(),
        cluster_endpoints: Some(EndpointSet {
            selection: if endpoints.is_empty() {
                EndpointSelection::None
            } else {
                EndpointSelection::Ready
            },
            endpoints,
        }),
        ..Default::default()
    }
}

/// The same service over UDP.
pub fn udp(mut sp: ServicePortPlan) -> ServicePortPlan {
    sp.protocol = Protocol::Udp;
    sp
}

/// ClientIP affinity with the API's default timeout.
pub fn with_affinity(mut sp: ServicePortPlan) -> ServicePortPlan {
    sp.session_affinity = Some(ClientIpAffinity {
        timeout_seconds: 10800,
    });
    sp
}

/// externalTrafficPolicy Local: the local endpoint set is the local subset.
pub fn external_local(mut sp: ServicePortPlan) -> ServicePortPlan {
    sp.external_traffic_policy = TrafficPolicy::Local;
    let local: Vec<EndpointPlan> = sp
        .cluster_endpoints
        .iter()
        .flat_map(|s| s.endpoints.iter())
        .filter(|e| e.local)
        .cloned()
        .collect();
    sp.local_endpoints = Some(EndpointSet {
        selection: if local.is_empty() {
            EndpointSelection::None
        } else {
            EndpointSelection::Ready
        },
        endpoints: local,
    });
    sp
}

/// The single-shard plan of `node` holding `service_ports`.
pub fn plan(node: &Node, service_ports: Vec<ServicePortPlan>) -> ProxyPlanSpec {
    ProxyPlanSpec {
        node_name: format!("node{}", node.index),
        shard: ShardInfo {
            index: 0,
            count: 1,
            generation: 1,
        },
        settings: NodeSettings {
            masquerade_bit: 14,
            local_traffic_detector: ResolvedLocalTrafficDetector {
                mode: LocalTrafficDetectorMode::ClusterCidr,
                cidrs: vec!["10.244.0.0/16".into(), "fd00:244::/32".into()],
            },
            node_ips: vec![node.ipv4.to_string(), node.ipv6.to_string()],
            min_sync_period: "1s".into(),
            sync_period: "30s".into(),
            ..Default::default()
        },
        service_ports,
    }
}

/// A plan file in a temporary directory, for `planproxy-agent apply --plan`.
pub struct PlanFile {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl PlanFile {
    pub fn new(spec: &ProxyPlanSpec) -> Self {
        let dir = tempfile::tempdir().expect("a temp dir must be creatable");
        let path = dir.path().join("plan.json");
        let json = serde_json::to_vec_pretty(spec).expect("a plan must serialise");
        std::fs::write(&path, json).expect("the plan file must be writable");
        PlanFile { _dir: dir, path }
    }
}

/// Runs the agent binary inside `ns` with `args`.
pub fn agent(ns: &Netns, args: &[&str]) -> Output {
    let mut argv = vec![env!("CARGO_BIN_EXE_planproxy-agent")];
    argv.extend_from_slice(args);
    ns.exec(&argv).expect("ip netns exec must start")
}

/// `planproxy-agent apply` of `spec` in the node's namespace, which must succeed.
pub fn apply(node: &Node, spec: &ProxyPlanSpec) {
    apply_with(node, spec, &[]);
}

/// [`apply`] with extra arguments (`--backend legacy`, `--layout flat`).
pub fn apply_with(node: &Node, spec: &ProxyPlanSpec, extra: &[&str]) {
    let file = PlanFile::new(spec);
    let path = file.path.to_string_lossy().into_owned();
    let mut args = vec!["apply", "--plan", path.as_str()];
    args.extend_from_slice(extra);
    let out = agent(&node.ns, &args);
    assert!(
        out.status.success(),
        "apply failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        node.ns.iptables_save()
    );
}

/// `addr` from an IP and port.
pub fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The server names of the successful attempts; panics on any failure.
pub fn servers(attempts: &[Attempt]) -> Vec<String> {
    attempts
        .iter()
        .map(|a| {
            a.server()
                .unwrap_or_else(|| panic!("connection failed: {a:?}"))
                .to_owned()
        })
        .collect()
}

/// Starts echo servers (TCP and UDP on [`ECHO_PORT`]) named after their pods.
pub fn serve_all<'a>(
    pods: impl IntoIterator<Item = (&'a Pod, &'a str)>,
) -> Vec<planproxy_netns::EchoGuard> {
    pods.into_iter()
        .map(|(pod, name)| {
            pod.ns
                .serve_echo(name, planproxy_netns::EchoConfig::tcp_and_udp(&[ECHO_PORT]))
                .expect("echo servers must start")
        })
        .collect()
}

/// Turns on hairpin mode on the pod's bridge port, as kubelet does
/// (`hairpinMode: hairpin-veth`): a pod's packet DNATed back to that pod while
/// being bridged must leave through the port it came in on.
pub fn hairpin(node: &Node, pod: &Pod) {
    node.ns
        .exec_ok(&[
            "ip",
            "link",
            "set",
            &pod.host_ifname,
            "type",
            "bridge_slave",
            "hairpin",
            "on",
        ])
        .expect("hairpin mode must be settable on the pod's port");
}
