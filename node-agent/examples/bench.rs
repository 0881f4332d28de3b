//! Data-plane benchmark: programs N services (one TCP port, 10 endpoints each)
//! into an isolated network namespace and prints a table of full-sync time,
//! incremental-sync time for one endpoint change, what was written, and the
//! first-packet connect latency to the last service in dispatch order, for the
//! tree and the flat layout on both iptables backends.
//!
//! ```text
//! sudo cargo run --release -p planproxy-node-agent --example bench -- [--services 100,1000,10000] [--connections 500]
//! ```
//!
//! Needs root; creates its own namespaces (never touching the root namespace) and
//! removes them when done.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::testing::{mk_endpoint, mk_plan, mk_service_port, mk_settings};
use planproxy_crds::v1alpha1::ServicePortPlan;
use planproxy_netns::{Attempt, ConnectOpts, EchoConfig, Topology, TopologySpec};
use planproxy_node_agent::dataplane::{Backend, DataPlane, DataPlaneConfig, Family};
use planproxy_render::Layout;

const PORT: u16 = 8080;
const ENDPOINTS: usize = 10;

struct Args {
    services: Vec<usize>,
    connections: usize,
}

fn args() -> Args {
    let mut out = Args {
        services: vec![100, 1000, 10_000],
        connections: 500,
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

fn service(i: usize, endpoints: &[Ipv4Addr]) -> ServicePortPlan {
    mk_service_port(
        "bench",
        &format!("svc-{i:06}"),
        &[&cluster_ip(i).to_string()],
        endpoints.iter().map(|ip| mk_endpoint(ip, PORT)).collect(),
    )
}

fn plan(n: usize, endpoints: &[Ipv4Addr], changed: bool) -> ProxyPlanSpec {
    let mut service_ports: Vec<_> = (0..n).map(|i| service(i, endpoints)).collect();
    if changed {
        // One endpoint of the first service moves to another address.
        if let Some(eps) = service_ports[0].cluster_endpoints.as_mut() {
            eps.endpoints[0].ip = "10.244.2.250".into();
        }
    }
    mk_plan("bench", mk_settings(&["10.244.0.0/16"]), service_ports)
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
        "| backend | services | layout | full sync | rules / chains written (full) | 1-endpoint sync | rules / chains written (incr.) | connect p50 | connect p99 |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|");

    for backend in [Backend::NfTables, Backend::Legacy] {
        let available = node
            .ns
            .exec(&[
                backend_program(backend),
                "-w",
                "-t",
                "nat",
                "-S",
                "POSTROUTING",
            ])
            .is_ok_and(|o| o.status.success());
        if !available {
            println!("| {backend} | – | – | backend unavailable in this kernel | | | | | |");
            continue;
        }
        for &n in &args.services {
            let full_plan = plan(n, &endpoints, false);
            let changed_plan = plan(n, &endpoints, true);
            for layout in [Layout::Tree, Layout::Flat] {
                let config = DataPlaneConfig {
                    layout,
                    backend: Some(backend),
                    families: vec![Family::V4],
                };
                let mut dataplane = node.ns.run_in(|| DataPlane::new(config))?;
                let full = node
                    .ns
                    .run_in(|| dataplane.sync(std::slice::from_ref(&full_plan), true))?;
                let incremental = node
                    .ns
                    .run_in(|| dataplane.sync(std::slice::from_ref(&changed_plan), false))?;
                let last = SocketAddr::new(IpAddr::V4(cluster_ip(n - 1)), 80);
                let attempts = client.ns.connect_many(last, args.connections, &opts);
                let (lat, failed) = latencies(&attempts);
                if failed > 0 {
                    eprintln!(
                        "{failed} of {} connections to {last} failed",
                        attempts.len()
                    );
                }
                println!(
                    "| {backend} | {n} | {} | {} | {} / {} | {} | {} / {} | {} | {} |",
                    match layout {
                        Layout::Tree => "tree",
                        Layout::Flat => "flat",
                    },
                    ms(full.duration),
                    full.rules_written,
                    full.chains_written,
                    ms(incremental.duration),
                    incremental.rules_written,
                    incremental.chains_written,
                    us(percentile(&lat, 0.5)),
                    us(percentile(&lat, 0.99)),
                );
                node.ns.run_in(|| dataplane.cleanup())?;
            }
        }
    }
    drop(echoes);
    Ok(())
}

fn backend_program(backend: Backend) -> &'static str {
    match backend {
        Backend::NfTables => "iptables-nft",
        Backend::Legacy => "iptables-legacy",
    }
}
