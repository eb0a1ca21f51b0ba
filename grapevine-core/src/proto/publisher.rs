//! The publisher side: sequencing, per-leaf chains, batching and heartbeats.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::codec::{self, EncodeError};
use crate::state::ReplicatedState;
use crate::wire::{DatagramBuilder, Fragmenter, MessageTooLarge, DEFAULT_MAX_DATAGRAM};

/// A session id for a publisher starting at `unix_millis` (wall clock), with `random` bits.
///
/// Ids are ordered by start time (the top 42 bits are milliseconds since the UNIX epoch, the low
/// 22 bits random), so subscribers can tell a restart from a late datagram of the previous
/// session.
///
/// ```
/// use grapevine_core::proto::new_session_id;
/// assert!(new_session_id(1_000, u64::MAX) < new_session_id(1_001, 0));
/// ```
pub fn new_session_id(unix_millis: u64, random: u64) -> u64 {
    (unix_millis << SESSION_RANDOM_BITS) | (random & ((1 << SESSION_RANDOM_BITS) - 1))
}

const SESSION_RANDOM_BITS: u32 = 22;

/// Settings of a [`PublisherSession`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PublisherConfig {
    /// Topic the state is published on.
    pub topic: u32,
    /// Stable identity of this publisher within the topic (several publishers may share one
    /// topic; each is replicated separately). Default 0.
    pub publisher: u32,
    /// Largest datagram to build. Default 1400 bytes.
    pub max_datagram: usize,
    /// How long a partly filled datagram may wait for more deltas before it is sent.
    /// Default 200 µs; zero sends every delta at once.
    pub flush_delay: Duration,
    /// Idle time after which a heartbeat carries the last `seq`. Default 100 ms.
    pub heartbeat_interval: Duration,
    /// Largest encoded message; larger ones are refused. Default 1 MiB.
    pub max_message_len: usize,
    /// Sign every datagram with this keyring's signing key ([`crate::auth`]). Default none.
    pub keyring: Option<std::sync::Arc<crate::auth::Keyring>>,
    /// Bytes of recent delta datagrams kept to answer repair requests; 0 keeps none (requests
    /// are then ignored and subscribers recover from snapshots). Default 0.
    pub repair_ring_bytes: usize,
    /// Most bytes per second resent for repair requests, whoever asks. Default 4 MB/s.
    pub repair_rate: u64,
    /// Repair request datagrams answered per second from one source address; more are
    /// ignored. Default 50 (bursts of 20).
    pub repair_requests_per_source: f64,
    /// Bytes per second one source address may have resent, whatever it asks for (bursts of
    /// a quarter of it). Default 256 kB/s.
    pub repair_bytes_per_source: u64,
}

impl PublisherConfig {
    /// Settings for `topic` with every other value at its default.
    pub fn new(topic: u32) -> Self {
        Self {
            topic,
            ..Self::default()
        }
    }
}

impl Default for PublisherConfig {
    fn default() -> Self {
        Self {
            topic: 0,
            publisher: 0,
            max_datagram: DEFAULT_MAX_DATAGRAM,
            flush_delay: Duration::from_micros(200),
            heartbeat_interval: Duration::from_millis(100),
            max_message_len: 1 << 20,
            keyring: None,
            repair_ring_bytes: 0,
            repair_rate: 4_000_000,
            repair_requests_per_source: 50.0,
            repair_bytes_per_source: 256_000,
        }
    }
}

/// Why a delta was not published. The state is unchanged when this is returned.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The delta could not be serialised.
    #[error(transparent)]
    Encode(#[from] EncodeError),
    /// The delta is larger than `max_message_len`.
    #[error(transparent)]
    TooLarge(#[from] MessageTooLarge),
    /// Pre-encoded bytes are not one delta of the state's type (subscribers could not decode
    /// them either).
    #[error("pre-encoded delta refused: {0}")]
    Decode(crate::wire::DecodeError),
}

/// Counters of a publisher session.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
#[non_exhaustive]
pub struct PublisherStats {
    /// Deltas published.
    pub deltas: u64,
    /// Datagrams produced.
    pub datagrams: u64,
    /// Bytes produced.
    pub bytes: u64,
    /// Heartbeats sent.
    pub heartbeats: u64,
    /// Deltas that needed fragmenting.
    pub fragmented: u64,
    /// Datagrams resent for repair requests.
    pub repaired: u64,
    /// Bytes resent for repair requests.
    pub repaired_bytes: u64,
    /// Repair requests cut short by the repair rate.
    pub repairs_refused: u64,
    /// Repair requests for deltas no longer kept.
    pub repairs_missed: u64,
    /// Repair request datagrams ignored: unsigned or forged on a keyed feed, over their
    /// source's rate, or for another publisher or session.
    pub repair_requests_ignored: u64,
}

/// The sans-IO publisher: owns the source of truth of a topic and turns deltas into datagrams.
///
/// Inputs: [`publish`](Self::publish) and [`handle_timeout`](Self::handle_timeout). Outputs:
/// [`poll_transmit`](Self::poll_transmit) until it returns `None`, then
/// [`poll_timeout`](Self::poll_timeout) to know when to call `handle_timeout` next. Nothing here
/// reads a clock or touches a socket.
///
/// ```
/// use std::time::Instant;
/// use grapevine_core::proto::{PublisherConfig, PublisherSession};
/// use grapevine_core::state::{KeyedMap, MapDelta};
///
/// let now = Instant::now();
/// let mut publisher = PublisherSession::new(PublisherConfig::new(1), 0xabc, KeyedMap::default(), now);
/// let seq = publisher.publish(now, MapDelta::Put("k".to_string(), 1u32)).unwrap();
/// assert_eq!(seq, 1);
/// publisher.flush(now);
/// let datagram = publisher.poll_transmit().expect("flushed");
/// assert!(datagram.len() < 1400);
/// ```
#[derive(Debug)]
pub struct PublisherSession<S: ReplicatedState> {
    config: PublisherConfig,
    session: u64,
    state: S,
    /// Last `seq` of every present leaf; foldhash as in the subscriber's leaf index.
    leaf_seqs: HashMap<S::Key, u64, foldhash::fast::RandomState>,
    last_seq: u64,
    builder: DatagramBuilder,
    fragmenter: Fragmenter,
    batch_started: Option<Instant>,
    next_heartbeat: Instant,
    out: VecDeque<Bytes>,
    scratch: Vec<u8>,
    stats: PublisherStats,
    signer: Option<crate::auth::Signer>,
    /// First and last `seq` in the datagram being built.
    batch_first: Option<(u64, u64)>,
    /// Recent delta datagrams: first and last `seq` they hold, and the datagram.
    ring: VecDeque<(u64, u64, Bytes)>,
    ring_bytes: usize,
    repair_tokens: f64,
    repair_refilled: Option<Instant>,
    repair_sources: crate::limit::SourceLimiter<std::net::IpAddr>,
    repair_source_bytes: crate::limit::SourceLimiter<std::net::IpAddr>,
}

/// Ranges honoured per repair request datagram; the rest are ignored, so one datagram costs a
/// bounded amount of work.
pub const MAX_REPAIR_RANGES_PER_REQUEST: usize = 4;
/// Datagrams resent at most for one repair request datagram.
pub const MAX_RESENT_PER_REQUEST: usize = 32;

impl<S: ReplicatedState> PublisherSession<S> {
    /// Starts a session with id `session` ([`new_session_id`] at each start) over `initial`.
    ///
    /// A non-empty initial state counts as sequence number 1, so subscribers know they must
    /// fetch it from snapshots; deltas then start at 2. An empty one starts at 1.
    pub fn new(config: PublisherConfig, session: u64, initial: S, now: Instant) -> Self {
        let last_seq = u64::from(!initial.is_empty());
        let leaf_seqs = initial
            .leaves()
            .map(|(key, _)| (key.clone(), last_seq))
            .collect();
        let builder =
            DatagramBuilder::new(config.max_datagram, config.topic, config.publisher, session);
        Self {
            fragmenter: Fragmenter::new(config.max_message_len),
            signer: config
                .keyring
                .clone()
                .map(|keyring| crate::auth::Signer::new(keyring, 0)),
            batch_first: None,
            ring: VecDeque::new(),
            ring_bytes: 0,
            repair_tokens: 0.0,
            repair_refilled: None,
            repair_sources: crate::limit::SourceLimiter::new(
                config.repair_requests_per_source,
                (config.repair_requests_per_source / 2.5).max(1.0),
                4096,
            ),
            repair_source_bytes: crate::limit::SourceLimiter::new(
                config.repair_bytes_per_source as f64,
                (config.repair_bytes_per_source as f64 / 4.0).max(config.max_datagram as f64),
                4096,
            ),
            next_heartbeat: now,
            config,
            session,
            state: initial,
            leaf_seqs,
            last_seq,
            builder,
            batch_started: None,
            out: VecDeque::new(),
            scratch: Vec::with_capacity(256),
            stats: PublisherStats::default(),
        }
    }

    /// Applies `delta` to the state and queues it for sending; returns its `seq`.
    ///
    /// # Errors
    ///
    /// [`PublishError`] when the delta cannot be encoded or is too large; the state is then
    /// unchanged and no `seq` is used.
    pub fn publish(&mut self, now: Instant, delta: S::Delta) -> Result<u64, PublishError> {
        self.scratch.clear();
        codec::encode_into(&delta, &mut self.scratch)?;
        self.publish_scratch(now, delta)
    }

    /// Publishes a delta its producer already holds encoded (postcard, as
    /// [`codec::encode_into`] writes it: a gateway forwarding another feed, say): the bytes go
    /// on the wire as they are, with no serde encoding. They are decoded once, to apply the
    /// delta to the source of truth, so bytes that are not a delta of this state are refused
    /// here instead of reaching subscribers that could not decode them. (That decoding builds
    /// whatever the delta owns: for a `Bytes` payload, `publish` with a clone of the caller's
    /// `Bytes` costs less; see `bench throughput --pre-encoded`.)
    ///
    /// # Errors
    ///
    /// [`PublishError::Decode`] for bytes that are not exactly one delta, and as
    /// [`publish`](Self::publish); the state is then unchanged.
    ///
    /// ```
    /// use std::time::Instant;
    /// use grapevine_core::codec;
    /// use grapevine_core::proto::{PublishError, PublisherConfig, PublisherSession};
    /// use grapevine_core::state::{KeyedMap, MapDelta};
    ///
    /// let now = Instant::now();
    /// let mut publisher =
    ///     PublisherSession::new(PublisherConfig::new(3), 11, KeyedMap::<u32, u32>::default(), now);
    /// let mut bytes = Vec::new();
    /// codec::encode_into(&MapDelta::<u32, u32>::Put(1, 100), &mut bytes).unwrap();
    /// assert_eq!(publisher.publish_encoded(now, &bytes), Ok(1));
    /// assert_eq!(publisher.state().get(&1), Some(&100));
    /// assert!(matches!(publisher.publish_encoded(now, &[0xff; 3]), Err(PublishError::Decode(_))));
    /// ```
    pub fn publish_encoded(&mut self, now: Instant, encoded: &[u8]) -> Result<u64, PublishError> {
        let delta: S::Delta = codec::decode(encoded).map_err(PublishError::Decode)?;
        self.scratch.clear();
        self.scratch.extend_from_slice(encoded);
        self.publish_scratch(now, delta)
    }

    /// Publishes `delta`, whose encoding is in `self.scratch`.
    fn publish_scratch(&mut self, now: Instant, delta: S::Delta) -> Result<u64, PublishError> {
        let limit = self.config.max_message_len;
        if self.scratch.len() > limit {
            return Err(MessageTooLarge {
                len: self.scratch.len(),
                limit,
            }
            .into());
        }
        let seq = self.last_seq + 1;
        // Encoded above, the delta can now be moved into the state.
        let key = S::delta_key(&delta).clone();
        let prev = if self.state.apply_owned(delta) {
            match self.leaf_seqs.entry(key) {
                std::collections::hash_map::Entry::Occupied(mut last) => {
                    std::mem::replace(last.get_mut(), seq)
                }
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(seq);
                    0
                }
            }
        } else {
            self.leaf_seqs.remove(&key).unwrap_or(0)
        };
        self.last_seq = seq;
        self.stats.deltas += 1;

        let pushed = self.builder.push_delta(seq, prev, &self.scratch);
        if pushed {
            let range = self.batch_first.get_or_insert((seq, seq));
            range.1 = seq;
        } else {
            self.flush(now);
            if self.builder.push_delta(seq, prev, &self.scratch) {
                self.batch_first = Some((seq, seq));
            } else {
                self.stats.fragmented += 1;
                let out = &mut self.out;
                let stats = &mut self.stats;
                let ring_limit = self.config.repair_ring_bytes;
                let (ring, ring_bytes) = (&mut self.ring, &mut self.ring_bytes);
                // The size was checked above and the builder is empty after `flush`.
                let fragmented = self.fragmenter.fragment_delta(
                    &mut self.builder,
                    seq,
                    prev,
                    &self.scratch,
                    |datagram| {
                        stats.datagrams += 1;
                        stats.bytes += datagram.len() as u64;
                        if ring_limit > 0 {
                            *ring_bytes += datagram.len();
                            ring.push_back((seq, seq, datagram.clone()));
                        }
                        out.push_back(datagram);
                    },
                );
                debug_assert!(fragmented.is_ok());
                self.trim_ring();
                self.next_heartbeat = now + self.config.heartbeat_interval;
                return Ok(seq);
            }
        }
        if self.config.flush_delay.is_zero() {
            self.flush(now);
        } else if self.batch_started.is_none() {
            self.batch_started = Some(now);
        }
        Ok(seq)
    }

    /// Sends what is batched now.
    pub fn flush(&mut self, now: Instant) {
        self.batch_started = None;
        let first = self.batch_first.take();
        if let Some(datagram) = self.builder.finish() {
            self.stats.datagrams += 1;
            self.stats.bytes += datagram.len() as u64;
            if let (Some((first, last)), true) = (first, self.config.repair_ring_bytes > 0) {
                self.ring_bytes += datagram.len();
                self.ring.push_back((first, last, datagram.clone()));
                self.trim_ring();
            }
            self.out.push_back(datagram);
            self.next_heartbeat = now + self.config.heartbeat_interval;
        }
    }

    fn trim_ring(&mut self) {
        while self.ring_bytes > self.config.repair_ring_bytes {
            match self.ring.pop_front() {
                Some((_, _, datagram)) => self.ring_bytes -= datagram.len(),
                None => break,
            }
        }
    }

    /// A repair request datagram from `source` (as received on the repair group): checked
    /// (this session, signed when the feed has a key), held to the source's rate, and its first
    /// [`MAX_REPAIR_RANGES_PER_REQUEST`] ranges answered with at most
    /// [`MAX_RESENT_PER_REQUEST`] datagrams; returns how many were queued.
    pub fn handle_repair_datagram(
        &mut self,
        now: Instant,
        source: std::net::IpAddr,
        bytes: &[u8],
    ) -> usize {
        let Ok(datagram) = crate::wire::Datagram::parse(bytes) else {
            self.stats.repair_requests_ignored += 1;
            return 0;
        };
        let header = datagram.header();
        let ours = (self.config.topic, self.config.publisher, self.session);
        if (header.topic(), header.publisher(), header.session()) != ours {
            self.stats.repair_requests_ignored += 1;
            return 0;
        }
        // Subscribers that hold the shared key sign their requests; those that hold only this
        // publisher's public key cannot, and are held to the per-source rate alone.
        if let Some(keyring) = self.config.keyring.as_ref().filter(|k| k.is_shared()) {
            if keyring.check(bytes).is_err() {
                self.stats.repair_requests_ignored += 1;
                return 0;
            }
        }
        if !self.repair_sources.admit(now, source, 1.0) {
            self.stats.repair_requests_ignored += 1;
            return 0;
        }
        let mut budget = MAX_RESENT_PER_REQUEST;
        let mut queued = 0;
        for message in datagram.messages().take(MAX_REPAIR_RANGES_PER_REQUEST) {
            if let crate::wire::Message::RepairRequest { first, last } = message {
                let sent = self.resend(now, (first, last), budget, Some(source));
                budget -= sent;
                queued += sent;
            }
        }
        queued
    }

    /// A subscriber asks for the deltas `first..=last` again: queues the kept datagrams that
    /// hold them, within the repair rate; returns how many. What is no longer kept is not
    /// resent (the subscriber falls back to snapshots).
    pub fn handle_repair_request(&mut self, now: Instant, first: u64, last: u64) -> usize {
        self.resend(now, (first, last), usize::MAX, None)
    }

    fn resend(
        &mut self,
        now: Instant,
        (first, last): (u64, u64),
        most: usize,
        source: Option<std::net::IpAddr>,
    ) -> usize {
        let rate = self.config.repair_rate.max(1) as f64;
        let burst = (rate / 20.0).max(self.config.max_datagram as f64 * 4.0);
        match self.repair_refilled {
            None => self.repair_tokens = burst,
            Some(at) => {
                let earned = now.saturating_duration_since(at).as_secs_f64() * rate;
                self.repair_tokens = (self.repair_tokens + earned).min(burst);
            }
        }
        self.repair_refilled = Some(now);
        let last = last.min(first.saturating_add(crate::wire::MAX_REPAIR_RANGE - 1));
        let mut queued = 0;
        if self
            .ring
            .front()
            .is_none_or(|(oldest, _, _)| first < *oldest)
        {
            self.stats.repairs_missed += 1;
        }
        // The ring is in `seq` order: find the first datagram that may hold `first`.
        let start = self.ring.partition_point(|(_, to, _)| *to < first);
        for (from, _, datagram) in self.ring.range(start..) {
            if *from > last || queued >= most {
                break;
            }
            let cost = datagram.len() as f64;
            if self.repair_tokens < cost {
                self.stats.repairs_refused += 1;
                break;
            }
            // What one address may make the publisher resend, whatever it asks for.
            if let Some(source) = source {
                if !self.repair_source_bytes.admit(now, source, cost) {
                    self.stats.repairs_refused += 1;
                    break;
                }
            }
            self.repair_tokens -= cost;
            self.out.push_back(datagram.clone());
            self.stats.repaired += 1;
            self.stats.repaired_bytes += datagram.len() as u64;
            queued += 1;
        }
        queued
    }

    /// Flushes a batch whose delay expired and sends a heartbeat when idle.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some(started) = self.batch_started {
            if now >= started + self.config.flush_delay {
                self.flush(now);
            }
        }
        if now >= self.next_heartbeat {
            self.flush(now);
            let pushed = self.builder.push_heartbeat(self.last_seq);
            debug_assert!(pushed);
            self.stats.heartbeats += 1;
            self.flush(now);
        }
    }

    /// When [`handle_timeout`](Self::handle_timeout) must be called next.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        let flush_at = self.batch_started.map(|t| t + self.config.flush_delay);
        Some(flush_at.map_or(self.next_heartbeat, |f| f.min(self.next_heartbeat)))
    }

    /// The next datagram to send.
    #[must_use]
    pub fn poll_transmit(&mut self) -> Option<Bytes> {
        let datagram = self.out.pop_front()?;
        Some(crate::auth::Signer::sign_if(&mut self.signer, datagram))
    }

    /// Whether deltas wait in a partly filled datagram for the flush delay.
    pub fn has_pending_batch(&self) -> bool {
        self.batch_started.is_some()
    }

    /// The source-of-truth state.
    pub fn state(&self) -> &S {
        &self.state
    }

    /// The `seq` of the last delta that touched `key`, if the leaf is present.
    pub fn leaf_seq(&self, key: &S::Key) -> Option<u64> {
        self.leaf_seqs.get(key).copied()
    }

    /// The last `seq` assigned.
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// This session's id.
    pub fn session(&self) -> u64 {
        self.session
    }

    /// The settings.
    pub fn config(&self) -> &PublisherConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> PublisherStats {
        self.stats
    }
}
