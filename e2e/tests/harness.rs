//! The harness itself: the namespace cluster's network, the real control
//! plane, and the Pod objects it keeps for its pods (which the real
//! EndpointSlice controller publishes), without the planproxy binaries.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::ListParams;
use planproxy_crds::labels::SERVICE_NAME_LABEL;
use planproxy_e2e::{AppDef, Cluster, ClusterSpec, ServiceDef};
use planproxy_netns::{Attempt, ConnectOpts};

/// For single attempts expected to be answered or refused: they return as soon
/// as that happens, so the generous bound only matters on a loaded machine, where
/// the echo server may not be scheduled within a second (a flaky Timeout).
fn answered() -> ConnectOpts {
    ConnectOpts::with_timeout(Duration::from_secs(10))
}

/// Polls a service's EndpointSlices (every family) until `check` holds.
async fn slices_until(
    slices: &kube::Api<EndpointSlice>,
    service: &str,
    what: &str,
    check: impl Fn(&[EndpointSlice]) -> bool,
) -> Vec<EndpointSlice> {
    let by_service = ListParams::default().labels(&format!("{SERVICE_NAME_LABEL}={service}"));
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let items = slices.list(&by_service).await.expect("slices list").items;
        if check(&items) {
            return items;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}: {items:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn ipv4_endpoints(slices: &[EndpointSlice]) -> Vec<k8s_openapi::api::discovery::v1::Endpoint> {
    slices
        .iter()
        .filter(|s| s.address_type == "IPv4")
        .flat_map(|s| s.endpoints.clone())
        .collect()
}

#[test]
fn nodes_reach_the_api_server_as_themselves_and_the_node_authorizer_limits_them_to_their_node() {
    let cluster = Cluster::start(ClusterSpec::network_only(2)).unwrap();
    let (own, other) = cluster
        .run_as_node(2, |client| async move {
            let api: kube::Api<Node> = kube::Api::all(client);
            (api.get("node2").await, api.get("node1").await)
        })
        .unwrap();
    let own = own.unwrap();
    assert_eq!(
        own.spec.unwrap_or_default().pod_cidrs.unwrap_or_default(),
        vec!["10.244.2.0/24".to_owned(), "fd00:244:2::/64".to_owned()]
    );
    match other {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 403, "{e:?}"),
        other => panic!("node2 read node1's Node object: {other:?}"),
    }
}

#[test]
fn app_pods_answer_across_nodes_and_from_outside_routing_reaches_nodes_only() {
    let cluster = Cluster::start(ClusterSpec::network_only(2)).unwrap();
    cluster
        .run(|api| async move { api.deploy(&AppDef::new("echo", 2, 8080)).await })
        .unwrap()
        .unwrap();
    let (remote_ip, remote_name) = cluster.with_app_pods("default", "echo", |pods| {
        let pod = pods.iter().find(|p| p.node_name == "node2").unwrap();
        (pod.pod.ipv6, pod.name.clone())
    });
    let probe = cluster.probe_pod(1);
    let attempt = probe
        .ns
        .connect_tcp(SocketAddr::new(remote_ip.into(), 8080), &answered());
    assert_eq!(attempt.server(), Some(remote_name.as_str()), "{attempt:?}");
    assert_eq!(
        attempt.peer().map(|p| p.ip()),
        Some(IpAddr::from(probe.ipv6))
    );
    let udp = probe
        .ns
        .connect_udp(SocketAddr::new(remote_ip.into(), 8080), &answered());
    assert_eq!(udp.server(), Some(remote_name.as_str()), "{udp:?}");
    // Nothing listens on the port a service would use: no proxy, no answer.
    let nothing = probe
        .ns
        .connect_tcp(SocketAddr::new(remote_ip.into(), 80), &answered());
    assert_eq!(nothing, Attempt::Refused);
}

#[test]
fn the_endpointslice_controller_publishes_the_harness_pods_as_they_change() {
    let cluster = Cluster::start(ClusterSpec::network_only(2)).unwrap();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("web", 3, 8080)).await.unwrap();
            api.create_service(
                &ServiceDef::cluster_ip("default", "web", "web").tcp("http", 80, 8080),
            )
            .await
            .unwrap();
            let slices: kube::Api<EndpointSlice> =
                kube::Api::namespaced(api.client.clone(), "default");
            let addresses = |list: &[EndpointSlice]| -> BTreeSet<(String, String, Option<String>)> {
                list.iter()
                    .flat_map(|s| {
                        let family = s.address_type.clone();
                        s.endpoints.iter().map(move |e| {
                            (family.clone(), e.addresses[0].clone(), e.node_name.clone())
                        })
                    })
                    .collect()
            };

            let three = addresses(
                &slices_until(&slices, "web", "3 pods x 2 families", |l| {
                    addresses(l).len() == 6
                })
                .await,
            );
            assert_eq!(three.len(), 6, "3 pods x 2 families: {three:?}");
            let expected: BTreeSet<(String, String, Option<String>)> =
                api.cluster.with_app_pods("default", "web", |pods| {
                    pods.iter()
                        .flat_map(|p| {
                            [
                                (
                                    "IPv4".to_owned(),
                                    p.pod.ipv4.to_string(),
                                    Some(p.node_name.clone()),
                                ),
                                (
                                    "IPv6".to_owned(),
                                    p.pod.ipv6.to_string(),
                                    Some(p.node_name.clone()),
                                ),
                            ]
                        })
                        .collect()
                });
            assert_eq!(three, expected);
            let nodes: BTreeSet<_> = three
                .iter()
                .filter_map(|(_, _, node)| node.clone())
                .collect();
            assert_eq!(nodes.len(), 2, "replicas spread over both nodes");

            api.scale("default", "web", 1).await.unwrap();
            let one = addresses(
                &slices_until(&slices, "web", "1 pod x 2 families", |l| {
                    addresses(l).len() == 2
                })
                .await,
            );
            assert_eq!(one.len(), 2, "{one:?}");

            api.set_terminating("default", "web", "web-0")
                .await
                .unwrap();
            let terminating = |l: &[EndpointSlice]| {
                ipv4_endpoints(l)
                    .first()
                    .and_then(|e| e.conditions.clone())
                    .is_some_and(|c| {
                        (c.ready, c.serving, c.terminating) == (Some(false), Some(true), Some(true))
                    })
            };
            slices_until(&slices, "web", "web-0 terminating and serving", terminating).await;

            api.delete_service("default", "web").await.unwrap();
            slices_until(&slices, "web", "no slices once the service is gone", |l| {
                l.is_empty()
            })
            .await;
        })
        .unwrap();
}

#[test]
fn failure_report_names_every_node_and_the_plans() {
    let cluster = Cluster::start(ClusterSpec::network_only(1)).unwrap();
    let report = cluster.report();
    assert!(report.contains("===== ProxyPlans ====="), "{report}");
    assert!(report.contains("===== netfilter node1 ====="), "{report}");
    assert!(report.contains("(controller not running)"), "{report}");
}

#[test]
fn scale_up_adds_replicas_with_fresh_addresses_on_the_chosen_nodes() {
    let cluster = Cluster::start(ClusterSpec::network_only(2)).unwrap();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("pinned", 1, 9000).on_nodes(&[2]))
                .await
                .unwrap();
            api.scale("default", "pinned", 3).await.unwrap();
        })
        .unwrap();
    let placed = cluster.with_app_pods("default", "pinned", |pods| {
        pods.iter()
            .map(|p| (p.name.clone(), p.node_name.clone(), p.pod.ipv4))
            .collect::<Vec<_>>()
    });
    assert_eq!(placed.len(), 3);
    assert!(
        placed.iter().all(|(_, node, _)| node == "node2"),
        "{placed:?}"
    );
    let ips: BTreeSet<_> = placed.iter().map(|(_, _, ip)| *ip).collect();
    assert_eq!(ips.len(), 3);
    assert_eq!(
        cluster.ready_pod_names("default", "pinned"),
        vec!["pinned-0", "pinned-1", "pinned-2"]
    );
}

#[test]
fn the_cluster_serves_the_helm_charts_crds() {
    let crds = planproxy_e2e::cluster::chart_crds().unwrap();
    let names: BTreeSet<String> = crds
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "proxyplans.planproxy.dev".to_owned(),
            "proxypolicies.planproxy.dev".to_owned()
        ])
    );
    let cluster = Cluster::start(ClusterSpec::network_only(1)).unwrap();
    let served: BTreeSet<String> = cluster
        .apiserver()
        .list("apiextensions.k8s.io/v1", "CustomResourceDefinition")
        .iter()
        .filter_map(|c| c.pointer("/metadata/name")?.as_str().map(str::to_owned))
        .collect();
    assert_eq!(served, names);
}

#[test]
fn prefer_close_services_get_zone_hints_and_deleted_apps_leave_the_slices() {
    let cluster = Cluster::start(ClusterSpec::network_only(2)).unwrap();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("near", 2, 8080)).await.unwrap();
            let service = ServiceDef::cluster_ip("default", "near", "near")
                .tcp("http", 80, 8080)
                .prefer_close();
            api.create_service(&service).await.unwrap();
            let slices: kube::Api<EndpointSlice> =
                kube::Api::namespaced(api.client.clone(), "default");
            let hinted = |l: &[EndpointSlice]| {
                let endpoints = ipv4_endpoints(l);
                endpoints.len() == 2 && endpoints.iter().all(|e| e.hints.is_some())
            };
            let slice = slices_until(&slices, "near", "both endpoints hinted", hinted).await;
            let hints: BTreeSet<(Option<String>, String)> = ipv4_endpoints(&slice)
                .iter()
                .map(|e| {
                    let zone = e.hints.clone().unwrap().for_zones.unwrap()[0].name.clone();
                    (e.zone.clone(), zone)
                })
                .collect();
            assert_eq!(
                hints,
                BTreeSet::from([
                    (Some("zone-a".to_owned()), "zone-a".to_owned()),
                    (Some("zone-b".to_owned()), "zone-b".to_owned()),
                ])
            );

            api.delete_app("default", "near").await.unwrap();
            slices_until(&slices, "near", "no endpoints once the app is gone", |l| {
                ipv4_endpoints(l).is_empty()
            })
            .await;
        })
        .unwrap();
    assert!(cluster.ready_pod_names("default", "near").is_empty());
}

#[test]
fn a_crashed_agent_is_reported_with_its_log() {
    let cluster = Cluster::start(ClusterSpec {
        controller: false,
        ..ClusterSpec::default()
    })
    .unwrap();
    cluster.processes_running().unwrap();
    let pid = cluster.agent_pid(1).unwrap().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-9", &pid])
        .status()
        .unwrap();
    assert!(killed.success());
    let report = planproxy_e2e::wait::eventually_sync(
        "node1's agent seen dead",
        Duration::from_secs(10),
        || match cluster.processes_running() {
            Ok(()) => Err("still running".to_owned()),
            Err(e) => Ok(e.to_string()),
        },
    )
    .unwrap();
    assert!(report.contains("agent on node1 exited"), "{report}");
    assert!(!report.contains("node2"), "{report}");
}
