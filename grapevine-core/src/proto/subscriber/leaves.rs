//! Per-leaf metadata of a stream: what was last applied to each leaf, whether it is present,
//! and the deltas a stale leaf holds until a snapshot rebuilds it.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::ops::Bound;

/// What a stream knows of one leaf.
#[derive(Debug)]
pub(super) struct LeafMeta<D> {
    /// `seq` of the last delta applied, or `as_of_seq` of the snapshot that set it.
    pub(super) last: u64,
    pub(super) present: bool,
    pub(super) stale: Option<VecDeque<(u64, u64, D)>>,
}

impl<D> LeafMeta<D> {
    /// A leaf not held, known absent as of `seq` when given.
    pub(super) fn absent_as_of(seq: Option<u64>) -> Self {
        Self {
            last: seq.unwrap_or(0),
            present: false,
            stale: None,
        }
    }
}

/// Per-leaf metadata: hashed for the per-delta lookups, with the keys also kept in order for
/// the range queries of snapshot coverage. Only creations and removals touch the order.
///
/// The map hashes with foldhash (a randomly seeded hasher per map): SipHash was a tenth of the
/// per-delta cost, and the seed still keeps forged keys from aiming at one bucket.
#[derive(Debug)]
pub(super) struct LeafIndex<K, D> {
    map: HashMap<K, LeafMeta<D>, foldhash::fast::RandomState>,
    order: BTreeSet<K>,
}

impl<K: Clone + Eq + std::hash::Hash + Ord, D> LeafIndex<K, D> {
    pub(super) fn new() -> Self {
        Self {
            map: HashMap::default(),
            order: BTreeSet::new(),
        }
    }

    pub(super) fn get(&self, key: &K) -> Option<&LeafMeta<D>> {
        self.map.get(key)
    }

    pub(super) fn get_mut(&mut self, key: &K) -> Option<&mut LeafMeta<D>> {
        self.map.get_mut(key)
    }

    pub(super) fn get_or_insert(&mut self, key: &K, absent_as_of: Option<u64>) -> &mut LeafMeta<D> {
        if !self.map.contains_key(key) {
            self.order.insert(key.clone());
        }
        self.map
            .entry(key.clone())
            .or_insert_with(|| LeafMeta::absent_as_of(absent_as_of))
    }

    pub(super) fn remove(&mut self, key: &K) {
        if self.map.remove(key).is_some() {
            self.order.remove(key);
        }
    }

    /// Keys strictly inside the bounds, in order.
    pub(super) fn keys_in(&self, lower: Bound<&K>, upper: Bound<&K>) -> Vec<K> {
        if let (Bound::Excluded(low), Bound::Excluded(high)) = (lower, upper) {
            if low >= high {
                return Vec::new();
            }
        }
        self.order.range((lower, upper)).cloned().collect()
    }

    pub(super) fn retain(&mut self, mut keep: impl FnMut(&LeafMeta<D>) -> bool) {
        let map = &mut self.map;
        map.retain(|_, meta| keep(meta));
        self.order.retain(|key| map.contains_key(key));
    }
}
