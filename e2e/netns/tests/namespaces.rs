//! The library against the real kernel (needs root): every namespace here is
//! created by the test and deleted by its guard.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::time::Duration;

use planproxy_netns::{Attempt, ConnectOpts, EchoConfig, Netns, Topology, TopologySpec, veth};

const A_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const B_V4: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 2);
const A_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
const B_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// Two namespaces joined by a veth pair, with documentation-range addresses.
fn pair() -> (Netns, Netns) {
    let a = Netns::new("a").expect("creating namespace a must work as root");
    let b = Netns::new("b").expect("creating namespace b must work as root");
    veth(&a, "to-b", &b, "to-a").expect("a veth pair between test namespaces");
    for (ns, ifname, v4, v6) in [(&a, "to-b", A_V4, A_V6), (&b, "to-a", B_V4, B_V6)] {
        ns.add_addr(ifname, v4.into(), 24)
            .expect("an IPv4 address inside a test namespace");
        ns.add_addr(ifname, v6.into(), 64)
            .expect("an IPv6 address inside a test namespace");
    }
    (a, b)
}

fn namespace_exists(name: &str) -> bool {
    let listing = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("`ip netns list` must run");
    String::from_utf8_lossy(&listing.stdout)
        .lines()
        .any(|line| line.split_whitespace().next() == Some(name))
}

/// For attempts expected to time out: the whole timeout is spent.
fn short() -> ConnectOpts {
    ConnectOpts::with_timeout(Duration::from_millis(500))
}

/// For attempts expected to be answered or refused: they return as soon as that
/// happens, so the generous bound only matters on a loaded machine, where the
/// echo server may not be scheduled within `short()` (seen as a flaky Timeout).
fn answered() -> ConnectOpts {
    ConnectOpts::with_timeout(Duration::from_secs(10))
}

#[test]
fn namespaces_joined_by_veth_exchange_tcp_and_udp_echo_over_both_families() {
    let (a, b) = pair();
    let _echo = b
        .serve_echo("server-b", EchoConfig::tcp_and_udp(&[7000]))
        .unwrap();

    for (server, client) in [
        (B_V4.into(), IpAddr::from(A_V4)),
        (B_V6.into(), A_V6.into()),
    ] {
        let target = SocketAddr::new(server, 7000);
        let tcp = a.connect_tcp(target, &ConnectOpts::default());
        assert!(tcp.is_ok(), "TCP to {target}: {tcp:?}");
        assert_eq!(tcp.server(), Some("server-b"));
        assert_eq!(tcp.peer().map(|p| p.ip()), Some(client));

        let udp = a.connect_udp(target, &ConnectOpts::default());
        assert!(udp.is_ok(), "UDP to {target}: {udp:?}");
        assert_eq!(udp.server(), Some("server-b"));
        assert_eq!(udp.peer().map(|p| p.ip()), Some(client));
    }
}

#[test]
fn closed_port_is_refused_but_dropped_traffic_times_out() {
    let (a, b) = pair();
    let _echo = b
        .serve_echo("server-b", EchoConfig::tcp_and_udp(&[7000, 7001]))
        .unwrap();
    // DROP on 7001, REJECT on 7002 (where nothing listens anyway), inside b.
    b.exec_with_stdin(
        &["iptables-restore"],
        "*filter\n\
         -A INPUT -p tcp --dport 7001 -j DROP\n\
         -A INPUT -p udp --dport 7001 -j DROP\n\
         -A INPUT -p tcp --dport 7003 -j REJECT\n\
         COMMIT\n",
    )
    .unwrap();

    let target = |port| SocketAddr::new(B_V4.into(), port);
    assert!(a.connect_tcp(target(7000), &answered()).is_ok());
    assert_eq!(a.connect_tcp(target(7001), &short()), Attempt::Timeout);
    assert_eq!(a.connect_tcp(target(7002), &answered()), Attempt::Refused);
    assert_eq!(a.connect_tcp(target(7003), &answered()), Attempt::Refused);
    assert_eq!(a.connect_udp(target(7001), &short()), Attempt::Timeout);
    assert_eq!(a.connect_udp(target(7002), &answered()), Attempt::Refused);
}

#[test]
fn connect_many_makes_independent_connections_with_measured_handshakes() {
    let (a, b) = pair();
    let _echo = b.serve_echo("server-b", EchoConfig::tcp(&[7000])).unwrap();
    let attempts = a.connect_many(SocketAddr::new(B_V4.into(), 7000), 20, &answered());
    assert_eq!(attempts.len(), 20);
    let mut ports: Vec<u16> = attempts.iter().map(|a| a.peer().unwrap().port()).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(ports.len(), 20, "every connection uses its own source port");
    for attempt in &attempts {
        let Attempt::Ok { connect_time, .. } = attempt else {
            panic!("{attempt:?}");
        };
        assert!(*connect_time < Duration::from_millis(500));
    }
}

#[test]
fn client_can_choose_its_source_address() {
    let (a, b) = pair();
    let second = Ipv4Addr::new(198, 51, 100, 11);
    a.add_addr("to-b", second.into(), 24).unwrap();
    let _echo = b.serve_echo("server-b", EchoConfig::tcp(&[7000])).unwrap();
    let opts = ConnectOpts {
        source: Some(second.into()),
        ..answered()
    };
    let attempt = a.connect_tcp(SocketAddr::new(B_V4.into(), 7000), &opts);
    assert_eq!(attempt.peer().map(|p| p.ip()), Some(second.into()));
}

#[test]
fn echo_server_bound_to_one_address_does_not_answer_on_another() {
    let (a, b) = pair();
    let _echo = b
        .serve_echo(
            "v6-only",
            EchoConfig {
                bind: vec![B_V6.into()],
                ..EchoConfig::tcp(&[7000])
            },
        )
        .unwrap();
    let v6 = a.connect_tcp(SocketAddr::new(B_V6.into(), 7000), &answered());
    assert!(v6.is_ok(), "{v6:?}");
    assert_eq!(
        a.connect_tcp(SocketAddr::new(B_V4.into(), 7000), &answered()),
        Attempt::Refused
    );
}

#[test]
fn dropping_the_echo_guard_stops_answering() {
    let (a, b) = pair();
    let target = SocketAddr::new(B_V4.into(), 7000);
    let echo = b
        .serve_echo("server-b", EchoConfig::tcp_and_udp(&[7000]))
        .unwrap();
    assert!(a.connect_tcp(target, &answered()).is_ok());
    drop(echo);
    assert_eq!(a.connect_tcp(target, &answered()), Attempt::Refused);
    assert_eq!(a.connect_udp(target, &answered()), Attempt::Refused);
}

#[test]
fn run_in_opens_sockets_inside_the_namespace() {
    let (_a, b) = pair();
    // B_V4 exists only inside b: binding it works there and nowhere else.
    let bound_inside = b.run_in(|| TcpListener::bind((B_V4, 0)).map(|l| l.local_addr().is_ok()));
    assert!(matches!(bound_inside, Ok(true)), "{bound_inside:?}");
    assert!(TcpListener::bind((B_V4, 0)).is_err());
}

#[test]
fn run_in_reraises_a_panic_and_try_run_in_reports_it() {
    let (a, _b) = pair();
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        a.run_in(|| panic!("inside"));
    }));
    assert!(caught.is_err());
    assert!(a.try_run_in(|| panic!("inside")).is_err());
    assert_eq!(a.try_run_in(|| 7).unwrap(), 7);
}

#[test]
fn dropping_a_namespace_deletes_it_and_kills_its_processes() {
    let ns = Netns::new("dropped").unwrap();
    let name = ns.name().to_owned();
    assert!(namespace_exists(&name));
    let sleeper = ns.spawn(&["sleep", "600"], &[]).unwrap();
    assert!(sleeper.description().contains("sleep 600"));
    let pid = sleeper.pid();
    let pid_i32 = i32::try_from(pid).unwrap();
    // `ip netns exec` enters the namespace before it execs the program.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !ns.pids().contains(&pid_i32) {
        assert!(
            std::time::Instant::now() < deadline,
            "{pid} never showed up in {}",
            ns.name()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Forget the guard so only the namespace's own cleanup can stop it.
    std::mem::forget(sleeper);
    drop(ns);
    assert!(!namespace_exists(&name));
    let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Killed: either reaped already or a zombie waiting for its parent (us).
    assert!(state.is_empty() || state.contains(") Z"), "{state}");
}

#[test]
fn a_panicking_test_still_removes_its_namespaces() {
    let mut names = Vec::new();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let (a, b) = pair();
        names.push(a.name().to_owned());
        names.push(b.name().to_owned());
        assert!(namespace_exists(a.name()));
        panic!("test failure while the topology is up");
    }));
    assert!(result.is_err());
    assert_eq!(names.len(), 2);
    for name in &names {
        assert!(!namespace_exists(name), "{name} survived the panic");
    }
}

#[test]
fn spawned_process_output_is_kept_in_its_log() {
    let ns = Netns::new("logs").unwrap();
    let mut child = ns
        .spawn(
            &["sh", "-c", "echo hello from $GREETING; ip -o link show lo"],
            &[("GREETING", "inside")],
        )
        .unwrap();
    let status = child.wait_timeout(Duration::from_secs(10)).unwrap();
    let log = child.log();
    assert!(status.is_some_and(|s| s.success()), "{status:?}: {log}");
    assert!(log.contains("hello from inside"), "{log}");
    assert!(log.contains("lo:"), "{log}");
}

#[test]
fn sysctl_only_accepts_namespaced_keys() {
    let ns = Netns::new("sysctl").unwrap();
    ns.sysctl("net.ipv4.ip_forward", "1").unwrap();
    assert_eq!(
        ns.exec_ok(&["cat", "/proc/sys/net/ipv4/ip_forward"])
            .unwrap()
            .trim(),
        "1"
    );
    assert!(ns.sysctl("kernel.panic", "1").is_err());
}

#[test]
fn topology_connects_pods_across_nodes_and_clients_to_nodes_without_nat() {
    let topology = Topology::new(TopologySpec {
        nodes: 2,
        pods_per_node: 2,
        clients: 1,
    })
    .unwrap();
    let remote = &topology.node(2).pods[1];
    let _echo = remote
        .ns
        .serve_echo("n2-pod2", EchoConfig::tcp_and_udp(&[8080]))
        .unwrap();
    let local = &topology.node(1).pods[0];

    for (server, client) in [
        (IpAddr::from(remote.ipv4), IpAddr::from(local.ipv4)),
        (remote.ipv6.into(), local.ipv6.into()),
    ] {
        let attempt = local
            .ns
            .connect_tcp(SocketAddr::new(server, 8080), &answered());
        assert_eq!(attempt.server(), Some("n2-pod2"), "{attempt:?}");
        assert_eq!(attempt.peer().map(|p| p.ip()), Some(client));
    }
    // Pods on the same node reach each other over the bridge.
    let neighbour = &topology.node(2).pods[0];
    let attempt = neighbour
        .ns
        .connect_udp(SocketAddr::new(remote.ipv4.into(), 8080), &answered());
    assert_eq!(attempt.peer().map(|p| p.ip()), Some(neighbour.ipv4.into()));

    // Another host on the node network reaches nodes directly.
    let host = topology.add_host("control-plane", 2).unwrap();
    let attempt = host.ns.connect_tcp(
        SocketAddr::new(topology.node(2).ipv4.into(), 30080),
        &answered(),
    );
    assert_eq!(attempt, Attempt::Refused, "node2 has no server on 30080");

    // A client outside the cluster reaches a node through the router.
    let node = topology.node(1);
    let _node_echo = node
        .ns
        .serve_echo("node1", EchoConfig::tcp(&[30080]))
        .unwrap();
    let client = &topology.clients[0];
    for (server, client_ip) in [
        (IpAddr::from(node.ipv4), IpAddr::from(client.ipv4)),
        (node.ipv6.into(), client.ipv6.into()),
    ] {
        let attempt = client
            .ns
            .connect_tcp(SocketAddr::new(server, 30080), &answered());
        assert_eq!(attempt.server(), Some("node1"), "{attempt:?}");
        assert_eq!(attempt.peer().map(|p| p.ip()), Some(client_ip));
    }
    let attempt = host
        .ns
        .connect_tcp(SocketAddr::new(node.ipv6.into(), 30080), &answered());
    assert_eq!(attempt.peer().map(|p| p.ip()), Some(host.ipv6.into()));
}

#[test]
fn pods_added_later_get_fresh_addresses_and_are_reachable() {
    let topology = Topology::new(TopologySpec {
        nodes: 1,
        pods_per_node: 1,
        clients: 0,
    })
    .unwrap();
    let node = topology.node(1);
    let extra = node.add_pod("extra").unwrap();
    assert_eq!(extra.ipv4, Ipv4Addr::new(10, 244, 1, 3));
    assert_eq!(extra.ipv6.to_string(), "fd00:244:1::3");
    let _echo = extra
        .ns
        .serve_echo("extra", EchoConfig::tcp(&[80]))
        .unwrap();
    let attempt = node.pods[0]
        .ns
        .connect_tcp(SocketAddr::new(extra.ipv4.into(), 80), &answered());
    assert_eq!(attempt.server(), Some("extra"));
    // The node reaches its pods directly, too.
    assert!(
        node.ns
            .connect_tcp(SocketAddr::new(extra.ipv6.into(), 80), &answered())
            .is_ok()
    );
}

#[test]
fn nodes_answer_every_rejected_connection_without_icmp_rate_limiting() {
    let topology = Topology::new(TopologySpec {
        nodes: 1,
        pods_per_node: 1,
        clients: 0,
    })
    .unwrap();
    let node = topology.node(1);
    node.ns
        .exec_with_stdin(
            &["iptables-restore"],
            "*filter\n-A FORWARD -p tcp --dport 9 -j REJECT\nCOMMIT\n",
        )
        .unwrap();
    // Routed through the node towards the router, rejected on the way.
    let target = SocketAddr::new(Ipv4Addr::new(172, 31, 0, 200).into(), 9);
    let pod = &node.pods[0];
    let attempts = pod.ns.connect_many(target, 30, &answered());
    assert!(
        attempts.iter().all(|a| *a == Attempt::Refused),
        "{attempts:?}"
    );
}
