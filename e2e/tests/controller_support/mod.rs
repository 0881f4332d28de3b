//! Shared setup of the controller scenarios: a real control plane on loopback (the
//! controller needs no data plane) and real `planproxy-controller run` processes.

#![allow(dead_code)] // Each scenario file uses a different part.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use planproxy_control_plane::{ControlPlane, ControlPlaneConfig, MASTERS};
use planproxy_e2e::binaries::{self, CONTROLLER};
use serde_json::{Value, json};
use tempfile::TempDir;

/// The Lease the scenarios elect through.
pub const LEASE_NAMESPACE: &str = "kube-system";
/// The Lease name.
pub const LEASE_NAME: &str = "planproxy-controller";
/// Short leader-election timings so failover scenarios stay quick.
pub const LEASE_DURATION: Duration = Duration::from_secs(4);
/// See [`LEASE_DURATION`].
pub const RENEW_DEADLINE: Duration = Duration::from_secs(3);
/// See [`LEASE_DURATION`].
pub const RETRY_PERIOD: Duration = Duration::from_millis(500);
/// The ProxyPlan resource as the server counts it.
pub const PLANS: &str = "proxyplans.planproxy.dev";

/// A control plane with nodes and services, and a directory for kubeconfigs
/// and logs.
pub struct TestCluster {
    pub server: ControlPlane,
    pub dir: TempDir,
}

impl TestCluster {
    /// A server holding `nodes` Nodes and `services` Services, each with one slice
    /// of one endpoint.
    pub async fn start(nodes: usize, services: usize) -> Self {
        Self::start_with(nodes, services, true).await
    }

    /// [`Self::start`], with kube-apiserver's watch cache on or off (off, an
    /// etcd compaction expires every watch's resourceVersion).
    pub async fn start_with(nodes: usize, services: usize, watch_cache: bool) -> Self {
        // The slices are written here (the services have no selector); the
        // garbage collector deletes a removed node's plans.
        let server = ControlPlane::start(ControlPlaneConfig {
            controllers: vec!["garbage-collector-controller".into()],
            watch_cache,
            ..ControlPlaneConfig::default()
        })
        .expect("the control plane starts");
        server.install_planproxy_crds().expect("the CRDs install");
        for i in 0..nodes {
            server.create(node(&node_name(i), i)).expect("node");
        }
        for i in 0..services {
            server
                .create(service(&service_name(i), i))
                .expect("service");
            server
                .create(slice(&service_name(i), &[&endpoint_ip(i, 0)]))
                .expect("slice");
        }
        let dir = tempfile::tempdir().expect("temp dir");
        Self { server, dir }
    }

    /// Starts a controller process called `identity`.
    pub fn controller(&self, identity: &str, extra: &[&str]) -> ControllerProcess {
        ControllerProcess::spawn(self, identity, extra)
    }

    /// Every ProxyPlan.
    pub fn plans(&self) -> Vec<Value> {
        self.server.list("planproxy.dev/v1alpha1", "ProxyPlan")
    }

    /// The ProxyPlans of `node`.
    pub fn plans_of(&self, node: &str) -> Vec<Value> {
        self.plans()
            .into_iter()
            .filter(|p| p.pointer("/spec/nodeName").and_then(Value::as_str) == Some(node))
            .collect()
    }

    /// Whether every node's plans hold `ip` as an endpoint.
    pub fn every_plan_has_endpoint(&self, nodes: usize, ip: &str) -> bool {
        (0..nodes).all(|i| {
            self.plans_of(&node_name(i))
                .iter()
                .any(|p| endpoint_ips(p).iter().any(|e| e == ip))
        })
    }

    /// The current holder of the leader Lease.
    pub fn lease_holder(&self) -> Option<String> {
        let lease = self.server.get(
            "coordination.k8s.io/v1",
            "Lease",
            Some(LEASE_NAMESPACE),
            LEASE_NAME,
        )?;
        lease
            .pointer("/spec/holderIdentity")
            .and_then(Value::as_str)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
    }

    /// Replaces the slice of service `i` with these endpoint IPs (through the API,
    /// so watches see it).
    pub async fn set_endpoints(&self, i: usize, ips: &[&str]) {
        let client = self
            .server
            .client("test", Some(MASTERS))
            .await
            .expect("client");
        let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client, "default");
        let object: EndpointSlice =
            serde_json::from_value(slice(&service_name(i), ips)).expect("an EndpointSlice");
        let name = format!("{}-ipv4", service_name(i));
        slices
            .replace(&name, &Default::default(), &object)
            .await
            .expect("slice update");
    }
}

/// A `planproxy-controller run` process, killed when dropped.
pub struct ControllerProcess {
    pub identity: String,
    pub admin: SocketAddr,
    pub log: PathBuf,
    child: Option<Child>,
}

fn free_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("address")
}

impl ControllerProcess {
    fn spawn(cluster: &TestCluster, identity: &str, extra: &[&str]) -> Self {
        let kubeconfig = cluster.dir.path().join(format!("kubeconfig-{identity}"));
        std::fs::write(
            &kubeconfig,
            cluster
                .server
                .kubeconfig(identity, Some(MASTERS))
                .expect("a kubeconfig"),
        )
        .expect("kubeconfig");
        let log = cluster.dir.path().join(format!("{identity}.log"));
        let admin = free_port();
        let binary = binaries::locate(CONTROLLER).expect("planproxy-controller is built");
        let secs = |d: Duration| format!("{}ms", d.as_millis());
        let child = Command::new(binary)
            .arg("run")
            .args(["--identity", identity])
            .args(["--admin-bind-address", &admin.to_string()])
            .args(["--leader-election-namespace", LEASE_NAMESPACE])
            .args(["--lease-duration", &secs(LEASE_DURATION)])
            .args(["--renew-deadline", &secs(RENEW_DEADLINE)])
            .args(["--retry-period", &secs(RETRY_PERIOD)])
            .args(["--coalesce-window", "200ms"])
            .args(["--log-level", "info,planproxy_controller=debug"])
            .args(extra)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("controller starts");
        Self {
            identity: identity.to_owned(),
            admin,
            log,
            child: Some(child),
        }
    }

    /// SIGKILL: the process gets no chance to release anything.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        child.wait().expect("exits")
    }

    /// GETs an admin path; None while the server does not answer.
    pub async fn admin_get(&self, path: &str) -> Option<String> {
        let admin = self.admin;
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let timeout = Duration::from_secs(2);
            let mut stream = std::net::TcpStream::connect_timeout(&admin, timeout).ok()?;
            stream.set_read_timeout(Some(timeout)).ok()?;
            let request = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
            stream.write_all(request.as_bytes()).ok()?;
            let mut response = String::new();
            stream.read_to_string(&mut response).ok()?;
            Some(response)
        })
        .await
        .ok()
        .flatten()
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        self.admin_get("/readyz")
            .await
            .is_some_and(|r| r.starts_with("HTTP/1.1 200"))
    }

    /// The process's log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ControllerProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- log of controller {} ---\n{}",
                self.identity,
                self.log_text()
            );
        }
    }
}

/// Polls `check` every 50 ms until it returns Some, for at most `timeout`.
pub async fn eventually<T>(
    what: &str,
    timeout: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Polls the controller's readiness.
pub async fn until_ready(controller: &ControllerProcess, timeout: Duration) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !controller.ready().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "controller {} not ready after {timeout:?}\n{}",
            controller.identity,
            controller.log_text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub fn node_name(i: usize) -> String {
    format!("node-{i}")
}

pub fn service_name(i: usize) -> String {
    format!("svc-{i}")
}

pub fn endpoint_ip(service: usize, n: usize) -> String {
    format!("10.{}.{}.{}", 64 + service / 250, service % 250, n + 1)
}

pub fn node(name: &str, i: usize) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "spec": {"podCIDRs": [format!("10.244.{}.0/24", i % 250)]},
        "status": {"addresses": [{"type": "InternalIP", "address": format!("172.31.{}.{}", i / 250, i % 250 + 1)}]},
    })
}

pub fn service(name: &str, i: usize) -> Value {
    // 10.96.0.1 is the `kubernetes` Service's.
    let ip = format!("10.96.{}.{}", 1 + i / 250, i % 250 + 1);
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": "default", "name": name},
        "spec": {
            "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
            "ports": [{"name": "http", "protocol": "TCP", "port": 80, "targetPort": 8080}],
        },
    })
}

pub fn slice(service: &str, ips: &[&str]) -> Value {
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

pub fn endpoint_ips(plan: &Value) -> Vec<String> {
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
