//! The in-memory object store: one table per resource type, one global
//! resourceVersion counter, and a bounded event log per table for watches.
//!
//! Each table keeps its last `event_window` events (like kube-apiserver's
//! watch cache); a watch or continued list from a resourceVersion whose
//! events were already dropped gets 410 Expired.
//!
//! Writes push each event to the queues of the watches it can concern
//! ([`WatchRoute`]), so a write never scans every watch.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::error::ApiError;
use crate::resources::ResourceId;

/// Events queued per watch before it must catch up from the log.
pub const WATCH_QUEUE: usize = 4096;

/// `(namespace, name)`; the namespace is `""` for cluster-scoped objects.
pub type ObjectKey = (String, String);

/// A stored object plus what the server remembers about it.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The object as served (with metadata.resourceVersion set).
    pub object: Arc<Value>,
    /// Per field manager, the last object it applied (server-side apply).
    pub applied: BTreeMap<String, Value>,
}

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// Created.
    Added,
    /// Changed.
    Modified,
    /// Deleted.
    Deleted,
}

impl EventType {
    /// The wire name (`ADDED`, `MODIFIED`, `DELETED`).
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One change, as a watch replays it.
#[derive(Debug)]
pub struct LoggedEvent {
    /// The resourceVersion the change produced.
    pub rv: u64,
    /// What happened.
    pub kind: EventType,
    /// The object after the change (for deletes: the last state, with the deletion's RV).
    pub object: Arc<Value>,
    /// The object before the change (lets filtered watches turn a change into ADDED/DELETED).
    pub previous: Option<Arc<Value>>,
}

/// One resource type's objects and recent events.
#[derive(Debug)]
pub struct Table {
    /// Objects, ordered by (namespace, name): lists and continue tokens follow this order.
    pub objects: BTreeMap<ObjectKey, Entry>,
    log: VecDeque<Arc<LoggedEvent>>,
    /// Events with a resourceVersion up to this one may have been dropped.
    evicted_through: u64,
    /// Event queues of the watches on this type, by what they can match.
    routes: HashMap<WatchRoute, Vec<mpsc::Sender<Arc<LoggedEvent>>>>,
}

/// Which events a watch is sent. A watch whose selector pins a name or
/// requires a label value gets only the events about objects with that name or
/// label (before or after the change), so a write costs one agent's watch, not all.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum WatchRoute {
    /// Every event of the type.
    All,
    /// Events about objects with this name.
    Name(String),
    /// Events about objects with this label value.
    Label(String, String),
}

fn routes_of(object: &Value, out: &mut BTreeSet<WatchRoute>) {
    if let Some(name) = object.pointer("/metadata/name").and_then(Value::as_str) {
        out.insert(WatchRoute::Name(name.to_string()));
    }
    if let Some(labels) = object
        .pointer("/metadata/labels")
        .and_then(Value::as_object)
    {
        for (k, v) in labels {
            if let Some(v) = v.as_str() {
                out.insert(WatchRoute::Label(k.clone(), v.to_string()));
            }
        }
    }
}

/// Every table, the global resourceVersion, and the owner index for garbage collection.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    tables: Vec<Table>,
    window: usize,
    /// owner uid → dependents (objects with an ownerReference naming that uid).
    dependents: HashMap<String, BTreeSet<(ResourceId, ObjectKey)>>,
    /// uid → object.
    uids: HashMap<String, (ResourceId, ObjectKey)>,
}

fn uid_of(object: &Value) -> Option<String> {
    object
        .pointer("/metadata/uid")
        .and_then(Value::as_str)
        .map(str::to_string)
}

fn owner_uids(object: &Value) -> Vec<String> {
    object
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .map(|refs| {
            refs.iter()
                .filter_map(|r| r.get("uid").and_then(Value::as_str).map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Store {
    /// An empty store with `tables` resource types and `window` retained events per type.
    pub fn new(tables: usize, window: usize) -> Self {
        Store {
            rv: 1,
            tables: (0..tables)
                .map(|_| Table {
                    objects: BTreeMap::new(),
                    log: VecDeque::new(),
                    evicted_through: 0,
                    routes: HashMap::new(),
                })
                .collect(),
            window: window.max(1),
            dependents: HashMap::new(),
            uids: HashMap::new(),
        }
    }

    /// The current (latest) resourceVersion.
    pub fn current_rv(&self) -> u64 {
        self.rv
    }

    /// A table.
    pub fn table(&self, res: ResourceId) -> &Table {
        &self.tables[res]
    }

    /// One object.
    pub fn get(&self, res: ResourceId, key: &ObjectKey) -> Option<&Entry> {
        self.tables[res].objects.get(key)
    }

    /// Writes an object (create or replace), assigning the next resourceVersion.
    pub fn put(
        &mut self,
        res: ResourceId,
        key: ObjectKey,
        mut object: Value,
        applied: BTreeMap<String, Value>,
    ) -> Arc<Value> {
        self.rv += 1;
        let rv = self.rv;
        if let Some(meta) = object.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let object = Arc::new(object);
        let previous = self.tables[res]
            .objects
            .insert(
                key.clone(),
                Entry {
                    object: object.clone(),
                    applied,
                },
            )
            .map(|e| e.object);
        if let Some(prev) = &previous {
            self.unindex_owners(res, &key, prev);
        }
        for uid in owner_uids(&object) {
            self.dependents
                .entry(uid)
                .or_default()
                .insert((res, key.clone()));
        }
        if let Some(uid) = uid_of(&object) {
            self.uids.insert(uid, (res, key.clone()));
        }
        let kind = if previous.is_some() {
            EventType::Modified
        } else {
            EventType::Added
        };
        self.log(
            res,
            LoggedEvent {
                rv,
                kind,
                object: object.clone(),
                previous,
            },
        );
        object
    }

    /// Deletes an object; the DELETED event carries its last state with the deletion's resourceVersion.
    pub fn remove(&mut self, res: ResourceId, key: &ObjectKey) -> Option<Arc<Value>> {
        let entry = self.tables[res].objects.remove(key)?;
        self.unindex_owners(res, key, &entry.object);
        if let Some(uid) = uid_of(&entry.object) {
            self.uids.remove(&uid);
        }
        self.rv += 1;
        let rv = self.rv;
        let mut last = (*entry.object).clone();
        if let Some(meta) = last.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.insert("resourceVersion".into(), Value::String(rv.to_string()));
        }
        let last = Arc::new(last);
        self.log(
            res,
            LoggedEvent {
                rv,
                kind: EventType::Deleted,
                object: last.clone(),
                previous: Some(entry.object),
            },
        );
        Some(last)
    }

    fn unindex_owners(&mut self, res: ResourceId, key: &ObjectKey, object: &Value) {
        for uid in owner_uids(object) {
            if let Some(set) = self.dependents.get_mut(&uid) {
                set.remove(&(res, key.clone()));
                if set.is_empty() {
                    self.dependents.remove(&uid);
                }
            }
        }
    }

    fn log(&mut self, res: ResourceId, event: LoggedEvent) {
        let window = self.window;
        let table = &mut self.tables[res];
        table.log.push_back(Arc::new(event));
        while table.log.len() > window {
            if let Some(old) = table.log.pop_front() {
                table.evicted_through = old.rv;
            }
        }
        let mut routes = BTreeSet::from([WatchRoute::All]);
        let narrow_watches = table.routes.keys().any(|r| *r != WatchRoute::All);
        if narrow_watches && let Some(event) = table.log.back() {
            routes_of(&event.object, &mut routes);
            if let Some(previous) = &event.previous {
                routes_of(previous, &mut routes);
            }
        }
        let Some(event) = table.log.back().cloned() else {
            return;
        };
        for route in routes {
            if let Some(senders) = table.routes.get_mut(&route) {
                // A full queue (a watch that fell behind) or a closed one (a watch
                // that ended) loses its sender: the first catches up from the log.
                senders.retain(|sender| sender.try_send(event.clone()).is_ok());
                if senders.is_empty() {
                    table.routes.remove(&route);
                }
            }
        }
    }

    /// Objects whose ownerReferences name this uid.
    pub fn dependents_of(&self, uid: &str) -> Vec<(ResourceId, ObjectKey)> {
        self.dependents
            .get(uid)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// The object with this uid, if it exists.
    pub fn find_uid(&self, uid: &str) -> Option<&(ResourceId, ObjectKey)> {
        self.uids.get(uid)
    }

    /// Fails with 410 Expired when events after `rv` were already dropped for this type.
    pub fn check_not_expired(&self, res: ResourceId, rv: u64) -> Result<(), ApiError> {
        let table = &self.tables[res];
        if rv < table.evicted_through {
            return Err(ApiError::expired(rv, table.evicted_through));
        }
        Ok(())
    }

    /// Every retained event of this type after `rv` (410 when some were dropped).
    pub fn events_since(
        &self,
        res: ResourceId,
        rv: u64,
    ) -> Result<Vec<Arc<LoggedEvent>>, ApiError> {
        self.check_not_expired(res, rv)?;
        let log = &self.tables[res].log;
        let start = log.partition_point(|e| e.rv <= rv);
        Ok(log.range(start..).cloned().collect())
    }

    /// A queue of this type's future events on `route`. When the watch falls
    /// more than [`WATCH_QUEUE`] events behind, the queue is closed (after the
    /// queued events) and the watch must catch up with [`Self::events_since`].
    pub fn subscribe(
        &mut self,
        res: ResourceId,
        route: WatchRoute,
    ) -> mpsc::Receiver<Arc<LoggedEvent>> {
        let (sender, receiver) = mpsc::channel(WATCH_QUEUE);
        self.tables[res]
            .routes
            .entry(route)
            .or_default()
            .push(sender);
        receiver
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn key(name: &str) -> ObjectKey {
        (String::new(), name.to_string())
    }

    #[test]
    fn every_write_gets_a_new_global_resource_version() {
        let mut store = Store::new(2, 10);
        let a = store.put(
            0,
            key("a"),
            json!({"metadata": {"name": "a"}}),
            BTreeMap::new(),
        );
        let b = store.put(
            1,
            key("b"),
            json!({"metadata": {"name": "b"}}),
            BTreeMap::new(),
        );
        let a_rv: u64 = a["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let b_rv: u64 = b["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(b_rv > a_rv);
        assert_eq!(store.current_rv(), b_rv);
        let deleted = store.remove(0, &key("a")).unwrap();
        assert_eq!(
            deleted["metadata"]["resourceVersion"],
            json!((b_rv + 1).to_string())
        );
    }

    #[test]
    fn events_older_than_the_window_are_expired() {
        let mut store = Store::new(1, 3);
        let start = store.current_rv();
        for i in 0..5 {
            store.put(
                0,
                key("a"),
                json!({"metadata": {"name": "a"}, "i": i}),
                BTreeMap::new(),
            );
        }
        assert_eq!(store.events_since(0, start).unwrap_err().code, 410);
        let recent = store.events_since(0, store.current_rv() - 3).unwrap();
        assert_eq!(recent.len(), 3);
        assert_eq!(recent[0].kind, EventType::Modified);
        assert!(
            store
                .events_since(0, store.current_rv())
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn watches_are_sent_only_the_events_on_their_route() {
        let mut store = Store::new(1, 10);
        let mut all = store.subscribe(0, WatchRoute::All);
        let mut node_a = store.subscribe(0, WatchRoute::Label("node".into(), "a".into()));
        let mut named_b = store.subscribe(0, WatchRoute::Name("b".into()));
        let labelled = json!({"metadata": {"name": "x", "labels": {"node": "a"}}});
        store.put(0, key("x"), labelled, BTreeMap::new());
        assert!(all.try_recv().is_ok() && node_a.try_recv().is_ok());
        assert!(named_b.try_recv().is_err());
        // Losing the label is an event for the label's watch too (it becomes a DELETED).
        store.put(
            0,
            key("x"),
            json!({"metadata": {"name": "x"}}),
            BTreeMap::new(),
        );
        assert_eq!(node_a.try_recv().unwrap().kind, EventType::Modified);
        store.put(
            0,
            key("b"),
            json!({"metadata": {"name": "b"}}),
            BTreeMap::new(),
        );
        assert!(named_b.try_recv().is_ok());
        assert!(node_a.try_recv().is_err());
        drop(all);
        store.put(
            0,
            key("y"),
            json!({"metadata": {"name": "y"}}),
            BTreeMap::new(),
        );
        assert!(
            !store.tables[0].routes.contains_key(&WatchRoute::All),
            "ended watches are forgotten"
        );
    }

    #[test]
    fn a_watch_that_falls_behind_has_its_queue_closed() {
        let mut store = Store::new(1, WATCH_QUEUE * 2);
        let mut slow = store.subscribe(0, WatchRoute::All);
        for i in 0..=WATCH_QUEUE {
            store.put(
                0,
                key("x"),
                json!({"metadata": {"name": "x"}, "i": i}),
                BTreeMap::new(),
            );
        }
        let mut received = 0;
        while slow.try_recv().is_ok() {
            received += 1;
        }
        assert_eq!(received, WATCH_QUEUE);
        assert!(matches!(
            slow.try_recv(),
            Err(mpsc::error::TryRecvError::Disconnected)
        ));
    }

    #[test]
    fn owner_index_follows_writes_and_deletes() {
        let mut store = Store::new(1, 10);
        let owned = json!({"metadata": {"name": "p", "ownerReferences": [{"uid": "u1"}]}});
        store.put(0, key("p"), owned, BTreeMap::new());
        assert_eq!(store.dependents_of("u1"), vec![(0, key("p"))]);
        store.put(
            0,
            key("p"),
            json!({"metadata": {"name": "p"}}),
            BTreeMap::new(),
        );
        assert!(store.dependents_of("u1").is_empty());
    }
}
