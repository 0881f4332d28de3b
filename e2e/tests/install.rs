//! planproxy as `helm install` leaves it on a real API server: each
//! component's service account may make exactly the calls
//! `charts/tests/api_calls.yaml` lists (every one allowed, nothing else), and
//! the admission policy keeps an agent to its own node's plans.

use std::collections::BTreeSet;
use std::time::Duration;

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use planproxy_crds::ProxyPlan;
use planproxy_crds::labels::NODE_LABEL;
use planproxy_e2e::install::{AGENT_DAEMONSET, NAMESPACE, RELEASE};
use planproxy_e2e::{Cluster, ClusterSpec};
use serde::Deserialize;
use serde_json::json;

#[derive(Debug, Deserialize)]
struct Calls {
    calls: Vec<Call>,
}

#[derive(Debug, Deserialize)]
struct Call {
    component: String,
    scope: String,
    group: String,
    resource: String,
    #[serde(default)]
    subresource: String,
    #[serde(default, rename = "resourceName")]
    resource_name: String,
    verbs: Vec<String>,
}

/// One question to the authorizer.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Access {
    component: String,
    namespace: String,
    group: String,
    resource: String,
    subresource: String,
    name: String,
    verb: String,
}

const VERBS: &[&str] = &[
    "get", "list", "watch", "create", "update", "patch", "delete",
];
/// A namespace the chart is not installed in.
const OTHER_NAMESPACE: &str = "default";

fn calls() -> Vec<Call> {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/tests/api_calls.yaml");
    let text = std::fs::read_to_string(&path).expect("charts/tests/api_calls.yaml");
    serde_yaml::from_str::<Calls>(&text)
        .expect("api_calls.yaml parses")
        .calls
}

/// What `api_calls.yaml` says `components` may do, over every resource any
/// component touches, every verb, in the release namespace and another one,
/// by the listed resource name and another one.
fn expected_access(components: &[&str]) -> Vec<(Access, bool)> {
    let calls = calls();
    let resources: BTreeSet<(String, String, String)> = calls
        .iter()
        .map(|c| (c.group.clone(), c.resource.clone(), c.subresource.clone()))
        .collect();
    let names: BTreeSet<String> = calls
        .iter()
        .map(|c| resource_name(&c.resource_name))
        .chain([String::new(), "someone-elses".to_owned()])
        .collect();
    let mut out = Vec::new();
    for component in components {
        for (group, resource, subresource) in &resources {
            for namespace in [NAMESPACE, OTHER_NAMESPACE] {
                for name in &names {
                    for verb in VERBS {
                        // list and watch of one name are not how clients ask.
                        if !name.is_empty() && matches!(*verb, "list" | "watch" | "create") {
                            continue;
                        }
                        let allowed = calls.iter().any(|c| {
                            c.component == *component
                                && c.group == *group
                                && c.resource == *resource
                                && c.subresource == *subresource
                                && c.verbs.iter().any(|v| v == verb)
                                && (c.scope == "cluster" || namespace == NAMESPACE)
                                && (c.resource_name.is_empty()
                                    || resource_name(&c.resource_name) == *name)
                        });
                        out.push((
                            Access {
                                component: (*component).to_owned(),
                                namespace: namespace.to_owned(),
                                group: group.clone(),
                                resource: resource.clone(),
                                subresource: subresource.clone(),
                                name: name.clone(),
                                verb: (*verb).to_owned(),
                            },
                            allowed,
                        ));
                    }
                }
            }
        }
    }
    out
}

/// `api_calls.yaml` names the agent's DaemonSet `agent`.
fn resource_name(symbolic: &str) -> String {
    match symbolic {
        "agent" => AGENT_DAEMONSET.to_owned(),
        other => other.to_owned(),
    }
}

fn service_account(component: &str) -> String {
    format!("planproxy-{component}")
}

async fn allowed(client: &kube::Client, access: &Access) -> bool {
    let user = format!(
        "system:serviceaccount:{NAMESPACE}:{}",
        service_account(&access.component)
    );
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user),
            groups: Some(vec![
                "system:serviceaccounts".into(),
                format!("system:serviceaccounts:{NAMESPACE}"),
                "system:authenticated".into(),
            ]),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(access.namespace.clone()),
                group: Some(access.group.clone()),
                resource: Some(access.resource.clone()),
                subresource: Some(access.subresource.clone()),
                name: Some(access.name.clone()),
                verb: Some(access.verb.clone()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let reviews: kube::Api<SubjectAccessReview> = kube::Api::all(client.clone());
    let answer = reviews
        .create(&PostParams::default(), &review)
        .await
        .expect("the API server answers a SubjectAccessReview");
    answer.status.is_some_and(|s| s.allowed)
}

/// The accesses of `components` that differ from what `api_calls.yaml` says.
async fn wrong_access(client: &kube::Client, components: &[&str]) -> Vec<String> {
    let mut wrong = Vec::new();
    for (access, expected) in expected_access(components) {
        if allowed(client, &access).await != expected {
            wrong.push(format!(
                "{access:?}: the API server says {}, api_calls.yaml says {}",
                !expected, expected
            ));
        }
    }
    wrong
}

/// The controller and the agent (the cleanup hooks' service account exists
/// only while `helm uninstall` runs; see the uninstall scenario).
#[test]
fn each_installed_component_may_make_exactly_the_calls_the_chart_grants() {
    let cluster = Cluster::start(ClusterSpec::network_only(1)).unwrap();
    let wrong: Vec<String> = cluster
        .run(|api| async move { wrong_access(&api.client, &["controller", "agent"]).await })
        .unwrap();
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn an_agent_may_write_the_status_of_its_own_nodes_plans_only() {
    let cluster = Cluster::start(ClusterSpec::default()).unwrap();
    cluster
        .run(|api| async move { api.wait_programmed(None, Duration::from_secs(90)).await })
        .unwrap()
        .unwrap();
    let (own, other) = cluster
        .run_as_agent(1, |client| async move {
            let plans: kube::Api<ProxyPlan> = kube::Api::all(client);
            let first_of = |node: &'static str| {
                let plans = plans.clone();
                async move {
                    let listed = plans
                        .list(&ListParams::default().labels(&format!("{NODE_LABEL}={node}")))
                        .await
                        .unwrap();
                    listed.items[0].metadata.name.clone().unwrap()
                }
            };
            let (own, other) = (first_of("node1").await, first_of("node2").await);
            let write = |name: String| {
                let plans = plans.clone();
                async move {
                    plans
                        .patch_status(&name, &PatchParams::default(), &Patch::Merge(&json!({})))
                        .await
                }
            };
            (write(own).await, write(other).await)
        })
        .unwrap();
    own.expect("an agent writes its own node's plan status");
    match other {
        Err(kube::Error::Api(e)) => {
            assert_eq!(e.code, 403, "{e:?}");
            assert!(
                e.message.contains("own node's ProxyPlans only")
                    && e.message.contains("bound to node node1"),
                "{e:?}"
            );
        }
        other => panic!("node1's agent wrote node2's plan status: {other:?}"),
    }
    cluster.processes_running().unwrap();
}

/// `helm uninstall` without kubelets: the pre-delete hooks start in weight
/// order (the cleanup service account and its Role, then the Job that stops
/// the agents), and there it stops, since no kubelet runs that Job (nor, after
/// it, the cleanup DaemonSet and the Job that waits for it). The scenario checks
/// the cleanup account's grants while it exists, then does on the node what the
/// DaemonSet's init container would (its command, from the release's hooks), and
/// removes the release without hooks.
#[test]
fn uninstall_starts_its_hooks_in_order_and_the_hook_command_leaves_no_rule() {
    let cluster = Cluster::start(ClusterSpec {
        nodes: 1,
        ..ClusterSpec::default()
    })
    .unwrap();
    cluster
        .run(|api| async move { api.wait_programmed(None, Duration::from_secs(90)).await })
        .unwrap()
        .unwrap();
    let programmed = cluster.node(1).ns.proxy_rules().unwrap();
    assert!(!programmed.is_empty(), "the agent programmed node1");
    let hooks = helm(&cluster, &["get", "hooks", RELEASE, "-n", NAMESPACE]).unwrap();
    let cleanup_command = hook_init_command(&hooks, "DaemonSet", "planproxy-cleanup");
    assert_eq!(cleanup_command, ["planproxy-agent", "cleanup"]);

    let (uninstall, wrong, daemonset_before_job) = std::thread::scope(|scope| {
        let uninstall = scope.spawn(|| {
            helm(
                &cluster,
                &["uninstall", RELEASE, "-n", NAMESPACE, "--timeout", "20s"],
            )
        });
        let job = planproxy_e2e::wait::eventually_sync(
            "the stop-agent hook Job",
            Duration::from_secs(30),
            || {
                cluster
                    .apiserver()
                    .get(
                        "batch/v1",
                        "Job",
                        Some(NAMESPACE),
                        "planproxy-cleanup-stop-agent",
                    )
                    .ok_or_else(|| "not yet".to_owned())
            },
        )
        .unwrap();
        assert!(job["spec"].is_object());
        let daemonset =
            cluster
                .apiserver()
                .get("apps/v1", "DaemonSet", Some(NAMESPACE), "planproxy-cleanup");
        let wrong = cluster
            .run(|api| async move { wrong_access(&api.client, &["cleanup"]).await })
            .unwrap();
        (uninstall.join().unwrap(), wrong, daemonset.is_some())
    });
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(
        !daemonset_before_job,
        "the cleanup DaemonSet (weight 5) must wait for the stop-agent Job (weight 0)"
    );
    let failure = uninstall.expect_err("no kubelet runs the stop-agent Job");
    assert!(failure.to_string().contains("stop-agent"), "{failure}");

    // What the stop-agent Job and the cleanup DaemonSet would do on the node.
    cluster.stop_agent(1, Duration::from_secs(5)).unwrap();
    let agent = planproxy_e2e::binaries::locate(planproxy_e2e::binaries::AGENT).unwrap();
    let mut argv = vec![agent.display().to_string()];
    argv.extend(cleanup_command.into_iter().skip(1));
    let status = cluster.node(1).ns.command(&argv).status().unwrap();
    assert!(status.success());
    // No backend's rules are left: the hook's cleanup removes them all.
    let left = cluster.node(1).ns.proxy_rules().unwrap();
    assert!(left.is_empty(), "{left}");

    helm(
        &cluster,
        &["uninstall", RELEASE, "-n", NAMESPACE, "--no-hooks"],
    )
    .unwrap();
    for (kind, name) in [
        ("Deployment", "planproxy-controller"),
        ("DaemonSet", AGENT_DAEMONSET),
    ] {
        assert!(
            cluster
                .apiserver()
                .get("apps/v1", kind, Some(NAMESPACE), name)
                .is_none(),
            "{kind} {name} outlived the release"
        );
    }
}

fn helm(cluster: &Cluster, args: &[&str]) -> planproxy_e2e::Result<String> {
    let args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    planproxy_e2e::install::helm(&cluster.control_plane().ns, cluster.apiserver(), &args)
}

/// The first init container's command and arguments of `kind`/`name` among
/// the release's hook manifests.
fn hook_init_command(manifests: &str, kind: &str, name: &str) -> Vec<String> {
    for document in serde_yaml::Deserializer::from_str(manifests) {
        let Ok(object) = serde_json::Value::deserialize(document) else {
            continue;
        };
        if object["kind"] == kind && object["metadata"]["name"] == name {
            let container = &object["spec"]["template"]["spec"]["initContainers"][0];
            return ["command", "args"]
                .iter()
                .flat_map(|key| container[*key].as_array().cloned().unwrap_or_default())
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect();
        }
    }
    panic!("no {kind} {name} among the hooks:\n{manifests}");
}
