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
//! cargo run -p planproxy-e2e --example differential -- --seeds 100 --profile all  # seeds shared out over every node-level profile
//! cargo run -p planproxy-e2e --example differential -- --seed 17 --profile masquerade-all
//! ```
//!
//! Needs root (network namespaces). `--from` defaults to 1000, past the
//! fixed seeds of `tests/differential.rs`. `--profile` (default
//! `cluster-cidr`) names the node-level settings both proxies run with
//! (`NodeProfile`), or `all`: seed `from + i` then runs on profile
//! `i mod 5`, each profile on a cluster of its own, one after the other.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use planproxy_e2e::KubeProxyMode;
use planproxy_e2e::differential::{Differential, NodeProfile, deviations};

struct Args {
    from: u64,
    count: u64,
    mode: KubeProxyMode,
    profiles: Vec<NodeProfile>,
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
        profiles: vec![NodeProfile::ClusterCidr],
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
            "--profile" => {
                args.profiles = match value()?.as_str() {
                    "all" => NodeProfile::ALL.to_vec(),
                    name => vec![name.parse()?],
                }
            }
            other => {
                return Err(format!(
                    "unknown argument {other}; usage: differential [--seeds N] [--from S] [--seed S] [--mode iptables|nftables] [--profile NAME|all] [--minutes M] [--list]"
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

/// How often a class of disagreement showed, where first (profile and
/// seed), and under which heading `docs/deviations.md` lists it.
struct Class {
    count: usize,
    first: (NodeProfile, u64),
    listed: Option<String>,
}

/// What the seeds showed, over every profile run.
#[derive(Default)]
struct Summary {
    classes: BTreeMap<String, Class>,
    seeds_run: usize,
    failed: Vec<(NodeProfile, u64)>,
    probes: usize,
}

/// Runs `seeds` on one cluster with `profile`, until `deadline`.
fn run_profile(
    args: &Args,
    profile: NodeProfile,
    seeds: &[u64],
    deadline: Option<Instant>,
    summary: &mut Summary,
) {
    let started = Instant::now();
    let differential = match Differential::start(args.mode, profile) {
        Ok(d) => d,
        Err(e) => {
            println!("[{profile}] the cluster did not start: {e}");
            summary.failed.extend(seeds.iter().map(|&s| (profile, s)));
            return;
        }
    };
    println!(
        "[{profile}] cluster up in {:.1?} (kube-proxy --proxy-mode={})",
        started.elapsed(),
        args.mode.as_flag()
    );
    for &seed in seeds {
        if deadline.is_some_and(|d| Instant::now() > d) {
            println!("[{profile}] time is up: seeds from {seed} on not run");
            break;
        }
        let report = match differential.run_seed(seed) {
            Ok(report) => report,
            Err(e) => {
                println!("[{profile}] seed {seed}: not run: {e}");
                summary.failed.push((profile, seed));
                continue;
            }
        };
        summary.seeds_run += 1;
        summary.probes += report.probes;
        println!(
            "[{profile}] seed {seed}: {} probes, {} disagreements, {:.1?} ({})",
            report.probes,
            report.disagreements.len(),
            report.elapsed,
            report.phases
        );
        if !report.disagreements.is_empty() {
            print!("{}", report.state);
        }
        for d in &report.disagreements {
            let listed = deviations::listed(d, &report.state, differential.mode).map(label);
            println!("  {}{d}", listed.as_deref().unwrap_or_default());
            summary
                .classes
                .entry(d.class())
                .or_insert(Class {
                    count: 0,
                    first: (profile, seed),
                    listed,
                })
                .count += 1;
        }
    }
    if let Err(e) = differential.cluster.processes_running() {
        println!("[{profile}] a process died: {e}");
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
    let seeds: Vec<u64> = (args.from..args.from.saturating_add(args.count)).collect();
    if args.list {
        for &seed in &seeds {
            print!("{}", planproxy_e2e::differential::State::generate(seed));
        }
        return;
    }
    let started = Instant::now();
    let mut summary = Summary::default();
    let profiles = args.profiles.len();
    for (index, &profile) in args.profiles.iter().enumerate() {
        let share: Vec<u64> = seeds
            .iter()
            .copied()
            .enumerate()
            .filter(|(i, _)| i % profiles == index)
            .map(|(_, seed)| seed)
            .collect();
        // Each profile gets an equal part of what is left of the time.
        let deadline = args.minutes.map(|m| {
            let end = started + Duration::from_secs(m * 60);
            let left = end.saturating_duration_since(Instant::now());
            let remaining = u32::try_from(profiles - index).unwrap_or(1);
            Instant::now() + left / remaining
        });
        run_profile(&args, profile, &share, deadline, &mut summary);
    }
    println!(
        "\n{} seeds run ({} failed to run: {:?}), {} probes per node, in {:.1?}",
        summary.seeds_run,
        summary.failed.len(),
        summary.failed,
        summary.probes,
        started.elapsed()
    );
    println!(
        "disagreements by class (count, first profile and seed; unmarked ones are not in docs/deviations.md):"
    );
    for (name, class) in &summary.classes {
        let (profile, seed) = class.first;
        println!(
            "  {:5}  --profile {profile} --seed {seed:<6} {}{name}",
            class.count,
            class.listed.as_deref().unwrap_or_default()
        );
    }
}
