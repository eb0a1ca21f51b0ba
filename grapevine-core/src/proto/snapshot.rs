//! The snapshot cycle: walks the publisher's leaves in key order at a bounded rate.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec;
use crate::proto::PublisherSession;
use crate::state::ReplicatedState;
use crate::wire::{
    CyclePosition, DatagramBuilder, Fragmenter, DEFAULT_MAX_DATAGRAM, LEAF_FIELDS_LEN,
    MESSAGE_HEADER_LEN,
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
    /// Sign every datagram with this keyring's signing key ([`crate::auth`]). Default none.
    pub keyring: Option<std::sync::Arc<crate::auth::Keyring>>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        Self {
            rate: SnapshotRate::LeavesPerSecond(100_000),
            cycle_pause: Duration::from_millis(10),
            max_datagram: DEFAULT_MAX_DATAGRAM,
            max_message_len: 1 << 20,
            tick: Duration::from_millis(1),
            keyring: None,
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
    /// Datagrams produced.
    pub datagrams: u64,
    /// Bytes produced.
    pub bytes: u64,
    /// Leaves that could not be encoded or were too large, and were skipped.
    pub skipped: u64,
    /// Duration of the last complete cycle.
    pub last_cycle: Option<Duration>,
    /// Cycles asked for with [`SnapshotSession::request_cycle`].
    pub requested: u64,
}

/// The sans-IO snapshotter of one publisher session.
///
/// A cycle walks the publisher's state in increasing key order, one leaf per step: each step
/// asks for the first key after the previous one ([`ReplicatedState::next_leaf`]) and sends that
/// leaf with its `as_of_seq` and the publisher's last `seq` at that moment (`read_seq`). When no
/// key follows, a cycle-end message closes the cycle. A subscriber that receives two
/// consecutive steps therefore knows that no key lay between them when the later one was read.
/// Steps are released at the configured rate. The publisher is read through a shared reference
/// in each call, so the caller decides how reads are made consistent with publishing (the
/// `grapevine-snapshotter` crate takes the publisher's lock for one short slice of steps).
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
    /// The last key sent in this cycle; `None` at its start.
    cursor: Option<K>,
    index: u32,
    in_cycle: bool,
    /// A cycle was requested while one was under way: skip the next pause.
    requested: bool,
    cycle_started_at: Option<Instant>,
    next_cycle_at: Option<Instant>,
    tokens: f64,
    refilled_at: Option<Instant>,
    out: VecDeque<Bytes>,
    scratch: Vec<u8>,
    stats: SnapshotStats,
    signer: Option<crate::auth::Signer>,
}

impl<K: Clone + Ord + serde::Serialize> SnapshotSession<K> {
    /// A snapshotter with `config`; it follows whatever publisher session it is given.
    pub fn new(config: SnapshotConfig) -> Self {
        Self {
            fragmenter: Fragmenter::for_leaves(config.max_message_len),
            signer: config
                .keyring
                .clone()
                .map(|keyring| crate::auth::Signer::new(keyring, 1)),
            config,
            builder: None,
            session: None,
            cycle: 0,
            cursor: None,
            index: 0,
            in_cycle: false,
            requested: false,
            cycle_started_at: None,
            next_cycle_at: None,
            tokens: 0.0,
            refilled_at: None,
            out: VecDeque::new(),
            scratch: Vec::new(),
            stats: SnapshotStats::default(),
        }
    }

    /// Sends as many steps as the rate allows by `now`.
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
                self.in_cycle = true;
                self.cycle = self.cycle.wrapping_add(1);
                self.cursor = None;
                self.index = 0;
                self.cycle_started_at = Some(now);
            }
            let cost = self.step(now, publisher);
            self.tokens -= cost;
        }
        self.flush();
    }

    /// Asks for a cycle now rather than after the pause: a subscriber that lost something
    /// (or just joined) need not wait. A cycle already under way finishes and the next one
    /// starts without a pause. Requests never raise the rate, so a flood of them costs at
    /// most the configured snapshot bandwidth.
    pub fn request_cycle(&mut self, now: Instant) {
        if self.in_cycle {
            self.requested = true;
        } else if self.next_cycle_at.is_some_and(|t| t > now) {
            self.next_cycle_at = Some(now);
        }
        self.stats.requested += 1;
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
        let datagram = self.out.pop_front()?;
        Some(crate::auth::Signer::sign_if(&mut self.signer, datagram))
    }

    /// Counters.
    pub fn stats(&self) -> SnapshotStats {
        self.stats
    }

    /// The current cycle number and how many leaves it has sent.
    pub fn progress(&self) -> (u32, u32) {
        (self.cycle, self.index)
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
        if let Some(signer) = &mut self.signer {
            signer.restart();
        }
        self.in_cycle = false;
        self.cursor = None;
        self.index = 0;
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

    /// Sends the leaf after the cursor, or the cycle's end; returns the tokens it cost.
    fn step<S: ReplicatedState<Key = K>>(
        &mut self,
        now: Instant,
        publisher: &PublisherSession<S>,
    ) -> f64 {
        let Some(builder) = self.builder.as_mut() else {
            return 1.0;
        };
        let position = CyclePosition {
            cycle: self.cycle,
            index: self.index,
            read_seq: publisher.last_seq(),
        };
        let Some((key, leaf)) = publisher.state().next_leaf(self.cursor.as_ref()) else {
            if !builder.push_cycle_end(position) {
                Self::finish_into(builder, &mut self.out, &mut self.stats);
                let pushed = builder.push_cycle_end(position);
                debug_assert!(pushed);
            }
            self.in_cycle = false;
            self.stats.cycles += 1;
            self.stats.last_cycle = self
                .cycle_started_at
                .map(|t| now.saturating_duration_since(t));
            self.next_cycle_at = if std::mem::take(&mut self.requested) {
                Some(now)
            } else {
                Some(now + self.config.cycle_pause)
            };
            return 1.0;
        };
        self.cursor = Some(key.clone());
        // Present leaves always have a seq; the fallback only makes the leaf stale.
        let as_of = publisher.leaf_seq(key).unwrap_or(position.read_seq).max(1);
        self.scratch.clear();
        let encoded = codec::encode_into(&(key, leaf), &mut self.scratch);
        if encoded.is_err() || self.scratch.len() > self.config.max_message_len {
            // Skipping keeps the index: subscribers see a hole between its neighbours, which
            // stays uncovered this cycle rather than being taken for an absence.
            self.index = self.index.wrapping_add(1);
            self.stats.skipped += 1;
            return 1.0;
        }
        self.index = self.index.wrapping_add(1);
        if !builder.push_leaf(position, as_of, &self.scratch) {
            Self::finish_into(builder, &mut self.out, &mut self.stats);
            if !builder.push_leaf(position, as_of, &self.scratch) {
                let out = &mut self.out;
                let stats = &mut self.stats;
                let fragmented = self.fragmenter.fragment_leaf(
                    builder,
                    position,
                    as_of,
                    &self.scratch,
                    |datagram| {
                        stats.datagrams += 1;
                        stats.bytes += datagram.len() as u64;
                        out.push_back(datagram);
                    },
                );
                if fragmented.is_err() {
                    self.stats.skipped += 1;
                }
            }
        }
        self.stats.leaves += 1;
        match self.config.rate {
            SnapshotRate::LeavesPerSecond(_) => 1.0,
            SnapshotRate::BytesPerSecond(_) => {
                (MESSAGE_HEADER_LEN + LEAF_FIELDS_LEN + self.scratch.len()) as f64
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::PublisherConfig;
    use crate::state::{KeyedMap, MapDelta};

    fn one_leaf_publisher(now: Instant) -> PublisherSession<KeyedMap<u32, u32>> {
        let mut publisher =
            PublisherSession::new(PublisherConfig::new(1), 7, KeyedMap::default(), now);
        assert!(publisher.publish(now, MapDelta::Put(1, 1)).is_ok());
        publisher
    }

    fn paused_config() -> SnapshotConfig {
        SnapshotConfig {
            cycle_pause: Duration::from_secs(10),
            ..SnapshotConfig::default()
        }
    }

    #[test]
    fn a_request_ends_the_pause() {
        let start = Instant::now();
        let publisher = one_leaf_publisher(start);
        let mut snapshot = SnapshotSession::new(paused_config());
        snapshot.handle_timeout(start, &publisher);
        assert_eq!(snapshot.stats().cycles, 1);
        let later = start + Duration::from_millis(50);
        snapshot.handle_timeout(later, &publisher);
        assert_eq!(snapshot.stats().cycles, 1, "paused: no second cycle yet");
        snapshot.request_cycle(later);
        assert!(snapshot
            .poll_timeout()
            .is_some_and(|t| t <= later + Duration::from_millis(1)));
        snapshot.handle_timeout(later + Duration::from_millis(1), &publisher);
        assert_eq!(snapshot.stats().cycles, 2);
        assert_eq!(snapshot.stats().requested, 1);
    }

    #[test]
    fn a_request_during_a_cycle_skips_the_next_pause() {
        let start = Instant::now();
        let mut publisher = one_leaf_publisher(start);
        for key in 2..1000 {
            assert!(publisher.publish(start, MapDelta::Put(key, key)).is_ok());
        }
        let mut snapshot = SnapshotSession::new(SnapshotConfig {
            rate: SnapshotRate::LeavesPerSecond(1000),
            ..paused_config()
        });
        snapshot.handle_timeout(start, &publisher);
        assert_eq!(
            snapshot.stats().cycles,
            0,
            "a 1000-leaf cycle takes a second"
        );
        snapshot.request_cycle(start);
        let mut now = start;
        while snapshot.stats().cycles < 2 && now < start + Duration::from_secs(3) {
            now = snapshot.poll_timeout().unwrap_or(now).max(now);
            snapshot.handle_timeout(now, &publisher);
        }
        assert_eq!(
            snapshot.stats().cycles,
            2,
            "no pause after the requested cycle: {:?} {:?}",
            snapshot.stats(),
            now - start
        );
    }

    #[test]
    fn requests_never_raise_the_rate() {
        let start = Instant::now();
        let publisher = one_leaf_publisher(start);
        let mut snapshot = SnapshotSession::new(SnapshotConfig {
            rate: SnapshotRate::LeavesPerSecond(100),
            ..paused_config()
        });
        let mut now = start;
        for _ in 0..1000 {
            now += Duration::from_millis(1);
            snapshot.request_cycle(now);
            snapshot.handle_timeout(now, &publisher);
        }
        // One leaf plus one cycle end per cycle, at 100 steps/s over one second (plus the
        // initial burst).
        assert!(snapshot.stats().cycles <= 60, "{:?}", snapshot.stats());
        assert!(snapshot.stats().cycles >= 40, "{:?}", snapshot.stats());
    }
}
