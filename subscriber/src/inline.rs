//! A subscriber driven by the caller's thread: no I/O thread, no channel, no lock.

use std::time::{Duration, Instant};

use grapevine_core::net::{MulticastSocket, RecvBatch};
use grapevine_core::proto::{SubscriberEvent, SubscriberSession};
use grapevine_core::state::ReplicatedState;

use crate::{wants_snapshots, RecoveryMembership, SubscribeError, SubscriberOptions};

/// A subscriber whose owner drives it: each [`poll`](Self::poll) reads what the socket has,
/// runs the protocol and returns the events, on the calling thread.
///
/// This is the lowest-latency way to receive: a datagram goes from the socket to the
/// application without crossing threads. Call `poll` with a zero timeout in a loop to busy-poll
/// (one core spent spinning), or with a timeout to block. The recovery group, when configured,
/// is joined while recovering and read in the same call, without waiting on it.
///
/// ```no_run
/// use std::time::Duration;
/// use grapevine_core::net::MulticastConfig;
/// use grapevine_core::state::KeyedMap;
/// use grapevine_subscriber::{InlineSubscriber, SubscriberOptions};
///
/// let options = SubscriberOptions::new(1, MulticastConfig::new("239.255.0.1:7000".parse()?));
/// let mut subscriber = InlineSubscriber::<KeyedMap<u32, u64>>::join(options)?;
/// loop {
///     for event in subscriber.poll(Duration::from_millis(100)) {
///         println!("{event:?}");
///     }
/// #   break;
/// }
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct InlineSubscriber<S: ReplicatedState> {
    session: SubscriberSession<S>,
    live: MulticastSocket,
    recovery: Option<RecoveryMembership>,
    batch: RecvBatch,
    events: Vec<SubscriberEvent<S::Key>>,
    kernel_drops: u32,
}

impl<S: ReplicatedState> InlineSubscriber<S> {
    /// Joins the live group.
    ///
    /// # Errors
    ///
    /// [`SubscribeError::Net`] when the socket cannot be set up.
    pub fn join(options: SubscriberOptions) -> Result<Self, SubscribeError> {
        if options.secondary.is_some() {
            return Err(SubscribeError::Unsupported(
                "A/B feeds need the threaded Subscriber (one receive thread per feed)",
            ));
        }
        let live = MulticastSocket::receiver(&options.multicast)?;
        Ok(Self {
            session: SubscriberSession::new(options.session.clone()),
            batch: RecvBatch::new(options.batch, options.max_datagram),
            live,
            recovery: options.recovery.clone().map(RecoveryMembership::new),
            events: Vec::new(),
            kernel_drops: 0,
        })
    }

    /// Waits at most `timeout` for datagrams (zero: do not wait), processes everything
    /// received and every timer due, and returns the events that resulted.
    pub fn poll(&mut self, timeout: Duration) -> std::vec::Drain<'_, SubscriberEvent<S::Key>> {
        let wait = self
            .session
            .poll_timeout()
            .map_or(timeout, |t| t.saturating_duration_since(Instant::now()))
            .min(timeout);
        match self.live.recv_batch(&mut self.batch, wait) {
            Ok(received) => {
                let now = Instant::now();
                for bytes in self.batch.datagrams().take(received) {
                    self.session.handle_datagram(now, bytes);
                }
                self.kernel_drops = self.kernel_drops.max(self.batch.kernel_drops());
            }
            Err(error) => tracing::warn!(%error, "receive failed"),
        }
        self.poll_recovery();
        let now = Instant::now();
        if self.session.poll_timeout().is_some_and(|t| t <= now) {
            self.session.handle_timeout(now);
        }
        self.events
            .extend(std::iter::from_fn(|| self.session.poll_event()));
        self.events.drain(..)
    }

    fn poll_recovery(&mut self) {
        let Some(membership) = self.recovery.as_mut() else {
            return;
        };
        if let Err(error) = membership.update(wants_snapshots(&self.session)) {
            tracing::warn!(%error, "cannot join the recovery group");
        }
        let Some(socket) = membership.socket() else {
            return;
        };
        if let Ok(received) = socket.recv_batch(&mut self.batch, Duration::ZERO) {
            let now = Instant::now();
            for bytes in self.batch.datagrams().take(received) {
                self.session.handle_datagram(now, bytes);
            }
        }
    }

    /// The session: states, statuses, stale leaves, protocol counters.
    pub fn session(&self) -> &SubscriberSession<S> {
        &self.session
    }

    /// Datagrams the kernel dropped because the receive buffer was full (a dropped coalesced
    /// run counts once).
    pub fn kernel_drops(&self) -> u32 {
        self.kernel_drops
    }
}
