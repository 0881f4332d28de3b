//! Measuring one node's proxy from outside it: whether its kernel serves a
//! service yet (a TCP connect from the node's probe pod), first-packet
//! latency, its own sync metric, and what its process used.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use planproxy_netns::{Attempt, ConnectOpts, Netns};

/// A probe's connect timeout: a frontend either answers or refuses within
/// a millisecond or two on these namespaces; only a missing route times out.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);
/// Between two rounds of probes: the resolution of every "until" time here.
const POLL: Duration = Duration::from_millis(5);
/// kube-proxy's histogram name, which the agent exports unchanged.
const SYNC_METRIC: &str = "kubeproxy_sync_proxy_rules_duration_seconds";
/// Where both kube-proxy and the agent serve `/metrics` in their node.
const METRICS_ADDR: &str = "127.0.0.1:10249";

/// What a probe of the flip service should see.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The echo pod answers.
    Answers,
    /// The service has no endpoint: the proxy rejects it.
    Refused,
}

/// One connect from `ns` to `addr`, judged against `expect`.
pub fn probe(ns: &Netns, addr: SocketAddr, expect: Expect) -> bool {
    let attempt = ns.connect_tcp(addr, &ConnectOpts::with_timeout(PROBE_TIMEOUT));
    match expect {
        Expect::Answers => attempt.is_ok(),
        Expect::Refused => attempt == Attempt::Refused,
    }
}

/// Polls until every `targets` answers from `ns`, or `deadline`; true if
/// they all did.
pub fn wait_answering(ns: &Netns, targets: &[SocketAddr], deadline: Instant) -> bool {
    loop {
        if targets.iter().all(|&t| probe(ns, t, Expect::Answers)) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

/// `n` handshake times (SYN to SYN-ACK: the first packet's trip through the
/// node's rules and back) to `addr` from `ns`; failed attempts are left out.
pub fn first_packet(ns: &Netns, addr: SocketAddr, n: usize) -> Vec<Duration> {
    let opts = ConnectOpts::with_timeout(Duration::from_secs(1));
    ns.connect_many(addr, n, &opts)
        .into_iter()
        .filter_map(|attempt| match attempt {
            Attempt::Ok { connect_time, .. } => Some(connect_time),
            _ => None,
        })
        .collect()
}

/// The sync histogram's running sum (seconds) and count.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct SyncTotals {
    pub seconds: f64,
    pub syncs: u64,
}

impl SyncTotals {
    /// The mean sync between two scrapes, and how many there were; None
    /// when no sync happened.
    pub fn mean_since(&self, earlier: &SyncTotals) -> Option<(Duration, u64)> {
        let syncs = self.syncs.checked_sub(earlier.syncs).filter(|&n| n > 0)?;
        let seconds = (self.seconds - earlier.seconds).max(0.0);
        Some((Duration::from_secs_f64(seconds / syncs as f64), syncs))
    }
}

/// The node's proxy's sync histogram, from its metrics endpoint.
pub fn scrape_sync(ns: &Netns) -> Option<SyncTotals> {
    let addr: SocketAddr = METRICS_ADDR.parse().ok()?;
    let (code, body) = ns.http_get(addr, "/metrics")?;
    if code != 200 {
        return None;
    }
    parse_sync(&body)
}

/// The `_sum` and `_count` of [`SYNC_METRIC`] in a Prometheus or
/// OpenMetrics text exposition: the unlabelled series (the agent syncs both
/// families at once) or kube-proxy's IPv4 one (it runs a proxier per family,
/// and the workload is IPv4; its IPv6 syncs of no services would halve the
/// mean).
pub fn parse_sync(text: &str) -> Option<SyncTotals> {
    let value = |suffix: &str| {
        let name = format!("{SYNC_METRIC}{suffix}");
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(&name)?;
            let number = match rest.strip_prefix(' ') {
                Some(number) => number,
                None => {
                    let (labels, number) = rest.split_once("} ")?;
                    labels.contains("ip_family=\"IPv4\"").then_some(number)?
                }
            };
            number.split_whitespace().next()?.parse::<f64>().ok()
        })
    };
    Some(SyncTotals {
        seconds: value("_sum")?,
        syncs: value("_count")? as u64,
    })
}

/// CPU seconds (children included) and peak RSS (MiB) of a process.
pub fn usage(pid: u32) -> Option<(f64, f64)> {
    let cpu = crate::process::cpu_seconds(pid)?;
    Some((cpu, crate::process::peak_rss_mib(pid)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_sync_histogram_of_either_exporter() {
        let kube_proxy = "# TYPE kubeproxy_sync_proxy_rules_duration_seconds histogram\n\
            kubeproxy_sync_proxy_rules_duration_seconds_bucket{ip_family=\"IPv4\",le=\"0.001\"} 0\n\
            kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family=\"IPv6\"} 0.5\n\
            kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv6\"} 10\n\
            kubeproxy_sync_proxy_rules_duration_seconds_sum{ip_family=\"IPv4\"} 2.5\n\
            kubeproxy_sync_proxy_rules_duration_seconds_count{ip_family=\"IPv4\"} 10\n\
            kubeproxy_sync_proxy_rules_last_timestamp_seconds 1.7e+09\n";
        let earlier = parse_sync(kube_proxy).expect("parsed");
        assert_eq!(
            earlier,
            SyncTotals {
                seconds: 2.5,
                syncs: 10
            }
        );
        let agent = "kubeproxy_sync_proxy_rules_duration_seconds_sum 3.5\n\
            kubeproxy_sync_proxy_rules_duration_seconds_count 14\n# EOF\n";
        let later = parse_sync(agent).expect("parsed");
        assert_eq!(
            later.mean_since(&earlier),
            Some((Duration::from_millis(250), 4))
        );
        assert_eq!(later.mean_since(&later), None);
        assert_eq!(parse_sync("other_metric 1\n"), None);
    }
}
