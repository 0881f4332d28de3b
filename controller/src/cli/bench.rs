//! `planproxy-controller bench-resolve`: times the resolver on synthetic clusters
//! and prints a table.
//!
//! Each scale runs in a child process of its own, so the peak memory reported
//! (VmHWM) belongs to that scale alone.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{
    LoadBalancerIngress, LoadBalancerStatus, Node, NodeAddress, NodeStatus, Service, ServicePort,
    ServiceSpec, ServiceStatus,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use planproxy_crds::labels;
use planproxy_resolve::{Index, ResolveOptions, Snapshot};

/// Arguments of `bench-resolve`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Run a single scale in this process and print its figures as JSON (used by
    /// the parent run; each scale runs in its own process so peak memory is its own).
    #[arg(long, hide = true)]
    pub scale: Option<String>,
    /// How many single-endpoint changes to time through `Index::flush`.
    #[arg(long, default_value_t = 50)]
    pub changes: usize,
}

/// A synthetic cluster size.
#[derive(Clone, Copy, Debug)]
pub struct Scale {
    /// Label in the table.
    pub name: &'static str,
    /// Services.
    pub services: usize,
    /// Endpoints per service.
    pub endpoints_per_service: usize,
    /// Nodes.
    pub nodes: usize,
}

/// The scales the benchmark runs.
pub const SCALES: [Scale; 2] = [
    Scale {
        name: "1k-svc/10k-ep/100-nodes",
        services: 1_000,
        endpoints_per_service: 10,
        nodes: 100,
    },
    Scale {
        name: "10k-svc/100k-ep/100-nodes",
        services: 10_000,
        endpoints_per_service: 10,
        nodes: 100,
    },
];

/// Why the benchmark failed.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A child run failed.
    #[error("scale {0}: {1}")]
    Child(String, String),
    /// Unknown scale name.
    #[error("unknown scale {0:?}")]
    UnknownScale(String),
    /// Writing the table failed.
    #[error("writing the table: {0}")]
    Output(#[from] std::io::Error),
}

/// The figures of one scale.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct Figures {
    resolve_ms: f64,
    shards: usize,
    plan_bytes_per_node: usize,
    initial_flush_ms: f64,
    change_flush_median_ms: f64,
    change_flush_max_ms: f64,
    upserts_per_change: usize,
    peak_rss_mib: f64,
}

/// Runs the benchmark.
pub fn run(args: &BenchArgs, out: &mut dyn Write) -> Result<(), BenchError> {
    if let Some(name) = &args.scale {
        let scale = SCALES
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| BenchError::UnknownScale(name.clone()))?;
        let figures = measure(*scale, args.changes);
        writeln!(
            out,
            "{}",
            serde_json::to_string(&figures).unwrap_or_default()
        )?;
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    writeln!(
        out,
        "| scale | resolve (full) | shards (all nodes) | plan JSON per node | Index initial flush | Index flush, 1 endpoint change (median / max) | shards rewritten per change | peak RSS |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|")?;
    for scale in SCALES {
        let output = std::process::Command::new(&exe)
            .args(["bench-resolve", "--scale", scale.name, "--changes"])
            .arg(args.changes.to_string())
            .output()?;
        if !output.status.success() {
            return Err(BenchError::Child(
                scale.name.to_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            ));
        }
        let figures: Figures = serde_json::from_slice(&output.stdout)
            .map_err(|e| BenchError::Child(scale.name.to_owned(), e.to_string()))?;
        writeln!(
            out,
            "| {} | {:.0} ms | {} | {:.1} KiB | {:.0} ms | {:.2} ms / {:.2} ms | {} | {:.0} MiB |",
            scale.name,
            figures.resolve_ms,
            figures.shards,
            figures.plan_bytes_per_node as f64 / 1024.0,
            figures.initial_flush_ms,
            figures.change_flush_median_ms,
            figures.change_flush_max_ms,
            figures.upserts_per_change,
            figures.peak_rss_mib,
        )?;
    }
    Ok(())
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn measure(scale: Scale, changes: usize) -> Figures {
    let snapshot = synthetic(scale);

    let started = Instant::now();
    let resolution = planproxy_resolve::resolve(&snapshot);
    let resolve_ms = millis(started.elapsed());
    let shards: usize = resolution.plans.values().map(Vec::len).sum();
    let plan_bytes: usize = resolution
        .plans
        .values()
        .flatten()
        .map(|s| {
            serde_json::to_vec(&s.spec)
                .map(|v| v.len())
                .unwrap_or_default()
        })
        .sum();
    let plan_bytes_per_node = plan_bytes / scale.nodes.max(1);
    drop(resolution);

    let mut index = Index::new(snapshot.options);
    for node in &snapshot.nodes {
        index.apply_node(node.clone());
    }
    for service in &snapshot.services {
        index.apply_service(service.clone());
    }
    for slice in &snapshot.endpoint_slices {
        index.apply_endpoint_slice(slice.clone());
    }
    let started = Instant::now();
    let initial = index.flush();
    let initial_flush_ms = millis(started.elapsed());
    drop(initial);

    let mut times = Vec::new();
    let mut upserts = 0;
    for i in 0..changes {
        // Flip one endpoint of one service between ready and not ready.
        let mut slice =
            snapshot.endpoint_slices[(i * 7919) % snapshot.endpoint_slices.len()].clone();
        if let Some(endpoint) = slice.endpoints.first_mut() {
            let conditions = endpoint.conditions.get_or_insert_with(Default::default);
            conditions.ready = Some(!conditions.ready.unwrap_or(true));
        }
        index.apply_endpoint_slice(slice);
        let started = Instant::now();
        let changed = index.flush();
        times.push(millis(started.elapsed()));
        upserts = upserts.max(changed.upserts.len());
    }
    times.sort_by(f64::total_cmp);
    Figures {
        resolve_ms,
        shards,
        plan_bytes_per_node,
        initial_flush_ms,
        change_flush_median_ms: times.get(times.len() / 2).copied().unwrap_or_default(),
        change_flush_max_ms: times.last().copied().unwrap_or_default(),
        upserts_per_change: upserts,
        peak_rss_mib: peak_rss_kib() as f64 / 1024.0,
    }
}

/// The process's peak resident set (VmHWM), in KiB; 0 where /proc is unavailable.
fn peak_rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn meta(namespace: Option<&str>, name: &str, labels: &[(&str, &str)]) -> ObjectMeta {
    ObjectMeta {
        namespace: namespace.map(str::to_owned),
        name: Some(name.to_owned()),
        labels: (!labels.is_empty()).then(|| {
            labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect::<BTreeMap<_, _>>()
        }),
        ..Default::default()
    }
}

/// A synthetic cluster: nodes in three zones; ClusterIP services, every tenth a
/// NodePort, every twentieth an externalTrafficPolicy Local LoadBalancer; one
/// slice per service with its endpoints spread over the nodes.
pub fn synthetic(scale: Scale) -> Snapshot {
    let zones = ["zone-a", "zone-b", "zone-c"];
    let node_name = |i: usize| format!("node-{i:04}");
    let nodes = (0..scale.nodes)
        .map(|i| Node {
            metadata: meta(None, &node_name(i), &[(labels::ZONE_LABEL, zones[i % 3])]),
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: format!("10.0.{}.{}", i / 250, i % 250 + 1),
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let mut services = Vec::new();
    let mut endpoint_slices = Vec::new();
    for i in 0..scale.services {
        let namespace = format!("ns-{}", i % 20);
        let name = format!("svc-{i}");
        let load_balancer = i % 20 == 0;
        let node_port = load_balancer || i % 10 == 0;
        services.push(Service {
            metadata: meta(Some(&namespace), &name, &[]),
            spec: Some(ServiceSpec {
                type_: Some(
                    if load_balancer {
                        "LoadBalancer"
                    } else if node_port {
                        "NodePort"
                    } else {
                        "ClusterIP"
                    }
                    .into(),
                ),
                cluster_ip: Some(format!("172.16.{}.{}", i / 250, i % 250 + 1)),
                external_traffic_policy: load_balancer.then(|| "Local".into()),
                health_check_node_port: load_balancer.then_some(32000 + (i % 700) as i32),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    node_port: node_port.then_some(30000 + (i % 2000) as i32),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            status: load_balancer.then(|| ServiceStatus {
                load_balancer: Some(LoadBalancerStatus {
                    ingress: Some(vec![LoadBalancerIngress {
                        ip: Some(format!("192.0.{}.{}", i / 250 % 250, i % 250 + 1)),
                        ..Default::default()
                    }]),
                }),
                ..Default::default()
            }),
        });
        let endpoints = (0..scale.endpoints_per_service)
            .map(|j| {
                let n = i * scale.endpoints_per_service + j;
                Endpoint {
                    addresses: vec![format!(
                        "10.{}.{}.{}",
                        64 + n / 62500,
                        n / 250 % 250,
                        n % 250 + 1
                    )],
                    node_name: Some(node_name((i * 7 + j * 13) % scale.nodes.max(1))),
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        serving: Some(true),
                        terminating: Some(false),
                    }),
                    ..Default::default()
                }
            })
            .collect();
        endpoint_slices.push(EndpointSlice {
            metadata: meta(
                Some(&namespace),
                &format!("{name}-abcde"),
                &[(labels::SERVICE_NAME_LABEL, &name)],
            ),
            address_type: "IPv4".into(),
            endpoints,
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
        });
    }
    Snapshot {
        services,
        endpoint_slices,
        nodes,
        policies: Vec::new(),
        layouts: BTreeMap::new(),
        options: ResolveOptions::default(),
    }
}
