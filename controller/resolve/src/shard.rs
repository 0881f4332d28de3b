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

use std::ops::RangeInclusive;

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

/// The ProxyPlan object name of a shard.
pub fn shard_name(node: &str, index: u32, count: u32) -> String {
    if count <= 1 {
        node.to_owned()
    } else {
        format!("{node}-{index}")
    }
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
