//! When the sync loop programs the kernel: a pure state machine fed with the
//! current instant, so every rule below is tested without a clock.
//!
//! * A queued change is applied no sooner than `min_sync_period` after the end of
//!   the previous sync that applied changes (changes arriving meanwhile coalesce
//!   into one sync). A periodic resync does not open that window: a change right
//!   after one would otherwise wait for nothing.
//! * Every `sync_period` a full resync rewrites all our chains (drift repair).
//! * A failed sync is retried with exponential backoff (from `min_sync_period`,
//!   at least [`MIN_RETRY`], capped at `sync_period`); the retry is a full sync,
//!   because after a failure we no longer know what the kernel holds.
//! * The first sync after start is full: it adopts and rewrites whatever rules a
//!   previous agent left, in place.

use std::time::Duration;

use tokio::time::Instant;

/// The shortest wait before retrying a failed sync, so a zero `min_sync_period`
/// never turns a persistent failure into a busy loop.
pub const MIN_RETRY: Duration = Duration::from_millis(500);

/// What the sync loop should do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Due {
    /// Nothing yet; wake up at the given instant (or on the next change).
    Wait(Option<Instant>),
    /// Program the kernel now; `full` rewrites every chain.
    Sync { full: bool },
}

/// The sync loop's timing state.
#[derive(Clone, Debug)]
pub struct SyncSchedule {
    min_sync_period: Duration,
    sync_period: Duration,
    /// End of the last sync that applied changes, or of the last failed attempt.
    last_end: Option<Instant>,
    /// When the current full-resync period started (start-up, or the last full sync).
    period_start: Instant,
    /// The oldest change not yet applied.
    queued_since: Option<Instant>,
    /// The next sync must be full (start-up, after a failure).
    need_full: bool,
    /// Consecutive failures, for the backoff.
    failures: u32,
    /// No sync before this instant (backoff after a failure).
    retry_at: Option<Instant>,
}

impl SyncSchedule {
    /// A schedule for an agent that starts at `now`: its first sync is full.
    pub fn new(now: Instant, min_sync_period: Duration, sync_period: Duration) -> Self {
        Self {
            min_sync_period,
            sync_period: sync_period.max(Duration::from_secs(1)),
            last_end: None,
            period_start: now,
            queued_since: None,
            need_full: true,
            failures: 0,
            retry_at: None,
        }
    }

    /// Adopts the periods of the current plan (they are node settings and may change).
    pub fn set_periods(&mut self, min_sync_period: Duration, sync_period: Duration) {
        self.min_sync_period = min_sync_period;
        self.sync_period = sync_period.max(Duration::from_secs(1));
    }

    /// The current full-resync period.
    pub fn sync_period(&self) -> Duration {
        self.sync_period
    }

    /// A change the kernel does not hold yet arrived; it stays queued until a sync succeeds.
    pub fn queue(&mut self, now: Instant) {
        self.queued_since.get_or_insert(now);
    }

    /// The oldest change not yet applied, if any.
    pub fn queued_since(&self) -> Option<Instant> {
        self.queued_since
    }

    /// Consecutive failed syncs.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Whether a periodic full resync is due at `now`.
    pub fn resync_due(&self, now: Instant) -> bool {
        now >= self.period_start + self.sync_period
    }

    /// What to do at `now`.
    pub fn due(&self, now: Instant) -> Due {
        if let Some(retry_at) = self.retry_at
            && now < retry_at
        {
            return Due::Wait(Some(retry_at));
        }
        let resync_at = self.period_start + self.sync_period;
        if self.queued_since.is_some() || self.retry_at.is_some() {
            let earliest = self.last_end.map_or(now, |end| end + self.min_sync_period);
            if now >= earliest {
                return Due::Sync {
                    full: self.need_full || now >= resync_at,
                };
            }
            return Due::Wait(Some(earliest.min(resync_at)));
        }
        if now >= resync_at {
            return Due::Sync { full: true };
        }
        Due::Wait(Some(resync_at))
    }

    /// A sync that started with the changes queued up to then succeeded at `now`.
    /// Changes queued after `started` stay queued.
    pub fn succeeded(&mut self, started: Instant, now: Instant, full: bool) {
        if self.queued_since.is_some_and(|queued| queued <= started) {
            self.last_end = Some(now);
        }
        if full {
            self.period_start = now;
            self.need_full = false;
        }
        if self.queued_since.is_some_and(|queued| queued <= started) {
            self.queued_since = None;
        }
        self.failures = 0;
        self.retry_at = None;
    }

    /// A sync failed at `now`; returns how long until the retry.
    pub fn failed(&mut self, now: Instant) -> Duration {
        self.last_end = Some(now);
        self.failures = self.failures.saturating_add(1);
        self.need_full = true;
        let base = self.min_sync_period.max(MIN_RETRY);
        let exponent = self.failures.saturating_sub(1).min(16);
        let backoff = base.saturating_mul(1 << exponent).min(self.sync_period);
        self.retry_at = Some(now + backoff);
        backoff
    }

    /// A due sync found nothing to program (no complete plan yet and nothing
    /// applied before): start the next period without touching the kernel. The
    /// next sync stays full.
    pub fn resync_skipped(&mut self, now: Instant) {
        self.period_start = now;
        self.retry_at = None;
        self.queued_since = None;
    }

    /// A change was withdrawn before it was applied (the plan went back to what the
    /// kernel holds, or became incomplete).
    pub fn unqueue(&mut self) {
        self.queued_since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(1);
    const PERIOD: Duration = Duration::from_secs(30);

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    fn millis(ms: u64) -> Duration {
        Duration::from_millis(ms)
    }

    #[test]
    fn first_sync_after_start_is_full_and_immediate() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, MIN, PERIOD);
        assert_eq!(schedule.due(t0), Due::Wait(Some(t0 + PERIOD)));
        schedule.queue(t0);
        assert_eq!(schedule.due(t0), Due::Sync { full: true });
    }

    #[test]
    fn changes_wait_for_min_sync_period_after_the_previous_sync_ends() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, MIN, PERIOD);
        schedule.queue(t0);
        schedule.succeeded(t0, t0 + millis(200), true);
        assert_eq!(schedule.queued_since(), None);

        schedule.queue(t0 + millis(300));
        schedule.queue(t0 + millis(900));
        assert_eq!(
            schedule.queued_since(),
            Some(t0 + millis(300)),
            "the oldest change counts"
        );
        assert_eq!(
            schedule.due(t0 + millis(900)),
            Due::Wait(Some(t0 + millis(1200)))
        );
        assert_eq!(schedule.due(t0 + millis(1200)), Due::Sync { full: false });
    }

    #[test]
    fn change_arriving_during_a_sync_stays_queued() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, MIN, PERIOD);
        schedule.queue(t0);
        schedule.queue(t0 + millis(50));
        schedule.succeeded(t0, t0 + millis(100), true);
        assert_eq!(
            schedule.queued_since(),
            None,
            "changes before the sync started are applied"
        );

        schedule.queue(t0 + millis(150));
        schedule.succeeded(t0 + millis(120), t0 + millis(200), false);
        assert_eq!(schedule.queued_since(), Some(t0 + millis(150)));
    }

    #[test]
    fn full_resync_every_sync_period_without_changes() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, MIN, PERIOD);
        schedule.queue(t0);
        schedule.succeeded(t0, t0 + secs(1), true);
        assert_eq!(schedule.due(t0 + secs(10)), Due::Wait(Some(t0 + secs(31))));
        assert_eq!(schedule.due(t0 + secs(31)), Due::Sync { full: true });
    }

    #[test]
    fn periodic_resync_does_not_delay_the_next_change() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, MIN, PERIOD);
        schedule.queue(t0);
        schedule.succeeded(t0, t0, true);
        assert_eq!(schedule.due(t0 + PERIOD), Due::Sync { full: true });
        schedule.succeeded(t0 + PERIOD, t0 + PERIOD, true);
        schedule.queue(t0 + PERIOD + millis(10));
        assert_eq!(
            schedule.due(t0 + PERIOD + millis(10)),
            Due::Sync { full: false }
        );
    }

    #[test]
    fn partial_syncs_do_not_postpone_the_full_resync() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, MIN, PERIOD);
        schedule.queue(t0);
        schedule.succeeded(t0, t0, true);
        for s in (5..30).step_by(5) {
            schedule.queue(t0 + secs(s));
            assert_eq!(schedule.due(t0 + secs(s)), Due::Sync { full: false });
            schedule.succeeded(t0 + secs(s), t0 + secs(s), false);
        }
        assert_eq!(schedule.due(t0 + secs(30)), Due::Sync { full: true });
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_sync_period_and_retry_full() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, MIN, PERIOD);
        schedule.queue(t0);
        let mut now = t0;
        let mut waits = Vec::new();
        for _ in 0..7 {
            let wait = schedule.failed(now);
            waits.push(wait.as_secs());
            assert_eq!(
                schedule.due(now + wait - millis(1)),
                Due::Wait(Some(now + wait))
            );
            assert_eq!(schedule.due(now + wait), Due::Sync { full: true });
            now += wait;
        }
        assert_eq!(waits, [1, 2, 4, 8, 16, 30, 30]);
        assert_eq!(schedule.failures(), 7);

        schedule.succeeded(now, now, true);
        assert_eq!(schedule.failures(), 0);
        assert_eq!(schedule.queued_since(), None);
    }

    #[test]
    fn zero_min_sync_period_still_backs_off() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, Duration::ZERO, PERIOD);
        schedule.queue(t0);
        assert_eq!(schedule.failed(t0), MIN_RETRY);
    }

    #[test]
    fn skipped_resync_starts_a_new_period() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, MIN, PERIOD);
        assert_eq!(schedule.due(t0 + PERIOD), Due::Sync { full: true });
        schedule.resync_skipped(t0 + PERIOD);
        assert_eq!(schedule.due(t0 + PERIOD), Due::Wait(Some(t0 + PERIOD * 2)));
    }

    #[test]
    fn withdrawn_change_needs_no_sync() {
        let t0 = Instant::now();
        let mut schedule = SyncSchedule::new(t0, MIN, PERIOD);
        schedule.queue(t0);
        schedule.succeeded(t0, t0, true);
        schedule.queue(t0 + millis(100));
        schedule.unqueue();
        assert_eq!(schedule.due(t0 + secs(2)), Due::Wait(Some(t0 + PERIOD)));
    }
}
