//! The subscriber side: per-publisher streams, gap detection, stale leaves and the rebuild from
//! snapshot cycles (DESIGN.md §4).
//!
//! # How a stream stays correct
//!
//! Each leaf remembers `last`, the `seq` of the last delta applied to it (or the `as_of_seq` of
//! the snapshot that set it). Deltas are processed in `seq` order after a short reorder window:
//!
//! * a delta with `seq <= last` is already reflected and skipped;
//! * a delta *chains* when its `prev` equals `last` (or is 0 and the leaf is absent): it is
//!   applied;
//! * otherwise the leaf is *stale*: its deltas are buffered until a snapshot of it newer than
//!   `last` arrives, which replaces it; the buffered chain is then replayed.
//!
//! A hole in `seq` (or a heartbeat ahead of us) may hide creations and deletions, so after it
//! the stream is *unverified* until snapshot cycles that started at or after the hole have
//! shown the whole key space. A snapshot leaf whose `as_of_seq <= last` confirms our leaf (we
//! applied every delta on it up to `last` by chaining, and the publisher applied none between
//! `as_of_seq` and the read); a newer one replaces it. Cycles send keys in order, so two
//! consecutive indices of one cycle show that no other key lay between them at the cycle's
//! start: local leaves there that were not changed since are removed, and the span counts as
//! covered. Spans from different cycles add up, so under steady loss the state is verified as
//! soon as every part of the key space has arrived once, not only when one cycle arrives whole.
//!
//! The stream is `Live` when nothing is stale or unverified and no leaf is ahead of the last
//! `seq` processed; while `Live` its state equals the publisher's as of that `seq`.
//!
//! A stream's life is its [`Phase`]: `Live`, or `CatchingUp` with what it works toward (the
//! verification walk after a hole, how far snapshots put leaves ahead, the spans shown empty);
//! it is joining until anything of the session is heard (`tracking`). The public types are in
//! `types.rs`, the per-leaf metadata in `leaves.rs` and the coverage map in `../coverage.rs`.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::ops::Bound;
use std::time::{Duration, Instant};

use crate::codec;
use crate::proto::coverage::{Pos, Side, SpanMap};
use crate::proto::reassembly::Reassembler;
use crate::state::ReplicatedState;
use crate::wire::{self, CyclePosition, Datagram, DecodeError, Message};

mod leaves;
mod types;

use leaves::LeafIndex;
pub use types::{
    StreamCounters, StreamStatus, StreamView, SubscriberConfig, SubscriberEvent, SubscriberStats,
};

#[derive(Debug)]
struct Tracking<D> {
    expected: u64,
    highest_seen: u64,
    held: BTreeMap<u64, (u64, D)>,
    gap_deadline: Option<Instant>,
    /// A repair to ask for: the missing range, when to ask, and whether it was asked (or
    /// another subscriber asked).
    repair: Option<PendingRepair>,
}

#[derive(Clone, Copy, Debug)]
struct PendingRepair {
    first: u64,
    last: u64,
    due: Instant,
    done: bool,
}

/// The steps received so far of the snapshot cycle being watched: index → (key, read seq).
#[derive(Debug)]
struct CycleSteps<K> {
    cycle: u32,
    steps: BTreeMap<u32, (K, u64)>,
    /// Index and read seq of the cycle's end, once received.
    end: Option<(u32, u64)>,
}

/// The state of one publisher's stream.
#[derive(Debug)]
struct Stream<S: ReplicatedState> {
    publisher: u32,
    session: u64,
    state: S,
    leaves: LeafIndex<S::Key, S::Delta>,
    stale: BTreeSet<S::Key>,
    /// Deltas held in all stale leaves' buffers.
    stale_buffered: usize,
    /// `None` until the session's first delta or heartbeat: the stream is joining.
    tracking: Option<Tracking<S::Delta>>,
    phase: Phase<S::Key>,
    last_heard: Instant,
    silent: bool,
    /// This session's counters (the session-wide ones are in [`SubscriberStats`]).
    counters: StreamCounters,
}

/// Where a stream is in its life (with [`Stream::tracking`], which says whether anything of
/// the session was heard yet).
#[derive(Debug)]
enum Phase<K> {
    /// The state equals the publisher's as of the last `seq` processed.
    Live,
    /// Not live yet in this session (joining), or no longer (recovering).
    CatchingUp(CatchUp<K>),
}

/// What a stream that is not live works toward.
#[derive(Debug)]
struct CatchUp<K> {
    since: Instant,
    /// Whether the stream was live before in this session: this is a recovery, not a join.
    was_live: bool,
    /// Present while a hole in `seq` may hide creations and deletions.
    verification: Option<Verification<K>>,
    /// Highest `seq` a leaf was set to from snapshots; live only once processing reaches it.
    ahead_until: u64,
    /// Spans shown empty, with the seq as of which they were: keys without metadata there are
    /// absent as of that seq.
    absent: SpanMap<K, u64>,
}

impl<K: Ord + Clone> CatchUp<K> {
    fn new(since: Instant, was_live: bool) -> Self {
        Self {
            since,
            was_live,
            verification: None,
            ahead_until: 0,
            absent: SpanMap::new(),
        }
    }
}

/// The walk of the key space that proves a stream has no leaf it should not have, and misses
/// none, after a hole.
#[derive(Debug)]
struct Verification<K> {
    /// Only cycles read at or after this `seq` count.
    after: u64,
    /// The cycle being watched.
    cycle: Option<CycleSteps<K>>,
    /// What those cycles have shown.
    coverage: SpanMap<K, ()>,
}

impl<K: Ord + Clone> Verification<K> {
    fn after(after: u64) -> Self {
        Self {
            after,
            cycle: None,
            coverage: SpanMap::new(),
        }
    }
}

/// A leaf of a snapshot cycle, decoded: where the cycle was, the `seq` the leaf is as of, and
/// the leaf.
struct SnapshotLeaf<K, L> {
    position: CyclePosition,
    as_of: u64,
    key: K,
    leaf: L,
}

/// Output shared by the streams of a session.
#[derive(Debug)]
struct Sink<K> {
    events: VecDeque<SubscriberEvent<K>>,
    stats: SubscriberStats,
    last_error: Option<DecodeError>,
}

/// The sans-IO subscriber of one topic: replicates the state of every publisher of the topic.
///
/// Inputs: [`handle_datagram`](Self::handle_datagram) for every datagram received (from the live
/// and the recovery group alike) and [`handle_timeout`](Self::handle_timeout) when
/// [`poll_timeout`](Self::poll_timeout) is reached. Outputs: [`poll_event`](Self::poll_event)
/// until `None` after each input; the state is read through [`stream`](Self::stream).
///
/// ```
/// use std::time::Instant;
/// use grapevine_core::proto::{PublisherConfig, PublisherSession, StreamStatus, SubscriberConfig, SubscriberSession};
/// use grapevine_core::state::{KeyedMap, MapDelta};
///
/// let now = Instant::now();
/// let mut publisher = PublisherSession::new(PublisherConfig::new(3), 11, KeyedMap::default(), now);
/// let mut subscriber = SubscriberSession::<KeyedMap<u32, u32>>::new(SubscriberConfig::new(3));
/// publisher.publish(now, MapDelta::Put(1u32, 100u32)).unwrap();
/// publisher.flush(now);
/// while let Some(datagram) = publisher.poll_transmit() {
///     subscriber.handle_datagram(now, &datagram);
/// }
/// let stream = subscriber.stream(0).unwrap();
/// assert_eq!(stream.status, StreamStatus::Live);
/// assert_eq!(stream.state.get(&1), Some(&100));
/// ```
#[derive(Debug)]
pub struct SubscriberSession<S: ReplicatedState> {
    verifier: Option<crate::auth::Verifier>,
    /// Signs this subscriber's repair requests on a keyed feed.
    request_signer: Option<crate::auth::Signer>,
    config: SubscriberConfig,
    streams: BTreeMap<u32, Stream<S>>,
    reassembler: Reassembler,
    sink: Sink<S::Key>,
}

impl<S: ReplicatedState> SubscriberSession<S> {
    /// A subscriber with `config`.
    pub fn new(config: SubscriberConfig) -> Self {
        Self {
            reassembler: Reassembler::new(
                config.max_message_len,
                config.max_reassembly_bytes,
                config.fragment_timeout,
            ),
            verifier: config.keyring.clone().map(crate::auth::Verifier::new),
            // With a shared key subscribers sign their requests; a public key cannot sign.
            request_signer: config
                .keyring
                .clone()
                .filter(|keyring| keyring.is_shared())
                .map(|keyring| crate::auth::Signer::new(keyring, crate::auth::REQUEST_SENDER)),
            config,
            streams: BTreeMap::new(),
            sink: Sink {
                events: VecDeque::new(),
                stats: SubscriberStats::default(),
                last_error: None,
            },
        }
    }

    /// The next repair request to send (on the repair group), if one is due: a datagram
    /// asking the publisher to resend deltas this subscriber is missing.
    pub fn poll_repair(&mut self, now: Instant) -> Option<bytes::Bytes> {
        let topic = self.config.topic;
        for stream in self.streams.values_mut() {
            let session = stream.session;
            let publisher = stream.publisher;
            let Some(tracking) = stream.tracking.as_mut() else {
                continue;
            };
            let Some(repair) = tracking.repair.as_mut() else {
                continue;
            };
            if repair.done || now < repair.due {
                continue;
            }
            repair.done = true;
            self.sink.stats.repairs_requested += 1;
            tracing::debug!(
                publisher,
                first = repair.first,
                last = repair.last,
                "repair requested"
            );
            let request =
                wire::repair_request(topic, publisher, session, repair.first, repair.last);
            return match &mut self.request_signer {
                Some(signer) => request.map(|request| signer.sign(&request)),
                None => request,
            };
        }
        None
    }

    fn suppress_repair(&mut self, publisher: u32, session: u64, first: u64, last: u64) {
        let Some(stream) = self.streams.get_mut(&publisher) else {
            return;
        };
        if stream.session != session {
            return;
        }
        if let Some(repair) = stream.tracking.as_mut().and_then(|t| t.repair.as_mut()) {
            if !repair.done && first <= repair.first && last >= repair.last {
                repair.done = true;
                self.sink.stats.repairs_suppressed += 1;
            }
        }
    }

    /// Processes one received datagram. Malformed datagrams are counted and ignored.
    pub fn handle_datagram(&mut self, now: Instant, bytes: &[u8]) {
        self.sink.stats.datagrams += 1;
        let datagram = match Datagram::parse(bytes) {
            Ok(datagram) => datagram,
            Err(error) => {
                tracing::debug!(%error, len = bytes.len(), "malformed datagram");
                self.sink.stats.malformed += 1;
                self.sink.last_error = Some(error);
                return;
            }
        };
        if datagram.is_probe() {
            self.sink.stats.probes += 1;
            return;
        }
        let header = datagram.header();
        if header.topic() != self.config.topic {
            self.sink.stats.foreign_topic += 1;
            return;
        }
        let (publisher, session) = (header.publisher(), header.session());
        // Request datagrams hold only requests (`wire::repair_request`): the first message
        // tells, without a second pass over data datagrams.
        if matches!(
            datagram.messages().next(),
            Some(Message::RepairRequest { .. })
        ) {
            // Another subscriber's request (never data): it may make ours unnecessary. On a
            // keyed feed only a signed one, or a stranger could silence every request (with a
            // publisher's public key, requests cannot be signed: none suppresses ours).
            if let Some(keyring) = &self.config.keyring {
                if !keyring.is_shared() {
                    return;
                }
                if keyring.check(bytes).is_err() {
                    self.sink.stats.unauthenticated += 1;
                    return;
                }
            }
            for message in datagram.messages() {
                if let Message::RepairRequest { first, last } = message {
                    self.suppress_repair(publisher, session, first, last);
                }
            }
            return;
        }
        if let Some(verifier) = &mut self.verifier {
            match verifier.verify(bytes, publisher, session) {
                Ok(()) => {}
                Err(crate::auth::AuthError::Replayed) => {
                    self.sink.stats.replayed += 1;
                    return;
                }
                Err(error) => {
                    tracing::debug!(%error, publisher, "datagram refused");
                    self.sink.stats.unauthenticated += 1;
                    return;
                }
            }
        }
        if !self.admit(now, publisher, session) {
            return;
        }
        let Some(stream) = self.streams.get_mut(&publisher) else {
            return;
        };
        stream.last_heard = now;
        stream.silent = false;
        for message in datagram.messages() {
            let message = match message {
                Message::Fragment(fragment) => {
                    let key = (publisher, session, fragment.fragment_id);
                    match self.reassembler.push(now, key, &fragment) {
                        Ok(Some(whole)) => {
                            self.sink.stats.reassembled += 1;
                            match wire::decode_reassembled(&whole) {
                                Ok(message) => {
                                    stream.on_message(now, message, &self.config, &mut self.sink)
                                }
                                Err(error) => {
                                    self.sink.stats.malformed += 1;
                                    self.sink.last_error = Some(error);
                                }
                            }
                        }
                        Ok(None) => {}
                        Err(error) => {
                            tracing::debug!(%error, "fragment dropped");
                            self.sink.stats.fragments_dropped += 1;
                        }
                    }
                    continue;
                }
                other => other,
            };
            stream.on_message(now, message, &self.config, &mut self.sink);
        }
    }

    /// Declares gaps whose reorder window expired, expires fragments, notices silent publishers.
    pub fn handle_timeout(&mut self, now: Instant) {
        for stream in self.streams.values_mut() {
            stream.on_timeout(now, &self.config, &mut self.sink);
        }
        let dropped_before = self.reassembler.dropped();
        self.reassembler.handle_timeout(now);
        self.sink.stats.fragments_dropped += self.reassembler.dropped() - dropped_before;
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let streams = self.streams.values().filter_map(|s| {
            let repair = s
                .tracking
                .as_ref()
                .and_then(|t| t.repair)
                .filter(|r| !r.done)
                .map(|r| r.due);
            let gap = s.tracking.as_ref().and_then(|t| t.gap_deadline);
            let gap = match (gap, repair) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            };
            let silence = (!s.silent).then(|| s.last_heard + self.config.publisher_timeout);
            match (gap, silence) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            }
        });
        streams.chain(self.reassembler.poll_timeout()).min()
    }

    /// The next event.
    #[must_use]
    pub fn poll_event(&mut self) -> Option<SubscriberEvent<S::Key>> {
        self.sink.events.pop_front()
    }

    /// The stream of `publisher`.
    pub fn stream(&self, publisher: u32) -> Option<StreamView<'_, S>> {
        self.streams.get(&publisher).map(Stream::view)
    }

    /// Every stream, by publisher id.
    pub fn streams(&self) -> impl Iterator<Item = StreamView<'_, S>> {
        self.streams.values().map(Stream::view)
    }

    /// Whether at least one publisher is known and every stream is live.
    pub fn is_live(&self) -> bool {
        !self.streams.is_empty() && self.streams.values().all(Stream::is_live)
    }

    /// Counters.
    pub fn stats(&self) -> SubscriberStats {
        self.sink.stats
    }

    /// The last decoding error seen, for diagnostics.
    pub fn last_error(&self) -> Option<&DecodeError> {
        self.sink.last_error.as_ref()
    }

    /// The settings.
    pub fn config(&self) -> &SubscriberConfig {
        &self.config
    }

    /// Drops the stream silent the longest, if any is silent; returns whether it did.
    fn make_room(&mut self) -> bool {
        let Some(victim) = self
            .streams
            .values()
            .filter(|s| s.silent)
            .min_by_key(|s| s.last_heard)
            .map(|s| s.publisher)
        else {
            return false;
        };
        tracing::info!(
            publisher = victim,
            "silent publisher dropped to make room for a new one"
        );
        self.streams.remove(&victim);
        self.sink.stats.streams_evicted += 1;
        true
    }

    /// Finds or creates the stream of `publisher` for `session`; false if the datagram belongs
    /// to an older session than the one followed.
    ///
    /// Session ids are time-ordered ([`new_session_id`](crate::proto::new_session_id)), so a
    /// delayed datagram of the previous session cannot be mistaken for a restart. On an unsigned
    /// feed a lower id is still accepted once the current session has gone silent (a publisher
    /// whose clock went back); on a signed feed never.
    fn admit(&mut self, now: Instant, publisher: u32, session: u64) -> bool {
        // On a signed feed the newest session seen is final: a replay of an older one, even
        // once the current one is silent, would roll the state back to a dead session.
        let signed = self.verifier.is_some();
        match self.streams.get(&publisher) {
            Some(stream) if stream.session == session => true,
            Some(stream) if session < stream.session && (signed || !stream.silent) => {
                self.sink.stats.retired_session += 1;
                false
            }
            Some(stream) => {
                let old_session = stream.session;
                tracing::info!(
                    publisher,
                    old_session,
                    new_session = session,
                    "publisher restarted"
                );
                self.streams
                    .insert(publisher, Stream::new(publisher, session, now));
                self.sink.stats.restarts += 1;
                self.sink
                    .events
                    .push_back(SubscriberEvent::PublisherRestarted {
                        publisher,
                        old_session,
                        new_session: session,
                    });
                true
            }
            None => {
                if self.streams.len() >= self.config.max_streams && !self.make_room() {
                    self.sink.stats.streams_refused += 1;
                    return false;
                }
                tracing::info!(publisher, session, "publisher joined");
                self.streams
                    .insert(publisher, Stream::new(publisher, session, now));
                self.sink
                    .events
                    .push_back(SubscriberEvent::PublisherJoined { publisher, session });
                true
            }
        }
    }
}

impl<S: ReplicatedState> Stream<S> {
    fn new(publisher: u32, session: u64, now: Instant) -> Self {
        Self {
            publisher,
            session,
            state: S::default(),
            leaves: LeafIndex::new(),
            stale: BTreeSet::new(),
            stale_buffered: 0,
            tracking: None,
            phase: Phase::CatchingUp(CatchUp::new(now, false)),
            last_heard: now,
            silent: false,
            counters: StreamCounters::default(),
        }
    }

    fn view(&self) -> StreamView<'_, S> {
        let status = match (&self.tracking, &self.phase) {
            (None, _) => StreamStatus::Joining,
            (Some(_), Phase::Live) => StreamStatus::Live,
            (Some(_), Phase::CatchingUp(_)) => StreamStatus::Recovering,
        };
        StreamView {
            publisher: self.publisher,
            session: self.session,
            status,
            state: &self.state,
            stale: &self.stale,
            last_seq: self.tracking.as_ref().map_or(0, |t| t.expected - 1),
            last_heard: self.last_heard,
            silent: self.silent,
            counters: self.counters,
        }
    }

    fn on_message(
        &mut self,
        now: Instant,
        message: Message<'_>,
        config: &SubscriberConfig,
        sink: &mut Sink<S::Key>,
    ) {
        match message {
            Message::Delta { seq, prev, payload } => {
                sink.stats.deltas_received += 1;
                // Before decoding: a duplicate costs a comparison, not a decode and its
                // allocations.
                if self.already_has(seq) {
                    sink.stats.duplicates += 1;
                    return;
                }
                match codec::decode::<S::Delta>(payload) {
                    // A delta that does not decode is lost: the reorder window turns it into a gap.
                    Err(error) => bad_payload(sink, error),
                    Ok(delta) => self.on_delta(now, seq, prev, delta, config, sink),
                }
            }
            Message::Heartbeat { last_seq } => self.on_heartbeat(now, last_seq, config, sink),
            Message::Leaf {
                position,
                as_of_seq,
                payload,
            } => {
                sink.stats.snapshot_messages += 1;
                match codec::decode::<(S::Key, S::Leaf)>(payload) {
                    Err(error) => bad_payload(sink, error),
                    Ok((key, leaf)) => {
                        let snapshot = SnapshotLeaf {
                            position,
                            as_of: as_of_seq,
                            key,
                            leaf,
                        };
                        self.on_snapshot_leaf(now, snapshot, config, sink)
                    }
                }
            }
            Message::CycleEnd { position } => {
                sink.stats.snapshot_messages += 1;
                self.on_cycle_end(now, position, config, sink);
            }
            // Fragments are reassembled by the session before they reach a stream; repair
            // requests are handled by the session too.
            Message::Fragment(_) | Message::RepairRequest { .. } => {}
        }
    }

    /// Whether the delta `seq` was processed or is held already.
    fn already_has(&self, seq: u64) -> bool {
        self.tracking
            .as_ref()
            .is_some_and(|tracking| seq < tracking.expected || tracking.held.contains_key(&seq))
    }

    fn on_delta(
        &mut self,
        now: Instant,
        seq: u64,
        prev: u64,
        delta: S::Delta,
        config: &SubscriberConfig,
        sink: &mut Sink<S::Key>,
    ) {
        if self.tracking.is_none() {
            self.start_tracking(now, seq, sink);
        }
        let Some(tracking) = self.tracking.as_mut() else {
            return;
        };
        tracking.highest_seen = tracking.highest_seen.max(seq);
        if seq == tracking.expected && tracking.held.is_empty() {
            // The common case, in order: no detour through the reorder buffer.
            tracking.expected = seq.saturating_add(1);
            self.process(now, seq, prev, delta, config, sink);
        } else {
            tracking.held.insert(seq, (prev, delta));
        }
        self.drain(now, config, sink);
    }

    fn on_heartbeat(
        &mut self,
        now: Instant,
        last_seq: u64,
        config: &SubscriberConfig,
        sink: &mut Sink<S::Key>,
    ) {
        let Some(tracking) = self.tracking.as_mut() else {
            self.start_tracking(now, last_seq.saturating_add(1), sink);
            return;
        };
        tracking.highest_seen = tracking.highest_seen.max(last_seq);
        self.drain(now, config, sink);
    }

    /// The first `seq` known of this session is `first`: everything before was missed.
    fn start_tracking(&mut self, now: Instant, first: u64, sink: &mut Sink<S::Key>) {
        let missed_through = first.saturating_sub(1);
        self.tracking = Some(Tracking {
            expected: first,
            highest_seen: missed_through,
            held: BTreeMap::new(),
            gap_deadline: None,
            repair: None,
        });
        if missed_through > 0 {
            self.catching_up(now).verification = Some(Verification::after(missed_through));
        }
        self.update_live(now, sink);
    }

    fn on_timeout(&mut self, now: Instant, config: &SubscriberConfig, sink: &mut Sink<S::Key>) {
        if !self.silent && now >= self.last_heard + config.publisher_timeout {
            self.silent = true;
            tracing::warn!(publisher = self.publisher, "publisher silent");
            sink.events.push_back(SubscriberEvent::PublisherSilent {
                publisher: self.publisher,
            });
        }
        let due = self
            .tracking
            .as_ref()
            .and_then(|t| t.gap_deadline)
            .is_some_and(|deadline| now >= deadline);
        if due {
            self.declare_gap(now, sink);
            self.drain(now, config, sink);
        }
    }

    /// Gives up on the missing `seq`s below the first held delta (or up to the highest seen).
    fn declare_gap(&mut self, now: Instant, sink: &mut Sink<S::Key>) {
        let Some(tracking) = self.tracking.as_mut() else {
            return;
        };
        tracking.gap_deadline = None;
        tracking.repair = None;
        let through = match tracking.held.first_key_value() {
            Some((&first_held, _)) => first_held - 1,
            None => tracking.highest_seen,
        };
        if through < tracking.expected {
            return;
        }
        let first = tracking.expected;
        let lost = through - first + 1;
        tracking.expected = through.saturating_add(1);
        tracing::debug!(publisher = self.publisher, first, lost, "gap");
        sink.stats.gaps += 1;
        sink.stats.messages_lost = sink.stats.messages_lost.saturating_add(lost);
        self.counters.gaps += 1;
        self.counters.messages_lost = self.counters.messages_lost.saturating_add(lost);
        sink.events.push_back(SubscriberEvent::Gap {
            publisher: self.publisher,
            first,
            lost,
        });
        // What earlier cycles showed may predate the hole: verification starts over.
        let catch_up = self.catching_up(now);
        let after = catch_up
            .verification
            .as_ref()
            .map_or(through, |v| v.after.max(through));
        catch_up.verification = Some(Verification::after(after));
    }

    fn is_live(&self) -> bool {
        matches!(self.phase, Phase::Live)
    }

    /// What the stream works toward now that it is not live (since `now` if it was).
    fn catching_up(&mut self, now: Instant) -> &mut CatchUp<S::Key> {
        if self.is_live() {
            self.phase = Phase::CatchingUp(CatchUp::new(now, true));
        }
        match &mut self.phase {
            Phase::CatchingUp(catch_up) => catch_up,
            Phase::Live => unreachable!("replaced just above"),
        }
    }

    /// The verification under way, if any.
    fn verification(&self) -> Option<&Verification<S::Key>> {
        match &self.phase {
            Phase::CatchingUp(catch_up) => catch_up.verification.as_ref(),
            Phase::Live => None,
        }
    }

    /// Processes held deltas in order and arms the reorder timer for what is missing.
    fn drain(&mut self, now: Instant, config: &SubscriberConfig, sink: &mut Sink<S::Key>) {
        loop {
            let Some(tracking) = self.tracking.as_mut() else {
                return;
            };
            if let Some(entry) = tracking.held.first_entry() {
                if *entry.key() == tracking.expected {
                    let (seq, (prev, delta)) = entry.remove_entry();
                    tracking.expected = tracking.expected.saturating_add(1);
                    self.process(now, seq, prev, delta, config, sink);
                    continue;
                }
            }
            if tracking.held.len() > config.max_held_deltas {
                self.declare_gap(now, sink);
                continue;
            }
            if tracking.expected <= tracking.highest_seen {
                if tracking.gap_deadline.is_none() {
                    tracking.gap_deadline = Some(now + config.reorder_window);
                }
                if config.repair {
                    let last = tracking
                        .held
                        .first_key_value()
                        .map_or(tracking.highest_seen, |(first_held, _)| first_held - 1);
                    let first = tracking.expected;
                    let fresh = tracking.repair.is_none_or(|r| r.first != first);
                    if fresh {
                        // A deterministic per-subscriber jitter (sans-IO: no RNG here).
                        let mix = (config.repair_seed
                            ^ u64::from(self.publisher).rotate_left(32)
                            ^ first)
                            .wrapping_mul(0x9e37_79b9_7f4a_7c15);
                        let span = config.repair_delay.as_nanos().max(1) as u64;
                        tracing::debug!(
                            publisher = self.publisher,
                            first,
                            last,
                            "repair scheduled"
                        );
                        tracking.repair = Some(PendingRepair {
                            first,
                            last,
                            due: now + Duration::from_nanos((mix >> 11) % span),
                            done: false,
                        });
                    } else if let Some(repair) = tracking.repair.as_mut() {
                        repair.last = repair.last.max(last);
                    }
                }
            } else {
                tracking.gap_deadline = None;
                tracking.repair = None;
            }
            break;
        }
        self.update_live(now, sink);
    }

    /// Applies one delta in `seq` order, or buffers it on a stale leaf.
    fn process(
        &mut self,
        now: Instant,
        seq: u64,
        prev: u64,
        delta: S::Delta,
        config: &SubscriberConfig,
        sink: &mut Sink<S::Key>,
    ) {
        let key = S::delta_key(&delta);
        let (last, present) = match self.leaves.get_mut(key) {
            Some(meta) => {
                if let Some(buffer) = meta.stale.as_mut() {
                    if buffer.len() >= config.max_stale_buffer {
                        buffer.pop_front();
                        sink.stats.stale_dropped += 1;
                    } else if self.stale_buffered >= config.max_stale_total {
                        sink.stats.stale_dropped += 1;
                        return;
                    } else {
                        self.stale_buffered += 1;
                    }
                    buffer.push_back((seq, prev, delta));
                    return;
                }
                (meta.last, meta.present)
            }
            None => (self.absent_as_of(key).unwrap_or(0), false),
        };
        if seq <= last {
            sink.stats.superseded += 1;
            return;
        }
        let chains = if present { prev == last } else { prev == 0 };
        if chains {
            self.apply(seq, delta, config, sink);
            return;
        }
        let key = key.clone();
        let absent_as_of = self.absent_as_of(&key);
        tracing::debug!(
            publisher = self.publisher,
            ?key,
            seq,
            prev,
            last,
            "leaf stale"
        );
        let meta = self.leaves.get_or_insert(&key, absent_as_of);
        meta.stale = Some(if self.stale_buffered < config.max_stale_total {
            self.stale_buffered += 1;
            VecDeque::from([(seq, prev, delta)])
        } else {
            sink.stats.stale_dropped += 1;
            VecDeque::new()
        });
        self.stale.insert(key.clone());
        sink.stats.stale_leaves += 1;
        sink.events.push_back(SubscriberEvent::LeafStale {
            publisher: self.publisher,
            key,
        });
        self.catching_up(now);
    }

    fn apply(
        &mut self,
        seq: u64,
        delta: S::Delta,
        config: &SubscriberConfig,
        sink: &mut Sink<S::Key>,
    ) {
        // The state takes the delta apart; the key is needed after (keys are small).
        let key = S::delta_key(&delta).clone();
        let present = self.state.apply_owned(delta);
        sink.stats.deltas_applied += 1;
        if self.is_live() && !present {
            // While live nothing needs to remember deleted keys.
            self.leaves.remove(&key);
        } else {
            let meta = match self.leaves.get_mut(&key) {
                Some(meta) => meta,
                None => self.leaves.get_or_insert(&key, None),
            };
            meta.last = seq;
            meta.present = present;
        }
        if config.emit_applied {
            sink.events.push_back(SubscriberEvent::Applied {
                publisher: self.publisher,
                seq,
                key,
            });
        }
    }

    fn on_snapshot_leaf(
        &mut self,
        now: Instant,
        snapshot: SnapshotLeaf<S::Key, S::Leaf>,
        config: &SubscriberConfig,
        sink: &mut Sink<S::Key>,
    ) {
        let SnapshotLeaf {
            position,
            as_of,
            key,
            leaf,
        } = snapshot;
        // While live the state is exact as of the last processed seq; a newer snapshot only
        // means a delta is on its way (or lost, which the reorder window will declare), and
        // applying it early would put the leaf ahead of the rest of the state.
        if self.tracking.is_none() || self.is_live() {
            return;
        }
        let absent_as_of = self.absent_as_of(&key);
        let meta = match self.leaves.get_mut(&key) {
            Some(meta) => meta,
            None => self.leaves.get_or_insert(&key, absent_as_of),
        };
        // Newer than ours: replace. Otherwise ours already includes `as_of` (we applied every
        // delta on the leaf up to `last` by chaining) and the publisher applied none between
        // `as_of` and the read: ours is confirmed.
        if as_of > meta.last {
            self.state.put_leaf(key.clone(), leaf);
            meta.present = true;
            meta.last = as_of;
            sink.stats.snapshot_replaced += 1;
            if let Phase::CatchingUp(catch_up) = &mut self.phase {
                catch_up.ahead_until = catch_up.ahead_until.max(as_of);
            }
            if meta.stale.is_some() {
                self.replay(key.clone(), config, sink);
            }
        }
        if self.watch_cycle(position.cycle) {
            let point = Pos::Key(key.clone(), Side::At);
            self.cover(point.clone(), point, position.read_seq, config, sink);
            let index = position.index;
            let previous = match index.checked_sub(1) {
                None => Some(Pos::Start),
                Some(i) => self.step(i).map(|(k, _)| Pos::Key(k, Side::Above)),
            };
            // At this read the walk found `key` right after the previous step's key (`cover`
            // ignores steps out of order).
            if let Some(low) = previous {
                self.cover(
                    low,
                    Pos::Key(key.clone(), Side::Below),
                    position.read_seq,
                    config,
                    sink,
                );
            }
            let next = self.step(index.wrapping_add(1));
            if let Some((next_key, next_read)) = next {
                if next_key > key {
                    let high = Pos::Key(next_key, Side::Below);
                    self.cover(
                        Pos::Key(key.clone(), Side::Above),
                        high,
                        next_read,
                        config,
                        sink,
                    );
                }
            }
            let end = self
                .verification()
                .and_then(|v| v.cycle.as_ref())
                .and_then(|c| c.end);
            if let Some((end_index, end_read)) = end {
                if end_index == index.wrapping_add(1) {
                    self.cover(
                        Pos::Key(key.clone(), Side::Above),
                        Pos::End,
                        end_read,
                        config,
                        sink,
                    );
                }
            }
            if let Some(cycle) = self.watched_cycle() {
                if cycle.steps.len() < config.max_cycle_leaves as usize {
                    cycle.steps.insert(index, (key, position.read_seq));
                }
            }
        }
        self.update_live(now, sink);
    }

    fn on_cycle_end(
        &mut self,
        now: Instant,
        position: CyclePosition,
        config: &SubscriberConfig,
        sink: &mut Sink<S::Key>,
    ) {
        if self.tracking.is_none() || self.is_live() || !self.watch_cycle(position.cycle) {
            return;
        }
        // At this read the walk found no key after the last step's.
        let low = match position.index.checked_sub(1) {
            None => Some(Pos::Start),
            Some(i) => self.step(i).map(|(k, _)| Pos::Key(k, Side::Above)),
        };
        if let Some(low) = low {
            self.cover(low, Pos::End, position.read_seq, config, sink);
        }
        if let Some(cycle) = self.watched_cycle() {
            cycle.end = Some((position.index, position.read_seq));
        }
        self.update_live(now, sink);
    }

    /// Whether snapshot messages of `cycle` count toward verification, switching to it if it is
    /// newer than the one watched.
    fn watch_cycle(&mut self, cycle: u32) -> bool {
        let Phase::CatchingUp(CatchUp {
            verification: Some(verification),
            ..
        }) = &mut self.phase
        else {
            return false;
        };
        if let Some(current) = &verification.cycle {
            if current.cycle == cycle {
                return true;
            }
            // Serial-number arithmetic: cycle ids wrap; an older cycle is not watched again.
            if cycle.wrapping_sub(current.cycle) > u32::MAX / 2 {
                return false;
            }
        }
        verification.cycle = Some(CycleSteps {
            cycle,
            steps: BTreeMap::new(),
            end: None,
        });
        true
    }

    /// The cycle being watched, to record its steps.
    fn watched_cycle(&mut self) -> Option<&mut CycleSteps<S::Key>> {
        match &mut self.phase {
            Phase::CatchingUp(catch_up) => catch_up.verification.as_mut()?.cycle.as_mut(),
            Phase::Live => None,
        }
    }

    /// As of which seq `key`, which has no metadata, is known absent (from covered spans).
    fn absent_as_of(&self, key: &S::Key) -> Option<u64> {
        let Phase::CatchingUp(catch_up) = &self.phase else {
            return None;
        };
        if catch_up.absent.is_empty() {
            return None;
        }
        catch_up.absent.at(&Pos::Key(key.clone(), Side::At))
    }

    fn step(&self, index: u32) -> Option<(S::Key, u64)> {
        self.verification()?
            .cycle
            .as_ref()?
            .steps
            .get(&index)
            .cloned()
    }

    /// At `read_seq` the publisher had no key strictly inside [`low`, `high`] but possibly the
    /// ones at its ends (a point span [`At(k)`, `At(k)`] confirms one leaf). If that read is
    /// recent enough to verify, remove local leaves there that were not changed since, remember
    /// the span as absent, and count it covered.
    fn cover(
        &mut self,
        low: Pos<S::Key>,
        high: Pos<S::Key>,
        read_seq: u64,
        config: &SubscriberConfig,
        sink: &mut Sink<S::Key>,
    ) {
        if self.verification().is_none_or(|v| read_seq < v.after) {
            return;
        }
        // Steps out of key order come from a broken or forged cycle: they prove nothing.
        if low > high {
            return;
        }
        if low != high {
            let lower = match &low {
                Pos::Key(k, _) => Bound::Excluded(k),
                _ => Bound::Unbounded,
            };
            let upper = match &high {
                Pos::Key(k, _) => Bound::Excluded(k),
                _ => Bound::Unbounded,
            };
            let mut removed = Vec::new();
            let mut to_replay = Vec::new();
            for key in self.leaves.keys_in(lower, upper) {
                let Some(meta) = self.leaves.get_mut(&key) else {
                    continue;
                };
                if meta.last > read_seq {
                    continue;
                }
                if meta.present {
                    removed.push(key.clone());
                    meta.present = false;
                }
                meta.last = read_seq;
                if meta.stale.is_some() {
                    to_replay.push(key.clone());
                }
            }
            for key in removed {
                if self.state.remove_leaf(&key).is_some() {
                    sink.stats.snapshot_removed += 1;
                }
            }
            for key in to_replay {
                self.replay(key, config, sink);
            }
            if let Phase::CatchingUp(catch_up) = &mut self.phase {
                catch_up.ahead_until = catch_up.ahead_until.max(read_seq);
                catch_up.absent.paint(low.clone(), high.clone(), read_seq);
            }
        }
        let Phase::CatchingUp(catch_up) = &mut self.phase else {
            return;
        };
        let Some(verification) = catch_up.verification.as_mut() else {
            return;
        };
        verification.coverage.cover(low, high);
        if verification.coverage.is_full() {
            catch_up.verification = None;
        }
    }

    /// Replays the buffered deltas of a stale leaf after it was rebuilt.
    fn replay(&mut self, key: S::Key, config: &SubscriberConfig, sink: &mut Sink<S::Key>) {
        let Some(mut buffer) = self.leaves.get_mut(&key).and_then(|m| m.stale.take()) else {
            return;
        };
        self.stale_buffered -= buffer.len();
        while let Some((seq, prev, delta)) = buffer.pop_front() {
            let Some(meta) = self.leaves.get(&key) else {
                break;
            };
            if seq <= meta.last {
                sink.stats.superseded += 1;
                continue;
            }
            let chains = if meta.present {
                prev == meta.last
            } else {
                prev == 0
            };
            if !chains {
                buffer.push_front((seq, prev, delta));
                self.stale_buffered += buffer.len();
                if let Some(meta) = self.leaves.get_mut(&key) {
                    meta.stale = Some(buffer);
                }
                return;
            }
            self.apply(seq, delta, config, sink);
        }
        self.stale.remove(&key);
        sink.events.push_back(SubscriberEvent::LeafRecovered {
            publisher: self.publisher,
            key,
        });
    }

    fn update_live(&mut self, now: Instant, sink: &mut Sink<S::Key>) {
        let Some(tracking) = &self.tracking else {
            return;
        };
        let live = self.stale.is_empty()
            && match &self.phase {
                Phase::Live => true,
                Phase::CatchingUp(catch_up) => {
                    catch_up.verification.is_none() && tracking.expected > catch_up.ahead_until
                }
            };
        if !live {
            self.catching_up(now);
            return;
        }
        let Phase::CatchingUp(catch_up) = std::mem::replace(&mut self.phase, Phase::Live) else {
            return;
        };
        self.leaves.retain(|m| m.present || m.stale.is_some());
        let took = now.saturating_duration_since(catch_up.since);
        if catch_up.was_live {
            sink.stats.recoveries += 1;
            sink.stats.last_recovery = Some(took);
            self.counters.recoveries += 1;
        } else {
            sink.stats.joins += 1;
        }
        tracing::debug!(publisher = self.publisher, ?took, "live");
        sink.events.push_back(SubscriberEvent::Live {
            publisher: self.publisher,
            recovery: Some(took),
        });
    }
}

fn bad_payload<K>(sink: &mut Sink<K>, error: DecodeError) {
    tracing::debug!(%error, "payload does not decode");
    sink.stats.bad_payloads += 1;
    sink.last_error = Some(error);
}
