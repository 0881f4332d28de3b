//! Isolated network-namespace topologies for planproxy's data-plane and e2e
//! tests.
//!
//! Everything here lives in network namespaces the test creates: veth pairs
//! are created inside a test namespace and their peer moved straight into
//! another one, addresses and routes are only added inside test namespaces,
//! and nothing is ever connected to the root namespace. Every namespace is a
//! [`Netns`] guard that deletes it on drop (also when a test panics), killing
//! whatever still runs inside. Names are `pp<pid>-<n>-<role>`, unique per
//! process, so tests can run in parallel; [`remove_stale_namespaces`] (run
//! automatically once per process) deletes those of processes that were
//! killed before their guards ran. Needs root and the `ip` tool (iproute2).
//!
//! # Pieces
//!
//! * [`Netns`]: `exec` / `exec_ok` / `exec_with_stdin` (e.g. `iptables-restore`
//!   inside the namespace), `spawn` (a [`ChildGuard`] that is killed on drop
//!   and keeps the process's log), `sysctl` (only `net.*`), links
//!   ([`veth`], `add_bridge`, `add_addr`, `add_route`), and
//!   [`Netns::run_in`] / [`Netns::spawn_thread`] to run Rust code on a thread
//!   that entered the namespace (a kube client, a tokio runtime, a server).
//! * Echo servers and clients, in-process: [`Netns::serve_echo`] answers
//!   every TCP connection and UDP datagram with `<name> <peer-ip>:<port>`, so
//!   a test sees which backend answered and which source address it saw.
//!   [`Netns::connect_tcp`], [`Netns::connect_udp`] and
//!   [`Netns::connect_many`] return an [`Attempt`], which tells a refused
//!   connection (`REJECT`) from a timeout (`DROP`).
//! * [`ProxyRules`]: planproxy's rules as one normalised dump, whichever
//!   backend wrote them ([`Netns::proxy_rules`]), and helpers that break them
//!   behind the agent's back ([`Netns::flush_proxy_rules`],
//!   [`Netns::delete_proxy_rules`], [`Netns::jump_into_proxy_chain`]).
//! * SCTP without SCTP sockets ([`sctp`]): [`Netns::send_sctp_init`] sends a
//!   hand-built INIT on a raw socket and [`Netns::capture_sctp`] reads, on
//!   another namespace's raw socket, where it arrived (addresses, ports,
//!   whether NAT left a valid checksum).
//! * [`Topology`]: nodes with pods behind a bridge, a router and clients
//!   outside the cluster, with a fixed address plan documented in
//!   [`topology`].
//!
//! # Example
//!
//! ```
//! use std::net::SocketAddr;
//! use planproxy_netns::{Attempt, ConnectOpts, EchoConfig, Topology, TopologySpec};
//!
//! # fn main() -> Result<(), planproxy_netns::NetnsError> {
//! let topology = Topology::new(TopologySpec { nodes: 2, pods_per_node: 1, clients: 1 })?;
//! let backend = &topology.node(2).pods[0];
//! let _echo = backend.ns.serve_echo("backend", EchoConfig::tcp_and_udp(&[8080]))?;
//!
//! // Program rules on node 1 (only ever inside a test namespace):
//! topology.node(1).ns.exec_with_stdin(&["iptables-restore", "--noflush"], "*nat\nCOMMIT\n")?;
//!
//! let client = &topology.node(1).pods[0];
//! let attempt = client.ns.connect_tcp(SocketAddr::new(backend.ipv4.into(), 8080), &ConnectOpts::default());
//! assert_eq!(attempt.server(), Some("backend"));
//! // The backend saw the client's own address: nothing masqueraded it.
//! assert_eq!(attempt.peer().map(|p| p.ip()), Some(client.ipv4.into()));
//! assert!(matches!(
//!     client.ns.connect_tcp(SocketAddr::new(backend.ipv4.into(), 9), &ConnectOpts::default()),
//!     Attempt::Refused
//! ));
//! # Ok(())
//! # }
//! ```
//!
//! The helper binary `planproxy-netns` builds a topology for manual
//! exploration (`planproxy-netns up`), runs an echo server or a client inside
//! the current namespace (for `ip netns exec`), and deletes namespaces left
//! behind by killed test runs (`planproxy-netns cleanup`).

mod child;
mod echo;
mod error;
mod ns;
mod rules;
pub mod sctp;
pub mod topology;

pub use child::ChildGuard;
pub use echo::{Attempt, ConnectOpts, EchoConfig, EchoGuard, echo_line, here};
pub use error::{NetnsError, Result};
pub use ns::{MAX_IFNAME_LEN, NAME_PREFIX, Netns, remove_stale_namespaces, veth};
pub use rules::{CHAIN_PREFIX, ForeignJump, NFT_TABLE, Place, ProxyChain, ProxyRules, Tamper};
pub use sctp::{ReceivedInit, SctpCapture, SctpInit};
pub use topology::{Client, Host, Node, Pod, Topology, TopologySpec};
