//! End-to-end tests of planproxy: the real `planproxy-controller` and
//! `planproxy-agent` binaries against a real control plane (etcd,
//! kube-apiserver, kube-controller-manager; [`planproxy_control_plane`]), in
//! a cluster made of network namespaces, with planproxy installed by the real
//! `helm install` of `charts/planproxy`.
//!
//! # The namespace cluster
//!
//! [`Cluster::start`] builds, with [`planproxy_netns`] (address plan in
//! [`planproxy_netns::topology`]), all isolated from the root namespace:
//!
//! * nodes `node1` … `nodeN`, each a namespace with its own iptables, a pod
//!   bridge and routes to the other nodes' pod CIDRs (as a CNI would make
//!   them); Node objects with podCIDRs, InternalIPs and zone labels;
//! * a control plane host on the node network (172.30.0.2) running etcd,
//!   kube-apiserver (service CIDRs `10.96.0.0/16,fd00:96::/112`) and
//!   kube-controller-manager (EndpointSlice, mirroring, garbage collector,
//!   namespace and service-account controllers), with components under test
//!   reaching the API server on port 6443 through a fault proxy;
//! * `helm install planproxy charts/planproxy -n kube-system`: CRDs, RBAC,
//!   the ValidatingAdmissionPolicy, the default ProxyPolicy, the workloads;
//! * the chart's controller and agents run by the harness as kubelet would
//!   run their pods ([`install`]): a Pod object on its node, marked running,
//!   a service-account token bound to it, and the binary with the pod
//!   template's arguments and environment; `planproxy-controller run` in the
//!   control plane namespace, `planproxy-agent run` in each node's (as with
//!   hostNetwork);
//! * a probe pod per node and clients outside the cluster.
//!
//! Workloads are Deployment-like sets of pods ([`AppDef`]): each replica is a
//! pod namespace running an in-process echo server that answers with its
//! name and the client address it saw, and a Pod object bound to its node
//! whose status the harness sets as its kubelet would (Running, Ready, both
//! pod IPs). The real EndpointSlice controller publishes them; a graceful
//! delete that no kubelet finishes holds a replica terminating.
//!
//! Test code talks to the API through [`Cluster::run`], which runs an async
//! block on a thread inside the control plane namespace with a kube client
//! ([`ClusterApi`]); data-plane checks connect from pods and clients with
//! [`planproxy_netns::Netns::connect_tcp`] and friends. Waiting is polling
//! ([`wait::eventually`]), never fixed sleeps. When a test panics while a
//! cluster is up, dropping the cluster prints the ProxyPlans, ProxyPolicies,
//! EndpointSlices, the controller's and agents' logs, every node's
//! netfilter rules (iptables and nftables) and the control plane's logs.
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
//! a test, so run `cargo build --bins` first (`scripts/test.sh` does). The
//! Kubernetes binaries (etcd, kube-apiserver, kube-controller-manager, helm)
//! come from `$PLANPROXY_K8S_BIN`, or from `scripts/build-control-plane.sh`,
//! which builds them from the pinned Go modules on first use and caches
//! them outside the repository.
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
//! `tests/harness.rs` checks the harness itself; `tests/install.rs` the
//! chart's RBAC and admission policy on the real API server;
//! `tests/user_story.rs` holds the user stories (ClusterIP from every node,
//! NodePort from outside, scaling, deletion, policies on selected nodes,
//! invalid policies, status, Local traffic policy, no-endpoints behaviour);
//! `tests/agent_resilience.rs` and `tests/controller_*.rs` the faults and
//! leader election; `tests/reference.rs` the reference nodes the real
//! kube-proxy programs; `tests/differential.rs` generated cluster states
//! probed alike on a planproxy node and a kube-proxy node ([`differential`];
//! more seeds with `cargo run -p planproxy-e2e --example differential`,
//! deliberate differences and known bugs in `docs/deviations.md`).

pub mod binaries;
pub mod cluster;
pub mod compare;
pub mod control;
pub mod differential;
mod error;
pub mod install;
pub mod objects;
pub mod plans;
pub mod process;
pub mod target;
pub mod traffic;
pub mod wait;

pub use cluster::{AppDef, AppPod, Cluster, ClusterApi, ClusterSpec, KubeProxyMode, node_name};
pub use control::Control;
pub use error::{E2eError, Result};
pub use objects::{EndpointDef, PortDef, Protocol, ServiceDef, ServiceType};
pub use target::{RealCluster, Target, Workloads};
