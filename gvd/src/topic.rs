//! One GrapeVine topic gvd both publishes and follows (the ELP records, the VDEV lists): its
//! publisher, snapshotter and subscriber, started and stopped together.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use grapevine_core::net::MulticastConfig;
use grapevine_core::proto::{SnapshotRate, SubscriberEvent};
use grapevine_core::state::ReplicatedState;
use grapevine_publisher::{Publisher, PublisherOptions};
use grapevine_snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine_subscriber::{Subscriber, SubscriberOptions};

/// A topic's publisher, snapshotter and subscriber.
pub(crate) struct ReplicatedTopic<S: ReplicatedState> {
    pub(crate) publisher: Publisher<S>,
    pub(crate) snapshotter: Snapshotter,
    pub(crate) subscriber: Subscriber<S>,
}

/// How a topic of gvd runs.
pub(crate) struct TopicOptions {
    pub(crate) heartbeat: Duration,
    pub(crate) cycle_pause: Duration,
    pub(crate) inject_loss: f64,
    pub(crate) keyring: Option<Arc<grapevine_core::auth::Keyring>>,
}

impl<S: ReplicatedState> ReplicatedTopic<S> {
    /// Starts by publishing `first` as the session's first delta, before the snapshotter
    /// starts: peers that hear `seq` 1 of a session know they missed nothing and list the
    /// node at once, and the first snapshot cycle already carries it.
    pub(crate) fn start(
        topic: u32,
        multicast: &MulticastConfig,
        first: S::Delta,
        node: u64,
        settings: &TopicOptions,
    ) -> Result<Self> {
        // Joined first, so that this node hears its own first cycle too.
        let mut options = SubscriberOptions::new(topic, multicast.clone());
        options.batch = 8;
        options.inject_loss = settings.inject_loss;
        options.session.keyring = settings.keyring.clone();
        let subscriber = Subscriber::join(options)
            .with_context(|| format!("cannot join {}", multicast.group))?;
        let mut options = PublisherOptions::new(topic, multicast.clone());
        // Publisher ids are 32 bits: the low half of the node id (a collision is 1 in 4 billion
        // per pair of nodes).
        options.session.publisher = node as u32;
        options.session.heartbeat_interval = settings.heartbeat;
        options.session.keyring = settings.keyring.clone();
        let publisher = Publisher::start(options, S::default())
            .with_context(|| format!("cannot publish on {}", multicast.group))?;
        publisher.publish(first)?;
        publisher.flush();
        let mut snapshot = SnapshotterOptions::new(multicast.clone());
        snapshot.snapshot.rate = SnapshotRate::LeavesPerSecond(1000);
        snapshot.snapshot.cycle_pause = settings.cycle_pause;
        snapshot.snapshot.keyring = settings.keyring.clone();
        let snapshotter = Snapshotter::start(&publisher, snapshot)?;
        Ok(Self {
            publisher,
            snapshotter,
            subscriber,
        })
    }

    /// Nobody reads the events (the state is read directly); drain them so none pile up.
    pub(crate) fn drain_events(&self) {
        for event in self.subscriber.events().try_iter() {
            if let SubscriberEvent::PublisherRestarted { publisher, .. } = event {
                tracing::debug!(publisher, "node restarted");
            }
        }
    }

    pub(crate) fn shutdown(self) {
        self.snapshotter.shutdown();
        self.publisher.shutdown();
        self.subscriber.shutdown();
    }
}
