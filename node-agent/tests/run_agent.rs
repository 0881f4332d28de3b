//! The agent runtime end to end on one node: the real `planproxy-agent run`
//! against a real kube-apiserver, programming the real kernel inside the node's
//! own network namespace. Every test runs twice, against the host's iptables
//! variant and against nftables (`<test>::iptables`, `<test>::nftables`), and
//! checks the kernel through [`planproxy_netns::ProxyRules`], which reads
//! whichever backend holds the rules.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use planproxy_control_plane::OutageMode;
use planproxy_crds::ProxyPlanSpec;
use planproxy_netns::{ProxyRules, Tamper};
use planproxy_node_agent::dataplane::BackendChoice;
use support::cluster::*;
use support::{echo_endpoint, service};

on_both_backends!(
    agent_programs_its_plan_reports_programmed_and_survives_sigkill_without_duplicates,
    api_server_outage_keeps_traffic_flowing_and_the_agent_converges_after,
    a_transaction_the_kernel_refuses_is_reported_degraded_and_the_old_rules_keep_serving,
    flushed_rules_are_restored_within_the_sync_period,
    deleted_rules_are_restored_within_the_sync_period,
    healthz_fails_while_the_node_terminates_and_livez_does_not,
    health_check_node_port_answers_as_local_endpoints_come_and_go,
    sigterm_exits_zero_and_leaves_the_rules_serving,
    steady_state_writes_no_status_heartbeats,
    explain_shows_the_services_rules_as_the_kernel_holds_them,
    agent_started_while_the_api_server_is_unreachable_keeps_the_rules_and_serves_health,
);

const CLUSTER_IP: &str = "10.96.0.10";

fn cluster_ip_addr() -> SocketAddr {
    SocketAddr::new(CLUSTER_IP.parse().expect("valid ip"), 80)
}

/// The node's plan: `default/web` on [`CLUSTER_IP`] reaching the node's pod,
/// fully resynced every `sync_period`.
fn web_plan(cluster: &Cluster, sync_period: &str) -> ProxyPlanSpec {
    plan(
        vec![service(
            "web",
            &[CLUSTER_IP],
            vec![echo_endpoint(cluster.pod_ip(), true)],
        )],
        sync_period,
    )
}

/// [`web_plan`] with a second service, `default/api` on 10.96.0.11.
fn web_and_api_plan(cluster: &Cluster) -> ProxyPlanSpec {
    plan(
        vec![
            service(
                "web",
                &[CLUSTER_IP],
                vec![echo_endpoint(cluster.pod_ip(), true)],
            ),
            service(
                "api",
                &["10.96.0.11"],
                vec![echo_endpoint(cluster.pod_ip(), true)],
            ),
        ],
        "30s",
    )
}

/// Stores `spec` as the node's plan, starts the agent and waits until the
/// plan's status says it is programmed.
fn start_agent_until_programmed(cluster: &mut Cluster, spec: &ProxyPlanSpec, what: &str) {
    cluster.put_plan(spec);
    cluster.start_agent();
    must(
        wait_for(Duration::from_secs(20), || cluster.programmed_hash(spec)),
        what,
        cluster,
    );
}

/// Stores `spec` as the node's plan, starts the agent and waits until the
/// cluster IP reaches the backend.
fn start_agent_until_served(cluster: &mut Cluster, spec: &ProxyPlanSpec, what: &str) {
    cluster.put_plan(spec);
    cluster.start_agent();
    must(
        wait_for(Duration::from_secs(20), || {
            cluster.connect(cluster_ip_addr()).server() == Some("backend")
        }),
        what,
        cluster,
    );
}

fn must(ok: bool, what: &str, cluster: &Cluster) {
    assert!(ok, "{what}\n--- agent log ---\n{}", cluster.agent_log());
}

/// No rule is in the same chain twice: the agent replaced, never appended.
fn assert_no_duplicate_rules(rules: &ProxyRules) {
    let duplicates = rules.duplicate_rules();
    assert!(
        duplicates.is_empty(),
        "duplicate rules: {duplicates:?}\n{rules}"
    );
}

fn agent_programs_its_plan_reports_programmed_and_survives_sigkill_without_duplicates(
    backend: BackendChoice,
) {
    let mut cluster = Cluster::start(backend);
    let spec = web_plan(&cluster, "30s");
    start_agent_until_served(
        &mut cluster,
        &spec,
        "traffic to the cluster IP must reach the backend",
    );
    must(
        wait_for(Duration::from_secs(10), || cluster.programmed_hash(&spec)),
        "the shard must report Programmed with the applied hash",
        &cluster,
    );
    let (degraded, reason, _) = cluster.condition("Degraded").expect("Degraded is reported");
    assert_eq!((degraded.as_str(), reason.as_str()), ("False", "Healthy"));
    assert_no_duplicate_rules(&cluster.proxy_rules());
    let status = cluster.plan_object()["status"].clone();
    assert!(
        status["programmed"]["rules"].as_i64().unwrap_or_default() > 0,
        "{status}"
    );
    assert_eq!(status["programmed"]["servicePorts"], 1, "{status}");
    assert!(status["lastSyncTime"].is_string(), "{status}");

    // A change, then SIGKILL while it may be mid-sync.
    let changed = web_and_api_plan(&cluster);
    cluster.put_plan(&changed);
    cluster.agent = None; // dropping the guard SIGKILLs the agent
    assert_eq!(
        cluster.connect(cluster_ip_addr()).server(),
        Some("backend"),
        "a killed agent leaves the rules serving"
    );

    cluster.start_agent();
    must(
        wait_for(Duration::from_secs(20), || {
            cluster.programmed_hash(&changed)
        }),
        "the restarted agent must converge on the new plan",
        &cluster,
    );
    let after_restart = cluster.proxy_rules();
    // A second restart must adopt the rules as they are: identical dump, no duplicates.
    cluster.agent = None;
    cluster.start_agent();
    must(
        wait_for(Duration::from_secs(20), || {
            cluster.agent_log().contains("rules programmed")
        }),
        "the agent must sync after the restart",
        &cluster,
    );
    assert_eq!(cluster.proxy_rules(), after_restart);
    assert_no_duplicate_rules(&after_restart);
    assert_eq!(
        cluster
            .connect(SocketAddr::new("10.96.0.11".parse().expect("ip"), 80))
            .server(),
        Some("backend")
    );
}

fn api_server_outage_keeps_traffic_flowing_and_the_agent_converges_after(backend: BackendChoice) {
    let mut cluster = Cluster::start(backend);
    let spec = web_plan(&cluster, "30s");
    start_agent_until_programmed(&mut cluster, &spec, "the agent must program the plan");

    cluster
        .server
        .outage(Duration::from_secs(4), OutageMode::Refuse);
    for _ in 0..6 {
        assert_eq!(
            cluster.connect(cluster_ip_addr()).server(),
            Some("backend"),
            "traffic during the outage"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    // Written while the agent cannot see it; it must pick it up after the outage.
    let changed = web_and_api_plan(&cluster);
    cluster.put_plan(&changed);
    must(
        wait_for(Duration::from_secs(40), || {
            cluster.programmed_hash(&changed)
        }),
        "the agent must converge after the outage",
        &cluster,
    );
    assert_eq!(
        cluster
            .connect(SocketAddr::new("10.96.0.11".parse().expect("ip"), 80))
            .server(),
        Some("backend")
    );
    assert_eq!(
        cluster
            .agent
            .as_mut()
            .and_then(|a| a.try_exit_status().ok().flatten()),
        None,
        "the agent kept running"
    );
}

fn a_transaction_the_kernel_refuses_is_reported_degraded_and_the_old_rules_keep_serving(
    backend: BackendChoice,
) {
    let mut cluster = Cluster::start(backend);
    // A node port gives web chains of its own in both backends (nftables sends
    // cluster-IP-only services through shared chains). The retry after a failed
    // sync waits minSyncPeriod (3s): long enough to look at the Degraded state
    // before the nftables retry, whose rebuild of our table takes the foreign
    // rule inside it along and succeeds.
    let mut web = service(
        "web",
        &[CLUSTER_IP],
        vec![echo_endpoint(cluster.pod_ip(), true)],
    );
    web.node_port = Some(30080);
    let old = plan_with_sync_periods(vec![web], "3s", "30s");
    start_agent_until_programmed(&mut cluster, &old, "first plan programmed");

    // Someone else's rule jumps into web's chain, so the kernel refuses to
    // delete that chain (EBUSY) when web leaves the plan: the whole update fails.
    let rules = cluster.proxy_rules();
    let chain = rules
        .dispatch_chain(CLUSTER_IP.parse().expect("ip"), "tcp", 80)
        .unwrap_or_else(|| panic!("no chain of default/web in\n{rules}"));
    let jump = cluster
        .node_ns()
        .jump_into_proxy_chain(&chain)
        .expect("adding the foreign rule inside the node namespace");
    let new = plan_with_sync_periods(
        vec![service(
            "api",
            &["10.96.0.11"],
            vec![echo_endpoint(cluster.pod_ip(), true)],
        )],
        "3s",
        "30s",
    );
    cluster.put_plan(&new);

    // Caught as the poll sees it: the nftables retry clears it within seconds.
    let mut degraded = None;
    must(
        wait_for(Duration::from_secs(20), || {
            degraded = cluster
                .condition("Degraded")
                .filter(|(status, _, _)| status == "True");
            degraded.is_some()
        }),
        "the refused update must be reported as Degraded",
        &cluster,
    );
    assert_eq!(
        cluster.connect(cluster_ip_addr()).server(),
        Some("backend"),
        "the old rules keep serving"
    );
    let (_, reason, message) = degraded.expect("Degraded");
    assert_eq!(reason, "ApplyFailed");
    assert!(
        message.contains("line") && message.contains(&chain.name),
        "the message names the line and the chain that could not go: {message}"
    );
    let (programmed, _, _) = cluster.condition("Programmed").expect("Programmed");
    assert_eq!(programmed, "False");

    // The obstacle goes away (with nftables the retry may already have swept it
    // away): the retry succeeds and Degraded clears.
    jump.remove(cluster.node_ns())
        .expect("removing the foreign rule");
    must(
        wait_for(Duration::from_secs(40), || {
            cluster.programmed_hash(&new)
                && cluster
                    .condition("Degraded")
                    .is_some_and(|(status, _, _)| status == "False")
        }),
        "the retry must program the new plan and clear Degraded",
        &cluster,
    );
    let rules = cluster.proxy_rules();
    assert!(
        !rules.mentions(CLUSTER_IP.parse().expect("ip")),
        "web is gone:\n{rules}"
    );
    assert_eq!(
        cluster
            .connect(SocketAddr::new("10.96.0.11".parse().expect("ip"), 80))
            .server(),
        Some("backend")
    );
}

fn flushed_rules_are_restored_within_the_sync_period(backend: BackendChoice) {
    tampered_rules_are_restored_within_the_sync_period(backend, Tamper::Flush);
}

fn deleted_rules_are_restored_within_the_sync_period(backend: BackendChoice) {
    tampered_rules_are_restored_within_the_sync_period(backend, Tamper::Delete);
}

/// Someone flushes or deletes our rules (a firewall reload, a careless admin):
/// the periodic drift check sees it and the next full resync restores them.
fn tampered_rules_are_restored_within_the_sync_period(backend: BackendChoice, how: Tamper) {
    let mut cluster = Cluster::start(backend);
    let spec = web_plan(&cluster, "2s");
    start_agent_until_programmed(&mut cluster, &spec, "programmed");
    let programmed = cluster.proxy_rules();

    // Read back in the same command, so no resync slips in between.
    let left = cluster
        .node_ns()
        .tamper_with_proxy_rules(how)
        .expect("tampering with our rules inside the node namespace");
    assert_eq!(left.rules().count(), 0, "{how:?} left rules:\n{left}");
    if how == Tamper::Delete {
        assert!(left.is_empty(), "{how:?} left chains:\n{left}");
    }
    assert!(
        !cluster.connect_expecting_failure(cluster_ip_addr()).is_ok(),
        "the {how:?} broke the service"
    );
    must(
        wait_for(Duration::from_secs(30), || {
            cluster.connect(cluster_ip_addr()).server() == Some("backend")
        }),
        "the next full resync must restore the rules",
        &cluster,
    );
    assert_eq!(
        cluster.proxy_rules(),
        programmed,
        "the repair restores exactly what was programmed"
    );
    let metrics = cluster
        .http_get(METRICS.parse().expect("address"), "/metrics")
        .map(|(_, body)| body)
        .unwrap_or_default();
    assert!(
        metrics.lines().any(
            |line| line.starts_with("planproxy_agent_drift_repairs_total ")
                && !line.ends_with(" 0")
        ),
        "the periodic check counted the drift:\n{metrics}"
    );
}

fn healthz_fails_while_the_node_terminates_and_livez_does_not(backend: BackendChoice) {
    let mut cluster = Cluster::start(backend);
    let spec = web_plan(&cluster, "30s");
    cluster.put_plan(&spec);
    cluster.start_agent();
    let healthz: SocketAddr = HEALTHZ.parse().expect("address");
    must(
        wait_for(Duration::from_secs(20), || {
            cluster.programmed_hash(&spec)
                && cluster
                    .http_get(healthz, "/healthz")
                    .is_some_and(|(code, _)| code == 200)
        }),
        "healthz must answer 200 once programmed",
        &cluster,
    );
    let (_, body) = cluster
        .http_get(healthz, "/healthz")
        .expect("healthz answers");
    let body: serde_json::Value = serde_json::from_str(&body).expect("healthz answers JSON");
    assert_eq!(body["nodeEligible"], true);
    assert!(
        body["lastUpdated"]
            .as_str()
            .is_some_and(|t| !t.starts_with("0001")),
        "{body}"
    );

    let mut terminating = spec.clone();
    terminating.settings.node_terminating = true;
    cluster.put_plan(&terminating);
    must(
        wait_for(Duration::from_secs(10), || {
            cluster
                .http_get(healthz, "/healthz")
                .is_some_and(|(code, _)| code == 503)
        }),
        "healthz must answer 503 while the node terminates",
        &cluster,
    );
    let (_, body) = cluster
        .http_get(healthz, "/healthz")
        .expect("healthz answers");
    assert!(body.contains("\"nodeEligible\":false"), "{body}");
    assert_eq!(
        cluster.http_get(healthz, "/livez").map(|(code, _)| code),
        Some(200)
    );
    let (code, metrics) = cluster
        .http_get(METRICS.parse().expect("address"), "/metrics")
        .expect("metrics answer");
    assert_eq!(code, 200);
    assert!(
        metrics.contains("kubeproxy_sync_proxy_rules_last_timestamp_seconds"),
        "{metrics}"
    );
    // The rules gauge counts what the backend writes: iptables per family and
    // table, nftables our one inet table.
    let gauge = if cluster.nftables() {
        "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"inet\",table=\"planproxy\"}"
    } else {
        "kubeproxy_sync_proxy_rules_iptables_total{ip_family=\"IPv4\",table=\"nat\"}"
    };
    assert!(
        metrics
            .lines()
            .any(|line| line.starts_with(gauge) && !line.ends_with(" 0")),
        "{gauge} counts rules:\n{metrics}"
    );
    assert!(
        metrics.contains("kubeproxy_proxy_healthz_total{code=\"503\"}"),
        "{metrics}"
    );
}

fn health_check_node_port_answers_as_local_endpoints_come_and_go(backend: BackendChoice) {
    let mut cluster = Cluster::start(backend);
    let mut web = service(
        "web",
        &[CLUSTER_IP],
        vec![echo_endpoint(cluster.pod_ip(), true)],
    );
    web.node_port = Some(30080);
    web.external_traffic_policy = planproxy_crds::v1alpha1::TrafficPolicy::Local;
    web.health_check_node_port = Some(31999);
    web.local_endpoints = web.cluster_endpoints.clone();
    let spec = plan(vec![web.clone()], "30s");
    cluster.put_plan(&spec);
    cluster.start_agent();
    let hc = SocketAddr::new(planproxy_netns::topology::node_ipv4(1).into(), 31999);
    must(
        wait_for(Duration::from_secs(20), || {
            cluster
                .http_get(hc, "/")
                .is_some_and(|(code, _)| code == 200)
        }),
        "the health-check node port must answer 200 with a local endpoint",
        &cluster,
    );
    let (_, body) = cluster.http_get(hc, "/").expect("hc answers");
    let body: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body["service"]["namespace"], "default");
    assert_eq!(body["service"]["name"], "web");
    assert_eq!(body["localEndpoints"], 1);
    let hc_v6 = SocketAddr::new(planproxy_netns::topology::node_ipv6(1).into(), 31999);
    assert_eq!(
        cluster.http_get(hc_v6, "/").map(|(code, _)| code),
        Some(200),
        "the port answers on IPv6 too"
    );

    // The only local endpoint starts terminating: it no longer counts.
    let mut draining = web.clone();
    for set in [
        &mut draining.cluster_endpoints,
        &mut draining.local_endpoints,
    ]
    .into_iter()
    .flatten()
    {
        set.selection = planproxy_crds::v1alpha1::EndpointSelection::TerminatingFallback;
        for endpoint in &mut set.endpoints {
            endpoint.ready = false;
            endpoint.terminating = true;
        }
    }
    cluster.put_plan(&plan(vec![draining], "30s"));
    must(
        wait_for(Duration::from_secs(10), || {
            cluster
                .http_get(hc, "/")
                .is_some_and(|(code, _)| code == 503)
        }),
        "the health-check node port must answer 503 when only terminating endpoints remain",
        &cluster,
    );

    // The service leaves the plan: the port closes.
    cluster.put_plan(&plan(vec![service("api", &["10.96.0.11"], vec![])], "30s"));
    must(
        wait_for(Duration::from_secs(10), || {
            cluster.http_get(hc, "/").is_none()
        }),
        "the health-check node port must close",
        &cluster,
    );
}

fn sigterm_exits_zero_and_leaves_the_rules_serving(backend: BackendChoice) {
    let mut cluster = Cluster::start(backend);
    let spec = web_plan(&cluster, "30s");
    start_agent_until_programmed(&mut cluster, &spec, "programmed");
    let before = cluster.proxy_rules();
    assert!(!before.is_empty(), "the agent programmed rules");
    let status = cluster
        .agent
        .as_mut()
        .expect("agent running")
        .terminate(Duration::from_secs(10))
        .expect("the agent stops");
    assert!(
        status.success(),
        "exit status {status:?}\n{}",
        cluster.agent_log()
    );
    assert_eq!(cluster.proxy_rules(), before, "stopping never flushes");
    assert_eq!(cluster.connect(cluster_ip_addr()).server(), Some("backend"));
}

fn steady_state_writes_no_status_heartbeats(backend: BackendChoice) {
    let mut cluster = Cluster::start(backend);
    // Full resyncs every second: none of them may rewrite the status.
    let spec = web_plan(&cluster, "1s");
    start_agent_until_programmed(&mut cluster, &spec, "programmed");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        cluster
            .server
            .request_count("patch", "proxyplans.planproxy.dev/status")
            > 0,
        "the Programmed status was written through this counter"
    );
    cluster.server.reset_request_counts();
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        cluster
            .server
            .request_count("patch", "proxyplans.planproxy.dev/status"),
        0,
        "{}",
        cluster.agent_log()
    );
    assert!(
        cluster.agent_log().matches("rules programmed").count() >= 3,
        "the periodic resyncs ran"
    );
}

fn explain_shows_the_services_rules_as_the_kernel_holds_them(backend: BackendChoice) {
    let mut cluster = Cluster::start(backend);
    let spec = web_plan(&cluster, "30s");
    start_agent_until_served(&mut cluster, &spec, "traffic flows");
    for _ in 0..3 {
        assert!(cluster.connect(cluster_ip_addr()).is_ok());
    }
    let mut plan_file = tempfile::NamedTempFile::new().expect("a temp file");
    let object = serde_json::to_string(&cluster.plan_object()).expect("json");
    std::io::Write::write_all(&mut plan_file, object.as_bytes()).expect("write the plan file");
    let path = plan_file.path().to_string_lossy().into_owned();
    let backend = cluster.backend.to_string();
    let text = cluster
        .node_ns()
        .exec_ok(&[
            env!("CARGO_BIN_EXE_planproxy-agent"),
            "explain",
            "default/web",
            "--plan-file",
            &path,
            "--backend",
            &backend,
        ])
        .expect("explain runs");
    assert!(
        text.contains("cluster IP        10.96.0.10:80/tcp"),
        "{text}"
    );
    assert!(text.contains("cluster-wide set: Ready"), "{text}");
    if cluster.nftables() {
        // nftables rules carry no counters; the dispatch element counts the
        // service's new connections, and explain shows it with the endpoint
        // it leads to, as the kernel lists them.
        assert!(
            text.contains("element 10.96.0.10 . tcp . 80 counter packets ")
                && text.contains(" : goto "),
            "the dispatch element is shown with its counter:\n{text}"
        );
        assert!(
            text.contains(&format!(
                "10.96.0.10 . 80 . 0 : {} . 8080",
                cluster.pod_ip()
            )),
            "the endpoint element is shown:\n{text}"
        );
        assert!(!text.contains("nftables table not read"), "{text}");
        return;
    }
    let entry = text
        .lines()
        .find(|line| line.contains("-A PPX-SERVICES") && line.contains("default/web cluster IP"))
        .unwrap_or_else(|| panic!("the entry rule is shown:\n{text}"));
    let packets: u64 = entry
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_default();
    assert!(
        packets >= 4,
        "the entry rule counted the connections: {entry}"
    );
    assert!(!text.contains("not in the kernel"), "{text}");
}

fn agent_started_while_the_api_server_is_unreachable_keeps_the_rules_and_serves_health(
    backend: BackendChoice,
) {
    let mut cluster = Cluster::start(backend);
    let spec = web_plan(&cluster, "30s");
    start_agent_until_programmed(&mut cluster, &spec, "programmed");
    let before = cluster.proxy_rules();
    cluster.agent = None; // SIGKILL

    cluster
        .server
        .outage(Duration::from_secs(15), OutageMode::Refuse);
    cluster.start_agent();
    let healthz: SocketAddr = HEALTHZ.parse().expect("address");
    // Well inside the outage, with room for a slow start on a loaded machine.
    must(
        wait_for(Duration::from_secs(12), || {
            cluster
                .http_get(healthz, "/healthz")
                .is_some_and(|(code, _)| code == 200)
        }),
        "the agent serves health while the API server is away",
        &cluster,
    );
    assert_eq!(cluster.connect(cluster_ip_addr()).server(), Some("backend"));
    assert_eq!(cluster.proxy_rules(), before, "nothing flushed on start");

    let changed = web_and_api_plan(&cluster);
    cluster.put_plan(&changed);
    must(
        wait_for(Duration::from_secs(40), || {
            cluster.programmed_hash(&changed)
        }),
        "the agent converges once the API server is back",
        &cluster,
    );
}
