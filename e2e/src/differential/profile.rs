//! Node-level settings: the kube-proxy flags that shape a whole node's rules
//! (`--masquerade-all`, `--detect-local-mode`, `--nodeport-addresses`), each
//! with the ProxyPolicy that gives planproxy the same setting. kube-proxy
//! reads its flags once, at start, so a profile is fixed for a cluster's
//! life: seeds are run per profile, each profile on a cluster of its own.

use std::fmt;
use std::str::FromStr;

use serde_json::{Value, json};

use crate::KubeProxyMode;

use crate::cluster::{CLUSTER_CIDR_V4, CLUSTER_CIDR_V6};

/// The node network every node's address is in (`planproxy_netns`'s
/// topology): node ports restricted to it are not served on the pods'
/// bridge address, nor on 127.0.0.1.
const NODE_NETWORKS: [&str; 2] = ["172.30.0.0/24", "fd00:30::/64"];

/// One set of node-level settings, given alike to both proxies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum NodeProfile {
    /// Local traffic detected by the cluster CIDRs, nothing else set: the
    /// flags most clusters run kube-proxy with.
    ClusterCidr,
    /// As `ClusterCidr`, and every connection to a service masqueraded.
    MasqueradeAll,
    /// Local traffic detected by the node's own pod CIDRs (`spec.podCIDRs`).
    NodeCidr,
    /// No local-traffic detector: kube-proxy without cluster CIDRs.
    NoDetector,
    /// Node ports answer only on addresses in the node network.
    NodePortAddresses,
}

impl NodeProfile {
    pub const ALL: [NodeProfile; 5] = [
        NodeProfile::ClusterCidr,
        NodeProfile::MasqueradeAll,
        NodeProfile::NodeCidr,
        NodeProfile::NoDetector,
        NodeProfile::NodePortAddresses,
    ];

    pub fn name(self) -> &'static str {
        match self {
            NodeProfile::ClusterCidr => "cluster-cidr",
            NodeProfile::MasqueradeAll => "masquerade-all",
            NodeProfile::NodeCidr => "node-cidr",
            NodeProfile::NoDetector => "no-detector",
            NodeProfile::NodePortAddresses => "node-port-addresses",
        }
    }

    /// The flags kube-proxy runs with besides the harness's own; each
    /// profile chooses the local-traffic detector, so the harness adds no
    /// `--cluster-cidr` of its own.
    pub fn kube_proxy_args(self) -> Vec<String> {
        let cluster_cidrs = format!("--cluster-cidr={CLUSTER_CIDR_V4},{CLUSTER_CIDR_V6}");
        match self {
            NodeProfile::ClusterCidr => vec![cluster_cidrs],
            NodeProfile::MasqueradeAll => vec![cluster_cidrs, "--masquerade-all".into()],
            NodeProfile::NodeCidr => vec!["--detect-local-mode=NodeCIDR".into()],
            // ClusterCIDR without CIDRs: kube-proxy then detects nothing (an
            // empty `--cluster-cidr=` fails its validation).
            NodeProfile::NoDetector => vec!["--detect-local-mode=ClusterCIDR".into()],
            NodeProfile::NodePortAddresses => vec![
                cluster_cidrs,
                format!("--nodeport-addresses={}", NODE_NETWORKS.join(",")),
            ],
        }
    }

    /// The ProxyPolicy spec that gives planproxy the same settings as
    /// kube-proxy in `mode` with this profile's flags. kube-proxy's
    /// nftables mode never serves node ports on 127.0.0.1; its iptables
    /// mode does by default, as planproxy does.
    pub fn policy_spec(self, mode: KubeProxyMode) -> Value {
        let cluster_cidr = json!({
            "mode": "ClusterCIDR",
            "clusterCIDRs": [CLUSTER_CIDR_V4, CLUSTER_CIDR_V6],
        });
        let mut spec = json!({
            "priority": 0,
            "localhostNodePorts": mode == KubeProxyMode::Iptables,
        });
        let masquerade = match self {
            NodeProfile::ClusterCidr | NodeProfile::NodePortAddresses => {
                json!({"localTrafficDetector": cluster_cidr})
            }
            NodeProfile::MasqueradeAll => {
                json!({"masqueradeAll": true, "localTrafficDetector": cluster_cidr})
            }
            NodeProfile::NodeCidr => json!({"localTrafficDetector": {"mode": "NodeCIDR"}}),
            NodeProfile::NoDetector => json!({"localTrafficDetector": {"mode": "None"}}),
        };
        spec["masquerade"] = masquerade;
        if self == NodeProfile::NodePortAddresses {
            spec["nodePortAddresses"] = json!(NODE_NETWORKS);
        }
        spec
    }
}

impl fmt::Display for NodeProfile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for NodeProfile {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NodeProfile::ALL
            .into_iter()
            .find(|p| p.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = NodeProfile::ALL.iter().map(|p| p.name()).collect();
                format!("unknown profile {s}; one of {}", names.join(", "))
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_is_named_and_parsed_back() {
        for profile in NodeProfile::ALL {
            assert_eq!(profile.name().parse::<NodeProfile>(), Ok(profile));
        }
        assert!("masquerade".parse::<NodeProfile>().is_err());
    }

    #[test]
    fn localhost_node_ports_follow_kube_proxy_s_mode() {
        for profile in NodeProfile::ALL {
            assert_eq!(
                profile.policy_spec(KubeProxyMode::Iptables)["localhostNodePorts"],
                true
            );
            assert_eq!(
                profile.policy_spec(KubeProxyMode::Nftables)["localhostNodePorts"],
                false
            );
        }
    }

    #[test]
    fn both_proxies_get_the_same_setting() {
        let all = NodeProfile::MasqueradeAll;
        assert!(
            all.kube_proxy_args()
                .contains(&"--masquerade-all".to_owned())
        );
        assert_eq!(
            all.policy_spec(KubeProxyMode::Iptables)["masquerade"]["masqueradeAll"],
            true
        );

        let node_cidr = NodeProfile::NodeCidr.policy_spec(KubeProxyMode::Iptables);
        assert_eq!(
            node_cidr["masquerade"]["localTrafficDetector"]["mode"],
            "NodeCIDR"
        );
        assert!(
            NodeProfile::NodeCidr
                .kube_proxy_args()
                .contains(&"--detect-local-mode=NodeCIDR".to_owned())
        );

        assert_eq!(
            NodeProfile::NoDetector.kube_proxy_args(),
            vec!["--detect-local-mode=ClusterCIDR".to_owned()]
        );
        assert_eq!(
            NodeProfile::NoDetector.policy_spec(KubeProxyMode::Iptables)["masquerade"]["localTrafficDetector"]
                ["mode"],
            "None"
        );

        let restricted = NodeProfile::NodePortAddresses.policy_spec(KubeProxyMode::Iptables);
        assert_eq!(restricted["nodePortAddresses"], json!(NODE_NETWORKS));
        assert!(
            NodeProfile::NodePortAddresses
                .kube_proxy_args()
                .contains(&format!("--nodeport-addresses={}", NODE_NETWORKS.join(",")))
        );
        assert!(
            NodeProfile::ClusterCidr
                .policy_spec(KubeProxyMode::Iptables)
                .get("nodePortAddresses")
                .is_none()
        );
    }
}
