//! Running `nft`, and the one parser for what it lists back (used by verify,
//! drift detection, cleanup and the tests).

use planproxy_render::nft::TABLE;

use super::Error;
use super::netfilter::{self, Netfilter};
use super::parse::{Listing, parse_listing};

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

/// Whether our table exists.
pub(crate) fn table_exists(nf: &dyn Netfilter) -> Result<bool, Error> {
    let tables = list(nf, &["list", "tables"])?.unwrap_or_default();
    Ok(tables
        .lines()
        .any(|l| l.trim() == format!("table inet {TABLE}")))
}

/// Deletes our table; false when there was none.
pub(crate) fn delete_table(nf: &dyn Netfilter) -> Result<bool, Error> {
    if !table_exists(nf)? {
        return Ok(false);
    }
    transaction(nf, &format!("delete table inet {TABLE}\n"))?;
    Ok(true)
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
}
