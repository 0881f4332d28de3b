//! Properties over generated clusters.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use planproxy_crds::v1alpha1::{EndpointSelection, NoEndpointsAction};
use planproxy_crds::{ProxyPolicy, ProxyPolicySpec};
use proptest::prelude::*;

use super::builders::*;
use crate::ingest::ObjectKey;
use crate::shard::{service_hash, shard_index};
use crate::{Index, Resolution, ResolveOptions, Snapshot, resolve};

#[derive(Clone, Debug)]
struct GenEndpoint {
    ip: u8,
    node: u8,
    ready: bool,
    serving: bool,
    terminating: bool,
    zone_hint: Option<u8>,
    node_hint: Option<u8>,
}

#[derive(Clone, Debug)]
struct GenService {
    kind: u8,
    etp_local: bool,
    itp_local: bool,
    affinity: bool,
    label: u8,
    slices: Vec<Vec<GenEndpoint>>,
}

#[derive(Clone, Debug)]
struct GenPolicy {
    priority: i32,
    proxy_services: Option<bool>,
    drop: Option<bool>,
    topology: Option<bool>,
    service_label: Option<u8>,
    node_label: Option<u8>,
}

#[derive(Clone, Debug)]
struct GenCluster {
    nodes: u8,
    services: Vec<Option<GenService>>,
    policies: Vec<Option<GenPolicy>>,
}

const ZONES: [&str; 2] = ["a", "b"];

fn endpoint() -> impl Strategy<Value = GenEndpoint> {
    (
        1u8..6,
        0u8..4,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        prop::option::of(0u8..2),
        prop::option::of(0u8..3),
    )
        .prop_map(
            |(ip, node, ready, serving, terminating, zone_hint, node_hint)| GenEndpoint {
                ip,
                node,
                ready,
                serving,
                terminating,
                zone_hint,
                node_hint,
            },
        )
}

fn service() -> impl Strategy<Value = GenService> {
    (
        0u8..3,
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u8..2,
        prop::collection::vec(prop::collection::vec(endpoint(), 0..4), 0..3),
    )
        .prop_map(
            |(kind, etp_local, itp_local, affinity, label, slices)| GenService {
                kind,
                etp_local,
                itp_local,
                affinity,
                label,
                slices,
            },
        )
}

fn policy() -> impl Strategy<Value = GenPolicy> {
    (
        -2i32..3,
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(any::<bool>()),
        prop::option::of(0u8..2),
        prop::option::of(0u8..2),
    )
        .prop_map(
            |(priority, proxy_services, drop, topology, service_label, node_label)| GenPolicy {
                priority,
                proxy_services,
                drop,
                topology,
                service_label,
                node_label,
            },
        )
}

fn cluster() -> impl Strategy<Value = GenCluster> {
    (
        1u8..4,
        prop::collection::vec(prop::option::of(service()), 0..7),
        prop::collection::vec(prop::option::of(policy()), 0..3),
    )
        .prop_map(|(nodes, services, policies)| GenCluster {
            nodes,
            services,
            policies,
        })
}

/// Node names that collide when split naively: `node` with two shards would own
/// `node-1`, and `node-1` with two would own `node-1-0`.
const NODE_NAMES: [&str; 4] = ["node", "node-1", "node-1-0", "node-0"];

fn node_name(n: u8) -> String {
    NODE_NAMES[n as usize].to_owned()
}

fn build_service(
    i: usize,
    g: &GenService,
) -> (Service, Vec<k8s_openapi::api::discovery::v1::EndpointSlice>) {
    let name = format!("svc-{i}");
    let mut svc = mk_service(
        "default",
        &name,
        &format!("10.96.0.{}", i + 1),
        &[("http", 80)],
    );
    svc.metadata.labels = Some(labels(&[("tier", &g.label.to_string())]));
    let s = spec(&mut svc);
    s.type_ = Some(["ClusterIP", "NodePort", "LoadBalancer"][g.kind as usize].into());
    if g.kind > 0 {
        s.ports.as_mut().unwrap()[0].node_port = Some(30000 + i as i32);
    }
    s.external_traffic_policy = Some(if g.etp_local { "Local" } else { "Cluster" }.into());
    s.internal_traffic_policy = Some(if g.itp_local { "Local" } else { "Cluster" }.into());
    if g.affinity {
        s.session_affinity = Some("ClientIP".into());
    }
    if g.kind == 2 {
        s.health_check_node_port = Some(32000 + i as i32);
        svc = with_ingress(svc, &[(&format!("192.0.2.{}", i + 1), None)]);
    }
    let slices = g
        .slices
        .iter()
        .enumerate()
        .map(|(j, endpoints)| {
            let endpoints = endpoints
                .iter()
                .map(|e| {
                    let node = if e.node == 3 {
                        String::new()
                    } else {
                        node_name(e.node)
                    };
                    let mut endpoint = ep_with(
                        &format!("10.{i}.0.{}", e.ip),
                        &node,
                        e.ready,
                        e.serving,
                        e.terminating,
                    );
                    if let Some(z) = e.zone_hint {
                        endpoint = zone_hinted(endpoint, &[ZONES[z as usize]]);
                    }
                    if let Some(n) = e.node_hint {
                        endpoint = node_hinted(endpoint, &[&node_name(n)]);
                    }
                    endpoint
                })
                .collect();
            mk_slice(
                "default",
                &format!("{name}-{j}"),
                &name,
                &[("http", 8080)],
                endpoints,
            )
        })
        .collect();
    (svc, slices)
}

fn build_policy(i: usize, g: &GenPolicy) -> ProxyPolicy {
    mk_policy(
        &format!("policy-{i}"),
        ProxyPolicySpec {
            priority: g.priority,
            proxy_services: g.proxy_services,
            no_endpoints_action: g.drop.map(|d| {
                if d {
                    NoEndpointsAction::Drop
                } else {
                    NoEndpointsAction::Reject
                }
            }),
            topology_aware_routing: g.topology,
            service_selector: g
                .service_label
                .and_then(|l| selector(&[("tier", &l.to_string())])),
            node_selector: g
                .node_label
                .and_then(|l| selector(&[("rack", &l.to_string())])),
            ..Default::default()
        },
    )
}

fn build(g: &GenCluster, options: ResolveOptions) -> Snapshot {
    let mut s = Snapshot {
        options,
        ..Default::default()
    };
    for n in 0..g.nodes {
        let mut node = mk_node(
            &node_name(n),
            Some(ZONES[(n % 2) as usize]),
            &[&format!("192.168.0.{}", n + 1)],
        );
        node.metadata
            .labels
            .get_or_insert_with(Default::default)
            .insert("rack".into(), (n % 2).to_string());
        s.nodes.push(node);
    }
    for (i, service) in g.services.iter().enumerate() {
        if let Some(service) = service {
            let (svc, slices) = build_service(i, service);
            s.services.push(svc);
            s.endpoint_slices.extend(slices);
        }
    }
    for (i, policy) in g.policies.iter().enumerate() {
        if let Some(policy) = policy {
            s.policies.push(build_policy(i, policy));
        }
    }
    s
}

fn small_shards() -> ResolveOptions {
    ResolveOptions {
        shard_target_bytes: 1500,
        shard_max_bytes: 64 * 1024,
    }
}

fn permuted(mut s: Snapshot, rotate: usize) -> Snapshot {
    fn shuffle<T>(v: &mut [T], rotate: usize) {
        v.reverse();
        if !v.is_empty() {
            let k = rotate % v.len();
            v.rotate_left(k);
        }
    }
    shuffle(&mut s.services, rotate);
    shuffle(&mut s.endpoint_slices, rotate);
    shuffle(&mut s.nodes, rotate);
    shuffle(&mut s.policies, rotate);
    s
}

fn every_set(
    res: &Resolution,
) -> impl Iterator<Item = (&str, bool, &planproxy_crds::v1alpha1::EndpointSet)> {
    res.plans.iter().flat_map(|(node, shards)| {
        shards.iter().flat_map(move |shard| {
            shard.spec.service_ports.iter().flat_map(move |p| {
                let cluster = p
                    .cluster_endpoints
                    .iter()
                    .map(move |s| (node.as_str(), false, s));
                let local = p
                    .local_endpoints
                    .iter()
                    .map(move |s| (node.as_str(), true, s));
                cluster.chain(local)
            })
        })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn resolution_is_deterministic_and_independent_of_input_order(g in cluster(), rotate in 0usize..7) {
        let s = build(&g, small_shards());
        let once = resolve(&s);
        prop_assert_eq!(&once, &resolve(&s));
        prop_assert_eq!(&once, &resolve(&permuted(s, rotate)));
    }

    #[test]
    fn only_usable_endpoints_are_selected_and_for_the_right_reason(g in cluster()) {
        let res = resolve(&build(&g, ResolveOptions::default()));
        for (_, _, set) in every_set(&res) {
            for e in &set.endpoints {
                prop_assert!(e.ready || (e.serving && e.terminating), "unusable endpoint {:?}", e);
            }
            match set.selection {
                EndpointSelection::None => prop_assert!(set.endpoints.is_empty()),
                EndpointSelection::TerminatingFallback => {
                    prop_assert!(!set.endpoints.is_empty());
                    prop_assert!(set.endpoints.iter().all(|e| !e.ready));
                }
                _ => {
                    prop_assert!(!set.endpoints.is_empty());
                    prop_assert!(set.endpoints.iter().all(|e| e.ready));
                }
            }
            let keys: Vec<String> = set.endpoints.iter().map(crate::select::address_key).collect();
            let mut sorted = keys.clone();
            sorted.sort();
            sorted.dedup();
            prop_assert_eq!(keys, sorted, "sorted by IP:port, no duplicates");
        }
    }

    #[test]
    fn local_sets_never_hold_a_remote_endpoint(g in cluster()) {
        let s = build(&g, ResolveOptions::default());
        let res = resolve(&s);
        // Which node each endpoint IP runs on, per slice.
        let mut node_of: BTreeMap<String, BTreeSet<Option<String>>> = BTreeMap::new();
        for slice in &s.endpoint_slices {
            for e in &slice.endpoints {
                node_of.entry(e.addresses[0].clone()).or_default().insert(e.node_name.clone());
            }
        }
        for (node, local, set) in every_set(&res) {
            for e in &set.endpoints {
                let runs_here = node_of[&e.ip].contains(&Some(node.to_owned()));
                if local {
                    prop_assert!(e.local && runs_here, "{} is remote to {}", e.ip, node);
                }
                if e.local {
                    prop_assert!(runs_here);
                }
            }
        }
    }

    #[test]
    fn every_service_is_in_exactly_one_shard_under_the_cap(g in cluster()) {
        let s = build(&g, small_shards());
        let res = resolve(&s);
        for (node, shards) in &res.plans {
            let count = shards.len() as u32;
            prop_assert!(count.is_power_of_two());
            let mut seen: BTreeMap<(String, String), u32> = BTreeMap::new();
            for (i, shard) in shards.iter().enumerate() {
                prop_assert_eq!(shard.spec.shard.count, count);
                prop_assert!(serde_json::to_vec(&shard.spec).unwrap().len() <= s.options.shard_max_bytes);
                prop_assert_eq!(&shard.hash, &planproxy_crds::spec_hash(&shard.spec));
                for p in &shard.spec.service_ports {
                    let key = (p.namespace.clone(), p.name.clone());
                    if let Some(previous) = seen.insert(key, i as u32) {
                        prop_assert_eq!(previous, i as u32, "{} split across shards on {}", p.name, node);
                    }
                    let hash = service_hash(&ObjectKey::new(&p.namespace, &p.name));
                    prop_assert_eq!(shard_index(hash, count), i as u32);
                }
            }
        }
    }

    #[test]
    fn index_after_any_changes_equals_resolve(
        steps in prop::collection::vec((cluster(), any::<bool>(), any::<bool>()), 1..4),
    ) {
        let mut index = Index::new(small_shards());
        let mut previous = Snapshot::default();
        let mut layouts = index.layouts().clone();
        // The ProxyPlan objects the controller would hold after writing every
        // flush's changes: name → spec hash.
        let mut objects: BTreeMap<String, String> = BTreeMap::new();
        for (g, flush_midway, reverse) in &steps {
            let next = build(g, small_shards());
            if let Some(changes) = apply_transition(&mut index, &previous, &next, *reverse, *flush_midway) {
                write(&mut objects, changes)?;
            }
            layouts = index.layouts().clone();
            write(&mut objects, index.flush())?;
            previous = next;
        }
        let mut expected_input = previous;
        expected_input.layouts = layouts;
        let resolution = index.resolution();
        prop_assert_eq!(&resolution, &resolve(&expected_input));
        let held: BTreeMap<String, String> = resolution
            .plans
            .values()
            .flatten()
            .map(|s| (s.name.clone(), s.hash.clone()))
            .collect();
        prop_assert_eq!(objects, held, "the writes and deletes of every flush add up to the plans");
    }

    #[test]
    fn plan_object_names_are_unique_across_nodes_and_valid(g in cluster()) {
        let res = resolve(&build(&g, small_shards()));
        let mut owner: BTreeMap<&str, &str> = BTreeMap::new();
        for (node, shards) in &res.plans {
            for shard in shards {
                prop_assert!(is_dns_subdomain(&shard.name), "{}", shard.name);
                if let Some(other) = owner.insert(&shard.name, node) {
                    prop_assert!(false, "{} and {} both own {}", other, node, shard.name);
                }
            }
        }
    }
}

/// A valid object name: at most 253 characters, dot-separated labels of lowercase
/// letters, digits and `-`, each starting and ending with a letter or digit.
pub(super) fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && name.split('.').all(|label| {
            let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
            label.chars().all(|c| alnum(c) || c == '-')
                && label.starts_with(alnum)
                && label.ends_with(alnum)
        })
}

/// Applies one flush's changes to the objects the controller holds, checking that
/// no name is both written and deleted, or written twice.
fn write(
    objects: &mut BTreeMap<String, String>,
    changes: crate::Changes,
) -> Result<(), TestCaseError> {
    let written: BTreeSet<&str> = changes.upserts.iter().map(|s| s.name.as_str()).collect();
    prop_assert_eq!(written.len(), changes.upserts.len(), "a name written twice");
    for name in &changes.deletes {
        prop_assert!(
            !written.contains(name.as_str()),
            "{} written and deleted",
            name
        );
        objects.remove(name);
    }
    for shard in changes.upserts {
        objects.insert(shard.name, shard.hash);
    }
    Ok(())
}

/// Feeds the index the deletes and applies that turn `from` into `to`; returns the
/// changes of the flush it makes midway, if it makes one.
fn apply_transition(
    index: &mut Index,
    from: &Snapshot,
    to: &Snapshot,
    reverse: bool,
    flush_midway: bool,
) -> Option<crate::Changes> {
    let name = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
        m.name.clone().unwrap_or_default()
    };
    let names =
        |v: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta]| -> BTreeSet<String> {
            v.iter().map(name).collect()
        };
    let kept_services = names(
        &to.services
            .iter()
            .map(|o| o.metadata.clone())
            .collect::<Vec<_>>(),
    );
    let kept_slices = names(
        &to.endpoint_slices
            .iter()
            .map(|o| o.metadata.clone())
            .collect::<Vec<_>>(),
    );
    let kept_nodes = names(
        &to.nodes
            .iter()
            .map(|o| o.metadata.clone())
            .collect::<Vec<_>>(),
    );
    let kept_policies = names(
        &to.policies
            .iter()
            .map(|o| o.metadata.clone())
            .collect::<Vec<_>>(),
    );
    for s in &from.endpoint_slices {
        if !kept_slices.contains(&name(&s.metadata)) {
            index.delete_endpoint_slice("default", &name(&s.metadata));
        }
    }
    for s in &from.services {
        if !kept_services.contains(&name(&s.metadata)) {
            index.delete_service("default", &name(&s.metadata));
        }
    }
    let midway = flush_midway.then(|| index.flush());
    for n in &from.nodes {
        if !kept_nodes.contains(&name(&n.metadata)) {
            index.delete_node(&name(&n.metadata));
        }
    }
    for p in &from.policies {
        if !kept_policies.contains(&name(&p.metadata)) {
            index.delete_policy(&name(&p.metadata));
        }
    }
    let to = if reverse {
        permuted(to.clone(), 1)
    } else {
        to.clone()
    };
    for s in to.endpoint_slices {
        index.apply_endpoint_slice(s);
    }
    for p in to.policies {
        index.apply_policy(p);
    }
    for n in to.nodes {
        index.apply_node(n);
    }
    for s in to.services {
        index.apply_service(s);
    }
    midway
}
