//! Splitting plans into shards.

use std::collections::BTreeMap;

use super::builders::*;
use crate::ingest::ObjectKey;
use crate::shard::{service_hash, shard_index};
use crate::{ResolveOptions, ShardLayout, Snapshot, resolve};

/// `n` services of one port and two endpoints each, on node n1.
fn cluster(n: usize) -> Snapshot {
    let mut services = Vec::new();
    let mut slices = Vec::new();
    for i in 0..n {
        let name = format!("svc-{i}");
        services.push(mk_service(
            "default",
            &name,
            &format!("10.96.{}.{}", i / 200, i % 200 + 1),
            &[("http", 80)],
        ));
        slices.push(mk_slice(
            "default",
            &format!("{name}-1"),
            &name,
            &[("http", 8080)],
            vec![
                ep(&format!("10.1.{}.{}", i / 200, i % 200 + 1), "n1"),
                ep(&format!("10.2.{}.{}", i / 200, i % 200 + 1), "n2"),
            ],
        ));
    }
    snapshot(
        services,
        slices,
        vec![mk_node("n1", Some("a"), &["192.168.0.1"])],
        vec![],
    )
}

fn small_shards(mut s: Snapshot, target: usize) -> Snapshot {
    s.options = ResolveOptions {
        shard_target_bytes: target,
        shard_max_bytes: 1024 * 1024,
    };
    s
}

#[test]
fn a_small_plan_is_one_shard_named_after_the_node() {
    let res = resolve(&cluster(3));
    let shards = &res.plans["n1"];
    assert_eq!(shards.len(), 1);
    assert_eq!(shards[0].name, "n1");
    assert_eq!(
        (
            shards[0].spec.shard.index,
            shards[0].spec.shard.count,
            shards[0].spec.shard.generation
        ),
        (0, 1, 1)
    );
    assert_eq!(shards[0].hash, planproxy_crds::spec_hash(&shards[0].spec));
}

#[test]
fn a_large_plan_splits_by_service_hash_into_power_of_two_shards() {
    let res = resolve(&small_shards(cluster(200), 4096));
    let shards = &res.plans["n1"];
    let count = shards.len() as u32;
    assert!(count > 1 && count.is_power_of_two(), "{count} shards");
    let total: usize = shards
        .iter()
        .map(|s| serde_json::to_vec(&s.spec).unwrap().len())
        .sum();
    assert!(
        total <= 4096 * count as usize,
        "grows until shards average under the target"
    );
    for (i, shard) in shards.iter().enumerate() {
        assert_eq!(shard.name, format!("n1-{i}"));
        assert_eq!(shard.spec.shard.index, i as u32);
        assert_eq!(shard.spec.shard.count, count);
        for port in &shard.spec.service_ports {
            let hash = service_hash(&ObjectKey::new(&port.namespace, &port.name));
            assert_eq!(
                shard_index(hash, count),
                i as u32,
                "{} is in the wrong shard",
                port.name
            );
        }
        let names: Vec<&str> = shard
            .spec
            .service_ports
            .iter()
            .map(|p| p.name.as_str())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted, "ports within a shard are sorted");
    }
    let placed: usize = shards.iter().map(|s| s.spec.service_ports.len()).sum();
    assert_eq!(placed, 200);
}

#[test]
fn generation_moves_on_exactly_when_the_count_changes() {
    let mut s = small_shards(cluster(200), 4096);
    let first = resolve(&s);
    let count = first.plans["n1"][0].spec.shard.count;

    s.layouts = BTreeMap::from([(
        "n1".to_owned(),
        ShardLayout {
            count,
            generation: 7,
        },
    )]);
    let same = resolve(&s);
    assert!(
        same.plans["n1"]
            .iter()
            .all(|p| p.spec.shard.generation == 7 && p.spec.shard.count == count)
    );

    s.layouts = BTreeMap::from([(
        "n1".to_owned(),
        ShardLayout {
            count: 1,
            generation: 7,
        },
    )]);
    let grown = resolve(&s);
    assert!(
        grown.plans["n1"]
            .iter()
            .all(|p| p.spec.shard.generation == 8 && p.spec.shard.count == count)
    );
}

#[test]
fn shard_count_shrinks_only_below_a_quarter_of_the_target() {
    let s = small_shards(cluster(20), 4096);
    let total: usize = resolve(&s).plans["n1"]
        .iter()
        .map(|p| serde_json::to_vec(&p.spec).unwrap().len())
        .sum();
    // The previous layout had 2 shards: stay at 2 while the plan is above a quarter
    // of their capacity, go back to 1 below it.
    let mut stay = s.clone();
    stay.options.shard_target_bytes = total / 2 + 200; // quarter of 2×target < total ≤ target
    stay.layouts = BTreeMap::from([(
        "n1".to_owned(),
        ShardLayout {
            count: 2,
            generation: 3,
        },
    )]);
    let res = resolve(&stay);
    assert_eq!(res.plans["n1"].len(), 2);
    assert_eq!(res.plans["n1"][0].spec.shard.generation, 3);

    let mut shrink = s;
    shrink.options.shard_target_bytes = total * 3;
    shrink.layouts = BTreeMap::from([(
        "n1".to_owned(),
        ShardLayout {
            count: 2,
            generation: 3,
        },
    )]);
    let res = resolve(&shrink);
    assert_eq!(res.plans["n1"].len(), 1);
    assert_eq!(res.plans["n1"][0].spec.shard.generation, 4);
}

#[test]
fn every_shard_stays_under_the_hard_cap() {
    let mut s = cluster(100);
    s.options = ResolveOptions {
        shard_target_bytes: 1024 * 1024,
        shard_max_bytes: 8 * 1024,
    };
    let res = resolve(&s);
    for shard in &res.plans["n1"] {
        assert!(
            serde_json::to_vec(&shard.spec).unwrap().len() <= 8 * 1024,
            "{} too big",
            shard.name
        );
    }
    assert!(res.problems.is_empty());
}

#[test]
fn a_node_named_like_another_nodes_shard_gets_distinct_plan_names() {
    // n1 needs several shards; a node named like n1's second one proxies nothing,
    // so its plan is one shard named after it.
    let mut s = small_shards(cluster(200), 4096);
    let mut lookalike = mk_node("n1-1", Some("a"), &["192.168.0.2"]);
    lookalike
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("role".into(), "edge".into());
    s.nodes.push(lookalike);
    s.policies.push(mk_policy(
        "edge",
        planproxy_crds::ProxyPolicySpec {
            node_selector: selector(&[("role", "edge")]),
            proxy_services: Some(false),
            ..Default::default()
        },
    ));
    let res = resolve(&s);
    let split = &res.plans["n1"];
    assert!(split.len() > 1, "the test needs a split plan");
    assert_eq!(res.plans["n1-1"].len(), 1);
    // The single-shard node keeps its own name…
    assert_eq!(res.plans["n1-1"][0].name, "n1-1");
    // …and n1's shards move to `<node>-<hash>-<index>`, none of them `n1-1`.
    let stem = split[0]
        .name
        .rsplit_once('-')
        .map(|(stem, _)| stem)
        .unwrap();
    assert!(
        stem.starts_with("n1-") && stem.len() == "n1-".len() + 8,
        "{stem}"
    );
    for (i, shard) in split.iter().enumerate() {
        assert_eq!(shard.name, format!("{stem}-{i}"));
    }
    // The same input names the same way, in any order.
    s.nodes.reverse();
    assert_eq!(resolve(&s).plans["n1"], *split);
}

#[test]
fn split_plans_of_nodes_without_lookalikes_keep_node_dash_index_names() {
    // `n1-x` is no shard name of n1, so nothing changes for n1.
    let mut s = small_shards(cluster(200), 4096);
    s.nodes.push(mk_node("n1-x", Some("a"), &["192.168.0.2"]));
    let res = resolve(&s);
    for (i, shard) in res.plans["n1"].iter().enumerate() {
        assert_eq!(shard.name, format!("n1-{i}"));
    }
}
