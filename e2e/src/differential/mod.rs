//! Differential semantics: the same cluster states, programmed on one node by
//! planproxy and on another by the real kube-proxy, probed alike.
//!
//! * [`state`]: a seeded, pure generator of small cluster states (Services
//!   of every kind and feature over a fixed pool of pods).
//! * [`run`]: one cluster (node1 planproxy, node2 kube-proxy) reused across
//!   seeds: create a state through the real API, wait until both nodes hold
//!   it, probe every frontend from a pod, the node, a client outside the
//!   cluster and an endpoint of the service (hairpin), delete the state.
//! * [`outcome`]: what a probe's connections did, normalised so that the two
//!   nodes' outcomes compare (endpoints named local/remote, client
//!   addresses by whose they are), and the disagreements between them.
//! * [`profile`]: node-level settings (masqueradeAll, the local-traffic
//!   detector, nodePortAddresses), given alike to both proxies; a cluster
//!   runs one profile.
//! * [`deviations`]: the disagreements `docs/deviations.md` lists, each
//!   deliberate or a known bug still to fix.
//!
//! `tests/differential.rs` runs a fixed set of seeds; `cargo run -p
//! planproxy-e2e --example differential -- --seeds N` runs more.

pub mod deviations;
pub mod outcome;
pub mod profile;
pub mod run;
pub mod state;

pub use outcome::{Disagreement, Frontend, Outcome, ProbeKey, Source};
pub use profile::NodeProfile;
pub use run::{Differential, KUBE_PROXY_NODE, PLANPROXY_NODE, SeedReport};
pub use state::State;
