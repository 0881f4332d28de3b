//! kube-proxy's two health contracts.
//!
//! * The node health server (`--healthz-bind-address`, `:10256`): `/healthz`
//!   answers 503 when a queued change has not been applied within twice the sync
//!   period, or while the node is terminating (so load balancers drain it);
//!   `/livez` is the same without the node check, for liveness probes.
//! * One health-check node port per `externalTrafficPolicy: Local` service: 200
//!   while the node has ready local endpoints for it, 503 otherwise, so external
//!   load balancers only send traffic to nodes that can serve it locally.
//!
//! The answers are pure functions of the state; the servers only read it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use jiff::Timestamp;
use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::v1alpha1::TrafficPolicy;
use serde_json::json;
use tokio::task::JoinHandle;

use super::metrics::AgentMetrics;

/// What the node health server knows (wall-clock times, as they are reported).
#[derive(Clone, Debug)]
pub struct HealthState {
    /// When the kernel last took a sync; `None` before the first one.
    pub last_updated: Option<Timestamp>,
    /// The oldest change queued and not applied yet.
    pub queued_since: Option<Timestamp>,
    /// How long a queued change may wait before the node is unhealthy (2×syncPeriod).
    pub timeout: Duration,
    /// The plan says the node is being deleted.
    pub node_terminating: bool,
}

impl Default for HealthState {
    fn default() -> Self {
        Self {
            last_updated: None,
            queued_since: None,
            timeout: Duration::from_secs(60),
            node_terminating: false,
        }
    }
}

/// An HTTP answer: status code and JSON body.
#[derive(Clone, Debug, PartialEq)]
pub struct HealthAnswer {
    /// 200 or 503.
    pub code: u16,
    /// The JSON body.
    pub body: serde_json::Value,
}

impl HealthState {
    /// Whether rules are current enough: no change waited longer than the timeout.
    pub fn proxy_healthy(&self, now: Timestamp) -> bool {
        match self.queued_since {
            None => true,
            Some(queued) => {
                let waited = now.duration_since(queued);
                waited.is_negative() || waited.unsigned_abs() <= self.timeout
            }
        }
    }
}

/// Go's zero time, which kube-proxy reports before its first sync.
const NEVER: &str = "0001-01-01T00:00:00Z";

fn rfc3339(t: Option<Timestamp>) -> String {
    t.map_or_else(|| NEVER.to_owned(), |t| t.to_string())
}

/// The `/healthz` answer (`check_node`) or the `/livez` answer.
pub fn node_answer(state: &HealthState, now: Timestamp, check_node: bool) -> HealthAnswer {
    let healthy = state.proxy_healthy(now);
    // kube-proxy runs a proxier per family and reports each; one sync here
    // programs both families together, so both share the node's state.
    let family = json!({"lastUpdated": rfc3339(state.last_updated), "healthy": healthy});
    let mut body = json!({
        "lastUpdated": rfc3339(state.last_updated),
        "currentTime": rfc3339(Some(now)),
        "healthy": healthy,
        "status": {"IPv4": family, "IPv6": family},
    });
    let mut ok = healthy;
    if check_node {
        body["nodeEligible"] = json!(!state.node_terminating);
        ok &= !state.node_terminating;
    }
    HealthAnswer {
        code: if ok { 200 } else { 503 },
        body,
    }
}

/// One service a health-check node port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceHealth {
    /// The service's namespace.
    pub namespace: String,
    /// The service's name.
    pub name: String,
    /// Distinct IPs of this node's ready endpoints of the service.
    pub local_endpoints: usize,
}

/// The health-check node ports `shards` ask for. A service's ports share one
/// health-check port; a terminating endpoint counts as none, so load balancers
/// drain a node whose last local endpoints are going away.
pub fn health_check_services<S: AsRef<ProxyPlanSpec>>(
    shards: &[S],
) -> BTreeMap<u16, ServiceHealth> {
    let mut ips: BTreeMap<u16, (ServiceHealth, BTreeSet<&str>)> = BTreeMap::new();
    for port in shards
        .iter()
        .flat_map(|shard| &shard.as_ref().service_ports)
    {
        let Some(hc_port) = port.health_check_node_port else {
            continue;
        };
        if port.external_traffic_policy != TrafficPolicy::Local {
            continue;
        }
        let entry = ips.entry(hc_port).or_insert_with(|| {
            (
                ServiceHealth {
                    namespace: port.namespace.clone(),
                    name: port.name.clone(),
                    local_endpoints: 0,
                },
                BTreeSet::new(),
            )
        });
        let sets = [&port.local_endpoints, &port.cluster_endpoints];
        for endpoint in sets.into_iter().flatten().flat_map(|set| &set.endpoints) {
            if endpoint.local && endpoint.ready && !endpoint.terminating {
                entry.1.insert(&endpoint.ip);
            }
        }
    }
    ips.into_iter()
        .map(|(port, (mut service, ips))| {
            service.local_endpoints = ips.len();
            (port, service)
        })
        .collect()
}

/// The answer of a service's health-check node port.
pub fn service_answer(service: &ServiceHealth, proxy_healthy: bool) -> HealthAnswer {
    let ok = service.local_endpoints > 0 && proxy_healthy;
    HealthAnswer {
        code: if ok { 200 } else { 503 },
        body: json!({
            "service": { "namespace": service.namespace, "name": service.name },
            "localEndpoints": service.local_endpoints,
            "serviceProxyHealthy": proxy_healthy,
        }),
    }
}

/// The node health state, shared by the sync loop (writer) and the servers (readers).
#[derive(Clone, Default)]
pub struct NodeHealth {
    state: Arc<Mutex<HealthState>>,
}

impl NodeHealth {
    /// Changes the state.
    pub fn update(&self, f: impl FnOnce(&mut HealthState)) {
        f(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// A copy of the state.
    pub fn snapshot(&self) -> HealthState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

fn json_response(answer: HealthAnswer, extra: Option<(&'static str, String)>) -> Response {
    let code = StatusCode::from_u16(answer.code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = (code, answer.body.to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    if let Some((name, value)) = extra
        && let Ok(value) = HeaderValue::from_str(&value)
    {
        headers.insert(name, value);
    }
    response
}

#[derive(Clone)]
struct NodeServerState {
    health: NodeHealth,
    metrics: AgentMetrics,
}

/// `/healthz` and `/livez`.
pub fn node_router(health: NodeHealth, metrics: AgentMetrics) -> Router {
    async fn healthz(State(s): State<NodeServerState>) -> Response {
        let answer = node_answer(&s.health.snapshot(), Timestamp::now(), true);
        s.metrics.healthz_answered(answer.code);
        json_response(answer, None)
    }
    async fn livez(State(s): State<NodeServerState>) -> Response {
        let answer = node_answer(&s.health.snapshot(), Timestamp::now(), false);
        s.metrics.livez_answered(answer.code);
        json_response(answer, None)
    }
    Router::new()
        .route("/healthz", get(healthz))
        .route("/livez", get(livez))
        .with_state(NodeServerState { health, metrics })
}

type SharedServices = Arc<RwLock<BTreeMap<u16, ServiceHealth>>>;

#[derive(Clone)]
struct PortServerState {
    port: u16,
    services: SharedServices,
    health: NodeHealth,
}

async fn service_health(State(s): State<PortServerState>) -> Response {
    let service = s
        .services
        .read()
        .unwrap_or_else(PoisonError::into_inner)
        .get(&s.port)
        .cloned();
    let Some(service) = service else {
        return (StatusCode::SERVICE_UNAVAILABLE, "no service").into_response();
    };
    let answer = service_answer(
        &service,
        s.health.snapshot().proxy_healthy(Timestamp::now()),
    );
    let weight = service.local_endpoints.to_string();
    json_response(answer, Some(("x-load-balancing-endpoint-weight", weight)))
}

/// The addresses health-check node ports listen on: every address of both
/// families (`[::]`, which also accepts IPv4 on Linux) unless
/// `nodePortAddresses` restrict one; then, as kube-proxy does, the node's
/// interface addresses inside them (every interface address of a family they
/// leave unrestricted).
pub fn listen_addresses(node_port_addresses: &[String], interfaces: &[IpAddr]) -> Vec<IpAddr> {
    let cidrs: Vec<ipnet::IpNet> = node_port_addresses
        .iter()
        .filter_map(|c| c.parse().ok())
        .collect();
    // As for node ports: no CIDR of a family, or a /0, is every address.
    let restricted = |ipv6: bool| {
        let of_family: Vec<&ipnet::IpNet> = cidrs
            .iter()
            .filter(|c| matches!(c, ipnet::IpNet::V6(_)) == ipv6)
            .collect();
        !of_family.is_empty() && of_family.iter().all(|c| c.prefix_len() > 0)
    };
    let (v4_restricted, v6_restricted) = (restricted(false), restricted(true));
    if !v4_restricted && !v6_restricted {
        return vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)];
    }
    let mut out: Vec<IpAddr> = interfaces
        .iter()
        .copied()
        // A link-local address cannot be bound without its interface's scope.
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if v6.is_unicast_link_local()))
        .filter(|ip| {
            let family_restricted = if ip.is_ipv6() {
                v6_restricted
            } else {
                v4_restricted
            };
            !family_restricted || cidrs.iter().any(|cidr| cidr.contains(ip))
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

/// Binds `socket`; `[::]` falls back to `0.0.0.0` on a node without IPv6.
async fn bind_any_family(socket: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    match tokio::net::TcpListener::bind(socket).await {
        Err(error) if socket.ip() == IpAddr::V6(Ipv6Addr::UNSPECIFIED) => {
            let v4 = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), socket.port());
            tokio::net::TcpListener::bind(v4).await.map_err(|_| error)
        }
        result => result,
    }
}

struct PortListener {
    addresses: Vec<IpAddr>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for PortListener {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// The health-check node port servers: opened and closed as plans change.
pub struct HealthCheckServers {
    services: SharedServices,
    listeners: BTreeMap<u16, PortListener>,
    health: NodeHealth,
    metrics: AgentMetrics,
}

impl HealthCheckServers {
    /// No listeners yet.
    pub fn new(health: NodeHealth, metrics: AgentMetrics) -> Self {
        Self {
            services: SharedServices::default(),
            listeners: BTreeMap::new(),
            health,
            metrics,
        }
    }

    /// The ports currently listening.
    pub fn ports(&self) -> Vec<u16> {
        self.listeners.keys().copied().collect()
    }

    /// Serves exactly `services` on `addresses`: answers change at once, listeners
    /// open and close as needed. A port that cannot be bound (someone else holds
    /// it) is logged and retried on the next update.
    pub async fn update(&mut self, services: BTreeMap<u16, ServiceHealth>, addresses: &[IpAddr]) {
        self.listeners.retain(|port, listener| {
            services.contains_key(port) && listener.addresses == addresses
        });
        for port in services.keys() {
            if self.listeners.contains_key(port) {
                continue;
            }
            let mut tasks = Vec::new();
            for address in addresses {
                let socket = SocketAddr::new(*address, *port);
                match bind_any_family(socket).await {
                    Ok(listener) => {
                        let router =
                            Router::new()
                                .fallback(service_health)
                                .with_state(PortServerState {
                                    port: *port,
                                    services: self.services.clone(),
                                    health: self.health.clone(),
                                });
                        tasks.push(tokio::spawn(async move {
                            if let Err(error) = axum::serve(listener, router).await {
                                tracing::warn!(%socket, %error, "health-check node port server stopped");
                            }
                        }));
                    }
                    Err(error) => {
                        tracing::warn!(%socket, %error, "failed to open health-check node port");
                    }
                }
            }
            if tasks.len() == addresses.len() {
                self.listeners.insert(
                    *port,
                    PortListener {
                        addresses: addresses.to_vec(),
                        tasks,
                    },
                );
            }
        }
        *self
            .services
            .write()
            .unwrap_or_else(PoisonError::into_inner) = services;
        self.metrics
            .set_health_check_listeners(self.listeners.len());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use planproxy_crds::v1alpha1::{EndpointPlan, EndpointSelection, EndpointSet, ServicePortPlan};

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(secs).expect("test times must be valid")
    }

    #[test]
    fn healthy_node_answers_200_with_kube_proxy_fields() {
        let state = HealthState {
            last_updated: Some(at(1_700_000_000)),
            ..Default::default()
        };
        let answer = node_answer(&state, at(1_700_000_010), true);
        assert_eq!(answer.code, 200);
        assert_eq!(answer.body["lastUpdated"], "2023-11-14T22:13:20Z");
        assert_eq!(answer.body["currentTime"], "2023-11-14T22:13:30Z");
        assert_eq!(answer.body["nodeEligible"], true);
        assert_eq!(answer.body["healthy"], true);
        for family in ["IPv4", "IPv6"] {
            let status = &answer.body["status"][family];
            assert_eq!(status["healthy"], true, "{family}");
            assert_eq!(status["lastUpdated"], "2023-11-14T22:13:20Z", "{family}");
        }
    }

    #[test]
    fn change_queued_longer_than_the_timeout_is_unhealthy() {
        let state = HealthState {
            last_updated: Some(at(0)),
            queued_since: Some(at(100)),
            timeout: Duration::from_secs(60),
            node_terminating: false,
        };
        assert_eq!(node_answer(&state, at(160), true).code, 200);
        let late = node_answer(&state, at(161), true);
        assert_eq!(late.code, 503);
        assert_eq!(late.body["healthy"], false);
        assert_eq!(late.body["status"]["IPv4"]["healthy"], false);
        assert_eq!(late.body["status"]["IPv6"]["healthy"], false);
        assert_eq!(
            node_answer(&state, at(161), false).code,
            503,
            "livez fails too: the agent is stuck"
        );
    }

    #[test]
    fn terminating_node_fails_healthz_but_not_livez() {
        let state = HealthState {
            node_terminating: true,
            ..Default::default()
        };
        let healthz = node_answer(&state, at(10), true);
        assert_eq!(healthz.code, 503);
        assert_eq!(healthz.body["nodeEligible"], false);
        let livez = node_answer(&state, at(10), false);
        assert_eq!(livez.code, 200);
        assert!(livez.body.get("nodeEligible").is_none());
    }

    #[test]
    fn never_synced_reports_go_zero_time() {
        let answer = node_answer(&HealthState::default(), at(10), true);
        assert_eq!(answer.body["lastUpdated"], NEVER);
    }

    fn endpoint(ip: &str, port: u16, local: bool, ready: bool, terminating: bool) -> EndpointPlan {
        EndpointPlan {
            ip: ip.into(),
            port,
            local,
            node_unknown: false,
            ready,
            serving: ready || terminating,
            terminating,
        }
    }

    fn local_service(name: &str, hc: u16, endpoints: Vec<EndpointPlan>) -> ServicePortPlan {
        ServicePortPlan {
            namespace: "shop".into(),
            name: name.into(),
            external_traffic_policy: TrafficPolicy::Local,
            health_check_node_port: Some(hc),
            local_endpoints: Some(EndpointSet {
                selection: EndpointSelection::Ready,
                endpoints,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn local_endpoints_count_distinct_ready_ips_across_the_services_ports() {
        let mut http = local_service(
            "web",
            31000,
            vec![endpoint("10.0.0.1", 80, true, true, false)],
        );
        http.port_name = "http".into();
        let mut https = local_service(
            "web",
            31000,
            vec![
                endpoint("10.0.0.1", 443, true, true, false),
                endpoint("10.0.0.2", 443, true, true, false),
            ],
        );
        https.port_name = "https".into();
        let shards = [ProxyPlanSpec {
            service_ports: vec![http, https],
            ..Default::default()
        }];
        let services = health_check_services(&shards);
        assert_eq!(
            services,
            BTreeMap::from([(
                31000,
                ServiceHealth {
                    namespace: "shop".into(),
                    name: "web".into(),
                    local_endpoints: 2
                }
            )])
        );
    }

    #[test]
    fn terminating_and_remote_endpoints_count_zero() {
        let mut service = local_service(
            "web",
            31000,
            vec![endpoint("10.0.0.1", 80, true, false, true)],
        );
        if let Some(set) = service.local_endpoints.as_mut() {
            set.selection = EndpointSelection::TerminatingFallback;
        }
        service.cluster_endpoints = Some(EndpointSet {
            selection: EndpointSelection::Ready,
            endpoints: vec![endpoint("10.0.9.9", 80, false, true, false)],
        });
        let shards = [ProxyPlanSpec {
            service_ports: vec![service],
            ..Default::default()
        }];
        let services = health_check_services(&shards);
        assert_eq!(services[&31000].local_endpoints, 0);
        let answer = service_answer(&services[&31000], true);
        assert_eq!(answer.code, 503);
        assert_eq!(answer.body["localEndpoints"], 0);
    }

    #[test]
    fn service_with_local_endpoints_answers_200_with_kube_proxy_body() {
        let service = ServiceHealth {
            namespace: "shop".into(),
            name: "web".into(),
            local_endpoints: 3,
        };
        let answer = service_answer(&service, true);
        assert_eq!(answer.code, 200);
        assert_eq!(
            answer.body,
            json!({"service": {"namespace": "shop", "name": "web"}, "localEndpoints": 3, "serviceProxyHealthy": true})
        );
        assert_eq!(service_answer(&service, false).code, 503);
    }

    #[test]
    fn cluster_policy_services_get_no_health_check_port() {
        let mut service = local_service("web", 31000, vec![]);
        service.external_traffic_policy = TrafficPolicy::Cluster;
        let shards = [ProxyPlanSpec {
            service_ports: vec![service],
            ..Default::default()
        }];
        assert!(health_check_services(&shards).is_empty());
    }

    #[test]
    fn node_port_addresses_restrict_listeners_to_matching_interface_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().expect("valid ip");
        // A secondary address (10.1.0.7) that Node status need not list.
        let interfaces = [
            ip("127.0.0.1"),
            ip("192.168.1.5"),
            ip("10.1.0.7"),
            ip("::1"),
            ip("fe80::1"),
            ip("fd00::5"),
        ];
        assert_eq!(
            listen_addresses(&["10.1.0.0/16".to_owned()], &interfaces),
            vec![ip("10.1.0.7"), ip("::1"), ip("fd00::5")],
            "IPv6 is unrestricted: every bindable interface address of it"
        );
        assert_eq!(
            listen_addresses(
                &["10.1.0.0/16".to_owned(), "fd00::/64".to_owned()],
                &interfaces
            ),
            vec![ip("10.1.0.7"), ip("fd00::5")]
        );
        assert_eq!(
            listen_addresses(&[], &interfaces),
            vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
        );
        assert_eq!(
            listen_addresses(&["0.0.0.0/0".to_owned()], &interfaces),
            vec![IpAddr::V6(Ipv6Addr::UNSPECIFIED)]
        );
    }
}
