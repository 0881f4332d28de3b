//! The disagreements with kube-proxy that `docs/deviations.md` lists, each
//! under the heading given here: deliberate deviations, and known bugs not
//! fixed yet (listed so that the fixed-seed test stays green while they are
//! open, and marked as bugs so that nobody mistakes them for design).

use super::outcome::{Disagreement, Frontend, Outcome, Source};
use super::state::{Backend, State, Svc};
use crate::KubeProxyMode;

/// Whether planproxy differs on purpose or by a bug still to fix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nature {
    Deliberate,
    KnownBug,
}

/// A listed disagreement: its heading in `docs/deviations.md`, and which
/// probes it covers against which kube-proxy mode.
pub struct Deviation {
    pub heading: &'static str,
    pub nature: Nature,
    pub covers: fn(&Disagreement, &State, KubeProxyMode) -> bool,
}

/// The generated service a probe went to.
fn service<'a>(d: &Disagreement, state: &'a State) -> Option<&'a Svc> {
    state.services.iter().find(|s| s.name == d.key.service)
}

/// Every listed disagreement a differential probe can show.
pub const LISTED: &[Deviation] = &[
    Deviation {
        heading: "Without endpoints, node-originated connections to external addresses are not rejected",
        nature: Nature::Deliberate,
        covers: |d, state, mode| {
            mode == KubeProxyMode::Nftables
                && d.key.source == Source::Node
                && matches!(
                    d.key.frontend,
                    Frontend::LoadBalancer | Frontend::ExternalIp
                )
                && d.planproxy.reached.is_empty()
                && d.kube_proxy.reached.is_empty()
                && service(d, state).is_some_and(|s| s.backend == Backend::NoEndpoints)
        },
    },
    Deviation {
        heading: "Node ports that do not answer on 127.0.0.1 do not drop there either",
        nature: Nature::Deliberate,
        covers: |d, _, mode| {
            let only = |o: &Outcome, failure: &str| {
                o.reached.is_empty() && o.failures.iter().eq([failure].iter().copied())
            };
            mode == KubeProxyMode::Iptables
                && d.key.frontend == Frontend::NodePortLocalhost
                && only(&d.planproxy, "refused")
                && only(&d.kube_proxy, "timeout")
        },
    },
];

/// The listed deviation covering `disagreement`, if any.
pub fn listed(
    disagreement: &Disagreement,
    state: &State,
    mode: KubeProxyMode,
) -> Option<&'static Deviation> {
    LISTED
        .iter()
        .find(|d| (d.covers)(disagreement, state, mode))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::differential::outcome::{Outcome, ProbeKey};
    use std::collections::BTreeSet;

    fn outcome(reached: &[&str], failures: &[&str]) -> Outcome {
        Outcome {
            reached: reached.iter().map(|s| (*s).to_owned()).collect(),
            peers: BTreeSet::new(),
            failures: failures.iter().map(|s| (*s).to_owned()).collect(),
        }
    }

    fn disagreement(frontend: Frontend, source: Source, service: &str) -> Disagreement {
        Disagreement {
            key: ProbeKey {
                service: service.into(),
                port: "p0".into(),
                ipv6: false,
                frontend,
                source,
            },
            planproxy: outcome(&[], &["timeout"]),
            kube_proxy: outcome(&["local ready"], &[]),
        }
    }

    #[test]
    fn each_listed_disagreement_covers_its_case_and_not_its_neighbours() {
        // Seed 1's third service has hand-written slices without nodeName.
        let state = State::generate(1);
        let no_node_name = state
            .services
            .iter()
            .find(|s| {
                matches!(
                    s.backend,
                    Backend::Manual {
                        node_names: false,
                        ..
                    }
                )
            })
            .expect("seed 1 has a service without nodeName")
            .name
            .clone();
        let with_node_name = state
            .services
            .iter()
            .find(|s| matches!(s.backend, Backend::Selector(_)))
            .expect("seed 1 has a selector service")
            .name
            .clone();
        // Fixed: planproxy serves localhost node ports as kube-proxy's
        // iptables mode does, so such a disagreement is no listed deviation.
        let localhost = disagreement(Frontend::NodePortLocalhost, Source::Node, &with_node_name);
        assert!(listed(&localhost, &state, KubeProxyMode::Iptables).is_none());
        // Where localhost node ports are off (nodePortAddresses without
        // loopback), a Local-policy node port without local endpoints: iptables
        // mode drops 127.0.0.1, planproxy has nothing there.
        let not_served = Disagreement {
            planproxy: outcome(&[], &["refused"]),
            kube_proxy: outcome(&[], &["timeout"]),
            ..disagreement(Frontend::NodePortLocalhost, Source::Node, &with_node_name)
        };
        assert_eq!(
            listed(&not_served, &state, KubeProxyMode::Iptables).map(|d| d.nature),
            Some(Nature::Deliberate)
        );
        assert!(listed(&not_served, &state, KubeProxyMode::Nftables).is_none());
        // Fixed: endpoints without nodeName get hairpin masquerade, so a
        // hairpin disagreement on their service is no listed deviation.
        let hairpin = disagreement(Frontend::ClusterIp, Source::Hairpin, &no_node_name);
        assert!(listed(&hairpin, &state, KubeProxyMode::Iptables).is_none());
        // Seed 1036: a load balancer without endpoints behind source ranges.
        let state_1036 = State::generate(1036);
        let lb = disagreement(Frontend::LoadBalancer, Source::Client, "d1036-2");
        let lb = Disagreement {
            kube_proxy: outcome(&[], &["refused"]),
            ..lb
        };
        // Fixed: planproxy now refuses it too, so such a disagreement is no
        // listed deviation.
        assert!(listed(&lb, &state_1036, KubeProxyMode::Iptables).is_none());
        // Seed 5: a load balancer without endpoints and without ranges,
        // probed from its node: kube-proxy's nftables mode rejects, its
        // iptables mode (and planproxy) does not.
        let state_5 = State::generate(5);
        let from_node = Disagreement {
            kube_proxy: outcome(&[], &["refused"]),
            ..disagreement(Frontend::LoadBalancer, Source::Node, "d5-2")
        };
        assert_eq!(
            listed(&from_node, &state_5, KubeProxyMode::Nftables).map(|d| d.nature),
            Some(Nature::Deliberate)
        );
        assert!(listed(&from_node, &state_5, KubeProxyMode::Iptables).is_none());
        for unlisted in [
            disagreement(Frontend::ClusterIp, Source::Hairpin, &with_node_name),
            disagreement(Frontend::NodePort, Source::Node, &with_node_name),
        ] {
            assert!(
                listed(&unlisted, &state, KubeProxyMode::Iptables).is_none(),
                "{unlisted}"
            );
        }
    }
}
