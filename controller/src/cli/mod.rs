//! The controller's offline commands: they need no cluster.
//!
//! * `plan`: resolve Kubernetes YAML into one node's ProxyPlans.
//! * `bench-resolve`: time the resolver on synthetic clusters.

pub mod bench;
pub mod load;
pub mod plan;
