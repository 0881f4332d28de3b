//! The queue of writes waiting for the write budget.
//!
//! Keyed by object, so it holds only the latest content of each (an object changed
//! ten times while waiting is written once). Writes leave newest change first: a
//! fresh endpoint change is what a user is waiting for, while a backlog from a big
//! re-layout can trickle out. So that no entry starves under a steady stream of new
//! changes, an entry that has waited longer than the age cap is promoted and leaves
//! before any fresh one (oldest first among promoted entries).

use std::collections::{BTreeSet, HashMap};
use std::hash::Hash;
use std::time::Duration;

use tokio::time::Instant;

/// A write waiting in the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued<V> {
    /// The latest content.
    pub value: V,
    /// When the change behind the oldest content merged into this entry was
    /// received (for the change-to-write latency).
    pub since: Instant,
}

#[derive(Debug)]
struct Entry<V> {
    queued: Queued<V>,
    /// When the entry entered the queue (not moved by later changes): its age.
    entered: Instant,
    /// When its content last changed: its freshness.
    changed: Instant,
    seq: u64,
}

/// Writes keyed by object, newest change first, with promotion by age.
#[derive(Debug)]
pub struct WriteQueue<K, V> {
    age_cap: Duration,
    entries: HashMap<K, Entry<V>>,
    by_age: BTreeSet<(Instant, u64, K)>,
    by_freshness: BTreeSet<(Instant, u64, K)>,
    next_seq: u64,
}

impl<K: Clone + Eq + Hash + Ord, V> WriteQueue<K, V> {
    /// An empty queue promoting entries older than `age_cap`.
    pub fn new(age_cap: Duration) -> Self {
        Self {
            age_cap,
            entries: HashMap::new(),
            by_age: BTreeSet::new(),
            by_freshness: BTreeSet::new(),
            next_seq: 0,
        }
    }

    /// Queues `value` for `key`, replacing older content. `since` is when the
    /// change was received; the entry keeps the earliest one.
    pub fn push(&mut self, key: K, value: V, since: Instant, now: Instant) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let (entered, since) = match self.remove_entry(&key) {
            Some(old) => (old.entered, old.queued.since.min(since)),
            None => (now, since),
        };
        self.by_age.insert((entered, seq, key.clone()));
        self.by_freshness.insert((now, seq, key.clone()));
        self.entries.insert(
            key,
            Entry {
                queued: Queued { value, since },
                entered,
                changed: now,
                seq,
            },
        );
    }

    /// Takes the next write: the oldest entry past the age cap, else the most
    /// recently changed one.
    pub fn pop(&mut self, now: Instant) -> Option<(K, Queued<V>)> {
        let (entered, _, key) = self.by_age.first()?.clone();
        let key = if now.saturating_duration_since(entered) >= self.age_cap {
            key
        } else {
            self.by_freshness.last()?.2.clone()
        };
        let entry = self.remove_entry(&key)?;
        Some((key, entry.queued))
    }

    /// Drops the entry for `key`, returning its content.
    pub fn remove(&mut self, key: &K) -> Option<Queued<V>> {
        self.remove_entry(key).map(|e| e.queued)
    }

    /// The content waiting for `key`.
    pub fn get(&self, key: &K) -> Option<&Queued<V>> {
        self.entries.get(key).map(|e| &e.queued)
    }

    /// Number of waiting writes.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn remove_entry(&mut self, key: &K) -> Option<Entry<V>> {
        let entry = self.entries.remove(key)?;
        self.by_age.remove(&(entry.entered, entry.seq, key.clone()));
        self.by_freshness
            .remove(&(entry.changed, entry.seq, key.clone()));
        Some(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn newest_change_leaves_first() {
        let t0 = Instant::now();
        let mut q = WriteQueue::new(secs(30));
        q.push("a", 1, t0, t0);
        q.push("b", 2, t0 + secs(1), t0 + secs(1));
        q.push("c", 3, t0 + secs(2), t0 + secs(2));
        let order: Vec<_> = std::iter::from_fn(|| q.pop(t0 + secs(3)).map(|(k, _)| k)).collect();
        assert_eq!(order, ["c", "b", "a"]);
    }

    #[test]
    fn a_key_holds_only_its_latest_content_and_earliest_receipt() {
        let t0 = Instant::now();
        let mut q = WriteQueue::new(secs(30));
        q.push("a", 1, t0, t0);
        q.push("a", 2, t0 + secs(1), t0 + secs(1));
        assert_eq!(q.len(), 1);
        let (key, queued) = q.pop(t0 + secs(2)).expect("one entry");
        assert_eq!((key, queued.value), ("a", 2));
        assert_eq!(queued.since, t0);
        assert!(q.is_empty());
    }

    #[test]
    fn changing_an_entry_makes_it_fresh_again() {
        let t0 = Instant::now();
        let mut q = WriteQueue::new(secs(30));
        q.push("a", 1, t0, t0);
        q.push("b", 1, t0 + secs(1), t0 + secs(1));
        q.push("a", 2, t0 + secs(2), t0 + secs(2));
        assert_eq!(q.pop(t0 + secs(3)).map(|(k, _)| k), Some("a"));
    }

    #[test]
    fn an_entry_past_the_age_cap_is_promoted_over_fresh_ones() {
        let t0 = Instant::now();
        let mut q = WriteQueue::new(secs(5));
        q.push("old", 0, t0, t0);
        // A steady stream of fresh changes would otherwise always win.
        for i in 1..=10u64 {
            let now = t0 + secs(i);
            q.push(format!("fresh-{i}").leak() as &str, 0, now, now);
            let (key, _) = q.pop(now).expect("non-empty");
            if i < 5 {
                assert!(key.starts_with("fresh"), "{key} at {i}s");
            } else {
                assert_eq!(key, "old", "promoted at {i}s");
                return;
            }
        }
        panic!("the old entry starved");
    }

    #[test]
    fn updating_an_old_entry_keeps_its_age() {
        let t0 = Instant::now();
        let mut q = WriteQueue::new(secs(5));
        q.push("old", 0, t0, t0);
        q.push("fresh", 0, t0 + secs(6), t0 + secs(6));
        q.push("old", 1, t0 + secs(6), t0 + secs(6));
        assert_eq!(
            q.pop(t0 + secs(6)).map(|(k, q)| (k, q.value)),
            Some(("old", 1))
        );
    }

    #[test]
    fn promoted_entries_leave_oldest_first() {
        let t0 = Instant::now();
        let mut q = WriteQueue::new(secs(5));
        q.push("a", 0, t0, t0);
        q.push("b", 0, t0 + secs(1), t0 + secs(1));
        q.push("c", 0, t0 + secs(10), t0 + secs(10));
        let now = t0 + secs(10);
        let order: Vec<_> = std::iter::from_fn(|| q.pop(now).map(|(k, _)| k)).collect();
        assert_eq!(order, ["a", "b", "c"]);
    }

    #[test]
    fn removed_entries_are_never_written() {
        let t0 = Instant::now();
        let mut q = WriteQueue::new(secs(5));
        q.push("a", 0, t0, t0);
        q.push("b", 0, t0, t0);
        assert_eq!(q.remove(&"a").map(|q| q.value), Some(0));
        assert_eq!(q.pop(t0 + secs(60)).map(|(k, _)| k), Some("b"));
        assert_eq!(q.pop(t0 + secs(60)), None);
    }
}
