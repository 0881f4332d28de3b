//! Reading ProxyPlans the way an operator would (`kubectl get proxyplans`).

use planproxy_crds::ProxyPlan;
use planproxy_crds::condition::{self, PROGRAMMED, TRUE};
use planproxy_crds::labels::SPEC_HASH_ANNOTATION;

/// `Ok` when every node in `nodes` has at least one plan, and every plan is
/// `Programmed=True` for its current generation with `status.appliedHash`
/// equal to the `planproxy.dev/spec-hash` annotation; otherwise why not.
pub fn all_programmed(plans: &[ProxyPlan], nodes: &[String]) -> Result<(), String> {
    for node in nodes {
        if !plans.iter().any(|p| &p.spec.node_name == node) {
            return Err(format!("{node} has no ProxyPlan"));
        }
    }
    // Only the listed nodes' plans: a node another proxy programs (a
    // reference node) still has a plan, which nobody reports on.
    for plan in plans.iter().filter(|p| nodes.contains(&p.spec.node_name)) {
        let name = plan.metadata.name.as_deref().unwrap_or("?");
        let status = plan
            .status
            .as_ref()
            .ok_or_else(|| format!("{name} has no status"))?;
        let programmed = condition::find(&status.conditions, PROGRAMMED)
            .ok_or_else(|| format!("{name} has no Programmed condition"))?;
        if programmed.status != TRUE {
            return Err(format!(
                "{name} Programmed={} ({}: {})",
                programmed.status, programmed.reason, programmed.message
            ));
        }
        if programmed.observed_generation.is_some()
            && programmed.observed_generation != plan.metadata.generation
        {
            return Err(format!(
                "{name} Programmed for generation {:?}, current {:?}",
                programmed.observed_generation, plan.metadata.generation
            ));
        }
        let wanted = plan
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(SPEC_HASH_ANNOTATION))
            .ok_or_else(|| format!("{name} has no {SPEC_HASH_ANNOTATION} annotation"))?;
        if status.applied_hash.as_ref() != Some(wanted) {
            return Err(format!(
                "{name} applied {:?}, spec hash {wanted}",
                status.applied_hash
            ));
        }
    }
    Ok(())
}

/// The `namespace/name` of every service in a node's plans.
pub fn services_of(plans: &[ProxyPlan], node: &str) -> Vec<String> {
    let mut services: Vec<String> = plans
        .iter()
        .filter(|p| p.spec.node_name == node)
        .flat_map(|p| p.spec.service_ports.iter())
        .map(|sp| format!("{}/{}", sp.namespace, sp.name))
        .collect();
    services.sort();
    services.dedup();
    services
}

/// `Ok` when `service` (`namespace/name`) is in every node's plans
/// (`present`) or in none of them.
pub fn service_presence(
    plans: &[ProxyPlan],
    nodes: &[String],
    service: &str,
    present: bool,
) -> Result<(), String> {
    for node in nodes {
        let has = services_of(plans, node).iter().any(|s| s == service);
        if has != present {
            return Err(format!(
                "{service} {} {node}'s plans",
                if present {
                    "is not yet in"
                } else {
                    "is still in"
                }
            ));
        }
    }
    Ok(())
}
