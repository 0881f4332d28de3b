//! Flags and environment variables of `planproxy-controller run`.
//!
//! The Helm chart sets these by name, so renaming one is an API change.

use std::net::SocketAddr;
use std::time::Duration;

use clap::{Args, ValueEnum};

/// Options of `planproxy-controller run`.
#[derive(Args, Debug, Clone)]
pub struct RunArgs {
    /// How long to collect changes before resolving them together. A change
    /// after a quiet window is resolved at once; the changes that follow it
    /// within the window cost one more resolution and at most one more write per
    /// affected shard.
    #[arg(long, env = "PLANPROXY_COALESCE_WINDOW", default_value = "1s", value_parser = parse_duration)]
    pub coalesce_window: Duration,

    /// Upper bound on API writes (ProxyPlan creates, updates and deletes, policy
    /// status, events) per second, so that a large change cannot flood the API
    /// server. Waiting plans are written newest change first; none waits forever.
    #[arg(long, env = "PLANPROXY_MAX_WRITES_PER_SECOND", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_writes_per_second: u32,

    /// Size a ProxyPlan shard aims for, in bytes of JSON; a node's plan is split
    /// into more shards when it grows past this.
    #[arg(long, env = "PLANPROXY_SHARD_TARGET_BYTES", default_value_t = 32768, value_parser = clap::value_parser!(u64).range(1024..))]
    pub shard_target_bytes: u64,

    /// Run leader election so that only one replica writes. Disable only when a
    /// single replica runs.
    #[arg(long, env = "PLANPROXY_LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// Namespace of the leader-election Lease (normally the controller's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "kube-system")]
    pub leader_election_namespace: String,

    /// Name of the leader-election Lease.
    #[arg(
        long,
        env = "PLANPROXY_LEADER_ELECTION_NAME",
        default_value = "planproxy-controller"
    )]
    pub leader_election_name: String,

    /// How long a standby waits after the leader's last renewal before taking over.
    #[arg(long, env = "PLANPROXY_LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// How long the leader keeps trying to renew before it stops writing.
    /// Must be shorter than --lease-duration.
    #[arg(long, env = "PLANPROXY_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub renew_deadline: Duration,

    /// Interval between attempts to acquire or renew the Lease.
    #[arg(long, env = "PLANPROXY_RETRY_PERIOD", default_value = "2s", value_parser = parse_duration)]
    pub retry_period: Duration,

    /// Identity in the Lease; defaults to the pod name (POD_NAME) or the host name
    /// with a random suffix.
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// Address of the admin server: /healthz, /readyz and /metrics.
    #[arg(
        long,
        env = "PLANPROXY_ADMIN_BIND_ADDRESS",
        default_value = "0.0.0.0:9090"
    )]
    pub admin_bind_address: SocketAddr,

    /// Log output format.
    #[arg(long, env = "PLANPROXY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter in RUST_LOG syntax, e.g. `info` or `info,planproxy_controller=debug`.
    #[arg(long, env = "PLANPROXY_LOG", default_value = "info")]
    pub log_level: String,

    /// Objects per page when listing (smaller pages lower the memory peak of a
    /// re-list).
    #[arg(long, env = "PLANPROXY_LIST_PAGE_SIZE", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    pub list_page_size: u32,
}

/// How logs are written.
#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    planproxy_crds::duration::parse(s).map_err(|e| e.to_string())
}

impl RunArgs {
    /// Checks relations between flags that clap cannot express.
    pub fn validate(&self) -> Result<(), String> {
        if self.leader_elect {
            if self.renew_deadline >= self.lease_duration {
                return Err("--renew-deadline must be shorter than --lease-duration".into());
            }
            if self.retry_period >= self.renew_deadline {
                return Err("--retry-period must be shorter than --renew-deadline".into());
            }
        }
        if self.coalesce_window.is_zero() {
            return Err("--coalesce-window must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied())).map(|c| c.run)
    }

    #[test]
    fn defaults_match_the_documented_values() {
        let a = parse(&[]).expect("defaults parse");
        assert_eq!(a.coalesce_window, Duration::from_secs(1));
        assert_eq!(a.max_writes_per_second, 50);
        assert_eq!(a.shard_target_bytes, 32768);
        assert!(a.leader_elect);
        assert_eq!(a.leader_election_name, "planproxy-controller");
        assert_eq!(a.lease_duration, Duration::from_secs(15));
        assert_eq!(a.renew_deadline, Duration::from_secs(10));
        assert_eq!(a.retry_period, Duration::from_secs(2));
        assert_eq!(a.admin_bind_address.port(), 9090);
        assert!(a.validate().is_ok());
    }

    #[test]
    fn durations_take_kubernetes_spelling() {
        let a =
            parse(&["--coalesce-window", "250ms", "--lease-duration", "1m30s"]).expect("parses");
        assert_eq!(a.coalesce_window, Duration::from_millis(250));
        assert_eq!(a.lease_duration, Duration::from_secs(90));
        assert!(parse(&["--coalesce-window", "1 second"]).is_err());
    }

    #[test]
    fn leader_election_can_be_switched_off() {
        let a = parse(&["--leader-elect", "false"]).expect("parses");
        assert!(!a.leader_elect);
    }

    #[test]
    fn renew_deadline_must_be_shorter_than_the_lease() {
        let a = parse(&["--lease-duration", "5s", "--renew-deadline", "5s"]).expect("parses");
        assert!(a.validate().unwrap_err().contains("--renew-deadline"));
    }

    #[test]
    fn zero_write_budget_is_rejected() {
        assert!(parse(&["--max-writes-per-second", "0"]).is_err());
    }
}
