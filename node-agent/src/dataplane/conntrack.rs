//! Stale UDP conntrack entries.
//!
//! UDP has no connection end, so a client that keeps sending keeps its conntrack
//! entry, and with it the DNAT to an endpoint that may be gone. This reconciler
//! works from the desired state (the plan), not from change events: after each
//! sync it lists the UDP flows and deletes every flow to a UDP frontend whose
//! reply does not come from one of that frontend's current endpoints. That covers
//! a removed endpoint, a service scaled to zero (no endpoint is current) and one
//! that gains its first endpoint (its earlier flows were never DNATed). A restart
//! deletes nothing the plan still allows.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use planproxy_crds::v1alpha1::Protocol;
use planproxy_render::Family;
use planproxy_render::model::{ServicePort, Settings};

use super::Error;
use super::netfilter::{self, Netfilter};

/// What the UDP flows of one family may point at.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct UdpTargets {
    /// Each UDP frontend (cluster, external and load-balancer IP with the port)
    /// and the endpoints its flows may be DNATed to.
    pub frontends: BTreeMap<SocketAddr, BTreeSet<SocketAddr>>,
    /// Each UDP node port and its endpoints.
    pub node_ports: BTreeMap<u16, BTreeSet<SocketAddr>>,
    /// The node's own addresses.
    pub node_ips: BTreeSet<IpAddr>,
}

impl UdpTargets {
    /// The UDP targets of `model` in `family`.
    pub(crate) fn of<'a>(
        settings: &Settings,
        ports: impl IntoIterator<Item = &'a ServicePort>,
        family: Family,
    ) -> Self {
        let in_family = |ip: &IpAddr| {
            matches!(
                (ip, family),
                (IpAddr::V4(_), Family::V4) | (IpAddr::V6(_), Family::V6)
            )
        };
        let mut targets = UdpTargets {
            node_ips: settings
                .node_ips
                .iter()
                .copied()
                .filter(in_family)
                .collect(),
            ..Default::default()
        };
        for sp in ports {
            if sp.protocol != Protocol::Udp || !sp.cluster_ips.iter().any(in_family) {
                continue;
            }
            let endpoints: BTreeSet<SocketAddr> = sp
                .all_endpoints()
                .into_iter()
                .filter(|e| in_family(&e.ip()))
                .collect();
            for ip in sp
                .cluster_ips
                .iter()
                .chain(&sp.external_ips)
                .chain(&sp.load_balancer_ips)
                .filter(|ip| in_family(ip))
            {
                targets
                    .frontends
                    .entry(SocketAddr::new(*ip, sp.port))
                    .or_default()
                    .extend(endpoints.iter().copied());
            }
            if let Some(np) = sp.node_port {
                targets
                    .node_ports
                    .entry(np)
                    .or_default()
                    .extend(endpoints.iter().copied());
            }
        }
        targets
    }
}

/// One UDP conntrack entry: the original direction and the reply's source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Flow {
    pub orig_src: SocketAddr,
    pub orig_dst: SocketAddr,
    pub reply_src: SocketAddr,
}

/// Reads `conntrack -L -p udp` output.
pub(crate) fn parse_flows(text: &str) -> Vec<Flow> {
    text.lines()
        .filter_map(|line| {
            let mut src = Vec::new();
            let mut dst = Vec::new();
            let mut sport = Vec::new();
            let mut dport = Vec::new();
            for word in line.split_whitespace() {
                if let Some(v) = word.strip_prefix("src=") {
                    src.push(v.parse::<IpAddr>().ok()?);
                } else if let Some(v) = word.strip_prefix("dst=") {
                    dst.push(v.parse::<IpAddr>().ok()?);
                } else if let Some(v) = word.strip_prefix("sport=") {
                    sport.push(v.parse::<u16>().ok()?);
                } else if let Some(v) = word.strip_prefix("dport=") {
                    dport.push(v.parse::<u16>().ok()?);
                }
            }
            Some(Flow {
                orig_src: SocketAddr::new(*src.first()?, *sport.first()?),
                orig_dst: SocketAddr::new(*dst.first()?, *dport.first()?),
                reply_src: SocketAddr::new(*src.get(1)?, *sport.get(1)?),
            })
        })
        .collect()
}

/// The flows that point where the plan no longer allows. `gone` are UDP
/// frontends of the previous plan that the current one no longer has.
pub(crate) fn stale<'a>(
    flows: &'a [Flow],
    targets: &UdpTargets,
    gone: &BTreeSet<SocketAddr>,
) -> Vec<&'a Flow> {
    flows
        .iter()
        .filter(|f| {
            let dnat = f.reply_src != f.orig_dst;
            if let Some(endpoints) = targets.frontends.get(&f.orig_dst) {
                return !endpoints.contains(&f.reply_src);
            }
            if gone.contains(&f.orig_dst) {
                return dnat;
            }
            if let Some(endpoints) = targets.node_ports.get(&f.orig_dst.port()) {
                // Flows to the port that were DNATed, or that were addressed to
                // the node itself; a pod's own traffic to that port elsewhere is
                // none of ours.
                return (dnat || targets.node_ips.contains(&f.orig_dst.ip()))
                    && !endpoints.contains(&f.reply_src);
            }
            false
        })
        .collect()
}

fn family_flag(family: Family) -> &'static str {
    match family {
        Family::V4 => "ipv4",
        Family::V6 => "ipv6",
    }
}

/// Lists the family's UDP flows and deletes the stale ones; returns how many
/// were deleted.
pub(crate) fn reconcile(
    nf: &dyn Netfilter,
    family: Family,
    targets: &UdpTargets,
    gone: &BTreeSet<SocketAddr>,
) -> Result<usize, Error> {
    if targets.frontends.is_empty() && targets.node_ports.is_empty() && gone.is_empty() {
        return Ok(0);
    }
    let args = ["-L", "-p", "udp", "-f", family_flag(family)];
    let flows = parse_flows(&netfilter::output(nf, "conntrack", &args)?);
    let mut deleted = 0;
    // Whether a flow is stale depends only on where it went and who
    // answered, so one `conntrack -D` per such pair removes every stale flow
    // with it: a frontend with thousands of clients (DNS) costs one process
    // per gone endpoint, not one per client.
    let mut groups: BTreeMap<(SocketAddr, SocketAddr), usize> = BTreeMap::new();
    for flow in stale(&flows, targets, gone) {
        *groups.entry((flow.orig_dst, flow.reply_src)).or_default() += 1;
    }
    for ((orig_dst, reply_src), flows) in groups {
        let (dst, dport) = (orig_dst.ip().to_string(), orig_dst.port().to_string());
        let (reply, reply_port) = (reply_src.ip().to_string(), reply_src.port().to_string());
        let ran = netfilter::run(
            nf,
            "conntrack",
            &[
                "-D",
                "-p",
                "udp",
                "-f",
                family_flag(family),
                "--orig-dst",
                &dst,
                "--dport",
                &dport,
                "--reply-src",
                &reply,
                "--reply-port-src",
                &reply_port,
            ],
            None,
        )?;
        // Exit status 1 means the flows expired meanwhile: nothing to do.
        if ran.success {
            deleted += flows;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().expect("test addresses are valid")
    }

    const LISTING: &str = "\
udp      17 29 src=10.244.0.5 dst=10.96.0.10 sport=40000 dport=53 src=10.244.1.7 dst=10.244.0.5 sport=5353 dport=40000 mark=0 use=1
udp      17 29 src=10.244.0.5 dst=10.96.0.10 sport=40001 dport=53 src=10.244.1.8 dst=10.244.0.5 sport=5353 dport=40001 mark=0 use=1
udp      17 25 src=10.244.0.6 dst=10.96.0.10 sport=40002 dport=53 [UNREPLIED] src=10.96.0.10 dst=10.244.0.6 sport=53 dport=40002 mark=0 use=1
udp      17 25 src=10.244.0.6 dst=8.8.8.8 sport=40003 dport=53 src=8.8.8.8 dst=192.168.1.2 sport=53 dport=40003 mark=0 use=1
";

    #[test]
    fn listing_is_parsed_into_original_and_reply() {
        let flows = parse_flows(LISTING);
        assert_eq!(flows.len(), 4);
        assert_eq!(flows[0].orig_dst, sa("10.96.0.10:53"));
        assert_eq!(flows[0].reply_src, sa("10.244.1.7:5353"));
        assert_eq!(flows[2].reply_src, sa("10.96.0.10:53"));
    }

    #[test]
    fn only_flows_to_gone_endpoints_or_never_dnated_are_stale() {
        let flows = parse_flows(LISTING);
        let mut targets = UdpTargets::default();
        targets
            .frontends
            .insert(sa("10.96.0.10:53"), [sa("10.244.1.7:5353")].into());
        let stale: Vec<_> = stale(&flows, &targets, &BTreeSet::new())
            .into_iter()
            .copied()
            .collect();
        // The flow to the removed endpoint 10.244.1.8 and the flow from before the
        // service had endpoints go; the live one and unrelated traffic stay.
        assert_eq!(stale, vec![flows[1], flows[2]]);
    }

    #[test]
    fn a_service_scaled_to_zero_loses_all_its_flows() {
        let flows = parse_flows(LISTING);
        let mut targets = UdpTargets::default();
        targets
            .frontends
            .insert(sa("10.96.0.10:53"), BTreeSet::new());
        assert_eq!(stale(&flows, &targets, &BTreeSet::new()).len(), 3);
    }

    #[test]
    fn a_deleted_service_loses_its_dnated_flows() {
        let flows = parse_flows(LISTING);
        let gone = [sa("10.96.0.10:53")].into();
        let stale: Vec<_> = stale(&flows, &UdpTargets::default(), &gone)
            .into_iter()
            .copied()
            .collect();
        assert_eq!(stale, vec![flows[0], flows[1]]);
    }

    #[test]
    fn one_delete_per_stale_destination_and_answer_whatever_the_clients() {
        use super::super::netfilter::{Ran, fake::FakeNetfilter};

        // Fifty clients of a DNS service whose endpoint 10.244.1.8 went, and
        // one flow to the endpoint that stays.
        let mut listing: String = (0..50)
            .map(|i| {
                format!(
                    "udp      17 29 src=10.244.0.{i} dst=10.96.0.10 sport={} dport=53 src=10.244.1.8 dst=10.244.0.{i} sport=5353 dport={} mark=0 use=1\n",
                    40000 + i,
                    40000 + i
                )
            })
            .collect();
        listing.push_str(
            "udp      17 29 src=10.244.0.9 dst=10.96.0.10 sport=41000 dport=53 src=10.244.1.7 dst=10.244.0.9 sport=5353 dport=41000 mark=0 use=1\n",
        );
        let nf = FakeNetfilter::default();
        nf.reply(move |call| {
            (call.program == "conntrack" && call.args.first().is_some_and(|a| a == "-L")).then(
                || Ran {
                    success: true,
                    code: Some(0),
                    stdout: listing.clone(),
                    stderr: String::new(),
                },
            )
        });
        let mut targets = UdpTargets::default();
        targets
            .frontends
            .insert(sa("10.96.0.10:53"), [sa("10.244.1.7:5353")].into());

        let deleted = reconcile(&nf, Family::V4, &targets, &BTreeSet::new())
            .expect("the fake kernel answers");

        assert_eq!(deleted, 50);
        let deletes: Vec<String> = nf
            .calls()
            .iter()
            .filter(|c| c.args.first().is_some_and(|a| a == "-D"))
            .map(|c| c.line())
            .collect();
        assert_eq!(
            deletes,
            vec![
                "conntrack -D -p udp -f ipv4 --orig-dst 10.96.0.10 --dport 53 --reply-src 10.244.1.8 --reply-port-src 5353"
            ]
        );
    }
}
