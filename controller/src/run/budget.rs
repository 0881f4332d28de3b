//! The write budget: a token bucket that caps API writes per second.
//!
//! kube-rs has no client-side rate limit, and one change to a service selected by
//! every node rewrites a shard per node, so the writer takes a token before each
//! write. The bucket holds at most one second of tokens: an idle controller may
//! write a burst of `rate` at once, never more.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket refilled continuously at `rate` tokens per second.
#[derive(Debug)]
pub struct WriteBudget {
    rate: f64,
    capacity: f64,
    tokens: f64,
    refilled_at: Instant,
}

impl WriteBudget {
    /// A full bucket allowing `per_second` writes per second (at least one).
    pub fn new(per_second: u32, now: Instant) -> Self {
        let rate = f64::from(per_second.max(1));
        Self {
            rate,
            capacity: rate,
            tokens: rate,
            refilled_at: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now
            .saturating_duration_since(self.refilled_at)
            .as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.refilled_at = now;
    }

    /// Takes one token, or says how long until one is available.
    pub fn try_take(&mut self, now: Instant) -> Result<(), Duration> {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - self.tokens) / self.rate))
        }
    }

    /// Waits until a token is available and takes it.
    pub async fn take(&mut self) {
        loop {
            match self.try_take(Instant::now()) {
                Ok(()) => return,
                Err(wait) => tokio::time::sleep(wait).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_allows_one_second_of_burst_then_waits() {
        let start = Instant::now();
        let mut budget = WriteBudget::new(10, start);
        for _ in 0..10 {
            assert!(budget.try_take(start).is_ok());
        }
        let wait = budget.try_take(start).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
    }

    #[tokio::test(start_paused = true)]
    async fn sustained_writes_never_exceed_the_rate() {
        let start = Instant::now();
        let mut budget = WriteBudget::new(50, start);
        for _ in 0..250 {
            budget.take().await;
        }
        // 50 from the initial burst, then 200 at 50/s: four seconds.
        let elapsed = start.elapsed();
        assert!(elapsed >= Duration::from_secs(4), "{elapsed:?}");
        assert!(elapsed < Duration::from_millis(4100), "{elapsed:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_bucket_refills_only_to_capacity() {
        let start = Instant::now();
        let mut budget = WriteBudget::new(5, start);
        let later = start + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(budget.try_take(later).is_ok());
        }
        assert!(budget.try_take(later).is_err());
    }
}
