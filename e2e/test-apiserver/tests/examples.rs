//! The repository's example objects are accepted by the test API server, as
//! a real cluster accepts them, and broken variants are rejected the same way.

use std::path::{Path, PathBuf};

use planproxy_test_apiserver::{Config, TestApiServer};
use serde_json::{Value, json};

fn example_documents() -> Vec<(PathBuf, Value)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let mut out = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("examples must be readable") {
            let path = entry.expect("examples must be listable").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).expect("an example must be readable");
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let value: Value =
                        serde::Deserialize::deserialize(doc).expect("an example must be YAML");
                    if value.get("kind").is_some() {
                        out.push((path.clone(), value));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_example_object_is_accepted() {
    let server = TestApiServer::start_on_thread(Config {
        enforce_cel_rules: true,
        ..Config::default()
    })
    .unwrap();
    let docs = example_documents();
    assert!(docs.len() >= 10, "examples found: {}", docs.len());
    for (path, doc) in docs {
        // The demo and the top-level examples may reuse names: each goes in once.
        let name = doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        let api_version = doc["apiVersion"].as_str().unwrap_or_default().to_string();
        let namespace = doc["metadata"]["namespace"].as_str().map(str::to_string);
        let ns = if doc["metadata"].get("namespace").is_some()
            || matches!(kind.as_str(), "Service" | "EndpointSlice")
        {
            Some(namespace.clone().unwrap_or_else(|| "default".into()))
        } else {
            None
        };
        if server
            .get(&api_version, &kind, ns.as_deref(), &name)
            .is_some()
        {
            continue;
        }
        if let Err(e) = server.create(doc.clone()) {
            panic!("{} ({kind} {name}) was rejected: {e}", path.display());
        }
    }
}

#[test]
fn a_policy_breaking_a_cel_rule_is_rejected_with_its_message() {
    let server = TestApiServer::start_on_thread(Config {
        enforce_cel_rules: true,
        ..Config::default()
    })
    .unwrap();
    let policy = json!({
        "apiVersion": "planproxy.dev/v1alpha1",
        "kind": "ProxyPolicy",
        "metadata": {"name": "bad"},
        "spec": {"masquerade": {"localTrafficDetector": {"mode": "ClusterCIDR", "clusterCIDRs": ["not-a-cidr"]}}}
    });
    let err = server.create(policy).unwrap_err();
    assert_eq!((err.code, err.reason), (422, "Invalid"));
    assert!(
        err.message.contains("each entry must be a CIDR"),
        "{}",
        err.message
    );
    assert!(
        err.message
            .contains("spec.masquerade.localTrafficDetector.clusterCIDRs"),
        "{}",
        err.message
    );
}

#[test]
fn cel_rules_are_only_checked_when_enforced() {
    let server = TestApiServer::start_on_thread(Config::default()).unwrap();
    let policy = json!({
        "apiVersion": "planproxy.dev/v1alpha1",
        "kind": "ProxyPolicy",
        "metadata": {"name": "bad"},
        "spec": {"nodePortAddresses": ["not-a-cidr"]}
    });
    server
        .create(policy)
        .expect("stored, as admission was bypassed");
}
