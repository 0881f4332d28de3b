//! Reference nodes: the real kube-proxy (iptables and nftables modes, built
//! from the same pinned Kubernetes release as the control plane) programs one
//! node of the cluster while planproxy's agents program the others. The same
//! Services, the same pods and the same clients: every node must serve them
//! alike.

use std::collections::BTreeMap;
use std::time::Duration;

use planproxy_e2e::traffic::wait_servers;
use planproxy_e2e::{AppDef, Cluster, ClusterSpec, KubeProxyMode, Protocol, ServiceDef};

const REFERENCE: u8 = 3;
const CONVERGE: Duration = Duration::from_secs(90);

fn serves_alike(mode: KubeProxyMode) {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 3,
        kube_proxy_nodes: BTreeMap::from([(REFERENCE, mode)]),
        ..ClusterSpec::default()
    })
    .expect("the cluster starts");
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("web", 3, 8080))
                .await
                .expect("web deploys");
            api.create_service(
                &ServiceDef::cluster_ip("default", "web", "web")
                    .tcp("http", 80, 8080)
                    .node_port(),
            )
            .await
            .expect("the service is created");
            api.wait_programmed(Some(("default/web", true)), CONVERGE)
                .await
                .expect("planproxy's nodes program web");
        })
        .expect("the scenario runs");
    let pods = cluster.ready_pod_names("default", "web");
    let node_port = cluster
        .node_port("default", "web", 80)
        .expect("a node port");
    for ipv6 in [false, true] {
        let vip = cluster
            .service_addr("default", "web", 80, ipv6)
            .expect("a cluster IP of each family");
        for node in 1..=3 {
            wait_servers(
                &cluster.probe_pod(node).ns,
                vip,
                Protocol::Tcp,
                &pods,
                CONVERGE,
            )
            .unwrap_or_else(|e| panic!("node{node}: {e}\n{}", cluster.kube_proxy_log(REFERENCE)));
        }
    }
    for node in 1..=3 {
        let address = std::net::SocketAddr::new(cluster.node(node).ipv4.into(), node_port);
        wait_servers(
            &cluster.client(1).ns,
            address,
            Protocol::Tcp,
            &pods,
            CONVERGE,
        )
        .unwrap_or_else(|e| panic!("node{node}'s NodePort: {e}"));
    }
    cluster
        .processes_running()
        .expect("agents, controller and kube-proxy still run");
}

#[test]
fn a_kube_proxy_iptables_reference_node_serves_what_planproxy_nodes_serve() {
    serves_alike(KubeProxyMode::Iptables);
}

#[test]
fn a_kube_proxy_nftables_reference_node_serves_what_planproxy_nodes_serve() {
    serves_alike(KubeProxyMode::Nftables);
}
