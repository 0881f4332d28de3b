//! User stories, end to end: the real controller and agents in a namespace
//! cluster (see `planproxy_e2e`), checked through the API and with traffic.

use std::time::Duration;

use planproxy_e2e::traffic::wait_servers;
use planproxy_e2e::{AppDef, Cluster, ClusterSpec, Protocol, ServiceDef};

/// How long the control loop (controller coalescing, agent sync) may take.
const CONVERGE: Duration = Duration::from_secs(30);

fn web_service() -> ServiceDef {
    ServiceDef::cluster_ip("default", "web", "web")
        .tcp("http", 80, 8080)
        .udp("dns", 53, 8080)
}

#[test]
fn cluster_ip_service_reaches_its_pods_from_every_node() {
    let cluster = Cluster::start(ClusterSpec::default()).unwrap();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("web", 2, 8080)).await.unwrap();
            api.create_service(&web_service()).await.unwrap();
            api.wait_programmed(Some(("default/web", true)), CONVERGE)
                .await
                .unwrap();
        })
        .unwrap();
    let pods = cluster.ready_pod_names("default", "web");
    for node in 1..=2 {
        let probe = &cluster.probe_pod(node).ns;
        for ipv6 in [false, true] {
            let http = cluster.service_addr("default", "web", 80, ipv6).unwrap();
            wait_servers(probe, http, Protocol::Tcp, &pods, CONVERGE).unwrap();
            let dns = cluster.service_addr("default", "web", 53, ipv6).unwrap();
            wait_servers(probe, dns, Protocol::Udp, &pods, CONVERGE).unwrap();
        }
    }
}
