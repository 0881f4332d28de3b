//! The test API server, driven through a real kube-rs client over HTTPS:
//! the semantics our binaries and kube-runtime rely on.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Service};
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, ResourceExt};
use planproxy_crds::ProxyPlan;
use planproxy_test_apiserver::{Config, OutageMode, TestApiServer, WriteFailure};
use serde_json::{Value, json};

async fn server() -> (TestApiServer, Client) {
    server_with(Config::default()).await
}

async fn server_with(config: Config) -> (TestApiServer, Client) {
    let server = TestApiServer::start(config).await.expect("server starts");
    let client = server.client("test").await.expect("client builds");
    (server, client)
}

fn api_status(err: kube::Error) -> Box<kube::core::Status> {
    match err {
        kube::Error::Api(status) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn example_plan(name: &str) -> ProxyPlan {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/proxyplan.yaml"
    ))
    .expect("the example plan must be readable");
    let mut plan: ProxyPlan = serde_yaml::from_str(&text).expect("the example plan must parse");
    plan.metadata.name = Some(name.to_string());
    plan.spec.node_name = name.to_string();
    plan
}

fn config_map(name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels.iter().map(|(k, v)| (k.to_string(), Value::from(*v))).collect::<serde_json::Map<_, _>>()},
        "data": {"k": "v"}
    }))
    .expect("a config map must decode")
}

/// Creates `config_map(name, labels)`, which must succeed.
async fn create_config_map(cms: &Api<ConfigMap>, name: &str, labels: &[(&str, &str)]) -> ConfigMap {
    cms.create(&PostParams::default(), &config_map(name, labels))
        .await
        .expect("creating the config map")
}

#[tokio::test]
async fn requests_without_a_known_token_are_unauthorized() {
    let (server, _) = server().await;
    let good = server.kubeconfig_for("someone");
    let bad = good.replace(&server.token_for("someone"), "not-a-token");
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&bad).unwrap();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .unwrap();
    let client = Client::try_from(config).unwrap();
    let err = Api::<Node>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap_err();
    assert_eq!(api_status(err).code, 401);
}

#[tokio::test]
async fn create_get_delete_and_already_exists() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let created = create_config_map(&cms, "a", &[]).await;
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    let rv = created.resource_version().unwrap();
    assert_eq!(cms.get("a").await.unwrap().resource_version().unwrap(), rv);
    let err = cms
        .create(&PostParams::default(), &config_map("a", &[]))
        .await
        .unwrap_err();
    let status = api_status(err);
    assert_eq!(
        (status.code, status.reason.as_str()),
        (409, "AlreadyExists")
    );
    cms.delete("a", &DeleteParams::default()).await.unwrap();
    let status = api_status(cms.get("a").await.unwrap_err());
    assert_eq!((status.code, status.reason.as_str()), (404, "NotFound"));
}

#[tokio::test]
async fn replace_with_a_stale_resource_version_conflicts() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let first = create_config_map(&cms, "a", &[]).await;
    let mut second = first.clone();
    second.data = Some([("k".to_string(), "second".to_string())].into());
    let updated = cms
        .replace("a", &PostParams::default(), &second)
        .await
        .unwrap();
    assert_ne!(updated.resource_version(), first.resource_version());
    let mut stale = first.clone();
    stale.data = Some([("k".to_string(), "stale".to_string())].into());
    let status = api_status(
        cms.replace("a", &PostParams::default(), &stale)
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    // A write that changes nothing keeps the resourceVersion.
    let again = cms
        .replace("a", &PostParams::default(), &updated)
        .await
        .unwrap();
    assert_eq!(again.resource_version(), updated.resource_version());
}

#[tokio::test]
async fn apply_merge_and_status_writes_follow_the_status_subresource_rules() {
    let (server, client) = server().await;
    let plans: Api<ProxyPlan> = Api::all(client);
    let mut plan = example_plan("worker-1");
    let apply = PatchParams::apply("planproxy-controller").force();
    let created = plans
        .patch("worker-1", &apply, &Patch::Apply(&plan))
        .await
        .unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(created.status.is_none());

    let status = json!({"status": {"conditions": [{"type": "Programmed", "status": "True", "reason": "Applied", "message": "", "lastTransitionTime": "2026-01-01T00:00:00Z"}]}});
    let with_status = plans
        .patch_status("worker-1", &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
    assert_eq!(
        with_status.metadata.generation,
        Some(1),
        "status writes do not bump generation"
    );
    assert!(with_status.status.is_some());

    // The main resource ignores .status; a spec change bumps generation.
    plan.spec.settings.masquerade_bit = 15;
    let reapplied = plans
        .patch("worker-1", &apply, &Patch::Apply(&plan))
        .await
        .unwrap();
    assert_eq!(reapplied.metadata.generation, Some(2));
    assert_eq!(
        reapplied.status, with_status.status,
        "apply without status keeps the status"
    );

    // A merge patch with a status on the main resource does not change the status.
    let sneaky = json!({"status": {"conditions": []}, "metadata": {"labels": {"extra": "x"}}});
    let patched = plans
        .patch("worker-1", &PatchParams::default(), &Patch::Merge(&sneaky))
        .await
        .unwrap();
    assert_eq!(patched.status, with_status.status);
    assert_eq!(
        patched.metadata.generation,
        Some(2),
        "label changes do not bump generation"
    );
    assert_eq!(patched.labels().get("extra").map(String::as_str), Some("x"));
    assert_eq!(
        server.request_count("patch", "proxyplans.planproxy.dev/status"),
        1
    );
    assert_eq!(server.request_count("patch", "proxyplans.planproxy.dev"), 3);
}

#[tokio::test]
async fn apply_by_a_second_manager_conflicts_unless_forced() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let mine = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "mine"}});
    cms.patch("a", &PatchParams::apply("one"), &Patch::Apply(&mine))
        .await
        .unwrap();
    let theirs = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "theirs"}});
    let status = api_status(
        cms.patch("a", &PatchParams::apply("two"), &Patch::Apply(&theirs))
            .await
            .unwrap_err(),
    );
    assert_eq!((status.code, status.reason.as_str()), (409, "Conflict"));
    let forced = cms
        .patch(
            "a",
            &PatchParams::apply("two").force(),
            &Patch::Apply(&theirs),
        )
        .await
        .unwrap();
    assert_eq!(forced.data.unwrap()["k"], "theirs");
    // A manager's apply without a field it applied before removes it.
    let less =
        json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {}});
    let removed = cms
        .patch("a", &PatchParams::apply("two"), &Patch::Apply(&less))
        .await
        .unwrap();
    assert!(removed.data.unwrap_or_default().is_empty());
}

#[tokio::test]
async fn invalid_custom_resources_are_rejected_with_the_field_path() {
    let (_server, client) = server().await;
    let plans: Api<ProxyPlan> = Api::all(client);
    let mut plan = serde_json::to_value(example_plan("worker-1")).unwrap();
    plan["spec"]["shard"]["count"] = json!(0);
    let err = plans
        .patch("worker-1", &PatchParams::apply("c"), &Patch::Apply(&plan))
        .await
        .unwrap_err();
    let status = api_status(err);
    assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"));
    assert!(
        status.message.contains("spec.shard.count"),
        "{}",
        status.message
    );
    let bad_name = example_plan("Worker_1");
    let status = api_status(
        plans
            .create(&PostParams::default(), &bad_name)
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 422);
    assert!(
        status.message.contains("metadata.name"),
        "{}",
        status.message
    );
}

#[tokio::test]
async fn unknown_fields_of_custom_resources_are_pruned() {
    let (_server, client) = server().await;
    let plans: Api<ProxyPlan> = Api::all(client.clone());
    let mut plan = serde_json::to_value(example_plan("worker-1")).unwrap();
    plan["spec"]["notAField"] = json!(true);
    plans
        .create(
            &PostParams::default(),
            &serde_json::from_value(plan.clone()).unwrap(),
        )
        .await
        .ok();
    let raw: Api<kube::api::DynamicObject> =
        Api::all_with(client, &kube::api::ApiResource::erase::<ProxyPlan>(&()));
    let stored = raw.get("worker-1").await.unwrap();
    assert!(stored.data["spec"].get("notAField").is_none());
    assert!(stored.data["spec"].get("nodeName").is_some());
}

#[tokio::test]
async fn lists_paginate_consistently_at_the_first_pages_version() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    for i in 0..25 {
        cms.create(
            &PostParams::default(),
            &config_map(&format!("cm-{i:02}"), &[]),
        )
        .await
        .unwrap();
    }
    let first = cms.list(&ListParams::default().limit(10)).await.unwrap();
    assert_eq!(first.items.len(), 10);
    assert_eq!(first.metadata.remaining_item_count, Some(15));
    // Changes after the first page do not show up in later pages.
    cms.delete("cm-20", &DeleteParams::default()).await.unwrap();
    create_config_map(&cms, "cm-99", &[]).await;
    let mut names: Vec<String> = first.items.iter().map(|c| c.name_any()).collect();
    let mut token = first.metadata.continue_;
    while let Some(t) = token.filter(|t| !t.is_empty()) {
        let page = cms
            .list(&ListParams::default().limit(10).continue_token(&t))
            .await
            .unwrap();
        assert_eq!(
            page.metadata.resource_version,
            first.metadata.resource_version
        );
        names.extend(page.items.iter().map(|c| c.name_any()));
        token = page.metadata.continue_;
    }
    let expected: Vec<String> = (0..25).map(|i| format!("cm-{i:02}")).collect();
    assert_eq!(names, expected);
}

#[tokio::test]
async fn label_and_field_selectors_filter_lists() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    cms.create(
        &PostParams::default(),
        &config_map("web", &[("app", "web"), ("tier", "front")]),
    )
    .await
    .unwrap();
    create_config_map(&cms, "db", &[("app", "db")]).await;
    create_config_map(&cms, "none", &[]).await;
    let names = |list: kube::core::ObjectList<ConfigMap>| {
        list.items.iter().map(|c| c.name_any()).collect::<Vec<_>>()
    };
    let cases = [
        ("app=web", vec!["web"]),
        ("app!=web", vec!["db", "none"]),
        ("app in (web,db)", vec!["db", "web"]),
        ("app notin (web)", vec!["db", "none"]),
        ("tier", vec!["web"]),
        ("!app", vec!["none"]),
    ];
    for (selector, expected) in cases {
        let list = cms
            .list(&ListParams::default().labels(selector))
            .await
            .unwrap();
        assert_eq!(names(list), expected, "{selector}");
    }
    let list = cms
        .list(&ListParams::default().fields("metadata.name=db"))
        .await
        .unwrap();
    assert_eq!(names(list), vec!["db"]);
}

#[tokio::test]
async fn deleting_a_node_garbage_collects_its_plans() {
    let (server, client) = server().await;
    let nodes: Api<Node> = Api::all(client.clone());
    let plans: Api<ProxyPlan> = Api::all(client);
    let node: Node = serde_json::from_value(json!({"metadata": {"name": "worker-1"}})).unwrap();
    let node = nodes.create(&PostParams::default(), &node).await.unwrap();
    let mut owned = example_plan("worker-1");
    owned.metadata.owner_references = Some(vec![
        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: "worker-1".into(),
            uid: node.uid().unwrap(),
            ..Default::default()
        },
    ]);
    plans.create(&PostParams::default(), &owned).await.unwrap();
    plans
        .create(&PostParams::default(), &example_plan("unowned"))
        .await
        .unwrap();
    nodes
        .delete("worker-1", &DeleteParams::background())
        .await
        .unwrap();
    let left: Vec<String> = plans
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .iter()
        .map(|p| p.name_any())
        .collect();
    assert_eq!(left, vec!["unowned"]);
    assert!(
        server
            .get("planproxy.dev/v1alpha1", "ProxyPlan", None, "worker-1")
            .is_none()
    );
}

#[tokio::test]
async fn watch_from_a_version_older_than_the_window_gets_410() {
    let (_server, client) = server_with(Config {
        event_window: 3,
        ..Config::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let first = create_config_map(&cms, "a", &[]).await;
    let mut current = first.clone();
    for i in 0..5 {
        current.data = Some([("k".to_string(), i.to_string())].into());
        current = cms
            .replace("a", &PostParams::default(), &current)
            .await
            .unwrap();
    }
    let stream = cms
        .watch(&WatchParams::default(), &first.resource_version().unwrap())
        .await
        .unwrap();
    let events: Vec<_> = stream.take(1).collect().await;
    match &events[0] {
        Ok(WatchEvent::Error(status)) => {
            assert_eq!((status.code, status.reason.as_str()), (410, "Expired"))
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    // Within the window, the watch replays the changes.
    let recent = cms
        .watch(
            &WatchParams::default().timeout(1),
            &(current.resource_version().unwrap().parse::<u64>().unwrap() - 1).to_string(),
        )
        .await
        .unwrap();
    let events: Vec<_> = recent.try_collect().await.unwrap();
    assert!(
        matches!(&events[..], [WatchEvent::Modified(cm)] if cm.resource_version() == current.resource_version()),
        "{events:?}"
    );
}

#[tokio::test]
async fn watches_turn_selector_transitions_into_added_and_deleted() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let start = create_config_map(&cms, "a", &[]).await;
    let stream = cms
        .watch(
            &WatchParams::default().labels("app=web").timeout(2),
            &start.resource_version().unwrap(),
        )
        .await
        .unwrap();
    let labelled = cms
        .patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": "web"}}})),
        )
        .await
        .unwrap();
    cms.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {"app": null}}})),
    )
    .await
    .unwrap();
    let events: Vec<_> = stream.try_collect().await.unwrap();
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e {
            WatchEvent::Added(_) => "ADDED",
            WatchEvent::Modified(_) => "MODIFIED",
            WatchEvent::Deleted(_) => "DELETED",
            WatchEvent::Bookmark(_) => "BOOKMARK",
            WatchEvent::Error(_) => "ERROR",
        })
        .collect();
    assert_eq!(kinds, vec!["ADDED", "DELETED"]);
    assert!(
        matches!(&events[0], WatchEvent::Added(cm) if cm.resource_version() == labelled.resource_version())
    );
}

/// Waits until the reflector's store holds exactly `names`.
async fn eventually_holds(store: &reflector::Store<Service>, names: &[&str]) {
    for _ in 0..400 {
        let mut held: Vec<String> = store.state().iter().map(|s| s.name_any()).collect();
        held.sort();
        if held == names {
            return;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let held: Vec<String> = store.state().iter().map(|s| s.name_any()).collect();
    panic!("reflector holds {held:?}, expected {names:?}");
}

fn service(name: &str) -> Service {
    serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}}))
        .expect("a service must decode")
}

#[tokio::test]
async fn a_reflector_recovers_from_forced_410_and_closed_watches() {
    let (server, client) = server_with(Config {
        bookmark_interval: Duration::from_millis(200),
        ..Config::default()
    })
    .await;
    let services: Api<Service> = Api::namespaced(client, "default");
    services
        .create(&PostParams::default(), &service("one"))
        .await
        .unwrap();
    let (store, writer) = reflector::store();
    let stream = reflector(
        writer,
        watcher(services.clone(), watcher::Config::default().page_size(1)),
    )
    .applied_objects();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    eventually_holds(&store, &["one"]).await;

    server.faults().close_watches();
    services
        .create(&PostParams::default(), &service("two"))
        .await
        .unwrap();
    eventually_holds(&store, &["one", "two"]).await;

    server.faults().expire_next_watches(1);
    server.faults().close_watches();
    services
        .delete("one", &DeleteParams::default())
        .await
        .unwrap();
    services
        .create(&PostParams::default(), &service("three"))
        .await
        .unwrap();
    eventually_holds(&store, &["three", "two"]).await;
    assert!(
        server.request_count("list", "services") >= 2,
        "the 410 forced a relist: {:?}",
        server.request_counts()
    );
    task.abort();
}

#[tokio::test]
async fn injected_write_failures_and_restarts_are_survivable() {
    let (server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    server.faults().fail_writes(1.0, WriteFailure::Internal);
    let status = api_status(
        cms.create(&PostParams::default(), &config_map("a", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 500);
    server.faults().fail_writes(1.0, WriteFailure::Conflict);
    let status = api_status(
        cms.create(&PostParams::default(), &config_map("a", &[]))
            .await
            .unwrap_err(),
    );
    assert_eq!(status.code, 409);
    server.faults().clear();
    create_config_map(&cms, "a", &[]).await;
    server.faults().restart();
    assert_eq!(
        cms.get("a").await.unwrap().name_any(),
        "a",
        "data survives a restart"
    );

    server
        .faults()
        .outage(Duration::from_secs(2), OutageMode::Refuse);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        cms.get("a").await.is_err(),
        "connections are refused during the outage"
    );
    let mut back = false;
    for _ in 0..100 {
        if cms.get("a").await.is_ok() {
            back = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(back, "the server answers again after the outage");

    server
        .faults()
        .outage(Duration::from_millis(300), OutageMode::Hang);
    let started = std::time::Instant::now();
    cms.get("a").await.unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "a hung request waits for the outage to end"
    );
}

#[tokio::test]
async fn discovery_finds_the_served_types() {
    let (_server, client) = server().await;
    let version = client.apiserver_version().await.unwrap();
    assert_eq!(version.major, "1");
    let discovery = kube::discovery::Discovery::new(client).run().await.unwrap();
    let (plans, caps) = discovery
        .groups()
        .flat_map(|g| g.recommended_resources())
        .find(|(r, _)| r.plural == "proxyplans")
        .expect("proxyplans are discoverable");
    assert_eq!(plans.group, "planproxy.dev");
    assert_eq!(caps.scope, kube::discovery::Scope::Cluster);
    assert!(
        caps.subresources
            .iter()
            .any(|(s, _)| s.plural == "proxyplans/status" || s.plural == "status")
    );
}

#[test]
fn a_server_on_its_own_thread_serves_sync_callers() {
    let server = TestApiServer::start_on_thread(Config::default()).unwrap();
    let created = server
        .create(json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}}))
        .unwrap();
    assert_eq!(
        created["status"]["addresses"][0]["address"], "10.0.0.1",
        "nodes keep status given on create"
    );
    assert_eq!(server.list("v1", "Node").len(), 1);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let client = server.client("t").await.unwrap();
        let node = Api::<Node>::all(client).get("n1").await.unwrap();
        assert_eq!(node.name_any(), "n1");
    });
}

#[tokio::test]
async fn watches_that_allow_bookmarks_get_the_latest_resource_version() {
    let (server, client) = server_with(Config {
        bookmark_interval: Duration::from_millis(100),
        ..Config::default()
    })
    .await;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), "default");
    let services: Api<Service> = Api::namespaced(client, "default");
    let start = create_config_map(&cms, "a", &[]).await;
    // Writes to another type move the global version; the bookmark follows it.
    services
        .create(&PostParams::default(), &service("s"))
        .await
        .unwrap();
    let latest = server.resource_version().to_string();
    let mut stream = cms
        .watch(
            &WatchParams::default().timeout(5),
            &start.resource_version().unwrap(),
        )
        .await
        .unwrap()
        .boxed();
    let event = tokio::time::timeout(Duration::from_secs(3), stream.next())
        .await
        .unwrap();
    match event {
        Some(Ok(WatchEvent::Bookmark(bookmark))) => {
            assert_eq!(bookmark.metadata.resource_version, latest)
        }
        other => panic!("expected a bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn send_initial_events_ends_the_initial_state_with_an_annotated_bookmark() {
    let (_server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    create_config_map(&cms, "a", &[]).await;
    create_config_map(&cms, "b", &[]).await;
    let stream = cms
        .watch(&WatchParams::streaming_lists().timeout(5), "")
        .await
        .unwrap();
    let events: Vec<_> = stream.take(3).try_collect().await.unwrap();
    assert!(matches!(&events[0], WatchEvent::Added(cm) if cm.name_any() == "a"));
    assert!(matches!(&events[1], WatchEvent::Added(cm) if cm.name_any() == "b"));
    match &events[2] {
        WatchEvent::Bookmark(b) => {
            assert_eq!(
                b.metadata
                    .annotations
                    .get("k8s.io/initial-events-end")
                    .map(String::as_str),
                Some("true")
            );
        }
        other => panic!("expected the initial-events-end bookmark, got {other:?}"),
    }
}

#[tokio::test]
async fn a_streaming_list_watcher_syncs_a_reflector() {
    let (_server, client) = server().await;
    let services: Api<Service> = Api::namespaced(client, "default");
    services
        .create(&PostParams::default(), &service("one"))
        .await
        .unwrap();
    let (store, writer) = reflector::store();
    let config = watcher::Config::default().streaming_lists();
    let stream = reflector(writer, watcher(services.clone(), config)).applied_objects();
    let task = tokio::spawn(stream.for_each(|_| async {}));
    eventually_holds(&store, &["one"]).await;
    services
        .create(&PostParams::default(), &service("two"))
        .await
        .unwrap();
    eventually_holds(&store, &["one", "two"]).await;
    task.abort();
}

#[tokio::test]
async fn a_watch_that_falls_behind_catches_up_without_gaps() {
    let (server, client) = server().await;
    let cms: Api<ConfigMap> = Api::namespaced(client, "default");
    let start = server.resource_version().to_string();
    let stream = cms
        .watch(&WatchParams::default().timeout(30), &start)
        .await
        .unwrap();
    // Far more events than a watch queues while its client is not reading,
    // and more bytes than the socket buffers hold.
    let total = planproxy_test_apiserver::store::WATCH_QUEUE * 2;
    let padding = "x".repeat(4096);
    for i in 0..total {
        server
            .create(json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": format!("cm-{i}")}, "data": {"padding": padding}}))
            .unwrap();
    }
    let names: Vec<String> = stream
        .take(total)
        .map(|e| match e.unwrap() {
            WatchEvent::Added(cm) => cm.name_any(),
            other => panic!("expected ADDED, got {other:?}"),
        })
        .collect()
        .await;
    let expected: Vec<String> = (0..total).map(|i| format!("cm-{i}")).collect();
    assert!(names == expected, "events are missing or out of order");
}
