//! `metav1.Condition` helpers: the condition types and reasons planproxy reports.

pub use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

/// ProxyPolicy: the policy parsed and validated and is in force.
pub const ACCEPTED: &str = "Accepted";
/// ProxyPlan: the node's kernel holds the rules of this shard's current generation.
pub const PROGRAMMED: &str = "Programmed";
/// ProxyPlan: the last attempt to program the node failed; the previous rules still serve.
pub const DEGRADED: &str = "Degraded";

/// Condition status values, as the API spells them.
pub const TRUE: &str = "True";
/// See [`TRUE`].
pub const FALSE: &str = "False";
/// See [`TRUE`].
pub const UNKNOWN: &str = "Unknown";

/// Reasons used on the conditions above (UpperCamelCase, as API conventions require).
pub mod reason {
    /// The policy is valid and in force.
    pub const ACCEPTED: &str = "Accepted";
    /// A field of the policy is invalid; the message names it.
    pub const INVALID: &str = "Invalid";
    /// The node's rules match the plan.
    pub const PROGRAMMED: &str = "Programmed";
    /// The agent has not yet applied this plan (or these shards are incomplete).
    pub const PENDING: &str = "Pending";
    /// iptables-restore (or another kernel operation) refused the rules.
    pub const APPLY_FAILED: &str = "ApplyFailed";
    /// The plan could not be turned into rules (an invalid value reached the agent).
    pub const INVALID_PLAN: &str = "InvalidPlan";
    /// The rules are programmed, but a node setting the plan needs (a sysctl)
    /// could not be made; the message says which and what it means.
    pub const SYSCTL_FAILED: &str = "SysctlFailed";
    /// Everything applied cleanly.
    pub const HEALTHY: &str = "Healthy";
}

/// Finds a condition by type.
pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Sets `new` into `conditions`, keeping the old `lastTransitionTime` when the
/// status did not change (as API conventions require).
pub fn set(conditions: &mut Vec<Condition>, new: Condition) {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(existing) => {
            let transition = if existing.status == new.status {
                existing.last_transition_time.clone()
            } else {
                new.last_transition_time.clone()
            };
            *existing = Condition {
                last_transition_time: transition,
                ..new
            };
        }
        None => conditions.push(new),
    }
}
