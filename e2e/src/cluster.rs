//! The namespace cluster: nodes, pods, a client and a control plane, each a
//! network namespace; the real control plane, planproxy installed with its
//! Helm chart, and the controller and agents running in them exactly as they
//! would in a real cluster.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use planproxy_control_plane::{ControlPlane, ControlPlaneConfig, MASTERS};
use planproxy_netns::{
    ChildGuard, Client, EchoConfig, EchoGuard, Host, Pod, Topology, TopologySpec,
};
use serde::Deserialize;
use serde_json::Value;

use crate::binaries;
use crate::control::Control;
use crate::error::{E2eError, Result};
use crate::install::{self, Launch};
use crate::objects::{self, ServiceDef};

/// The port components reach the API server on, on the control plane host
/// (the control plane's fault proxy; kube-apiserver itself listens on
/// another port of the same host, which the `kubernetes` Service points at).
pub const API_SERVER_PORT: u16 = 6443;
/// The control plane host's number on the node network (172.30.0.2).
const CONTROL_PLANE_HOST: u8 = 2;
/// kube-apiserver's `--service-cluster-ip-range`.
pub const SERVICE_CIDR_V4: &str = "10.96.0.0/16";
pub const SERVICE_CIDR_V6: &str = "fd00:96::/112";
/// The pod networks every node's pod CIDR is cut from (kube-proxy's
/// `--cluster-cidr`). Node *i*'s IPv6 pod CIDR is `fd00:244:i::/64`, whose
/// third group a /48 would fix at 0: the IPv6 range is a /32.
pub const CLUSTER_CIDR_V4: &str = "10.244.0.0/16";
pub const CLUSTER_CIDR_V6: &str = "fd00:244::/32";

/// How to build a namespace cluster.
#[derive(Clone, Debug)]
pub struct ClusterSpec {
    /// Number of nodes (`node1` … `nodeN`), 1 to 9 (the topology's limit).
    pub nodes: u8,
    /// Zone of each node, cycling (`topology.kubernetes.io/zone`).
    pub zones: Vec<String>,
    /// Clients outside the cluster.
    pub clients: u8,
    /// Start `planproxy-controller run`.
    pub controller: bool,
    /// Start `planproxy-agent run` on every node.
    pub agents: bool,
    /// Extra flags for the controller and the agents.
    pub controller_args: Vec<String>,
    pub agent_args: Vec<String>,
    /// Nodes (1-based) that the real kube-proxy programs instead of a
    /// planproxy agent: reference nodes, for comparing the two on the same
    /// cluster. The Node objects, pod routes and clients are the same.
    pub kube_proxy_nodes: BTreeMap<u8, KubeProxyMode>,
    /// Extra flags for every kube-proxy. Unless they include
    /// `--cluster-cidr` or `--detect-local-mode`, kube-proxy detects local
    /// traffic by the cluster CIDRs.
    pub kube_proxy_args: Vec<String>,
    /// The agent's `--backend` on these nodes (1-based); the others keep the
    /// chart's (the agent's default). Lets one cluster compare backends.
    pub agent_backends: BTreeMap<u8, String>,
}

/// kube-proxy's `--proxy-mode` on a reference node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KubeProxyMode {
    Iptables,
    Nftables,
}

impl KubeProxyMode {
    pub fn as_flag(self) -> &'static str {
        match self {
            KubeProxyMode::Iptables => "iptables",
            KubeProxyMode::Nftables => "nftables",
        }
    }
}

impl Default for ClusterSpec {
    fn default() -> Self {
        ClusterSpec {
            nodes: 2,
            zones: vec!["zone-a".into(), "zone-b".into()],
            clients: 1,
            controller: true,
            agents: true,
            controller_args: Vec::new(),
            agent_args: Vec::new(),
            kube_proxy_nodes: BTreeMap::new(),
            kube_proxy_args: Vec::new(),
            agent_backends: BTreeMap::new(),
        }
    }
}

impl ClusterSpec {
    /// Only the network and the API server: no controller, no agents.
    pub fn network_only(nodes: u8) -> Self {
        ClusterSpec {
            nodes,
            controller: false,
            agents: false,
            ..ClusterSpec::default()
        }
    }
}

/// A Deployment-like set of pods: each pod a namespace behind a node, running
/// an echo server that answers with the pod's name.
#[derive(Clone, Debug)]
pub struct AppDef {
    pub namespace: String,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub replicas: usize,
    /// Container ports the echo server answers on.
    pub tcp_ports: Vec<u16>,
    pub udp_ports: Vec<u16>,
    /// Nodes (1-based) the replicas are placed on, round robin; empty means
    /// every node.
    pub nodes: Vec<u8>,
}

impl AppDef {
    /// `replicas` pods labelled `app=<name>` in `default`, answering TCP and
    /// UDP on `port`, spread over every node.
    pub fn new(name: &str, replicas: usize, port: u16) -> Self {
        AppDef {
            namespace: "default".into(),
            name: name.into(),
            labels: BTreeMap::from([("app".to_owned(), name.to_owned())]),
            replicas,
            tcp_ports: vec![port],
            udp_ports: vec![port],
            nodes: Vec::new(),
        }
    }

    /// Places the replicas on these nodes only (1-based, round robin).
    pub fn on_nodes(mut self, nodes: &[u8]) -> Self {
        self.nodes = nodes.to_vec();
        self
    }
}

/// One running replica.
#[derive(Debug)]
pub struct AppPod {
    pub name: String,
    pub node_name: String,
    pub ready: bool,
    pub terminating: bool,
    _echo: EchoGuard,
    pub pod: Pod,
}

#[derive(Debug)]
struct AppState {
    def: AppDef,
    pods: Vec<AppPod>,
    next_pod: usize,
}

#[derive(Debug)]
struct ServiceRecord {
    def: ServiceDef,
    cluster_ips: Vec<IpAddr>,
    node_ports: Vec<u16>,
}

#[derive(Debug, Default)]
struct State {
    apps: BTreeMap<(String, String), AppState>,
    services: BTreeMap<(String, String), ServiceRecord>,
}

/// A running namespace cluster. Dropping it stops every process and deletes
/// every namespace; if that happens while a test panics, it first prints the
/// ProxyPlans, ProxyPolicies, the controller's and agents' logs and the
/// netfilter rules of every node.
pub struct Cluster {
    // Fields drop in this order: processes before the API server, the API
    // server before the network it listens on.
    agents: Mutex<Vec<(String, ChildGuard)>>,
    kube_proxies: Mutex<Vec<(String, ChildGuard)>>,
    controller: Mutex<Option<ChildGuard>>,
    state: Mutex<State>,
    controller_launch: Launch,
    agent_launch: Launch,
    apiserver: ControlPlane,
    kubeconfig_dir: tempfile::TempDir,
    control_plane: Host,
    /// One pod per node that belongs to no app: where "from a pod on node N"
    /// traffic starts.
    probe_pods: Vec<Pod>,
    topology: Topology,
    spec: ClusterSpec,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("api", &self.apiserver.url())
            .field("nodes", &self.spec.nodes)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Builds the network, starts the control plane in the control plane
    /// namespace, registers the Nodes, installs planproxy with `helm
    /// install`, and starts the controller and agents as the spec asks.
    pub fn start(spec: ClusterSpec) -> Result<Cluster> {
        if !(1..=9).contains(&spec.nodes) {
            return Err(E2eError::Invalid(format!(
                "a cluster has 1 to 9 nodes, not {}",
                spec.nodes
            )));
        }
        let topology = Topology::new(TopologySpec {
            nodes: spec.nodes,
            pods_per_node: 0,
            clients: spec.clients,
        })?;
        let control_plane = topology.add_host("control-plane", CONTROL_PLANE_HOST)?;
        let listen = SocketAddr::new(IpAddr::V4(control_plane.ipv4), API_SERVER_PORT);
        let config = ControlPlaneConfig {
            listen,
            bind: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            advertise: Some(listen.ip()),
            service_cidrs: format!("{SERVICE_CIDR_V4},{SERVICE_CIDR_V6}"),
            ..ControlPlaneConfig::default()
        };
        // Started from inside the control plane namespace: its processes and
        // its proxy live there.
        let apiserver = control_plane
            .ns
            .try_run_in(move || ControlPlane::start(config))?
            .map_err(|e| E2eError::ApiServer(e.to_string()))?;
        let kubeconfig_dir = tempfile::Builder::new()
            .prefix("planproxy-e2e-")
            .tempdir()
            .map_err(|e| E2eError::io("creating the kubeconfig directory", e))?;
        let probe_pods = topology
            .nodes
            .iter()
            .map(|node| node.add_pod("probe"))
            .collect::<Result<Vec<_>, _>>()?;
        register_nodes(&apiserver, &topology, &spec)?;
        install::install(
            &control_plane.ns,
            &apiserver,
            &chart_values(control_plane.ipv4),
            &[
                format!(
                    "controller.extraArgs={}",
                    json_strings(&spec.controller_args)
                ),
                format!("agent.extraArgs={}", json_strings(&spec.agent_args)),
            ],
        )?;
        let controller_launch =
            Launch::read(&apiserver, "Deployment", install::CONTROLLER_DEPLOYMENT)?;
        let agent_launch = Launch::read(&apiserver, "DaemonSet", install::AGENT_DAEMONSET)?;
        let cluster = Cluster {
            agents: Mutex::new(Vec::new()),
            kube_proxies: Mutex::new(Vec::new()),
            controller: Mutex::new(None),
            state: Mutex::new(State::default()),
            controller_launch,
            agent_launch,
            apiserver,
            kubeconfig_dir,
            control_plane,
            probe_pods,
            topology,
            spec,
        };
        if cluster.spec.controller {
            cluster.start_controller()?;
        }
        for (&index, &mode) in &cluster.spec.kube_proxy_nodes {
            cluster.start_kube_proxy(index, mode)?;
        }
        if cluster.spec.agents {
            for index in 1..=cluster.spec.nodes {
                if cluster.spec.kube_proxy_nodes.contains_key(&index) {
                    continue;
                }
                cluster.start_agent(index)?;
            }
        }
        Ok(cluster)
    }

    /// Writes `contents` as a kubeconfig file called `name` and returns its path.
    pub fn write_kubeconfig(&self, name: &str, contents: &str) -> Result<PathBuf> {
        let path = self
            .kubeconfig_dir
            .path()
            // KUBECONFIG is a colon-separated list: no colons in file names.
            .join(format!("{}.kubeconfig", name.replace(':', "-")));
        std::fs::write(&path, contents)
            .map_err(|e| E2eError::io(format!("writing {}", path.display()), e))?;
        Ok(path)
    }

    /// Starts the chart's controller: its Deployment's pod (`planproxy-controller-0`,
    /// bound to node1 as a scheduler might) runs in the control plane
    /// namespace with the template's arguments, as its service account.
    pub fn start_controller(&self) -> Result<()> {
        let pod = "planproxy-controller-0";
        let node = node_name(1);
        let ip = self.control_plane.ipv4.to_string();
        let host_ip = self.node(1).ipv4.to_string();
        let process = self.run_workload(
            &self.controller_launch,
            pod,
            &node,
            (&ip, &host_ip),
            &self.control_plane.ns,
            (binaries::CONTROLLER, &[]),
        )?;
        *lock(&self.controller) = Some(process);
        Ok(())
    }

    /// Starts the chart's agent on node N: its DaemonSet's pod for that node
    /// runs in the node's namespace (hostNetwork) with the template's
    /// arguments, as its service account, with a token bound to the pod.
    pub fn start_agent(&self, index: u8) -> Result<()> {
        let name = node_name(index);
        let pod = format!("planproxy-agent-{name}");
        let ip = self.node(index).ipv4.to_string();
        let extra_args: Vec<String> = self
            .spec
            .agent_backends
            .get(&index)
            .map(|backend| format!("--backend={backend}"))
            .into_iter()
            .collect();
        let process = self.run_workload(
            &self.agent_launch,
            &pod,
            &name,
            (&ip, &ip),
            &self.node(index).ns,
            (binaries::AGENT, &extra_args),
        )?;
        lock(&self.agents).push((name, process));
        Ok(())
    }

    /// Starts the real kube-proxy on node N, as a kubeadm DaemonSet would run
    /// it (its own identity `system:kube-proxy`, which the bootstrap policy
    /// binds to `system:node-proxier`), with what a node without a kubelet
    /// needs: conntrack limits left alone (they are global or read-only
    /// outside the initial namespace).
    pub fn start_kube_proxy(&self, index: u8, mode: KubeProxyMode) -> Result<()> {
        let name = node_name(index);
        let contents = self
            .apiserver
            .kubeconfig("system:kube-proxy", None)
            .map_err(|e| E2eError::ApiServer(e.to_string()))?;
        let kubeconfig = self.write_kubeconfig(&format!("kube-proxy-{name}"), &contents)?;
        let binary = planproxy_control_plane::binaries_dir()
            .map_err(|e| E2eError::ApiServer(e.to_string()))?
            .join("kube-proxy");
        let mut argv = vec![
            binary.display().to_string(),
            format!("--kubeconfig={}", kubeconfig.display()),
            format!("--hostname-override={name}"),
            format!("--proxy-mode={}", mode.as_flag()),
            "--conntrack-max-per-core=0".into(),
            "--conntrack-tcp-timeout-established=0s".into(),
            "--conntrack-tcp-timeout-close-wait=0s".into(),
            "--healthz-bind-address=0.0.0.0:10256".into(),
            "--metrics-bind-address=127.0.0.1:10249".into(),
            "--v=2".into(),
        ];
        // Local traffic is detected by the cluster CIDRs unless the spec
        // chooses how.
        let chooses_detector = self
            .spec
            .kube_proxy_args
            .iter()
            .any(|a| a.starts_with("--cluster-cidr") || a.starts_with("--detect-local-mode"));
        if !chooses_detector {
            argv.push(format!(
                "--cluster-cidr={CLUSTER_CIDR_V4},{CLUSTER_CIDR_V6}"
            ));
        }
        argv.extend(self.spec.kube_proxy_args.iter().cloned());
        let process = self.node(index).ns.spawn(&argv, &[])?;
        lock(&self.kube_proxies).push((name, process));
        Ok(())
    }

    /// Node N's kube-proxy log so far.
    pub fn kube_proxy_log(&self, index: u8) -> String {
        let name = node_name(index);
        lock(&self.kube_proxies)
            .iter()
            .find(|(n, _)| *n == name)
            .map_or_else(|| format!("(no kube-proxy on {name})"), |(_, p)| p.log())
    }

    /// Plays kubelet for one pod of a chart workload: the Pod object (made
    /// afresh, as after a restart), a bound token, and the process, given
    /// `extra_args` after the template's.
    fn run_workload(
        &self,
        launch: &Launch,
        pod: &str,
        node: &str,
        (pod_ip, host_ip): (&str, &str),
        ns: &planproxy_netns::Netns,
        (binary_name, extra_args): (&str, &[String]),
    ) -> Result<ChildGuard> {
        self.apiserver
            .delete("v1", "Pod", Some(install::NAMESPACE), pod, Some(0))
            .map_err(|e| E2eError::ApiServer(e.to_string()))?;
        let created = wait_until(Duration::from_secs(30), || {
            launch
                .create_pod(&self.apiserver, pod, node, pod_ip, host_ip)
                .ok()
        })
        .ok_or_else(|| E2eError::ApiServer(format!("creating pod {pod}")))?;
        let kubeconfig = install::pod_kubeconfig(
            &self.apiserver,
            launch,
            (&created.0, &created.1),
            self.kubeconfig_dir.path(),
        )?;
        let binary = binaries::locate(binary_name)?;
        let mut argv = vec![binary.display().to_string()];
        argv.extend(launch.argv.iter().skip(1).cloned());
        argv.extend(extra_args.iter().cloned());
        let mut env = launch.environment(pod, node)?;
        env.push(("KUBECONFIG".into(), kubeconfig.display().to_string()));
        env.push(("NO_COLOR".into(), "1".into()));
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Ok(ns.spawn(&argv, &env)?)
    }

    /// `Ok` while the controller and every started agent are still running;
    /// otherwise which one exited, how, and the end of its log. Scenarios
    /// check this last, so a crash that left the rules in place still fails.
    pub fn processes_running(&self) -> Result<()> {
        let mut dead = Vec::new();
        if let Some(controller) = lock(&self.controller).as_mut()
            && let Some(status) = controller.try_exit_status()?
        {
            dead.push(format!(
                "controller exited ({status}):\n{}",
                tail(&controller.log(), 20)
            ));
        }
        for (name, proxy) in lock(&self.kube_proxies).iter_mut() {
            if let Some(status) = proxy.try_exit_status()? {
                dead.push(format!(
                    "kube-proxy on {name} exited ({status}):\n{}",
                    tail(&proxy.log(), 20)
                ));
            }
        }
        for (name, agent) in lock(&self.agents).iter_mut() {
            if let Some(status) = agent.try_exit_status()? {
                dead.push(format!(
                    "agent on {name} exited ({status}):\n{}",
                    tail(&agent.log(), 20)
                ));
            }
        }
        if dead.is_empty() {
            Ok(())
        } else {
            Err(E2eError::Invalid(dead.join("\n")))
        }
    }

    /// Stops node N's agent (SIGTERM, then SIGKILL after `grace`).
    pub fn stop_agent(&self, index: u8, grace: Duration) -> Result<()> {
        let name = node_name(index);
        let mut agents = lock(&self.agents);
        if let Some(position) = agents.iter().position(|(n, _)| *n == name) {
            let (_, mut process) = agents.remove(position);
            process.terminate(grace)?;
        }
        Ok(())
    }

    /// Stops node N's kube-proxy (SIGTERM, then SIGKILL after `grace`); its
    /// rules stay, as after a crash.
    pub fn stop_kube_proxy(&self, index: u8, grace: Duration) -> Result<()> {
        let name = node_name(index);
        let mut proxies = lock(&self.kube_proxies);
        if let Some(position) = proxies.iter().position(|(n, _)| *n == name) {
            let (_, mut process) = proxies.remove(position);
            process.terminate(grace)?;
        }
        Ok(())
    }

    /// The process id of node N's kube-proxy, if one runs.
    pub fn kube_proxy_pid(&self, index: u8) -> Option<u32> {
        let name = node_name(index);
        lock(&self.kube_proxies)
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p.pid())
    }

    // ---- accessors ------------------------------------------------------------

    /// The control plane (etcd, kube-apiserver, kube-controller-manager).
    pub fn apiserver(&self) -> &ControlPlane {
        &self.apiserver
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Node N (1-based) of the network.
    pub fn node(&self, index: u8) -> &planproxy_netns::Node {
        self.topology.node(index)
    }

    /// The node names, `node1` … `nodeN`.
    pub fn node_names(&self) -> Vec<String> {
        (1..=self.spec.nodes).map(node_name).collect()
    }

    /// The nodes planproxy programs: every node but the kube-proxy reference nodes.
    pub fn planproxy_node_names(&self) -> Vec<String> {
        (1..=self.spec.nodes)
            .filter(|i| !self.spec.kube_proxy_nodes.contains_key(i))
            .map(node_name)
            .collect()
    }

    /// A pod on node N that belongs to no app.
    pub fn probe_pod(&self, index: u8) -> &Pod {
        &self.probe_pods[usize::from(index) - 1]
    }

    /// Client N (1-based) outside the cluster.
    pub fn client(&self, index: u8) -> &Client {
        &self.topology.clients[usize::from(index) - 1]
    }

    /// The control plane host (API server, controller).
    pub fn control_plane(&self) -> &Host {
        &self.control_plane
    }

    /// The controller's log so far.
    pub fn controller_log(&self) -> String {
        lock(&self.controller)
            .as_ref()
            .map_or_else(|| "(controller not running)".to_owned(), ChildGuard::log)
    }

    /// The process id of node N's agent, if one runs.
    pub fn agent_pid(&self, index: u8) -> Option<u32> {
        let name = node_name(index);
        lock(&self.agents)
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p.pid())
    }

    /// Node N's agent log so far.
    pub fn agent_log(&self, index: u8) -> String {
        let name = node_name(index);
        lock(&self.agents)
            .iter()
            .find(|(n, _)| *n == name)
            .map_or_else(|| format!("(no agent on {name})"), |(_, p)| p.log())
    }

    // ---- running test code against the API -------------------------------------

    /// Runs `scenario` on a thread inside the control plane namespace (where
    /// the API server is reachable) with a fresh tokio runtime and a kube
    /// client, and returns its result.
    pub fn run<'a, F, Fut, R>(&'a self, scenario: F) -> Result<R>
    where
        F: FnOnce(ClusterApi<'a>) -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        // run_in re-raises a panic of the scenario with its own message.
        self.control_plane.ns.run_in(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| E2eError::io("building a tokio runtime", e))?;
            runtime.block_on(async move {
                let client = self
                    .apiserver
                    .client("e2e-test", Some(MASTERS))
                    .await
                    .map_err(|e| E2eError::ApiServer(format!("building a client: {e}")))?;
                Ok(scenario(ClusterApi {
                    cluster: self,
                    client,
                })
                .await)
            })
        })
    }

    /// Runs `check` inside node N's namespace with a kube client built from
    /// a kubeconfig file the harness wrote for the node's own identity
    /// (`system:node:<name>` in `system:nodes`, as its kubelet has), through
    /// the same address the node's agent connects to.
    pub fn run_as_node<F, Fut, R>(&self, index: u8, check: F) -> Result<R>
    where
        F: FnOnce(kube::Client) -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        let user = format!("system:node:{}", node_name(index));
        let contents = self
            .apiserver
            .kubeconfig(&user, Some("system:nodes"))
            .map_err(|e| E2eError::ApiServer(e.to_string()))?;
        let path = self.write_kubeconfig(&user, &contents)?;
        self.run_in_with_kubeconfig(index, path, check)
    }

    /// Runs `check` inside node N's namespace with the kubeconfig node N's
    /// agent runs with: its service account, a token bound to its pod.
    pub fn run_as_agent<F, Fut, R>(&self, index: u8, check: F) -> Result<R>
    where
        F: FnOnce(kube::Client) -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        let path = self
            .kubeconfig_dir
            .path()
            .join(format!("planproxy-agent-{}.kubeconfig", node_name(index)));
        if !path.exists() {
            return Err(E2eError::Invalid(format!(
                "no agent was started on node {index}"
            )));
        }
        self.run_in_with_kubeconfig(index, path, check)
    }

    fn run_in_with_kubeconfig<F, Fut, R>(&self, index: u8, path: PathBuf, check: F) -> Result<R>
    where
        F: FnOnce(kube::Client) -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        self.node(index).ns.run_in(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| E2eError::io("building a tokio runtime", e))?;
            runtime.block_on(async move {
                let kubeconfig = kube::config::Kubeconfig::read_from(&path)
                    .map_err(|e| E2eError::Kubeconfig(e.to_string()))?;
                let config = kube::Config::from_custom_kubeconfig(
                    kubeconfig,
                    &kube::config::KubeConfigOptions::default(),
                )
                .await
                .map_err(|e| E2eError::Kubeconfig(e.to_string()))?;
                let client = kube::Client::try_from(config)?;
                Ok(check(client).await)
            })
        })
    }

    // ---- workloads: pod namespaces, and the Pod objects a kubelet would report ----

    /// Adds `count` replicas; returns their addresses (both families).
    fn add_replicas(&self, key: &(String, String), count: usize) -> Result<Vec<String>> {
        let mut added = Vec::new();
        for _ in 0..count {
            let (def, ordinal) = {
                let mut state = lock(&self.state);
                let app = state
                    .apps
                    .get_mut(key)
                    .ok_or_else(|| E2eError::Invalid(format!("no app {}/{}", key.0, key.1)))?;
                let ordinal = app.next_pod;
                app.next_pod += 1;
                (app.def.clone(), ordinal)
            };
            let nodes: Vec<u8> = if def.nodes.is_empty() {
                (1..=self.spec.nodes).collect()
            } else {
                def.nodes.clone()
            };
            let node_index = nodes[ordinal % nodes.len()];
            let pod_name = format!("{}-{ordinal}", def.name);
            let pod = self.node(node_index).add_pod(&pod_name)?;
            let echo = pod.ns.serve_echo(
                &pod_name,
                EchoConfig {
                    tcp_ports: def.tcp_ports.clone(),
                    udp_ports: def.udp_ports.clone(),
                    bind: Vec::new(),
                },
            )?;
            let node = node_name(node_index);
            self.apiserver
                .create(objects::app_pod(
                    &def.namespace,
                    &pod_name,
                    &def.labels,
                    &node,
                    &def.tcp_ports,
                    &def.udp_ports,
                ))
                .map_err(|e| E2eError::ApiServer(format!("creating pod {pod_name}: {e}")))?;
            let (v4, v6) = (pod.ipv4.to_string(), pod.ipv6.to_string());
            added.extend([v4.clone(), v6.clone()]);
            let host_ip = self.node(node_index).ipv4.to_string();
            objects::mark_pod_running(
                &self.apiserver,
                &def.namespace,
                &pod_name,
                &[&v4, &v6],
                &host_ip,
                true,
            )?;
            let mut state = lock(&self.state);
            if let Some(app) = state.apps.get_mut(key) {
                app.pods.push(AppPod {
                    name: pod_name,
                    node_name: node_name(node_index),
                    ready: true,
                    terminating: false,
                    _echo: echo,
                    pod,
                });
            }
        }
        Ok(added)
    }

    /// Which families (IPv4, IPv6) of `app`'s pods some Service the harness
    /// created selects, and so the EndpointSlice controller publishes.
    fn selected_families(&self, app: &AppDef) -> (bool, bool) {
        let state = lock(&self.state);
        let selecting: Vec<&ServiceRecord> = state
            .services
            .values()
            .filter(|s| selects(&s.def, app))
            .collect();
        (
            !selecting.is_empty(),
            selecting.iter().any(|s| s.def.dual_stack),
        )
    }

    /// The addresses (both families) of the ready pods `service` selects.
    fn pod_ips_selected_by(&self, service: &ServiceDef) -> Vec<String> {
        lock(&self.state)
            .apps
            .values()
            .filter(|app| selects(service, &app.def))
            .flat_map(|app| app.pods.iter().filter(|p| p.ready && !p.terminating))
            .flat_map(|p| [p.pod.ipv4.to_string(), p.pod.ipv6.to_string()])
            .filter(|ip| service.dual_stack || !ip.contains(':'))
            .collect()
    }

    /// Runs `f` on the app's pods (for data-plane checks against a pod).
    pub fn with_app_pods<R>(
        &self,
        namespace: &str,
        app: &str,
        f: impl FnOnce(&[AppPod]) -> R,
    ) -> R {
        let state = lock(&self.state);
        let pods = state
            .apps
            .get(&(namespace.to_owned(), app.to_owned()))
            .map_or(&[][..], |a| a.pods.as_slice());
        f(pods)
    }

    /// The names of an app's pods that are ready and not terminating.
    pub fn ready_pod_names(&self, namespace: &str, app: &str) -> Vec<String> {
        self.with_app_pods(namespace, app, |pods| {
            pods.iter()
                .filter(|p| p.ready && !p.terminating)
                .map(|p| p.name.clone())
                .collect()
        })
    }

    /// A service's cluster IP of one family and port, as a socket address.
    pub fn service_addr(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        ipv6: bool,
    ) -> Result<SocketAddr> {
        let state = lock(&self.state);
        let record = state
            .services
            .get(&(namespace.to_owned(), name.to_owned()))
            .ok_or_else(|| E2eError::Invalid(format!("no service {namespace}/{name}")))?;
        let ip = record
            .cluster_ips
            .iter()
            .find(|ip| ip.is_ipv6() == ipv6)
            .ok_or_else(|| E2eError::Invalid(format!("{namespace}/{name} has no such family")))?;
        Ok(SocketAddr::new(*ip, port))
    }

    /// The node port allocated for a service's port `port`.
    pub fn node_port(&self, namespace: &str, name: &str, port: u16) -> Result<u16> {
        let state = lock(&self.state);
        let record = state
            .services
            .get(&(namespace.to_owned(), name.to_owned()))
            .ok_or_else(|| E2eError::Invalid(format!("no service {namespace}/{name}")))?;
        record
            .def
            .ports
            .iter()
            .position(|p| p.port == port)
            .and_then(|i| record.node_ports.get(i).copied())
            .ok_or_else(|| {
                E2eError::Invalid(format!("{namespace}/{name} has no node port for {port}"))
            })
    }

    // ---- failure report ----------------------------------------------------------

    /// Everything useful to debug a failed scenario: ProxyPlans and
    /// ProxyPolicies as the API server holds them, the controller's and
    /// agents' logs, and every node's netfilter rules (iptables and nftables).
    pub fn report(&self) -> String {
        let mut out = String::new();
        out.push_str("===== ProxyPlans =====\n");
        for kind in ["ProxyPlan", "ProxyPolicy"] {
            for object in self.apiserver.list("planproxy.dev/v1alpha1", kind) {
                out.push_str(&serde_yaml::to_string(&object).unwrap_or_default());
                out.push_str("---\n");
            }
            if kind == "ProxyPlan" {
                out.push_str("===== ProxyPolicies =====\n");
            }
        }
        out.push_str("===== EndpointSlices =====\n");
        for object in self.apiserver.list("discovery.k8s.io/v1", "EndpointSlice") {
            out.push_str(&compact(&object));
        }
        out.push_str("===== controller log =====\n");
        out.push_str(&tail(&self.controller_log(), 200));
        for index in 1..=self.spec.nodes {
            out.push_str(&format!("===== agent log {} =====\n", node_name(index)));
            out.push_str(&tail(&self.agent_log(index), 200));
            // Every backend's rules: the agent may run iptables or nftables.
            out.push_str(&format!("===== netfilter {} =====\n", node_name(index)));
            out.push_str(&self.node(index).ns.netfilter_report());
            if self.spec.kube_proxy_nodes.contains_key(&index) {
                out.push_str(&format!(
                    "===== kube-proxy log {} =====\n",
                    node_name(index)
                ));
                out.push_str(&tail(&self.kube_proxy_log(index), 100));
            }
        }
        out.push_str(&self.apiserver.logs(60));
        out
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "\n######## planproxy e2e failure report ########\n{}",
                self.report()
            );
        }
    }
}

/// Test code's view of the cluster through the Kubernetes API (see
/// [`Cluster::run`]): what a user with `kubectl` would do, plus the
/// EndpointSlice controller's part, which the harness plays.
pub struct ClusterApi<'a> {
    pub cluster: &'a Cluster,
    pub client: kube::Client,
}

impl ClusterApi<'_> {
    /// Creates a Service; the API server allocates its cluster IPs and node
    /// ports, and the EndpointSlice controller publishes the pods it selects.
    pub async fn create_service(&self, def: &ServiceDef) -> Result<()> {
        let object = def.to_object(&[], &[])?;
        let api: kube::Api<k8s_openapi::api::core::v1::Service> =
            kube::Api::namespaced(self.client.clone(), &def.namespace);
        let created = api
            .create(&kube::api::PostParams::default(), &object)
            .await?;
        let spec = created.spec.unwrap_or_default();
        let cluster_ips = spec
            .cluster_ips
            .unwrap_or_default()
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        let node_ports = spec
            .ports
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.node_port.and_then(|n| u16::try_from(n).ok()))
            .collect();
        lock(&self.cluster.state).services.insert(
            (def.namespace.clone(), def.name.clone()),
            ServiceRecord {
                def: def.clone(),
                cluster_ips,
                node_ports,
            },
        );
        let selected = self.cluster.pod_ips_selected_by(def);
        self.wait_published(&def.namespace, &selected).await
    }

    /// Deletes a Service; the garbage collector removes its EndpointSlices.
    pub async fn delete_service(&self, namespace: &str, name: &str) -> Result<()> {
        let api: kube::Api<k8s_openapi::api::core::v1::Service> =
            kube::Api::namespaced(self.client.clone(), namespace);
        api.delete(name, &kube::api::DeleteParams::default())
            .await?;
        lock(&self.cluster.state)
            .services
            .remove(&(namespace.to_owned(), name.to_owned()));
        Ok(())
    }

    /// Starts an app's replicas: pod namespaces with echo servers, and their
    /// Pod objects, running and ready.
    pub async fn deploy(&self, def: &AppDef) -> Result<()> {
        let key = (def.namespace.clone(), def.name.clone());
        lock(&self.cluster.state).apps.insert(
            key.clone(),
            AppState {
                def: def.clone(),
                pods: Vec::new(),
                next_pod: 0,
            },
        );
        let added = self.cluster.add_replicas(&key, def.replicas)?;
        self.wait_published_if_selected(def, &added).await
    }

    /// Scales an app: new replicas start ready; surplus replicas (newest
    /// first) are deleted at once (grace period 0, as after their termination
    /// completed), and their namespaces stop once the EndpointSlices no
    /// longer list them.
    pub async fn scale(&self, namespace: &str, app: &str, replicas: usize) -> Result<()> {
        let key = (namespace.to_owned(), app.to_owned());
        let current = {
            let state = lock(&self.cluster.state);
            let app = state
                .apps
                .get(&key)
                .ok_or_else(|| E2eError::Invalid(format!("no app {namespace}/{app}")))?;
            app.pods.len()
        };
        if replicas >= current {
            let def = lock(&self.cluster.state)
                .apps
                .get(&key)
                .map(|a| a.def.clone());
            let added = self.cluster.add_replicas(&key, replicas - current)?;
            return match def {
                Some(def) => self.wait_published_if_selected(&def, &added).await,
                None => Ok(()),
            };
        }
        let removed: Vec<AppPod> = {
            let mut state = lock(&self.cluster.state);
            state
                .apps
                .get_mut(&key)
                .map(|app| app.pods.split_off(replicas))
                .unwrap_or_default()
        };
        for pod in &removed {
            self.cluster
                .apiserver
                .delete("v1", "Pod", Some(namespace), &pod.name, Some(0))
                .map_err(|e| E2eError::ApiServer(e.to_string()))?;
        }
        let gone: Vec<String> = removed
            .iter()
            .flat_map(|p| [p.pod.ipv4.to_string(), p.pod.ipv6.to_string()])
            .collect();
        self.wait_unpublished(namespace, &gone).await;
        drop(removed);
        Ok(())
    }

    /// Once a Service selects `def`'s pods, waits until the EndpointSlice
    /// controller has published every address of the `added` ones.
    async fn wait_published_if_selected(&self, def: &AppDef, added: &[String]) -> Result<()> {
        let families = self.cluster.selected_families(def);
        let expected: Vec<String> = added
            .iter()
            .filter(|ip| {
                if ip.contains(':') {
                    families.1
                } else {
                    families.0
                }
            })
            .cloned()
            .collect();
        self.wait_published(&def.namespace, &expected).await
    }

    /// Waits (up to 30 s) until EndpointSlices in `namespace` list every one of
    /// `ips` (both families are separate slices, written one after the other).
    async fn wait_published(&self, namespace: &str, ips: &[String]) -> Result<()> {
        let slices: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            kube::Api::namespaced(self.client.clone(), namespace);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let list = slices.list(&Default::default()).await?;
            let published: std::collections::BTreeSet<&String> = list
                .items
                .iter()
                .flat_map(|slice| slice.endpoints.iter().flat_map(|e| e.addresses.iter()))
                .collect();
            if ips.iter().all(|ip| published.contains(ip)) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(E2eError::Invalid(format!(
                    "the EndpointSlice controller did not publish {ips:?} within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (up to 30 s) until no EndpointSlice in `namespace` lists any of `ips`.
    async fn wait_unpublished(&self, namespace: &str, ips: &[String]) {
        let slices: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            kube::Api::namespaced(self.client.clone(), namespace);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while tokio::time::Instant::now() < deadline {
            let listed = slices.list(&Default::default()).await.map(|list| {
                list.items.iter().any(|slice| {
                    slice
                        .endpoints
                        .iter()
                        .any(|e| e.addresses.iter().any(|a| ips.contains(a)))
                })
            });
            if matches!(listed, Ok(false)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Deletes an app: its pods leave the EndpointSlices, then stop.
    pub async fn delete_app(&self, namespace: &str, app: &str) -> Result<()> {
        self.scale(namespace, app, 0).await?;
        lock(&self.cluster.state)
            .apps
            .remove(&(namespace.to_owned(), app.to_owned()));
        Ok(())
    }

    /// Starts one replica's graceful deletion, which no kubelet finishes: the
    /// pod keeps answering, stays Ready, and the EndpointSlice controller
    /// publishes it as terminating (ready=false, serving=true).
    pub async fn set_terminating(&self, namespace: &str, app: &str, pod: &str) -> Result<()> {
        {
            let mut state = lock(&self.cluster.state);
            let state_app = state
                .apps
                .get_mut(&(namespace.to_owned(), app.to_owned()))
                .ok_or_else(|| E2eError::Invalid(format!("no app {namespace}/{app}")))?;
            for p in state_app.pods.iter_mut().filter(|p| p.name == pod) {
                p.terminating = true;
            }
        }
        self.cluster
            .apiserver
            .delete("v1", "Pod", Some(namespace), pod, Some(3600))
            .map_err(|e| E2eError::ApiServer(e.to_string()))?;
        let ip = self.cluster.with_app_pods(namespace, app, |pods| {
            pods.iter()
                .find(|p| p.name == pod)
                .map(|p| p.pod.ipv4.to_string())
        });
        match ip {
            Some(ip) => self.wait_terminating(namespace, &ip).await,
            None => Ok(()),
        }
    }

    /// Waits (up to 30 s) until the EndpointSlices of `namespace` publish `ip`
    /// as terminating, if any publishes it at all.
    async fn wait_terminating(&self, namespace: &str, ip: &str) -> Result<()> {
        let slices: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
            kube::Api::namespaced(self.client.clone(), namespace);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let list = slices.list(&Default::default()).await?;
            let endpoints: Vec<_> = list
                .items
                .iter()
                .flat_map(|slice| slice.endpoints.iter())
                .filter(|e| e.addresses.iter().any(|a| a == ip))
                .collect();
            let terminating = |e: &&k8s_openapi::api::discovery::v1::Endpoint| {
                e.conditions.as_ref().and_then(|c| c.terminating) == Some(true)
            };
            if endpoints.is_empty() || endpoints.iter().all(terminating) {
                return Ok(());
            }
            if tokio::time::Instant::now() > deadline {
                return Err(E2eError::Invalid(format!(
                    "the EndpointSlice controller did not mark {ip} terminating within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The API-level operations (policies, plans), shared with real clusters.
    pub fn control(&self) -> Control {
        Control {
            client: self.client.clone(),
            nodes: self.cluster.planproxy_node_names(),
        }
    }

    /// See [`Control::apply_policy`].
    pub async fn apply_policy(&self, policy: Value) -> Result<()> {
        self.control().apply_policy(policy).await
    }

    /// See [`Control::plans`].
    pub async fn plans(&self) -> Result<Vec<planproxy_crds::ProxyPlan>> {
        self.control().plans().await
    }

    /// See [`Control::policy`].
    pub async fn policy(&self, name: &str) -> Result<planproxy_crds::ProxyPolicy> {
        self.control().policy(name).await
    }

    /// See [`Control::delete_policy`].
    pub async fn delete_policy(&self, name: &str) -> Result<()> {
        self.control().delete_policy(name).await
    }

    /// See [`Control::wait_plans`].
    pub async fn wait_plans(
        &self,
        what: &str,
        timeout: Duration,
        check: impl Fn(&[planproxy_crds::ProxyPlan]) -> Result<(), String>,
    ) -> Result<Vec<planproxy_crds::ProxyPlan>> {
        self.control().wait_plans(what, timeout, check).await
    }

    /// See [`Control::wait_policy_judged`].
    pub async fn wait_policy_judged(
        &self,
        name: &str,
        timeout: Duration,
    ) -> Result<(
        planproxy_crds::ProxyPolicy,
        planproxy_crds::condition::Condition,
    )> {
        self.control().wait_policy_judged(name, timeout).await
    }

    /// See [`Control::wait_programmed`].
    pub async fn wait_programmed(
        &self,
        service: Option<(&str, bool)>,
        timeout: Duration,
    ) -> Result<Vec<planproxy_crds::ProxyPlan>> {
        self.control().wait_programmed(service, timeout).await
    }
}

impl crate::target::Workloads for ClusterApi<'_> {
    fn control(&self) -> Control {
        ClusterApi::control(self)
    }

    async fn deploy(&self, app: &AppDef) -> Result<()> {
        ClusterApi::deploy(self, app).await
    }

    async fn scale(&self, namespace: &str, app: &str, replicas: usize) -> Result<()> {
        ClusterApi::scale(self, namespace, app, replicas).await
    }

    async fn create_service(&self, service: &ServiceDef) -> Result<()> {
        ClusterApi::create_service(self, service).await
    }

    async fn delete_service(&self, namespace: &str, name: &str) -> Result<()> {
        ClusterApi::delete_service(self, namespace, name).await
    }
}

/// Whether `service`'s selector picks `app`'s pods.
fn selects(service: &ServiceDef, app: &AppDef) -> bool {
    service.namespace == app.namespace
        && !service.selector.is_empty()
        && service
            .selector
            .iter()
            .all(|(k, v)| app.labels.get(k) == Some(v))
}

/// Registers the Nodes of the namespace cluster, as their kubelets would:
/// pod CIDRs, InternalIPs and zone labels.
fn register_nodes(apiserver: &ControlPlane, topology: &Topology, spec: &ClusterSpec) -> Result<()> {
    for node in &topology.nodes {
        let zone = spec
            .zones
            .get((usize::from(node.index) - 1) % spec.zones.len().max(1))
            .map(String::as_str);
        let object = objects::node(
            &node_name(node.index),
            &[node.pod_cidr_v4.to_string(), node.pod_cidr_v6.to_string()],
            &[node.ipv4.into(), node.ipv6.into()],
            zone,
        )?;
        let value = serde_json::to_value(object)
            .map_err(|e| E2eError::Invalid(format!("serialising a Node: {e}")))?;
        apiserver
            .create(value)
            .map_err(|e| E2eError::ApiServer(format!("creating a Node: {e}")))?;
    }
    Ok(())
}

/// The chart values the namespace cluster installs with: what an operator
/// would set on such a cluster (the API server's address, since nothing
/// serves the `kubernetes` Service before planproxy does; one controller
/// replica) and what keeps scenarios quick (a short coalescing window and
/// status interval, debug logs).
fn chart_values(host: Ipv4Addr) -> Vec<String> {
    vec![
        format!("k8sServiceHost={host}"),
        format!("k8sServicePort={API_SERVER_PORT}"),
        "controller.replicas=1".into(),
        "controller.leaderElection.enabled=false".into(),
        "controller.coalesceWindow=100ms".into(),
        "controller.adminPort=9090".into(),
        "controller.logLevel=info\\,planproxy_controller=debug".into(),
        "agent.statusMinInterval=100ms".into(),
        "agent.logLevel=info\\,planproxy_node_agent=debug".into(),
    ]
}

fn json_strings(values: &[String]) -> String {
    serde_json::to_string(values).unwrap_or_else(|_| "[]".into())
}

/// Polls `f` every 100 ms until it returns Some or `timeout` passes.
fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(value) = f() {
            return Some(value);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The Helm chart's CRD file, which `helm install` puts in the namespace
/// cluster (rather than the Rust types' view of it).
pub fn chart_crds_path() -> PathBuf {
    planproxy_control_plane::chart_crds_path()
}

/// The CRDs of the Helm chart ([`chart_crds_path`]).
pub fn chart_crds() -> Result<Vec<CustomResourceDefinition>> {
    let path = chart_crds_path();
    let text = std::fs::read_to_string(&path)
        .map_err(|e| E2eError::io(format!("reading {}", path.display()), e))?;
    let mut crds = Vec::new();
    for document in serde_yaml::Deserializer::from_str(&text) {
        let value = Value::deserialize(document)
            .map_err(|e| E2eError::Invalid(format!("{}: {e}", path.display())))?;
        if value.is_null() {
            continue;
        }
        crds.push(
            serde_json::from_value(value)
                .map_err(|e| E2eError::Invalid(format!("{}: {e}", path.display())))?,
        );
    }
    if crds.is_empty() {
        return Err(E2eError::Invalid(format!(
            "{} holds no CRD",
            path.display()
        )));
    }
    Ok(crds)
}

/// The name of node N.
pub fn node_name(index: u8) -> String {
    format!("node{index}")
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A test that panicked while holding the lock left consistent data:
    // every critical section here is a plain update.
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    let start = all.len().saturating_sub(lines);
    let mut out = all[start..].join("\n");
    out.push('\n');
    out
}

fn compact(object: &Value) -> String {
    let mut line = serde_json::to_string(object).unwrap_or_default();
    line.push('\n');
    line
}
