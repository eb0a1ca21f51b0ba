//! A deterministic simulated network for testing the protocol state machines.
//!
//! One publisher with its snapshot cycle and any number of subscribers, joined by links that
//! lose, duplicate, delay and reorder datagrams using a seeded ChaCha8 generator, on a virtual
//! clock. The same seed always gives the same run, so a failing case can be replayed.
//!
//! ```
//! use std::time::Duration;
//! use grapevine_core::sim::{Counters, CounterDelta, LinkConfig, SimNet, SimConfig};
//!
//! let mut net = SimNet::<Counters>::new(SimConfig::new(7, LinkConfig::lossy(0.2)), 2);
//! for i in 0..100u8 {
//!     net.publish(CounterDelta::Add(i % 10, 1));
//!     net.run_for(Duration::from_millis(1), |_, _| {});
//! }
//! net.set_link(LinkConfig::perfect());
//! net.run_for(Duration::from_millis(500), |_, _| {});
//! assert!(net.converged());
//! ```
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::proto::{
    new_session_id, PublisherConfig, PublisherSession, SnapshotConfig, SnapshotRate,
    SnapshotSession, SubscriberConfig, SubscriberSession,
};
use crate::state::{digest, ReplicatedState};

/// How a link treats datagrams.
#[derive(Clone, Copy, Debug)]
pub struct LinkConfig {
    /// Probability that a datagram is dropped.
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Base one-way delay.
    pub delay: Duration,
    /// Extra random delay, uniform in `0..jitter`: datagrams overtake each other.
    pub jitter: Duration,
}

impl LinkConfig {
    /// No loss, no duplicates, 100 µs delay, no jitter.
    pub fn perfect() -> Self {
        Self {
            loss: 0.0,
            duplicate: 0.0,
            delay: Duration::from_micros(100),
            jitter: Duration::ZERO,
        }
    }

    /// Loses a fraction `loss` of datagrams, duplicates 1 %, reorders within 1 ms.
    pub fn lossy(loss: f64) -> Self {
        Self {
            loss,
            duplicate: 0.01,
            delay: Duration::from_micros(100),
            jitter: Duration::from_millis(1),
        }
    }
}

/// Settings of a simulation.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Link to every subscriber.
    pub link: LinkConfig,
    /// Publisher settings.
    pub publisher: PublisherConfig,
    /// Snapshot settings.
    pub snapshot: SnapshotConfig,
    /// Subscriber settings.
    pub subscriber: SubscriberConfig,
}

impl SimConfig {
    /// Fast timers suited to simulation: 20 ms heartbeats, 5 000 leaves/s snapshots, 5 ms
    /// reorder window.
    pub fn new(seed: u64, link: LinkConfig) -> Self {
        let mut publisher = PublisherConfig::new(1);
        publisher.heartbeat_interval = Duration::from_millis(20);
        publisher.flush_delay = Duration::from_micros(200);
        let snapshot = SnapshotConfig {
            rate: SnapshotRate::LeavesPerSecond(5_000),
            cycle_pause: Duration::from_millis(5),
            ..SnapshotConfig::default()
        };
        let mut subscriber = SubscriberConfig::new(1);
        subscriber.reorder_window = Duration::from_millis(5);
        Self {
            seed,
            link,
            publisher,
            snapshot,
            subscriber,
        }
    }
}

#[derive(Debug, Eq, Ord, PartialEq, PartialOrd)]
struct InFlight {
    at: Instant,
    id: u64,
    to: usize,
    bytes: Bytes,
}

/// A publisher, its snapshot cycle and subscribers on a simulated network.
#[derive(Debug)]
pub struct SimNet<S: ReplicatedState> {
    now: Instant,
    rng: ChaCha8Rng,
    config: SimConfig,
    publisher: PublisherSession<S>,
    snapshot: SnapshotSession<S::Key>,
    subscribers: Vec<SubscriberSession<S>>,
    in_flight: BinaryHeap<Reverse<InFlight>>,
    next_id: u64,
    sent: u64,
    dropped: u64,
    restarts: u64,
}

impl<S: ReplicatedState + Clone> SimNet<S> {
    /// A network with `subscribers` subscribers and an empty publisher state.
    pub fn new(config: SimConfig, subscribers: usize) -> Self {
        let now = Instant::now();
        let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
        let session = new_session_id(1, rng.gen());
        let publisher = PublisherSession::new(config.publisher.clone(), session, S::default(), now);
        let snapshot = SnapshotSession::new(config.snapshot.clone());
        let subscribers = (0..subscribers)
            .map(|_| SubscriberSession::new(config.subscriber.clone()))
            .collect();
        Self {
            now,
            rng,
            config,
            publisher,
            snapshot,
            subscribers,
            in_flight: BinaryHeap::new(),
            next_id: 0,
            sent: 0,
            dropped: 0,
            restarts: 0,
        }
    }

    /// Publishes a delta now; returns its `seq`.
    pub fn publish(&mut self, delta: S::Delta) -> u64 {
        let seq = self
            .publisher
            .publish(self.now, delta)
            .expect("simulated deltas are small");
        self.transmit();
        seq
    }

    /// Restarts the publisher with a new random session, over its current state
    /// (`keep_state`, a persisted source of truth) or an empty one.
    pub fn restart_publisher(&mut self, keep_state: bool) {
        let initial = if keep_state {
            self.publisher.state().clone()
        } else {
            S::default()
        };
        self.restarts += 1;
        let session = new_session_id(1 + self.restarts, self.rng.gen());
        self.publisher =
            PublisherSession::new(self.config.publisher.clone(), session, initial, self.now);
    }

    /// Adds a subscriber that starts listening now (a late joiner); returns its index.
    pub fn add_subscriber(&mut self) -> usize {
        self.subscribers
            .push(SubscriberSession::new(self.config.subscriber.clone()));
        self.subscribers.len() - 1
    }

    /// Changes every link from now on.
    pub fn set_link(&mut self, link: LinkConfig) {
        self.config.link = link;
    }

    /// Advances virtual time by `duration`, running timers and deliveries in order.
    /// `after_step(net, i)` runs after subscriber `i` handled anything.
    pub fn run_for(&mut self, duration: Duration, mut after_step: impl FnMut(&Self, usize)) {
        let end = self.now + duration;
        for _ in 0..10_000_000u32 {
            let next = [
                self.publisher.poll_timeout(),
                self.snapshot.poll_timeout().or(Some(self.now)),
                self.in_flight.peek().map(|Reverse(f)| f.at),
            ]
            .into_iter()
            .chain(self.subscribers.iter().map(SubscriberSession::poll_timeout))
            .flatten()
            .min();
            let Some(next) = next.filter(|t| *t <= end) else {
                self.now = end;
                return;
            };
            self.now = self.now.max(next);
            let now = self.now;
            if self.publisher.poll_timeout().is_some_and(|t| t <= now) {
                self.publisher.handle_timeout(now);
            }
            if self.snapshot.poll_timeout().is_none_or(|t| t <= now) {
                self.snapshot.handle_timeout(now, &self.publisher);
            }
            self.transmit();
            while self.in_flight.peek().is_some_and(|Reverse(f)| f.at <= now) {
                let Some(Reverse(datagram)) = self.in_flight.pop() else {
                    break;
                };
                if let Some(subscriber) = self.subscribers.get_mut(datagram.to) {
                    subscriber.handle_datagram(now, &datagram.bytes);
                    while subscriber.poll_event().is_some() {}
                    after_step(self, datagram.to);
                }
            }
            for index in 0..self.subscribers.len() {
                let subscriber = &mut self.subscribers[index];
                if subscriber.poll_timeout().is_some_and(|t| t <= now) {
                    subscriber.handle_timeout(now);
                    while subscriber.poll_event().is_some() {}
                    after_step(self, index);
                }
            }
        }
        panic!("simulation made no progress (seed {})", self.config.seed);
    }

    /// Whether every subscriber is live with the publisher's session and exactly its state.
    pub fn converged(&self) -> bool {
        let want = digest(self.publisher.state());
        self.subscribers.iter().all(|s| {
            s.is_live()
                && s.stream(self.config.publisher.publisher).is_some_and(|v| {
                    v.session == self.publisher.session() && digest(v.state) == want
                })
        })
    }

    /// The publisher.
    pub fn publisher(&self) -> &PublisherSession<S> {
        &self.publisher
    }

    /// The snapshot cycle.
    pub fn snapshot(&self) -> &SnapshotSession<S::Key> {
        &self.snapshot
    }

    /// The subscribers.
    pub fn subscribers(&self) -> &[SubscriberSession<S>] {
        &self.subscribers
    }

    /// Virtual time now.
    pub fn now(&self) -> Instant {
        self.now
    }

    /// Datagrams sent per subscriber link, and how many the links dropped.
    pub fn traffic(&self) -> (u64, u64) {
        (self.sent, self.dropped)
    }

    fn transmit(&mut self) {
        while let Some(datagram) = self
            .publisher
            .poll_transmit()
            .or_else(|| self.snapshot.poll_transmit())
        {
            for to in 0..self.subscribers.len() {
                self.sent += 1;
                let link = self.config.link;
                if self.rng.gen_bool(link.loss.clamp(0.0, 1.0)) {
                    self.dropped += 1;
                    continue;
                }
                let copies = if self.rng.gen_bool(link.duplicate.clamp(0.0, 1.0)) {
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let jitter = if link.jitter.is_zero() {
                        Duration::ZERO
                    } else {
                        link.jitter.mul_f64(self.rng.gen::<f64>())
                    };
                    self.next_id += 1;
                    self.in_flight.push(Reverse(InFlight {
                        at: self.now + link.delay + jitter,
                        id: self.next_id,
                        to,
                        bytes: datagram.clone(),
                    }));
                }
            }
        }
    }
}

/// Feeds a subscriber of topic 1 with a recorded input: records of
/// `[advance_ms: u8][len: u16 BE][datagram]`, running its timers as time advances. The format
/// of the `subscriber_session` fuzz target, so its findings replay as tests.
pub fn feed_subscriber(data: &[u8]) -> SubscriberSession<Counters> {
    let mut config = SubscriberConfig::new(1);
    config.max_cycle_leaves = 1 << 16;
    let mut subscriber = SubscriberSession::<Counters>::new(config);
    let mut now = Instant::now();
    let mut rest = data;
    while let [advance, hi, lo, tail @ ..] = rest {
        now += Duration::from_millis(u64::from(*advance));
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (datagram, after) = tail.split_at(len);
        subscriber.handle_datagram(now, datagram);
        if subscriber.poll_timeout().is_some_and(|t| t <= now) {
            subscriber.handle_timeout(now);
        }
        while subscriber.poll_event().is_some() {}
        rest = after;
    }
    subscriber
}

/// A map of counters with *incremental* deltas, so a delta applied to the wrong base value
/// gives a value the publisher never had: the property tests catch any such mistake.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct Counters(pub BTreeMap<u8, i64>);

/// A change to [`Counters`].
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub enum CounterDelta {
    /// Adds to a counter, creating it at 0 first if absent.
    Add(u8, i64),
    /// Sets a counter.
    Set(u8, i64),
    /// Removes a counter.
    Remove(u8),
}

impl ReplicatedState for Counters {
    type Key = u8;
    type Leaf = i64;
    type Delta = CounterDelta;

    fn delta_key(delta: &CounterDelta) -> &u8 {
        match delta {
            CounterDelta::Add(key, _) | CounterDelta::Set(key, _) | CounterDelta::Remove(key) => {
                key
            }
        }
    }

    fn apply(&mut self, delta: &CounterDelta) {
        match delta {
            CounterDelta::Add(key, n) => {
                let value = self.0.entry(*key).or_insert(0);
                *value = value.wrapping_add(*n);
            }
            CounterDelta::Set(key, n) => {
                self.0.insert(*key, *n);
            }
            CounterDelta::Remove(key) => {
                self.0.remove(key);
            }
        }
    }

    fn leaf(&self, key: &u8) -> Option<&i64> {
        self.0.get(key)
    }

    fn leaves(&self) -> Box<dyn Iterator<Item = (&u8, &i64)> + '_> {
        Box::new(self.0.iter())
    }

    fn next_leaf(&self, after: Option<&u8>) -> Option<(&u8, &i64)> {
        crate::state::next_in(&self.0, after)
    }

    fn put_leaf(&mut self, key: u8, leaf: i64) {
        self.0.insert(key, leaf);
    }

    fn remove_leaf(&mut self, key: &u8) -> Option<i64> {
        self.0.remove(key)
    }

    fn len(&self) -> usize {
        self.0.len()
    }
}
