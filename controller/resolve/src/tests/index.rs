//! The incremental Index: what one flush writes.

use super::builders::*;
use crate::{Index, ResolveOptions, ShardLayout};

fn index_with(services: usize, nodes: usize, target: usize) -> Index {
    let mut index = Index::new(ResolveOptions {
        shard_target_bytes: target,
        ..ResolveOptions::default()
    });
    for n in 0..nodes {
        index.apply_node(mk_node(&format!("n{n}"), Some("a"), &[]));
    }
    for i in 0..services {
        let name = format!("svc-{i}");
        index.apply_service(mk_service(
            "default",
            &name,
            &format!("10.96.0.{}", i + 1),
            &[("http", 80)],
        ));
        index.apply_endpoint_slice(mk_slice(
            "default",
            &format!("{name}-1"),
            &name,
            &[("http", 80)],
            vec![ep(&format!("10.1.0.{}", i + 1), "n0")],
        ));
    }
    index
}

#[test]
fn first_flush_writes_every_shard_and_a_second_writes_nothing() {
    let mut index = index_with(5, 3, 32 * 1024);
    let first = index.flush();
    assert_eq!(first.upserts.len(), 3);
    assert!(first.deletes.is_empty());
    assert!(index.flush().is_empty());
}

#[test]
fn one_service_change_rewrites_one_shard_per_node() {
    let mut index = index_with(100, 3, 2048);
    index.flush();
    let counts: Vec<usize> = index.resolution().plans.values().map(Vec::len).collect();
    assert!(
        counts.iter().all(|c| *c > 1),
        "the test needs split plans: {counts:?}"
    );

    index.apply_endpoint_slice(mk_slice(
        "default",
        "svc-7-1",
        "svc-7",
        &[("http", 80)],
        vec![ep("10.1.0.200", "n1")],
    ));
    let changes = index.flush();
    assert_eq!(
        changes.upserts.len(),
        3,
        "one shard on each of the three nodes"
    );
    assert!(changes.deletes.is_empty());
    let nodes: Vec<&str> = changes
        .upserts
        .iter()
        .map(|s| s.spec.node_name.as_str())
        .collect();
    assert_eq!(nodes, ["n0", "n1", "n2"]);
    for shard in &changes.upserts {
        assert!(shard.spec.service_ports.iter().any(|p| p.name == "svc-7"));
        // Only the changed service's shard is rewritten, not the node's whole plan.
        assert!(
            shard.spec.service_ports.len() < 100 / 4,
            "{} ports rewritten",
            shard.spec.service_ports.len()
        );
    }
}

#[test]
fn reapplying_an_unchanged_object_writes_nothing() {
    let mut index = index_with(3, 1, 32 * 1024);
    index.flush();
    index.apply_service(mk_service("default", "svc-1", "10.96.0.2", &[("http", 80)]));
    index.apply_node(mk_node("n0", Some("a"), &[]));
    assert!(index.flush().is_empty());
}

#[test]
fn deleting_a_node_deletes_its_shards() {
    let mut index = index_with(100, 2, 2048);
    index.flush();
    let names: Vec<String> = index.resolution().plans["n1"]
        .iter()
        .map(|s| s.name.clone())
        .collect();
    index.delete_node("n1");
    let changes = index.flush();
    assert_eq!(changes.deletes, names);
    assert!(changes.upserts.is_empty());
    assert!(!index.resolution().plans.contains_key("n1"));
}

#[test]
fn a_seeded_layout_is_replaced_and_its_leftover_shards_deleted() {
    let mut index = index_with(2, 1, 32 * 1024);
    index.set_layout(
        "n0",
        ShardLayout {
            count: 4,
            generation: 2,
        },
    );
    index.set_layout(
        "gone",
        ShardLayout {
            count: 1,
            generation: 1,
        },
    );
    let changes = index.flush();
    let mut deletes = changes.deletes.clone();
    deletes.sort();
    assert_eq!(deletes, ["gone", "n0-0", "n0-1", "n0-2", "n0-3"]);
    assert_eq!(changes.upserts.len(), 1);
    assert_eq!(changes.upserts[0].name, "n0");
    assert_eq!(changes.upserts[0].spec.shard.generation, 3);
}

#[test]
fn deleting_a_service_rewrites_its_shard_without_it() {
    let mut index = index_with(3, 1, 32 * 1024);
    index.flush();
    index.delete_service("default", "svc-1");
    let changes = index.flush();
    assert_eq!(changes.upserts.len(), 1);
    assert!(
        changes.upserts[0]
            .spec
            .service_ports
            .iter()
            .all(|p| p.name != "svc-1")
    );
    // Its slice now names a missing service.
    assert_eq!(changes.problems.len(), 1);
    assert_eq!(changes.problems[0].object, "EndpointSlice default/svc-1-1");
}

#[test]
fn policy_reports_are_emitted_when_they_change() {
    let mut index = index_with(2, 2, 32 * 1024);
    index.apply_policy(mk_policy(
        "web",
        planproxy_crds::ProxyPolicySpec {
            service_selector: selector(&[("app", "web")]),
            ..Default::default()
        },
    ));
    let first = index.flush();
    assert_eq!(first.policies["web"].matched_services, 0);
    assert_eq!(first.policies["web"].matched_nodes, 2);

    let mut svc = mk_service("default", "svc-0", "10.96.0.1", &[("http", 80)]);
    svc.metadata.labels = Some(labels(&[("app", "web")]));
    index.apply_service(svc);
    let second = index.flush();
    assert_eq!(second.policies["web"].matched_services, 1);
    assert!(index.flush().policies.is_empty());
}

#[test]
fn a_node_joining_with_another_nodes_shard_name_renames_that_nodes_shards() {
    let names = |index: &Index, node: &str| -> Vec<String> {
        index.resolution().plans[node]
            .iter()
            .map(|s| s.name.clone())
            .collect()
    };
    let mut index = index_with(100, 1, 2048);
    index.flush();
    let plain = names(&index, "n0");
    assert!(plain.len() > 1, "the test needs a split plan");
    assert_eq!(plain[1], "n0-1");

    // Node names stay reserved for single-shard plans, so n0 moves off `n0-1`
    // even though the new node's plan is split too.
    index.apply_node(mk_node("n0-1", Some("a"), &[]));
    let changes = index.flush();
    let renamed = names(&index, "n0");
    let newcomer = names(&index, "n0-1");
    assert!(renamed.iter().all(|n| !plain.contains(n)), "{renamed:?}");
    assert_eq!(changes.deletes, plain, "every old name of n0 goes");
    let mut written: Vec<String> = changes.upserts.iter().map(|s| s.name.clone()).collect();
    written.sort();
    let mut expected = [renamed.clone(), newcomer.clone()].concat();
    expected.sort();
    assert_eq!(
        written, expected,
        "n0's shards under new names, and the new node's"
    );

    // When it leaves, n0 gets its plain names back.
    index.delete_node("n0-1");
    let changes = index.flush();
    assert_eq!(changes.deletes, [renamed, newcomer].concat());
    let written: Vec<&str> = changes.upserts.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(written, plain);
}
