//! Version vectors: per-file counters of changes by node, which tell a change that follows
//! another from two made concurrently (clocks cannot).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// How two versions of a file relate.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Relation {
    /// The same changes.
    Equal,
    /// The first lacks changes the second has, and has none the second lacks.
    Before,
    /// The first has every change of the second, and more.
    After,
    /// Each has changes the other lacks: a conflict.
    Concurrent,
}

/// Changes seen per node.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct VersionVector(pub BTreeMap<u64, u64>);

impl VersionVector {
    /// Records a change by `node` made at its zone version `version` (which only grows): the
    /// counter is that version, so a node never reuses a counter for a path, even after the
    /// path took another node's version and forgot its own (a conflict it lost).
    pub fn record(&mut self, node: u64, version: u64) {
        let counter = self.0.entry(node).or_insert(0);
        *counter = (*counter + 1).max(version);
    }

    /// Every change of both.
    pub fn merge(&mut self, other: &Self) {
        for (node, count) in &other.0 {
            let mine = self.0.entry(*node).or_insert(0);
            *mine = (*mine).max(*count);
        }
    }

    /// Whether `node`'s change numbered `counter` is among these.
    pub fn saw(&self, node: u64, counter: u64) -> bool {
        self.0.get(&node).is_some_and(|seen| *seen >= counter)
    }

    /// How `self` relates to `other`.
    ///
    /// ```
    /// use grapevine_fs::version::{Relation, VersionVector};
    /// let mut a = VersionVector::default();
    /// a.record(1, 1);
    /// let mut b = a.clone();
    /// b.record(2, 1);
    /// assert_eq!(a.relation(&b), Relation::Before);
    /// a.record(1, 2);
    /// assert_eq!(a.relation(&b), Relation::Concurrent);
    /// ```
    pub fn relation(&self, other: &Self) -> Relation {
        let mut less = false;
        let mut more = false;
        for node in self.0.keys().chain(other.0.keys()) {
            let mine = self.0.get(node).copied().unwrap_or(0);
            let theirs = other.0.get(node).copied().unwrap_or(0);
            less |= mine < theirs;
            more |= mine > theirs;
        }
        match (less, more) {
            (false, false) => Relation::Equal,
            (true, false) => Relation::Before,
            (false, true) => Relation::After,
            (true, true) => Relation::Concurrent,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn vv(entries: &[(u64, u64)]) -> VersionVector {
        VersionVector(entries.iter().copied().collect())
    }

    proptest! {
        #[test]
        fn merge_is_an_upper_bound(a in proptest::collection::btree_map(0u64..4, 0u64..5, 0..4),
                                    b in proptest::collection::btree_map(0u64..4, 0u64..5, 0..4)) {
            let (a, b) = (VersionVector(a), VersionVector(b));
            let mut m = a.clone();
            m.merge(&b);
            prop_assert!(matches!(a.relation(&m), Relation::Before | Relation::Equal));
            prop_assert!(matches!(b.relation(&m), Relation::Before | Relation::Equal));
            let mut n = b.clone();
            n.merge(&a);
            prop_assert_eq!(m.relation(&n), Relation::Equal);
            // The relation is antisymmetric.
            let flipped = match a.relation(&b) {
                Relation::Before => Relation::After,
                Relation::After => Relation::Before,
                other => other,
            };
            prop_assert_eq!(b.relation(&a), flipped);
        }
    }

    #[test]
    fn missing_nodes_count_as_zero() {
        assert_eq!(vv(&[(1, 0)]).relation(&vv(&[])), Relation::Equal);
        assert_eq!(vv(&[(1, 1)]).relation(&vv(&[(2, 1)])), Relation::Concurrent);
    }
}
