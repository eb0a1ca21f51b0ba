//! GrapeVine subscriber: joins a topic's multicast group, applies the publishers' deltas to a
//! local copy of their state, and rebuilds from the snapshot cycle after a gap, a late start or
//! a publisher restart.
//!
//! # Layout
//!
//! A [`Subscriber`] owns an I/O thread that receives datagrams in batches (`recvmmsg`) and feeds
//! them to the sans-IO [`SubscriberSession`] of `grapevine-core`, which holds the state. While
//! any stream is recovering, a second thread joins the recovery group (when one is configured)
//! and leaves it once everything is live again. Events reach the application through a
//! crossbeam channel ([`Subscriber::events`], blocking) or a tokio channel
//! ([`Subscriber::join_async`], async); the state is read in place with [`Subscriber::read`].
//! For the lowest latency, [`InlineSubscriber`] has no thread at all: the application's own
//! thread polls the socket and gets the events directly.
//!
//! ```no_run
//! use std::time::Duration;
//! use grapevine_core::net::MulticastConfig;
//! use grapevine_core::state::KeyedMap;
//! use grapevine_subscriber::{Subscriber, SubscriberOptions};
//!
//! let options = SubscriberOptions::new(1, MulticastConfig::new("239.255.0.1:7000".parse()?));
//! let subscriber = Subscriber::<KeyedMap<String, u64>>::join(options)?;
//! if subscriber.wait_live(Duration::from_secs(5)) {
//!     let price = subscriber.read(|s| s.stream(0).and_then(|v| v.state.get(&"ACME".to_string()).copied()));
//!     println!("ACME: {price:?}");
//! }
//! for event in subscriber.events().try_iter() {
//!     println!("{event:?}");
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! It is over 600 lines because the public API carries its documentation and examples (about half
//! the file); the receive loops are the rest.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError};
use grapevine_core::net::{MulticastSocket, NetError, RecvBatch};
use grapevine_core::proto::SubscriberSession;
use parking_lot::{Condvar, Mutex};

mod inline;
mod progress;

pub use crossbeam_channel;
pub use grapevine_core::net::{InterfaceSpec, MulticastConfig};
pub use grapevine_core::proto::{
    StreamStatus, StreamView, SubscriberConfig, SubscriberEvent, SubscriberStats,
};
pub use grapevine_core::state::{digest, ReplicatedState};
pub use inline::InlineSubscriber;
pub use progress::{Progress, ProgressWatch, Replica, StreamProgress, Warning};

/// The blocking channel of a subscriber's events ([`Subscriber::events`]).
pub type Events<K> = Receiver<SubscriberEvent<K>>;

/// Settings of a [`Subscriber`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SubscriberOptions {
    /// The live group (deltas, heartbeats, and snapshots when no recovery group is used).
    pub multicast: MulticastConfig,
    /// A separate group the snapshotter sends on, joined only while recovering.
    pub recovery: Option<MulticastConfig>,
    /// The B feed of an A/B pair: a second group carrying the same datagrams. Both are read;
    /// the first copy of each `seq` is used, so only a loss on both is a gap (give
    /// `session.reorder_window` the largest delay expected between the two feeds). Threaded
    /// [`Subscriber`] only. Default none.
    pub secondary: Option<MulticastConfig>,
    /// Like `inject_loss`, for the B feed. Default 0.
    pub inject_loss_secondary: f64,
    /// The repair group (the publisher's `repair`): missing deltas are asked for there before
    /// the reorder window declares them lost, and other subscribers' requests are watched so
    /// that one request serves all. Default none.
    pub repair: Option<MulticastConfig>,
    /// Protocol settings (topic, reorder window, limits).
    pub session: SubscriberConfig,
    /// Datagrams received per syscall. Default 32.
    pub batch: usize,
    /// Largest datagram expected. Default 65 536 (any GrapeVine datagram).
    pub max_datagram: usize,
    /// Events buffered for the application; beyond this they are dropped and counted (the state
    /// itself is never dropped). Default 65 536.
    pub event_capacity: usize,
    /// Fraction of received datagrams to discard on purpose before processing, to exercise
    /// recovery in demos and tests. Default 0.
    pub inject_loss: f64,
    /// Spin on the socket instead of sleeping in `poll`: lower latency for a whole core.
    /// Default false.
    pub busy_poll: bool,
}

impl SubscriberOptions {
    /// Subscribes to `topic` on `multicast`, with default settings.
    pub fn new(topic: u32, multicast: MulticastConfig) -> Self {
        Self {
            multicast,
            recovery: None,
            secondary: None,
            inject_loss_secondary: 0.0,
            repair: None,
            session: SubscriberConfig::new(topic),
            batch: 32,
            max_datagram: 65_536,
            event_capacity: 65_536,
            inject_loss: 0.0,
            busy_poll: false,
        }
    }

    /// Takes snapshots from a separate recovery group, joined only while recovering.
    #[must_use]
    pub fn with_recovery(mut self, recovery: MulticastConfig) -> Self {
        self.recovery = Some(recovery);
        self
    }

    /// Discards this fraction of received datagrams on purpose (demos and tests of recovery).
    #[must_use]
    pub fn with_injected_loss(mut self, fraction: f64) -> Self {
        self.inject_loss = fraction;
        self
    }

    /// Whether each applied delta produces a [`SubscriberEvent::Applied`] (default true; turn
    /// it off when only state and progress matter, it saves an event per delta).
    #[must_use]
    pub fn with_applied_events(mut self, on: bool) -> Self {
        self.session.emit_applied = on;
        self
    }

    /// Verifies datagrams with this keyring (refusing unsigned ones).
    #[must_use]
    pub fn with_keyring(mut self, keyring: Arc<grapevine_core::auth::Keyring>) -> Self {
        self.session.keyring = Some(keyring);
        self
    }
}

/// Why the subscriber could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The socket could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A thread could not be started.
    #[error("cannot start the receive thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The options ask for something this kind of subscriber does not do.
    #[error("not supported here: {0}")]
    Unsupported(&'static str),
}

/// Counters of the subscriber: the protocol's plus the transport's.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
#[non_exhaustive]
pub struct Stats {
    /// Protocol counters (applied, gaps, lost, recoveries, malformed, ...).
    pub protocol: SubscriberStats,
    /// Datagrams the kernel dropped because the receive buffer was full (a dropped coalesced
    /// run counts once, see [`MulticastConfig::receive_offload`](grapevine_core::net::MulticastConfig::receive_offload)).
    pub kernel_drops: u64,
    /// Datagrams larger than the receive buffer (cut, then rejected).
    pub truncated: u64,
    /// Events dropped because the application did not read them.
    pub events_dropped: u64,
    /// Receive buffer the kernel granted.
    pub recv_buffer: usize,
    /// Receive buffer asked for (`MulticastConfig::recv_buffer`).
    pub recv_buffer_asked: usize,
    /// Times the recovery group was joined.
    pub recovery_joins: u64,
}

#[derive(Debug)]
struct Shared<S: ReplicatedState> {
    session: Mutex<SubscriberSession<S>>,
    changed: Condvar,
    stop: AtomicBool,
    kernel_drops: AtomicU64,
    truncated: AtomicU64,
    events_dropped: AtomicU64,
    recovery_joins: AtomicU64,
    drop_next: AtomicU64,
    /// Deltas applied or found already reflected, for cheap progress polling.
    processed: AtomicU64,
    recv_buffer: usize,
    recv_buffer_asked: usize,
    /// Where repair requests go, when repair is on.
    repair_sender: Option<MulticastSocket>,
    /// Refreshed after every batch that changed a stream's standing; notifies `changed` too.
    progress: tokio::sync::watch::Sender<Progress>,
}

impl<S: ReplicatedState> Shared<S> {
    /// Publishes the session's progress if it moved, waking whoever waits for it.
    fn refresh_progress(&self, session: &SubscriberSession<S>) {
        if self.progress.send_if_modified(|p| p.refresh(session)) {
            self.changed.notify_all();
        }
    }
}

enum EventSink<K> {
    Blocking(Sender<SubscriberEvent<K>>),
    Async(tokio::sync::mpsc::Sender<SubscriberEvent<K>>),
}

/// A running subscriber of one topic.
#[derive(Debug)]
pub struct Subscriber<S: ReplicatedState> {
    shared: Arc<Shared<S>>,
    events: Receiver<SubscriberEvent<S::Key>>,
    threads: Vec<JoinHandle<()>>,
}

/// Async stream of a subscriber's events (implements `futures_core::Stream`).
#[derive(Debug)]
pub struct EventStream<K> {
    receiver: tokio::sync::mpsc::Receiver<SubscriberEvent<K>>,
}

impl<K> EventStream<K> {
    /// The next event; `None` once the subscriber has shut down.
    pub async fn recv(&mut self) -> Option<SubscriberEvent<K>> {
        self.receiver.recv().await
    }
}

impl<K> futures_core::Stream for EventStream<K> {
    type Item = SubscriberEvent<K>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.receiver.poll_recv(cx)
    }
}

impl<S: ReplicatedState> Subscriber<S> {
    /// Joins the group and starts replicating; events go to [`Subscriber::events`].
    ///
    /// # Errors
    ///
    /// [`SubscribeError`] when the socket or the threads cannot be set up.
    pub fn join(options: SubscriberOptions) -> Result<Self, SubscribeError> {
        let (sender, receiver) = crossbeam_channel::bounded(options.event_capacity.max(1));
        Self::start(options, EventSink::Blocking(sender), receiver)
    }

    /// Joins the group and starts replicating; events go to the returned async stream. Needs no
    /// tokio runtime to be running (the subscriber has its own threads); the stream can be read
    /// from any executor.
    ///
    /// # Errors
    ///
    /// As [`Subscriber::join`].
    pub fn join_async(
        options: SubscriberOptions,
    ) -> Result<(Self, EventStream<S::Key>), SubscribeError> {
        let (sender, receiver) = tokio::sync::mpsc::channel(options.event_capacity.max(1));
        // The blocking receiver of an async subscriber never gets anything.
        let (_, unused) = crossbeam_channel::bounded(1);
        let subscriber = Self::start(options, EventSink::Async(sender), unused)?;
        Ok((subscriber, EventStream { receiver }))
    }

    fn start(
        mut options: SubscriberOptions,
        sink: EventSink<S::Key>,
        events: Receiver<SubscriberEvent<S::Key>>,
    ) -> Result<Self, SubscribeError> {
        let live = MulticastSocket::receiver(&options.multicast)?;
        let repair_sender = match &options.repair {
            Some(repair) => {
                options.session.repair = true;
                // Each subscriber waits a different time before asking.
                options.session.repair_seed = rand::random();
                Some(MulticastSocket::sender(repair)?)
            }
            None => None,
        };
        let recv_buffer = live.recv_buffer_size();
        if recv_buffer < options.multicast.recv_buffer {
            tracing::warn!(
                asked = options.multicast.recv_buffer,
                granted = recv_buffer,
                "the kernel capped the receive buffer (raise net.core.rmem_max)"
            );
        }
        let shared = Arc::new(Shared {
            session: Mutex::new(SubscriberSession::new(options.session.clone())),
            changed: Condvar::new(),
            stop: AtomicBool::new(false),
            kernel_drops: AtomicU64::new(0),
            truncated: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            recovery_joins: AtomicU64::new(0),
            drop_next: AtomicU64::new(0),
            processed: AtomicU64::new(0),
            recv_buffer,
            recv_buffer_asked: options.multicast.recv_buffer,
            repair_sender,
            progress: tokio::sync::watch::Sender::new(Progress::default()),
        });
        let sink = Arc::new(sink);
        let mut threads = Vec::new();
        {
            let shared = Arc::clone(&shared);
            let sink = Arc::clone(&sink);
            let options = options.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("gv-subscriber".into())
                    .spawn(move || {
                        receive_loop(&shared, &live, &options, &sink, (true, options.inject_loss))
                    })
                    .map_err(SubscribeError::Thread)?,
            );
        }
        if let Some(repair) = &options.repair {
            // Other subscribers' requests, so that ours are suppressed when theirs cover them.
            let socket = MulticastSocket::receiver(repair)?;
            let shared = Arc::clone(&shared);
            let sink = Arc::clone(&sink);
            let options = options.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("gv-repair-watch".into())
                    .spawn(move || receive_loop(&shared, &socket, &options, &sink, (false, 0.0)))
                    .map_err(SubscribeError::Thread)?,
            );
        }
        if let Some(secondary) = &options.secondary {
            let socket = MulticastSocket::receiver(secondary)?;
            let shared = Arc::clone(&shared);
            let sink = Arc::clone(&sink);
            let options = options.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("gv-subscriber-b".into())
                    .spawn(move || {
                        let loss = options.inject_loss_secondary;
                        receive_loop(&shared, &socket, &options, &sink, (false, loss))
                    })
                    .map_err(SubscribeError::Thread)?,
            );
        }
        if let Some(recovery) = options.recovery.clone() {
            let shared = Arc::clone(&shared);
            let sink = Arc::clone(&sink);
            threads.push(
                std::thread::Builder::new()
                    .name("gv-recovery".into())
                    .spawn(move || recovery_loop(&shared, &recovery, &options, &sink))
                    .map_err(SubscribeError::Thread)?,
            );
        }
        Ok(Self {
            shared,
            events,
            threads,
        })
    }

    /// Reads the session (states, statuses, stale leaves) under its lock. Keep it short.
    pub fn read<R>(&self, f: impl FnOnce(&SubscriberSession<S>) -> R) -> R {
        f(&self.shared.session.lock())
    }

    /// A copy of the state replicated from `publisher`, if known.
    pub fn snapshot(&self, publisher: u32) -> Option<S>
    where
        S: Clone,
    {
        self.read(|s| s.stream(publisher).map(|v| v.state.clone()))
    }

    /// Whether every known publisher's stream is live.
    pub fn is_live(&self) -> bool {
        self.read(SubscriberSession::is_live)
    }

    /// Waits until every known stream is live, at most `timeout`; returns whether it is.
    pub fn wait_live(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut session = self.shared.session.lock();
        while !session.is_live() {
            if self
                .shared
                .changed
                .wait_until(&mut session, deadline)
                .timed_out()
            {
                return session.is_live();
            }
        }
        true
    }

    /// Waits until `publisher`'s stream holds the publisher's state as of `seq` (the value
    /// [`Publisher::publish`] returned for the delta of interest, in the publisher's current
    /// session), at most `timeout`; returns whether it does. Unlike [`wait_live`](Self::wait_live),
    /// which only says the replica is consistent up to what it processed, this says it has
    /// processed `seq` and trusts every leaf. Wakes on progress, never polls.
    ///
    /// [`Publisher::publish`]: https://docs.rs/grapevine-publisher
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use grapevine_core::state::KeyedMap;
    /// # use grapevine_subscriber::{MulticastConfig, ReplicatedState, Subscriber, SubscriberOptions};
    /// let options = SubscriberOptions::new(1, MulticastConfig::new("239.255.0.1:7000".parse()?));
    /// let subscriber = Subscriber::<KeyedMap<String, u64>>::join(options)?;
    /// // The publisher (id 0) reported seq 1000 for its last delta:
    /// if subscriber.wait_caught_up(0, 1000, Duration::from_secs(5)) {
    ///     let copy = subscriber.replica(0).expect("heard");
    ///     println!("{} leaves as of seq {}", copy.state.len(), copy.progress.last_seq);
    /// }
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn wait_caught_up(&self, publisher: u32, seq: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let caught_up = |session: &SubscriberSession<S>| {
            session
                .stream(publisher)
                .is_some_and(|v| v.status == StreamStatus::Live && v.last_seq >= seq)
        };
        let mut session = self.shared.session.lock();
        while !caught_up(&session) {
            if self
                .shared
                .changed
                .wait_until(&mut session, deadline)
                .timed_out()
            {
                return caught_up(&session);
            }
        }
        true
    }

    /// Completes when `publisher`'s stream is caught up to `seq` (as
    /// [`wait_caught_up`](Self::wait_caught_up)); `false` if the subscriber is dropped first.
    /// The future owns what it needs (spawn it freely) and needs no tokio runtime; bound it with
    /// `tokio::time::timeout`.
    pub fn caught_up(
        &self,
        publisher: u32,
        seq: u64,
    ) -> impl std::future::Future<Output = bool> + Send + 'static {
        self.watch_progress().caught_up(publisher, seq)
    }

    /// How far every stream has come, as of the last received batch (no session lock taken).
    pub fn progress(&self) -> Progress {
        self.shared.progress.borrow().clone()
    }

    /// The [`Progress`] as it changes, for async code.
    pub fn watch_progress(&self) -> ProgressWatch {
        ProgressWatch {
            receiver: self.shared.progress.subscribe(),
        }
    }

    /// The publishers heard so far.
    pub fn publishers(&self) -> Vec<u32> {
        self.progress()
            .streams()
            .iter()
            .map(|s| s.publisher)
            .collect()
    }

    /// An owned copy of `publisher`'s state with its status, last `seq` and stale leaves.
    /// Cloning happens under the session lock, which reception also needs: fine for
    /// occasional reads, not for every event (read single leaves with [`leaf`](Self::leaf)).
    pub fn replica(&self, publisher: u32) -> Option<Replica<S>>
    where
        S: Clone,
    {
        self.read(|session| {
            session.stream(publisher).map(|v| Replica {
                progress: StreamProgress {
                    publisher: v.publisher,
                    session: v.session,
                    status: v.status,
                    last_seq: v.last_seq,
                    stale_leaves: v.stale.len(),
                    silent: v.silent,
                },
                state: v.state.clone(),
                stale: v.stale.iter().cloned().collect(),
            })
        })
    }

    /// One leaf of `publisher`'s state and whether it is trusted (not stale): what an
    /// [`SubscriberEvent::Applied`] or [`SubscriberEvent::LeafRecovered`] for `key` changed.
    pub fn leaf(&self, publisher: u32, key: &S::Key) -> Option<(S::Leaf, bool)> {
        self.read(|session| {
            let view = session.stream(publisher)?;
            let leaf = view.state.leaf(key)?.clone();
            Some((leaf, !view.stale.contains(key)))
        })
    }

    /// Conditions worth acting on, from the counters (each is also logged through `tracing`).
    pub fn warnings(&self) -> Vec<Warning> {
        let stats = self.stats();
        let p = stats.protocol;
        let mut warnings = Vec::new();
        if stats.recv_buffer < stats.recv_buffer_asked {
            warnings.push(Warning::ReceiveBufferCapped {
                asked: stats.recv_buffer_asked,
                granted: stats.recv_buffer,
            });
        }
        let counts = [
            (
                stats.kernel_drops,
                Warning::KernelDrops as fn(u64) -> Warning,
            ),
            (p.unauthenticated, Warning::Unauthenticated),
            (p.replayed + p.retired_session, Warning::Refused),
            (stats.events_dropped, Warning::EventsDropped),
            (stats.truncated, Warning::Truncated),
        ];
        warnings.extend(
            counts
                .into_iter()
                .filter(|(count, _)| *count > 0)
                .map(|(count, warning)| warning(count)),
        );
        warnings
    }

    /// The events, for blocking use (`recv`, `recv_timeout`, `try_iter`). A subscriber made
    /// with [`join_async`](Self::join_async) delivers its events to its [`EventStream`]
    /// instead: this channel is then closed and empty (`recv` returns an error at once).
    pub fn events(&self) -> &Events<S::Key> {
        &self.events
    }

    /// Counters.
    pub fn stats(&self) -> Stats {
        Stats {
            protocol: self.read(SubscriberSession::stats),
            kernel_drops: self.shared.kernel_drops.load(Ordering::Relaxed),
            truncated: self.shared.truncated.load(Ordering::Relaxed),
            events_dropped: self.shared.events_dropped.load(Ordering::Relaxed),
            recv_buffer: self.shared.recv_buffer,
            recv_buffer_asked: self.shared.recv_buffer_asked,
            recovery_joins: self.shared.recovery_joins.load(Ordering::Relaxed),
        }
    }

    /// Distinct deltas received so far (applied, already reflected, or buffered for a stale
    /// leaf), without taking the session's lock: a cheap progress counter for flow control in
    /// benchmarks and tests.
    pub fn processed(&self) -> u64 {
        self.shared.processed.load(Ordering::Relaxed)
    }

    /// Discards the next `datagrams` datagrams received on the live group, as if the network
    /// had lost them: a fault injection for testing recovery and measuring its time.
    pub fn inject_drop(&self, datagrams: u64) {
        self.shared
            .drop_next
            .fetch_add(datagrams, Ordering::Relaxed);
    }

    /// Stops the threads and leaves the groups.
    pub fn shutdown(mut self) -> Stats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // A panic in the thread was already reported by the panic hook.
            let _ = thread.join();
        }
    }
}

impl<S: ReplicatedState> Drop for Subscriber<S> {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How long a receive call waits at most, so that stop requests and timers are noticed.
const MAX_WAIT: Duration = Duration::from_millis(20);

fn receive_loop<S: ReplicatedState>(
    shared: &Shared<S>,
    socket: &MulticastSocket,
    options: &SubscriberOptions,
    sink: &EventSink<S::Key>,
    (run_timers, inject_loss): (bool, f64),
) {
    let mut batch = RecvBatch::new(options.batch, options.max_datagram);
    let mut events = Vec::new();
    let mut reported_drops = 0u32;
    let mut warned_drops = 0u32;
    let mut last_warning = Instant::now();
    let mut loss = LossInjector::new(inject_loss);
    let mut warned_unauthenticated = 0u64;
    let mut warned_refused = (0u64, 0u64);
    let mut last_refusal_warning: Option<Instant> = None;
    let mut last_auth_warning: Option<Instant> = None;
    // When the session's next timer is due; read while the lock is held for a batch, so that
    // waiting costs no lock of its own.
    let mut next_timer = shared.session.lock().poll_timeout();
    while !shared.stop.load(Ordering::Relaxed) {
        let wait = if options.busy_poll {
            Duration::ZERO
        } else {
            next_timer
                .map_or(MAX_WAIT, |t| t.saturating_duration_since(Instant::now()))
                .min(MAX_WAIT)
        };
        let received = match socket.recv_batch(&mut batch, wait) {
            Ok(n) => n,
            Err(error) => {
                tracing::warn!(%error, group = %socket.group(), "receive failed");
                std::thread::sleep(MAX_WAIT);
                0
            }
        };
        if received == 0 && options.busy_poll {
            // Spinning threads can outnumber cores; let the others run between attempts.
            std::thread::yield_now();
        }
        let drops = batch.kernel_drops();
        if drops > reported_drops {
            shared
                .kernel_drops
                .fetch_add(u64::from(drops - reported_drops), Ordering::Relaxed);
            reported_drops = drops;
        }
        // Once a second at most: under overload this would otherwise log on every batch.
        if reported_drops > warned_drops && last_warning.elapsed() >= Duration::from_secs(1) {
            tracing::warn!(
                dropped = reported_drops - warned_drops,
                "kernel dropped datagrams: the receive buffer was full (this subscriber is too slow) or they failed the UDP checksum"
            );
            warned_drops = reported_drops;
            last_warning = Instant::now();
        }
        {
            let mut session = shared.session.lock();
            let now = Instant::now();
            for (bytes, meta) in batch.datagrams().zip(batch.meta()).take(received) {
                if meta.truncated {
                    shared.truncated.fetch_add(1, Ordering::Relaxed);
                }
                if loss.drop_next() || take_one(&shared.drop_next) {
                    continue;
                }
                session.handle_datagram(now, bytes);
            }
            if run_timers && session.poll_timeout().is_some_and(|t| t <= now) {
                session.handle_timeout(now);
            }
            if run_timers {
                if let Some(sender) = &shared.repair_sender {
                    while let Some(request) = session.poll_repair(now) {
                        if let Err(error) = sender.send(&request) {
                            tracing::debug!(%error, "repair request not sent");
                        }
                    }
                }
            }
            let stats = session.stats();
            // A subscriber with the wrong key (or a publisher without one) would otherwise look
            // like silence: say so, at most every few seconds.
            if stats.unauthenticated > warned_unauthenticated
                && last_auth_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
            {
                tracing::warn!(
                    refused = stats.unauthenticated - warned_unauthenticated,
                    topic = options.session.topic,
                    "datagrams failed authentication: wrong key, or a publisher without one?"
                );
                warned_unauthenticated = stats.unauthenticated;
                last_auth_warning = Some(Instant::now());
            }
            // On a signed feed, replays and datagrams of a retired session are someone resending
            // old traffic (or a publisher whose clock went back): worth a line, at most every
            // few seconds.
            let refused = (stats.replayed, stats.retired_session);
            if options.session.keyring.is_some()
                && refused != warned_refused
                && last_refusal_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(5))
            {
                tracing::warn!(
                    replayed = refused.0 - warned_refused.0,
                    retired_session = refused.1 - warned_refused.1,
                    topic = options.session.topic,
                    "datagrams refused as replays or as an older session"
                );
                warned_refused = refused;
                last_refusal_warning = Some(Instant::now());
            }
            shared.processed.store(
                stats.deltas_received.saturating_sub(stats.duplicates),
                Ordering::Relaxed,
            );
            events.extend(std::iter::from_fn(|| session.poll_event()));
            shared.refresh_progress(&session);
            next_timer = session.poll_timeout();
        }
        if !events.is_empty() {
            shared.changed.notify_all();
            deliver(shared, sink, &mut events);
        }
    }
}

/// Joins the recovery group while anything is recovering, leaves it when all is live.
fn recovery_loop<S: ReplicatedState>(
    shared: &Shared<S>,
    config: &MulticastConfig,
    options: &SubscriberOptions,
    sink: &EventSink<S::Key>,
) {
    let mut batch = RecvBatch::new(options.batch, options.max_datagram);
    let mut events = Vec::new();
    let mut membership = RecoveryMembership::new(config.clone());
    let mut loss = LossInjector::new(options.inject_loss);
    while !shared.stop.load(Ordering::Relaxed) {
        let wanted = wants_snapshots(&shared.session.lock());
        match membership.update(wanted) {
            Ok(true) => {
                shared.recovery_joins.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(error) => {
                tracing::warn!(%error, "cannot join the recovery group");
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        }
        let Some(joined) = membership.socket() else {
            std::thread::sleep(MAX_WAIT);
            continue;
        };
        let received = joined.recv_batch(&mut batch, MAX_WAIT).unwrap_or(0);
        if received == 0 {
            continue;
        }
        {
            let mut session = shared.session.lock();
            let now = Instant::now();
            for bytes in batch.datagrams().take(received) {
                if loss.drop_next() {
                    continue;
                }
                session.handle_datagram(now, bytes);
            }
            events.extend(std::iter::from_fn(|| session.poll_event()));
            shared.refresh_progress(&session);
        }
        if !events.is_empty() {
            shared.changed.notify_all();
            deliver(shared, sink, &mut events);
        }
    }
}

/// Whether snapshots are needed: nothing heard yet, or a stream is not live.
fn wants_snapshots<S: ReplicatedState>(session: &SubscriberSession<S>) -> bool {
    session.streams().next().is_none() || !session.is_live()
}

/// Membership of the recovery group: joined while snapshots are wanted, left otherwise.
#[derive(Debug)]
struct RecoveryMembership {
    config: MulticastConfig,
    socket: Option<MulticastSocket>,
}

impl RecoveryMembership {
    fn new(config: MulticastConfig) -> Self {
        Self {
            config,
            socket: None,
        }
    }

    /// Joins or leaves as `wanted` says; true when this call joined.
    fn update(&mut self, wanted: bool) -> Result<bool, NetError> {
        match (&self.socket, wanted) {
            (None, true) => {
                self.socket = Some(MulticastSocket::receiver(&self.config)?);
                tracing::debug!(group = %self.config.group, "joined the recovery group");
                Ok(true)
            }
            (Some(_), false) => {
                self.socket = None;
                tracing::debug!(group = %self.config.group, "left the recovery group");
                Ok(false)
            }
            _ => Ok(false),
        }
    }

    fn socket(&self) -> Option<&MulticastSocket> {
        self.socket.as_ref()
    }
}

fn deliver<S: ReplicatedState>(
    shared: &Shared<S>,
    sink: &EventSink<S::Key>,
    events: &mut Vec<SubscriberEvent<S::Key>>,
) {
    for event in events.drain(..) {
        let full = match sink {
            EventSink::Blocking(sender) => {
                matches!(sender.try_send(event), Err(TrySendError::Full(_)))
            }
            EventSink::Async(sender) => matches!(
                sender.try_send(event),
                Err(tokio::sync::mpsc::error::TrySendError::Full(_))
            ),
        };
        if full {
            shared.events_dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Decrements `counter` if positive; true when it did.
fn take_one(counter: &AtomicU64) -> bool {
    counter
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
}

/// Drops a fraction of datagrams: deliberate loss for demos and tests.
struct LossInjector {
    fraction: f64,
    rng: rand::rngs::SmallRng,
}

impl LossInjector {
    fn new(fraction: f64) -> Self {
        use rand::SeedableRng;
        Self {
            fraction: fraction.clamp(0.0, 1.0),
            rng: rand::rngs::SmallRng::from_entropy(),
        }
    }

    fn drop_next(&mut self) -> bool {
        use rand::Rng;
        self.fraction > 0.0 && self.rng.gen_bool(self.fraction)
    }
}
