//! GrapeVine core: the wire format, the sans-IO protocol and the multicast transport on which
//! the publisher, snapshotter and subscriber crates are built.
//!
//! # Layout
//!
//! - [`wire`]: datagram and message headers (`zerocopy`, big-endian), validation that never
//!   panics, batching many messages into one datagram and fragmenting large ones.
//! - [`state`]: the [`state::ReplicatedState`] trait (leaves, keys, deltas) and
//!   ready-made states: [`state::KeyedMap`] (any ordered key) and [`state::DenseMap`] (`u32`
//!   slots in one array).
//! - [`proto`]: the publisher, snapshot-cycle and subscriber state machines. They take bytes and
//!   `Instant`s and return bytes and events: deterministic, testable with a fake clock.
//! - [`net`]: multicast sockets built with `socket2` (explicit interface, loopback by default),
//!   batched `recvmmsg`/`sendmmsg` I/O, a start-up self-test and a tokio wrapper.
//! - [`auth`]: keyed tags on datagrams, replay windows, key rotation.
//! - `sim` (feature `testing`): a seeded, simulated lossy network driving the state machines.
//!
//! The wire format is specified in `docs/PROTOCOL.md`.

pub mod auth;
pub mod codec;
pub mod limit;
pub mod net;
pub mod proto;
#[cfg(any(test, feature = "testing"))]
pub mod sim;
pub mod state;
pub mod wire;

pub use proto::{
    PublisherConfig, PublisherSession, SnapshotConfig, SnapshotRate, SnapshotSession, StreamStatus,
    SubscriberConfig, SubscriberEvent, SubscriberSession,
};
pub use state::{DenseMap, KeyedMap, LeafChanges, LeafMap, MapDelta, ReplicatedState};
