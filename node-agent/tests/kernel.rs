//! The data plane on the real kernel: plans applied with `planproxy-agent apply`
//! inside isolated network namespaces (never the root namespace), checked with
//! real TCP and UDP traffic between pods, nodes and clients.

#[path = "support/backends.rs"]
mod backends;
mod support;

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use backends::{apply_on, config, nft_ruleset};
use planproxy_crds::ProxyPlanSpec;
use planproxy_crds::v1alpha1::{
    EndpointPlan, EndpointSelection, EndpointSet, NoEndpointsAction, Protocol, TrafficPolicy,
};
use planproxy_netns::{Attempt, ConnectOpts, Pod, SctpInit, Topology, TopologySpec};
use planproxy_node_agent::dataplane::{Backend, BackendChoice, DataPlane, DataPlaneConfig};
use support::*;

// Every traffic test runs against each backend.
on_every_backend!(
    cluster_ip_reaches_endpoints_from_pods_and_from_the_node,
    node_port_external_ip_and_load_balancer_ip_reach_endpoints_from_outside_masqueraded,
    load_balancer_source_ranges_admit_one_client_and_drop_another,
    client_ip_affinity_pins_each_client_to_one_endpoint_and_spreads_clients,
    local_external_policy_reaches_only_local_pods_and_preserves_the_client_address,
    services_without_endpoints_reject_or_drop_as_the_plan_says,
    a_pod_reaching_itself_through_its_service_is_masqueraded,
    a_pod_reaching_itself_is_masqueraded_also_when_its_slice_names_no_node,
    stale_udp_flows_are_removed_when_endpoints_go_and_when_the_first_arrives,
    incremental_updates_while_traffic_flows_fail_no_connection,
    three_equal_endpoints_share_3000_connections_evenly,
    ipv6_cluster_ip_and_node_port_work,
    internal_local_policy_without_local_endpoints_drops,
    localhost_node_ports_reach_endpoints_masqueraded_when_on_and_do_not_exist_when_off,
    a_packet_to_loopback_from_another_namespace_is_dropped_by_the_guard,
    node_port_addresses_match_a_secondary_address_the_plan_does_not_list
);

const CLUSTER_IP: [u8; 4] = [10, 96, 0, 10];

fn topology(nodes: u8, pods_per_node: u8, clients: u8) -> Topology {
    Topology::new(TopologySpec {
        nodes,
        pods_per_node,
        clients,
    })
    .expect("the test topology must build")
}

/// Waits long enough that a dropped SYN shows as a timeout (a REJECT fails at once).
fn long_enough_to_time_out() -> ConnectOpts {
    ConnectOpts::with_timeout(Duration::from_millis(800))
}

/// For connections expected to be answered (or refused, which is immediate): a
/// generous limit, since a loaded CI machine may be slow to schedule the echo
/// server, and an answer returns at once anyway.
fn answer_expected() -> ConnectOpts {
    ConnectOpts::with_timeout(Duration::from_secs(10))
}

fn cluster_ip_reaches_endpoints_from_pods_and_from_the_node(via: Backend) {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let (client, backend) = (&n1.pods[0], &n2.pods[0]);
    let _echo = serve_all([(backend, "backend")]);
    let web = service("web", &["10.96.0.10"], vec![endpoint(backend, 1, false)]);
    apply_on(via, n1, &plan(n1, vec![web.clone(), web.udp()]));

    let from_pod = client
        .ns
        .connect_tcp(sa(CLUSTER_IP, 80), &answer_expected());
    assert_eq!(from_pod.server(), Some("backend"), "{from_pod:?}");
    // Pod traffic keeps its source: the backend sees the client pod.
    assert_eq!(from_pod.peer().map(|p| p.ip()), Some(client.ipv4.into()));

    let udp_from_pod = client
        .ns
        .connect_udp(sa(CLUSTER_IP, 80), &answer_expected());
    assert_eq!(udp_from_pod.server(), Some("backend"), "{udp_from_pod:?}");

    // The node's own traffic is masqueraded to the node's address.
    let from_node = n1.ns.connect_tcp(sa(CLUSTER_IP, 80), &answer_expected());
    assert_eq!(from_node.server(), Some("backend"), "{from_node:?}");
    assert_eq!(from_node.peer().map(|p| p.ip()), Some(n1.ipv4.into()));

    // Another port on the same cluster IP is not a frontend.
    assert!(
        !client
            .ns
            .connect_tcp(
                sa(CLUSTER_IP, 81),
                &ConnectOpts::with_timeout(Duration::from_millis(500))
            )
            .is_ok()
    );
}

fn node_port_external_ip_and_load_balancer_ip_reach_endpoints_from_outside_masqueraded(
    via: Backend,
) {
    let t = topology(2, 1, 1);
    let (n1, n2) = (t.node(1), t.node(2));
    let backend = &n2.pods[0];
    let _echo = serve_all([(backend, "backend")]);
    let mut web = service("web", &["10.96.0.10"], vec![endpoint(backend, 1, false)]);
    web.node_port = Some(30080);
    web.external_ips = vec!["192.0.2.10".into()];
    web.load_balancer_ips = vec!["198.51.100.10".into()];
    apply_on(via, n1, &plan(n1, vec![web]));
    t.route_to_node("192.0.2.10".parse().expect("valid"), 1)
        .expect("route");
    t.route_to_node("198.51.100.10".parse().expect("valid"), 1)
        .expect("route");

    let client = &t.clients[0];
    for target in [
        sa(n1.ipv4, 30080),
        sa([192, 0, 2, 10], 80),
        sa([198, 51, 100, 10], 80),
    ] {
        let a = client.ns.connect_tcp(target, &answer_expected());
        assert_eq!(a.server(), Some("backend"), "{target}: {a:?}");
        // externalTrafficPolicy Cluster: masqueraded, so replies return via node 1.
        assert_eq!(a.peer().map(|p| p.ip()), Some(n1.ipv4.into()), "{target}");
    }
}

fn load_balancer_source_ranges_admit_one_client_and_drop_another(via: Backend) {
    let t = topology(2, 1, 2);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "backend")]);
    let mut lb = service("lb", &["10.96.0.10"], vec![endpoint(&n2.pods[0], 1, false)]);
    lb.load_balancer_ips = vec!["198.51.100.20".into()];
    lb.load_balancer_source_ranges = vec![format!("{}/32", t.clients[0].ipv4)];
    apply_on(via, n1, &plan(n1, vec![lb]));
    t.route_to_node("198.51.100.20".parse().expect("valid"), 1)
        .expect("route");

    let vip = sa([198, 51, 100, 20], 80);
    let admitted = t.clients[0].ns.connect_tcp(vip, &answer_expected());
    assert_eq!(admitted.server(), Some("backend"), "{admitted:?}");
    let refused = t.clients[1]
        .ns
        .connect_tcp(vip, &ConnectOpts::with_timeout(Duration::from_secs(1)));
    assert_eq!(
        refused,
        Attempt::Timeout,
        "a source outside the ranges must be dropped"
    );
}

fn client_ip_affinity_pins_each_client_to_one_endpoint_and_spreads_clients(via: Backend) {
    let t = topology(2, 3, 1);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([
        (&n2.pods[0], "b1"),
        (&n2.pods[1], "b2"),
        (&n2.pods[2], "b3"),
    ]);
    let eps = n2.pods.iter().map(|p| endpoint(p, 1, false)).collect();
    let mut svc = service("sticky", &["10.96.0.10"], eps).with_affinity();
    svc.external_ips = vec!["192.0.2.30".into()];
    apply_on(via, n1, &plan(n1, vec![svc]));
    t.route_to_node("192.0.2.30".parse().expect("valid"), 1)
        .expect("route");

    let client = &t.clients[0];
    let sources: Vec<Ipv4Addr> = (150..166).map(|h| Ipv4Addr::new(172, 31, 0, h)).collect();
    for s in &sources {
        client
            .ns
            .add_addr("eth0", (*s).into(), 24)
            .expect("address");
    }
    let mut chosen = BTreeMap::new();
    for s in &sources {
        let opts = ConnectOpts {
            source: Some((*s).into()),
            ..answer_expected()
        };
        let got = servers(&client.ns.connect_many(sa([192, 0, 2, 30], 80), 10, &opts));
        assert!(
            got.iter().all(|g| g == &got[0]),
            "client {s} was not pinned: {got:?}"
        );
        chosen.insert(*s, got[0].clone());
    }
    let distinct: std::collections::BTreeSet<_> = chosen.values().collect();
    assert!(
        distinct.len() >= 2,
        "16 clients all landed on one endpoint: {chosen:?}"
    );
}

fn local_external_policy_reaches_only_local_pods_and_preserves_the_client_address(via: Backend) {
    let t = topology(2, 1, 1);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n1.pods[0], "local"), (&n2.pods[0], "remote")]);
    hairpin(n1, &n1.pods[0]);
    let mut svc = service(
        "local",
        &["10.96.0.10"],
        vec![
            endpoint(&n1.pods[0], 1, false),
            endpoint(&n2.pods[0], 1, false),
        ],
    );
    svc.node_port = Some(30081);
    let svc = svc.external_local();
    apply_on(via, n1, &plan(n1, vec![svc]));

    let client = &t.clients[0];
    let got = client
        .ns
        .connect_many(sa(n1.ipv4, 30081), 20, &answer_expected());
    for a in &got {
        assert_eq!(a.server(), Some("local"), "{a:?}");
        assert_eq!(
            a.peer().map(|p| p.ip()),
            Some(client.ipv4.into()),
            "the client address must be preserved"
        );
    }
    // Pods are short-circuited to every endpoint, as for the cluster IP.
    let from_pod = servers(
        &n1.pods[0]
            .ns
            .connect_many(sa(n1.ipv4, 30081), 30, &answer_expected()),
    );
    assert!(
        from_pod.iter().any(|s| s == "remote"),
        "pods must reach all endpoints: {from_pod:?}"
    );
}

fn services_without_endpoints_reject_or_drop_as_the_plan_says(via: Backend) {
    let t = topology(1, 1, 0);
    let n1 = t.node(1);
    let rejecting = service("rejecting", &["10.96.0.20"], vec![]);
    let mut dropping = service("dropping", &["10.96.0.21"], vec![]);
    dropping.no_endpoints_action = NoEndpointsAction::Drop;
    apply_on(via, n1, &plan(n1, vec![rejecting, dropping]));

    let pod = &n1.pods[0];
    let started = std::time::Instant::now();
    assert_eq!(
        pod.ns
            .connect_tcp(sa([10, 96, 0, 20], 80), &answer_expected()),
        Attempt::Refused
    );
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "a REJECT must fail at once"
    );
    assert_eq!(
        n1.ns
            .connect_tcp(sa([10, 96, 0, 20], 80), &answer_expected()),
        Attempt::Refused,
        "from the node"
    );
    assert_eq!(
        pod.ns
            .connect_tcp(sa([10, 96, 0, 21], 80), &long_enough_to_time_out()),
        Attempt::Timeout
    );
}

fn a_pod_reaching_itself_through_its_service_is_masqueraded(via: Backend) {
    hairpin_is_masqueraded(via, |pod| endpoint(pod, 1, false));
}

fn a_pod_reaching_itself_is_masqueraded_also_when_its_slice_names_no_node(via: Backend) {
    // A hand-written slice without nodeName: the plan cannot call the endpoint
    // local, only of no known node.
    hairpin_is_masqueraded(via, |pod| {
        let mut endpoint = endpoint(pod, 1, false);
        endpoint.local = false;
        endpoint.node_unknown = true;
        endpoint
    });
}

fn hairpin_is_masqueraded(via: Backend, endpoint_of: impl Fn(&Pod) -> EndpointPlan) {
    let t = topology(1, 1, 0);
    let n1 = t.node(1);
    let pod = &n1.pods[0];
    hairpin(n1, pod);
    let _echo = serve_all([(pod, "self")]);
    apply_on(
        via,
        n1,
        &plan(
            n1,
            vec![service("hairpin", &["10.96.0.10"], vec![endpoint_of(pod)])],
        ),
    );
    let a = pod.ns.connect_tcp(sa(CLUSTER_IP, 80), &answer_expected());
    assert_eq!(a.server(), Some("self"), "{a:?}");
    assert_eq!(
        a.peer().map(|p| p.ip()),
        Some(n1.gateway_v4().into()),
        "hairpin traffic must be masqueraded"
    );
}

/// Sends one datagram from a fixed source port and returns who answered.
fn udp_exchange(socket: &UdpSocket, to: std::net::SocketAddr) -> Option<String> {
    socket.send_to(b"hello", to).ok()?;
    let mut buf = [0u8; 256];
    let (n, _) = socket.recv_from(&mut buf).ok()?;
    Some(
        String::from_utf8_lossy(&buf[..n])
            .split_whitespace()
            .next()?
            .to_owned(),
    )
}

fn stale_udp_flows_are_removed_when_endpoints_go_and_when_the_first_arrives(via: Backend) {
    let t = topology(2, 2, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "a"), (&n2.pods[1], "b")]);
    let client = &n1.pods[0];
    let socket: UdpSocket = client
        .ns
        .run_in(|| UdpSocket::bind("0.0.0.0:40000"))
        .expect("bind");
    socket
        .set_read_timeout(Some(Duration::from_millis(700)))
        .expect("timeout");

    let both = vec![
        endpoint(&n2.pods[0], 1, false),
        endpoint(&n2.pods[1], 1, false),
    ];
    apply_on(
        via,
        n1,
        &plan(
            n1,
            vec![service("dns", &["10.96.0.53"], both.clone()).udp()],
        ),
    );
    let dns = sa([10, 96, 0, 53], 80);
    let first = udp_exchange(&socket, dns).expect("the service must answer");
    // The same source port keeps its flow, and with it its endpoint.
    assert_eq!(udp_exchange(&socket, dns).as_deref(), Some(first.as_str()));

    let remaining: Vec<_> = both
        .iter()
        .filter(|e| {
            e.ip != if first == "a" {
                n2.pods[0].ipv4.to_string()
            } else {
                n2.pods[1].ipv4.to_string()
            }
        })
        .cloned()
        .collect();
    let other = if first == "a" { "b" } else { "a" };
    apply_on(
        via,
        n1,
        &plan(n1, vec![service("dns", &["10.96.0.53"], remaining).udp()]),
    );
    // The flow to the removed endpoint is gone, so the same client moves on
    // (its old endpoint still answers, so without cleanup it would stay).
    assert_eq!(udp_exchange(&socket, dns).as_deref(), Some(other));

    // A service that has no endpoints yet: its flow is never DNATed...
    let late = sa([10, 96, 0, 54], 80);
    assert_eq!(udp_exchange(&socket, late), None);
    // ...and is removed once the first endpoint arrives.
    apply_on(
        via,
        n1,
        &plan(
            n1,
            vec![
                service(
                    "dns",
                    &["10.96.0.53"],
                    vec![endpoint(&n2.pods[0], 1, false)],
                )
                .udp(),
                service(
                    "late",
                    &["10.96.0.54"],
                    vec![endpoint(&n2.pods[1], 1, false)],
                )
                .udp(),
            ],
        ),
    );
    assert_eq!(udp_exchange(&socket, late).as_deref(), Some("b"));
}

fn incremental_updates_while_traffic_flows_fail_no_connection(via: Backend) {
    let t = topology(2, 3, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([
        (&n2.pods[0], "b1"),
        (&n2.pods[1], "b2"),
        (&n2.pods[2], "b3"),
    ]);
    let stable = vec![
        endpoint(&n2.pods[0], 1, false),
        endpoint(&n2.pods[1], 1, false),
    ];
    let mut grown = stable.clone();
    grown.push(endpoint(&n2.pods[2], 1, false));
    let plans = [
        plan(n1, vec![service("web", &["10.96.0.10"], stable.clone())]),
        plan(
            n1,
            vec![
                service("web", &["10.96.0.10"], grown),
                service("other", &["10.96.0.11"], stable.clone()),
            ],
        ),
    ];
    let mut dataplane = n1
        .ns
        .run_in(|| DataPlane::new(config(via)))
        .expect("data plane");
    let first = n1
        .ns
        .run_in(|| dataplane.sync(&[Arc::new(plans[0].clone())], false))
        .expect("first sync");
    assert!(first.full, "the first sync after start is full");

    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let traffic = scope.spawn(|| {
            let mut failures = Vec::new();
            let mut total = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for a in n1.pods[0]
                    .ns
                    .connect_many(sa(CLUSTER_IP, 80), 20, &answer_expected())
                {
                    total += 1;
                    if !a.is_ok() {
                        failures.push(a);
                    }
                }
            }
            (total, failures)
        });
        for i in 1..=10 {
            let report = n1
                .ns
                .run_in(|| dataplane.sync(&[Arc::new(plans[i % 2].clone())], false))
                .expect("incremental sync");
            assert!(!report.full);
            // Only the changed service's chain and the dispatch are rewritten.
            assert!(
                report.chains_written <= 4,
                "sync {i} rewrote {} chains",
                report.chains_written
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let (total, failures) = traffic.join().expect("traffic thread");
        assert!(total > 50, "only {total} connections were made");
        assert!(
            failures.is_empty(),
            "{} of {total} connections failed: {:?}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    });
}

fn three_equal_endpoints_share_3000_connections_evenly(via: Backend) {
    let t = topology(2, 3, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([
        (&n2.pods[0], "b1"),
        (&n2.pods[1], "b2"),
        (&n2.pods[2], "b3"),
    ]);
    let eps: Vec<_> = n2.pods.iter().map(|p| endpoint(p, 1, false)).collect();
    // Enough other services that the dispatch tree has several levels.
    let mut services: Vec<_> = (0..400u32)
        .map(|i| {
            service(
                &format!("filler-{i}"),
                &[&format!("10.97.{}.{}", i / 200, i % 200 + 1)],
                eps[..1].to_vec(),
            )
        })
        .collect();
    services.push(service("web", &["10.96.0.10"], eps));
    apply_on(via, n1, &plan(n1, services));

    let got = servers(
        &n1.pods[0]
            .ns
            .connect_many(sa(CLUSTER_IP, 80), 3000, &answer_expected()),
    );
    let mut counts: BTreeMap<String, f64> = BTreeMap::new();
    for s in got {
        *counts.entry(s).or_default() += 1.0;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    // Chi-square with 2 degrees of freedom; 30 is exceeded by a fair split with
    // probability about 3e-7.
    let chi2: f64 = counts.values().map(|o| (o - 1000.0).powi(2) / 1000.0).sum();
    assert!(
        chi2 < 30.0,
        "uneven split {counts:?} (chi-square {chi2:.1})"
    );
}

#[test]
fn cleanup_removes_every_planproxy_chain_and_nothing_else() {
    let t = topology(1, 1, 0);
    let n1 = t.node(1);
    let ns = &n1.ns;
    // Someone else's rules, before and after ours.
    ns.exec_ok(&["iptables", "-t", "nat", "-N", "OTHER-NAT"])
        .expect("other chain");
    ns.exec_ok(&["iptables", "-t", "nat", "-A", "OTHER-NAT", "-j", "RETURN"])
        .expect("other rule");
    ns.exec_ok(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-s",
        "192.0.2.1/32",
        "-j",
        "OTHER-NAT",
    ])
    .expect("other jump");
    ns.exec_ok(&[
        "iptables",
        "-A",
        "INPUT",
        "-s",
        "192.0.2.2/32",
        "-j",
        "DROP",
    ])
    .expect("other filter rule");
    let before = rules_only(&ns.iptables_save());

    let mut svc = service(
        "web",
        &["10.96.0.10"],
        vec![endpoint(&n1.pods[0], 1, false)],
    );
    svc.node_port = Some(30082);
    apply(
        n1,
        &plan(n1, vec![svc, service("empty", &["10.96.0.11"], vec![])]),
    );
    ns.exec_ok(&[
        "iptables",
        "-A",
        "INPUT",
        "-s",
        "192.0.2.3/32",
        "-j",
        "DROP",
    ])
    .expect("a rule added meanwhile");
    assert!(ns.iptables_save().contains("PPX-SERVICES"));

    let out = agent(ns, &["cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = ns.iptables_save();
    assert!(
        !after.contains("PPX-"),
        "planproxy left rules behind:\n{after}"
    );
    let mut expected = before;
    expected.push("-A INPUT -s 192.0.2.3/32 -j DROP".to_owned());
    expected.sort();
    let mut got = rules_only(&after);
    got.sort();
    assert_eq!(got, expected);
}

/// The rule and chain lines of an iptables-save dump, without comments and counters.
fn rules_only(dump: &str) -> Vec<String> {
    dump.lines()
        .filter(|l| l.starts_with("-A") || (l.starts_with(':') && !l.contains("ACCEPT")))
        .map(|l| l.split(" [").next().unwrap_or(l).to_owned())
        .collect()
}

fn ipv6_cluster_ip_and_node_port_work(via: Backend) {
    let t = topology(2, 1, 1);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "backend6")]);
    let mut svc = service(
        "dual",
        &["10.96.0.10", "fd00:96::10"],
        vec![
            endpoint(&n2.pods[0], 1, false),
            endpoint(&n2.pods[0], 1, true),
        ],
    );
    svc.node_port = Some(30083);
    apply_on(via, n1, &plan(n1, vec![svc]));

    let pod = &n1.pods[0];
    let cluster_ip6 = sa(
        "fd00:96::10".parse::<std::net::Ipv6Addr>().expect("valid"),
        80,
    );
    let a = pod.ns.connect_tcp(cluster_ip6, &answer_expected());
    assert_eq!(a.server(), Some("backend6"), "{a:?}");
    assert_eq!(a.peer().map(|p| p.ip()), Some(pod.ipv6.into()));
    let client = &t.clients[0];
    let np = client
        .ns
        .connect_tcp(sa(n1.ipv6, 30083), &answer_expected());
    assert_eq!(np.server(), Some("backend6"), "{np:?}");
    assert_eq!(np.peer().map(|p| p.ip()), Some(n1.ipv6.into()));
}

/// Someone else's rule jumping into our `chain`: the kernel then refuses to
/// delete that chain, and with it the update that would.
fn foreign_jump(node: &planproxy_netns::Node, iptables: &str, chain: &str) {
    node.ns
        .exec_ok(&[
            iptables,
            "-t",
            "nat",
            "-A",
            "OUTPUT",
            "-d",
            "192.0.2.99/32",
            "-j",
            chain,
        ])
        .expect("foreign jump");
}

#[test]
fn a_failed_restore_keeps_the_old_rules_and_names_table_and_line() {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "backend")]);
    let ep = vec![endpoint(&n2.pods[0], 1, false)];
    // A node port keeps the service's own chain (the tree inlines cluster-IP-only
    // services into the dispatch).
    let mut old = service("old", &["10.96.0.10"], ep.clone());
    old.node_port = Some(30090);
    apply(n1, &plan(n1, vec![old]));
    // Someone else jumps into the old service's chain, so the kernel refuses to
    // delete it, and with it the whole update.
    let chain = format!(
        "PPX-SVC-{}",
        planproxy_render::hash::service_port_hash("default/old", "tcp")
    );
    foreign_jump(n1, "iptables", &chain);

    let file = PlanFile::new(&plan(n1, vec![service("new", &["10.96.0.11"], ep)]));
    let out = agent(
        &n1.ns,
        &[
            "apply",
            "--backend",
            "iptables",
            "--plan",
            &file.path.to_string_lossy(),
        ],
    );
    assert!(!out.status.success(), "the refused update must fail");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("ipv4 nat"), "{stderr}");
    assert!(stderr.contains("at line"), "{stderr}");
    assert!(
        stderr.contains(&format!("-X {chain}")),
        "the offending line must be quoted: {stderr}"
    );

    // The old rules still serve; the new service was not half-programmed.
    let old = n1.pods[0]
        .ns
        .connect_tcp(sa(CLUSTER_IP, 80), &answer_expected());
    assert_eq!(old.server(), Some("backend"), "{old:?}");
    let save = n1.ns.iptables_save();
    let new_chain = format!(
        "PPX-SVC-{}",
        planproxy_render::hash::service_port_hash("default/new", "tcp")
    );
    assert!(!save.contains(&new_chain), "{save}");
}

/// One restore covers both tables of a family, and both iptables variants
/// commit it table by table: when the kernel refuses the second part (nat),
/// the first (filter) stays applied. The sync fails naming the table, and the
/// next one is a full sync that rewrites both.
fn a_refused_nat_part_leaves_the_filter_part_applied(backend: Backend) {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let ep = vec![endpoint(&n2.pods[0], 1, false)];
    let mut old = service("old", &["10.96.0.10"], ep.clone());
    old.node_port = Some(30091);
    let mut dataplane = n1
        .ns
        .run_in(|| DataPlane::new(config(backend)))
        .expect("the data plane starts");
    n1.ns
        .run_in(|| dataplane.sync(&[Arc::new(plan(n1, vec![old]))], false))
        .expect("the first sync");
    let chain = format!(
        "PPX-SVC-{}",
        planproxy_render::hash::service_port_hash("default/old", "tcp")
    );
    let iptables = match backend {
        Backend::IptablesLegacy => "iptables-legacy",
        _ => "iptables-nft",
    };
    foreign_jump(n1, iptables, &chain);

    // The new plan adds a filter rule (a service without endpoints is
    // rejected) and deletes the chain the foreign rule holds on to.
    let empty = service("empty", &["10.96.0.12"], Vec::new());
    let next = plan(n1, vec![service("new", &["10.96.0.11"], ep), empty]);
    let err = n1
        .ns
        .run_in(|| dataplane.sync(&[Arc::new(next.clone())], false))
        .expect_err("the kernel refuses the nat part");
    let message = err.to_string();
    assert!(message.contains("ipv4 nat"), "{message}");
    let save = format!("{iptables}-save");
    let filter = n1
        .ns
        .exec_ok(&[&save, "-t", "filter"])
        .expect("filter dump");
    assert!(
        filter.contains("default/empty"),
        "{backend}: the filter part was committed before nat was refused\n{filter}"
    );
}

#[test]
fn a_refused_nat_part_leaves_the_filter_part_applied_on_iptables_legacy() {
    a_refused_nat_part_leaves_the_filter_part_applied(Backend::IptablesLegacy);
}

#[test]
fn a_refused_nat_part_leaves_the_filter_part_applied_on_iptables_nft() {
    a_refused_nat_part_leaves_the_filter_part_applied(Backend::IptablesNft);
}

#[test]
fn a_flush_of_our_chains_is_detected_and_repaired_by_a_full_sync() {
    // A firewall reload flushes the nat table.
    breakage_is_detected_and_repaired(
        DataPlaneConfig {
            backend: BackendChoice::Iptables,
            ..DataPlaneConfig::default()
        },
        &[&["iptables", "-t", "nat", "-F"]],
    );
}

/// Programs one service, runs each of `breakages` inside the node, and checks
/// that the service stops answering, the drift is detected, and a full sync
/// repairs it.
fn breakage_is_detected_and_repaired(config: DataPlaneConfig, breakages: &[&[&str]]) {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "backend")]);
    let spec = plan(
        n1,
        vec![service(
            "web",
            &["10.96.0.10"],
            vec![endpoint(&n2.pods[0], 1, false)],
        )],
    );
    let mut dataplane = n1.ns.run_in(|| DataPlane::new(config)).expect("data plane");
    n1.ns
        .run_in(|| dataplane.sync(&[Arc::new(spec.clone())], false))
        .expect("sync");
    assert!(!n1.ns.run_in(|| dataplane.drift_detected()).expect("check"));
    for breakage in breakages {
        n1.ns.exec_ok(breakage).expect("break our rules");
        assert!(
            !n1.pods[0]
                .ns
                .connect_tcp(
                    sa(CLUSTER_IP, 80),
                    &ConnectOpts::with_timeout(Duration::from_millis(500))
                )
                .is_ok()
        );
        assert!(n1.ns.run_in(|| dataplane.drift_detected()).expect("check"));
        let report = n1
            .ns
            .run_in(|| dataplane.sync(&[Arc::new(spec.clone())], true))
            .expect("repair");
        assert!(report.full);
        assert!(!n1.ns.run_in(|| dataplane.drift_detected()).expect("check"));
        n1.ns
            .run_in(|| dataplane.verify())
            .expect("the kernel holds the plan again");
        let a = n1.pods[0]
            .ns
            .connect_tcp(sa(CLUSTER_IP, 80), &answer_expected());
        assert_eq!(a.server(), Some("backend"), "{a:?}");
    }
}

#[test]
fn the_legacy_backend_and_the_flat_layout_program_the_same_behaviour() {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "backend")]);
    let spec = plan(
        n1,
        vec![
            service(
                "web",
                &["10.96.0.10"],
                vec![endpoint(&n2.pods[0], 1, false)],
            ),
            service("empty", &["10.96.0.11"], vec![]),
        ],
    );
    apply_with(
        n1,
        &spec,
        &["--backend", "iptables-legacy", "--layout", "flat"],
    );
    let legacy = n1.ns.exec_ok(&["iptables-legacy-save"]).expect("save");
    assert!(legacy.contains("PPX-SERVICES"), "{legacy}");
    let a = n1.pods[0]
        .ns
        .connect_tcp(sa(CLUSTER_IP, 80), &answer_expected());
    assert_eq!(a.server(), Some("backend"), "{a:?}");
    assert_eq!(
        n1.pods[0]
            .ns
            .connect_tcp(sa([10, 96, 0, 11], 80), &answer_expected()),
        Attempt::Refused
    );

    let out = agent(&n1.ns, &["cleanup", "--backend", "iptables-legacy"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let legacy = n1.ns.exec_ok(&["iptables-legacy-save"]).expect("save");
    assert!(!legacy.contains("PPX-"), "{legacy}");
}

fn internal_local_policy_without_local_endpoints_drops(via: Backend) {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "remote")]);
    let mut svc = service(
        "itp",
        &["10.96.0.12"],
        vec![endpoint(&n2.pods[0], 1, false)],
    );
    svc.internal_traffic_policy = TrafficPolicy::Local;
    svc.local_endpoints = Some(EndpointSet {
        selection: EndpointSelection::None,
        endpoints: vec![],
    });
    apply_on(via, n1, &plan(n1, vec![svc]));
    assert_eq!(
        n1.pods[0]
            .ns
            .connect_tcp(sa([10, 96, 0, 12], 80), &long_enough_to_time_out()),
        Attempt::Timeout
    );
}

#[test]
fn legacy_restores_wait_for_the_xtables_lock_and_report_the_wait() {
    let t = topology(1, 0, 0);
    let n1 = t.node(1);
    // A private lock file (iptables honours XTABLES_LOCKFILE), so the test never
    // holds up anyone else's iptables.
    let dir = tempfile::tempdir().expect("temp dir");
    let lock_path = dir.path().join("xtables.lock");
    let lock = std::fs::File::create(&lock_path).expect("lock file");
    lock.lock().expect("the test takes the lock first");
    let file = PlanFile::new(&plan(n1, vec![service("web", &["10.96.0.10"], vec![])]));
    let holder = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(1));
        drop(lock);
    });
    let out = n1
        .ns
        .command(&[
            env!("CARGO_BIN_EXE_planproxy-agent"),
            "apply",
            "--backend",
            "iptables-legacy",
            "--plan",
            &file.path.to_string_lossy(),
        ])
        .env("XTABLES_LOCKFILE", &lock_path)
        .output()
        .expect("apply must start");
    holder.join().expect("lock holder");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let waited: f64 = stdout
        .split("lock wait ")
        .nth(1)
        .and_then(|s| s.split('s').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no lock wait in {stdout}"));
    assert!(
        (0.8..5.0).contains(&waited),
        "reported lock wait {waited}s, the lock was held 1s"
    );
}

#[test]
fn nftables_cleanup_removes_our_table_and_nothing_else() {
    let t = topology(1, 1, 0);
    let n1 = t.node(1);
    let ns = &n1.ns;
    // Someone else's nftables table and iptables rule.
    ns.exec_ok(&["nft", "add", "table", "inet", "other"])
        .expect("other table");
    ns.exec_ok(&["nft", "add", "chain", "inet", "other", "c"])
        .expect("other chain");
    ns.exec_ok(&[
        "nft",
        "add",
        "rule",
        "inet",
        "other",
        "c",
        "ip",
        "saddr",
        "192.0.2.1",
        "drop",
    ])
    .expect("other rule");
    ns.exec_ok(&[
        "iptables",
        "-A",
        "INPUT",
        "-s",
        "192.0.2.2/32",
        "-j",
        "DROP",
    ])
    .expect("other iptables rule");
    let mut svc = service(
        "web",
        &["10.96.0.10"],
        vec![endpoint(&n1.pods[0], 1, false)],
    );
    svc.node_port = Some(30082);
    apply_on(
        Backend::Nftables,
        n1,
        &plan(n1, vec![svc, service("empty", &["10.96.0.11"], vec![])]),
    );
    assert!(nft_ruleset(n1).contains("table inet planproxy"));

    let out = agent(ns, &["cleanup", "--backend", "nftables"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after = nft_ruleset(n1);
    assert!(!after.contains("planproxy"), "{after}");
    assert!(after.contains("ip saddr 192.0.2.1 drop"), "{after}");
    assert!(
        ns.iptables_save()
            .contains("-A INPUT -s 192.0.2.2/32 -j DROP")
    );
}

#[test]
fn a_refused_nft_transaction_keeps_the_old_rules_and_names_the_statement() {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "backend")]);
    let ep = vec![endpoint(&n2.pods[0], 1, false)];
    let mut old = service("old", &["10.96.0.10"], ep.clone());
    old.node_port = Some(30090);
    let mut dataplane = n1
        .ns
        .run_in(|| DataPlane::new(config(Backend::Nftables)))
        .expect("data plane");
    n1.ns
        .run_in(|| dataplane.sync(&[Arc::new(plan(n1, vec![old]))], false))
        .expect("first sync");
    // Someone else jumps into the old service's external chain, so the kernel
    // refuses to delete it, and with it the whole transaction.
    let chain = format!(
        "ext4-{}",
        planproxy_render::hash::service_port_hash("default/old", "tcp")
    );
    n1.ns
        .exec_ok(&[
            "nft",
            "add",
            "rule",
            "inet",
            "planproxy",
            "nat-output",
            "ip",
            "daddr",
            "192.0.2.99",
            "jump",
            &chain,
        ])
        .expect("foreign jump");
    let err = n1
        .ns
        .run_in(|| {
            dataplane.sync(
                &[Arc::new(plan(
                    n1,
                    vec![service("new", &["10.96.0.11"], ep)],
                ))],
                false,
            )
        })
        .expect_err("the refused transaction must fail");
    let message = err.to_string();
    assert!(
        message.contains("nft refused the transaction at line"),
        "{message}"
    );
    assert!(
        message.contains(&format!("delete chain inet planproxy {chain}")),
        "the offending statement must be quoted: {message}"
    );
    // The old rules still serve; the new service was not half-programmed.
    let old = n1.pods[0]
        .ns
        .connect_tcp(sa(CLUSTER_IP, 80), &answer_expected());
    assert_eq!(old.server(), Some("backend"), "{old:?}");
    assert!(!nft_ruleset(n1).contains("10.96.0.11"));
}

#[test]
fn a_flush_of_our_nftables_table_is_detected_and_repaired_by_a_full_sync() {
    breakage_is_detected_and_repaired(
        config(Backend::Nftables),
        &[
            &["nft", "flush", "table", "inet", "planproxy"],
            &["nft", "delete", "table", "inet", "planproxy"],
        ],
    );
}

#[test]
fn switching_backends_on_a_live_node_removes_the_other_backends_rules() {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "backend")]);
    let spec = plan(
        n1,
        vec![service(
            "web",
            &["10.96.0.10"],
            vec![endpoint(&n2.pods[0], 1, false)],
        )],
    );
    let serves = || {
        let a = n1.pods[0]
            .ns
            .connect_tcp(sa(CLUSTER_IP, 80), &answer_expected());
        assert_eq!(a.server(), Some("backend"), "{a:?}");
    };
    apply_on(Backend::IptablesNft, n1, &spec);
    serves();
    apply_on(Backend::Nftables, n1, &spec);
    serves();
    let save = n1.ns.iptables_save();
    assert!(
        !save.contains("PPX-"),
        "iptables rules left behind:\n{save}"
    );
    assert!(nft_ruleset(n1).contains("table inet planproxy"));
    apply_on(Backend::IptablesNft, n1, &spec);
    serves();
    assert!(
        !nft_ruleset(n1).contains("table inet planproxy"),
        "the nftables table was left behind"
    );
    assert!(n1.ns.iptables_save().contains("PPX-SERVICES"));
}

/// `route_localnet` in the node's namespace, as the kernel has it.
fn route_localnet(node: &planproxy_netns::Node) -> String {
    node.ns
        .exec_ok(&["sysctl", "-n", "net.ipv4.conf.all.route_localnet"])
        .expect("sysctl in the node namespace")
        .trim()
        .to_owned()
}

fn localhost_node_ports_reach_endpoints_masqueraded_when_on_and_do_not_exist_when_off(
    via: Backend,
) {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "backend")]);
    let mut web = service(
        "web",
        &["10.96.0.10"],
        vec![endpoint(&n2.pods[0], 1, false)],
    );
    web.node_port = Some(30084);
    // externalTrafficPolicy Local with the only endpoint elsewhere: the node's
    // own connections are treated as Cluster, from 127.0.0.1 too.
    let mut local = service(
        "local",
        &["10.96.0.11"],
        vec![endpoint(&n2.pods[0], 1, false)],
    )
    .external_local();
    local.node_port = Some(30085);
    let mut on = plan(n1, vec![web, local]);
    on.settings.localhost_node_ports = true;
    assert_eq!(route_localnet(n1), "0", "a fresh namespace");
    apply_on(via, n1, &on);
    assert_eq!(
        route_localnet(n1),
        "1",
        "the agent turns it on for the plan"
    );
    for port in [30084, 30085] {
        let a = n1
            .ns
            .connect_tcp(sa([127, 0, 0, 1], port), &answer_expected());
        assert_eq!(a.server(), Some("backend"), "127.0.0.1:{port}: {a:?}");
        assert_eq!(
            a.peer().map(|p| p.ip()),
            Some(n1.ipv4.into()),
            "127.0.0.1:{port}: masqueraded to the node's address"
        );
    }

    let mut off = on.clone();
    off.settings.localhost_node_ports = false;
    apply_on(via, n1, &off);
    assert_eq!(route_localnet(n1), "1", "never reset behind other software");
    for port in [30084, 30085] {
        // Nothing of the node port is on 127.0.0.1: the node's own stack
        // answers, and nothing listens there.
        assert_eq!(
            n1.ns
                .connect_tcp(sa([127, 0, 0, 1], port), &answer_expected()),
            Attempt::Refused,
            "127.0.0.1:{port}"
        );
        let a = n1.ns.connect_tcp(sa(n1.ipv4, port), &answer_expected());
        assert_eq!(
            a.server(),
            Some("backend"),
            "{port} on the node's address: {a:?}"
        );
    }
}

/// Makes `pod` send its IPv4 packets for 127.0.0.1 out of `eth0` to its
/// node, as a neighbour of the node can (CVE-2020-8558). Only the pod's own
/// namespace is changed.
fn send_loopback_to_the_node(pod: &planproxy_netns::Pod, node: &planproxy_netns::Node) {
    pod.ns
        .sysctl("net.ipv4.conf.all.route_localnet", "1")
        .expect("route_localnet in the pod");
    for local in ["127.0.0.0/8", "127.0.0.1"] {
        pod.ns
            .exec_ok(&[
                "ip", "route", "del", "local", local, "dev", "lo", "table", "local",
            ])
            .expect("the pod's loopback routes go");
    }
    pod.ns
        .exec_ok(&[
            "ip",
            "route",
            "add",
            "127.0.0.1/32",
            "via",
            &node.gateway_v4().to_string(),
            "dev",
            "eth0",
        ])
        .expect("127.0.0.1 via the node");
}

/// Sends one datagram from `pod` to `127.0.0.1:port` and reports whether a
/// socket bound there in the node received it.
fn loopback_datagram_arrives(
    pod: &planproxy_netns::Pod,
    node: &planproxy_netns::Node,
    port: u16,
) -> bool {
    let receiver = node
        .ns
        .run_in(|| UdpSocket::bind(("127.0.0.1", port)))
        .expect("a loopback socket in the node");
    receiver
        .set_read_timeout(Some(Duration::from_millis(800)))
        .expect("timeout");
    let sender = pod
        .ns
        .run_in(|| UdpSocket::bind("0.0.0.0:0"))
        .expect("a socket in the pod");
    sender
        .send_to(b"spoofed", ("127.0.0.1", port))
        .expect("the pod sends to 127.0.0.1 via its node");
    let mut buf = [0u8; 64];
    receiver.recv_from(&mut buf).is_ok()
}

fn a_packet_to_loopback_from_another_namespace_is_dropped_by_the_guard(via: Backend) {
    let t = topology(1, 1, 0);
    let n1 = t.node(1);
    let pod = &n1.pods[0];
    send_loopback_to_the_node(pod, n1);
    let mut svc = service("web", &["10.96.0.10"], vec![endpoint(pod, 1, false)]);
    svc.node_port = Some(30086);
    let mut without = plan(n1, vec![svc]);
    without.settings.localhost_node_ports = false;
    apply_on(via, n1, &without);
    // The hole the guard closes: with route_localnet on and no guard, a
    // neighbour reaches a socket bound to the node's loopback.
    n1.ns
        .sysctl("net.ipv4.conf.all.route_localnet", "1")
        .expect("route_localnet on, as another program may have left it");
    assert!(
        loopback_datagram_arrives(pod, n1, 40001),
        "{via}: without the guard the spoofed datagram arrives (the test's own check)"
    );
    let mut with = without.clone();
    with.settings.localhost_node_ports = true;
    apply_on(via, n1, &with);
    assert!(
        !loopback_datagram_arrives(pod, n1, 40002),
        "{via}: the guard must drop a packet to 127.0.0.0/8 from elsewhere"
    );
    // The node's own connections to loopback are untouched.
    let local = n1
        .ns
        .run_in(|| std::net::TcpListener::bind("127.0.0.1:40003"))
        .expect("a loopback listener");
    let reached = n1
        .ns
        .connect_tcp(sa([127, 0, 0, 1], 40003), &answer_expected());
    drop(local);
    assert!(
        !matches!(reached, Attempt::Refused | Attempt::Timeout),
        "{reached:?}"
    );
}

fn node_port_addresses_match_a_secondary_address_the_plan_does_not_list(via: Backend) {
    let t = topology(2, 1, 1);
    let (n1, n2) = (t.node(1), t.node(2));
    let _echo = serve_all([(&n2.pods[0], "backend")]);
    let mut svc = service(
        "web",
        &["10.96.0.10"],
        vec![endpoint(&n2.pods[0], 1, false)],
    );
    svc.node_port = Some(30087);
    let mut spec = plan(n1, vec![svc]);
    spec.settings.node_port_addresses = vec!["192.168.77.0/24".into()];
    assert!(
        !spec
            .settings
            .node_ips
            .iter()
            .any(|ip| ip.starts_with("192.168.77.")),
        "the plan's node IPs do not list the secondary address"
    );
    apply_on(via, n1, &spec);
    // Added after the rules were written: no new plan is needed.
    let secondary: std::net::IpAddr = "192.168.77.11".parse().expect("valid");
    n1.ns
        .add_addr("eth0", secondary, 24)
        .expect("a secondary address on the node's veth");
    t.route_to_node(secondary, 1).expect("route");
    let client = &t.clients[0];
    let a = client
        .ns
        .connect_tcp(sa(secondary, 30087), &answer_expected());
    assert_eq!(a.server(), Some("backend"), "the secondary address: {a:?}");
    assert_eq!(
        client
            .ns
            .connect_tcp(sa(n1.ipv4, 30087), &answer_expected()),
        Attempt::Refused,
        "the primary address is outside nodePortAddresses"
    );
}

on_all_three_backends!(
    verify_reads_every_rule_shape_back_and_catches_a_rule_edited_in_place,
    sctp_reaches_endpoints_dnated_from_pods_and_masqueraded_from_outside
);

/// One plan holding every shape of rule the renderers write: both families,
/// node ports, external and load-balancer IPs with source ranges, affinity,
/// both traffic policies Local, health-check node ports, services without
/// endpoints (reject and drop), UDP, SCTP and the localhost node-port guard.
fn every_rule_shape(n1: &planproxy_netns::Node, n2: &planproxy_netns::Node) -> ProxyPlanSpec {
    let (local, remote) = (&n1.pods[0], &n2.pods[0]);
    let mut web = service(
        "web",
        &["10.96.0.10", "fd00:96::10"],
        vec![
            endpoint(remote, 1, false),
            endpoint(local, 1, false),
            endpoint(remote, 1, true),
        ],
    );
    web.node_port = Some(30080);
    web.external_ips = vec!["192.0.2.10".into()];
    web.load_balancer_ips = vec!["198.51.100.10".into()];
    web.load_balancer_source_ranges = vec!["203.0.113.0/24".into(), "198.51.100.7/32".into()];
    let sticky = service(
        "sticky",
        &["10.96.0.11"],
        vec![endpoint(remote, 1, false), endpoint(local, 1, false)],
    )
    .with_affinity();
    let mut local_only = service(
        "local",
        &["10.96.0.12"],
        vec![endpoint(local, 1, false), endpoint(remote, 1, false)],
    )
    .external_local();
    local_only.node_port = Some(30081);
    local_only.health_check_node_port = Some(30256);
    let mut itp = service("itp", &["10.96.0.13"], vec![endpoint(remote, 1, false)]);
    itp.internal_traffic_policy = TrafficPolicy::Local;
    itp.local_endpoints = Some(EndpointSet {
        selection: EndpointSelection::None,
        endpoints: vec![],
    });
    let rejecting = service("rejecting", &["10.96.0.20"], vec![]);
    let mut dropping = service("dropping", &["10.96.0.21"], vec![]);
    dropping.no_endpoints_action = NoEndpointsAction::Drop;
    dropping.node_port = Some(30082);
    let dns = service("dns", &["10.96.0.53"], vec![endpoint(remote, 1, false)]).udp();
    let mut sig = service("sig", &["10.96.0.60"], vec![endpoint(remote, 1, false)]);
    sig.protocol = Protocol::Sctp;
    let mut spec = plan(
        n1,
        vec![web, sticky, local_only, itp, rejecting, dropping, dns, sig],
    );
    spec.settings.localhost_node_ports = true;
    spec
}

/// Rewrites, in the kernel of `node`, the first rule that DNATs to `from`
/// so that it DNATs to `to`, in place: every chain keeps its number of rules.
/// Returns the chain.
fn edit_a_dnat_rule_in_place(
    node: &planproxy_netns::Node,
    via: Backend,
    from: &str,
    to: &str,
) -> String {
    if via == Backend::Nftables {
        let listing = node
            .ns
            .exec_ok(&["nft", "-a", "list", "table", "inet", "planproxy"])
            .expect("nft list");
        let mut chain = "";
        for line in listing.lines().map(str::trim) {
            let Some((rule, handle)) = line.split_once(" # handle ") else {
                continue;
            };
            if let Some(name) = rule
                .strip_prefix("chain ")
                .and_then(|l| l.strip_suffix(" {"))
            {
                chain = name;
            }
            if !rule.contains(&format!("dnat ip to {from}")) {
                continue;
            }
            let edited = rule.replace(&format!("dnat ip to {from}"), &format!("dnat ip to {to}"));
            let mut args = vec![
                "nft",
                "replace",
                "rule",
                "inet",
                "planproxy",
                chain,
                "handle",
                handle,
            ];
            args.extend(edited.split_whitespace());
            node.ns.exec_ok(&args).expect("nft replace rule");
            return chain.to_owned();
        }
        panic!("no rule DNATs to {from}:\n{listing}");
    }
    let (save, iptables) = match via {
        Backend::IptablesLegacy => ("iptables-legacy-save", "iptables-legacy"),
        _ => ("iptables-nft-save", "iptables-nft"),
    };
    let dump = node
        .ns
        .exec_ok(&[save, "-t", "nat"])
        .expect("iptables-save");
    let mut positions: BTreeMap<&str, usize> = BTreeMap::new();
    for line in dump.lines() {
        let Some((chain, rule)) = line.strip_prefix("-A ").and_then(|l| l.split_once(' ')) else {
            continue;
        };
        let position = positions.entry(chain).or_default();
        *position += 1;
        if rule.contains(&format!("--to-destination {from}")) {
            // The shell reads the comment's quotes as iptables-save wrote them.
            let command = format!(
                "{iptables} -t nat -R {chain} {position} {}",
                rule.replace(
                    &format!("--to-destination {from}"),
                    &format!("--to-destination {to}")
                )
            );
            node.ns
                .exec_ok(&["sh", "-c", &command])
                .expect("iptables -R");
            return chain.to_owned();
        }
    }
    panic!("no rule DNATs to {from}:\n{dump}");
}

fn verify_reads_every_rule_shape_back_and_catches_a_rule_edited_in_place(via: Backend) {
    let t = topology(2, 1, 0);
    let (n1, n2) = (t.node(1), t.node(2));
    let spec = every_rule_shape(n1, n2);
    let mut dataplane = n1
        .ns
        .run_in(|| DataPlane::new(config(via)))
        .expect("data plane");
    n1.ns
        .run_in(|| dataplane.sync(&[Arc::new(spec.clone())], false))
        .expect("sync");
    n1.ns.run_in(|| dataplane.verify()).unwrap_or_else(|e| {
        panic!(
            "{via}: verify right after a sync: {e}\n{}",
            n1.ns.netfilter_report()
        )
    });

    // An incremental sync (one endpoint fewer) reads back as well.
    let mut fewer = spec.clone();
    fewer.service_ports[0]
        .cluster_endpoints
        .as_mut()
        .expect("web has endpoints")
        .endpoints
        .remove(1);
    n1.ns
        .run_in(|| dataplane.sync(&[Arc::new(fewer)], false))
        .expect("incremental sync");
    n1.ns.run_in(|| dataplane.verify()).unwrap_or_else(|e| {
        panic!(
            "{via}: verify after an incremental sync: {e}\n{}",
            n1.ns.netfilter_report()
        )
    });

    let from = format!("{}:{ECHO_PORT}", n2.pods[0].ipv4);
    let to = format!("{}:{}", n2.pods[0].ipv4, ECHO_PORT + 1);
    let chain = edit_a_dnat_rule_in_place(n1, via, &from, &to);
    let err = n1
        .ns
        .run_in(|| dataplane.verify())
        .expect_err("a DNAT port changed in place must fail verify");
    let detail = err.to_string();
    assert_eq!(err.kind(), "verify", "{detail}");
    assert!(
        detail.contains(&format!("chain {chain} rule ")),
        "{via}: names the chain: {detail}"
    );
    assert!(
        detail.contains(&from) && detail.contains(&to),
        "{via}: shows the written and the found rule: {detail}"
    );
}

/// Waits for the INIT tagged `init.initiate_tag` at `capture`; panics with
/// what the node holds when it does not come.
fn arrived(
    capture: &planproxy_netns::SctpCapture,
    init: &SctpInit,
    node: &planproxy_netns::Node,
    what: &str,
) -> planproxy_netns::ReceivedInit {
    capture
        .wait_for(init.initiate_tag, Duration::from_secs(5))
        .expect("reading the capture socket")
        .unwrap_or_else(|| {
            panic!(
                "{what}: the SCTP INIT never arrived\n{}",
                node.ns.netfilter_report()
            )
        })
}

fn sctp_reaches_endpoints_dnated_from_pods_and_masqueraded_from_outside(via: Backend) {
    const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 60);
    const ENDPOINT_PORT: u16 = 38_680;
    let t = topology(2, 1, 1);
    let (n1, n2) = (t.node(1), t.node(2));
    let (pod, backend, client) = (&n1.pods[0], &n2.pods[0], &t.clients[0]);
    // This kernel may have no SCTP sockets, only netfilter's SCTP support:
    // raw sockets carry the packets, and a failure to open one fails here.
    let capture = backend
        .ns
        .capture_sctp()
        .expect("a raw SCTP socket on the endpoint");
    let init = |destination_port, initiate_tag| SctpInit {
        source_port: 40_000,
        destination_port,
        initiate_tag,
    };

    // Without any rule: the kernel delivers raw SCTP between pods at all.
    let direct = init(ENDPOINT_PORT, 0x5c79_0001);
    pod.ns
        .send_sctp_init(None, backend.ipv4, &direct)
        .expect("sending a raw SCTP packet");
    let got = arrived(&capture, &direct, n1, "pod to pod without rules");
    assert_eq!(
        got.destination,
        SocketAddrV4::new(backend.ipv4, ENDPOINT_PORT)
    );

    let mut sig = service(
        "sig",
        &["10.96.0.60"],
        vec![mk_endpoint(backend.ipv4, ENDPOINT_PORT)],
    );
    sig.protocol = Protocol::Sctp;
    sig.port = 3868;
    sig.node_port = Some(30_868);
    apply_on(via, n1, &plan(n1, vec![sig]));

    let to_cluster_ip = init(3868, 0x5c79_0002);
    pod.ns
        .send_sctp_init(None, CLUSTER_IP, &to_cluster_ip)
        .expect("sending to the cluster IP");
    let got = arrived(&capture, &to_cluster_ip, n1, "pod to cluster IP");
    assert_eq!(
        got.destination,
        SocketAddrV4::new(backend.ipv4, ENDPOINT_PORT),
        "DNATed"
    );
    assert_eq!(
        got.source,
        SocketAddrV4::new(pod.ipv4, 40_000),
        "pod traffic keeps its source"
    );
    assert!(got.checksum_valid, "NAT must leave a valid CRC32c");

    let to_node_port = init(30_868, 0x5c79_0003);
    client
        .ns
        .send_sctp_init(None, n1.ipv4, &to_node_port)
        .expect("sending to the node port");
    let got = arrived(&capture, &to_node_port, n1, "client to node port");
    assert_eq!(
        got.destination,
        SocketAddrV4::new(backend.ipv4, ENDPOINT_PORT),
        "DNATed"
    );
    assert_eq!(
        *got.source.ip(),
        n1.ipv4,
        "masqueraded to the node's address"
    );
    assert!(got.checksum_valid, "NAT must leave a valid CRC32c");

    // Another SCTP port of the cluster IP is no frontend: nothing DNATs it.
    let other_port = init(3869, 0x5c79_0004);
    pod.ns
        .send_sctp_init(None, CLUSTER_IP, &other_port)
        .expect("sending to another port");
    let stray = capture
        .wait_for(other_port.initiate_tag, Duration::from_millis(700))
        .expect("reading the capture socket");
    assert_eq!(stray, None, "only the service's own port is DNATed");
}
