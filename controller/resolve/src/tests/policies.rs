//! ProxyPolicy resolution.

use k8s_openapi::api::core::v1::Taint;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use planproxy_crds::v1alpha1::{
    LocalTrafficDetector, LocalTrafficDetectorMode, MasqueradeSettings, NoEndpointsAction,
    SessionAffinitySettings, SyncSettings,
};
use planproxy_crds::{ProxyPolicySpec, ProxyPolicyStatus};

use super::builders::*;
use crate::{PolicyVerdict, resolve};

fn web(labels_: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Service {
    let mut svc = mk_service("default", "web", "10.96.0.10", &[("http", 80)]);
    svc.metadata.labels = Some(labels(labels_));
    svc
}

fn nodes() -> Vec<k8s_openapi::api::core::v1::Node> {
    let mut edge = mk_node(
        "edge",
        Some("a"),
        &["192.168.0.9", "fd00::9", "192.168.0.10"],
    );
    edge.metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert("role".into(), "edge".into());
    vec![mk_node("n1", Some("a"), &["192.168.0.1"]), edge]
}

#[test]
fn without_policies_every_setting_is_kube_proxys_default() {
    let mut svc = web(&[]);
    spec(&mut svc).session_affinity = Some("ClientIP".into());
    spec(&mut svc).session_affinity_config =
        Some(k8s_openapi::api::core::v1::SessionAffinityConfig {
            client_ip: Some(k8s_openapi::api::core::v1::ClientIPConfig {
                timeout_seconds: Some(86400),
            }),
        });
    let res = resolve(&snapshot(vec![svc], vec![], nodes(), vec![]));
    let settings = &res.plans["n1"][0].spec.settings;
    assert_eq!(settings.masquerade_bit, 14);
    assert_eq!(
        settings.local_traffic_detector.mode,
        LocalTrafficDetectorMode::None
    );
    assert!(
        settings.node_port_addresses.is_empty(),
        "empty means every local address"
    );
    assert_eq!(
        (
            settings.min_sync_period.as_str(),
            settings.sync_period.as_str()
        ),
        ("1s", "30s")
    );
    assert_eq!(settings.node_ips, ["192.168.0.1"]);
    assert!(
        settings.localhost_node_ports,
        "IPv4 node ports answer on 127.0.0.1, as in kube-proxy's iptables mode"
    );
    let port = port_on(&res, "n1", "default", "web", "http");
    assert!(!port.masquerade_all);
    assert_eq!(port.no_endpoints_action, NoEndpointsAction::Reject);
    assert_eq!(
        port.session_affinity.unwrap().timeout_seconds,
        86400,
        "default cap is 86400"
    );
}

#[test]
fn highest_priority_wins_field_by_field_and_ties_go_to_the_first_name() {
    let low = mk_policy(
        "low",
        ProxyPolicySpec {
            priority: 1,
            no_endpoints_action: Some(NoEndpointsAction::Drop),
            masquerade: Some(MasqueradeSettings {
                masquerade_all: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let high = mk_policy(
        "high",
        ProxyPolicySpec {
            priority: 10,
            no_endpoints_action: Some(NoEndpointsAction::Reject),
            ..Default::default()
        },
    );
    let tie_b = mk_policy(
        "b-tie",
        ProxyPolicySpec {
            priority: 5,
            session_affinity: Some(SessionAffinitySettings {
                max_timeout_seconds: Some(200),
            }),
            ..Default::default()
        },
    );
    let tie_a = mk_policy(
        "a-tie",
        ProxyPolicySpec {
            priority: 5,
            session_affinity: Some(SessionAffinitySettings {
                max_timeout_seconds: Some(100),
            }),
            ..Default::default()
        },
    );
    let mut svc = web(&[]);
    spec(&mut svc).session_affinity = Some("ClientIP".into());
    let res = resolve(&snapshot(
        vec![svc],
        vec![],
        nodes(),
        vec![low, high, tie_b, tie_a],
    ));
    let port = port_on(&res, "n1", "default", "web", "http");
    assert_eq!(
        port.no_endpoints_action,
        NoEndpointsAction::Reject,
        "high beats low"
    );
    assert!(
        port.masquerade_all,
        "only low sets it, so low's value applies"
    );
    assert_eq!(
        port.session_affinity.unwrap().timeout_seconds,
        100,
        "a-tie sorts before b-tie"
    );
}

#[test]
fn proxy_services_false_drops_the_service_only_where_the_policy_matches() {
    let legacy = mk_policy(
        "legacy",
        ProxyPolicySpec {
            node_selector: selector(&[("role", "edge")]),
            service_selector: selector(&[("proxy", "legacy")]),
            proxy_services: Some(false),
            ..Default::default()
        },
    );
    let res = resolve(&snapshot(
        vec![
            web(&[("proxy", "legacy")]),
            mk_service("default", "other", "10.96.0.11", &[("http", 80)]),
        ],
        vec![],
        nodes(),
        vec![legacy],
    ));
    let on_edge: Vec<String> = ports_on(&res, "edge").into_iter().map(|p| p.name).collect();
    assert_eq!(on_edge, ["other"]);
    assert_eq!(ports_on(&res, "n1").len(), 2);
    let report = &res.policies["legacy"];
    assert_eq!((report.matched_nodes, report.matched_services), (1, 1));
    assert_eq!(report.verdict, PolicyVerdict::Accepted);
}

#[test]
fn node_scoped_settings_resolve_per_node() {
    let edge = mk_policy(
        "edge",
        ProxyPolicySpec {
            node_selector: selector(&[("role", "edge")]),
            node_port_addresses: Some(vec!["primary".into(), "10.1.2.3/8".into()]),
            masquerade: Some(MasqueradeSettings {
                masquerade_bit: Some(3),
                local_traffic_detector: Some(LocalTrafficDetector {
                    mode: LocalTrafficDetectorMode::NodeCidr,
                    cluster_cidrs: vec![],
                }),
                ..Default::default()
            }),
            sync: Some(SyncSettings {
                min_sync_period: Some("500ms".into()),
                sync_period: Some("1m".into()),
            }),
            ..Default::default()
        },
    );
    let mut nodes = nodes();
    nodes[1].spec.get_or_insert_with(Default::default).pod_cidrs =
        Some(vec!["10.244.9.0/24".into()]);
    let res = resolve(&snapshot(vec![web(&[])], vec![], nodes, vec![edge]));
    let settings = &res.plans["edge"][0].spec.settings;
    assert_eq!(settings.masquerade_bit, 3);
    assert_eq!(
        settings.local_traffic_detector.mode,
        LocalTrafficDetectorMode::NodeCidr
    );
    assert_eq!(settings.local_traffic_detector.cidrs, ["10.244.9.0/24"]);
    // `primary` is the first InternalIP of each family; CIDRs are canonical.
    assert_eq!(
        settings.node_port_addresses,
        ["192.168.0.9/32", "fd00::9/128", "10.0.0.0/8"]
    );
    assert_eq!(
        (
            settings.min_sync_period.as_str(),
            settings.sync_period.as_str()
        ),
        ("500ms", "60s")
    );
    // n1 is not selected: defaults.
    assert_eq!(res.plans["n1"][0].spec.settings.masquerade_bit, 14);
}

#[test]
fn cluster_cidr_detector_carries_its_cidrs() {
    let policy = mk_policy(
        "detector",
        ProxyPolicySpec {
            masquerade: Some(MasqueradeSettings {
                local_traffic_detector: Some(LocalTrafficDetector {
                    mode: LocalTrafficDetectorMode::ClusterCidr,
                    cluster_cidrs: vec!["10.244.0.0/16".into()],
                }),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    let res = resolve(&snapshot(vec![], vec![], nodes(), vec![policy]));
    assert_eq!(
        res.plans["n1"][0]
            .spec
            .settings
            .local_traffic_detector
            .cidrs,
        ["10.244.0.0/16"]
    );
}

fn invalid_drop_policy(accepted: Option<ProxyPolicySpec>) -> planproxy_crds::ProxyPolicy {
    let mut policy = mk_policy(
        "drop",
        ProxyPolicySpec {
            no_endpoints_action: Some(NoEndpointsAction::Drop),
            masquerade: Some(MasqueradeSettings {
                masquerade_bit: Some(40),
                ..Default::default()
            }),
            ..Default::default()
        },
    );
    policy.status = Some(ProxyPolicyStatus {
        accepted_spec: accepted,
        ..Default::default()
    });
    policy
}

#[test]
fn invalid_policy_is_not_applied_and_says_which_field() {
    let res = resolve(&snapshot(
        vec![web(&[])],
        vec![],
        nodes(),
        vec![invalid_drop_policy(None)],
    ));
    let report = &res.policies["drop"];
    let PolicyVerdict::Invalid(error) = &report.verdict else {
        panic!("expected Invalid, got {:?}", report.verdict)
    };
    assert_eq!(error.field, "spec.masquerade.masqueradeBit");
    assert_eq!((report.matched_nodes, report.matched_services), (0, 0));
    assert_eq!(
        port_on(&res, "n1", "default", "web", "http").no_endpoints_action,
        NoEndpointsAction::Reject
    );
    assert_eq!(res.plans["n1"][0].spec.settings.masquerade_bit, 14);
    assert!(res.problems.iter().any(|p| p.object == "ProxyPolicy drop"));
}

#[test]
fn invalid_policy_keeps_its_last_accepted_spec_in_force() {
    let accepted = ProxyPolicySpec {
        no_endpoints_action: Some(NoEndpointsAction::Drop),
        ..Default::default()
    };
    let res = resolve(&snapshot(
        vec![web(&[])],
        vec![],
        nodes(),
        vec![invalid_drop_policy(Some(accepted))],
    ));
    assert!(matches!(
        res.policies["drop"].verdict,
        PolicyVerdict::Invalid(_)
    ));
    assert_eq!(
        port_on(&res, "n1", "default", "web", "http").no_endpoints_action,
        NoEndpointsAction::Drop
    );
    assert_eq!(res.policies["drop"].matched_nodes, 2);
}

#[test]
fn node_is_terminating_when_deleted_or_tainted_for_deletion() {
    let mut nodes = nodes();
    nodes[0].metadata.deletion_timestamp = Some(Time("2026-01-01T00:00:00Z".parse().unwrap()));
    let res = resolve(&snapshot(vec![], vec![], nodes.clone(), vec![]));
    assert!(res.plans["n1"][0].spec.settings.node_terminating);
    assert!(!res.plans["edge"][0].spec.settings.node_terminating);

    nodes[0].metadata.deletion_timestamp = None;
    nodes[1].spec.get_or_insert_with(Default::default).taints = Some(vec![Taint {
        key: "ToBeDeletedByClusterAutoscaler".into(),
        effect: "NoSchedule".into(),
        ..Default::default()
    }]);
    let res = resolve(&snapshot(vec![], vec![], nodes, vec![]));
    assert!(!res.plans["n1"][0].spec.settings.node_terminating);
    assert!(res.plans["edge"][0].spec.settings.node_terminating);
}

#[test]
fn only_nodes_with_a_node_object_get_a_plan() {
    let slice = mk_slice(
        "default",
        "web-1",
        "web",
        &[("http", 80)],
        vec![ep("10.0.1.1", "ghost-node")],
    );
    let res = resolve(&snapshot(vec![web(&[])], vec![slice], nodes(), vec![]));
    assert_eq!(res.plans.keys().collect::<Vec<_>>(), ["edge", "n1"]);
}

#[test]
fn localhost_node_ports_follow_the_policy_and_only_where_node_port_addresses_cover_loopback() {
    let localhost = |setting: Option<bool>, addresses: Option<&[&str]>| {
        let policy = mk_policy(
            "node-ports",
            ProxyPolicySpec {
                localhost_node_ports: setting,
                node_port_addresses: addresses.map(|a| a.iter().map(|c| (*c).to_owned()).collect()),
                ..Default::default()
            },
        );
        let res = resolve(&snapshot(vec![web(&[])], vec![], nodes(), vec![policy]));
        res.plans["n1"][0].spec.settings.localhost_node_ports
    };
    assert!(localhost(None, None), "default on");
    assert!(!localhost(Some(false), None), "turned off");
    assert!(localhost(Some(true), Some(&["127.0.0.0/8", "10.0.0.0/8"])));
    assert!(localhost(None, Some(&["0.0.0.0/0"])));
    assert!(localhost(None, Some(&["127.0.0.1/32"])), "inside loopback");
    assert!(localhost(None, Some(&["64.0.0.0/2"])), "around loopback");
    assert!(
        localhost(None, Some(&["fd00::/8"])),
        "no IPv4 CIDR leaves every IPv4 address"
    );
    assert!(
        !localhost(None, Some(&["10.0.0.0/8"])),
        "loopback not covered"
    );
    assert!(!localhost(None, Some(&["primary"])));
    assert!(!localhost(Some(false), Some(&["127.0.0.0/8"])));
}

/// A policy answering node ports on `addresses` only, on every node.
fn node_ports_on(addresses: &[&str]) -> planproxy_crds::ProxyPolicy {
    mk_policy(
        "node-ports",
        ProxyPolicySpec {
            node_port_addresses: Some(addresses.iter().map(|a| (*a).to_owned()).collect()),
            ..Default::default()
        },
    )
}

/// A node with these `(type, address)` pairs in `status.addresses`.
fn node_with_addresses(name: &str, addresses: &[(&str, &str)]) -> k8s_openapi::api::core::v1::Node {
    let mut node = mk_node(name, Some("a"), &[]);
    node.status.get_or_insert_with(Default::default).addresses = Some(
        addresses
            .iter()
            .map(|(kind, address)| k8s_openapi::api::core::v1::NodeAddress {
                type_: (*kind).to_owned(),
                address: (*address).to_owned(),
            })
            .collect(),
    );
    node
}

#[test]
fn primary_falls_back_to_the_external_ip_of_a_family_without_an_internal_ip() {
    let node = node_with_addresses(
        "n1",
        &[
            ("Hostname", "n1"),
            ("ExternalIP", "203.0.113.7"),
            ("ExternalIP", "2001:db8::7"),
            ("InternalIP", "fd00::1"),
        ],
    );
    let res = resolve(&snapshot(
        vec![web(&[])],
        vec![],
        vec![node],
        vec![node_ports_on(&["primary"])],
    ));
    // IPv4 has only an ExternalIP; IPv6's InternalIP wins over its ExternalIP.
    assert_eq!(
        res.plans["n1"][0].spec.settings.node_port_addresses,
        ["203.0.113.7/32", "fd00::1/128"]
    );
    assert!(res.problems.is_empty(), "{:?}", res.problems);
}

#[test]
fn primary_on_a_node_without_addresses_is_reported_and_answers_on_every_address() {
    let node = node_with_addresses("n1", &[("Hostname", "n1")]);
    let res = resolve(&snapshot(
        vec![web(&[])],
        vec![],
        vec![node.clone()],
        vec![node_ports_on(&["primary"])],
    ));
    assert!(
        res.plans["n1"][0]
            .spec
            .settings
            .node_port_addresses
            .is_empty(),
        "empty means every local address, as kube-proxy does without node IPs"
    );
    assert_eq!(res.problems.len(), 1, "{:?}", res.problems);
    let problem = &res.problems[0];
    assert_eq!(
        (
            problem.object.as_str(),
            problem.field.as_str(),
            problem.kind
        ),
        (
            "Node n1",
            "status.addresses",
            crate::ProblemKind::InvalidValue
        )
    );
    assert!(
        problem.message.contains("node-ports"),
        "{}",
        problem.message
    );

    // Other listed CIDRs still narrow the node ports.
    let res = resolve(&snapshot(
        vec![web(&[])],
        vec![],
        vec![node],
        vec![node_ports_on(&["primary", "10.0.0.0/8"])],
    ));
    assert_eq!(
        res.plans["n1"][0].spec.settings.node_port_addresses,
        ["10.0.0.0/8"]
    );
    assert_eq!(res.problems.len(), 1);
}

#[test]
fn the_missing_primary_address_problem_clears_once_the_node_has_one() {
    let mut index = crate::Index::new(crate::ResolveOptions::default());
    index.apply_policy(node_ports_on(&["primary"]));
    index.apply_node(node_with_addresses("n1", &[]));
    let first = index.flush();
    assert_eq!(first.problems.len(), 1);
    index.apply_node(node_with_addresses("n1", &[("InternalIP", "192.168.0.1")]));
    let second = index.flush();
    assert!(index.problems().is_empty(), "{:?}", index.problems());
    assert_eq!(
        second.upserts[0].spec.settings.node_port_addresses,
        ["192.168.0.1/32"]
    );
}
