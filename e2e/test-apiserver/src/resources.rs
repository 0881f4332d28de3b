//! The resource types this server serves: a fixed set of built-in types plus
//! the CRDs it was started with.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Event, Namespace, Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::events::v1::Event as EventsV1Event;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::schema::{CrdSchema, SchemaError};

/// Index of a resource type in the [`Registry`] (and of its table in the store).
pub type ResourceId = usize;

/// How objects of a type are checked on write.
pub enum Check {
    /// Built-in type: the body must decode as the k8s-openapi type (a 400 otherwise).
    Typed(fn(&Value) -> Result<(), String>),
    /// Custom resource: pruned and validated against the CRD schema (a 422 otherwise).
    Crd(Box<CrdSchema>),
}

impl std::fmt::Debug for Check {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Check::Typed(_) => f.write_str("Typed"),
            Check::Crd(_) => f.write_str("Crd"),
        }
    }
}

/// Which names a type accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameRule {
    /// DNS-1123 subdomain (most types).
    Subdomain,
    /// DNS-1123 label (namespaces, services).
    Label,
}

/// One served resource type.
#[derive(Debug)]
pub struct ResourceType {
    /// API group, `""` for core.
    pub group: String,
    /// API version (`v1`, `v1alpha1`).
    pub version: String,
    /// Kind.
    pub kind: String,
    /// Plural (the URL segment).
    pub plural: String,
    /// Singular name.
    pub singular: String,
    /// Short names for discovery.
    pub short_names: Vec<String>,
    /// Namespaced or cluster-scoped.
    pub namespaced: bool,
    /// Has a `/status` subresource: the main resource ignores `.status` on
    /// writes, and `/status` ignores everything else.
    pub status_subresource: bool,
    /// `.status` given on create is kept (Nodes), rather than dropped.
    pub status_on_create: bool,
    /// Name validation.
    pub name_rule: NameRule,
    /// Body check.
    pub check: Check,
}

impl ResourceType {
    /// `v1` or `group/version`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The name counters and logs use: the plural, group-qualified unless core.
    pub fn qualified_plural(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

fn typed<K: DeserializeOwned>(value: &Value) -> Result<(), String> {
    K::deserialize(value).map(|_| ()).map_err(|e| e.to_string())
}

#[allow(clippy::too_many_arguments)]
fn builtin(
    group: &str,
    kind: &str,
    plural: &str,
    short_names: &[&str],
    namespaced: bool,
    status_subresource: bool,
    name_rule: NameRule,
    check: fn(&Value) -> Result<(), String>,
) -> ResourceType {
    ResourceType {
        group: group.into(),
        version: "v1".into(),
        kind: kind.into(),
        plural: plural.into(),
        singular: kind.to_lowercase(),
        short_names: short_names.iter().map(|s| s.to_string()).collect(),
        namespaced,
        status_subresource,
        status_on_create: kind == "Node",
        name_rule,
        check: Check::Typed(check),
    }
}

/// All served types, addressable by (group, version, plural).
#[derive(Debug)]
pub struct Registry {
    types: Vec<Arc<ResourceType>>,
    by_path: HashMap<(String, String, String), ResourceId>,
}

impl Registry {
    /// The built-in types plus one type per CRD version that is served; CRD
    /// CEL rules are checked when `enforce_cel_rules` is set.
    pub fn new(
        crds: &[CustomResourceDefinition],
        enforce_cel_rules: bool,
    ) -> Result<Self, SchemaError> {
        use NameRule::{Label, Subdomain};
        let mut types = vec![
            builtin(
                "",
                "Namespace",
                "namespaces",
                &["ns"],
                false,
                true,
                Label,
                typed::<Namespace>,
            ),
            builtin(
                "",
                "Node",
                "nodes",
                &["no"],
                false,
                true,
                Subdomain,
                typed::<Node>,
            ),
            builtin(
                "",
                "Service",
                "services",
                &["svc"],
                true,
                true,
                Label,
                typed::<Service>,
            ),
            builtin(
                "",
                "Event",
                "events",
                &["ev"],
                true,
                false,
                Subdomain,
                typed::<Event>,
            ),
            builtin(
                "",
                "ConfigMap",
                "configmaps",
                &["cm"],
                true,
                false,
                Subdomain,
                typed::<ConfigMap>,
            ),
            builtin(
                "discovery.k8s.io",
                "EndpointSlice",
                "endpointslices",
                &[],
                true,
                false,
                Subdomain,
                typed::<EndpointSlice>,
            ),
            builtin(
                "coordination.k8s.io",
                "Lease",
                "leases",
                &[],
                true,
                false,
                Subdomain,
                typed::<Lease>,
            ),
            builtin(
                "events.k8s.io",
                "Event",
                "events",
                &["ev"],
                true,
                false,
                Subdomain,
                typed::<EventsV1Event>,
            ),
            builtin(
                "apiextensions.k8s.io",
                "CustomResourceDefinition",
                "customresourcedefinitions",
                &["crd", "crds"],
                false,
                true,
                Subdomain,
                typed::<CustomResourceDefinition>,
            ),
        ];
        for crd in crds {
            let names = &crd.spec.names;
            for version in crd.spec.versions.iter().filter(|v| v.served) {
                let openapi = version
                    .schema
                    .as_ref()
                    .and_then(|s| s.open_api_v3_schema.as_ref())
                    .map(serde_json::to_value)
                    .transpose()
                    .map_err(|e| SchemaError::from_message(e.to_string()))?
                    .unwrap_or_else(|| serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
                types.push(ResourceType {
                    group: crd.spec.group.clone(),
                    version: version.name.clone(),
                    kind: names.kind.clone(),
                    plural: names.plural.clone(),
                    singular: names
                        .singular
                        .clone()
                        .unwrap_or_else(|| names.kind.to_lowercase()),
                    short_names: names.short_names.clone().unwrap_or_default(),
                    namespaced: crd.spec.scope == "Namespaced",
                    status_subresource: version
                        .subresources
                        .as_ref()
                        .is_some_and(|s| s.status.is_some()),
                    status_on_create: false,
                    name_rule: NameRule::Subdomain,
                    check: Check::Crd(Box::new({
                        let schema = CrdSchema::new(openapi)?;
                        if enforce_cel_rules {
                            schema
                        } else {
                            schema.without_cel_rules()
                        }
                    })),
                });
            }
        }
        let types: Vec<Arc<ResourceType>> = types.into_iter().map(Arc::new).collect();
        let by_path = types
            .iter()
            .enumerate()
            .map(|(id, t)| ((t.group.clone(), t.version.clone(), t.plural.clone()), id))
            .collect();
        Ok(Registry { types, by_path })
    }

    /// The type served at `/apis/<group>/<version>/<plural>` (group `""` for `/api/v1`).
    pub fn find(&self, group: &str, version: &str, plural: &str) -> Option<ResourceId> {
        self.by_path
            .get(&(group.to_string(), version.to_string(), plural.to_string()))
            .copied()
    }

    /// The type with this apiVersion and kind.
    pub fn find_kind(&self, api_version: &str, kind: &str) -> Option<ResourceId> {
        self.types
            .iter()
            .position(|t| t.api_version() == api_version && t.kind == kind)
    }

    /// The type with this id.
    pub fn get(&self, id: ResourceId) -> &Arc<ResourceType> {
        &self.types[id]
    }

    /// Every type, in id order.
    pub fn all(&self) -> &[Arc<ResourceType>] {
        &self.types
    }

    /// The first type with this plural (any group), for name-based lookups in tests.
    pub fn find_plural(&self, plural: &str) -> Option<ResourceId> {
        self.types
            .iter()
            .position(|t| t.plural == plural || t.qualified_plural() == plural)
    }
}
