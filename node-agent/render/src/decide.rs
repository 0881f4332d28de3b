//! Backend-neutral decisions: what one service port does in one IP family, and
//! what the node does as a whole. Every emitter (iptables, nftables) turns these
//! into rules and decides nothing about kube-proxy semantics itself, so both
//! backends follow the same semantics by construction.

use std::net::IpAddr;

use ipnet::IpNet;
use planproxy_crds::v1alpha1::NoEndpointsAction;

use crate::Family;
use crate::model::{Endpoint, ServicePort, Settings, family_of, family_of_net};

/// What a frontend without a usable endpoint does with new connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Drop silently.
    Drop,
    /// Reject (ICMP port unreachable / TCP reset).
    Reject,
}

/// Why a frontend refuses: the two cases kube-proxy distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unreachable {
    /// What happens to the connection.
    pub refusal: Refusal,
    /// `has no endpoints` or `has no local endpoints` (rule comments say it).
    pub reason: &'static str,
}

/// Which source addresses the cluster-IP path masquerades.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterMasquerade {
    /// Every source (`masqueradeAll`).
    All,
    /// Sources outside the node's local-pod CIDR.
    NotFrom(IpNet),
    /// None: no local-traffic detector and not `masqueradeAll`.
    Nobody,
}

/// One service port in one family, decided.
#[derive(Debug, Clone)]
pub struct PortDecision<'a> {
    /// The parsed service port.
    pub sp: &'a ServicePort,
    /// The family decided for.
    pub family: Family,
    /// The cluster IP of this family.
    pub cluster_ip: IpAddr,
    /// The cluster-wide endpoints of this family (empty without `hasEndpoints`).
    pub cluster_eps: Vec<Endpoint>,
    /// The node-local endpoints of this family (empty without `hasEndpoints`).
    pub local_eps: Vec<Endpoint>,
    /// External IPs of this family.
    pub external_ips: Vec<IpAddr>,
    /// Load-balancer IPs of this family.
    pub lb_ips: Vec<IpAddr>,
    /// Load-balancer source ranges of this family.
    pub ranges: Vec<IpNet>,
    /// Reachable through a node port, an external IP or a load-balancer IP.
    pub externally_accessible: bool,
    /// externalTrafficPolicy Local, and it matters (the port is externally accessible).
    pub external_local: bool,
    /// Some endpoint exists for this family (a dual-stack service may have
    /// endpoints in one family only).
    pub has_endpoints: bool,
    /// The cluster-wide endpoint set is used by some frontend.
    pub uses_cluster_set: bool,
    /// The local endpoint set is used by some frontend.
    pub uses_local_set: bool,
    /// Cluster-IP traffic uses the local set (internalTrafficPolicy Local).
    pub internal_uses_local: bool,
    /// Cluster-IP traffic has an endpoint set to go to.
    pub has_internal: bool,
    /// External traffic has an endpoint set to go to.
    pub has_external: bool,
    /// What the cluster IP does without endpoints.
    pub internal_unreachable: Unreachable,
    /// What external frontends do without endpoints.
    pub external_unreachable: Unreachable,
    /// Load-balancer IPs are filtered by source ranges.
    pub uses_firewall: bool,
    /// The source ranges admit one of the node's IPs, so a VIP bound on the node
    /// (looping back with the VIP as source) is admitted too.
    pub firewall_admits_node: bool,
    /// Who the cluster-IP path masquerades.
    pub cluster_masquerade: ClusterMasquerade,
    /// eTP Local: pods of this node may be short-circuited to the cluster set
    /// (the local-pod CIDR, when there is a detector and the cluster set is used).
    pub pod_short_circuit: Option<IpNet>,
}

impl<'a> PortDecision<'a> {
    /// Decides `sp` for `family`; `None` when the port has no cluster IP there.
    pub fn new(sp: &'a ServicePort, family: Family, settings: &Settings) -> Option<Self> {
        let cluster_ip = sp
            .cluster_ips
            .iter()
            .copied()
            .find(|ip| family_of(ip) == family)?;
        // `hasEndpoints` is authoritative: without it every frontend rejects,
        // whatever the endpoint sets hold.
        let (cluster_eps, local_eps) = if sp.has_endpoints {
            (
                of_family(sp.cluster_endpoints.as_deref(), family),
                of_family(sp.local_endpoints.as_deref(), family),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        let external_ips = ips_of(&sp.external_ips, family);
        let lb_ips = ips_of(&sp.load_balancer_ips, family);
        let ranges: Vec<IpNet> = sp
            .source_ranges
            .iter()
            .copied()
            .filter(|n| family_of_net(n) == family)
            .collect();
        let externally_accessible =
            sp.node_port.is_some() || !external_ips.is_empty() || !lb_ips.is_empty();
        let external_local = sp.external_local && externally_accessible;
        let has_endpoints = sp.has_endpoints
            && (!cluster_eps.is_empty() || !local_eps.is_empty() || sp.all_endpoints().is_empty());
        let uses_cluster_set =
            !cluster_eps.is_empty() && (!sp.internal_local || externally_accessible);
        let uses_local_set = !local_eps.is_empty() && (sp.internal_local || external_local);
        let has_internal = if sp.internal_local {
            uses_local_set
        } else {
            uses_cluster_set
        };
        let has_external = if external_local {
            uses_local_set
        } else {
            uses_cluster_set
        };
        let unreachable = |local_policy: bool| {
            if local_policy && has_endpoints {
                Unreachable {
                    refusal: Refusal::Drop,
                    reason: "has no local endpoints",
                }
            } else {
                Unreachable {
                    refusal: match sp.no_endpoints_action {
                        NoEndpointsAction::Reject => Refusal::Reject,
                        NoEndpointsAction::Drop => Refusal::Drop,
                    },
                    reason: "has no endpoints",
                }
            }
        };
        // As kube-proxy: without endpoints there is no firewall, and every
        // source meets the no-endpoints action (a client the ranges admit is
        // told "refused" at once instead of waiting for a timeout).
        let uses_firewall = has_endpoints && !lb_ips.is_empty() && !ranges.is_empty();
        let firewall_admits_node = settings
            .node_ips
            .iter()
            .any(|ip| ranges.iter().any(|r| r.contains(ip)));
        let cluster_masquerade = if sp.masquerade_all {
            ClusterMasquerade::All
        } else {
            settings
                .local_cidr(family)
                .map_or(ClusterMasquerade::Nobody, ClusterMasquerade::NotFrom)
        };
        let pod_short_circuit = settings
            .local_cidr(family)
            .filter(|_| external_local && uses_cluster_set);
        Some(Self {
            sp,
            family,
            cluster_ip,
            cluster_eps,
            local_eps,
            external_ips,
            lb_ips,
            ranges,
            externally_accessible,
            external_local,
            has_endpoints,
            uses_cluster_set,
            uses_local_set,
            internal_uses_local: sp.internal_local,
            has_internal,
            has_external,
            internal_unreachable: unreachable(sp.internal_local),
            external_unreachable: unreachable(external_local),
            uses_firewall,
            firewall_admits_node,
            cluster_masquerade,
            pod_short_circuit,
        })
    }

    /// The endpoint sets in use, each with whether cluster-IP traffic uses it:
    /// `(is_local_set, endpoints, internal)`.
    pub fn endpoint_sets(&self) -> Vec<(bool, &[Endpoint], bool)> {
        let mut out = Vec::new();
        if self.uses_cluster_set {
            out.push((
                false,
                self.cluster_eps.as_slice(),
                !self.internal_uses_local,
            ));
        }
        if self.uses_local_set {
            out.push((true, self.local_eps.as_slice(), self.internal_uses_local));
        }
        out
    }

    /// The endpoints among the sets in use that a connection can hairpin to:
    /// those on this node, and those whose node the plan does not know (see
    /// the crate docs).
    pub fn hairpin_endpoints(&self) -> Vec<Endpoint> {
        let mut out: Vec<Endpoint> = self
            .endpoint_sets()
            .into_iter()
            .flat_map(|(_, eps, _)| eps.iter().filter(|e| e.hairpin).copied())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Where node ports answer in one family: destinations the kernel counts as
/// local (`addrtype LOCAL`, `fib daddr type local`), so an address the node
/// gains or loses (a secondary NIC, an address Node status does not list)
/// needs no new rules, narrowed by `nodePortAddresses`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodePortDestinations {
    /// Only local addresses inside these networks; `None`: every local address.
    /// An empty list means no address at all.
    pub within: Option<Vec<IpNet>>,
    /// Local addresses inside this network are left out: the family's loopback
    /// network where node ports do not answer on it (set only where `within`
    /// would otherwise reach into it).
    pub except: Option<IpNet>,
}

/// The node-wide decisions of one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeDecision {
    /// The family.
    pub family: Family,
    /// The masquerade mark.
    pub mark: u32,
    /// Where node ports answer.
    pub node_ports: NodePortDestinations,
    /// Where node ports without (local) endpoints refuse: every local address,
    /// as in kube-proxy's iptables mode, except this network (the family's
    /// loopback where node ports do not answer on it, so that 127.0.0.1 is
    /// either a node-port destination or not one at all).
    pub refusals_except: Option<IpNet>,
    /// IPv4 node ports answer on 127.0.0.0/8: the node needs
    /// `route_localnet` and the guard dropping other packets to 127.0.0.0/8.
    pub localhost: bool,
}

/// The family's loopback network.
pub fn loopback(family: Family) -> IpNet {
    match family {
        Family::V4 => IpNet::V4(
            ipnet::Ipv4Net::new(std::net::Ipv4Addr::new(127, 0, 0, 0), 8).unwrap_or_default(),
        ),
        Family::V6 => IpNet::from(IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)),
    }
}

impl NodeDecision {
    /// Decides the node-wide rules of `family`.
    pub fn new(family: Family, settings: &Settings) -> Self {
        let loopback = loopback(family);
        let addresses: Vec<IpNet> = settings
            .node_port_addresses
            .iter()
            .copied()
            .filter(|n| family_of_net(n) == family)
            .collect();
        let every_address = addresses.is_empty() || addresses.iter().any(|n| n.prefix_len() == 0);
        // The controller already judged whether nodePortAddresses reach into
        // the loopback network, as kube-proxy does; the plan says the result.
        let localhost = family == Family::V4 && settings.localhost_node_ports;
        let node_ports = if every_address {
            NodePortDestinations {
                within: None,
                except: (!localhost).then_some(loopback),
            }
        } else if localhost {
            NodePortDestinations {
                within: Some(addresses),
                except: None,
            }
        } else {
            // A network inside loopback names no destination; one around it
            // (64.0.0.0/2) keeps its other addresses.
            let within: Vec<IpNet> = addresses
                .into_iter()
                .filter(|n| !loopback.contains(n))
                .collect();
            let except = within
                .iter()
                .any(|n| n.contains(&loopback))
                .then_some(loopback);
            NodePortDestinations {
                within: Some(within),
                except,
            }
        };
        Self {
            family,
            mark: settings.masquerade_mark,
            node_ports,
            refusals_except: (!localhost).then_some(loopback),
            localhost,
        }
    }
}

fn of_family(set: Option<&[Endpoint]>, family: Family) -> Vec<Endpoint> {
    set.into_iter()
        .flatten()
        .filter(|e| family_of(&e.addr.ip()) == family)
        .copied()
        .collect()
}

fn ips_of(ips: &[IpAddr], family: Family) -> Vec<IpAddr> {
    ips.iter()
        .copied()
        .filter(|ip| family_of(ip) == family)
        .collect()
}
