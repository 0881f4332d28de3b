//! The comparison bench: the same workload against the real kube-proxy
//! (iptables and nftables modes) and planproxy (each agent backend), on one
//! namespace cluster per size, printed as one table ([`table`]).
//!
//! Each size gets a fresh cluster of six nodes: nodes 1–5 are programmed by
//! one proxy each ([`PROXIES`]), node 6 by none and holds the one real echo
//! pod, so every proxy's traffic crosses the same path. The data flow:
//! [`workload`] writes the services and slices and flips an endpoint;
//! [`measure`] observes each node from its probe pod and its metrics;
//! [`table`] turns samples into cells.
//!
//! Cold starts run one proxy at a time (alone on the machine, fastest
//! expected first, so a slow one eats only the end of the row's budget);
//! after that every proxy that finished runs at once, and each endpoint
//! change is timed on all of them.

mod measure;
pub mod table;
mod workload;

use std::time::{Duration, Instant};

use serde_json::json;

use crate::cluster::{Cluster, ClusterSpec, KubeProxyMode, node_name};
use crate::error::{E2eError, Result};
use measure::{Expect, SyncTotals};
pub use table::{Cell, Row};
use workload::Workload;

/// Which proxy programs a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proxy {
    KubeProxy(KubeProxyMode),
    /// planproxy's agent with this `--backend`.
    Planproxy(&'static str),
}

impl Proxy {
    pub fn label(self) -> String {
        match self {
            Proxy::KubeProxy(mode) => format!("kube-proxy {}", mode.as_flag()),
            Proxy::Planproxy(backend) => format!("planproxy {backend}"),
        }
    }
}

/// The proxies compared, in table order; node *i* + 1 runs `PROXIES[i]`.
pub const PROXIES: [Proxy; 5] = [
    Proxy::KubeProxy(KubeProxyMode::Iptables),
    Proxy::KubeProxy(KubeProxyMode::Nftables),
    Proxy::Planproxy("nftables"),
    Proxy::Planproxy("iptables-nft"),
    Proxy::Planproxy("iptables-legacy"),
];
/// Indices into [`PROXIES`] in the order cold starts run.
const COLD_START_ORDER: [usize; 5] = [2, 4, 3, 1, 0];
/// The node without a proxy, where the echo pod runs.
const ECHO_NODE: u8 = 6;
/// How long one change may take to reach a node before that node's
/// programming latency is given up as `timeout`.
const CHANGE_GIVE_UP: Duration = Duration::from_secs(30);

/// What to run.
#[derive(Clone, Debug)]
pub struct Options {
    pub services: Vec<usize>,
    /// Endpoint readiness flips timed per size.
    pub changes: usize,
    /// Every proxy's minimum time between syncs (a Go-style duration).
    pub min_sync_period: String,
    /// Pause after a change reached every node, before the next: longer than
    /// `min_sync_period`, so each change is timed on its own rather than
    /// waiting out the rate limit of the one before.
    pub gap: Duration,
    /// Budget for a whole size; what is left unmeasured is `timeout`.
    pub row_timeout: Duration,
    /// Budget for one proxy's cold start.
    pub cold_start_timeout: Duration,
    /// Connects per first-packet measurement.
    pub connects: usize,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            services: vec![100, 1000, 10_000],
            changes: 100,
            min_sync_period: "1s".into(),
            gap: Duration::from_millis(1100),
            row_timeout: Duration::from_secs(1800),
            cold_start_timeout: Duration::from_secs(180),
            connects: 200,
        }
    }
}

/// One node's proxy during a size's run.
struct NodeRun {
    proxy: Proxy,
    index: u8,
    pid: Option<u32>,
    /// Finished its cold start and is still being measured.
    alive: bool,
    latencies: Vec<Duration>,
    missed_change: bool,
    sync_before: Option<SyncTotals>,
    row: Row,
}

/// Runs every size in turn; `progress` hears what is happening.
pub fn run(options: &Options, mut progress: impl FnMut(&str)) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for &services in &options.services {
        progress(&format!("== {services} services"));
        match run_size(services, options, &mut progress) {
            Ok(size_rows) => rows.extend(size_rows),
            // Only a budget running out becomes `timeout` cells; any other
            // failure is a broken bench and stops it.
            Err(error @ E2eError::Timeout { .. }) => {
                progress(&format!(
                    "   {services} services: {error}; the row is marked timeout"
                ));
                rows.extend(
                    PROXIES
                        .iter()
                        .map(|p| Row::filled(services, &p.label(), Cell::Timeout)),
                );
            }
            Err(error) => return Err(error),
        }
    }
    Ok(rows)
}

fn run_size(
    services: usize,
    options: &Options,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Row>> {
    if services < 2 {
        return Err(E2eError::Invalid("a size needs at least 2 services".into()));
    }
    let deadline = Instant::now() + options.row_timeout;
    let cluster = Cluster::start(cluster_spec(options))?;
    let echo_pod = cluster.node(ECHO_NODE).add_pod("echo")?;
    let _echo = echo_pod.ns.serve_echo(
        "echo",
        planproxy_netns::EchoConfig::tcp(&[workload::TARGET_PORT]),
    )?;
    let workload = Workload {
        services,
        echo_ip: echo_pod.ipv4,
        echo_node: node_name(ECHO_NODE),
        nodes: ECHO_NODE,
    };
    let mut nodes: Vec<NodeRun> = PROXIES
        .iter()
        .zip(1u8..)
        .map(|(&proxy, index)| NodeRun {
            proxy,
            index,
            pid: None,
            alive: false,
            latencies: Vec::new(),
            missed_change: false,
            sync_before: None,
            row: Row::filled(services, &proxy.label(), Cell::Timeout),
        })
        .collect();
    let populated = Instant::now();
    populate(&cluster, &workload, options, deadline)?;
    progress(&format!(
        "   populated in {:.1} s",
        populated.elapsed().as_secs_f64()
    ));
    for &i in &COLD_START_ORDER {
        cold_start(&cluster, &workload, &mut nodes[i], options, deadline)?;
        progress(&format!(
            "   {}: cold start {}",
            nodes[i].row.proxy, nodes[i].row.cold_start
        ));
    }
    for node in nodes.iter_mut().filter(|n| n.alive) {
        first_packets(&cluster, &workload, node, options.connects);
    }
    measure_changes(&cluster, &workload, &mut nodes, options, deadline)?;
    for node in &mut nodes {
        record_usage(&cluster, node);
    }
    Ok(nodes.into_iter().map(|n| n.row).collect())
}

/// Six nodes, the controller, no proxy yet (each starts at its cold start);
/// both kube-proxy modes get the same minimum sync period as the agents.
fn cluster_spec(options: &Options) -> ClusterSpec {
    let period = &options.min_sync_period;
    let agent_backends = PROXIES
        .iter()
        .zip(1u8..)
        .filter_map(|(proxy, index)| match proxy {
            Proxy::Planproxy(backend) => Some((index, (*backend).to_owned())),
            Proxy::KubeProxy(_) => None,
        })
        .collect();
    ClusterSpec {
        nodes: ECHO_NODE,
        clients: 0,
        agents: false,
        // kube-proxy has no nftables spelling of it: this flag sets the
        // minimum sync period of every mode but ipvs.
        kube_proxy_args: vec![format!("--iptables-min-sync-period={period}")],
        agent_backends,
        ..ClusterSpec::default()
    }
}

/// The sync policy, the services and slices, and the controller's plans for
/// every planproxy node holding all of them (so an agent's cold start
/// measures the agent, as kube-proxy's measures kube-proxy, not the
/// controller catching up).
fn populate(
    cluster: &Cluster,
    workload: &Workload,
    options: &Options,
    deadline: Instant,
) -> Result<()> {
    let period = options.min_sync_period.clone();
    cluster.run(|api| async move {
        api.apply_policy(json!({
            "apiVersion": "planproxy.dev/v1alpha1",
            "kind": "ProxyPolicy",
            "metadata": {"name": "compare-sync"},
            "spec": {"priority": 100, "sync": {"minSyncPeriod": period}},
        }))
        .await?;
        workload::populate(&api.client, workload).await?;
        wait_plans_complete(&api, workload, (deadline, options.row_timeout)).await
    })?
}

async fn wait_plans_complete(
    api: &crate::ClusterApi<'_>,
    workload: &Workload,
    (deadline, row_timeout): (Instant, Duration),
) -> Result<()> {
    let planproxy_nodes: Vec<String> = PROXIES
        .iter()
        .zip(1u8..)
        .filter(|(p, _)| matches!(p, Proxy::Planproxy(_)))
        .map(|(_, i)| node_name(i))
        .collect();
    loop {
        let plans = api.plans().await?;
        // Every service of the workload, the flip service and the last one
        // by name (the count alone could include `default/kubernetes`).
        let complete = |node: &String| {
            let services = crate::plans::services_of(&plans, node);
            services.len() > workload.services
                && services.contains(&format!("default/{}", workload::FLIP))
                && services.contains(&format!("default/svc-{}", workload.services - 1))
        };
        let short: Vec<String> = planproxy_nodes
            .iter()
            .filter(|n| !complete(n))
            .cloned()
            .collect();
        if short.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(E2eError::Timeout {
                what: "the controller writing every service into the plans".into(),
                timeout: row_timeout,
                last: format!("incomplete: {short:?}"),
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Starts the node's proxy and times it from its process start until the
/// first, the last and the flip service answer from the node's probe pod
/// (every proxy here commits a full sync in one transaction, so the last
/// service answering means all of them are in). A proxy that does not get
/// there in time is stopped; its row says `timeout`, but what it used
/// until then is kept.
fn cold_start(
    cluster: &Cluster,
    workload: &Workload,
    node: &mut NodeRun,
    options: &Options,
    deadline: Instant,
) -> Result<()> {
    let limit = deadline.min(Instant::now() + options.cold_start_timeout);
    if Instant::now() > limit {
        return Ok(());
    }
    node.pid = start_proxy(cluster, node)?;
    let targets = [
        workload.first_service(),
        workload.last_service(),
        workload.flip_service(),
    ];
    let probe_ns = &cluster.probe_pod(node.index).ns;
    if measure::wait_answering(probe_ns, &targets, limit) {
        let age = node.pid.and_then(crate::process::age).unwrap_or_default();
        node.row.cold_start = Cell::Value(table::elapsed(age));
        node.alive = true;
    } else {
        record_usage(cluster, node);
        stop_proxy(cluster, node)?;
    }
    Ok(())
}

fn start_proxy(cluster: &Cluster, node: &NodeRun) -> Result<Option<u32>> {
    Ok(match node.proxy {
        Proxy::KubeProxy(mode) => {
            cluster.start_kube_proxy(node.index, mode)?;
            cluster.kube_proxy_pid(node.index)
        }
        Proxy::Planproxy(_) => {
            cluster.start_agent(node.index)?;
            cluster.agent_pid(node.index)
        }
    })
}

fn stop_proxy(cluster: &Cluster, node: &mut NodeRun) -> Result<()> {
    let grace = Duration::from_secs(5);
    match node.proxy {
        Proxy::KubeProxy(_) => cluster.stop_kube_proxy(node.index, grace)?,
        Proxy::Planproxy(_) => cluster.stop_agent(node.index, grace)?,
    }
    node.pid = None;
    node.alive = false;
    Ok(())
}

fn first_packets(cluster: &Cluster, workload: &Workload, node: &mut NodeRun, connects: usize) {
    let ns = &cluster.probe_pod(node.index).ns;
    node.row.first_service = table::p50_p99_us(&measure::first_packet(
        ns,
        workload.first_service(),
        connects,
    ));
    node.row.last_service = table::p50_p99_us(&measure::first_packet(
        ns,
        workload.last_service(),
        connects,
    ));
}

/// Flips the flip service's endpoint `options.changes` times (not ready,
/// ready, …) and times each flip on every live node until a connect sees
/// it (refused once the service has no endpoint, answered once it has);
/// the proxies' own sync histograms are read before and after.
fn measure_changes(
    cluster: &Cluster,
    workload: &Workload,
    nodes: &mut [NodeRun],
    options: &Options,
    deadline: Instant,
) -> Result<()> {
    for node in nodes.iter_mut().filter(|n| n.alive) {
        node.sync_before = measure::scrape_sync(&cluster.node(node.index).ns);
    }
    // Reborrowed for the closure, which would otherwise take `nodes` away.
    let in_run = &mut *nodes;
    let completed = cluster.run(|api| async move {
        for change in 0..options.changes {
            if Instant::now() > deadline {
                return Ok::<_, E2eError>(false);
            }
            tokio::time::sleep(options.gap).await;
            // The flip service starts ready: odd changes make it ready again.
            let ready = change % 2 == 1;
            let started = Instant::now();
            workload::set_flip_ready(&api.client, workload, ready).await?;
            let expect = if ready {
                Expect::Answers
            } else {
                Expect::Refused
            };
            wait_flipped(cluster, workload, in_run, expect, started).await;
        }
        Ok(true)
    })??;
    for node in nodes.iter_mut().filter(|n| n.alive) {
        node.row.programming = if completed && !node.missed_change {
            table::p50_p90_p99(&node.latencies)
        } else {
            [Cell::Timeout, Cell::Timeout, Cell::Timeout]
        };
        let after = measure::scrape_sync(&cluster.node(node.index).ns);
        node.row.own_sync = match (node.sync_before, after) {
            (Some(before), Some(after)) => after
                .mean_since(&before)
                .map_or(Cell::Missing, |(mean, syncs)| {
                    Cell::Value(format!("{} ({syncs})", table::ms(mean)))
                }),
            _ => Cell::Missing,
        };
    }
    Ok(())
}

/// Probes every live node that has not missed a change until each sees
/// `expect`, recording how long after `started` it did.
async fn wait_flipped(
    cluster: &Cluster,
    workload: &Workload,
    nodes: &mut [NodeRun],
    expect: Expect,
    started: Instant,
) {
    let mut pending: Vec<&mut NodeRun> = nodes
        .iter_mut()
        .filter(|n| n.alive && !n.missed_change)
        .collect();
    while !pending.is_empty() {
        pending.retain_mut(|node| {
            let ns = &cluster.probe_pod(node.index).ns;
            if measure::probe(ns, workload.flip_service(), expect) {
                node.latencies.push(started.elapsed());
                false
            } else {
                true
            }
        });
        if started.elapsed() > CHANGE_GIVE_UP {
            for node in pending {
                node.missed_change = true;
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// CPU, peak RSS and API bytes of the node's proxy so far (kept as they are
/// once the proxy is gone).
fn record_usage(cluster: &Cluster, node: &mut NodeRun) {
    let Some(pid) = node.pid else { return };
    if let Some((cpu, rss)) = measure::usage(pid) {
        node.row.cpu = Cell::Value(format!("{cpu:.1} s"));
        node.row.peak_rss = Cell::Value(format!("{rss:.0} MiB"));
    }
    let address = std::net::IpAddr::V4(cluster.node(node.index).ipv4);
    if let Some(&bytes) = cluster.apiserver().bytes_to_clients_by_peer().get(&address) {
        node.row.api_bytes = Cell::Value(table::bytes(bytes));
    }
}
