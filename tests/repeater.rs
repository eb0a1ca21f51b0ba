//! Two repeaters on loopback join two groups that do not see each other: a subscriber on the
//! second converges to a publisher on the first, and recovers after the link is cut.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use grapevine::core::net::MulticastConfig;
use grapevine::core::state::{digest, KeyedMap, MapDelta};
use grapevine::core::StreamStatus;
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::repeater::{Repeater, RepeaterOptions};
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
