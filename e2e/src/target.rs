//! Which cluster the suite runs against.
//!
//! By default every scenario builds its own namespace cluster. With
//! `PLANPROXY_E2E_TARGET=kubeconfig` the API-level scenarios use the cluster
//! `KUBECONFIG` (or `~/.kube/config`) points at instead, where planproxy is
//! already installed (e.g. with the Helm chart) and the real EndpointSlice
//! controller runs. An explicit opt-in, so that a developer's `KUBECONFIG`
//! never sends test objects to a cluster by accident.

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
}
