//! planproxy side by side with kube-proxy: the same services, endpoint
//! changes and traffic against kube-proxy (iptables, nftables) and the
//! planproxy agent (nftables, iptables-nft, iptables-legacy), one table.
//! The logic lives in `planproxy_e2e::compare`.
//!
//! ```sh
//! cargo build --release --workspace --bins
//! cargo run --release -p planproxy-e2e --example compare -- --services 100,1000,10000 --changes 100
//! ```
//!
//! Flags: `--services` (comma-separated sizes), `--changes`, `--connects`,
//! `--min-sync-period` (default 1s, for both proxies), `--gap` (ms between
//! changes), `--row-timeout` and `--cold-start-timeout` (seconds; what does
//! not fit is printed as `timeout`). Needs root, the release binaries and
//! the Kubernetes binaries (`PLANPROXY_K8S_BIN`, kube-proxy included).

use std::process::ExitCode;
use std::time::Duration;

use planproxy_e2e::compare::{self, Options, table};

fn parse<T: std::str::FromStr>(flag: &str, value: &str) -> Result<T, String> {
    value
        .trim()
        .parse()
        .map_err(|_| format!("{flag}: bad value {value:?}"))
}

fn options() -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--services" => {
                options.services = value
                    .split(',')
                    .map(|v| parse(&flag, v))
                    .collect::<Result<_, _>>()?
            }
            "--changes" => options.changes = parse(&flag, &value)?,
            "--connects" => options.connects = parse(&flag, &value)?,
            "--min-sync-period" => options.min_sync_period = value,
            "--gap" => options.gap = Duration::from_millis(parse(&flag, &value)?),
            "--row-timeout" => options.row_timeout = Duration::from_secs(parse(&flag, &value)?),
            "--cold-start-timeout" => {
                options.cold_start_timeout = Duration::from_secs(parse(&flag, &value)?)
            }
            other => return Err(format!("unknown flag {other}")),
        }
    }
    Ok(options)
}

fn main() -> ExitCode {
    let options = match options() {
        Ok(options) => options,
        Err(error) => {
            eprintln!("error: {error}");
            return ExitCode::FAILURE;
        }
    };
    match compare::run(&options, |line| eprintln!("{line}")) {
        Ok(rows) => {
            println!("{}", table::render(&rows));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
