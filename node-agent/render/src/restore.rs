//! iptables-restore input for a [`TableRules`], in full or incremental form, and a
//! model of how `iptables-restore --noflush` applies it (used by the tests and by
//! anyone who wants to check an input before the kernel sees it).

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::Table;
use crate::hash::CHAIN_PREFIX;
use crate::ruleset::{TableRules, chains};

/// One `iptables-restore --noflush` input for one table.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreInput {
    /// The text, `*<table>` to `COMMIT`.
    pub text: String,
    /// Chains declared (flushed) and refilled.
    pub chains_written: usize,
    /// Rule lines written.
    pub rules_written: usize,
    /// Chains deleted with `-X`.
    pub chains_deleted: usize,
}

impl RestoreInput {
    /// True when the input changes nothing.
    pub fn is_noop(&self) -> bool {
        self.chains_written == 0 && self.chains_deleted == 0
    }
}

/// Declares and fills every chain of `rules`, and deletes `stale` (planproxy chains
/// found in the kernel that `rules` no longer has; anything else in it is ignored).
pub fn restore_full(table: Table, rules: &TableRules, stale: &[String]) -> RestoreInput {
    let written: Vec<&String> = rules.chains.keys().collect();
    let deleted: Vec<&String> = stale
        .iter()
        .filter(|name| {
            name.starts_with(CHAIN_PREFIX)
                && name.as_str() != chains::CANARY
                && !chains::fixed(table).contains(&name.as_str())
                && !rules.chains.contains_key(name.as_str())
        })
        .collect();
    write(table, rules, &written, &deleted)
}

/// Declares and fills only the chains whose rules differ from `previous`, and
/// deletes the chains `previous` had and `next` has not. Applied on top of a kernel
/// holding `previous`, it leaves exactly `next`.
pub fn restore_incremental(table: Table, previous: &TableRules, next: &TableRules) -> RestoreInput {
    let written: Vec<&String> = next
        .chains
        .iter()
        .filter(|(name, chain)| {
            previous
                .chains
                .get(*name)
                .is_none_or(|p| p.rules != chain.rules)
        })
        .map(|(name, _)| name)
        .collect();
    let deleted: Vec<&String> = previous
        .chains
        .keys()
        .filter(|name| !next.chains.contains_key(name.as_str()))
        .collect();
    write(table, next, &written, &deleted)
}

fn write(
    table: Table,
    rules: &TableRules,
    written: &[&String],
    deleted: &[&String],
) -> RestoreInput {
    let mut text = String::with_capacity(64 + written.len() * 256);
    let mut rules_written = 0;
    let _ = writeln!(text, "*{}", table.as_str());
    // Declaring a chain creates it or flushes it; every chain must exist before a
    // rule may jump to it, so all declarations come first.
    for name in written.iter().chain(deleted) {
        let _ = writeln!(text, ":{name} - [0:0]");
    }
    for name in written {
        if let Some(chain) = rules.chains.get(name.as_str()) {
            for rule in &chain.rules {
                let _ = writeln!(text, "-A {name} {rule}");
                rules_written += 1;
            }
        }
    }
    for name in deleted {
        let _ = writeln!(text, "-X {name}");
    }
    text.push_str("COMMIT\n");
    RestoreInput {
        text,
        chains_written: written.len(),
        rules_written,
        chains_deleted: deleted.len(),
    }
}

/// The chains of a table as a kernel would hold them: name → rules.
pub type ChainContents = BTreeMap<String, Vec<String>>;

/// The chain contents `rules` describes.
pub fn contents(rules: &TableRules) -> ChainContents {
    rules
        .chains
        .iter()
        .map(|(n, c)| (n.clone(), c.rules.clone()))
        .collect()
}

/// Applies `text` to `state` as `iptables-restore --noflush` would, all or nothing:
/// on error `state` is unchanged and the error names the 1-based line. Besides the
/// syntax it checks what the kernel checks: rules go to declared or existing
/// chains, a deleted chain exists and nothing jumps to it, and every jump to a
/// planproxy chain has a target.
pub fn apply(state: &mut ChainContents, text: &str) -> Result<(), (usize, String)> {
    let mut next = state.clone();
    let mut deleted = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if line.is_empty() || line.starts_with('#') || line.starts_with('*') || line == "COMMIT" {
            continue;
        }
        if let Some(decl) = line.strip_prefix(':') {
            let name = decl.split(' ').next().unwrap_or_default();
            next.insert(name.to_owned(), Vec::new());
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (name, rule) = rest.split_once(' ').unwrap_or((rest, ""));
            next.get_mut(name)
                .ok_or_else(|| (n, format!("-A to missing chain {name}")))?
                .push(rule.to_owned());
        } else if let Some(name) = line.strip_prefix("-X ") {
            if next.remove(name).is_none() {
                return Err((n, format!("-X of missing chain {name}")));
            }
            deleted.push((n, name.to_owned()));
        } else {
            return Err((n, format!("unexpected line {line:?}")));
        }
    }
    for (name, rules) in &next {
        for rule in rules {
            if let Some(target) = rule.split(" -j ").nth(1).and_then(|t| t.split(' ').next())
                && target.starts_with(CHAIN_PREFIX)
                && !next.contains_key(target)
            {
                let line = deleted
                    .iter()
                    .find(|(_, d)| d == target)
                    .map_or(0, |(l, _)| *l);
                return Err((line, format!("{name} jumps to missing chain {target}")));
            }
        }
    }
    *state = next;
    Ok(())
}

/// The full restore input of every family and table of `rule_set`, each family
/// headed by a `# ipv4` / `# ipv6` comment line: what `planproxy-agent render`
/// prints and what the golden files hold.
pub fn full_text(rule_set: &crate::RuleSet) -> String {
    let mut out = String::new();
    for (family, rules) in &rule_set.families {
        let _ = writeln!(out, "# {family}");
        for table in Table::ALL {
            out.push_str(&restore_full(table, rules.table(table), &[]).text);
        }
    }
    out
}
