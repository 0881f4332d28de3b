//! Running iptables-restore and iptables-save.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use planproxy_render::{Family, RestoreInput, Table};

use super::backend::Programs;
use super::netfilter::{self, Netfilter};
use super::{Backend, Error};

/// Where the legacy backend's xtables lock lives (iptables' own default and override).
fn xtables_lock_path() -> String {
    std::env::var("XTABLES_LOCKFILE").unwrap_or_else(|_| "/run/xtables.lock".to_owned())
}

/// How long a restore waits for the legacy xtables lock, as kube-proxy does. The
/// lock is one file for the whole host (all network namespaces), so a stuck
/// holder must cost a failed, retried and reported sync rather than hang the
/// sync loop (and its status reports) forever.
pub(crate) const XTABLES_LOCK_WAIT: Duration = Duration::from_secs(5);

/// How often the lock is probed while someone else holds it.
const XTABLES_LOCK_POLL: Duration = Duration::from_millis(50);

/// Waits (at most [`XTABLES_LOCK_WAIT`]) until the xtables lock is free and
/// returns how long that took. The lock is released again at once:
/// iptables-restore takes it itself (with `--wait`), so this measures how long
/// other holders kept the node waiting. nf_tables has no such lock (the kernel
/// serialises transactions).
pub(crate) fn wait_for_xtables_lock(backend: Backend) -> Duration {
    if backend != Backend::IptablesLegacy {
        return Duration::ZERO;
    }
    wait_for_lock_file(
        std::path::Path::new(&xtables_lock_path()),
        XTABLES_LOCK_WAIT,
    )
}

/// Waits at most `limit` until nobody holds `path`'s flock; returns how long it took.
fn wait_for_lock_file(path: &std::path::Path, limit: Duration) -> Duration {
    let start = Instant::now();
    let Ok(file) = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path)
    else {
        return Duration::ZERO;
    };
    loop {
        match file.try_lock() {
            Ok(()) => {
                let _ = file.unlock();
                break;
            }
            Err(std::fs::TryLockError::WouldBlock) if start.elapsed() < limit => {
                std::thread::sleep(XTABLES_LOCK_POLL);
            }
            // Still held (iptables-restore will time out and say so), or not lockable at all.
            Err(_) => break,
        }
    }
    start.elapsed()
}

/// Feeds the tables' inputs to one `iptables-restore --wait=5 --noflush`. Each
/// table's part is applied whole or not at all; on failure the error names
/// the table and line iptables-restore complained about and the line's text.
/// Both variants commit table by table: the parts before a refused one stay
/// applied (the kernel suite pins this), so the caller's next sync is full.
pub(crate) fn restore(
    nf: &dyn Netfilter,
    programs: &Programs,
    family: Family,
    inputs: &[(Table, RestoreInput)],
) -> Result<(), Error> {
    let text: String = inputs
        .iter()
        .map(|(_, input)| input.text.as_str())
        .collect();
    let wait = format!("--wait={}", XTABLES_LOCK_WAIT.as_secs());
    let args = [wait.as_str(), "--noflush"];
    feed(nf, programs.restore, &args, &text, failed_line)?.map_err(|refused| Error::Restore {
        family,
        table: table_of_line(inputs, refused.line),
        line: refused.line,
        rule: refused.statement,
        stderr: refused.stderr,
    })
}

/// The table whose part holds input line `line` (the last one when unknown:
/// the first parts were accepted before it).
fn table_of_line(inputs: &[(Table, RestoreInput)], line: Option<usize>) -> Table {
    let mut end = 0;
    for (table, input) in inputs {
        end += input.text.lines().count();
        if line.is_some_and(|l| l <= end) {
            return *table;
        }
    }
    inputs.last().map_or(Table::Nat, |(table, _)| *table)
}

/// Why a program refused its input: what it printed, and the input line it
/// named, with that line's text.
pub(crate) struct Refused {
    pub(crate) stderr: String,
    pub(crate) line: Option<usize>,
    pub(crate) statement: Option<String>,
}

/// Runs `program args…` with `input` on its standard input (iptables-restore
/// and `nft -f -` alike); `Ok(Err(_))` when it refused the input, with the line
/// `failed_line` finds in its complaint.
pub(crate) fn feed(
    nf: &dyn Netfilter,
    program: &str,
    args: &[&str],
    input: &str,
    failed_line: fn(&str) -> Option<usize>,
) -> Result<Result<(), Refused>, Error> {
    let ran = netfilter::run(nf, program, args, Some(input))?;
    if ran.success {
        return Ok(Ok(()));
    }
    let line = failed_line(&ran.stderr);
    let statement = line
        .and_then(|l| input.lines().nth(l.checked_sub(1)?))
        .map(str::to_owned);
    Ok(Err(Refused {
        stderr: ran.stderr,
        line,
        statement,
    }))
}

/// The line number in iptables-restore's complaint: `line 5 failed` (legacy),
/// `line 5: CHAIN_DEL failed` (nf_tables commit) or `Error occurred at line: 5`.
pub(crate) fn failed_line(stderr: &str) -> Option<usize> {
    let mut rest = stderr;
    while let Some(at) = rest.find("line") {
        let after = rest[at + 4..].trim_start_matches([':', ' ']);
        let digits: String = after.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse() {
            return Some(n);
        }
        rest = &rest[at + 4..];
    }
    None
}

/// `iptables-save -t <table>`.
pub(crate) fn save(nf: &dyn Netfilter, programs: &Programs, table: Table) -> Result<String, Error> {
    netfilter::output(nf, programs.save, &["-t", table.as_str()])
}

/// The chains of an iptables-save dump with their rule counts.
pub(crate) fn chain_rule_counts(dump: &str) -> BTreeMap<String, usize> {
    super::parse::chains_of(dump)
        .into_iter()
        .map(|(chain, rules)| (chain, rules.len()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_line_is_read_from_every_iptables_restore_dialect() {
        assert_eq!(failed_line("iptables-restore: line 5 failed"), Some(5));
        assert_eq!(
            failed_line(
                "iptables-nft-restore v1.8.9 (nf_tables): \nline 12: CHAIN_DEL failed (Device or resource busy): chain PPX-A"
            ),
            Some(12)
        );
        assert_eq!(
            failed_line(
                "iptables-restore v1.8.9 (legacy): Couldn't load match `foo'\n\nError occurred at line: 4\nTry `iptables-restore -h'"
            ),
            Some(4)
        );
        assert_eq!(
            failed_line("iptables-restore: unable to initialize table 'nat'"),
            None
        );
    }

    #[test]
    fn a_refused_line_is_blamed_on_the_table_whose_part_holds_it() {
        let part = |text: &str| RestoreInput {
            text: text.to_owned(),
            ..Default::default()
        };
        let inputs = [
            (Table::Filter, part("*filter\n-A X -j Y\nCOMMIT\n")),
            (Table::Nat, part("*nat\n-X PPX-A\nCOMMIT\n")),
        ];
        assert_eq!(table_of_line(&inputs, Some(2)), Table::Filter);
        assert_eq!(table_of_line(&inputs, Some(5)), Table::Nat);
        assert_eq!(table_of_line(&inputs, None), Table::Nat);
    }

    #[test]
    fn a_held_xtables_lock_is_waited_for_only_up_to_the_limit() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("xtables.lock");
        let holder = std::fs::File::create(&path).expect("lock file");
        holder.lock().expect("the test must hold the lock");
        let waited = wait_for_lock_file(&path, Duration::from_millis(300));
        assert!(
            waited >= Duration::from_millis(300),
            "gave up after {waited:?}, before the limit"
        );
        assert!(
            waited < Duration::from_secs(30),
            "a held lock must not block forever (waited {waited:?})"
        );

        holder.unlock().expect("unlock");
        let waited = wait_for_lock_file(&path, Duration::from_secs(30));
        assert!(
            waited < Duration::from_secs(5),
            "a free lock is taken at once (waited {waited:?})"
        );
    }

    #[test]
    fn chain_rule_counts_reads_declarations_and_rules() {
        let dump = "*nat\n:PREROUTING ACCEPT [0:0]\n:PPX-A - [0:0]\n:PPX-B - [0:0]\n-A PREROUTING -j PPX-A\n-A PPX-A -j RETURN\n-A PPX-A -j RETURN\nCOMMIT\n";
        let counts = chain_rule_counts(dump);
        assert_eq!(counts.get("PPX-A"), Some(&2));
        assert_eq!(counts.get("PPX-B"), Some(&0));
        assert_eq!(counts.get("PREROUTING"), Some(&1));
    }
}
