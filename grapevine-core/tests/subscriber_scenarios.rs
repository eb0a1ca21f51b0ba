//! Named scenarios for the subscriber state machine, driven by hand on a fake clock.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use grapevine_core::auth::Keyring;
use grapevine_core::proto::{
    new_session_id, PublisherConfig, PublisherSession, SnapshotConfig, SnapshotSession,
    StreamStatus, SubscriberConfig, SubscriberEvent, SubscriberSession,
};
use grapevine_core::sim::{feed_subscriber, CounterDelta, Counters};
use grapevine_core::wire::DatagramBuilder;

fn publisher(now: Instant, session_ms: u64) -> PublisherSession<Counters> {
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::ZERO;
    PublisherSession::new(
        config,
        new_session_id(session_ms, 7),
        Counters::default(),
        now,
    )
}

fn subscriber() -> SubscriberSession<Counters> {
    SubscriberSession::new(SubscriberConfig::new(1))
}

fn drain(publisher: &mut PublisherSession<Counters>) -> Vec<Bytes> {
    std::iter::from_fn(|| publisher.poll_transmit()).collect()
}

fn status(subscriber: &SubscriberSession<Counters>) -> StreamStatus {
    subscriber.stream(0).unwrap().status
}

#[test]
fn duplicates_are_applied_once() {
    let now = Instant::now();
    let mut p = publisher(now, 1);
    let mut s = subscriber();
    p.publish(now, CounterDelta::Add(1, 5)).unwrap();
    p.publish(now, CounterDelta::Add(1, 5)).unwrap();
    for datagram in drain(&mut p) {
        s.handle_datagram(now, &datagram);
        s.handle_datagram(now, &datagram);
    }
    assert_eq!(s.stream(0).unwrap().state.0.get(&1), Some(&10));
    assert_eq!(s.stats().duplicates, 2);
    assert_eq!(status(&s), StreamStatus::Live);
}

#[test]
fn a_lost_delta_makes_only_its_leaf_stale_until_its_snapshot() {
    let now = Instant::now();
    let mut p = publisher(now, 1);
    let mut s = subscriber();
    p.publish(now, CounterDelta::Add(1, 1)).unwrap();
    p.publish(now, CounterDelta::Add(2, 1)).unwrap();
    for d in drain(&mut p) {
        s.handle_datagram(now, &d);
    }
    p.publish(now, CounterDelta::Add(1, 10)).unwrap(); // lost
    drain(&mut p);
    p.publish(now, CounterDelta::Add(1, 100)).unwrap();
    p.publish(now, CounterDelta::Add(2, 100)).unwrap();
    for d in drain(&mut p) {
        s.handle_datagram(now, &d);
    }
    // After the reorder window the gap is declared: leaf 1 is stale (its value is still the
    // trusted 1, not 101), leaf 2 kept chaining.
    let later = now + Duration::from_millis(50);
    s.handle_timeout(later);
    let view = s.stream(0).unwrap();
    assert_eq!(view.status, StreamStatus::Recovering);
    assert!(view.stale.contains(&1));
    assert_eq!(view.state.0.get(&1), Some(&1));
    assert_eq!(view.state.0.get(&2), Some(&101));
    let events: Vec<_> = std::iter::from_fn(|| s.poll_event()).collect();
    assert!(events.contains(&SubscriberEvent::Gap {
        publisher: 0,
        first: 3,
        lost: 1
    }));
    assert!(events.contains(&SubscriberEvent::LeafStale {
        publisher: 0,
        key: 1
    }));

    // One whole snapshot cycle repairs it.
    let mut cycle = SnapshotSession::new(SnapshotConfig::default());
    cycle.handle_timeout(later, &p);
    for d in std::iter::from_fn(|| cycle.poll_transmit()) {
        s.handle_datagram(later, &d);
    }
    let view = s.stream(0).unwrap();
    assert_eq!(view.status, StreamStatus::Live);
    assert_eq!(view.state, p.state());
    let counters = view.counters;
    assert_eq!(
        (counters.gaps, counters.messages_lost, counters.recoveries),
        (1, 1, 1)
    );
}

#[test]
fn late_datagrams_of_a_replaced_session_are_ignored() {
    let now = Instant::now();
    let mut old = publisher(now, 1);
    let mut new = publisher(now, 2);
    let mut s = subscriber();
    old.publish(now, CounterDelta::Set(1, 1)).unwrap();
    let old_datagrams = drain(&mut old);
    new.publish(now, CounterDelta::Set(1, 2)).unwrap();
    for d in drain(&mut new) {
        s.handle_datagram(now, &d);
    }
    for d in old_datagrams {
        s.handle_datagram(now, &d);
    }
    assert_eq!(s.stream(0).unwrap().session, new.session());
    assert_eq!(s.stream(0).unwrap().state.0.get(&1), Some(&2));
    assert_eq!(s.stats().retired_session, 1);
    assert_eq!(s.stats().restarts, 0);
}

#[test]
fn extreme_sequence_numbers_do_not_overflow() {
    let now = Instant::now();
    let mut s = subscriber();
    let mut builder = DatagramBuilder::new(1400, 1, 0, 5);
    assert!(builder.push_heartbeat(u64::MAX - 1));
    s.handle_datagram(now, &builder.finish().unwrap());
    let payload = postcard::to_allocvec(&CounterDelta::Set(1, 1)).unwrap();
    assert!(builder.push_delta(u64::MAX - 1, 0, &payload));
    s.handle_datagram(now, &builder.finish().unwrap());
    // seq 2^64-1 is invalid on the wire.
    assert!(builder.push_delta(u64::MAX, 0, &payload));
    s.handle_datagram(now, &builder.finish().unwrap());
    s.handle_timeout(now + Duration::from_secs(1));
    assert_eq!(s.stats().malformed, 1);
    assert_eq!(s.stream(0).unwrap().last_seq, u64::MAX - 1);
}

#[test]
fn foreign_topics_and_bad_payloads_are_counted() {
    let now = Instant::now();
    let mut s = subscriber();
    let mut other_topic = DatagramBuilder::new(1400, 99, 0, 5);
    assert!(other_topic.push_heartbeat(1));
    s.handle_datagram(now, &other_topic.finish().unwrap());
    let mut builder = DatagramBuilder::new(1400, 1, 0, 5);
    assert!(builder.push_delta(1, 0, &[0xff, 0xff, 0xff]));
    s.handle_datagram(now, &builder.finish().unwrap());
    assert_eq!(s.stats().foreign_topic, 1);
    assert_eq!(s.stats().bad_payloads, 1);
    assert!(s.stream(0).unwrap().state.0.is_empty());
}

#[test]
fn heartbeat_reveals_a_lost_tail() {
    let now = Instant::now();
    let mut p = publisher(now, 1);
    let mut s = subscriber();
    p.publish(now, CounterDelta::Set(1, 1)).unwrap();
    for d in drain(&mut p) {
        s.handle_datagram(now, &d);
    }
    p.publish(now, CounterDelta::Set(1, 2)).unwrap(); // lost tail
    drain(&mut p);
    let later = now + Duration::from_secs(1);
    p.handle_timeout(later); // idle: heartbeat with last seq 2
    for d in drain(&mut p) {
        s.handle_datagram(later, &d);
    }
    s.handle_timeout(later + Duration::from_millis(50));
    assert_eq!(s.stats().gaps, 1);
    assert_eq!(s.stats().messages_lost, 1);
    assert_eq!(status(&s), StreamStatus::Recovering);
    let counters = s.stream(0).unwrap().counters;
    assert_eq!(
        (counters.gaps, counters.messages_lost, counters.recoveries),
        (1, 1, 0)
    );
}

/// Fuzz find: two heartbeats claiming ~2^64 lost messages overflowed the lost counter.
#[test]
fn fuzz_regression_lost_counter_overflow() {
    let subscriber = feed_subscriber(include_bytes!("fuzz-regressions/lost-counter-overflow.bin"));
    assert_eq!(subscriber.stats().messages_lost, u64::MAX);
}

/// Fuzz find: a cycle whose steps go backwards in key order (forged) made an inverted key range
/// and panicked the range query.
#[test]
fn fuzz_regression_inverted_span() {
    let subscriber = feed_subscriber(include_bytes!("fuzz-regressions/inverted-span.bin"));
    assert!(subscriber.stats().snapshot_messages > 0);
}

/// A subscriber far behind buffers a bounded number of deltas for its stale leaves, counts what
/// it drops, and still converges from the snapshot cycle.
#[test]
fn stale_buffers_are_bounded() {
    let now = Instant::now();
    let mut p = publisher(now, 1);
    let mut config = SubscriberConfig::new(1);
    config.max_stale_total = 100;
    config.max_stale_buffer = 30;
    let mut s = SubscriberSession::<Counters>::new(config);
    for key in 0..50u8 {
        p.publish(now, CounterDelta::Add(key, 1)).unwrap();
    }
    for d in drain(&mut p) {
        s.handle_datagram(now, &d);
    }
    // Lose one delta on every key, then send 20 more per key: all 50 leaves go stale.
    for key in 0..50u8 {
        p.publish(now, CounterDelta::Add(key, 1)).unwrap();
    }
    drain(&mut p);
    for _ in 0..20 {
        for key in 0..50u8 {
            p.publish(now, CounterDelta::Add(key, 1)).unwrap();
        }
    }
    let later = now + Duration::from_millis(50);
    for d in drain(&mut p) {
        s.handle_datagram(now, &d);
    }
    s.handle_timeout(later);
    assert_eq!(s.stream(0).unwrap().stale.len(), 50);
    assert_eq!(s.stats().stale_dropped, 50 * 20 - 100);
    let mut cycle = SnapshotSession::new(SnapshotConfig::default());
    cycle.handle_timeout(later, &p);
    for d in std::iter::from_fn(|| cycle.poll_transmit()) {
        s.handle_datagram(later, &d);
    }
    assert_eq!(s.stream(0).unwrap().state, p.state());
    assert_eq!(status(&s), StreamStatus::Live);
}

fn signed_publisher(now: Instant, keyring: &std::sync::Arc<Keyring>) -> PublisherSession<Counters> {
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::ZERO;
    config.keyring = Some(std::sync::Arc::clone(keyring));
    PublisherSession::new(config, new_session_id(1, 7), Counters::default(), now)
}

fn verifying_subscriber(keyring: &std::sync::Arc<Keyring>) -> SubscriberSession<Counters> {
    let mut config = SubscriberConfig::new(1);
    config.keyring = Some(std::sync::Arc::clone(keyring));
    SubscriberSession::new(config)
}

#[test]
fn forged_replayed_and_corrupted_datagrams_are_refused() {
    let now = Instant::now();
    let key = std::sync::Arc::new(Keyring::single(1, [7; 32]));
    let other = std::sync::Arc::new(Keyring::single(1, [8; 32]));
    let mut p = signed_publisher(now, &key);
    let mut forger = signed_publisher(now, &other);
    let mut s = verifying_subscriber(&key);
    for i in 0..20 {
        p.publish(now, CounterDelta::Add(i % 4, 1)).unwrap();
        forger.publish(now, CounterDelta::Add(i % 4, 1000)).unwrap();
    }
    let genuine = drain(&mut p);
    let forged = drain(&mut forger);
    for datagram in &forged {
        s.handle_datagram(now, datagram);
    }
    assert!(s.stream(0).is_none(), "forged datagrams create nothing");
    assert_eq!(s.stats().unauthenticated, forged.len() as u64);
    for datagram in &genuine {
        let mut corrupted = datagram.to_vec();
        let middle = corrupted.len() / 2;
        corrupted[middle] ^= 0x40;
        s.handle_datagram(now, &corrupted);
    }
    assert!(s.stream(0).is_none(), "corrupted datagrams create nothing");
    for datagram in &genuine {
        s.handle_datagram(now, datagram);
    }
    let want = p.state().clone();
    assert_eq!(s.stream(0).unwrap().state, &want);
    for datagram in &genuine {
        s.handle_datagram(now, datagram);
    }
    assert_eq!(s.stats().replayed, genuine.len() as u64);
    assert_eq!(
        s.stats().duplicates,
        0,
        "replays stop before the protocol sees them"
    );
    assert_eq!(s.stream(0).unwrap().state, &want);
    // Unsigned datagrams (a publisher without the key) are refused too.
    let mut unsigned = publisher(now, 2);
    unsigned.publish(now, CounterDelta::Add(9, 9)).unwrap();
    let before = s.stats().unauthenticated;
    for datagram in drain(&mut unsigned) {
        s.handle_datagram(now, &datagram);
    }
    assert!(s.stats().unauthenticated > before);
    assert_eq!(s.stream(0).unwrap().state, &want);
}

#[test]
fn with_the_right_key_everything_converges_through_snapshots() {
    let now = Instant::now();
    let key = std::sync::Arc::new(Keyring::single(3, [1; 32]));
    let mut p = signed_publisher(now, &key);
    for i in 0..50 {
        p.publish(now, CounterDelta::Add(i % 10, 1)).unwrap();
    }
    drain(&mut p);
    // A late joiner: only snapshots, signed by the snapshotter (sender 1).
    let mut config = SnapshotConfig::default();
    config.keyring = Some(std::sync::Arc::clone(&key));
    let mut snapshot = SnapshotSession::new(config);
    let mut s = verifying_subscriber(&key);
    p.publish(now, CounterDelta::Add(0, 1)).unwrap();
    for datagram in drain(&mut p) {
        s.handle_datagram(now, &datagram);
    }
    let mut t = now;
    for _ in 0..20 {
        t += Duration::from_millis(1);
        snapshot.handle_timeout(t, &p);
        while let Some(datagram) = snapshot.poll_transmit() {
            s.handle_datagram(t, &datagram);
        }
    }
    assert_eq!(status(&s), StreamStatus::Live);
    assert_eq!(s.stream(0).unwrap().state, p.state());
    assert_eq!(s.stats().unauthenticated + s.stats().replayed, 0);
}

fn repairing_publisher(now: Instant, ring: usize) -> PublisherSession<Counters> {
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::ZERO;
    config.repair_ring_bytes = ring;
    PublisherSession::new(config, new_session_id(1, 7), Counters::default(), now)
}

fn repairing_subscriber(seed: u64) -> SubscriberSession<Counters> {
    let mut config = SubscriberConfig::new(1);
    config.repair = true;
    config.repair_seed = seed;
    SubscriberSession::new(config)
}

#[test]
fn a_repair_fills_a_short_gap_before_it_is_declared() {
    let now = Instant::now();
    let mut p = repairing_publisher(now, 1 << 20);
    let (mut a, mut b) = (repairing_subscriber(1), repairing_subscriber(2));
    let mut datagrams = Vec::new();
    for i in 0..10 {
        p.publish(now, CounterDelta::Add(i % 3, 1)).unwrap();
        datagrams.extend(drain(&mut p));
    }
    // Both lose the fourth datagram.
    for (i, datagram) in datagrams.iter().enumerate() {
        if i != 3 {
            a.handle_datagram(now, datagram);
            b.handle_datagram(now, datagram);
        }
    }
    // Whoever's random delay ends first asks; the other sees the request and stays quiet.
    let mut t = now;
    let mut requests = Vec::new();
    while requests.is_empty() && t < now + Duration::from_millis(1) {
        t += Duration::from_micros(10);
        for s in [&mut a, &mut b] {
            if let Some(request) = s.poll_repair(t) {
                requests.push(request);
            }
        }
    }
    assert_eq!(requests.len(), 1, "one request");
    for s in [&mut a, &mut b] {
        s.handle_datagram(t, &requests[0]);
        assert!(
            s.poll_repair(t + Duration::from_millis(1)).is_none(),
            "suppressed or sent"
        );
    }
    assert_eq!(a.stats().repairs_requested + b.stats().repairs_requested, 1);
    assert_eq!(
        a.stats().repairs_suppressed + b.stats().repairs_suppressed,
        1
    );
    // The publisher resends from its ring; both fill the hole within the reorder window.
    let request = grapevine_core::wire::Datagram::parse(&requests[0]).unwrap();
    let Some(grapevine_core::wire::Message::RepairRequest { first, last }) =
        request.messages().next()
    else {
        panic!("not a repair request");
    };
    assert_eq!((first, last), (4, 4));
    assert_eq!(p.handle_repair_request(t, first, last), 1);
    for datagram in drain(&mut p) {
        a.handle_datagram(t, &datagram);
        b.handle_datagram(t, &datagram);
    }
    for s in [&mut a, &mut b] {
        s.handle_timeout(t + Duration::from_millis(5));
        assert_eq!(s.stats().gaps, 0);
        assert_eq!(status(s), StreamStatus::Live);
        assert_eq!(s.stream(0).unwrap().state, p.state());
    }
}

#[test]
fn without_the_datagram_in_the_ring_the_gap_goes_to_snapshots() {
    let now = Instant::now();
    // A ring of one datagram: the lost one is gone by the time it is asked for.
    let mut p = repairing_publisher(now, 60);
    let mut s = repairing_subscriber(1);
    let mut datagrams = Vec::new();
    for i in 0..10 {
        p.publish(now, CounterDelta::Add(i % 3, 1)).unwrap();
        datagrams.extend(drain(&mut p));
    }
    for (i, datagram) in datagrams.iter().enumerate() {
        if i != 3 {
            s.handle_datagram(now, datagram);
        }
    }
    let request = s.poll_repair(now + Duration::from_millis(1)).expect("asks");
    let parsed = grapevine_core::wire::Datagram::parse(&request).unwrap();
    let Some(grapevine_core::wire::Message::RepairRequest { first, last }) =
        parsed.messages().next()
    else {
        panic!("not a repair request");
    };
    assert_eq!(p.handle_repair_request(now, first, last), 0);
    assert_eq!(p.stats().repairs_missed, 1);
    s.handle_timeout(now + Duration::from_millis(5));
    assert_eq!(
        s.stats().gaps,
        1,
        "declared lost, recovered by snapshots as before"
    );
}

#[test]
fn repair_floods_stay_within_the_rate() {
    let now = Instant::now();
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::ZERO;
    config.repair_ring_bytes = 1 << 20;
    config.repair_rate = 100_000;
    let mut p = PublisherSession::new(config, new_session_id(1, 7), Counters::default(), now);
    for i in 0..500u32 {
        p.publish(now, CounterDelta::Add((i % 50) as u8, 1))
            .unwrap();
    }
    drain(&mut p);
    let mut resent_bytes = 0usize;
    let mut t = now;
    // 10 000 requests for everything over one simulated second.
    for _ in 0..10_000 {
        t += Duration::from_micros(100);
        p.handle_repair_request(t, 1, 500);
        resent_bytes += drain(&mut p).iter().map(|d| d.len()).sum::<usize>();
    }
    // The rate (100 kB/s) over that second, plus the initial burst.
    assert!(
        resent_bytes <= 100_000 + 10_000,
        "{resent_bytes} bytes resent"
    );
    assert!(
        resent_bytes >= 50_000,
        "{resent_bytes}: requests are still served"
    );
    assert!(p.stats().repairs_refused > 0);
}

#[test]
fn a_late_joiner_repairs_too() {
    let now = Instant::now();
    let initial: Counters = Counters((0..50u8).map(|k| (k, 1)).collect());
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::ZERO;
    config.repair_ring_bytes = 1 << 20;
    let mut p = PublisherSession::new(config, new_session_id(1, 7), initial, now);
    let mut snapshot = SnapshotSession::new(SnapshotConfig::default());
    let mut s = repairing_subscriber(5);
    let mut t = now;
    for _ in 0..5 {
        t += Duration::from_millis(1);
        p.handle_timeout(t);
        for d in drain(&mut p) {
            s.handle_datagram(t, &d);
        }
        snapshot.handle_timeout(t, &p);
        while let Some(d) = snapshot.poll_transmit() {
            s.handle_datagram(t, &d);
        }
    }
    assert_eq!(status(&s), StreamStatus::Live);
    p.publish(t, CounterDelta::Add(1, 1)).unwrap();
    let lost = drain(&mut p);
    p.publish(t, CounterDelta::Add(2, 1)).unwrap();
    for d in drain(&mut p) {
        s.handle_datagram(t, &d);
    }
    assert_eq!(lost.len(), 1);
    let request = s.poll_repair(t + Duration::from_millis(1));
    assert!(request.is_some(), "{:?}", s.stats());
}

/// A replay of an older, validly signed session is refused even after the current one has
/// gone silent: the state cannot be rolled back to a dead session.
#[test]
fn a_signed_old_session_cannot_come_back_after_silence() {
    let now = Instant::now();
    let keyring = std::sync::Arc::new(Keyring::single(1, [7; 32]));
    let signed = |session_ms| {
        let mut config = PublisherConfig::new(1);
        config.flush_delay = Duration::ZERO;
        config.keyring = Some(std::sync::Arc::clone(&keyring));
        PublisherSession::<Counters>::new(
            config,
            new_session_id(session_ms, 7),
            Counters::default(),
            now,
        )
    };
    let (mut dead, mut current) = (signed(1_000), signed(2_000));
    dead.publish(now, CounterDelta::Set(1, 666)).unwrap();
    let recorded = drain(&mut dead);
    // The attacker recorded the dead session's datagrams; this subscriber never saw them.
    let mut s = verifying_subscriber(&keyring);
    current.publish(now, CounterDelta::Set(1, 2)).unwrap();
    for d in drain(&mut current) {
        s.handle_datagram(now, d.as_ref());
    }
    assert_eq!(s.stream(0).unwrap().session, current.session());
    // The current publisher goes quiet for far longer than the publisher timeout...
    let later = now + Duration::from_secs(30);
    s.handle_timeout(later);
    let retired = s.stats().retired_session;
    // ...and the attacker replays the dead session.
    for d in recorded.iter() {
        s.handle_datagram(later, d);
    }
    let view = s.stream(0).unwrap();
    assert_eq!(
        view.session,
        current.session(),
        "rolled back to a dead session"
    );
    assert_eq!(view.state.0.get(&1), Some(&2));
    assert!(s.stats().retired_session > retired);
    assert_eq!(s.stats().restarts, 0);
}

/// Forged publisher ids cannot grow the subscriber without bound: at most `max_streams` are
/// followed, silent ones make room for new ones, and live ones are never pushed out.
#[test]
fn forged_publishers_are_bounded_and_live_ones_kept() {
    let now = Instant::now();
    let mut config = SubscriberConfig::new(1);
    config.max_streams = 64;
    let mut s = SubscriberSession::<Counters>::new(config);
    let mut real = publisher(now, 1);
    real.publish(now, CounterDelta::Set(1, 1)).unwrap();
    for d in drain(&mut real) {
        s.handle_datagram(now, &d);
    }
    let forge = |s: &mut SubscriberSession<Counters>, at: Instant, publisher: u32| {
        let mut builder = DatagramBuilder::new(1400, 1, publisher, new_session_id(5, 1));
        assert!(builder.push_heartbeat(1));
        s.handle_datagram(at, &builder.finish().unwrap());
    };
    for id in 1..10_000 {
        forge(&mut s, now, id);
    }
    assert_eq!(s.streams().count(), 64);
    assert!(s.stats().streams_refused >= 10_000 - 64);
    // The forged ones go silent; the real publisher keeps talking.
    let later = now + Duration::from_secs(10);
    real.publish(later, CounterDelta::Set(1, 2)).unwrap();
    for d in drain(&mut real) {
        s.handle_datagram(later, &d);
    }
    s.handle_timeout(later);
    for id in 10_000..20_000 {
        forge(&mut s, later, id);
    }
    assert_eq!(s.streams().count(), 64);
    assert!(s.stats().streams_evicted >= 63);
    assert_eq!(s.stream(0).unwrap().state.0.get(&1), Some(&2), "kept");
}

/// A publisher that sent 20 000 deltas in full datagrams and keeps them for repairs, resending
/// at most `repair_rate` bytes/s for everyone.
fn busy_publisher(now: Instant, repair_rate: u64) -> PublisherSession<Counters> {
    let mut config = PublisherConfig::new(1);
    config.repair_ring_bytes = 4 << 20;
    config.repair_rate = repair_rate;
    let mut p = PublisherSession::new(config, new_session_id(1, 7), Counters::default(), now);
    for i in 0..20_000u32 {
        p.publish(now, CounterDelta::Add((i % 50) as u8, 1))
            .unwrap();
    }
    p.handle_timeout(now + Duration::from_millis(1));
    drain(&mut p);
    p
}

/// A repair request datagram naming 101 ranges, as an attacker would build it.
fn request_with_ranges(p: &PublisherSession<Counters>, ranges: usize) -> Vec<u8> {
    let one = grapevine_core::wire::repair_request(1, 0, p.session(), 1, 4096).unwrap();
    let header = grapevine_core::wire::DATAGRAM_HEADER_LEN;
    let mut datagram = one[..header].to_vec();
    for _ in 0..ranges {
        datagram.extend_from_slice(&one[header..]);
    }
    datagram[20..22].copy_from_slice(&(ranges as u16).to_be_bytes());
    datagram
}

/// One source flooding requests with many ranges each gets a bounded answer: a few ranges per
/// request, a few datagrams per request, a few requests per second; another source is still
/// answered.
#[test]
fn repair_requests_cost_bounded_work_per_source() {
    use grapevine_core::proto::MAX_RESENT_PER_REQUEST;
    let now = Instant::now();
    let mut p = busy_publisher(now, 1_000_000_000);
    let flood = request_with_ranges(&p, 101);
    let attacker: std::net::IpAddr = [10, 0, 0, 66].into();
    let (mut resent, mut resent_bytes, mut t) = (0usize, 0usize, now);
    for _ in 0..3_000 {
        t += Duration::from_micros(333);
        resent += p.handle_repair_datagram(t, attacker, &flood);
        resent_bytes += drain(&mut p).iter().map(|d| d.len()).sum::<usize>();
    }
    // 50 requests/s after a burst of 20, each answered with at most 32 datagrams, and at
    // most 256 kB/s (after a 64 kB burst) resent for one address.
    assert!(
        resent <= 70 * MAX_RESENT_PER_REQUEST,
        "{resent} datagrams resent for one source"
    );
    assert!(
        resent_bytes <= 64_000 + 256_000 + 1_400,
        "{resent_bytes} B resent"
    );
    let asked = 3_000 * flood.len();
    eprintln!(
        "one source, 3 000 requests of {} B in 1 s: {resent} datagrams ({resent_bytes} B) resent, {:.2}x the request bytes",
        flood.len(),
        resent_bytes as f64 / asked as f64
    );
    assert!(
        resent_bytes <= asked,
        "amplification {:.1}",
        resent_bytes as f64 / asked as f64
    );
    assert!(p.stats().repair_requests_ignored >= 2_900);
    let neighbour: std::net::IpAddr = [10, 0, 0, 7].into();
    assert!(p.handle_repair_datagram(t, neighbour, &flood) > 0);
}

#[test]
fn on_a_keyed_feed_only_signed_repair_requests_are_answered() {
    let now = Instant::now();
    let keyring = std::sync::Arc::new(Keyring::single(1, [7; 32]));
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::ZERO;
    config.repair_ring_bytes = 1 << 20;
    config.keyring = Some(std::sync::Arc::clone(&keyring));
    let mut p = PublisherSession::new(config, new_session_id(1, 7), Counters::default(), now);
    for i in 0..10u8 {
        p.publish(now, CounterDelta::Add(i, 1)).unwrap();
    }
    drain(&mut p);
    let source: std::net::IpAddr = [10, 0, 0, 5].into();
    let unsigned = grapevine_core::wire::repair_request(1, 0, p.session(), 2, 4).unwrap();
    assert_eq!(p.handle_repair_datagram(now, source, &unsigned), 0);
    let stranger = std::sync::Arc::new(Keyring::single(1, [8; 32]));
    let forged = grapevine_core::auth::Signer::new(stranger, grapevine_core::auth::REQUEST_SENDER)
        .sign(&unsigned);
    assert_eq!(p.handle_repair_datagram(now, source, &forged), 0);
    assert_eq!(p.stats().repair_requests_ignored, 2);
    let signed = grapevine_core::auth::Signer::new(keyring, grapevine_core::auth::REQUEST_SENDER)
        .sign(&unsigned);
    assert_eq!(p.handle_repair_datagram(now, source, &signed), 3);
}

/// With a publisher that signs with its own ed25519 key, a subscriber holds only the public
/// key: it cannot sign, so neither a forged datagram nor one with an inflated counter gets in,
/// and the publisher's later datagrams are still taken.
#[test]
fn a_subscriber_cannot_mute_a_publisher_with_its_own_key() {
    let now = Instant::now();
    let secret = std::sync::Arc::new(Keyring::ed25519_secret(1, [5; 32]));
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::ZERO;
    config.keyring = Some(std::sync::Arc::clone(&secret));
    let mut p = PublisherSession::new(config, new_session_id(1, 7), Counters::default(), now);
    let mut subscriber_config = SubscriberConfig::new(1);
    subscriber_config.keyring = Some(std::sync::Arc::new(secret.public_only()));
    let mut s = SubscriberSession::<Counters>::new(subscriber_config);
    p.publish(now, CounterDelta::Set(1, 1)).unwrap();
    for d in drain(&mut p) {
        s.handle_datagram(now, &d);
    }
    // The best a subscriber can do: sign a heartbeat with a huge counter with whatever key it
    // can make, under the publisher's key id.
    let mut forged = DatagramBuilder::new(1400, 1, 0, p.session());
    assert!(forged.push_heartbeat(1));
    let forged = forged.finish().unwrap();
    for attacker in [
        Keyring::single(1, [5; 32]),
        Keyring::ed25519_secret(1, [6; 32]),
    ] {
        let mut signer = grapevine_core::auth::Signer::new(std::sync::Arc::new(attacker), 0);
        for _ in 0..3 {
            let mut inflated = signer.sign(&forged).to_vec();
            // Counter bytes (after key id and sender) set to 10^12.
            let at = inflated.len()
                - if inflated[3] & grapevine_core::auth::FLAG_SIG != 0 {
                    grapevine_core::auth::SIG_TRAILER_LEN
                } else {
                    grapevine_core::auth::AUTH_TRAILER_LEN
                }
                + 2;
            inflated[at..at + 8].copy_from_slice(&1_000_000_000_000u64.to_be_bytes());
            s.handle_datagram(now, &inflated);
        }
    }
    assert_eq!(s.stats().unauthenticated, 6);
    p.publish(now, CounterDelta::Set(1, 2)).unwrap();
    for d in drain(&mut p) {
        s.handle_datagram(now, &d);
    }
    assert_eq!(s.stats().replayed, 0);
    assert_eq!(s.stream(0).unwrap().state.0.get(&1), Some(&2));
}

/// The amplification one address gets from small requests: ten single-range requests per
/// second for ten seconds (the attack that made a publisher resend 1.75 MB/s).
#[test]
fn small_repair_requests_from_one_address_get_a_bounded_answer() {
    let now = Instant::now();
    let mut p = busy_publisher(now, PublisherConfig::new(1).repair_rate);
    let request = grapevine_core::wire::repair_request(1, 0, p.session(), 1, 4096).unwrap();
    let source: std::net::IpAddr = [10, 0, 0, 9].into();
    let (mut resent_bytes, mut t) = (0usize, now);
    for _ in 0..100 {
        t += Duration::from_millis(100);
        p.handle_repair_datagram(t, source, &request);
        resent_bytes += drain(&mut p).iter().map(|d| d.len()).sum::<usize>();
    }
    let asked = 100 * request.len();
    eprintln!(
        "10 requests/s of {} B for 10 s: {:.0} B/s resent ({:.0}x the request bytes)",
        request.len(),
        resent_bytes as f64 / 10.0,
        resent_bytes as f64 / asked as f64
    );
    assert!(
        resent_bytes <= 64_000 + 10 * 256_000 + 1_400,
        "{resent_bytes}"
    );
    assert!(resent_bytes > 0, "requests are still answered");
}

/// Fragmented deltas and fragmented leaves of one session in flight together: each keeps its
/// own fragment id, so none is taken for a duplicate and no gap is declared.
#[test]
fn large_deltas_and_large_leaves_interleave_without_loss() {
    use grapevine_core::state::{KeyedMap, MapDelta};
    type Blobs = KeyedMap<u32, Vec<u8>>;
    let now = Instant::now();
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::ZERO;
    let mut initial = Blobs::default();
    for key in 0..8u32 {
        grapevine_core::state::ReplicatedState::apply(
            &mut initial,
            &MapDelta::Put(key, vec![key as u8; 5_000]),
        );
    }
    let mut p = PublisherSession::new(config, new_session_id(1, 7), initial, now);
    let mut snapshot = SnapshotSession::new(SnapshotConfig::default());
    let mut s: SubscriberSession<Blobs> = SubscriberSession::new(SubscriberConfig::new(1));
    let mut t = now;
    for round in 0..40u32 {
        t += Duration::from_millis(1);
        p.publish(t, MapDelta::Put(round % 8, vec![round as u8; 4_000]))
            .unwrap();
        // Leaves and deltas alternate datagram by datagram, as on a shared group.
        snapshot.handle_timeout(t, &p);
        let deltas: Vec<Bytes> = std::iter::from_fn(|| p.poll_transmit()).collect();
        let leaves: Vec<Bytes> = std::iter::from_fn(|| snapshot.poll_transmit()).collect();
        let mut deltas = deltas.into_iter();
        let mut leaves = leaves.into_iter();
        loop {
            let (d, l) = (deltas.next(), leaves.next());
            if d.is_none() && l.is_none() {
                break;
            }
            for datagram in d.iter().chain(l.iter()) {
                s.handle_datagram(t, datagram);
            }
        }
        s.handle_timeout(t);
    }
    assert!(p.stats().fragmented >= 40, "the deltas were fragmented");
    assert!(snapshot.stats().leaves >= 8, "leaves were sent");
    let stats = s.stats();
    assert_eq!(stats.gaps, 0, "no delta was taken for lost: {stats:?}");
    assert_eq!(stats.fragments_dropped, 0);
    assert_eq!(s.stream(0).unwrap().status, StreamStatus::Live);
    assert_eq!(s.stream(0).unwrap().state, p.state());
}

/// A stream cut off (publisher stopped, or a link on the way down) says so in its view, and
/// stops saying so with the next datagram.
#[test]
fn a_silent_publisher_shows_in_the_view_until_it_is_heard_again() {
    let now = Instant::now();
    let mut p = publisher(now, 1);
    let mut s = subscriber();
    p.publish(now, CounterDelta::Add(1, 1)).unwrap();
    for datagram in drain(&mut p) {
        s.handle_datagram(now, &datagram);
    }
    assert!(!s.stream(0).unwrap().silent);
    let timeout = s.config().publisher_timeout;
    s.handle_timeout(now + timeout / 2);
    assert!(!s.stream(0).unwrap().silent, "not before the timeout");
    let later = now + timeout + Duration::from_millis(1);
    s.handle_timeout(later);
    let view = s.stream(0).unwrap();
    assert!(view.silent);
    assert_eq!(
        view.status,
        StreamStatus::Live,
        "its state is still what it last knew"
    );
    p.publish(later, CounterDelta::Add(1, 1)).unwrap();
    for datagram in drain(&mut p) {
        s.handle_datagram(later, &datagram);
    }
    assert!(!s.stream(0).unwrap().silent);
}
