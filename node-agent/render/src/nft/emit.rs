//! The nftables emitter: one [`Fragment`] for the node-wide chains and maps, and
//! one per service port and family, from the same per-service-port decisions as
//! the iptables emitter ([`crate::decide`]). [`super::table::NftTable`] puts the
//! fragments together.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use crate::Family;
use crate::decide::{ClusterMasquerade, NodeDecision, NodePortDestinations, PortDecision, Refusal};
use crate::hash::{endpoint_hash, service_port_hash};
use crate::model::{Endpoint, ServicePort};

use super::{NftChain, NftRuleSet, SetDecl};

/// Whether `set` is a dispatch map: its elements are what sends a service's
/// traffic anywhere, so a table loaded in steps gets them last.
pub fn is_dispatch_map(set: &str) -> bool {
    ["services4", "services6", "nodeports4", "nodeports6"].contains(&set)
}

/// `4` / `6`: the suffix of per-family names.
fn f(family: Family) -> &'static str {
    match family {
        Family::V4 => "4",
        Family::V6 => "6",
    }
}

/// `ip` / `ip6`: the payload protocol of a family.
fn ip(family: Family) -> &'static str {
    match family {
        Family::V4 => "ip",
        Family::V6 => "ip6",
    }
}

fn addr_type(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4_addr",
        Family::V6 => "ipv6_addr",
    }
}

/// The rules of the `services` chain sending node-port destinations of
/// `family` to the `nodeports` chain.
fn node_port_jumps(family: Family, destinations: &NodePortDestinations) -> Vec<String> {
    let nfproto = match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    };
    let except = not_to(family, destinations.except);
    match &destinations.within {
        None => vec![format!(
            "fib daddr type local meta nfproto {nfproto}{except} jump nodeports"
        )],
        Some(networks) => networks
            .iter()
            .map(|n| {
                format!(
                    "fib daddr type local {} daddr {n}{except} jump nodeports",
                    ip(family)
                )
            })
            .collect(),
    }
}

/// ` ip daddr != <network>`, or nothing.
fn not_to(family: Family, except: Option<IpNet>) -> String {
    except
        .map(|e| format!(" {} daddr != {e}", ip(family)))
        .unwrap_or_default()
}

/// With route_localnet on, a packet to 127.0.0.0/8 from elsewhere would reach
/// services bound to loopback (CVE-2020-8558); only connections the node made
/// or DNATed may pass.
fn localnet_guard(family: Family) -> String {
    let (ip, loopback) = (ip(family), crate::decide::loopback(family));
    format!(
        "{ip} daddr {loopback} {ip} saddr != {loopback} ct state & (established | related) == 0 ct status & dnat == 0 drop"
    )
}

/// A frontend key: `addr . proto . port`.
fn frontend_key(addr: IpAddr, proto: &str, port: u16) -> String {
    format!("{addr} . {proto} . {port}")
}

/// `addr . port` as a map value.
fn endpoint_value(addr: SocketAddr) -> String {
    format!("{} . {}", addr.ip(), addr.port())
}

/// What one part of the plan puts into the table: chains it owns or shares,
/// the sets it declares and the elements it adds, and what it counts towards
/// its shard's summary.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Fragment {
    /// Chains by name, each complete.
    pub chains: BTreeMap<String, NftChain>,
    /// Sets and maps it needs, by name.
    pub sets: BTreeMap<String, SetDecl>,
    /// `(set, key, value)`; `value` is empty for plain sets.
    pub elements: Vec<(String, String, String)>,
    /// Rules and chains counted for each shard, as `(rules, chains)`.
    pub counts: BTreeMap<u32, (i32, i32)>,
}

impl Fragment {
    /// The node-wide chains, sets and maps of the rendered families.
    pub fn node(nodes: &[NodeDecision]) -> Self {
        let mut b = Builder::default();
        let families: Vec<Family> = nodes.iter().map(|n| n.family).collect();
        if let Some(first) = nodes.first() {
            b.base_chains(&families, first);
        }
        for node in nodes {
            b.family_chains(node);
        }
        // First in the input hook, as kubelet's KUBE-FIREWALL: no accept rule
        // may let a spoofed packet to 127.0.0.0/8 through before it.
        for node in nodes.iter().filter(|n| n.localhost) {
            if let Some(input) = b.out.chains.get_mut("filter-input") {
                input.rules.insert(0, localnet_guard(node.family));
            }
        }
        b.out
    }

    /// One service port in one family.
    pub fn service_port(d: &PortDecision<'_>) -> Self {
        let mut b = Builder::default();
        b.service_port(d);
        b.out
    }

    /// A whole table's content as one fragment.
    pub fn of_rule_set(rules: &NftRuleSet) -> Self {
        Fragment {
            chains: rules.chains.clone(),
            sets: rules
                .sets
                .iter()
                .map(|(name, set)| {
                    let decl = SetDecl {
                        keyword: set.keyword,
                        spec: set.spec.clone(),
                        dynamic: set.dynamic,
                    };
                    (name.clone(), decl)
                })
                .collect(),
            elements: rules
                .sets
                .iter()
                .flat_map(|(name, set)| {
                    set.elements
                        .iter()
                        .map(move |(k, v)| (name.clone(), k.clone(), v.clone()))
                })
                .collect(),
            counts: BTreeMap::new(),
        }
    }
}

#[derive(Default)]
struct Builder {
    out: Fragment,
}

/// The names of one service port's chains in one family.
struct Names {
    svc: String,
    svl: String,
    ext: String,
    fw: String,
}

impl Names {
    fn of(sp: &ServicePort, family: Family) -> Self {
        let hash = service_port_hash(&sp.name.to_string(), sp.protocol.as_lower_str());
        let n = f(family);
        Self {
            svc: format!("svc{n}-{hash}"),
            svl: format!("svl{n}-{hash}"),
            ext: format!("ext{n}-{hash}"),
            fw: format!("fw{n}-{hash}"),
        }
    }
}

impl Builder {
    fn count(&mut self, owner: Option<u32>, rules: i32, chains: i32) {
        if let Some(shard) = owner {
            let c = self.out.counts.entry(shard).or_default();
            c.0 = c.0.saturating_add(rules);
            c.1 = c.1.saturating_add(chains);
        }
    }

    fn rule(&mut self, chain: &str, owner: Option<u32>, rule: String) {
        let created = !self.out.chains.contains_key(chain);
        self.count(owner, 1, i32::from(created));
        self.out
            .chains
            .entry(chain.to_owned())
            .or_insert_with(|| NftChain {
                owner,
                ..Default::default()
            })
            .rules
            .push(rule);
    }

    fn set(&mut self, name: &str, keyword: &'static str, spec: String) {
        self.out
            .sets
            .entry(name.to_owned())
            .or_insert_with(|| SetDecl {
                keyword,
                spec,
                dynamic: false,
            });
    }

    fn element(&mut self, set: &str, owner: Option<u32>, key: String, value: String) {
        self.count(owner, 1, 0);
        self.out.elements.push((set.to_owned(), key, value));
    }

    /// The hooked chains and the node-wide chains shared by both families.
    fn base_chains(&mut self, families: &[Family], node: &NodeDecision) {
        let mark = node.mark;
        let hooks = [
            (
                "nat-prerouting",
                "type nat hook prerouting priority dstnat; policy accept;",
                vec!["jump services".to_owned()],
            ),
            (
                "nat-output",
                "type nat hook output priority -100; policy accept;",
                vec!["jump services".to_owned()],
            ),
            (
                "nat-postrouting",
                "type nat hook postrouting priority srcnat; policy accept;",
                vec!["jump masquerading".to_owned()],
            ),
            (
                "filter-input",
                "type filter hook input priority filter; policy accept;",
                vec![
                    "ct state new jump firewall".to_owned(),
                    "jump health-checks".to_owned(),
                    "ct state new jump external-services".to_owned(),
                ],
            ),
            (
                "filter-forward",
                "type filter hook forward priority filter; policy accept;",
                vec![
                    "ct state new jump firewall".to_owned(),
                    "jump forward".to_owned(),
                    "ct state new jump cluster-services".to_owned(),
                    "ct state new jump external-services".to_owned(),
                ],
            ),
            (
                "filter-output",
                "type filter hook output priority filter; policy accept;",
                vec![
                    "ct state new jump firewall".to_owned(),
                    "ct state new jump cluster-services".to_owned(),
                ],
            ),
        ];
        for (name, hook, rules) in hooks {
            self.out.chains.insert(
                name.to_owned(),
                NftChain {
                    hook: Some(hook.to_owned()),
                    rules,
                    owner: None,
                },
            );
        }
        let fixed: [(&str, Vec<String>); 9] = [
            ("services", Vec::new()),
            ("nodeports", Vec::new()),
            ("cluster-services", Vec::new()),
            ("external-services", Vec::new()),
            ("firewall", Vec::new()),
            (
                "health-checks",
                vec!["meta l4proto tcp th dport @health-check-ports accept".to_owned()],
            ),
            ("refuse", vec!["reject".to_owned()]),
            (
                "mark-for-masquerade",
                vec![format!("meta mark set meta mark | {mark:#x}")],
            ),
            (
                "forward",
                vec![
                    "ct state invalid drop".to_owned(),
                    format!("meta mark & {mark:#x} == {mark:#x} accept"),
                    "ct state related,established accept".to_owned(),
                ],
            ),
        ];
        for (name, rules) in fixed {
            self.out.chains.insert(
                name.to_owned(),
                NftChain {
                    rules,
                    ..Default::default()
                },
            );
        }
        let mut masquerading = Vec::new();
        for family in families {
            let n = f(*family);
            masquerading.push(format!(
                "ct status dnat {ip} saddr . {ip} daddr @hairpin{n} jump mark-for-masquerade",
                ip = ip(*family)
            ));
        }
        masquerading.push(format!("meta mark & {mark:#x} == 0 return"));
        masquerading.push(format!("meta mark set meta mark ^ {mark:#x}"));
        masquerading.push("masquerade fully-random".to_owned());
        self.out.chains.insert(
            "masquerading".to_owned(),
            NftChain {
                rules: masquerading,
                ..Default::default()
            },
        );
        self.set("health-check-ports", "set", "type inet_service;".to_owned());
    }

    /// The per-family dispatch maps and the rules that look them up.
    fn family_chains(&mut self, node: &NodeDecision) {
        let family = node.family;
        let (n, ip, addr) = (f(family), ip(family), addr_type(family));
        // Dispatch elements count what they match (`explain` shows it). Only
        // a connection's first packet reaches them, so the cost is per
        // connection, not per packet.
        let frontend = format!("type {addr} . inet_proto . inet_service : verdict; counter;");
        for map in ["services", "refused", "refused-external"] {
            self.set(&format!("{map}{n}"), "map", frontend.clone());
        }
        self.set(
            &format!("firewall{n}"),
            "set",
            format!("type {addr} . inet_proto . inet_service;"),
        );
        for map in ["nodeports", "refused-nodeports"] {
            self.set(
                &format!("{map}{n}"),
                "map",
                "type inet_proto . inet_service : verdict; counter;".to_owned(),
            );
        }
        for proto in ["tcp", "udp", "sctp"] {
            // `typeof`: numgen's integer has no named type to declare. One map
            // per protocol, whose value names that protocol's port: nft 1.0.6
            // reads a `th dport` value back from the kernel in a form it then
            // refuses in new rules, and a `tcp dport` value makes it add a
            // TCP match to every rule using the map.
            self.set(
                &format!("endpoints{n}-{proto}"),
                "map",
                format!(
                    "typeof {ip} daddr . th dport . numgen random mod 1 : {ip} daddr . {proto} dport;"
                ),
            );
        }
        self.set(
            &format!("hairpin{n}"),
            "set",
            format!("type {addr} . {addr};"),
        );
        let key = format!("{ip} daddr . meta l4proto . th dport");
        self.rule("services", None, format!("{key} vmap @services{n}"));
        for rule in node_port_jumps(family, &node.node_ports) {
            self.rule("services", None, rule);
        }
        let nfproto = match family {
            Family::V4 => "ipv4",
            Family::V6 => "ipv6",
        };
        self.rule(
            "nodeports",
            None,
            format!("meta nfproto {nfproto} meta l4proto . th dport vmap @nodeports{n}"),
        );
        self.rule("cluster-services", None, format!("{key} vmap @refused{n}"));
        self.rule(
            "external-services",
            None,
            format!("{key} vmap @refused-external{n}"),
        );
        let except = not_to(family, node.refusals_except);
        self.rule(
            "external-services",
            None,
            format!("fib daddr type local meta nfproto {nfproto}{except} meta l4proto . th dport vmap @refused-nodeports{n}"),
        );
        self.rule("firewall", None, format!("{key} @firewall{n} drop"));
    }

    fn service_port(&mut self, d: &PortDecision<'_>) {
        let names = Names::of(d.sp, d.family);
        self.frontends(d, &names);
        if !d.has_endpoints {
            return;
        }
        if d.externally_accessible {
            self.external_chain(d, &names);
        }
        if d.uses_firewall {
            self.firewall_chain(d, &names);
        }
        self.policy_chains(d, &names);
        let n = f(d.family);
        for ep in d.hairpin_endpoints() {
            let a = ep.addr.ip();
            self.element(
                &format!("hairpin{n}"),
                None,
                format!("{a} . {a}"),
                String::new(),
            );
        }
    }

    /// The fast path applies: cluster-IP traffic goes to a shared numgen chain.
    fn fast_path(d: &PortDecision<'_>) -> bool {
        !d.externally_accessible && d.sp.affinity_timeout.is_none()
    }

    fn refusal_verdict(refusal: Refusal) -> String {
        match refusal {
            Refusal::Drop => "drop".to_owned(),
            Refusal::Reject => "goto refuse".to_owned(),
        }
    }

    fn frontends(&mut self, d: &PortDecision<'_>, names: &Names) {
        let (owner, n, proto, port) = (
            Some(d.sp.shard),
            f(d.family),
            d.sp.protocol.as_lower_str(),
            d.sp.port,
        );
        let cluster_key = frontend_key(d.cluster_ip, proto, port);
        if d.has_internal {
            let target = if Self::fast_path(d) {
                let eps = if d.internal_uses_local {
                    &d.local_eps
                } else {
                    &d.cluster_eps
                };
                self.lb_chain(d, eps.len())
            } else if d.internal_uses_local {
                names.svl.clone()
            } else {
                names.svc.clone()
            };
            self.element(
                &format!("services{n}"),
                owner,
                cluster_key,
                format!("goto {target}"),
            );
        } else {
            let verdict = Self::refusal_verdict(d.internal_unreachable.refusal);
            self.element(&format!("refused{n}"), owner, cluster_key, verdict);
        }
        let ext_verdict = Self::refusal_verdict(d.external_unreachable.refusal);
        for (ips, lb) in [(&d.external_ips, false), (&d.lb_ips, true)] {
            for a in ips {
                let key = frontend_key(*a, proto, port);
                if d.has_endpoints {
                    let target = if lb && d.uses_firewall {
                        &names.fw
                    } else {
                        &names.ext
                    };
                    self.element(
                        &format!("services{n}"),
                        owner,
                        key.clone(),
                        format!("goto {target}"),
                    );
                }
                if lb && d.uses_firewall {
                    self.element(&format!("firewall{n}"), owner, key.clone(), String::new());
                }
                if !d.has_external {
                    self.element(
                        &format!("refused-external{n}"),
                        owner,
                        key,
                        ext_verdict.clone(),
                    );
                }
            }
        }
        if let Some(node_port) = d.sp.node_port {
            let key = format!("{proto} . {node_port}");
            if d.has_endpoints {
                self.element(
                    &format!("nodeports{n}"),
                    owner,
                    key.clone(),
                    format!("goto {}", names.ext),
                );
            }
            if !d.has_external {
                self.element(
                    &format!("refused-nodeports{n}"),
                    owner,
                    key,
                    ext_verdict.clone(),
                );
            }
        }
        if let Some(hc) = d.sp.health_check_node_port {
            self.element("health-check-ports", None, hc.to_string(), String::new());
        }
    }

    /// The shared chain for `count` endpoints with this port's masquerade; the
    /// port's endpoints go into the shared endpoint map under its cluster IP.
    fn lb_chain(&mut self, d: &PortDecision<'_>, count: usize) -> String {
        let (n, ip) = (f(d.family), ip(d.family));
        let (kind, masq) = match d.cluster_masquerade {
            ClusterMasquerade::All => ("all", Some("jump mark-for-masquerade".to_owned())),
            ClusterMasquerade::NotFrom(c) => (
                "offcluster",
                Some(format!("{ip} saddr != {c} jump mark-for-masquerade")),
            ),
            ClusterMasquerade::Nobody => ("none", None),
        };
        let proto = d.sp.protocol.as_lower_str();
        let name = format!("lb{n}-{proto}-{kind}-{count}");
        if !self.out.chains.contains_key(&name) {
            let mut rules: Vec<String> = masq.into_iter().collect();
            rules.push(format!(
                "meta l4proto {proto} dnat {ip} to {ip} daddr . th dport . numgen random mod {count} map @endpoints{n}-{proto}"
            ));
            self.out.chains.insert(
                name.clone(),
                NftChain {
                    rules,
                    ..Default::default()
                },
            );
        }
        let eps = if d.internal_uses_local {
            &d.local_eps
        } else {
            &d.cluster_eps
        };
        for (i, ep) in eps.iter().enumerate() {
            self.element(
                &format!("endpoints{n}-{proto}"),
                Some(d.sp.shard),
                format!("{} . {} . {i}", d.cluster_ip, d.sp.port),
                endpoint_value(ep.addr),
            );
        }
        name
    }

    fn external_chain(&mut self, d: &PortDecision<'_>, names: &Names) {
        let (owner, ip) = (Some(d.sp.shard), ip(d.family));
        let ext = &names.ext;
        if d.external_local {
            if let Some(cidr) = d.pod_short_circuit {
                // Pods reach every endpoint, unmasqueraded, as for a cluster IP.
                self.rule(ext, owner, format!("{ip} saddr {cidr} goto {}", names.svc));
            }
            self.rule(
                ext,
                owner,
                "fib saddr type local jump mark-for-masquerade".to_owned(),
            );
            if d.uses_cluster_set {
                self.rule(
                    ext,
                    owner,
                    format!("fib saddr type local goto {}", names.svc),
                );
            }
            if d.uses_local_set {
                self.rule(ext, owner, format!("goto {}", names.svl));
            }
        } else {
            self.rule(ext, owner, "jump mark-for-masquerade".to_owned());
            if d.uses_cluster_set {
                self.rule(ext, owner, format!("goto {}", names.svc));
            }
        }
    }

    /// Allowed sources continue to the external chain; the rest fall off
    /// un-NATed and the filter `firewall` chain drops them.
    fn firewall_chain(&mut self, d: &PortDecision<'_>, names: &Names) {
        let (owner, ip) = (Some(d.sp.shard), ip(d.family));
        let mut sources: Vec<String> = d.ranges.iter().map(ToString::to_string).collect();
        if d.firewall_admits_node {
            // A VIP bound on the node loops back with the VIP as source.
            sources.extend(d.lb_ips.iter().map(ToString::to_string));
        }
        // One plain rule per source, as in the iptables chain: overlapping
        // ranges would be refused in one interval set.
        for source in sources {
            self.rule(
                &names.fw,
                owner,
                format!("{ip} saddr {source} goto {}", names.ext),
            );
        }
    }

    /// The per-service policy chains of a port off the fast path.
    fn policy_chains(&mut self, d: &PortDecision<'_>, names: &Names) {
        let owner = Some(d.sp.shard);
        let ip = ip(d.family);
        for (local_set, eps, internal) in d.endpoint_sets() {
            if internal && Self::fast_path(d) {
                continue;
            }
            let chain = if local_set { &names.svl } else { &names.svc };
            if internal {
                let frontend = format!(
                    "{ip} daddr {} meta l4proto {} th dport {}",
                    d.cluster_ip,
                    d.sp.protocol.as_lower_str(),
                    d.sp.port
                );
                match d.cluster_masquerade {
                    ClusterMasquerade::All => {
                        self.rule(chain, owner, format!("{frontend} jump mark-for-masquerade"));
                    }
                    ClusterMasquerade::NotFrom(c) => self.rule(
                        chain,
                        owner,
                        format!("{frontend} {ip} saddr != {c} jump mark-for-masquerade"),
                    ),
                    ClusterMasquerade::Nobody => {}
                }
            }
            for rule in self.endpoint_rules(d, eps) {
                self.rule(chain, owner, rule);
            }
        }
    }

    /// Affinity checks first, then kube-proxy's probability series as plain
    /// `numgen` rules: the i-th of n endpoints is taken with probability 1/(n-i).
    fn endpoint_rules(&mut self, d: &PortDecision<'_>, eps: &[Endpoint]) -> Vec<String> {
        let (ip, n) = (ip(d.family), f(d.family));
        let proto = d.sp.protocol.as_lower_str();
        let spn = d.sp.name.to_string();
        let dnat = |ep: &Endpoint| format!("meta l4proto {proto} dnat {ip} to {}", ep.addr);
        let mut rules = Vec::new();
        let mut affinity_sets = Vec::new();
        if let Some(timeout) = d.sp.affinity_timeout {
            for ep in eps {
                let set = format!("affinity{n}-{}", endpoint_hash(&spn, proto, &ep.key()));
                self.set(
                    &set,
                    "set",
                    format!(
                        "type {}; flags dynamic,timeout; timeout {timeout}s;",
                        addr_type(d.family)
                    ),
                );
                if let Some(s) = self.out.sets.get_mut(&set) {
                    s.dynamic = true;
                }
                rules.push(format!("{ip} saddr @{set} {}", dnat(ep)));
                affinity_sets.push(Some(set));
            }
        }
        let count = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let mut rule = String::new();
            if count - i > 1 {
                let _ = write!(rule, "numgen random mod {} 0 ", count - i);
            }
            if let Some(Some(set)) = affinity_sets.get(i) {
                let _ = write!(rule, "update @{set} {{ {ip} saddr }} ");
            }
            rule.push_str(&dnat(ep));
            rules.push(rule);
        }
        rules
    }
}
