//! Version v1alpha1 of the planproxy.dev API.

pub mod proxy_plan;
pub mod proxy_policy;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use proxy_plan::*;
pub use proxy_policy::*;

/// What a frontend does with new connections when its service has no usable endpoint.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum NoEndpointsAction {
    /// Answer with ICMP port unreachable / TCP reset: the client fails at once.
    #[default]
    Reject,
    /// Drop silently: the client times out.
    Drop,
}

/// A service port's transport protocol.
#[derive(
    Serialize,
    Deserialize,
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    JsonSchema,
)]
pub enum Protocol {
    /// TCP.
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// UDP.
    #[serde(rename = "UDP")]
    Udp,
    /// SCTP.
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// The lowercase name iptables and kube-proxy's chain hashes use.
    pub fn as_lower_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
            Protocol::Sctp => "sctp",
        }
    }

    /// Parses the Kubernetes spelling (`TCP`, `UDP`, `SCTP`).
    pub fn from_k8s(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            "SCTP" => Some(Protocol::Sctp),
            _ => None,
        }
    }
}

/// A service's internal or external traffic policy.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, JsonSchema)]
pub enum TrafficPolicy {
    /// Any usable endpoint in the cluster.
    #[default]
    Cluster,
    /// Only endpoints on the node the traffic arrives at.
    Local,
}
