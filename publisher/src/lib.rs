//! GrapeVine publisher: owns the source of truth of a topic, applies each delta locally and
//! sends it, sequenced, over UDP multicast.
//!
//! # Layout
//!
//! A [`Publisher`] wraps the sans-IO [`PublisherSession`] of `grapevine-core` in a mutex.
//! [`Publisher::publish`] applies the delta and, when a datagram is full, sends it from the
//! caller's thread (batched with `sendmmsg`, outside the lock). A background thread flushes
//! partly filled datagrams after the flush delay and sends heartbeats when idle. The
//! `grapevine-snapshotter` crate reads the same session through [`Publisher::shared`].
//!
//! ```no_run
//! use grapevine_core::net::MulticastConfig;
//! use grapevine_core::state::{KeyedMap, MapDelta};
//! use grapevine_publisher::{Publisher, PublisherOptions};
//!
//! let options = PublisherOptions::new(1, MulticastConfig::new("239.255.0.1:7000".parse()?));
//! let publisher = Publisher::start(options, KeyedMap::<String, u64>::default())?;
//! publisher.publish(MapDelta::Put("ACME".into(), 101))?;
//! let stats = publisher.shutdown();
//! println!("{} deltas in {} datagrams", stats.deltas, stats.datagrams);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use grapevine_core::net::{MulticastSocket, NetError};
use grapevine_core::proto::{new_session_id, PublisherSession};

pub use grapevine_core::net::{InterfaceSpec, MulticastConfig};
pub use grapevine_core::proto::{PublishError, PublisherConfig, PublisherStats};
pub use grapevine_core::state::ReplicatedState;
use parking_lot::{Condvar, Mutex};

/// Settings of a [`Publisher`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PublisherOptions {
    /// Group and interface to send on.
    pub multicast: MulticastConfig,
    /// A second group (or interface) that gets every datagram too: the B feed of an A/B pair.
    /// Subscribers joined to both only see a gap when a datagram is lost on both. Default none.
    pub secondary: Option<MulticastConfig>,
    /// The repair group: subscribers ask there for deltas they missed, and the publisher
    /// resends them from a ring of recent datagrams (`session.repair_ring_bytes`, 4 MiB when
    /// left at 0) at most at `session.repair_rate`. Default none.
    pub repair: Option<MulticastConfig>,
    /// Protocol settings (topic, publisher id, datagram size, flush delay, heartbeat).
    pub session: PublisherConfig,
}

impl PublisherOptions {
    /// Publishes `topic` on `multicast` with default protocol settings.
    pub fn new(topic: u32, multicast: MulticastConfig) -> Self {
        Self {
            multicast,
            secondary: None,
            repair: None,
            session: PublisherConfig::new(topic),
        }
    }

    /// Sets this publisher's id within the topic (default 0). Publishers of one topic need
    /// distinct ids; subscribers keep one stream per id.
    #[must_use]
    pub fn with_id(mut self, publisher: u32) -> Self {
        self.session.publisher = publisher;
        self
    }
}

/// Why the publisher failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublisherError {
    /// The socket could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The delta was refused (state unchanged).
    #[error(transparent)]
    Publish(#[from] PublishError),
    /// The publisher was shut down.
    #[error("publisher is shut down")]
    Closed,
}

/// The session shared between the publisher, its flusher thread and snapshotters.
pub type SharedSession<S> = Arc<Shared<S>>;

/// State shared with the background threads.
#[derive(Debug)]
pub struct Shared<S: ReplicatedState> {
    session: Mutex<PublisherSession<S>>,
    wake: Condvar,
    socket: MulticastSocket,
    secondary: Option<MulticastSocket>,
    stopping: AtomicBool,
    send_errors: AtomicU64,
    /// Taken while the session is still locked by whoever drained datagrams from it, and held
    /// while sending them: datagrams leave in the order the session produced them, whichever
    /// thread sends them (out-of-order delivery across threads looked like loss to subscribers
    /// once it outlasted their reorder window), while publishing need not wait for the syscall.
    send_order: Mutex<()>,
}

impl<S: ReplicatedState> Shared<S> {
    /// Runs `f` with the session locked. Keep it short: publishing waits meanwhile.
    pub fn with_session<R>(&self, f: impl FnOnce(&PublisherSession<S>) -> R) -> R {
        f(&self.session.lock())
    }

    /// Whether the publisher is shutting down.
    pub fn is_stopping(&self) -> bool {
        self.stopping.load(Ordering::Relaxed)
    }

    fn send(&self, datagrams: &[Bytes]) {
        if datagrams.is_empty() {
            return;
        }
        for socket in std::iter::once(&self.socket).chain(&self.secondary) {
            match socket.send_batch(datagrams) {
                Ok(sent) if sent == datagrams.len() => {}
                Ok(sent) => {
                    self.send_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        sent,
                        unsent = datagrams.len() - sent,
                        group = %socket.group(),
                        "send stopped part-way"
                    );
                }
                Err(error) => {
                    self.send_errors.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%error, group = %socket.group(), "send failed");
                }
            }
        }
    }
}

/// A running publisher of one topic.
#[derive(Debug)]
pub struct Publisher<S: ReplicatedState> {
    shared: SharedSession<S>,
    publisher_id: u32,
    flusher: Option<JoinHandle<()>>,
    repairer: Option<JoinHandle<()>>,
}

impl<S: ReplicatedState> Publisher<S> {
    /// Opens the socket and starts publishing `initial` under a new session.
    ///
    /// # Errors
    ///
    /// [`PublisherError::Net`] when the socket cannot be set up.
    pub fn start(mut options: PublisherOptions, initial: S) -> Result<Self, PublisherError> {
        if options.repair.is_some() && options.session.repair_ring_bytes == 0 {
            options.session.repair_ring_bytes = 4 << 20;
        }
        let repair_socket = options
            .repair
            .as_ref()
            .map(MulticastSocket::receiver)
            .transpose()?;
        let socket = MulticastSocket::sender(&options.multicast)?;
        let secondary = options
            .secondary
            .as_ref()
            .map(MulticastSocket::sender)
            .transpose()?;
        let now = Instant::now();
        let session_id = new_session_id(unix_millis(), rand::random());
        let session = PublisherSession::new(options.session.clone(), session_id, initial, now);
        tracing::info!(
            topic = options.session.topic,
            publisher = options.session.publisher,
            session = session_id,
            group = %options.multicast.group,
            interface = %socket.interface().name,
            "publisher started"
        );
        let shared = Arc::new(Shared {
            session: Mutex::new(session),
            wake: Condvar::new(),
            socket,
            secondary,
            stopping: AtomicBool::new(false),
            send_errors: AtomicU64::new(0),
            send_order: Mutex::new(()),
        });
        let flusher = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("gv-publisher".into())
                .spawn(move || flush_loop(&shared))
                .map_err(|e| {
                    PublisherError::Net(NetError::Io {
                        op: "spawning the flusher thread",
                        group: options.multicast.group,
                        interface: "-".into(),
                        error: e,
                    })
                })?
        };
        let repairer = match repair_socket {
            None => None,
            Some(socket) => {
                let shared = Arc::clone(&shared);
                Some(
                    std::thread::Builder::new()
                        .name("gv-repair".into())
                        .spawn(move || repair_loop(&shared, &socket))
                        .map_err(|e| {
                            PublisherError::Net(NetError::Io {
                                op: "spawning the repair thread",
                                group: options.multicast.group,
                                interface: "-".into(),
                                error: e,
                            })
                        })?,
                )
            }
        };
        Ok(Self {
            shared,
            publisher_id: options.session.publisher,
            flusher: Some(flusher),
            repairer,
        })
    }

    /// Applies `delta` to the state and sends it; returns its `seq`.
    ///
    /// # Errors
    ///
    /// [`PublisherError::Publish`] when the delta cannot be encoded or is too large (the state
    /// is unchanged), [`PublisherError::Closed`] after shutdown.
    pub fn publish(&self, delta: S::Delta) -> Result<u64, PublisherError> {
        self.publish_all(std::iter::once(delta))
    }

    /// Publishes several deltas under one lock; returns the last `seq`.
    ///
    /// # Errors
    ///
    /// As [`Publisher::publish`]; deltas before a refused one are published.
    pub fn publish_all(
        &self,
        deltas: impl IntoIterator<Item = S::Delta>,
    ) -> Result<u64, PublisherError> {
        self.publish_each(deltas, PublisherSession::publish)
    }

    /// Publishes deltas its producer already holds encoded (postcard), under one lock: the
    /// bytes go out as they are, without serde encoding; each is decoded once to update the
    /// source of truth ([`PublisherSession::publish_encoded`]). Returns the last `seq`.
    ///
    /// # Errors
    ///
    /// As [`Publisher::publish`], and [`PublishError::Decode`]
    /// for bytes that are not one delta of the state; deltas before a refused one are
    /// published.
    pub fn publish_encoded<'a>(
        &self,
        encoded: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<u64, PublisherError> {
        self.publish_each(encoded, |session, now, bytes| {
            session.publish_encoded(now, bytes)
        })
    }

    fn publish_each<T>(
        &self,
        items: impl IntoIterator<Item = T>,
        mut publish_one: impl FnMut(&mut PublisherSession<S>, Instant, T) -> Result<u64, PublishError>,
    ) -> Result<u64, PublisherError> {
        if self.shared.is_stopping() {
            return Err(PublisherError::Closed);
        }
        let mut ready: Vec<Bytes> = Vec::new();
        let (result, pending, order) = {
            let mut session = self.shared.session.lock();
            let now = Instant::now();
            let was_pending = session.has_pending_batch();
            let mut last = Ok(session.last_seq());
            for item in items {
                last = publish_one(&mut session, now, item);
                if last.is_err() {
                    break;
                }
            }
            while let Some(datagram) = session.poll_transmit() {
                ready.push(datagram);
            }
            let order = (!ready.is_empty()).then(|| self.shared.send_order.lock());
            // A batch that was already pending is one the flusher has a deadline for: it
            // computed it under this lock.
            (last, session.has_pending_batch() && !was_pending, order)
        };
        // Wake the flusher only when a new batch waits for its flush delay: a needless wake-up
        // is a syscall and a thread competing for the CPU and the lock on every publish.
        if pending {
            self.shared.wake.notify_one();
        }
        self.shared.send(&ready);
        drop(order);
        Ok(result?)
    }

    /// Sends whatever is batched now.
    pub fn flush(&self) {
        let (ready, _order) = {
            let mut session = self.shared.session.lock();
            session.flush(Instant::now());
            let ready = std::iter::from_fn(|| session.poll_transmit()).collect::<Vec<_>>();
            (ready, self.shared.send_order.lock())
        };
        self.shared.send(&ready);
    }

    /// Reads the source-of-truth state.
    pub fn read<R>(&self, f: impl FnOnce(&S) -> R) -> R {
        f(self.shared.session.lock().state())
    }

    /// Counters.
    pub fn stats(&self) -> PublisherStats {
        self.shared.session.lock().stats()
    }

    /// Failed sends so far.
    pub fn send_errors(&self) -> u64 {
        self.shared.send_errors.load(Ordering::Relaxed)
    }

    /// This publisher's id within its topic (`options.session.publisher`, 0 unless set): what
    /// subscribers key its stream by ([`Subscriber::wait_caught_up`], `stream(publisher)`).
    ///
    /// [`Subscriber::wait_caught_up`]: https://docs.rs/grapevine-subscriber
    pub fn id(&self) -> u32 {
        self.publisher_id
    }

    /// The session id.
    pub fn session_id(&self) -> u64 {
        self.shared.session.lock().session()
    }

    /// The shared session, for a snapshotter in this process.
    pub fn shared(&self) -> SharedSession<S> {
        Arc::clone(&self.shared)
    }

    /// Flushes what is batched, stops the background thread and returns the final counters.
    pub fn shutdown(mut self) -> PublisherStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        self.flush();
        self.shared.stopping.store(true, Ordering::Relaxed);
        self.shared.wake.notify_all();
        if let Some(flusher) = self.flusher.take() {
            // A panic in the thread was already reported by the panic hook.
            let _ = flusher.join();
        }
        if let Some(repairer) = self.repairer.take() {
            // A panic in the thread was already reported by the panic hook.
            let _ = repairer.join();
        }
    }
}

impl<S: ReplicatedState> Drop for Publisher<S> {
    fn drop(&mut self) {
        if self.flusher.is_some() {
            self.stop();
        }
    }
}

/// Flushes batches whose delay expired and sends heartbeats, sleeping until the session's next
/// deadline (or until a publish wakes it).
fn flush_loop<S: ReplicatedState>(shared: &Shared<S>) {
    let mut ready = Vec::new();
    let mut session = shared.session.lock();
    while !shared.is_stopping() {
        let now = Instant::now();
        session.handle_timeout(now);
        ready.extend(std::iter::from_fn(|| session.poll_transmit()));
        if !ready.is_empty() {
            let order = shared.send_order.lock();
            parking_lot::MutexGuard::unlocked(&mut session, || {
                shared.send(&ready);
                drop(order);
            });
            ready.clear();
            continue;
        }
        let deadline = session
            .poll_timeout()
            .unwrap_or(now + Duration::from_millis(100));
        if deadline > now {
            // Timing out is the normal way out: the caller checks its own deadline.
            let _ = shared.wake.wait_until(&mut session, deadline);
        }
    }
}

/// Answers repair requests for this session from the repair group.
fn repair_loop<S: ReplicatedState>(shared: &Shared<S>, socket: &MulticastSocket) {
    let mut batch = grapevine_core::net::RecvBatch::new(16, 2048);
    let mut ready = Vec::new();
    while !shared.is_stopping() {
        let Ok(received) = socket.recv_batch(&mut batch, Duration::from_millis(50)) else {
            continue;
        };
        {
            let mut session = shared.session.lock();
            let now = Instant::now();
            for (index, bytes) in batch.datagrams().take(received).enumerate() {
                let source = batch.source(index).map_or(
                    std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                    |address| address.ip(),
                );
                session.handle_repair_datagram(now, source, bytes);
            }
            ready.extend(std::iter::from_fn(|| session.poll_transmit()));
        }
        // Resent datagrams carry old sequence numbers anyway: no need to order them.
        shared.send(&ready);
        ready.clear();
    }
}

fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
