//! Label selectors, parsed once and matched many times.
//!
//! The API server does not check the semantics of a `LabelSelector` inside a custom
//! resource, so a ProxyPolicy may carry an operator that does not exist or an `In`
//! without values; [`Selector::parse`] rejects those with the offending field named.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::validate::FieldError;

/// A parsed label selector. The empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

impl Selector {
    /// Parses `selector`; `path` names it in errors (e.g. `spec.nodeSelector`).
    pub fn parse(selector: Option<&LabelSelector>, path: &str) -> Result<Self, FieldError> {
        let Some(selector) = selector else {
            return Ok(Self::default());
        };
        let mut requirements = Vec::new();
        for (key, value) in selector.match_labels.iter().flatten() {
            let at = format!("{path}.matchLabels[{key}]");
            crate::validate::label_key(key, &at)?;
            crate::validate::label_value(value, &at)?;
            requirements.push(Requirement::Equals(key.clone(), value.clone()));
        }
        for (i, expr) in selector.match_expressions.iter().flatten().enumerate() {
            let at = format!("{path}.matchExpressions[{i}]");
            crate::validate::label_key(&expr.key, &format!("{at}.key"))?;
            let values = expr.values.clone().unwrap_or_default();
            for (j, v) in values.iter().enumerate() {
                crate::validate::label_value(v, &format!("{at}.values[{j}]"))?;
            }
            let key = expr.key.clone();
            let requirement = match expr.operator.as_str() {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{at}.values"),
                        format!("operator {} needs at least one value", expr.operator),
                    ));
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(FieldError::new(
                        format!("{at}.values"),
                        format!("operator {} takes no values", expr.operator),
                    ));
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                other => {
                    return Err(FieldError::new(
                        format!("{at}.operator"),
                        format!(
                            "unsupported operator {other:?}: must be In, NotIn, Exists or DoesNotExist"
                        ),
                    ));
                }
            };
            requirements.push(requirement);
        }
        Ok(Self { requirements })
    }

    /// Whether `labels` satisfy every requirement.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|l| vs.contains(l)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|l| !vs.contains(l)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }

    /// Whether this is the empty selector (matches everything).
    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|s| s.to_string()).collect()),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::parse(None, "spec.nodeSelector").unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.is_everything());
    }

    #[test]
    fn equality_and_set_requirements_all_apply() {
        let sel = LabelSelector {
            match_labels: Some(labels(&[("tier", "edge")])),
            match_expressions: Some(vec![
                expr("zone", "In", &["a", "b"]),
                expr("legacy", "DoesNotExist", &[]),
                expr("env", "NotIn", &["dev"]),
            ]),
        };
        let s = Selector::parse(Some(&sel), "spec.nodeSelector").unwrap();
        assert!(s.matches(&labels(&[("tier", "edge"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[("tier", "edge"), ("zone", "c")])));
        assert!(!s.matches(&labels(&[("tier", "edge"), ("zone", "a"), ("legacy", "")])));
        assert!(!s.matches(&labels(&[("tier", "edge"), ("zone", "a"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("zone", "a")])));
    }

    #[test]
    fn unknown_operator_is_rejected_with_its_path() {
        let sel = LabelSelector {
            match_expressions: Some(vec![expr("app", "Bogus", &["x"])]),
            ..Default::default()
        };
        let err = Selector::parse(Some(&sel), "spec.serviceSelector").unwrap_err();
        assert_eq!(
            err.field,
            "spec.serviceSelector.matchExpressions[0].operator"
        );
    }

    #[test]
    fn in_without_values_is_rejected() {
        let sel = LabelSelector {
            match_expressions: Some(vec![expr("app", "In", &[])]),
            ..Default::default()
        };
        let err = Selector::parse(Some(&sel), "spec.nodeSelector").unwrap_err();
        assert_eq!(err.field, "spec.nodeSelector.matchExpressions[0].values");
    }
}
