//! The one reader of what the kernel reports back: `iptables-save` dumps
//! (with or without counters) and `nft list` output. Verify, drift detection,
//! cleanup and `explain` all read through it.

use std::collections::BTreeMap;

/// One rule of an `iptables-save -c` dump.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CountedRule {
    /// Packets matched.
    pub packets: u64,
    /// Bytes matched.
    pub bytes: u64,
    /// The rule, as it follows `-A <chain> `.
    pub rule: String,
}

/// Parses an `iptables-save` dump, with counters (`-c`) or without, every
/// table in it; `iptables -S` output is one table without a name.
pub fn parse_save(dump: &str) -> BTreeMap<String, BTreeMap<String, Vec<CountedRule>>> {
    let mut tables: BTreeMap<String, BTreeMap<String, Vec<CountedRule>>> = BTreeMap::new();
    let mut table = String::new();
    for line in dump.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.trim().to_owned();
            tables.entry(table.clone()).or_default();
        } else if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split_whitespace().next().unwrap_or_default();
            tables
                .entry(table.clone())
                .or_default()
                .entry(name.to_owned())
                .or_default();
        } else if line.starts_with('[') || line.starts_with("-A ") {
            let (counters, rule) = match line.strip_prefix('[').and_then(|r| r.split_once(']')) {
                Some((counters, rule)) => (counters, rule.trim_start()),
                None => ("0:0", line),
            };
            let (packets, bytes) = counters.split_once(':').unwrap_or(("0", "0"));
            let Some(rule) = rule.strip_prefix("-A ") else {
                continue;
            };
            let (chain, spec) = rule.split_once(' ').unwrap_or((rule, ""));
            tables
                .entry(table.clone())
                .or_default()
                .entry(chain.to_owned())
                .or_default()
                .push(CountedRule {
                    packets: packets.parse().unwrap_or(0),
                    bytes: bytes.parse().unwrap_or(0),
                    rule: spec.to_owned(),
                });
        }
    }
    tables
}

/// Rules per chain of a one-table dump (`iptables-save -t <table>`).
pub fn chains_of(dump: &str) -> BTreeMap<String, Vec<CountedRule>> {
    parse_save(dump).into_values().flatten().collect()
}

/// What `nft list` printed: each chain's rules (hook lines left out) and each
/// set's elements.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Listing {
    /// Rules by chain.
    pub chains: BTreeMap<String, Vec<String>>,
    /// Elements (`key` or `key : value`) by set or map.
    pub sets: BTreeMap<String, Vec<String>>,
}

/// Parses `nft list table|chain` output.
pub fn parse_listing(text: &str) -> Listing {
    let mut listing = Listing::default();
    let mut chain: Option<String> = None;
    let mut set: Option<String> = None;
    for line in text.lines().map(str::trim) {
        if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|r| r.strip_suffix(" {"))
        {
            listing.chains.insert(name.to_owned(), Vec::new());
            chain = Some(name.to_owned());
        } else if let Some(name) = ["set ", "map "]
            .iter()
            .find_map(|k| line.strip_prefix(k))
            .and_then(|r| r.strip_suffix(" {"))
        {
            listing.sets.insert(name.to_owned(), Vec::new());
            set = Some(name.to_owned());
        } else if line == "}" {
            chain = None;
            set = None;
        } else if let Some(name) = &set {
            if let Some(elements) = listing.sets.get_mut(name) {
                elements.extend(line_elements(line));
            }
        } else if let Some(name) = &chain
            && !line.is_empty()
            && !line.starts_with("type ")
            && !line.starts_with("policy ")
            && !line.starts_with("comment ")
            && let Some(rules) = listing.chains.get_mut(name)
        {
            rules.push(line.to_owned());
        }
    }
    listing
}

/// Elements on one line of a set body (`elements = { a, b,` / `c }`).
fn line_elements(line: &str) -> Vec<String> {
    let body = match line.split_once("elements = {") {
        Some((_, rest)) => rest,
        // Declaration lines: the key type, flags, and the stateful
        // expressions every element gets (`counter`).
        None if line == "counter"
            || [
                "type ", "flags ", "timeout ", "size ", "typeof ", "policy ", "counter ",
            ]
            .iter()
            .any(|k| line.starts_with(k)) =>
        {
            return Vec::new();
        }
        None => line,
    };
    body.trim_end_matches('}')
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn save_dumps_with_and_without_counters_give_the_same_rules() {
        let plain = "*nat\n:PREROUTING ACCEPT [0:0]\n:PPX-A - [0:0]\n-A PREROUTING -m comment --comment \"planproxy x\" -j PPX-A\nCOMMIT\n";
        let counted = "*nat\n:PREROUTING ACCEPT [0:0]\n:PPX-A - [0:0]\n[7:420] -A PREROUTING -m comment --comment \"planproxy x\" -j PPX-A\nCOMMIT\n";
        let (a, b) = (parse_save(plain), parse_save(counted));
        assert_eq!(
            a["nat"]["PREROUTING"][0].rule,
            b["nat"]["PREROUTING"][0].rule
        );
        assert_eq!(b["nat"]["PREROUTING"][0].packets, 7);
        assert!(a["nat"]["PPX-A"].is_empty());
        let listed = chains_of("-N PPX-CANARY\n-A PPX-CANARY -j RETURN\n");
        assert_eq!(listed["PPX-CANARY"].len(), 1);
    }

    #[test]
    fn listings_give_rules_per_chain_and_elements_per_set() {
        let text = "table inet planproxy {\n\tmap services4 {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\telements = { 10.96.0.1 . tcp . 80 : goto a,\n\t\t\t     10.96.0.2 . tcp . 80 : goto b }\n\t}\n\tset empty {\n\t\ttype inet_service\n\t}\n\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n\tchain a {\n\t}\n}\n";
        let l = parse_listing(text);
        assert_eq!(l.sets["services4"].len(), 2);
        assert_eq!(l.sets["services4"][1], "10.96.0.2 . tcp . 80 : goto b");
        assert!(l.sets["empty"].is_empty());
        let counted = parse_listing(
            "table inet planproxy {\n\tmap nodeports4 {\n\t\ttype inet_proto . inet_service : verdict\n\t\tcounter\n\t}\n\tmap services4 {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\tcounter\n\t\telements = { 10.96.0.1 . tcp . 80 counter packets 2 bytes 120 : goto a }\n\t}\n}\n",
        );
        assert!(counted.sets["nodeports4"].is_empty(), "{counted:?}");
        assert_eq!(counted.sets["services4"].len(), 1);
        assert_eq!(l.chains["nat-prerouting"], ["jump services"]);
        assert!(l.chains["a"].is_empty());
    }
}
