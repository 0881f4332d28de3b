//! Runs generated states on one cluster whose node1 planproxy programs and
//! whose node2 the real kube-proxy programs: create the state through the
//! real API, wait until both nodes hold it, send the same probes on both,
//! compare, delete the state.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use planproxy_netns::{Attempt, ConnectOpts, Netns};
use serde_json::{Value, json};

use super::outcome::{
    Addresses, Disagreement, Frontend, Outcome, PodInfo, ProbeKey, Source, compare,
};
use super::profile::NodeProfile;
use super::state::{Backend, Kind, NAMESPACE, PoolApp, State, Svc, TARGET_PORTS};
use crate::error::{E2eError, Result};
use crate::objects::{MANAGED_BY_LABEL, Protocol};
use crate::{AppDef, Cluster, ClusterSpec, KubeProxyMode};

/// The node planproxy's agent programs (node A).
pub const PLANPROXY_NODE: u8 = 1;
/// The node the real kube-proxy programs (node B).
pub const KUBE_PROXY_NODE: u8 = 2;

/// The ProxyPolicy that gives planproxy the settings kube-proxy runs with.
pub const POLICY: &str = "differential-kube-proxy-flags";

/// How long a state may take to reach both nodes.
const CONVERGE: Duration = Duration::from_secs(60);
/// Per-connection timeout of a probe: long enough for a loaded machine to
/// answer, short enough that a dropped frontend costs little.
const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(500);
/// The timeout of a second try after a connection answered too late.
const SLOW_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(3);
/// Connections per probe that gets answered: with two kinds of endpoint
/// equally likely, one kind is missed in 16 tries with probability 3e-5.
const ATTEMPTS: usize = 16;
/// Connections per answered hairpin probe.
const HAIRPIN_ATTEMPTS: usize = 40;
/// Probes run at once on a node.
const PROBE_WORKERS: usize = 8;
/// Who writes the hand-written EndpointSlices of selector-less services.
const MANUAL_MANAGER: &str = "differential.planproxy.dev";

/// One probe of a node, to run.
enum Job<'a> {
    /// From a namespace (a pod, the node, a client) whose addresses are
    /// `sender`.
    From {
        ns: &'a Netns,
        sender: Vec<IpAddr>,
        target: SocketAddr,
        protocol: Protocol,
        affinity: bool,
    },
    /// From an endpoint of `app` to its own service.
    Hairpin {
        app: PoolApp,
        target: SocketAddr,
        protocol: Protocol,
        affinity: bool,
    },
}

impl Job<'_> {
    fn affinity(&self) -> bool {
        match self {
            Job::From { affinity, .. } | Job::Hairpin { affinity, .. } => *affinity,
        }
    }
}

/// A pool pod: where it runs, and its addresses.
#[derive(Clone, Debug)]
struct PoolPod {
    name: String,
    node: u8,
    terminating: bool,
    ipv4: IpAddr,
    ipv6: IpAddr,
}

impl PoolPod {
    fn ip(&self, ipv6: bool) -> IpAddr {
        if ipv6 { self.ipv6 } else { self.ipv4 }
    }
}

/// What the API server allocated for a created service.
#[derive(Clone, Debug, Default)]
struct Allocated {
    cluster_ips: Vec<IpAddr>,
    /// Per port, in order.
    node_ports: Vec<Option<u16>>,
}

/// The result of one seed.
#[derive(Debug)]
pub struct SeedReport {
    pub state: State,
    pub probes: usize,
    pub disagreements: Vec<Disagreement>,
    pub elapsed: Duration,
    pub phases: Phases,
}

/// When, since the seed started, each phase of it ended: where a slow seed
/// spends its time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Phases {
    /// The state's objects created.
    pub applied: Duration,
    /// The EndpointSlices list every endpoint.
    pub published: Duration,
    /// planproxy's node has programmed a plan holding the state.
    pub planproxy_programmed: Duration,
    /// kube-proxy's node holds it too.
    pub converged: Duration,
    /// Both nodes probed.
    pub probed: Duration,
}

impl std::fmt::Display for Phases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "apply {:.1?}, slices {:.1?}, planproxy {:.1?}, kube-proxy {:.1?}, probe {:.1?}",
            self.applied,
            self.published.saturating_sub(self.applied),
            self.planproxy_programmed.saturating_sub(self.published),
            self.converged.saturating_sub(self.planproxy_programmed),
            self.probed.saturating_sub(self.converged)
        )
    }
}

/// A cluster prepared for differential runs: node1 planproxy, node2 the
/// real kube-proxy, both with the same node-level settings, the pool of
/// pods deployed.
pub struct Differential {
    pub cluster: Cluster,
    pub mode: KubeProxyMode,
    pub profile: NodeProfile,
    pool: BTreeMap<PoolApp, Vec<PoolPod>>,
}

impl Differential {
    /// Starts the cluster with kube-proxy running `profile`'s flags, gives
    /// planproxy the same settings as a policy, and deploys the pool.
    pub fn start(mode: KubeProxyMode, profile: NodeProfile) -> Result<Differential> {
        let cluster = Cluster::start(ClusterSpec {
            nodes: 2,
            kube_proxy_nodes: BTreeMap::from([(KUBE_PROXY_NODE, mode)]),
            kube_proxy_args: profile.kube_proxy_args(),
            ..ClusterSpec::default()
        })?;
        // A rejected connection is refused by an ICMP error from the node, and
        // the kernel rations those (per peer, and 1,000 a second with a burst
        // of 50 for the whole namespace): the probes' bursts of connects saw
        // some rejections as timeouts, on either proxy's node.
        for node in [PLANPROXY_NODE, KUBE_PROXY_NODE] {
            let ns = &cluster.node(node).ns;
            ns.sysctl("net.ipv4.icmp_ratelimit", "0")?;
            ns.sysctl("net.ipv6.icmp.ratelimit", "0")?;
            ns.sysctl("net.ipv4.icmp_msgs_per_sec", "100000")?;
            ns.sysctl("net.ipv4.icmp_msgs_burst", "100000")?;
        }
        cluster.run(|api| async move {
            api.apply_policy(json!({
                "apiVersion": "planproxy.dev/v1alpha1",
                "kind": "ProxyPolicy",
                "metadata": {"name": POLICY},
                "spec": profile.policy_spec(mode),
            }))
            .await?;
            let (_, accepted) = api.wait_policy_judged(POLICY, CONVERGE).await?;
            if accepted.status != planproxy_crds::condition::TRUE {
                return Err(E2eError::Invalid(format!(
                    "{POLICY} not accepted: {}",
                    accepted.message
                )));
            }
            for app in PoolApp::ALL {
                let mut def = AppDef::new(app.name(), app.replicas(), TARGET_PORTS[0])
                    .on_nodes(&[PLANPROXY_NODE, KUBE_PROXY_NODE]);
                def.tcp_ports = TARGET_PORTS.to_vec();
                def.udp_ports = TARGET_PORTS.to_vec();
                api.deploy(&def).await?;
                for ordinal in (0..app.replicas()).filter(|&o| app.terminating(o)) {
                    api.set_terminating(
                        NAMESPACE,
                        app.name(),
                        &format!("{}-{ordinal}", app.name()),
                    )
                    .await?;
                }
            }
            Ok(())
        })??;
        let mut pool = BTreeMap::new();
        for app in PoolApp::ALL {
            // A pod reaching itself through its service comes back out of
            // the bridge port it went in by: as a CNI's bridge plugin does
            // (kubelet's hairpin-veth), the pods' ports allow it, so that a
            // masqueraded hairpin connection can succeed at all.
            cluster.with_app_pods(NAMESPACE, app.name(), |pods| {
                pods.iter().try_for_each(|p| {
                    cluster
                        .node(p.pod.node)
                        .ns
                        .exec_ok(&[
                            "ip",
                            "link",
                            "set",
                            &p.pod.host_ifname,
                            "type",
                            "bridge_slave",
                            "hairpin",
                            "on",
                        ])
                        .map(|_| ())
                })
            })?;
            let pods = cluster.with_app_pods(NAMESPACE, app.name(), |pods| {
                pods.iter()
                    .map(|p| PoolPod {
                        name: p.name.clone(),
                        node: p.pod.node,
                        terminating: p.terminating,
                        ipv4: p.pod.ipv4.into(),
                        ipv6: p.pod.ipv6.into(),
                    })
                    .collect::<Vec<_>>()
            });
            pool.insert(app, pods);
        }
        Ok(Differential {
            cluster,
            mode,
            profile,
            pool,
        })
    }

    /// Runs one seed: creates its state, probes both nodes, deletes the
    /// state again (also when a step failed).
    pub fn run_seed(&self, seed: u64) -> Result<SeedReport> {
        let started = Instant::now();
        let state = State::generate(seed);
        let mut phases = Phases::default();
        let result = self.apply(&state).and_then(|allocated| {
            phases.applied = started.elapsed();
            self.wait_converged(&state, &allocated, started, &mut phases)?;
            let ours = self.probe_node(PLANPROXY_NODE, &state, &allocated)?;
            let theirs = self.probe_node(KUBE_PROXY_NODE, &state, &allocated)?;
            phases.probed = started.elapsed();
            Ok((ours.len(), compare(&ours, &theirs)))
        });
        self.teardown(&state);
        let (probes, disagreements) = result?;
        Ok(SeedReport {
            state,
            probes,
            disagreements,
            elapsed: started.elapsed(),
            phases,
        })
    }

    fn apply(&self, state: &State) -> Result<Vec<Allocated>> {
        let api = self.cluster.apiserver();
        let mut allocated = Vec::new();
        for svc in &state.services {
            let created = api
                .create(svc.to_object())
                .map_err(|e| E2eError::ApiServer(format!("creating {}: {e}", svc.name)))?;
            let spec = &created["spec"];
            let cluster_ips = spec["clusterIPs"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|ip| ip.as_str()?.parse().ok())
                .collect();
            let node_ports = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| p["nodePort"].as_u64().and_then(|n| u16::try_from(n).ok()))
                .collect();
            allocated.push(Allocated {
                cluster_ips,
                node_ports,
            });
            if svc.kind == Kind::LoadBalancer {
                // The cloud's part: the load balancer's addresses in status.
                let ingress: Vec<Value> = svc
                    .load_balancer_ips()
                    .iter()
                    .map(|ip| json!({"ip": ip}))
                    .collect();
                api.patch_status(
                    "v1",
                    "Service",
                    Some(NAMESPACE),
                    &svc.name,
                    json!({"status": {"loadBalancer": {"ingress": ingress}}}),
                )
                .map_err(|e| E2eError::ApiServer(format!("{} status: {e}", svc.name)))?;
            }
            if let Backend::Manual { app, node_names } = svc.backend {
                for ipv6 in svc.families.list() {
                    api.create(self.manual_slice(svc, app, node_names, ipv6))
                        .map_err(|e| E2eError::ApiServer(format!("{} slice: {e}", svc.name)))?;
                }
            }
        }
        Ok(allocated)
    }

    /// A hand-written EndpointSlice of a selector-less service, listing the
    /// pool app's pods as the EndpointSlice controller would (conditions,
    /// target refs), with `nodeName` only if asked.
    fn manual_slice(&self, svc: &Svc, app: PoolApp, node_names: bool, ipv6: bool) -> Value {
        let endpoints: Vec<Value> = self
            .pods(app)
            .iter()
            .map(|pod| {
                let mut endpoint = json!({
                    "addresses": [pod.ip(ipv6).to_string()],
                    "conditions": {
                        "ready": !pod.terminating,
                        "serving": true,
                        "terminating": pod.terminating,
                    },
                    "targetRef": {"kind": "Pod", "namespace": NAMESPACE, "name": pod.name},
                });
                if node_names {
                    endpoint["nodeName"] = json!(crate::node_name(pod.node));
                }
                endpoint
            })
            .collect();
        let ports: Vec<Value> = svc
            .ports
            .iter()
            .map(|p| json!({"name": p.name, "protocol": p.protocol.as_k8s(), "port": p.target.port()}))
            .collect();
        json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "namespace": NAMESPACE,
                "name": format!("{}-manual-{}", svc.name, if ipv6 { "v6" } else { "v4" }),
                "labels": {
                    "kubernetes.io/service-name": svc.name,
                    MANAGED_BY_LABEL: MANUAL_MANAGER,
                },
            },
            "addressType": if ipv6 { "IPv6" } else { "IPv4" },
            "endpoints": endpoints,
            "ports": ports,
        })
    }

    fn pods(&self, app: PoolApp) -> &[PoolPod] {
        self.pool.get(&app).map_or(&[], Vec::as_slice)
    }

    /// The endpoint addresses a service's EndpointSlices must list.
    fn expected_addresses(&self, svc: &Svc) -> BTreeSet<IpAddr> {
        svc.backend
            .app()
            .into_iter()
            .flat_map(|app| self.pods(app))
            .flat_map(|pod| svc.families.list().into_iter().map(|v6| pod.ip(v6)))
            .collect()
    }

    /// Waits until the EndpointSlices list every endpoint, planproxy's node
    /// has programmed a plan holding exactly this state, and kube-proxy has
    /// finished a sync that began after all of it was in the API.
    fn wait_converged(
        &self,
        state: &State,
        allocated: &[Allocated],
        started: Instant,
        phases: &mut Phases,
    ) -> Result<()> {
        let api = self.cluster.apiserver();
        crate::wait::eventually_sync("the state's EndpointSlices published", CONVERGE, || {
            let slices = api.list("discovery.k8s.io/v1", "EndpointSlice");
            for svc in &state.services {
                let published: BTreeSet<IpAddr> = slices
                    .iter()
                    .filter(|s| {
                        s["metadata"]["namespace"] == NAMESPACE
                            && s["metadata"]["labels"]["kubernetes.io/service-name"] == *svc.name
                    })
                    .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
                    .flat_map(|e| e["addresses"].as_array().cloned().unwrap_or_default())
                    .filter_map(|a| a.as_str()?.parse().ok())
                    .collect();
                if published != self.expected_addresses(svc) {
                    return Err(format!("{} lists {published:?}", svc.name));
                }
            }
            Ok(())
        })?;
        phases.published = started.elapsed();
        let expected: Vec<(String, ExpectedPort)> = state
            .services
            .iter()
            .zip(allocated)
            .flat_map(|(svc, alloc)| {
                svc.ports.iter().enumerate().map(move |(i, port)| {
                    (
                        format!("{}/{}", svc.name, port.name),
                        ExpectedPort {
                            node_port: alloc.node_ports.get(i).copied().flatten(),
                            external_ips: parse_all(&svc.external_ip_list()),
                            load_balancer_ips: parse_all(&svc.load_balancer_ips()),
                            families_with_endpoints: svc
                                .families
                                .list()
                                .into_iter()
                                .filter(|_| programs_endpoints(svc))
                                .collect(),
                        },
                    )
                })
            })
            .collect();
        let node = crate::node_name(PLANPROXY_NODE);
        self.cluster.run(|api| async move {
            api.wait_plans(
                "the state in planproxy's plan, programmed",
                CONVERGE,
                |plans| plan_holds(plans, &node, &expected),
            )
            .await
            .map(|_| ())
        })??;
        phases.planproxy_programmed = started.elapsed();
        self.wait_kube_proxy_synced(state)?;
        phases.converged = started.elapsed();
        Ok(())
    }

    /// Waits until kube-proxy's rules hold the state (every service port
    /// of every family, with endpoints where it has some, every external
    /// address, no service of another seed) and no change is queued behind
    /// its last sync. kube-proxy syncs only on changes (its periodic resync
    /// is hourly), so its metrics alone cannot tell a sync that has the
    /// state from one that ran before the state arrived.
    fn wait_kube_proxy_synced(&self, state: &State) -> Result<()> {
        let node = self.cluster.node(KUBE_PROXY_NODE);
        let metrics = SocketAddr::from(([127, 0, 0, 1], 10249));
        let mode = self.mode;
        let expected: Vec<ExpectedRules> = state
            .services
            .iter()
            .flat_map(|svc| {
                let addresses: Vec<IpAddr> = parse_all(&svc.external_ip_list())
                    .into_iter()
                    .chain(parse_all(&svc.load_balancer_ips()))
                    .collect();
                svc.ports.iter().flat_map(move |port| {
                    let addresses = addresses.clone();
                    svc.families
                        .list()
                        .into_iter()
                        .map(move |ipv6| ExpectedRules {
                            port: format!("{NAMESPACE}/{}:{}", svc.name, port.name),
                            chain: format!(
                                "{NAMESPACE}/{}/{}/{}",
                                svc.name,
                                port.protocol.as_k8s().to_lowercase(),
                                port.name
                            ),
                            ipv6,
                            with_endpoints: programs_endpoints(svc),
                            addresses: addresses
                                .iter()
                                .copied()
                                .filter(|a| a.is_ipv6() == ipv6)
                                .collect(),
                        })
                })
            })
            .collect();
        let names: BTreeSet<&str> = state.services.iter().map(|s| s.name.as_str()).collect();
        crate::wait::eventually_sync("kube-proxy's rules hold the state", CONVERGE, || {
            let listing = |command: &[&str]| node.ns.exec_ok(command).map_err(|e| e.to_string());
            let rules = match mode {
                KubeProxyMode::Iptables => {
                    [listing(&["iptables-save"])?, listing(&["ip6tables-save"])?]
                }
                KubeProxyMode::Nftables => [
                    listing(&["nft", "list", "table", "ip", "kube-proxy"])?,
                    listing(&["nft", "list", "table", "ip6", "kube-proxy"])?,
                ],
            };
            for text in &rules {
                for name in generated_services_in(text) {
                    if !names.contains(name.as_str()) {
                        return Err(format!("rules still hold {name}"));
                    }
                }
            }
            for want in &expected {
                want.held_by(mode, &rules[usize::from(want.ipv6)])?;
            }
            let body = get_http10(&node.ns, metrics, "/metrics").ok_or("no /metrics answer")?;
            let synced = metric(&body, "kubeproxy_sync_proxy_rules_last_timestamp_seconds");
            let queued = metric(
                &body,
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            );
            if queued.is_empty() {
                return Err("no sync queued yet".into());
            }
            for (family, queued) in &queued {
                match synced.get(family) {
                    Some(synced) if synced >= queued => {}
                    other => {
                        return Err(format!(
                            "{family}: last sync {other:?}, last queued change {queued}"
                        ));
                    }
                }
            }
            Ok(())
        })
        .map_err(|e| {
            E2eError::Invalid(format!(
                "{e}\n{}",
                self.cluster.kube_proxy_log(KUBE_PROXY_NODE)
            ))
        })
    }

    /// Sends every probe of `state` on node `node`.
    fn probe_node(
        &self,
        node: u8,
        state: &State,
        allocated: &[Allocated],
    ) -> Result<BTreeMap<ProbeKey, Outcome>> {
        let external: Vec<String> = state
            .services
            .iter()
            .flat_map(|s| {
                s.external_ip_list()
                    .into_iter()
                    .chain(s.load_balancer_ips())
            })
            .collect();
        // The outside world's routers send the service's external addresses
        // to the probed node, as a load balancer or BGP would.
        for ip in &external {
            self.route(ip, Some(node))?;
        }
        let mut jobs: Vec<(ProbeKey, Job<'_>)> = Vec::new();
        let node_ref = self.cluster.node(node);
        let client = self.cluster.client(1);
        let probe_pod = self.cluster.probe_pod(node);
        for (svc, alloc) in state.services.iter().zip(allocated) {
            for (port_index, port) in svc.ports.iter().enumerate() {
                for ipv6 in svc.families.list() {
                    let key = |frontend, source| ProbeKey {
                        service: svc.name.clone(),
                        port: port.name.clone(),
                        ipv6,
                        frontend,
                        source,
                    };
                    let mut targets: Vec<(Frontend, IpAddr, u16)> = Vec::new();
                    if let Some(ip) = alloc.cluster_ips.iter().find(|ip| ip.is_ipv6() == ipv6) {
                        targets.push((Frontend::ClusterIp, *ip, port.port));
                    }
                    for ip in parse_all(&svc.external_ip_list()) {
                        if ip.is_ipv6() == ipv6 {
                            targets.push((Frontend::ExternalIp, ip, port.port));
                        }
                    }
                    for ip in parse_all(&svc.load_balancer_ips()) {
                        if ip.is_ipv6() == ipv6 {
                            targets.push((Frontend::LoadBalancer, ip, port.port));
                        }
                    }
                    if let Some(node_port) = alloc.node_ports.get(port_index).copied().flatten() {
                        let ip = if ipv6 {
                            IpAddr::V6(node_ref.ipv6)
                        } else {
                            IpAddr::V4(node_ref.ipv4)
                        };
                        targets.push((Frontend::NodePort, ip, node_port));
                        // A local address Node status does not list: node
                        // ports are matched against the node's interfaces.
                        let bridge = if ipv6 {
                            IpAddr::V6(node_ref.gateway_v6())
                        } else {
                            IpAddr::V4(node_ref.gateway_v4())
                        };
                        targets.push((Frontend::NodePortBridge, bridge, node_port));
                        if !ipv6 {
                            targets.push((
                                Frontend::NodePortLocalhost,
                                IpAddr::from([127, 0, 0, 1]),
                                node_port,
                            ));
                        }
                    }
                    for (frontend, ip, target_port) in targets {
                        let target = SocketAddr::new(ip, target_port);
                        let mut sources: Vec<(Source, &Netns, Vec<IpAddr>)> = Vec::new();
                        if frontend == Frontend::NodePortLocalhost {
                            sources.push((Source::Node, &node_ref.ns, Vec::new()));
                        } else if frontend == Frontend::NodePortBridge {
                            sources.push((
                                Source::Pod,
                                &probe_pod.ns,
                                vec![probe_pod.ipv4.into(), probe_pod.ipv6.into()],
                            ));
                        } else {
                            sources.push((
                                Source::Pod,
                                &probe_pod.ns,
                                vec![probe_pod.ipv4.into(), probe_pod.ipv6.into()],
                            ));
                            sources.push((Source::Node, &node_ref.ns, Vec::new()));
                            if frontend != Frontend::ClusterIp {
                                sources.push((
                                    Source::Client,
                                    &client.ns,
                                    vec![client.ipv4.into(), client.ipv6.into()],
                                ));
                            }
                        }
                        for (source, ns, sender) in sources {
                            jobs.push((
                                key(frontend, source),
                                Job::From {
                                    ns,
                                    sender,
                                    target,
                                    protocol: port.protocol,
                                    affinity: svc.affinity,
                                },
                            ));
                        }
                        if frontend == Frontend::ClusterIp
                            && let Some(app) = svc.backend.app()
                        {
                            jobs.push((
                                key(frontend, Source::Hairpin),
                                Job::Hairpin {
                                    app,
                                    target,
                                    protocol: port.protocol,
                                    affinity: svc.affinity,
                                },
                            ));
                        }
                    }
                }
            }
        }
        Ok(self.run_jobs(node, jobs))
    }

    /// Runs a node's probes, [`PROBE_WORKERS`] at a time: each probe's
    /// connections are sequential (affinity and endpoint coverage are about
    /// their order), but probes of different frontends share nothing but
    /// the namespaces, and most of a probe's time is waiting for timeouts.
    /// Probes of ClientIP-affinity services are the exception: every frontend
    /// of a service port shares one affinity table, and two first connections
    /// from one client racing through it can both miss it and stick to
    /// different endpoints, on either proxy. They run one after another, on
    /// a worker of their own.
    fn run_jobs(&self, node: u8, jobs: Vec<(ProbeKey, Job<'_>)>) -> BTreeMap<ProbeKey, Outcome> {
        let (affine, free): (Vec<_>, Vec<_>) =
            jobs.into_iter().partition(|(_, job)| job.affinity());
        let results = Mutex::new(BTreeMap::new());
        let drain = |queue: &[(ProbeKey, Job<'_>)], next: &AtomicUsize| {
            while let Some((key, job)) = queue.get(next.fetch_add(1, Ordering::Relaxed)) {
                let outcome = self.run_job(node, job);
                results
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(key.clone(), outcome);
            }
        };
        let (next_free, next_affine) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|scope| {
            let free_workers = PROBE_WORKERS - usize::from(!affine.is_empty());
            for _ in 0..free_workers.min(free.len()) {
                scope.spawn(|| drain(&free, &next_free));
            }
            if !affine.is_empty() {
                scope.spawn(|| drain(&affine, &next_affine));
            }
        });
        results
            .into_inner()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn run_job(&self, node: u8, job: &Job<'_>) -> Outcome {
        match job {
            Job::From {
                ns,
                sender,
                target,
                protocol,
                affinity,
            } => self.probe(
                ns,
                node,
                *target,
                *protocol,
                sender.clone(),
                (*affinity, false),
            ),
            Job::Hairpin {
                app,
                target,
                protocol,
                affinity,
            } => self.hairpin(*app, node, *target, *protocol, *affinity),
        }
    }

    /// From an endpoint of `app` on `node` (a ready one if there is one) to
    /// its own service.
    fn hairpin(
        &self,
        app: PoolApp,
        node: u8,
        target: SocketAddr,
        protocol: Protocol,
        affinity: bool,
    ) -> Outcome {
        self.cluster.with_app_pods(NAMESPACE, app.name(), |pods| {
            let on_node = |terminating: bool| {
                pods.iter()
                    .find(|p| p.pod.node == node && p.terminating == terminating)
            };
            match on_node(false).or_else(|| on_node(true)) {
                Some(pod) => self.probe(
                    &pod.pod.ns,
                    node,
                    target,
                    protocol,
                    vec![pod.pod.ipv4.into(), pod.pod.ipv6.into()],
                    (affinity, true),
                ),
                None => Outcome::default(),
            }
        })
    }

    /// Connections from `from` to `target`: a first one, and if it was
    /// answered, more to see every endpoint; if not, one more to confirm.
    fn probe(
        &self,
        from: &Netns,
        node: u8,
        target: SocketAddr,
        protocol: Protocol,
        sender: Vec<IpAddr>,
        (affinity, hairpin): (bool, bool),
    ) -> Outcome {
        let connect_within = |n: usize, timeout: Duration| -> Vec<Attempt> {
            let opts = ConnectOpts::with_timeout(timeout);
            match protocol {
                Protocol::Tcp => from.connect_many(target, n, &opts),
                Protocol::Udp => from.connect_many_udp(target, n, &opts),
            }
        };
        // A connection that was accepted but answered late is a loaded
        // machine, not a verdict: it is tried again with more patience.
        let connect = |n: usize| -> Vec<Attempt> {
            connect_within(n, ATTEMPT_TIMEOUT)
                .into_iter()
                .map(|attempt| match &attempt {
                    Attempt::Other(error) if error.contains("no reply") => {
                        connect_within(1, SLOW_ATTEMPT_TIMEOUT)
                            .pop()
                            .unwrap_or(attempt)
                    }
                    _ => attempt,
                })
                .collect()
        };
        // Three first: an endpoint that fails (a hairpin without
        // masquerade, say) among several shows as "partly" unless all three
        // happen to pick it.
        let mut attempts = connect(3);
        if attempts.iter().any(Attempt::is_ok) {
            // From an endpoint, whether it was ever sent to itself decides
            // whether a masqueraded connection shows: with four endpoints,
            // 40 tries miss it with probability 1e-5 (16 would with 1 %).
            let total = if hairpin { HAIRPIN_ATTEMPTS } else { ATTEMPTS };
            attempts.extend(connect(total - 3));
        }
        let pods: BTreeMap<String, PodInfo> = self
            .pool
            .values()
            .flatten()
            .map(|p| {
                (
                    p.name.clone(),
                    PodInfo {
                        node: p.node,
                        terminating: p.terminating,
                    },
                )
            })
            .collect();
        Outcome::from_attempts(
            &attempts,
            node,
            &pods,
            &self.addresses(node, sender),
            affinity,
            hairpin,
        )
    }

    fn addresses(&self, node: u8, sender: Vec<IpAddr>) -> Addresses {
        let addrs = |index: u8| {
            let n = self.cluster.node(index);
            (
                vec![IpAddr::V4(n.ipv4), IpAddr::V6(n.ipv6)],
                vec![IpAddr::V4(n.gateway_v4()), IpAddr::V6(n.gateway_v6())],
            )
        };
        let (own, bridge) = addrs(node);
        let other = if node == PLANPROXY_NODE {
            KUBE_PROXY_NODE
        } else {
            PLANPROXY_NODE
        };
        let (other_ip, other_bridge) = addrs(other);
        Addresses {
            node: own,
            node_bridge: bridge,
            other_nodes: other_ip.into_iter().chain(other_bridge).collect(),
            sender,
        }
    }

    /// Routes `ip` from the router to node `node`, or removes its route.
    fn route(&self, ip: &str, node: Option<u8>) -> Result<()> {
        let parsed: IpAddr = ip
            .parse()
            .map_err(|e| E2eError::Invalid(format!("{ip}: {e}")))?;
        let family = if parsed.is_ipv6() { "-6" } else { "-4" };
        let prefix = if parsed.is_ipv6() { 128 } else { 32 };
        let destination = format!("{ip}/{prefix}");
        let router = &self.cluster.topology().router;
        match node {
            Some(index) => {
                let n = self.cluster.node(index);
                let via = if parsed.is_ipv6() {
                    n.ipv6.to_string()
                } else {
                    n.ipv4.to_string()
                };
                router.exec_ok(&["ip", family, "route", "replace", &destination, "via", &via])?;
            }
            None => {
                // Absent is fine: a failed apply may not have routed it.
                let _ = router.exec(&["ip", family, "route", "del", &destination]);
            }
        }
        Ok(())
    }

    /// Deletes the state's objects and routes; best effort, so that one
    /// failed seed does not stop the next.
    fn teardown(&self, state: &State) {
        let api = self.cluster.apiserver();
        for svc in &state.services {
            let _ = api.delete("v1", "Service", Some(NAMESPACE), &svc.name, None);
            if matches!(svc.backend, Backend::Manual { .. }) {
                for v6 in ["v4", "v6"] {
                    let name = format!("{}-manual-{v6}", svc.name);
                    let _ = api.delete(
                        "discovery.k8s.io/v1",
                        "EndpointSlice",
                        Some(NAMESPACE),
                        &name,
                        None,
                    );
                }
            }
            for ip in svc
                .external_ip_list()
                .iter()
                .chain(&svc.load_balancer_ips())
            {
                let _ = self.route(ip, None);
            }
        }
    }
}

/// What kube-proxy's rules must hold for one service port in one family.
#[derive(Clone, Debug)]
struct ExpectedRules {
    /// kube-proxy's name of the port (`default/d1-0:p0`), which its rule
    /// comments carry.
    port: String,
    /// The nftables mode's chain name part (`default/d1-0/tcp/p0`).
    chain: String,
    ipv6: bool,
    with_endpoints: bool,
    /// The external and load-balancer addresses of this family.
    addresses: Vec<IpAddr>,
}

impl ExpectedRules {
    /// `Ok` when `rules` (one family's `iptables-save`, or its `nft list
    /// table`) hold this port as expected.
    fn held_by(&self, mode: KubeProxyMode, rules: &str) -> Result<(), String> {
        let (port, family) = (&self.port, if self.ipv6 { "IPv6" } else { "IPv4" });
        // `default/d1-0:p0` is no prefix of another port's name: a colon
        // ends the service name, and ports are p0 and p1.
        let lines: Vec<&str> = rules
            .lines()
            .filter(|l| l.contains(port.as_str()) || l.contains(self.chain.as_str()))
            .collect();
        if lines.is_empty() {
            return Err(format!("no {family} rule for {port}"));
        }
        let endpoints = match mode {
            KubeProxyMode::Iptables => lines.iter().any(|l| l.contains("-j DNAT")),
            KubeProxyMode::Nftables => rules.contains(&format!("{}__", self.chain)),
        };
        if endpoints != self.with_endpoints {
            return Err(format!("{family} {port}: endpoint rules {endpoints}"));
        }
        for address in &self.addresses {
            let prefix = if address.is_ipv6() { 128 } else { 32 };
            let held = match mode {
                KubeProxyMode::Iptables => rules.contains(&format!("-d {address}/{prefix}")),
                KubeProxyMode::Nftables => rules.contains(&format!("{address} . ")),
            };
            if !held {
                return Err(format!("no rule for {address}"));
            }
        }
        Ok(())
    }
}

/// What planproxy's plan must hold for one service port of the state.
#[derive(Clone, Debug)]
struct ExpectedPort {
    node_port: Option<u16>,
    external_ips: BTreeSet<IpAddr>,
    load_balancer_ips: BTreeSet<IpAddr>,
    /// The families (`true`: IPv6) whose endpoints the plan must list.
    families_with_endpoints: Vec<bool>,
}

/// Whether a node programs any endpoint of `svc`: some traffic policy uses
/// all endpoints, or a local one exists. The pool puts the same pods on
/// every node, so "local" only fails for hand-written endpoints without
/// `nodeName`.
fn programs_endpoints(svc: &Svc) -> bool {
    let external = svc.has_node_ports() || svc.external_ips || !svc.load_balancer_ips().is_empty();
    let cluster_wide = !svc.internal_local || (external && !svc.external_local);
    let local_exists = !matches!(
        svc.backend,
        Backend::Manual {
            node_names: false,
            ..
        }
    );
    svc.backend.app().is_some() && (cluster_wide || local_exists)
}

fn parse_all(ips: &[String]) -> BTreeSet<IpAddr> {
    ips.iter().filter_map(|ip| ip.parse().ok()).collect()
}

/// `Ok` when `node`'s plans hold exactly the differential services of
/// `expected` (`<service>/<port>`), each with its node port, external
/// addresses and endpoints of every family that has some.
fn plan_holds(
    plans: &[planproxy_crds::ProxyPlan],
    node: &str,
    expected: &[(String, ExpectedPort)],
) -> Result<(), String> {
    let ports: BTreeMap<String, &planproxy_crds::v1alpha1::proxy_plan::ServicePortPlan> = plans
        .iter()
        .filter(|p| p.spec.node_name == node)
        .flat_map(|p| p.spec.service_ports.iter())
        .filter(|sp| sp.namespace == NAMESPACE && super::state::is_generated(&sp.name))
        .map(|sp| (format!("{}/{}", sp.name, sp.port_name), sp))
        .collect();
    let wanted: BTreeSet<&String> = expected.iter().map(|(k, _)| k).collect();
    let held: BTreeSet<&String> = ports.keys().collect();
    if wanted != held {
        return Err(format!("plan holds {held:?}, want {wanted:?}"));
    }
    for (name, want) in expected {
        let Some(sp) = ports.get(name) else {
            return Err(format!("{name} missing"));
        };
        if sp.node_port != want.node_port {
            return Err(format!("{name} node port {:?}", sp.node_port));
        }
        if parse_all(&sp.external_ips) != want.external_ips {
            return Err(format!("{name} external IPs {:?}", sp.external_ips));
        }
        if parse_all(&sp.load_balancer_ips) != want.load_balancer_ips {
            return Err(format!(
                "{name} load-balancer IPs {:?}",
                sp.load_balancer_ips
            ));
        }
        let endpoint_families: BTreeSet<bool> = sp
            .cluster_endpoints
            .iter()
            .chain(sp.local_endpoints.iter())
            .flat_map(|set| set.endpoints.iter())
            .map(|e| e.ip.contains(':'))
            .collect();
        for &family in &want.families_with_endpoints {
            if !endpoint_families.contains(&family) {
                return Err(format!(
                    "{name} has no endpoint of family ipv6={family} yet"
                ));
            }
        }
    }
    Ok(())
}

/// The body of a 200 answer to `GET path` over HTTP/1.0: unlike HTTP/1.1,
/// the answer comes without chunked transfer encoding, whose chunk headers
/// would split a large metrics page at arbitrary places.
fn get_http10(ns: &Netns, addr: SocketAddr, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let request = format!("GET {path} HTTP/1.0\r\nHost: planproxy-test\r\n\r\n");
    ns.run_in(move || {
        let mut stream =
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let (head, body) = response.split_once("\r\n\r\n")?;
        (head.split_whitespace().nth(1) == Some("200")).then(|| body.to_owned())
    })
}

/// A gauge's values in Prometheus text, by label set (kube-proxy labels
/// its sync gauges with `ip_family`).
fn metric(metrics: &str, name: &str) -> BTreeMap<String, f64> {
    metrics
        .lines()
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?;
            if !(labels.is_empty() || labels.starts_with('{')) {
                return None;
            }
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// The generated services (`d<seed>-<index>`) whose names the rules or
/// elements of an `iptables-save` or `nft list table` carry. Declarations
/// of chains and sets do not count: kube-proxy's nftables mode empties the
/// chains of a deleted service at once but deletes them on a later sync.
fn generated_services_in(rules: &str) -> BTreeSet<String> {
    let marker = format!("{NAMESPACE}/");
    rules
        .lines()
        .filter(|line| {
            let line = line.trim_start();
            !(line.starts_with("chain ") || line.starts_with("set ") || line.starts_with("map "))
        })
        .flat_map(|line| line.match_indices(&marker).map(move |(at, _)| &line[at..]))
        .filter_map(|found| {
            let rest = &found[marker.len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '-')
                .collect();
            super::state::is_generated(&name).then_some(name)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_local_services_without_node_names_program_no_endpoint() {
        // d1039-0: ClusterIP, iTP=Local, hand-written slices without nodeName.
        let state = State::generate(1039);
        assert!(!programs_endpoints(&state.services[0]));
        let mut with_node_names = state.services[0].clone();
        with_node_names.backend = Backend::Manual {
            app: PoolApp::One,
            node_names: true,
        };
        assert!(programs_endpoints(&with_node_names));
        let mut cluster_wide = state.services[0].clone();
        cluster_wide.internal_local = false;
        assert!(programs_endpoints(&cluster_wide));
    }

    #[test]
    fn gauges_are_read_per_label_set_by_exact_name() {
        let text = "# HELP kubeproxy_sync_proxy_rules_last_timestamp_seconds x\n\
            # TYPE kubeproxy_sync_proxy_rules_last_timestamp_seconds gauge\n\
            kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds{ip_family=\"IPv4\"} 1.8e+09\n\
            kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv4\"} 1.7e+09\n\
            kubeproxy_sync_proxy_rules_last_timestamp_seconds{ip_family=\"IPv6\"} 1.9e+09\n";
        assert_eq!(
            metric(text, "kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
            BTreeMap::from([
                ("{ip_family=\"IPv4\"}".to_owned(), 1.7e9),
                ("{ip_family=\"IPv6\"}".to_owned(), 1.9e9)
            ])
        );
        assert_eq!(
            metric(
                text,
                "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds"
            )
            .len(),
            1
        );
    }

    #[test]
    fn generated_services_are_found_in_rule_comments() {
        let save = "-A KUBE-SERVICES -d 10.96.0.5/32 -p tcp -m comment --comment \"default/d12-0:p0 cluster IP\" -j KUBE-SVC-X\n\
            -A KUBE-SEP-Y -p tcp -m comment --comment default/d3-1:p1 -j DNAT --to-destination 10.244.1.2:80\n\
            -A KUBE-SERVICES -m comment --comment \"default/kubernetes:https cluster IP\" -j KUBE-SVC-Z\n";
        assert_eq!(
            generated_services_in(save),
            BTreeSet::from(["d12-0".to_owned(), "d3-1".to_owned()])
        );
        let nft = "\tchain endpoint-ABC-default/d7-0/tcp/p0__10.244.1.2/8080 {\n\t}\n\
            \t\telements = { 10.96.0.9 . tcp . 80 comment \"default/d8-0:p0\" : goto service-X-default/d8-0/tcp/p0 }\n";
        assert_eq!(
            generated_services_in(nft),
            BTreeSet::from(["d8-0".to_owned()])
        );
    }
}
