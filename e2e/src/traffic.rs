//! Data-plane checks: who answers a frontend, and from which address it saw
//! the client.

use std::collections::BTreeSet;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use planproxy_netns::{Attempt, ConnectOpts, Netns};

use crate::error::Result;
use crate::objects::Protocol;
use crate::wait::eventually_sync;

/// Attempts per distribution check: with up to 4 backends chosen uniformly,
/// the chance that one is never picked in 40 tries is below 0.1 %.
pub const DISTRIBUTION_ATTEMPTS: usize = 40;

/// The per-attempt timeout of data-plane checks.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_millis(700);

/// Which servers answered `attempts` connections from `from` to `target`,
/// or the first failure.
pub fn servers_seen(
    from: &Netns,
    target: SocketAddr,
    protocol: Protocol,
    attempts: usize,
) -> Result<BTreeSet<String>, String> {
    let opts = ConnectOpts::with_timeout(ATTEMPT_TIMEOUT);
    let results = match protocol {
        Protocol::Tcp => from.connect_many(target, attempts, &opts),
        Protocol::Udp => from.connect_many_udp(target, attempts, &opts),
    };
    let mut servers = BTreeSet::new();
    for attempt in results {
        match attempt.server() {
            Some(server) => {
                servers.insert(server.to_owned());
            }
            None => {
                return Err(format!(
                    "{:?} to {target} from {}: {attempt:?}",
                    protocol,
                    from.name()
                ));
            }
        }
    }
    Ok(servers)
}

/// Waits until connections from `from` to `target` are answered by exactly
/// the servers in `expected` (every one of them, and no other).
pub fn wait_servers(
    from: &Netns,
    target: SocketAddr,
    protocol: Protocol,
    expected: &[String],
    timeout: Duration,
) -> Result<()> {
    let expected: BTreeSet<String> = expected.iter().cloned().collect();
    eventually_sync(
        &format!(
            "{protocol:?} {target} from {} answered by {expected:?}",
            from.name()
        ),
        timeout,
        || {
            let seen = servers_seen(from, target, protocol, DISTRIBUTION_ATTEMPTS)?;
            if seen == expected {
                Ok(())
            } else {
                Err(format!("answered by {seen:?}"))
            }
        },
    )
}

/// Waits until a TCP connection from `from` to `target` succeeds and
/// returns the client address the server saw.
pub fn wait_peer_ip(from: &Netns, target: SocketAddr, timeout: Duration) -> Result<IpAddr> {
    eventually_sync(
        &format!("TCP {target} from {} answered", from.name()),
        timeout,
        || {
            let attempt = from.connect_tcp(target, &ConnectOpts::with_timeout(ATTEMPT_TIMEOUT));
            attempt
                .peer()
                .map(|p| p.ip())
                .ok_or_else(|| format!("{attempt:?}"))
        },
    )
}

/// Waits until TCP connections from `from` to `target` fail, and returns how
/// the last one failed.
pub fn wait_unanswered(from: &Netns, target: SocketAddr, timeout: Duration) -> Result<Attempt> {
    eventually_sync(
        &format!("TCP {target} from {} unanswered", from.name()),
        timeout,
        || {
            let attempt = from.connect_tcp(target, &ConnectOpts::with_timeout(ATTEMPT_TIMEOUT));
            if attempt.is_ok() {
                Err(format!("still answered: {attempt:?}"))
            } else {
                Ok(attempt)
            }
        },
    )
}

/// Waits until a TCP connection from `from` to `target` ends exactly as
/// `expected` (e.g. [`Attempt::Refused`] once a frontend rejects), past any
/// transient outcome while rules change.
pub fn wait_attempt(
    from: &Netns,
    target: SocketAddr,
    expected: &Attempt,
    timeout: Duration,
) -> Result<()> {
    eventually_sync(
        &format!("TCP {target} from {} ends {expected:?}", from.name()),
        timeout,
        || {
            let attempt = from.connect_tcp(target, &ConnectOpts::with_timeout(ATTEMPT_TIMEOUT));
            if attempt == *expected {
                Ok(())
            } else {
                Err(format!("{attempt:?}"))
            }
        },
    )
}
