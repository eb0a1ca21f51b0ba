//! GrapeVine snapshotter: cycles the leaves of a publisher's state over multicast at a bounded
//! rate, so that subscribers that lost deltas, joined late or saw a restart can rebuild.
//!
//! # How it reads a state that keeps changing
//!
//! The snapshotter runs on its own thread, in the publisher's process, and reads the
//! publisher's session under the publisher's lock one *slice* at a time: each slice is what the
//! rate allows in one tick (1 ms by default, so 100 leaves at 100 000 leaves/s). Within a slice
//! every leaf is read together with its `as_of_seq` and the publisher's current `seq`, so each
//! snapshot leaf is exactly the value the publisher had then; between slices deltas flow
//! normally. The publisher's hot path therefore waits at most one slice, and only while a slice
//! is being encoded. Nothing is copied up front: the cycle walks the keys in order, each step
//! asking for the key after the previous one, so a cycle over a million leaves costs no more
//! memory than one over ten, and keys created or deleted during the cycle are simply found or
//! not found when the walk gets there.
//!
//! Snapshots go to the live group or to a separate *recovery group* that subscribers join only
//! while they recover.
//!
//! ```no_run
//! use grapevine_core::net::MulticastConfig;
//! use grapevine_core::state::KeyedMap;
//! use grapevine_publisher::{Publisher, PublisherOptions};
//! use grapevine_snapshotter::{Snapshotter, SnapshotterOptions};
//!
//! let live = MulticastConfig::new("239.255.0.1:7000".parse()?);
//! let publisher = Publisher::start(PublisherOptions::new(1, live.clone()), KeyedMap::<u32, u32>::default())?;
//! let snapshotter = Snapshotter::start(&publisher, SnapshotterOptions::new(live))?;
//! // ... publish ...
//! println!("{} cycles", snapshotter.shutdown().cycles);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use grapevine_core::net::{MulticastConfig, MulticastSocket, NetError};
use grapevine_core::proto::SnapshotSession;

pub use grapevine_core::proto::{SnapshotConfig, SnapshotRate, SnapshotStats};
use grapevine_core::state::ReplicatedState;
use grapevine_publisher::{Publisher, SharedSession};
use parking_lot::Mutex;

/// Settings of a [`Snapshotter`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SnapshotterOptions {
    /// Where snapshots go: the live group or a recovery group.
    pub multicast: MulticastConfig,
    /// A second group that gets every snapshot datagram too (the B feed). Default none.
    pub secondary: Option<MulticastConfig>,
    /// Rate, pause between cycles, datagram size.
    pub snapshot: SnapshotConfig,
}

impl SnapshotterOptions {
    /// Snapshots on `multicast` at the default rate.
    pub fn new(multicast: MulticastConfig) -> Self {
        Self {
            multicast,
            secondary: None,
            snapshot: SnapshotConfig::default(),
        }
    }
}

/// Why the snapshotter could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SnapshotterError {
    /// The socket could not be set up.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The thread could not be started.
    #[error("cannot start the snapshot thread: {0}")]
    Thread(#[source] std::io::Error),
}

#[derive(Debug)]
enum Command {
    Stop,
    RequestCycle,
}

/// Asks a [`Snapshotter`] for a cycle now; cheap to clone and send to other threads.
#[derive(Clone, Debug)]
pub struct CycleRequester(Option<Sender<Command>>);

impl CycleRequester {
    /// As [`Snapshotter::request_cycle`].
    pub fn request_cycle(&self) {
        if let Some(commands) = &self.0 {
            // A full queue already holds a request: this one adds nothing.
            let _ = commands.try_send(Command::RequestCycle);
        }
    }
}

/// A running snapshot cycle for one publisher.
#[derive(Debug)]
pub struct Snapshotter {
    commands: Option<Sender<Command>>,
    thread: Option<JoinHandle<()>>,
    stats: Arc<Mutex<SnapshotStats>>,
}

impl Snapshotter {
    /// Starts cycling `publisher`'s leaves.
    ///
    /// # Errors
    ///
    /// [`SnapshotterError`] when the socket or the thread cannot be set up.
    pub fn start<S: ReplicatedState>(
        publisher: &Publisher<S>,
        options: SnapshotterOptions,
    ) -> Result<Self, SnapshotterError> {
        let mut sockets = vec![MulticastSocket::sender(&options.multicast)?];
        if let Some(secondary) = &options.secondary {
            sockets.push(MulticastSocket::sender(secondary)?);
        }
        let shared = publisher.shared();
        let stats = Arc::new(Mutex::new(SnapshotStats::default()));
        // Requests beyond what the thread has yet to see add nothing: a full queue drops them.
        let (commands, received) = bounded::<Command>(16);
        let thread = {
            let stats = Arc::clone(&stats);
            std::thread::Builder::new()
                .name("gv-snapshotter".into())
                .spawn(move || {
                    let mut cycle = SnapshotSession::new(options.snapshot);
                    run(
                        &shared,
                        &sockets,
                        &mut cycle,
                        &stats,
                        |wait, cycle| match received.recv_timeout(wait) {
                            Ok(Command::RequestCycle) => {
                                cycle.request_cycle(Instant::now());
                                false
                            }
                            Err(RecvTimeoutError::Timeout) => false,
                            Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => true,
                        },
                    );
                })
                .map_err(SnapshotterError::Thread)?
        };
        Ok(Self {
            commands: Some(commands),
            thread: Some(thread),
            stats,
        })
    }

    /// Counters.
    pub fn stats(&self) -> SnapshotStats {
        *self.stats.lock()
    }

    /// Starts a cycle now instead of after the pause (or right after the cycle under way):
    /// what a node does when a peer says it needs a snapshot. Never raises the rate.
    pub fn request_cycle(&self) {
        if let Some(commands) = &self.commands {
            // A full queue already holds a request: this one adds nothing.
            let _ = commands.try_send(Command::RequestCycle);
        }
    }

    /// A handle that asks for cycles from another thread (a query server, say), as
    /// [`request_cycle`](Self::request_cycle) does; it does nothing once the snapshotter stopped.
    pub fn cycle_requester(&self) -> CycleRequester {
        CycleRequester(self.commands.clone())
    }

    /// Stops the cycle and returns the final counters.
    pub fn shutdown(mut self) -> SnapshotStats {
        self.stop();
        self.stats()
    }

    fn stop(&mut self) {
        if let Some(commands) = self.commands.take() {
            // A snapshotter thread that already ended needs no stop.
            let _ = commands.send(Command::Stop);
        }
        if let Some(thread) = self.thread.take() {
            // A panic in the thread was already reported by the panic hook.
            let _ = thread.join();
        }
    }
}

impl Drop for Snapshotter {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The snapshot loop: one slice under the publisher's lock, send outside it, sleep until the
/// next slice. `wait(d, cycle)` sleeps up to `d` (less when a request arrives, which it hands
/// to `cycle`) and returns true when asked to stop.
fn run<S: ReplicatedState>(
    shared: &SharedSession<S>,
    sockets: &[MulticastSocket],
    cycle: &mut SnapshotSession<S::Key>,
    stats: &Mutex<SnapshotStats>,
    wait: impl Fn(Duration, &mut SnapshotSession<S::Key>) -> bool,
) {
    let mut ready = Vec::new();
    loop {
        let now = Instant::now();
        shared.with_session(|session| cycle.handle_timeout(now, session));
        ready.extend(std::iter::from_fn(|| cycle.poll_transmit()));
        if !ready.is_empty() {
            for socket in sockets {
                if let Err(error) = socket.send_batch(&ready) {
                    tracing::warn!(%error, group = %socket.group(), "snapshot send failed");
                }
            }
            ready.clear();
        }
        *stats.lock() = cycle.stats();
        let next = cycle
            .poll_timeout()
            .unwrap_or(now + Duration::from_millis(1));
        let sleep = next.saturating_duration_since(Instant::now());
        if shared.is_stopping() || wait(sleep, cycle) {
            return;
        }
    }
}
