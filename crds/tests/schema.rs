//! The generated CRDs are the ones the chart ships, and the examples fit them.
#![allow(clippy::unwrap_used)] // test helpers, not only #[test] fns, may unwrap

use std::path::{Path, PathBuf};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn chart_crds_are_byte_identical_to_the_generated_ones() {
    let generated = planproxy_crds::crds_yaml().unwrap();
    let path = repo_root().join("charts/planproxy/crds/planproxy.dev.yaml");
    let shipped = std::fs::read_to_string(&path).unwrap();
    assert!(
        generated == shipped,
        "{} is stale: regenerate it with `cargo run -p planproxy-controller -- crds > {}`",
        path.display(),
        path.display()
    );
}

/// The `openAPIV3Schema` of the CRD serving `kind`, as a JSON Schema validator.
fn validator_for(kind: &str) -> jsonschema::Validator {
    let crd = planproxy_crds::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind)
        .unwrap();
    let schema = serde_json::to_value(
        crd.spec.versions[0]
            .schema
            .as_ref()
            .unwrap()
            .open_api_v3_schema
            .as_ref()
            .unwrap(),
    )
    .unwrap();
    jsonschema::validator_for(&schema).unwrap()
}

fn example_documents() -> Vec<(PathBuf, serde_json::Value)> {
    let mut out = Vec::new();
    let mut dirs = vec![repo_root().join("examples")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                for doc in serde_yaml::Deserializer::from_str(&text) {
                    let value: serde_json::Value = serde::Deserialize::deserialize(doc).unwrap();
                    if value["apiVersion"] == "planproxy.dev/v1alpha1" {
                        out.push((path.clone(), value));
                    }
                }
            }
        }
    }
    out
}

#[test]
fn every_example_object_validates_against_its_generated_schema() {
    let docs = example_documents();
    assert!(
        docs.iter().any(|(_, d)| d["kind"] == "ProxyPolicy")
            && docs.iter().any(|(_, d)| d["kind"] == "ProxyPlan"),
        "examples must include at least one ProxyPolicy and one ProxyPlan"
    );
    for (path, doc) in docs {
        let kind = doc["kind"].as_str().unwrap();
        let validator = validator_for(kind);
        let errors: Vec<String> = validator
            .iter_errors(&doc)
            .map(|e| format!("{}: {e}", e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{} does not fit the {kind} schema: {errors:?}",
            path.display()
        );
        // And the typed API reads it, and every policy passes semantic validation.
        match kind {
            "ProxyPolicy" => {
                let policy: planproxy_crds::ProxyPolicy = serde_json::from_value(doc).unwrap();
                planproxy_crds::validate::proxy_policy(&policy.spec).unwrap();
            }
            "ProxyPlan" => {
                let _: planproxy_crds::ProxyPlan = serde_json::from_value(doc).unwrap();
            }
            other => panic!("unexpected kind {other}"),
        }
    }
}

#[test]
fn schema_rejects_an_out_of_range_masquerade_bit_with_its_path() {
    let doc = serde_json::json!({
        "apiVersion": "planproxy.dev/v1alpha1",
        "kind": "ProxyPolicy",
        "metadata": {"name": "bad"},
        "spec": {"masquerade": {"masqueradeBit": 40}},
    });
    let validator = validator_for("ProxyPolicy");
    let paths: Vec<String> = validator
        .iter_errors(&doc)
        .map(|e| e.instance_path().to_string())
        .collect();
    assert_eq!(paths, vec!["/spec/masquerade/masqueradeBit".to_string()]);
}

#[test]
fn plans_print_the_columns_kubectl_shows() {
    let crd = planproxy_crds::crds()
        .into_iter()
        .find(|c| c.spec.names.kind == "ProxyPlan")
        .unwrap();
    let columns: Vec<String> = crd.spec.versions[0]
        .additional_printer_columns
        .iter()
        .flatten()
        .filter(|c| c.priority.unwrap_or(0) == 0)
        .map(|c| c.name.clone())
        .collect();
    assert_eq!(
        columns,
        ["Node", "Programmed", "Services", "Endpoints", "Age"]
    );
}
