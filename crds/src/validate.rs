//! Validation of user-written values: one parser shared by the controller, the
//! agent and the `plan` command.
//!
//! The CRD schema (patterns, ranges, CEL) rejects most bad input at admission; these
//! checks repeat it for API servers and clients that skip it, and add what a schema
//! cannot say (label-selector semantics, one cluster CIDR per family).

use std::net::IpAddr;

use ipnet::IpNet;

use crate::selector::Selector;
use crate::v1alpha1::{LocalTrafficDetectorMode, ProxyPolicySpec};

/// A rejected field: its path in the object and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field's path, as `kubectl explain` spells it (`spec.masquerade.masqueradeBit`).
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// A ProxyPolicy that passed validation, with its selectors parsed.
#[derive(Debug, Clone)]
pub struct CheckedPolicy {
    /// The parsed `spec.nodeSelector`.
    pub node_selector: Selector,
    /// The parsed `spec.serviceSelector`.
    pub service_selector: Selector,
}

/// Validates a ProxyPolicy spec, returning the first problem found.
pub fn proxy_policy(spec: &ProxyPolicySpec) -> Result<CheckedPolicy, FieldError> {
    let node_selector = Selector::parse(spec.node_selector.as_ref(), "spec.nodeSelector")?;
    let service_selector = Selector::parse(spec.service_selector.as_ref(), "spec.serviceSelector")?;

    if !(-1000..=1000).contains(&spec.priority) {
        return Err(FieldError::new(
            "spec.priority",
            "must be between -1000 and 1000",
        ));
    }

    let masquerade = spec.masquerade.as_ref();
    if let Some(bit) = masquerade.and_then(|m| m.masquerade_bit)
        && !(0..=31).contains(&bit)
    {
        return Err(FieldError::new(
            "spec.masquerade.masqueradeBit",
            format!("{bit} is not a bit of a 32-bit mark (0-31)"),
        ));
    }
    if let Some(detector) = masquerade.and_then(|m| m.local_traffic_detector.as_ref()) {
        let base = "spec.masquerade.localTrafficDetector";
        let mut families = [false, false];
        for (i, c) in detector.cluster_cidrs.iter().enumerate() {
            let net = cidr(c, &format!("{base}.clusterCIDRs[{i}]"))?;
            let family = usize::from(matches!(net, IpNet::V6(_)));
            if std::mem::replace(&mut families[family], true) {
                return Err(FieldError::new(
                    format!("{base}.clusterCIDRs[{i}]"),
                    "at most one CIDR per IP family",
                ));
            }
        }
        match detector.mode {
            LocalTrafficDetectorMode::ClusterCidr if detector.cluster_cidrs.is_empty() => {
                return Err(FieldError::new(
                    format!("{base}.clusterCIDRs"),
                    "mode ClusterCIDR needs at least one CIDR",
                ));
            }
            LocalTrafficDetectorMode::NodeCidr | LocalTrafficDetectorMode::None
                if !detector.cluster_cidrs.is_empty() =>
            {
                return Err(FieldError::new(
                    format!("{base}.clusterCIDRs"),
                    "only used with mode ClusterCIDR",
                ));
            }
            _ => {}
        }
    }

    if let Some(addresses) = &spec.node_port_addresses {
        for (i, a) in addresses.iter().enumerate() {
            if a != "primary" {
                cidr(a, &format!("spec.nodePortAddresses[{i}]"))?;
            }
        }
    }

    if let Some(max) = spec
        .session_affinity
        .as_ref()
        .and_then(|s| s.max_timeout_seconds)
        && !(1..=86400).contains(&max)
    {
        return Err(FieldError::new(
            "spec.sessionAffinity.maxTimeoutSeconds",
            "must be between 1 and 86400",
        ));
    }

    if let Some(sync) = &spec.sync {
        let min = sync
            .min_sync_period
            .as_deref()
            .map(|d| duration(d, "spec.sync.minSyncPeriod"))
            .transpose()?;
        let full = sync
            .sync_period
            .as_deref()
            .map(|d| duration(d, "spec.sync.syncPeriod"))
            .transpose()?;
        if full.is_some_and(|f| f.is_zero()) {
            return Err(FieldError::new("spec.sync.syncPeriod", "must be positive"));
        }
        if let (Some(min), Some(full)) = (min, full)
            && min > full
        {
            return Err(FieldError::new(
                "spec.sync.minSyncPeriod",
                "must not be longer than spec.sync.syncPeriod",
            ));
        }
    }

    let node_scoped = spec.sync.is_some()
        || spec.node_port_addresses.is_some()
        || spec.localhost_node_ports.is_some()
        || masquerade
            .is_some_and(|m| m.masquerade_bit.is_some() || m.local_traffic_detector.is_some());
    if node_scoped && !service_selector.is_everything() {
        return Err(FieldError::new(
            "spec.serviceSelector",
            "node-scoped settings (masquerade.masqueradeBit, masquerade.localTrafficDetector, \
             nodePortAddresses, localhostNodePorts, sync) may only be set by a policy that selects every service",
        ));
    }

    Ok(CheckedPolicy {
        node_selector,
        service_selector,
    })
}

/// Parses a CIDR, normalising host bits away (`10.1.2.3/8` → `10.0.0.0/8`).
pub fn cidr(s: &str, field: &str) -> Result<IpNet, FieldError> {
    s.trim()
        .parse::<IpNet>()
        .map(|n| n.trunc())
        .map_err(|_| FieldError::new(field, format!("{s:?} is not a CIDR")))
}

/// Parses an IP address.
pub fn ip(s: &str, field: &str) -> Result<IpAddr, FieldError> {
    s.parse::<IpAddr>()
        .map_err(|_| FieldError::new(field, format!("{s:?} is not an IP address")))
}

/// Parses a duration (see [`crate::duration`]).
pub fn duration(s: &str, field: &str) -> Result<std::time::Duration, FieldError> {
    crate::duration::parse(s).map_err(|e| FieldError::new(field, e.to_string()))
}

/// Checks a label key: an optional DNS-subdomain prefix and `/`, then a name of at
/// most 63 characters of `[A-Za-z0-9_.-]` starting and ending alphanumeric.
pub fn label_key(key: &str, field: &str) -> Result<(), FieldError> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        let ok = !prefix.is_empty()
            && prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !ok {
            return Err(FieldError::new(
                field,
                format!("{key:?}: invalid label key prefix"),
            ));
        }
    }
    if name.is_empty() || !label_name_ok(name) {
        return Err(FieldError::new(
            field,
            format!("{key:?} is not a valid label key"),
        ));
    }
    Ok(())
}

/// Checks a label value: empty, or a name as in [`label_key`].
pub fn label_value(value: &str, field: &str) -> Result<(), FieldError> {
    if value.is_empty() || label_name_ok(value) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{value:?} is not a valid label value"),
        ))
    }
}

fn label_name_ok(s: &str) -> bool {
    let b = s.as_bytes();
    s.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b.first().is_some_and(u8::is_ascii_alphanumeric)
        && b.last().is_some_and(u8::is_ascii_alphanumeric)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::v1alpha1::{LocalTrafficDetector, MasqueradeSettings, SyncSettings};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn detector(mode: LocalTrafficDetectorMode, cidrs: &[&str]) -> ProxyPolicySpec {
        ProxyPolicySpec {
            masquerade: Some(MasqueradeSettings {
                local_traffic_detector: Some(LocalTrafficDetector {
                    mode,
                    cluster_cidrs: cidrs.iter().map(|s| s.to_string()).collect(),
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn default_policy_is_valid() {
        assert!(proxy_policy(&ProxyPolicySpec::default()).is_ok());
    }

    #[test]
    fn bad_cluster_cidr_names_its_index() {
        let err = proxy_policy(&detector(
            LocalTrafficDetectorMode::ClusterCidr,
            &["10.0.0.0/8", "nope"],
        ))
        .unwrap_err();
        assert_eq!(
            err.field,
            "spec.masquerade.localTrafficDetector.clusterCIDRs[1]"
        );
    }

    #[test]
    fn two_cidrs_of_one_family_are_rejected() {
        let err = proxy_policy(&detector(
            LocalTrafficDetectorMode::ClusterCidr,
            &["10.0.0.0/8", "192.168.0.0/16"],
        ))
        .unwrap_err();
        assert_eq!(
            err.field,
            "spec.masquerade.localTrafficDetector.clusterCIDRs[1]"
        );
        assert!(
            proxy_policy(&detector(
                LocalTrafficDetectorMode::ClusterCidr,
                &["10.0.0.0/8", "fd00::/48"]
            ))
            .is_ok()
        );
    }

    #[test]
    fn cluster_cidr_mode_needs_cidrs() {
        let err = proxy_policy(&detector(LocalTrafficDetectorMode::ClusterCidr, &[])).unwrap_err();
        assert_eq!(
            err.field,
            "spec.masquerade.localTrafficDetector.clusterCIDRs"
        );
    }

    #[test]
    fn node_scoped_settings_need_an_empty_service_selector() {
        let spec = ProxyPolicySpec {
            service_selector: Some(LabelSelector {
                match_labels: Some([("app".to_string(), "x".to_string())].into()),
                ..Default::default()
            }),
            sync: Some(SyncSettings {
                sync_period: Some("30s".into()),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            proxy_policy(&spec).unwrap_err().field,
            "spec.serviceSelector"
        );
        let localhost = ProxyPolicySpec {
            sync: None,
            localhost_node_ports: Some(false),
            ..spec
        };
        assert_eq!(
            proxy_policy(&localhost).unwrap_err().field,
            "spec.serviceSelector"
        );
    }

    #[test]
    fn min_sync_period_longer_than_sync_period_is_rejected() {
        let spec = ProxyPolicySpec {
            sync: Some(SyncSettings {
                min_sync_period: Some("1m".into()),
                sync_period: Some("30s".into()),
            }),
            ..Default::default()
        };
        assert_eq!(
            proxy_policy(&spec).unwrap_err().field,
            "spec.sync.minSyncPeriod"
        );
    }

    #[test]
    fn node_port_addresses_accept_cidrs_and_primary_only() {
        let mut spec = ProxyPolicySpec {
            node_port_addresses: Some(vec!["primary".into(), "10.0.0.0/8".into()]),
            ..Default::default()
        };
        assert!(proxy_policy(&spec).is_ok());
        spec.node_port_addresses = Some(vec!["10.0.0.0/8".into(), "eth0".into()]);
        assert_eq!(
            proxy_policy(&spec).unwrap_err().field,
            "spec.nodePortAddresses[1]"
        );
    }

    #[test]
    fn label_keys_follow_kubernetes_rules() {
        assert!(label_key("app", "f").is_ok());
        assert!(label_key("topology.kubernetes.io/zone", "f").is_ok());
        assert!(label_key("-app", "f").is_err());
        assert!(label_key("Bad_Prefix/app", "f").is_err());
        assert!(label_key(&"a".repeat(64), "f").is_err());
    }
}
