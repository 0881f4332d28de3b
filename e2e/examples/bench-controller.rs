//! Benchmark of `planproxy-controller run` against a real kube-apiserver and
//! etcd (on loopback; no agents, no netfilter).
//!
//! For each scale it stores Nodes, Services and one EndpointSlice per service,
//! plus every node's ProxyPlans as the controller last wrote them (correct hash
//! annotations and layouts, spec content pruned so the server stays small), then
//! starts the real controller binary (release build) and measures:
//!
//! * the time to ready and the writes of that warm start (should be none);
//! * from one EndpointSlice change to every affected plan written (one shard per
//!   node), including the coalescing window, and the writes it took;
//! * the controller's peak resident memory (VmHWM).
//!
//! ```sh
//! cargo build --release -p planproxy-controller
//! cargo run --release -p planproxy-e2e --example bench-controller -- [--nodes 100,1000] [--services 10000] [--max-writes-per-second 50]
//! ```

use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use planproxy_control_plane::{ControlPlane, ControlPlaneConfig, MASTERS};
use planproxy_crds::labels::{NODE_LABEL, SHARD_LABEL, SPEC_HASH_ANNOTATION};
use planproxy_e2e::binaries::{self, CONTROLLER};
use planproxy_resolve::{Index, PlanShard, ResolveOptions};
use serde_json::{Value, json};

const PLANS: &str = "proxyplans.planproxy.dev";

struct Options {
    nodes: Vec<usize>,
    services: usize,
    budgets: Vec<u32>,
}

fn parse_list<T: std::str::FromStr>(value: &str) -> Result<Vec<T>, String> {
    value
        .split(',')
        .map(|v| v.trim().parse().map_err(|_| format!("bad number {v:?}")))
        .collect()
}

fn options() -> Result<Options, String> {
    let mut options = Options {
        nodes: vec![100, 1000],
        services: 10_000,
        budgets: vec![50],
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--nodes" => options.nodes = parse_list(&value)?,
            "--services" => {
                options.services = value.parse().map_err(|_| format!("bad number {value:?}"))?
            }
            "--max-writes-per-second" => options.budgets = parse_list(&value)?,
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(options)
}

struct Row {
    nodes: usize,
    services: usize,
    budget: u32,
    plans: usize,
    ready: Duration,
    startup_writes: u64,
    change_to_written: Duration,
    change_writes: u64,
    vm_hwm_mib: f64,
}

fn main() -> ExitCode {
    let options = match options() {
        Ok(o) => o,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    let mut rows = Vec::new();
    for &nodes in &options.nodes {
        for &budget in &options.budgets {
            match runtime.block_on(run_scale(nodes, options.services, budget)) {
                Ok(row) => rows.push(row),
                Err(error) => {
                    eprintln!("error: {nodes} nodes: {error}");
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    print_table(&rows);
    ExitCode::SUCCESS
}

#[allow(clippy::print_stdout)]
fn print_table(rows: &[Row]) {
    println!(
        "| nodes | services | plans | writes/s budget | warm start to ready | warm-start writes | slice change → all plans written | writes for the change | controller VmHWM |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {:.2} s | {} | {:.2} s | {} | {:.0} MiB |",
            r.nodes,
            r.services,
            r.plans,
            r.budget,
            r.ready.as_secs_f64(),
            r.startup_writes,
            r.change_to_written.as_secs_f64(),
            r.change_writes,
            r.vm_hwm_mib
        );
    }
    println!("(the change time includes the controller's 1 s coalescing window)");
}

fn node(i: usize) -> Value {
    let name = format!("node-{i}");
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": format!("zone-{}", i % 3)}},
        "spec": {"podCIDRs": [format!("10.{}.{}.0/24", 128 + i / 250, i % 250)]},
        "status": {"addresses": [{"type": "InternalIP", "address": format!("172.20.{}.{}", i / 250, i % 250 + 1)}]},
    })
}

fn service(i: usize) -> Value {
    let ip = format!("10.96.{}.{}", i / 250, i % 250 + 1);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": format!("svc-{i}")},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        },
    })
}

/// Service `i`'s slice: `endpoints` pods spread over the nodes.
fn slice(i: usize, endpoints: usize, nodes: usize) -> Value {
    let endpoints: Vec<Value> = (0..endpoints)
        .map(|e| {
            let n = (i * 7 + e) % nodes;
            json!({
                "addresses": [format!("10.{}.{}.{}", 128 + n / 250, n % 250, (i + e) % 250 + 2)],
                "conditions": {"ready": true, "serving": true, "terminating": false},
                "nodeName": format!("node-{n}"),
            })
        })
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default", "name": format!("svc-{i}-ipv4"),
            "labels": {"kubernetes.io/service-name": format!("svc-{i}")},
            "annotations": {"endpoints.kubernetes.io/last-change-trigger-time": "2026-01-01T00:00:00Z"},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    })
}

/// The ProxyPlan as the controller wrote it, with the service ports left out
/// (the controller compares only the hash annotation and the shard layout).
fn stored_plan(shard: &PlanShard, node_uid: &str) -> Value {
    let mut spec = shard.spec.clone();
    spec.service_ports.clear();
    json!({
        "apiVersion": "planproxy.dev/v1alpha1", "kind": "ProxyPlan",
        "metadata": {
            "name": shard.name,
            "labels": {NODE_LABEL: shard.spec.node_name, SHARD_LABEL: shard.spec.shard.index.to_string()},
            "annotations": {SPEC_HASH_ANNOTATION: shard.hash},
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": shard.spec.node_name, "uid": node_uid}],
        },
        "spec": spec,
    })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn populate(server: &ControlPlane, nodes: usize, services: usize) -> Result<usize, BoxError> {
    let mut index = Index::new(ResolveOptions::default());
    for i in 0..services {
        let svc = server.create(service(i))?;
        index.apply_service(serde_json::from_value(svc)?);
        let s = server.create(slice(i, 3, nodes))?;
        index.apply_endpoint_slice(serde_json::from_value(s)?);
    }
    index.flush();
    let mut plans = 0;
    for batch in (0..nodes).collect::<Vec<_>>().chunks(32) {
        let mut uids = std::collections::HashMap::new();
        for &i in batch {
            let stored = server.create(node(i))?;
            let uid = stored["metadata"]["uid"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            uids.insert(format!("node-{i}"), uid);
            index.apply_node(serde_json::from_value(stored)?);
        }
        for shard in index.flush().upserts {
            let uid = uids.get(&shard.spec.node_name).cloned().unwrap_or_default();
            server.create(stored_plan(&shard, &uid))?;
            plans += 1;
        }
    }
    Ok(plans)
}

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn ready(admin: std::net::SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1))
    else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    if stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response.starts_with("HTTP/1.1 200")
}

async fn run_scale(nodes: usize, services: usize, budget: u32) -> Result<Row, BoxError> {
    eprintln!("== {nodes} nodes, {services} services: populating the API server");
    let server = ControlPlane::start(ControlPlaneConfig {
        controllers: Vec::new(),
        ..ControlPlaneConfig::default()
    })?;
    server.install_planproxy_crds()?;
    let plans = populate(&server, nodes, services)?;
    eprintln!("   {plans} ProxyPlans stored; starting the controller");

    let dir = tempfile::tempdir()?;
    let kubeconfig = dir.path().join("kubeconfig");
    std::fs::write(&kubeconfig, server.kubeconfig("controller", Some(MASTERS))?)?;
    let admin = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let log = std::fs::File::create(dir.path().join("controller.log"))?;
    server.reset_request_counts();
    let started = Instant::now();
    let child = Command::new(binaries::locate(CONTROLLER)?)
        .args(["run", "--leader-elect", "false", "--log-level", "info"])
        .args(["--admin-bind-address", &admin.to_string()])
        .args(["--max-writes-per-second", &budget.to_string()])
        .env("KUBECONFIG", &kubeconfig)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let mut controller = Killed(child);
    let pid = controller.0.id();
    let log_tail = || {
        let log = std::fs::read_to_string(dir.path().join("controller.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    };
    while !ready(admin) {
        if let Some(status) = controller.0.try_wait()? {
            return Err(format!("the controller exited ({status}):\n{}", log_tail()).into());
        }
        if started.elapsed() > Duration::from_secs(1800) {
            return Err(format!(
                "the controller did not become ready in 30 minutes:\n{}",
                log_tail()
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let ready_after = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let startup_writes = server.write_count(PLANS);

    server.reset_request_counts();
    let client = server.client("bench", Some(MASTERS)).await?;
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client, "default");
    let changed: EndpointSlice = serde_json::from_value(slice(0, 4, nodes))?;
    let change = Instant::now();
    slices
        .replace("svc-0-ipv4", &Default::default(), &changed)
        .await?;
    let expected = u64::try_from(nodes)?;
    while server.write_count(PLANS) < expected {
        if change.elapsed() > Duration::from_secs(600) {
            return Err(format!(
                "only {} of {expected} plans written after 10 minutes",
                server.write_count(PLANS)
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let change_to_written = change.elapsed();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let change_writes = server.write_count(PLANS);
    let vm_hwm_mib = planproxy_e2e::process::peak_rss_mib(pid);
    drop(controller);
    Ok(Row {
        nodes,
        services,
        budget,
        plans,
        ready: ready_after,
        startup_writes,
        change_to_written,
        change_writes,
        vm_hwm_mib,
    })
}
