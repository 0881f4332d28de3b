//! Load benchmark of the test API server: a cluster of 1 000 Nodes, 10 000
//! Services and 10 000 EndpointSlices, paged lists, and thousands of ProxyPlan
//! writes fanned out to label-filtered watches (one per node, like agents).
//!
//! ```sh
//! cargo run --release -p planproxy-test-apiserver --example load          # full size
//! cargo run --release -p planproxy-test-apiserver --example load -- 0.1   # a tenth
//! cargo run --release -p planproxy-test-apiserver --example load -- 1 1000 # a watch per node
//! ```
//!
//! Prints one table row per phase: operations, wall time, operations per second.

use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt, stream};
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams};
use planproxy_crds::ProxyPlan;
use planproxy_test_apiserver::{Config, TestApiServer};
use serde_json::json;

const CONCURRENCY: usize = 32;

fn row(phase: &str, ops: usize, elapsed: Duration) {
    println!(
        "| {phase:<44} | {ops:>7} | {:>9.3} | {:>9.0} |",
        elapsed.as_secs_f64(),
        ops as f64 / elapsed.as_secs_f64()
    );
}

fn decode<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> anyhow::Result<T> {
    Ok(serde_json::from_value(value)?)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let scale: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1.0);
    let nodes = ((1000.0 * scale) as usize).max(1);
    let services = ((10_000.0 * scale) as usize).max(1);
    let plan_writes = ((5_000.0 * scale) as usize).max(1);
    // Per-node plan watches, like one agent per node (second argument; default 100).
    let watched_nodes = std::env::args()
        .nth(2)
        .map(|s| s.parse::<usize>())
        .transpose()?
        .unwrap_or(100)
        .min(nodes);

    let server = TestApiServer::start(Config::default()).await?;
    let client = server.client("bench").await?;
    println!(
        "| {:<44} | {:>7} | {:>9} | {:>9} |",
        "phase", "ops", "seconds", "ops/s"
    );
    println!("|{:-<46}|{:-<9}|{:-<11}|{:-<11}|", "", "", "", "");

    let node_api: Api<Node> = Api::all(client.clone());
    let started = Instant::now();
    stream::iter(0..nodes)
        .map(|i| {
            let api = node_api.clone();
            async move {
                let node: Node = decode(json!({"metadata": {"name": format!("node-{i}"), "labels": {"kubernetes.io/hostname": format!("node-{i}")}}}))?;
                api.create(&PostParams::default(), &node).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    row("create Nodes", nodes, started.elapsed());

    let svc_api: Api<Service> = Api::namespaced(client.clone(), "default");
    let started = Instant::now();
    stream::iter(0..services)
        .map(|i| {
            let api = svc_api.clone();
            async move {
                let svc: Service = decode(json!({
                    "metadata": {"name": format!("svc-{i}")},
                    "spec": {"clusterIP": format!("10.96.{}.{}", i / 250, i % 250 + 1), "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]}
                }))?;
                api.create(&PostParams::default(), &svc).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    row("create Services", services, started.elapsed());

    let slice_api: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let started = Instant::now();
    stream::iter(0..services)
        .map(|i| {
            let api = slice_api.clone();
            async move {
                let slice: EndpointSlice = decode(json!({
                    "metadata": {"name": format!("svc-{i}-abcde"), "labels": {"kubernetes.io/service-name": format!("svc-{i}")}},
                    "addressType": "IPv4",
                    "endpoints": (0..3).map(|e| json!({"addresses": [format!("10.244.{}.{}", i % 200, e + 1)], "conditions": {"ready": true}, "nodeName": format!("node-{}", (i + e) % nodes)})).collect::<Vec<_>>(),
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
                }))?;
                api.create(&PostParams::default(), &slice).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    row("create EndpointSlices", services, started.elapsed());

    let started = Instant::now();
    let mut listed = 0;
    let mut token: Option<String> = None;
    loop {
        let mut params = ListParams::default().limit(500);
        if let Some(t) = &token {
            params = params.continue_token(t);
        }
        let page = svc_api.list(&params).await?;
        listed += page.items.len();
        token = page.metadata.continue_.filter(|t| !t.is_empty());
        if token.is_none() {
            break;
        }
    }
    row("list Services (pages of 500)", listed, started.elapsed());

    let started = Instant::now();
    let slices = slice_api.list(&ListParams::default()).await?;
    row(
        "list EndpointSlices (one page)",
        slices.items.len(),
        started.elapsed(),
    );

    // ProxyPlan writes, watched per node (label-filtered) like agents do.
    let plan_api: Api<ProxyPlan> = Api::all(client.clone());
    let example = include_str!("../../../examples/proxyplan.yaml");
    let template: serde_json::Value = serde_yaml::from_str(example)?;
    let rv = server.resource_version().to_string();
    let mut watchers = Vec::new();
    for n in 0..watched_nodes {
        let stream = plan_api
            .watch(
                &WatchParams::default()
                    .labels(&format!("planproxy.dev/node=node-{n}"))
                    .timeout(600),
                &rv,
            )
            .await?;
        watchers.push(stream.boxed());
    }
    let expected_per_watched = (0..plan_writes)
        .filter(|i| i % nodes < watched_nodes)
        .count();
    let watch_task = tokio::spawn(async move {
        let mut all = stream::select_all(watchers);
        let mut seen = 0;
        while seen < expected_per_watched {
            match all.next().await {
                Some(Ok(WatchEvent::Added(_) | WatchEvent::Modified(_))) => seen += 1,
                Some(Ok(_)) => {}
                Some(Err(e)) => return Err(anyhow::anyhow!(e)),
                None => break,
            }
        }
        Ok(Instant::now())
    });
    let started = Instant::now();
    stream::iter(0..plan_writes)
        .map(|i| {
            let api = plan_api.clone();
            let mut plan = template.clone();
            async move {
                let node = format!("node-{}", i % nodes);
                plan["metadata"] = json!({"name": node, "labels": {"planproxy.dev/node": node, "planproxy.dev/shard": "0"}});
                plan["spec"]["nodeName"] = json!(node);
                plan["spec"]["shard"]["generation"] = json!(i / nodes + 1);
                api.patch(&node, &PatchParams::apply("bench").force(), &Patch::Apply(&plan)).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    row(
        "apply ProxyPlans (server-side apply)",
        plan_writes,
        started.elapsed(),
    );
    let watched_done = tokio::time::timeout(Duration::from_secs(120), watch_task).await???;
    row(
        &format!("…all seen by {watched_nodes} per-node watches"),
        expected_per_watched,
        watched_done - started,
    );
    println!(
        "\nplan writes counted by the server: {}",
        server.write_count("proxyplans.planproxy.dev")
    );
    Ok(())
}
