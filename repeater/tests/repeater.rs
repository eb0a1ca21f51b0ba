//! Two repeaters on loopback join two groups that do not see each other: a subscriber on the
//! second converges to a publisher on the first, and recovers after the link is cut.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use grapevine_core::auth::Keyring;
use grapevine_core::net::MulticastConfig;
use grapevine_core::state::MapDelta;
use grapevine_publisher::{Publisher, PublisherOptions};
use grapevine_repeater::{Repeater, RepeaterOptions, WanTransport, LOOP_MEMORY};
use grapevine_snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine_subscriber::{Subscriber, SubscriberOptions};

mod common;

use common::{converged, free_loopback_addresses, GroupCounter, Map};

#[test]
fn a_repeater_pair_carries_a_stream_between_two_groups() {
    let near = MulticastConfig::new("239.255.73.40:47340".parse().unwrap());
    let far = MulticastConfig::new("239.255.73.41:47341".parse().unwrap());
    let (a_addr, b_addr) = match free_loopback_addresses(2)[..] {
        [a, b] => (a, b),
        _ => unreachable!("two addresses"),
    };
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
    // Its own emissions, looped back by the group, are dropped in the kernel before they
    // reach its receiver.
    assert_eq!(b.stats().loops, 0, "{:?}", b.stats());
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

fn quic_options(
    group: &MulticastConfig,
    listen: SocketAddr,
    peer: SocketAddr,
    key: [u8; 32],
) -> RepeaterOptions {
    let mut options = RepeaterOptions::new(group.clone(), listen, vec![peer]);
    options.wan = WanTransport::Quic;
    options.link_key = Some(std::sync::Arc::new(Keyring::single(1, key)));
    options
}

#[test]
fn a_quic_pair_keyed_with_the_network_key_carries_small_and_large_datagrams_and_reconnects() {
    let near = MulticastConfig::new("239.255.73.44:47344".parse().unwrap());
    let far = MulticastConfig::new("239.255.73.45:47345".parse().unwrap());
    let (a_addr, b_addr) = match free_loopback_addresses(2)[..] {
        [a, b] => (a, b),
        _ => unreachable!("two addresses"),
    };
    let key = [42u8; 32];
    let a = Repeater::start(quic_options(&near, a_addr, b_addr, key)).unwrap();
    let b = Repeater::start(quic_options(&far, b_addr, a_addr, key)).unwrap();
    let subscriber = Subscriber::<Map>::join(SubscriberOptions::new(1, far.clone())).unwrap();
    // Datagrams of up to 8 000 bytes: more than one QUIC packet holds, so they cross on the
    // connection's stream; small ones cross as QUIC datagrams.
    let mut options = PublisherOptions::new(1, near.clone());
    options.session.max_datagram = 8_000;
    let publisher = Publisher::start(options, Map::default()).unwrap();
    let _snapshots = Snapshotter::start(&publisher, SnapshotterOptions::new(near.clone())).unwrap();
    let publish = |round: u64| {
        for i in 0..2_000u32 {
            publisher
                .publish(MapDelta::Put(i % 100, u64::from(i) * round))
                .unwrap();
            if i % 500 == 0 {
                // A lone delta makes a small datagram.
                publisher.flush();
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        publisher.flush();
    };
    let started = Instant::now();
    publish(1);
    assert!(
        converged(&subscriber, &publisher, Duration::from_secs(10)),
        "{:?} {:?}",
        b.stats(),
        b.links()
    );
    // B's keepalives tell A it is up (B's data does not flow back).
    let waited = Instant::now();
    while !a.links()[0].up && waited.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let links = a.links();
    assert_eq!(links.len(), 1);
    assert!(links[0].up && links[0].target, "{links:?}");
    eprintln!(
        "first convergence and link up after {:?}",
        started.elapsed()
    );
    let path = links[0].quic.clone().expect("a QUIC path to the peer");
    assert!(path.rtt_us > 0 && path.congestion_window > 0, "{path:?}");
    assert!(
        path.max_datagram.is_some_and(|max| max < 8_000),
        "large datagrams needed the stream: {path:?}"
    );
    assert_eq!(b.stats().refused, 0, "{:?}", b.stats());

    // B restarts: A's connection breaks, a new one is made, and the far side recovers.
    drop(b);
    publish(3);
    std::thread::sleep(Duration::from_millis(200));
    let restarted = Instant::now();
    let b = Repeater::start(quic_options(&far, b_addr, a_addr, key)).unwrap();
    assert!(
        converged(&subscriber, &publisher, Duration::from_secs(15)),
        "after a restart: {:?} {:?}",
        b.stats(),
        b.links()
    );
    eprintln!(
        "converged again {:?} after the restart",
        restarted.elapsed()
    );
}

/// An application may run (and drop) a repeater from inside its own tokio runtime.
#[test]
fn a_quic_repeater_starts_and_stops_inside_an_async_runtime() {
    let group = MulticastConfig::new("239.255.73.48:47352".parse().unwrap());
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let repeater = Repeater::start(quic_options(&group, listen, peer, [4u8; 32])).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!repeater.stats().forwarder || repeater.stats().neighbours == 0);
        drop(repeater);
    });
}

#[test]
fn a_quic_peer_without_the_network_key_gets_nothing_through() {
    let near = MulticastConfig::new("239.255.73.46:47348".parse().unwrap());
    let far = MulticastConfig::new("239.255.73.47:47349".parse().unwrap());
    let (a_addr, b_addr) = match free_loopback_addresses(2)[..] {
        [a, b] => (a, b),
        _ => unreachable!("two addresses"),
    };
    let a = Repeater::start(quic_options(&near, a_addr, b_addr, [1u8; 32])).unwrap();
    let stranger = Repeater::start(quic_options(&far, b_addr, a_addr, [2u8; 32])).unwrap();
    let publisher =
        Publisher::start(PublisherOptions::new(1, near.clone()), Map::default()).unwrap();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(4) {
        publisher.publish(MapDelta::Put(1, 1)).unwrap();
        publisher.flush();
        std::thread::sleep(Duration::from_millis(20));
    }
    let (mine, theirs) = (a.stats(), stranger.stats());
    assert_eq!(theirs.relayed_in, 0, "{theirs:?}");
    assert_eq!(mine.relayed_in, 0, "{mine:?}");
    assert!(
        mine.refused + theirs.refused > 0,
        "the failed proofs were counted: {mine:?} {theirs:?}"
    );
    assert!(
        a.links().iter().all(|link| !link.up && link.quic.is_none()),
        "{:?}",
        a.links()
    );
}

/// Runs a publisher on one group and a subscriber on another, joined by the repeaters of
/// `topology` (network — true for the publisher's —, its index, its peers' indices, id), and checks
/// that every delta datagram is multicast exactly once on each network, that nothing echoes
/// back, that nothing goes back over the WAN, and that all traffic stops once the publisher
/// does. Returns the data datagrams per
/// second seen on the publisher's network and on the far one while publishing.
fn relay_exactly_once(
    group_port: u16,
    topology: &[(bool, u16, Vec<u16>, u64)],
    wan: WanTransport,
) -> (f64, f64) {
    let near = MulticastConfig::new(SocketAddr::from(([239, 255, 73, 50], group_port)));
    let far = MulticastConfig::new(SocketAddr::from(([239, 255, 73, 51], group_port + 1)));
    // The topology names repeaters by index; their ports are found free now.
    let addresses = free_loopback_addresses(topology.len());
    let addr = |index: u16| -> SocketAddr { addresses[usize::from(index)] };
    let repeaters: Vec<(bool, usize, Repeater)> = topology
        .iter()
        .map(|(on_near, listen, peers, id)| {
            let group = if *on_near { &near } else { &far };
            let mut options = RepeaterOptions::new(
                group.clone(),
                addr(*listen),
                peers.iter().map(|p| addr(*p)).collect(),
            );
            options.id = Some(*id);
            options.wan = wan;
            options.link_key = Some(std::sync::Arc::new(Keyring::single(1, [5u8; 32])));
            (*on_near, peers.len(), Repeater::start(options).unwrap())
        })
        .collect();
    let all_stats = || {
        repeaters
            .iter()
            .map(|(_, _, r)| r.stats())
            .collect::<Vec<_>>()
    };
    // Wait for the elections and the keepalives: one forwarder per network, all peers up,
    // each repeater sending to one peer (the far network's forwarder).
    let settled_by = Instant::now() + Duration::from_secs(10);
    let settled = || {
        let side = |near_side: bool| repeaters.iter().filter(move |(n, _, _)| *n == near_side);
        let one_forwarder = |near_side: bool| {
            side(near_side)
                .filter(|(_, _, r)| r.stats().forwarder)
                .count()
                == 1
        };
        repeaters.iter().all(|(on_near, peers, r)| {
            let stats = r.stats();
            stats.peers_up == *peers as u64
                && stats.targets == 1
                && stats.neighbours == side(*on_near).count() as u64 - 1
        }) && one_forwarder(true)
            && one_forwarder(false)
    };
    while !settled() {
        assert!(Instant::now() < settled_by, "{:?}", all_stats());
        std::thread::sleep(Duration::from_millis(20));
    }
    let on_near = GroupCounter::start(&near);
    let on_far = GroupCounter::start(&far);
    let subscriber = Subscriber::<Map>::join(SubscriberOptions::new(1, far.clone())).unwrap();
    let mut options = PublisherOptions::new(1, near.clone());
    options.session.flush_delay = Duration::ZERO;
    let publisher = Publisher::start(options, Map::default()).unwrap();
    let started = Instant::now();
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
        all_stats()
    );
    let publishing = started.elapsed().as_secs_f64();
    drop(publisher);
    // Within a keepalive period of the publisher stopping, nothing moves any more.
    std::thread::sleep(LOOP_MEMORY + Duration::from_millis(500));
    let quiet_near = GroupCounter::start(&near);
    let quiet_far = GroupCounter::start(&far);
    std::thread::sleep(Duration::from_secs(1));
    let (_, stray_near) = quiet_near.finish();
    let (_, stray_far) = quiet_far.finish();
    let (near_copies, near_data) = on_near.finish();
    let (far_copies, far_data) = on_far.finish();
    let stats = all_stats();
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
    (near_data as f64 / publishing, far_data as f64 / publishing)
}

#[test]
fn one_pair_delivers_each_datagram_once() {
    let rates = relay_exactly_once(
        47_360,
        &[(true, 0, vec![1], 1), (false, 1, vec![0], 2)],
        WanTransport::Udp,
    );
    eprintln!(
        "one pair: data datagrams/s near {:.0}, far {:.0}",
        rates.0, rates.1
    );
}

#[test]
fn two_pairs_deliver_each_datagram_once() {
    let rates = relay_exactly_once(
        47_370,
        &[
            // A's forwarder (id 1) is peered with B's standby (id 4): B's own forwarder must
            // still recognise the standby's emissions as relayed copies.
            (true, 0, vec![2], 1),
            (true, 1, vec![3], 2),
            (false, 2, vec![0], 4),
            (false, 3, vec![1], 3),
        ],
        WanTransport::Udp,
    );
    eprintln!(
        "two pairs: data datagrams/s near {:.0}, far {:.0}",
        rates.0, rates.1
    );
}

/// Four repeaters, each peered with both remote ones (what DHT discovery builds).
#[test]
fn a_full_mesh_of_repeaters_delivers_each_datagram_once_and_does_not_storm() {
    let rates = relay_exactly_once(
        47_350,
        &[
            (true, 0, vec![2, 3], 1),
            (true, 1, vec![2, 3], 2),
            (false, 2, vec![0, 1], 3),
            (false, 3, vec![0, 1], 4),
        ],
        WanTransport::Udp,
    );
    eprintln!(
        "full mesh: data datagrams/s near {:.0}, far {:.0}",
        rates.0, rates.1
    );
}

/// The same full mesh with QUIC between the networks: loop freedom does not depend on the
/// transport.
#[test]
fn a_full_mesh_over_quic_delivers_each_datagram_once() {
    let rates = relay_exactly_once(
        47_380,
        &[
            (true, 0, vec![2, 3], 1),
            (true, 1, vec![2, 3], 2),
            (false, 2, vec![0, 1], 3),
            (false, 3, vec![0, 1], 4),
        ],
        WanTransport::Quic,
    );
    eprintln!(
        "full mesh over QUIC: data datagrams/s near {:.0}, far {:.0}",
        rates.0, rates.1
    );
}
