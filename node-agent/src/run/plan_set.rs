//! Assembling a node's shards into the plan the agent may program.
//!
//! The controller writes a node's plan as shards; while it rewrites them (a new
//! shard count, a new layout generation) the agent can see a mix. Only a
//! complete set is programmed: every index `0..count` present exactly once, all
//! with the same `count`, `generation` and settings. Anything else keeps the
//! kernel's current rules and reports Pending, as ResourceSlice pools do.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use planproxy_crds::ProxyPlan;
use planproxy_crds::v1alpha1::NodeSettings;

/// kube-proxy's defaults, used when a plan carries a period the agent cannot parse
/// (the controller validates them, so this only guards against a bad write).
pub const DEFAULT_MIN_SYNC_PERIOD: Duration = Duration::from_secs(1);
/// See [`DEFAULT_MIN_SYNC_PERIOD`].
pub const DEFAULT_SYNC_PERIOD: Duration = Duration::from_secs(30);

/// The node's shards of the newest layout generation, and whether they form a
/// complete plan.
#[derive(Clone, Debug, Default)]
pub struct NodePlan {
    /// Shards of the newest generation, sorted by index. Older generations are
    /// left out: the controller is about to delete them.
    pub shards: Vec<Arc<ProxyPlan>>,
    /// Why the shards cannot be programmed yet; `None` when they are complete.
    pub incomplete: Option<String>,
}

impl NodePlan {
    /// Whether the shards form a complete plan.
    pub fn is_complete(&self) -> bool {
        self.incomplete.is_none() && !self.shards.is_empty()
    }

    /// The node-wide settings (every shard of a complete plan carries the same).
    pub fn settings(&self) -> Option<&NodeSettings> {
        self.shards.first().map(|shard| &shard.spec.settings)
    }

    /// The sync periods the plan asks for, with kube-proxy's defaults for values
    /// that do not parse.
    pub fn periods(&self) -> (Duration, Duration) {
        let Some(settings) = self.settings() else {
            return (DEFAULT_MIN_SYNC_PERIOD, DEFAULT_SYNC_PERIOD);
        };
        let parse = |s: &str, default| planproxy_crds::duration::parse(s).unwrap_or(default);
        (
            parse(&settings.min_sync_period, DEFAULT_MIN_SYNC_PERIOD),
            parse(&settings.sync_period, DEFAULT_SYNC_PERIOD),
        )
    }
}

/// Groups `objects` (this node's ProxyPlans, in any order) into the plan to program.
pub fn assemble(node_name: &str, objects: &[Arc<ProxyPlan>]) -> NodePlan {
    let mine: Vec<&Arc<ProxyPlan>> = objects
        .iter()
        .filter(|plan| plan.spec.node_name == node_name)
        .collect();
    let Some(generation) = mine.iter().map(|plan| plan.spec.shard.generation).max() else {
        return NodePlan {
            shards: Vec::new(),
            incomplete: Some(format!("no ProxyPlan for node {node_name} yet")),
        };
    };
    let mut shards: Vec<Arc<ProxyPlan>> = mine
        .into_iter()
        .filter(|plan| plan.spec.shard.generation == generation)
        .cloned()
        .collect();
    shards.sort_by_key(|plan| plan.spec.shard.index);
    let incomplete = why_incomplete(&shards, generation);
    NodePlan { shards, incomplete }
}

fn why_incomplete(shards: &[Arc<ProxyPlan>], generation: i64) -> Option<String> {
    let counts: Vec<u32> = {
        let mut counts: Vec<u32> = shards.iter().map(|plan| plan.spec.shard.count).collect();
        counts.sort_unstable();
        counts.dedup();
        counts
    };
    let [count] = counts[..] else {
        return Some(format!(
            "shards of generation {generation} disagree on the shard count ({counts:?})"
        ));
    };
    let mut by_index: BTreeMap<u32, usize> = BTreeMap::new();
    for plan in shards {
        *by_index.entry(plan.spec.shard.index).or_default() += 1;
    }
    if let Some((index, _)) = by_index.iter().find(|(_, n)| **n > 1) {
        return Some(format!(
            "generation {generation} has more than one shard with index {index}"
        ));
    }
    let missing: Vec<u32> = (0..count)
        .filter(|index| !by_index.contains_key(index))
        .collect();
    if !missing.is_empty() {
        return Some(format!(
            "waiting for shards {} of {count} (generation {generation})",
            list(&missing)
        ));
    }
    if let Some(out_of_range) = by_index.keys().find(|index| **index >= count) {
        return Some(format!(
            "shard index {out_of_range} is out of range for {count} shards (generation {generation})"
        ));
    }
    let settings = &shards[0].spec.settings;
    if shards.iter().any(|plan| &plan.spec.settings != settings) {
        return Some(format!(
            "shards of generation {generation} disagree on node settings (the controller is rewriting them)"
        ));
    }
    None
}

fn list(indexes: &[u32]) -> String {
    const SHOWN: usize = 8;
    let mut out: Vec<String> = indexes.iter().take(SHOWN).map(u32::to_string).collect();
    if indexes.len() > SHOWN {
        out.push(format!("and {} more", indexes.len() - SHOWN));
    }
    out.join(", ")
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use planproxy_crds::ProxyPlanSpec;
    use planproxy_crds::v1alpha1::ShardInfo;

    pub(crate) fn mk_shard(node: &str, index: u32, count: u32, generation: i64) -> Arc<ProxyPlan> {
        let name = if count == 1 {
            node.to_owned()
        } else {
            format!("{node}-{index}")
        };
        let mut plan = ProxyPlan::new(
            &name,
            ProxyPlanSpec {
                node_name: node.to_owned(),
                shard: ShardInfo {
                    index,
                    count,
                    generation,
                },
                ..Default::default()
            },
        );
        plan.spec.settings.min_sync_period = "1s".into();
        plan.spec.settings.sync_period = "30s".into();
        plan.metadata.generation = Some(1);
        Arc::new(plan)
    }

    fn indexes(plan: &NodePlan) -> Vec<u32> {
        plan.shards.iter().map(|s| s.spec.shard.index).collect()
    }

    #[test]
    fn all_shards_of_one_generation_form_a_complete_plan_sorted_by_index() {
        let plan = assemble(
            "n1",
            &[
                mk_shard("n1", 2, 3, 4),
                mk_shard("n1", 0, 3, 4),
                mk_shard("n1", 1, 3, 4),
            ],
        );
        assert!(plan.is_complete(), "{:?}", plan.incomplete);
        assert_eq!(indexes(&plan), [0, 1, 2]);
    }

    #[test]
    fn missing_index_keeps_the_plan_incomplete_and_names_it() {
        let plan = assemble("n1", &[mk_shard("n1", 0, 3, 4), mk_shard("n1", 2, 3, 4)]);
        assert!(!plan.is_complete());
        assert_eq!(
            plan.incomplete.as_deref(),
            Some("waiting for shards 1 of 3 (generation 4)")
        );
    }

    #[test]
    fn newest_generation_wins_even_when_incomplete() {
        // The old single-shard layout is still there while the controller writes the
        // new two-shard one: the agent must not program the old one again, nor mix.
        let plan = assemble("n1", &[mk_shard("n1", 0, 1, 1), mk_shard("n1", 1, 2, 2)]);
        assert!(!plan.is_complete());
        assert_eq!(indexes(&plan), [1]);
        assert_eq!(plan.shards[0].spec.shard.generation, 2);
    }

    #[test]
    fn shards_disagreeing_on_count_are_incomplete() {
        let plan = assemble("n1", &[mk_shard("n1", 0, 2, 3), mk_shard("n1", 1, 3, 3)]);
        assert!(
            plan.incomplete
                .as_deref()
                .is_some_and(|why| why.contains("shard count"))
        );
    }

    #[test]
    fn duplicate_index_is_incomplete() {
        let a = mk_shard("n1", 0, 1, 3);
        let mut b = (*a).clone();
        b.metadata.name = Some("n1-dup".into());
        let plan = assemble("n1", &[a, Arc::new(b)]);
        assert!(
            plan.incomplete
                .as_deref()
                .is_some_and(|why| why.contains("more than one shard"))
        );
    }

    #[test]
    fn shards_disagreeing_on_settings_are_incomplete() {
        let a = mk_shard("n1", 0, 2, 3);
        let mut b = (*mk_shard("n1", 1, 2, 3)).clone();
        b.spec.settings.masquerade_bit = 15;
        let plan = assemble("n1", &[a, Arc::new(b)]);
        assert!(
            plan.incomplete
                .as_deref()
                .is_some_and(|why| why.contains("settings"))
        );
    }

    #[test]
    fn other_nodes_plans_are_ignored() {
        let plan = assemble("n1", &[mk_shard("n2", 0, 1, 1)]);
        assert!(!plan.is_complete());
        assert!(plan.shards.is_empty());
    }

    #[test]
    fn no_plan_is_incomplete_so_rules_are_kept() {
        let plan = assemble("n1", &[]);
        assert!(!plan.is_complete());
    }

    #[test]
    fn unparsable_periods_fall_back_to_kube_proxy_defaults() {
        let mut shard = (*mk_shard("n1", 0, 1, 1)).clone();
        shard.spec.settings.min_sync_period = "soon".into();
        shard.spec.settings.sync_period = "1m".into();
        let plan = assemble("n1", &[Arc::new(shard)]);
        assert_eq!(
            plan.periods(),
            (DEFAULT_MIN_SYNC_PERIOD, Duration::from_secs(60))
        );
    }

    #[test]
    fn long_missing_lists_are_shortened() {
        let plan = assemble("n1", &[mk_shard("n1", 0, 20, 1)]);
        assert_eq!(
            plan.incomplete.as_deref(),
            Some("waiting for shards 1, 2, 3, 4, 5, 6, 7, 8, and 11 more of 20 (generation 1)")
        );
    }
}
