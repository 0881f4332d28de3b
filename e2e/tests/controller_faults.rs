//! `planproxy-controller run` under API server faults: dropped watches, 410 Gone
//! after etcd compactions, and a 30-second outage. It converges afterwards without rewriting
//! plans that did not change.

mod controller_support;

use std::time::Duration;

use controller_support::*;
use planproxy_control_plane::OutageMode;

const NODES: usize = 4;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_watches_and_a_gone_storm_converge_without_a_rewrite_storm() {
    let cluster = TestCluster::start_with(NODES, 20, false).await;
    let controller = cluster.controller("solo", &["--leader-elect", "false"]);
    until_ready(&controller, Duration::from_secs(30)).await;
    eventually("every plan written", Duration::from_secs(20), || {
        cluster
            .every_plan_has_endpoint(NODES, &endpoint_ip(19, 0))
            .then_some(())
    })
    .await;

    cluster.server.reset_request_counts();
    cluster.server.close_connections();
    // Twice over, every re-established watch is told its resourceVersion is too
    // old (etcd compacted past it): each time kube-runtime must re-list.
    for round in 1..=2 {
        cluster
            .server
            .expire_resource_versions()
            .expect("etcd compacts");
        let what = format!("re-list {round}");
        eventually(&what, Duration::from_secs(30), || {
            (cluster.server.request_count("list", "services") >= round).then_some(())
        })
        .await;
    }
    // A change made while watches churn must still arrive.
    cluster
        .set_endpoints(3, &[&endpoint_ip(3, 0), &endpoint_ip(3, 9)])
        .await;
    eventually(
        "the change after the storm",
        Duration::from_secs(30),
        || {
            cluster
                .every_plan_has_endpoint(NODES, &endpoint_ip(3, 9))
                .then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Only the changed service's shard on each node was written: the re-lists
    // found every other plan up to date.
    assert_eq!(
        cluster.server.write_count(PLANS),
        NODES as u64,
        "\n{}",
        controller.log_text()
    );
    assert!(controller.ready().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_seconds_of_unreachable_api_server_then_converges() {
    let cluster = TestCluster::start(NODES, 5).await;
    let controller = cluster.controller("solo", &["--leader-elect", "false"]);
    until_ready(&controller, Duration::from_secs(30)).await;
    eventually("every plan written", Duration::from_secs(20), || {
        cluster
            .every_plan_has_endpoint(NODES, &endpoint_ip(4, 0))
            .then_some(())
    })
    .await;

    cluster
        .server
        .outage(Duration::from_secs(30), OutageMode::Refuse);
    // The cluster changes meanwhile (written directly into the server's store):
    // a new node and a new service.
    cluster
        .server
        .create(node(&node_name(NODES), NODES))
        .expect("node");
    cluster
        .server
        .create(service(&service_name(5), 5))
        .expect("service");
    cluster
        .server
        .create(slice(&service_name(5), &[&endpoint_ip(5, 0)]))
        .expect("slice");
    tokio::time::sleep(Duration::from_secs(30)).await;

    eventually(
        "convergence after the outage",
        Duration::from_secs(60),
        || {
            cluster
                .every_plan_has_endpoint(NODES + 1, &endpoint_ip(5, 0))
                .then_some(())
        },
    )
    .await;
    let healthy = controller.admin_get("/healthz").await.unwrap_or_default();
    assert!(healthy.starts_with("HTTP/1.1 200"), "{healthy}");
}
