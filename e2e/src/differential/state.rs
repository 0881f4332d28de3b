//! Seeded cluster states: a few Services over a fixed pool of pods, drawn
//! from every Service feature both proxies handle. Pure and deterministic:
//! the same seed gives the same state on every machine, so a seed is a
//! complete reproduction recipe.

use std::fmt;

use serde_json::{Value, json};

use crate::objects::{Protocol, container_port_name};

/// The namespace every generated object lives in.
pub const NAMESPACE: &str = "default";

/// The container ports every pool pod answers on (TCP and UDP).
pub const TARGET_PORTS: [u16; 2] = [8080, 9090];

/// The client networks outside the cluster (where `client1` lives).
const CLIENT_RANGES: [&str; 2] = ["172.31.0.0/24", "fd00:31::/64"];
/// Ranges no probe comes from (documentation prefixes).
const FOREIGN_RANGES: [&str; 2] = ["192.0.2.0/24", "2001:db8:ffff::/64"];

/// SplitMix64: tiny, fast and fully specified, so a seed means the same
/// state whatever version of a random crate is around.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `percent` / 100.
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        let index = usize::try_from(self.below(items.len() as u64)).unwrap_or(0);
        items[index]
    }
}

/// The pool of pods every state draws its endpoints from. It is deployed
/// once per cluster (pod addresses are never reused within a node, so a
/// fresh set per seed would exhaust the pod CIDRs) and placed symmetrically:
/// each node holds the same kinds of pods, so that, seen from its own node,
/// node A's view of a service is node B's view up to naming.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum PoolApp {
    /// One ready pod per node.
    One,
    /// Two ready pods per node.
    Pair,
    /// One ready and one terminating (still serving) pod per node.
    Mixed,
    /// One terminating, still serving, pod per node and no ready one: the
    /// terminating-endpoint fallback.
    Terminating,
}

impl PoolApp {
    pub const ALL: [PoolApp; 4] = [
        PoolApp::One,
        PoolApp::Pair,
        PoolApp::Mixed,
        PoolApp::Terminating,
    ];

    /// The app's name, also its `app` label.
    pub fn name(self) -> &'static str {
        match self {
            PoolApp::One => "dp-one",
            PoolApp::Pair => "dp-pair",
            PoolApp::Mixed => "dp-mixed",
            PoolApp::Terminating => "dp-term",
        }
    }

    /// Replicas, placed round robin on node1, node2: replica `i` runs on
    /// node `1 + i % 2`.
    pub fn replicas(self) -> usize {
        match self {
            PoolApp::One | PoolApp::Terminating => 2,
            PoolApp::Pair | PoolApp::Mixed => 4,
        }
    }

    /// Whether replica `ordinal` is held terminating.
    pub fn terminating(self, ordinal: usize) -> bool {
        match self {
            PoolApp::Terminating => true,
            PoolApp::Mixed => ordinal >= 2,
            PoolApp::One | PoolApp::Pair => false,
        }
    }
}

/// The kind of service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    ClusterIp,
    NodePort,
    LoadBalancer,
}

/// The IP families of a service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Families {
    V4,
    V6,
    Dual,
}

impl Families {
    /// `false` for IPv4, `true` for IPv6, in the service's order.
    pub fn list(self) -> Vec<bool> {
        match self {
            Families::V4 => vec![false],
            Families::V6 => vec![true],
            Families::Dual => vec![false, true],
        }
    }
}

/// Where a service's endpoints come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// A selector picking a pool app; the real EndpointSlice controller
    /// publishes its pods.
    Selector(PoolApp),
    /// A selector that picks no pod: a service without endpoints.
    NoEndpoints,
    /// No selector; EndpointSlices written by hand listing a pool app's pods,
    /// with or without `nodeName`.
    Manual { app: PoolApp, node_names: bool },
}

impl Backend {
    pub fn app(self) -> Option<PoolApp> {
        match self {
            Backend::Selector(app) | Backend::Manual { app, .. } => Some(app),
            Backend::NoEndpoints => None,
        }
    }
}

/// What a service port targets on the pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Number(u16),
    /// The container port's name (`t8080`, `u9090`), resolved per pod.
    Named(u16),
}

impl Target {
    pub fn port(self) -> u16 {
        match self {
            Target::Number(port) | Target::Named(port) => port,
        }
    }
}

/// One port of a generated service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Port {
    pub name: String,
    pub protocol: Protocol,
    pub port: u16,
    pub target: Target,
}

/// loadBalancerSourceRanges of a LoadBalancer service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SourceRanges {
    /// The client network outside the cluster.
    Clients,
    /// Only ranges no probe comes from.
    Foreign,
}

impl SourceRanges {
    pub fn cidrs(self) -> &'static [&'static str] {
        match self {
            SourceRanges::Clients => &CLIENT_RANGES,
            SourceRanges::Foreign => &FOREIGN_RANGES,
        }
    }
}

/// A generated Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Svc {
    /// Its position in the state, which also numbers its external addresses.
    pub index: u8,
    pub name: String,
    pub kind: Kind,
    pub families: Families,
    pub backend: Backend,
    pub ports: Vec<Port>,
    /// externalTrafficPolicy Local (NodePort and LoadBalancer only).
    pub external_local: bool,
    pub internal_local: bool,
    /// ClientIP session affinity.
    pub affinity: bool,
    /// `trafficDistribution: PreferClose` (topology hints by zone).
    pub prefer_close: bool,
    pub external_ips: bool,
    pub source_ranges: Option<SourceRanges>,
}

impl Svc {
    /// The service's externalIPs (one per family), if it has any.
    pub fn external_ip_list(&self) -> Vec<String> {
        if !self.external_ips {
            return Vec::new();
        }
        self.families
            .list()
            .into_iter()
            .map(|ipv6| address(ipv6, 0xe, self.index))
            .collect()
    }

    /// The ingress IPs the "cloud" writes into status (one per family).
    pub fn load_balancer_ips(&self) -> Vec<String> {
        if self.kind != Kind::LoadBalancer {
            return Vec::new();
        }
        self.families
            .list()
            .into_iter()
            .map(|ipv6| address(ipv6, 0xb, self.index))
            .collect()
    }

    pub fn has_node_ports(&self) -> bool {
        matches!(self.kind, Kind::NodePort | Kind::LoadBalancer)
    }

    /// The Service object.
    pub fn to_object(&self) -> Value {
        let ports: Vec<Value> = self
            .ports
            .iter()
            .map(|p| {
                let target = match p.target {
                    Target::Number(port) => json!(port),
                    Target::Named(port) => json!(container_port_name(p.protocol, port)),
                };
                json!({"name": p.name, "protocol": p.protocol.as_k8s(), "port": p.port, "targetPort": target})
            })
            .collect();
        let (policy, families) = match self.families {
            Families::V4 => ("SingleStack", json!(["IPv4"])),
            Families::V6 => ("SingleStack", json!(["IPv6"])),
            Families::Dual => ("RequireDualStack", json!(["IPv4", "IPv6"])),
        };
        let kind = match self.kind {
            Kind::ClusterIp => "ClusterIP",
            Kind::NodePort => "NodePort",
            Kind::LoadBalancer => "LoadBalancer",
        };
        let mut spec = json!({
            "type": kind,
            "ports": ports,
            "ipFamilyPolicy": policy,
            "ipFamilies": families,
            "internalTrafficPolicy": if self.internal_local { "Local" } else { "Cluster" },
        });
        match self.backend {
            Backend::Selector(app) => spec["selector"] = json!({"app": app.name()}),
            Backend::NoEndpoints => spec["selector"] = json!({"app": "dp-nobody"}),
            Backend::Manual { .. } => {}
        }
        if self.has_node_ports() {
            spec["externalTrafficPolicy"] = json!(if self.external_local {
                "Local"
            } else {
                "Cluster"
            });
        }
        if self.affinity {
            spec["sessionAffinity"] = json!("ClientIP");
            spec["sessionAffinityConfig"] = json!({"clientIP": {"timeoutSeconds": 600}});
        }
        if self.prefer_close {
            spec["trafficDistribution"] = json!("PreferClose");
        }
        if self.external_ips {
            spec["externalIPs"] = json!(self.external_ip_list());
        }
        if let Some(ranges) = self.source_ranges {
            spec["loadBalancerSourceRanges"] = json!(ranges.cidrs());
        }
        json!({
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"namespace": NAMESPACE, "name": self.name},
            "spec": spec,
        })
    }

    /// The features a reader needs to reproduce a probe, in one line.
    pub fn summary(&self) -> String {
        let mut parts = vec![
            format!("{:?}", self.kind),
            format!("{:?}", self.families),
            match self.backend {
                Backend::Selector(app) => format!("selector {}", app.name()),
                Backend::NoEndpoints => "no endpoints".into(),
                Backend::Manual { app, node_names } => format!(
                    "manual slices of {}{}",
                    app.name(),
                    if node_names { "" } else { " without nodeName" }
                ),
            },
        ];
        for port in &self.ports {
            let target = match port.target {
                Target::Number(p) => p.to_string(),
                Target::Named(p) => container_port_name(port.protocol, p),
            };
            parts.push(format!(
                "{} {:?} {}->{target}",
                port.name, port.protocol, port.port
            ));
        }
        if self.has_node_ports() {
            parts.push(format!(
                "eTP={}",
                if self.external_local {
                    "Local"
                } else {
                    "Cluster"
                }
            ));
        }
        if self.internal_local {
            parts.push("iTP=Local".into());
        }
        if self.affinity {
            parts.push("ClientIP affinity".into());
        }
        if self.prefer_close {
            parts.push("PreferClose".into());
        }
        if self.external_ips {
            parts.push(format!("externalIPs {:?}", self.external_ip_list()));
        }
        if self.kind == Kind::LoadBalancer {
            parts.push(format!("ingress {:?}", self.load_balancer_ips()));
        }
        if let Some(ranges) = self.source_ranges {
            parts.push(format!("sourceRanges {:?}", ranges.cidrs()));
        }
        parts.join(", ")
    }
}

/// An address for a service's externalIP (`kind` 0xe) or load-balancer
/// ingress (`kind` 0xb): documentation prefixes, unused anywhere else.
fn address(ipv6: bool, kind: u8, index: u8) -> String {
    let host = 10 + index;
    match (ipv6, kind) {
        (false, 0xe) => format!("203.0.113.{host}"),
        (false, _) => format!("198.51.100.{host}"),
        (true, 0xe) => format!("2001:db8:e::{host:x}"),
        (true, _) => format!("2001:db8:b::{host:x}"),
    }
}

/// Whether a Service name is one the generator makes (`d<seed>-<index>`).
pub fn is_generated(name: &str) -> bool {
    name.strip_prefix('d')
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(seed, index)| {
            !seed.is_empty()
                && seed.bytes().all(|b| b.is_ascii_digit())
                && index.bytes().all(|b| b.is_ascii_digit())
        })
}

/// One cluster state: the Services of one seed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct State {
    pub seed: u64,
    pub services: Vec<Svc>,
}

impl State {
    /// The state of `seed`: one to three services.
    pub fn generate(seed: u64) -> State {
        let mut rng = Rng::new(seed);
        let count = 1 + rng.below(3);
        let services = (0..count)
            .map(|i| generate_service(&mut rng, seed, u8::try_from(i).unwrap_or(0)))
            .collect();
        State { seed, services }
    }
}

fn generate_service(rng: &mut Rng, seed: u64, index: u8) -> Svc {
    let kind = match rng.below(10) {
        0..=3 => Kind::ClusterIp,
        4..=6 => Kind::NodePort,
        _ => Kind::LoadBalancer,
    };
    let families = match rng.below(10) {
        0..=3 => Families::V4,
        4..=5 => Families::V6,
        _ => Families::Dual,
    };
    let backend = match rng.below(20) {
        0..=1 => Backend::NoEndpoints,
        2..=4 => Backend::Manual {
            app: rng.pick(&PoolApp::ALL),
            node_names: rng.chance(50),
        },
        _ => Backend::Selector(rng.pick(&PoolApp::ALL)),
    };
    let port_count = 1 + rng.below(2);
    let ports = (0..port_count)
        .map(|p| {
            let protocol = if rng.chance(25) {
                Protocol::Udp
            } else {
                Protocol::Tcp
            };
            let target_port = rng.pick(&TARGET_PORTS);
            // Hand-written slices carry numbers only: a named targetPort is
            // the EndpointSlice controller's to resolve.
            let named = matches!(backend, Backend::Selector(_)) && rng.chance(40);
            Port {
                name: format!("p{p}"),
                protocol,
                port: 80 + u16::try_from(p).unwrap_or(0),
                target: if named {
                    Target::Named(target_port)
                } else {
                    Target::Number(target_port)
                },
            }
        })
        .collect();
    let has_node_ports = matches!(kind, Kind::NodePort | Kind::LoadBalancer);
    Svc {
        index,
        name: format!("d{seed}-{index}"),
        kind,
        families,
        backend,
        ports,
        external_local: has_node_ports && rng.chance(40),
        internal_local: rng.chance(20),
        affinity: rng.chance(20),
        prefer_close: matches!(backend, Backend::Selector(_)) && rng.chance(15),
        external_ips: rng.chance(25),
        source_ranges: if kind == Kind::LoadBalancer && rng.chance(50) {
            Some(if rng.chance(50) {
                SourceRanges::Clients
            } else {
                SourceRanges::Foreign
            })
        } else {
            None
        },
    }
}

/// Every feature the generator draws, as [`State::features`] names them.
pub const FEATURES: &[&str] = &[
    "ClusterIP",
    "NodePort",
    "LoadBalancer",
    "IPv4 only",
    "IPv6 only",
    "dual-stack",
    "selector",
    "no endpoints",
    "hand-written slices with nodeName",
    "hand-written slices without nodeName",
    "terminating endpoints only",
    "ready and terminating endpoints",
    "several ports",
    "UDP",
    "named target port",
    "eTP=Local",
    "eTP=Cluster",
    "iTP=Local",
    "ClientIP affinity",
    "PreferClose",
    "externalIPs",
    "source ranges admitting the client",
    "source ranges excluding the client",
];

impl State {
    /// The features this state exercises (names from [`FEATURES`]).
    pub fn features(&self) -> std::collections::BTreeSet<&'static str> {
        let mut out = std::collections::BTreeSet::new();
        for s in &self.services {
            out.insert(match s.kind {
                Kind::ClusterIp => "ClusterIP",
                Kind::NodePort => "NodePort",
                Kind::LoadBalancer => "LoadBalancer",
            });
            out.insert(match s.families {
                Families::V4 => "IPv4 only",
                Families::V6 => "IPv6 only",
                Families::Dual => "dual-stack",
            });
            out.insert(match s.backend {
                Backend::Selector(_) => "selector",
                Backend::NoEndpoints => "no endpoints",
                Backend::Manual {
                    node_names: true, ..
                } => "hand-written slices with nodeName",
                Backend::Manual {
                    node_names: false, ..
                } => "hand-written slices without nodeName",
            });
            match s.backend.app() {
                Some(PoolApp::Terminating) => {
                    out.insert("terminating endpoints only");
                }
                Some(PoolApp::Mixed) => {
                    out.insert("ready and terminating endpoints");
                }
                _ => {}
            }
            if s.ports.len() > 1 {
                out.insert("several ports");
            }
            if s.ports.iter().any(|p| p.protocol == Protocol::Udp) {
                out.insert("UDP");
            }
            if s.ports.iter().any(|p| matches!(p.target, Target::Named(_))) {
                out.insert("named target port");
            }
            if s.has_node_ports() {
                out.insert(if s.external_local {
                    "eTP=Local"
                } else {
                    "eTP=Cluster"
                });
            }
            for (on, name) in [
                (s.internal_local, "iTP=Local"),
                (s.affinity, "ClientIP affinity"),
                (s.prefer_close, "PreferClose"),
                (s.external_ips, "externalIPs"),
            ] {
                if on {
                    out.insert(name);
                }
            }
            match s.source_ranges {
                Some(SourceRanges::Clients) => {
                    out.insert("source ranges admitting the client");
                }
                Some(SourceRanges::Foreign) => {
                    out.insert("source ranges excluding the client");
                }
                None => {}
            }
        }
        out
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed {}:", self.seed)?;
        for svc in &self.services {
            writeln!(f, "  {}: {}", svc.name, svc.summary())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_gives_the_same_state() {
        for seed in [0, 1, 42, u64::MAX] {
            assert_eq!(State::generate(seed), State::generate(seed));
        }
        assert_ne!(State::generate(1), State::generate(2));
    }

    #[test]
    fn states_are_small_and_cover_every_feature_over_a_few_hundred_seeds() {
        let states: Vec<State> = (0..300).map(State::generate).collect();
        assert!(states.iter().all(|s| (1..=3).contains(&s.services.len())));
        let seen: std::collections::BTreeSet<&str> =
            states.iter().flat_map(State::features).collect();
        let all: std::collections::BTreeSet<&str> = FEATURES.iter().copied().collect();
        assert_eq!(seen, all);
    }

    #[test]
    fn service_objects_say_what_the_state_says() {
        let svc = Svc {
            index: 1,
            name: "d7-1".into(),
            kind: Kind::LoadBalancer,
            families: Families::Dual,
            backend: Backend::Selector(PoolApp::Pair),
            ports: vec![Port {
                name: "p0".into(),
                protocol: Protocol::Udp,
                port: 80,
                target: Target::Named(9090),
            }],
            external_local: true,
            internal_local: false,
            affinity: true,
            prefer_close: false,
            external_ips: true,
            source_ranges: Some(SourceRanges::Clients),
        };
        let object = svc.to_object();
        let spec = &object["spec"];
        assert_eq!(spec["type"], "LoadBalancer");
        assert_eq!(spec["ipFamilies"], json!(["IPv4", "IPv6"]));
        assert_eq!(spec["selector"], json!({"app": "dp-pair"}));
        assert_eq!(spec["ports"][0]["targetPort"], "u9090");
        assert_eq!(spec["externalTrafficPolicy"], "Local");
        assert_eq!(spec["sessionAffinity"], "ClientIP");
        assert_eq!(
            spec["externalIPs"],
            json!(["203.0.113.11", "2001:db8:e::b"])
        );
        assert_eq!(svc.load_balancer_ips(), ["198.51.100.11", "2001:db8:b::b"]);
        assert_eq!(spec["loadBalancerSourceRanges"][0], "172.31.0.0/24");
    }
}
