//! Plan builders and helpers for the node agent's kernel and runtime tests:
//! every test builds its own isolated topology with `planproxy-netns` and
//! programs it with the agent's own binary, inside the node's namespace only.
//! [`cluster`] adds a real etcd and kube-apiserver and `planproxy-agent run`.

#![allow(dead_code)]

pub mod cluster;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::process::Output;

use planproxy_crds::ProxyPlanSpec;
// Not every test binary chains every builder.
#[allow(unused_imports)]
pub use planproxy_crds::testing::{
    EndpointExt, NodeSettingsExt, ServicePortExt, mk_endpoint, mk_plan, mk_service_port,
    mk_settings,
};
use planproxy_crds::v1alpha1::{EndpointPlan, ServicePortPlan};
use planproxy_netns::{Attempt, Netns, Node, Pod};

/// The port every echo server listens on.
pub const ECHO_PORT: u16 = 8080;

/// A ready endpoint at `ip` on [`ECHO_PORT`], local when it runs on the plan's node.
pub fn echo_endpoint(ip: impl Into<IpAddr>, local: bool) -> EndpointPlan {
    mk_endpoint(ip.into(), ECHO_PORT).local(local)
}

/// A ready endpoint on `pod`, local when the pod runs on `node`.
pub fn endpoint(pod: &Pod, node: u8, ipv6: bool) -> EndpointPlan {
    let ip: IpAddr = if ipv6 {
        pod.ipv6.into()
    } else {
        pod.ipv4.into()
    };
    echo_endpoint(ip, pod.node == node)
}

/// A TCP ClusterIP service `default/<name>` on `cluster_ip:80` with these
/// endpoints (cluster-wide set; eTP and iTP Cluster).
pub fn service(name: &str, cluster_ips: &[&str], endpoints: Vec<EndpointPlan>) -> ServicePortPlan {
    mk_service_port("default", name, cluster_ips, endpoints)
}

/// The single-shard plan of `node` holding `service_ports`.
pub fn plan(node: &Node, service_ports: Vec<ServicePortPlan>) -> ProxyPlanSpec {
    let settings = mk_settings(&["10.244.0.0/16", "fd00:244::/32"])
        .with_node_ips(&[&node.ipv4.to_string(), &node.ipv6.to_string()]);
    mk_plan(&format!("node{}", node.index), settings, service_ports)
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

/// `planproxy-agent apply --backend iptables` of `spec` in the node's
/// namespace, which must succeed (tests of other backends say which).
pub fn apply(node: &Node, spec: &ProxyPlanSpec) {
    apply_with(node, spec, &["--backend", "iptables"]);
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
        node.ns.netfilter_report()
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
