//! Object semantics, independent of HTTP: create, get, update, patch, apply,
//! delete (with garbage collection), list with resourceVersion and paging.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, Mutex, MutexGuard};

use base64::Engine as _;
use serde_json::{Value, json};

use crate::error::{ApiError, Cause, Subject};
use crate::faults::{Faults, lock};
use crate::patch;
use crate::resources::{Check, NameRule, Registry, ResourceId, ResourceType};
use crate::selectors::Selectors;
use crate::store::{EventType, ObjectKey, Store};
use crate::validation;

/// Which object a request addresses.
#[derive(Debug, Clone)]
pub struct Target {
    /// Resource type.
    pub res: ResourceId,
    /// Namespace (`None` for cluster-scoped types).
    pub namespace: Option<String>,
    /// Object name.
    pub name: String,
    /// The `/status` subresource rather than the main resource.
    pub status: bool,
}

impl Target {
    fn key(&self) -> ObjectKey {
        (
            self.namespace.clone().unwrap_or_default(),
            self.name.clone(),
        )
    }
}

/// A patch body with its type (from the request's Content-Type).
#[derive(Debug, Clone)]
pub enum PatchBody {
    /// `application/json-patch+json`.
    Json(Value),
    /// `application/merge-patch+json`, and `application/strategic-merge-patch+json`
    /// (strategic merge is treated as a merge patch: lists replace, no merge keys).
    Merge(Value),
    /// `application/apply-patch+yaml` with the request's `fieldManager` and `force`.
    Apply {
        /// The applied configuration.
        config: Value,
        /// `fieldManager` (required).
        manager: String,
        /// `force`.
        force: bool,
    },
}

/// `propagationPolicy` of a delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Propagation {
    /// Dependents are deleted (immediately, after the owner).
    #[default]
    Background,
    /// Accepted; behaves like Background (no finalizers here).
    Foreground,
    /// Dependents lose their ownerReference to the deleted owner and stay.
    Orphan,
}

/// Options of a delete.
#[derive(Debug, Clone, Default)]
pub struct DeleteOptions {
    /// How dependents are handled.
    pub propagation: Propagation,
    /// Precondition on the object's uid.
    pub uid: Option<String>,
    /// Precondition on the object's resourceVersion.
    pub resource_version: Option<String>,
}

/// A list request.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    /// Label and field selectors.
    pub selectors: Selectors,
    /// Page size.
    pub limit: Option<usize>,
    /// Continue token from a previous page.
    pub continue_token: Option<String>,
    /// `resourceVersion` parameter.
    pub resource_version: Option<String>,
    /// `resourceVersionMatch` parameter (`Exact` or `NotOlderThan`).
    pub resource_version_match: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// The matching objects, ordered by namespace and name.
    pub items: Vec<Arc<Value>>,
    /// The resourceVersion the page is consistent at.
    pub resource_version: u64,
    /// Token for the next page, if there is one.
    pub continue_token: Option<String>,
    /// How many matching objects follow this page.
    pub remaining: Option<u64>,
}

/// Request counts by (verb, resource): the verb is `get`, `list`, `watch`,
/// `create`, `update`, `patch`, `delete` or `deletecollection`; the resource is
/// the plural, group-qualified unless core, with `/status` for the subresource
/// (`proxyplans.planproxy.dev/status`).
pub type RequestCounts = BTreeMap<(String, String), u64>;

/// Everything the request handlers share.
#[derive(Debug)]
pub struct Api {
    /// Served types.
    pub registry: Registry,
    /// Objects and events.
    pub store: Mutex<Store>,
    /// Fault switches.
    pub faults: Faults,
    counts: Mutex<RequestCounts>,
    ids: Mutex<u64>,
}

fn parse_rv(text: &str) -> Result<u64, ApiError> {
    text.parse()
        .map_err(|_| ApiError::bad_request(format!("invalid resource version {text:?}")))
}

fn now() -> String {
    jiff::Timestamp::now()
        .round(jiff::Unit::Second)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

/// Whether two objects agree outside `metadata` and `status` (what
/// `metadata.generation` tracks), without copying them.
fn same_spec(a: &Value, b: &Value) -> bool {
    fn relevant(o: &Value) -> BTreeMap<&String, &Value> {
        o.as_object()
            .into_iter()
            .flatten()
            .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status"))
            .collect()
    }
    relevant(a) == relevant(b)
}

fn object_key(object: &Value) -> ObjectKey {
    let field = |f: &str| {
        object
            .pointer(f)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    (field("/metadata/namespace"), field("/metadata/name"))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ContinueToken {
    rv: u64,
    ns: String,
    name: String,
}

impl Api {
    /// An empty API over these types.
    pub fn new(registry: Registry, event_window: usize, seed: u64) -> Self {
        let tables = registry.all().len();
        Api {
            registry,
            store: Mutex::new(Store::new(tables, event_window)),
            faults: Faults::new(seed),
            counts: Mutex::new(BTreeMap::new()),
            ids: Mutex::new(seed),
        }
    }

    /// The resource as counters and fault filters name it: `plural[.group][/status]`.
    pub fn resource_name(&self, res: ResourceId, status: bool) -> String {
        let mut resource = self.registry.get(res).qualified_plural();
        if status {
            resource.push_str("/status");
        }
        resource
    }

    /// Counts one request.
    pub fn count(&self, verb: &str, res: ResourceId, status: bool) {
        let resource = self.resource_name(res, status);
        *lock(&self.counts)
            .entry((verb.to_string(), resource))
            .or_default() += 1;
    }

    /// A copy of the request counters.
    pub fn counts(&self) -> RequestCounts {
        lock(&self.counts).clone()
    }

    /// Zeroes the request counters.
    pub fn reset_counts(&self) {
        lock(&self.counts).clear();
    }

    fn subject<'a>(&'a self, res: ResourceId, name: &'a str) -> Subject<'a> {
        let rt = self.registry.get(res);
        Subject {
            group: &rt.group,
            plural: &rt.plural,
            name,
        }
    }

    fn next_id(&self) -> u64 {
        let mut ids = lock(&self.ids);
        // splitmix64: distinct, random-looking ids from a counter.
        *ids = ids.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *ids;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    fn new_uid(&self) -> String {
        let (a, b) = (self.next_id(), self.next_id());
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            (b >> 48) & 0xfff,
            b & 0xffff_ffff_ffff
        )
    }

    fn generated_suffix(&self) -> String {
        const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
        let mut n = self.next_id();
        (0..5)
            .map(|_| {
                let c = ALPHABET[(n % ALPHABET.len() as u64) as usize] as char;
                n /= ALPHABET.len() as u64;
                c
            })
            .collect()
    }

    fn check_namespace(&self, res: ResourceId, namespace: Option<&str>) -> Result<(), ApiError> {
        let rt = self.registry.get(res);
        match (rt.namespaced, namespace) {
            (true, None) => Err(ApiError::bad_request(format!(
                "{} is namespaced: the request needs a namespace",
                rt.plural
            ))),
            (false, Some(_)) => Err(ApiError::path_not_found(&rt.plural)),
            _ => Ok(()),
        }
    }

    /// Reads one object.
    pub fn get(&self, target: &Target) -> Result<Arc<Value>, ApiError> {
        self.check_namespace(target.res, target.namespace.as_deref())?;
        let store = lock(&self.store);
        store
            .get(target.res, &target.key())
            .map(|e| e.object.clone())
            .ok_or_else(|| self.not_found(target))
    }

    /// Creates an object (409 AlreadyExists when the name is taken).
    pub fn create(
        &self,
        res: ResourceId,
        namespace: Option<&str>,
        mut body: Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        self.check_namespace(res, namespace)?;
        let meta = body
            .get_mut("metadata")
            .and_then(Value::as_object_mut)
            .ok_or_else(|| ApiError::bad_request("metadata is required"))?;
        let name = match meta.get("name").and_then(Value::as_str) {
            Some(name) if !name.is_empty() => name.to_string(),
            _ => match meta.get("generateName").and_then(Value::as_str) {
                Some(prefix) if !prefix.is_empty() => {
                    let name = format!("{prefix}{}", self.generated_suffix());
                    meta.insert("name".into(), Value::String(name.clone()));
                    name
                }
                _ => {
                    return Err(ApiError::invalid(
                        &self.registry.get(res).kind,
                        &self.registry.get(res).group,
                        "",
                        vec![Cause {
                            field: "metadata.name".into(),
                            message: "Required value: name or generateName is required".into(),
                        }],
                    ));
                }
            },
        };
        let target = Target {
            res,
            namespace: namespace.map(str::to_string),
            name,
            status: false,
        };
        self.faults
            .injected_write_failure(&self.resource_name(res, false), || {
                ApiError::conflict(
                    self.subject(res, &target.name),
                    "injected conflict (test API server fault)",
                )
            })?;
        let mut store = lock(&self.store);
        if store.get(res, &target.key()).is_some() {
            return Err(ApiError::already_exists(self.subject(res, &target.name)));
        }
        let object = self.prepare(&target, None, body)?.unwrap_or_default();
        if dry_run {
            return Ok(Arc::new(object));
        }
        let written = store.put(res, target.key(), object, BTreeMap::new());
        self.collect_if_orphaned(&mut store, res, &target.key(), &written);
        Ok(written)
    }

    /// Replaces an object (PUT). A non-empty `metadata.resourceVersion` is a precondition (409 Conflict).
    pub fn update(
        &self,
        target: &Target,
        body: Value,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let mut store = self.begin_write(target)?;
        let key = target.key();
        let entry = store
            .get(target.res, &key)
            .cloned()
            .ok_or_else(|| self.not_found(target))?;
        if let Some(rv) = body
            .pointer("/metadata/resourceVersion")
            .and_then(Value::as_str)
            && !rv.is_empty()
            && Some(rv)
                != entry
                    .object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(self.conflict(target));
        }
        match self.prepare(target, Some(&entry.object), body)? {
            None => Ok(entry.object),
            Some(_) if dry_run => Ok(entry.object),
            Some(object) => {
                let written = store.put(target.res, key.clone(), object, entry.applied);
                self.collect_if_orphaned(&mut store, target.res, &key, &written);
                Ok(written)
            }
        }
    }

    /// Like the garbage collector: an object whose every ownerReference names a
    /// served kind but no live object is deleted, right after the write that
    /// stored it (the write itself succeeds, as on a real cluster).
    fn collect_if_orphaned(
        &self,
        store: &mut Store,
        res: ResourceId,
        key: &ObjectKey,
        object: &Value,
    ) {
        let Some(refs) = object
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .filter(|refs| !refs.is_empty())
        else {
            return;
        };
        let owners_gone = refs.iter().all(|r| {
            let field = |f: &str| r.get(f).and_then(Value::as_str).unwrap_or_default();
            self.registry
                .find_kind(field("apiVersion"), field("kind"))
                .is_some()
                && store.find_uid(field("uid")).is_none()
        });
        if owners_gone {
            tracing::debug!(name = %key.1, "owners are gone: garbage-collecting");
            delete_and_collect(store, res, key, Propagation::Background);
        }
    }

    /// The checks every write to an existing or named object passes first
    /// (namespace, injected failures), then the store, locked for the write.
    fn begin_write(&self, target: &Target) -> Result<MutexGuard<'_, Store>, ApiError> {
        self.check_namespace(target.res, target.namespace.as_deref())?;
        self.faults
            .injected_write_failure(&self.resource_name(target.res, target.status), || {
                self.conflict(target)
            })?;
        Ok(lock(&self.store))
    }

    fn not_found(&self, target: &Target) -> ApiError {
        ApiError::not_found(self.subject(target.res, &target.name))
    }

    fn conflict(&self, target: &Target) -> ApiError {
        ApiError::conflict(
            self.subject(target.res, &target.name),
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    /// Patches an object; apply creates it when absent. Returns the object and whether it was created.
    pub fn patch(
        &self,
        target: &Target,
        body: PatchBody,
        dry_run: bool,
    ) -> Result<(Arc<Value>, bool), ApiError> {
        let mut store = self.begin_write(target)?;
        let key = target.key();
        let entry = store.get(target.res, &key).cloned();
        let rt = self.registry.get(target.res);
        let (live, mut configs) = match &entry {
            Some(e) => ((*e.object).clone(), e.applied.clone()),
            None => match &body {
                PatchBody::Apply { .. } if !target.status => {
                    (Value::Object(Default::default()), BTreeMap::new())
                }
                _ => return Err(self.not_found(target)),
            },
        };
        let mut patched = live;
        let precondition = match &body {
            PatchBody::Json(ops) => {
                patch::json_patch(&mut patched, ops)
                    .map_err(|e| ApiError::new_unprocessable(rt, &target.name, e))?;
                None
            }
            PatchBody::Merge(p) => {
                patch::merge(&mut patched, p);
                p.pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }
            PatchBody::Apply {
                config,
                manager,
                force,
            } => {
                for (field, expected) in
                    [("apiVersion", rt.api_version()), ("kind", rt.kind.clone())]
                {
                    if config.get(field).and_then(Value::as_str) != Some(expected.as_str()) {
                        return Err(ApiError::bad_request(format!(
                            "apply patches must set {field} to {expected:?}"
                        )));
                    }
                }
                let manager_key = if target.status {
                    format!("{manager}/status")
                } else {
                    manager.clone()
                };
                let applied = patch::apply(&patched, &configs, &manager_key, config, *force)
                    .map_err(|conflicts| {
                        ApiError::apply_conflict(self.subject(target.res, &target.name), &conflicts)
                    })?;
                patched = applied.object;
                configs = applied.configs;
                config
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            }
        };
        if let (Some(rv), Some(e)) = (precondition.as_deref(), &entry)
            && !rv.is_empty()
            && Some(rv)
                != e.object
                    .pointer("/metadata/resourceVersion")
                    .and_then(Value::as_str)
        {
            return Err(self.conflict(target));
        }
        // The patch may not move the object: name and namespace come from the URL.
        if let Some(meta) = patched.get_mut("metadata").and_then(Value::as_object_mut)
            && let Some(old) = entry
                .as_ref()
                .and_then(|e| e.object.pointer("/metadata/resourceVersion"))
        {
            meta.insert("resourceVersion".into(), old.clone());
        }
        match &entry {
            Some(e) => match self.prepare(target, Some(&e.object), patched)? {
                None if configs == e.applied => Ok((e.object.clone(), false)),
                None if dry_run => Ok((e.object.clone(), false)),
                None => Ok((
                    store.put(target.res, key, (*e.object).clone(), configs),
                    false,
                )),
                Some(_) if dry_run => Ok((e.object.clone(), false)),
                Some(object) => {
                    let written = store.put(target.res, key.clone(), object, configs);
                    self.collect_if_orphaned(&mut store, target.res, &key, &written);
                    Ok((written, false))
                }
            },
            None => {
                let object = self.prepare(target, None, patched)?.unwrap_or_default();
                if dry_run {
                    return Ok((Arc::new(object), true));
                }
                let written = store.put(target.res, key.clone(), object, configs);
                self.collect_if_orphaned(&mut store, target.res, &key, &written);
                Ok((written, true))
            }
        }
    }

    /// Deletes an object and garbage-collects its dependents.
    pub fn delete(
        &self,
        target: &Target,
        options: &DeleteOptions,
        dry_run: bool,
    ) -> Result<Arc<Value>, ApiError> {
        let mut store = self.begin_write(target)?;
        let key = target.key();
        let object = store
            .get(target.res, &key)
            .map(|e| e.object.clone())
            .ok_or_else(|| self.not_found(target))?;
        let meta = |f: &str| {
            object
                .pointer(f)
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        if options
            .uid
            .as_ref()
            .is_some_and(|uid| Some(uid) != meta("/metadata/uid").as_ref())
            || options
                .resource_version
                .as_ref()
                .is_some_and(|rv| Some(rv) != meta("/metadata/resourceVersion").as_ref())
        {
            return Err(ApiError::conflict(
                self.subject(target.res, &target.name),
                "Precondition failed: the uid or resourceVersion in the precondition does not match the object",
            ));
        }
        if dry_run {
            return Ok(object);
        }
        let deleted = delete_and_collect(&mut store, target.res, &key, options.propagation);
        let rt = self.registry.get(target.res);
        if rt.group.is_empty() && rt.plural == "namespaces" {
            // A namespace takes its contents with it (at once: no Terminating phase here).
            for (res, _) in self
                .registry
                .all()
                .iter()
                .enumerate()
                .filter(|(_, t)| t.namespaced)
            {
                let keys: Vec<ObjectKey> = store
                    .table(res)
                    .objects
                    .range((target.name.clone(), String::new())..)
                    .take_while(|(k, _)| k.0 == target.name)
                    .map(|(k, _)| k.clone())
                    .collect();
                for key in keys {
                    delete_and_collect(&mut store, res, &key, options.propagation);
                }
            }
        }
        Ok(deleted.unwrap_or(object))
    }

    /// Deletes every object of a collection that matches the selectors.
    pub fn delete_collection(
        &self,
        res: ResourceId,
        namespace: Option<&str>,
        selectors: &Selectors,
        options: &DeleteOptions,
    ) -> Result<Vec<Arc<Value>>, ApiError> {
        let page = self.list(
            res,
            namespace,
            &ListQuery {
                selectors: selectors.clone(),
                ..Default::default()
            },
        )?;
        let mut store = lock(&self.store);
        Ok(page
            .items
            .iter()
            .filter_map(|item| {
                delete_and_collect(&mut store, res, &object_key(item), options.propagation)
            })
            .collect())
    }

    /// Lists objects, consistent at one resourceVersion, in pages.
    pub fn list(
        &self,
        res: ResourceId,
        namespace: Option<&str>,
        query: &ListQuery,
    ) -> Result<ListPage, ApiError> {
        let rt = self.registry.get(res);
        if !rt.namespaced && namespace.is_some() {
            return Err(ApiError::path_not_found(&rt.plural));
        }
        let store = lock(&self.store);
        let current = store.current_rv();
        let (snapshot_rv, after) = match &query.continue_token {
            Some(token) => {
                let token = decode_continue(token)?;
                store.check_not_expired(res, token.rv).map_err(|_| {
                    ApiError { reason: "Expired", ..ApiError::expired(token.rv, current) }.with_message(
                        "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.",
                    )
                })?;
                (token.rv, Some((token.ns, token.name)))
            }
            None => match (
                query.resource_version.as_deref(),
                query.resource_version_match.as_deref(),
            ) {
                (Some(rv), Some("Exact")) => {
                    let rv = parse_rv(rv)?;
                    store.check_not_expired(res, rv)?;
                    (rv.min(current), None)
                }
                (Some(rv), _) if !rv.is_empty() => {
                    parse_rv(rv)?;
                    (current, None)
                }
                _ => (current, None),
            },
        };
        // Undo the changes after the snapshot: the first event after it holds each object's state then.
        let mut overlay: HashMap<ObjectKey, Option<Arc<Value>>> = HashMap::new();
        if snapshot_rv < current {
            for event in store.events_since(res, snapshot_rv)? {
                overlay
                    .entry(object_key(&event.object))
                    .or_insert_with(|| match event.kind {
                        EventType::Added => None,
                        EventType::Modified | EventType::Deleted => event.previous.clone(),
                    });
            }
        }
        let table = &store.table(res).objects;
        let pinned = query.selectors.fields.pinned_name();
        let start = match (&after, namespace) {
            (Some(after), _) => Bound::Excluded(after.clone()),
            (None, Some(ns)) => Bound::Included((ns.to_string(), String::new())),
            (None, None) => Bound::Unbounded,
        };
        let wanted = |key: &ObjectKey| {
            namespace.is_none_or(|ns| key.0 == ns) && pinned.is_none_or(|n| n == key.1)
        };
        let in_table = table
            .range((start.clone(), Bound::Unbounded))
            // Keys are ordered by namespace first: past it, nothing more can match.
            .take_while(|(key, _)| namespace.is_none_or(|ns| key.0.as_str() <= ns))
            .filter(|(key, _)| wanted(key))
            .map(|(key, entry)| (key, &entry.object));
        let ordered: Box<dyn Iterator<Item = (&ObjectKey, &Arc<Value>)>> = if overlay.is_empty() {
            Box::new(in_table)
        } else {
            let mut merged: BTreeMap<&ObjectKey, &Arc<Value>> = in_table
                .filter(|(key, _)| !overlay.contains_key(*key))
                .collect();
            for (key, object) in &overlay {
                let after_start = match &start {
                    Bound::Excluded(after) => key > after,
                    _ => true,
                };
                if let Some(object) = object
                    && after_start
                    && wanted(key)
                {
                    merged.insert(key, object);
                }
            }
            Box::new(merged.into_iter())
        };
        let mut matching = ordered.filter(|(_, o)| query.selectors.matches(o));
        let limit = query.limit.filter(|&l| l > 0).unwrap_or(usize::MAX);
        let mut items = Vec::new();
        let mut last_key = None;
        let mut remaining = 0u64;
        for (key, object) in matching.by_ref() {
            if items.len() == limit {
                remaining = 1;
                break;
            }
            items.push((*object).clone());
            last_key = Some(key.clone());
        }
        remaining += matching.count() as u64;
        let (continue_token, remaining) = match last_key {
            Some((ns, name)) if remaining > 0 => (
                Some(encode_continue(&ContinueToken {
                    rv: snapshot_rv,
                    ns,
                    name,
                })),
                Some(remaining),
            ),
            _ => (None, None),
        };
        Ok(ListPage {
            items,
            resource_version: snapshot_rv,
            continue_token,
            remaining,
        })
    }

    /// Fills in and checks an object about to be written. `None` means the write changes nothing.
    fn prepare(
        &self,
        target: &Target,
        old: Option<&Value>,
        mut new: Value,
    ) -> Result<Option<Value>, ApiError> {
        let rt = self.registry.get(target.res);
        let obj = new
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
        for (field, expected) in [("apiVersion", rt.api_version()), ("kind", rt.kind.clone())] {
            match obj.get(field).and_then(Value::as_str) {
                Some(v) if !v.is_empty() && v != expected => {
                    return Err(ApiError::bad_request(format!(
                        "the {field} in the data ({v}) does not match the expected {field} ({expected})"
                    )));
                }
                _ => {
                    obj.insert(field.into(), Value::String(expected));
                }
            }
        }
        let meta = obj
            .entry("metadata")
            .or_insert_with(|| json!({}))
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("metadata must be an object"))?;
        match meta.get("name").and_then(Value::as_str) {
            Some(n) if !n.is_empty() && n != target.name => {
                return Err(ApiError::bad_request(format!(
                    "the name of the object ({n}) does not match the name on the URL ({})",
                    target.name
                )));
            }
            _ => {
                meta.insert("name".into(), Value::String(target.name.clone()));
            }
        }
        match (
            &target.namespace,
            meta.get("namespace").and_then(Value::as_str),
        ) {
            (Some(url), Some(body)) if !body.is_empty() && body != url => {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            (Some(url), _) => {
                meta.insert("namespace".into(), Value::String(url.clone()));
            }
            (None, _) => {
                meta.remove("namespace");
            }
        }
        meta.remove("managedFields");
        meta.remove("selfLink");
        match old {
            Some(old) => {
                if target.status {
                    let mut merged = old.clone();
                    match new.get("status") {
                        Some(status) => merged["status"] = status.clone(),
                        None => {
                            if let Some(m) = merged.as_object_mut() {
                                m.remove("status");
                            }
                        }
                    }
                    new = merged;
                } else if rt.status_subresource {
                    let obj = new
                        .as_object_mut()
                        .ok_or_else(|| ApiError::bad_request("the body must be a JSON object"))?;
                    match old.get("status") {
                        Some(status) => obj.insert("status".into(), status.clone()),
                        None => obj.remove("status"),
                    };
                }
                for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
                    match old.pointer(&format!("/metadata/{field}")) {
                        Some(v) => new["metadata"][field] = v.clone(),
                        None => {
                            if let Some(m) = new["metadata"].as_object_mut() {
                                m.remove(field);
                            }
                        }
                    }
                }
            }
            None => {
                meta.insert("uid".into(), Value::String(self.new_uid()));
                meta.insert("creationTimestamp".into(), Value::String(now()));
                meta.remove("resourceVersion");
                meta.remove("deletionTimestamp");
                if matches!(rt.check, Check::Crd(_)) {
                    meta.insert("generation".into(), json!(1));
                } else {
                    meta.remove("generation");
                }
                if rt.status_subresource
                    && !rt.status_on_create
                    && let Some(obj) = new.as_object_mut()
                {
                    obj.remove("status");
                }
            }
        }
        self.validate(rt, &target.name, &mut new)?;
        if let Some(old) = old {
            if matches!(rt.check, Check::Crd(_)) && !same_spec(old, &new) {
                let generation = old
                    .pointer("/metadata/generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0);
                new["metadata"]["generation"] = json!(generation + 1);
            }
            if &new == old {
                return Ok(None);
            }
        }
        Ok(Some(new))
    }

    fn validate(&self, rt: &ResourceType, name: &str, object: &mut Value) -> Result<(), ApiError> {
        let mut causes = Vec::new();
        let name_check = match rt.name_rule {
            NameRule::Subdomain => validation::dns_subdomain(name),
            NameRule::Label => validation::dns_label(name),
        };
        if let Err(message) = name_check {
            causes.push(Cause {
                field: "metadata.name".into(),
                message: format!("Invalid value: {name:?}: {message}"),
            });
        }
        if let Some(labels) = object.pointer("/metadata/labels") {
            match labels.as_object() {
                Some(labels) => {
                    for (key, value) in labels {
                        let field = format!("metadata.labels[{key}]");
                        if let Err(message) = validation::label_key(key) {
                            causes.push(Cause {
                                field: field.clone(),
                                message,
                            });
                        }
                        match value.as_str() {
                            Some(v) => {
                                if let Err(message) = validation::label_value(v) {
                                    causes.push(Cause { field, message });
                                }
                            }
                            None => causes.push(Cause {
                                field,
                                message: "label values must be strings".into(),
                            }),
                        }
                    }
                }
                None => causes.push(Cause {
                    field: "metadata.labels".into(),
                    message: "must be a map of strings".into(),
                }),
            }
        }
        if let Some(annotations) = object
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
        {
            for (key, value) in annotations {
                if let Err(message) = validation::label_key(key) {
                    causes.push(Cause {
                        field: format!("metadata.annotations[{key}]"),
                        message,
                    });
                }
                if !value.is_string() {
                    causes.push(Cause {
                        field: format!("metadata.annotations[{key}]"),
                        message: "annotation values must be strings".into(),
                    });
                }
            }
        }
        match &rt.check {
            Check::Typed(decode) => {
                if causes.is_empty() {
                    decode(object).map_err(|e| {
                        ApiError::bad_request(format!("unable to decode {} {name:?}: {e}", rt.kind))
                    })?;
                }
            }
            Check::Crd(schema) => {
                schema.prune(object);
                schema.apply_defaults(object);
                causes.extend(schema.validate(object));
            }
        }
        if causes.is_empty() {
            Ok(())
        } else {
            Err(ApiError::invalid(&rt.kind, &rt.group, name, causes))
        }
    }
}

impl ApiError {
    fn new_unprocessable(rt: &ResourceType, name: &str, message: String) -> Self {
        ApiError::invalid(
            &rt.kind,
            &rt.group,
            name,
            vec![Cause {
                field: "<patch>".into(),
                message,
            }],
        )
    }

    fn with_message(mut self, message: &str) -> Self {
        self.message = message.to_string();
        self
    }
}

fn encode_continue(token: &ContinueToken) -> String {
    let json = serde_json::to_vec(token).unwrap_or_default();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json)
}

fn decode_continue(token: &str) -> Result<ContinueToken, ApiError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .ok_or_else(|| ApiError::bad_request("invalid continue token"))
}

/// Deletes one object and, per `propagation`, its dependents (recursively).
fn delete_and_collect(
    store: &mut Store,
    res: ResourceId,
    key: &ObjectKey,
    propagation: Propagation,
) -> Option<Arc<Value>> {
    let removed = store.remove(res, key)?;
    let Some(uid) = removed.pointer("/metadata/uid").and_then(Value::as_str) else {
        return Some(removed);
    };
    for (dep_res, dep_key) in store.dependents_of(uid) {
        let Some(dependent) = store.get(dep_res, &dep_key).cloned() else {
            continue;
        };
        let refs: Vec<Value> = dependent
            .object
            .pointer("/metadata/ownerReferences")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if propagation == Propagation::Orphan {
            let kept: Vec<Value> = refs
                .into_iter()
                .filter(|r| r.get("uid").and_then(Value::as_str) != Some(uid))
                .collect();
            let mut object = (*dependent.object).clone();
            object["metadata"]["ownerReferences"] = Value::Array(kept);
            store.put(dep_res, dep_key, object, dependent.applied);
            continue;
        }
        let has_live_owner = refs
            .iter()
            .filter_map(|r| r.get("uid").and_then(Value::as_str))
            .any(|u| u != uid && store.find_uid(u).is_some());
        if !has_live_owner {
            delete_and_collect(store, dep_res, &dep_key, Propagation::Background);
        }
    }
    Some(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api() -> (Api, ResourceId) {
        let registry = Registry::new(&[], true).unwrap();
        let res = registry.find("", "v1", "configmaps").unwrap();
        (Api::new(registry, 100, 1), res)
    }

    fn create(api: &Api, res: ResourceId, ns: &str, name: &str) -> Arc<Value> {
        api.create(res, Some(ns), json!({"metadata": {"name": name}}), false)
            .unwrap()
    }

    fn names(page: &ListPage) -> Vec<String> {
        page.items.iter().map(|o| object_key(o).1).collect()
    }

    #[test]
    fn a_list_that_fills_its_last_page_exactly_has_no_continue_token() {
        let (api, res) = api();
        for i in 0..4 {
            create(&api, res, "default", &format!("c{i}"));
        }
        let query = ListQuery {
            limit: Some(2),
            ..Default::default()
        };
        let first = api.list(res, None, &query).unwrap();
        assert_eq!(
            (names(&first), first.remaining),
            (vec!["c0".into(), "c1".into()], Some(2))
        );
        let second = api
            .list(
                res,
                None,
                &ListQuery {
                    continue_token: first.continue_token,
                    ..query
                },
            )
            .unwrap();
        assert_eq!(names(&second), vec!["c2", "c3"]);
        assert_eq!(second.continue_token, None);
    }

    #[test]
    fn namespaced_lists_see_only_their_namespace() {
        let (api, res) = api();
        create(&api, res, "a", "x");
        create(&api, res, "b", "y");
        create(&api, res, "c", "z");
        let page = api.list(res, Some("b"), &ListQuery::default()).unwrap();
        assert_eq!(names(&page), vec!["y"]);
        assert_eq!(
            api.list(res, None, &ListQuery::default())
                .unwrap()
                .items
                .len(),
            3
        );
    }

    #[test]
    fn an_exact_resource_version_lists_the_state_at_that_version() {
        let (api, res) = api();
        create(&api, res, "d", "kept");
        let gone = create(&api, res, "d", "gone");
        let at = lock(&api.store).current_rv();
        let target = |name: &str| Target {
            res,
            namespace: Some("d".into()),
            name: name.into(),
            status: false,
        };
        api.delete(&target("gone"), &DeleteOptions::default(), false)
            .unwrap();
        create(&api, res, "d", "new");
        api.patch(
            &target("kept"),
            PatchBody::Merge(json!({"data": {"k": "v"}})),
            false,
        )
        .unwrap();
        let page = api
            .list(
                res,
                None,
                &ListQuery {
                    resource_version: Some(at.to_string()),
                    resource_version_match: Some("Exact".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        assert_eq!(names(&page), vec!["gone", "kept"]);
        assert_eq!(page.items[0], gone);
        assert!(page.items[1].get("data").is_none());
        let latest = api.list(res, None, &ListQuery::default()).unwrap();
        assert_eq!(names(&latest), vec!["kept", "new"]);
    }

    #[test]
    fn a_continue_token_older_than_the_window_is_expired() {
        let registry = Registry::new(&[], true).unwrap();
        let res = registry.find("", "v1", "configmaps").unwrap();
        let api = Api::new(registry, 2, 1);
        for i in 0..3 {
            create(&api, res, "d", &format!("c{i}"));
        }
        let first = api
            .list(
                res,
                None,
                &ListQuery {
                    limit: Some(1),
                    ..Default::default()
                },
            )
            .unwrap();
        for i in 3..6 {
            create(&api, res, "d", &format!("c{i}"));
        }
        let err = api
            .list(
                res,
                None,
                &ListQuery {
                    continue_token: first.continue_token,
                    ..Default::default()
                },
            )
            .unwrap_err();
        assert_eq!((err.code, err.reason), (410, "Expired"));
    }

    #[test]
    fn an_object_written_with_only_absent_owners_is_garbage_collected() {
        let (api, res) = api();
        let owner = create(&api, res, "d", "owner");
        let owned_by = |uid: &str| json!({"metadata": {"name": "dep", "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": uid}]}});
        let live_uid = owner["metadata"]["uid"].as_str().unwrap();
        api.create(res, Some("d"), owned_by(live_uid), false)
            .unwrap();
        let target = |name: &str| Target {
            res,
            namespace: Some("d".into()),
            name: name.into(),
            status: false,
        };
        assert!(api.get(&target("dep")).is_ok(), "a live owner keeps it");
        api.delete(&target("dep"), &DeleteOptions::default(), false)
            .unwrap();
        let created = api
            .create(res, Some("d"), owned_by("no-such-uid"), false)
            .unwrap();
        assert_eq!(
            created["metadata"]["name"], "dep",
            "the create itself succeeds"
        );
        assert_eq!(api.get(&target("dep")).unwrap_err().code, 404);
    }

    #[test]
    fn deleting_a_namespace_deletes_its_contents_only() {
        let (api, res) = api();
        let namespaces = api.registry.find("", "v1", "namespaces").unwrap();
        api.create(
            namespaces,
            None,
            json!({"metadata": {"name": "gone"}}),
            false,
        )
        .unwrap();
        create(&api, res, "gone", "a");
        create(&api, res, "gone", "b");
        create(&api, res, "kept", "c");
        let target = Target {
            res: namespaces,
            namespace: None,
            name: "gone".into(),
            status: false,
        };
        api.delete(&target, &DeleteOptions::default(), false)
            .unwrap();
        let left = api.list(res, None, &ListQuery::default()).unwrap();
        assert_eq!(names(&left), vec!["c"]);
    }

    #[test]
    fn updates_that_change_nothing_keep_the_resource_version() {
        let (api, res) = api();
        let created = create(&api, res, "d", "a");
        let target = Target {
            res,
            namespace: Some("d".into()),
            name: "a".into(),
            status: false,
        };
        let same = api.update(&target, (*created).clone(), false).unwrap();
        assert_eq!(same, created);
        let patched = api
            .patch(&target, PatchBody::Merge(json!({"data": {}})), false)
            .unwrap();
        assert_ne!(patched.0, created, "an empty map is a change");
    }
}
