//! What planproxy programmed in a namespace, whichever backend wrote it.
//!
//! The agent writes its rules either as iptables chains (`PPX-…`, through
//! iptables-nft or iptables-legacy, one set per family) or as one nftables
//! table (`inet planproxy`). Tests that check "the node holds rules for this
//! service", "nothing changed across a restart" or "our rules were flushed"
//! must not care which: [`Netns::proxy_rules`] reads every place and returns
//! one normalised, deterministic dump ([`ProxyRules`]), and the tampering
//! helpers ([`Netns::flush_proxy_rules`], [`Netns::delete_proxy_rules`],
//! [`Netns::jump_into_proxy_chain`]) break them the way an outsider would, in
//! whichever place holds them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use crate::error::{NetnsError, Result};
use crate::ns::Netns;

/// The prefix of every iptables chain planproxy owns (the renderer's
/// `CHAIN_PREFIX`; this crate does not depend on the renderer).
pub const CHAIN_PREFIX: &str = "PPX-";
/// planproxy's nftables table, in family `inet`.
pub const NFT_TABLE: &str = "planproxy";

/// The iptables tools that may hold our chains: (variant, family, save, iptables).
const IPTABLES: [(&str, &str, &str, &str); 4] = [
    ("iptables-nft", "ipv4", "iptables-nft-save", "iptables-nft"),
    (
        "iptables-nft",
        "ipv6",
        "ip6tables-nft-save",
        "ip6tables-nft",
    ),
    (
        "iptables-legacy",
        "ipv4",
        "iptables-legacy-save",
        "iptables-legacy",
    ),
    (
        "iptables-legacy",
        "ipv6",
        "ip6tables-legacy-save",
        "ip6tables-legacy",
    ),
];

/// Section markers the dump script prints around each tool's output.
const BEGIN: &str = "@@@planproxy-dump ";
const END: &str = "@@@planproxy-status ";

/// Where one part of the dump comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Place {
    /// One table of one iptables variant and family.
    Iptables {
        /// `iptables-nft` or `iptables-legacy`.
        variant: &'static str,
        /// `ipv4` or `ipv6`.
        family: &'static str,
        /// `nat`, `filter`, …
        table: String,
    },
    /// Our nftables table.
    Nftables,
}

impl Place {
    /// The `iptables` command of this place (`None` for nftables).
    fn iptables_tool(&self) -> Option<&'static str> {
        match self {
            Place::Iptables {
                variant, family, ..
            } => IPTABLES
                .iter()
                .find(|(v, f, _, _)| v == variant && f == family)
                .map(|(_, _, _, tool)| *tool),
            Place::Nftables => None,
        }
    }
}

impl fmt::Display for Place {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Place::Iptables {
                variant,
                family,
                table,
            } => write!(f, "{variant} {family} {table}"),
            Place::Nftables => write!(f, "nftables inet {NFT_TABLE}"),
        }
    }
}

/// planproxy's rules in one namespace, from every place they can be, as
/// normalised lines:
///
/// * iptables: `:PPX-CHAIN` for each of our chains (no policy, no counters),
///   `-A …` for each rule in one of our chains, and each rule elsewhere that
///   jumps to one of our chains (the agent's jumps from the built-in chains,
///   or someone else's).
/// * nftables (`nft -s`, so no counters or expiry times): `chain NAME`,
///   `chain NAME: <hook declaration>`, `rule NAME: <rule>`,
///   `set NAME: <declaration line>` and `element NAME: <element>`, elements
///   one per line and sorted. The elements of dynamic sets (ClientIP
///   affinity) are left out: the kernel adds them as traffic flows, so they
///   would make two dumps of the same programming differ.
///
/// Places that hold nothing of ours are left out, so an empty value means
/// "no planproxy rules anywhere". Equal values mean the same programming.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyRules {
    sections: BTreeMap<Place, Vec<String>>,
}

/// A chain of ours, and where it lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyChain {
    pub place: Place,
    pub name: String,
}

/// Someone else's rule that jumps into one of our chains (see
/// [`Netns::jump_into_proxy_chain`]).
#[derive(Debug, Clone)]
pub struct ForeignJump {
    chain: ProxyChain,
    family_v6: bool,
}

impl ProxyRules {
    /// True when no place holds any planproxy chain, rule or set.
    pub fn is_empty(&self) -> bool {
        self.sections.is_empty()
    }

    /// The places that hold planproxy rules, with their lines.
    pub fn sections(&self) -> impl Iterator<Item = (&Place, &[String])> {
        self.sections.iter().map(|(p, l)| (p, l.as_slice()))
    }

    /// Every line, with its place.
    pub fn lines(&self) -> impl Iterator<Item = (&Place, &str)> {
        self.sections
            .iter()
            .flat_map(|(p, lines)| lines.iter().map(move |l| (p, l.as_str())))
    }

    /// The rule lines only (iptables `-A`, nftables `rule`): what a flush
    /// removes, where declarations stay.
    pub fn rules(&self) -> impl Iterator<Item = (&Place, &str)> {
        self.lines()
            .filter(|(_, l)| l.starts_with("-A ") || l.starts_with("rule "))
    }

    /// Whether any line contains `needle`.
    pub fn contains(&self, needle: &str) -> bool {
        self.lines().any(|(_, l)| l.contains(needle))
    }

    /// Whether any rule or element names the address `ip` (a cluster IP, an
    /// endpoint), with or without a prefix length or port. This is how a test
    /// asks "does the node program this service" without knowing the backend:
    /// iptables comments name the service, nftables carries no comments.
    pub fn mentions(&self, ip: IpAddr) -> bool {
        self.lines().any(|(_, line)| {
            line.split(|c: char| !(c.is_ascii_hexdigit() || c == '.' || c == ':'))
                .any(|token| token_is(token, ip))
        })
    }

    /// Rules that occur twice in the same chain of the same place (the
    /// symptom of an agent that appended instead of replacing).
    pub fn duplicate_rules(&self) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        self.rules()
            .filter(|(place, line)| !seen.insert((*place, *line)))
            .map(|(place, line)| format!("{place}: {line}"))
            .collect()
    }

    /// Our chains, in every place.
    pub fn chains(&self) -> Vec<ProxyChain> {
        self.lines()
            .filter_map(|(place, line)| {
                let name = match place {
                    Place::Iptables { .. } => line.strip_prefix(':')?,
                    Place::Nftables => line.strip_prefix("chain ").filter(|n| !n.contains(':'))?,
                };
                Some(ProxyChain {
                    place: place.clone(),
                    name: name.to_owned(),
                })
            })
            .collect()
    }

    /// The chain the service dispatch sends `ip`:`port`/`protocol` to (the
    /// cluster-IP rule's target in iptables, the verdict of the frontend's
    /// element in nftables). Services that nftables reaches through a shared
    /// chain (cluster IP only, no affinity) have no chain of their own.
    pub fn dispatch_chain(&self, ip: IpAddr, protocol: &str, port: u16) -> Option<ProxyChain> {
        let (suffix, nft_map) = match ip {
            IpAddr::V4(_) => ("/32", "services4"),
            IpAddr::V6(_) => ("/128", "services6"),
        };
        self.lines().find_map(|(place, line)| {
            let target = match place {
                Place::Iptables { table, .. } if table == "nat" => {
                    let words: Vec<&str> = line.split_whitespace().collect();
                    let has = |flag: &str, value: &str| {
                        words.windows(2).any(|w| w[0] == flag && w[1] == value)
                    };
                    if !(has("-d", &format!("{ip}{suffix}"))
                        && has("-p", protocol)
                        && has("--dport", &port.to_string()))
                    {
                        return None;
                    }
                    words
                        .windows(2)
                        .find(|w| w[0] == "-j" || w[0] == "-g")
                        .map(|w| w[1])
                        .filter(|t| t.starts_with(CHAIN_PREFIX))?
                }
                Place::Nftables => {
                    let element = line.strip_prefix(&format!("element {nft_map}: "))?;
                    let (key, verdict) = element.split_once(" : ")?;
                    if key != format!("{ip} . {protocol} . {port}") {
                        return None;
                    }
                    verdict
                        .strip_prefix("goto ")
                        .or_else(|| verdict.strip_prefix("jump "))?
                }
                Place::Iptables { .. } => return None,
            };
            Some(ProxyChain {
                place: place.clone(),
                name: target.to_owned(),
            })
        })
    }
}

fn token_is(token: &str, ip: IpAddr) -> bool {
    if token.parse::<IpAddr>().ok() == Some(ip) {
        return true;
    }
    // `10.244.1.2:8080` (iptables DNAT, nftables dnat to).
    ip.is_ipv4()
        && token
            .split_once(':')
            .is_some_and(|(addr, _)| addr.parse::<IpAddr>().ok() == Some(ip))
}

impl fmt::Display for ProxyRules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.sections.is_empty() {
            return writeln!(f, "(no planproxy rules)");
        }
        for (place, lines) in &self.sections {
            writeln!(f, "== {place} ==")?;
            for line in lines {
                writeln!(f, "{line}")?;
            }
        }
        Ok(())
    }
}

/// Normalises one iptables-save dump into `sections`.
fn add_iptables(
    sections: &mut BTreeMap<Place, Vec<String>>,
    variant: &'static str,
    family: &'static str,
    dump: &str,
) {
    let mut table = String::new();
    for line in dump.lines() {
        if let Some(name) = line.strip_prefix('*') {
            table = name.trim().to_owned();
            continue;
        }
        let place = || Place::Iptables {
            variant,
            family,
            table: table.clone(),
        };
        if let Some(chain) = line.strip_prefix(':') {
            let name = chain.split_whitespace().next().unwrap_or_default();
            if name.starts_with(CHAIN_PREFIX) {
                sections
                    .entry(place())
                    .or_default()
                    .push(format!(":{name}"));
            }
        } else if let Some(rule) = line.strip_prefix("-A ") {
            let chain = rule.split_whitespace().next().unwrap_or_default();
            let jumps_to_ours = rule
                .split_whitespace()
                .collect::<Vec<_>>()
                .windows(2)
                .any(|w| (w[0] == "-j" || w[0] == "-g") && w[1].starts_with(CHAIN_PREFIX));
            if chain.starts_with(CHAIN_PREFIX) || jumps_to_ours {
                sections.entry(place()).or_default().push(line.to_owned());
            }
        }
    }
}

/// Normalises `nft -s list table inet planproxy` (see [`ProxyRules`]).
fn nft_lines(listing: &str) -> Vec<String> {
    enum Block {
        None,
        Chain(String),
        Set {
            name: String,
            dynamic: bool,
            elements: Vec<String>,
        },
    }
    let mut out = Vec::new();
    let mut block = Block::None;
    let mut in_elements = false;
    for raw in listing.lines() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') || line.starts_with("table ") {
            continue;
        }
        if let Block::Set { elements, .. } = &mut block
            && (in_elements || line.starts_with("elements = {"))
        {
            let body = line.strip_prefix("elements = {").unwrap_or(line);
            let (body, done) = match body.strip_suffix('}') {
                Some(body) => (body, true),
                None => (body, false),
            };
            elements.extend(
                body.split(',')
                    .map(str::trim)
                    .filter(|e| !e.is_empty())
                    .map(str::to_owned),
            );
            in_elements = !done;
            continue;
        }
        if let Some(name) = line
            .strip_prefix("chain ")
            .and_then(|r| r.strip_suffix(" {"))
        {
            out.push(format!("chain {name}"));
            block = Block::Chain(name.to_owned());
        } else if let Some(name) = ["set ", "map "]
            .iter()
            .find_map(|k| line.strip_prefix(k))
            .and_then(|r| r.strip_suffix(" {"))
        {
            block = Block::Set {
                name: name.to_owned(),
                dynamic: false,
                elements: Vec::new(),
            };
            out.push(format!("set {name}"));
        } else if line == "}" {
            if let Block::Set {
                name,
                dynamic,
                mut elements,
            } = std::mem::replace(&mut block, Block::None)
                && !dynamic
            {
                // The kernel's listing order is stable for one set, but a
                // rebuilt set may list the same elements in another order.
                elements.sort();
                out.extend(
                    elements
                        .into_iter()
                        .map(|e| format!("element {name}: {}", without_counter(&e))),
                );
            }
        } else {
            match &mut block {
                Block::Chain(name) => {
                    let is_hook = line.starts_with("type ") && line.contains(" hook ");
                    out.push(if is_hook {
                        format!("chain {name}: {line}")
                    } else {
                        format!("rule {name}: {line}")
                    });
                }
                Block::Set { name, dynamic, .. } => {
                    if line.starts_with("flags ") && line.contains("dynamic") {
                        *dynamic = true;
                    }
                    out.push(format!("set {name}: {line}"));
                }
                Block::None => out.push(line.to_owned()),
            }
        }
    }
    in_name_order(out)
}

/// The dump's chain and set blocks (a `chain X` / `set X` line and the lines
/// about it) ordered by kind and name: the kernel lists them in the order they
/// were created, which an incremental sync and a rebuild of the same table do
/// not share.
fn in_name_order(lines: Vec<String>) -> Vec<String> {
    let mut blocks: Vec<Vec<String>> = Vec::new();
    for line in lines {
        let header =
            (line.starts_with("chain ") || line.starts_with("set ")) && !line.contains(':');
        match blocks.last_mut() {
            Some(block) if !header => block.push(line),
            _ => blocks.push(vec![line]),
        }
    }
    blocks.sort_by(|a, b| a[0].cmp(&b[0]));
    blocks.into_iter().flatten().collect()
}

/// The shell script that prints every place's dump between markers, with each
/// tool's exit status: one `ip netns exec` reads everything at one moment, and
/// can follow a tampering command without a gap a sync could slip into.
fn dump_script() -> String {
    let mut script = String::from(
        "dump() { printf '\\n%s%s\\n' \"$BEGIN\" \"$1\"; shift; \"$@\"; printf '\\n%s%s\\n' \"$END\" \"$?\"; }\n",
    );
    for (variant, family, save, _) in IPTABLES {
        script.push_str(&format!(
            "if command -v {save} >/dev/null 2>&1; then dump '{variant} {family}' {save}; fi\n"
        ));
    }
    script.push_str(&format!(
        "if command -v nft >/dev/null 2>&1; then\n\
         \x20 if tables=$(nft list tables); then\n\
         \x20   if printf '%s\\n' \"$tables\" | grep -qx 'table inet {NFT_TABLE}'; then dump nftables nft -s list table inet {NFT_TABLE}; fi\n\
         \x20 else dump nftables false; fi\n\
         fi\n"
    ));
    format!("BEGIN='{BEGIN}'; END='{END}'\n{script}")
}

/// Parses the output of [`dump_script`].
fn parse_dump(command: &str, stdout: &str, stderr: &str) -> Result<ProxyRules> {
    let mut sections = BTreeMap::new();
    let mut rest = stdout;
    while let Some((_, after)) = rest.split_once(BEGIN) {
        let (name, after) = after.split_once('\n').unwrap_or((after, ""));
        let (body, after) = after
            .split_once(END)
            .ok_or_else(|| NetnsError::CommandFailed {
                command: command.to_owned(),
                status: "truncated output".to_owned(),
                stderr: stderr.to_owned(),
            })?;
        let (status, after) = after.split_once('\n').unwrap_or((after, ""));
        rest = after;
        if status.trim() != "0" {
            return Err(NetnsError::CommandFailed {
                command: format!("{command} ({name})"),
                status: format!("exit status {}", status.trim()),
                stderr: stderr.trim().to_owned(),
            });
        }
        match IPTABLES
            .iter()
            .find(|(v, f, _, _)| format!("{v} {f}") == name)
        {
            Some((variant, family, _, _)) => add_iptables(&mut sections, variant, family, body),
            None if name == "nftables" => {
                let lines = nft_lines(body);
                if !lines.is_empty() {
                    sections.insert(Place::Nftables, lines);
                }
            }
            None => {}
        }
    }
    Ok(ProxyRules { sections })
}

/// How [`Netns::tamper_with_proxy_rules`] breaks our rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tamper {
    /// Empty every chain of every table that holds ours, as a firewall reload
    /// does (`iptables -t nat -F`, `nft flush table inet planproxy`): the
    /// chains stay, their rules go.
    Flush,
    /// Remove our chains and table altogether (`iptables -F` then `-X` of each
    /// `PPX-` chain, `nft delete table inet planproxy`).
    Delete,
}

impl Netns {
    /// planproxy's rules in this namespace, from every backend (see
    /// [`ProxyRules`]).
    pub fn proxy_rules(&self) -> Result<ProxyRules> {
        self.run_dump("", "reading planproxy's rules")
    }

    /// Whether any backend holds planproxy rules here.
    pub fn has_proxy_rules(&self) -> Result<bool> {
        Ok(!self.proxy_rules()?.is_empty())
    }

    /// Flushes the tables holding our rules behind the agent's back; returns
    /// what is left, read in the same command, so no sync can repair anything
    /// before the caller sees it.
    pub fn flush_proxy_rules(&self) -> Result<ProxyRules> {
        self.tamper_with_proxy_rules(Tamper::Flush)
    }

    /// Deletes our chains (and the jumps to them) and our table behind the
    /// agent's back; returns what is left, read in the same command.
    pub fn delete_proxy_rules(&self) -> Result<ProxyRules> {
        self.tamper_with_proxy_rules(Tamper::Delete)
    }

    /// Breaks our rules wherever they are (see [`Tamper`]).
    pub fn tamper_with_proxy_rules(&self, how: Tamper) -> Result<ProxyRules> {
        let before = self.proxy_rules()?;
        let mut script = String::from("set -e\n");
        let mut tables: BTreeMap<&'static str, Vec<(String, Vec<String>)>> = BTreeMap::new();
        for chain in before.chains() {
            if let (Some(tool), Place::Iptables { table, .. }) =
                (chain.place.iptables_tool(), &chain.place)
            {
                let entry = tables.entry(tool).or_default();
                match entry.iter_mut().find(|(t, _)| t == table) {
                    Some((_, chains)) => chains.push(chain.name.clone()),
                    None => entry.push((table.clone(), vec![chain.name.clone()])),
                }
            }
        }
        for (tool, tables) in &tables {
            for (table, chains) in tables {
                script.push_str(&format!("{tool} -w -t {table} -F\n"));
                if how == Tamper::Delete {
                    for chain in chains {
                        script.push_str(&format!("{tool} -w -t {table} -X {chain}\n"));
                    }
                }
            }
        }
        if before.sections.contains_key(&Place::Nftables) {
            script.push_str(match how {
                Tamper::Flush => "nft flush table inet planproxy\n",
                Tamper::Delete => "nft delete table inet planproxy\n",
            });
        }
        // The dump must run even though `set -e` stops at a failed tamper.
        script.push_str("set +e\n");
        self.run_dump(
            &script,
            &format!("tampering with planproxy's rules ({how:?})"),
        )
    }

    /// Adds someone else's rule that jumps into `chain` (traffic to a
    /// documentation address, so it never matches), which makes the kernel
    /// refuse to delete that chain (EBUSY). iptables: in the built-in `OUTPUT`
    /// chain of the chain's table; nftables: in our table's `nat-output` chain,
    /// since nftables jumps never cross tables.
    pub fn jump_into_proxy_chain(&self, chain: &ProxyChain) -> Result<ForeignJump> {
        let jump = ForeignJump {
            chain: chain.clone(),
            family_v6: matches!(&chain.place, Place::Iptables { family, .. } if *family == "ipv6"),
        };
        self.exec_ok(&jump.add_args()).map(|_| jump)
    }

    fn run_dump(&self, prefix: &str, what: &str) -> Result<ProxyRules> {
        let script = format!("{prefix}{}", dump_script());
        let output = self.exec(&["sh", "-c", &script])?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(NetnsError::CommandFailed {
                command: what.to_owned(),
                status: output.status.to_string(),
                stderr: stderr.trim().to_owned(),
            });
        }
        parse_dump(what, &stdout, &stderr)
    }
}

impl ForeignJump {
    fn add_args(&self) -> Vec<String> {
        let name = self.chain.name.clone();
        match (&self.chain.place, self.chain.place.iptables_tool()) {
            (Place::Iptables { table, .. }, Some(tool)) => [
                tool,
                "-w",
                "-t",
                table,
                "-A",
                "OUTPUT",
                "-d",
                self.destination(),
                "-j",
                &name,
            ]
            .map(str::to_owned)
            .to_vec(),
            _ => [
                "nft",
                "add",
                "rule",
                "inet",
                NFT_TABLE,
                "nat-output",
                "ip",
                "daddr",
                "198.51.100.1",
                "jump",
                &name,
            ]
            .map(str::to_owned)
            .to_vec(),
        }
    }

    fn destination(&self) -> &'static str {
        if self.family_v6 {
            "2001:db8::1/128"
        } else {
            "198.51.100.1/32"
        }
    }

    /// The chain it jumps into.
    pub fn chain(&self) -> &ProxyChain {
        &self.chain
    }

    /// Removes the rule. Ok when it is already gone: the agent's full
    /// rebuild of its nftables table takes a foreign rule inside it along.
    pub fn remove(&self, ns: &Netns) -> Result<()> {
        match (&self.chain.place, self.chain.place.iptables_tool()) {
            (Place::Iptables { table, .. }, Some(tool)) => ns
                .exec_ok(&[
                    tool,
                    "-w",
                    "-t",
                    table,
                    "-D",
                    "OUTPUT",
                    "-d",
                    self.destination(),
                    "-j",
                    &self.chain.name,
                ])
                .map(drop),
            _ => {
                let listing = match ns.exec_ok(&[
                    "nft",
                    "-a",
                    "list",
                    "chain",
                    "inet",
                    NFT_TABLE,
                    "nat-output",
                ]) {
                    Ok(listing) => listing,
                    // No table, no chain: nothing left to remove.
                    Err(NetnsError::CommandFailed { stderr, .. })
                        if stderr.contains("No such file or directory") =>
                    {
                        return Ok(());
                    }
                    Err(e) => return Err(e),
                };
                let wanted = format!("jump {}", self.chain.name);
                let handle = listing
                    .lines()
                    .filter(|l| l.contains("198.51.100.1") && l.contains(&wanted))
                    .find_map(|l| l.rsplit_once("# handle ").map(|(_, h)| h.trim().to_owned()));
                match handle {
                    Some(handle) => ns
                        .exec_ok(&[
                            "nft",
                            "delete",
                            "rule",
                            "inet",
                            NFT_TABLE,
                            "nat-output",
                            "handle",
                            &handle,
                        ])
                        .map(drop),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Every netfilter dump of the namespace for a failure report: each iptables
/// variant's and family's full `-save` output (not only our chains: someone
/// else's rules explain failures too) where it holds anything, and our
/// nftables table when it exists.
pub(crate) fn netfilter_report(ns: &Netns) -> String {
    let mut out = String::new();
    for (variant, family, save, _) in IPTABLES {
        match ns.exec_ok(&[save]) {
            Ok(text) if text.lines().any(|l| l.starts_with('*')) => {
                out.push_str(&format!("# {variant} {family} ({save})\n{text}"));
            }
            Ok(_) => {}
            Err(e) => out.push_str(&format!("# {save} failed: {e}\n")),
        }
    }
    match ns.exec(&["nft", "list", "table", "inet", NFT_TABLE]) {
        Ok(output) if output.status.success() => {
            out.push_str(&format!(
                "# nftables (nft list table inet {NFT_TABLE})\n{}",
                String::from_utf8_lossy(&output.stdout)
            ));
        }
        Ok(_) => out.push_str(&format!("# no nftables table inet {NFT_TABLE}\n")),
        Err(e) => out.push_str(&format!("# nft failed: {e}\n")),
    }
    out
}

impl Netns {
    /// Every netfilter dump of this namespace (both iptables variants and
    /// families where they hold anything, and our nftables table), for
    /// failure reports.
    pub fn netfilter_report(&self) -> String {
        netfilter_report(self)
    }
}

/// An element of a counted set as the kernel lists it (`key counter : value`,
/// or with `packets N bytes M` when listed with state), without the counter:
/// what a test compares is the mapping, not the traffic it has seen.
fn without_counter(element: &str) -> String {
    let Some(at) = element.find(" counter") else {
        return element.to_owned();
    };
    let rest = &element[at + " counter".len()..];
    let value = rest.find(" : ").map_or("", |i| &rest[i..]);
    format!("{}{value}", &element[..at])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iptables_dumps_keep_our_chains_rules_and_jumps_only() {
        let mut sections = BTreeMap::new();
        add_iptables(
            &mut sections,
            "iptables-nft",
            "ipv4",
            "# Generated\n*nat\n:PREROUTING ACCEPT [3:180]\n:PPX-SERVICES - [0:0]\n:OTHER - [0:0]\n-A PREROUTING -m comment --comment \"planproxy service portals\" -j PPX-SERVICES\n-A PREROUTING -j OTHER\n-A PPX-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j PPX-SVC-X\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n-A INPUT -j DROP\nCOMMIT\n",
        );
        let rules = ProxyRules { sections };
        assert_eq!(
            rules.to_string(),
            "== iptables-nft ipv4 nat ==\n:PPX-SERVICES\n-A PREROUTING -m comment --comment \"planproxy service portals\" -j PPX-SERVICES\n-A PPX-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j PPX-SVC-X\n"
        );
        assert!(rules.mentions("10.96.0.10".parse().expect("ip")));
        assert!(!rules.mentions("10.96.0.1".parse().expect("ip")));
        assert_eq!(
            rules
                .dispatch_chain("10.96.0.10".parse().expect("ip"), "tcp", 80)
                .map(|c| c.name),
            Some("PPX-SVC-X".to_owned())
        );
        assert_eq!(rules.rules().count(), 2);
        assert!(rules.duplicate_rules().is_empty());
    }

    #[test]
    fn chains_are_in_name_order_whatever_order_the_kernel_created_them_in() {
        let lines = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let rebuilt = in_name_order(lines(&["chain a", "rule a: x", "chain b", "rule b: y"]));
        let grown = in_name_order(lines(&["chain b", "rule b: y", "chain a", "rule a: x"]));
        assert_eq!(rebuilt, grown);
        assert_eq!(rebuilt[0], "chain a");
    }

    #[test]
    fn element_counters_are_left_out_of_the_dump() {
        assert_eq!(
            without_counter("10.96.0.10 . tcp . 80 counter packets 4 bytes 240 : goto lb"),
            "10.96.0.10 . tcp . 80 : goto lb"
        );
        assert_eq!(
            without_counter("tcp . 30080 counter : goto ext"),
            "tcp . 30080 : goto ext"
        );
        assert_eq!(
            without_counter("10.0.0.1 . 10.0.0.1"),
            "10.0.0.1 . 10.0.0.1"
        );
    }

    #[test]
    fn nft_listings_sort_elements_and_leave_out_dynamic_ones() {
        let listing = "table inet planproxy {\n\tset aff {\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\telements = { 1.2.3.4 }\n\t}\n\n\tmap services4 {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\telements = { 10.96.0.11 . tcp . 80 : goto lb,\n\t\t\t     10.96.0.10 . tcp . 80 : goto svc4-X }\n\t}\n\n\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n\n\tchain svc4-X {\n\t\tmeta l4proto tcp dnat ip to 10.244.1.2:8080\n\t}\n}\n";
        let lines = nft_lines(listing);
        assert_eq!(
            lines,
            [
                "chain nat-prerouting",
                "chain nat-prerouting: type nat hook prerouting priority dstnat; policy accept;",
                "rule nat-prerouting: jump services",
                "chain svc4-X",
                "rule svc4-X: meta l4proto tcp dnat ip to 10.244.1.2:8080",
                "set aff",
                "set aff: type ipv4_addr",
                "set aff: flags dynamic,timeout",
                "set services4",
                "set services4: type ipv4_addr . inet_proto . inet_service : verdict",
                "element services4: 10.96.0.10 . tcp . 80 : goto svc4-X",
                "element services4: 10.96.0.11 . tcp . 80 : goto lb",
            ]
        );
        let rules = ProxyRules {
            sections: [(Place::Nftables, lines)].into_iter().collect(),
        };
        assert!(rules.mentions("10.244.1.2".parse().expect("ip")));
        assert_eq!(
            rules
                .dispatch_chain("10.96.0.10".parse().expect("ip"), "tcp", 80)
                .map(|c| c.name),
            Some("svc4-X".to_owned())
        );
        assert_eq!(
            rules
                .chains()
                .into_iter()
                .map(|c| c.name)
                .collect::<Vec<_>>(),
            ["nat-prerouting", "svc4-X"]
        );
    }

    #[test]
    fn dumps_are_split_by_their_markers_and_failures_are_errors() {
        let stdout = format!(
            "\n{BEGIN}iptables-nft ipv4\n*nat\n:PPX-SERVICES - [0:0]\nCOMMIT\n\n{END}0\n\n{BEGIN}iptables-legacy ipv4\n\n{END}0\n"
        );
        let rules = parse_dump("dump", &stdout, "").expect("a good dump");
        assert_eq!(rules.sections().count(), 1);
        let failed = format!("\n{BEGIN}nftables\n\n{END}1\n");
        assert!(parse_dump("dump", &failed, "nft: boom").is_err());
        assert!(
            parse_dump("dump", "", "")
                .expect("nothing at all")
                .is_empty()
        );
    }
}
