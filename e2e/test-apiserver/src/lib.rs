//! **Test infrastructure**: a Kubernetes API server for planproxy's e2e and
//! integration tests. Not for production.
//!
//! The real, unmodified `planproxy-controller` and `planproxy-agent` binaries
//! (kube-rs clients with kube-runtime watchers) talk to it through an ordinary
//! kubeconfig: HTTPS with a CA generated per run, and a bearer token per user.
//! It behaves like kube-apiserver wherever our binaries and kube-runtime depend
//! on it, because a lenient fake hides bugs.
//!
//! # Starting it
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use planproxy_test_apiserver::{Config, TestApiServer};
//! let server = TestApiServer::start(Config::default()).await?; // 127.0.0.1, random port
//! let kubeconfig: String = server.kubeconfig_for("controller"); // YAML: CA data, URL, token
//! let client = server.client("test").await?;                      // a kube::Client
//! server.faults().close_watches();                                // fault injection
//! let plan_writes = server.request_count("patch", "proxyplans.planproxy.dev");
//! # Ok(()) }
//! ```
//!
//! [`TestApiServer::start`] runs on the caller's tokio runtime;
//! [`TestApiServer::start_on_thread`] starts its own thread and runtime (call it
//! from a thread that has entered a network namespace and the server listens in
//! that namespace: new threads inherit the caller's namespace). The binary
//! `planproxy-test-apiserver` runs it as a process (see `--help`), with the admin
//! endpoint ([`admin`]) for fault injection from outside.
//! Dropping the handle stops the server.
//!
//! # What it serves
//!
//! * core/v1 `namespaces`, `nodes`, `services` (namespaced), `events`,
//!   `configmaps`; discovery.k8s.io/v1 `endpointslices`; coordination.k8s.io/v1
//!   `leases`; events.k8s.io/v1 `events`; apiextensions.k8s.io/v1
//!   `customresourcedefinitions` (stored objects only: creating one does not
//!   serve a new type); and every CRD in [`Config::crds`] (by default
//!   planproxy.dev/v1alpha1 `proxypolicies` and `proxyplans`, with `/status`).
//!   Objects in namespaces that do not exist are accepted; deleting a
//!   namespace deletes its contents at once (no Terminating phase).
//! * Discovery: `/version`, `/api`, `/api/v1`, `/apis`, `/apis/<g>`, `/apis/<g>/<v>`
//!   (not aggregated discovery).
//!
//! # Semantics
//!
//! * One global resourceVersion (a counter); every write gets the next one.
//! * `get`, `create` (409 AlreadyExists; `generateName`), `update` (PUT; a
//!   non-empty `metadata.resourceVersion` is a precondition, 409 Conflict; no
//!   create-on-update), `patch` (JSON patch, JSON merge patch, strategic merge
//!   patch *treated as a merge patch*, server-side apply as described in
//!   [`patch`]), `delete` (with `preconditions` and `propagationPolicy`),
//!   `deletecollection`; `dryRun=All`. Writes that change nothing keep the
//!   resourceVersion and emit no event, as on a real server.
//! * Types with a status subresource: writes to the main resource keep the old
//!   `.status` (Nodes keep a `.status` given on create), `/status` writes change
//!   only `.status`. `metadata.generation` (CRDs only) starts at 1 and is
//!   bumped by changes outside `metadata` and `status`. `uid` and
//!   `creationTimestamp` are set on create and kept. No finalizers, no
//!   `deletionTimestamp`, no `managedFields` in responses.
//! * Validation: object names (DNS subdomain; DNS label for namespaces and
//!   services), label keys/values and annotation keys (422 Invalid); built-in
//!   types must decode as their k8s-openapi type (400); custom resources are
//!   pruned of undeclared fields and validated against the CRD's OpenAPI
//!   schema (422 Invalid with the field path), with structural defaults and
//!   list-type uniqueness ([`schema`]). CEL rules (the subset [`cel`]
//!   implements) are checked only with [`Config::enforce_cel_rules`].
//! * Garbage collection: deleting an object deletes (recursively, at once) the
//!   objects whose ownerReferences name its uid and that have no other live
//!   owner; `propagationPolicy=Orphan` removes the ownerReference instead. An
//!   object written with ownerReferences that all name served kinds but no
//!   live object is deleted right after that write (the write succeeds).
//! * list: `labelSelector` (`a=b`, `a!=b`, `a in (x,y)`, `a notin (x)`, `a`,
//!   `!a`), `fieldSelector` (`metadata.name`, `metadata.namespace`), `limit` and
//!   `continue` (pages are consistent at the first page's resourceVersion),
//!   `resourceVersion` (unset, `0` and NotOlderThan serve the latest state;
//!   `resourceVersionMatch=Exact` serves that version). A continue token or
//!   exact version older than the event window is 410 Expired.
//! * watch: from a resourceVersion (unset or `0`: synthetic ADDED events for the
//!   current state first), `allowWatchBookmarks` (a BOOKMARK every
//!   [`Config::bookmark_interval`]), `timeoutSeconds` (default 30 min),
//!   `sendInitialEvents` (initial events end with a bookmark annotated
//!   `k8s.io/initial-events-end`), selector transitions (an object leaving the
//!   selector is a DELETED event). A resourceVersion older than the last
//!   [`Config::event_window`] events of that type gets an ERROR event with a
//!   410 Expired Status, as on a real server.
//! * Errors are `kind: Status` bodies with kube-apiserver's reasons and codes.
//! * No authorization: any known token may do anything.
//!
//! # Faults and counters
//!
//! [`Faults`] (via [`TestApiServer::faults`] or the admin endpoint): close every
//! watch, answer 410 to the next N watches, fail a fraction of writes with 500 or
//! 409, add latency, stop answering for a while (hang, or refuse connections),
//! restart (drop every connection, keep the data). Request counts by verb and
//! resource: [`TestApiServer::request_counts`] (every request that reached a
//! resource is counted, failed ones included; objects written through
//! [`TestApiServer::create`] are not).
//!
//! # Tests and benchmark
//!
//! ```sh
//! cargo test -p planproxy-test-apiserver        # loopback only; no root needed
//! cargo run --release -p planproxy-test-apiserver --example load -- [SCALE [WATCHES]]
//! ```
//!
//! The `load` example builds a cluster of 1 000 Nodes, 10 000 Services and
//! 10 000 EndpointSlices (times SCALE), lists them in pages, and applies 5 000
//! ProxyPlans while WATCHES label-filtered plan watches (one per node, like
//! agents) follow them; it prints one table row per phase. Each watch has its
//! own event queue; a watch whose selector pins a name or requires a label
//! value is sent only the events that can match it, so a plan write costs the
//! same whatever the number of agents. A watch more than
//! [`store::WATCH_QUEUE`] events behind catches up from the event log (or gets
//! 410 when the log moved past it).

pub mod admin;
pub mod api;
pub mod cel;
pub mod discovery;
pub mod error;
pub mod faults;
pub mod http;
pub mod patch;
pub mod resources;
pub mod schema;
pub mod selectors;
pub mod server;
pub mod store;
pub mod tls;
pub mod validation;
pub mod watch;

use std::collections::HashMap;
use std::hash::{BuildHasher as _, Hasher as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde_json::{Value, json};
use tokio::sync::watch as tokio_watch;

pub use api::RequestCounts;
pub use error::ApiError;
pub use faults::{Faults, OutageMode, WriteFailure};

use crate::api::{Api, ListQuery, Target};
use crate::faults::lock;
use crate::http::HttpState;

/// How to run the server.
#[derive(Debug, Clone)]
pub struct Config {
    /// The API (HTTPS) listen address. Port 0 picks a free port.
    pub listen: SocketAddr,
    /// The admin (plain HTTP) listen address, if wanted.
    pub admin_listen: Option<SocketAddr>,
    /// The address clients use, when `listen` is a wildcard (default: 127.0.0.1).
    pub advertise: Option<IpAddr>,
    /// Extra SANs (IPs or DNS names) for the server certificate.
    pub extra_sans: Vec<String>,
    /// Events retained per resource type; older resourceVersions get 410 Expired.
    pub event_window: usize,
    /// How often watches that allow bookmarks get one.
    pub bookmark_interval: Duration,
    /// Seed for uids, generated names and fault dice.
    pub seed: u64,
    /// The CRDs to serve (also stored as customresourcedefinitions objects).
    pub crds: Vec<CustomResourceDefinition>,
    /// Namespaces created at start.
    pub namespaces: Vec<String>,
    /// Check CRD CEL rules (`x-kubernetes-validations`, the subset in [`cel`])
    /// on write, as a real cluster does. Off by default: tests of how the
    /// controller handles invalid objects need to store objects a real
    /// cluster's admission would have refused.
    pub enforce_cel_rules: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0),
            admin_listen: None,
            advertise: None,
            extra_sans: Vec::new(),
            event_window: 10_000,
            bookmark_interval: Duration::from_secs(5),
            seed: 0x5eed,
            crds: planproxy_crds::crds(),
            namespaces: vec!["default".into(), "kube-system".into(), "kube-public".into()],
            enforce_cel_rules: false,
        }
    }
}

/// Starting the server failed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A CRD schema could not be compiled.
    #[error(transparent)]
    Schema(#[from] schema::SchemaError),
    /// Certificates could not be generated.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// Binding a listener failed.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// Seeding the initial objects failed.
    #[error("seeding initial objects: {0}")]
    Seed(#[from] ApiError),
    /// The server thread could not be started or died while starting.
    #[error("server thread: {0}")]
    Thread(String),
}

/// A kube client could not be built for the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The generated kubeconfig did not parse.
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    /// kube could not build a client from it.
    #[error("client: {0}")]
    Client(#[from] kube::Error),
}

/// State shared by the handle, the API handlers and the admin endpoint.
#[derive(Debug)]
pub struct Shared {
    /// Object semantics, store, faults and counters.
    pub api: Arc<Api>,
    http: Arc<HttpState>,
    ca_pem: String,
    url: String,
}

fn random_token() -> String {
    let state = std::collections::hash_map::RandomState::new();
    (0..2)
        .map(|i| {
            let mut h = state.build_hasher();
            h.write_u64(i);
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            format!("{:016x}", h.finish())
        })
        .collect()
}

impl Shared {
    /// The bearer token of `user` (created on first use).
    pub fn token_for(&self, user: &str) -> String {
        let mut tokens = lock(&self.http.tokens);
        if let Some((token, _)) = tokens.iter().find(|(_, u)| u.as_str() == user) {
            return token.clone();
        }
        let token = format!("{user}-{}", random_token());
        tokens.insert(token.clone(), user.to_string());
        token
    }

    /// A kubeconfig (YAML) for `user`: embedded CA, server URL, bearer token.
    pub fn kubeconfig_for(&self, user: &str) -> String {
        let ca = base64::engine::general_purpose::STANDARD.encode(&self.ca_pem);
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "planproxy-test", "cluster": {"server": self.url, "certificate-authority-data": ca}}],
            "users": [{"name": user, "user": {"token": self.token_for(user)}}],
            "contexts": [{"name": user, "context": {"cluster": "planproxy-test", "user": user, "namespace": "default"}}],
            "current-context": user,
        });
        serde_yaml::to_string(&config).unwrap_or_default()
    }
}

/// A running test API server. Dropping it stops the server.
#[derive(Debug)]
pub struct TestApiServer {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: tokio_watch::Sender<bool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct Launched {
    shared: Arc<Shared>,
    addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    shutdown: tokio_watch::Sender<bool>,
}

async fn launch(config: Config) -> Result<Launched, StartError> {
    let registry = resources::Registry::new(&config.crds, config.enforce_cel_rules)?;
    let api = Arc::new(Api::new(registry, config.event_window, config.seed));
    let listener = server::bind(config.listen).map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let addr = listener.local_addr().map_err(|source| StartError::Bind {
        addr: config.listen,
        source,
    })?;
    let advertise = match (config.advertise, addr.ip()) {
        (Some(ip), _) => ip,
        (None, ip) if ip.is_unspecified() => IpAddr::V4(Ipv4Addr::LOCALHOST),
        (None, ip) => ip,
    };
    let mut sans = vec![
        advertise.to_string(),
        "127.0.0.1".to_string(),
        "localhost".to_string(),
    ];
    if !addr.ip().is_unspecified() {
        sans.push(addr.ip().to_string());
    }
    sans.extend(config.extra_sans.iter().cloned());
    sans.sort();
    sans.dedup();
    let pki = tls::generate(&sans)?;
    let server_address = SocketAddr::new(advertise, addr.port()).to_string();
    let http = Arc::new(HttpState {
        api: api.clone(),
        tokens: Mutex::new(HashMap::new()),
        server_address: server_address.clone(),
        bookmark_interval: config.bookmark_interval,
    });
    let shared = Arc::new(Shared {
        api: api.clone(),
        http: http.clone(),
        ca_pem: pki.ca_pem.clone(),
        url: format!("https://{server_address}"),
    });

    for namespace in &config.namespaces {
        api.create(
            api.registry
                .find("", "v1", "namespaces")
                .ok_or_else(|| ApiError::internal("namespaces not served"))?,
            None,
            json!({"metadata": {"name": namespace}}),
            false,
        )?;
    }
    let crd_res = api
        .registry
        .find("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        .ok_or_else(|| ApiError::internal("CRDs not served"))?;
    for crd in &config.crds {
        let body = serde_json::to_value(crd).map_err(|e| ApiError::internal(e.to_string()))?;
        api.create(crd_res, None, body, false)?;
    }

    let (shutdown, shutdown_rx) = tokio_watch::channel(false);
    let admin_addr = match config.admin_listen {
        Some(admin) => {
            let listener = server::bind(admin).map_err(|source| StartError::Bind {
                addr: admin,
                source,
            })?;
            let admin_addr = listener.local_addr().map_err(|source| StartError::Bind {
                addr: admin,
                source,
            })?;
            tokio::spawn(server::run_admin(
                listener,
                shared.clone(),
                shutdown_rx.clone(),
            ));
            Some(admin_addr)
        }
        None => None,
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(pki.server_config.clone());
    tokio::spawn(server::run_api(listener, acceptor, http, shutdown_rx));
    tracing::info!(url = %shared.url, ?admin_addr, "test API server listening");
    Ok(Launched {
        shared,
        addr,
        admin_addr,
        shutdown,
    })
}

impl TestApiServer {
    /// Starts the server on the current tokio runtime.
    pub async fn start(config: Config) -> Result<Self, StartError> {
        let l = launch(config).await?;
        Ok(TestApiServer {
            shared: l.shared,
            addr: l.addr,
            admin_addr: l.admin_addr,
            shutdown: l.shutdown,
            thread: None,
        })
    }

    /// Starts the server on a new thread with its own tokio runtime (the thread
    /// inherits the caller's network namespace). Usable from sync code.
    pub fn start_on_thread(config: Config) -> Result<Self, StartError> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("test-apiserver".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = tx.send(Err(StartError::Thread(e.to_string())));
                        return;
                    }
                };
                runtime.block_on(async move {
                    match launch(config).await {
                        Ok(launched) => {
                            let mut stopped = launched.shutdown.subscribe();
                            if tx.send(Ok(launched)).is_ok() {
                                let _ = stopped.wait_for(|stop| *stop).await;
                            }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(|e| StartError::Thread(e.to_string()))?;
        let l = rx
            .recv()
            .map_err(|_| StartError::Thread("the server thread exited while starting".into()))??;
        Ok(TestApiServer {
            shared: l.shared,
            addr: l.addr,
            admin_addr: l.admin_addr,
            shutdown: l.shutdown,
            thread: Some(thread),
        })
    }

    /// The API listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API URL clients use (`https://ip:port`).
    pub fn url(&self) -> &str {
        &self.shared.url
    }

    /// The admin endpoint address, if configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    /// The per-run CA certificate (PEM).
    pub fn ca_pem(&self) -> &str {
        &self.shared.ca_pem
    }

    /// The bearer token of `user` (created on first use).
    pub fn token_for(&self, user: &str) -> String {
        self.shared.token_for(user)
    }

    /// A kubeconfig (YAML) for `user`: embedded CA data, server URL, bearer token.
    pub fn kubeconfig_for(&self, user: &str) -> String {
        self.shared.kubeconfig_for(user)
    }

    /// A kube client configuration for `user`, built from [`Self::kubeconfig_for`].
    pub async fn client_config(&self, user: &str) -> Result<kube::Config, ClientError> {
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_for(user))?;
        Ok(kube::Config::from_custom_kubeconfig(
            kubeconfig,
            &kube::config::KubeConfigOptions::default(),
        )
        .await?)
    }

    /// A kube client for `user`.
    pub async fn client(&self, user: &str) -> Result<kube::Client, ClientError> {
        Ok(kube::Client::try_from(self.client_config(user).await?)?)
    }

    /// The fault switches.
    pub fn faults(&self) -> &Faults {
        &self.shared.api.faults
    }

    /// Request counts by (verb, resource); see [`RequestCounts`].
    pub fn request_counts(&self) -> RequestCounts {
        self.shared.api.counts()
    }

    /// How many `verb` requests hit `resource` (e.g. `("patch", "proxyplans.planproxy.dev/status")`).
    pub fn request_count(&self, verb: &str, resource: &str) -> u64 {
        self.shared
            .api
            .counts()
            .get(&(verb.to_string(), resource.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Writes (create, update, patch, delete, deletecollection) of `resource`, any subresource included.
    pub fn write_count(&self, resource: &str) -> u64 {
        self.shared
            .api
            .counts()
            .iter()
            .filter(|((verb, res), _)| {
                matches!(
                    verb.as_str(),
                    "create" | "update" | "patch" | "delete" | "deletecollection"
                ) && (res == resource
                    || res
                        .strip_prefix(resource)
                        .is_some_and(|r| r.starts_with('/')))
            })
            .map(|(_, n)| n)
            .sum()
    }

    /// Zeroes the request counters.
    pub fn reset_request_counts(&self) {
        self.shared.api.reset_counts();
    }

    /// The current global resourceVersion.
    pub fn resource_version(&self) -> u64 {
        lock(&self.shared.api.store).current_rv()
    }

    /// Creates an object directly (no HTTP, not counted, no faults applied...
    /// except injected write failures), routed by its apiVersion and kind.
    pub fn create(&self, object: Value) -> Result<Value, ApiError> {
        let api = &self.shared.api;
        let res = self.resource_of(&object)?;
        let namespace = object
            .pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .map(str::to_string);
        let namespace = if api.registry.get(res).namespaced {
            Some(namespace.unwrap_or_else(|| "default".into()))
        } else {
            None
        };
        Ok((*api.create(res, namespace.as_deref(), object, false)?).clone())
    }

    /// Reads an object directly.
    pub fn get(
        &self,
        api_version: &str,
        kind: &str,
        namespace: Option<&str>,
        name: &str,
    ) -> Option<Value> {
        let api = &self.shared.api;
        let res = api.registry.find_kind(api_version, kind)?;
        let target = Target {
            res,
            namespace: namespace.map(str::to_string),
            name: name.to_string(),
            status: false,
        };
        api.get(&target).ok().map(|o| (*o).clone())
    }

    /// Every object of a type (all namespaces), directly.
    pub fn list(&self, api_version: &str, kind: &str) -> Vec<Value> {
        let api = &self.shared.api;
        let Some(res) = api.registry.find_kind(api_version, kind) else {
            return Vec::new();
        };
        api.list(res, None, &ListQuery::default())
            .map(|page| page.items.iter().map(|o| (**o).clone()).collect())
            .unwrap_or_default()
    }

    fn resource_of(&self, object: &Value) -> Result<usize, ApiError> {
        let field = |f: &str| object.get(f).and_then(Value::as_str).unwrap_or_default();
        self.shared
            .api
            .registry
            .find_kind(field("apiVersion"), field("kind"))
            .ok_or_else(|| {
                ApiError::bad_request(format!(
                    "no served type {}/{}",
                    field("apiVersion"),
                    field("kind")
                ))
            })
    }

    /// The shared state (for the admin endpoint and advanced tests).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

impl Drop for TestApiServer {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
