//! Waiting for the cluster to converge: polls, never fixed sleeps.

use std::future::Future;
use std::time::{Duration, Instant};

use crate::error::{E2eError, Result};

/// How often conditions are polled.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Polls `probe` until it returns `Ok`, for at most `timeout`. `Err(reason)`
/// means "not yet"; the last reason is reported if time runs out, so a
/// failing test says what it saw rather than only what it wanted.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe().await {
            Ok(value) => return Ok(value),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            return Err(E2eError::Timeout {
                what: what.to_owned(),
                timeout,
                last,
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// [`eventually`] for synchronous probes (data-plane checks from namespaces).
pub fn eventually_sync<T>(
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> Result<T, String>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match probe() {
            Ok(value) => return Ok(value),
            Err(reason) => reason,
        };
        if Instant::now() >= deadline {
            return Err(E2eError::Timeout {
                what: what.to_owned(),
                timeout,
                last,
            });
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eventually_sync_returns_the_first_success() {
        let mut calls = 0;
        let value = eventually_sync("third call", Duration::from_secs(5), || {
            calls += 1;
            if calls == 3 {
                Ok(calls)
            } else {
                Err(format!("call {calls}"))
            }
        });
        assert_eq!(value.unwrap(), 3);
    }

    #[test]
    fn eventually_sync_reports_the_last_observation_on_timeout() {
        let error = eventually_sync::<()>("never", Duration::from_millis(250), || {
            Err("still waiting".to_owned())
        })
        .unwrap_err();
        let message = error.to_string();
        assert!(message.contains("never did not happen"), "{message}");
        assert!(message.contains("still waiting"), "{message}");
    }

    #[tokio::test]
    async fn eventually_polls_async_probes() {
        let mut calls = 0;
        let value = eventually("second call", Duration::from_secs(5), || {
            calls += 1;
            let result = if calls >= 2 {
                Ok("done")
            } else {
                Err("not yet".to_owned())
            };
            async move { result }
        })
        .await;
        assert_eq!(value.unwrap(), "done");
    }
}
