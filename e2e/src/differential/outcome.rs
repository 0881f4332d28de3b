//! What happened to a probe's connections, normalised so that node A's
//! outcome and node B's can be compared: endpoints are named by their place
//! relative to the probed node (local or remote, ready or terminating), and
//! the source address an endpoint saw by whose address it is.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use planproxy_netns::Attempt;

/// Which frontend of a service a probe targets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Frontend {
    ClusterIp,
    /// The probed node's own address and the node port.
    NodePort,
    /// 127.0.0.1 and the node port, from the node itself.
    NodePortLocalhost,
    /// The probed node's address on its pods' bridge (their gateway, an
    /// interface address that Node status does not list) and the node
    /// port, from a pod on the node.
    NodePortBridge,
    ExternalIp,
    LoadBalancer,
}

impl fmt::Display for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Frontend::ClusterIp => "cluster-ip",
            Frontend::NodePort => "node-port",
            Frontend::NodePortLocalhost => "node-port-localhost",
            Frontend::NodePortBridge => "node-port-bridge",
            Frontend::ExternalIp => "external-ip",
            Frontend::LoadBalancer => "load-balancer-ip",
        })
    }
}

/// Where a probe's connections start.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Source {
    /// A pod on the probed node that is no endpoint.
    Pod,
    /// The probed node's own namespace (host network).
    Node,
    /// A client outside the cluster, routed to the probed node.
    Client,
    /// An endpoint of the service, on the probed node, to its own service.
    Hairpin,
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Source::Pod => "pod",
            Source::Node => "node",
            Source::Client => "client",
            Source::Hairpin => "hairpin",
        })
    }
}

/// One probe, the same on every node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ProbeKey {
    pub service: String,
    pub port: String,
    pub ipv6: bool,
    pub frontend: Frontend,
    pub source: Source,
}

impl fmt::Display for ProbeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} {} {} from {}",
            self.service,
            self.port,
            if self.ipv6 { "IPv6" } else { "IPv4" },
            self.frontend,
            self.source
        )
    }
}

/// A pool pod as the probed node sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PodInfo {
    pub node: u8,
    pub terminating: bool,
}

/// The addresses that tell whose address an endpoint saw as its client.
#[derive(Clone, Debug)]
pub struct Addresses {
    /// The probed node's addresses on the node network.
    pub node: Vec<IpAddr>,
    /// The probed node's pod-bridge addresses (`cni0`).
    pub node_bridge: Vec<IpAddr>,
    /// The other nodes' addresses, both kinds.
    pub other_nodes: Vec<IpAddr>,
    /// The probe's own source addresses (the pod's or the client's).
    pub sender: Vec<IpAddr>,
}

impl Addresses {
    /// What the endpoint's view of the client means.
    pub fn classify(&self, peer: IpAddr) -> String {
        let peer = peer.to_canonical();
        if self.sender.contains(&peer) {
            "client's own".into()
        } else if self.node.contains(&peer) {
            "node IP".into()
        } else if self.node_bridge.contains(&peer) {
            "node bridge IP".into()
        } else if self.other_nodes.contains(&peer) {
            "other node".into()
        } else if peer.is_loopback() {
            "loopback".into()
        } else {
            format!("other {peer}")
        }
    }
}

/// What a probe's connections did, normalised.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// The kinds of endpoint that answered (`local ready`, `remote
    /// terminating`, …); with ClientIP affinity only how many distinct pods
    /// answered, since which one is chance.
    pub reached: BTreeSet<String>,
    /// Whose address the endpoints saw as the client.
    pub peers: BTreeSet<String>,
    /// How the failed connections failed (`refused`, `timeout`, …).
    pub failures: BTreeSet<String>,
}

impl Outcome {
    /// Builds the outcome of `attempts`, made on node `node`. `affinity`:
    /// the service has ClientIP affinity; `hairpin`: the sender is an
    /// endpoint of the service itself.
    pub fn from_attempts(
        attempts: &[Attempt],
        node: u8,
        pods: &BTreeMap<String, PodInfo>,
        addresses: &Addresses,
        affinity: bool,
        hairpin: bool,
    ) -> Outcome {
        let mut outcome = Outcome::default();
        let mut servers = BTreeSet::new();
        for attempt in attempts {
            match attempt {
                Attempt::Ok { .. } => {
                    let server = attempt.server().unwrap_or("?").to_owned();
                    let kind = match pods.get(&server) {
                        Some(info) => format!(
                            "{} {}",
                            if info.node == node { "local" } else { "remote" },
                            if info.terminating {
                                "terminating"
                            } else {
                                "ready"
                            }
                        ),
                        None => format!("unknown {server}"),
                    };
                    servers.insert(server);
                    outcome.reached.insert(kind);
                    let peer = attempt
                        .peer()
                        .map_or_else(|| "unparsable".into(), |p| addresses.classify(p.ip()));
                    outcome.peers.insert(peer);
                }
                Attempt::Refused => {
                    outcome.failures.insert("refused".into());
                }
                Attempt::Timeout => {
                    outcome.failures.insert("timeout".into());
                }
                Attempt::Other(error) => {
                    outcome.failures.insert(format!("error: {error}"));
                }
            }
        }
        if affinity && !servers.is_empty() {
            // Which endpoint a client sticks to is chance, and with it
            // whether the masquerade address is the node's or its bridge's:
            // keep what is not chance.
            outcome.reached = BTreeSet::from([format!("{} distinct pod(s)", servers.len())]);
            outcome.peers = outcome
                .peers
                .into_iter()
                .map(|p| {
                    if p == "node bridge IP" {
                        "node IP".into()
                    } else {
                        p
                    }
                })
                .collect();
            if hairpin {
                // An endpoint sticking to itself is masqueraded, one sticking
                // to another is not: which it is, is chance too.
                outcome.peers.clear();
            }
        }
        outcome
    }

    /// `passed`, `refused`, `timeout`, or `partly passed, partly …`.
    pub fn verdict(&self) -> String {
        let failures: Vec<&str> = self.failures.iter().map(String::as_str).collect();
        match (self.reached.is_empty(), failures.is_empty()) {
            (false, true) => "passed".into(),
            (true, false) => failures.join("+"),
            (false, false) => format!("partly passed, partly {}", failures.join("+")),
            (true, true) => "no attempt".into(),
        }
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.verdict())?;
        if !self.reached.is_empty() {
            write!(f, " to {}", join(&self.reached))?;
        }
        if !self.peers.is_empty() {
            write!(f, ", endpoint saw {}", join(&self.peers))?;
        }
        Ok(())
    }
}

fn join(set: &BTreeSet<String>) -> String {
    set.iter().cloned().collect::<Vec<_>>().join(" | ")
}

/// One probe whose outcome differs between planproxy's node and kube-proxy's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Disagreement {
    pub key: ProbeKey,
    pub planproxy: Outcome,
    pub kube_proxy: Outcome,
}

impl Disagreement {
    /// The class of a disagreement: the frontend, the source and what
    /// differed, without the service's name, so that one cause shows as one
    /// class across seeds.
    pub fn class(&self) -> String {
        let (a, b) = (&self.planproxy, &self.kube_proxy);
        let mut parts = Vec::new();
        if a.verdict() != b.verdict() {
            parts.push(format!(
                "verdict planproxy={} kube-proxy={}",
                a.verdict(),
                b.verdict()
            ));
        }
        if a.reached != b.reached {
            parts.push(format!(
                "endpoints planproxy={{{}}} kube-proxy={{{}}}",
                join(&a.reached),
                join(&b.reached)
            ));
        }
        if a.peers != b.peers {
            parts.push(format!(
                "client address planproxy={{{}}} kube-proxy={{{}}}",
                join(&a.peers),
                join(&b.peers)
            ));
        }
        format!(
            "{} {} from {}: {}",
            if self.key.ipv6 { "IPv6" } else { "IPv4" },
            self.key.frontend,
            self.key.source,
            parts.join("; ")
        )
    }
}

impl fmt::Display for Disagreement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}\n    planproxy:  {}\n    kube-proxy: {}",
            self.key, self.planproxy, self.kube_proxy
        )
    }
}

/// The disagreements between two nodes' outcomes of the same probes.
pub fn compare(
    planproxy: &BTreeMap<ProbeKey, Outcome>,
    kube_proxy: &BTreeMap<ProbeKey, Outcome>,
) -> Vec<Disagreement> {
    let keys: BTreeSet<&ProbeKey> = planproxy.keys().chain(kube_proxy.keys()).collect();
    keys.into_iter()
        .filter_map(|key| {
            let a = planproxy.get(key).cloned().unwrap_or_default();
            let b = kube_proxy.get(key).cloned().unwrap_or_default();
            (a != b).then(|| Disagreement {
                key: key.clone(),
                planproxy: a,
                kube_proxy: b,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn ok(server: &str, peer: &str) -> Attempt {
        Attempt::Ok {
            reply: format!("{server} {peer}:40000"),
            connect_time: Duration::from_millis(1),
        }
    }

    fn pods() -> BTreeMap<String, PodInfo> {
        BTreeMap::from([
            (
                "a-0".to_owned(),
                PodInfo {
                    node: 1,
                    terminating: false,
                },
            ),
            (
                "a-1".to_owned(),
                PodInfo {
                    node: 2,
                    terminating: false,
                },
            ),
            (
                "a-2".to_owned(),
                PodInfo {
                    node: 1,
                    terminating: true,
                },
            ),
        ])
    }

    fn addresses(node: u8) -> Addresses {
        let other = 3 - node;
        Addresses {
            node: vec![format!("172.30.0.1{node}").parse().expect("an address")],
            node_bridge: vec![format!("10.244.{node}.1").parse().expect("an address")],
            other_nodes: vec![format!("172.30.0.1{other}").parse().expect("an address")],
            sender: vec!["172.31.0.101".parse().expect("an address")],
        }
    }

    #[test]
    fn outcomes_seen_from_either_node_compare_equal_up_to_naming() {
        let on_a = [ok("a-0", "10.244.1.1"), ok("a-1", "172.30.0.11")];
        let on_b = [ok("a-1", "10.244.2.1"), ok("a-0", "172.30.0.12")];
        let a = Outcome::from_attempts(&on_a, 1, &pods(), &addresses(1), false, false);
        let b = Outcome::from_attempts(&on_b, 2, &pods(), &addresses(2), false, false);
        assert_eq!(a, b);
        assert_eq!(
            a.to_string(),
            "passed to local ready | remote ready, endpoint saw node IP | node bridge IP"
        );
    }

    #[test]
    fn a_difference_in_verdict_or_masquerade_is_a_classed_disagreement() {
        let key = ProbeKey {
            service: "d1-0".into(),
            port: "p0".into(),
            ipv6: false,
            frontend: Frontend::NodePort,
            source: Source::Client,
        };
        let a =
            Outcome::from_attempts(&[Attempt::Refused], 1, &pods(), &addresses(1), false, false);
        let b = Outcome::from_attempts(
            &[ok("a-1", "172.31.0.101")],
            2,
            &pods(),
            &addresses(2),
            false,
            false,
        );
        let ours = BTreeMap::from([(key.clone(), a)]);
        let theirs = BTreeMap::from([(key, b)]);
        let found = compare(&ours, &theirs);
        assert_eq!(found.len(), 1);
        assert_eq!(
            found[0].class(),
            "IPv4 node-port from client: verdict planproxy=refused kube-proxy=passed; \
             endpoints planproxy={} kube-proxy={local ready}; \
             client address planproxy={} kube-proxy={client's own}"
        );
        assert!(compare(&theirs, &theirs).is_empty());
    }

    #[test]
    fn with_affinity_only_the_number_of_pods_counts() {
        let a = Outcome::from_attempts(
            &[ok("a-0", "10.244.1.1"), ok("a-0", "10.244.1.1")],
            1,
            &pods(),
            &addresses(1),
            true,
            false,
        );
        let b = Outcome::from_attempts(
            &[ok("a-0", "172.30.0.12"), ok("a-0", "172.30.0.12")],
            2,
            &pods(),
            &addresses(2),
            true,
            false,
        );
        assert_eq!(a, b);
        assert_eq!(a.reached, BTreeSet::from(["1 distinct pod(s)".to_owned()]));
    }
}
