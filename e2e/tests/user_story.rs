//! User stories, end to end: the real controller and agents in a namespace
//! cluster (see `planproxy_e2e`), checked through the API and with traffic.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use planproxy_crds::ProxyPlan;
use planproxy_crds::condition::{FALSE, TRUE};
use planproxy_crds::labels::SPEC_HASH_ANNOTATION;
use planproxy_e2e::plans::services_of;
use planproxy_e2e::target::RUN_LABEL;
use planproxy_e2e::traffic::{wait_attempt, wait_peer_ip, wait_servers, wait_unanswered};
use planproxy_e2e::{
    AppDef, Cluster, ClusterApi, ClusterSpec, Protocol, RealCluster, ServiceDef, Target, Workloads,
};
use planproxy_netns::{Attempt, Netns};
use serde_json::json;

/// How long the control loop (controller coalescing, agent sync) may take.
const CONVERGE: Duration = Duration::from_secs(30);

fn web_service() -> ServiceDef {
    ServiceDef::cluster_ip("default", "web", "web")
        .tcp("http", 80, 8080)
        .udp("dns", 53, 8080)
}

/// planproxy's rules on node `node`, whichever backend its agent runs.
fn proxy_rules(cluster: &Cluster, node: u8) -> planproxy_netns::ProxyRules {
    cluster
        .node(node)
        .ns
        .proxy_rules()
        .expect("reading the node's planproxy rules")
}

fn start() -> Cluster {
    Cluster::start(ClusterSpec::default()).expect("the namespace cluster must start (as root)")
}

/// Deploys `web` (two pods) behind [`web_service`] and waits until every node
/// has programmed it with endpoints; returns the plans.
async fn deploy_web_until_programmed(api: &ClusterApi<'_>) -> Vec<ProxyPlan> {
    api.deploy(&AppDef::new("web", 2, 8080))
        .await
        .expect("deploying web");
    api.create_service(&web_service())
        .await
        .expect("creating default/web");
    api.wait_programmed(Some(("default/web", true)), CONVERGE)
        .await
        .expect("every node programs default/web")
}

/// Neither the controller nor any agent has exited (crashed) during the test.
fn assert_controller_and_agents_running(cluster: &Cluster) {
    cluster
        .processes_running()
        .expect("controller and agents still running");
}

#[test]
fn cluster_ip_service_reaches_its_pods_from_every_node() {
    let cluster = start();
    cluster
        .run(|api| async move {
            deploy_web_until_programmed(&api).await;
        })
        .unwrap();
    let pods = cluster.ready_pod_names("default", "web");
    for node in 1..=2 {
        let probe = &cluster.probe_pod(node).ns;
        for ipv6 in [false, true] {
            let http = cluster.service_addr("default", "web", 80, ipv6).unwrap();
            wait_servers(probe, http, Protocol::Tcp, &pods, CONVERGE).unwrap();
            let dns = cluster.service_addr("default", "web", 53, ipv6).unwrap();
            wait_servers(probe, dns, Protocol::Udp, &pods, CONVERGE).unwrap();
        }
    }
    assert_controller_and_agents_running(&cluster);
}

#[test]
fn node_port_is_reachable_from_a_client_outside_the_cluster_on_every_node() {
    let cluster = start();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("shop", 2, 8080)).await.unwrap();
            let service = ServiceDef::cluster_ip("default", "shop", "shop")
                .tcp("http", 80, 8080)
                .node_port();
            api.create_service(&service).await.unwrap();
            api.wait_programmed(Some(("default/shop", true)), CONVERGE)
                .await
                .unwrap();
        })
        .unwrap();
    let pods = cluster.ready_pod_names("default", "shop");
    let node_port = cluster.node_port("default", "shop", 80).unwrap();
    let client = cluster.client(1);
    for node in 1..=2 {
        let n = cluster.node(node);
        for ip in [IpAddr::from(n.ipv4), IpAddr::from(n.ipv6)] {
            let target = SocketAddr::new(ip, node_port);
            wait_servers(&client.ns, target, Protocol::Tcp, &pods, CONVERGE).unwrap();
        }
        // externalTrafficPolicy Cluster: the node may forward to another
        // node, so it masquerades and the pod never sees the client.
        let seen = wait_peer_ip(
            &client.ns,
            SocketAddr::new(n.ipv4.into(), node_port),
            CONVERGE,
        )
        .unwrap();
        assert_ne!(seen, IpAddr::from(client.ipv4));
    }
    assert_controller_and_agents_running(&cluster);
}

#[test]
fn scaling_endpoints_up_and_down_moves_traffic_with_them() {
    let cluster = start();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("web", 1, 8080)).await.unwrap();
            api.create_service(&web_service()).await.unwrap();
        })
        .unwrap();
    let probe = &cluster.probe_pod(1).ns;
    let vip = cluster.service_addr("default", "web", 80, false).unwrap();
    wait_servers(probe, vip, Protocol::Tcp, &["web-0".into()], CONVERGE).unwrap();

    cluster
        .run(|api| async move { api.scale("default", "web", 3).await.unwrap() })
        .unwrap();
    let three = cluster.ready_pod_names("default", "web");
    assert_eq!(three.len(), 3);
    wait_servers(probe, vip, Protocol::Tcp, &three, CONVERGE).unwrap();

    cluster
        .run(|api| async move { api.scale("default", "web", 1).await.unwrap() })
        .unwrap();
    wait_servers(probe, vip, Protocol::Tcp, &["web-0".into()], CONVERGE).unwrap();

    // No endpoints left: the frontend rejects (kube-proxy's default), so the
    // client fails at once instead of timing out.
    cluster
        .run(|api| async move { api.scale("default", "web", 0).await.unwrap() })
        .unwrap();
    wait_attempt(probe, vip, &Attempt::Refused, CONVERGE).unwrap();
    assert_controller_and_agents_running(&cluster);
}

#[test]
fn deleting_a_service_removes_its_rules_from_every_node() {
    let cluster = start();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("web", 2, 8080)).await.unwrap();
            api.create_service(&web_service()).await.unwrap();
            api.create_service(
                &ServiceDef::cluster_ip("default", "keep", "web").tcp("http", 81, 8080),
            )
            .await
            .unwrap();
            // Traffic from node1 below says nothing about node2: wait until
            // every node has programmed web before looking at its rules.
            api.wait_programmed(Some(("default/web", true)), CONVERGE)
                .await
                .unwrap();
        })
        .unwrap();
    let vip = cluster.service_addr("default", "web", 80, false).unwrap();
    let pods = cluster.ready_pod_names("default", "web");
    wait_servers(
        &cluster.probe_pod(1).ns,
        vip,
        Protocol::Tcp,
        &pods,
        CONVERGE,
    )
    .unwrap();
    // Rules are found by the services' cluster IPs, which every backend's
    // rules name (nftables carries no comments to find a service by).
    let keep_vip = cluster.service_addr("default", "keep", 81, false).unwrap();
    for node in 1..=2 {
        let rules = proxy_rules(&cluster, node);
        assert!(
            rules.mentions(vip.ip()),
            "node{node} has no rules for default/web:\n{rules}"
        );
    }

    cluster
        .run(|api| async move {
            api.delete_service("default", "web").await.unwrap();
            api.wait_programmed(Some(("default/web", false)), CONVERGE)
                .await
                .unwrap();
        })
        .unwrap();
    for node in 1..=2 {
        wait_unanswered(&cluster.probe_pod(node).ns, vip, CONVERGE).unwrap();
        let rules = proxy_rules(&cluster, node);
        assert!(
            !rules.mentions(vip.ip()),
            "node{node} kept rules for default/web:\n{rules}"
        );
        assert!(
            rules.mentions(keep_vip.ip()),
            "node{node} lost default/keep:\n{rules}"
        );
    }
    assert_controller_and_agents_running(&cluster);
}

fn masquerade_all_on_node1(name: &str) -> serde_json::Value {
    json!({
        "apiVersion": "planproxy.dev/v1alpha1",
        "kind": "ProxyPolicy",
        "metadata": {"name": name},
        "spec": {
            "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "node1"}},
            "masquerade": {"masqueradeAll": true},
        },
    })
}

/// Applies [`masquerade_all_on_node1`] as `name` and waits until the
/// controller has accepted it.
fn apply_accepted_masquerade_all_on_node1(cluster: &Cluster, name: &str) {
    let name = name.to_owned();
    cluster
        .run(|api| async move {
            api.apply_policy(masquerade_all_on_node1(&name))
                .await
                .expect("applying the policy");
            let (_, accepted) = api
                .wait_policy_judged(&name, CONVERGE)
                .await
                .expect("the controller judges the policy");
            assert_eq!(accepted.status, TRUE, "{accepted:?}");
        })
        .expect("running in the control plane namespace");
}

/// Waits until the backend behind `vip` sees connections from `client` come
/// from `source` (`what` names the expectation in the failure).
fn wait_until_backend_sees(client: &Netns, vip: SocketAddr, source: IpAddr, what: &str) {
    planproxy_e2e::wait::eventually_sync(what, CONVERGE, || {
        let seen = wait_peer_ip(client, vip, CONVERGE).map_err(|e| e.to_string())?;
        if seen == source {
            Ok(())
        } else {
            Err(format!("backend saw {seen}"))
        }
    })
    .expect("the backend sees the expected source");
}

/// web on node2 only, so that from either node's probe pod the backend's
/// view of the source is the probe pod (not masqueraded) or a node address.
fn start_with_remote_web() -> Cluster {
    let cluster = start();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("web", 1, 8080).on_nodes(&[2]))
                .await
                .expect("deploying web on node2");
            api.create_service(&web_service())
                .await
                .expect("creating default/web");
        })
        .expect("running in the control plane namespace");
    cluster
}

#[test]
fn masquerade_all_policy_changes_the_source_on_the_selected_node_only() {
    let cluster = start_with_remote_web();
    let vip = cluster.service_addr("default", "web", 80, false).unwrap();
    let (probe1, probe2) = (cluster.probe_pod(1), cluster.probe_pod(2));
    assert_eq!(
        wait_peer_ip(&probe1.ns, vip, CONVERGE).unwrap(),
        IpAddr::from(probe1.ipv4)
    );

    apply_accepted_masquerade_all_on_node1(&cluster, "masquerade-node1");
    let node1 = IpAddr::from(cluster.node(1).ipv4);
    wait_until_backend_sees(&probe1.ns, vip, node1, "node1 masquerades");
    assert_eq!(
        wait_peer_ip(&probe2.ns, vip, CONVERGE).unwrap(),
        IpAddr::from(probe2.ipv4)
    );
    assert_controller_and_agents_running(&cluster);
}

#[test]
fn invalid_policy_edit_is_rejected_naming_the_field_and_the_previous_behaviour_stays() {
    let cluster = start_with_remote_web();
    let vip = cluster.service_addr("default", "web", 80, false).unwrap();
    let node1 = IpAddr::from(cluster.node(1).ipv4);
    let probe1 = cluster.probe_pod(1);
    apply_accepted_masquerade_all_on_node1(&cluster, "masquerade");
    wait_until_backend_sees(&probe1.ns, vip, node1, "node1 masquerades");

    cluster
        .run(|api| async move {
            let mut invalid = masquerade_all_on_node1("masquerade");
            invalid["spec"]["nodeSelector"] = json!({"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "Bogus", "values": ["node1"]},
            ]});
            api.apply_policy(invalid).await.unwrap();
            let (policy, accepted) = api
                .wait_policy_judged("masquerade", CONVERGE)
                .await
                .unwrap();
            assert_eq!(accepted.status, FALSE, "{accepted:?}");
            assert_eq!(accepted.reason, "Invalid", "{accepted:?}");
            assert!(accepted.message.contains("nodeSelector"), "{accepted:?}");
            let kept = policy.status.unwrap_or_default().accepted_spec;
            assert!(
                kept.is_some_and(|spec| spec.masquerade.is_some()),
                "the accepted spec is kept in status"
            );
            // Every node stays programmed: nothing crashed or went stale.
            api.wait_programmed(None, CONVERGE).await.unwrap();
        })
        .unwrap();
    assert_eq!(wait_peer_ip(&probe1.ns, vip, CONVERGE).unwrap(), node1);
    let probe2 = cluster.probe_pod(2);
    assert_eq!(
        wait_peer_ip(&probe2.ns, vip, CONVERGE).unwrap(),
        IpAddr::from(probe2.ipv4)
    );
    assert_controller_and_agents_running(&cluster);
}

#[test]
fn proxy_services_false_leaves_labelled_services_alone_on_the_selected_node() {
    let cluster = start();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("web", 2, 8080)).await.unwrap();
            api.create_service(&web_service()).await.unwrap();
            let legacy = ServiceDef::cluster_ip("default", "legacy", "web")
                .tcp("http", 80, 8080)
                .label("proxy", "other");
            api.create_service(&legacy).await.unwrap();
            api.apply_policy(json!({
                "apiVersion": "planproxy.dev/v1alpha1",
                "kind": "ProxyPolicy",
                "metadata": {"name": "leave-legacy"},
                "spec": {
                    "nodeSelector": {"matchLabels": {"kubernetes.io/hostname": "node1"}},
                    "serviceSelector": {"matchLabels": {"proxy": "other"}},
                    "proxyServices": false,
                },
            }))
            .await
            .unwrap();
            api.wait_plans("default/legacy only on node2", CONVERGE, |plans| {
                let (on1, on2) = (services_of(plans, "node1"), services_of(plans, "node2"));
                match (
                    on1.contains(&"default/legacy".to_owned()),
                    on2.contains(&"default/legacy".to_owned()),
                ) {
                    (false, true) if on1.contains(&"default/web".to_owned()) => Ok(()),
                    _ => Err(format!("node1: {on1:?}, node2: {on2:?}")),
                }
            })
            .await
            .unwrap();
        })
        .unwrap();
    let pods = cluster.ready_pod_names("default", "web");
    let legacy = cluster
        .service_addr("default", "legacy", 80, false)
        .unwrap();
    let web = cluster.service_addr("default", "web", 80, false).unwrap();
    wait_unanswered(&cluster.probe_pod(1).ns, legacy, CONVERGE).unwrap();
    wait_servers(
        &cluster.probe_pod(1).ns,
        web,
        Protocol::Tcp,
        &pods,
        CONVERGE,
    )
    .unwrap();
    wait_servers(
        &cluster.probe_pod(2).ns,
        legacy,
        Protocol::Tcp,
        &pods,
        CONVERGE,
    )
    .unwrap();
    assert_controller_and_agents_running(&cluster);
}

#[test]
fn every_node_reports_programmed_with_the_current_spec_hash() {
    let cluster = start();
    // Besides web: the `kubernetes` Service, and the chart's metrics Services.
    let (plans, service_ports) = cluster
        .run(|api| async move {
            let plans = deploy_web_until_programmed(&api).await;
            let services: kube::Api<k8s_openapi::api::core::v1::Service> =
                kube::Api::all(api.client.clone());
            let ports: usize = services
                .list(&Default::default())
                .await
                .unwrap()
                .items
                .iter()
                .filter_map(|s| s.spec.as_ref())
                .filter(|spec| spec.cluster_ip.as_deref() != Some("None"))
                .map(|spec| spec.ports.as_ref().map_or(0, Vec::len))
                .sum();
            (plans, ports)
        })
        .unwrap();
    assert!(service_ports > 2, "web's two ports and the cluster's own");
    for node in cluster.node_names() {
        let shards: Vec<_> = plans.iter().filter(|p| p.spec.node_name == node).collect();
        assert!(!shards.is_empty(), "{node} has no plan");
        for plan in shards {
            let status = plan.status.clone().unwrap();
            let hash = &plan.metadata.annotations.as_ref().unwrap()[SPEC_HASH_ANNOTATION];
            assert_eq!(status.applied_hash.as_ref(), Some(hash));
            assert_eq!(
                hash,
                &planproxy_crds::spec_hash(&plan.spec),
                "the annotation is the spec's hash"
            );
            let programmed = status.programmed.unwrap();
            assert_eq!(
                usize::try_from(programmed.service_ports).unwrap(),
                service_ports,
                "every port of every Service"
            );
            assert!(programmed.rules > 0);
        }
    }
    assert_controller_and_agents_running(&cluster);
}

#[test]
fn local_external_traffic_policy_keeps_the_client_source_address() {
    let cluster = start();
    cluster
        .run(|api| async move {
            api.deploy(&AppDef::new("edge", 1, 8080).on_nodes(&[2]))
                .await
                .unwrap();
            let service = ServiceDef::cluster_ip("default", "edge", "edge")
                .tcp("http", 80, 8080)
                .node_port()
                .external_traffic_policy_local();
            api.create_service(&service).await.unwrap();
            api.wait_programmed(Some(("default/edge", true)), CONVERGE)
                .await
                .unwrap();
        })
        .unwrap();
    let node_port = cluster.node_port("default", "edge", 80).unwrap();
    let client = cluster.client(1);
    let with_endpoint = SocketAddr::new(cluster.node(2).ipv4.into(), node_port);
    assert_eq!(
        wait_peer_ip(&client.ns, with_endpoint, CONVERGE).unwrap(),
        IpAddr::from(client.ipv4)
    );
    let with_endpoint_v6 = SocketAddr::new(cluster.node(2).ipv6.into(), node_port);
    assert_eq!(
        wait_peer_ip(&client.ns, with_endpoint_v6, CONVERGE).unwrap(),
        IpAddr::from(client.ipv6)
    );
    // A node without a local endpoint does not forward external traffic.
    let without = SocketAddr::new(cluster.node(1).ipv4.into(), node_port);
    wait_unanswered(&client.ns, without, CONVERGE).unwrap();
    assert_controller_and_agents_running(&cluster);
}

#[test]
fn plans_are_programmed_with_the_current_hash_on_any_cluster() {
    match Target::from_env() {
        Target::Namespaces => {
            start()
                .run(|api| async move {
                    plans_are_programmed_with_the_current_hash(&api, "default").await
                })
                .expect("running in the control plane namespace");
        }
        Target::Kubeconfig => {
            RealCluster::run(|real| async move {
                let namespace = real.namespace();
                plans_are_programmed_with_the_current_hash(&real, &namespace).await;
            })
            .expect("running against the kubeconfig's cluster");
        }
    }
}

#[test]
fn invalid_policy_edit_is_reported_on_any_cluster() {
    match Target::from_env() {
        Target::Namespaces => {
            start()
                .run(|api| async move {
                    invalid_policy_edit_is_reported_and_the_accepted_spec_kept(&api, "local").await
                })
                .expect("running in the control plane namespace");
        }
        Target::Kubeconfig => {
            RealCluster::run(|real| async move {
                let run = real.run_id.clone();
                invalid_policy_edit_is_reported_and_the_accepted_spec_kept(&real, &run).await;
            })
            .expect("running against the kubeconfig's cluster");
        }
    }
}

/// API-level: a service's plans reach every node and every node reports
/// `Programmed` with the hash of the spec it holds.
async fn plans_are_programmed_with_the_current_hash(w: &impl Workloads, namespace: &str) {
    let app = AppDef {
        namespace: namespace.to_owned(),
        ..AppDef::new("hashed", 2, 8080)
    };
    w.deploy(&app).await.expect("deploying hashed");
    let service = ServiceDef::cluster_ip(namespace, "hashed", "hashed").tcp("http", 80, 8080);
    w.create_service(&service).await.expect("creating hashed");
    let key = format!("{namespace}/hashed");
    let control = w.control();
    let plans = control
        .wait_programmed(Some((&key, true)), Duration::from_secs(120))
        .await
        .expect("every node programmed with the service");
    for node in &control.nodes {
        let ports: usize = plans
            .iter()
            .filter(|p| &p.spec.node_name == node)
            .flat_map(|p| &p.spec.service_ports)
            .filter(|sp| format!("{}/{}", sp.namespace, sp.name) == key)
            .count();
        assert_eq!(ports, 1, "{node} programs {key}:http once");
    }
    for plan in &plans {
        let annotation =
            &plan.metadata.annotations.as_ref().expect("annotated")[SPEC_HASH_ANNOTATION];
        assert_eq!(annotation, &planproxy_crds::spec_hash(&plan.spec));
    }
}

/// API-level: an invalid edit of a policy is reported as `Accepted=False`
/// naming the field, and the accepted spec stays in force (in status).
/// The policy selects only this run's services, so it is safe on a real
/// cluster.
async fn invalid_policy_edit_is_reported_and_the_accepted_spec_kept(w: &impl Workloads, run: &str) {
    let control = w.control();
    let name = format!("e2e-{run}-masquerade");
    let mut policy = json!({
        "apiVersion": "planproxy.dev/v1alpha1",
        "kind": "ProxyPolicy",
        "metadata": {"name": name},
        "spec": {
            "serviceSelector": {"matchLabels": {RUN_LABEL: run}},
            "masquerade": {"masqueradeAll": true},
        },
    });
    control
        .apply_policy(policy.clone())
        .await
        .expect("applying a valid policy");
    let (_, accepted) = control
        .wait_policy_judged(&name, Duration::from_secs(60))
        .await
        .expect("the valid policy judged");
    assert_eq!(accepted.status, TRUE, "{accepted:?}");

    policy["spec"]["serviceSelector"] = json!({"matchExpressions": [
        {"key": RUN_LABEL, "operator": "Bogus", "values": [run]},
    ]});
    control
        .apply_policy(policy)
        .await
        .expect("the API server stores the edit");
    let (judged, accepted) = control
        .wait_policy_judged(&name, Duration::from_secs(60))
        .await
        .expect("the invalid edit judged");
    assert_eq!(
        (accepted.status.as_str(), accepted.reason.as_str()),
        (FALSE, "Invalid"),
        "{accepted:?}"
    );
    assert!(accepted.message.contains("serviceSelector"), "{accepted:?}");
    let status = judged.status.unwrap_or_default();
    let kept = status
        .accepted_spec
        .expect("the accepted spec stays in status");
    assert_eq!(kept.masquerade.and_then(|m| m.masquerade_all), Some(true));
    assert_eq!(status.accepted_generation, Some(1));
    control
        .delete_policy(&name)
        .await
        .expect("deleting the policy");
}

#[test]
fn no_endpoints_action_drop_makes_clients_of_an_empty_service_time_out() {
    let cluster = start();
    cluster
        .run(|api| async move {
            api.create_service(
                &ServiceDef::cluster_ip("default", "empty", "nothing").tcp("http", 80, 8080),
            )
            .await
            .unwrap();
            api.create_service(
                &ServiceDef::cluster_ip("default", "quiet", "nothing")
                    .tcp("http", 80, 8080)
                    .label("empty", "drop"),
            )
            .await
            .unwrap();
            api.apply_policy(json!({
                "apiVersion": "planproxy.dev/v1alpha1",
                "kind": "ProxyPolicy",
                "metadata": {"name": "drop-empty"},
                "spec": {
                    "serviceSelector": {"matchLabels": {"empty": "drop"}},
                    "noEndpointsAction": "Drop",
                },
            }))
            .await
            .unwrap();
            api.wait_plans("default/quiet drops", CONVERGE, |plans| {
                let drops = plans
                    .iter()
                    .flat_map(|p| &p.spec.service_ports)
                    .filter(|sp| sp.name == "quiet")
                    .all(|sp| {
                        sp.no_endpoints_action == planproxy_crds::v1alpha1::NoEndpointsAction::Drop
                    });
                let present = plans
                    .iter()
                    .flat_map(|p| &p.spec.service_ports)
                    .any(|sp| sp.name == "quiet");
                if drops && present {
                    Ok(())
                } else {
                    Err("default/quiet does not drop yet".to_owned())
                }
            })
            .await
            .unwrap();
        })
        .unwrap();
    let probe = &cluster.probe_pod(1).ns;
    let empty = cluster.service_addr("default", "empty", 80, false).unwrap();
    let quiet = cluster.service_addr("default", "quiet", 80, false).unwrap();
    assert_eq!(
        wait_unanswered(probe, empty, CONVERGE).unwrap(),
        Attempt::Refused
    );
    assert_eq!(
        wait_unanswered(probe, quiet, CONVERGE).unwrap(),
        Attempt::Timeout
    );
    assert_controller_and_agents_running(&cluster);
}
