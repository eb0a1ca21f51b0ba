//! Arbitrary datagrams and time steps never panic the subscriber state machine.
//!
//! Input: a sequence of records `[advance_ms: u8][len: u16 BE][datagram bytes]`. Datagrams
//! that happen to parse drive the full protocol (deltas, snapshots, fragments, heartbeats).
#![no_main]

use grapevine_core::sim::feed_subscriber;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let subscriber = feed_subscriber(data);
    let _ = subscriber.stats();
});
