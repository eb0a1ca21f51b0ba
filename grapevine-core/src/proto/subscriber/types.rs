//! The subscriber's public types: its settings, the events it reports, its counters and the
//! read-only view of a stream.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::state::ReplicatedState;

/// Settings of a [`SubscriberSession`](super::SubscriberSession).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscriberConfig {
    /// Topic to replicate; datagrams of other topics are counted and ignored.
    pub topic: u32,
    /// How long a missing `seq` is waited for before it is declared lost. Default 2 ms.
    pub reorder_window: Duration,
    /// Out-of-order deltas held at most; beyond this a gap is declared at once. Default 65 536.
    pub max_held_deltas: usize,
    /// Deltas buffered per stale leaf; the oldest are dropped beyond. Default 1024.
    pub max_stale_buffer: usize,
    /// Deltas buffered for all stale leaves of a stream together; beyond this new ones are
    /// dropped (their leaves then wait for a later snapshot). Bounds memory when a subscriber
    /// falls far behind. Default 65 536.
    pub max_stale_total: usize,
    /// Largest snapshot cycle accepted, in leaves. Default 16 Mi.
    pub max_cycle_leaves: u32,
    /// Largest reassembled message. Default 1 MiB.
    pub max_message_len: usize,
    /// Memory for incomplete fragmented messages. Default 16 MiB.
    pub max_reassembly_bytes: usize,
    /// Incomplete fragmented messages are dropped after this. Default 1 s.
    pub fragment_timeout: Duration,
    /// Emit [`SubscriberEvent::Applied`] for every delta. Default true.
    pub emit_applied: bool,
    /// A publisher not heard for this long is reported silent. Default 3 s.
    pub publisher_timeout: Duration,
    /// Most publishers followed at once. A new one beyond this takes the place of the one
    /// silent the longest, or is refused when none is silent: a flood of forged publisher ids
    /// cannot grow memory without bound. Default 1024.
    pub max_streams: usize,
    /// Accept only datagrams signed with a key of this keyring, each once ([`crate::auth`]).
    /// Default none: everything is accepted.
    pub keyring: Option<std::sync::Arc<crate::auth::Keyring>>,
    /// Ask the publisher to resend missing deltas ([`SubscriberSession::poll_repair`](super::SubscriberSession::poll_repair)) before
    /// the reorder window declares them lost. Default false.
    pub repair: bool,
    /// Longest random wait before asking, so that subscribers that lost the same datagram do
    /// not all ask: the first request seen suppresses the others. Keep it well below
    /// `reorder_window`. Default 300 µs.
    pub repair_delay: Duration,
    /// Seed of that random wait (different per subscriber). Default 0.
    pub repair_seed: u64,
}

impl SubscriberConfig {
    /// Settings for `topic` with every other value at its default.
    pub fn new(topic: u32) -> Self {
        Self {
            topic,
            ..Self::default()
        }
    }
}

impl Default for SubscriberConfig {
    fn default() -> Self {
        Self {
            topic: 0,
            reorder_window: Duration::from_millis(2),
            max_held_deltas: 65_536,
            max_stale_buffer: 1024,
            max_stale_total: 65_536,
            max_cycle_leaves: 1 << 24,
            max_message_len: 1 << 20,
            max_reassembly_bytes: 16 << 20,
            fragment_timeout: Duration::from_secs(1),
            emit_applied: true,
            publisher_timeout: Duration::from_secs(3),
            max_streams: 1024,
            keyring: None,
            repair: false,
            repair_delay: Duration::from_micros(300),
            repair_seed: 0,
        }
    }
}

/// What happened to the replicated state.
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum SubscriberEvent<K> {
    /// A publisher was heard for the first time.
    PublisherJoined {
        /// Publisher id.
        publisher: u32,
        /// Its session.
        session: u64,
    },
    /// A publisher came back with a new session: its state is rebuilt from scratch.
    PublisherRestarted {
        /// Publisher id.
        publisher: u32,
        /// The session that ended.
        old_session: u64,
        /// The new session.
        new_session: u64,
    },
    /// A publisher has not been heard for `publisher_timeout`.
    PublisherSilent {
        /// Publisher id.
        publisher: u32,
    },
    /// A delta was applied.
    Applied {
        /// Publisher id.
        publisher: u32,
        /// The delta's `seq`.
        seq: u64,
        /// The leaf it changed.
        key: K,
    },
    /// Sequence numbers were lost; the stream recovers from snapshots.
    Gap {
        /// Publisher id.
        publisher: u32,
        /// First lost `seq`.
        first: u64,
        /// How many were lost.
        lost: u64,
    },
    /// A leaf missed a delta and must not be trusted until it is rebuilt.
    LeafStale {
        /// Publisher id.
        publisher: u32,
        /// The leaf.
        key: K,
    },
    /// A stale leaf was rebuilt from a snapshot.
    LeafRecovered {
        /// Publisher id.
        publisher: u32,
        /// The leaf.
        key: K,
    },
    /// The stream is live: its state equals the publisher's.
    Live {
        /// Publisher id.
        publisher: u32,
        /// How long the recovery took, when this ends one.
        recovery: Option<Duration>,
    },
}

/// Where a stream stands.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum StreamStatus {
    /// Heard, but no `seq` known yet.
    Joining,
    /// Some leaves are stale or the state is unverified.
    Recovering,
    /// The state equals the publisher's as of the last processed `seq`.
    Live,
}

/// Counters of a subscriber session.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
#[non_exhaustive]
pub struct SubscriberStats {
    /// Datagrams received.
    pub datagrams: u64,
    /// Datagrams rejected by the decoder.
    pub malformed: u64,
    /// Datagrams refused by authentication: unsigned, unknown key or bad tag (a subscriber
    /// whose count keeps growing has the wrong key, or the publisher has none).
    pub unauthenticated: u64,
    /// Signed datagrams seen before (or too old): replays.
    pub replayed: u64,
    /// Repair requests this subscriber sent.
    pub repairs_requested: u64,
    /// Repair requests not sent because another subscriber asked first.
    pub repairs_suppressed: u64,
    /// Messages whose payload did not decode as the topic's types.
    pub bad_payloads: u64,
    /// Datagrams of other topics.
    pub foreign_topic: u64,
    /// Self-test probes.
    pub probes: u64,
    /// Datagrams from sessions older than the one followed (on a signed feed, also after the
    /// followed one went silent: a replayed old session cannot roll the state back).
    pub retired_session: u64,
    /// Silent publishers dropped to make room for a new one (`max_streams`).
    pub streams_evicted: u64,
    /// Datagrams of new publishers refused because `max_streams` were followed and none was
    /// silent.
    pub streams_refused: u64,
    /// Deltas received (including duplicates).
    pub deltas_received: u64,
    /// Deltas applied to the state one by one. Under loss this can be far below the deltas
    /// published: see `superseded`.
    pub deltas_applied: u64,
    /// Duplicate or already-processed deltas.
    pub duplicates: u64,
    /// Deltas not applied because a snapshot already carried their effect: while a stream
    /// recovers, a leaf rebuilt from the snapshot cycle skips the deltas older than the leaf's
    /// snapshot. Nothing is missing from the state; under heavy loss most deltas can end up
    /// here rather than in `deltas_applied`.
    pub superseded: u64,
    /// Gaps declared.
    pub gaps: u64,
    /// Sequence numbers declared lost.
    pub messages_lost: u64,
    /// Leaves that went stale.
    pub stale_leaves: u64,
    /// Deltas of stale leaves dropped because the buffers were full.
    pub stale_dropped: u64,
    /// Snapshot messages received.
    pub snapshot_messages: u64,
    /// Leaves replaced from snapshots.
    pub snapshot_replaced: u64,
    /// Leaves removed because a cycle showed them absent.
    pub snapshot_removed: u64,
    /// Streams that became live for the first time: the join of each publisher session
    /// followed (a late join, a publisher's first start or its restart). Not counted as
    /// recoveries.
    pub joins: u64,
    /// Complete recoveries: a stream that had been live went back to live after a gap.
    pub recoveries: u64,
    /// Duration of the last recovery.
    pub last_recovery: Option<Duration>,
    /// Publisher restarts seen.
    pub restarts: u64,
    /// Messages reassembled from fragments.
    pub reassembled: u64,
    /// Fragments refused or incomplete messages dropped.
    pub fragments_dropped: u64,
}

/// A read-only view of one publisher's stream.
#[derive(Debug)]
pub struct StreamView<'a, S: ReplicatedState> {
    /// Publisher id.
    pub publisher: u32,
    /// Its current session.
    pub session: u64,
    /// Where the stream stands.
    pub status: StreamStatus,
    /// The replicated state (stale leaves hold their last trusted value).
    pub state: &'a S,
    /// Leaves that must not be trusted until rebuilt.
    pub stale: &'a BTreeSet<S::Key>,
    /// Last `seq` processed in order.
    pub last_seq: u64,
    /// When a datagram of this stream (delta, heartbeat or snapshot) last arrived: what
    /// failure detectors go by, since it keeps moving while the stream recovers from a gap.
    pub last_heard: Instant,
    /// Nothing arrived for the publisher timeout: the state may be behind the publisher's
    /// (a publisher stopped, or a cut on the way, a repeater's WAN link say). Set when the
    /// timeout is handled, cleared by the next datagram.
    pub silent: bool,
    /// Gaps, losses and recoveries of this stream's current session.
    pub counters: StreamCounters,
}

/// What happened to one stream in its current session (a publisher restart starts again from
/// zero); [`SubscriberStats`] adds up every stream.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
#[non_exhaustive]
pub struct StreamCounters {
    /// Gaps declared.
    pub gaps: u64,
    /// Messages declared lost in those gaps.
    pub messages_lost: u64,
    /// Recoveries completed (the first time live is a join, not counted here).
    pub recoveries: u64,
}
