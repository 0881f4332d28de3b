//! Which cluster the suite runs against, and what API-level scenarios need
//! from either.
//!
//! By default every scenario builds its own namespace cluster
//! ([`crate::Cluster`]). With `PLANPROXY_E2E_TARGET=kubeconfig` the
//! API-level scenarios run against the cluster `KUBECONFIG` (or
//! `~/.kube/config`) points at instead ([`RealCluster`]), where planproxy is
//! already installed (e.g. with the Helm chart) and the real EndpointSlice
//! controller runs. It is an explicit opt-in, so that a developer's
//! `KUBECONFIG` never receives test objects by accident. There, each run
//! works in its own namespace (`planproxy-e2e-<id>`, deleted at the end),
//! replicas are real Deployments of the agnhost image, and ProxyPolicies the
//! scenarios write select only the run's services (label
//! `planproxy.dev/e2e-run=<id>`), so node traffic is never touched.
//!
//! A scenario written against [`Workloads`] runs on both:
//!
//! ```no_run
//! use planproxy_e2e::target::{Target, Workloads, RealCluster};
//! use planproxy_e2e::{Cluster, ClusterSpec};
//!
//! async fn scenario(w: &impl Workloads) { /* deploy, create_service, control().wait_programmed… */ }
//!
//! match Target::from_env() {
//!     Target::Namespaces => {
//!         let cluster = Cluster::start(ClusterSpec::default()).unwrap();
//!         cluster.run(|api| async move { scenario(&api).await }).unwrap();
//!     }
//!     Target::Kubeconfig => RealCluster::run(|real| async move { scenario(&real).await }).unwrap(),
//! }
//! ```

use std::collections::BTreeMap;
use std::future::Future;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Namespace, Node, Service};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::cluster::AppDef;
use crate::control::Control;
use crate::error::{E2eError, Result};
use crate::objects::ServiceDef;

/// Where the scenarios run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// A namespace cluster per test (the default; needs root).
    Namespaces,
    /// The cluster the kubeconfig points at: API-level scenarios only.
    Kubeconfig,
}

/// The environment variable selecting the target.
pub const TARGET_VARIABLE: &str = "PLANPROXY_E2E_TARGET";

/// The label a real-cluster run puts on everything it creates.
pub const RUN_LABEL: &str = "planproxy.dev/e2e-run";

/// The echo image real-cluster replicas run (`agnhost netexec` answers TCP
/// and UDP).
pub const ECHO_IMAGE: &str = "registry.k8s.io/e2e-test-images/agnhost:2.53";

impl Target {
    /// The target chosen by `PLANPROXY_E2E_TARGET` (`namespaces`, the default,
    /// or `kubeconfig`).
    pub fn from_env() -> Target {
        Target::parse(std::env::var(TARGET_VARIABLE).ok().as_deref())
    }

    fn parse(value: Option<&str>) -> Target {
        match value {
            Some("kubeconfig") => Target::Kubeconfig,
            _ => Target::Namespaces,
        }
    }

    /// Whether data-plane checks (traffic through the nodes) can run.
    pub fn has_data_plane(self) -> bool {
        self == Target::Namespaces
    }
}

/// What an API-level scenario needs from a cluster: workloads and services
/// to exist, and the policy and plan operations of [`Control`].
// The futures run on a current-thread runtime (see `Cluster::run`), so they
// need not be Send.
#[allow(async_fn_in_trait)]
pub trait Workloads {
    /// Policies and plans.
    fn control(&self) -> Control;
    /// Starts an app's replicas; they become endpoints of the services that
    /// select them.
    async fn deploy(&self, app: &AppDef) -> Result<()>;
    /// Changes an app's replica count.
    async fn scale(&self, namespace: &str, app: &str, replicas: usize) -> Result<()>;
    /// Creates a service.
    async fn create_service(&self, service: &ServiceDef) -> Result<()>;
    /// Deletes a service.
    async fn delete_service(&self, namespace: &str, name: &str) -> Result<()>;
}

/// A real cluster reached through the kubeconfig, for API-level scenarios.
#[derive(Debug)]
pub struct RealCluster {
    control: Control,
    /// This run's id: its namespace is `planproxy-e2e-<id>`.
    pub run_id: String,
}

impl RealCluster {
    /// Connects with the default kubeconfig, creates the run's namespace,
    /// runs `scenario` on a current-thread runtime and deletes the namespace
    /// (also when the scenario panics; the panic is then re-raised).
    pub fn run<F, Fut, R>(scenario: F) -> Result<R>
    where
        F: FnOnce(RealCluster) -> Fut + Send,
        Fut: Future<Output = R>,
        R: Send,
    {
        std::thread::scope(|scope| {
            let thread = scope.spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| E2eError::io("building a tokio runtime", e))?;
                runtime.block_on(async move {
                    let real = RealCluster::connect().await?;
                    let namespace = real.namespace();
                    let client = real.control.client.clone();
                    let outcome = futures::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                        scenario(real),
                    ))
                    .await;
                    let namespaces: kube::Api<Namespace> = kube::Api::all(client);
                    let _ = namespaces
                        .delete(&namespace, &DeleteParams::default())
                        .await;
                    match outcome {
                        Ok(value) => Ok(value),
                        Err(panic) => std::panic::resume_unwind(panic),
                    }
                })
            });
            thread
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    async fn connect() -> Result<RealCluster> {
        let client = kube::Client::try_default().await?;
        let nodes: kube::Api<Node> = kube::Api::all(client.clone());
        let nodes = nodes
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter_map(|n| n.metadata.name)
            .collect();
        let run_id = format!(
            "{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() % 0xff_ffff_ffff)
                .unwrap_or_default()
        );
        let real = RealCluster {
            control: Control { client, nodes },
            run_id,
        };
        let namespace: Namespace = serde_json::from_value(json!({
            "metadata": {"name": real.namespace(), "labels": {RUN_LABEL: real.run_id}},
        }))
        .map_err(|e| E2eError::Invalid(e.to_string()))?;
        let namespaces: kube::Api<Namespace> = kube::Api::all(real.control.client.clone());
        namespaces
            .create(&PostParams::default(), &namespace)
            .await?;
        Ok(real)
    }

    /// The run's namespace.
    pub fn namespace(&self) -> String {
        format!("planproxy-e2e-{}", self.run_id)
    }
}

/// The Deployment a real cluster runs for `app`: agnhost's netexec answering
/// on the app's first TCP and UDP port.
pub fn deployment(app: &AppDef) -> Result<Deployment> {
    let mut args = vec!["netexec".to_owned()];
    if let Some(port) = app.tcp_ports.first() {
        args.push(format!("--http-port={port}"));
    }
    if let Some(port) = app.udp_ports.first() {
        args.push(format!("--udp-port={port}"));
    }
    let mut ports: Vec<Value> = Vec::new();
    for port in &app.tcp_ports {
        ports.push(json!({"containerPort": port, "protocol": "TCP"}));
    }
    for port in &app.udp_ports {
        ports.push(json!({"containerPort": port, "protocol": "UDP"}));
    }
    let labels: BTreeMap<&str, &str> = app
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    serde_json::from_value(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"namespace": app.namespace, "name": app.name, "labels": labels},
        "spec": {
            "replicas": app.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{
                    "name": "echo",
                    "image": ECHO_IMAGE,
                    "args": args,
                    "ports": ports,
                }]},
            },
        },
    }))
    .map_err(|e| E2eError::Invalid(format!("building a Deployment: {e}")))
}

impl Workloads for RealCluster {
    fn control(&self) -> Control {
        self.control.clone()
    }

    async fn deploy(&self, app: &AppDef) -> Result<()> {
        let api: kube::Api<Deployment> =
            kube::Api::namespaced(self.control.client.clone(), &app.namespace);
        api.create(&PostParams::default(), &deployment(app)?)
            .await?;
        Ok(())
    }

    async fn scale(&self, namespace: &str, app: &str, replicas: usize) -> Result<()> {
        let api: kube::Api<Deployment> =
            kube::Api::namespaced(self.control.client.clone(), namespace);
        let patch = json!({"spec": {"replicas": replicas}});
        api.patch(app, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        Ok(())
    }

    async fn create_service(&self, service: &ServiceDef) -> Result<()> {
        // The real API server allocates cluster IPs and node ports.
        let mut service = service.clone();
        service
            .labels
            .insert(RUN_LABEL.to_owned(), self.run_id.clone());
        let api: kube::Api<Service> =
            kube::Api::namespaced(self.control.client.clone(), &service.namespace);
        api.create(&PostParams::default(), &service.to_object(&[], &[])?)
            .await?;
        Ok(())
    }

    async fn delete_service(&self, namespace: &str, name: &str) -> Result<()> {
        let api: kube::Api<Service> = kube::Api::namespaced(self.control.client.clone(), namespace);
        api.delete(name, &DeleteParams::default()).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_an_explicit_opt_in_targets_a_real_cluster() {
        assert_eq!(Target::parse(None), Target::Namespaces);
        assert_eq!(Target::parse(Some("")), Target::Namespaces);
        assert_eq!(Target::parse(Some("kubeconfig")), Target::Kubeconfig);
        assert!(!Target::Kubeconfig.has_data_plane());
    }

    #[test]
    fn real_cluster_replicas_run_netexec_on_the_apps_ports() {
        let deployment = deployment(&AppDef::new("web", 3, 8080)).unwrap();
        let spec = deployment.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        let container = &spec.template.spec.unwrap().containers[0];
        assert_eq!(
            container.args.clone().unwrap(),
            vec!["netexec", "--http-port=8080", "--udp-port=8080"]
        );
        assert_eq!(
            spec.selector
                .match_labels
                .unwrap()
                .get("app")
                .map(String::as_str),
            Some("web")
        );
    }
}
