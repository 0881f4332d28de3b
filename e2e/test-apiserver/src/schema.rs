//! CRD OpenAPI schemas: pruning of unknown fields and validation on write.
//!
//! kube-apiserver prunes fields a structural schema does not declare and then
//! validates. Here the schema is converted to JSON Schema for the `jsonschema`
//! crate: `nullable: true` becomes a `null` alternative of the declared type and
//! `x-kubernetes-int-or-string` becomes `integer | string`.
//!
//! CEL rules (`x-kubernetes-validations`) are checked with the subset in
//! [`crate::cel`]; rules outside it are skipped. `format` is an annotation only
//! (as in JSON Schema 2020-12). The crate-level
//! semantic validation of planproxy objects stays the controller's job, as it is
//! on a real cluster.

use std::collections::HashMap;

use serde_json::{Map, Value};

use crate::cel;

use crate::error::Cause;

/// A CRD version's schema, ready to prune and validate objects.
pub struct CrdSchema {
    openapi: Value,
    validator: jsonschema::Validator,
    /// Every CEL rule in the schema, compiled (`None`: unsupported, skipped).
    rules: HashMap<String, Option<cel::Expr>>,
}

impl std::fmt::Debug for CrdSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrdSchema").finish_non_exhaustive()
    }
}

/// The CRD schema could not be turned into a validator.
#[derive(Debug, thiserror::Error)]
#[error("invalid CRD schema: {0}")]
pub struct SchemaError(String);

impl CrdSchema {
    /// Builds the pruner and validator from an `openAPIV3Schema`.
    pub fn new(openapi: Value) -> Result<Self, SchemaError> {
        let json_schema = to_json_schema(&openapi);
        let validator =
            jsonschema::validator_for(&json_schema).map_err(|e| SchemaError(e.to_string()))?;
        let mut rules = HashMap::new();
        collect_rules(&openapi, &mut rules);
        Ok(CrdSchema {
            openapi,
            validator,
            rules,
        })
    }

    /// Drops every field the schema does not declare (root `apiVersion`, `kind`
    /// and `metadata` are always kept), like kube-apiserver's pruning.
    pub fn prune(&self, object: &mut Value) {
        if let Value::Object(map) = object {
            let props = self.openapi.get("properties").and_then(Value::as_object);
            map.retain(|k, _| {
                matches!(k.as_str(), "apiVersion" | "kind" | "metadata")
                    || props.is_some_and(|p| p.contains_key(k))
            });
            if let Some(props) = props {
                for (k, v) in map.iter_mut() {
                    if let Some(schema) = props.get(k) {
                        prune(schema, v);
                    }
                }
            }
        }
    }

    /// The same schema with CEL rules skipped.
    pub fn without_cel_rules(mut self) -> Self {
        self.rules.clear();
        self
    }

    /// Fills in schema `default`s for absent fields, after dropping `null`s of
    /// non-nullable fields, like kube-apiserver's structural defaulting.
    pub fn apply_defaults(&self, object: &mut Value) {
        apply_defaults(&self.openapi, object);
    }

    /// Validates a (pruned, defaulted) object; one cause per violation, with its
    /// field path. Also enforces `x-kubernetes-list-type: map` (unique keys) and
    /// `set` (unique items).
    pub fn validate(&self, object: &Value) -> Vec<Cause> {
        let mut causes: Vec<Cause> = self
            .validator
            .iter_errors(object)
            .map(|e| Cause {
                field: field_path(e.instance_path().as_str()),
                message: e.to_string(),
            })
            .collect();
        self.check_extensions(&self.openapi, object, "", &mut causes);
        causes
    }
}

impl SchemaError {
    pub(crate) fn from_message(message: String) -> Self {
        SchemaError(message)
    }
}

fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (key, prop) in props {
                    let nullable = prop.get("nullable").and_then(Value::as_bool) == Some(true);
                    if map.get(key).is_some_and(Value::is_null) && !nullable {
                        map.remove(key);
                    }
                    if !map.contains_key(key)
                        && let Some(default) = prop.get("default")
                    {
                        map.insert(key.clone(), default.clone());
                    }
                    if let Some(child) = map.get_mut(key) {
                        apply_defaults(prop, child);
                    }
                }
            } else if let Some(additional) =
                schema.get("additionalProperties").filter(|a| a.is_object())
            {
                for child in map.values_mut() {
                    apply_defaults(additional, child);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    apply_defaults(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

fn collect_rules(schema: &Value, rules: &mut HashMap<String, Option<cel::Expr>>) {
    match schema {
        Value::Object(map) => {
            for rule in map
                .get("x-kubernetes-validations")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|r| r.get("rule").and_then(Value::as_str))
            {
                let compiled = cel::compile(rule)
                    .map_err(|why| tracing::debug!(rule, %why, "CEL rule not supported; skipped"))
                    .ok();
                rules.insert(rule.to_string(), compiled);
            }
            map.values().for_each(|v| collect_rules(v, rules));
        }
        Value::Array(items) => items.iter().for_each(|v| collect_rules(v, rules)),
        _ => {}
    }
}

impl CrdSchema {
    fn check_rules(&self, schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
        let Some(validations) = schema
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
        else {
            return;
        };
        for validation in validations {
            let Some(rule) = validation.get("rule").and_then(Value::as_str) else {
                continue;
            };
            let Some(Some(expr)) = self.rules.get(rule) else {
                continue;
            };
            let field = if path.is_empty() {
                "<root>".to_string()
            } else {
                path.to_string()
            };
            let message = validation
                .get("message")
                .and_then(Value::as_str)
                .map_or_else(|| format!("failed rule: {rule}"), str::to_string);
            match cel::eval(expr, &[("self", value)]) {
                Ok(Value::Bool(true)) => {}
                Ok(_) => causes.push(Cause {
                    field,
                    message: format!("Invalid value: {message}"),
                }),
                Err(why) => causes.push(Cause {
                    field,
                    message: format!("Invalid value: rule {rule:?} failed to evaluate: {why}"),
                }),
            }
        }
    }

    fn check_extensions(&self, schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
        self.check_rules(schema, value, path, causes);
        check_list_type(schema, value, path, causes);
        let child_path = |key: &str| {
            if path.is_empty() {
                key.to_string()
            } else {
                format!("{path}.{key}")
            }
        };
        match value {
            Value::Object(map) => {
                if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                    for (key, child) in map {
                        if let Some(prop) = props.get(key) {
                            self.check_extensions(prop, child, &child_path(key), causes);
                        }
                    }
                } else if let Some(additional) =
                    schema.get("additionalProperties").filter(|a| a.is_object())
                {
                    for (key, child) in map {
                        self.check_extensions(additional, child, &child_path(key), causes);
                    }
                }
            }
            Value::Array(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (i, item) in items.iter().enumerate() {
                        self.check_extensions(item_schema, item, &format!("{path}[{i}]"), causes);
                    }
                }
            }
            _ => {}
        }
    }
}

fn check_list_type(schema: &Value, value: &Value, path: &str, causes: &mut Vec<Cause>) {
    let Value::Array(items) = value else { return };
    let keys: Vec<&str> = schema
        .get("x-kubernetes-list-map-keys")
        .and_then(Value::as_array)
        .map(|k| k.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    match schema.get("x-kubernetes-list-type").and_then(Value::as_str) {
        Some("map") => {
            let mut seen = Vec::new();
            for (i, item) in items.iter().enumerate() {
                let key: Vec<&Value> = keys
                    .iter()
                    .map(|k| item.get(*k).unwrap_or(&Value::Null))
                    .collect();
                if seen.contains(&key) {
                    causes.push(Cause {
                        field: format!("{path}[{i}]"),
                        message: format!(
                            "Duplicate value: {}",
                            serde_json::to_string(&key).unwrap_or_default()
                        ),
                    });
                }
                seen.push(key);
            }
        }
        Some("set") => {
            for (i, item) in items.iter().enumerate() {
                if items[..i].contains(item) {
                    causes.push(Cause {
                        field: format!("{path}[{i}]"),
                        message: format!("Duplicate value: {item}"),
                    });
                }
            }
        }
        _ => {}
    }
}

fn prune(schema: &Value, value: &mut Value) {
    if schema
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        == Some(true)
    {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                map.retain(|k, _| props.contains_key(k));
                for (k, v) in map.iter_mut() {
                    if let Some(s) = props.get(k) {
                        prune(s, v);
                    }
                }
            } else if let Some(additional) = schema.get("additionalProperties") {
                if additional.is_object() {
                    for v in map.values_mut() {
                        prune(additional, v);
                    }
                }
            } else if schema.get("type").and_then(Value::as_str) == Some("object") {
                map.clear();
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items") {
                for item in items {
                    prune(item_schema, item);
                }
            }
        }
        _ => {}
    }
}

/// `/spec/frontends/0/port` → `spec.frontends[0].port`.
fn field_path(pointer: &str) -> String {
    let mut out = String::new();
    for segment in pointer.split('/').skip(1) {
        let segment = segment.replace("~1", "/").replace("~0", "~");
        if segment.chars().all(|c| c.is_ascii_digit()) && !segment.is_empty() {
            out.push_str(&format!("[{segment}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&segment);
        }
    }
    if out.is_empty() {
        "<root>".to_string()
    } else {
        out
    }
}

/// OpenAPI v3 (Kubernetes dialect) → JSON Schema 2020-12.
fn to_json_schema(schema: &Value) -> Value {
    match schema {
        Value::Object(map) => {
            let mut out = Map::new();
            for (k, v) in map {
                match k.as_str() {
                    "nullable" | "x-kubernetes-int-or-string" => {}
                    k if k.starts_with("x-kubernetes-") => {}
                    "properties" | "patternProperties" | "definitions" => {
                        let converted = v
                            .as_object()
                            .map(|props| {
                                props
                                    .iter()
                                    .map(|(name, s)| (name.clone(), to_json_schema(s)))
                                    .collect()
                            })
                            .unwrap_or_default();
                        out.insert(k.to_string(), Value::Object(converted));
                    }
                    "items" | "additionalProperties" | "not" => {
                        out.insert(k.to_string(), to_json_schema(v));
                    }
                    "allOf" | "anyOf" | "oneOf" => {
                        let converted = v
                            .as_array()
                            .map(|all| all.iter().map(to_json_schema).collect())
                            .unwrap_or_default();
                        out.insert(k.to_string(), Value::Array(converted));
                    }
                    _ => {
                        out.insert(k.to_string(), v.clone());
                    }
                }
            }
            if map
                .get("x-kubernetes-int-or-string")
                .and_then(Value::as_bool)
                == Some(true)
            {
                out.remove("type");
                out.insert(
                    "anyOf".into(),
                    serde_json::json!([{"type": "integer"}, {"type": "string"}]),
                );
            }
            if map.get("nullable").and_then(Value::as_bool) == Some(true) {
                if let Some(Value::String(t)) = out.get("type").cloned() {
                    out.insert("type".into(), serde_json::json!([t, "null"]));
                }
                // `enum` must also admit null, or a nullable enum could never be null.
                if let Some(Value::Array(values)) = out.get_mut("enum") {
                    values.push(Value::Null);
                }
            }
            Value::Object(out)
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> CrdSchema {
        CrdSchema::new(json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["port"],
                    "properties": {
                        "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                        "mode": {"type": "string", "nullable": true, "enum": ["A", "B"]},
                        "target": {"x-kubernetes-int-or-string": true},
                        "list": {"type": "array", "items": {"type": "object", "properties": {"a": {"type": "string"}}}},
                        "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}}
                    }
                },
                "status": {"type": "object", "nullable": true, "properties": {"ok": {"type": "boolean"}}}
            }
        }))
        .unwrap()
    }

    #[test]
    fn nullable_fields_accept_null_and_reject_other_types() {
        let s = schema();
        assert!(
            s.validate(&json!({"spec": {"port": 80, "mode": null}, "status": null}))
                .is_empty()
        );
        let causes = s.validate(&json!({"spec": {"port": 80, "mode": 3}}));
        assert!(!causes.is_empty());
        assert_eq!(causes[0].field, "spec.mode");
    }

    #[test]
    fn invalid_values_name_their_field_path() {
        let s = schema();
        let causes = s.validate(&json!({"spec": {"port": 0, "list": [{"a": 1}]}}));
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert!(fields.contains(&"spec.port"), "{fields:?}");
        assert!(fields.contains(&"spec.list[0].a"), "{fields:?}");
        assert!(
            !s.validate(&json!({"spec": {}})).is_empty(),
            "required port"
        );
    }

    #[test]
    fn int_or_string_accepts_both_and_nothing_else() {
        let s = schema();
        assert!(
            s.validate(&json!({"spec": {"port": 1, "target": 8080}}))
                .is_empty()
        );
        assert!(
            s.validate(&json!({"spec": {"port": 1, "target": "http"}}))
                .is_empty()
        );
        assert!(
            !s.validate(&json!({"spec": {"port": 1, "target": true}}))
                .is_empty()
        );
    }

    #[test]
    fn pruning_drops_undeclared_fields_but_keeps_preserved_ones() {
        let s = schema();
        let mut obj = json!({
            "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
            "junk": 1,
            "spec": {"port": 1, "extra": true, "list": [{"a": "x", "b": 2}],
                     "free": {"anything": {"goes": 1}}, "labels": {"k": "v"}}
        });
        s.prune(&mut obj);
        assert_eq!(
            obj,
            json!({
                "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
                "spec": {"port": 1, "list": [{"a": "x"}], "free": {"anything": {"goes": 1}}, "labels": {"k": "v"}}
            })
        );
    }

    #[test]
    fn defaults_fill_absent_fields_and_replace_nulls_of_non_nullable_ones() {
        let s = CrdSchema::new(json!({
            "type": "object",
            "properties": {
                "spec": {"type": "object", "properties": {
                    "count": {"type": "integer", "default": 0},
                    "items": {"type": "array", "items": {"type": "object", "properties": {"on": {"type": "boolean", "default": false}}}},
                    "maybe": {"type": "string", "nullable": true, "default": "x"}
                }}
            }
        }))
        .unwrap();
        let mut obj = json!({"spec": {"items": [{}, {"on": true}], "maybe": null, "count": null}});
        s.apply_defaults(&mut obj);
        assert_eq!(
            obj,
            json!({"spec": {"count": 0, "items": [{"on": false}, {"on": true}], "maybe": null}})
        );
    }

    #[test]
    fn map_lists_reject_duplicate_keys() {
        let s = CrdSchema::new(json!({
            "type": "object",
            "properties": {"conditions": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"],
                "items": {"type": "object", "properties": {"type": {"type": "string"}}}}}
        }))
        .unwrap();
        assert!(
            s.validate(&json!({"conditions": [{"type": "A"}, {"type": "B"}]}))
                .is_empty()
        );
        let causes = s.validate(&json!({"conditions": [{"type": "A"}, {"type": "A"}]}));
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "conditions[1]");
    }

    #[test]
    fn cel_rules_reject_with_their_message_at_their_path() {
        let s = CrdSchema::new(json!({
            "type": "object",
            "properties": {"spec": {"type": "object", "properties": {
                "cidrs": {"type": "array", "items": {"type": "string"},
                    "x-kubernetes-validations": [{"rule": "self.all(c, isCIDR(c))", "message": "each entry must be a CIDR"}]},
                "old": {"type": "string", "x-kubernetes-validations": [{"rule": "self == oldSelf"}]}
            }}}
        }))
        .unwrap();
        assert!(
            s.validate(&json!({"spec": {"cidrs": ["10.0.0.0/8"], "old": "x"}}))
                .is_empty()
        );
        let causes = s.validate(&json!({"spec": {"cidrs": ["nope"]}}));
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.cidrs");
        assert!(causes[0].message.contains("each entry must be a CIDR"));
    }

    #[test]
    fn every_cel_rule_of_the_planproxy_crds_is_supported() {
        for (kind, schema) in planproxy_crd_schemas() {
            for (rule, compiled) in &schema.rules {
                assert!(compiled.is_some(), "{kind}: unsupported rule {rule}");
            }
        }
    }

    #[test]
    fn generated_planproxy_crds_compile_to_validators() {
        // Compiling panics on a schema the validator cannot read.
        planproxy_crd_schemas();
    }

    /// Each planproxy CRD's kind and its first version's schema, compiled
    /// (panics when one does not compile).
    fn planproxy_crd_schemas() -> Vec<(String, CrdSchema)> {
        planproxy_crds::crds()
            .into_iter()
            .map(|crd| {
                let openapi = serde_json::to_value(
                    crd.spec.versions[0]
                        .schema
                        .as_ref()
                        .unwrap()
                        .open_api_v3_schema
                        .as_ref()
                        .unwrap(),
                )
                .unwrap();
                let schema = CrdSchema::new(openapi).unwrap();
                (crd.spec.names.kind, schema)
            })
            .collect()
    }
}
