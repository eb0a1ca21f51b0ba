//! Two repeaters on loopback join two groups that do not see each other: a subscriber on the
//! second converges to a publisher on the first, and recovers after the link is cut.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use grapevine::core::net::MulticastConfig;
use grapevine::core::state::{digest, KeyedMap, MapDelta};
use grapevine::core::StreamStatus;
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::repeater::{Repeater, RepeaterOptions, LOOP_MEMORY};
use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine::subscriber::{Subscriber, SubscriberOptions};

type Map = KeyedMap<u32, u64>;

fn converged(subscriber: &Subscriber<Map>, publisher: &Publisher<Map>, within: Duration) -> bool {
    let started = Instant::now();
    while started.elapsed() < within {
        let want = publisher.read(digest);
        let session = publisher.session_id();
        let done = subscriber.read(|s| {
            s.stream(0).is_some_and(|v| {
                v.status == StreamStatus::Live && v.session == session && digest(v.state) == want
            })
        });
        if done {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[test]
fn a_repeater_pair_carries_a_stream_between_two_groups() {
    let near = MulticastConfig::new("239.255.73.40:47340".parse().unwrap());
    let far = MulticastConfig::new("239.255.73.41:47341".parse().unwrap());
    let (a_addr, b_addr): (SocketAddr, SocketAddr) = (
        "127.0.0.1:47342".parse().unwrap(),
        "127.0.0.1:47343".parse().unwrap(),
    );
    let _a = Repeater::start(RepeaterOptions::new(near.clone(), a_addr, vec![b_addr])).unwrap();
    let b = Repeater::start(RepeaterOptions::new(far.clone(), b_addr, vec![a_addr])).unwrap();
    let subscriber = Subscriber::<Map>::join(SubscriberOptions::new(1, far.clone())).unwrap();
    let publisher =
        Publisher::start(PublisherOptions::new(1, near.clone()), Map::default()).unwrap();
    let _snapshots = Snapshotter::start(&publisher, SnapshotterOptions::new(near.clone())).unwrap();
    for i in 0..2_000u32 {
        publisher
            .publish(MapDelta::Put(i % 100, u64::from(i)))
            .unwrap();
    }
    publisher.flush();
    assert!(
        converged(&subscriber, &publisher, Duration::from_secs(10)),
        "{:?}",
        b.stats()
    );
    assert!(b.stats().relayed_in > 0);
    assert!(b.stats().peers_up >= 1, "keepalives: {:?}", b.stats());
    assert_eq!(subscriber.stats().protocol.gaps, 0, "no loss on loopback");

    // The link is cut (B goes away) while updates go on; once it is back, the far side
    // recovers from the snapshots the repeaters carry too.
    drop(b);
    for i in 0..2_000u32 {
        publisher
            .publish(MapDelta::Put(i % 150, u64::from(i) * 3))
            .unwrap();
    }
    publisher.flush();
    std::thread::sleep(Duration::from_millis(200));
    let b = Repeater::start(RepeaterOptions::new(far.clone(), b_addr, vec![a_addr])).unwrap();
    assert!(
        converged(&subscriber, &publisher, Duration::from_secs(10)),
        "{:?}",
        b.stats()
    );
    assert!(
        subscriber.stats().protocol.gaps >= 1,
        "the cut was seen as a gap"
    );
}

/// Copies of each delta datagram seen, and every data datagram counted.
type Counted = (std::collections::HashMap<Vec<u8>, usize>, u64);

/// Counts, on one group, how many times each delta datagram was multicast and how many data
/// datagrams arrived at all (hellos and other probes aside).
struct GroupCounter {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Counted>>,
}

impl GroupCounter {
    fn start(group: &MulticastConfig) -> Self {
        use grapevine::core::net::{MulticastSocket, RecvBatch};
        use grapevine::core::wire::{Datagram, Message};
        let socket = MulticastSocket::receiver(group).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopping = std::sync::Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let mut copies = std::collections::HashMap::new();
            let mut data = 0u64;
            let mut batch = RecvBatch::new(32, 2048);
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stopping.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline
            {
                let n = socket
                    .recv_batch(&mut batch, Duration::from_millis(20))
                    .unwrap();
                for bytes in batch.datagrams().take(n) {
                    let Ok(datagram) = Datagram::parse(bytes) else {
                        continue;
                    };
                    if datagram.is_probe() {
                        continue;
                    }
                    data += 1;
                    if matches!(datagram.messages().next(), Some(Message::Delta { .. })) {
                        *copies.entry(bytes.to_vec()).or_insert(0) += 1;
                    }
                }
            }
            (copies, data)
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> Counted {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.take().unwrap().join().unwrap()
    }
}

/// Two groups joined by four repeaters, each peered with both remote ones (what DHT discovery
/// builds): one forwarder per network, every delta datagram multicast exactly once on each
/// network, no echo, and silence once the publisher stops.
#[test]
fn a_full_mesh_of_repeaters_delivers_each_datagram_once_and_does_not_storm() {
    let near = MulticastConfig::new("239.255.73.50:47350".parse().unwrap());
    let far = MulticastConfig::new("239.255.73.51:47351".parse().unwrap());
    let addr = |port: u16| -> SocketAddr { SocketAddr::from(([127, 0, 0, 1], port)) };
    let (a2, a3, b3, b4) = (addr(47352), addr(47353), addr(47354), addr(47355));
    let start = |group: &MulticastConfig, listen, peers: Vec<SocketAddr>| {
        Repeater::start(RepeaterOptions::new(group.clone(), listen, peers)).unwrap()
    };
    let repeaters = [
        start(&near, a2, vec![b3, b4]),
        start(&near, a3, vec![b3, b4]),
        start(&far, b3, vec![a2, a3]),
        start(&far, b4, vec![a2, a3]),
    ];
    // Wait for the elections and the keepalives: one forwarder per network, all peers up.
    let settled_by = Instant::now() + Duration::from_secs(10);
    let settled = || {
        let stats: Vec<_> = repeaters.iter().map(Repeater::stats).collect();
        stats
            .iter()
            .all(|s| s.peers_up == 2 && s.neighbours == 1 && s.targets == 1)
            && stats[..2].iter().filter(|s| s.forwarder).count() == 1
            && stats[2..].iter().filter(|s| s.forwarder).count() == 1
    };
    while !settled() {
        assert!(
            Instant::now() < settled_by,
            "{:?}",
            repeaters.iter().map(Repeater::stats).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let on_near = GroupCounter::start(&near);
    let on_far = GroupCounter::start(&far);
    let subscriber = Subscriber::<Map>::join(SubscriberOptions::new(1, far.clone())).unwrap();
    let mut options = PublisherOptions::new(1, near.clone());
    options.session.flush_delay = Duration::ZERO;
    let publisher = Publisher::start(options, Map::default()).unwrap();
    for i in 0..500u32 {
        publisher
            .publish(MapDelta::Put(i % 50, u64::from(i)))
            .unwrap();
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert!(
        converged(&subscriber, &publisher, Duration::from_secs(10)),
        "{:?}",
        repeaters.iter().map(Repeater::stats).collect::<Vec<_>>()
    );
    drop(publisher);
    // Within a keepalive period of the publisher stopping, nothing moves any more.
    std::thread::sleep(LOOP_MEMORY + Duration::from_millis(500));
    let quiet_near = GroupCounter::start(&near);
    let quiet_far = GroupCounter::start(&far);
    std::thread::sleep(Duration::from_secs(1));
    let (_, stray_near) = quiet_near.finish();
    let (_, stray_far) = quiet_far.finish();
    let (near_copies, _) = on_near.finish();
    let (far_copies, _) = on_far.finish();
    let stats: Vec<_> = repeaters.iter().map(Repeater::stats).collect();
    assert_eq!(
        near_copies.len(),
        500,
        "every delta datagram seen on its own network"
    );
    assert_eq!(far_copies.len(), 500, "and on the far one: {stats:?}");
    assert_eq!(
        near_copies.values().max(),
        Some(&1),
        "no echo on the publisher's network: {stats:?}"
    );
    assert_eq!(
        far_copies.values().max(),
        Some(&1),
        "one copy per datagram on the far network: {stats:?}"
    );
    assert_eq!(
        (stray_near, stray_far),
        (0, 0),
        "traffic stopped: {stats:?}"
    );
    assert!(stats.iter().map(|s| s.relayed_out).sum::<u64>() >= 500);
}
