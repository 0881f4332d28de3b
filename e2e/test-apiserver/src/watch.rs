//! Watch streams: replay from the event log, then follow new events, with
//! bookmarks, timeouts, selector transitions and 410 Expired as an ERROR event.

use std::sync::Arc;
use std::time::Duration;

use hyper::body::Bytes;
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::api::Api;
use crate::error::ApiError;
use crate::faults::lock;
use crate::resources::ResourceId;
use crate::selectors::Selectors;
use crate::store::{EventType, LoggedEvent};

/// A watch request.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// Resource type.
    pub res: ResourceId,
    /// Only this namespace (all when `None`).
    pub namespace: Option<String>,
    /// Label and field selectors.
    pub selectors: Selectors,
    /// Start after this resourceVersion; unset or `"0"` starts with synthetic
    /// ADDED events for the current state.
    pub resource_version: Option<String>,
    /// `allowWatchBookmarks`.
    pub bookmarks: bool,
    /// `sendInitialEvents`: the initial ADDED events end with a bookmark
    /// annotated `k8s.io/initial-events-end: "true"`.
    pub send_initial_events: bool,
    /// `timeoutSeconds`: the stream ends after this long.
    pub timeout: Duration,
}

#[derive(Serialize)]
struct WireEvent<'a> {
    #[serde(rename = "type")]
    kind: &'a str,
    object: &'a Value,
}

fn line(kind: &str, object: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(&WireEvent { kind, object }).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

struct Filter {
    namespace: Option<String>,
    selectors: Selectors,
}

impl Filter {
    fn matches(&self, object: &Value) -> bool {
        let ns_ok = self.namespace.as_deref().is_none_or(|ns| {
            object
                .pointer("/metadata/namespace")
                .and_then(Value::as_str)
                == Some(ns)
        });
        ns_ok && self.selectors.matches(object)
    }

    /// What a watcher with this filter sees of an event: a change that moves an
    /// object into (out of) the filter is an ADDED (DELETED), like kube-apiserver.
    fn translate<'e>(&self, event: &'e LoggedEvent) -> Option<(EventType, &'e Value)> {
        let now = self.matches(&event.object);
        let before = event.previous.as_deref().is_some_and(|p| self.matches(p));
        let kind = match (event.kind, before, now) {
            (EventType::Added, _, true) => EventType::Added,
            (EventType::Modified, true, true) => EventType::Modified,
            (EventType::Modified, false, true) => EventType::Added,
            (EventType::Modified, true, false) => EventType::Deleted,
            (EventType::Deleted, true, _) => EventType::Deleted,
            _ => return None,
        };
        Some((kind, &event.object))
    }
}

/// Starts a watch; the receiver yields newline-delimited JSON watch events and
/// ends when the watch ends. Dropping the receiver stops the watch.
pub fn start(
    api: Arc<Api>,
    request: WatchRequest,
    bookmark_interval: Duration,
) -> Result<mpsc::Receiver<Bytes>, ApiError> {
    let start_rv = match request.resource_version.as_deref() {
        None | Some("") | Some("0") => None,
        Some(rv) => Some(
            rv.parse::<u64>()
                .map_err(|_| ApiError::bad_request(format!("invalid resource version {rv:?}")))?,
        ),
    };
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run(api, request, start_rv, bookmark_interval, tx));
    Ok(rx)
}

async fn run(
    api: Arc<Api>,
    request: WatchRequest,
    start_rv: Option<u64>,
    bookmark_interval: Duration,
    tx: mpsc::Sender<Bytes>,
) {
    let rt = api.registry.get(request.res).clone();
    let bookmark = |rv: u64, initial_end: bool| {
        let mut meta = json!({"resourceVersion": rv.to_string()});
        if initial_end {
            meta["annotations"] = json!({"k8s.io/initial-events-end": "true"});
        }
        line(
            "BOOKMARK",
            &json!({"kind": rt.kind, "apiVersion": rt.api_version(), "metadata": meta}),
        )
    };
    let error = |e: &ApiError| line("ERROR", &e.to_status());
    let deadline = tokio::time::sleep(request.timeout);
    tokio::pin!(deadline);
    let mut closes = api.faults.watch_closes();
    closes.borrow_and_update();

    if api.faults.take_watch_expiry() {
        let current = lock(&api.store).current_rv();
        let _ = tx
            .send(error(&ApiError::expired(
                start_rv.unwrap_or(current),
                current,
            )))
            .await;
        return;
    }
    let filter = Filter {
        namespace: request.namespace.clone(),
        selectors: request.selectors.clone(),
    };
    let started = {
        let mut store = lock(&api.store);
        let notify = store.subscribe(request.res, request.selectors.watch_route());
        match start_rv {
            Some(rv) => store
                .check_not_expired(request.res, rv)
                .map(|()| (notify, rv, Vec::new())),
            None => {
                let initial: Vec<Arc<Value>> = store
                    .table(request.res)
                    .objects
                    .values()
                    .filter(|e| filter.matches(&e.object))
                    .map(|e| e.object.clone())
                    .collect();
                Ok((notify, store.current_rv(), initial))
            }
        }
    };
    let (mut notify, mut last_rv, initial) = match started {
        Ok(started) => started,
        Err(e) => {
            let _ = tx.send(error(&e)).await;
            return;
        }
    };
    for object in initial {
        if tx.send(line("ADDED", &object)).await.is_err() {
            return;
        }
    }
    if request.send_initial_events
        && request.bookmarks
        && tx.send(bookmark(last_rv, true)).await.is_err()
    {
        return;
    }
    let mut ticker = tokio::time::interval(bookmark_interval);
    ticker.reset();
    let mut want_bookmark = false;
    loop {
        api.faults.wait_while_hung().await;
        let events = {
            let store = lock(&api.store);
            store
                .events_since(request.res, last_rv)
                .map(|events| (events, store.current_rv()))
        };
        let (events, current) = match events {
            Ok(found) => found,
            Err(e) => {
                let _ = tx.send(error(&e)).await;
                return;
            }
        };
        for event in &events {
            if let Some((kind, object)) = filter.translate(event)
                && tx.send(line(kind.as_str(), object)).await.is_err()
            {
                return;
            }
        }
        last_rv = last_rv.max(current);
        if want_bookmark && request.bookmarks && tx.send(bookmark(last_rv, false)).await.is_err() {
            return;
        }
        want_bookmark = false;
        tokio::select! {
            changed = notify.changed() => if changed.is_err() { return },
            _ = ticker.tick() => want_bookmark = true,
            () = &mut deadline => return,
            _ = closes.changed() => return,
            () = tx.closed() => return,
        }
    }
}
