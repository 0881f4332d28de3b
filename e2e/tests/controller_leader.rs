//! Leader election of `planproxy-controller run` with two replicas: only the
//! leader writes, a standby takes over when the leader dies, and a leader that
//! shuts down hands the lease over at once.

mod controller_support;

use std::time::{Duration, Instant};

use controller_support::*;

const NODES: usize = 3;

/// Two replicas, `a` leading and converged, `b` ready as a standby.
async fn leader_and_standby(cluster: &TestCluster) -> (ControllerProcess, ControllerProcess) {
    let a = cluster.controller("a", &[]);
    eventually("a leads", Duration::from_secs(20), || {
        (cluster.lease_holder().as_deref() == Some("a")).then_some(())
    })
    .await;
    until_ready(&a, Duration::from_secs(20)).await;
    let b = cluster.controller("b", &[]);
    until_ready(&b, Duration::from_secs(20)).await;
    assert_eq!(
        cluster.lease_holder().as_deref(),
        Some("a"),
        "the standby waits"
    );
    (a, b)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_leader_is_replaced_within_the_lease_duration_and_plans_keep_updating() {
    let cluster = TestCluster::start(NODES, 2).await;
    let (mut a, b) = leader_and_standby(&cluster).await;
    eventually("plans for every node", Duration::from_secs(20), || {
        cluster
            .every_plan_has_endpoint(NODES, &endpoint_ip(0, 0))
            .then_some(())
    })
    .await;

    // The standby writes nothing while the leader lives.
    cluster.server.reset_request_counts();
    cluster
        .set_endpoints(0, &[&endpoint_ip(0, 0), &endpoint_ip(0, 1)])
        .await;
    eventually("the leader's update", Duration::from_secs(10), || {
        cluster
            .every_plan_has_endpoint(NODES, &endpoint_ip(0, 1))
            .then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        cluster.server.write_count(PLANS),
        NODES as u64,
        "one writer"
    );

    let killed = Instant::now();
    a.kill();
    eventually(
        "b takes over",
        LEASE_DURATION + Duration::from_secs(3),
        || (cluster.lease_holder().as_deref() == Some("b")).then_some(()),
    )
    .await;
    let takeover = killed.elapsed();
    // The standby may start one lease duration after it last saw the record
    // change, which was before the kill; add its polling period and a second for
    // API round trips on a loaded machine.
    assert!(
        takeover <= LEASE_DURATION + RETRY_PERIOD + Duration::from_secs(1),
        "takeover took {takeover:?}"
    );

    cluster
        .set_endpoints(1, &[&endpoint_ip(1, 0), &endpoint_ip(1, 7)])
        .await;
    eventually("the new leader's update", Duration::from_secs(10), || {
        cluster
            .every_plan_has_endpoint(NODES, &endpoint_ip(1, 7))
            .then_some(())
    })
    .await;
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_releases_the_lease_so_the_standby_takes_over_quickly() {
    let cluster = TestCluster::start(NODES, 1).await;
    let (mut a, b) = leader_and_standby(&cluster).await;

    let stopped = Instant::now();
    let status = a.terminate();
    assert!(
        status.success(),
        "a clean exit on SIGTERM: {status:?}\n{}",
        a.log_text()
    );
    assert!(
        a.log_text().contains("released the leader lease"),
        "{}",
        a.log_text()
    );
    eventually("b takes over", LEASE_DURATION, || {
        (cluster.lease_holder().as_deref() == Some("b")).then_some(())
    })
    .await;
    let takeover = stopped.elapsed();
    // Without the release this takes a whole lease duration.
    assert!(takeover < LEASE_DURATION / 2, "takeover took {takeover:?}");

    cluster.set_endpoints(0, &[&endpoint_ip(0, 5)]).await;
    eventually("the new leader writes", Duration::from_secs(10), || {
        cluster
            .every_plan_has_endpoint(NODES, &endpoint_ip(0, 5))
            .then_some(())
    })
    .await;
    drop(b);
}
