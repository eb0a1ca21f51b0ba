//! The subscriber's steady state allocates nothing per delta when the state's values are fixed
//! size: the datagram is read in place, duplicates and sequence are checked before the payload
//! is decoded, and the decoded delta moves into its slot.
//!
//! A counting global allocator (per thread, so the test harness's other threads do not count)
//! measures the subscriber while it applies a second round of deltas to keys it already holds.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// A global allocator cannot be written without `unsafe`; it only forwards to `System`.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grapevine_core::proto::{
    PublisherConfig, PublisherSession, StreamStatus, SubscriberConfig, SubscriberSession,
};
use grapevine_core::state::{DenseMap, KeyedMap, MapDelta, ReplicatedState};

struct CountingAllocator;

thread_local! {
    static ALLOCATIONS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: every call is forwarded to `System` unchanged; the count is a thread-local `Cell`
// with a const initialiser, so counting neither allocates nor recurses.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let _ = ALLOCATIONS.try_with(|count| count.set(count.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn allocations() -> u64 {
    ALLOCATIONS.with(Cell::get)
}

const TOPIC: u32 = 9;
const KEYS: u32 = 1_000;
const ROUND: u32 = 5_000;

/// Two rounds of datagrams from one publisher session: the first creates every key, the second
/// updates keys the subscriber then holds.
fn two_rounds<S: ReplicatedState<Delta = MapDelta<u32, V>, Key = u32>, V: Clone>(
    value: V,
) -> [Vec<Bytes>; 2] {
    let now = Instant::now();
    let mut config = PublisherConfig::new(TOPIC);
    config.flush_delay = Duration::from_secs(1);
    let mut publisher = PublisherSession::new(config, 77, S::default(), now);
    let mut round = || {
        let mut datagrams = Vec::new();
        for i in 0..ROUND {
            publisher
                .publish(now, MapDelta::Put(i % KEYS, value.clone()))
                .expect("small delta");
            datagrams.extend(std::iter::from_fn(|| publisher.poll_transmit()));
        }
        publisher.flush(now);
        datagrams.extend(std::iter::from_fn(|| publisher.poll_transmit()));
        datagrams
    };
    let first = round();
    let second = round();
    [first, second]
}

/// Allocations made while a live subscriber takes `datagrams` and its events are drained.
fn allocations_applying<S: ReplicatedState>(
    subscriber: &mut SubscriberSession<S>,
    datagrams: &[Bytes],
) -> u64 {
    let now = Instant::now();
    let before = allocations();
    for datagram in datagrams {
        subscriber.handle_datagram(now, datagram);
        while subscriber.poll_event().is_some() {}
    }
    allocations() - before
}

fn warmed_up<S: ReplicatedState>(first_round: &[Bytes]) -> SubscriberSession<S> {
    let mut subscriber = SubscriberSession::<S>::new(SubscriberConfig::new(TOPIC));
    let now = Instant::now();
    for datagram in first_round {
        subscriber.handle_datagram(now, datagram);
    }
    while subscriber.poll_event().is_some() {}
    assert_eq!(
        subscriber.stream(0).expect("stream").status,
        StreamStatus::Live
    );
    subscriber
}

#[test]
fn a_dense_state_of_fixed_size_values_applies_deltas_without_allocating() {
    type Prices = DenseMap<[u64; 8], 4096>;
    let [first, second] = two_rounds::<Prices, _>([7u64; 8]);
    let mut subscriber = warmed_up::<Prices>(&first);
    // Applied events are on (the default): they are queued without allocating once the queue
    // has grown.
    assert!(subscriber.config().emit_applied);

    let made = allocations_applying(&mut subscriber, &second);

    let stream = subscriber.stream(0).expect("stream");
    assert_eq!(stream.status, StreamStatus::Live);
    assert_eq!(stream.state.len(), KEYS as usize);
    assert_eq!(stream.state.leaf(&3), Some(&[7u64; 8]));
    assert_eq!(
        subscriber.stats().deltas_received,
        2 * u64::from(ROUND),
        "every delta arrived"
    );
    assert_eq!(
        made,
        0,
        "{made} allocations for {ROUND} deltas in {} datagrams",
        second.len()
    );
}

#[test]
fn duplicates_are_refused_before_their_payload_is_decoded() {
    // `Vec` values allocate when decoded: a duplicate that was decoded would show.
    type Blobs = KeyedMap<u32, Vec<u8>>;
    let [first, _] = two_rounds::<Blobs, _>(vec![0xab; 64]);
    let mut subscriber = warmed_up::<Blobs>(&first);
    let duplicates_before = subscriber.stats().duplicates;

    let made = allocations_applying(&mut subscriber, &first);

    assert_eq!(
        subscriber.stats().duplicates - duplicates_before,
        u64::from(ROUND)
    );
    assert_eq!(made, 0, "{made} allocations for {ROUND} duplicates");
}
