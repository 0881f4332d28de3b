//! A ready-made cluster network: nodes with pods behind a bridge, a router
//! connecting the nodes, and clients outside the cluster.
//!
//! Address plan (all of it exists only inside the test namespaces):
//!
//! | what | IPv4 | IPv6 |
//! |---|---|---|
//! | node network (router bridge `br-nodes`) | 172.30.0.0/24, router .1 | fd00:30::/64, router ::1 |
//! | node *i* (1-based) `eth0` | 172.30.0.(10+*i*) | fd00:30::1*i* (e.g. `::11`) |
//! | client network (router bridge `br-clients`) | 172.31.0.0/24, router .1 | fd00:31::/64, router ::1 |
//! | client *c* (1-based) `eth0` | 172.31.0.(100+*c*) | fd00:31::10*c* (e.g. `::101`) |
//! | other hosts on the node network ([`Topology::add_host`]) | 172.30.0.*h* | fd00:30::*h* (hex) |
//! | node *i* pod CIDR, bridge `cni0` | 10.244.*i*.0/24, bridge .1 | fd00:244:*i*::/64, bridge ::1 |
//! | pods on node *i* `eth0` | 10.244.*i*.2, .3, … | fd00:244:*i*::2, ::3, … |
//!
//! Nodes route each other's pod CIDRs via the other node's address (as a
//! host-routing CNI does) and everything else via the router; pods and
//! clients route everything via their gateway. Forwarding is on in nodes and
//! the router, and bridged traffic in nodes passes through iptables
//! (`bridge-nf-call-iptables`), as kube-proxy requires for pod-to-service
//! traffic that comes back to a pod on the same bridge. Nodes and the router
//! do not rate-limit ICMP errors (`icmp_ratelimit=0`), so a test polling a
//! frontend that rejects always sees "refused", never a rate-limited timeout.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::atomic::{AtomicU8, Ordering};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::error::{NetnsError, Result};
use crate::ns::{Netns, veth};

/// How big a [`Topology`] to build.
#[derive(Clone, Copy, Debug)]
pub struct TopologySpec {
    /// Number of nodes, 1 to 9.
    pub nodes: u8,
    /// Pods created on every node up front (more can be added later with
    /// [`Node::add_pod`]).
    pub pods_per_node: u8,
    /// Number of clients outside the cluster, 0 to 9.
    pub clients: u8,
}

impl Default for TopologySpec {
    fn default() -> Self {
        TopologySpec {
            nodes: 2,
            pods_per_node: 2,
            clients: 1,
        }
    }
}

/// The node network's router, the nodes (with their pods) and the clients.
#[derive(Debug)]
pub struct Topology {
    pub nodes: Vec<Node>,
    pub clients: Vec<Client>,
    /// Routes between the node network and the client network.
    pub router: Netns,
}

/// One node: its own namespace with iptables, `eth0` on the node network and
/// the `cni0` bridge its pods hang off.
#[derive(Debug)]
pub struct Node {
    /// 1-based, as in the address plan.
    pub index: u8,
    pub ns: Netns,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub pod_cidr_v4: Ipv4Net,
    pub pod_cidr_v6: Ipv6Net,
    pub pods: Vec<Pod>,
    next_pod_host: AtomicU8,
}

/// A pod: a namespace with `eth0` on its node's bridge.
#[derive(Debug)]
pub struct Pod {
    /// Index of the node it runs on (1-based).
    pub node: u8,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    /// The node-side end of the pod's veth (in the node namespace).
    pub host_ifname: String,
    pub ns: Netns,
}

/// A machine outside the cluster, reaching nodes through the router.
#[derive(Debug)]
pub struct Client {
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub ns: Netns,
}

/// A machine on the node network that is not a node (a control plane host,
/// say): reaches nodes directly and, through them, nothing else.
#[derive(Debug)]
pub struct Host {
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    pub ns: Netns,
}

const NODE_BRIDGE: &str = "cni0";
const NODE_NET_BRIDGE: &str = "br-nodes";
const CLIENT_NET_BRIDGE: &str = "br-clients";

/// The router's address on the node network.
pub const ROUTER_NODE_NET_V4: Ipv4Addr = Ipv4Addr::new(172, 30, 0, 1);
pub const ROUTER_NODE_NET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 1);
/// The router's address on the client network.
pub const ROUTER_CLIENT_NET_V4: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 1);
pub const ROUTER_CLIENT_NET_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, 1);

/// Node *i*'s address on the node network.
pub fn node_ipv4(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 30, 0, 10 + index)
}

pub fn node_ipv6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, 0x10 + u16::from(index))
}

/// Node *i*'s pod CIDRs.
pub fn pod_cidr_v4(index: u8) -> Ipv4Net {
    Ipv4Net::new(Ipv4Addr::new(10, 244, index, 0), 24).expect("24 is a valid IPv4 prefix length")
}

pub fn pod_cidr_v6(index: u8) -> Ipv6Net {
    Ipv6Net::new(
        Ipv6Addr::new(0xfd00, 0x244, u16::from(index), 0, 0, 0, 0, 0),
        64,
    )
    .expect("64 is a valid IPv6 prefix length")
}

/// Client *c*'s addresses.
pub fn client_ipv4(index: u8) -> Ipv4Addr {
    Ipv4Addr::new(172, 31, 0, 100 + index)
}

pub fn client_ipv6(index: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x31, 0, 0, 0, 0, 0, 0x100 + u16::from(index))
}

impl Topology {
    /// Builds the whole network. Every namespace is owned by the returned
    /// value; an error part-way deletes what was already built.
    pub fn new(spec: TopologySpec) -> Result<Topology> {
        if !(1..=9).contains(&spec.nodes) || spec.clients > 9 || spec.pods_per_node > 250 {
            return Err(NetnsError::InvalidName {
                name: format!("{spec:?}"),
                reason: "a topology has 1-9 nodes, 0-9 clients and at most 250 pods per node",
            });
        }
        let router = Netns::new("router")?;
        router.sysctl("net.ipv4.ip_forward", "1")?;
        router.sysctl("net.ipv6.conf.all.forwarding", "1")?;
        router.sysctl("net.ipv4.icmp_ratelimit", "0")?;
        router.sysctl("net.ipv6.icmp.ratelimit", "0")?;
        router.add_bridge(NODE_NET_BRIDGE)?;
        router.add_addr(NODE_NET_BRIDGE, ROUTER_NODE_NET_V4.into(), 24)?;
        router.add_addr(NODE_NET_BRIDGE, ROUTER_NODE_NET_V6.into(), 64)?;
        router.add_bridge(CLIENT_NET_BRIDGE)?;
        router.add_addr(CLIENT_NET_BRIDGE, ROUTER_CLIENT_NET_V4.into(), 24)?;
        router.add_addr(CLIENT_NET_BRIDGE, ROUTER_CLIENT_NET_V6.into(), 64)?;

        let mut topology = Topology {
            nodes: Vec::new(),
            clients: Vec::new(),
            router,
        };
        for index in 1..=spec.nodes {
            let node = Node::new(&topology.router, index)?;
            topology.nodes.push(node);
        }
        // Routes to every other node's pod CIDRs, as a CNI would add them.
        for node in &topology.nodes {
            for other in topology.nodes.iter().filter(|o| o.index != node.index) {
                node.ns
                    .add_route(&other.pod_cidr_v4.to_string(), other.ipv4.into())?;
                node.ns
                    .add_route(&other.pod_cidr_v6.to_string(), other.ipv6.into())?;
            }
        }
        for node in &mut topology.nodes {
            for _ in 0..spec.pods_per_node {
                let pod = node.add_pod(&format!("pod{}", node.pods.len() + 1))?;
                node.pods.push(pod);
            }
        }
        for index in 1..=spec.clients {
            let client = Client::new(&topology.router, index)?;
            topology.clients.push(client);
        }
        Ok(topology)
    }

    /// The node with 1-based `index`.
    pub fn node(&self, index: u8) -> &Node {
        &self.nodes[usize::from(index) - 1]
    }

    /// Makes the router send traffic for `destination` (a CIDR or address,
    /// e.g. a LoadBalancer IP) to node `index`, as an external load balancer
    /// or a BGP speaker would.
    pub fn route_to_node(&self, destination: IpAddr, index: u8) -> Result<()> {
        let node = self.node(index);
        let (cidr, via) = match destination {
            IpAddr::V4(ip) => (format!("{ip}/32"), IpAddr::V4(node.ipv4)),
            IpAddr::V6(ip) => (format!("{ip}/128"), IpAddr::V6(node.ipv6)),
        };
        self.router.add_route(&cidr, via)
    }

    /// Attaches a new machine to the node network as `172.30.0.<host>` /
    /// `fd00:30::<host>` (hex), routing everything else via the router.
    /// `host` must be 2 to 9 or 20 to 254 (1 is the router, 11 to 19 are
    /// nodes).
    pub fn add_host(&self, role: &str, host: u8) -> Result<Host> {
        if host < 2 || (10..20).contains(&host) || host == 255 {
            return Err(NetnsError::InvalidName {
                name: format!("{role} ({host})"),
                reason: "node-network host numbers are 2-9 or 20-254",
            });
        }
        let ns = Netns::new(role)?;
        let uplink = format!("h{host}");
        veth(&self.router, &uplink, &ns, "eth0")?;
        self.router.set_master(&uplink, NODE_NET_BRIDGE)?;
        let ipv4 = Ipv4Addr::new(172, 30, 0, host);
        let ipv6 = Ipv6Addr::new(0xfd00, 0x30, 0, 0, 0, 0, 0, u16::from(host));
        ns.add_addr("eth0", ipv4.into(), 24)?;
        ns.add_addr("eth0", ipv6.into(), 64)?;
        ns.add_route("default", ROUTER_NODE_NET_V4.into())?;
        ns.add_route("default", ROUTER_NODE_NET_V6.into())?;
        Ok(Host { ipv4, ipv6, ns })
    }

    /// Every pod of every node.
    pub fn pods(&self) -> impl Iterator<Item = &Pod> {
        self.nodes.iter().flat_map(|node| node.pods.iter())
    }
}

impl Node {
    /// Builds node `index`: its namespace, `eth0` on the router's node
    /// network and the pod bridge. Routes to other nodes' pods are added by
    /// the caller once all nodes exist.
    pub fn new(router: &Netns, index: u8) -> Result<Node> {
        let ns = Netns::new(&format!("node{index}"))?;
        for (key, value) in [
            ("net.ipv4.ip_forward", "1"),
            ("net.ipv6.conf.all.forwarding", "1"),
            ("net.bridge.bridge-nf-call-iptables", "1"),
            ("net.bridge.bridge-nf-call-ip6tables", "1"),
            // A REJECT answers with ICMP errors, which the kernel rate-limits
            // per destination (about one a second). Tests that poll a
            // rejecting frontend would then see timeouts, so nodes do not
            // rate-limit.
            ("net.ipv4.icmp_ratelimit", "0"),
            ("net.ipv6.icmp.ratelimit", "0"),
        ] {
            ns.sysctl(key, value)?;
        }
        let uplink = format!("n{index}");
        veth(router, &uplink, &ns, "eth0")?;
        router.set_master(&uplink, NODE_NET_BRIDGE)?;
        let (ipv4, ipv6) = (node_ipv4(index), node_ipv6(index));
        ns.add_addr("eth0", ipv4.into(), 24)?;
        ns.add_addr("eth0", ipv6.into(), 64)?;
        ns.add_route("default", ROUTER_NODE_NET_V4.into())?;
        ns.add_route("default", ROUTER_NODE_NET_V6.into())?;

        let (pod_cidr_v4, pod_cidr_v6) = (pod_cidr_v4(index), pod_cidr_v6(index));
        ns.add_bridge(NODE_BRIDGE)?;
        ns.add_addr(NODE_BRIDGE, gateway_v4(pod_cidr_v4).into(), 24)?;
        ns.add_addr(NODE_BRIDGE, gateway_v6(pod_cidr_v6).into(), 64)?;
        Ok(Node {
            index,
            ns,
            ipv4,
            ipv6,
            pod_cidr_v4,
            pod_cidr_v6,
            pods: Vec::new(),
            next_pod_host: AtomicU8::new(2),
        })
    }

    /// The pods' default gateway (the bridge's addresses).
    pub fn gateway_v4(&self) -> Ipv4Addr {
        gateway_v4(self.pod_cidr_v4)
    }

    pub fn gateway_v6(&self) -> Ipv6Addr {
        gateway_v6(self.pod_cidr_v6)
    }

    /// Adds a pod behind this node with the next free addresses. The caller
    /// owns it: dropping it removes the pod (and its veth) again. Addresses
    /// are not reused within a node's lifetime.
    pub fn add_pod(&self, role: &str) -> Result<Pod> {
        let host = self
            .next_pod_host
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < 255).then_some(n + 1)
            })
            .map_err(|_| NetnsError::InvalidName {
                name: role.to_owned(),
                reason: "this node's pod CIDR is exhausted",
            })?;
        let ns = Netns::new(&format!("n{}-{role}", self.index))?;
        let host_ifname = format!("vp{host}");
        veth(&self.ns, &host_ifname, &ns, "eth0")?;
        self.ns.set_master(&host_ifname, NODE_BRIDGE)?;
        let octets = self.pod_cidr_v4.network().octets();
        let ipv4 = Ipv4Addr::new(octets[0], octets[1], octets[2], host);
        let mut segments = self.pod_cidr_v6.network().segments();
        segments[7] = u16::from(host);
        let ipv6 = Ipv6Addr::from(segments);
        ns.add_addr("eth0", ipv4.into(), 24)?;
        ns.add_addr("eth0", ipv6.into(), 64)?;
        ns.add_route("default", self.gateway_v4().into())?;
        ns.add_route("default", self.gateway_v6().into())?;
        Ok(Pod {
            node: self.index,
            ipv4,
            ipv6,
            host_ifname,
            ns,
        })
    }
}

impl Client {
    fn new(router: &Netns, index: u8) -> Result<Client> {
        let ns = Netns::new(&format!("client{index}"))?;
        let uplink = format!("c{index}");
        veth(router, &uplink, &ns, "eth0")?;
        router.set_master(&uplink, CLIENT_NET_BRIDGE)?;
        let (ipv4, ipv6) = (client_ipv4(index), client_ipv6(index));
        ns.add_addr("eth0", ipv4.into(), 24)?;
        ns.add_addr("eth0", ipv6.into(), 64)?;
        ns.add_route("default", ROUTER_CLIENT_NET_V4.into())?;
        ns.add_route("default", ROUTER_CLIENT_NET_V6.into())?;
        Ok(Client { ipv4, ipv6, ns })
    }
}

fn gateway_v4(cidr: Ipv4Net) -> Ipv4Addr {
    let octets = cidr.network().octets();
    Ipv4Addr::new(octets[0], octets[1], octets[2], 1)
}

fn gateway_v6(cidr: Ipv6Net) -> Ipv6Addr {
    let mut segments = cidr.network().segments();
    segments[7] = 1;
    Ipv6Addr::from(segments)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn address_plan_matches_the_documented_table() {
        assert_eq!(node_ipv4(1).to_string(), "172.30.0.11");
        assert_eq!(node_ipv6(2).to_string(), "fd00:30::12");
        assert_eq!(pod_cidr_v4(3).to_string(), "10.244.3.0/24");
        assert_eq!(pod_cidr_v6(1).to_string(), "fd00:244:1::/64");
        assert_eq!(client_ipv4(1).to_string(), "172.31.0.101");
        assert_eq!(client_ipv6(1).to_string(), "fd00:31::101");
        assert_eq!(gateway_v6(pod_cidr_v6(2)).to_string(), "fd00:244:2::1");
    }
}
