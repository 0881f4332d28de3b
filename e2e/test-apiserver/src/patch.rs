//! Patch algorithms: JSON patch, JSON merge patch (also used for strategic
//! merge patch), and the server-side apply subset this server implements.
//!
//! Server-side apply, as implemented: the server remembers, per object and
//! field manager, the last object that manager applied. A new apply
//! 1. fails with 409 Conflict when it sets a field (a leaf path; lists are
//!    leaves) to a value different from another manager's last applied value,
//!    unless `force=true`, which moves the field to the applier;
//! 2. removes the fields the manager applied last time but omits now;
//! 3. merges the applied object into the live object like a JSON merge patch
//!    (maps merge recursively, lists and scalars replace, `null` deletes);
//! 4. creates the object when it does not exist.
//!
//! Not implemented: `managedFields` in responses, ownership of fields written by
//! update/patch (non-apply) managers, and associative list merging by key (a list
//! is owned whole).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// Applies an RFC 7386 JSON merge patch.
pub fn merge(target: &mut Value, patch: &Value) {
    json_patch::merge(target, patch);
}

/// Applies an RFC 6902 JSON patch.
pub fn json_patch(target: &mut Value, patch: &Value) -> Result<(), String> {
    let patch: json_patch::Patch =
        serde_json::from_value(patch.clone()).map_err(|e| e.to_string())?;
    json_patch::patch(target, &patch).map_err(|e| e.to_string())
}

/// A field owned by another manager that an apply would change: (manager, field path).
pub type ApplyConflict = (String, String);

/// The result of an apply: the new object and the updated per-manager configs.
#[derive(Debug)]
pub struct Applied {
    /// The object after the apply.
    pub object: Value,
    /// Every manager's last applied config, including this one.
    pub configs: BTreeMap<String, Value>,
}

/// Server-side apply of `config` by `manager` onto `live` (see the module docs).
pub fn apply(
    live: &Value,
    configs: &BTreeMap<String, Value>,
    manager: &str,
    config: &Value,
    force: bool,
) -> Result<Applied, Vec<ApplyConflict>> {
    let mut configs = configs.clone();
    let mut leaves = Vec::new();
    leaf_paths(config, &mut Vec::new(), &mut leaves);
    let mut conflicts = Vec::new();
    for (other, other_config) in configs.iter_mut().filter(|(m, _)| m.as_str() != manager) {
        for (path, value) in &leaves {
            if path.first().is_some_and(|p| p == "metadata")
                && path
                    .get(1)
                    .is_some_and(|p| matches!(p.as_str(), "name" | "namespace" | "resourceVersion"))
            {
                continue;
            }
            if let Some(theirs) = lookup(other_config, path)
                && theirs != *value
            {
                if force {
                    remove_path(other_config, path);
                } else {
                    conflicts.push((other.clone(), dotted(path)));
                }
            }
        }
    }
    if !conflicts.is_empty() {
        return Err(conflicts);
    }
    let mut object = live.clone();
    if let Some(previous) = configs.get(manager) {
        remove_dropped(&mut object, previous, config);
    }
    merge(&mut object, config);
    configs.insert(manager.to_string(), config.clone());
    Ok(Applied { object, configs })
}

fn leaf_paths<'a>(
    value: &'a Value,
    prefix: &mut Vec<String>,
    out: &mut Vec<(Vec<String>, &'a Value)>,
) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                prefix.push(k.clone());
                leaf_paths(v, prefix, out);
                prefix.pop();
            }
        }
        _ => out.push((prefix.clone(), value)),
    }
}

fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter().try_fold(value, |v, k| v.get(k))
}

fn remove_path(value: &mut Value, path: &[String]) {
    if let Some((last, parents)) = path.split_last() {
        let mut current = value;
        for key in parents {
            match current.get_mut(key) {
                Some(next) => current = next,
                None => return,
            }
        }
        if let Some(map) = current.as_object_mut() {
            map.remove(last);
        }
    }
}

fn dotted(path: &[String]) -> String {
    format!(".{}", path.join("."))
}

/// Removes from `live` what `previous` set and `current` no longer sets.
fn remove_dropped(live: &mut Value, previous: &Value, current: &Value) {
    let (Some(live_map), Some(prev_map)) = (live.as_object_mut(), previous.as_object()) else {
        return;
    };
    let empty = Map::new();
    let current_map = current.as_object().unwrap_or(&empty);
    for (key, prev_value) in prev_map {
        match current_map.get(key) {
            None => {
                live_map.remove(key);
            }
            Some(current_value) if prev_value.is_object() && current_value.is_object() => {
                if let Some(live_value) = live_map.get_mut(key) {
                    remove_dropped(live_value, prev_value, current_value);
                }
            }
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apply_merges_into_the_live_object_and_keeps_fields_it_never_set() {
        let live = json!({"spec": {"a": 1, "other": "x"}, "status": {"s": 1}});
        let out = apply(
            &live,
            &BTreeMap::new(),
            "m",
            &json!({"spec": {"a": 2, "b": [1]}}),
            false,
        )
        .unwrap();
        assert_eq!(
            out.object,
            json!({"spec": {"a": 2, "b": [1], "other": "x"}, "status": {"s": 1}})
        );
        assert_eq!(out.configs["m"], json!({"spec": {"a": 2, "b": [1]}}));
    }

    #[test]
    fn apply_removes_fields_the_same_manager_stopped_applying() {
        let first = apply(
            &json!({}),
            &BTreeMap::new(),
            "m",
            &json!({"spec": {"a": 1, "b": 2}}),
            false,
        )
        .unwrap();
        let second = apply(
            &first.object,
            &first.configs,
            "m",
            &json!({"spec": {"a": 1}}),
            false,
        )
        .unwrap();
        assert_eq!(second.object, json!({"spec": {"a": 1}}));
    }

    #[test]
    fn apply_conflicts_with_another_managers_field_unless_forced() {
        let first = apply(
            &json!({}),
            &BTreeMap::new(),
            "one",
            &json!({"spec": {"a": 1}}),
            false,
        )
        .unwrap();
        let conflicts = apply(
            &first.object,
            &first.configs,
            "two",
            &json!({"spec": {"a": 2}}),
            false,
        )
        .unwrap_err();
        assert_eq!(conflicts, vec![("one".to_string(), ".spec.a".to_string())]);
        // The same value is shared ownership, not a conflict.
        assert!(
            apply(
                &first.object,
                &first.configs,
                "two",
                &json!({"spec": {"a": 1}}),
                false
            )
            .is_ok()
        );
        let forced = apply(
            &first.object,
            &first.configs,
            "two",
            &json!({"spec": {"a": 2}}),
            true,
        )
        .unwrap();
        assert_eq!(forced.object, json!({"spec": {"a": 2}}));
        assert_eq!(forced.configs["one"], json!({"spec": {}}));
    }

    #[test]
    fn json_patch_reports_failed_tests() {
        let mut doc = json!({"a": 1});
        assert!(json_patch(&mut doc, &json!([{"op": "test", "path": "/a", "value": 2}])).is_err());
        json_patch(
            &mut doc,
            &json!([{"op": "replace", "path": "/a", "value": 3}]),
        )
        .unwrap();
        assert_eq!(doc, json!({"a": 3}));
    }
}
