//! End-to-end tests of planproxy: the real `planproxy-controller` and
//! `planproxy-agent` binaries against the test API server, in a cluster made
//! of network namespaces.
//!
//! # The namespace cluster
//!
//! [`Cluster::start`] builds, with [`planproxy_netns`] (address plan in
//! [`planproxy_netns::topology`]), all isolated from the root namespace:
//!
//! * nodes `node1` … `nodeN`, each a namespace with its own iptables, a pod
//!   bridge and routes to the other nodes' pod CIDRs (as a CNI would make
//!   them); Node objects with podCIDRs, InternalIPs and zone labels;
//! * a control plane host on the node network (172.30.0.2) running the test
//!   API server (in-process, on a thread inside that namespace) on port 6443,
//!   and `planproxy-controller run` (a real process, via `ip netns exec`);
//! * `planproxy-agent run --node-name nodeN` in each node's namespace, exactly
//!   as with hostNetwork, with a kubeconfig the harness wrote;
//! * a probe pod per node and clients outside the cluster.
//!
//! Workloads are Deployment-like sets of pods ([`AppDef`]): each replica is a
//! pod namespace running an in-process echo server that answers with its
//! name and the client address it saw. There is no EndpointSlice controller,
//! so the harness writes the slices as the real one would (conditions,
//! nodeName, zone, the `kubernetes.io/service-name` label, the
//! `last-change-trigger-time` annotation) whenever services or apps change.
//!
//! Test code talks to the API through [`Cluster::run`], which runs an async
//! block on a thread inside the control plane namespace with a kube client
//! ([`ClusterApi`]); data-plane checks connect from pods and clients with
//! [`planproxy_netns::Netns::connect_tcp`] and friends. Waiting is polling
//! ([`wait::eventually`]), never fixed sleeps. When a test panics while a
//! cluster is up, dropping the cluster prints the ProxyPlans, ProxyPolicies,
//! EndpointSlices, the controller's and agents' logs and every node's
//! `iptables-save`.
//!
//! ```no_run
//! use planproxy_e2e::{AppDef, Cluster, ClusterSpec, ServiceDef};
//! # fn main() -> Result<(), planproxy_e2e::E2eError> {
//! let cluster = Cluster::start(ClusterSpec::default())?;
//! cluster.run(|api| async move {
//!     api.deploy(&AppDef::new("web", 2, 8080)).await?;
//!     api.create_service(&ServiceDef::cluster_ip("default", "web", "web").tcp("http", 80, 8080)).await
//! })??;
//! let vip = cluster.service_addr("default", "web", 80, false)?;
//! let attempt = cluster.probe_pod(1).ns.connect_tcp(vip, &Default::default());
//! # Ok(()) }
//! ```
//!
//! # Binaries
//!
//! The scenarios run the workspace's binaries from cargo's target directory
//! (next to the test executable), or from `$PLANPROXY_CONTROLLER_BIN` and
//! `$PLANPROXY_AGENT_BIN`. Cargo does not build other packages' binaries for
//! a test, so run `cargo build --bins` first (`scripts/test.sh` does).
//!
//! # Real clusters
//!
//! API-level scenarios (plans, status, policies) are written against the
//! [`Workloads`] trait and also run against a real cluster with planproxy
//! installed: set `PLANPROXY_E2E_TARGET=kubeconfig` (and `KUBECONFIG`); see
//! [`target`]. Scenarios that check traffic always build a namespace cluster
//! (they need root), whatever the target.
//!
//! # Running
//!
//! ```sh
//! cargo build --bins && cargo test -p planproxy-e2e          # as root
//! cargo run -p planproxy-e2e --example harness_costs            # what the harness costs
//! PLANPROXY_E2E_TARGET=kubeconfig cargo test -p planproxy-e2e --test user_story any_cluster
//! ```
//!
//! `tests/harness.rs` checks the harness itself; `tests/user_story.rs` holds
//! the user stories (ClusterIP from every node, NodePort from outside,
//! scaling, deletion, policies on selected nodes, invalid policies, status,
//! Local traffic policy, no-endpoints behaviour).

pub mod binaries;
pub mod cluster;
pub mod control;
mod error;
pub mod objects;
pub mod plans;
pub mod target;
pub mod traffic;
pub mod wait;

pub use cluster::{AppDef, AppPod, Cluster, ClusterApi, ClusterSpec, node_name};
pub use control::Control;
pub use error::{E2eError, Result};
pub use objects::{EndpointDef, PortDef, Protocol, ServiceDef, ServiceType};
pub use target::{RealCluster, Target, Workloads};
