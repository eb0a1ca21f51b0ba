//! Echolocation: every node publishes its record on the ELP topic every `elp_delay`; nodes
//! not heard for a while become suspect, then dead. The records are a replicated state like
//! any other (one leaf per node), so late joiners rebuild the list from the snapshot cycle.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use grapevine_core::state::KeyedMap;
use serde::{Deserialize, Serialize};

use crate::vdriver::Vdev;

/// The topic of echolocation packets.
pub const ELP_TOPIC: u32 = 0x0045_4c50;

/// What a node announces about itself.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct NodeRecord {
    /// Stable node id (persisted in the state directory).
    pub node_id: u64,
    /// Human name.
    pub name: String,
    /// Unicast addresses peers can reach it on (those of the configured interface).
    pub addresses: Vec<String>,
    /// Digest of its VDEVs.
    pub unique: String,
    /// Its VDEVs, by driver.
    pub vdevs: Vec<NodeVdev>,
    /// How often it announces itself, in milliseconds.
    pub elp_delay_ms: u64,
}

/// One VDEV of a node.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct NodeVdev {
    /// The driver exposing it.
    pub driver: String,
    /// The device. (Nested, not flattened: records travel as postcard, which needs fixed
    /// shapes.)
    pub vdev: Vdev,
}

/// The ELP topic's state: one record per node.
pub type NodeTable = KeyedMap<u64, NodeRecord>;

/// Where a node stands.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Heard within two announcement periods.
    Alive,
    /// Missed announcements, not yet given up: loss must not make nodes flap.
    Suspect,
}

/// Tracks when each node was last heard and decides who is alive, suspect or dead.
#[derive(Debug)]
pub struct LivenessTracker {
    last_heard: HashMap<u64, Instant>,
    node_ttl: u32,
}

impl LivenessTracker {
    /// A node not heard for `node_ttl` of its own announcement periods is dead.
    pub fn new(node_ttl: u32) -> Self {
        Self {
            last_heard: HashMap::new(),
            node_ttl: node_ttl.max(2),
        }
    }

    /// `node` announced itself at `now`.
    pub fn heard(&mut self, node: u64, now: Instant) {
        self.last_heard.insert(node, now);
    }

    /// `node` said goodbye.
    pub fn forget(&mut self, node: u64) {
        self.last_heard.remove(&node);
    }

    /// The live nodes among `records`, with their liveness; dead ones are left out.
    pub fn classify<'a>(
        &self,
        records: impl Iterator<Item = &'a NodeRecord>,
        now: Instant,
    ) -> BTreeMap<u64, (NodeRecord, Liveness)> {
        records
            .filter_map(|record| {
                let heard = self.last_heard.get(&record.node_id)?;
                let period = Duration::from_millis(record.elp_delay_ms.max(1));
                let silent = now.saturating_duration_since(*heard);
                let liveness = if silent <= period * 2 {
                    Liveness::Alive
                } else if silent <= period * self.node_ttl {
                    Liveness::Suspect
                } else {
                    return None;
                };
                Some((record.node_id, (record.clone(), liveness)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: u64) -> NodeRecord {
        NodeRecord {
            node_id: id,
            name: format!("n{id}"),
            addresses: vec![],
            unique: String::new(),
            vdevs: vec![],
            elp_delay_ms: 100,
        }
    }

    #[test]
    fn alive_then_suspect_then_dead() {
        let start = Instant::now();
        let mut tracker = LivenessTracker::new(5);
        let records = [record(1), record(2)];
        tracker.heard(1, start);
        let at = |ms| start + Duration::from_millis(ms);
        let list = tracker.classify(records.iter(), at(150));
        assert_eq!(list.get(&1).map(|e| e.1), Some(Liveness::Alive));
        assert!(!list.contains_key(&2), "never heard: not listed");
        assert_eq!(
            tracker
                .classify(records.iter(), at(300))
                .get(&1)
                .map(|e| e.1),
            Some(Liveness::Suspect)
        );
        assert!(
            tracker.classify(records.iter(), at(501)).is_empty(),
            "dead after the TTL"
        );
        tracker.heard(1, at(600));
        assert_eq!(
            tracker
                .classify(records.iter(), at(650))
                .get(&1)
                .map(|e| e.1),
            Some(Liveness::Alive)
        );
        tracker.forget(1);
        assert!(tracker.classify(records.iter(), at(650)).is_empty());
    }
}
