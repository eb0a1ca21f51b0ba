//! The snapshot cycle: walks the publisher's leaves at a bounded rate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec;
use crate::proto::PublisherSession;
use crate::state::ReplicatedState;
use crate::wire::{
    CyclePosition, DatagramBuilder, Fragmenter, DEFAULT_MAX_DATAGRAM, MESSAGE_HEADER_LEN,
    SNAPSHOT_FIELDS_LEN,
};

/// How fast a snapshot cycle sends leaves.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum SnapshotRate {
    /// At most this many leaves per second.
    LeavesPerSecond(u32),
    /// At most this many bytes per second (datagram bytes).
    BytesPerSecond(u64),
}

impl SnapshotRate {
    fn per_second(self) -> f64 {
        match self {
            Self::LeavesPerSecond(n) => f64::from(n.max(1)),
            Self::BytesPerSecond(n) => n.max(1) as f64,
        }
    }
}

/// Settings of a [`SnapshotSession`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SnapshotConfig {
    /// Sending rate. Default 100 000 leaves/s.
    pub rate: SnapshotRate,
    /// Pause between the end of a cycle and the start of the next, so that small states are
    /// not resent thousands of times a second. Default 10 ms.
    pub cycle_pause: Duration,
    /// Largest datagram to build. Default 1400 bytes.
    pub max_datagram: usize,
    /// Largest encoded leaf; larger leaves are skipped and counted. Default 1 MiB.
    pub max_message_len: usize,
    /// Tokens are released in slices of this length, so a datagram carries many leaves.
    /// Default 1 ms.
    pub tick: Duration,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            rate: SnapshotRate::LeavesPerSecond(100_000),
            cycle_pause: Duration::from_millis(10),
            max_datagram: DEFAULT_MAX_DATAGRAM,
            max_message_len: 1 << 20,
            tick: Duration::from_millis(1),
        }
    }
}

/// Counters of a snapshot session.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
#[non_exhaustive]
pub struct SnapshotStats {
    /// Cycles completed.
    pub cycles: u64,
    /// Leaves sent.
    pub leaves: u64,
    /// Tombstones sent (keys deleted before the cycle reached them).
    pub tombstones: u64,
    /// Datagrams produced.
    pub datagrams: u64,
    /// Bytes produced.
    pub bytes: u64,
    /// Leaves that could not be encoded or were too large, and were skipped.
    pub skipped: u64,
    /// Duration of the last complete cycle.
    pub last_cycle: Option<Duration>,
}

/// The sans-IO snapshotter of one publisher session.
///
/// At the start of a cycle it records the keys present, in key order, and the publisher's last
/// `seq`, then sends each key's leaf with its `as_of_seq` (or a tombstone if the key was deleted since),
/// releasing tokens at the configured rate. It reads the publisher through a shared reference
/// in each call, so the caller decides how reads are made consistent with publishing (the
/// `grapevine-snapshotter` crate takes the publisher's lock for one short slice of leaves).
///
/// ```
/// use std::time::{Duration, Instant};
/// use grapevine_core::proto::{PublisherConfig, PublisherSession, SnapshotConfig, SnapshotSession};
/// use grapevine_core::state::{KeyedMap, MapDelta};
///
/// let now = Instant::now();
/// let mut publisher = PublisherSession::new(PublisherConfig::new(1), 7, KeyedMap::default(), now);
/// publisher.publish(now, MapDelta::Put(1u32, 1u32)).unwrap();
/// let mut snapshot = SnapshotSession::new(SnapshotConfig::default());
/// snapshot.handle_timeout(now + Duration::from_millis(5), &publisher);
/// assert!(snapshot.poll_transmit().is_some());
/// assert_eq!(snapshot.stats().cycles, 1);
/// ```
#[derive(Debug)]
pub struct SnapshotSession<K> {
    config: SnapshotConfig,
    builder: Option<DatagramBuilder>,
    fragmenter: Fragmenter,
    session: Option<u64>,
    cycle: u32,
    keys: Vec<K>,
    next_index: usize,
    start_seq: u64,
    in_cycle: bool,
    cycle_started_at: Option<Instant>,
    next_cycle_at: Option<Instant>,
    tokens: f64,
    refilled_at: Option<Instant>,
    out: VecDeque<Bytes>,
    scratch: Vec<u8>,
    stats: SnapshotStats,
}

impl<K: Clone + Ord + serde::Serialize> SnapshotSession<K> {
    /// A snapshotter with `config`; it follows whatever publisher session it is given.
    pub fn new(config: SnapshotConfig) -> Self {
        Self {
            fragmenter: Fragmenter::new(config.max_message_len),
            config,
            builder: None,
            session: None,
            cycle: 0,
            keys: Vec::new(),
            next_index: 0,
            start_seq: 0,
            in_cycle: false,
            cycle_started_at: None,
            next_cycle_at: None,
            tokens: 0.0,
            refilled_at: None,
            out: VecDeque::new(),
            scratch: Vec::new(),
            stats: SnapshotStats::default(),
        }
    }

    /// Sends as many leaves as the rate allows by `now`.
    pub fn handle_timeout<S>(&mut self, now: Instant, publisher: &PublisherSession<S>)
    where
        S: ReplicatedState<Key = K>,
    {
        if self.session != Some(publisher.session()) {
            self.restart(publisher);
        }
        self.refill(now);
        while self.tokens > 0.0 {
            if !self.in_cycle {
                if self.next_cycle_at.is_some_and(|t| now < t) {
                    break;
                }
                self.start_cycle(now, publisher);
                continue;
            }
            if self.next_index >= self.keys.len() {
                self.end_cycle(now);
                continue;
            }
            let cost = self.send_leaf(publisher);
            self.tokens -= cost;
        }
        self.flush();
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let refilled_at = self.refilled_at?;
        let per_second = self.config.rate.per_second();
        let slice = (per_second * self.config.tick.as_secs_f64()).max(1.0);
        let wanted = (slice - self.tokens).max(0.0);
        let at = refilled_at + Duration::from_secs_f64(wanted / per_second);
        Some(match self.next_cycle_at {
            Some(next) if !self.in_cycle => at.max(next),
            _ => at,
        })
    }

    /// The next snapshot datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        self.out.pop_front()
    }

    /// Counters.
    pub fn stats(&self) -> SnapshotStats {
        self.stats
    }

    /// The current cycle number and how far it has got (`index`, `count`).
    pub fn progress(&self) -> (u32, usize, usize) {
        (self.cycle, self.next_index, self.keys.len())
    }

    fn restart<S: ReplicatedState<Key = K>>(&mut self, publisher: &PublisherSession<S>) {
        let config = publisher.config();
        self.session = Some(publisher.session());
        self.builder = Some(DatagramBuilder::new(
            self.config.max_datagram,
            config.topic,
            config.publisher,
            publisher.session(),
        ));
        self.cycle = 0;
        self.in_cycle = false;
        self.keys.clear();
        self.next_index = 0;
        self.next_cycle_at = None;
        self.out.clear();
    }

    fn refill(&mut self, now: Instant) {
        let per_second = self.config.rate.per_second();
        let burst = (per_second * self.config.tick.as_secs_f64() * 4.0).max(1.0);
        match self.refilled_at {
            None => self.tokens = burst,
            Some(at) => {
                let earned = now.saturating_duration_since(at).as_secs_f64() * per_second;
                self.tokens = (self.tokens + earned).min(burst);
            }
        }
        self.refilled_at = Some(now);
    }

    fn start_cycle<S: ReplicatedState<Key = K>>(
        &mut self,
        now: Instant,
        publisher: &PublisherSession<S>,
    ) {
        self.cycle = self.cycle.wrapping_add(1);
        self.keys.clear();
        self.keys
            .extend(publisher.state().leaves().map(|(k, _)| k.clone()));
        // Subscribers rely on the order: no key lies between two consecutive indices. (Cheap
        // when the state iterates in order already, as BTreeMap-based states do.)
        self.keys.sort_unstable();
        self.next_index = 0;
        self.start_seq = publisher.last_seq();
        self.in_cycle = true;
        self.cycle_started_at = Some(now);
        if self.keys.is_empty() || u32::try_from(self.keys.len()).is_err() {
            let Some(builder) = self.builder.as_mut() else {
                return;
            };
            if !builder.push_empty_cycle(self.cycle, self.start_seq) {
                Self::finish_into(builder, &mut self.out, &mut self.stats);
                let pushed = builder.push_empty_cycle(self.cycle, self.start_seq);
                debug_assert!(pushed);
            }
            self.keys.clear();
            self.tokens -= 1.0;
        }
    }

    fn end_cycle(&mut self, now: Instant) {
        self.in_cycle = false;
        self.stats.cycles += 1;
        self.stats.last_cycle = self
            .cycle_started_at
            .map(|t| now.saturating_duration_since(t));
        self.next_cycle_at = Some(now + self.config.cycle_pause);
    }

    /// Sends the leaf at `next_index`; returns the tokens it cost.
    fn send_leaf<S: ReplicatedState<Key = K>>(&mut self, publisher: &PublisherSession<S>) -> f64 {
        let Some(builder) = self.builder.as_mut() else {
            return 1.0;
        };
        let index = self.next_index;
        self.next_index += 1;
        let Some(key) = self.keys.get(index) else {
            return 1.0;
        };
        let position = CyclePosition {
            cycle: self.cycle,
            start_seq: self.start_seq,
            leaf_index: index as u32,
            // Cycles above u32::MAX leaves are sent as empty cycles by `start_cycle`.
            leaf_count: self.keys.len() as u32,
        };
        self.scratch.clear();
        let leaf = publisher.state().leaf(key);
        let (as_of, encoded) = match leaf {
            Some(leaf) => (
                // Present leaves always have a seq; the fallback only makes the leaf stale.
                publisher.leaf_seq(key).unwrap_or(publisher.last_seq()),
                codec::encode_into(&(key, leaf), &mut self.scratch),
            ),
            None => (
                publisher.last_seq(),
                codec::encode_into(key, &mut self.scratch),
            ),
        };
        if encoded.is_err() || self.scratch.len() > self.config.max_message_len {
            self.stats.skipped += 1;
            return 1.0;
        }
        let is_leaf = leaf.is_some();
        let push = |builder: &mut DatagramBuilder, payload: &[u8]| {
            if is_leaf {
                builder.push_leaf(position, as_of, payload)
            } else {
                builder.push_tombstone(position, as_of, payload)
            }
        };
        if !push(builder, &self.scratch) {
            Self::finish_into(builder, &mut self.out, &mut self.stats);
            if !push(builder, &self.scratch) {
                let out = &mut self.out;
                let stats = &mut self.stats;
                let mut emit = |datagram: Bytes| {
                    stats.datagrams += 1;
                    stats.bytes += datagram.len() as u64;
                    out.push_back(datagram);
                };
                let fragmented = if is_leaf {
                    self.fragmenter.fragment_leaf(
                        builder,
                        position,
                        as_of,
                        &self.scratch,
                        &mut emit,
                    )
                } else {
                    self.fragmenter.fragment_tombstone(
                        builder,
                        position,
                        as_of,
                        &self.scratch,
                        &mut emit,
                    )
                };
                if fragmented.is_err() {
                    self.stats.skipped += 1;
                }
            }
        }
        if is_leaf {
            self.stats.leaves += 1;
        } else {
            self.stats.tombstones += 1;
        }
        match self.config.rate {
            SnapshotRate::LeavesPerSecond(_) => 1.0,
            SnapshotRate::BytesPerSecond(_) => {
                (MESSAGE_HEADER_LEN + SNAPSHOT_FIELDS_LEN + self.scratch.len()) as f64
            }
        }
    }

    fn flush(&mut self) {
        if let Some(builder) = self.builder.as_mut() {
            Self::finish_into(builder, &mut self.out, &mut self.stats);
        }
    }

    fn finish_into(
        builder: &mut DatagramBuilder,
        out: &mut VecDeque<Bytes>,
        stats: &mut SnapshotStats,
    ) {
        if let Some(datagram) = builder.finish() {
            stats.datagrams += 1;
            stats.bytes += datagram.len() as u64;
            out.push_back(datagram);
        }
    }
}
