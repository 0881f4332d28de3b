//! kube-proxy's endpoint categorisation, per node.

use planproxy_crds::v1alpha1::{EndpointSelection, TrafficPolicy};

use super::builders::*;

fn web() -> k8s_openapi::api::core::v1::Service {
    mk_service("default", "web", "10.96.0.10", &[("http", 80)])
}

#[test]
fn cluster_endpoints_are_the_ready_ones_sorted_as_ip_port_strings() {
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 8080)],
        vec![
            ep("10.0.1.2", "n1"),
            ep_with("10.0.1.3", "n2", false, false, false),
            ep("10.0.1.10", "n2"),
        ],
    );
    let res = resolve_two_nodes(vec![web()], vec![slice]);
    let port = port_on(&res, "n1", "default", "web", "http");
    // String order, as kube-proxy: "10.0.1.10" sorts before "10.0.1.2".
    assert_eq!(
        addrs(&port.cluster_endpoints),
        ["10.0.1.10:8080", "10.0.1.2:8080"]
    );
    let set = port.cluster_endpoints.unwrap();
    assert_eq!(set.selection, EndpointSelection::Ready);
    assert!(set.endpoints[1].local, "10.0.1.2 runs on n1");
    assert!(!set.endpoints[0].local);
    assert!(
        set.endpoints.iter().all(|e| !e.node_unknown),
        "the slice names every endpoint's node"
    );
    assert!(port.has_endpoints);
    assert_eq!(port.local_endpoints, None, "no traffic policy is Local");
}

#[test]
fn serving_terminating_endpoints_are_used_only_when_none_is_ready() {
    let terminating = ep_with("10.0.1.5", "n2", false, true, true);
    let with_ready = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![ep("10.0.1.1", "n1"), terminating.clone()],
    );
    let res = resolve_two_nodes(vec![web()], vec![with_ready]);
    assert_eq!(
        addrs(&port_on(&res, "n1", "default", "web", "http").cluster_endpoints),
        ["10.0.1.1:80"]
    );

    let only_terminating = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![terminating],
    );
    let res = resolve_two_nodes(vec![web()], vec![only_terminating]);
    let port = port_on(&res, "n1", "default", "web", "http");
    let set = port.cluster_endpoints.unwrap();
    assert_eq!(set.selection, EndpointSelection::TerminatingFallback);
    assert_eq!(set.endpoints.len(), 1);
    assert!(set.endpoints[0].terminating);
    assert!(
        port.has_endpoints,
        "a serving terminating endpoint is usable"
    );
}

#[test]
fn terminating_endpoints_that_are_not_serving_are_never_used() {
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![ep_with("10.0.1.5", "n1", false, false, true)],
    );
    let res = resolve_two_nodes(vec![web()], vec![slice]);
    let port = port_on(&res, "n1", "default", "web", "http");
    assert!(!port.has_endpoints);
    let set = port.cluster_endpoints.unwrap();
    assert_eq!(set.selection, EndpointSelection::None);
    assert!(set.endpoints.is_empty());
}

#[test]
fn service_without_any_slice_is_planned_without_endpoints() {
    let res = resolve_two_nodes(vec![web()], vec![]);
    let port = port_on(&res, "n2", "default", "web", "http");
    assert!(!port.has_endpoints);
    assert_eq!(
        port.cluster_endpoints.unwrap().selection,
        EndpointSelection::None
    );
}

#[test]
fn local_fallback_is_decided_independently_of_the_cluster_set() {
    let mut svc = web();
    spec(&mut svc).internal_traffic_policy = Some("Local".into());
    spec(&mut svc).type_ = Some("NodePort".into());
    spec(&mut svc).ports.as_mut().unwrap()[0].node_port = Some(30080);
    // n1 only has a terminating endpoint; n2 has a ready one.
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![
            ep_with("10.0.1.1", "n1", false, true, true),
            ep("10.0.2.1", "n2"),
        ],
    );
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    let port = port_on(&res, "n1", "default", "web", "http");
    let local = port.local_endpoints.clone().unwrap();
    assert_eq!(local.selection, EndpointSelection::TerminatingFallback);
    assert_eq!(addrs(&port.local_endpoints), ["10.0.1.1:80"]);
    // The cluster set (used by the NodePort under eTP Cluster) has a ready endpoint,
    // so it ignores the terminating one.
    let cluster = port.cluster_endpoints.clone().unwrap();
    assert_eq!(cluster.selection, EndpointSelection::Ready);
    assert_eq!(addrs(&port.cluster_endpoints), ["10.0.2.1:80"]);
}

fn zoned(hints: [&[&str]; 3]) -> k8s_openapi::api::discovery::v1::EndpointSlice {
    mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![
            zone_hinted(ep("10.0.1.1", "n1"), hints[0]),
            zone_hinted(ep("10.0.2.1", "n2"), hints[1]),
            zone_hinted(ep("10.0.2.2", "n2"), hints[2]),
        ],
    )
}

#[test]
fn zone_hints_narrow_cluster_endpoints_to_the_nodes_zone() {
    let res = resolve_two_nodes(vec![web()], vec![zoned([&["a"], &["b"], &["b"]])]);
    let on_n1 = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(
        on_n1.cluster_endpoints.as_ref().unwrap().selection,
        EndpointSelection::TopologyZone
    );
    assert_eq!(addrs(&on_n1.cluster_endpoints), ["10.0.1.1:80"]);
    let on_n2 = port_on(&res, "n2", "default", "web", "http");
    assert_eq!(
        addrs(&on_n2.cluster_endpoints),
        ["10.0.2.1:80", "10.0.2.2:80"]
    );
}

#[test]
fn one_ready_endpoint_without_a_hint_disables_topology() {
    let res = resolve_two_nodes(vec![web()], vec![zoned([&["a"], &["b"], &[]])]);
    let on_n1 = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(
        on_n1.cluster_endpoints.as_ref().unwrap().selection,
        EndpointSelection::Ready
    );
    assert_eq!(addrs(&on_n1.cluster_endpoints).len(), 3);
}

#[test]
fn hints_that_skip_the_nodes_zone_disable_topology_for_that_node() {
    let res = resolve_two_nodes(vec![web()], vec![zoned([&["b"], &["b"], &["b"]])]);
    let on_n1 = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(
        on_n1.cluster_endpoints.as_ref().unwrap().selection,
        EndpointSelection::Ready
    );
    assert_eq!(addrs(&on_n1.cluster_endpoints).len(), 3);
}

#[test]
fn node_without_zone_label_ignores_zone_hints() {
    let res = crate::resolve(&snapshot(
        vec![web()],
        vec![zoned([&["a"], &["b"], &["b"]])],
        vec![mk_node("n1", None, &[])],
        vec![],
    ));
    assert_eq!(
        addrs(&port_on(&res, "n1", "default", "web", "http").cluster_endpoints).len(),
        3
    );
}

#[test]
fn node_hints_win_over_zone_hints() {
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![
            node_hinted(zone_hinted(ep("10.0.1.1", "n1"), &["a"]), &["n1"]),
            node_hinted(zone_hinted(ep("10.0.1.2", "n3"), &["a"]), &["n3"]),
        ],
    );
    let res = resolve_two_nodes(vec![web()], vec![slice]);
    let on_n1 = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(
        on_n1.cluster_endpoints.as_ref().unwrap().selection,
        EndpointSelection::TopologyNode
    );
    assert_eq!(addrs(&on_n1.cluster_endpoints), ["10.0.1.1:80"]);
    // n2 (zone b) has neither a node nor a zone hint: all ready endpoints.
    let on_n2 = port_on(&res, "n2", "default", "web", "http");
    assert_eq!(
        on_n2.cluster_endpoints.as_ref().unwrap().selection,
        EndpointSelection::Ready
    );
}

#[test]
fn topology_never_narrows_local_endpoints() {
    let mut svc = web();
    spec(&mut svc).internal_traffic_policy = Some("Local".into());
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![
            zone_hinted(ep("10.0.1.1", "n1"), &["b"]),
            zone_hinted(ep("10.0.2.1", "n2"), &["b"]),
        ],
    );
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    let port = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(
        port.cluster_endpoints, None,
        "iTP Local and not externally reachable"
    );
    assert_eq!(addrs(&port.local_endpoints), ["10.0.1.1:80"]);
}

#[test]
fn terminating_fallback_ignores_topology() {
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![
            zone_hinted(ep_with("10.0.1.1", "n1", false, true, true), &["b"]),
            zone_hinted(ep_with("10.0.2.1", "n2", false, true, true), &["b"]),
        ],
    );
    let res = resolve_two_nodes(vec![web()], vec![slice]);
    assert_eq!(
        addrs(&port_on(&res, "n1", "default", "web", "http").cluster_endpoints).len(),
        2
    );
}

#[test]
fn duplicate_endpoints_across_slices_keep_the_non_terminating_copy() {
    let a = mk_slice(
        "default",
        "web-a",
        "web",
        &[("http", 80)],
        vec![ep_with("10.0.1.1", "n1", false, true, true)],
    );
    let b = mk_slice(
        "default",
        "web-b",
        "web",
        &[("http", 80)],
        vec![ep("10.0.1.1", "n1")],
    );
    let res = resolve_two_nodes(vec![web()], vec![a.clone(), b.clone()]);
    let set = port_on(&res, "n1", "default", "web", "http")
        .cluster_endpoints
        .unwrap();
    assert_eq!(set.endpoints.len(), 1);
    assert!(set.endpoints[0].ready && !set.endpoints[0].terminating);
    // Same result whichever slice comes first.
    let res = resolve_two_nodes(vec![web()], vec![b, a]);
    assert!(
        port_on(&res, "n1", "default", "web", "http")
            .cluster_endpoints
            .unwrap()
            .endpoints[0]
            .ready
    );
}

#[test]
fn named_target_ports_join_by_name_and_protocol_and_dnat_to_the_slice_port() {
    let svc = mk_service(
        "default",
        "web",
        "10.96.0.10",
        &[("http", 80), ("metrics", 9090)],
    );
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 8080), ("metrics", 19090)],
        vec![ep("10.0.1.1", "n1")],
    );
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    assert_eq!(
        addrs(&port_on(&res, "n1", "default", "web", "http").cluster_endpoints),
        ["10.0.1.1:8080"]
    );
    assert_eq!(
        addrs(&port_on(&res, "n1", "default", "web", "metrics").cluster_endpoints),
        ["10.0.1.1:19090"]
    );
}

#[test]
fn a_slice_port_of_another_protocol_does_not_join() {
    let svc = mk_service("default", "dns", "10.96.0.53", &[("dns", 53)]);
    let mut slice = mk_slice(
        "default",
        "dns-1",
        "dns",
        &[("dns", 53)],
        vec![ep("10.0.1.1", "n1")],
    );
    slice.ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    let port = port_on(&res, "n1", "default", "dns", "dns");
    assert!(!port.has_endpoints);
}

#[test]
fn udp_and_tcp_on_one_port_number_are_separate_service_ports() {
    let mut svc = mk_service(
        "default",
        "dns",
        "10.96.0.53",
        &[("dns", 53), ("dns-tcp", 53)],
    );
    spec(&mut svc).ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
    let mut slice = mk_slice(
        "default",
        "dns-1",
        "dns",
        &[("dns", 53), ("dns-tcp", 53)],
        vec![ep("10.0.1.1", "n1")],
    );
    slice.ports.as_mut().unwrap()[0].protocol = Some("UDP".into());
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    let ports = ports_on(&res, "n1");
    assert_eq!(ports.len(), 2);
    assert!(ports.iter().all(|p| p.has_endpoints));
    assert_eq!(
        ports.iter().map(|p| p.protocol).collect::<Vec<_>>(),
        [
            planproxy_crds::v1alpha1::Protocol::Udp,
            planproxy_crds::v1alpha1::Protocol::Tcp
        ]
    );
}

#[test]
fn dual_stack_service_gets_endpoints_of_both_families() {
    let mut svc = web();
    spec(&mut svc).cluster_ips = Some(vec!["10.96.0.10".into(), "fd00::10".into()]);
    let v4 = mk_slice(
        "default",
        "web-v4",
        "web",
        &[("http", 80)],
        vec![ep("10.0.1.1", "n1")],
    );
    let v6 = mk_slice(
        "default",
        "web-v6",
        "web",
        &[("http", 80)],
        vec![ep("fd00:1::1", "n2")],
    );
    let res = resolve_two_nodes(vec![svc], vec![v4.clone(), v6.clone()]);
    let port = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(port.cluster_ips, ["10.96.0.10", "fd00::10"]);
    assert_eq!(
        addrs(&port.cluster_endpoints),
        ["10.0.1.1:80", "[fd00:1::1]:80"]
    );

    // A single-stack service ignores slices of the other family.
    let res = resolve_two_nodes(vec![web()], vec![v4, v6]);
    assert_eq!(
        addrs(&port_on(&res, "n1", "default", "web", "http").cluster_endpoints),
        ["10.0.1.1:80"]
    );
}

#[test]
fn dual_stack_families_fall_back_to_terminating_independently() {
    let mut svc = web();
    spec(&mut svc).cluster_ips = Some(vec!["10.96.0.10".into(), "fd00::10".into()]);
    let v4 = mk_slice(
        "default",
        "web-v4",
        "web",
        &[("http", 80)],
        vec![ep("10.0.1.1", "n1")],
    );
    let v6 = mk_slice(
        "default",
        "web-v6",
        "web",
        &[("http", 80)],
        vec![ep_with("fd00:1::1", "n2", false, true, true)],
    );
    let res = resolve_two_nodes(vec![svc], vec![v4, v6]);
    let port = port_on(&res, "n1", "default", "web", "http");
    // IPv6 has no ready endpoint, so its terminating one serves IPv6 traffic.
    assert_eq!(
        addrs(&port.cluster_endpoints),
        ["10.0.1.1:80", "[fd00:1::1]:80"]
    );
}

fn local_lb() -> k8s_openapi::api::core::v1::Service {
    let mut svc = mk_service("shop", "front", "10.96.0.40", &[("https", 443)]);
    let s = spec(&mut svc);
    s.type_ = Some("LoadBalancer".into());
    s.external_traffic_policy = Some("Local".into());
    s.health_check_node_port = Some(32100);
    s.ports.as_mut().unwrap()[0].node_port = Some(31443);
    with_ingress(svc, &[("192.0.2.40", None)])
}

#[test]
fn external_policy_local_uses_local_endpoints_for_external_traffic() {
    let slice = mk_slice(
        "shop",
        "front-1",
        "front",
        &[("https", 8443)],
        vec![ep("10.0.1.1", "n1"), ep("10.0.2.1", "n2")],
    );
    let res = resolve_two_nodes(vec![local_lb()], vec![slice]);
    let port = port_on(&res, "n1", "shop", "front", "https");
    assert_eq!(port.external_traffic_policy, TrafficPolicy::Local);
    assert_eq!(port.health_check_node_port, Some(32100));
    assert_eq!(addrs(&port.local_endpoints), ["10.0.1.1:8443"]);
    // The cluster set still serves pod and node traffic.
    assert_eq!(
        addrs(&port.cluster_endpoints),
        ["10.0.1.1:8443", "10.0.2.1:8443"]
    );
}

#[test]
fn external_policy_local_node_without_local_endpoints_gets_an_empty_local_set() {
    let slice = mk_slice(
        "shop",
        "front-1",
        "front",
        &[("https", 8443)],
        vec![ep("10.0.2.1", "n2")],
    );
    let res = resolve_two_nodes(vec![local_lb()], vec![slice]);
    let port = port_on(&res, "n1", "shop", "front", "https");
    assert!(
        port.has_endpoints,
        "the service has endpoints elsewhere: DROP, not REJECT"
    );
    assert_eq!(
        port.local_endpoints.unwrap().selection,
        EndpointSelection::None
    );
}

#[test]
fn external_traffic_policy_local_needs_an_externally_reachable_service() {
    let mut svc = web();
    spec(&mut svc).external_traffic_policy = Some("Local".into());
    let res = resolve_two_nodes(vec![svc.clone()], vec![]);
    let port = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(port.external_traffic_policy, TrafficPolicy::Cluster);
    assert_eq!(port.local_endpoints, None);

    // externalIPs make a ClusterIP service externally reachable.
    spec(&mut svc).external_ips = Some(vec!["198.51.100.7".into()]);
    let res = resolve_two_nodes(vec![svc], vec![]);
    let port = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(port.external_traffic_policy, TrafficPolicy::Local);
    assert!(port.local_endpoints.is_some());
}

#[test]
fn local_policies_never_select_remote_endpoints() {
    let mut svc = local_lb();
    spec(&mut svc).internal_traffic_policy = Some("Local".into());
    let slice = mk_slice(
        "shop",
        "front-1",
        "front",
        &[("https", 8443)],
        vec![
            ep("10.0.2.1", "n2"),
            ep_with("10.0.2.2", "n2", false, true, true),
            ep("10.0.9.9", ""),
        ],
    );
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    let port = port_on(&res, "n1", "shop", "front", "https");
    assert!(port.local_endpoints.unwrap().endpoints.is_empty());
    let on_n2 = port_on(&res, "n2", "shop", "front", "https");
    assert_eq!(addrs(&on_n2.local_endpoints), ["10.0.2.1:8443"]);
}

#[test]
fn slice_ports_without_a_name_or_number_join_no_service_port() {
    // The service's single port is unnamed (""); a slice port whose name is
    // missing altogether is not that port, and one without a number is unusable.
    let svc = mk_service("default", "web", "10.96.0.10", &[("", 80)]);
    let mut unnamed = mk_slice(
        "default",
        "web-1",
        "web",
        &[("", 8080)],
        vec![ep("10.0.1.1", "n1")],
    );
    unnamed.ports.as_mut().unwrap()[0].name = None;
    let mut numberless = mk_slice(
        "default",
        "web-2",
        "web",
        &[("", 8080)],
        vec![ep("10.0.1.2", "n1")],
    );
    numberless.ports.as_mut().unwrap()[0].port = None;
    let named = mk_slice(
        "default",
        "web-3",
        "web",
        &[("", 8081)],
        vec![ep("10.0.1.3", "n1")],
    );
    let res = resolve_two_nodes(vec![svc], vec![unnamed, numberless, named]);
    let port = port_on(&res, "n1", "default", "web", "");
    assert_eq!(addrs(&port.cluster_endpoints), ["10.0.1.3:8081"]);
    assert!(res.problems.is_empty(), "{:?}", res.problems);
}
