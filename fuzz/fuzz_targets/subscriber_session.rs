//! Arbitrary datagrams and time steps never panic the subscriber state machine.
//!
//! Input: a sequence of records `[advance_ms: u8][len: u16 BE][datagram bytes]`. Datagrams
//! that happen to parse drive the full protocol (deltas, snapshots, fragments, heartbeats).
#![no_main]

use std::time::{Duration, Instant};

use grapevine_core::proto::{SubscriberConfig, SubscriberSession};
use grapevine_core::sim::Counters;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
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
    let _ = subscriber.stats();
});
