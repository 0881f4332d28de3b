//! What the controller reports: ProxyPolicy status and Kubernetes Events.
//!
//! Both are computed here without I/O; the writer sends them.

use std::collections::HashMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use planproxy_crds::condition::{self, Condition};
use planproxy_crds::{ProxyPolicy, ProxyPolicyStatus};
use planproxy_resolve::{PolicyReport, PolicyVerdict, Problem, ProblemKind};
use tokio::time::Instant;

/// The status `policy` should have given the resolver's `report`, or None when
/// its current status already says exactly that.
///
/// `now` stamps a condition whose status changes.
pub fn policy_status(
    policy: &ProxyPolicy,
    report: &PolicyReport,
    now: Time,
) -> Option<ProxyPolicyStatus> {
    let generation = policy.metadata.generation;
    let current = policy.status.clone().unwrap_or_default();
    let mut desired = current.clone();
    let accepted = match &report.verdict {
        PolicyVerdict::Accepted => {
            desired.accepted_spec = Some(policy.spec.clone());
            desired.accepted_generation = generation;
            Condition {
                type_: condition::ACCEPTED.into(),
                status: condition::TRUE.into(),
                reason: condition::reason::ACCEPTED.into(),
                message: "the policy is valid and in force".into(),
                observed_generation: generation,
                last_transition_time: now,
            }
        }
        PolicyVerdict::Invalid(error) => {
            let fallback = match desired.accepted_generation {
                Some(g) => format!("generation {g} stays in force"),
                None => "the policy is not applied".to_owned(),
            };
            Condition {
                type_: condition::ACCEPTED.into(),
                status: condition::FALSE.into(),
                reason: condition::reason::INVALID.into(),
                message: format!("{}: {}; {fallback}", error.field, error.message),
                observed_generation: generation,
                last_transition_time: now,
            }
        }
    };
    condition::set(&mut desired.conditions, accepted);
    desired.observed_generation = generation;
    desired.matched_nodes = i32::try_from(report.matched_nodes).unwrap_or(i32::MAX);
    desired.matched_services = i32::try_from(report.matched_services).unwrap_or(i32::MAX);
    (desired != current).then_some(desired)
}

/// A Kubernetes Event to publish about a problem.
#[derive(Debug, Clone, PartialEq)]
pub struct ProblemEvent {
    /// The object the event is about.
    pub regarding: ObjectReference,
    /// UpperCamelCase reason.
    pub reason: &'static str,
    /// The human-readable note (names the field).
    pub note: String,
}

impl ProblemEvent {
    /// The dedupe key: one pending event per object and field.
    pub fn key(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.regarding.kind.as_deref().unwrap_or_default(),
            self.regarding.namespace.as_deref().unwrap_or_default(),
            self.regarding.name.as_deref().unwrap_or_default(),
            self.reason
        )
    }
}

/// Turns a resolver problem into an event, when its object names a kind we know.
pub fn problem_event(problem: &Problem) -> Option<ProblemEvent> {
    let (kind, rest) = problem.object.split_once(' ')?;
    let (namespace, name) = match rest.split_once('/') {
        Some((ns, name)) => (Some(ns.to_owned()), name),
        None => (None, rest),
    };
    let api_version = match kind {
        "Service" | "Node" => "v1",
        "EndpointSlice" => "discovery.k8s.io/v1",
        "ProxyPolicy" | "ProxyPlan" => "planproxy.dev/v1alpha1",
        _ => return None,
    };
    let reason = match problem.kind {
        ProblemKind::InvalidValue => "InvalidValue",
        ProblemKind::Dangling => "DanglingReference",
        ProblemKind::InvalidPolicy => "InvalidPolicy",
        ProblemKind::Oversized => "Oversized",
    };
    Some(ProblemEvent {
        regarding: ObjectReference {
            api_version: Some(api_version.into()),
            kind: Some(kind.into()),
            namespace,
            name: Some(name.into()),
            ..ObjectReference::default()
        },
        reason,
        note: truncate(format!("{}: {}", problem.field, problem.message), 1024),
    })
}

fn truncate(mut s: String, max: usize) -> String {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Suppresses repeats of the same event within a time window, so a problem that
/// persists across many flushes is reported once per window rather than each time.
#[derive(Debug)]
pub struct EventDedupe {
    window: Duration,
    sent: HashMap<(String, String), Instant>,
}

impl EventDedupe {
    /// Repeats within `window` are suppressed.
    pub fn new(window: Duration) -> Self {
        Self {
            window,
            sent: HashMap::new(),
        }
    }

    /// Whether `event` should be published at `now` (and records it if so).
    pub fn admit(&mut self, event: &ProblemEvent, now: Instant) -> bool {
        let window = self.window;
        self.sent
            .retain(|_, at| now.saturating_duration_since(*at) < window);
        let key = (event.key(), event.note.clone());
        if self.sent.contains_key(&key) {
            return false;
        }
        self.sent.insert(key, now);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::jiff::Timestamp;
    use planproxy_crds::ProxyPolicySpec;
    use planproxy_crds::validate::FieldError;

    fn policy(generation: i64, priority: i32) -> ProxyPolicy {
        let mut p = ProxyPolicy::new(
            "tuning",
            ProxyPolicySpec {
                priority,
                ..ProxyPolicySpec::default()
            },
        );
        p.metadata.generation = Some(generation);
        p
    }

    fn at(second: i64) -> Time {
        Time(Timestamp::from_second(second).expect("valid"))
    }

    fn accepted(nodes: u32, services: u32) -> PolicyReport {
        PolicyReport {
            verdict: PolicyVerdict::Accepted,
            matched_nodes: nodes,
            matched_services: services,
        }
    }

    #[test]
    fn an_accepted_policy_copies_its_spec_and_counts() {
        let p = policy(3, 10);
        let status = policy_status(&p, &accepted(4, 7), at(1)).expect("a new status");
        let cond = condition::find(&status.conditions, condition::ACCEPTED).expect("condition");
        assert_eq!(cond.status, "True");
        assert_eq!(cond.observed_generation, Some(3));
        assert_eq!(status.observed_generation, Some(3));
        assert_eq!((status.matched_nodes, status.matched_services), (4, 7));
        assert_eq!(status.accepted_spec, Some(p.spec.clone()));
        assert_eq!(status.accepted_generation, Some(3));
    }

    #[test]
    fn an_invalid_edit_names_the_field_and_keeps_the_accepted_spec() {
        let mut p = policy(3, 10);
        p.status = policy_status(&p, &accepted(1, 1), at(1));
        let accepted_spec = p.spec.clone();
        p.spec.priority = 5000;
        p.metadata.generation = Some(4);
        let report = PolicyReport {
            verdict: PolicyVerdict::Invalid(FieldError::new(
                "spec.priority",
                "must be between -1000 and 1000",
            )),
            matched_nodes: 1,
            matched_services: 1,
        };
        let status = policy_status(&p, &report, at(2)).expect("a new status");
        let cond = condition::find(&status.conditions, condition::ACCEPTED).expect("condition");
        assert_eq!(cond.status, "False");
        assert_eq!(cond.reason, "Invalid");
        assert!(
            cond.message.starts_with("spec.priority: must be between"),
            "{}",
            cond.message
        );
        assert!(
            cond.message.contains("generation 3 stays in force"),
            "{}",
            cond.message
        );
        assert_eq!(cond.last_transition_time, at(2));
        assert_eq!(status.observed_generation, Some(4));
        assert_eq!(status.accepted_spec, Some(accepted_spec));
        assert_eq!(status.accepted_generation, Some(3));
    }

    #[test]
    fn an_unchanged_report_needs_no_write() {
        let mut p = policy(1, 0);
        p.status = policy_status(&p, &accepted(2, 2), at(1));
        assert_eq!(policy_status(&p, &accepted(2, 2), at(99)), None);
        // A new generation must be reported even when nothing else changed.
        p.metadata.generation = Some(2);
        let status = policy_status(&p, &accepted(2, 2), at(99)).expect("new generation");
        let cond = condition::find(&status.conditions, condition::ACCEPTED).expect("condition");
        assert_eq!(cond.last_transition_time, at(1), "status did not flip");
    }

    #[test]
    fn problems_become_events_on_the_named_object() {
        let problem = Problem {
            object: "Service default/web".into(),
            field: "spec.clusterIPs[1]".into(),
            message: "\"10.0.0.300\" is not an IP address; skipped".into(),
            kind: ProblemKind::InvalidValue,
        };
        let event = problem_event(&problem).expect("known kind");
        assert_eq!(event.regarding.kind.as_deref(), Some("Service"));
        assert_eq!(event.regarding.namespace.as_deref(), Some("default"));
        assert_eq!(event.regarding.name.as_deref(), Some("web"));
        assert_eq!(event.reason, "InvalidValue");
        assert!(event.note.starts_with("spec.clusterIPs[1]: "));

        let node = Problem {
            object: "Node worker-1".into(),
            ..problem.clone()
        };
        let event = problem_event(&node).expect("known kind");
        assert_eq!(event.regarding.namespace, None);
        assert_eq!(event.regarding.api_version.as_deref(), Some("v1"));

        let unknown = Problem {
            object: "Gadget x".into(),
            ..problem
        };
        assert_eq!(problem_event(&unknown), None);
    }

    #[test]
    fn repeated_events_are_suppressed_within_the_window() {
        let problem = Problem {
            object: "Service default/web".into(),
            field: "spec.clusterIPs[1]".into(),
            message: "bad".into(),
            kind: ProblemKind::InvalidValue,
        };
        let event = problem_event(&problem).expect("known kind");
        let mut dedupe = EventDedupe::new(Duration::from_secs(600));
        let t0 = Instant::now();
        assert!(dedupe.admit(&event, t0));
        assert!(!dedupe.admit(&event, t0 + Duration::from_secs(599)));
        assert!(dedupe.admit(&event, t0 + Duration::from_secs(600)));
        let other = ProblemEvent {
            note: "spec.clusterIPs[1]: worse".into(),
            ..event
        };
        assert!(dedupe.admit(&other, t0 + Duration::from_secs(601)));
    }
}
