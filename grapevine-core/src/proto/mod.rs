//! Sans-IO protocol state machines: no sockets, no threads, no clock.
//!
//! Each machine takes inputs through `handle_*` methods (datagrams, deltas, `now`) and gives its
//! outputs through `poll_*` methods (datagrams to send, events, the next timeout). The drivers in
//! the `grapevine-publisher`, `-snapshotter` and `-subscriber` crates move bytes between these
//! and sockets; the simulated network in `crate::sim` (feature `testing`) moves them through a lossy model.

mod coverage;
mod publisher;
mod reassembly;
mod snapshot;
mod subscriber;

pub use publisher::{
    new_session_id, PublishError, PublisherConfig, PublisherSession, PublisherStats,
    MAX_REPAIR_RANGES_PER_REQUEST, MAX_RESENT_PER_REQUEST,
};
pub use reassembly::{FragmentKey, Reassembler, ReassemblyError, CHUNK_OVERHEAD, MESSAGE_OVERHEAD};
pub use snapshot::{SnapshotConfig, SnapshotRate, SnapshotSession, SnapshotStats};
pub use subscriber::{
    StreamCounters, StreamStatus, StreamView, SubscriberConfig, SubscriberEvent, SubscriberSession,
    SubscriberStats,
};
