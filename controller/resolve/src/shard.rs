//! Splitting a node's plan into shards.
//!
//! A service's place is decided by a stable hash of `namespace/name`: with `2^k`
//! shards, shard `i` holds the services whose hash has `i` in its top `k` bits. So
//! every shard is a contiguous range of hash values, doubling the count splits each
//! shard in two, and one service's change touches exactly one shard per node.
//!
//! The count follows the plan's size with hysteresis: it grows when shards average
//! more than the target size and shrinks only when they average under a quarter of
//! it, so a plan near a boundary does not flap between layouts.
//!
//! A node's shards are the objects `<node>` (one shard) or `<node>-<index>`, unless
//! that would reuse another node's name; then `<node>-<hash>-<index>`
//! ([`disambiguated_stems`]).

use std::collections::{BTreeMap, BTreeSet};
use std::ops::{Bound, RangeInclusive};

use planproxy_crds::ProxyPlanSpec;
use sha2::{Digest, Sha256};

use crate::ingest::ObjectKey;
use crate::{PlanShard, ResolveOptions};

/// The most shards one node's plan may have (the ProxyPlan schema's bound).
pub const MAX_SHARDS: u32 = 4096;

/// The stable hash of a service: the first 8 bytes of SHA-256 of `namespace/name`.
pub fn service_hash(key: &ObjectKey) -> u64 {
    let digest = Sha256::digest(format!("{}/{}", key.namespace, key.name).as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

fn bits(count: u32) -> u32 {
    count.max(1).trailing_zeros()
}

/// The shard a service hash falls into among `count` (a power of two) shards.
pub fn shard_index(hash: u64, count: u32) -> u32 {
    match bits(count) {
        0 => 0,
        // `b` is at most 12 (4096 shards), so the shifted value fits a u32.
        b => u32::try_from(hash >> (64 - b)).unwrap_or(u32::MAX),
    }
}

/// The hash values shard `index` of `count` holds.
pub fn hash_range(index: u32, count: u32) -> RangeInclusive<u64> {
    match bits(count) {
        0 => 0..=u64::MAX,
        b => {
            let shift = 64 - b;
            let start = u64::from(index) << shift;
            start..=start | (u64::MAX >> b)
        }
    }
}

/// The ProxyPlan object name of a shard: the stem alone for a single shard,
/// `<stem>-<index>` otherwise. The stem is the node's name unless
/// [`disambiguated_stems`] gives the node another one.
pub fn shard_name(stem: &str, index: u32, count: u32) -> String {
    if count <= 1 {
        stem.to_owned()
    } else {
        format!("{stem}-{index}")
    }
}

/// The longest object name the API server accepts (a DNS subdomain).
pub const MAX_NAME_LEN: usize = 253;

/// Hex digits of the node-name hash in a disambiguated stem.
const STEM_HASH_LEN: usize = 8;

/// The longest node-name prefix a disambiguated stem keeps, so that
/// `<prefix>-<hash>-<index>` stays within [`MAX_NAME_LEN`] for every index below
/// [`MAX_SHARDS`] (at most four digits).
const MAX_STEM_PREFIX_LEN: usize = MAX_NAME_LEN - (1 + STEM_HASH_LEN) - (1 + 4);

/// The nodes whose shards cannot be named `<node>-<index>`, with the stem their
/// names use instead; every other node's stem is its own name.
///
/// `nodes` holds every node that has a plan, with its shard count. Object names
/// must be unique across all nodes, yet the plain form is ambiguous: node `worker`
/// with two shards and node `worker-1` with one would both own `worker-1`. So a
/// single-shard node is always named after itself (every node name stays reserved
/// for it), and a multi-shard node keeps `<node>-<index>` only when none of those
/// names is another node's name and all fit [`MAX_NAME_LEN`]. Otherwise it uses
/// the stem `<node>-<hash>` (the first 8 hex digits of SHA-256 of the node name;
/// a very long node name is cut to fit first), re-hashed with a salt in the
/// unlikely case that stem is itself a node name, could collide with a node name,
/// or is already another node's stem.
///
/// Why that is collision-free: indexes are decimal and contain no `-`, so
/// `<a>-<i>` equals `<b>-<j>` only when `a == b`. Plain stems are node names
/// (distinct); a disambiguated stem is never a node name nor another node's stem;
/// and no multi-shard name is a node name. Nodes are visited in name order, so the
/// result depends only on `nodes`, not on how they were built.
pub fn disambiguated_stems<T>(
    nodes: &BTreeMap<String, T>,
    count_of: impl Fn(&T) -> u32,
) -> BTreeMap<String, String> {
    let mut stems = BTreeMap::new();
    let mut taken: BTreeSet<String> = BTreeSet::new();
    for (node, value) in nodes {
        let count = count_of(value);
        if count <= 1 || plain_names_are_free(node, count, nodes) {
            continue;
        }
        let stem = (1..=u32::MAX)
            .map(|salt| hashed_stem(node, salt))
            .find(|stem| {
                !nodes.contains_key(stem)
                    && !taken.contains(stem)
                    && !names_a_node(stem, count, nodes)
            })
            // Unreachable: only finitely many stems are ever excluded.
            .unwrap_or_else(|| hashed_stem(node, 1));
        taken.insert(stem.clone());
        stems.insert(node.clone(), stem);
    }
    stems
}

/// The stem a node's shards would use with `count` shards, judged against the
/// node names alone (not against other nodes' stems). For naming shards whose
/// real names the resolver never saw (a layout seeded from existing objects).
pub fn stem_alone<T>(node: &str, count: u32, nodes: &BTreeMap<String, T>) -> String {
    if count <= 1 || plain_names_are_free(node, count, nodes) {
        return node.to_owned();
    }
    (1..=u32::MAX)
        .map(|salt| hashed_stem(node, salt))
        .find(|stem| !nodes.contains_key(stem) && !names_a_node(stem, count, nodes))
        .unwrap_or_else(|| hashed_stem(node, 1))
}

fn plain_names_are_free<T>(node: &str, count: u32, nodes: &BTreeMap<String, T>) -> bool {
    let longest = shard_name(node, count.saturating_sub(1), count);
    longest.len() <= MAX_NAME_LEN && !names_a_node(node, count, nodes)
}

/// Whether some `<stem>-<index>` with `index < count` is the name of a node.
fn names_a_node<T>(stem: &str, count: u32, nodes: &BTreeMap<String, T>) -> bool {
    let prefix = format!("{stem}-");
    nodes
        .range::<str, _>((Bound::Included(prefix.as_str()), Bound::Unbounded))
        .map(|(name, _)| name)
        .take_while(|name| name.starts_with(&prefix))
        .any(|name| {
            let suffix = &name[prefix.len()..];
            suffix
                .parse::<u32>()
                .is_ok_and(|index| index < count && index.to_string() == suffix)
        })
}

/// `<node, cut to fit>-<8 hex digits>`: salt 1 hashes the node name alone.
fn hashed_stem(node: &str, salt: u32) -> String {
    let input = if salt == 1 {
        node.to_owned()
    } else {
        format!("{node}#{salt}")
    };
    let digest = Sha256::digest(input.as_bytes());
    let hash: String = digest[..STEM_HASH_LEN / 2]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut cut = node.len().min(MAX_STEM_PREFIX_LEN);
    while !node.is_char_boundary(cut) {
        cut -= 1;
    }
    // A DNS label may not end in `-`, nor may a name have an empty label.
    let prefix = node[..cut].trim_end_matches(['-', '.']);
    format!("{prefix}-{hash}")
}

/// The size and contents of a built shard, as the count decision needs them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShardSize {
    /// JSON bytes of the spec.
    pub bytes: usize,
    /// How many services it holds.
    pub services: usize,
}

/// The shard count a plan should have, given its current count and the size of
/// each of its shards at that count.
pub fn next_count(current: u32, shards: &[ShardSize], options: &ResolveOptions) -> u32 {
    let current = current.clamp(1, MAX_SHARDS);
    let target = options.shard_target_bytes.max(1);
    let total: usize = shards.iter().map(|s| s.bytes).sum();
    let current_capacity = target.saturating_mul(current as usize);
    let needed = u32::try_from(total.div_ceil(target))
        .unwrap_or(MAX_SHARDS)
        .clamp(1, MAX_SHARDS)
        .next_power_of_two()
        .min(MAX_SHARDS);
    let mut by_size = if total > current_capacity || total < current_capacity / 4 {
        needed
    } else {
        current
    };
    // Shrinking merges runs of neighbouring shards (their hash ranges are
    // adjacent); never merge past the hard cap.
    while by_size < current
        && largest_merged(shards, (current / by_size) as usize) > options.shard_max_bytes
    {
        by_size *= 2;
    }
    // A shard over the hard cap must be split if splitting can help (it holds more
    // than one service), whatever the average says.
    let oversized = shards
        .iter()
        .any(|s| s.bytes > options.shard_max_bytes && s.services > 1);
    if by_size <= current && oversized && current < MAX_SHARDS {
        current * 2
    } else {
        by_size
    }
}

fn largest_merged(shards: &[ShardSize], run: usize) -> usize {
    shards
        .chunks(run.max(1))
        .map(|c| c.iter().map(|s| s.bytes).sum())
        .max()
        .unwrap_or(0)
}

/// Serialises a shard once, for both its size and its hash.
pub fn finish(name: String, spec: ProxyPlanSpec) -> (PlanShard, usize) {
    let json = serde_json::to_vec(&spec).unwrap_or_default();
    let hash = json_hash(&json);
    (PlanShard { name, spec, hash }, json.len())
}

/// The hash of a spec's JSON form: the same function as `planproxy_crds::spec_hash`
/// (a test holds them equal), computed on bytes already serialised.
fn json_hash(json: &[u8]) -> String {
    let digest = Sha256::digest(json);
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use planproxy_crds::v1alpha1::ServicePortPlan;

    #[test]
    fn finish_hashes_exactly_like_spec_hash() {
        let spec = ProxyPlanSpec {
            node_name: "worker-1".into(),
            service_ports: vec![ServicePortPlan {
                namespace: "default".into(),
                name: "web".into(),
                port: 80,
                ..Default::default()
            }],
            ..Default::default()
        };
        let (shard, bytes) = finish("worker-1".into(), spec.clone());
        assert_eq!(shard.hash, planproxy_crds::spec_hash(&spec));
        assert_eq!(bytes, serde_json::to_vec(&spec).unwrap().len());
    }

    #[test]
    fn shard_names_carry_the_index_only_when_split() {
        assert_eq!(shard_name("worker-1", 0, 1), "worker-1");
        assert_eq!(shard_name("worker-1", 3, 4), "worker-1-3");
    }

    fn nodes(names: &[&str], count: u32) -> BTreeMap<String, u32> {
        names.iter().map(|n| ((*n).to_owned(), count)).collect()
    }

    #[test]
    fn only_a_split_node_whose_shard_names_are_node_names_is_disambiguated() {
        let mut cluster = nodes(&["worker", "worker-1", "other"], 1);
        assert!(disambiguated_stems(&cluster, |c| *c).is_empty());
        cluster.insert("worker".into(), 2);
        cluster.insert("other".into(), 2);
        let stems = disambiguated_stems(&cluster, |c| *c);
        assert_eq!(stems.keys().collect::<Vec<_>>(), ["worker"]);
        assert_eq!(stems["worker"], hashed_stem("worker", 1));
        // Two shards never reach `worker-2`'s name; four do.
        let mut cluster = nodes(&["worker", "worker-2"], 1);
        cluster.insert("worker".into(), 2);
        assert!(disambiguated_stems(&cluster, |c| *c).is_empty());
        cluster.insert("worker".into(), 4);
        assert!(disambiguated_stems(&cluster, |c| *c).contains_key("worker"));
    }

    #[test]
    fn a_disambiguated_stem_never_takes_a_node_name() {
        // A node already named like worker's hashed stem: the stem is re-salted.
        let hashed = hashed_stem("worker", 1);
        let mut cluster = nodes(&["worker-0", hashed.as_str()], 1);
        cluster.insert("worker".into(), 2);
        let stems = disambiguated_stems(&cluster, |c| *c);
        assert_eq!(stems["worker"], hashed_stem("worker", 2));
        assert_ne!(stems["worker"], hashed);
    }

    #[test]
    fn shard_names_of_very_long_node_names_are_cut_to_fit_and_stay_distinct() {
        let a = format!("{}.example", "a".repeat(245));
        let b = format!("{}.other", "a".repeat(247));
        assert_eq!((a.len(), b.len()), (MAX_NAME_LEN, MAX_NAME_LEN));
        let cluster = nodes(&[a.as_str(), b.as_str()], MAX_SHARDS);
        let stems = disambiguated_stems(&cluster, |c| *c);
        assert_ne!(stems[&a], stems[&b]);
        for stem in stems.values() {
            let longest = shard_name(stem, MAX_SHARDS - 1, MAX_SHARDS);
            assert!(longest.len() <= MAX_NAME_LEN, "{}", longest.len());
            assert!(!stem.contains("--") && !stem.contains(".-"), "{stem}");
        }
    }

    #[test]
    fn each_hash_lies_in_the_range_of_its_shard() {
        for count in [1, 2, 4, 64, MAX_SHARDS] {
            for hash in [0, 1, u64::MAX / 3, u64::MAX / 2, u64::MAX / 2 + 1, u64::MAX] {
                let index = shard_index(hash, count);
                assert!(index < count);
                assert!(hash_range(index, count).contains(&hash), "{hash} {count}");
            }
        }
    }

    #[test]
    fn doubling_the_count_splits_each_shard_in_two() {
        for hash in [7u64, u64::MAX / 5, u64::MAX - 9] {
            assert_eq!(shard_index(hash, 8) / 2, shard_index(hash, 4));
        }
    }

    fn sizes(bytes: &[usize]) -> Vec<ShardSize> {
        bytes
            .iter()
            .map(|b| ShardSize {
                bytes: *b,
                services: 10,
            })
            .collect()
    }

    #[test]
    fn count_grows_above_target_and_shrinks_only_below_a_quarter() {
        let options = ResolveOptions {
            shard_target_bytes: 100,
            shard_max_bytes: 1000,
        };
        assert_eq!(next_count(1, &sizes(&[100]), &options), 1);
        assert_eq!(next_count(1, &sizes(&[101]), &options), 2);
        assert_eq!(next_count(1, &sizes(&[350]), &options), 4);
        // Hysteresis: 4 shards holding 120 bytes stay at 4 (above a quarter of 400)…
        assert_eq!(next_count(4, &sizes(&[30, 30, 30, 30]), &options), 4);
        // …and shrink to what the size needs once under a quarter.
        assert_eq!(next_count(4, &sizes(&[20, 20, 20, 20]), &options), 1);
    }

    #[test]
    fn a_shard_over_the_hard_cap_is_split_when_it_can_be() {
        let options = ResolveOptions {
            shard_target_bytes: 1000,
            shard_max_bytes: 1500,
        };
        let lopsided = [
            ShardSize {
                bytes: 1600,
                services: 2,
            },
            ShardSize {
                bytes: 10,
                services: 1,
            },
        ];
        assert_eq!(next_count(2, &lopsided, &options), 4);
        let single = [
            ShardSize {
                bytes: 1600,
                services: 1,
            },
            ShardSize {
                bytes: 10,
                services: 1,
            },
        ];
        assert_eq!(next_count(2, &single, &options), 2);
    }

    #[test]
    fn shrinking_never_merges_shards_past_the_hard_cap() {
        let options = ResolveOptions {
            shard_target_bytes: 100_000,
            shard_max_bytes: 1000,
        };
        // Tiny against the target, but two neighbours together exceed the cap.
        assert_eq!(next_count(4, &sizes(&[600, 600, 100, 100]), &options), 4);
        assert_eq!(next_count(4, &sizes(&[400, 400, 150, 100]), &options), 2);
        assert_eq!(next_count(4, &sizes(&[400, 400, 100, 100]), &options), 1);
    }
}
