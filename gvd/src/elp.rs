//! Echolocation: every node publishes a small record about itself on the ELP topic every
//! `elp_delay`, and its VDEV list on the VDEV topic when it changes. Both are replicated states
//! like any other (one leaf per node), so late joiners rebuild them from the snapshot cycles.
//! A node is alive, then suspect, then dead as its announcements stop arriving.

use std::collections::BTreeMap;
use std::time::Duration;

use grapevine_core::state::KeyedMap;
use serde::Serialize;

pub use grapevine_gvd_schema::nodes::{
    Liveness, NodeRecord, NodeVdev, VdevList, ELP_TOPIC, VDEV_TOPIC,
};

/// The ELP topic's state: one record per node.
pub type NodeTable = KeyedMap<u64, NodeRecord>;

/// The VDEV topic's state: one list per node.
pub type VdevTable = KeyedMap<u64, VdevList>;

/// The liveness of a node silent for `silent`, announcing every `period`, given up after
/// `node_ttl` periods (at least 2). Two periods of grace before suspicion: with 10 % loss a
/// node misses two announcements in a row 1 % of the time, and all of `node_ttl` (5) only
/// 0.001 % of the time.
pub fn liveness(silent: Duration, period: Duration, node_ttl: u32) -> Liveness {
    if silent <= period * 2 {
        Liveness::Alive
    } else if silent <= period * node_ttl.max(2) {
        Liveness::Suspect
    } else {
        Liveness::Dead
    }
}

/// How the node list changed, as counted by [`Transitions`].
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, Serialize)]
pub struct TransitionCounts {
    /// Nodes that appeared.
    pub joined: u64,
    /// Alive nodes that became suspect.
    pub suspected: u64,
    /// Suspect nodes heard again.
    pub cleared: u64,
    /// Nodes declared dead after their TTL.
    pub died: u64,
    /// Nodes that said goodbye (their record was removed).
    pub left: u64,
}

/// Remembers the last classification and counts (and logs) the changes.
#[derive(Debug, Default)]
pub struct Transitions {
    previous: BTreeMap<u64, Liveness>,
    counts: TransitionCounts,
}

impl Transitions {
    /// Records the new classification of every node whose record is known.
    pub fn update(&mut self, current: &BTreeMap<u64, Liveness>) {
        for (node, now) in current {
            let before = self.previous.get(node).copied();
            match (before, *now) {
                (None | Some(Liveness::Dead), Liveness::Alive | Liveness::Suspect) => {
                    self.counts.joined += 1;
                    tracing::info!(node = format!("{node:016x}"), "node joined");
                }
                (Some(Liveness::Alive), Liveness::Suspect) => {
                    self.counts.suspected += 1;
                    tracing::info!(node = format!("{node:016x}"), "node suspect");
                }
                (Some(Liveness::Suspect), Liveness::Alive) => self.counts.cleared += 1,
                (Some(Liveness::Alive | Liveness::Suspect), Liveness::Dead) => {
                    self.counts.died += 1;
                    tracing::warn!(node = format!("{node:016x}"), "node dead");
                }
                _ => {}
            }
        }
        for (node, before) in &self.previous {
            if *before != Liveness::Dead && !current.contains_key(node) {
                self.counts.left += 1;
                tracing::info!(node = format!("{node:016x}"), "node left");
            }
        }
        self.previous.clone_from(current);
    }

    /// The changes so far.
    pub fn counts(&self) -> TransitionCounts {
        self.counts
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alive_then_suspect_then_dead() {
        let period = Duration::from_millis(100);
        let at = Duration::from_millis;
        assert_eq!(liveness(at(150), period, 5), Liveness::Alive);
        assert_eq!(liveness(at(200), period, 5), Liveness::Alive);
        assert_eq!(liveness(at(300), period, 5), Liveness::Suspect);
        assert_eq!(liveness(at(500), period, 5), Liveness::Suspect);
        assert_eq!(liveness(at(501), period, 5), Liveness::Dead);
        assert_eq!(
            liveness(at(201), period, 0),
            Liveness::Dead,
            "a TTL below 2 counts as 2"
        );
    }

    #[test]
    fn transitions_are_counted_once() {
        let mut transitions = Transitions::default();
        let list = |entries: &[(u64, Liveness)]| entries.iter().copied().collect();
        transitions.update(&list(&[(1, Liveness::Alive), (2, Liveness::Alive)]));
        transitions.update(&list(&[(1, Liveness::Suspect), (2, Liveness::Alive)]));
        transitions.update(&list(&[(1, Liveness::Suspect), (2, Liveness::Alive)]));
        transitions.update(&list(&[(1, Liveness::Alive), (2, Liveness::Alive)]));
        transitions.update(&list(&[(1, Liveness::Dead)]));
        transitions.update(&list(&[(1, Liveness::Dead)]));
        transitions.update(&list(&[(1, Liveness::Alive)]));
        assert_eq!(
            transitions.counts(),
            TransitionCounts {
                joined: 3,
                suspected: 1,
                cleared: 1,
                died: 1,
                left: 1,
            }
        );
    }
}
