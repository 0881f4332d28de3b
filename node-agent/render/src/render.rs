//! The renderer: a parsed node plan → a [`RuleSet`], following kube-proxy's
//! iptables-mode semantics with three changes that keep syncs fast and first
//! packets cheap:
//!
//! * Frontends are dispatched through a tree of chains keyed by destination
//!   address ([`Layout::Tree`], see [`crate::tree`]) instead of one linear list.
//! * In the tree layout a service reachable only through its cluster IP gets no
//!   policy chain: its masquerade and load-balancing rules, each matching the
//!   frontend, sit in the dispatch leaf. Restore time on nf_tables follows the
//!   number of chains, and most services are cluster-IP only.
//! * DNAT to a remote endpoint sits directly in the service chain instead of in a
//!   per-endpoint chain. Only endpoints on this node get a `PPX-SEP-` chain, because
//!   only they can need hairpin masquerade: a connection is NATed on the node where
//!   it first meets our rules, so its source is a pod of this node or an
//!   off-cluster client — never a remote pod it could be load-balanced back to.
//!   ClientIP affinity uses the same per-endpoint `recent` list names either way.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::v1alpha1::{NoEndpointsAction, ProgrammedSummary};

use crate::hash::{endpoint_hash, service_port_hash};
use crate::model::{
    self, Endpoint, InvalidServicePort, NodeModel, PlanError, ServicePort, Settings, family_of,
    family_of_net,
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
pub fn render(shards: &[ProxyPlanSpec], options: &RenderOptions) -> Result<Rendered, PlanError> {
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
    let mut endpoints: BTreeMap<u32, BTreeSet<SocketAddr>> = BTreeMap::new();
    for i in rendered_ports {
        let sp = &model.service_ports[i];
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
    Rendered {
        rule_set,
        per_shard,
        skipped: model.skipped.clone(),
        model,
    }
}

/// `-d`/`-s` form of a single address.
fn host(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(a) => format!("{a}/32"),
        IpAddr::V6(a) => format!("{a}/128"),
    }
}

fn reject_target(action: NoEndpointsAction) -> &'static str {
    match action {
        NoEndpointsAction::Reject => "REJECT",
        NoEndpointsAction::Drop => "DROP",
    }
}

/// kube-proxy's probability for the i-th of n endpoints: 1/(n-i), ten decimals.
pub fn probability(remaining: usize) -> String {
    format!("{:.10}", 1.0 / remaining as f64)
}

struct FamilyBuilder<'a> {
    family: Family,
    settings: &'a Settings,
    layout: Layout,
    rules: FamilyRules,
    nat_services: Vec<DispatchEntry>,
    filter_services: Vec<DispatchEntry>,
    filter_external: Vec<DispatchEntry>,
    filter_external_nodeports: Vec<String>,
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
            layout,
            rules,
            nat_services: Vec::new(),
            filter_services: Vec::new(),
            filter_external: Vec::new(),
            filter_external_nodeports: Vec::new(),
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
        let family = self.family;
        let Some(cluster_ip) = sp
            .cluster_ips
            .iter()
            .copied()
            .find(|ip| family_of(ip) == family)
        else {
            return false;
        };
        let of_family = |set: &Option<Vec<Endpoint>>| -> Vec<Endpoint> {
            set.iter()
                .flatten()
                .filter(|e| family_of(&e.addr.ip()) == family)
                .copied()
                .collect()
        };
        // `hasEndpoints` is authoritative: without it every frontend rejects,
        // whatever the endpoint sets hold.
        let (cluster_eps, local_eps) = if sp.has_endpoints {
            (
                of_family(&sp.cluster_endpoints),
                of_family(&sp.local_endpoints),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let in_family = |ips: &[IpAddr]| -> Vec<IpAddr> {
            ips.iter()
                .copied()
                .filter(|ip| family_of(ip) == family)
                .collect()
        };
        let external_ips = in_family(&sp.external_ips);
        let lb_ips = in_family(&sp.load_balancer_ips);
        let ranges: Vec<IpNet> = sp
            .source_ranges
            .iter()
            .copied()
            .filter(|n| family_of_net(n) == family)
            .collect();

        let owner = sp.shard;
        let spn = sp.name.to_string();
        let proto = sp.protocol.as_lower_str();
        let port = sp.port;
        let hash = service_port_hash(&spn, proto);
        let svc = format!("PPX-SVC-{hash}");
        let svl = format!("PPX-SVL-{hash}");
        let ext = format!("PPX-EXT-{hash}");
        let fw = format!("PPX-FW-{hash}");

        let externally_accessible =
            sp.node_port.is_some() || !external_ips.is_empty() || !lb_ips.is_empty();
        let external_local = sp.external_local && externally_accessible;
        // A dual-stack service may have endpoints in one family only.
        let has_endpoints = sp.has_endpoints
            && (!cluster_eps.is_empty() || !local_eps.is_empty() || sp.all_endpoints().is_empty());
        let uses_cluster_chain =
            !cluster_eps.is_empty() && (!sp.internal_local || externally_accessible);
        let uses_local_chain = !local_eps.is_empty() && (sp.internal_local || external_local);
        let (internal_chain, has_internal) = if sp.internal_local {
            (&svl, uses_local_chain)
        } else {
            (&svc, uses_cluster_chain)
        };
        let has_external = if external_local {
            uses_local_chain
        } else {
            uses_cluster_chain
        };
        let uses_fw = !lb_ips.is_empty() && !ranges.is_empty();
        let unreachable = |local_policy: bool| -> (&'static str, &'static str) {
            if local_policy && has_endpoints {
                ("DROP", "has no local endpoints")
            } else {
                (reject_target(sp.no_endpoints_action), "has no endpoints")
            }
        };
        let matcher = format!("-m {proto} -p {proto}");

        // A service reachable only through its cluster IP needs no policy chain
        // of its own in the tree layout: its rules, each matching the frontend,
        // go straight into the dispatch leaf. That saves one chain per service,
        // and restore time on nf_tables follows the number of chains.
        let inline_internal = self.layout == Layout::Tree && !externally_accessible;

        // Cluster IP.
        if has_internal && !inline_internal {
            let e = self.entry(
                owner,
                cluster_ip,
                format!(
                    "-m comment --comment \"{spn} cluster IP\" {matcher} -d {} --dport {port} -j {internal_chain}",
                    host(cluster_ip)
                ),
            );
            self.nat_services.push(e);
        } else if !has_internal {
            let (target, reason) = unreachable(sp.internal_local);
            let e = self.entry(
                owner,
                cluster_ip,
                format!("-m comment --comment \"{spn} {reason}\" {matcher} -d {} --dport {port} -j {target}", host(cluster_ip)),
            );
            self.filter_services.push(e);
        }

        // External IPs and load-balancer IPs.
        let (ext_target, ext_reason) = unreachable(external_local);
        for ip in &external_ips {
            if has_endpoints {
                let e = self.entry(
                    owner,
                    *ip,
                    format!("-m comment --comment \"{spn} external IP\" {matcher} -d {} --dport {port} -j {ext}", host(*ip)),
                );
                self.nat_services.push(e);
            }
            if !has_external {
                let e = self.entry(
                    owner,
                    *ip,
                    format!("-m comment --comment \"{spn} {ext_reason}\" {matcher} -d {} --dport {port} -j {ext_target}", host(*ip)),
                );
                self.filter_external.push(e);
            }
        }
        for ip in &lb_ips {
            if has_endpoints {
                let target = if uses_fw { &fw } else { &ext };
                let e = self.entry(
                    owner,
                    *ip,
                    format!("-m comment --comment \"{spn} loadbalancer IP\" {matcher} -d {} --dport {port} -j {target}", host(*ip)),
                );
                self.nat_services.push(e);
            }
            if uses_fw {
                self.push(
                    Table::Filter,
                    chains::PROXY_FIREWALL,
                    Some(owner),
                    format!(
                        "-m comment --comment \"{spn} traffic not accepted by {fw}\" {matcher} -d {} --dport {port} -j DROP",
                        host(*ip)
                    ),
                );
            }
            if !has_external {
                let e = self.entry(
                    owner,
                    *ip,
                    format!("-m comment --comment \"{spn} {ext_reason}\" {matcher} -d {} --dport {port} -j {ext_target}", host(*ip)),
                );
                self.filter_external.push(e);
            }
        }

        // Node port.
        if let Some(node_port) = sp.node_port {
            if has_endpoints {
                self.push(
                    Table::Nat,
                    chains::NODEPORTS,
                    Some(owner),
                    format!(
                        "-m comment --comment \"{spn}\" {matcher} --dport {node_port} -j {ext}"
                    ),
                );
            }
            if !has_external {
                self.count_rule(Some(owner));
                self.filter_external_nodeports.push(format!(
                    "-m comment --comment \"{spn} {ext_reason}\" -m addrtype --dst-type LOCAL {matcher} --dport {node_port} -j {ext_target}"
                ));
            }
        }
        if let Some(hc) = sp.health_check_node_port {
            self.push(
                Table::Filter,
                chains::NODEPORTS,
                Some(owner),
                format!("-m comment --comment \"{spn} health check node port\" -m tcp -p tcp --dport {hc} -j ACCEPT"),
            );
        }

        if !has_endpoints {
            return true;
        }

        // The external chain: who gets masqueraded, and which endpoints external
        // traffic may reach.
        if externally_accessible {
            if external_local {
                if let Some(cidr) = self.settings.local_cidr(family)
                    && uses_cluster_chain
                {
                    // Pods reach every endpoint, unmasqueraded, as for a cluster IP.
                    self.push(
                        Table::Nat,
                        &ext,
                        Some(owner),
                        format!("-m comment --comment \"pod traffic for {spn} external destinations\" -s {cidr} -j {svc}"),
                    );
                }
                self.push(
                    Table::Nat,
                    &ext,
                    Some(owner),
                    format!(
                        "-m comment --comment \"masquerade LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {}",
                        chains::MARK_MASQ
                    ),
                );
                if uses_cluster_chain {
                    self.push(
                        Table::Nat,
                        &ext,
                        Some(owner),
                        format!("-m comment --comment \"route LOCAL traffic for {spn} external destinations\" -m addrtype --src-type LOCAL -j {svc}"),
                    );
                }
                if uses_local_chain {
                    self.push(Table::Nat, &ext, Some(owner), format!("-j {svl}"));
                }
            } else {
                self.push(
                    Table::Nat,
                    &ext,
                    Some(owner),
                    format!("-m comment --comment \"masquerade traffic for {spn} external destinations\" -j {}", chains::MARK_MASQ),
                );
                if uses_cluster_chain {
                    self.push(Table::Nat, &ext, Some(owner), format!("-j {svc}"));
                }
            }
        }

        // The load-balancer firewall: allowed sources continue to the external
        // chain; the rest fall off un-NATed and filter PPX-PROXY-FIREWALL drops them.
        if uses_fw {
            for range in &ranges {
                self.push(
                    Table::Nat,
                    &fw,
                    Some(owner),
                    format!("-m comment --comment \"{spn} loadbalancer IP\" -s {range} -j {ext}"),
                );
            }
            let admits_node = self
                .settings
                .node_ips
                .iter()
                .any(|ip| ranges.iter().any(|r| r.contains(ip)));
            if admits_node {
                // A VIP bound on the node loops back with the VIP as source.
                for ip in &lb_ips {
                    self.push(
                        Table::Nat,
                        &fw,
                        Some(owner),
                        format!(
                            "-m comment --comment \"{spn} loadbalancer IP\" -s {} -j {ext}",
                            host(*ip)
                        ),
                    );
                }
            }
            self.push(
                Table::Nat,
                &fw,
                Some(owner),
                format!(
                    "-m comment --comment \"other traffic to {spn} will be dropped by {}\"",
                    chains::PROXY_FIREWALL
                ),
            );
        }

        let mut local_seps: BTreeSet<Endpoint> = BTreeSet::new();
        let frontend = format!("{matcher} -d {} --dport {port}", host(cluster_ip));
        for (chain, eps, used, internal) in [
            (&svc, &cluster_eps, uses_cluster_chain, !sp.internal_local),
            (&svl, &local_eps, uses_local_chain, sp.internal_local),
        ] {
            if !used {
                continue;
            }
            let inline = internal && inline_internal;
            let mut rules = Vec::new();
            // The masquerade rule for off-cluster sources lives in whichever
            // chain cluster-IP traffic uses.
            if internal {
                let masq_source = if sp.masquerade_all {
                    Some(String::new())
                } else {
                    self.settings
                        .local_cidr(family)
                        .map(|c| format!(" ! -s {c}"))
                };
                if let Some(source) = masq_source {
                    rules.push(format!(
                        "-m comment --comment \"{spn} cluster IP\" {frontend}{source} -j {}",
                        chains::MARK_MASQ
                    ));
                }
            }
            rules.extend(Self::endpoint_rules(
                sp,
                &spn,
                eps,
                inline.then_some(frontend.as_str()),
            ));
            if inline {
                for rule in rules {
                    let e = self.entry(owner, cluster_ip, rule);
                    self.nat_services.push(e);
                }
            } else {
                for rule in rules {
                    self.push(Table::Nat, chain, Some(owner), rule);
                }
            }
            local_seps.extend(eps.iter().filter(|e| e.local).copied());
        }
        for ep in local_seps {
            let sep = sep_name(&spn, proto, &ep);
            self.push(
                Table::Nat,
                &sep,
                Some(owner),
                format!(
                    "-m comment --comment \"{spn}\" -s {} -j {}",
                    host(ep.addr.ip()),
                    chains::MARK_MASQ
                ),
            );
            let set = if sp.affinity_timeout.is_some() {
                format!("-m recent --name {sep} --set ")
            } else {
                String::new()
            };
            self.push(
                Table::Nat,
                &sep,
                Some(owner),
                format!(
                    "-m comment --comment \"{spn}\" {set}{matcher} -j DNAT --to-destination {}",
                    ep.addr
                ),
            );
        }
        true
    }

    /// The load-balancing rules of a policy chain: affinity checks first, then
    /// one rule per endpoint with kube-proxy's probability series.
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
                let action = if ep.local {
                    format!("-j {list}")
                } else {
                    format!(
                        "-m recent --name {list} --set {proto_match}-j DNAT --to-destination {}",
                        ep.addr
                    )
                };
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
            let action = if ep.local {
                format!("-j {list}")
            } else if sp.affinity_timeout.is_some() {
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
        let family = self.family;
        let mark = format!("{:#x}", self.settings.masquerade_mark);
        let layout = self.layout;

        // nat PPX-SERVICES: the dispatch, then the node-port tail rule last.
        let nat = dispatch(
            chains::SERVICES,
            layout,
            std::mem::take(&mut self.nat_services),
        );
        let mut services = nat.root_rules;
        let loopback = match family {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        };
        let tail = "-m comment --comment \"planproxy service nodeports; NOTE: this must be the last rule in this chain\"";
        let addresses: Vec<IpNet> = self
            .settings
            .node_port_addresses
            .iter()
            .copied()
            .filter(|n| family_of_net(n) == family)
            .collect();
        if addresses.is_empty() || addresses.iter().any(|n| n.prefix_len() == 0) {
            services.push(format!(
                "{tail} -m addrtype --dst-type LOCAL ! -d {loopback} -j {}",
                chains::NODEPORTS
            ));
        } else {
            for ip in &self.settings.node_ips {
                if family_of(ip) == family
                    && !ip.is_loopback()
                    && addresses.iter().any(|n| n.contains(ip))
                {
                    services.push(format!("{tail} -d {} -j {}", host(*ip), chains::NODEPORTS));
                }
            }
        }
        self.set(Table::Nat, chains::SERVICES, services);
        for (name, rules) in nat.chains {
            self.set(Table::Nat, &name, rules);
        }
        self.set(
            Table::Nat,
            chains::POSTROUTING,
            vec![
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

        // filter: REJECT/DROP for frontends without endpoints, through the same dispatch.
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
        self.set(
            Table::Filter,
            chains::FORWARD,
            vec![
                "-m conntrack --ctstate INVALID -j DROP".into(),
                format!("-m comment --comment \"planproxy forwarding rules\" -m mark --mark {mark}/{mark} -j ACCEPT"),
                "-m comment --comment \"planproxy forwarding conntrack rule\" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT".into(),
            ],
        );

        self.rules.nat.jumps = vec![
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
        ];
        let new = "-m conntrack --ctstate NEW ";
        self.rules.filter.jumps = vec![
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
        ];
        self.rules
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

fn jump(builtin: &'static str, target: &'static str, extra: &str, comment: &str) -> Jump {
    Jump {
        builtin,
        target,
        spec: format!("{extra}-m comment --comment \"{comment}\" -j {target}"),
    }
}

/// The per-endpoint name: the `PPX-SEP-` chain of a local endpoint, and the
/// `recent` list of every endpoint under ClientIP affinity.
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
