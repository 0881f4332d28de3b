//! Leader election through a `coordination.k8s.io/v1` Lease.
//!
//! Same protocol as client-go's `leaderelection`, so it interoperates with the
//! usual tooling (`kubectl get lease`):
//!
//! * a candidate may take the Lease when it does not exist, names nobody, or its
//!   record has not changed for `leaseDurationSeconds` of *our* clock (time is
//!   measured from when we last saw the record change, never from the timestamps
//!   in it, so clock skew between nodes does not matter);
//! * the holder renews every retry period and stops leading when it has not
//!   renewed for the renew deadline (shorter than the lease, so it stops writing
//!   before anybody else may start);
//! * on shutdown the holder releases the Lease (empty holder, one-second duration)
//!   so a standby takes over at its next retry instead of after the lease.
//!
//! [`Elector`] is the pure state machine; [`run`] drives it against the API.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use tokio::sync::watch;
use tokio::time::Instant;

/// Timings of the election.
#[derive(Debug, Clone, Copy)]
pub struct Timings {
    /// How long a record must stay unchanged before a standby takes over.
    pub lease_duration: Duration,
    /// How long the leader may fail to renew before it stops leading.
    pub renew_deadline: Duration,
    /// Interval between attempts.
    pub retry_period: Duration,
}

/// What the elector wants done with the Lease after observing it.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// No Lease exists: create it holding it ourselves.
    Create(LeaseSpec),
    /// Take over or renew: write this record.
    Update(LeaseSpec),
    /// Somebody else holds a live lease.
    Wait,
}

#[derive(Debug, Clone)]
struct Observed {
    spec: Option<LeaseSpec>,
    at: Instant,
}

/// The pure leader-election state machine.
#[derive(Debug)]
pub struct Elector {
    identity: String,
    timings: Timings,
    observed: Option<Observed>,
    renewed_at: Option<Instant>,
}

impl Elector {
    /// A candidate called `identity`.
    pub fn new(identity: impl Into<String>, timings: Timings) -> Self {
        Self {
            identity: identity.into(),
            timings,
            observed: None,
            renewed_at: None,
        }
    }

    /// Our identity in the Lease.
    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn observe(&mut self, spec: Option<&LeaseSpec>, now: Instant) {
        let changed = self
            .observed
            .as_ref()
            .is_none_or(|o| o.spec.as_ref() != spec);
        if changed {
            self.observed = Some(Observed {
                spec: spec.cloned(),
                at: now,
            });
        }
    }

    fn holds(&self, spec: &LeaseSpec) -> bool {
        spec.holder_identity.as_deref() == Some(self.identity.as_str())
    }

    /// Observes the current Lease (None: it does not exist) and decides what to do.
    pub fn decide(
        &mut self,
        current: Option<&LeaseSpec>,
        now: Instant,
        wall: Timestamp,
    ) -> Decision {
        self.observe(current, now);
        let Some(current) = current else {
            return Decision::Create(self.record(None, wall));
        };
        let held_by_other = current
            .holder_identity
            .as_deref()
            .is_some_and(|h| !h.is_empty() && h != self.identity);
        if held_by_other {
            let duration = current
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map_or(self.timings.lease_duration, Duration::from_secs);
            let seen = self.observed.as_ref().map_or(now, |o| o.at);
            if now.saturating_duration_since(seen) < duration {
                return Decision::Wait;
            }
        }
        Decision::Update(self.record(Some(current), wall))
    }

    fn record(&self, current: Option<&LeaseSpec>, wall: Timestamp) -> LeaseSpec {
        let seconds =
            i32::try_from(self.timings.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX);
        let (acquire_time, transitions) = match current {
            Some(c) if self.holds(c) => (c.acquire_time.clone(), c.lease_transitions.unwrap_or(0)),
            Some(c) => (
                Some(MicroTime(wall)),
                c.lease_transitions.unwrap_or(0).saturating_add(1),
            ),
            None => (Some(MicroTime(wall)), 0),
        };
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(seconds),
            acquire_time,
            renew_time: Some(MicroTime(wall)),
            lease_transitions: Some(transitions),
            ..LeaseSpec::default()
        }
    }

    /// Records that `written` was stored: we hold the lease as of `now`.
    pub fn written(&mut self, written: LeaseSpec, now: Instant) {
        self.renewed_at = Some(now);
        self.observed = Some(Observed {
            spec: Some(written),
            at: now,
        });
    }

    /// Whether we lead at `now`: we hold the record and renewed it within the
    /// renew deadline.
    pub fn is_leader(&self, now: Instant) -> bool {
        let holds = self
            .observed
            .as_ref()
            .and_then(|o| o.spec.as_ref())
            .is_some_and(|s| self.holds(s));
        holds
            && self
                .renewed_at
                .is_some_and(|t| now.saturating_duration_since(t) < self.timings.renew_deadline)
    }

    /// The record that hands the lease back, if we lead.
    pub fn release(&self, now: Instant, wall: Timestamp) -> Option<LeaseSpec> {
        if !self.is_leader(now) {
            return None;
        }
        let current = self.observed.as_ref().and_then(|o| o.spec.clone())?;
        Some(LeaseSpec {
            holder_identity: None,
            lease_duration_seconds: Some(1),
            acquire_time: Some(MicroTime(wall)),
            renew_time: Some(MicroTime(wall)),
            ..current
        })
    }

    /// Forgets our leadership (after a release).
    pub fn step_down(&mut self) {
        self.renewed_at = None;
    }
}

/// Where the Lease lives.
#[derive(Debug, Clone)]
pub struct LeaseRef {
    /// Namespace of the Lease.
    pub namespace: String,
    /// Name of the Lease.
    pub name: String,
}

/// Runs the election until `shutdown` turns true, publishing leadership on
/// `leading`; then releases the lease if held.
#[tracing::instrument(name = "leader_election", skip_all, fields(lease = %lease.name, identity = %elector.identity()))]
pub async fn run(
    client: kube::Client,
    lease: LeaseRef,
    mut elector: Elector,
    leading: watch::Sender<bool>,
    mut shutdown: watch::Receiver<bool>,
) {
    let api: Api<Lease> = Api::namespaced(client, &lease.namespace);
    let retry = elector.timings.retry_period;
    let mut resource_version: Option<String> = None;
    loop {
        let attempt = tokio::time::timeout(retry, try_acquire_or_renew(&api, &lease, &mut elector));
        match attempt.await {
            Ok(Ok(rv)) => resource_version = rv.or(resource_version),
            Ok(Err(error)) => {
                tracing::warn!(%error, lease = %lease.name, "leader election attempt failed")
            }
            Err(_) => tracing::warn!(lease = %lease.name, "leader election attempt timed out"),
        }
        publish(&leading, elector.is_leader(Instant::now()), &elector);
        tokio::select! {
            () = tokio::time::sleep(retry) => {}
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
    let was_leader = elector.is_leader(Instant::now());
    publish(&leading, false, &elector);
    if let Some(spec) = elector.release(Instant::now(), Timestamp::now()) {
        let object = Lease {
            metadata: ObjectMeta {
                name: Some(lease.name.clone()),
                namespace: Some(lease.namespace.clone()),
                resource_version,
                ..ObjectMeta::default()
            },
            spec: Some(spec),
        };
        match api
            .replace(&lease.name, &PostParams::default(), &object)
            .await
        {
            Ok(_) => tracing::info!(lease = %lease.name, "released the leader lease"),
            Err(error) => {
                tracing::warn!(%error, lease = %lease.name, "failed to release the leader lease")
            }
        }
        elector.step_down();
    } else if was_leader {
        tracing::info!("stopped leading");
    }
}

fn publish(leading: &watch::Sender<bool>, now_leading: bool, elector: &Elector) {
    leading.send_if_modified(|was| {
        if *was == now_leading {
            return false;
        }
        if now_leading {
            tracing::info!(identity = elector.identity(), "became the leader");
        } else {
            tracing::warn!(identity = elector.identity(), "lost leadership");
        }
        *was = now_leading;
        true
    });
}

async fn try_acquire_or_renew(
    api: &Api<Lease>,
    lease: &LeaseRef,
    elector: &mut Elector,
) -> Result<Option<String>, kube::Error> {
    let current = api.get_opt(&lease.name).await?;
    let spec = current
        .as_ref()
        .and_then(|l| l.spec.clone())
        .unwrap_or_default();
    let observed = current.as_ref().map(|_| &spec);
    let metadata = |resource_version| ObjectMeta {
        name: Some(lease.name.clone()),
        namespace: Some(lease.namespace.clone()),
        resource_version,
        ..ObjectMeta::default()
    };
    let written = match elector.decide(observed, Instant::now(), Timestamp::now()) {
        Decision::Wait => return Ok(current.and_then(|l| l.metadata.resource_version)),
        Decision::Create(spec) => {
            let object = Lease {
                metadata: metadata(None),
                spec: Some(spec.clone()),
            };
            (api.create(&PostParams::default(), &object).await?, spec)
        }
        Decision::Update(spec) => {
            let rv = current.and_then(|l| l.metadata.resource_version);
            let object = Lease {
                metadata: metadata(rv),
                spec: Some(spec.clone()),
            };
            // The resourceVersion makes this a compare-and-swap: when another
            // candidate wrote first we get 409 and retry next period.
            (
                api.replace(&lease.name, &PostParams::default(), &object)
                    .await?,
                spec,
            )
        }
    };
    let (stored, spec) = written;
    elector.written(stored.spec.unwrap_or(spec), Instant::now());
    Ok(stored.metadata.resource_version)
}

/// The identity to use when none is configured: host name plus a random suffix,
/// so two processes on one host never share it.
pub fn default_identity() -> String {
    use std::hash::{BuildHasher, Hasher};
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "planproxy-controller".to_owned());
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    format!("{host}_{:08x}", hasher.finish() as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TIMINGS: Timings = Timings {
        lease_duration: Duration::from_secs(15),
        renew_deadline: Duration::from_secs(10),
        retry_period: Duration::from_secs(2),
    };

    fn wall() -> Timestamp {
        Timestamp::UNIX_EPOCH
    }

    fn held_by(holder: &str, renewed: i64) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_duration_seconds: Some(15),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed).expect("valid"))),
            lease_transitions: Some(3),
            ..LeaseSpec::default()
        }
    }

    fn write(elector: &mut Elector, decision: Decision, now: Instant) -> LeaseSpec {
        let spec = match decision {
            Decision::Create(s) | Decision::Update(s) => s,
            Decision::Wait => panic!("expected a write"),
        };
        elector.written(spec.clone(), now);
        spec
    }

    #[tokio::test(start_paused = true)]
    async fn a_missing_lease_is_created_and_then_held() {
        let mut a = Elector::new("a", TIMINGS);
        let now = Instant::now();
        let decision = a.decide(None, now, wall());
        let Decision::Create(spec) = &decision else {
            panic!("{decision:?}")
        };
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.lease_transitions, Some(0));
        assert!(!a.is_leader(now));
        write(&mut a, decision, now);
        assert!(a.is_leader(now));
    }

    #[tokio::test(start_paused = true)]
    async fn a_live_lease_of_another_holder_is_respected_until_it_expires() {
        let mut b = Elector::new("b", TIMINGS);
        let lease = held_by("a", 100);
        let start = Instant::now();
        assert_eq!(b.decide(Some(&lease), start, wall()), Decision::Wait);
        tokio::time::advance(Duration::from_secs(14)).await;
        assert_eq!(
            b.decide(Some(&lease), Instant::now(), wall()),
            Decision::Wait
        );
        tokio::time::advance(Duration::from_secs(1)).await;
        let Decision::Update(taken) = b.decide(Some(&lease), Instant::now(), wall()) else {
            panic!("the lease expired")
        };
        assert_eq!(taken.holder_identity.as_deref(), Some("b"));
        assert_eq!(taken.lease_transitions, Some(4));
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewing_leader_keeps_the_standby_waiting() {
        let mut b = Elector::new("b", TIMINGS);
        for renewal in 0..20 {
            let lease = held_by("a", 100 + renewal * 2);
            assert_eq!(
                b.decide(Some(&lease), Instant::now(), wall()),
                Decision::Wait
            );
            tokio::time::advance(Duration::from_secs(2)).await;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_released_lease_is_taken_at_once() {
        let mut b = Elector::new("b", TIMINGS);
        let mut lease = held_by("a", 100);
        assert_eq!(
            b.decide(Some(&lease), Instant::now(), wall()),
            Decision::Wait
        );
        lease.holder_identity = None;
        lease.lease_duration_seconds = Some(1);
        assert!(matches!(
            b.decide(Some(&lease), Instant::now(), wall()),
            Decision::Update(_)
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn renewal_keeps_acquire_time_and_transitions() {
        let mut a = Elector::new("a", TIMINGS);
        let first = a.decide(None, Instant::now(), wall());
        let held = write(&mut a, first, Instant::now());
        tokio::time::advance(Duration::from_secs(2)).await;
        let later = Timestamp::from_second(2).expect("valid");
        let Decision::Update(renewed) = a.decide(Some(&held), Instant::now(), later) else {
            panic!("the holder renews")
        };
        assert_eq!(renewed.acquire_time, held.acquire_time);
        assert_eq!(renewed.lease_transitions, held.lease_transitions);
        assert_eq!(renewed.renew_time, Some(MicroTime(later)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_stops_leading_at_the_renew_deadline() {
        let mut a = Elector::new("a", TIMINGS);
        let first = a.decide(None, Instant::now(), wall());
        write(&mut a, first, Instant::now());
        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert!(a.is_leader(Instant::now()));
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!a.is_leader(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn the_old_leader_stops_before_a_standby_may_start() {
        // Both see the same record written at t0; the leader never renews again.
        let mut a = Elector::new("a", TIMINGS);
        let mut b = Elector::new("b", TIMINGS);
        let first = a.decide(None, Instant::now(), wall());
        let held = write(&mut a, first, Instant::now());
        assert_eq!(
            b.decide(Some(&held), Instant::now(), wall()),
            Decision::Wait
        );
        for _ in 0..30 {
            tokio::time::advance(Duration::from_millis(500)).await;
            let now = Instant::now();
            let b_takes = matches!(b.decide(Some(&held), now, wall()), Decision::Update(_));
            assert!(!(b_takes && a.is_leader(now)), "two leaders");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_leader_releases_and_the_release_names_nobody() {
        let mut a = Elector::new("a", TIMINGS);
        assert_eq!(a.release(Instant::now(), wall()), None);
        let first = a.decide(None, Instant::now(), wall());
        write(&mut a, first, Instant::now());
        let released = a
            .release(Instant::now(), wall())
            .expect("the leader releases");
        assert_eq!(released.holder_identity, None);
        assert_eq!(released.lease_duration_seconds, Some(1));
        a.step_down();
        assert!(!a.is_leader(Instant::now()));
    }

    #[test]
    fn default_identities_differ_per_process_instance() {
        assert_ne!(default_identity(), default_identity());
    }
}
