//! Differential semantics: a fixed set of generated cluster states, each
//! programmed on node1 by planproxy and on node2 by the real kube-proxy
//! (iptables mode) through the same API server, probed alike from a pod,
//! the node, a client outside the cluster and an endpoint of the service.
//! Every probe must end the same on both nodes (which endpoints answer,
//! whether the client address was masqueraded, passed / refused / dropped),
//! except where `docs/deviations.md` says planproxy deliberately differs.
//!
//! More seeds: `cargo run -p planproxy-e2e --example differential -- --seeds 100`.
//!
//! On the 2-core machine, shared with other runs, the fixed seeds take 2 to 3
//! minutes (about 15 s for the cluster, then 2 to 30 s per seed: a dropped
//! frontend costs its connection timeouts).

use std::sync::Mutex;
use std::time::Instant;

use planproxy_e2e::KubeProxyMode;
use planproxy_e2e::differential::{Differential, NodeProfile, State, deviations, state};

/// Chosen so that together they cover every generated feature (see
/// `state::tests` for the feature list): each kind and family of service,
/// both traffic policies, affinity, named ports, several ports, UDP,
/// terminating endpoints, no endpoints, hand-written slices with and
/// without nodeName, externalIPs, load balancers with and without
/// matching source ranges.
const SEEDS: &[u64] = &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10];

/// The node-level settings besides the common one, each on a cluster of its
/// own (kube-proxy reads its flags once), with seeds that hold NodePort and
/// LoadBalancer services, cluster IPs probed from pods and the node, and
/// hairpin: what masqueradeAll, the detectors and nodePortAddresses change.
const PROFILE_SEEDS: &[(NodeProfile, &[u64])] = &[
    (NodeProfile::MasqueradeAll, &[1, 2]),
    (NodeProfile::NodeCidr, &[1, 2]),
    (NodeProfile::NoDetector, &[1, 2]),
    (NodeProfile::NodePortAddresses, &[1, 2]),
];

/// Held while a cluster runs: the probes' timeouts are short, and two
/// clusters probing at once on a two-core machine would make them flaky.
static ONE_CLUSTER_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs `seeds` on a fresh cluster with `profile`, and returns every
/// disagreement `docs/deviations.md` does not list, with its state.
fn unexplained_disagreements(profile: NodeProfile, seeds: &[u64]) -> Vec<String> {
    let _alone = ONE_CLUSTER_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let started = Instant::now();
    let differential =
        Differential::start(KubeProxyMode::Iptables, profile).expect("the cluster starts");
    eprintln!("[{profile}] cluster up in {:?}", started.elapsed());
    let mut unexplained = Vec::new();
    let mut probes = 0;
    for &seed in seeds {
        let report = differential
            .run_seed(seed)
            .unwrap_or_else(|e| panic!("[{profile}] seed {seed}: {e}"));
        probes += report.probes;
        eprintln!(
            "[{profile}] seed {seed}: {} probes, {} disagreements, {:.1?} ({})",
            report.probes,
            report.disagreements.len(),
            report.elapsed,
            report.phases
        );
        for disagreement in &report.disagreements {
            match deviations::listed(disagreement, &report.state, differential.mode) {
                Some(listed) => eprintln!(
                    "  listed ({:?}: {}): {}",
                    listed.nature, listed.heading, disagreement.key
                ),
                None => unexplained.push(format!(
                    "[profile {profile}]\n{}{disagreement}",
                    report.state
                )),
            }
        }
    }
    differential
        .cluster
        .processes_running()
        .expect("agents, controller and kube-proxy still run");
    eprintln!(
        "[{profile}] {} seeds, {probes} probes per node, in {:?}",
        seeds.len(),
        started.elapsed()
    );
    unexplained
}

#[test]
fn planproxy_and_kube_proxy_agree_on_every_probe_of_the_fixed_seeds() {
    let unexplained = unexplained_disagreements(NodeProfile::ClusterCidr, SEEDS);
    assert!(
        unexplained.is_empty(),
        "disagreements not in docs/deviations.md:\n{}",
        unexplained.join("\n")
    );
}

/// One cluster per profile, one after the other.
#[test]
fn planproxy_and_kube_proxy_agree_under_every_node_level_setting() {
    let unexplained: Vec<String> = PROFILE_SEEDS
        .iter()
        .flat_map(|&(profile, seeds)| unexplained_disagreements(profile, seeds))
        .collect();
    assert!(
        unexplained.is_empty(),
        "disagreements not in docs/deviations.md:\n{}",
        unexplained.join("\n")
    );
}

/// The fixed seeds exercise every feature the generator draws, so a
/// regression in any of them shows in `scripts/test.sh`.
#[test]
fn the_fixed_seeds_cover_every_generated_feature() {
    let covered: std::collections::BTreeSet<&str> = SEEDS
        .iter()
        .flat_map(|&seed| State::generate(seed).features())
        .collect();
    let missing: Vec<&&str> = state::FEATURES
        .iter()
        .filter(|f| !covered.contains(*f))
        .collect();
    assert!(missing.is_empty(), "no fixed seed exercises {missing:?}");
}
