//! Which services are proxied, and the frontends each one gets.

use crate::ProblemKind;

use super::builders::*;

#[test]
fn headless_external_name_and_foreign_proxy_services_are_not_proxied() {
    let mut headless = mk_service("default", "headless", "None", &[("http", 80)]);
    spec(&mut headless).cluster_ips = Some(vec!["None".into()]);
    let mut external_name = mk_service("default", "external", "10.96.0.2", &[("http", 80)]);
    spec(&mut external_name).type_ = Some("ExternalName".into());
    let mut foreign = mk_service("default", "foreign", "10.96.0.3", &[("http", 80)]);
    foreign.metadata.labels = Some(labels(&[(
        "service.kubernetes.io/service-proxy-name",
        "other",
    )]));
    let mut labelled_headless = mk_service("default", "labelled", "10.96.0.4", &[("http", 80)]);
    labelled_headless.metadata.labels = Some(labels(&[("service.kubernetes.io/headless", "")]));
    let mut ours = mk_service("default", "ours", "10.96.0.5", &[("http", 80)]);
    ours.metadata.labels = Some(labels(&[(
        "service.kubernetes.io/service-proxy-name",
        "planproxy",
    )]));

    let res = resolve_two_nodes(
        vec![headless, external_name, foreign, labelled_headless, ours],
        vec![],
    );
    let names: Vec<String> = ports_on(&res, "n1").into_iter().map(|p| p.name).collect();
    assert_eq!(names, ["ours"]);
    assert!(
        res.problems.is_empty(),
        "skipping is not a problem: {:?}",
        res.problems
    );
}

#[test]
fn proxy_mode_load_balancer_ingress_is_excluded() {
    let mut svc = mk_service("default", "lb", "10.96.0.9", &[("http", 80)]);
    spec(&mut svc).type_ = Some("LoadBalancer".into());
    let svc = with_ingress(
        svc,
        &[
            ("192.0.2.1", Some("VIP")),
            ("192.0.2.2", Some("Proxy")),
            ("192.0.2.3", None),
            ("192.0.2.4", Some("Tunnel")),
        ],
    );
    let res = resolve_two_nodes(vec![svc], vec![]);
    assert_eq!(
        port_on(&res, "n1", "default", "lb", "http").load_balancer_ips,
        ["192.0.2.1", "192.0.2.3"]
    );
}

#[test]
fn load_balancer_ingress_without_an_ip_is_ignored_silently() {
    let mut svc = mk_service("default", "lb", "10.96.0.9", &[("http", 80)]);
    spec(&mut svc).type_ = Some("LoadBalancer".into());
    let mut svc = with_ingress(svc, &[("", None), ("192.0.2.1", None)]);
    // A hostname-only ingress point (as some clouds publish) has no IP at all.
    let ingress = svc
        .status
        .as_mut()
        .and_then(|s| s.load_balancer.as_mut())
        .and_then(|lb| lb.ingress.as_mut())
        .unwrap();
    ingress.push(k8s_openapi::api::core::v1::LoadBalancerIngress {
        hostname: Some("lb.example.com".into()),
        ..Default::default()
    });
    let res = resolve_two_nodes(vec![svc], vec![]);
    assert_eq!(
        port_on(&res, "n1", "default", "lb", "http").load_balancer_ips,
        ["192.0.2.1"]
    );
    assert!(res.problems.is_empty(), "{:?}", res.problems);
}

#[test]
fn frontends_of_a_family_the_service_lacks_are_dropped() {
    let mut svc = mk_service("default", "web", "10.96.0.9", &[("http", 80)]);
    spec(&mut svc).external_ips = Some(vec!["198.51.100.1".into(), "2001:db8::1".into()]);
    spec(&mut svc).load_balancer_source_ranges = Some(vec![" 203.0.113.7/25".into()]);
    let res = resolve_two_nodes(vec![svc], vec![]);
    let port = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(port.external_ips, ["198.51.100.1"]);
    // Source ranges are trimmed and canonical.
    assert_eq!(port.load_balancer_source_ranges, ["203.0.113.0/25"]);
}

#[test]
fn invalid_addresses_are_skipped_and_reported_with_their_field() {
    let mut svc = mk_service("default", "web", "10.96.0.9", &[("http", 80)]);
    spec(&mut svc).external_ips = Some(vec!["not-an-ip".into(), "198.51.100.1".into()]);
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![ep("10.0.1.999", "n1"), ep("10.0.1.1", "n1")],
    );
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    let port = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(port.external_ips, ["198.51.100.1"]);
    assert_eq!(addrs(&port.cluster_endpoints), ["10.0.1.1:80"]);
    let found: Vec<(String, String)> = res
        .problems
        .iter()
        .map(|p| (p.object.clone(), p.field.clone()))
        .collect();
    assert_eq!(
        found,
        [
            (
                "EndpointSlice default/web-1".to_owned(),
                "endpoints[0].addresses[0]".to_owned()
            ),
            (
                "Service default/web".to_owned(),
                "spec.externalIPs[0]".to_owned()
            ),
        ]
    );
    assert!(
        res.problems
            .iter()
            .all(|p| p.kind == ProblemKind::InvalidValue)
    );
}

#[test]
fn service_without_a_valid_cluster_ip_is_skipped_and_reported() {
    let svc = mk_service("default", "web", "10.96.0.999", &[("http", 80)]);
    let res = resolve_two_nodes(vec![svc], vec![]);
    assert!(ports_on(&res, "n1").is_empty());
    assert!(res.problems.iter().any(|p| p.field == "spec.clusterIPs[0]"));
    assert!(
        res.problems
            .iter()
            .any(|p| p.message.contains("not proxied"))
    );
}

#[test]
fn source_ranges_that_all_fail_to_parse_close_the_load_balancer() {
    let mut svc = mk_service("default", "lb", "10.96.0.9", &[("http", 80)]);
    spec(&mut svc).type_ = Some("LoadBalancer".into());
    spec(&mut svc).load_balancer_source_ranges = Some(vec!["10.0.0.0/99".into()]);
    let svc = with_ingress(svc, &[("192.0.2.1", None)]);
    let res = resolve_two_nodes(vec![svc], vec![]);
    let port = port_on(&res, "n1", "default", "lb", "http");
    assert!(
        port.load_balancer_ips.is_empty(),
        "an unparseable range must not open the VIP to all"
    );
    assert!(
        res.problems
            .iter()
            .any(|p| p.field == "spec.loadBalancerSourceRanges[0]")
    );
}

#[test]
fn selectorless_service_uses_its_manual_slices() {
    let mut svc = mk_service("default", "external-db", "10.96.0.7", &[("", 5432)]);
    spec(&mut svc).selector = None;
    let slice = mk_slice(
        "default",
        "external-db-manual",
        "external-db",
        &[("", 5432)],
        vec![ep("192.0.2.50", "")],
    );
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    let port = port_on(&res, "n1", "default", "external-db", "");
    assert_eq!(addrs(&port.cluster_endpoints), ["192.0.2.50:5432"]);
    let endpoint = &port.cluster_endpoints.unwrap().endpoints[0];
    assert!(!endpoint.local);
    // Without a nodeName the endpoint may run on any node, so every node keeps
    // hairpin masquerade for it, as kube-proxy's per-endpoint chains do.
    assert!(endpoint.node_unknown);
}

#[test]
fn slice_without_its_service_is_reported_as_dangling() {
    let slice = mk_slice(
        "default",
        "ghost-1",
        "ghost",
        &[("http", 80)],
        vec![ep("10.0.1.1", "n1")],
    );
    let res = resolve_two_nodes(vec![], vec![slice]);
    assert_eq!(res.problems.len(), 1);
    assert_eq!(res.problems[0].kind, ProblemKind::Dangling);
    assert_eq!(res.problems[0].object, "EndpointSlice default/ghost-1");
    assert!(
        res.problems[0]
            .message
            .contains("Service default/ghost does not exist")
    );
}

#[test]
fn client_ip_affinity_defaults_to_three_hours() {
    let mut svc = mk_service("default", "web", "10.96.0.9", &[("http", 80)]);
    spec(&mut svc).session_affinity = Some("ClientIP".into());
    let res = resolve_two_nodes(vec![svc.clone()], vec![]);
    assert_eq!(
        port_on(&res, "n1", "default", "web", "http")
            .session_affinity
            .unwrap()
            .timeout_seconds,
        10800
    );

    spec(&mut svc).session_affinity = Some("None".into());
    let res = resolve_two_nodes(vec![svc], vec![]);
    assert_eq!(
        port_on(&res, "n1", "default", "web", "http").session_affinity,
        None
    );
}

#[test]
fn node_port_and_health_check_port_are_carried() {
    let mut svc = mk_service("default", "np", "10.96.0.9", &[("http", 80)]);
    spec(&mut svc).type_ = Some("NodePort".into());
    spec(&mut svc).ports.as_mut().unwrap()[0].node_port = Some(30080);
    // A health-check port only counts for LoadBalancer + eTP Local.
    spec(&mut svc).health_check_node_port = Some(32000);
    let res = resolve_two_nodes(vec![svc], vec![]);
    let port = port_on(&res, "n1", "default", "np", "http");
    assert_eq!(port.node_port, Some(30080));
    assert_eq!(port.health_check_node_port, None);
}

#[test]
fn last_change_trigger_time_is_the_newest_of_the_slices() {
    let svc = mk_service("default", "web", "10.96.0.9", &[("http", 80)]);
    let mut a = mk_slice(
        "default",
        "web-a",
        "web",
        &[("http", 80)],
        vec![ep("10.0.1.1", "n1")],
    );
    let mut b = mk_slice(
        "default",
        "web-b",
        "web",
        &[("http", 80)],
        vec![ep("10.0.1.2", "n1")],
    );
    a.metadata.annotations = Some(labels(&[(
        "endpoints.kubernetes.io/last-change-trigger-time",
        "2026-01-01T10:00:00Z",
    )]));
    b.metadata.annotations = Some(labels(&[(
        "endpoints.kubernetes.io/last-change-trigger-time",
        "2026-01-01T11:00:00Z",
    )]));
    let res = resolve_two_nodes(vec![svc], vec![a, b]);
    let time = port_on(&res, "n1", "default", "web", "http")
        .last_change_trigger_time
        .unwrap();
    assert_eq!(time.0.to_string(), "2026-01-01T11:00:00Z");
}

#[test]
fn sctp_ports_are_proxied_and_unknown_protocols_reported() {
    let mut svc = mk_service("default", "sig", "10.96.0.9", &[("sctp", 3868), ("odd", 9)]);
    let ports = spec(&mut svc).ports.as_mut().unwrap();
    ports[0].protocol = Some("SCTP".into());
    ports[1].protocol = Some("QUIC".into());
    let mut slice = mk_slice(
        "default",
        "sig-1",
        "sig",
        &[("sctp", 3868)],
        vec![ep("10.0.1.1", "n1")],
    );
    slice.ports.as_mut().unwrap()[0].protocol = Some("SCTP".into());
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    let port = port_on(&res, "n1", "default", "sig", "sctp");
    assert_eq!(port.protocol, planproxy_crds::v1alpha1::Protocol::Sctp);
    assert_eq!(addrs(&port.cluster_endpoints), ["10.0.1.1:3868"]);
    assert_eq!(ports_on(&res, "n1").len(), 1);
    assert_eq!(res.problems.len(), 1);
    assert_eq!(res.problems[0].field, "spec.ports[1].protocol");
}

#[test]
fn a_service_without_an_allocated_cluster_ip_is_reported() {
    let mut svc = mk_service("default", "web", "", &[("http", 80)]);
    spec(&mut svc).cluster_ips = None;
    let res = resolve_two_nodes(vec![svc], vec![]);
    assert!(ports_on(&res, "n1").is_empty());
    assert_eq!(res.problems.len(), 1);
    assert_eq!(res.problems[0].field, "spec.clusterIP");
}

#[test]
fn ipv4_addresses_with_leading_zeros_are_read_as_decimal_like_kube_proxy() {
    let mut svc = mk_service("default", "web", "10.96.0.9", &[("http", 80)]);
    spec(&mut svc).type_ = Some("LoadBalancer".into());
    spec(&mut svc).external_ips = Some(vec!["203.0.113.010".into()]);
    spec(&mut svc).load_balancer_source_ranges = Some(vec![" 192.168.001.0/24 ".into()]);
    let svc = with_ingress(svc, &[("192.0.2.01", None)]);
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 8080)],
        vec![ep("10.180.00.001", "n1"), ep("10.180.0.2", "n2")],
    );
    let res = resolve_two_nodes(vec![svc], vec![slice]);
    assert!(res.problems.is_empty(), "{:?}", res.problems);
    let port = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(port.external_ips, ["203.0.113.10"]);
    assert_eq!(port.load_balancer_ips, ["192.0.2.1"]);
    assert_eq!(port.load_balancer_source_ranges, ["192.168.1.0/24"]);
    assert_eq!(
        addrs(&port.cluster_endpoints),
        ["10.180.0.1:8080", "10.180.0.2:8080"]
    );
}

#[test]
fn octets_beyond_255_or_four_digits_are_still_invalid() {
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 8080)],
        vec![
            ep("10.180.0.0256", "n1"),
            ep("10.180.0.1.1", "n1"),
            ep("10.180..1", "n1"),
            ep("10.180.0.2", "n2"),
        ],
    );
    let res = resolve_two_nodes(
        vec![mk_service("default", "web", "10.96.0.9", &[("http", 80)])],
        vec![slice],
    );
    let port = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(addrs(&port.cluster_endpoints), ["10.180.0.2:8080"]);
    assert_eq!(res.problems.len(), 3, "{:?}", res.problems);
    assert!(
        res.problems
            .iter()
            .all(|p| p.kind == ProblemKind::InvalidValue)
    );
}
