//! A real Kubernetes control plane for planproxy's tests: etcd,
//! kube-apiserver and kube-controller-manager, built from the Go modules
//! pinned in `e2e/k8s/` (by `scripts/build-control-plane.sh`) and run as
//! processes, envtest-style: a fresh data directory on tmpfs, a per-run PKI,
//! free loopback ports, RBAC and the Node authorizer, everything torn down
//! when the [`ControlPlane`] is dropped.
//!
//! Components under test never talk to kube-apiserver directly: they connect
//! through a TCP proxy ([`ControlPlane::url`]) that passes TLS through and
//! only ever drops or refuses connections, so faults look to them exactly as
//! a network or server failure would. The harness' own calls (and
//! kube-controller-manager) go straight to the server and keep working while
//! the proxy refuses.
//!
//! Everything runs in the network namespace of the thread that calls
//! [`ControlPlane::start`]: the processes, the proxy and the runtime that
//! drives them are all started from there.

mod error;
mod etcd;
mod metrics;
mod pki;
mod process;
mod proxy;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams};
use serde_json::Value;

pub use error::{ControlPlaneError, Result};
pub use metrics::RequestCounts;
use pki::Pki;
pub use pki::{CertPair, Credentials};
use process::Component;
use proxy::FaultProxy;

/// The Kubernetes groups the harness' users belong to.
pub const MASTERS: &str = "system:masters";
/// The field manager of the harness' own writes.
pub const HARNESS_MANAGER: &str = "planproxy-e2e-harness";

/// The controllers kube-controller-manager runs by default here: the ones a
/// cluster without kubelets and schedulers still needs for Services to get
/// EndpointSlices, for owner references to be collected and for namespaces to
/// work. Node lifecycle, pod GC and the workload controllers stay off: with
/// no kubelet they would only taint, evict and create pods nobody runs.
pub const DEFAULT_CONTROLLERS: &[&str] = &[
    "endpointslice-controller",
    "endpointslice-mirroring-controller",
    "garbage-collector-controller",
    "namespace-controller",
    "serviceaccount-controller",
];

/// How to start a control plane.
#[derive(Clone, Debug)]
pub struct ControlPlaneConfig {
    /// Where components under test reach the API server: the fault proxy
    /// listens here (port 0 picks a free one).
    pub listen: SocketAddr,
    /// The address kube-apiserver itself listens on. Its endpoint in the
    /// `kubernetes` Service is `advertise:<its port>`.
    pub bind: IpAddr,
    /// `--advertise-address`; `listen`'s IP when unset.
    pub advertise: Option<IpAddr>,
    /// `--service-cluster-ip-range`.
    pub service_cidrs: String,
    /// kube-apiserver's watch cache. Off, every watch is served by etcd, so
    /// [`ControlPlane::expire_resource_versions`] makes reconnecting watches
    /// answer 410 Gone, as a real server does once history is compacted.
    pub watch_cache: bool,
    /// kube-controller-manager's `--controllers`; empty runs none.
    pub controllers: Vec<String>,
    /// Where the binaries are; see [`binaries_dir`] when unset.
    pub bin_dir: Option<PathBuf>,
}

impl Default for ControlPlaneConfig {
    fn default() -> Self {
        ControlPlaneConfig {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            advertise: None,
            service_cidrs: "10.96.0.0/16,fd00:96::/112".into(),
            watch_cache: true,
            controllers: DEFAULT_CONTROLLERS
                .iter()
                .map(|c| (*c).to_owned())
                .collect(),
            bin_dir: None,
        }
    }
}

/// How an outage looks to clients.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutageMode {
    /// Connections are closed and new ones refused (the server's host is up,
    /// the server is not).
    Refuse,
    /// kube-apiserver is frozen with SIGSTOP: connections open but nothing
    /// answers, not even TLS handshakes. The harness' own calls hang too.
    Hang,
}

struct Components {
    etcd: Component,
    apiserver: Option<Component>,
    controller_manager: Option<Component>,
}

struct Inner {
    dir: tempfile::TempDir,
    pki: Pki,
    bin_dir: PathBuf,
    etcd: SocketAddr,
    apiserver: SocketAddr,
    apiserver_args: Vec<String>,
    url: String,
    proxy: FaultProxy,
    admin: kube::Client,
    discovery: DiscoveryCache,
    components: Mutex<Components>,
    baseline: Mutex<RequestCounts>,
}

/// A running control plane. Dropping it kills every process and removes its
/// data.
pub struct ControlPlane {
    runtime: Option<tokio::runtime::Runtime>,
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("url", &self.inner.url)
            .finish_non_exhaustive()
    }
}

/// The directory holding the binaries: `$PLANPROXY_K8S_BIN`, or what
/// `scripts/build-control-plane.sh` prints (it builds them first if they are
/// not cached yet).
pub fn binaries_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PLANPROXY_K8S_BIN") {
        return Ok(PathBuf::from(dir));
    }
    static DIR: std::sync::OnceLock<std::result::Result<PathBuf, String>> =
        std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/build-control-plane.sh");
        let output = std::process::Command::new("bash")
            .arg(&script)
            .stderr(std::process::Stdio::inherit())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !output.status.success() {
            return Err(format!("{} failed ({})", script.display(), output.status));
        }
        Ok(PathBuf::from(
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        ))
    })
    .clone()
    .map_err(ControlPlaneError::Binaries)
}

/// planproxy's CRDs as the Helm chart ships them (what `helm install`
/// applies), for tests that need the kinds served but not the whole chart.
pub fn chart_crds_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../charts/planproxy/crds/planproxy.dev.yaml")
}

fn free_port(ip: IpAddr) -> Result<u16> {
    let listener = TcpListener::bind((ip, 0))
        .map_err(|e| ControlPlaneError::io(format!("finding a free port on {ip}"), e))?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|e| ControlPlaneError::io("reading a bound address", e))
}

fn write(path: &Path, text: &str) -> Result<()> {
    std::fs::write(path, text)
        .map_err(|e| ControlPlaneError::io(format!("writing {}", path.display()), e))
}

impl ControlPlane {
    /// Starts etcd, kube-apiserver (ready, with its bootstrap RBAC), the
    /// fault proxy and kube-controller-manager, in the calling thread's
    /// network namespace. Blocks until all are up; callable from sync and
    /// async code alike.
    pub fn start(config: ControlPlaneConfig) -> Result<ControlPlane> {
        // The runtime's worker threads, and every process started from
        // them, inherit the namespace of the thread that builds it.
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let runtime = tokio::runtime::Builder::new_multi_thread()
                        .worker_threads(2)
                        .thread_name("control-plane")
                        .enable_all()
                        .build()
                        .map_err(|e| ControlPlaneError::io("building the runtime", e))?;
                    let inner = runtime.block_on(boot(config))?;
                    Ok(ControlPlane {
                        runtime: Some(runtime),
                        inner: Arc::new(inner),
                    })
                })
                .join()
                .unwrap_or(Err(ControlPlaneError::RuntimeGone))
        })
    }

    /// Runs `future` on the control plane's runtime and waits for it, from
    /// any thread, inside a tokio runtime or not.
    fn block<F, R>(&self, future: F) -> Result<R>
    where
        F: std::future::Future<Output = Result<R>> + Send + 'static,
        R: Send + 'static,
    {
        let runtime = self
            .runtime
            .as_ref()
            .ok_or(ControlPlaneError::RuntimeGone)?;
        let (tx, rx) = std::sync::mpsc::channel();
        runtime.spawn(async move {
            let _ = tx.send(future.await);
        });
        rx.recv().map_err(|_| ControlPlaneError::RuntimeGone)?
    }

    /// The URL components under test use (through the fault proxy).
    pub fn url(&self) -> &str {
        &self.inner.url
    }

    /// kube-apiserver's own address, bypassing the proxy.
    pub fn apiserver_addr(&self) -> SocketAddr {
        self.inner.apiserver
    }

    /// The cluster CA, PEM.
    pub fn ca_pem(&self) -> &str {
        self.inner.pki.ca_pem()
    }

    /// A kubeconfig file for the administrator (`system:masters`, straight
    /// to kube-apiserver), as kube-controller-manager and helm use it.
    pub fn admin_kubeconfig_path(&self) -> PathBuf {
        self.inner.dir.path().join("admin.kubeconfig")
    }

    /// The data directory (logs, certificates, kubeconfigs).
    pub fn dir(&self) -> &Path {
        self.inner.dir.path()
    }

    /// A kubeconfig through the proxy for `user`, authenticated by a client
    /// certificate that puts it in `group` (none: the user has only the
    /// permissions RBAC grants it by name).
    pub fn kubeconfig(&self, user: &str, group: Option<&str>) -> Result<String> {
        let cert = self.inner.pki.client_cert(user, group)?;
        Ok(pki::kubeconfig(
            &self.inner.url,
            self.ca_pem(),
            user,
            &Credentials::Cert(cert),
        ))
    }

    /// A kubeconfig through the proxy with a bearer token.
    pub fn kubeconfig_with_token(&self, user: &str, token: &str) -> String {
        pki::kubeconfig(
            &self.inner.url,
            self.ca_pem(),
            user,
            &Credentials::Token(token.to_owned()),
        )
    }

    /// A client through the proxy for `user` in `group` (see [`Self::kubeconfig`]).
    pub async fn client(&self, user: &str, group: Option<&str>) -> Result<kube::Client> {
        client_from_kubeconfig(&self.kubeconfig(user, group)?).await
    }

    /// The harness' administrator client: `system:masters`, straight to
    /// kube-apiserver.
    pub fn admin(&self) -> kube::Client {
        self.inner.admin.clone()
    }

    /// A TokenRequest for service account `namespace/name`, bound to a Pod
    /// (name, uid) when given, so the token carries the pod's node as
    /// kubelet-issued tokens do.
    pub fn service_account_token(
        &self,
        namespace: &str,
        name: &str,
        pod: Option<(&str, &str)>,
    ) -> Result<String> {
        let api: kube::Api<ServiceAccount> = kube::Api::namespaced(self.admin(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: Vec::new(),
                expiration_seconds: Some(24 * 3600),
                bound_object_ref: pod.map(|(pod_name, uid)| BoundObjectReference {
                    api_version: Some("v1".into()),
                    kind: Some("Pod".into()),
                    name: Some(pod_name.to_owned()),
                    uid: Some(uid.to_owned()),
                }),
            },
            ..TokenRequest::default()
        };
        let name = name.to_owned();
        self.block(async move {
            let issued = api
                .create_token_request(&name, &PostParams::default(), &request)
                .await?;
            issued
                .status
                .map(|s| s.token)
                .ok_or_else(|| ControlPlaneError::Invalid("a TokenRequest without a token".into()))
        })
    }

    // ---- the harness' direct object access -------------------------------------

    /// Creates `object` (any kind the server serves).
    pub fn create(&self, object: Value) -> Result<Value> {
        let client = self.admin();
        let cache = self.inner.discovery.clone();
        self.block(async move {
            let (api, object) = dynamic_api(&client, &cache, object).await?;
            let created = api.create(&PostParams::default(), &object).await?;
            Ok(serde_json::to_value(created).unwrap_or_default())
        })
    }

    /// Creates or updates `object` with server-side apply as the harness.
    pub fn apply(&self, object: Value) -> Result<Value> {
        let client = self.admin();
        let cache = self.inner.discovery.clone();
        self.block(async move {
            let (api, object) = dynamic_api(&client, &cache, object).await?;
            let name = object.metadata.name.clone().unwrap_or_default();
            let applied = api
                .patch(
                    &name,
                    &PatchParams::apply(HARNESS_MANAGER).force(),
                    &Patch::Apply(&object),
                )
                .await?;
            Ok(serde_json::to_value(applied).unwrap_or_default())
        })
    }

    /// Applies every object of a multi-document YAML file (as `kubectl apply
    /// --server-side` would), then waits until the kinds of the
    /// CustomResourceDefinitions among them are served.
    pub fn apply_file(&self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ControlPlaneError::io(format!("reading {}", path.display()), e))?;
        let mut served = Vec::new();
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object = <Value as serde::Deserialize>::deserialize(document)
                .map_err(|e| ControlPlaneError::Invalid(format!("{}: {e}", path.display())))?;
            if object.is_null() {
                continue;
            }
            if object["kind"] == "CustomResourceDefinition" {
                let group = object["spec"]["group"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let kind = object["spec"]["names"]["kind"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                for version in object["spec"]["versions"].as_array().into_iter().flatten() {
                    if version["served"] == true {
                        let version = version["name"].as_str().unwrap_or_default();
                        served.push(GroupVersionKind::gvk(&group, version, &kind));
                    }
                }
            }
            self.apply(object)?;
        }
        let client = self.admin();
        self.block(async move {
            let deadline = Instant::now() + Duration::from_secs(60);
            for gvk in served {
                while kube::discovery::pinned_kind(&client, &gvk).await.is_err() {
                    if Instant::now() > deadline {
                        return Err(ControlPlaneError::Invalid(format!(
                            "{gvk:?} is not served after 60 s"
                        )));
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
            Ok(())
        })
    }

    /// Installs planproxy's CRDs from the chart ([`chart_crds_path`]) and
    /// waits until they are served.
    pub fn install_planproxy_crds(&self) -> Result<()> {
        self.apply_file(&chart_crds_path())
    }

    /// Merge-patches the status subresource of an object.
    pub fn patch_status(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        status: Value,
    ) -> Result<Value> {
        let client = self.admin();
        let cache = self.inner.discovery.clone();
        let (api_version, kind, name) = (api_version.to_owned(), kind.to_owned(), name.to_owned());
        let namespace = namespace.map(str::to_owned);
        self.block(async move {
            let api =
                resource_api(&client, &cache, &api_version, &kind, namespace.as_deref()).await?;
            let patched = api
                .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
                .await?;
            Ok(serde_json::to_value(patched).unwrap_or_default())
        })
    }

    /// Deletes an object, with a grace period if given (a pod nobody's
    /// kubelet stops then stays terminating); absent is fine.
    pub fn delete(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
        grace_period_seconds: Option<u32>,
    ) -> Result<()> {
        let client = self.admin();
        let cache = self.inner.discovery.clone();
        let (api_version, kind, name) = (api_version.to_owned(), kind.to_owned(), name.to_owned());
        let namespace = namespace.map(str::to_owned);
        self.block(async move {
            let api =
                resource_api(&client, &cache, &api_version, &kind, namespace.as_deref()).await?;
            let params = kube::api::DeleteParams {
                grace_period_seconds,
                ..Default::default()
            };
            match api.delete(&name, &params).await {
                Ok(_) => Ok(()),
                Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
                Err(e) => Err(e.into()),
            }
        })
    }

    /// The object, or None if it does not exist.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let client = self.admin();
        let cache = self.inner.discovery.clone();
        let (api_version, kind, name) = (api_version.to_owned(), kind.to_owned(), name.to_owned());
        let namespace = namespace.map(str::to_owned);
        self.block(async move {
            let api =
                resource_api(&client, &cache, &api_version, &kind, namespace.as_deref()).await?;
            Ok(api
                .get_opt(&name)
                .await?
                .map(|o| serde_json::to_value(o).unwrap_or_default()))
        })
        .ok()
        .flatten()
    }

    /// Every object of a kind, in every namespace.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let client = self.admin();
        let cache = self.inner.discovery.clone();
        let (api_version, kind) = (api_version.to_owned(), kind.to_owned());
        self.block(async move {
            let api = resource_api(&client, &cache, &api_version, &kind, None).await?;
            let list = api.list(&Default::default()).await?;
            Ok(list
                .items
                .into_iter()
                .map(|o| serde_json::to_value(o).unwrap_or_default())
                .collect())
        })
        .unwrap_or_default()
    }

    // ---- counting requests ---------------------------------------------------------

    /// kube-apiserver's request counters since the last
    /// [`Self::reset_request_counts`] (or since it started).
    pub fn request_counts(&self) -> RequestCounts {
        let inner = self.inner.clone();
        let now = self.block(async move { read_counts(&inner.admin).await });
        match now {
            Ok(now) => now.since(&lock(&self.inner.baseline)),
            Err(e) => {
                tracing::warn!(error = %e, "reading kube-apiserver's metrics");
                RequestCounts::default()
            }
        }
    }

    /// Requests of `verb` (lower case, as in `apiserver_request_total`) on `resource`.
    pub fn request_count(&self, verb: &str, resource: &str) -> u64 {
        self.request_counts().count(verb, resource)
    }

    /// Writes to `resource` (`proxyplans.planproxy.dev`) and its subresources.
    pub fn write_count(&self, resource: &str) -> u64 {
        self.request_counts().writes(resource)
    }

    /// Counts from now on.
    pub fn reset_request_counts(&self) {
        let inner = self.inner.clone();
        if let Ok(now) = self.block(async move { read_counts(&inner.admin).await }) {
            *lock(&self.inner.baseline) = now;
        }
    }

    /// Bytes kube-apiserver has sent through the proxy to components under test.
    pub fn bytes_to_clients(&self) -> u64 {
        self.inner
            .proxy
            .bytes_to_clients
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// [`Self::bytes_to_clients`] split by the client's address (in the
    /// namespace cluster, a node's address stands for that node's components).
    pub fn bytes_to_clients_by_peer(&self) -> std::collections::BTreeMap<IpAddr, u64> {
        self.inner
            .proxy
            .bytes_by_peer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    // ---- faults ----------------------------------------------------------------------

    /// Closes every connection of the components under test (their watches
    /// end; they reconnect at once).
    pub fn close_connections(&self) {
        let inner = self.inner.clone();
        let _ = self.block(async move {
            inner.proxy.close_connections();
            Ok(())
        });
    }

    /// An outage of `duration`, starting now; returns at once.
    pub fn outage(&self, duration: Duration, mode: OutageMode) {
        let inner = self.inner.clone();
        let result = self.block(async move {
            match mode {
                OutageMode::Refuse => inner.proxy.refuse_for(duration),
                OutageMode::Hang => {
                    apiserver_freeze(&inner, true)?;
                    let inner = inner.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(duration).await;
                        let _ = apiserver_freeze(&inner, false);
                    });
                }
            }
            Ok(())
        });
        if let Err(e) = result {
            tracing::error!(error = %e, "starting an outage");
        }
    }

    /// Makes every resourceVersion seen so far too old: writes an object (so
    /// history moves on), compacts etcd to its current revision, and closes
    /// every connection. Clients that resume a watch from where they were
    /// get 410 Gone and must re-list. Needs `watch_cache: false` (a watch
    /// cache keeps serving recent history after compaction).
    pub fn expire_resource_versions(&self) -> Result<u64> {
        let inner = self.inner.clone();
        self.block(async move {
            let api: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
                kube::Api::namespaced(inner.admin.clone(), "default");
            // Two revisions past anything a client has seen: a watch resumes
            // at the revision after its resourceVersion, which must be
            // compacted too for the server to answer 410.
            for step in 0..2 {
                let marker = serde_json::json!({
                    "apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "planproxy-e2e-compaction"},
                    "data": {"at": format!("{:?}/{step}", Instant::now())},
                });
                api.patch(
                    "planproxy-e2e-compaction",
                    &PatchParams::apply(HARNESS_MANAGER).force(),
                    &Patch::Apply(&marker),
                )
                .await?;
            }
            let revision = etcd::compact(inner.etcd).await?;
            inner.proxy.close_connections();
            Ok(revision)
        })
    }

    /// Stops kube-apiserver (SIGKILL); etcd keeps the data.
    pub fn stop_apiserver(&self) {
        lock(&self.inner.components).apiserver = None;
    }

    /// Starts kube-apiserver again with the same flags and data, and waits
    /// until it is ready.
    pub fn start_apiserver(&self) -> Result<()> {
        let inner = self.inner.clone();
        self.block(async move {
            let component = Component::spawn(
                "kube-apiserver",
                &inner.bin_dir.join("kube-apiserver"),
                &inner.apiserver_args,
                inner.dir.path().join("kube-apiserver.log"),
            )?;
            lock(&inner.components).apiserver = Some(component);
            wait_apiserver_ready(&inner.admin, &inner.components, Duration::from_secs(90)).await
        })
    }

    /// The ends of every component's log, for failure reports.
    pub fn logs(&self, lines: usize) -> String {
        let components = lock(&self.inner.components);
        let mut out = String::new();
        let all = [
            Some(&components.etcd),
            components.apiserver.as_ref(),
            components.controller_manager.as_ref(),
        ];
        for component in all.into_iter().flatten() {
            out.push_str(&format!(
                "===== {} ({}) =====\n",
                component.name,
                component.log.display()
            ));
            out.push_str(&component.log_tail(lines));
        }
        out
    }

    /// The running components' process ids, by name (for resource readings).
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let components = lock(&self.inner.components);
        [
            Some(&components.etcd),
            components.apiserver.as_ref(),
            components.controller_manager.as_ref(),
        ]
        .into_iter()
        .flatten()
        .map(|c| (c.name, c.pid()))
        .collect()
    }

    /// Err naming the component if any process has exited.
    pub fn check_running(&self) -> Result<()> {
        let mut components = lock(&self.inner.components);
        components.etcd.check_running()?;
        if let Some(apiserver) = components.apiserver.as_mut() {
            apiserver.check_running()?;
        }
        if let Some(kcm) = components.controller_manager.as_mut() {
            kcm.check_running()?;
        }
        Ok(())
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        {
            let mut components = lock(&self.inner.components);
            components.controller_manager = None;
            components.apiserver = None;
        }
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// What API discovery said about each kind the harness used: kinds do not
/// change while a control plane runs, so each is looked up once.
type DiscoveryCache =
    Arc<Mutex<std::collections::BTreeMap<String, (ApiResource, kube::discovery::Scope)>>>;

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn apiserver_freeze(inner: &Inner, frozen: bool) -> Result<()> {
    match lock(&inner.components).apiserver.as_ref() {
        Some(apiserver) => apiserver.freeze(frozen),
        None => Err(ControlPlaneError::Invalid(
            "kube-apiserver is stopped".into(),
        )),
    }
}

async fn read_counts(admin: &kube::Client) -> Result<RequestCounts> {
    let request = http::Request::get("/metrics")
        .body(Vec::new())
        .map_err(|e| ControlPlaneError::Invalid(e.to_string()))?;
    let text = admin.request_text(request).await?;
    Ok(RequestCounts::parse(&text))
}

async fn client_from_kubeconfig(yaml: &str) -> Result<kube::Client> {
    let kubeconfig = kube::config::Kubeconfig::from_yaml(yaml)
        .map_err(|e| ControlPlaneError::Kubeconfig(e.to_string()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .map_err(|e| ControlPlaneError::Kubeconfig(e.to_string()))?;
    Ok(kube::Client::try_from(config)?)
}

async fn discover(
    client: &kube::Client,
    cache: &DiscoveryCache,
    api_version: &str,
    kind: &str,
) -> Result<(ApiResource, kube::discovery::Scope)> {
    let key = format!("{api_version}/{kind}");
    if let Some(found) = lock(cache).get(&key) {
        return Ok(found.clone());
    }
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let gvk = GroupVersionKind::gvk(group, version, kind);
    let (resource, capabilities) = kube::discovery::pinned_kind(client, &gvk).await?;
    let found = (resource, capabilities.scope);
    lock(cache).insert(key, found.clone());
    Ok(found)
}

async fn resource_api(
    client: &kube::Client,
    cache: &DiscoveryCache,
    api_version: &str,
    kind: &str,
    namespace: Option<&str>,
) -> Result<kube::Api<DynamicObject>> {
    let (resource, scope) = discover(client, cache, api_version, kind).await?;
    Ok(match (scope, namespace) {
        (kube::discovery::Scope::Namespaced, Some(ns)) => {
            kube::Api::namespaced_with(client.clone(), ns, &resource)
        }
        _ => kube::Api::all_with(client.clone(), &resource),
    })
}

/// The API for `object`'s kind; a namespaced kind without a namespace lands
/// in `default`, as kubectl does.
async fn dynamic_api(
    client: &kube::Client,
    cache: &DiscoveryCache,
    object: Value,
) -> Result<(kube::Api<DynamicObject>, DynamicObject)> {
    let api_version = object["apiVersion"].as_str().unwrap_or_default().to_owned();
    let kind = object["kind"].as_str().unwrap_or_default().to_owned();
    let namespace = object
        .pointer("/metadata/namespace")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    let api = resource_api(client, cache, &api_version, &kind, Some(&namespace)).await?;
    let object: DynamicObject = serde_json::from_value(object)
        .map_err(|e| ControlPlaneError::Invalid(format!("not a Kubernetes object: {e}")))?;
    Ok((api, object))
}

async fn boot(config: ControlPlaneConfig) -> Result<Inner> {
    let bin_dir = match config.bin_dir.clone() {
        Some(dir) => dir,
        None => tokio::task::block_in_place(binaries_dir)?,
    };
    let shm = Path::new("/dev/shm");
    let dir = tempfile::Builder::new()
        .prefix("planproxy-control-plane-")
        .tempdir_in(if shm.is_dir() { shm } else { Path::new("/tmp") })
        .map_err(|e| ControlPlaneError::io("creating the data directory", e))?;
    let loopback = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let listen_ip = config.listen.ip();
    let advertise = config.advertise.unwrap_or(listen_ip);
    let mut ips = vec![loopback, listen_ip, advertise];
    if !config.bind.is_unspecified() {
        ips.push(config.bind);
    }
    if let Some(first) = first_service_ip(&config.service_cidrs) {
        ips.push(first);
    }
    ips.sort();
    ips.dedup();
    let pki = Pki::generate(&ips)?;
    let files = dir.path();
    write(&files.join("ca.crt"), pki.ca_pem())?;
    write(&files.join("apiserver.crt"), &pki.serving.cert_pem)?;
    write(&files.join("apiserver.key"), &pki.serving.key_pem)?;
    write(&files.join("sa.key"), &pki.service_account_key_pem)?;
    write(&files.join("sa.pub"), &pki.service_account_pub_pem)?;

    let etcd_addr = SocketAddr::new(loopback, free_port(loopback)?);
    let etcd = start_etcd(&bin_dir, files, etcd_addr).await?;

    let apiserver_port = free_port(if config.bind.is_unspecified() {
        loopback
    } else {
        config.bind
    })?;
    let apiserver = SocketAddr::new(
        if config.bind.is_unspecified() {
            loopback
        } else {
            config.bind
        },
        apiserver_port,
    );
    let apiserver_args = apiserver_args(&config, files, etcd_addr, apiserver_port, advertise);
    let direct_url = format!("https://{}", apiserver);
    let admin_cert = pki.client_cert("planproxy-e2e-admin", Some(MASTERS))?;
    let admin_kubeconfig = pki::kubeconfig(
        &direct_url,
        pki.ca_pem(),
        "admin",
        &Credentials::Cert(admin_cert),
    );
    write(&files.join("admin.kubeconfig"), &admin_kubeconfig)?;
    let admin = client_from_kubeconfig(&admin_kubeconfig).await?;
    let components = Mutex::new(Components {
        etcd,
        apiserver: Some(Component::spawn(
            "kube-apiserver",
            &bin_dir.join("kube-apiserver"),
            &apiserver_args,
            files.join("kube-apiserver.log"),
        )?),
        controller_manager: None,
    });
    wait_apiserver_ready(&admin, &components, Duration::from_secs(120)).await?;

    let (proxy, listen) = FaultProxy::start(config.listen, apiserver)
        .await
        .map_err(|e| ControlPlaneError::io(format!("listening on {}", config.listen), e))?;
    let url = format!("https://{}", listen);

    if !config.controllers.is_empty() {
        let args = vec![
            format!("--kubeconfig={}", files.join("admin.kubeconfig").display()),
            "--leader-elect=false".into(),
            format!("--controllers={}", config.controllers.join(",")),
            "--use-service-account-credentials=false".into(),
            format!("--root-ca-file={}", files.join("ca.crt").display()),
            "--secure-port=0".into(),
            "--kube-api-qps=200".into(),
            "--kube-api-burst=400".into(),
            "--v=1".into(),
        ];
        let kcm = Component::spawn(
            "kube-controller-manager",
            &bin_dir.join("kube-controller-manager"),
            &args,
            files.join("kube-controller-manager.log"),
        )?;
        lock(&components).controller_manager = Some(kcm);
    }
    Ok(Inner {
        dir,
        pki,
        bin_dir,
        etcd: etcd_addr,
        apiserver,
        apiserver_args,
        url,
        proxy,
        admin,
        discovery: DiscoveryCache::default(),
        components,
        baseline: Mutex::new(RequestCounts::default()),
    })
}

fn first_service_ip(cidrs: &str) -> Option<IpAddr> {
    let first = cidrs.split(',').next()?;
    let (network, _) = first.split_once('/')?;
    match network.parse::<IpAddr>().ok()? {
        IpAddr::V4(v4) => Some(IpAddr::V4(Ipv4Addr::from(u32::from(v4) + 1))),
        IpAddr::V6(v6) => Some(IpAddr::V6(std::net::Ipv6Addr::from(u128::from(v6) + 1))),
    }
}

fn apiserver_args(
    config: &ControlPlaneConfig,
    files: &Path,
    etcd: SocketAddr,
    port: u16,
    advertise: IpAddr,
) -> Vec<String> {
    let file = |name: &str| files.join(name).display().to_string();
    let mut args = vec![
        format!("--etcd-servers=http://{etcd}"),
        format!("--bind-address={}", config.bind),
        format!("--secure-port={port}"),
        format!("--advertise-address={advertise}"),
        format!("--tls-cert-file={}", file("apiserver.crt")),
        format!("--tls-private-key-file={}", file("apiserver.key")),
        format!("--client-ca-file={}", file("ca.crt")),
        format!("--service-account-key-file={}", file("sa.pub")),
        format!("--service-account-signing-key-file={}", file("sa.key")),
        "--service-account-issuer=https://kubernetes.default.svc.cluster.local".into(),
        format!("--service-cluster-ip-range={}", config.service_cidrs),
        "--authorization-mode=Node,RBAC".into(),
        // No controller may have created a namespace's `default` service
        // account yet when a scenario creates its first pod.
        "--disable-admission-plugins=ServiceAccount".into(),
        "--allow-privileged=true".into(),
        // The scenarios are the only load: no priority-and-fairness queuing
        // between the harness and the components under test.
        "--enable-priority-and-fairness=false".into(),
        "--max-requests-inflight=0".into(),
        "--max-mutating-requests-inflight=0".into(),
        "--profiling=false".into(),
        "--v=1".into(),
    ];
    if !config.watch_cache {
        args.push("--watch-cache=false".into());
    }
    args
}

async fn start_etcd(bin_dir: &Path, files: &Path, client: SocketAddr) -> Result<Component> {
    let peer = SocketAddr::new(client.ip(), free_port(client.ip())?);
    let args = vec![
        format!("--data-dir={}", files.join("etcd").display()),
        format!("--listen-client-urls=http://{client}"),
        format!("--advertise-client-urls=http://{client}"),
        format!("--listen-peer-urls=http://{peer}"),
        format!("--initial-advertise-peer-urls=http://{peer}"),
        format!("--initial-cluster=default=http://{peer}"),
        "--unsafe-no-fsync=true".into(),
        "--log-level=warn".into(),
    ];
    let mut etcd = Component::spawn("etcd", &bin_dir.join("etcd"), &args, files.join("etcd.log"))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if etcd::revision(client).await.is_ok() {
            return Ok(etcd);
        }
        etcd.check_running()?;
        if Instant::now() > deadline {
            return Err(ControlPlaneError::NotReady {
                component: "etcd",
                seconds: 60,
                log: etcd.log.clone(),
                tail: etcd.log_tail(40),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits for `/readyz` (which includes the bootstrap RBAC roles and the
/// system namespaces) and for the `default` namespace.
async fn wait_apiserver_ready(
    admin: &kube::Client,
    components: &Mutex<Components>,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let ready = async {
            let request = http::Request::get("/readyz").body(Vec::new()).ok()?;
            let text = admin.request_text(request).await.ok()?;
            let namespaces: kube::Api<k8s_openapi::api::core::v1::Namespace> =
                kube::Api::all(admin.clone());
            let default = namespaces.get_opt("default").await.ok()??;
            (text.trim() == "ok").then_some(default)
        };
        if tokio::time::timeout(Duration::from_secs(5), ready)
            .await
            .ok()
            .flatten()
            .is_some()
        {
            return Ok(());
        }
        {
            let mut components = lock(components);
            if let Some(apiserver) = components.apiserver.as_mut() {
                apiserver.check_running()?;
            }
            if Instant::now() > deadline {
                let (log, tail) = components
                    .apiserver
                    .as_ref()
                    .map(|a| (a.log.clone(), a.log_tail(40)))
                    .unwrap_or_default();
                return Err(ControlPlaneError::NotReady {
                    component: "kube-apiserver",
                    seconds: timeout.as_secs(),
                    log,
                    tail,
                });
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
