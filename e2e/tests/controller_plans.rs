//! `planproxy-controller run` (the real binary) keeping ProxyPlans in step with
//! the cluster: a plan per node, owned by the Node; a service change rewrites
//! only the shard it lands in; invalid policies are reported, not applied.

mod controller_support;

use std::collections::BTreeMap;
use std::time::Duration;

use controller_support::*;
use k8s_openapi::api::core::v1::Node;
use planproxy_crds::labels::{NODE_LABEL, SHARD_LABEL, SPEC_HASH_ANNOTATION};
use serde_json::{Value, json};

const NODES: usize = 3;

fn hashes(cluster: &TestCluster) -> BTreeMap<String, String> {
    cluster
        .plans()
        .iter()
        .map(|p| {
            (
                p["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                p["metadata"]["annotations"][SPEC_HASH_ANNOTATION]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_node_gets_owned_sharded_plans_and_they_go_with_the_node() {
    let cluster = TestCluster::start(NODES, 60).await;
    let controller = cluster.controller(
        "solo",
        &["--leader-elect", "false", "--shard-target-bytes", "4096"],
    );
    until_ready(&controller, Duration::from_secs(30)).await;
    let shards = eventually(
        "sharded plans on every node",
        Duration::from_secs(20),
        || {
            let counts: Vec<usize> = (0..NODES)
                .map(|i| cluster.plans_of(&node_name(i)).len())
                .collect();
            (counts.iter().all(|&c| c > 1)).then_some(counts)
        },
    )
    .await;
    for (i, shard_count) in shards.iter().enumerate() {
        let node = node_name(i);
        let node_object = cluster.server.get("v1", "Node", None, &node).expect("node");
        for plan in cluster.plans_of(&node) {
            let meta = &plan["metadata"];
            assert_eq!(meta["labels"][NODE_LABEL], json!(node));
            assert_eq!(
                meta["labels"][SHARD_LABEL].as_str(),
                Some(plan["spec"]["shard"]["index"].to_string().as_str())
            );
            assert_eq!(plan["spec"]["shard"]["count"], json!(shard_count));
            let owner = &meta["ownerReferences"][0];
            assert_eq!(owner["kind"], json!("Node"));
            assert_eq!(owner["uid"], node_object["metadata"]["uid"]);
            let spec: planproxy_crds::ProxyPlanSpec =
                serde_json::from_value(plan["spec"].clone()).expect("a ProxyPlan spec");
            assert_eq!(
                meta["annotations"][SPEC_HASH_ANNOTATION],
                json!(planproxy_crds::spec_hash(&spec))
            );
        }
    }

    let client = cluster
        .server
        .client("test", Some(planproxy_control_plane::MASTERS))
        .await
        .expect("client");
    let nodes: kube::Api<Node> = kube::Api::all(client);
    nodes
        .delete(&node_name(1), &Default::default())
        .await
        .expect("node deleted");
    eventually("the node's plans gone", Duration::from_secs(10), || {
        cluster.plans_of(&node_name(1)).is_empty().then_some(())
    })
    .await;
    assert!(!cluster.plans_of(&node_name(0)).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endpoint_change_rewrites_only_the_shard_holding_the_service() {
    let cluster = TestCluster::start(NODES, 60).await;
    let controller = cluster.controller(
        "solo",
        &["--leader-elect", "false", "--shard-target-bytes", "4096"],
    );
    until_ready(&controller, Duration::from_secs(30)).await;
    eventually("every plan written", Duration::from_secs(20), || {
        cluster
            .every_plan_has_endpoint(NODES, &endpoint_ip(59, 0))
            .then_some(())
    })
    .await;
    let before = hashes(&cluster);
    assert!(before.len() > NODES, "several shards per node: {before:?}");

    cluster.server.reset_request_counts();
    cluster
        .set_endpoints(7, &[&endpoint_ip(7, 0), &endpoint_ip(7, 1)])
        .await;
    eventually(
        "the new endpoint everywhere",
        Duration::from_secs(10),
        || {
            cluster
                .every_plan_has_endpoint(NODES, &endpoint_ip(7, 1))
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = hashes(&cluster);
    let changed: Vec<&String> = after
        .keys()
        .filter(|name| before.get(*name) != after.get(*name))
        .collect();
    assert_eq!(
        changed.len(),
        NODES,
        "one shard per node changed: {changed:?}"
    );
    assert_eq!(
        cluster.server.write_count(PLANS),
        NODES as u64,
        "and only those were written"
    );
}

/// Whether every service port of every plan drops traffic without endpoints.
fn all_drop(cluster: &TestCluster) -> bool {
    let plans = cluster.plans();
    let actions: Vec<&Value> = plans
        .iter()
        .flat_map(|p| p["spec"]["servicePorts"].as_array().into_iter().flatten())
        .map(|p| &p["noEndpointsAction"])
        .collect();
    !actions.is_empty() && actions.iter().all(|a| **a == json!("Drop"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_policy_edit_is_reported_naming_the_field_and_the_accepted_spec_stays() {
    let cluster = TestCluster::start(NODES, 2).await;
    let controller = cluster.controller("solo", &["--leader-elect", "false"]);
    until_ready(&controller, Duration::from_secs(30)).await;
    cluster
        .server
        .create(json!({
            "apiVersion": "planproxy.dev/v1alpha1", "kind": "ProxyPolicy",
            "metadata": {"name": "drop"},
            "spec": {"noEndpointsAction": "Drop"},
        }))
        .expect("policy");
    let policy = || {
        cluster
            .server
            .get("planproxy.dev/v1alpha1", "ProxyPolicy", None, "drop")
            .expect("policy")
    };
    let accepted = eventually("Accepted=True", Duration::from_secs(10), || {
        let p = policy();
        (p.pointer("/status/conditions/0/status") == Some(&json!("True"))).then_some(p)
    })
    .await;
    assert_eq!(accepted["status"]["matchedNodes"], json!(NODES));
    assert_eq!(
        accepted["status"]["acceptedSpec"]["noEndpointsAction"],
        json!("Drop")
    );
    eventually("plans apply the policy", Duration::from_secs(10), || {
        all_drop(&cluster).then_some(())
    })
    .await;

    let client = cluster
        .server
        .client("test", Some(planproxy_control_plane::MASTERS))
        .await
        .expect("client");
    let policies: kube::Api<planproxy_crds::ProxyPolicy> = kube::Api::all(client);
    // Valid field by field (the API server checks each, CIDRs included), but
    // inconsistent as a whole: only the controller can tell.
    let patch = json!({"spec": {"sync": {"minSyncPeriod": "30s", "syncPeriod": "10s"}}});
    policies
        .patch(
            "drop",
            &Default::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .expect("edit accepted by the server");
    let rejected = eventually("Accepted=False", Duration::from_secs(10), || {
        let p = policy();
        (p.pointer("/status/conditions/0/status") == Some(&json!("False"))).then_some(p)
    })
    .await;
    let condition = &rejected["status"]["conditions"][0];
    assert_eq!(condition["reason"], json!("Invalid"));
    let message = condition["message"].as_str().unwrap_or_default();
    assert!(message.contains("spec.sync.minSyncPeriod"), "{message}");
    assert_eq!(
        rejected["status"]["observedGeneration"],
        rejected["metadata"]["generation"]
    );
    assert_eq!(
        rejected["status"]["acceptedGeneration"],
        accepted["metadata"]["generation"]
    );
    assert_eq!(
        rejected["status"]["acceptedSpec"],
        accepted["status"]["acceptedSpec"]
    );
    // The plans keep the accepted policy's behaviour.
    assert!(all_drop(&cluster), "{:?}", cluster.plans_of(&node_name(0)));
}
