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
    let route = request.selectors.watch_route();
    let started = {
        let mut store = lock(&api.store);
        let queue = store.subscribe(request.res, route.clone());
        match start_rv {
            Some(rv) => store
                .events_since(request.res, rv)
                .map(|replay| (queue, rv, Vec::new(), replay)),
            None => {
                let initial: Vec<Arc<Value>> = store
                    .table(request.res)
                    .objects
                    .values()
                    .filter(|e| filter.matches(&e.object))
                    .map(|e| e.object.clone())
                    .collect();
                Ok((queue, store.current_rv(), initial, Vec::new()))
            }
        }
    };
    let (mut queue, mut last_rv, initial, replay) = match started {
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
    for event in replay {
        if !deliver(&tx, &filter, &event, &mut last_rv).await {
            return;
        }
    }
    let mut ticker = tokio::time::interval(bookmark_interval);
    ticker.reset();
    let mut behind = false;
    loop {
        api.faults.wait_while_hung().await;
        if behind {
            // The store closed our queue: catch up from the log (410 if it moved on).
            let caught_up = {
                let mut store = lock(&api.store);
                store
                    .events_since(request.res, last_rv)
                    .map(|events| (events, store.subscribe(request.res, route.clone())))
            };
            match caught_up {
                Ok((events, fresh)) => {
                    queue = fresh;
                    for event in events {
                        if !deliver(&tx, &filter, &event, &mut last_rv).await {
                            return;
                        }
                    }
                }
                Err(e) => {
                    let _ = tx.send(error(&e)).await;
                    return;
                }
            }
            behind = false;
        }
        tokio::select! {
            event = queue.recv() => match event {
                Some(event) => {
                    if !deliver(&tx, &filter, &event, &mut last_rv).await {
                        return;
                    }
                }
                None => behind = true,
            },
            _ = ticker.tick(), if request.bookmarks => {
                let current = lock(&api.store).current_rv();
                // Every event up to `current` on our route is already queued:
                // deliver them before claiming `current` in a bookmark.
                loop {
                    match queue.try_recv() {
                        Ok(event) => {
                            if !deliver(&tx, &filter, &event, &mut last_rv).await {
                                return;
                            }
                        }
                        Err(mpsc::error::TryRecvError::Empty) => break,
                        Err(mpsc::error::TryRecvError::Disconnected) => {
                            behind = true;
                            break;
                        }
                    }
                }
                if !behind {
                    last_rv = last_rv.max(current);
                    if tx.send(bookmark(last_rv, false)).await.is_err() {
                        return;
                    }
                }
            }
            () = &mut deadline => return,
            _ = closes.changed() => return,
            () = tx.closed() => return,
        }
    }
}

/// Sends what this watch sees of one event (once: events at or before
/// `last_rv` were already handled). False when the client is gone.
async fn deliver(
    tx: &mpsc::Sender<Bytes>,
    filter: &Filter,
    event: &LoggedEvent,
    last_rv: &mut u64,
) -> bool {
    if event.rv <= *last_rv {
        return true;
    }
    *last_rv = event.rv;
    match filter.translate(event) {
        Some((kind, object)) => tx.send(line(kind.as_str(), object)).await.is_ok(),
        None => true,
    }
}
