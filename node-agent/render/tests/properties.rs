//! Properties of rendering over arbitrary plans, including hostile ones.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::testing::{NodeSettingsExt, mk_plan, mk_settings};
use planproxy_crds::v1alpha1::{
    ClientIpAffinity, EndpointPlan, EndpointSelection, EndpointSet, LocalTrafficDetectorMode,
    NoEndpointsAction, Protocol, ResolvedLocalTrafficDetector, ServicePortPlan, TrafficPolicy,
};
use planproxy_render::nft::{self, NftRuleSet};
use planproxy_render::restore::{apply, contents};
use planproxy_render::{
    Layout, RenderOptions, RuleSet, Table, render, restore_full, restore_incremental,
};
use proptest::prelude::*;

/// Text that must never reach a rule: every hostile string carries it.
const MARKER: &str = "EVIL";

fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => prop::sample::select(vec!["web", "db", "dns", "api-gw", "a1", "cache"]).prop_map(str::to_owned),
        1 => prop::sample::select(vec![
            "EVIL\" -j ACCEPT",
            "EVIL\n-A INPUT -j ACCEPT",
            "EVIL name",
            "-EVIL",
            "EVIL",
        ])
        .prop_map(str::to_owned),
    ]
}

fn ip(v6: bool) -> impl Strategy<Value = String> {
    prop_oneof![
        8 => (0u8..4, 1u8..6).prop_map(move |(a, b)| if v6 { format!("fd00:96::{a}:{b}") } else { format!("10.96.{a}.{b}") }),
        1 => Just("EVIL-1.2.3.4 -j ACCEPT".to_owned()),
    ]
}

fn endpoint() -> impl Strategy<Value = EndpointPlan> {
    (
        any::<bool>(),
        1u8..5,
        prop_oneof![Just(8080u16), Just(9090u16), Just(0u16)],
        any::<bool>(),
    )
        .prop_map(|(v6, host, port, local)| EndpointPlan {
            ip: if v6 {
                format!("fd00:244::{host}")
            } else {
                format!("10.244.0.{host}")
            },
            port,
            local,
            node_unknown: false,
            ready: true,
            serving: true,
            terminating: false,
        })
}

fn endpoint_set() -> impl Strategy<Value = Option<EndpointSet>> {
    prop::option::of(
        prop::collection::vec(endpoint(), 0..4).prop_map(|endpoints| EndpointSet {
            selection: EndpointSelection::Ready,
            endpoints,
        }),
    )
}

fn policy() -> impl Strategy<Value = TrafficPolicy> {
    prop_oneof![Just(TrafficPolicy::Cluster), Just(TrafficPolicy::Local)]
}

fn service_port() -> impl Strategy<Value = ServicePortPlan> {
    (
        (
            name(),
            name(),
            prop::option::of(name()),
            prop_oneof![
                Just(Protocol::Tcp),
                Just(Protocol::Udp),
                Just(Protocol::Sctp)
            ],
        ),
        (
            prop::collection::vec(any::<bool>().prop_flat_map(ip), 1..3),
            prop_oneof![Just(80u16), Just(53u16), Just(0u16)],
        ),
        (
            prop::option::of(30000u16..30003),
            prop::collection::vec(any::<bool>().prop_flat_map(ip), 0..2),
            prop::collection::vec(any::<bool>().prop_flat_map(ip), 0..2),
        ),
        prop::collection::vec(
            prop_oneof![
                Just("203.0.113.0/24".to_owned()),
                Just("fd00:1::/64".to_owned()),
                Just("EVIL/8".to_owned())
            ],
            0..2,
        ),
        (
            prop::option::of(prop_oneof![Just(10800u32), Just(0u32)]),
            policy(),
            policy(),
            prop::option::of(Just(31000u16)),
        ),
        (
            any::<bool>(),
            prop_oneof![
                Just(NoEndpointsAction::Reject),
                Just(NoEndpointsAction::Drop)
            ],
            any::<bool>(),
            endpoint_set(),
            endpoint_set(),
        ),
    )
        .prop_map(
            |(
                (namespace, name, port_name, protocol),
                (cluster_ips, port),
                (node_port, external_ips, load_balancer_ips),
                load_balancer_source_ranges,
                (
                    affinity,
                    external_traffic_policy,
                    internal_traffic_policy,
                    health_check_node_port,
                ),
                (
                    masquerade_all,
                    no_endpoints_action,
                    has_endpoints,
                    cluster_endpoints,
                    local_endpoints,
                ),
            )| ServicePortPlan {
                namespace,
                name,
                port_name: port_name.unwrap_or_default(),
                protocol,
                cluster_ips,
                port,
                node_port,
                external_ips,
                load_balancer_ips,
                load_balancer_source_ranges,
                session_affinity: affinity
                    .map(|timeout_seconds| ClientIpAffinity { timeout_seconds }),
                external_traffic_policy,
                internal_traffic_policy,
                health_check_node_port,
                masquerade_all,
                no_endpoints_action,
                has_endpoints,
                cluster_endpoints,
                local_endpoints,
                last_change_trigger_time: None,
            },
        )
}

fn plan() -> impl Strategy<Value = ProxyPlanSpec> {
    (prop::collection::vec(service_port(), 0..8), any::<bool>()).prop_map(
        |(service_ports, detector)| {
            let mut settings =
                mk_settings(&["10.244.0.0/16", "fd00:244::/48"]).with_node_ips(&["203.0.113.5"]);
            if !detector {
                settings.local_traffic_detector = ResolvedLocalTrafficDetector {
                    mode: LocalTrafficDetectorMode::None,
                    cidrs: vec![],
                };
            }
            mk_plan("node-a", settings, service_ports)
        },
    )
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![Just(Layout::Tree), Just(Layout::Flat)]
}

fn rules_of(spec: &ProxyPlanSpec, layout: Layout) -> RuleSet {
    render(
        std::slice::from_ref(spec),
        &RenderOptions {
            layout,
            families: vec![],
        },
    )
    .expect("a single complete shard must render")
    .rule_set
}

const WORDS: &[&str] = &[
    "tcp",
    "udp",
    "sctp",
    "random",
    "LOCAL",
    "NEW",
    "INVALID",
    "RELATED,ESTABLISHED",
    "DNAT",
    "MARK",
    "MASQUERADE",
    "RETURN",
    "REJECT",
    "DROP",
    "ACCEPT",
    "comment",
    "statistic",
    "recent",
    "addrtype",
    "conntrack",
    "mark",
    "!",
];

/// A token outside a quoted comment is an option, a fixed word, a chain name, a
/// number, or something that parses as an address, CIDR or socket address.
fn token_ok(token: &str) -> bool {
    token.starts_with("--")
        && token[2..]
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b == b'-')
        || (token.len() == 2 && token.starts_with('-'))
        || WORDS.contains(&token)
        || (token.starts_with("PPX-")
            && token.len() <= 28
            && token[4..]
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-'))
        || token.parse::<f64>().is_ok()
        || token.split('/').all(|m| {
            m.strip_prefix("0x")
                .is_some_and(|h| u32::from_str_radix(h, 16).is_ok())
        })
        || token
            .split('/')
            .next()
            .is_some_and(|a| a.parse::<std::net::IpAddr>().is_ok())
            && token.parse::<ipnet::IpNet>().is_ok()
        || token.parse::<std::net::SocketAddr>().is_ok()
}

fn comment_ok(comment: &str) -> bool {
    comment
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b" /:.->[];,".contains(&b))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn rule_lines_carry_only_validated_plan_text(spec in plan(), layout in layout()) {
        let rules = rules_of(&spec, layout);
        for family in rules.families.values() {
            for table in Table::ALL {
                let t = family.table(table);
                let jumps = t.jumps.iter().map(|j| &j.spec);
                for rule in t.chains.values().flat_map(|c| c.rules.iter()).chain(jumps) {
                    prop_assert!(!rule.contains(MARKER), "plan text reached a rule: {rule}");
                    prop_assert!(!rule.contains('\n'));
                    let parts: Vec<&str> = rule.split('"').collect();
                    prop_assert!(parts.len() == 1 || parts.len() == 3, "unbalanced quotes: {rule}");
                    if parts.len() == 3 {
                        prop_assert!(parts[0].ends_with("--comment "), "{rule}");
                        prop_assert!(comment_ok(parts[1]), "comment {:?}", parts[1]);
                    }
                    for (i, part) in parts.iter().enumerate().filter(|(i, _)| i % 2 == 0) {
                        let _ = i;
                        for token in part.split_whitespace() {
                            prop_assert!(token_ok(token), "token {token:?} in {rule}");
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn chain_names_are_ours_and_fit_iptables(spec in plan(), layout in layout()) {
        let rules = rules_of(&spec, layout);
        for family in rules.families.values() {
            for table in Table::ALL {
                for name in family.table(table).chains.keys() {
                    prop_assert!(name.starts_with("PPX-") && name.len() <= 28, "{name}");
                }
            }
        }
    }

    #[test]
    fn incremental_restore_reaches_the_same_chains_as_a_full_restore(a in plan(), b in plan(), layout in layout()) {
        let (ra, rb) = (rules_of(&a, layout), rules_of(&b, layout));
        for (family, next) in &rb.families {
            let Some(prev) = ra.families.get(family) else { continue };
            for table in Table::ALL {
                let mut kernel = Default::default();
                apply(&mut kernel, &restore_full(table, prev.table(table), &[]).text)
                    .map_err(|e| TestCaseError::fail(format!("full A: {e:?}")))?;
                let mut via_full = kernel.clone();
                let stale: Vec<String> = kernel.keys().cloned().collect();

                apply(&mut kernel, &restore_incremental(table, prev.table(table), next.table(table)).text)
                    .map_err(|e| TestCaseError::fail(format!("incremental A→B: {e:?}")))?;
                prop_assert_eq!(&kernel, &contents(next.table(table)));

                apply(&mut via_full, &restore_full(table, next.table(table), &stale).text)
                    .map_err(|e| TestCaseError::fail(format!("full B over A: {e:?}")))?;
                prop_assert_eq!(&via_full, &kernel);
            }
        }
    }

    #[test]
    fn rendering_is_deterministic_and_the_tree_only_drops_inlined_policy_chains(spec in plan()) {
        let tree = rules_of(&spec, Layout::Tree);
        prop_assert_eq!(&tree, &rules_of(&spec, Layout::Tree));
        let flat = rules_of(&spec, Layout::Flat);
        for (family, t) in &tree.families {
            let f = &flat.families[family];
            for table in Table::ALL {
                let service_chains = |r: &planproxy_render::TableRules| -> BTreeSet<(String, Vec<String>)> {
                    r.chains.iter().filter(|(n, _)| !n.starts_with("PPX-DST-") && n.as_str() != "PPX-SERVICES" && n.as_str() != "PPX-EXTERNAL-SERVICES")
                        .map(|(n, c)| (n.clone(), c.rules.clone())).collect()
                };
                let (in_tree, in_flat) = (service_chains(t.table(table)), service_chains(f.table(table)));
                prop_assert!(in_tree.is_subset(&in_flat), "the tree has chains the flat layout lacks");
                for (name, _) in in_flat.difference(&in_tree) {
                    prop_assert!(name.starts_with("PPX-SVC-") || name.starts_with("PPX-SVL-"), "{name} only in the flat layout");
                }
            }
        }
    }
}

/// The table an `nft -f` transaction of ours leaves, modelled: chains with
/// their rules, sets with their elements. Refuses what the kernel refuses for
/// our vocabulary (missing objects, duplicate elements, deleting what is
/// still referenced).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct NftModel {
    chains: BTreeMap<String, Vec<String>>,
    sets: BTreeMap<String, BTreeMap<String, String>>,
}

fn nft_apply(state: &mut NftModel, text: &str) -> Result<(), String> {
    let mut next = state.clone();
    let prefix = format!(" inet {} ", nft::TABLE);
    for line in text.lines() {
        let whole = format!("{line} ");
        let (verb, rest) = whole.split_once(&prefix).unwrap_or((line, ""));
        let rest = rest.trim_end();
        let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
        let items = || -> Vec<String> {
            tail.trim_start_matches("{ ")
                .trim_end_matches(" }")
                .split(", ")
                .map(str::to_owned)
                .collect()
        };
        match verb {
            "add table" => {}
            "delete table" => next = NftModel::default(),
            "add chain" => {
                next.chains.entry(name.to_owned()).or_default();
            }
            "add set" | "add map" => {
                next.sets.entry(name.to_owned()).or_default();
            }
            "add element" => {
                let set = next.sets.get_mut(name).ok_or(format!("no set {name}"))?;
                for item in items() {
                    let (k, v) = item.split_once(" : ").unwrap_or((&item, ""));
                    if set.get(k).is_some_and(|old| old != v) {
                        return Err(format!("{line}: element {k} exists"));
                    }
                    set.insert(k.to_owned(), v.to_owned());
                }
            }
            "delete element" => {
                let set = next.sets.get_mut(name).ok_or(format!("no set {name}"))?;
                for k in items() {
                    set.remove(&k).ok_or(format!("{line}: no element {k}"))?;
                }
            }
            "add rule" => next
                .chains
                .get_mut(name)
                .ok_or(format!("{line}: no chain {name}"))?
                .push(tail.to_owned()),
            "flush chain" => next
                .chains
                .get_mut(name)
                .ok_or(format!("{line}: no chain {name}"))?
                .clear(),
            "delete chain" => {
                let rules = next.chains.remove(name).ok_or(format!("no chain {name}"))?;
                let target = |s: &str| {
                    s.ends_with(&format!("goto {name}"))
                        || s.ends_with(&format!("jump {name}"))
                        || s.contains(&format!("goto {name} "))
                        || s.contains(&format!("jump {name} "))
                };
                let used = next.chains.values().flatten().any(|r| target(r))
                    || next
                        .sets
                        .values()
                        .flat_map(|s| s.values())
                        .any(|v| target(v));
                if !rules.is_empty() || used {
                    return Err(format!("{line}: chain in use"));
                }
            }
            "delete set" => {
                next.sets.remove(name).ok_or(format!("no set {name}"))?;
                if next
                    .chains
                    .values()
                    .flatten()
                    .any(|r| r.contains(&format!("@{name} ")) || r.ends_with(&format!("@{name}")))
                {
                    return Err(format!("{line}: set in use"));
                }
            }
            other => return Err(format!("unexpected statement {other:?} in {line}")),
        }
    }
    *state = next;
    Ok(())
}

fn nft_expected(rules: &NftRuleSet) -> NftModel {
    NftModel {
        chains: rules
            .chains
            .iter()
            .map(|(n, c)| (n.clone(), c.rules.clone()))
            .collect(),
        sets: rules
            .sets
            .iter()
            .map(|(n, s)| {
                (
                    n.clone(),
                    if s.dynamic {
                        BTreeMap::new()
                    } else {
                        s.elements.clone()
                    },
                )
            })
            .collect(),
    }
}

fn nft_of(spec: &ProxyPlanSpec) -> NftRuleSet {
    nft::render_nft(std::slice::from_ref(spec), &[])
        .expect("a single complete shard must render")
        .rules
}

const NFT_WORDS: &[&str] = &[
    "add",
    "delete",
    "flush",
    "table",
    "chain",
    "set",
    "map",
    "element",
    "rule",
    "inet",
    "type",
    "typeof",
    "hook",
    "priority",
    "policy",
    "accept",
    "drop",
    "reject",
    "return",
    "jump",
    "goto",
    "nat",
    "filter",
    "prerouting",
    "output",
    "postrouting",
    "input",
    "forward",
    "dstnat",
    "srcnat",
    "ip",
    "ip6",
    "saddr",
    "daddr",
    "meta",
    "l4proto",
    "nfproto",
    "ipv4",
    "ipv6",
    "th",
    "dport",
    "tcp",
    "udp",
    "sctp",
    "mark",
    "ct",
    "state",
    "status",
    "new",
    "invalid",
    "related,established",
    "dnat",
    "masquerade",
    "fully-random",
    "numgen",
    "random",
    "mod",
    "to",
    "vmap",
    "fib",
    "local",
    "update",
    "flags",
    "counter",
    "dynamic,timeout",
    "timeout",
    "elements",
    "verdict",
    "ipv4_addr",
    "ipv6_addr",
    "inet_proto",
    "inet_service",
    "{",
    "}",
    ".",
    ":",
    "!=",
    "==",
    "&",
    "|",
    "^",
    ";",
    "-100",
    "planproxy",
    "services",
    "nodeports",
    "firewall",
    "refuse",
    "forward",
    "masquerading",
    "refused",
    "hairpin",
];

/// A token of the nft text is a fixed word, one of our object names (fixed
/// lowercase words and base32 hashes), `@name`, a number or a parsed address.
fn nft_token_ok(token: &str) -> bool {
    let token = token.trim_end_matches([';', ',']);
    let name_ok = |n: &str| {
        !n.is_empty()
            && n.bytes().all(|b| {
                b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b.is_ascii_uppercase()
            })
    };
    token.is_empty()
        || NFT_WORDS.contains(&token)
        || NFT_WORDS.contains(&token.trim_end_matches(['4', '6']))
        || token.strip_prefix('@').is_some_and(name_ok)
        || name_ok(token) && token.contains('-')
        || token.parse::<u64>().is_ok()
        || token
            .strip_prefix("0x")
            .is_some_and(|h| u32::from_str_radix(h, 16).is_ok())
        || token
            .strip_suffix('s')
            .is_some_and(|n| n.parse::<u32>().is_ok())
        || token.parse::<std::net::IpAddr>().is_ok()
        || token.parse::<ipnet::IpNet>().is_ok()
        || token.parse::<std::net::SocketAddr>().is_ok()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn nft_text_carries_only_fixed_words_names_and_parsed_values(spec in plan()) {
        let text = nft::full_text(&nft_of(&spec));
        prop_assert!(!text.contains(MARKER), "plan text reached the ruleset");
        for line in text.lines() {
            for token in line.split_whitespace() {
                prop_assert!(nft_token_ok(token), "token {token:?} in {line}");
            }
        }
    }

    #[test]
    fn nft_rendering_is_deterministic(spec in plan()) {
        prop_assert_eq!(nft_of(&spec), nft_of(&spec));
    }

    #[test]
    fn nft_incremental_reaches_the_same_table_as_a_full_sync(a in plan(), b in plan()) {
        let (ra, rb) = (nft_of(&a), nft_of(&b));
        let mut kernel = NftModel::default();
        nft_apply(&mut kernel, &nft::full_text(&ra)).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&kernel, &nft_expected(&ra));
        let text = match nft::incremental_text(&ra, &rb) {
            Some(delta) => delta.text,
            None => nft::full_text(&rb),
        };
        nft_apply(&mut kernel, &text).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&kernel, &nft_expected(&rb));
        let mut full = NftModel::default();
        nft_apply(&mut full, &nft::full_text(&rb)).map_err(TestCaseError::fail)?;
        prop_assert_eq!(&full, &kernel);
    }

    #[test]
    fn nft_program_fed_a_then_b_holds_what_b_alone_gives(a in plan(), b in plan(), same_node in any::<bool>()) {
        // Plans of the same node differ in their service ports only, and (but
        // for a redeclared affinity set) take the incremental path; plans with
        // other node settings rebuild.
        let mut b = b;
        if same_node {
            b.node_name = a.node_name.clone();
            b.shard = a.shard.clone();
            b.settings = a.settings.clone();
        }
        let mut program = nft::NftProgram::new(&[]);
        program.update(&[Arc::new(a.clone())]).expect("a renders");
        let mut kernel = NftModel::default();
        nft_apply(&mut kernel, &program.table().full_text()).map_err(TestCaseError::fail)?;
        let text = match program.update(&[Arc::new(b.clone())]).expect("b renders") {
            nft::NftChange::Delta(delta) => delta.text,
            nft::NftChange::Rebuild => program.table().full_text(),
        };
        nft_apply(&mut kernel, &text).map_err(TestCaseError::fail)?;
        let alone = nft::render_nft(std::slice::from_ref(&b), &[]).expect("b renders");
        prop_assert_eq!(&kernel, &nft_expected(&alone.rules));
        prop_assert_eq!(&program.table().rule_set(), &alone.rules);
        prop_assert_eq!(program.per_shard(), alone.per_shard);
        let sorted = |mut v: Vec<planproxy_render::InvalidServicePort>| {
            v.sort_by(|x, y| (x.shard, &x.field, &x.service_port).cmp(&(y.shard, &y.field, &y.service_port)));
            v
        };
        prop_assert_eq!(sorted(program.skipped()), sorted(alone.skipped));
    }

    #[test]
    fn nft_program_skipping_unchanged_shards_holds_what_reading_them_gives(
        a in plan(),
        b in plan(),
        kept in any::<[bool; 4]>(),
    ) {
        // Four shards of one node; the second plan keeps some of the first's
        // shard objects as they are and replaces the others.
        let split = |spec: &ProxyPlanSpec| -> Vec<Arc<ProxyPlanSpec>> {
            (0..4u32)
                .map(|index| {
                    let mut shard = a.clone();
                    shard.shard.index = index;
                    shard.shard.count = 4;
                    shard.service_ports = spec
                        .service_ports
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| *i % 4 == index as usize)
                        .map(|(_, p)| p.clone())
                        .collect();
                    Arc::new(shard)
                })
                .collect()
        };
        let first = split(&a);
        let replacement = split(&b);
        let second: Vec<Arc<ProxyPlanSpec>> = (0..4)
            .map(|i| if kept[i] { first[i].clone() } else { replacement[i].clone() })
            .collect();
        let mut program = nft::NftProgram::new(&[]);
        program.update(&first).expect("the first plan renders");
        program.update(&second).expect("the second plan renders");
        let plain: Vec<ProxyPlanSpec> = second.iter().map(|s| (**s).clone()).collect();
        let alone = nft::render_nft(&plain, &[]).expect("the second plan renders");
        prop_assert_eq!(&program.table().rule_set(), &alone.rules);
        prop_assert_eq!(program.per_shard(), alone.per_shard);
        prop_assert_eq!(program.skipped().len(), alone.skipped.len());
    }

    #[test]
    fn every_element_of_every_plan_encodes_for_netlink(spec in plan()) {
        // A fresh table's elements go over netlink; nothing we render may fall
        // outside what the encoder knows.
        let mut program = nft::NftProgram::new(&[]);
        program.update(&[Arc::new(spec)]).expect("renders");
        let table = program.table();
        let batch = nft::netlink::element_batch(table, |_| true, 1);
        prop_assert!(batch.is_ok(), "{batch:?}");
        let elements: usize = table.sets().filter(|(_, d, _)| !d.dynamic).map(|(_, _, n)| n).sum();
        prop_assert_eq!(batch.expect("checked").is_some(), elements > 0);
    }

    #[test]
    fn nft_and_iptables_count_the_same_ports_and_endpoints_per_shard(spec in plan()) {
        // Both emitters count the same service ports and endpoints per shard.
        let nft = nft::render_nft(std::slice::from_ref(&spec), &[]).expect("renders");
        let ipt = planproxy_render::render(std::slice::from_ref(&spec), &Default::default()).expect("renders");
        let ports = |m: &std::collections::BTreeMap<u32, planproxy_crds::v1alpha1::ProgrammedSummary>| -> Vec<(u32, i32, i32)> {
            m.iter().map(|(s, p)| (*s, p.service_ports, p.endpoints)).collect()
        };
        prop_assert_eq!(ports(&nft.per_shard), ports(&ipt.per_shard));
    }
}
