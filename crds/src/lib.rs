//! The planproxy.dev API: the contract between the controller and the node agents.
//!
//! ```text
//!  Services, EndpointSlices, Nodes ─┐
//!                                   ├─► controller (resolve) ─► ProxyPlan per node ─► node agent ─► iptables
//!  ProxyPolicy (user intent) ───────┘                              ▲  status: Programmed/Degraded ┘
//! ```
//!
//! * [`ProxyPolicy`] is what users write: how planproxy behaves for the nodes and
//!   services it selects.
//! * [`ProxyPlan`] is what the controller writes for each node (sharded when large):
//!   every frontend that node serves and the endpoints each one reaches, with
//!   every policy already decided. The agent programs the node from it alone and
//!   reports what it programmed in its status.
//!
//! Validation of user-written values lives here ([`validate`]) so that the
//! controller, the agent and any future admission webhook share one parser.

pub mod condition;
pub mod duration;
pub mod hash;
pub mod labels;
pub mod selector;
#[cfg(any(test, feature = "testing"))]
pub mod testing;
pub mod v1alpha1;
pub mod validate;

pub use hash::spec_hash;
pub use v1alpha1::proxy_plan::{ProxyPlan, ProxyPlanSpec, ProxyPlanStatus};
pub use v1alpha1::proxy_policy::{ProxyPolicy, ProxyPolicySpec, ProxyPolicyStatus};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;

/// Every CRD this crate defines, in a fixed order.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![ProxyPolicy::crd(), ProxyPlan::crd()]
}

/// The CRDs as one multi-document YAML stream, exactly as shipped in the chart.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
