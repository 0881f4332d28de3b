//! The iptables emitter: a parsed node plan, decided per service port by
//! [`crate::decide`], → a [`RuleSet`], following kube-proxy's
//! iptables-mode semantics with three changes that keep syncs fast and first
//! packets cheap:
//!
//! * Frontends are dispatched through a tree of chains keyed by destination
//!   address ([`Layout::Tree`], see [`crate::tree`]) instead of one linear list.
//! * In the tree layout a service reachable only through its cluster IP gets no
//!   policy chain: its masquerade and load-balancing rules, each matching the
//!   frontend, sit in the dispatch leaf. Restore time on nf_tables follows the
//!   number of chains, and most services are cluster-IP only.
//! * DNAT to an endpoint sits directly in the service chain instead of in a
//!   per-endpoint chain. Hairpin masquerade (a pod reaching itself through its
//!   service) is one rule per local endpoint address in the shared
//!   `PPX-HAIRPIN` chain, checked in postrouting for DNATed connections. Only
//!   local endpoints can hairpin: a connection is NATed on the node where it
//!   first meets our rules, so its source is a pod of this node or an
//!   off-cluster client, never a remote pod it could be load-balanced back to.
//!   An endpoint whose slice names no node might be local, so it gets the rule
//!   too (a remote one never matches it).
//!   ClientIP affinity keeps kube-proxy's per-endpoint `recent` list names.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;

use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::v1alpha1::ProgrammedSummary;

use crate::decide::{
    ClusterMasquerade, NodeDecision, NodePortDestinations, PortDecision, Refusal, Unreachable,
};
use crate::hash::{endpoint_hash, service_port_hash};
use crate::model::{
    self, Endpoint, InvalidServicePort, NodeModel, PlanError, ServicePort, Settings,
};
use crate::ruleset::{Chain, FamilyRules, Jump, RuleSet, TableRules, chains};
use crate::tree::{DispatchEntry, dispatch};
use crate::{Family, Layout, RenderOptions, Table};

/// The result of rendering a node's plan.
#[derive(Debug, Clone)]
pub struct Rendered {
    /// The rules.
    pub rule_set: RuleSet,
    /// What each shard programs.
    pub per_shard: BTreeMap<u32, ProgrammedSummary>,
    /// Service ports that were skipped, with the reason.
    pub skipped: Vec<InvalidServicePort>,
    /// The parsed plan the rules were rendered from.
    pub model: NodeModel,
}

/// Parses and renders a complete set of shards.
pub fn render<S: AsRef<ProxyPlanSpec>>(
    shards: &[S],
    options: &RenderOptions,
) -> Result<Rendered, PlanError> {
    let model = model::parse(shards)?;
    Ok(render_model(model, options))
}

/// Renders an already parsed plan.
pub fn render_model(model: NodeModel, options: &RenderOptions) -> Rendered {
    let families: Vec<Family> = if options.families.is_empty() {
        Family::ALL.to_vec()
    } else {
        Family::ALL
            .into_iter()
            .filter(|f| options.families.contains(f))
            .collect()
    };
    let mut per_shard: BTreeMap<u32, ProgrammedSummary> = model
        .shards
        .iter()
        .map(|s| (*s, ProgrammedSummary::default()))
        .collect();
    let mut rendered_ports: BTreeSet<usize> = BTreeSet::new();
    let mut rule_set = RuleSet::default();
    for family in families {
        let mut b = FamilyBuilder::new(family, &model.settings, options.layout, &mut per_shard);
        for (i, sp) in model.service_ports.iter().enumerate() {
            if b.service_port(sp) {
                rendered_ports.insert(i);
            }
        }
        rule_set.families.insert(family, b.finish());
    }
    count_ports(&model, &rendered_ports, &mut per_shard);
    Rendered {
        rule_set,
        per_shard,
        skipped: model.skipped.clone(),
        model,
    }
}

/// Adds the service ports and distinct endpoints of the `rendered` ports to
/// their shards' summaries (shared by both emitters).
pub(crate) fn count_ports(
    model: &NodeModel,
    rendered: &BTreeSet<usize>,
    per_shard: &mut BTreeMap<u32, ProgrammedSummary>,
) {
    let mut endpoints: BTreeMap<u32, BTreeSet<SocketAddr>> = BTreeMap::new();
    for i in rendered {
        let sp = &model.service_ports[*i];
        let summary = per_shard.entry(sp.shard).or_default();
        summary.service_ports += 1;
        endpoints
            .entry(sp.shard)
            .or_default()
            .extend(sp.all_endpoints());
    }
    for (shard, eps) in endpoints {
        per_shard.entry(shard).or_default().endpoints =
            i32::try_from(eps.len()).unwrap_or(i32::MAX);
    }
}

/// `-d`/`-s` form of a single address.
fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

fn refusal_target(refusal: Refusal) -> &'static str {
    match refusal {
        Refusal::Reject => "REJECT",
        Refusal::Drop => "DROP",
    }
}

/// The names one service port's rules use.
struct Names {
    /// `namespace/name[:port]`.
    spn: String,
    /// `-m <proto> -p <proto>`.
    matcher: String,
    svc: String,
    svl: String,
    ext: String,
    fw: String,
}

impl Names {
    fn of(sp: &ServicePort) -> Self {
        let spn = sp.name.to_string();
        let proto = sp.protocol.as_lower_str();
        let hash = service_port_hash(&spn, proto);
        Self {
            matcher: format!("-m {proto} -p {proto}"),
            svc: format!("PPX-SVC-{hash}"),
            svl: format!("PPX-SVL-{hash}"),
            ext: format!("PPX-EXT-{hash}"),
            fw: format!("PPX-FW-{hash}"),
            spn,
        }
    }
}

/// kube-proxy's probability for the i-th of n endpoints: 1/(n-i), ten decimals.
pub fn probability(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining as f64)
}

struct FamilyBuilder<'a> {
    family: Family,
    settings: &'a Settings,
    /// The node-wide decisions of this family.
    node: NodeDecision,
    layout: Layout,
    rules: FamilyRules,
    nat_services: Vec<DispatchEntry>,
    filter_services: Vec<DispatchEntry>,
    filter_external: Vec<DispatchEntry>,
    filter_external_nodeports: Vec<String>,
    /// Addresses of local endpoints: a connection DNATed from one of them back
    /// to itself must be masqueraded, or the reply would skip conntrack.
    hairpin: BTreeSet<IpAddr>,
    per_shard: &'a mut BTreeMap<u32, ProgrammedSummary>,
}

impl<'a> FamilyBuilder<'a> {
    fn new(
        family: Family,
        settings: &'a Settings,
        layout: Layout,
        per_shard: &'a mut BTreeMap<u32, ProgrammedSummary>,
    ) -> Self {
        let mut rules = FamilyRules::default();
        for table in Table::ALL {
            for name in chains::fixed(table) {
                rules
                    .table_mut(table)
                    .chains
                    .insert((*name).to_owned(), Chain::default());
            }
        }
        Self {
            family,
            settings,
            node: NodeDecision::new(family, settings),
            layout,
            rules,
            nat_services: Vec::new(),
            filter_services: Vec::new(),
            filter_external: Vec::new(),
            filter_external_nodeports: Vec::new(),
            hairpin: BTreeSet::new(),
            per_shard,
        }
    }

    fn count_rule(&mut self, owner: Option<u32>) {
        if let Some(shard) = owner {
            self.per_shard.entry(shard).or_default().rules += 1;
        }
    }

    /// Appends a rule to a chain, creating the chain (owned by `owner`) if needed.
    fn push(&mut self, table: Table, chain: &str, owner: Option<u32>, rule: String) {
        self.count_rule(owner);
        let chains = &mut self.rules.table_mut(table).chains;
        if !chains.contains_key(chain) {
            if let Some(shard) = owner {
                self.per_shard.entry(shard).or_default().chains += 1;
            }
            chains.insert(
                chain.to_owned(),
                Chain {
                    rules: Vec::new(),
                    owner,
                },
            );
        }
        if let Some(c) = chains.get_mut(chain) {
            c.rules.push(rule);
        }
    }

    fn entry(&mut self, owner: u32, dst: IpAddr, rule: String) -> DispatchEntry {
        self.count_rule(Some(owner));
        DispatchEntry { dst, rule }
    }

    /// Renders one service port; false when it has nothing in this family.
    fn service_port(&mut self, sp: &ServicePort) -> bool {
        let Some(d) = PortDecision::new(sp, self.family, self.settings) else {
            return false;
        };
        let names = Names::of(sp);
        // A service reachable only through its cluster IP needs no policy chain
        // of its own in the tree layout: its rules, each matching the frontend,
        // go straight into the dispatch leaf. That saves one chain per service,
        // and restore time on nf_tables follows the number of chains.
        // A service with endpoints on this node keeps its chain: it used to have
        // one per local endpoint, and operators (and the agent's run and e2e
        // tests) find a service with local endpoints by its own chain.
        let inline_internal = self.layout == Layout::Tree
            && !d.externally_accessible
            && d.hairpin_endpoints().is_empty();
        self.cluster_ip_frontend(&d, &names, inline_internal);
        self.external_frontends(&d, &names);
        self.node_port_frontends(&d, &names);
        if !d.has_endpoints {
            return true;
        }
        if d.externally_accessible {
            self.external_chain(&d, &names);
        }
        if d.uses_firewall {
            self.firewall_chain(&d, &names);
        }
        self.policy_chains(&d, &names, inline_internal);
        self.endpoint_chains(&d);
        true
    }

    fn cluster_ip_frontend(&mut self, d: &PortDecision<'_>, n: &Names, inline_internal: bool) {
        let (owner, spn, matcher, port) = (d.sp.shard, &n.spn, &n.matcher, d.sp.port);
        let internal_chain = if d.internal_uses_local {
            &n.svl
        } else {
            &n.svc
        };
        if d.has_internal && !inline_internal {
            let e = self.entry(
                owner,
                d.cluster_ip,
                format!(
                    "-m comment --comment \"{spn} cluster IP\" {matcher} -d {} --dport {port} -j {internal_chain}",
                    host(d.cluster_ip)
                ),
            );
            self.nat_services.push(e);
        } else if !d.has_internal {
            let Unreachable { refusal, reason } = d.internal_unreachable;
            let target = refusal_target(refusal);
            let e = self.entry(
                owner,
                d.cluster_ip,
                format!("-m comment --comment \"{spn} {reason}\" {matcher} -d {} --dport {port} -j {target}", host(d.cluster_ip)),
            );
            self.filter_services.push(e);
        }
    }

    /// External IPs and load-balancer IPs.
    fn external_frontends(&mut self, d: &PortDecision<'_>, n: &Names) {
        let (owner, spn, matcher, port) = (d.sp.shard, &n.spn, &n.matcher, d.sp.port);
        let Unreachable { refusal, reason } = d.external_unreachable;
        let ext_target = refusal_target(refusal);
        let ext = &n.ext;
        for ip in &d.external_ips {
            if d.has_endpoints {
                let e = self.entry(
                    owner,
                    *ip,
                    format!("-m comment --comment \"{spn} external IP\" {matcher} -d {} --dport {port} -j {ext}", host(*ip)),
                );
                self.nat_services.push(e);
            }
            if !d.has_external {
                let e = self.entry(
                    owner,
                    *ip,
                    format!("-m comment --comment \"{spn} {reason}\" {matcher} -d {} --dport {port} -j {ext_target}", host(*ip)),
                );
                self.filter_external.push(e);
            }
        }
        for ip in &d.lb_ips {
            if d.has_endpoints {
                let target = if d.uses_firewall { &n.fw } else { ext };
                let e = self.entry(
                    owner,
                    *ip,
                    format!("-m comment --comment \"{spn} loadbalancer IP\" {matcher} -d {} --dport {port} -j {target}", host(*ip)),
                );
                self.nat_services.push(e);
            }
            if d.uses_firewall {
                self.push(
                    Table::Filter,
                    chains::PROXY_FIREWALL,
                    Some(owner),
                    format!(
                        "-m comment --comment \"{spn} traffic not accepted by {}\" {matcher} -d {} --dport {port} -j DROP",
                        n.fw,
                        host(*ip)
                    ),
                );
            }
            if !d.has_external {
                let e = self.entry(
                    owner,
                    *ip,
                    format!("-m comment --comment \"{spn} {reason}\" {matcher} -d {} --dport {port} -j {ext_target}", host(*ip)),
                );
                self.filter_external.push(e);
            }
        }
    }

    /// The node port and the health-check node port.
    fn node_port_frontends(&mut self, d: &PortDecision<'_>, n: &Names) {
        let (owner, spn, matcher) = (d.sp.shard, &n.spn, &n.matcher);
        if let Some(node_port) = d.sp.node_port {
            if d.has_endpoints {
                self.push(
                    Table::Nat,
                    chains::NODEPORTS,
                    Some(owner),
                    format!(
                        "-m comment --comment \"{spn}\" {matcher} --dport {node_port} -j {}",
                        n.ext
                    ),
                );
            }
            if !d.has_external {
                let Unreachable { refusal, reason } = d.external_unreachable;
                self.count_rule(Some(owner));
                self.filter_external_nodeports.push(format!(
                    "-m comment --comment \"{spn} {reason}\" -m addrtype --dst-type LOCAL{} {matcher} --dport {node_port} -j {}",
                    not_to(self.node.refusals_except),
                    refusal_target(refusal)
                ));
            }
        }
        if let Some(hc) = d.sp.health_check_node_port {
            self.push(
                Table::Filter,
                chains::NODEPORTS,
                Some(owner),
                format!("-m comment --comment \"{spn} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT"),
            );
        }
    }

    /// The external chain: who gets masqueraded, and which endpoints external
    /// traffic may reach.
    fn external_chain(&mut self, d: &PortDecision<'_>, n: &Names) {
        let (owner, spn, ext, svc, svl) = (Some(d.sp.shard), &n.spn, &n.ext, &n.svc, &n.svl);
        if d.external_local {
            if let Some(cidr) = d.pod_short_circuit {
                // Pods reach every endpoint, unmasqueraded, as for a cluster IP.
                self.push(
                    Table::Nat,
                    ext,
                    owner,
                    format!("-m comment --comment \"pod traffic for {spn} external destinations\" -s {cidr} -j {svc}"),
                );
            }
            self.push(
                Table::Nat,
                ext,
                owner,
                format!(
                    "-m comment --comment \"masquerade LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {}",
                    chains::MARK_MASQ
                ),
            );
            if d.uses_cluster_set {
                self.push(
                    Table::Nat,
                    ext,
                    owner,
                    format!("-m comment --comment \"route LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {svc}"),
                );
            }
            if d.uses_local_set {
                self.push(Table::Nat, ext, owner, format!("-j {svl}"));
            }
        } else {
            self.push(
                Table::Nat,
                ext,
                owner,
                format!("-m comment --comment \"masquerade traffic for {spn} external destinations\" -j {}", chains::MARK_MASQ),
            );
            if d.uses_cluster_set {
                self.push(Table::Nat, ext, owner, format!("-j {svc}"));
            }
        }
    }

    /// The load-balancer firewall: allowed sources continue to the external
    /// chain; the rest fall off un-NATed and filter PPX-PROXY-FIREWALL drops them.
    fn firewall_chain(&mut self, d: &PortDecision<'_>, n: &Names) {
        let (owner, spn, ext, fw) = (Some(d.sp.shard), &n.spn, &n.ext, &n.fw);
        for range in &d.ranges {
            self.push(
                Table::Nat,
                fw,
                owner,
                format!("-m comment --comment \"{spn} loadbalancer IP\" -s {range} -j {ext}"),
            );
        }
        if d.firewall_admits_node {
            // A VIP bound on the node loops back with the VIP as source.
            for ip in &d.lb_ips {
                self.push(
                    Table::Nat,
                    fw,
                    owner,
                    format!(
                        "-m comment --comment \"{spn} loadbalancer IP\" -s {} -j {ext}",
                        host(*ip)
                    ),
                );
            }
        }
        self.push(
            Table::Nat,
            fw,
            owner,
            format!(
                "-m comment --comment \"other traffic to {spn} will be dropped by {}\"",
                chains::PROXY_FIREWALL
            ),
        );
    }

    /// The policy chains (cluster-wide and local endpoint sets), or their rules
    /// inlined into the dispatch.
    fn policy_chains(&mut self, d: &PortDecision<'_>, n: &Names, inline_internal: bool) {
        let owner = d.sp.shard;
        let frontend = format!(
            "{} -d {} --dport {}",
            n.matcher,
            host(d.cluster_ip),
            d.sp.port
        );
        for (local_set, eps, internal) in d.endpoint_sets() {
            let chain = if local_set { &n.svl } else { &n.svc };
            let inline = internal && inline_internal;
            let mut rules = Vec::new();
            // The masquerade rule for off-cluster sources lives in whichever
            // chain cluster-IP traffic uses.
            if internal {
                let masq_source = match d.cluster_masquerade {
                    ClusterMasquerade::All => Some(String::new()),
                    ClusterMasquerade::NotFrom(c) => Some(format!(" ! -s {c}")),
                    ClusterMasquerade::Nobody => None,
                };
                if let Some(source) = masq_source {
                    rules.push(format!(
                        "-m comment --comment \"{} cluster IP\" {frontend}{source} -j {}",
                        n.spn,
                        chains::MARK_MASQ
                    ));
                }
            }
            rules.extend(Self::endpoint_rules(
                d.sp,
                &n.spn,
                eps,
                inline.then_some(frontend.as_str()),
            ));
            if inline {
                for rule in rules {
                    let e = self.entry(owner, d.cluster_ip, rule);
                    self.nat_services.push(e);
                }
            } else {
                for rule in rules {
                    self.push(Table::Nat, chain, Some(owner), rule);
                }
            }
        }
    }

    /// The endpoints a connection can hairpin to (local ones, and those of no
    /// known node) go to the node-wide hairpin chain.
    fn endpoint_chains(&mut self, d: &PortDecision<'_>) {
        self.hairpin
            .extend(d.hairpin_endpoints().iter().map(|e| e.addr.ip()));
    }

    /// The load-balancing rules of a policy chain: affinity checks first, then
    /// one rule per endpoint with kube-proxy's probability series. With a
    /// `frontend` match the rules stand on their own (inlined into a dispatch
    /// chain) instead of relying on the jump that led to the policy chain.
    fn endpoint_rules(
        sp: &ServicePort,
        spn: &str,
        eps: &[Endpoint],
        frontend: Option<&str>,
    ) -> Vec<String> {
        let proto = sp.protocol.as_lower_str();
        // DNAT to a port needs the protocol match, which the frontend match
        // already carries (iptables refuses a second `-p`).
        let (matched, proto_match) = match frontend {
            Some(f) => (format!("{f} "), String::new()),
            None => (String::new(), format!("-m {proto} -p {proto} ")),
        };
        let mut rules = Vec::new();
        if let Some(timeout) = sp.affinity_timeout {
            for ep in eps {
                let list = sep_name(spn, proto, ep);
                let action = format!(
                    "-m recent --name {list} --set {proto_match}-j DNAT --to-destination {}",
                    ep.addr
                );
                rules.push(format!(
                    "-m comment --comment \"{spn} -> {}\" {matched}-m recent --name {list} --rcheck --seconds {timeout} --reap {action}",
                    ep.addr
                ));
            }
        }
        let n = eps.len();
        for (i, ep) in eps.iter().enumerate() {
            let list = sep_name(spn, proto, ep);
            let statistic = if n - i > 1 {
                format!(
                    "-m statistic --mode random --probability {} ",
                    probability(n - i)
                )
            } else {
                String::new()
            };
            let action = if sp.affinity_timeout.is_some() {
                format!(
                    "-m recent --name {list} --set {proto_match}-j DNAT --to-destination {}",
                    ep.addr
                )
            } else {
                format!("{proto_match}-j DNAT --to-destination {}", ep.addr)
            };
            rules.push(format!(
                "-m comment --comment \"{spn} -> {}\" {matched}{statistic}{action}",
                ep.addr
            ));
        }
        rules
    }

    fn finish(mut self) -> FamilyRules {
        let node = self.node.clone();
        let mark = format!("{:#x}", node.mark);
        self.set(Table::Filter, chains::LOCALNET_GUARD, localnet_guard(&node));
        self.nat_dispatch(&node);
        self.nat_masquerade(&mark);
        self.filter_dispatch();
        self.set(
            Table::Filter,
            chains::FORWARD,
            vec![
                "-m conntrack --ctstate INVALID -j DROP".into(),
                format!("-m comment --comment \"planproxy forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"),
                "-m comment --comment \"planproxy forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
            ],
        );
        self.rules.nat.jumps = nat_jumps();
        self.rules.filter.jumps = filter_jumps();
        self.rules
    }

    /// nat PPX-SERVICES: the dispatch, then the node-port tail rule last.
    fn nat_dispatch(&mut self, node: &NodeDecision) {
        let nat = dispatch(
            chains::SERVICES,
            self.layout,
            std::mem::take(&mut self.nat_services),
        );
        let mut services = nat.root_rules;
        let tail = "-m comment --comment \"planproxy service nodeports; NOTE: this must be the last rule in this chain\"";
        services.extend(node_port_jumps(&node.node_ports, tail));
        self.set(Table::Nat, chains::SERVICES, services);
        for (name, rules) in nat.chains {
            self.set(Table::Nat, &name, rules);
        }
    }

    fn nat_masquerade(&mut self, mark: &str) {
        self.set(
            Table::Nat,
            chains::POSTROUTING,
            vec![
                format!(
                    "-m comment --comment \"planproxy hairpin traffic\" -m conntrack --ctstate DNAT -j {}",
                    chains::HAIRPIN
                ),
                format!("-m mark ! --mark {mark}/{mark} -j RETURN"),
                format!("-j MARK --xor-mark {mark}"),
                "-m comment --comment \"planproxy service traffic requiring SNAT\" -j MASQUERADE --random-fully".into(),
            ],
        );
        self.set(
            Table::Nat,
            chains::MARK_MASQ,
            vec![format!("-j MARK --or-mark {mark}")],
        );
        // One rule per local endpoint address (not per endpoint or service):
        // a DNATed connection whose source and destination are that address.
        let hairpin = std::mem::take(&mut self.hairpin)
            .into_iter()
            .map(|ip| format!("-s {} -d {} -j {}", host(ip), host(ip), chains::MARK_MASQ))
            .collect();
        self.set(Table::Nat, chains::HAIRPIN, hairpin);
    }

    /// filter: REJECT/DROP for frontends without endpoints, through the same dispatch.
    fn filter_dispatch(&mut self) {
        let layout = self.layout;
        let filter_services = dispatch(
            chains::SERVICES,
            layout,
            std::mem::take(&mut self.filter_services),
        );
        self.set(Table::Filter, chains::SERVICES, filter_services.root_rules);
        for (name, rules) in filter_services.chains {
            self.set(Table::Filter, &name, rules);
        }
        let external = dispatch(
            chains::EXTERNAL_SERVICES,
            layout,
            std::mem::take(&mut self.filter_external),
        );
        let mut external_rules = external.root_rules;
        external_rules.append(&mut self.filter_external_nodeports);
        self.set(Table::Filter, chains::EXTERNAL_SERVICES, external_rules);
        for (name, rules) in external.chains {
            self.set(Table::Filter, &name, rules);
        }
    }

    /// Sets a node-wide chain's rules (appending to any already there).
    fn set(&mut self, table: Table, chain: &str, rules: Vec<String>) {
        self.rules
            .table_mut(table)
            .chains
            .entry(chain.to_owned())
            .or_default()
            .rules
            .extend(rules);
    }
}

/// The tail rules of nat PPX-SERVICES sending node-port destinations to
/// PPX-NODEPORTS. iptables takes one `-d` per rule, so a loopback network left
/// out of CIDRs around it returns first.
fn node_port_jumps(destinations: &NodePortDestinations, tail: &str) -> Vec<String> {
    let local = "-m addrtype --dst-type LOCAL";
    let to = chains::NODEPORTS;
    match (&destinations.within, destinations.except) {
        (None, except) => vec![format!("{tail} {local}{} -j {to}", not_to(except))],
        (Some(networks), except) => except
            .map(|e| {
                format!("-m comment --comment \"planproxy: node ports do not answer on loopback\" -d {e} -j RETURN")
            })
            .into_iter()
            .chain(
                networks
                    .iter()
                    .map(|n| format!("{tail} {local} -d {n} -j {to}")),
            )
            .collect(),
    }
}

/// ` ! -d <network>`, or nothing.
fn not_to(except: Option<IpNet>) -> String {
    except.map(|e| format!(" ! -d {e}")).unwrap_or_default()
}

/// filter PPX-LOCALNET-GUARD: with route_localnet on, a packet to
/// 127.0.0.0/8 from elsewhere would reach services bound to loopback
/// (CVE-2020-8558); only connections the node made or DNATed may pass.
fn localnet_guard(node: &NodeDecision) -> Vec<String> {
    if !node.localhost {
        return Vec::new();
    }
    let loopback = crate::decide::loopback(node.family);
    vec![format!(
        "-m comment --comment \"planproxy: block incoming localnet connections\" -d {loopback} ! -s {loopback} -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP"
    )]
}

fn nat_jumps() -> Vec<Jump> {
    vec![
        jump(
            "PREROUTING",
            chains::SERVICES,
            "",
            "planproxy service portals",
        ),
        jump("OUTPUT", chains::SERVICES, "", "planproxy service portals"),
        jump(
            "POSTROUTING",
            chains::POSTROUTING,
            "",
            "planproxy postrouting rules",
        ),
    ]
}

fn filter_jumps() -> Vec<Jump> {
    let new = "-m conntrack --ctstate NEW ";
    vec![
        // First, as kubelet's KUBE-FIREWALL: no accept rule may let a
        // spoofed packet to 127.0.0.0/8 through before the guard sees it.
        jump(
            "INPUT",
            chains::LOCALNET_GUARD,
            "",
            "planproxy localnet guard",
        ),
        jump(
            "INPUT",
            chains::PROXY_FIREWALL,
            new,
            "planproxy load balancer firewall",
        ),
        jump(
            "INPUT",
            chains::NODEPORTS,
            "",
            "planproxy health check service ports",
        ),
        jump(
            "INPUT",
            chains::EXTERNAL_SERVICES,
            new,
            "planproxy externally-visible service portals",
        ),
        jump(
            "FORWARD",
            chains::PROXY_FIREWALL,
            new,
            "planproxy load balancer firewall",
        ),
        jump("FORWARD", chains::FORWARD, "", "planproxy forwarding rules"),
        jump(
            "FORWARD",
            chains::SERVICES,
            new,
            "planproxy service portals",
        ),
        jump(
            "FORWARD",
            chains::EXTERNAL_SERVICES,
            new,
            "planproxy externally-visible service portals",
        ),
        jump(
            "OUTPUT",
            chains::PROXY_FIREWALL,
            new,
            "planproxy load balancer firewall",
        ),
        jump("OUTPUT", chains::SERVICES, new, "planproxy service portals"),
    ]
}

fn jump(builtin: &'static str, target: &'static str, extra: &str, comment: &str) -> Jump {
    Jump {
        builtin,
        target,
        spec: format!("{extra}-m comment --comment \"{comment}\" -j {target}"),
    }
}

/// The per-endpoint name: the `recent` list of an endpoint under ClientIP affinity.
fn sep_name(spn: &str, proto: &str, ep: &Endpoint) -> String {
    format!("PPX-SEP-{}", endpoint_hash(spn, proto, &ep.key()))
}

impl TableRules {
    /// The chains owned by service ports of `shard`.
    pub fn chains_of_shard(&self, shard: u32) -> impl Iterator<Item = &str> {
        self.chains
            .iter()
            .filter(move |(_, c)| c.owner == Some(shard))
            .map(|(n, _)| n.as_str())
    }
}
