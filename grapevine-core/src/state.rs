//! The replicated-state model: a state made of leaves, changed by deltas that each name one leaf.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::hash::Hash;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// A state that a publisher owns and subscribers replicate.
///
/// The state is a set of *leaves* (small, self-contained units: one price level, one node's
/// record) identified by keys. A *delta* changes exactly one leaf, which it names; deleting a
/// leaf is a delta too. Snapshots send leaves one by one, so a subscriber can rebuild any leaf
/// without the rest of the state.
///
/// `apply` must be deterministic and total: the same delta applied to the same leaf value gives
/// the same result on the publisher and on every subscriber, and no delta may panic whatever the
/// state. GrapeVine guarantees that a subscriber applies a delta only to the exact leaf value the
/// publisher applied it to, so deltas may be incremental ("add 5").
///
/// ```
/// use grapevine_core::state::{KeyedMap, MapDelta, ReplicatedState};
/// let mut prices: KeyedMap<String, u64> = KeyedMap::default();
/// prices.apply(&MapDelta::Put("ACME".into(), 101));
/// assert_eq!(prices.leaf(&"ACME".to_string()), Some(&101));
/// prices.apply(&MapDelta::Remove("ACME".into()));
/// assert!(prices.is_empty());
/// ```
pub trait ReplicatedState: Default + Send + Sync + 'static {
    /// Identity of a leaf.
    type Key: Clone + Debug + Eq + Hash + Ord + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Value of a leaf.
    type Leaf: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// A change to one leaf.
    type Delta: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// The key of the leaf a delta changes.
    fn delta_key(delta: &Self::Delta) -> &Self::Key;
    /// Applies a delta: creates, changes or removes the leaf it names.
    fn apply(&mut self, delta: &Self::Delta);
    /// Applies a delta the state may take apart (subscribers hand over the delta they decoded,
    /// so a state can move its key and value in instead of cloning them); returns whether the
    /// leaf is present afterwards. The default applies by reference.
    ///
    /// ```
    /// use grapevine_core::state::{KeyedMap, MapDelta, ReplicatedState};
    /// let mut names: KeyedMap<u32, String> = KeyedMap::default();
    /// assert!(names.apply_owned(MapDelta::Put(7, "seven".into())));
    /// assert!(!names.apply_owned(MapDelta::Remove(7)));
    /// ```
    fn apply_owned(&mut self, delta: Self::Delta) -> bool {
        self.apply(&delta);
        self.leaf(Self::delta_key(&delta)).is_some()
    }
    /// The leaf of `key`, if present.
    fn leaf(&self, key: &Self::Key) -> Option<&Self::Leaf>;
    /// Every leaf, in any order.
    fn leaves(&self) -> Box<dyn Iterator<Item = (&Self::Key, &Self::Leaf)> + '_>;
    /// The leaf with the smallest key greater than `after` (the smallest of all for `None`).
    ///
    /// Snapshot cycles walk the state with this, one leaf at a time, so that each step sees
    /// the state as it is then. The default scans every leaf; states with many leaves should
    /// answer from an ordered index (a `BTreeMap` range), as [`KeyedMap`] does.
    fn next_leaf(&self, after: Option<&Self::Key>) -> Option<(&Self::Key, &Self::Leaf)> {
        self.leaves()
            .filter(|(key, _)| after.is_none_or(|after| *key > after))
            .min_by(|a, b| a.0.cmp(b.0))
    }
    /// Inserts or replaces a leaf (used when rebuilding from snapshots).
    fn put_leaf(&mut self, key: Self::Key, leaf: Self::Leaf);
    /// Removes a leaf (used when a snapshot cycle shows it absent).
    fn remove_leaf(&mut self, key: &Self::Key) -> Option<Self::Leaf>;
    /// Number of leaves.
    fn len(&self) -> usize;
    /// Whether there is no leaf.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A BLAKE3 digest of a state's leaves in key order: equal digests mean equal states, byte for
/// byte, whatever the state's internal layout.
///
/// ```
/// use grapevine_core::state::{digest, KeyedMap, MapDelta, ReplicatedState};
/// let mut a: KeyedMap<u32, u32> = KeyedMap::default();
/// let mut b: KeyedMap<u32, u32> = KeyedMap::default();
/// a.apply(&MapDelta::Put(1, 10));
/// a.apply(&MapDelta::Put(2, 20));
/// b.apply(&MapDelta::Put(2, 20));
/// b.apply(&MapDelta::Put(1, 10));
/// assert_eq!(digest(&a), digest(&b));
/// ```
pub fn digest<S: ReplicatedState>(state: &S) -> [u8; 32] {
    let mut leaves: Vec<_> = state.leaves().collect();
    leaves.sort_by(|a, b| a.0.cmp(b.0));
    let mut hasher = blake3::Hasher::new();
    let mut buf = Vec::new();
    for (key, leaf) in leaves {
        buf.clear();
        // Encoding plain serde data into a Vec cannot fail; a failing user Serialize impl only
        // changes the digest.
        if postcard::to_io(&(key, leaf), &mut buf).is_err() {
            buf.clear();
        }
        hasher.update(&(buf.len() as u64).to_be_bytes());
        hasher.update(&buf);
    }
    *hasher.finalize().as_bytes()
}

/// Hex form of a digest, shortened to its first 16 hex digits for display.
pub fn short_hex(digest: &[u8; 32]) -> String {
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}

/// A keyed map replicated leaf by leaf: each entry is a leaf.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct KeyedMap<K: Ord, V> {
    entries: BTreeMap<K, V>,
}

/// A change to a [`KeyedMap`].
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub enum MapDelta<K, V> {
    /// Insert or replace the entry.
    Put(K, V),
    /// Remove the entry.
    Remove(K),
}

impl<K: Ord, V> KeyedMap<K, V> {
    /// The entries, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.entries.iter()
    }

    /// The entry of `key`.
    pub fn get(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    /// The underlying map.
    pub fn as_map(&self) -> &BTreeMap<K, V> {
        &self.entries
    }
}

impl<K: Ord, V> Default for KeyedMap<K, V> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<K: Ord, V> FromIterator<(K, V)> for KeyedMap<K, V> {
    fn from_iter<I: IntoIterator<Item = (K, V)>>(iter: I) -> Self {
        Self {
            entries: iter.into_iter().collect(),
        }
    }
}

impl<K, V> ReplicatedState for KeyedMap<K, V>
where
    K: Clone + Debug + Eq + Hash + Ord + Serialize + DeserializeOwned + Send + Sync + 'static,
    V: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Key = K;
    type Leaf = V;
    type Delta = MapDelta<K, V>;

    fn delta_key(delta: &Self::Delta) -> &K {
        match delta {
            MapDelta::Put(key, _) | MapDelta::Remove(key) => key,
        }
    }

    fn apply(&mut self, delta: &Self::Delta) {
        match delta {
            MapDelta::Put(key, value) => {
                self.entries.insert(key.clone(), value.clone());
            }
            MapDelta::Remove(key) => {
                self.entries.remove(key);
            }
        }
    }

    fn apply_owned(&mut self, delta: Self::Delta) -> bool {
        match delta {
            MapDelta::Put(key, value) => {
                // An update of a known key moves the value in and keeps the stored key.
                match self.entries.get_mut(&key) {
                    Some(slot) => *slot = value,
                    None => {
                        self.entries.insert(key, value);
                    }
                }
                true
            }
            MapDelta::Remove(key) => {
                self.entries.remove(&key);
                false
            }
        }
    }

    fn leaf(&self, key: &K) -> Option<&V> {
        self.entries.get(key)
    }

    fn leaves(&self) -> Box<dyn Iterator<Item = (&K, &V)> + '_> {
        Box::new(self.entries.iter())
    }

    fn next_leaf(&self, after: Option<&K>) -> Option<(&K, &V)> {
        next_in(&self.entries, after)
    }

    fn put_leaf(&mut self, key: K, leaf: V) {
        self.entries.insert(key, leaf);
    }

    fn remove_leaf(&mut self, key: &K) -> Option<V> {
        self.entries.remove(key)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// A state of leaves numbered `0..CAPACITY`, kept in one array: a delta is applied by
/// indexing, not by searching a tree, which is what a feed of many small updates to a known
/// set of instruments, sensors or slots wants.
///
/// Deltas are [`MapDelta`]s with `u32` keys. A key at or beyond `CAPACITY` is ignored, by the
/// publisher and by every subscriber alike (applying stays deterministic and total, and a
/// forged key cannot make a subscriber allocate more than `CAPACITY` slots). The array grows
/// up to the highest key used. Snapshot cycles walk the slots in order.
///
/// ```
/// use grapevine_core::state::{DenseMap, MapDelta, ReplicatedState};
/// let mut prices: DenseMap<u64, 1024> = DenseMap::default();
/// assert!(prices.apply_owned(MapDelta::Put(7, 101)));
/// assert_eq!(prices.leaf(&7), Some(&101));
/// // Beyond the capacity: ignored, on every replica.
/// prices.apply(&MapDelta::Put(5000, 1));
/// assert_eq!(prices.len(), 1);
/// ```
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct DenseMap<V, const CAPACITY: u32 = 65_536> {
    /// Slot `k` holds leaf `k` with its key (`leaves` lends keys by reference).
    slots: Vec<Option<(u32, V)>>,
    len: usize,
}

impl<V, const CAPACITY: u32> Default for DenseMap<V, CAPACITY> {
    fn default() -> Self {
        Self {
            slots: Vec::new(),
            len: 0,
        }
    }
}

impl<V, const CAPACITY: u32> DenseMap<V, CAPACITY> {
    /// The leaf of `key`.
    pub fn get(&self, key: u32) -> Option<&V> {
        self.slots
            .get(key as usize)
            .and_then(|slot| slot.as_ref().map(|(_, value)| value))
    }

    /// The slot of `key`, made if it is within the capacity.
    fn slot_mut(&mut self, key: u32) -> Option<&mut Option<(u32, V)>> {
        if key >= CAPACITY {
            return None;
        }
        let index = key as usize;
        if index >= self.slots.len() {
            self.slots.resize_with(index + 1, || None);
        }
        self.slots.get_mut(index)
    }

    /// Puts `value` in `key`'s slot; whether the key is within the capacity.
    fn put(&mut self, key: u32, value: V) -> bool {
        let Some(slot) = self.slot_mut(key) else {
            return false;
        };
        match slot {
            Some((_, held)) => *held = value,
            None => {
                *slot = Some((key, value));
                self.len += 1;
            }
        }
        true
    }

    fn take(&mut self, key: u32) -> Option<V> {
        let taken = self
            .slots
            .get_mut(key as usize)?
            .take()
            .map(|(_, value)| value);
        if taken.is_some() {
            self.len -= 1;
        }
        taken
    }
}

impl<V, const CAPACITY: u32> ReplicatedState for DenseMap<V, CAPACITY>
where
    V: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static,
{
    type Key = u32;
    type Leaf = V;
    type Delta = MapDelta<u32, V>;

    fn delta_key(delta: &Self::Delta) -> &u32 {
        match delta {
            MapDelta::Put(key, _) | MapDelta::Remove(key) => key,
        }
    }

    fn apply(&mut self, delta: &Self::Delta) {
        match delta {
            MapDelta::Put(key, value) => {
                self.put(*key, value.clone());
            }
            MapDelta::Remove(key) => {
                self.take(*key);
            }
        }
    }

    fn apply_owned(&mut self, delta: Self::Delta) -> bool {
        match delta {
            MapDelta::Put(key, value) => self.put(key, value),
            MapDelta::Remove(key) => {
                self.take(key);
                false
            }
        }
    }

    fn leaf(&self, key: &u32) -> Option<&V> {
        self.get(*key)
    }

    fn leaves(&self) -> Box<dyn Iterator<Item = (&u32, &V)> + '_> {
        Box::new(
            self.slots
                .iter()
                .filter_map(|slot| slot.as_ref().map(|(key, value)| (key, value))),
        )
    }

    fn next_leaf(&self, after: Option<&u32>) -> Option<(&u32, &V)> {
        let start = after.map_or(0, |after| *after as usize + 1);
        self.slots
            .get(start..)?
            .iter()
            .find_map(|slot| slot.as_ref().map(|(key, value)| (key, value)))
    }

    fn put_leaf(&mut self, key: u32, leaf: V) {
        self.put(key, leaf);
    }

    fn remove_leaf(&mut self, key: &u32) -> Option<V> {
        self.take(*key)
    }

    fn len(&self) -> usize {
        self.len
    }
}

/// [`ReplicatedState::next_leaf`] for states kept in a `BTreeMap`.
pub fn next_in<'a, K: Ord, V>(
    map: &'a BTreeMap<K, V>,
    after: Option<&K>,
) -> Option<(&'a K, &'a V)> {
    use std::ops::Bound;
    match after {
        None => map.iter().next(),
        Some(after) => map.range((Bound::Excluded(after), Bound::Unbounded)).next(),
    }
}

/// The short way to a state: say what a leaf is and how one change alters it, and
/// [`LeafMap<Self>`](LeafMap) is the [`ReplicatedState`] (ordered storage, snapshots walking it,
/// `next_leaf`, owned application), with deltas of the form `(key, change)` so the key is
/// stored once.
///
/// ```
/// use grapevine_core::state::{LeafChanges, LeafMap, ReplicatedState};
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Clone, Debug, Serialize, Deserialize)]
/// enum Counter { Add(i64), Reset }
///
/// struct Counters;
/// impl LeafChanges for Counters {
///     type Key = String;
///     type Leaf = i64;
///     type Change = Counter;
///     fn apply(change: &Counter, leaf: &mut Option<i64>) {
///         match change {
///             Counter::Add(n) => *leaf.get_or_insert(0) += n,
///             Counter::Reset => *leaf = None,
///         }
///     }
/// }
///
/// let mut state = LeafMap::<Counters>::default();
/// state.apply(&("hits".into(), Counter::Add(2)));
/// state.apply(&("hits".into(), Counter::Add(3)));
/// assert_eq!(state.get(&"hits".into()), Some(&5));
/// state.apply(&("hits".into(), Counter::Reset));
/// assert!(state.is_empty());
/// ```
pub trait LeafChanges: Send + Sync + 'static {
    /// Identity of a leaf.
    type Key: Clone + Debug + Eq + Hash + Ord + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// Value of a leaf.
    type Leaf: Clone + Debug + PartialEq + Serialize + DeserializeOwned + Send + Sync + 'static;
    /// A change to one leaf (without its key: the delta is `(key, change)`).
    type Change: Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static;

    /// Changes one leaf: `leaf` is `None` when absent; leave `None` (or set it) to remove it.
    /// Deterministic and total, as [`ReplicatedState::apply`] requires.
    fn apply(change: &Self::Change, leaf: &mut Option<Self::Leaf>);
}

/// A state of leaves in key order, changed as [`LeafChanges`] `C` says; see there.
pub struct LeafMap<C: LeafChanges> {
    entries: BTreeMap<C::Key, C::Leaf>,
}

impl<C: LeafChanges> LeafMap<C> {
    /// The leaf of `key`.
    pub fn get(&self, key: &C::Key) -> Option<&C::Leaf> {
        self.entries.get(key)
    }

    /// The leaves, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&C::Key, &C::Leaf)> {
        self.entries.iter()
    }

    /// The underlying map.
    pub fn as_map(&self) -> &BTreeMap<C::Key, C::Leaf> {
        &self.entries
    }

    fn change(&mut self, key: C::Key, change: &C::Change) -> bool {
        // The leaf is taken out and put back so that `apply` sees a plain `Option`.
        let mut leaf = self.entries.remove(&key);
        C::apply(change, &mut leaf);
        match leaf {
            Some(leaf) => {
                self.entries.insert(key, leaf);
                true
            }
            None => false,
        }
    }
}

impl<C: LeafChanges> Default for LeafMap<C> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
        }
    }
}

impl<C: LeafChanges> Clone for LeafMap<C> {
    fn clone(&self) -> Self {
        Self {
            entries: self.entries.clone(),
        }
    }
}

impl<C: LeafChanges> Debug for LeafMap<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.entries.iter()).finish()
    }
}

impl<C: LeafChanges> PartialEq for LeafMap<C> {
    fn eq(&self, other: &Self) -> bool {
        self.entries == other.entries
    }
}

impl<C: LeafChanges> FromIterator<(C::Key, C::Leaf)> for LeafMap<C> {
    fn from_iter<I: IntoIterator<Item = (C::Key, C::Leaf)>>(iter: I) -> Self {
        Self {
            entries: iter.into_iter().collect(),
        }
    }
}

impl<C: LeafChanges> ReplicatedState for LeafMap<C> {
    type Key = C::Key;
    type Leaf = C::Leaf;
    type Delta = (C::Key, C::Change);

    fn delta_key(delta: &Self::Delta) -> &C::Key {
        &delta.0
    }

    fn apply(&mut self, (key, change): &Self::Delta) {
        self.change(key.clone(), change);
    }

    fn apply_owned(&mut self, (key, change): Self::Delta) -> bool {
        self.change(key, &change)
    }

    fn leaf(&self, key: &C::Key) -> Option<&C::Leaf> {
        self.entries.get(key)
    }

    fn leaves(&self) -> Box<dyn Iterator<Item = (&C::Key, &C::Leaf)> + '_> {
        Box::new(self.entries.iter())
    }

    fn next_leaf(&self, after: Option<&C::Key>) -> Option<(&C::Key, &C::Leaf)> {
        next_in(&self.entries, after)
    }

    fn put_leaf(&mut self, key: C::Key, leaf: C::Leaf) {
        self.entries.insert(key, leaf);
    }

    fn remove_leaf(&mut self, key: &C::Key) -> Option<C::Leaf> {
        self.entries.remove(key)
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Clone, Debug, Serialize, Deserialize)]
    enum Change {
        Add(i8),
        Remove,
    }

    struct Counts;
    impl LeafChanges for Counts {
        type Key = u8;
        type Leaf = i32;
        type Change = Change;
        fn apply(change: &Change, leaf: &mut Option<i32>) {
            match change {
                Change::Add(n) => *leaf.get_or_insert(0) += i32::from(*n),
                Change::Remove => *leaf = None,
            }
        }
    }

    fn change() -> impl Strategy<Value = (u8, Change)> {
        (
            0u8..16,
            prop_oneof![any::<i8>().prop_map(Change::Add), Just(Change::Remove)],
        )
    }

    proptest! {
        /// Applied by reference or owned, a leaf map holds what a plain map of the same
        /// changes holds, reports presence right, and `next_leaf` walks every leaf in order.
        #[test]
        fn a_leaf_map_matches_a_plain_map(changes in proptest::collection::vec(change(), 0..200)) {
            let mut by_ref = LeafMap::<Counts>::default();
            let mut owned = LeafMap::<Counts>::default();
            let mut model = BTreeMap::<u8, i32>::new();
            for (key, change) in changes {
                match change {
                    Change::Add(n) => *model.entry(key).or_insert(0) += i32::from(n),
                    Change::Remove => { model.remove(&key); }
                }
                by_ref.apply(&(key, change.clone()));
                prop_assert_eq!(owned.apply_owned((key, change)), model.contains_key(&key));
            }
            prop_assert_eq!(by_ref.as_map(), &model);
            prop_assert_eq!(owned.as_map(), &model);
            let mut walked = Vec::new();
            let mut after = None;
            while let Some((key, leaf)) = owned.next_leaf(after.as_ref()) {
                walked.push((*key, *leaf));
                after = Some(*key);
            }
            prop_assert_eq!(walked, model.into_iter().collect::<Vec<_>>());
        }

        /// A dense map holds what a keyed map of the same deltas holds, minus the keys beyond
        /// its capacity, and walks its leaves in key order.
        #[test]
        fn a_dense_map_matches_a_keyed_map(
            deltas in proptest::collection::vec(
                (0u32..40, proptest::option::of(any::<u16>())),
                0..200,
            )
        ) {
            let mut dense = DenseMap::<u16, 32>::default();
            let mut keyed = KeyedMap::<u32, u16>::default();
            for (key, value) in deltas {
                let delta = match value {
                    Some(value) => MapDelta::Put(key, value),
                    None => MapDelta::Remove(key),
                };
                if key < 32 {
                    prop_assert_eq!(dense.apply_owned(delta.clone()), keyed.apply_owned(delta));
                } else {
                    prop_assert!(!dense.apply_owned(delta.clone()), "beyond the capacity");
                    dense.apply(&delta);
                }
            }
            prop_assert_eq!(dense.len(), keyed.len());
            prop_assert_eq!(digest(&dense), digest(&keyed));
            let mut walked = Vec::new();
            let mut after = None;
            while let Some((key, leaf)) = dense.next_leaf(after.as_ref()) {
                walked.push((*key, *leaf));
                after = Some(*key);
            }
            prop_assert_eq!(walked, keyed.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
            prop_assert!(dense.slots.len() <= 32);
        }
    }
}
