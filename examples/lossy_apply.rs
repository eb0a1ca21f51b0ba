//! Profiling aid: the subscriber state machine fed a 64-byte delta stream with 10 % datagram
//! loss and a snapshot cycle, no sockets. Prints messages per second.
//!
//! `cargo run --release --example lossy_apply`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use grapevine::core::proto::{
    new_session_id, PublisherConfig, PublisherSession, SnapshotConfig, SnapshotSession,
    SubscriberConfig, SubscriberSession,
};
use grapevine::core::state::{KeyedMap, MapDelta};

fn main() {
    let loss: f64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(0.1);
    let start = Instant::now();
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::from_secs(1);
    let mut publisher = PublisherSession::new(
        config,
        new_session_id(1, 1),
        KeyedMap::<u32, Bytes>::default(),
        start,
    );
    let mut cycle = SnapshotSession::new(SnapshotConfig::default());
    let mut sub_config = SubscriberConfig::new(1);
    sub_config.emit_applied = false;
    let mut subscriber = SubscriberSession::<KeyedMap<u32, Bytes>>::new(sub_config);
    let size: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    let payload = Bytes::from(vec![1u8; size]);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let wall = Instant::now();
    let messages = 2_000_000u64;
    // Virtual time: 1 µs per delta (1 M deltas/s).
    for i in 0..messages {
        let now = start + Duration::from_micros(i);
        let _ = publisher.publish(now, MapDelta::Put((i % 10_000) as u32, payload.clone()));
        if i % 64 == 0 {
            publisher.handle_timeout(now);
            cycle.handle_timeout(now, &publisher);
        }
        for datagram in
            std::iter::from_fn(|| publisher.poll_transmit().or_else(|| cycle.poll_transmit()))
        {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            if (rng as f64 / u64::MAX as f64) < loss {
                continue;
            }
            subscriber.handle_datagram(now, &datagram);
        }
        if subscriber.poll_timeout().is_some_and(|t| t <= now) {
            subscriber.handle_timeout(now);
        }
        while subscriber.poll_event().is_some() {}
    }
    let secs = wall.elapsed().as_secs_f64();
    let s = subscriber.stats();
    println!(
        "{messages} deltas, loss {loss}: {:.2} M deltas/s end to end (publisher + subscriber on one core); applied {} gaps {} stale {} recoveries {}",
        messages as f64 / secs / 1e6,
        s.deltas_applied,
        s.gaps,
        s.stale_leaves,
        s.recoveries
    );
}
