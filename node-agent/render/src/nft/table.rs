//! The table as the sum of its fragments. Each chain, set declaration and
//! element counts the fragments that contribute it, so fragments can be taken
//! out and put in one at a time (a service port changes), and the transaction
//! that brings the kernel along is written from the names those fragments
//! touched alone: its cost follows the change, not the table.
//!
//! When two fragments contribute different content under one name (two
//! services claiming one frontend), the smallest content wins. That rule does
//! not depend on the order fragments came in, so a table built change by change
//! equals one built at once.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use super::{ELEMENT_CHUNK, Fragment, NftChain, NftDelta, NftRuleSet, NftSet, SetDecl, TABLE};

/// Contributions to one name, each with how many fragments made it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Refs<T>(Vec<(T, u32)>);

impl<T> Default for Refs<T> {
    fn default() -> Self {
        Self(Vec::new())
    }
}

impl<T: Ord> Refs<T> {
    fn add(&mut self, value: T) {
        match self.0.binary_search_by(|(v, _)| v.cmp(&value)) {
            Ok(i) => self.0[i].1 += 1,
            Err(i) => self.0.insert(i, (value, 1)),
        }
    }

    fn remove(&mut self, value: &T) {
        if let Ok(i) = self.0.binary_search_by(|(v, _)| v.cmp(value)) {
            self.0[i].1 -= 1;
            if self.0[i].1 == 0 {
                self.0.remove(i);
            }
        }
    }

    /// The content in force: the smallest contributed.
    fn effective(&self) -> Option<&T> {
        self.0.first().map(|(v, _)| v)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Everything in the table, by contributor count.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NftTable {
    chains: BTreeMap<String, Refs<NftChain>>,
    sets: BTreeMap<String, Refs<SetDecl>>,
    /// Elements by set, unordered: a table holds 100k of them, and only full
    /// texts need them in order.
    elements: BTreeMap<String, HashMap<String, Refs<String>>>,
}

/// What a change touched, with what was in force before it.
#[derive(Default)]
struct Before {
    chains: BTreeMap<String, Option<NftChain>>,
    sets: BTreeMap<String, Option<SetDecl>>,
    elements: BTreeMap<(String, String), Option<String>>,
}

impl NftTable {
    /// Adds `fragment`.
    pub fn insert(&mut self, fragment: &Fragment) {
        for (name, chain) in &fragment.chains {
            self.chains
                .entry(name.clone())
                .or_default()
                .add(chain.clone());
        }
        for (name, decl) in &fragment.sets {
            self.sets.entry(name.clone()).or_default().add(decl.clone());
        }
        for (set, key, value) in &fragment.elements {
            let elements = match self.elements.get_mut(set) {
                Some(elements) => elements,
                None => self.elements.entry(set.clone()).or_default(),
            };
            match elements.get_mut(key) {
                Some(refs) => refs.add(value.clone()),
                None => {
                    elements.insert(key.clone(), Refs(vec![(value.clone(), 1)]));
                }
            }
        }
    }

    /// Takes out what `fragment` added.
    pub fn remove(&mut self, fragment: &Fragment) {
        for (name, chain) in &fragment.chains {
            if let Some(refs) = self.chains.get_mut(name) {
                refs.remove(chain);
                if refs.is_empty() {
                    self.chains.remove(name);
                }
            }
        }
        for (name, decl) in &fragment.sets {
            if let Some(refs) = self.sets.get_mut(name) {
                refs.remove(decl);
                if refs.is_empty() {
                    self.sets.remove(name);
                }
            }
        }
        for (set, key, value) in &fragment.elements {
            let Some(elements) = self.elements.get_mut(set) else {
                continue;
            };
            if let Some(refs) = elements.get_mut(key) {
                refs.remove(value);
                if refs.is_empty() {
                    elements.remove(key);
                }
            }
            if elements.is_empty() {
                self.elements.remove(set);
            }
        }
    }

    /// Takes out `removed`, puts in `added`, and returns the transaction that
    /// turns a kernel holding the table before into one holding it after.
    /// `None` when a set's declaration changed: nft cannot redeclare a set in
    /// place, so the caller rebuilds the table.
    pub fn replace(&mut self, removed: &[&Fragment], added: &[&Fragment]) -> Option<NftDelta> {
        let mut before = Before::default();
        for fragment in removed.iter().chain(added) {
            for name in fragment.chains.keys() {
                if !before.chains.contains_key(name) {
                    before
                        .chains
                        .insert(name.clone(), self.chain(name).cloned());
                }
            }
            for name in fragment.sets.keys() {
                if !before.sets.contains_key(name) {
                    before.sets.insert(name.clone(), self.decl(name).cloned());
                }
            }
            for (set, key, _) in &fragment.elements {
                let id = (set.clone(), key.clone());
                if let std::collections::btree_map::Entry::Vacant(slot) = before.elements.entry(id)
                {
                    slot.insert(self.element(set, key).map(str::to_owned));
                }
            }
        }
        for fragment in removed {
            self.remove(fragment);
        }
        for fragment in added {
            self.insert(fragment);
        }
        self.delta(&before)
    }

    fn chain(&self, name: &str) -> Option<&NftChain> {
        self.chains.get(name).and_then(Refs::effective)
    }

    pub(super) fn decl(&self, name: &str) -> Option<&SetDecl> {
        self.sets.get(name).and_then(Refs::effective)
    }

    fn element(&self, set: &str, key: &str) -> Option<&str> {
        self.elements
            .get(set)?
            .get(key)
            .and_then(Refs::effective)
            .map(String::as_str)
    }

    /// The transaction from `before` to now, over the touched names only, in
    /// the order nft needs: declarations, chain contents, elements out and in,
    /// then what is gone.
    fn delta(&self, before: &Before) -> Option<NftDelta> {
        let mut d = NftDelta::default();
        let mut out = String::new();
        for (name, old) in &before.sets {
            match (old, self.decl(name)) {
                (None, Some(new)) => declare_set(&mut out, name, new),
                (Some(old), Some(new)) if old != new => return None,
                _ => {}
            }
        }
        for (name, old) in &before.chains {
            match (old, self.chain(name)) {
                (None, Some(new)) => declare_chain(&mut out, name, new),
                (Some(old), Some(new)) if old.hook != new.hook => return None,
                _ => {}
            }
        }
        for (name, old) in &before.chains {
            let Some(new) = self.chain(name) else {
                continue;
            };
            if old.as_ref().is_some_and(|o| o.rules == new.rules) {
                continue;
            }
            if old.is_some() {
                let _ = writeln!(out, "flush chain inet {TABLE} {name}");
            }
            for rule in &new.rules {
                let _ = writeln!(out, "add rule inet {TABLE} {name} {rule}");
            }
            d.chains_written += 1;
            d.rules_written += new.rules.len();
        }
        let mut structural = !out.is_empty();
        let dynamic = |set: &str| {
            self.decl(set)
                .or_else(|| before.sets.get(set).and_then(Option::as_ref))
                .is_some_and(|d| d.dynamic)
        };
        let mut gone: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        let mut added: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for ((set, key), old) in &before.elements {
            if dynamic(set) {
                continue;
            }
            let new = self.element(set, key);
            if old.as_deref() == new {
                continue;
            }
            if old.is_some() && self.decl(set).is_some() {
                gone.entry(set).or_default().push(key.clone());
                d.removed_elements.push((set.clone(), key.clone()));
            }
            if let Some(value) = new {
                added.entry(set).or_default().push(element(key, value));
                d.added_elements
                    .push((set.clone(), key.clone(), value.to_owned()));
                d.rules_written += 1;
            }
        }
        for (set, keys) in &gone {
            elements(&mut out, "delete", set, keys);
        }
        for (set, items) in &added {
            elements(&mut out, "add", set, items);
        }
        let removed_chains: BTreeSet<&String> = before
            .chains
            .iter()
            .filter(|(name, old)| old.is_some() && self.chain(name).is_none())
            .map(|(name, _)| name)
            .collect();
        structural |= !removed_chains.is_empty();
        for name in &removed_chains {
            let _ = writeln!(out, "flush chain inet {TABLE} {name}");
        }
        for name in &removed_chains {
            let _ = writeln!(out, "delete chain inet {TABLE} {name}");
            d.deleted += 1;
        }
        for (name, old) in &before.sets {
            if old.is_some() && self.decl(name).is_none() {
                let _ = writeln!(out, "delete set inet {TABLE} {name}");
                d.deleted += 1;
                structural = true;
            }
        }
        d.elements_only = !structural;
        d.text = out;
        Some(d)
    }

    /// The table's content in force.
    pub fn rule_set(&self) -> NftRuleSet {
        let chains = self
            .chains
            .iter()
            .filter_map(|(name, refs)| Some((name.clone(), refs.effective()?.clone())))
            .collect();
        let sets = self
            .sets
            .iter()
            .filter_map(|(name, refs)| {
                let decl = refs.effective()?;
                let elements = if decl.dynamic {
                    BTreeMap::new()
                } else {
                    self.elements
                        .get(name)
                        .map(|e| {
                            e.iter()
                                .filter_map(|(k, v)| Some((k.clone(), v.effective()?.clone())))
                                .collect()
                        })
                        .unwrap_or_default()
                };
                Some((
                    name.clone(),
                    NftSet {
                        keyword: decl.keyword,
                        spec: decl.spec.clone(),
                        elements,
                        dynamic: decl.dynamic,
                    },
                ))
            })
            .collect();
        NftRuleSet { chains, sets }
    }

    /// Rules in all chains plus elements in all non-dynamic sets.
    pub fn rule_count(&self) -> usize {
        let rules: usize = self
            .chains
            .values()
            .filter_map(Refs::effective)
            .map(|c| c.rules.len())
            .sum();
        let elements: usize = self
            .elements
            .iter()
            .filter(|(set, _)| self.decl(set).is_some_and(|d| !d.dynamic))
            .map(|(_, e)| e.len())
            .sum();
        rules + elements
    }

    /// Chains in force, by name.
    pub fn chains(&self) -> impl Iterator<Item = (&str, &NftChain)> {
        self.chains
            .iter()
            .filter_map(|(name, refs)| Some((name.as_str(), refs.effective()?)))
    }

    /// The elements in force of one set, unordered.
    pub fn elements_of<'a>(&'a self, set: &str) -> impl Iterator<Item = (&'a str, &'a str)> + 'a {
        self.elements
            .get(set)
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.as_str(), v.effective()?.as_str())))
    }

    /// Sets in force with their number of elements, by name.
    pub fn sets(&self) -> impl Iterator<Item = (&str, &SetDecl, usize)> {
        self.sets.iter().filter_map(|(name, refs)| {
            let decl = refs.effective()?;
            let count = self.elements.get(name).map_or(0, HashMap::len);
            Some((name.as_str(), decl, count))
        })
    }

    /// The table without any set element, for a kernel that has none: chains,
    /// rules and empty sets (the elements follow over netlink).
    pub fn structure_text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "add table inet {TABLE}");
        for (name, chain) in self.chains() {
            declare_chain(&mut out, name, chain);
        }
        for (name, decl, _) in self.sets() {
            declare_set(&mut out, name, decl);
        }
        for (name, chain) in self.chains() {
            for rule in &chain.rules {
                let _ = writeln!(out, "add rule inet {TABLE} {name} {rule}");
            }
        }
        out
    }

    /// The whole table as one `nft -f` transaction: the table is created if
    /// missing, deleted and rebuilt, so the kernel holds either all of it or
    /// the old one.
    pub fn full_text(&self) -> String {
        let mut out = String::with_capacity(64 * self.rule_count() + 1024);
        let _ = writeln!(out, "add table inet {TABLE}");
        let _ = writeln!(out, "delete table inet {TABLE}");
        let _ = writeln!(out, "add table inet {TABLE}");
        for (name, chain) in self.chains() {
            declare_chain(&mut out, name, chain);
        }
        for (name, decl, _) in self.sets() {
            declare_set(&mut out, name, decl);
        }
        for (name, decl, _) in self.sets() {
            if decl.dynamic {
                continue;
            }
            let mut in_force: Vec<(&String, &String)> = self
                .elements
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k, v.effective()?)))
                .collect();
            in_force.sort_unstable();
            let items: Vec<String> = in_force.into_iter().map(|(k, v)| element(k, v)).collect();
            elements(&mut out, "add", name, &items);
        }
        for (name, chain) in self.chains() {
            for rule in &chain.rules {
                let _ = writeln!(out, "add rule inet {TABLE} {name} {rule}");
            }
        }
        out
    }
}

pub(super) fn declare_chain(out: &mut String, name: &str, chain: &NftChain) {
    match &chain.hook {
        Some(hook) => {
            let _ = writeln!(out, "add chain inet {TABLE} {name} {{ {hook} }}");
        }
        None => {
            let _ = writeln!(out, "add chain inet {TABLE} {name}");
        }
    }
}

pub(super) fn declare_set(out: &mut String, name: &str, decl: &SetDecl) {
    let _ = writeln!(
        out,
        "add {} inet {TABLE} {name} {{ {} }}",
        decl.keyword, decl.spec
    );
}

/// `key` or `key : value`.
pub(super) fn element(key: &str, value: &str) -> String {
    if value.is_empty() {
        key.to_owned()
    } else {
        format!("{key} : {value}")
    }
}

/// `add`/`delete element` commands for `items`, in chunks.
pub(super) fn elements(out: &mut String, verb: &str, set: &str, items: &[String]) {
    for chunk in items.chunks(ELEMENT_CHUNK) {
        let _ = writeln!(
            out,
            "{verb} element inet {TABLE} {set} {{ {} }}",
            chunk.join(", ")
        );
    }
}
