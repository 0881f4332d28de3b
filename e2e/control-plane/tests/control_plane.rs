//! The control plane itself: it starts, the real EndpointSlice controller
//! publishes pods the harness marks ready, counters count, and the faults do
//! what the scenarios rely on.

use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ConfigMap, Namespace};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{ListParams, PostParams, WatchParams};
use planproxy_control_plane::{ControlPlane, ControlPlaneConfig, MASTERS, OutageMode};
use serde_json::json;

fn eventually<T>(what: &str, timeout: Duration, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return value;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime")
}

#[test]
fn a_ready_pod_reaches_an_endpoint_slice_written_by_the_real_controller() {
    let plane = ControlPlane::start(ControlPlaneConfig::default()).expect("control plane starts");
    plane
        .create(json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
        }))
        .expect("node");
    plane
        .create(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {"selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        }))
        .expect("service");
    let pod = plane
        .create(json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "echo", "ports": [{"name": "http", "containerPort": 8080}]}]},
        }))
        .expect("pod");
    assert_eq!(pod["spec"]["nodeName"], "n1");
    let client = plane.admin();
    runtime().block_on(async {
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
            kube::Api::namespaced(client.clone(), "default");
        let status = json!({"status": {
            "phase": "Running", "podIP": "10.1.0.5", "podIPs": [{"ip": "10.1.0.5"}], "hostIP": "172.30.0.11",
            "conditions": [{"type": "Ready", "status": "True"}, {"type": "ContainersReady", "status": "True"}],
        }});
        pods.patch_status(
            "web-0",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(&status),
        )
        .await
        .expect("pod status");
    });
    let slice = eventually("an endpoint for web-0", Duration::from_secs(30), || {
        let slices = plane.list("discovery.k8s.io/v1", "EndpointSlice");
        slices.into_iter().find(|s| {
            s["metadata"]["labels"]["kubernetes.io/service-name"] == "web"
                && s["endpoints"][0]["addresses"][0] == "10.1.0.5"
        })
    });
    let slice: EndpointSlice = serde_json::from_value(slice).expect("an EndpointSlice");
    let endpoint = &slice.endpoints[0];
    assert_eq!(endpoint.node_name.as_deref(), Some("n1"));
    assert_eq!(endpoint.zone.as_deref(), Some("z1"));
    assert_eq!(
        endpoint.conditions.as_ref().and_then(|c| c.ready),
        Some(true)
    );
    let ports = slice.ports.unwrap_or_default();
    assert_eq!(ports[0].port, Some(8080), "the named target port resolved");
    plane.check_running().expect("every component still runs");
}

/// etcd and kube-apiserver alone, and a client through the proxy.
fn api_server_only(watch_cache: bool) -> (ControlPlane, tokio::runtime::Runtime, kube::Client) {
    let plane = ControlPlane::start(ControlPlaneConfig {
        controllers: Vec::new(),
        watch_cache,
        ..ControlPlaneConfig::default()
    })
    .expect("control plane starts");
    let rt = runtime();
    let client = rt
        .block_on(plane.client("someone", Some(MASTERS)))
        .expect("client");
    (plane, rt, client)
}

#[test]
fn counts_requests_and_refuses_then_serves_again() {
    let (plane, rt, client) = api_server_only(true);
    plane.reset_request_counts();
    rt.block_on(async {
        let api: kube::Api<ConfigMap> = kube::Api::namespaced(client.clone(), "default");
        for i in 0..3 {
            let cm: ConfigMap =
                serde_json::from_value(json!({"metadata": {"name": format!("c{i}")}}))
                    .expect("a ConfigMap");
            api.create(&PostParams::default(), &cm)
                .await
                .expect("create");
        }
        api.list(&ListParams::default()).await.expect("list");
    });
    assert_eq!(plane.write_count("configmaps"), 3);
    assert_eq!(plane.request_count("list", "configmaps"), 1);

    plane.outage(Duration::from_secs(3), OutageMode::Refuse);
    let namespaces: kube::Api<Namespace> = kube::Api::all(client.clone());
    let refused = rt.block_on(namespaces.get("default"));
    assert!(refused.is_err(), "the proxy refuses during the outage");
    // The harness' own calls go around the proxy.
    assert!(plane.get("v1", "Namespace", None, "default").is_some());
    let served = eventually("the end of the outage", Duration::from_secs(20), || {
        rt.block_on(namespaces.get("default")).ok()
    });
    assert_eq!(served.metadata.name.as_deref(), Some("default"));
}

#[test]
fn expired_resource_versions_answer_410_gone() {
    let (plane, rt, client) = api_server_only(false);
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, "default");
    let old = rt
        .block_on(api.list(&ListParams::default()))
        .expect("list")
        .metadata
        .resource_version
        .expect("a resourceVersion");
    plane.expire_resource_versions().expect("compaction");
    let gone = rt.block_on(async {
        use futures::StreamExt;
        // The expiry closed every connection: a pooled one may still be
        // taken once and reset, as any client must expect.
        let mut attempts = 0;
        let mut stream = loop {
            match api.watch(&WatchParams::default(), &old).await {
                Ok(stream) => break stream.boxed(),
                Err(kube::Error::Service(e)) if attempts < 5 => {
                    attempts += 1;
                    eprintln!("retrying the watch after {e}");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => panic!("the watch does not open: {e:?}"),
            }
        };
        stream.next().await
    });
    match gone {
        Some(Ok(kube::api::WatchEvent::Error(e))) => assert_eq!(e.code, 410, "{e:?}"),
        Some(Err(kube::Error::Api(e))) => assert_eq!(e.code, 410, "{e:?}"),
        other => panic!("expected 410 Gone, got {other:?}"),
    }
}
