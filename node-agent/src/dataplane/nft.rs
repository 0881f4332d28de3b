//! Running `nft`, and the one parser for what it lists back (used by verify,
//! drift detection, cleanup and the tests).

use std::collections::BTreeMap;

use planproxy_render::nft::TABLE;

use super::Error;
use super::netfilter::{self, Netfilter};

/// Feeds `text` to `nft -f -` as one transaction: the kernel applies all of it
/// or none of it. On failure the error names the statement nft refused.
pub(crate) fn transaction(nf: &dyn Netfilter, text: &str) -> Result<(), Error> {
    super::exec::feed(nf, "nft", &["-f", "-"], text, failed_line)?.map_err(|refused| {
        Error::Transaction {
            line: refused.line,
            statement: refused.statement,
            stderr: refused.stderr,
        }
    })
}

/// The input line nft complains about: `/dev/stdin:12:1-30: Error: …`.
pub(crate) fn failed_line(stderr: &str) -> Option<usize> {
    stderr.lines().find_map(|l| {
        let (location, _) = l.split_once(": Error")?;
        let mut parts = location.rsplit(':');
        let _columns = parts.next()?;
        parts.next()?.parse().ok()
    })
}

/// `nft <args>`, its standard output when it succeeds, `None` when the object
/// does not exist.
fn list(nf: &dyn Netfilter, args: &[&str]) -> Result<Option<String>, Error> {
    let ran = netfilter::run(nf, "nft", args, None)?;
    if ran.success {
        return Ok(Some(ran.stdout));
    }
    if ran.stderr.contains("No such file or directory") {
        return Ok(None);
    }
    Err(Error::Command {
        command: format!("nft {}", args.join(" ")),
        stderr: ran.stderr,
    })
}

/// Our table as the kernel holds it; `None` when it does not exist.
pub(crate) fn list_table(nf: &dyn Netfilter) -> Result<Option<Listing>, Error> {
    Ok(table_text(nf)?.map(|t| parse_listing(&t)))
}

/// `nft list table inet planproxy` as printed; `None` when there is none.
pub(crate) fn table_text(nf: &dyn Netfilter) -> Result<Option<String>, Error> {
    list(nf, &["list", "table", "inet", TABLE])
}

/// One chain of our table; `None` when it (or the table) does not exist.
pub(crate) fn list_chain(nf: &dyn Netfilter, chain: &str) -> Result<Option<Listing>, Error> {
    Ok(list(nf, &["list", "chain", "inet", TABLE, chain])?.map(|t| parse_listing(&t)))
}

/// Deletes our table; false when there was none.
pub(crate) fn delete_table(nf: &dyn Netfilter) -> Result<bool, Error> {
    let tables = list(nf, &["list", "tables"])?.unwrap_or_default();
    if !tables
        .lines()
        .any(|l| l.trim() == format!("table inet {TABLE}"))
    {
        return Ok(false);
    }
    transaction(nf, &format!("delete table inet {TABLE}\n"))?;
    Ok(true)
}

/// What `nft list` printed: each chain's rules (hook lines left out) and each
/// set's element count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Listing {
    pub chains: BTreeMap<String, Vec<String>>,
    pub sets: BTreeMap<String, usize>,
}

/// Parses `nft list table|chain` output.
pub(crate) fn parse_listing(text: &str) -> Listing {
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
            listing.sets.insert(name.to_owned(), 0);
            set = Some(name.to_owned());
        } else if line == "}" {
            chain = None;
            set = None;
        } else if let Some(name) = &set {
            if let Some(count) = listing.sets.get_mut(name) {
                *count += element_count(line);
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
fn element_count(line: &str) -> usize {
    let body = match line.split_once("elements = {") {
        Some((_, rest)) => rest,
        None if line.starts_with("type ")
            || line.starts_with("flags ")
            || line.starts_with("timeout ")
            || line.starts_with("size ")
            || line.starts_with("typeof ") =>
        {
            return 0;
        }
        None => line,
    };
    body.trim_end_matches('}')
        .split(',')
        .filter(|e| !e.trim().is_empty())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_line_is_read_from_nft_errors() {
        let stderr = "/dev/stdin:3:1-45: Error: Could not process rule: No such file or directory\nadd rule inet planproxy nope return\n^^^^^";
        assert_eq!(failed_line(stderr), Some(3));
        assert_eq!(failed_line("Error: syntax error"), None);
    }

    #[test]
    fn listings_give_rules_per_chain_and_elements_per_set() {
        let text = "table inet planproxy {\n\tmap services4 {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\telements = { 10.96.0.1 . tcp . 80 : goto a,\n\t\t\t     10.96.0.2 . tcp . 80 : goto b }\n\t}\n\tset empty {\n\t\ttype inet_service\n\t}\n\tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n\tchain a {\n\t}\n}\n";
        let l = parse_listing(text);
        assert_eq!(l.sets["services4"], 2);
        assert_eq!(l.sets["empty"], 0);
        assert_eq!(l.chains["nat-prerouting"], ["jump services"]);
        assert!(l.chains["a"].is_empty());
    }
}
