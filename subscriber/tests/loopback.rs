//! Publisher, snapshotter and subscribers on real sockets, loopback multicast.
//! Each test uses its own group and port so they can run in parallel.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use grapevine_core::net::MulticastConfig;
use grapevine_core::proto::{StreamStatus, SubscriberEvent};
use grapevine_core::sim::{CounterDelta, Counters};
use grapevine_core::state::{digest, ReplicatedState};
use grapevine_publisher::{Publisher, PublisherOptions};
use grapevine_snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine_subscriber::{Subscriber, SubscriberOptions};

const TOPIC: u32 = 5;
const WAIT: Duration = Duration::from_secs(10);

fn group(last: u8) -> MulticastConfig {
    MulticastConfig::new(SocketAddr::from((
        [239, 255, 72, last],
        47_200 + u16::from(last),
    )))
}

fn start_publisher(live: &MulticastConfig, id: u32, initial: Counters) -> Publisher<Counters> {
    let mut options = PublisherOptions::new(TOPIC, live.clone());
    options.session.publisher = id;
    options.session.heartbeat_interval = Duration::from_millis(20);
    Publisher::start(options, initial).unwrap()
}

fn start_snapshotter(publisher: &Publisher<Counters>, on: &MulticastConfig) -> Snapshotter {
    Snapshotter::start(publisher, SnapshotterOptions::new(on.clone())).unwrap()
}

fn subscribe(live: &MulticastConfig) -> Subscriber<Counters> {
    Subscriber::join(SubscriberOptions::new(TOPIC, live.clone())).unwrap()
}

fn publish_counts(publisher: &Publisher<Counters>, n: u32) {
    for i in 0..n {
        let key = (i % 50) as u8;
        let delta = if i % 17 == 0 {
            CounterDelta::Remove(key)
        } else {
            CounterDelta::Add(key, i64::from(i))
        };
        publisher.publish(delta).unwrap();
    }
    publisher.flush();
}

/// Waits until the subscriber's stream of `id` holds exactly the publisher's state.
fn wait_converged(subscriber: &Subscriber<Counters>, publisher: &Publisher<Counters>, id: u32) {
    let want = publisher.read(digest);
    let session = publisher.session_id();
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let done = subscriber.read(|s| {
            s.stream(id).is_some_and(|v| {
                v.status == StreamStatus::Live && v.session == session && digest(v.state) == want
            })
        });
        if done {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let summary = subscriber.read(|s| {
        s.streams()
            .map(|v| {
                format!(
                    "{} {:?} seq {} stale {}",
                    v.publisher,
                    v.status,
                    v.last_seq,
                    v.stale.len()
                )
            })
            .collect::<Vec<_>>()
    });
    panic!(
        "not converged within {WAIT:?}: {summary:?}, stats {:?}",
        subscriber.stats()
    );
}

#[test]
fn live_subscriber_applies_every_delta() {
    let live = group(1);
    let subscriber = subscribe(&live);
    let publisher = start_publisher(&live, 0, Counters::default());
    let _snapshots = start_snapshotter(&publisher, &live);
    publish_counts(&publisher, 2_000);
    wait_converged(&subscriber, &publisher, 0);
    let stats = subscriber.stats().protocol;
    assert_eq!(stats.gaps, 0, "no loss on loopback at this rate");
    assert_eq!(stats.deltas_applied + stats.superseded, 2_000);
}

#[test]
fn late_joiner_catches_up_from_snapshots() {
    let live = group(2);
    let publisher = start_publisher(&live, 0, Counters::default());
    let _snapshots = start_snapshotter(&publisher, &live);
    publish_counts(&publisher, 3_000);
    let subscriber = subscribe(&live);
    wait_converged(&subscriber, &publisher, 0);
    assert!(subscriber.stats().protocol.snapshot_replaced > 0);
    // And it keeps up with what follows.
    publish_counts(&publisher, 500);
    wait_converged(&subscriber, &publisher, 0);
}

#[test]
fn a_requested_cycle_does_not_wait_for_the_pause() {
    let live = group(11);
    let publisher = start_publisher(&live, 0, Counters::default());
    let mut options = SnapshotterOptions::new(live.clone());
    options.snapshot.cycle_pause = Duration::from_secs(60);
    let snapshots = Snapshotter::start(&publisher, options).unwrap();
    publish_counts(&publisher, 1_000);
    // Let the first cycle end, so that the snapshotter sits in its minute-long pause.
    let deadline = Instant::now() + WAIT;
    while snapshots.stats().cycles == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let subscriber = subscribe(&live);
    publish_counts(&publisher, 10);
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        !subscriber.is_live(),
        "a late joiner cannot be live before a cycle"
    );
    snapshots.request_cycle();
    wait_converged(&subscriber, &publisher, 0);
    assert_eq!(snapshots.stats().requested, 1);
    assert_eq!(snapshots.stats().cycles, 2);
}

fn start_ab(a: &MulticastConfig, b: &MulticastConfig) -> (Publisher<Counters>, Snapshotter) {
    let mut options = PublisherOptions::new(TOPIC, a.clone());
    options.secondary = Some(b.clone());
    options.session.heartbeat_interval = Duration::from_millis(20);
    let publisher = Publisher::start(options, Counters::default()).unwrap();
    let mut snapshots = SnapshotterOptions::new(a.clone());
    snapshots.secondary = Some(b.clone());
    let snapshotter = Snapshotter::start(&publisher, snapshots).unwrap();
    (publisher, snapshotter)
}

fn subscribe_ab(
    a: &MulticastConfig,
    b: &MulticastConfig,
    loss_a: f64,
    loss_b: f64,
) -> Subscriber<Counters> {
    let mut options = SubscriberOptions::new(TOPIC, a.clone());
    options.secondary = Some(b.clone());
    options.inject_loss = loss_a;
    options.inject_loss_secondary = loss_b;
    // The B copy may come a scheduling slice after the next A datagram on a busy machine.
    options.session.reorder_window = Duration::from_millis(50);
    Subscriber::join(options).unwrap()
}

#[test]
fn a_loss_on_one_feed_of_an_ab_pair_is_no_gap() {
    let (a, b) = (group(12), group(13));
    let subscriber = subscribe_ab(&a, &b, 0.3, 0.0);
    let (publisher, _snapshots) = start_ab(&a, &b);
    publish_counts(&publisher, 3_000);
    wait_converged(&subscriber, &publisher, 0);
    let stats = subscriber.stats().protocol;
    assert_eq!(stats.gaps, 0, "{stats:?}");
    // Both feeds were read: the copies that arrived second were dropped as duplicates (they
    // may still be on their way when the state has converged).
    let deadline = Instant::now() + WAIT;
    while subscriber.stats().protocol.duplicates == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = subscriber.stats().protocol;
    assert!(stats.duplicates > 0, "both feeds delivered: {stats:?}");
}

#[test]
fn a_loss_on_both_feeds_recovers() {
    let (a, b) = (group(14), group(15));
    let subscriber = subscribe_ab(&a, &b, 0.3, 0.3);
    let (publisher, _snapshots) = start_ab(&a, &b);
    publish_counts(&publisher, 3_000);
    wait_converged(&subscriber, &publisher, 0);
    assert!(subscriber.stats().protocol.gaps > 0);
}

#[test]
fn signed_feeds_need_the_right_key() {
    use grapevine_core::auth::Keyring;
    use std::sync::Arc;
    let live = group(16);
    let key = Arc::new(Keyring::single(1, [42; 32]));
    let mut options = PublisherOptions::new(TOPIC, live.clone());
    options.session.keyring = Some(Arc::clone(&key));
    options.session.heartbeat_interval = Duration::from_millis(20);
    let publisher = Publisher::start(options, Counters::default()).unwrap();
    let mut snapshots = SnapshotterOptions::new(live.clone());
    snapshots.snapshot.keyring = Some(Arc::clone(&key));
    let _snapshots = Snapshotter::start(&publisher, snapshots).unwrap();
    let join = |keyring: Option<Arc<Keyring>>| {
        let mut options = SubscriberOptions::new(TOPIC, live.clone());
        options.session.keyring = keyring;
        Subscriber::<Counters>::join(options).unwrap()
    };
    let right = join(Some(Arc::clone(&key)));
    let wrong = join(Some(Arc::new(Keyring::single(1, [43; 32]))));
    let none = join(None);
    publish_counts(&publisher, 2_000);
    wait_converged(&right, &publisher, 0);
    wait_converged(&none, &publisher, 0);
    let refused = wrong.stats().protocol;
    assert!(refused.unauthenticated > 0, "{refused:?}");
    assert_eq!(refused.deltas_applied, 0);
    assert!(
        wrong.read(|s| s.streams().count() == 0),
        "nothing from a wrong key"
    );
    assert_eq!(right.stats().protocol.unauthenticated, 0);
}

fn repair_pair(
    live: &MulticastConfig,
    repair: &MulticastConfig,
    ring: usize,
) -> (Publisher<Counters>, Snapshotter, Subscriber<Counters>) {
    let mut options = SubscriberOptions::new(TOPIC, live.clone());
    options.repair = Some(repair.clone());
    // Room for the request's round trip on a busy machine: CI lost a run
    // to a repair that took longer than the 2 ms default while every test
    // binary shared two cores.
    options.session.reorder_window = Duration::from_millis(100);
    let subscriber = Subscriber::join(options).unwrap();
    let mut options = PublisherOptions::new(TOPIC, live.clone());
    options.repair = Some(repair.clone());
    options.session.repair_ring_bytes = ring;
    options.session.heartbeat_interval = Duration::from_millis(20);
    let publisher = Publisher::start(options, Counters::default()).unwrap();
    let snapshots = start_snapshotter(&publisher, live);
    (publisher, snapshots, subscriber)
}

#[test]
fn a_lost_datagram_is_repaired_without_a_gap() {
    let (live, repair) = (group(17), group(18));
    let (publisher, _snapshots, subscriber) = repair_pair(&live, &repair, 1 << 20);
    publish_counts(&publisher, 500);
    wait_converged(&subscriber, &publisher, 0);
    for _ in 0..5 {
        subscriber.inject_drop(3);
        publish_counts(&publisher, 200);
        wait_converged(&subscriber, &publisher, 0);
    }
    let stats = subscriber.stats().protocol;
    assert!(stats.repairs_requested >= 1, "{stats:?}");
    assert!(publisher.stats().repaired >= 1);
    assert_eq!(stats.gaps, 0, "every hole filled in time: {stats:?}");
}

#[test]
fn an_unanswerable_repair_falls_back_to_snapshots() {
    let (live, repair) = (group(19), group(20));
    // A ring too small to hold anything useful.
    let (publisher, _snapshots, subscriber) = repair_pair(&live, &repair, 1);
    publish_counts(&publisher, 500);
    wait_converged(&subscriber, &publisher, 0);
    subscriber.inject_drop(20);
    publish_counts(&publisher, 2_000);
    wait_converged(&subscriber, &publisher, 0);
    let stats = subscriber.stats().protocol;
    assert!(stats.gaps >= 1 && stats.recoveries >= 1, "{stats:?}");
}

#[test]
fn a_flood_of_repair_requests_stays_within_the_repair_rate() {
    let (live, repair) = (group(21), group(22));
    let mut options = PublisherOptions::new(TOPIC, live.clone());
    options.repair = Some(repair.clone());
    options.session.repair_rate = 200_000;
    let publisher = Publisher::start(options, Counters::default()).unwrap();
    publish_counts(&publisher, 5_000);
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.set_multicast_loop_v4(true).unwrap();
    let request =
        grapevine_core::wire::repair_request(TOPIC, 0, publisher.session_id(), 1, 4_096).unwrap();
    let started = Instant::now();
    let before = publisher.stats().repaired_bytes;
    let mut sent = 0;
    while started.elapsed() < Duration::from_secs(1) {
        for _ in 0..100 {
            let _ = raw.send_to(&request, repair.group);
            sent += 1;
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(100));
    let resent = publisher.stats().repaired_bytes - before;
    let elapsed = started.elapsed().as_secs_f64();
    let bound = 200_000.0 * elapsed + 10_000.0 + 1_400.0 * 4.0;
    assert!(sent > 10_000, "a flood: {sent} requests");
    assert!(resent > 0, "requests are answered");
    assert!(
        (resent as f64) <= bound,
        "{resent} bytes resent in {elapsed:.2} s, bound {bound:.0}"
    );
}

#[test]
fn publisher_restart_is_detected_and_rebuilt() {
    let live = group(3);
    let subscriber = subscribe(&live);
    let first = start_publisher(&live, 0, Counters::default());
    let snapshots = start_snapshotter(&first, &live);
    publish_counts(&first, 1_000);
    wait_converged(&subscriber, &first, 0);
    let old_session = first.session_id();
    drop(snapshots);
    first.shutdown();

    let restarted_state: Counters = Counters([(1u8, 111i64), (2, 222)].into_iter().collect());
    let second = start_publisher(&live, 0, restarted_state);
    let _snapshots = start_snapshotter(&second, &live);
    publish_counts(&second, 100);
    wait_converged(&subscriber, &second, 0);
    let restarted = subscriber.events().try_iter().any(|e| {
        matches!(e, SubscriberEvent::PublisherRestarted { old_session: o, .. } if o == old_session)
    });
    assert!(
        restarted,
        "a PublisherRestarted event names the old session"
    );
    assert_eq!(subscriber.stats().protocol.restarts, 1);
}

#[test]
fn receiver_loss_recovers() {
    let live = group(4);
    let mut options = SubscriberOptions::new(TOPIC, live.clone());
    options.inject_loss = 0.2;
    let subscriber = Subscriber::<Counters>::join(options).unwrap();
    let publisher = start_publisher(&live, 0, Counters::default());
    let _snapshots = start_snapshotter(&publisher, &live);
    for _ in 0..20 {
        publish_counts(&publisher, 200);
        std::thread::sleep(Duration::from_millis(5));
    }
    wait_converged(&subscriber, &publisher, 0);
    let stats = subscriber.stats().protocol;
    assert!(stats.gaps > 0 && stats.messages_lost > 0, "{stats:?}");
    assert!(stats.recoveries >= 1);
}

#[test]
fn several_publishers_on_one_topic() {
    let live = group(5);
    let subscriber = subscribe(&live);
    let a = start_publisher(&live, 1, Counters::default());
    let b = start_publisher(&live, 2, Counters::default());
    let _sa = start_snapshotter(&a, &live);
    let _sb = start_snapshotter(&b, &live);
    publish_counts(&a, 300);
    b.publish(CounterDelta::Set(9, -9)).unwrap();
    b.flush();
    wait_converged(&subscriber, &a, 1);
    wait_converged(&subscriber, &b, 2);
    let b_state = subscriber.snapshot(2).unwrap();
    assert_eq!(b_state.0.get(&9), Some(&-9));
    assert_eq!(b_state.len(), 1, "streams are kept apart");
}

#[test]
fn malformed_datagrams_are_counted_and_ignored() {
    let live = group(6);
    let subscriber = subscribe(&live);
    let publisher = start_publisher(&live, 0, Counters::default());
    let _snapshots = start_snapshotter(&publisher, &live);
    let raw = UdpSocket::bind("127.0.0.1:0").unwrap();
    raw.set_multicast_loop_v4(true).unwrap();
    let garbage: Vec<Vec<u8>> = vec![
        vec![],
        b"hello".to_vec(),
        b"GV\x09\x00....................".to_vec(),
        // A valid header claiming 200 messages that are not there.
        {
            let mut d = b"GV\x01\x00".to_vec();
            d.extend_from_slice(&TOPIC.to_be_bytes());
            d.extend_from_slice(&[0; 12]);
            d.extend_from_slice(&[0, 200, 0, 0]);
            d
        },
        vec![0xff; 1400],
    ];
    for round in 0..10 {
        publish_counts(&publisher, 50);
        for bytes in &garbage {
            raw.send_to(bytes, live.group).unwrap();
        }
        if round == 5 {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    wait_converged(&subscriber, &publisher, 0);
    // The last garbage may still be in flight when the state converges.
    let deadline = Instant::now() + WAIT;
    while subscriber.stats().protocol.malformed < 50 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    let stats = subscriber.stats().protocol;
    assert_eq!(stats.malformed, 50, "{stats:?}");
    assert_eq!(stats.gaps, 0, "garbage costs nothing");
}

#[test]
fn recovery_group_is_joined_while_recovering() {
    let live = group(7);
    let recovery = group(8);
    let publisher = start_publisher(&live, 0, Counters::default());
    let _snapshots = start_snapshotter(&publisher, &recovery);
    publish_counts(&publisher, 1_000);
    let mut options = SubscriberOptions::new(TOPIC, live.clone());
    options.recovery = Some(recovery.clone());
    let subscriber = Subscriber::<Counters>::join(options).unwrap();
    publish_counts(&publisher, 10);
    wait_converged(&subscriber, &publisher, 0);
    let stats = subscriber.stats();
    assert!(stats.recovery_joins >= 1);
    assert!(
        stats.protocol.snapshot_replaced > 0,
        "the state came from the recovery group"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn async_event_stream_reports_live() {
    let live = group(9);
    let (subscriber, mut events) =
        Subscriber::<Counters>::join_async(SubscriberOptions::new(TOPIC, live.clone())).unwrap();
    let publisher = start_publisher(&live, 0, Counters::default());
    let _snapshots = start_snapshotter(&publisher, &live);
    publisher.publish(CounterDelta::Set(1, 1)).unwrap();
    publisher.flush();
    let live_event = tokio::time::timeout(WAIT, async {
        while let Some(event) = events.recv().await {
            if let SubscriberEvent::Live { publisher: 0, .. } = event {
                return true;
            }
        }
        false
    })
    .await
    .expect("a Live event within the timeout");
    assert!(live_event);
    drop(subscriber);
}

#[test]
fn inline_subscriber_replicates_on_the_callers_thread() {
    let live = group(10);
    let mut subscriber = grapevine_subscriber::InlineSubscriber::<Counters>::join(
        SubscriberOptions::new(TOPIC, live.clone()),
    )
    .unwrap();
    let publisher = start_publisher(&live, 0, Counters::default());
    let _snapshots = start_snapshotter(&publisher, &live);
    publish_counts(&publisher, 500);
    let want = publisher.read(digest);
    let deadline = Instant::now() + WAIT;
    let mut applied = 0;
    while Instant::now() < deadline {
        applied += subscriber
            .poll(Duration::from_millis(10))
            .filter(|e| matches!(e, SubscriberEvent::Applied { .. }))
            .count();
        let session = subscriber.session();
        if session.is_live() && session.stream(0).is_some_and(|v| digest(v.state) == want) {
            break;
        }
    }
    assert!(subscriber.session().is_live());
    assert_eq!(applied, 500, "every delta applied, reported as an event");
}

/// A flow-controlled stream of 1 KiB deltas, one per datagram, published from the caller's
/// thread while the publisher's own thread flushes and sends heartbeats: every message the
/// kernel delivered is applied. (Two threads used to send what they had drained from the
/// session in whatever order they got the CPU, and a subscriber took the reordering for loss.)
#[test]
fn flow_controlled_kilobyte_deltas_lose_nothing_the_kernel_delivered() {
    use grapevine_core::state::{KeyedMap, MapDelta};
    type Blobs = KeyedMap<u32, Vec<u8>>;
    let live = group(23);
    let mut options = SubscriberOptions::new(TOPIC, live.clone());
    options.session.emit_applied = false;
    // In order, a gap is only seen once a later datagram is read, however slow the reader: a
    // short window then only makes reordering by the sender show.
    options.session.reorder_window = Duration::from_millis(1);
    let subscriber = Subscriber::<Blobs>::join(options).unwrap();
    let mut publisher_options = PublisherOptions::new(TOPIC, live);
    publisher_options.session.heartbeat_interval = Duration::from_millis(5);
    let publisher = Publisher::start(publisher_options, Blobs::default()).unwrap();
    let payload = vec![7u8; 1024];
    const WINDOW: u64 = 1_000;
    const TOTAL: u64 = 300_000;
    let started = Instant::now();
    let mut sent = 0u64;
    while sent < TOTAL && started.elapsed() < Duration::from_secs(8) {
        if sent.saturating_sub(subscriber.processed()) > WINDOW {
            publisher.flush();
            std::thread::yield_now();
            continue;
        }
        let batch = (0..100u32).map(|i| MapDelta::Put(i % 512, payload.clone()));
        publisher.publish_all(batch).unwrap();
        sent += 100;
    }
    publisher.flush();
    let deadline = Instant::now() + WAIT;
    while subscriber.processed() + subscriber.stats().protocol.messages_lost < sent
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let stats = subscriber.stats();
    assert!(sent >= 10_000, "the run published something: {sent}");
    assert!(
        stats.protocol.messages_lost <= stats.kernel_drops,
        "{} messages counted lost with {} datagrams dropped by the kernel ({} sent, {} applied)",
        stats.protocol.messages_lost,
        stats.kernel_drops,
        sent,
        subscriber.processed()
    );
    assert_eq!(publisher.send_errors(), 0);
}

#[test]
fn caught_up_waits_for_the_seq_and_no_longer() {
    let live = group(24);
    let mut options = SubscriberOptions::new(TOPIC, live.clone()).with_injected_loss(0.1);
    options.session.emit_applied = false;
    let subscriber = Subscriber::<Counters>::join(options).unwrap();
    let publisher = start_publisher(&live, 3, Counters::default());
    let _snapshots = start_snapshotter(&publisher, &live);
    let mut progress = subscriber.watch_progress();
    let mut last = 0;
    for i in 0..2_000u32 {
        last = publisher
            .publish(CounterDelta::Add((i % 50) as u8, i64::from(i)))
            .unwrap();
    }
    publisher.flush();
    // A seq the publisher has not reached: the wait ends at its timeout, false.
    let started = Instant::now();
    assert!(!subscriber.wait_caught_up(3, last + 1, Duration::from_millis(300)));
    assert!(started.elapsed() >= Duration::from_millis(300));
    // Another publisher id is not this one's stream.
    assert!(!subscriber.wait_caught_up(4, 1, Duration::from_millis(50)));
    assert!(
        subscriber.wait_caught_up(3, last, WAIT),
        "{:?}",
        subscriber.progress()
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    assert!(runtime.block_on(subscriber.caught_up(3, last)));
    assert!(runtime.block_on(progress.changed()));
    let now = subscriber.progress();
    let stream = now.stream(3).unwrap();
    assert!(stream.caught_up_to(last) && !stream.caught_up_to(last + 1));
    assert_eq!(subscriber.publishers(), vec![3]);
    let replica = subscriber.replica(3).unwrap();
    assert_eq!(replica.progress.status, StreamStatus::Live);
    assert!(replica.stale.is_empty());
    assert_eq!(
        digest(&replica.state),
        publisher.read(digest),
        "caught up means equal"
    );
    let expected = publisher.read(|s| s.leaf(&49).cloned()).unwrap();
    assert_eq!(subscriber.leaf(3, &49), Some((expected, true)));
    // The next delta is not there until it is published.
    let pending = runtime.block_on(async {
        tokio::time::timeout(
            Duration::from_millis(100),
            subscriber.caught_up(3, last + 1),
        )
        .await
    });
    assert!(pending.is_err(), "caught up to a seq never published");
    let next = publisher.publish(CounterDelta::Remove(7)).unwrap();
    publisher.flush();
    assert!(runtime.block_on(async {
        tokio::time::timeout(WAIT, subscriber.caught_up(3, next))
            .await
            .unwrap_or(false)
    }));
    let stats = subscriber.stats().protocol;
    assert_eq!(stats.joins, 1, "joining is not a recovery: {stats:?}");
}

/// A producer that holds its deltas encoded publishes them as they are; subscribers get the same
/// state as from typed deltas, and bytes that are not a delta are refused at the publisher.
#[test]
fn pre_encoded_deltas_replicate_like_typed_ones_and_garbage_is_refused() {
    let live = group(25);
    let subscriber = subscribe(&live);
    let publisher = start_publisher(&live, 0, Counters::default());
    let _snapshots = start_snapshotter(&publisher, &live);
    let encoded: Vec<Vec<u8>> = (0..1_000u32)
        .map(|i| {
            let mut bytes = Vec::new();
            grapevine_core::codec::encode_into(
                &CounterDelta::Add((i % 40) as u8, i64::from(i)),
                &mut bytes,
            )
            .unwrap();
            bytes
        })
        .collect();
    let last = publisher
        .publish_encoded(encoded.iter().map(Vec::as_slice))
        .unwrap();
    assert_eq!(last, 1_000);
    let before = publisher.read(digest);
    let refused = publisher.publish_encoded([&[0xff_u8, 0xff, 0xff][..]]);
    assert!(
        matches!(
            refused,
            Err(grapevine_publisher::PublisherError::Publish(
                grapevine_core::proto::PublishError::Decode(_)
            ))
        ),
        "{refused:?}"
    );
    assert_eq!(publisher.read(digest), before, "the state is unchanged");
    publisher.flush();
    wait_converged(&subscriber, &publisher, 0);
    let mut typed = Counters::default();
    for i in 0..1_000u32 {
        typed.apply(&CounterDelta::Add((i % 40) as u8, i64::from(i)));
    }
    assert_eq!(publisher.read(digest), digest(&typed));
    assert_eq!(subscriber.stats().protocol.gaps, 0);
}
