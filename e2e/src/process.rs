//! What the benches read about a running process.

/// The process's peak resident memory (`VmHWM`) in MiB; 0 if unreadable.
pub fn peak_rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Clock ticks per second of `/proc/<pid>/stat` times: USER_HZ, which Linux
/// fixes at 100 for every architecture's user-space ABI.
const USER_HZ: f64 = 100.0;

/// The numeric fields of `/proc/<pid>/stat` after the command name (which
/// may hold spaces) and the state letter: index 0 is field 4, `ppid`.
fn stat_fields(pid: u32) -> Option<Vec<u64>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(
        rest.split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect(),
    )
}

/// CPU seconds the process has used, user and system, including its children
/// that it waited for (kube-proxy and the agent run `iptables-restore` and
/// `nft` as children, whose time is theirs to pay); None if it is gone.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    // utime, stime, cutime, cstime are fields 14 to 17: 10 to 13 here.
    let fields = stat_fields(pid)?;
    let ticks: u64 = fields.get(10..14)?.iter().sum();
    Some(ticks as f64 / USER_HZ)
}

/// How long ago the process started (to 1/USER_HZ s): the start a caller
/// could only guess from when it asked for the process; None if it is gone.
pub fn age(pid: u32) -> Option<std::time::Duration> {
    // starttime is field 22 (ticks after boot): 18 here.
    let started = *stat_fields(pid)?.get(18)? as f64 / USER_HZ;
    let uptime = std::fs::read_to_string("/proc/uptime").ok()?;
    let now: f64 = uptime.split_whitespace().next()?.parse().ok()?;
    Some(std::time::Duration::from_secs_f64((now - started).max(0.0)))
}
