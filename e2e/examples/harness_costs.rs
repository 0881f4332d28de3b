//! What the e2e harness itself costs, so scenario budgets can be planned:
//! building namespace topologies, starting the real control plane alone,
//! starting a namespace cluster (control plane,
//! `helm install`, controller, agents), and a first service going from
//! creation to answering from every node (and the control plane processes'
//! peak memory by then).
//!
//! ```sh
//! cargo build --bins && cargo run -p planproxy-e2e --example harness_costs [-- <rounds>]
//! ```

use std::time::{Duration, Instant};

use planproxy_e2e::traffic::wait_servers;
use planproxy_e2e::{AppDef, Cluster, ClusterSpec, E2eError, Protocol, ServiceDef};
use planproxy_netns::{Topology, TopologySpec};

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn row(what: &str, samples: Vec<Duration>) {
    let max = samples.iter().max().copied().unwrap_or_default();
    println!(
        "| {what:<58} | {:>9.0} | {:>8.0} |",
        median(samples).as_secs_f64() * 1000.0,
        max.as_secs_f64() * 1000.0
    );
}

fn main() -> Result<(), E2eError> {
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    println!("| {:<58} | {:>9} | {:>8} |", "step", "median ms", "max ms");
    println!("|{:-<60}|{:-<11}|{:-<10}|", "", "", "");

    for (nodes, pods) in [(2u8, 2u8), (3, 10)] {
        let mut samples = Vec::new();
        for _ in 0..rounds {
            let started = Instant::now();
            let topology = Topology::new(TopologySpec {
                nodes,
                pods_per_node: pods,
                clients: 1,
            })?;
            samples.push(started.elapsed());
            drop(topology);
        }
        let namespaces = 2 + usize::from(nodes) * (1 + usize::from(pods));
        row(
            &format!("Topology {nodes} nodes x {pods} pods ({namespaces} namespaces)"),
            samples,
        );
    }

    let mut plane_start = Vec::new();
    let mut peak: std::collections::BTreeMap<&'static str, f64> = Default::default();
    for _ in 0..rounds {
        let started = Instant::now();
        let plane = planproxy_control_plane::ControlPlane::start(Default::default())
            .map_err(|e| E2eError::ApiServer(e.to_string()))?;
        plane_start.push(started.elapsed());
        drop(plane);
    }
    row(
        "ControlPlane::start (etcd, kube-apiserver ready, controller-manager)",
        plane_start,
    );

    let (mut start, mut reachable) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        let started = Instant::now();
        let cluster = Cluster::start(ClusterSpec::default())?;
        start.push(started.elapsed());

        let started = Instant::now();
        cluster.run(|api| async move {
            api.deploy(&AppDef::new("web", 2, 8080)).await?;
            api.create_service(
                &ServiceDef::cluster_ip("default", "web", "web").tcp("http", 80, 8080),
            )
            .await
        })??;
        let pods = cluster.ready_pod_names("default", "web");
        let vip = cluster.service_addr("default", "web", 80, false)?;
        for node in 1..=2 {
            wait_servers(
                &cluster.probe_pod(node).ns,
                vip,
                Protocol::Tcp,
                &pods,
                Duration::from_secs(60),
            )?;
        }
        reachable.push(started.elapsed());
        for (name, pid) in cluster.apiserver().pids() {
            let mib = planproxy_e2e::process::peak_rss_mib(pid);
            let entry = peak.entry(name).or_default();
            *entry = entry.max(mib);
        }
    }
    row(
        "Cluster::start (2 nodes, control plane, helm, controller, 2 agents)",
        start,
    );
    row(
        "deploy 2 pods + ClusterIP -> answered from both nodes",
        reachable,
    );
    println!();
    println!("| control plane process, after a Cluster::start and first service | peak RSS MiB |");
    println!("|---|---:|");
    for (name, mib) in peak {
        println!("| {name} | {mib:.0} |");
    }
    Ok(())
}
