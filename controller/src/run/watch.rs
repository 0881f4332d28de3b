//! The watches: one kube-runtime watcher per resource, pruned of what the resolver
//! never reads, forwarded to the resolver loop as [`Input`]s.
//!
//! Objects are pruned before anything holds them: `managedFields` and annotations
//! (except the EndpointSlice change trigger time) are often larger than the data
//! the resolver needs, and Nodes carry image lists of tens of kilobytes.
//! ProxyPlans are reduced to their identity, shard position and hash: the
//! controller only compares them with what it would write.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher::Config};
use kube::{Resource, ResourceExt};
use planproxy_crds::labels::{LAST_CHANGE_TRIGGER_TIME_ANNOTATION, NODE_LABEL};
use planproxy_crds::{ProxyPlan, ProxyPolicy};
use serde::de::DeserializeOwned;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::metrics::{KindLabels, Metrics};

/// A watch event and when it was received.
#[derive(Debug)]
pub struct Input {
    /// The event.
    pub event: WatchEvent,
    /// When it arrived (for the change-to-write latency).
    pub received: Instant,
}

/// A watch event of one of the watched resources.
// Each event is moved once, into the index; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum WatchEvent {
    /// A Service event.
    Service(Event<Service>),
    /// An EndpointSlice event.
    EndpointSlice(Event<EndpointSlice>),
    /// A Node event.
    Node(Event<Node>),
    /// A ProxyPolicy event.
    Policy(Event<ProxyPolicy>),
    /// A ProxyPlan event (pruned to metadata and shard position).
    Plan(Event<ProxyPlan>),
}

/// Removes what the resolver never reads from any object's metadata, keeping only
/// the annotations listed in `keep`.
pub fn prune_metadata<K: Resource>(object: &mut K, keep: &[&str]) {
    object.managed_fields_mut().clear();
    let annotations = object.annotations_mut();
    if !annotations.is_empty() {
        let kept: BTreeMap<String, String> = std::mem::take(annotations)
            .into_iter()
            .filter(|(k, _)| keep.contains(&k.as_str()))
            .collect();
        *annotations = kept;
    }
}

/// Prunes a Service.
pub fn prune_service(svc: &mut Service) {
    prune_metadata(svc, &[]);
}

/// Prunes an EndpointSlice, keeping the change trigger time the plan carries.
pub fn prune_endpoint_slice(slice: &mut EndpointSlice) {
    prune_metadata(slice, &[LAST_CHANGE_TRIGGER_TIME_ANNOTATION]);
}

/// Prunes a Node: addresses, labels, taints and pod CIDRs stay; image and volume
/// lists go.
pub fn prune_node(node: &mut Node) {
    prune_metadata(node, &[]);
    if let Some(status) = node.status.as_mut() {
        status.images = None;
        status.volumes_attached = None;
        status.volumes_in_use = None;
        status.node_info = None;
        status.capacity = None;
        status.allocatable = None;
    }
}

/// Prunes a ProxyPlan to what the controller compares: name, labels, the spec
/// hash annotation, the owner and the shard position.
pub fn prune_plan(plan: &mut ProxyPlan) {
    prune_metadata(plan, &[planproxy_crds::labels::SPEC_HASH_ANNOTATION]);
    plan.spec.service_ports = Vec::new();
    plan.spec.settings = Default::default();
    plan.status = None;
}

/// Watches `api`, pruning each object with `prune`, and forwards the events (after
/// wrapping them with `wrap`) until the receiver is gone. Errors are logged and
/// retried with kube's default backoff (a 410 Gone becomes a re-list).
#[tracing::instrument(name = "watch", skip_all, fields(resource = resource))]
pub async fn forward<K>(
    api: Api<K>,
    config: Config,
    resource: &'static str,
    prune: fn(&mut K),
    wrap: fn(Event<K>) -> WatchEvent,
    tx: mpsc::Sender<Input>,
    metrics: Metrics,
) where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let labels = KindLabels { resource };
    let stream = watcher::watcher(api, config)
        .modify(prune)
        .default_backoff();
    let mut stream = std::pin::pin!(stream);
    while let Some(item) = stream.next().await {
        match item {
            Ok(event) => {
                metrics.watch_events.get_or_create(&labels).inc();
                let input = Input {
                    event: wrap(event),
                    received: Instant::now(),
                };
                if tx.send(input).await.is_err() {
                    return;
                }
            }
            Err(error) => {
                metrics.watch_errors.get_or_create(&labels).inc();
                tracing::warn!(%error, resource, "watch failed; retrying after a backoff");
            }
        }
    }
}

/// The watcher configuration shared by all watches.
pub fn config(page_size: u32) -> Config {
    Config::default().page_size(page_size)
}

/// The watcher configuration of our own ProxyPlans.
pub fn plan_config(page_size: u32) -> Config {
    config(page_size).labels(NODE_LABEL)
}

/// Every watch of the controller, as futures to spawn.
pub fn all(
    client: &kube::Client,
    page_size: u32,
    tx: &mpsc::Sender<Input>,
    metrics: &Metrics,
) -> Vec<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>> {
    vec![
        Box::pin(forward(
            Api::<Service>::all(client.clone()),
            config(page_size),
            "services",
            prune_service,
            WatchEvent::Service,
            tx.clone(),
            metrics.clone(),
        )),
        Box::pin(forward(
            Api::<EndpointSlice>::all(client.clone()),
            config(page_size),
            "endpointslices",
            prune_endpoint_slice,
            WatchEvent::EndpointSlice,
            tx.clone(),
            metrics.clone(),
        )),
        Box::pin(forward(
            Api::<Node>::all(client.clone()),
            config(page_size),
            "nodes",
            prune_node,
            WatchEvent::Node,
            tx.clone(),
            metrics.clone(),
        )),
        Box::pin(forward(
            Api::<ProxyPolicy>::all(client.clone()),
            config(page_size),
            "proxypolicies",
            |p: &mut ProxyPolicy| prune_metadata(p, &[]),
            WatchEvent::Policy,
            tx.clone(),
            metrics.clone(),
        )),
        Box::pin(forward(
            Api::<ProxyPlan>::all(client.clone()),
            plan_config(page_size),
            "proxyplans",
            prune_plan,
            WatchEvent::Plan,
            tx.clone(),
            metrics.clone(),
        )),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{ContainerImage, NodeAddress, NodeStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ManagedFieldsEntry;

    #[test]
    fn pruning_keeps_the_change_trigger_time_and_drops_managed_fields() {
        let mut slice = EndpointSlice::default();
        slice.metadata.managed_fields = Some(vec![ManagedFieldsEntry::default()]);
        slice.metadata.annotations = Some(BTreeMap::from([
            (
                LAST_CHANGE_TRIGGER_TIME_ANNOTATION.to_owned(),
                "2026-01-01T00:00:00Z".to_owned(),
            ),
            (
                "kubectl.kubernetes.io/last-applied-configuration".to_owned(),
                "{…}".to_owned(),
            ),
        ]));
        slice.metadata.labels = Some(BTreeMap::from([(
            "kubernetes.io/service-name".to_owned(),
            "web".to_owned(),
        )]));
        prune_endpoint_slice(&mut slice);
        assert!(slice.metadata.managed_fields.unwrap_or_default().is_empty());
        let annotations = slice.metadata.annotations.expect("kept");
        assert_eq!(annotations.len(), 1);
        assert!(annotations.contains_key(LAST_CHANGE_TRIGGER_TIME_ANNOTATION));
        assert_eq!(slice.metadata.labels.expect("labels stay").len(), 1);
    }

    #[test]
    fn pruning_a_node_keeps_addresses_and_drops_images() {
        let mut node = Node {
            status: Some(NodeStatus {
                addresses: Some(vec![NodeAddress {
                    type_: "InternalIP".into(),
                    address: "10.0.0.1".into(),
                }]),
                images: Some(vec![ContainerImage::default(); 50]),
                ..NodeStatus::default()
            }),
            ..Node::default()
        };
        prune_node(&mut node);
        let status = node.status.expect("status stays");
        assert_eq!(status.addresses.map(|a| a.len()), Some(1));
        assert_eq!(status.images, None);
    }

    #[test]
    fn pruning_a_plan_keeps_its_identity_shard_and_hash() {
        let mut plan = ProxyPlan::new("n1-0", Default::default());
        plan.spec.node_name = "n1".into();
        plan.spec.shard.count = 2;
        plan.spec.shard.generation = 3;
        plan.spec.service_ports = vec![Default::default(); 10];
        plan.metadata.annotations = Some(BTreeMap::from([
            (
                planproxy_crds::labels::SPEC_HASH_ANNOTATION.to_owned(),
                "abc".to_owned(),
            ),
            ("other".to_owned(), "x".to_owned()),
        ]));
        prune_plan(&mut plan);
        assert!(plan.spec.service_ports.is_empty());
        assert_eq!((plan.spec.shard.count, plan.spec.shard.generation), (2, 3));
        assert_eq!(plan.spec.node_name, "n1");
        let annotations = plan.metadata.annotations.expect("kept");
        assert_eq!(annotations.len(), 1);
    }
}
