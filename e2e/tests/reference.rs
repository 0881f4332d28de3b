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

/// The shape of a JSON document: every key path, with the type of its value.
fn shape(value: &serde_json::Value, prefix: &str, out: &mut std::collections::BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, inner) in map {
                shape(inner, &format!("{prefix}/{key}"), out);
            }
        }
        serde_json::Value::Array(_) => {
            out.insert(format!("{prefix}: array"));
        }
        serde_json::Value::String(_) => {
            out.insert(format!("{prefix}: string"));
        }
        serde_json::Value::Bool(_) => {
            out.insert(format!("{prefix}: bool"));
        }
        serde_json::Value::Number(_) => {
            out.insert(format!("{prefix}: number"));
        }
        serde_json::Value::Null => {
            out.insert(format!("{prefix}: null"));
        }
    }
}

/// Load balancers and dashboards read kube-proxy's `/healthz` JSON: an agent
/// answers with the same fields, of the same types, as the real kube-proxy on
/// the same cluster.
#[test]
fn the_agents_healthz_answers_with_kube_proxys_fields() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 2,
        kube_proxy_nodes: BTreeMap::from([(2, KubeProxyMode::Iptables)]),
        ..ClusterSpec::default()
    })
    .expect("the cluster starts");
    cluster
        .run(|api| async move { api.wait_programmed(None, CONVERGE).await })
        .expect("the scenario runs")
        .expect("node1 programmed");
    let from = &cluster.client(1).ns;
    let healthz = |node: u8| {
        let address = std::net::SocketAddr::new(cluster.node(node).ipv4.into(), 10256);
        planproxy_e2e::wait::eventually_sync("a healthy /healthz", CONVERGE, || {
            match from.http_get(address, "/healthz") {
                Some((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                    .map_err(|e| format!("{e}: {body}")),
                other => Err(format!("{other:?}")),
            }
        })
        .expect("/healthz answers 200")
    };
    let (ours, theirs) = (healthz(1), healthz(2));
    let (mut our_shape, mut their_shape) = Default::default();
    shape(&ours, "", &mut our_shape);
    shape(&theirs, "", &mut their_shape);
    assert_eq!(
        our_shape, their_shape,
        "planproxy: {ours}\nkube-proxy: {theirs}"
    );
}
