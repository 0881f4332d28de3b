//! End-to-end network-programming latency: from an EndpointSlice write to the
//! new endpoint's DNAT rule being in every node's kernel, through the real
//! controller, the real control plane and the agents of a 3-node namespace
//! cluster.
//!
//! ```sh
//! cargo build --bins && cargo run -p planproxy-e2e --example agent_programming_latency [-- <changes> [<minSyncPeriod> [<gap ms>]]]
//! ```
//!
//! Changes follow each other after `<gap ms>` (default 0: back to back). Back
//! to back, every change but the first waits out `minSyncPeriod` after the
//! previous sync, as in kube-proxy; with a gap longer than `minSyncPeriod` each
//! change is measured on its own.
//!
//! Each change replaces the service's only endpoint with a new address (no pod
//! is needed for rules to be programmed); the clock starts right before the
//! slice write and stops when `iptables-save -t nat` of the last node shows
//! `--to-destination <new ip>:8080`. Nodes are polled every 10 ms, one process
//! per poll, so results carry that resolution and a little of that load.

use std::net::{IpAddr, Ipv4Addr};
use std::time::{Duration, Instant};

use planproxy_e2e::objects::{self, MANAGED_BY_CONTROLLER};
use planproxy_e2e::{Cluster, ClusterSpec, E2eError, EndpointDef, ServiceDef};
use serde_json::json;

const POLL: Duration = Duration::from_millis(10);
const GIVE_UP: Duration = Duration::from_secs(60);

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<(), E2eError> {
    let mut args = std::env::args().skip(1);
    let changes: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(100);
    let min_sync_period = args.next().unwrap_or_else(|| "1s".to_owned());
    let gap = Duration::from_millis(args.next().and_then(|a| a.parse().ok()).unwrap_or(0));
    let nodes: u8 = 3;

    let cluster = Cluster::start(ClusterSpec {
        nodes,
        clients: 0,
        ..ClusterSpec::default()
    })?;
    let service = ServiceDef::cluster_ip("default", "lat", "lat").tcp("http", 80, 8080);
    cluster.run(|api| {
        let service = service.clone();
        let min_sync_period = min_sync_period.clone();
        async move {
            api.apply_policy(json!({
                "apiVersion": "planproxy.dev/v1alpha1",
                "kind": "ProxyPolicy",
                "metadata": {"name": "bench-sync"},
                "spec": {"priority": 100, "sync": {"minSyncPeriod": min_sync_period}},
            }))
            .await?;
            api.create_service(&service).await?;
            api.wait_programmed(Some(("default/lat", true)), Duration::from_secs(60))
                .await
        }
    })??;

    let mut first_node = Vec::with_capacity(changes);
    let mut all_nodes = Vec::with_capacity(changes);
    for change in 0..changes {
        std::thread::sleep(gap);
        let ip = IpAddr::V4(Ipv4Addr::new(10, 244, 250, 10 + (change % 200) as u8));
        let endpoint = EndpointDef {
            ip,
            pod_name: format!("bench-{change}"),
            node_name: planproxy_e2e::node_name(1 + (change % usize::from(nodes)) as u8),
            zone: None,
            ready: true,
            serving: true,
            terminating: false,
            hint_zones: Vec::new(),
        };
        let slice = objects::endpoint_slice(&service, false, &[endpoint], &objects::now_rfc3339())?;
        let started = cluster.run(|api| async move {
            let slices: kube::Api<k8s_openapi::api::discovery::v1::EndpointSlice> =
                kube::Api::namespaced(api.client.clone(), "default");
            let started = Instant::now();
            slices
                .patch(
                    &objects::slice_name("lat", false),
                    &kube::api::PatchParams::apply(MANAGED_BY_CONTROLLER).force(),
                    &kube::api::Patch::Apply(&slice),
                )
                .await?;
            Ok::<_, E2eError>(started)
        })??;

        let needle = format!("--to-destination {ip}:8080");
        let mut pending: Vec<u8> = (1..=nodes).collect();
        let mut first = None;
        while !pending.is_empty() {
            if started.elapsed() > GIVE_UP {
                return Err(E2eError::Invalid(format!(
                    "change {change}: nodes {pending:?} did not program {ip} within {GIVE_UP:?}"
                )));
            }
            pending.retain(|node| {
                let dump = cluster
                    .node(*node)
                    .ns
                    .exec_ok(&["iptables-save", "-t", "nat"])
                    .unwrap_or_default();
                !dump.contains(&needle)
            });
            if pending.len() < usize::from(nodes) && first.is_none() {
                first = Some(started.elapsed());
            }
            if !pending.is_empty() {
                std::thread::sleep(POLL);
            }
        }
        all_nodes.push(started.elapsed());
        first_node.push(first.unwrap_or_else(|| started.elapsed()));
    }

    first_node.sort();
    all_nodes.sort();
    println!(
        "network programming latency, EndpointSlice write -> rules in the kernel ({changes} changes {gap:?} apart, {nodes} nodes, minSyncPeriod {min_sync_period})"
    );
    println!("| measured until     | median ms | p90 ms | p99 ms | max ms |");
    println!("|--------------------|-----------|--------|--------|--------|");
    for (label, samples) in [("first node", &first_node), ("every node", &all_nodes)] {
        println!(
            "| {label:<18} | {:>9} | {:>6} | {:>6} | {:>6} |",
            ms(percentile(samples, 50.0)),
            ms(percentile(samples, 90.0)),
            ms(percentile(samples, 99.0)),
            ms(percentile(samples, 100.0)),
        );
    }
    Ok(())
}
