//! Rendering behaviour, one kube-proxy semantic per test.

use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::testing::{
    EndpointExt, NodeSettingsExt, mk_endpoint, mk_endpoint_set, mk_plan, mk_service_port,
    mk_settings,
};
use planproxy_crds::v1alpha1::{
    ClientIpAffinity, EndpointPlan, EndpointSet, LocalTrafficDetectorMode, NoEndpointsAction,
    ProgrammedSummary, ResolvedLocalTrafficDetector, ServicePortPlan, ShardInfo, TrafficPolicy,
};
use planproxy_render::hash::service_port_hash;
use planproxy_render::{
    Family, Layout, PlanError, RenderOptions, Rendered, TableRules, probability, render,
};

fn ep(ip: &str, local: bool) -> EndpointPlan {
    mk_endpoint(ip, 8080).local(local)
}

fn set(endpoints: Vec<EndpointPlan>) -> Option<EndpointSet> {
    Some(mk_endpoint_set(endpoints))
}

fn svc(name: &str, cluster_ip: &str, endpoints: Vec<EndpointPlan>) -> ServicePortPlan {
    mk_service_port("ns1", name, &[cluster_ip], endpoints)
}

fn spec(service_ports: Vec<ServicePortPlan>) -> ProxyPlanSpec {
    let settings = mk_settings(&["10.244.0.0/16"]).with_node_ips(&["192.168.1.10"]);
    mk_plan("node-a", settings, service_ports)
}

/// Renders with the flat layout, so every service keeps its own policy chain
/// to inspect (the tree layout inlines cluster-IP-only services, see
/// `tree_layout_inlines_cluster_ip_only_services_into_the_dispatch`).
fn rendered(spec: ProxyPlanSpec) -> Rendered {
    let options = RenderOptions {
        layout: Layout::Flat,
        families: vec![],
    };
    render(&[spec], &options).expect("the plan must render")
}

fn v4(r: &Rendered) -> (&TableRules, &TableRules) {
    let f = &r.rule_set.families[&Family::V4];
    (&f.nat, &f.filter)
}

fn chain<'a>(t: &'a TableRules, name: &str) -> &'a [String] {
    &t.chains
        .get(name)
        .unwrap_or_else(|| panic!("chain {name} missing; have {:?}", t.chains.keys()))
        .rules
}

fn svc_chain(kind: &str, name: &str) -> String {
    format!(
        "PPX-{kind}-{}",
        service_port_hash(&format!("ns1/{name}"), "tcp")
    )
}

#[test]
fn service_without_endpoints_rejects_and_creates_no_nat_chains() {
    let r = rendered(spec(vec![svc("empty", "10.96.0.1", vec![])]));
    let (nat, filter) = v4(&r);
    assert!(
        chain(filter, "PPX-SERVICES")
            .iter()
            .any(|rule| rule.contains("-d 10.96.0.1/32 --dport 80 -j REJECT")
                && rule.contains("\"ns1/empty has no endpoints\""))
    );
    assert!(
        !nat.chains
            .keys()
            .any(|c| c.starts_with("PPX-SVC-") || c.starts_with("PPX-EXT-"))
    );
    assert!(
        !chain(nat, "PPX-SERVICES")
            .iter()
            .any(|rule| rule.contains("10.96.0.1"))
    );
}

#[test]
fn the_drop_action_drops_services_without_endpoints() {
    let mut s = svc("empty", "10.96.0.1", vec![]);
    s.no_endpoints_action = NoEndpointsAction::Drop;
    s.node_port = Some(30001);
    let r = rendered(spec(vec![s]));
    let (_, filter) = v4(&r);
    assert!(
        chain(filter, "PPX-SERVICES")
            .iter()
            .all(|rule| rule.ends_with("-j DROP"))
    );
    assert!(chain(filter, "PPX-EXTERNAL-SERVICES")
        .iter()
        .any(|rule| rule.contains("--dst-type LOCAL") && rule.contains("--dport 30001 -j DROP")));
}

#[test]
fn has_endpoints_false_wins_over_listed_endpoints() {
    let mut s = svc("stale", "10.96.0.1", vec![ep("10.244.1.5", false)]);
    s.has_endpoints = false;
    let r = rendered(spec(vec![s]));
    let (nat, filter) = v4(&r);
    assert!(
        chain(filter, "PPX-SERVICES")
            .iter()
            .any(|rule| rule.ends_with("-j REJECT"))
    );
    assert!(!nat.chains.contains_key(&svc_chain("SVC", "stale")));
}

#[test]
fn internal_local_policy_without_local_endpoints_drops_the_cluster_ip() {
    let mut s = svc("itp", "10.96.0.1", vec![ep("10.244.1.5", false)]);
    s.internal_traffic_policy = TrafficPolicy::Local;
    s.cluster_endpoints = None;
    s.local_endpoints = set(vec![]);
    s.has_endpoints = true;
    let r = rendered(spec(vec![s]));
    let (_, filter) = v4(&r);
    assert!(chain(filter, "PPX-SERVICES").iter().any(|rule| {
        rule.contains("\"ns1/itp has no local endpoints\"") && rule.ends_with("-j DROP")
    }));
}

#[test]
fn external_local_policy_sends_outside_traffic_only_to_local_endpoints() {
    let mut s = svc(
        "etp",
        "10.96.0.1",
        vec![ep("10.244.0.5", true), ep("10.244.1.5", false)],
    );
    s.node_port = Some(30080);
    s.external_traffic_policy = TrafficPolicy::Local;
    s.local_endpoints = set(vec![ep("10.244.0.5", true)]);
    let r = rendered(spec(vec![s]));
    let (nat, _) = v4(&r);
    let ext = chain(nat, &svc_chain("EXT", "etp"));
    let svl = svc_chain("SVL", "etp");
    let svc_name = svc_chain("SVC", "etp");
    // Pods short-circuit to every endpoint, the node's own traffic is masqueraded
    // and short-circuited, and everything else reaches only local endpoints.
    assert!(ext[0].contains("-s 10.244.0.0/16") && ext[0].ends_with(&format!("-j {svc_name}")));
    assert!(ext[1].contains("--src-type LOCAL -j PPX-MARK-MASQ"));
    assert!(ext[2].contains("--src-type LOCAL") && ext[2].ends_with(&format!("-j {svc_name}")));
    assert_eq!(ext[3], format!("-j {svl}"));
    let local = chain(nat, &svl);
    assert_eq!(local.len(), 1);
    assert!(local[0].contains("10.244.0.5:8080"));
    assert!(
        !ext.iter()
            .any(|r| r.contains("-j PPX-MARK-MASQ") && !r.contains("LOCAL")),
        "external clients must keep their address"
    );
}

#[test]
fn external_local_policy_without_local_endpoints_drops_outside_traffic() {
    let mut s = svc("etp", "10.96.0.1", vec![ep("10.244.1.5", false)]);
    s.node_port = Some(30080);
    s.external_traffic_policy = TrafficPolicy::Local;
    s.local_endpoints = set(vec![]);
    let r = rendered(spec(vec![s]));
    let (nat, filter) = v4(&r);
    assert!(
        chain(filter, "PPX-EXTERNAL-SERVICES")
            .iter()
            .any(|rule| rule.contains("has no local endpoints")
                && rule.contains("--dport 30080 -j DROP"))
    );
    // Pods and the node itself still reach the cluster-wide endpoints.
    let ext = chain(nat, &svc_chain("EXT", "etp"));
    assert!(ext.iter().any(|rule| rule.contains("-s 10.244.0.0/16")));
    assert!(!ext.iter().any(|rule| rule.contains("PPX-SVL-")));
}

#[test]
fn off_cluster_sources_are_masqueraded_for_cluster_ips() {
    let r = rendered(spec(vec![svc(
        "web",
        "10.96.0.1",
        vec![ep("10.244.1.5", false)],
    )]));
    let (nat, _) = v4(&r);
    let rules = chain(nat, &svc_chain("SVC", "web"));
    assert!(
        rules[0].contains("-d 10.96.0.1/32 --dport 80 ! -s 10.244.0.0/16 -j PPX-MARK-MASQ"),
        "{}",
        rules[0]
    );
}

#[test]
fn masquerade_all_marks_every_source() {
    let mut s = svc("web", "10.96.0.1", vec![ep("10.244.1.5", false)]);
    s.masquerade_all = true;
    let r = rendered(spec(vec![s]));
    let (nat, _) = v4(&r);
    let rules = chain(nat, &svc_chain("SVC", "web"));
    assert!(
        rules[0].ends_with("--dport 80 -j PPX-MARK-MASQ"),
        "{}",
        rules[0]
    );
}

#[test]
fn without_a_local_traffic_detector_cluster_ip_traffic_is_not_masqueraded() {
    let mut plan = spec(vec![svc("web", "10.96.0.1", vec![ep("10.244.1.5", false)])]);
    plan.settings.local_traffic_detector = ResolvedLocalTrafficDetector {
        mode: LocalTrafficDetectorMode::None,
        cidrs: vec![],
    };
    let r = rendered(plan);
    let (nat, _) = v4(&r);
    assert!(
        !chain(nat, &svc_chain("SVC", "web"))
            .iter()
            .any(|rule| rule.contains("PPX-MARK-MASQ"))
    );
}

#[test]
fn endpoints_are_dnated_inline_and_hairpin_masquerade_is_one_shared_rule_per_local_address() {
    let r = rendered(spec(vec![
        svc(
            "web",
            "10.96.0.1",
            vec![ep("10.244.0.5", true), ep("10.244.1.5", false)],
        ),
        // The same local pod behind a second service adds no hairpin rule.
        svc("api", "10.96.0.2", vec![ep("10.244.0.5", true)]),
    ]));
    let (nat, _) = v4(&r);
    let rules = chain(nat, &svc_chain("SVC", "web"));
    assert!(
        rules[1].ends_with("-m tcp -p tcp -j DNAT --to-destination 10.244.0.5:8080"),
        "{}",
        rules[1]
    );
    assert!(
        rules[2].ends_with("-m tcp -p tcp -j DNAT --to-destination 10.244.1.5:8080"),
        "{}",
        rules[2]
    );
    assert_eq!(
        chain(nat, "PPX-HAIRPIN"),
        ["-s 10.244.0.5/32 -d 10.244.0.5/32 -j PPX-MARK-MASQ"]
    );
    assert!(
        chain(nat, "PPX-POSTROUTING")[0].contains("--ctstate DNAT -j PPX-HAIRPIN"),
        "hairpin marking must come before the mark check"
    );
    // No chain per endpoint, local or remote.
    assert!(!nat.chains.keys().any(|c| c.starts_with("PPX-SEP-")));
}

#[test]
fn endpoints_of_no_known_node_get_hairpin_masquerade_on_both_backends() {
    // A hand-written slice without nodeName: the endpoint may be this node's,
    // so a connection from it to its own service must be masqueraded here.
    let plan = spec(vec![svc(
        "db",
        "10.96.0.3",
        vec![
            mk_endpoint("192.0.2.50", 8080).node_unknown(),
            ep("10.244.1.5", false),
        ],
    )]);
    let r = rendered(plan.clone());
    let (nat, _) = v4(&r);
    assert_eq!(
        chain(nat, "PPX-HAIRPIN"),
        ["-s 192.0.2.50/32 -d 192.0.2.50/32 -j PPX-MARK-MASQ"],
        "only the endpoint of no known node; the remote one cannot hairpin here"
    );
    let nft = planproxy_render::nft::render_nft(&[plan], &[]).expect("renders");
    let hairpin: Vec<&String> = nft
        .rules
        .sets
        .iter()
        .filter(|(name, _)| name.starts_with("hairpin"))
        .flat_map(|(_, set)| set.elements.keys())
        .collect();
    assert_eq!(hairpin, ["192.0.2.50 . 192.0.2.50"]);
}

#[test]
fn endpoint_probabilities_follow_kube_proxy_series() {
    for (n, want) in [
        (1, "1.0000000000"),
        (2, "0.5000000000"),
        (10, "0.1000000000"),
        (1000, "0.0010000000"),
        (100_000, "0.0000100000"),
        (100_001, "0.0000099999"),
    ] {
        assert_eq!(probability(n), want);
    }
    let eps = ["10.244.1.2", "10.244.1.10", "10.244.1.3", "10.244.1.4"]
        .iter()
        .map(|ip| ep(ip, false))
        .collect();
    let r = rendered(spec(vec![svc("web", "10.96.0.1", eps)]));
    let (nat, _) = v4(&r);
    let rules = &chain(nat, &svc_chain("SVC", "web"))[1..];
    // Sorted as strings: 10.244.1.10 before 10.244.1.2.
    assert!(
        rules[0].contains("10.244.1.10:8080") && rules[0].contains("--probability 0.2500000000")
    );
    assert!(
        rules[1].contains("10.244.1.2:8080") && rules[1].contains("--probability 0.3333333333")
    );
    assert!(
        rules[2].contains("10.244.1.3:8080") && rules[2].contains("--probability 0.5000000000")
    );
    assert!(rules[3].contains("10.244.1.4:8080") && !rules[3].contains("statistic"));
}

#[test]
fn affinity_checks_precede_the_random_choice_and_refresh_on_every_connection() {
    let mut s = svc(
        "sticky",
        "10.96.0.1",
        vec![ep("10.244.1.5", false), ep("10.244.1.6", false)],
    );
    s.session_affinity = Some(ClientIpAffinity {
        timeout_seconds: 300,
    });
    let r = rendered(spec(vec![s]));
    let (nat, _) = v4(&r);
    let rules = &chain(nat, &svc_chain("SVC", "sticky"))[1..];
    for check in &rules[..2] {
        assert!(
            check.contains("--rcheck --seconds 300 --reap")
                && check.contains("--set")
                && check.contains("DNAT"),
            "{check}"
        );
    }
    for choice in &rules[2..] {
        assert!(
            choice.contains("--set") && !choice.contains("--rcheck"),
            "{choice}"
        );
    }
    // The check and the choice for one endpoint use the same list.
    let list = |rule: &str| {
        rule.split("--name ")
            .nth(1)
            .and_then(|s| s.split(' ').next())
            .map(str::to_owned)
    };
    assert_eq!(list(&rules[0]), list(&rules[2]));
}

#[test]
fn an_invalid_service_port_is_skipped_with_its_field_and_the_rest_is_rendered() {
    let mut bad = svc("bad", "10.96.0.999", vec![ep("10.244.1.5", false)]);
    bad.namespace = "ns1".into();
    let r = rendered(spec(vec![
        bad,
        svc("good", "10.96.0.2", vec![ep("10.244.1.5", false)]),
    ]));
    assert_eq!(r.skipped.len(), 1);
    let skipped = r.skipped[0].to_string();
    assert!(
        skipped.contains("ns1/bad") && skipped.contains("spec.servicePorts[0].clusterIPs[0]"),
        "{skipped}"
    );
    let (nat, _) = v4(&r);
    assert!(nat.chains.contains_key(&svc_chain("SVC", "good")));
}

#[test]
fn names_that_could_inject_rules_are_rejected() {
    for evil in [
        "web\" -j ACCEPT \"",
        "web\n-A INPUT -j ACCEPT",
        "Web",
        "-web",
        "",
    ] {
        let r = rendered(spec(vec![svc(
            evil,
            "10.96.0.1",
            vec![ep("10.244.1.5", false)],
        )]));
        assert_eq!(r.skipped.len(), 1, "{evil:?} was accepted");
        assert!(r.skipped[0].field.ends_with(".name"));
        assert!(
            !r.skipped[0].to_string().contains('\n'),
            "error messages stay on one line"
        );
    }
    let mut port = svc("web", "10.96.0.1", vec![]);
    port.port_name = "http\"x".into();
    assert_eq!(
        rendered(spec(vec![port])).skipped[0].field,
        "spec.servicePorts[0].portName"
    );
}

#[test]
fn an_incomplete_or_mixed_shard_set_is_refused() {
    let mut one = spec(vec![]);
    one.shard.count = 2;
    assert!(matches!(
        render(&[one.clone()], &RenderOptions::default()),
        Err(PlanError::IncompleteShards(_))
    ));
    let mut other = one.clone();
    other.shard.index = 1;
    other.shard.generation = 2;
    assert!(matches!(
        render(&[one.clone(), other.clone()], &RenderOptions::default()),
        Err(PlanError::IncompleteShards(_))
    ));
    other.shard.generation = 1;
    assert!(render(&[one, other], &RenderOptions::default()).is_ok());
    assert!(matches!(
        render::<ProxyPlanSpec>(&[], &RenderOptions::default()),
        Err(PlanError::NoShards)
    ));
}

#[test]
fn invalid_node_settings_are_refused_with_the_field() {
    let mut plan = spec(vec![]);
    plan.settings.masquerade_bit = 40;
    match render(&[plan], &RenderOptions::default()) {
        Err(PlanError::InvalidSettings { field, .. }) => {
            assert_eq!(field, "spec.settings.masqueradeBit")
        }
        other => panic!("{other:?}"),
    }
}

/// The rules sending node-port destinations to the node-port dispatch, on
/// both backends: iptables' nat PPX-SERVICES tail (with any RETURN before
/// it), and nftables' `services` rules that jump to `nodeports`, per family.
struct NodePortRules {
    iptables: Vec<String>,
    nft: Vec<String>,
}

/// A node-port service `ns1/np` without endpoints and one with, under
/// `localhost` and `addresses`; returns where node ports answer and where the
/// empty one refuses, per backend, for `family`.
fn node_port_rules(
    localhost: bool,
    addresses: &[&str],
    family: Family,
) -> (NodePortRules, NodePortRules, Vec<String>) {
    let mut plan = spec(vec![
        {
            let mut s = svc("np", "10.96.0.1", vec![ep("10.244.1.5", false)]);
            s.cluster_ips.push("fd00:96::1".into());
            s.cluster_endpoints = set(vec![ep("10.244.1.5", false), ep("fd00:244::5", false)]);
            s.node_port = Some(30080);
            s
        },
        {
            let mut s = svc("empty", "10.96.0.2", vec![]);
            s.cluster_ips.push("fd00:96::2".into());
            s.node_port = Some(30081);
            s
        },
    ]);
    plan.settings.localhost_node_ports = localhost;
    plan.settings.node_port_addresses = addresses.iter().map(|a| (*a).to_owned()).collect();
    let r = render(
        std::slice::from_ref(&plan),
        &RenderOptions {
            layout: Layout::Flat,
            families: vec![],
        },
    )
    .expect("renders");
    let f = &r.rule_set.families[&family];
    let ipt_nat = chain(&f.nat, "PPX-SERVICES");
    let ipt_answer: Vec<String> = ipt_nat
        .iter()
        .filter(|r| r.ends_with("-j PPX-NODEPORTS") || r.ends_with("-j RETURN"))
        .cloned()
        .collect();
    let ipt_refuse: Vec<String> = chain(&f.filter, "PPX-EXTERNAL-SERVICES")
        .iter()
        .filter(|r| r.contains("--dport 30081"))
        .cloned()
        .collect();
    let ipt_guard = chain(&f.filter, "PPX-LOCALNET-GUARD").to_vec();
    let nft = planproxy_render::nft::render_nft(&[plan], &[]).expect("renders");
    let (ip, nfproto) = match family {
        Family::V4 => ("ip ", "ipv4"),
        Family::V6 => ("ip6 ", "ipv6"),
    };
    let of_family = |r: &&String| r.contains(nfproto) || r.contains(&format!("{ip}daddr"));
    let nft_answer: Vec<String> = nft.rules.chains["services"]
        .rules
        .iter()
        .filter(|r| r.ends_with("jump nodeports"))
        .filter(of_family)
        .cloned()
        .collect();
    let nft_refuse: Vec<String> = nft.rules.chains["external-services"]
        .rules
        .iter()
        .filter(|r| r.contains("@refused-nodeports"))
        .filter(of_family)
        .cloned()
        .collect();
    let mut guards: Vec<String> = nft.rules.chains["filter-input"]
        .rules
        .iter()
        .filter(|r| r.ends_with(" drop"))
        .filter(of_family)
        .cloned()
        .collect();
    guards.extend(ipt_guard);
    (
        NodePortRules {
            iptables: ipt_answer,
            nft: nft_answer,
        },
        NodePortRules {
            iptables: ipt_refuse,
            nft: nft_refuse,
        },
        guards,
    )
}

#[test]
fn localhost_node_ports_answer_on_every_local_ipv4_address_with_the_guard() {
    let (answer, refuse, guards) = node_port_rules(true, &[], Family::V4);
    assert_eq!(
        answer.iptables,
        [
            "-m comment --comment \"planproxy service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j PPX-NODEPORTS"
        ]
    );
    assert_eq!(
        answer.nft,
        ["fib daddr type local meta nfproto ipv4 jump nodeports"]
    );
    assert!(
        refuse.iptables[0].contains("-m addrtype --dst-type LOCAL -m tcp")
            && refuse.nft[0].starts_with("fib daddr type local meta nfproto ipv4 meta l4proto"),
        "{:?}",
        (refuse.iptables, refuse.nft)
    );
    assert_eq!(
        guards,
        [
            "ip daddr 127.0.0.0/8 ip saddr != 127.0.0.0/8 ct state & (established | related) == 0 ct status & dnat == 0 drop",
            "-m comment --comment \"planproxy: block incoming localnet connections\" -d 127.0.0.0/8 ! -s 127.0.0.0/8 -m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP",
        ]
    );
}

#[test]
fn without_localhost_node_ports_loopback_is_no_node_port_destination_at_all() {
    let (answer, refuse, guards) = node_port_rules(false, &[], Family::V4);
    assert!(
        answer.iptables[0]
            .ends_with("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j PPX-NODEPORTS"),
        "{:?}",
        answer.iptables
    );
    assert_eq!(
        answer.nft,
        ["fib daddr type local meta nfproto ipv4 ip daddr != 127.0.0.0/8 jump nodeports"]
    );
    // A node port that does not answer on 127.0.0.1 does not refuse there
    // either (a Local-policy drop included): nothing of it is there.
    assert!(
        refuse.iptables[0].contains("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -m tcp"),
        "{:?}",
        refuse.iptables
    );
    assert!(
        refuse.nft[0].contains("ip daddr != 127.0.0.0/8 meta l4proto"),
        "{:?}",
        refuse.nft
    );
    assert!(guards.is_empty(), "{guards:?}");
}

#[test]
fn node_port_addresses_match_local_addresses_inside_them_not_the_plans_node_ips() {
    // 10.1.0.0/16 holds none of the plan's node IPs (192.168.1.10): a
    // secondary NIC's address there is still served, as the kernel sees it.
    // The CIDR does not reach loopback, so the controller resolves
    // localhostNodePorts to false.
    let (answer, refuse, guards) = node_port_rules(false, &["10.1.0.0/16"], Family::V4);
    assert_eq!(
        answer.iptables,
        [
            "-m comment --comment \"planproxy service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -d 10.1.0.0/16 -j PPX-NODEPORTS"
        ]
    );
    assert_eq!(
        answer.nft,
        ["fib daddr type local ip daddr 10.1.0.0/16 jump nodeports"]
    );
    // The CIDRs do not reach loopback, so neither answers nor refusals do.
    assert!(refuse.iptables[0].contains("! -d 127.0.0.0/8"));
    assert!(refuse.nft[0].contains("ip daddr != 127.0.0.0/8"));
    assert!(guards.is_empty(), "loopback is not served: {guards:?}");
}

#[test]
fn node_port_addresses_that_cover_loopback_serve_it_only_when_localhost_node_ports_are_on() {
    let (answer, _, guards) = node_port_rules(true, &["127.0.0.0/8", "10.1.0.0/16"], Family::V4);
    assert_eq!(
        answer.nft,
        [
            "fib daddr type local ip daddr 127.0.0.0/8 jump nodeports",
            "fib daddr type local ip daddr 10.1.0.0/16 jump nodeports"
        ]
    );
    assert_eq!(answer.iptables.len(), 2);
    assert_eq!(guards.len(), 2, "both backends guard: {guards:?}");

    let (answer, refuse, guards) =
        node_port_rules(false, &["127.0.0.0/8", "10.1.0.0/16"], Family::V4);
    assert_eq!(
        answer.nft,
        ["fib daddr type local ip daddr 10.1.0.0/16 jump nodeports"],
        "a CIDR inside loopback names nothing then"
    );
    assert_eq!(answer.iptables.len(), 1);
    assert!(refuse.nft[0].contains("ip daddr != 127.0.0.0/8"));
    assert!(guards.is_empty());

    // A CIDR around loopback keeps its other addresses.
    let (answer, _, _) = node_port_rules(false, &["64.0.0.0/2"], Family::V4);
    assert_eq!(
        answer.nft,
        ["fib daddr type local ip daddr 64.0.0.0/2 ip daddr != 127.0.0.0/8 jump nodeports"]
    );
    assert!(
        answer.iptables[0].ends_with("-d 127.0.0.0/8 -j RETURN")
            && answer.iptables[1]
                .ends_with("-m addrtype --dst-type LOCAL -d 64.0.0.0/2 -j PPX-NODEPORTS"),
        "{:?}",
        answer.iptables
    );
}

#[test]
fn ipv6_node_ports_never_answer_on_loopback() {
    for (localhost, addresses) in [
        (true, &[][..]),
        (false, &[]),
        (true, &["::/96"]),
        (true, &["0.0.0.0/0"]),
    ] {
        let (answer, refuse, guards) = node_port_rules(localhost, addresses, Family::V6);
        let case = format!("{localhost} {addresses:?}");
        for rule in answer.nft.iter().chain(&refuse.nft).chain(&refuse.iptables) {
            assert!(
                rule.contains("!= ::1/128") || rule.contains("! -d ::1/128"),
                "{case}: {rule}"
            );
        }
        // iptables takes one `-d`: loopback returns before CIDRs around it.
        let returns_first = answer.iptables[0].ends_with("-d ::1/128 -j RETURN");
        for rule in &answer.iptables {
            assert!(
                returns_first || rule.contains("! -d ::1/128"),
                "{case}: {rule}"
            );
        }
        assert!(!answer.nft.is_empty() && !refuse.nft.is_empty());
        assert!(guards.is_empty(), "{guards:?}");
    }
}

#[test]
fn source_ranges_that_contain_the_node_also_admit_the_vip_as_source() {
    let mut s = svc("lb", "10.96.0.1", vec![ep("10.244.1.5", false)]);
    s.load_balancer_ips = vec!["203.0.113.7".into()];
    s.load_balancer_source_ranges = vec!["192.168.1.0/24".into()];
    let r = rendered(spec(vec![s]));
    let (nat, filter) = v4(&r);
    let fw = chain(nat, &svc_chain("FW", "lb"));
    assert!(fw[0].contains("-s 192.168.1.0/24 -j PPX-EXT-"));
    assert!(fw[1].contains("-s 203.0.113.7/32 -j PPX-EXT-"));
    assert!(
        !fw[2].contains("-j "),
        "the last rule only documents the drop"
    );
    assert!(
        chain(filter, "PPX-PROXY-FIREWALL")
            .iter()
            .any(|r| r.contains("-d 203.0.113.7/32 --dport 80 -j DROP"))
    );
}

#[test]
fn a_load_balancer_without_endpoints_has_no_firewall_and_refuses_every_source() {
    // As kube-proxy: the source ranges filter only a service that has
    // endpoints; without them a client the ranges admit hears "refused" at
    // once rather than waiting for a dropped SYN to time out.
    let mut s = svc("lb", "10.96.0.1", vec![]);
    s.load_balancer_ips = vec!["203.0.113.7".into()];
    s.load_balancer_source_ranges = vec!["192.168.1.0/24".into()];
    let r = rendered(spec(vec![s]));
    let (nat, filter) = v4(&r);
    assert!(!nat.chains.contains_key(&svc_chain("FW", "lb")));
    assert!(
        !chain(filter, "PPX-PROXY-FIREWALL")
            .iter()
            .any(|r| r.contains("203.0.113.7")),
        "no firewall drop for the load balancer"
    );
    assert!(
        chain(filter, "PPX-EXTERNAL-SERVICES")
            .iter()
            .any(|r| r.contains("-d 203.0.113.7/32 --dport 80 -j REJECT")),
        "the no-endpoints action answers every source"
    );
    let nft = planproxy_render::nft::render_nft(
        &[spec(vec![{
            let mut s = svc("lb", "10.96.0.1", vec![]);
            s.load_balancer_ips = vec!["203.0.113.7".into()];
            s.load_balancer_source_ranges = vec!["192.168.1.0/24".into()];
            s
        }])],
        &[Family::V4],
    )
    .expect("renders");
    assert!(nft.rules.sets["firewall4"].elements.is_empty());
    assert_eq!(
        nft.rules.sets["refused-external4"].elements["203.0.113.7 . tcp . 80"],
        "goto refuse"
    );
}

#[test]
fn a_service_of_the_other_family_is_not_rendered() {
    let s = svc("v6only", "fd00:96::1", vec![ep("fd00:244::5", false)]);
    let r = rendered(spec(vec![s]));
    let (nat4, _) = v4(&r);
    assert!(!nat4.chains.contains_key(&svc_chain("SVC", "v6only")));
    let nat6 = &r.rule_set.families[&Family::V6].nat;
    assert!(
        chain(nat6, &svc_chain("SVC", "v6only"))
            .iter()
            .any(|r| r.contains("--to-destination [fd00:244::5]:8080"))
    );
}

#[test]
fn per_shard_summaries_count_what_each_shard_programs() {
    let mut a = spec(vec![svc(
        "a",
        "10.96.0.1",
        vec![ep("10.244.1.5", false), ep("10.244.1.6", false)],
    )]);
    a.shard.count = 2;
    let mut b = spec(vec![
        svc("b", "10.96.0.2", vec![]),
        svc("c", "10.96.0.3", vec![ep("10.244.1.5", true)]),
    ]);
    b.shard = ShardInfo {
        index: 1,
        count: 2,
        generation: 1,
    };
    let (a_flat, b_flat) = (a.clone(), b.clone());
    let r = render(&[a, b], &RenderOptions::default()).expect("renders");
    assert_eq!(
        r.per_shard[&0],
        // Masquerade + 2 endpoint rules, inlined into the dispatch (tree layout).
        ProgrammedSummary {
            service_ports: 1,
            endpoints: 2,
            rules: 3,
            chains: 0
        }
    );
    // b: 1 REJECT; c (a local endpoint keeps its chain even in the tree
    // layout): dispatch rule, masquerade, DNAT. Its hairpin rule is node-wide.
    assert_eq!(
        r.per_shard[&1],
        ProgrammedSummary {
            service_ports: 2,
            endpoints: 1,
            rules: 4,
            chains: 1
        }
    );
    // The flat layout gives c the same.
    let flat = render(
        &[a_flat, b_flat],
        &RenderOptions {
            layout: Layout::Flat,
            families: vec![],
        },
    )
    .expect("renders");
    assert_eq!(flat.per_shard[&1].rules, 4);
    assert_eq!(flat.per_shard[&1].chains, 1);
}

#[test]
fn tree_layout_inlines_cluster_ip_only_services_into_the_dispatch() {
    let mut exposed = svc("exposed", "10.96.0.2", vec![ep("10.244.1.5", false)]);
    exposed.node_port = Some(30002);
    let plan = spec(vec![
        svc(
            "internal",
            "10.96.0.1",
            vec![ep("10.244.1.4", false), ep("10.244.1.5", false)],
        ),
        svc("with-local", "10.96.0.3", vec![ep("10.244.0.5", true)]),
        exposed,
    ]);
    let r = render(&[plan], &RenderOptions::default()).expect("renders");
    let (nat, _) = v4(&r);
    assert!(!nat.chains.contains_key(&svc_chain("SVC", "internal")));
    assert!(
        nat.chains.contains_key(&svc_chain("SVC", "exposed")),
        "a chain other frontends jump to stays"
    );
    assert!(
        nat.chains.contains_key(&svc_chain("SVC", "with-local")),
        "a service with local endpoints keeps its chain"
    );
    let inlined: Vec<_> = chain(nat, "PPX-SERVICES")
        .iter()
        .filter(|r| r.contains("ns1/internal"))
        .collect();
    // Masquerade and one DNAT per endpoint, each matching the frontend itself.
    assert_eq!(inlined.len(), 3, "{inlined:?}");
    assert!(
        inlined
            .iter()
            .all(|r| r.contains("-m tcp -p tcp -d 10.96.0.1/32 --dport 80"))
    );
    assert!(
        inlined[1].contains("--probability 0.5000000000 -j DNAT --to-destination 10.244.1.4:8080")
    );
    assert!(
        inlined[2].ends_with("-j DNAT --to-destination 10.244.1.5:8080")
            && inlined[2].matches("-p tcp").count() == 1
    );
}
