//! GrapeVine: replicated state over UDP multicast.
//!
//! A [`Publisher`](publisher::Publisher) owns a state and sends sequenced deltas; a
//! [`Snapshotter`](snapshotter::Snapshotter) cycles its leaves; a
//! [`Subscriber`](subscriber::Subscriber) keeps a copy, and rebuilds from the cycle after a gap,
//! a late start or a publisher restart. This facade re-exports the crates and carries the
//! order-book model shared by the examples and the `grapevine` command. The stream
//! [`repeater`] relays topics between networks. The command-line tool lives in its own crate
//! (`grapevine-cli`), so depending on this one pulls in no CLI, HTTP or signal handling.
//!
//! ```no_run
//! use grapevine::prelude::*;
//!
//! let group = MulticastConfig::new("239.255.0.9:7009".parse()?); // loopback by default
//! let subscriber = Subscriber::<KeyedMap<String, u64>>::join(SubscriberOptions::new(1, group.clone()))?;
//! let publisher = Publisher::start(PublisherOptions::new(1, group.clone()), KeyedMap::<String, u64>::default())?;
//! let _snapshots = Snapshotter::start(&publisher, SnapshotterOptions::new(group))?;
//! let seq = publisher.publish(MapDelta::Put("ACME".into(), 101))?;
//! // Wakes when the replica holds `seq` (no polling); false after the timeout.
//! let caught_up = subscriber.wait_caught_up(publisher.id(), seq, std::time::Duration::from_secs(1));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Writing a state of your own: [`LeafChanges`](core::state::LeafChanges) and the guide,
//! `docs/GUIDE.md`.

pub mod order_book;

/// What a program using GrapeVine needs, in one import: `use grapevine::prelude::*;`.
pub mod prelude {
    pub use grapevine_core::auth::Keyring;
    pub use grapevine_core::net::{InterfaceSpec, MulticastConfig};
    pub use grapevine_core::proto::{SnapshotRate, StreamStatus, SubscriberEvent};
    pub use grapevine_core::state::{
        digest, next_in, short_hex, DenseMap, KeyedMap, LeafChanges, LeafMap, MapDelta,
        ReplicatedState,
    };
    pub use grapevine_publisher::{Publisher, PublisherError, PublisherOptions};
    pub use grapevine_snapshotter::{Snapshotter, SnapshotterOptions};
    pub use grapevine_subscriber::{
        EventStream, Events, Progress, ProgressWatch, Replica, StreamProgress, Subscriber,
        SubscriberOptions, Warning,
    };
}

pub use grapevine_core as core;
pub use grapevine_publisher as publisher;
pub use grapevine_repeater as repeater;
pub use grapevine_snapshotter as snapshotter;
pub use grapevine_subscriber as subscriber;
