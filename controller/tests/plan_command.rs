//! `planproxy-controller plan`: the built-in example and bad input, through the
//! real binary.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use planproxy_crds::ProxyPlan;
use planproxy_crds::v1alpha1::EndpointSelection;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn plan(from: &Path, node: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_planproxy-controller"))
        .arg("plan")
        .arg("--from")
        .arg(from)
        .args(["--node", node])
        .args(extra)
        .output()
        .expect("the binary must run")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn yaml_plans(output: &Output) -> Vec<ProxyPlan> {
    let text = String::from_utf8(output.stdout.clone()).expect("plan output must be UTF-8");
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("each document must be a ProxyPlan"))
        .collect()
}

/// A directory holding one file with `text`.
fn input(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("a temporary directory must be creatable");
    std::fs::write(dir.path().join("input.yaml"), text).expect("the input file must be writable");
    dir
}

const NODE: &str = "apiVersion: v1\nkind: Node\nmetadata:\n  name: n1\n";

#[test]
fn the_demo_resolves_into_worker_1s_plan() {
    let output = plan(&repo_root().join("examples/demo"), "worker-1", &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(stderr(&output), "", "the demo is clean: no warnings");
    let plans = yaml_plans(&output);
    assert_eq!(plans.len(), 1);
    let plan = &plans[0];
    assert_eq!(plan.metadata.name.as_deref(), Some("worker-1"));
    let labels = plan.metadata.labels.clone().unwrap();
    assert_eq!(labels["planproxy.dev/node"], "worker-1");
    assert_eq!(labels["planproxy.dev/shard"], "0");
    let hash = &plan.metadata.annotations.as_ref().unwrap()["planproxy.dev/spec-hash"];
    assert_eq!(hash, &planproxy_crds::spec_hash(&plan.spec));

    let port = |name: &str| {
        plan.spec
            .service_ports
            .iter()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    // web: the zone-a hint keeps worker-1 on its own zone's endpoint.
    let web = port("web").cluster_endpoints.as_ref().unwrap();
    assert_eq!(web.selection, EndpointSelection::TopologyZone);
    assert_eq!(web.endpoints.len(), 1);
    assert_eq!(
        (web.endpoints[0].ip.as_str(), web.endpoints[0].port),
        ("10.244.1.10", 8080)
    );
    // session: the affinity-cap policy shortens two days to an hour.
    assert_eq!(
        port("session")
            .session_affinity
            .as_ref()
            .unwrap()
            .timeout_seconds,
        3600
    );
    // storefront: the Proxy-mode ingress point is not served; the local set is worker-1's.
    let storefront = port("storefront");
    assert_eq!(storefront.load_balancer_ips, ["192.0.2.40"]);
    assert_eq!(
        storefront.local_endpoints.as_ref().unwrap().endpoints.len(),
        1
    );
    assert_eq!(
        plan.spec.settings.node_port_addresses,
        ["192.168.10.11/32", "fd00:192:168:10::11/128"]
    );
}

#[test]
fn json_output_is_the_proxyplan_object() {
    let output = plan(
        &repo_root().join("examples/demo"),
        "worker-2",
        &["-o", "json"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let plan: ProxyPlan = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(plan.spec.node_name, "worker-2");
    assert_eq!(
        plan.spec.settings.node_ips,
        ["192.168.10.12", "fd00:192:168:10::12", "203.0.113.12"]
    );
}

#[test]
fn a_small_shard_target_prints_every_shard() {
    let output = plan(
        &repo_root().join("examples/demo"),
        "worker-1",
        &["--shard-target-bytes", "1024"],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let plans = yaml_plans(&output);
    assert!(plans.len() > 1);
    for (i, plan) in plans.iter().enumerate() {
        assert_eq!(plan.metadata.name.clone().unwrap(), format!("worker-1-{i}"));
        assert_eq!(plan.spec.shard.count as usize, plans.len());
    }
}

#[test]
fn an_unknown_node_exits_2_and_lists_the_nodes() {
    let output = plan(&repo_root().join("examples/demo"), "worker-9", &[]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("unknown node \"worker-9\""), "{err}");
    assert!(err.contains("worker-1, worker-2"), "{err}");
    assert!(output.stdout.is_empty());
}

#[test]
fn unparseable_yaml_exits_2_naming_the_file_and_document() {
    let dir = input(&format!("{NODE}---\nkind: [unclosed\n"));
    let output = plan(dir.path(), "n1", &[]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains("input.yaml: document 2: invalid YAML"),
        "{err}"
    );
}

#[test]
fn an_object_that_does_not_fit_its_kind_exits_2_naming_it() {
    let dir = input(&format!(
        "{NODE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports:\n  - port: eighty\n"
    ));
    let output = plan(dir.path(), "n1", &[]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("Service web"), "{err}");
}

#[test]
fn a_slice_without_its_service_exits_2_naming_the_slice() {
    let dir = input(&format!(
        "{NODE}---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: ghost-1\n  labels:\n    kubernetes.io/service-name: ghost\naddressType: IPv4\nendpoints: []\n"
    ));
    let output = plan(dir.path(), "n1", &[]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(err.contains("EndpointSlice default/ghost-1"), "{err}");
    assert!(
        err.contains("metadata.labels[kubernetes.io/service-name]"),
        "{err}"
    );
    assert!(
        err.contains("Service default/ghost does not exist"),
        "{err}"
    );
}

#[test]
fn an_invalid_ip_exits_2_naming_the_object_and_field() {
    let dir = input(&format!(
        "{NODE}---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  clusterIP: 10.96.0.1\n  externalIPs: [\"1.2.3.999\"]\n  ports:\n  - port: 80\n"
    ));
    let output = plan(dir.path(), "n1", &[]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains("Service default/web: spec.externalIPs[0]"),
        "{err}"
    );
    assert!(err.contains("\"1.2.3.999\" is not an IP address"), "{err}");
}

#[test]
fn an_invalid_policy_is_a_warning_and_the_plan_is_printed() {
    let dir = input(&format!(
        "{NODE}---\napiVersion: planproxy.dev/v1alpha1\nkind: ProxyPolicy\nmetadata:\n  name: bad\nspec:\n  masquerade:\n    masqueradeBit: 99\n"
    ));
    let output = plan(dir.path(), "n1", &[]);
    assert!(output.status.success(), "{}", stderr(&output));
    let err = stderr(&output);
    assert!(
        err.contains("warning: ProxyPolicy bad: spec.masquerade.masqueradeBit"),
        "{err}"
    );
    assert_eq!(yaml_plans(&output)[0].spec.settings.masquerade_bit, 14);
}

#[test]
fn a_missing_path_exits_2() {
    let output = plan(Path::new("/nonexistent/planproxy-input"), "n1", &[]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("/nonexistent/planproxy-input"));
}
