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
