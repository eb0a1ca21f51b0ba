//! What an application asks of a replica besides events: how far each stream has come
//! ([`Progress`], published after every received batch, readable without the session lock), an
//! owned copy with its status ([`Replica`]), and the conditions worth an operator's attention
//! ([`Warning`]).

use grapevine_core::proto::{StreamStatus, SubscriberSession};
use grapevine_core::state::ReplicatedState;

/// Where one publisher's stream stands.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub struct StreamProgress {
    /// The publisher's id (`PublisherOptions::session.publisher`, 0 unless set).
    pub publisher: u32,
    /// Its current session (a restart starts a new one, with `seq` from 1 again).
    pub session: u64,
    /// Joining, recovering or live.
    pub status: StreamStatus,
    /// The last `seq` processed in order.
    pub last_seq: u64,
    /// Leaves not to be trusted until rebuilt from the snapshot cycle.
    pub stale_leaves: usize,
    /// Nothing arrived for the publisher timeout.
    pub silent: bool,
}

impl StreamProgress {
    /// Whether the replica holds the publisher's state as of `seq` of this session: the stream is
    /// live (no stale leaf, nothing unverified) and has processed `seq`.
    pub fn caught_up_to(&self, seq: u64) -> bool {
        self.status == StreamStatus::Live && self.last_seq >= seq
    }
}

/// How far every stream of a subscriber has come, as of the last batch it received.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub struct Progress {
    streams: Vec<StreamProgress>,
}

impl Progress {
    /// The stream of `publisher`, once heard.
    pub fn stream(&self, publisher: u32) -> Option<&StreamProgress> {
        self.streams.iter().find(|s| s.publisher == publisher)
    }

    /// Every stream heard, by publisher id.
    pub fn streams(&self) -> &[StreamProgress] {
        &self.streams
    }

    /// Whether `publisher`'s stream is caught up to `seq` (see [`StreamProgress::caught_up_to`]).
    pub fn caught_up(&self, publisher: u32, seq: u64) -> bool {
        self.stream(publisher).is_some_and(|s| s.caught_up_to(seq))
    }

    /// Brings this up to date with the session; returns whether anything changed.
    pub(crate) fn refresh<S: ReplicatedState>(&mut self, session: &SubscriberSession<S>) -> bool {
        let mut changed = false;
        let mut index = 0;
        for view in session.streams() {
            let now = StreamProgress {
                publisher: view.publisher,
                session: view.session,
                status: view.status,
                last_seq: view.last_seq,
                stale_leaves: view.stale.len(),
                silent: view.silent,
            };
            match self.streams.get_mut(index) {
                Some(old) if *old == now => {}
                Some(old) => {
                    *old = now;
                    changed = true;
                }
                None => {
                    self.streams.push(now);
                    changed = true;
                }
            }
            index += 1;
        }
        if self.streams.len() != index {
            self.streams.truncate(index);
            changed = true;
        }
        changed
    }
}

/// A subscriber's [`Progress`] as it changes, for async code: `changed().await`, then
/// [`get`](Self::get). Works on any executor (no tokio runtime needed).
#[derive(Clone, Debug)]
pub struct ProgressWatch {
    pub(crate) receiver: tokio::sync::watch::Receiver<Progress>,
}

impl ProgressWatch {
    /// The progress now.
    pub fn get(&self) -> Progress {
        self.receiver.borrow().clone()
    }

    /// Waits for the next change; `false` once the subscriber is gone.
    pub async fn changed(&mut self) -> bool {
        self.receiver.changed().await.is_ok()
    }

    /// Waits until `publisher`'s stream is caught up to `seq`; `false` if the subscriber is
    /// gone first. Wrap it in a timeout (`tokio::time::timeout`) to bound the wait.
    pub async fn caught_up(mut self, publisher: u32, seq: u64) -> bool {
        self.receiver
            .wait_for(|p| p.caught_up(publisher, seq))
            .await
            .is_ok()
    }
}

/// An owned copy of one publisher's replicated state with where it stood when copied.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Replica<S: ReplicatedState> {
    /// Where the stream stood.
    pub progress: StreamProgress,
    /// The state (stale leaves hold their last trusted value).
    pub state: S,
    /// The leaves not to be trusted yet.
    pub stale: Vec<S::Key>,
}

/// A condition a subscriber's user can act on; the library also logs each through `tracing`.
#[derive(Clone, Debug, Eq, PartialEq)]
#[non_exhaustive]
pub enum Warning {
    /// The kernel granted a smaller receive buffer than asked: bursts may be dropped (raise
    /// `net.core.rmem_max`).
    ReceiveBufferCapped {
        /// Bytes asked.
        asked: usize,
        /// Bytes granted.
        granted: usize,
    },
    /// The kernel dropped datagrams because the receive buffer was full (the application or
    /// the machine is too slow for the feed); recovered from snapshots.
    KernelDrops(u64),
    /// Datagrams failed authentication: a wrong key, or a publisher without one.
    Unauthenticated(u64),
    /// Signed datagrams refused as replays or as an older session.
    Refused(u64),
    /// Events the application did not read in time (the state itself is complete).
    EventsDropped(u64),
    /// Datagrams larger than `max_datagram`.
    Truncated(u64),
}
