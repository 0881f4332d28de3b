//! A one-node cluster for the agent runtime tests: a real etcd and
//! kube-apiserver and the real `planproxy-agent run` binary, all inside the
//! node's own network namespace (the API server on the namespace's loopback,
//! reached through the control plane's fault proxy), a pod with an echo server
//! behind the node's bridge. Nothing touches the root namespace.

use std::io::Write;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use planproxy_control_plane::{ControlPlane, ControlPlaneConfig, MASTERS};
use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::testing::{NodeSettingsExt, mk_plan, mk_settings};
use planproxy_crds::v1alpha1::ServicePortPlan;
use planproxy_netns::{
    Attempt, ChildGuard, ConnectOpts, EchoConfig, EchoGuard, ProxyRules, Topology, TopologySpec,
};
use planproxy_node_agent::dataplane::{Backend, BackendChoice};
use serde_json::{Value, json};

use super::ECHO_PORT;

pub const HEALTHZ: &str = "127.0.0.1:10256";
pub const METRICS: &str = "127.0.0.1:10249";
pub const NODE: &str = "node1";

pub struct Cluster {
    /// What `--backend` the agent runs with.
    pub backend: BackendChoice,
    pub server: ControlPlane,
    pub kubeconfig: tempfile::NamedTempFile,
    pub agent: Option<ChildGuard>,
    pub echo: EchoGuard,
    pub topology: Topology,
}

impl Cluster {
    /// The cluster, with agents started by [`Self::start_agent`] programming
    /// the node with `backend`.
    pub fn start(backend: BackendChoice) -> Self {
        let topology = Topology::new(TopologySpec {
            nodes: 1,
            pods_per_node: 1,
            clients: 0,
        })
        .expect("a one-node topology must build");
        let echo = topology.node(1).pods[0]
            .ns
            .serve_echo("backend", EchoConfig::tcp(&[ECHO_PORT]))
            .expect("the echo server must start");
        // The agent tests write plans themselves: no controller-manager.
        let server = topology
            .node(1)
            .ns
            .run_in(|| {
                ControlPlane::start(ControlPlaneConfig {
                    controllers: Vec::new(),
                    ..ControlPlaneConfig::default()
                })
            })
            .expect("the control plane must start");
        server
            .install_planproxy_crds()
            .expect("the CRDs must install");
        let mut kubeconfig = tempfile::NamedTempFile::new().expect("a temp file");
        kubeconfig
            .write_all(
                server
                    .kubeconfig("agent", Some(MASTERS))
                    .expect("a kubeconfig")
                    .as_bytes(),
            )
            .expect("writing the kubeconfig");
        Self {
            backend,
            server,
            kubeconfig,
            agent: None,
            echo,
            topology,
        }
    }

    pub fn node_ns(&self) -> &planproxy_netns::Netns {
        &self.topology.node(1).ns
    }

    pub fn pod_ip(&self) -> IpAddr {
        self.topology.node(1).pods[0].ipv4.into()
    }

    pub fn start_agent(&mut self) {
        let path = self.kubeconfig.path().to_string_lossy().into_owned();
        let backend = self.backend.to_string();
        let agent = self
            .node_ns()
            .spawn(
                &[
                    env!("CARGO_BIN_EXE_planproxy-agent"),
                    "run",
                    "--node-name",
                    NODE,
                    "--healthz-bind-address",
                    HEALTHZ,
                    "--metrics-bind-address",
                    METRICS,
                    "--status-min-interval",
                    "100ms",
                    "--backend",
                    &backend,
                ],
                &[("KUBECONFIG", path.as_str()), ("PLANPROXY_LOG", "debug")],
            )
            .expect("the agent must start");
        self.agent = Some(agent);
    }

    pub fn agent_log(&self) -> String {
        self.agent.as_ref().map(ChildGuard::log).unwrap_or_default()
    }

    /// Creates or replaces the node's single shard.
    pub fn put_plan(&self, spec: &ProxyPlanSpec) {
        let object = json!({
            "apiVersion": "planproxy.dev/v1alpha1",
            "kind": "ProxyPlan",
            "metadata": {
                "name": NODE,
                "labels": { "planproxy.dev/node": NODE, "planproxy.dev/shard": "0" },
            },
            "spec": spec,
        });
        self.server.apply(object).expect("writing the plan");
    }

    pub fn plan_object(&self) -> Value {
        self.server
            .get("planproxy.dev/v1alpha1", "ProxyPlan", None, NODE)
            .expect("the plan exists")
    }

    /// The status condition `type_` of the node's shard: (status, reason, message).
    pub fn condition(&self, type_: &str) -> Option<(String, String, String)> {
        let plan = self.plan_object();
        let conditions = plan.pointer("/status/conditions")?.as_array()?.clone();
        conditions
            .into_iter()
            .find(|c| c["type"] == type_)
            .map(|c| {
                (
                    c["status"].as_str().unwrap_or_default().to_owned(),
                    c["reason"].as_str().unwrap_or_default().to_owned(),
                    c["message"].as_str().unwrap_or_default().to_owned(),
                )
            })
    }

    pub fn programmed_hash(&self, spec: &ProxyPlanSpec) -> bool {
        let plan = self.plan_object();
        let hash = planproxy_crds::spec_hash(spec);
        plan.pointer("/status/appliedHash").and_then(Value::as_str) == Some(hash.as_str())
            && self
                .condition("Programmed")
                .is_some_and(|(status, _, _)| status == "True")
    }

    /// A connection expected to succeed: generous, since a loaded CI machine may be
    /// slow to schedule the echo server, and success returns at once anyway.
    pub fn connect(&self, addr: SocketAddr) -> Attempt {
        self.node_ns()
            .connect_tcp(addr, &ConnectOpts::with_timeout(Duration::from_secs(10)))
    }

    /// A connection expected to fail: short, so the test does not wait out the
    /// generous limit of [`Self::connect`].
    pub fn connect_expecting_failure(&self, addr: SocketAddr) -> Attempt {
        self.node_ns()
            .connect_tcp(addr, &ConnectOpts::with_timeout(Duration::from_millis(500)))
    }

    /// planproxy's rules in the node, whichever backend wrote them.
    pub fn proxy_rules(&self) -> ProxyRules {
        self.node_ns()
            .proxy_rules()
            .expect("reading planproxy's rules in the node namespace")
    }

    /// Whether the agent runs the nftables backend (the iptables choice
    /// detects the host's variant).
    pub fn nftables(&self) -> bool {
        self.backend == BackendChoice::Exactly(Backend::Nftables)
    }

    /// GET `path` from `addr` inside the node namespace: (status code, body).
    pub fn http_get(&self, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
        self.node_ns().http_get(addr, path)
    }
}

/// Polls `check` every 50ms until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if check() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The node's single-shard plan, synced at most every 100ms.
pub fn plan(service_ports: Vec<ServicePortPlan>, sync_period: &str) -> ProxyPlanSpec {
    plan_with_sync_periods(service_ports, "100ms", sync_period)
}

/// The node's single-shard plan with these `minSyncPeriod` and `syncPeriod`.
pub fn plan_with_sync_periods(
    service_ports: Vec<ServicePortPlan>,
    min_sync_period: &str,
    sync_period: &str,
) -> ProxyPlanSpec {
    let settings = mk_settings(&["10.244.0.0/16"])
        .with_node_ips(&[&planproxy_netns::topology::node_ipv4(1).to_string()])
        .with_sync_periods(min_sync_period, sync_period);
    mk_plan(NODE, settings, service_ports)
}

/// Declares `#[test]`s `<name>::iptables` (the variant the host uses, as the
/// agent detects it by default) and `<name>::nftables`, each calling
/// `name(backend)` with the agent's `--backend` choice.
#[macro_export]
macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        $(
            mod $name {
                #[test]
                fn iptables() {
                    super::$name(planproxy_node_agent::dataplane::BackendChoice::Iptables);
                }

                #[test]
                fn nftables() {
                    super::$name(planproxy_node_agent::dataplane::BackendChoice::Exactly(
                        planproxy_node_agent::dataplane::Backend::Nftables,
                    ));
                }
            }
        )*
    };
}
