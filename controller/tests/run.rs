//! `planproxy-controller run` in-process against a real kube-apiserver: plans follow
//! nodes and services, writes stay minimal, policies get their status.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use planproxy_control_plane::{ControlPlane, ControlPlaneConfig, MASTERS};
use planproxy_controller::run::{RunArgs, run_with};
use planproxy_crds::labels::{NODE_LABEL, SHARD_LABEL, SPEC_HASH_ANNOTATION};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

const PLANS: &str = "proxyplans.planproxy.dev";

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    run: RunArgs,
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

/// A controller running in this process; stops when dropped.
struct Controller {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
    admin: SocketAddr,
}

impl Controller {
    async fn start(server: &ControlPlane, extra: &[&str]) -> Self {
        let admin = free_port();
        let admin_flag = admin.to_string();
        let mut flags = vec![
            "run",
            "--leader-elect",
            "false",
            "--coalesce-window",
            "100ms",
            "--admin-bind-address",
            &admin_flag,
        ];
        flags.extend_from_slice(extra);
        let args = Cli::parse_from(flags).run;
        let client = server
            .client("controller", Some(MASTERS))
            .await
            .expect("client");
        let (stop, stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            run_with(client, args, stopped)
                .await
                .expect("controller runs");
        });
        Self {
            stop,
            task: Some(task),
            admin,
        }
    }

    async fn ready(&self) -> bool {
        http_get(self.admin, "/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    }

    async fn stop(mut self) {
        self.stop.send_replace(true);
        if let Some(task) = self.task.take() {
            task.await.expect("controller task");
        }
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

async fn http_get(address: SocketAddr, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    Some(response)
}

async fn eventually<F: FnMut() -> Option<T>, T>(what: &str, mut check: F) -> T {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn node(name: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDRs": []},
        "status": {"addresses": [{"type": "InternalIP", "address": ip}]},
    })
}

fn service(name: &str, cluster_ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {
            "type": "ClusterIP", "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
            "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        },
    })
}

fn slice(service: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips
        .iter()
        .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true, "serving": true, "terminating": false}}))
        .collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {
            "namespace": "default", "name": format!("{service}-ipv4"),
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "endpoints": endpoints,
        "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
    })
}

fn plans(server: &ControlPlane) -> Vec<Value> {
    server.list("planproxy.dev/v1alpha1", "ProxyPlan")
}

fn plans_of(server: &ControlPlane, node: &str) -> Vec<Value> {
    plans(server)
        .into_iter()
        .filter(|p| p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node))
        .collect()
}

fn endpoint_ips(plan: &Value) -> Vec<String> {
    let mut ips = Vec::new();
    for port in plan["spec"]["servicePorts"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for e in port["clusterEndpoints"]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
        {
            ips.push(e["ip"].as_str().unwrap_or_default().to_owned());
        }
    }
    ips
}

async fn cluster(nodes: usize) -> ControlPlane {
    // Plans are owned by their Node: the garbage collector deletes them with it.
    let server = ControlPlane::start(ControlPlaneConfig {
        controllers: vec!["garbage-collector-controller".into()],
        ..ControlPlaneConfig::default()
    })
    .expect("control plane starts");
    server.install_planproxy_crds().expect("the CRDs install");
    for i in 0..nodes {
        server
            .create(node(&format!("node-{i}"), &format!("10.0.0.{}", i + 1)))
            .expect("node");
    }
    server
        .create(service("web", "10.96.0.10"))
        .expect("service");
    server.create(slice("web", &["10.1.0.1"])).expect("slice");
    server
}

async fn put(server: &ControlPlane, path: &str, object: &Value) {
    try_put(server, path, object).await.expect("update");
}

async fn try_put(server: &ControlPlane, path: &str, object: &Value) -> Result<Value, String> {
    let client = server.client("test", Some(MASTERS)).await.expect("client");
    let request = http::Request::put(path)
        .header("content-type", "application/json")
        .body(serde_json::to_vec(object).expect("json"))
        .expect("request");
    client
        .request::<Value>(request)
        .await
        .map_err(|e| format!("{e:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_gets_a_labelled_owned_plan_and_loses_it_with_the_node() {
    let server = cluster(3).await;
    let controller = Controller::start(&server, &[]).await;
    eventually("a plan per node", || {
        (plans(&server).len() == 3).then_some(())
    })
    .await;
    eventually("readiness", || Some(())).await;
    for i in 0..3 {
        let name = format!("node-{i}");
        let plan = plans_of(&server, &name).pop().expect("one plan");
        let meta = &plan["metadata"];
        assert_eq!(meta["labels"][NODE_LABEL], json!(name));
        assert_eq!(meta["labels"][SHARD_LABEL], json!("0"));
        let owner = &meta["ownerReferences"][0];
        assert_eq!(
            (owner["kind"].as_str(), owner["name"].as_str()),
            (Some("Node"), Some(name.as_str()))
        );
        let spec: planproxy_crds::ProxyPlanSpec =
            serde_json::from_value(plan["spec"].clone()).expect("spec");
        assert_eq!(
            meta["annotations"][SPEC_HASH_ANNOTATION],
            json!(planproxy_crds::spec_hash(&spec))
        );
        assert_eq!(endpoint_ips(&plan), ["10.1.0.1"]);
    }
    let mut ready = false;
    for _ in 0..100 {
        ready = controller.ready().await;
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        ready,
        "/readyz turns 200 once the first resolution is written"
    );

    let client = server.client("test", Some(MASTERS)).await.expect("client");
    let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(client);
    nodes
        .delete("node-1", &Default::default())
        .await
        .expect("delete node");
    eventually("the node's plan gone", || {
        plans_of(&server, "node-1").is_empty().then_some(())
    })
    .await;
    assert_eq!(plans(&server).len(), 2);
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_change_rewrites_one_shard_per_node_and_a_restart_rewrites_nothing() {
    let server = cluster(4).await;
    server.create(service("db", "10.96.0.11")).expect("service");
    server.create(slice("db", &["10.2.0.1"])).expect("slice");
    let controller = Controller::start(&server, &[]).await;
    eventually("plans written", || {
        (plans(&server).len() == 4).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    server.reset_request_counts();
    put(
        &server,
        "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/web-ipv4",
        &slice("web", &["10.1.0.1", "10.1.0.2"]),
    )
    .await;
    eventually("the new endpoint on every node", || {
        plans(&server)
            .iter()
            .all(|p| endpoint_ips(p).contains(&"10.1.0.2".to_owned()))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.write_count(PLANS), 4, "one write per node's shard");
    controller.stop().await;

    // A restart finds every plan up to date.
    server.reset_request_counts();
    let controller = Controller::start(&server, &[]).await;
    let mut ready = false;
    for _ in 0..200 {
        ready = controller.ready().await;
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(server.write_count(PLANS), 0, "a restart rewrites nothing");
    controller.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_edit_is_reported_and_the_accepted_spec_stays() {
    let server = cluster(1).await;
    let controller = Controller::start(&server, &[]).await;
    server
        .create(json!({
            "apiVersion": "planproxy.dev/v1alpha1", "kind": "ProxyPolicy",
            "metadata": {"name": "drop"},
            "spec": {"noEndpointsAction": "Drop"},
        }))
        .expect("policy");
    let policy = || {
        server
            .get("planproxy.dev/v1alpha1", "ProxyPolicy", None, "drop")
            .expect("policy")
    };
    let accepted = eventually("Accepted=True", || {
        let p = policy();
        (p.pointer("/status/conditions/0/status") == Some(&json!("True"))).then_some(p)
    })
    .await;
    assert_eq!(
        accepted["status"]["acceptedSpec"]["noEndpointsAction"],
        json!("Drop")
    );
    assert_eq!(accepted["status"]["matchedNodes"], json!(1));
    assert_eq!(
        accepted["status"]["observedGeneration"],
        accepted["metadata"]["generation"]
    );

    // A malformed CIDR never gets past the API server: the CRD's CEL rule
    // (isCIDR) rejects the write, naming the field.
    let mut bad_cidr = accepted.clone();
    bad_cidr["spec"]["nodePortAddresses"] = json!(["10.0.0.0/33"]);
    bad_cidr["status"] = Value::Null;
    let refused = try_put(
        &server,
        "/apis/planproxy.dev/v1alpha1/proxypolicies/drop",
        &bad_cidr,
    )
    .await
    .expect_err("the API server validates CIDRs");
    assert!(
        refused.contains("spec.nodePortAddresses") && refused.contains("422"),
        "{refused}"
    );

    // What no schema rule expresses (one duration longer than another) the
    // controller must reject.
    let mut edited = accepted.clone();
    edited["spec"]["sync"] = json!({"minSyncPeriod": "10s", "syncPeriod": "5s"});
    edited["status"] = Value::Null;
    put(
        &server,
        "/apis/planproxy.dev/v1alpha1/proxypolicies/drop",
        &edited,
    )
    .await;
    let rejected = eventually("Accepted=False", || {
        let p = policy();
        (p.pointer("/status/conditions/0/status") == Some(&json!("False"))).then_some(p)
    })
    .await;
    let condition = &rejected["status"]["conditions"][0];
    assert_eq!(condition["reason"], json!("Invalid"));
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(message.contains("spec.sync.minSyncPeriod"), "{message}");
    assert_eq!(
        rejected["status"]["acceptedSpec"]["noEndpointsAction"],
        json!("Drop")
    );
    assert_eq!(
        rejected["status"]["acceptedGeneration"],
        accepted["metadata"]["generation"]
    );
    assert_eq!(
        rejected["status"]["observedGeneration"],
        rejected["metadata"]["generation"]
    );
    controller.stop().await;
}
