//! Watching this node's ProxyPlans, and nothing else in the cluster.

use std::sync::Arc;

use futures::StreamExt;
use kube::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::reflector;
use kube::runtime::watcher::{self, Event};
use planproxy_crds::ProxyPlan;
use planproxy_crds::labels::NODE_LABEL;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::sync::PlanSnapshot;

/// The label selector of `node_name`'s shards.
pub fn node_selector(node_name: &str) -> String {
    format!("{NODE_LABEL}={node_name}")
}

/// Watches the shards labelled for `node_name` into a reflector store and
/// publishes the store's content on `plans` after the first complete list and on
/// every change. An unreachable API server is retried forever with backoff; the
/// last published snapshot stays in place meanwhile, so the node keeps its rules.
pub async fn watch_plans(
    api: Api<ProxyPlan>,
    node_name: String,
    plans: watch::Sender<PlanSnapshot>,
) {
    let (reader, writer) = reflector::store();
    let config = watcher::Config::default().labels(&node_selector(&node_name));
    let stream = watcher::watcher(api, config)
        .default_backoff()
        .reflect(writer);
    let mut stream = std::pin::pin!(stream);
    let mut listed = false;
    let mut failing = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::InitDone) => {
                if !listed || failing {
                    info!(shards = reader.len(), "listed this node's ProxyPlans");
                }
                listed = true;
                failing = false;
                publish(&reader, &plans);
            }
            Ok(Event::Apply(_) | Event::Delete(_)) => {
                failing = false;
                if listed {
                    publish(&reader, &plans);
                }
            }
            Ok(Event::Init | Event::InitApply(_)) => {}
            Err(error) => {
                if failing {
                    debug!(%error, "ProxyPlan watch still failing");
                } else {
                    warn!(%error, "ProxyPlan watch failed; retrying, the node keeps its rules");
                }
                failing = true;
            }
        }
    }
}

fn publish(reader: &reflector::Store<ProxyPlan>, plans: &watch::Sender<PlanSnapshot>) {
    let state: Vec<Arc<ProxyPlan>> = reader.state();
    plans.send_replace(Some(state));
}
