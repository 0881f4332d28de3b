//! The node agent under faults, end to end: the real controller and agents in a
//! namespace cluster (see `planproxy_e2e`), checked with traffic, the nodes'
//! planproxy rules (whichever backend the agents run, read with
//! [`planproxy_netns::ProxyRules`]) and the ProxyPlan status the agents report.

// A test file: its helpers panic on failure like the tests themselves.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use planproxy_control_plane::OutageMode;
use planproxy_crds::ProxyPlan;
use planproxy_e2e::traffic::wait_servers;
use planproxy_e2e::{AppDef, Cluster, ClusterApi, ClusterSpec, Protocol, ServiceDef};
use planproxy_netns::{ConnectOpts, Netns, ProxyRules};
use serde_json::json;

/// How long the control loop (controller coalescing, agent sync) may take.
const CONVERGE: Duration = Duration::from_secs(30);
/// Convergence after an API outage: the agent's watch reconnects with client-go's
/// backoff (800 ms doubling to 30 s, plus up to as much jitter), so the first
/// retry after the outage ends may come well over 10 s later; on a loaded CI
/// machine 30 s was seen to run out.
const CONVERGE_AFTER_OUTAGE: Duration = Duration::from_secs(60);

fn web_service() -> ServiceDef {
    ServiceDef::cluster_ip("default", "web", "web").tcp("http", 80, 8080)
}

fn api_service() -> ServiceDef {
    ServiceDef::cluster_ip("default", "api", "api").tcp("http", 80, 8080)
}

/// Deploys `app` behind `service` (named like the app) and waits until every
/// node has programmed the service with endpoints.
async fn deploy_until_programmed(api: &ClusterApi<'_>, app: AppDef, service: ServiceDef) {
    let name = format!("{}/{}", app.namespace, app.name);
    api.deploy(&app).await.expect("deploying the app");
    api.create_service(&service)
        .await
        .expect("creating the service");
    api.wait_programmed(Some((&name, true)), CONVERGE)
        .await
        .expect("every node programs the service");
}

/// A cluster with `web` (2 replicas) served and programmed on every node.
fn cluster_with_web(spec: ClusterSpec, policy: Option<serde_json::Value>) -> Cluster {
    cluster_with(spec, policy, web_service())
}

/// A cluster with `web` (2 replicas) behind `service`, served and programmed
/// on every node.
fn cluster_with(
    spec: ClusterSpec,
    policy: Option<serde_json::Value>,
    service: ServiceDef,
) -> Cluster {
    let cluster = Cluster::start(spec).unwrap();
    cluster
        .run(|api| async move {
            if let Some(policy) = policy {
                api.apply_policy(policy).await.unwrap();
            }
            deploy_until_programmed(&api, AppDef::new("web", 2, 8080), service).await;
        })
        .unwrap();
    let vip = cluster.service_addr("default", "web", 80, false).unwrap();
    wait_every_web_pod_answers(&cluster, vip, CONVERGE);
    cluster
}

/// Waits until every ready `web` pod answers TCP on `vip` from node1's probe pod.
fn wait_every_web_pod_answers(cluster: &Cluster, vip: SocketAddr, timeout: Duration) {
    let pods = cluster.ready_pod_names("default", "web");
    wait_servers(&cluster.probe_pod(1).ns, vip, Protocol::Tcp, &pods, timeout).unwrap();
}

/// For single attempts expected to be answered: they return as soon as they are,
/// so the generous bound only matters on a loaded machine, where the echo server
/// may not be scheduled within half a second (seen as a flaky Timeout).
fn answered() -> ConnectOpts {
    ConnectOpts::with_timeout(Duration::from_secs(10))
}

/// planproxy's rules on node `node`, whichever backend its agent runs.
fn proxy_rules(cluster: &Cluster, node: u8) -> ProxyRules {
    cluster
        .node(node)
        .ns
        .proxy_rules()
        .expect("reading the node's planproxy rules")
}

/// No rule is in the same chain twice: the agent replaced, never appended.
fn assert_no_duplicate_rules(rules: &ProxyRules) {
    let duplicates = rules.duplicate_rules();
    assert!(
        duplicates.is_empty(),
        "duplicate rules: {duplicates:?}\n{rules}"
    );
}

/// Node `node`'s shards as the API server holds them.
fn node_plans(cluster: &Cluster, node: u8) -> Vec<ProxyPlan> {
    let name = planproxy_e2e::node_name(node);
    cluster
        .run(|api| async move { api.plans().await.unwrap() })
        .unwrap()
        .into_iter()
        .filter(|plan| plan.spec.node_name == name)
        .collect()
}

fn condition(plan: &ProxyPlan, type_: &str) -> Option<(String, String, String)> {
    let status = plan.status.as_ref()?;
    planproxy_crds::condition::find(&status.conditions, type_)
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn poll(timeout: Duration, mut check: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    check()
}

/// GET `path` on `addr` from inside `ns`: the status code.
fn http_status(ns: &Netns, addr: SocketAddr, path: &str) -> Option<u16> {
    ns.http_get(addr, path).map(|(code, _)| code)
}

#[test]
fn api_server_outage_keeps_traffic_flowing_and_agents_converge_after() {
    outage_keeps_traffic_flowing_and_agents_converge_after(OutageMode::Refuse);
}

/// kube-apiserver frozen with SIGSTOP: connections stay open and nothing
/// answers, not even TLS, until it resumes.
#[test]
fn api_server_frozen_keeps_traffic_flowing_and_agents_converge_after() {
    outage_keeps_traffic_flowing_and_agents_converge_after(OutageMode::Hang);
}

fn outage_keeps_traffic_flowing_and_agents_converge_after(mode: OutageMode) {
    let cluster = cluster_with_web(ClusterSpec::default(), None);
    let vip = cluster
        .service_addr("default", "web", 80, false)
        .expect("web has a cluster IP");

    cluster.apiserver().outage(Duration::from_secs(8), mode);
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(8) {
        for node in 1..=2 {
            let attempt = cluster.probe_pod(node).ns.connect_tcp(vip, &answered());
            assert!(
                attempt.is_ok(),
                "node{node} lost the service during the outage: {attempt:?}\n{}",
                cluster.agent_log(node)
            );
        }
        std::thread::sleep(Duration::from_millis(400));
    }

    // After the outage a change reaches every node's kernel.
    cluster
        .run(|api| async move {
            api.scale("default", "web", 3).await.expect("scaled");
            api.wait_programmed(Some(("default/web", true)), CONVERGE_AFTER_OUTAGE)
                .await
                .expect("every node programs the change");
        })
        .expect("the scenario runs");
    let pods = cluster.ready_pod_names("default", "web");
    assert_eq!(pods.len(), 3);
    for node in 1..=2 {
        wait_servers(
            &cluster.probe_pod(node).ns,
            vip,
            Protocol::Tcp,
            &pods,
            CONVERGE,
        )
        .expect("every pod answers from every node");
    }
}

#[test]
fn agent_killed_mid_sync_restarts_and_converges_without_duplicate_rules() {
    let cluster = cluster_with_web(ClusterSpec::default(), None);
    let vip = cluster.service_addr("default", "web", 80, false).unwrap();

    // A change is on its way to node1 when its agent is killed.
    cluster
        .run(|api| async move { api.scale("default", "web", 3).await.unwrap() })
        .unwrap();
    cluster.stop_agent(1, Duration::ZERO).unwrap();
    assert!(
        cluster
            .probe_pod(1)
            .ns
            .connect_tcp(vip, &answered())
            .is_ok(),
        "a killed agent leaves its rules serving"
    );

    cluster.start_agent(1).unwrap();
    cluster
        .run(|api| async move {
            api.wait_programmed(Some(("default/web", true)), CONVERGE)
                .await
                .unwrap();
        })
        .unwrap();
    // Both families: their EndpointSlices are written one after the other.
    wait_every_web_pod_answers(&cluster, vip, CONVERGE);
    let vip6 = cluster.service_addr("default", "web", 80, true).unwrap();
    wait_every_web_pod_answers(&cluster, vip6, CONVERGE);
    let converged = proxy_rules(&cluster, 1);
    assert!(!converged.is_empty(), "node1 holds rules");
    assert_no_duplicate_rules(&converged);

    // A restart adopts the rules as they are: the same rules, nothing added.
    cluster.stop_agent(1, Duration::from_secs(10)).unwrap();
    cluster.start_agent(1).unwrap();
    assert!(
        poll(CONVERGE, || cluster
            .agent_log(1)
            .contains("rules programmed")),
        "the restarted agent syncs\n{}",
        cluster.agent_log(1)
    );
    assert_eq!(proxy_rules(&cluster, 1), converged);
}

#[test]
fn an_update_refused_by_the_kernel_is_reported_degraded_while_old_rules_serve() {
    // A node port gives web chains of its own in every backend (nftables sends
    // cluster-IP-only services through shared chains). The retry after a failed
    // sync waits minSyncPeriod: 3s leaves time to look at the Degraded state
    // before the nftables retry, whose rebuild of our table takes the foreign
    // rule inside it along and succeeds.
    let policy = json!({
        "apiVersion": "planproxy.dev/v1alpha1",
        "kind": "ProxyPolicy",
        "metadata": {"name": "slow-retry"},
        "spec": {"sync": {"minSyncPeriod": "3s"}},
    });
    let cluster = cluster_with(
        ClusterSpec::default(),
        Some(policy),
        web_service().node_port(),
    );
    cluster
        .run(|api| async move {
            deploy_until_programmed(&api, AppDef::new("api", 1, 8080), api_service()).await;
        })
        .unwrap();
    let web_vip = cluster.service_addr("default", "web", 80, false).unwrap();
    let api_vip = cluster.service_addr("default", "api", 80, false).unwrap();

    // Someone else's rule on node1 jumps into web's chain, so the kernel refuses
    // (EBUSY) to delete that chain when web goes away: node1's update fails as
    // a whole.
    let node1 = &cluster.node(1).ns;
    let rules = proxy_rules(&cluster, 1);
    let chain = rules
        .dispatch_chain(web_vip.ip(), "tcp", 80)
        .unwrap_or_else(|| panic!("web's chain on node1:\n{rules}"));
    let jump = node1.jump_into_proxy_chain(&chain).unwrap();
    cluster
        .run(|api| async move { api.delete_service("default", "web").await.unwrap() })
        .unwrap();

    // Caught as the poll sees it: the nftables retry clears it within seconds.
    let mut degraded = None;
    assert!(
        poll(CONVERGE, || {
            degraded = node_plans(&cluster, 1).iter().find_map(|plan| {
                condition(plan, "Degraded").filter(|(status, _, _)| status == "True")
            });
            degraded.is_some()
        }),
        "node1 must report Degraded\n{}",
        cluster.agent_log(1)
    );
    // The previous rules keep serving on node1: api still answers, and so does
    // web, whose removal could not be programmed.
    assert!(
        cluster
            .probe_pod(1)
            .ns
            .connect_tcp(web_vip, &answered())
            .is_ok()
    );
    assert!(
        cluster
            .probe_pod(1)
            .ns
            .connect_tcp(api_vip, &answered())
            .is_ok()
    );
    let (_, reason, message) = degraded.unwrap();
    assert_eq!(reason, "ApplyFailed");
    assert!(
        message.contains("line") && message.contains(&chain.name),
        "the message names the line and the chain that could not go: {message}"
    );
    // node2 applied the removal.
    assert!(poll(CONVERGE, || node_plans(&cluster, 2).iter().all(
        |plan| { condition(plan, "Programmed").is_some_and(|(status, _, _)| status == "True") }
    )));

    // The obstacle goes (with nftables the retry may already have swept it
    // away): the retry programs node1 and clears Degraded.
    jump.remove(node1).unwrap();
    cluster
        .run(|api| async move {
            api.wait_programmed(Some(("default/web", false)), Duration::from_secs(60))
                .await
                .unwrap();
        })
        .unwrap();
    assert!(poll(CONVERGE, || node_plans(&cluster, 1).iter().all(
        |plan| { condition(plan, "Degraded").is_some_and(|(status, _, _)| status == "False") }
    )));
    let rules = proxy_rules(&cluster, 1);
    assert!(
        !rules.mentions(web_vip.ip()) && !rules.chains().iter().any(|c| c.name == chain.name),
        "web's rules are gone from node1:\n{rules}"
    );
}

#[test]
fn rules_flushed_inside_a_node_are_repaired_within_the_sync_period() {
    let policy = json!({
        "apiVersion": "planproxy.dev/v1alpha1",
        "kind": "ProxyPolicy",
        "metadata": {"name": "fast-resync"},
        "spec": {"sync": {"syncPeriod": "2s"}},
    });
    let cluster = cluster_with_web(ClusterSpec::default(), Some(policy));
    let vip = cluster.service_addr("default", "web", 80, false).unwrap();
    cluster
        .run(|api| async move {
            planproxy_e2e::wait::eventually("plans with syncPeriod 2s", CONVERGE, || async {
                let plans = api.plans().await.map_err(|e| e.to_string())?;
                plans
                    .iter()
                    .all(|plan| plan.spec.settings.sync_period == "2s")
                    .then_some(())
                    .ok_or_else(|| "not yet".to_owned())
            })
            .await
            .unwrap();
            api.wait_programmed(None, CONVERGE).await.unwrap();
        })
        .unwrap();

    // Flush (as a firewall reload does) and look in one go, so a resync cannot
    // slip in between.
    let after_flush = cluster.node(1).ns.flush_proxy_rules().unwrap();
    let flushed = Instant::now();
    assert_eq!(after_flush.rules().count(), 0, "{after_flush}");
    wait_every_web_pod_answers(&cluster, vip, Duration::from_secs(10));
    assert!(
        flushed.elapsed() < Duration::from_secs(8),
        "repaired after {:?}",
        flushed.elapsed()
    );
}

#[test]
fn healthz_fails_on_a_node_tainted_for_deletion_and_livez_does_not() {
    let cluster = cluster_with_web(ClusterSpec::default(), None);
    let healthz: SocketAddr = "127.0.0.1:10256".parse().unwrap();
    for node in 1..=2 {
        assert_eq!(
            http_status(&cluster.node(node).ns, healthz, "/healthz"),
            Some(200)
        );
    }

    cluster
        .run(|api| async move {
            let nodes: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(api.client.clone());
            let patch = json!({"spec": {"taints": [
                {"key": "ToBeDeletedByClusterAutoscaler", "value": "1700000000", "effect": "NoSchedule"}
            ]}});
            nodes
                .patch("node1", &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch))
                .await
                .unwrap();
        })
        .unwrap();

    assert!(
        poll(CONVERGE, || http_status(
            &cluster.node(1).ns,
            healthz,
            "/healthz"
        ) == Some(503)),
        "node1's /healthz must fail while it is being deleted\n{}",
        cluster.agent_log(1)
    );
    assert_eq!(
        http_status(&cluster.node(1).ns, healthz, "/livez"),
        Some(200)
    );
    assert_eq!(
        http_status(&cluster.node(2).ns, healthz, "/healthz"),
        Some(200)
    );
    // Draining changes nothing for traffic already served by node1.
    let vip = cluster.service_addr("default", "web", 80, false).unwrap();
    assert!(
        cluster
            .probe_pod(1)
            .ns
            .connect_tcp(vip, &answered())
            .is_ok()
    );
}
