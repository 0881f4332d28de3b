//! Destination dispatch: how a top-level chain finds the rule for a frontend.
//!
//! kube-proxy's services chain holds one rule per frontend, so every new
//! connection walks all of them. [`Layout::Tree`] instead sorts frontends by
//! destination address and splits them on the address bits below their common
//! prefix into at most 32 children per level, each a `-d <prefix> -j <chain>` jump,
//! until a chain holds at most [`LEAF_MAX`] rules (or rules for one address only).
//! A first packet then walks about `32 · levels + LEAF_MAX` rules, and levels grow
//! with log₃₂ of the number of rules. Chains are kept few (roughly one per
//! [`LEAF_MAX`]/2 rules) because restore time on nf_tables follows the number of
//! chains.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

use crate::Layout;
use crate::hash::{CHAIN_PREFIX, short_hash};

/// The most rules a leaf chain holds before it is split.
pub const LEAF_MAX: usize = 64;
/// The most address bits one level splits on (fan-out 2^5 = 32).
const MAX_SPLIT_BITS: u32 = 5;

/// One frontend rule keyed by its destination address.
#[derive(Debug, Clone)]
pub(crate) struct DispatchEntry {
    pub dst: IpAddr,
    pub rule: String,
}

/// The rules for the top-level chain and the dispatch chains below it.
#[derive(Debug, Default)]
pub(crate) struct Dispatch {
    pub root_rules: Vec<String>,
    pub chains: Vec<(String, Vec<String>)>,
}

/// The name of the dispatch chain for `prefix` below `root`.
pub(crate) fn dispatch_chain_name(root: &str, prefix: &IpNet) -> String {
    format!(
        "{CHAIN_PREFIX}DST-{}",
        short_hash(&format!("{root}/{prefix}"))
    )
}

/// Lays out `entries` below the chain `root`. Entries for the same address keep
/// their relative order.
pub(crate) fn dispatch(root: &str, layout: Layout, entries: Vec<DispatchEntry>) -> Dispatch {
    let mut out = Dispatch::default();
    match layout {
        Layout::Flat => out.root_rules = entries.into_iter().map(|e| e.rule).collect(),
        Layout::Tree => {
            let (v4, v6): (Vec<_>, Vec<_>) = entries.into_iter().partition(|e| e.dst.is_ipv4());
            for (bits, group) in [(32u32, v4), (128u32, v6)] {
                let mut keyed: Vec<(u128, String)> =
                    group.into_iter().map(|e| (key(e.dst), e.rule)).collect();
                keyed.sort_by_key(|(k, _)| *k); // stable: same-address order kept
                let mut root_rules = Vec::new();
                split(root, bits, &keyed, &mut root_rules, &mut out.chains);
                out.root_rules.extend(root_rules);
            }
        }
    }
    out
}

fn key(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn prefix_net(bits: u32, key: u128, len: u32) -> IpNet {
    let host_bits = bits - len;
    let masked = if host_bits >= 128 {
        0
    } else {
        (key >> host_bits) << host_bits
    };
    let len = u8::try_from(len).expect("a prefix length must fit the address width");
    if bits == 32 {
        let addr = Ipv4Addr::from(u32::try_from(masked).expect("an IPv4 key must fit 32 bits"));
        IpNet::V4(ipnet::Ipv4Net::new(addr, len).expect("a prefix length must be at most 32"))
    } else {
        IpNet::V6(
            ipnet::Ipv6Net::new(Ipv6Addr::from(masked), len)
                .expect("a prefix length must be at most 128"),
        )
    }
}

fn split(
    root: &str,
    bits: u32,
    entries: &[(u128, String)],
    rules: &mut Vec<String>,
    chains: &mut Vec<(String, Vec<String>)>,
) {
    let (Some(first), Some(last)) = (entries.first(), entries.last()) else {
        return;
    };
    let common = if first.0 == last.0 {
        bits
    } else {
        (first.0 ^ last.0).leading_zeros() - (128 - bits)
    };
    // A leaf is bounded by rules, not frontends: a frontend whose policy rules
    // are inlined brings all of them. One address is never split.
    if entries.len() <= LEAF_MAX || common >= bits {
        rules.extend(entries.iter().map(|(_, r)| r.clone()));
        return;
    }
    // Enough bits that children come out near LEAF_MAX, but never more than
    // MAX_SPLIT_BITS: a wide level costs as much to walk as a deep one.
    let wanted = (entries.len().div_ceil(LEAF_MAX))
        .next_power_of_two()
        .trailing_zeros();
    let split_bits = wanted.clamp(1, MAX_SPLIT_BITS).min(bits - common);
    let len = common + split_bits;
    let shift = bits - len;
    let mut start = 0;
    while start < entries.len() {
        let group_key = entries[start].0 >> shift;
        let end = start + entries[start..].partition_point(|(k, _)| k >> shift == group_key);
        let group = &entries[start..end];
        if group.len() == 1 || group[0].0 == group[group.len() - 1].0 {
            // A single address: its rules go straight into this chain.
            rules.extend(group.iter().map(|(_, r)| r.clone()));
        } else {
            let net = prefix_net(bits, group[0].0, len);
            let name = dispatch_chain_name(root, &net);
            rules.push(format!("-d {net} -j {name}"));
            let mut sub = Vec::new();
            split(root, bits, group, &mut sub, chains);
            chains.push((name, sub));
        }
        start = end;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(n: u32) -> Vec<DispatchEntry> {
        (0..n)
            .map(|i| {
                let ip = Ipv4Addr::from(0x0a60_0000u32 + i * 7919 % 0x000f_ffff);
                DispatchEntry {
                    dst: IpAddr::V4(ip),
                    rule: format!("-d {ip}/32 -j X{i}"),
                }
            })
            .collect()
    }

    /// Follows the dispatch for `dst` and counts the rules a packet walks.
    fn walk(d: &Dispatch, dst: Ipv4Addr) -> (usize, Option<String>) {
        let mut rules = d.root_rules.clone();
        let mut walked = 0;
        'outer: loop {
            for r in &rules {
                walked += 1;
                let mut words = r.split(' ');
                let (Some("-d"), Some(net), Some("-j"), Some(target)) =
                    (words.next(), words.next(), words.next(), words.next())
                else {
                    continue;
                };
                let net: IpNet = net.parse().expect("test rules hold CIDRs");
                if net.contains(&IpAddr::V4(dst)) {
                    if let Some((_, sub)) = d.chains.iter().find(|(n, _)| n == target) {
                        rules = sub.clone();
                        continue 'outer;
                    }
                    return (walked, Some(target.to_owned()));
                }
            }
            return (walked, None);
        }
    }

    #[test]
    fn tree_reaches_every_frontend_through_few_rules() {
        let es = entries(10_000);
        let d = dispatch("PPX-SERVICES", Layout::Tree, es.clone());
        let mut worst = 0;
        for (i, e) in es.iter().enumerate() {
            let IpAddr::V4(ip) = e.dst else {
                unreachable!()
            };
            let (walked, target) = walk(&d, ip);
            assert_eq!(
                target.as_deref(),
                Some(format!("X{i}").as_str()),
                "entry {i}"
            );
            worst = worst.max(walked);
        }
        assert!(worst < 150, "a packet walked {worst} rules");
        assert!(d.chains.len() < 1_000, "{} dispatch chains", d.chains.len());
    }

    #[test]
    fn flat_layout_keeps_one_rule_per_frontend_in_order() {
        let es = entries(100);
        let d = dispatch("PPX-SERVICES", Layout::Flat, es.clone());
        assert!(d.chains.is_empty());
        let expected: Vec<String> = es.into_iter().map(|e| e.rule).collect();
        assert_eq!(d.root_rules, expected);
    }

    #[test]
    fn small_sets_stay_in_the_root_chain() {
        let d = dispatch("PPX-SERVICES", Layout::Tree, entries(LEAF_MAX as u32));
        assert!(d.chains.is_empty());
        assert_eq!(d.root_rules.len(), LEAF_MAX);
    }

    #[test]
    fn dispatch_chain_names_fit_iptables() {
        let net: IpNet = "fd00:1234:5678:9abc::/64".parse().expect("valid CIDR");
        assert!(dispatch_chain_name("PPX-EXTERNAL-SERVICES", &net).len() <= 28);
    }
}
