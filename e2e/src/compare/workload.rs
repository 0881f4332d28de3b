//! The workload every proxy is given: `services` selector-less ClusterIP
//! services of 10 endpoints each, written straight as EndpointSlices (no
//! pods: rules are programmed for addresses whether anything answers them or
//! not), plus the few whose one endpoint is a real echo pod, so traffic can
//! tell when a node's kernel holds a rule.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::api::{Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::error::{E2eError, Result};

/// The services' port, and the port their endpoints listen on.
pub const PORT: u16 = 80;
pub const TARGET_PORT: u16 = 8080;
pub const ENDPOINTS_PER_SERVICE: usize = 10;
const NAMESPACE: &str = "default";
/// Who writes the slices: no Kubernetes controller claims a slice of this
/// manager, so none rewrites or deletes them.
const MANAGER: &str = "planproxy-e2e-compare";
/// Creations in flight at once: enough to keep kube-apiserver busy, few
/// enough not to starve the proxies' watches.
const IN_FLIGHT: usize = 16;
/// The service whose only endpoint flips between ready and not ready.
pub const FLIP: &str = "flip";

/// What one row's cluster holds.
#[derive(Clone, Debug)]
pub struct Workload {
    pub services: usize,
    /// The real echo pod (on `echo_node`) that the first, the last and the
    /// flip service send to.
    pub echo_ip: Ipv4Addr,
    pub echo_node: String,
    /// Nodes the fake endpoints are spread over, as `node1` … `nodeN`.
    pub nodes: u8,
}

impl Workload {
    /// Service `i`'s cluster IP, chosen rather than allocated so the bench
    /// knows it without reading the Service back; `i == services` is the
    /// flip service. Starts at 10.96.1.1, clear of the `kubernetes` Service.
    pub fn cluster_ip(i: usize) -> Ipv4Addr {
        let third = u8::try_from(1 + i / 250).unwrap_or(u8::MAX);
        Ipv4Addr::new(10, 96, third, (1 + i % 250) as u8)
    }

    pub fn first_service(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Self::cluster_ip(0)), PORT)
    }

    pub fn last_service(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Self::cluster_ip(self.services - 1)), PORT)
    }

    pub fn flip_service(&self) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Self::cluster_ip(self.services)), PORT)
    }

    fn name(&self, i: usize) -> String {
        if i == self.services {
            FLIP.to_owned()
        } else {
            format!("svc-{i}")
        }
    }

    /// Service `i`'s endpoints: the echo pod for the first, the last and the
    /// flip service, 10 made-up addresses for the others.
    fn endpoints(&self, i: usize) -> Vec<Value> {
        if i == 0 || i + 1 >= self.services {
            return vec![self.echo_endpoint(true)];
        }
        (0..ENDPOINTS_PER_SERVICE)
            .map(|e| {
                // 10.244.128.0/17: inside the cluster CIDR, outside every
                // node's pod CIDR (10.244.<node>.0/24).
                let k = i * ENDPOINTS_PER_SERVICE + e;
                let third = 128 + (k / 250) % 128;
                let address = format!("10.244.{third}.{}", 2 + k % 250);
                let node = 1 + k % usize::from(self.nodes.max(1));
                endpoint(&address, &format!("node{node}"), true)
            })
            .collect()
    }

    fn echo_endpoint(&self, ready: bool) -> Value {
        endpoint(&self.echo_ip.to_string(), &self.echo_node, ready)
    }

    fn service(&self, i: usize) -> Result<Service> {
        let ip = Self::cluster_ip(i).to_string();
        typed(json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"namespace": NAMESPACE, "name": self.name(i)},
            "spec": {
                "type": "ClusterIP", "clusterIP": ip, "clusterIPs": [ip], "ipFamilies": ["IPv4"],
                "ports": [{"name": "http", "protocol": "TCP", "port": PORT, "targetPort": TARGET_PORT}],
            },
        }))
    }

    fn slice(&self, i: usize) -> Result<EndpointSlice> {
        let name = self.name(i);
        typed(json!({
            "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {
                "namespace": NAMESPACE, "name": format!("{name}-ipv4"),
                "labels": {
                    "kubernetes.io/service-name": name,
                    "endpointslice.kubernetes.io/managed-by": MANAGER,
                },
            },
            "addressType": "IPv4",
            "endpoints": self.endpoints(i),
            "ports": [{"name": "http", "protocol": "TCP", "port": TARGET_PORT}],
        }))
    }
}

fn endpoint(address: &str, node: &str, ready: bool) -> Value {
    json!({
        "addresses": [address],
        "conditions": {"ready": ready, "serving": ready, "terminating": false},
        "nodeName": node,
    })
}

fn typed<T: serde::de::DeserializeOwned>(value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| E2eError::Invalid(format!("building an object: {e}")))
}

/// Creates every service (the flip service included), then every slice, a
/// few requests at a time.
pub async fn populate(client: &kube::Client, workload: &Workload) -> Result<()> {
    let services: kube::Api<Service> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let indices = 0..=workload.services;
    let created: Vec<Result<()>> = futures::stream::iter(indices.clone())
        .map(|i| {
            let services = services.clone();
            async move {
                let service = workload.service(i)?;
                services.create(&PostParams::default(), &service).await?;
                Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    created.into_iter().collect::<Result<()>>()?;
    let created: Vec<Result<()>> = futures::stream::iter(indices)
        .map(|i| {
            let slices = slices.clone();
            async move {
                let slice = workload.slice(i)?;
                slices.create(&PostParams::default(), &slice).await?;
                Ok(())
            }
        })
        .buffer_unordered(IN_FLIGHT)
        .collect()
        .await;
    created.into_iter().collect()
}

/// Sets the flip service's one endpoint ready or not (one slice write; a
/// merge patch replaces the endpoint list whole).
pub async fn set_flip_ready(client: &kube::Client, workload: &Workload, ready: bool) -> Result<()> {
    let slices: kube::Api<EndpointSlice> = kube::Api::namespaced(client.clone(), NAMESPACE);
    let patch = json!({"endpoints": [workload.echo_endpoint(ready)]});
    slices
        .patch(
            &format!("{FLIP}-ipv4"),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await?;
    Ok(())
}
