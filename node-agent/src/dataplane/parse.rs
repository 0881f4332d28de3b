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

/// An iptables rule spec (as it follows `-A <chain> `) in one spelling for
/// every way of writing it that the kernel stores alike, so what we wrote and
/// what `iptables-save` prints compare equal exactly when they are the same
/// rule. iptables-save moves `-s`/`-d`/`-p` before the matches, adds the
/// defaults of `recent` and `REJECT`, prints `MARK` as `--set-xmark`,
/// rounds `statistic` probabilities to what the kernel holds, quotes comments
/// only where needed and adds or drops host masks.
pub fn canonical_iptables_rule(spec: &str) -> String {
    let words = super::netfilter::split_spec(spec);
    let rule = IptablesRule::of(&group_options(&words));
    rule.text()
}

/// One option of an iptables rule spec with its arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
struct SpecOption {
    negated: bool,
    name: String,
    args: Vec<String>,
}

impl SpecOption {
    fn text(&self) -> String {
        let mut out = String::new();
        if self.negated {
            out.push_str("! ");
        }
        out.push_str(&self.name);
        for arg in &self.args {
            out.push(' ');
            out.push_str(arg);
        }
        out
    }
}

/// Options that take exactly one argument, whatever it looks like (a comment
/// may start with `-`).
const ONE_ARGUMENT: [&str; 14] = [
    "-m",
    "--match",
    "-j",
    "--jump",
    "-g",
    "--goto",
    "-p",
    "--protocol",
    "-s",
    "--source",
    "-d",
    "--destination",
    "--comment",
    "--name",
];

/// The words of a spec as options: each `-x`/`--xy` with the words up to
/// the next option, a `!` negating the option after it.
fn group_options(words: &[String]) -> Vec<SpecOption> {
    let mut options: Vec<SpecOption> = Vec::new();
    let mut negated = false;
    let mut words = words.iter().peekable();
    while let Some(word) = words.next() {
        if word == "!" {
            negated = true;
            continue;
        }
        if !word.starts_with('-') {
            // An argument after a one-argument option's argument: keep it.
            if let Some(last) = options.last_mut() {
                last.args.push(word.clone());
            }
            continue;
        }
        let mut option = SpecOption {
            negated: std::mem::take(&mut negated),
            name: word.clone(),
            args: Vec::new(),
        };
        if ONE_ARGUMENT.contains(&word.as_str()) {
            option.args.extend(words.next().cloned());
        } else {
            while let Some(arg) = words.next_if(|w| !w.starts_with('-') && *w != "!") {
                option.args.push(arg.clone());
            }
        }
        options.push(option);
    }
    options
}

/// A rule spec taken apart the way the kernel stores it: the protocol and
/// address matches, the comment, the other matches in order, the target.
#[derive(Debug, Default)]
struct IptablesRule {
    /// `-s`, `-d`, `-i`, `-o`, `-p` by their place in iptables-save's order.
    basic: BTreeMap<u8, String>,
    comment: Option<String>,
    matches: Vec<(String, Vec<String>)>,
    target: Option<(String, Vec<String>)>,
}

impl IptablesRule {
    fn of(options: &[SpecOption]) -> Self {
        let mut rule = IptablesRule::default();
        let mut protocol = String::new();
        for option in options {
            let arg = option.args.first().cloned().unwrap_or_default();
            if let Some(place) = basic_place(&option.name) {
                let value = match place {
                    BASIC_PROTOCOL => {
                        protocol = arg.to_ascii_lowercase();
                        protocol.clone()
                    }
                    BASIC_SOURCE | BASIC_DESTINATION => canonical_network(&arg),
                    _ => arg,
                };
                let not = if option.negated { "! " } else { "" };
                let short = BASIC_NAMES[usize::from(place)];
                rule.basic.insert(place, format!("{not}{short} {value}"));
            } else if matches!(option.name.as_str(), "-m" | "--match") {
                rule.matches.push((arg, Vec::new()));
            } else if matches!(option.name.as_str(), "-j" | "--jump" | "-g" | "--goto") {
                let jump = if matches!(option.name.as_str(), "-g" | "--goto") {
                    "-g"
                } else {
                    "-j"
                };
                rule.target = Some((format!("{jump} {arg}"), Vec::new()));
            } else if let Some((_, target_options)) = &mut rule.target {
                target_options.push(option.text());
            } else if option.name == "--comment"
                && rule.matches.last().is_some_and(|m| m.0 == "comment")
            {
                rule.matches.pop();
                rule.comment = Some(arg);
            } else if let Some((_, match_options)) = rule.matches.last_mut() {
                match_options.push(option.text());
            } else {
                // An option of the protocol's implicit match (`-p tcp --dport 80`).
                rule.matches.push((protocol.clone(), vec![option.text()]));
            }
        }
        rule
    }

    fn text(&self) -> String {
        let mut parts: Vec<String> = self.basic.values().cloned().collect();
        if let Some(comment) = &self.comment {
            parts.push(format!("-m comment --comment \"{comment}\""));
        }
        for (name, options) in &self.matches {
            let options = canonical_match_options(name, options);
            // `-m tcp` without options matches what `-p tcp` does.
            if options.is_empty() && ["tcp", "udp", "sctp"].contains(&name.as_str()) {
                continue;
            }
            parts.push(
                std::iter::once(format!("-m {name}"))
                    .chain(options)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        if let Some((target, options)) = &self.target {
            let options = canonical_target_options(target, options);
            parts.push(
                std::iter::once(target.clone())
                    .chain(options)
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        parts.join(" ")
    }
}

const BASIC_SOURCE: u8 = 0;
const BASIC_DESTINATION: u8 = 1;
const BASIC_PROTOCOL: u8 = 4;
const BASIC_NAMES: [&str; 5] = ["-s", "-d", "-i", "-o", "-p"];

/// Where iptables-save prints a protocol, address or interface match.
fn basic_place(option: &str) -> Option<u8> {
    match option {
        "-s" | "--source" => Some(BASIC_SOURCE),
        "-d" | "--destination" => Some(BASIC_DESTINATION),
        "-i" | "--in-interface" => Some(2),
        "-o" | "--out-interface" => Some(3),
        "-p" | "--protocol" => Some(BASIC_PROTOCOL),
        _ => None,
    }
}

/// A match's options in one spelling: defaults the kernel adds dropped,
/// values as the kernel holds them, in a fixed order (within one match,
/// options mean the same in any order).
fn canonical_match_options(name: &str, options: &[String]) -> Vec<String> {
    let mut out: Vec<String> = options
        .iter()
        .filter_map(|option| match (name, option.rsplit_once(' ')) {
            ("recent", None) if option == "--rsource" => None,
            ("recent", Some(("--mask", mask))) if is_full_mask(mask) => None,
            ("statistic", Some(("--probability", p))) => {
                Some(format!("--probability {}", canonical_probability(p)))
            }
            ("conntrack", Some((state, list)))
                if state.ends_with("--ctstate") || state.ends_with("--ctstatus") =>
            {
                Some(format!("{state} {}", sorted_list(list)))
            }
            _ => Some(option.clone()),
        })
        .collect();
    out.sort();
    out
}

/// A target's options in one spelling: `MARK` as the `--set-xmark` the kernel
/// holds, `REJECT`'s default reason dropped, NAT addresses compressed.
fn canonical_target_options(target: &str, options: &[String]) -> Vec<String> {
    let mut out: Vec<String> = options
        .iter()
        .filter_map(|option| {
            let (name, value) = option.split_once(' ').unwrap_or((option, ""));
            match (target, name) {
                ("-j MARK", "--or-mark") => Some(set_xmark(value, value)),
                ("-j MARK", "--xor-mark") => Some(set_xmark(value, "0")),
                ("-j MARK", "--set-mark" | "--set-xmark") => match value.split_once('/') {
                    Some((mark, mask)) => Some(set_xmark(mark, mask)),
                    None => Some(set_xmark(value, "0xffffffff")),
                },
                ("-j REJECT", "--reject-with")
                    if value == "icmp-port-unreachable" || value == "icmp6-port-unreachable" =>
                {
                    None
                }
                (_, "--to-destination" | "--to-source") => {
                    Some(format!("{name} {}", canonical_socket_addr(value)))
                }
                _ => Some(option.clone()),
            }
        })
        .collect();
    out.sort();
    out
}

fn set_xmark(mark: &str, mask: &str) -> String {
    format!(
        "--set-xmark {}/{}",
        canonical_number(mark),
        canonical_number(mask)
    )
}

/// A decimal or `0x` number as lowercase hex; anything else as it is.
fn canonical_number(value: &str) -> String {
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => value.parse::<u64>().ok(),
    };
    parsed.map_or_else(|| value.to_owned(), |n| format!("{n:#x}"))
}

/// The kernel keeps a probability as a 31-bit fraction and iptables-save
/// prints that fraction to 11 places: `0.3333333333` reads back as
/// `0.33333333349`.
fn canonical_probability(value: &str) -> String {
    const SCALE: f64 = 2_147_483_648.0;
    match value.parse::<f64>() {
        Ok(p) => format!("{:.11}", (p * SCALE).round() / SCALE),
        Err(_) => value.to_owned(),
    }
}

fn sorted_list(list: &str) -> String {
    let mut items: Vec<&str> = list.split(',').collect();
    items.sort_unstable();
    items.join(",")
}

fn is_full_mask(mask: &str) -> bool {
    match mask.parse::<std::net::IpAddr>() {
        Ok(std::net::IpAddr::V4(m)) => m == std::net::Ipv4Addr::BROADCAST,
        Ok(std::net::IpAddr::V6(m)) => m.to_bits() == u128::MAX,
        Err(_) => false,
    }
}

/// An address or network as `address/length`, the address compressed: a bare
/// address is a host (`/32`, `/128`), as iptables stores it.
fn canonical_network(value: &str) -> String {
    let (address, length) = match value.split_once('/') {
        Some((address, length)) => (address, Some(length)),
        None => (value, None),
    };
    let Ok(ip) = address.parse::<std::net::IpAddr>() else {
        return value.to_owned();
    };
    let host = if ip.is_ipv4() { "32" } else { "128" };
    format!("{ip}/{}", length.unwrap_or(host))
}

/// `address:port`, `[v6]:port` or a bare address, the address compressed.
fn canonical_socket_addr(value: &str) -> String {
    if let Ok(addr) = value.parse::<std::net::SocketAddr>() {
        return addr.to_string();
    }
    value
        .parse::<std::net::IpAddr>()
        .map_or_else(|_| value.to_owned(), |ip| ip.to_string())
}

/// An nftables rule in one spelling for every way of writing it that the
/// kernel stores alike, so a rule we wrote and its line in `nft list` compare
/// equal exactly when they are the same rule. nft leaves out dependencies it
/// can infer (`meta nfproto ipv4` before `ip daddr`, `meta l4proto tcp` before
/// `th dport`, printed `tcp dport`), prints marks as 32-bit hex, flag tests
/// as `ct state ! a,b`, counters with their values, hosts without `/32` and
/// IPv6 addresses compressed; `-a` adds `# handle N`.
pub fn canonical_nft_rule(rule: &str) -> String {
    let rule = rule.split(" # handle ").next().unwrap_or(rule);
    let mut words: Vec<String> = rule.split_whitespace().map(str::to_owned).collect();
    drop_counter_values(&mut words);
    drop_inferred_nfproto(&mut words);
    drop_inferred_l4proto(&mut words);
    canonical_flag_tests(&mut words);
    canonical_operands(&mut words);
    words
        .iter()
        .map(|w| canonical_nft_word(w))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A set or map element (`key`, `key : value`) in one spelling: without the
/// counter, timeout and expiry nft prints in it, addresses as nft prints them.
pub fn canonical_nft_element(element: &str) -> String {
    let mut words: Vec<String> = element.split_whitespace().map(str::to_owned).collect();
    drop_counter_values(&mut words);
    words.retain(|w| w != "counter");
    let mut out: Vec<String> = Vec::with_capacity(words.len());
    let mut words = words.into_iter();
    while let Some(word) = words.next() {
        if word == "timeout" || word == "expires" {
            words.next();
            continue;
        }
        out.push(canonical_nft_word(&word));
    }
    out.join(" ")
}

/// `counter packets N bytes M` → `counter`: the values are the kernel's.
fn drop_counter_values(words: &mut Vec<String>) {
    let mut i = 0;
    while i < words.len() {
        if words[i] == "counter"
            && words.get(i + 1).is_some_and(|w| w == "packets")
            && words.get(i + 3).is_some_and(|w| w == "bytes")
        {
            words.drain(i + 1..(i + 5).min(words.len()));
        }
        i += 1;
    }
}

/// `meta nfproto ipv4` is implied by a later `ip` payload match (`ipv6` by `ip6`).
fn drop_inferred_nfproto(words: &mut Vec<String>) {
    let Some(at) = words
        .windows(3)
        .position(|w| w[0] == "meta" && w[1] == "nfproto" && (w[2] == "ipv4" || w[2] == "ipv6"))
    else {
        return;
    };
    let payload = if words[at + 2] == "ipv4" { "ip" } else { "ip6" };
    let implied = words[at + 3..]
        .windows(2)
        .any(|w| w[0] == payload && (w[1] == "saddr" || w[1] == "daddr"));
    if implied {
        words.drain(at..at + 3);
    }
}

/// `meta l4proto tcp … th dport` is `… tcp dport`.
fn drop_inferred_l4proto(words: &mut Vec<String>) {
    let Some(at) = words.windows(3).position(|w| {
        w[0] == "meta" && w[1] == "l4proto" && ["tcp", "udp", "sctp"].contains(&w[2].as_str())
    }) else {
        return;
    };
    let Some(th) = words[at + 3..]
        .windows(2)
        .position(|w| w[0] == "th" && (w[1] == "dport" || w[1] == "sport"))
    else {
        return;
    };
    words[at + 3 + th] = words[at + 2].clone();
    words.drain(at..at + 3);
}

/// `ct state & (established | related) == 0` → `ct state ! established,related`,
/// and flag lists in a fixed order.
fn canonical_flag_tests(words: &mut Vec<String>) {
    let mut i = 0;
    while i + 2 < words.len() {
        let flags_of = words[i] == "ct" && (words[i + 1] == "state" || words[i + 1] == "status");
        if !flags_of {
            i += 1;
            continue;
        }
        let start = i + 2;
        if words[start] == "&" {
            let Some(eq) = words[start..]
                .iter()
                .position(|w| w == "==")
                .map(|p| p + start)
            else {
                return;
            };
            if words.get(eq + 1).is_some_and(|w| w == "0") {
                let flags: Vec<String> = words[start + 1..eq]
                    .iter()
                    .map(|w| w.trim_matches(['(', ')']).to_owned())
                    .filter(|w| !w.is_empty() && w != "|")
                    .collect();
                let list = sorted_list(&flags.join(","));
                words.splice(start..eq + 2, ["!".to_owned(), list]);
            }
        } else {
            let list = if words[start] == "!" {
                start + 1
            } else {
                start
            };
            if let Some(w) = words.get_mut(list) {
                *w = sorted_list(w);
            }
        }
        i = start;
    }
}

/// Numbers combined with `&`, `|`, `^` or compared (marks) as hex: nft prints
/// `0x00004000` for `0x4000` and `0x00000000` for `0`.
fn canonical_operands(words: &mut [String]) {
    for i in 1..words.len() {
        if ["&", "|", "^", "==", "!="].contains(&words[i - 1].as_str()) {
            words[i] = canonical_number(&words[i]);
        }
    }
}

/// One word of a rule or element: an address, network or `[v6]:port` as nft
/// prints it (compressed, hosts without a length); anything else as it is.
fn canonical_nft_word(word: &str) -> String {
    if let Some((address, length)) = word.split_once('/')
        && let Ok(ip) = address.parse::<std::net::IpAddr>()
    {
        let host = if ip.is_ipv4() { "32" } else { "128" };
        return if length == host {
            ip.to_string()
        } else {
            format!("{ip}/{length}")
        };
    }
    if word.contains(':') || word.contains('.') {
        return canonical_socket_addr(word);
    }
    word.to_owned()
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

    /// Rule-set dumps as we write them, and what iptables-save printed after
    /// they were restored into a scratch network namespace (iptables 1.8.9,
    /// kernel 6.18; `basic.rules` is the renderer's golden output).
    const CAPTURED_IPTABLES: [(&str, &str, &str); 8] = [
        (
            "basic v4 nft",
            include_str!("testdata/basic.rules"),
            include_str!("testdata/basic.iptables-nft-v4.save"),
        ),
        (
            "basic v4 legacy",
            include_str!("testdata/basic.rules"),
            include_str!("testdata/basic.iptables-legacy-v4.save"),
        ),
        (
            "basic v6 nft",
            include_str!("testdata/basic.rules"),
            include_str!("testdata/basic.ip6tables-nft-v6.save"),
        ),
        (
            "basic v6 legacy",
            include_str!("testdata/basic.rules"),
            include_str!("testdata/basic.ip6tables-legacy-v6.save"),
        ),
        (
            "shapes v4 nft",
            include_str!("testdata/shapes-v4.rules"),
            include_str!("testdata/shapes.iptables-nft-v4.save"),
        ),
        (
            "shapes v4 legacy",
            include_str!("testdata/shapes-v4.rules"),
            include_str!("testdata/shapes.iptables-legacy-v4.save"),
        ),
        (
            "shapes v6 nft",
            include_str!("testdata/shapes-v6.rules"),
            include_str!("testdata/shapes.ip6tables-nft-v6.save"),
        ),
        (
            "shapes v6 legacy",
            include_str!("testdata/shapes-v6.rules"),
            include_str!("testdata/shapes.ip6tables-legacy-v6.save"),
        ),
    ];

    /// The part of a two-family golden file for the family of `name`.
    fn family_part<'a>(name: &str, written: &'a str) -> &'a str {
        match written.split_once("# ipv6\n") {
            Some((v4, v6)) => {
                if name.contains("v6") {
                    v6
                } else {
                    v4
                }
            }
            None => written,
        }
    }

    #[test]
    fn every_rule_we_write_canonicalises_like_iptables_save_prints_it() {
        for (name, written, saved) in CAPTURED_IPTABLES {
            let written = parse_save(family_part(name, written));
            let saved = parse_save(saved);
            let (mut compared, mut rewritten) = (0, 0);
            for (table, chains) in &written {
                for (chain, rules) in chains {
                    let found = &saved[table][chain];
                    assert_eq!(found.len(), rules.len(), "{name} {table} {chain}");
                    for (ours, theirs) in rules.iter().zip(found) {
                        rewritten += usize::from(ours.rule != theirs.rule);
                        assert_eq!(
                            canonical_iptables_rule(&ours.rule),
                            canonical_iptables_rule(&theirs.rule),
                            "{name} {table} {chain}:\n ours:   {}\n theirs: {}",
                            ours.rule,
                            theirs.rule
                        );
                        compared += 1;
                    }
                }
            }
            assert!(compared >= 3, "{name}: only {compared} rules compared");
            assert!(
                rewritten >= 2,
                "{name}: the sample must show iptables-save's rewrites"
            );
        }
    }

    #[test]
    fn a_changed_iptables_rule_canonicalises_differently() {
        let saved = "-d 10.96.0.10/32 -p tcp -m comment --comment \"default/web:http cluster IP\" -m tcp --dport 80 -m statistic --mode random --probability 0.33333333349 -j DNAT --to-destination 10.244.0.7:8080";
        let canonical = canonical_iptables_rule(saved);
        let written = "-m comment --comment \"default/web:http cluster IP\" -m tcp -p tcp -d 10.96.0.10 --dport 80 -m statistic --mode random --probability 0.3333333333 -j DNAT --to-destination 10.244.0.7:8080";
        assert_eq!(canonical_iptables_rule(written), canonical);
        for changed in [
            written.replace(":8080", ":8081"),
            written.replace("--dport 80", "--dport 81"),
            written.replace("-d 10.96.0.10", "! -d 10.96.0.10"),
            written.replace("-d 10.96.0.10", "-d 10.96.0.0/24"),
            written.replace("0.3333333333", "0.5"),
            written.replace("cluster IP", "cluster ip"),
            written.replace("-p tcp", "-p udp"),
            written.replace("-j DNAT", "-j SNAT"),
        ] {
            assert_ne!(canonical_iptables_rule(&changed), canonical, "{changed}");
        }
        assert_ne!(
            canonical_iptables_rule("-j MARK --or-mark 0x4000"),
            canonical_iptables_rule("-j MARK --xor-mark 0x4000")
        );
        assert_eq!(
            canonical_iptables_rule("-m comment --comment web -j REJECT"),
            canonical_iptables_rule(
                "-m comment --comment \"web\" -j REJECT --reject-with icmp-port-unreachable"
            )
        );
        assert_ne!(
            canonical_iptables_rule("-j REJECT"),
            canonical_iptables_rule("-j REJECT --reject-with tcp-reset")
        );
    }

    /// Statements as we write them (`nft -f`) and what `nft list table`
    /// printed after they were loaded into a scratch network namespace
    /// (nft 1.0.6, kernel 6.18): `basic.nft` is `planproxy-agent render
    /// --backend nftables` of the renderer's golden `basic.yaml`, `shapes.nft`
    /// adds, in the emitter's spelling, what that plan lacks (SCTP, the
    /// localnet guard, node ports on listed networks, refusals).
    const CAPTURED_NFT: [(&str, &str, &str); 2] = [
        (
            "basic",
            include_str!("testdata/basic.nft"),
            include_str!("testdata/basic.nft-list"),
        ),
        (
            "shapes",
            include_str!("testdata/shapes.nft"),
            include_str!("testdata/shapes.nft-list"),
        ),
    ];

    /// `(chain, rule)` of every `add rule` and `(set, element)` of every
    /// `add element` in an `nft -f` input.
    /// What an `nft -f` input writes: rules as `(chain, rule)` in order, and
    /// elements by set.
    struct WrittenNft {
        rules: Vec<(String, String)>,
        elements: BTreeMap<String, Vec<String>>,
    }

    fn written_nft(text: &str) -> WrittenNft {
        let prefix = format!("add rule inet {} ", planproxy_render::nft::TABLE);
        let mut rules = Vec::new();
        let mut elements: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix(&prefix) {
                let (chain, rule) = rest.split_once(' ').expect("a rule after the chain");
                rules.push((chain.to_owned(), rule.to_owned()));
            } else if let Some(rest) = line.strip_prefix("add element inet planproxy ") {
                let (set, body) = rest.split_once(" { ").expect("a set and its elements");
                let body = body.strip_suffix(" }").expect("a closing brace");
                elements
                    .entry(set.to_owned())
                    .or_default()
                    .extend(body.split(", ").map(str::to_owned));
            }
        }
        WrittenNft { rules, elements }
    }

    #[test]
    fn every_nft_rule_and_element_we_write_canonicalises_like_nft_lists_it() {
        for (name, written, listed) in CAPTURED_NFT {
            let WrittenNft { rules, elements } = written_nft(written);
            let listing = parse_listing(listed);
            let mut position: BTreeMap<&str, usize> = BTreeMap::new();
            let mut rewritten = 0;
            for (chain, rule) in &rules {
                let at = position.entry(chain).or_default();
                let listed = &listing.chains[chain][*at];
                *at += 1;
                rewritten += usize::from(listed != rule);
                assert_eq!(
                    canonical_nft_rule(rule),
                    canonical_nft_rule(listed),
                    "{name} {chain}:\n ours:   {rule}\n listed: {listed}"
                );
            }
            assert!(
                rewritten >= 5,
                "{name}: the sample must show nft's rewrites ({rewritten})"
            );
            for (set, ours) in &elements {
                let mut ours: Vec<String> = ours.iter().map(|e| canonical_nft_element(e)).collect();
                let mut listed: Vec<String> = listing.sets[set]
                    .iter()
                    .map(|e| canonical_nft_element(e))
                    .collect();
                ours.sort();
                listed.sort();
                assert_eq!(ours, listed, "{name} {set}");
            }
        }
    }

    #[test]
    fn a_changed_nft_rule_or_element_canonicalises_differently() {
        let listed = "ip daddr 10.96.0.11 sctp dport 3868 ip saddr != 10.244.0.0/16 jump mark-for-masquerade # handle 12";
        let written = "ip daddr 10.96.0.11 meta l4proto sctp th dport 3868 ip saddr != 10.244.0.0/16 jump mark-for-masquerade";
        assert_eq!(canonical_nft_rule(written), canonical_nft_rule(listed));
        for changed in [
            written.replace("3868", "3869"),
            written.replace("sctp", "tcp"),
            written.replace("!= ", ""),
            written.replace("/16", "/24"),
            written.replace("jump", "goto"),
        ] {
            assert_ne!(
                canonical_nft_rule(&changed),
                canonical_nft_rule(listed),
                "{changed}"
            );
        }
        assert_eq!(
            canonical_nft_rule("meta l4proto tcp dnat ip6 to [fd00:244:0::a]:8443"),
            canonical_nft_rule("meta l4proto tcp dnat ip6 to [fd00:244::a]:8443")
        );
        assert_ne!(
            canonical_nft_rule("meta l4proto tcp dnat ip to 10.244.1.5:8080"),
            canonical_nft_rule("meta l4proto tcp dnat ip to 10.244.1.5:8081")
        );
        assert_ne!(
            canonical_nft_rule("meta mark & 0x4000 == 0 return"),
            canonical_nft_rule("meta mark & 0x00004000 == 0x00004000 return")
        );
        let element = "10.96.0.10 . tcp . 80 counter packets 3 bytes 180 : goto lb4-tcp-none-2";
        assert_eq!(
            canonical_nft_element(element),
            "10.96.0.10 . tcp . 80 : goto lb4-tcp-none-2"
        );
        assert_eq!(
            canonical_nft_element("10.1.2.3 timeout 3h expires 2h59m58s"),
            "10.1.2.3"
        );
        assert_ne!(
            canonical_nft_element("10.96.0.10 . 80 . 0 : 10.244.1.5 . 8080"),
            canonical_nft_element("10.96.0.10 . 80 . 0 : 10.244.1.5 . 8081")
        );
    }
}
