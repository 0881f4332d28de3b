//! Runs generated cluster states on planproxy and on the real kube-proxy side
//! by side and prints every disagreement with the state that reproduces it,
//! then a count by class.
//!
//! ```sh
//! cargo build --workspace --bins
//! cargo run -p planproxy-e2e --example differential -- --seeds 1000            # seeds 1000..2000
//! cargo run -p planproxy-e2e --example differential -- --seed 17               # one seed
//! cargo run -p planproxy-e2e --example differential -- --seeds 50 --from 0 --mode nftables
//! cargo run -p planproxy-e2e --example differential -- --seeds 1000 --minutes 30  # as many as fit
//! cargo run -p planproxy-e2e --example differential -- --seed 17 --list           # only print the state
//! ```
//!
//! Needs root (network namespaces). `--from` defaults to 1000, past the
//! fixed seeds of `tests/differential.rs`.

use std::collections::BTreeMap;
use std::time::Instant;

use planproxy_e2e::KubeProxyMode;
use planproxy_e2e::differential::{Differential, deviations};

struct Args {
    from: u64,
    count: u64,
    mode: KubeProxyMode,
    /// Start no seed after this many minutes (then print the summary).
    minutes: Option<u64>,
    /// Only print the seeds' states (no cluster, no root needed).
    list: bool,
}

fn parse() -> Result<Args, String> {
    let mut args = Args {
        from: 1000,
        count: 10,
        mode: KubeProxyMode::Iptables,
        minutes: None,
        list: false,
    };
    let mut argv = std::env::args().skip(1);
    while let Some(flag) = argv.next() {
        let mut value = || argv.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--seeds" => args.count = value()?.parse().map_err(|e| format!("--seeds: {e}"))?,
            "--from" => args.from = value()?.parse().map_err(|e| format!("--from: {e}"))?,
            "--seed" => {
                args.from = value()?.parse().map_err(|e| format!("--seed: {e}"))?;
                args.count = 1;
            }
            "--list" => args.list = true,
            "--minutes" => {
                args.minutes = Some(value()?.parse().map_err(|e| format!("--minutes: {e}"))?);
            }
            "--mode" => {
                args.mode = match value()?.as_str() {
                    "iptables" => KubeProxyMode::Iptables,
                    "nftables" => KubeProxyMode::Nftables,
                    other => return Err(format!("--mode iptables|nftables, not {other}")),
                }
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: differential [--seeds N] [--from S] [--seed S] [--mode iptables|nftables] [--minutes M] [--list]"
                ));
            }
        }
    }
    Ok(args)
}

/// How a listed disagreement is marked in the output.
fn label(deviation: &deviations::Deviation) -> String {
    match deviation.nature {
        deviations::Nature::Deliberate => format!("[deliberate: {}] ", deviation.heading),
        deviations::Nature::KnownBug => format!("[known bug: {}] ", deviation.heading),
    }
}

fn main() {
    let args = match parse() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if args.list {
        for seed in args.from..args.from.saturating_add(args.count) {
            print!("{}", planproxy_e2e::differential::State::generate(seed));
        }
        return;
    }
    let started = Instant::now();
    let differential = match Differential::start(args.mode) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("the cluster did not start: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "cluster up in {:.1?} (kube-proxy --proxy-mode={})",
        started.elapsed(),
        args.mode.as_flag()
    );
    // class -> (count, first reproducing seed, listed in docs/deviations.md as)
    let mut classes: BTreeMap<String, (usize, u64, Option<String>)> = BTreeMap::new();
    let (mut seeds_run, mut failed, mut probes) = (0, Vec::new(), 0);
    let deadline = args
        .minutes
        .map(|m| started + std::time::Duration::from_secs(m * 60));
    for seed in args.from..args.from.saturating_add(args.count) {
        if deadline.is_some_and(|d| Instant::now() > d) {
            println!("--minutes reached: seeds from {seed} on not run");
            break;
        }
        match differential.run_seed(seed) {
            Ok(report) => {
                seeds_run += 1;
                probes += report.probes;
                println!(
                    "seed {seed}: {} probes, {} disagreements, {:.1?}",
                    report.probes,
                    report.disagreements.len(),
                    report.elapsed
                );
                if !report.disagreements.is_empty() {
                    print!("{}", report.state);
                }
                for d in &report.disagreements {
                    let deliberate =
                        deviations::listed(d, &report.state, differential.mode).map(label);
                    println!("  {}{d}", deliberate.as_deref().unwrap_or_default());
                    let entry = classes.entry(d.class()).or_insert((0, seed, deliberate));
                    entry.0 += 1;
                }
            }
            Err(e) => {
                println!("seed {seed}: not run: {e}");
                failed.push(seed);
            }
        }
    }
    println!(
        "\n{seeds_run} seeds run ({} failed to run: {failed:?}), {probes} probes per node, in {:.1?}",
        failed.len(),
        started.elapsed()
    );
    println!(
        "disagreements by class (count, first seed; unmarked ones are not in docs/deviations.md):"
    );
    for (class, (count, seed, deliberate)) in &classes {
        println!(
            "  {count:5}  seed {seed:<6} {}{class}",
            deliberate.as_deref().unwrap_or_default()
        );
    }
    if let Err(e) = differential.cluster.processes_running() {
        println!("a process died: {e}");
    }
}
