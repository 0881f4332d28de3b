//! Data-plane benchmark: programs N services (one TCP port, 10 endpoints each,
//! in shards of about 16 service ports as the controller cuts them) into an
//! isolated network namespace and prints a table of cold-start (full
//! sync) time, incremental-sync time for one endpoint change and for one new
//! service, what was written, the CPU time of the syncs (agent and the programs
//! it runs), and the first-packet connect latency to the first and the last
//! service in dispatch order, for every backend (nftables, iptables-nft,
//! iptables-legacy; the iptables ones in the tree and the flat layout) and three
//! cluster shapes: `2-node` (every endpoint on another node), `1-node` (every
//! endpoint local) and `3-node` (a third of them local). Local endpoints change
//! the rules (hairpin masquerade); the traffic always reaches the same pods.
//!
//! ```text
//! sudo cargo run --release -p planproxy-node-agent --example bench -- [--services 100,1000,10000] [--connections 500]
//!     [--backends nftables,iptables-nft,iptables-legacy] [--shapes 2-node,1-node,3-node] [--layouts tree,flat]
//! ```
//!
//! Needs root; creates its own namespaces (never touching the root namespace) and
//! removes them when done.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::testing::EndpointExt;
use planproxy_crds::testing::{mk_endpoint, mk_plan, mk_service_port, mk_settings};
use planproxy_crds::v1alpha1::ServicePortPlan;
use planproxy_netns::{Attempt, ConnectOpts, EchoConfig, Topology, TopologySpec};
use planproxy_node_agent::dataplane::{Backend, BackendChoice, DataPlane, DataPlaneConfig, Family};
use planproxy_render::Layout;

const PORT: u16 = 8080;
const ENDPOINTS: usize = 10;

struct Args {
    services: Vec<usize>,
    connections: usize,
    backends: Vec<Backend>,
    shapes: Vec<Shape>,
    layouts: Vec<Layout>,
}

/// Which endpoints run on the programmed node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Shape {
    /// None: two nodes, every endpoint remote.
    Two,
    /// All: one node.
    One,
    /// A third: three nodes.
    Three,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Shape::Two => "2-node",
            Shape::One => "1-node",
            Shape::Three => "3-node",
        }
    }

    fn local(self, endpoint: usize) -> bool {
        match self {
            Shape::Two => false,
            Shape::One => true,
            Shape::Three => endpoint.is_multiple_of(3),
        }
    }
}

fn list<T>(value: Option<String>, parse: impl Fn(&str) -> Option<T>) -> Vec<T> {
    value
        .unwrap_or_default()
        .split(',')
        .filter_map(|s| parse(s.trim()))
        .collect()
}

fn args() -> Args {
    let mut out = Args {
        services: vec![100, 1000, 10_000],
        connections: 500,
        backends: vec![
            Backend::Nftables,
            Backend::IptablesNft,
            Backend::IptablesLegacy,
        ],
        shapes: vec![Shape::Two, Shape::One, Shape::Three],
        layouts: vec![Layout::Tree, Layout::Flat],
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--services" => {
                out.services = it
                    .next()
                    .unwrap_or_default()
                    .split(',')
                    .filter_map(|s| s.trim().parse().ok())
                    .collect();
            }
            "--connections" => {
                out.connections = it.next().and_then(|s| s.parse().ok()).unwrap_or(500);
            }
            "--backends" => {
                out.backends = list(it.next(), |s| match s.parse() {
                    Ok(BackendChoice::Exactly(b)) => Some(b),
                    _ => None,
                });
            }
            "--shapes" => {
                out.shapes = list(it.next(), |s| {
                    [Shape::Two, Shape::One, Shape::Three]
                        .into_iter()
                        .find(|shape| shape.name() == s)
                });
            }
            "--layouts" => out.layouts = list(it.next(), |s| s.parse().ok()),
            other => {
                eprintln!(
                    "unknown argument {other:?}; usage: bench [--services 100,1000,10000] [--connections 500]"
                );
                std::process::exit(2);
            }
        }
    }
    out
}

/// The i-th service's cluster IP: consecutive addresses from 10.96.0.1, so the
/// last service is last both in plan order and in address order.
fn cluster_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::from(Ipv4Addr::new(10, 96, 0, 1))
            + u32::try_from(i).expect("fewer than 2^32 services"),
    )
}

fn service(i: usize, endpoints: &[Ipv4Addr], shape: Shape) -> ServicePortPlan {
    mk_service_port(
        "bench",
        &format!("svc-{i:06}"),
        &[&cluster_ip(i).to_string()],
        endpoints
            .iter()
            .enumerate()
            .map(|(e, ip)| mk_endpoint(ip, PORT).local(shape.local(e)))
            .collect(),
    )
}

/// The plans of one row.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Change {
    /// N services.
    None,
    /// One endpoint of the first service moved to another address.
    Endpoint,
    /// That, plus one more service.
    NewService,
}

/// Service ports per shard: about what the controller puts in its 32 KiB
/// shards for services of 10 endpoints.
const PORTS_PER_SHARD: usize = 16;

/// The shard count the controller would pick for `n` services (a power of two).
fn shard_count(n: usize) -> usize {
    n.div_ceil(PORTS_PER_SHARD).next_power_of_two()
}

/// The node's plan after `change`, in shards; a service's shard is its index
/// modulo the count. Shards the change does not touch are the very objects of
/// `before`, as the agent's watch hands them over.
fn plan(
    n: usize,
    endpoints: &[Ipv4Addr],
    shape: Shape,
    change: Change,
    before: Option<&[Arc<ProxyPlanSpec>]>,
) -> Vec<Arc<ProxyPlanSpec>> {
    let mut service_ports: Vec<_> = (0..n).map(|i| service(i, endpoints, shape)).collect();
    if change != Change::None
        && let Some(eps) = service_ports[0].cluster_endpoints.as_mut()
    {
        eps.endpoints[0].ip = "10.244.2.250".into();
    }
    if change == Change::NewService {
        service_ports.push(service(n, endpoints, shape));
    }
    let count = shard_count(n);
    let mut shards: Vec<Vec<ServicePortPlan>> = vec![Vec::new(); count];
    for (i, sp) in service_ports.into_iter().enumerate() {
        shards[i % count].push(sp);
    }
    let touched = match change {
        Change::None => vec![],
        Change::Endpoint => vec![0],
        Change::NewService => vec![0, n % count],
    };
    shards
        .into_iter()
        .enumerate()
        .map(|(index, ports)| match before {
            Some(before) if !touched.contains(&index) => before[index].clone(),
            _ => {
                let mut spec = mk_plan("bench", mk_settings(&["10.244.0.0/16"]), ports);
                spec.shard.index = u32::try_from(index).expect("few shards");
                spec.shard.count = u32::try_from(count).expect("few shards");
                Arc::new(spec)
            }
        })
        .collect()
}

/// CPU time (user + system) of this process and of the children it waited for.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the `(comm)`: utime, stime, cutime, cstime are 14-17.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let ticks: u64 = rest
        .split(' ')
        .skip(11)
        .take(4)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    // USER_HZ is 100 on Linux.
    Duration::from_millis(ticks * 10)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn latencies(attempts: &[Attempt]) -> (Vec<Duration>, usize) {
    let mut ok: Vec<Duration> = attempts
        .iter()
        .filter_map(|a| match a {
            Attempt::Ok { connect_time, .. } => Some(*connect_time),
            _ => None,
        })
        .collect();
    ok.sort();
    let failed = attempts.len() - ok.len();
    (ok, failed)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

fn main() -> anyhow::Result<()> {
    let args = args();
    let topology = Topology::new(TopologySpec {
        nodes: 2,
        pods_per_node: 0,
        clients: 0,
    })?;
    let (node, backends_node) = (topology.node(1), topology.node(2));
    let client = node.add_pod("client")?;
    let mut pods = Vec::new();
    let mut echoes = Vec::new();
    for i in 0..ENDPOINTS {
        let pod = backends_node.add_pod(&format!("ep{i}"))?;
        echoes.push(
            pod.ns
                .serve_echo(&format!("ep{i}"), EchoConfig::tcp(&[PORT]))?,
        );
        pods.push(pod);
    }
    let endpoints: Vec<Ipv4Addr> = pods.iter().map(|p| p.ipv4).collect();
    let opts = ConnectOpts::with_timeout(Duration::from_secs(2));

    let direct = client.ns.connect_many(
        SocketAddr::new(IpAddr::V4(endpoints[0]), PORT),
        args.connections,
        &opts,
    );
    let (direct, _) = latencies(&direct);
    println!(
        "baseline: direct pod-to-pod connect (no service rules) p50 {} p99 {} over {} connections\n",
        us(percentile(&direct, 0.5)),
        us(percentile(&direct, 0.99)),
        direct.len()
    );
    println!(
        "| backend | shape | services | layout | cold start (full sync) | rules / chains (full) | 1-endpoint sync | rules / chains (incr.) | 1 new service sync | sync CPU (full + 2 incr.) | first svc p50 / p99 | last svc p50 / p99 |"
    );
    println!("|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for backend in args.backends.clone() {
        if !available(&node.ns, backend) {
            println!("| {backend} | – | – | – | backend unavailable here | | | | | | | |");
            continue;
        }
        let layouts = if backend.is_iptables() {
            args.layouts.clone()
        } else {
            // nftables dispatches through a verdict map; the layout does not apply.
            vec![Layout::Tree]
        };
        for &shape in &args.shapes {
            for &n in &args.services {
                for &layout in &layouts {
                    let row = Row {
                        backend,
                        shape,
                        n,
                        layout,
                    };
                    row.run(&node.ns, &client.ns, &endpoints, args.connections, &opts)?;
                }
            }
        }
    }
    drop(echoes);
    Ok(())
}

struct Row {
    backend: Backend,
    shape: Shape,
    n: usize,
    layout: Layout,
}

impl Row {
    fn run(
        &self,
        node: &planproxy_netns::Netns,
        client: &planproxy_netns::Netns,
        endpoints: &[Ipv4Addr],
        connections: usize,
        opts: &ConnectOpts,
    ) -> anyhow::Result<()> {
        let (n, shape) = (self.n, self.shape);
        let initial = plan(n, endpoints, shape, Change::None, None);
        let endpoint_changed = plan(n, endpoints, shape, Change::Endpoint, Some(&initial));
        let service_added = plan(
            n,
            endpoints,
            shape,
            Change::NewService,
            Some(&endpoint_changed),
        );
        let plans = [initial, endpoint_changed, service_added];
        let config = DataPlaneConfig {
            layout: self.layout,
            backend: BackendChoice::Exactly(self.backend),
            families: vec![Family::V4],
        };
        let mut dataplane = node.run_in(|| DataPlane::new(config))?;
        let cpu_before = cpu_time();
        let full = node.run_in(|| dataplane.sync(&plans[0], true))?;
        let endpoint = node.run_in(|| dataplane.sync(&plans[1], false))?;
        let new_service = node.run_in(|| dataplane.sync(&plans[2], false))?;
        let cpu = cpu_time().saturating_sub(cpu_before);
        let first = connect(client, cluster_ip(1), connections, opts);
        let last = connect(client, cluster_ip(n - 1), connections, opts);
        println!(
            "| {} | {} | {n} | {} | {} | {} / {} | {} | {} / {} | {} | {} | {} / {} | {} / {} |",
            self.backend,
            shape.name(),
            match (self.backend.is_iptables(), self.layout) {
                (false, _) => "vmap",
                (true, Layout::Tree) => "tree",
                (true, Layout::Flat) => "flat",
            },
            ms(full.duration),
            full.rules_written,
            full.chains_written,
            ms(endpoint.duration),
            endpoint.rules_written,
            endpoint.chains_written,
            ms(new_service.duration),
            ms(cpu),
            us(percentile(&first, 0.5)),
            us(percentile(&first, 0.99)),
            us(percentile(&last, 0.5)),
            us(percentile(&last, 0.99)),
        );
        node.run_in(|| dataplane.cleanup())?;
        Ok(())
    }
}

/// First-packet connect latencies to `ip:80`, sorted.
fn connect(
    client: &planproxy_netns::Netns,
    ip: Ipv4Addr,
    connections: usize,
    opts: &ConnectOpts,
) -> Vec<Duration> {
    let target = SocketAddr::new(IpAddr::V4(ip), 80);
    let attempts = client.connect_many(target, connections, opts);
    let (lat, failed) = latencies(&attempts);
    if failed > 0 {
        eprintln!(
            "{failed} of {} connections to {target} failed",
            attempts.len()
        );
    }
    lat
}

fn available(ns: &planproxy_netns::Netns, backend: Backend) -> bool {
    let argv: &[&str] = match backend {
        Backend::Nftables => &["nft", "list", "tables"],
        Backend::IptablesNft => &["iptables-nft", "-w", "-t", "nat", "-S", "POSTROUTING"],
        Backend::IptablesLegacy => &["iptables-legacy", "-w", "-t", "nat", "-S", "POSTROUTING"],
    };
    ns.exec(argv).is_ok_and(|o| o.status.success())
}
