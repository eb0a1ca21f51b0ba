//! Two real networks (two bridges, each with its hosts, in network namespaces) joined by a
//! router that forwards unicast only and drops part of what crosses it, as a WAN would:
//! multicast reaches the far network only through the repeaters. With one pair, two pairs and
//! a full mesh of repeaters (over UDP and over QUIC), every delta datagram is multicast at most
//! once on each network, never echoed on the publisher's, and nothing moves once the publisher
//! stops; the far subscriber converges through the loss. Prints the data datagrams per second
//! seen on each network. Then A's forwarder is removed mid-stream (two pairs over UDP, a full
//! mesh over QUIC): the standby takes over and the far subscriber converges again; prints how
//! long each took.
//!
//! Needs root, iproute2 and nftables; `.ci/run` installs them and runs it. Namespaces and links
//! are removed whatever happens.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// `setns` has no safe wrapper in the crates this workspace uses; it only moves the calling
// thread into a namespace the test made.
#![allow(unsafe_code)]

mod common;

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::{converged, GroupCounter, Map};
use grapevine_core::auth::Keyring;
use grapevine_core::net::{InterfaceSpec, MulticastConfig};
use grapevine_core::state::MapDelta;
use grapevine_publisher::{Publisher, PublisherOptions};
use grapevine_repeater::{Repeater, RepeaterOptions, WanTransport, LOOP_MEMORY};
use grapevine_snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine_subscriber::{Subscriber, SubscriberOptions};
use grapevine_test_support::netns::Lab;

/// Percent of the packets crossing the router that it drops.
const WAN_LOSS_PERCENT: u32 = 5;
/// Delta datagrams published per scenario.
const DELTAS: usize = 500;
const REPEATER_PORT: u16 = 7190;

/// A host: its namespace, its link and its address.
#[derive(Clone, Debug)]
struct Host {
    ns: String,
    iface: String,
    ip: [u8; 4],
}

impl Host {
    fn group(&self, group: SocketAddr) -> MulticastConfig {
        MulticastConfig::new(group).on(self.iface.parse::<InterfaceSpec>().unwrap())
    }

    fn repeater_address(&self) -> SocketAddr {
        SocketAddr::from((self.ip, REPEATER_PORT))
    }

    /// Runs `make` on a thread inside this host's namespace: the sockets it opens live there.
    fn enter<T: Send + 'static>(&self, make: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns only reads the descriptor, which stays open for the call, and
            // changes nothing but this thread's network namespace.
            let result = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(
                result,
                0,
                "setns {path}: {}",
                std::io::Error::last_os_error()
            );
            make()
        })
        .join()
        .unwrap()
    }
}

/// Network A (publisher, two repeater hosts, an observer) and network B (subscriber, two
/// repeater hosts, an observer), 10.236.1.0/24 and 10.236.2.0/24, joined by a router that
/// forwards unicast only and drops [`WAN_LOSS_PERCENT`].
struct Networks {
    _lab: Lab,
    a: Vec<Host>,
    b: Vec<Host>,
}

fn networks(tag: &str) -> Networks {
    let mut lab = Lab::new(tag, &["nft"]);
    let [a, b] = lab
        .add_routed_networks("10.236", 4, WAN_LOSS_PERCENT)
        .unwrap()
        .map(|hosts| {
            hosts
                .into_iter()
                .map(|(ns, iface, address)| Host {
                    ns,
                    iface,
                    ip: address.parse::<std::net::Ipv4Addr>().unwrap().octets(),
                })
                .collect()
        });
    Networks { _lab: lab, a, b }
}

/// A subscriber on B's first host, and a publisher (with `flush_delay`) and its snapshotter on
/// A's first host.
fn start_feed(
    networks: &Networks,
    group: SocketAddr,
    flush_delay: Duration,
) -> (Subscriber<Map>, Publisher<Map>, Snapshotter) {
    let subscriber_config = networks.b[0].group(group);
    let subscriber = networks.b[0].enter(move || {
        Subscriber::<Map>::join(SubscriberOptions::new(1, subscriber_config)).unwrap()
    });
    let publisher_config = networks.a[0].group(group);
    let (publisher, snapshots) = networks.a[0].enter(move || {
        let mut options = PublisherOptions::new(1, publisher_config.clone());
        options.session.flush_delay = flush_delay;
        let publisher = Publisher::start(options, Map::default()).unwrap();
        let snapshots =
            Snapshotter::start(&publisher, SnapshotterOptions::new(publisher_config)).unwrap();
        (publisher, snapshots)
    });
    (subscriber, publisher, snapshots)
}

/// A repeater: on network A or not, which host of it (1 or 2), the remote hosts (1 or 2) it
/// is peered with, its election id.
type Placement = (bool, usize, Vec<usize>, u64);

/// Repeaters placed by a topology: on A or not, how many peers, the repeater.
type Placed = Vec<(bool, usize, Repeater)>;

/// Starts `topology`'s repeaters over `wan` and waits until they settle: one forwarder per
/// network, every peer up, each sending to one peer.
fn start_repeaters(
    networks: &Networks,
    group: SocketAddr,
    topology: &[Placement],
    wan: WanTransport,
) -> Placed {
    let repeaters: Placed = topology
        .iter()
        .map(|(on_a, host, peers, id)| {
            let (here, there) = if *on_a {
                (&networks.a, &networks.b)
            } else {
                (&networks.b, &networks.a)
            };
            let host = here[*host].clone();
            let mut options = RepeaterOptions::new(
                host.group(group),
                host.repeater_address(),
                peers.iter().map(|p| there[*p].repeater_address()).collect(),
            );
            options.id = Some(*id);
            options.wan = wan;
            options.link_key = Some(std::sync::Arc::new(Keyring::single(1, [3u8; 32])));
            let repeater = host.enter(move || Repeater::start(options).unwrap());
            (*on_a, peers.len(), repeater)
        })
        .collect();
    let settled_by = Instant::now() + Duration::from_secs(20);
    let settled = || {
        let side = |a: bool| repeaters.iter().filter(move |(on_a, _, _)| *on_a == a);
        let one_forwarder = |a: bool| side(a).filter(|(_, _, r)| r.stats().forwarder).count() == 1;
        repeaters.iter().all(|(on_a, peers, r)| {
            let stats = r.stats();
            stats.peers_up == *peers as u64
                && stats.targets == 1
                && stats.neighbours == side(*on_a).count() as u64 - 1
        }) && one_forwarder(true)
            && one_forwarder(false)
    };
    while !settled() {
        assert!(
            Instant::now() < settled_by,
            "never settled: {:#?}",
            all_stats(&repeaters)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    repeaters
}

fn all_stats(
    repeaters: &Placed,
) -> Vec<(
    grapevine_repeater::RepeaterStats,
    Vec<grapevine_repeater::PeerLink>,
)> {
    repeaters
        .iter()
        .map(|(_, _, r)| (r.stats(), r.links()))
        .collect()
}

/// Publishes on A, subscribes on B, with `topology`'s repeaters between them over `wan`;
/// checks each delta datagram is multicast at most once per network and nothing moves after
/// the publisher stops. Returns the data datagrams per second seen on A and on B.
fn relay_across(
    networks: &Networks,
    group: SocketAddr,
    topology: &[Placement],
    wan: WanTransport,
) -> (f64, f64) {
    let repeaters = start_repeaters(networks, group, topology, wan);
    let all_stats = || all_stats(&repeaters);
    let observe = |host: &Host| {
        let config = host.group(group);
        host.enter(move || GroupCounter::start(&config))
    };
    let (observer_a, observer_b) = (&networks.a[3], &networks.b[3]);
    let on_a = observe(observer_a);
    let on_b = observe(observer_b);
    let (subscriber, publisher, snapshots) = start_feed(networks, group, Duration::ZERO);
    let started = Instant::now();
    for i in 0..DELTAS as u32 {
        publisher
            .publish(MapDelta::Put(i % 50, u64::from(i)))
            .unwrap();
        if i % 50 == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let publishing = started.elapsed().as_secs_f64();
    assert!(
        converged(&subscriber, &publisher, Duration::from_secs(20)),
        "the far subscriber converged through {WAN_LOSS_PERCENT} % WAN loss: {:#?}",
        all_stats()
    );
    drop(snapshots);
    drop(publisher);
    // Within a keepalive period of the publisher stopping, nothing moves any more.
    std::thread::sleep(LOOP_MEMORY + Duration::from_millis(500));
    let quiet_a = observe(observer_a);
    let quiet_b = observe(observer_b);
    std::thread::sleep(Duration::from_secs(1));
    let (_, stray_a) = quiet_a.finish();
    let (_, stray_b) = quiet_b.finish();
    let (a_copies, a_data) = on_a.finish();
    let (b_copies, b_data) = on_b.finish();
    let stats = all_stats();
    assert_eq!(a_copies.len(), DELTAS, "every delta datagram seen on A");
    assert_eq!(
        a_copies.values().max(),
        Some(&1),
        "no echo on the publisher's network: {stats:#?}"
    );
    // The WAN drops some; what crosses crosses once.
    assert!(
        b_copies.len() >= DELTAS * 3 / 4,
        "{} of {DELTAS} delta datagrams reached B: {stats:#?}",
        b_copies.len()
    );
    assert_eq!(
        b_copies.values().max(),
        Some(&1),
        "one copy per datagram on B: {stats:#?}"
    );
    assert_eq!((stray_a, stray_b), (0, 0), "traffic stopped: {stats:#?}");
    // A's data includes the snapshot cycle; B's is what the repeaters let through of it.
    (a_data as f64 / publishing, b_data as f64 / publishing)
}

/// Publishes steadily on A through `topology` and removes A's forwarder mid-stream. Returns
/// how long after the removal the standby relayed, and how long until the far subscriber held
/// the publisher's state again (publishing stops 300 ms after the standby took over).
fn fail_over(
    networks: &Networks,
    group: SocketAddr,
    topology: &[Placement],
    wan: WanTransport,
) -> (Duration, Duration) {
    let mut repeaters = start_repeaters(networks, group, topology, wan);
    let flush_delay = PublisherOptions::new(1, networks.a[0].group(group))
        .session
        .flush_delay;
    let (subscriber, publisher, _snapshots) = start_feed(networks, group, flush_delay);
    let mut next = 0u32;
    let mut publish = || {
        publisher
            .publish(MapDelta::Put(next % 64, u64::from(next)))
            .unwrap();
        next += 1;
    };
    for _ in 0..200 {
        publish();
        std::thread::sleep(Duration::from_millis(1));
    }
    assert!(
        converged(&subscriber, &publisher, Duration::from_secs(20)),
        "before the fail-over: {:#?}",
        all_stats(&repeaters)
    );
    let forwarder = repeaters
        .iter()
        .position(|(on_a, _, r)| *on_a && r.stats().forwarder)
        .expect("A has a forwarder");
    drop(repeaters.remove(forwarder));
    let removed = Instant::now();
    let standby = &repeaters
        .iter()
        .find(|(on_a, _, _)| *on_a)
        .expect("A has a standby")
        .2;
    let relayed_before = standby.stats().relayed_out;
    let mut took_over = None;
    while removed.elapsed() < Duration::from_secs(10) {
        publish();
        std::thread::sleep(Duration::from_millis(2));
        if took_over.is_none() && standby.stats().relayed_out > relayed_before {
            took_over = Some(removed.elapsed());
        }
        if took_over.is_some_and(|at| removed.elapsed() > at + Duration::from_millis(300)) {
            break;
        }
    }
    let took_over = took_over
        .unwrap_or_else(|| panic!("the standby never took over: {:#?}", all_stats(&repeaters)));
    publisher.flush();
    assert!(
        converged(&subscriber, &publisher, Duration::from_secs(20)),
        "after the fail-over: {:#?}",
        all_stats(&repeaters)
    );
    (took_over, removed.elapsed())
}

#[test]
#[ignore = "needs root, iproute2 and nftables to create network namespaces; .ci/run installs them and runs it with --include-ignored"]
fn two_networks_behind_a_lossy_router_get_each_datagram_once_with_one_pair_two_pairs_or_a_mesh() {
    let networks = networks("gr");
    let group: SocketAddr = "239.255.74.1:47401".parse().unwrap();
    let one_pair: &[Placement] = &[(true, 1, vec![1], 1), (false, 1, vec![1], 2)];
    let two_pairs: &[Placement] = &[
        (true, 1, vec![2], 1),
        (true, 2, vec![1], 2),
        (false, 1, vec![2], 4),
        (false, 2, vec![1], 3),
    ];
    let mesh: &[Placement] = &[
        (true, 1, vec![1, 2], 1),
        (true, 2, vec![1, 2], 2),
        (false, 1, vec![1, 2], 3),
        (false, 2, vec![1, 2], 4),
    ];
    // Without repeaters nothing crosses: the router forwards no multicast.
    {
        let observer = networks.b[3].clone();
        let config = observer.group(group);
        let on_b = observer.enter(move || GroupCounter::start(&config));
        let publisher_config = networks.a[0].group(group);
        let publisher = networks.a[0].enter(move || {
            Publisher::start(PublisherOptions::new(1, publisher_config), Map::default()).unwrap()
        });
        for i in 0..100u32 {
            publisher.publish(MapDelta::Put(i, 1)).unwrap();
            publisher.flush();
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(publisher);
        let (_, crossed) = on_b.finish();
        assert_eq!(crossed, 0, "multicast crossed the router by itself");
    }
    let mut report = Vec::new();
    for (name, topology, wan) in [
        ("one pair, UDP", one_pair, WanTransport::Udp),
        ("two pairs, UDP", two_pairs, WanTransport::Udp),
        ("full mesh, UDP", mesh, WanTransport::Udp),
        ("one pair, QUIC", one_pair, WanTransport::Quic),
        ("full mesh, QUIC", mesh, WanTransport::Quic),
    ] {
        let (a, b) = relay_across(&networks, group, topology, wan);
        report.push(format!(
            "{name}: data datagrams/s on A {a:.0}, on B {b:.0} (WAN loss {WAN_LOSS_PERCENT} %)"
        ));
        eprintln!("{}", report.last().unwrap());
    }
    for (name, topology, wan) in [
        ("two pairs, UDP", two_pairs, WanTransport::Udp),
        ("full mesh, QUIC", mesh, WanTransport::Quic),
    ] {
        let (took_over, recovered) = fail_over(&networks, group, topology, wan);
        eprintln!(
            "{name}: A's forwarder removed; the standby relayed after {took_over:?}, the far \
             subscriber held the state {recovered:?} after the removal"
        );
    }
}
