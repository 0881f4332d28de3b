//! Running one kernel test against every data-plane backend.

use planproxy_crds::ProxyPlanSpec;
use planproxy_netns::Node;
use planproxy_node_agent::dataplane::{Backend, BackendChoice, DataPlaneConfig};

/// `planproxy-agent apply --backend <backend>` of `spec`, which must succeed.
pub fn apply_on(backend: Backend, node: &Node, spec: &ProxyPlanSpec) {
    super::apply_with(node, spec, &["--backend", backend.as_str()]);
}

/// A data-plane configuration for `backend` with the default layout.
pub fn config(backend: Backend) -> DataPlaneConfig {
    DataPlaneConfig {
        backend: BackendChoice::Exactly(backend),
        ..DataPlaneConfig::default()
    }
}

/// `nft list ruleset` in the node's namespace.
pub fn nft_ruleset(node: &Node) -> String {
    node.ns
        .exec_ok(&["nft", "list", "ruleset"])
        .expect("nft list ruleset in the node namespace")
}

/// Declares, for each `name`, a module of `#[test]`s, one per
/// `test_name => Backend` pair, each calling `name(Backend::…)`.
#[macro_export]
macro_rules! tests_on_backends {
    ($backends:tt $($name:ident),* $(,)?) => {
        $( $crate::backend_tests_of!($name $backends); )*
    };
}

/// One `name`'s module for [`tests_on_backends!`].
#[macro_export]
macro_rules! backend_tests_of {
    ($name:ident [$($test:ident => $backend:ident),*]) => {
        mod $name {
            $(
                #[test]
                fn $test() {
                    super::$name(planproxy_node_agent::dataplane::Backend::$backend);
                }
            )*
        }
    };
}

/// Declares `#[test]`s `<name>::iptables_nft` and `<name>::nftables`, each
/// calling `name(backend)`.
#[macro_export]
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        $crate::tests_on_backends!([iptables_nft => IptablesNft, nftables => Nftables] $($name),*);
    };
}

/// [`on_every_backend!`] plus `<name>::iptables_legacy`: for what depends on
/// how each iptables variant reads its rules back.
#[macro_export]
macro_rules! on_all_three_backends {
    ($($name:ident),* $(,)?) => {
        $crate::tests_on_backends!(
            [iptables_nft => IptablesNft, iptables_legacy => IptablesLegacy, nftables => Nftables]
            $($name),*
        );
    };
}
