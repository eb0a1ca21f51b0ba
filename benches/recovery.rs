//! Recovery time after a forced gap, on real loopback multicast sockets, for a state of 10 000
//! leaves (override with GV_LEAVES) at the default snapshot rate (GV_SNAPSHOT_RATE leaves/s).
//!
//! Each round drops exactly one delta datagram at the subscriber, publishes one more delta (so
//! the gap is noticed at once), and times how long until the subscriber is live again with the
//! publisher's exact state. Prints median, p99 and max, and the snapshot bandwidth.
//!
//! `cargo bench --bench recovery`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use grapevine::core::net::MulticastConfig;
use grapevine::core::proto::SnapshotRate;
use grapevine::core::state::{digest, KeyedMap, MapDelta};
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine::subscriber::{Subscriber, SubscriberOptions};

type State = KeyedMap<u32, u64>;

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> anyhow::Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(()); // `cargo bench -- --list` / test harness probing
    }
    let leaves = env("GV_LEAVES", 10_000) as u32;
    let rate = env("GV_SNAPSHOT_RATE", 100_000) as u32;
    let rounds = env("GV_ROUNDS", 40);
    let group = MulticastConfig::new(SocketAddr::from(([239, 255, 75, 1], 47_500)));

    let initial: State = (0..leaves).map(|k| (k, u64::from(k))).collect();
    let publisher = Publisher::start(PublisherOptions::new(1, group.clone()), initial)?;
    let mut snapshot = SnapshotterOptions::new(group.clone());
    snapshot.snapshot.rate = SnapshotRate::LeavesPerSecond(rate);
    let snapshotter = Snapshotter::start(&publisher, snapshot)?;
    let mut options = SubscriberOptions::new(1, group);
    options.session.emit_applied = false;
    let subscriber = Subscriber::<State>::join(options)?;
    if !subscriber.wait_live(Duration::from_secs(60)) {
        anyhow::bail!("the subscriber never caught up: {:?}", subscriber.stats());
    }

    let converged = |subscriber: &Subscriber<State>, want: [u8; 32]| {
        subscriber.read(|s| s.is_live() && s.stream(0).is_some_and(|v| digest(v.state) == want))
    };
    let mut times = Vec::new();
    let bytes_before = snapshotter.stats().bytes;
    let started = Instant::now();
    // Start each round at a random phase of the cycle, or rounds lock onto cycle boundaries.
    let cycle =
        Duration::from_secs_f64(f64::from(leaves) / f64::from(rate)) + Duration::from_millis(10);
    let mut phase = 0x9e37_79b9_7f4a_7c15u64;
    for round in 0..rounds {
        phase = phase
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(cycle.mul_f64((phase >> 11) as f64 / (1u64 << 53) as f64));
        let gaps_before = subscriber.stats().protocol.gaps;
        subscriber.inject_drop(1);
        publisher.publish(MapDelta::Put((round as u32 * 7919) % leaves, round))?;
        publisher.flush();
        let t0 = Instant::now();
        publisher.publish(MapDelta::Put((round as u32 * 104_729) % leaves, round + 1))?;
        publisher.flush();
        let want = publisher.read(digest);
        while !converged(&subscriber, want) {
            if t0.elapsed() > Duration::from_secs(30) {
                anyhow::bail!("no recovery within 30 s: {:?}", subscriber.stats());
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        let took = t0.elapsed();
        // The dropped datagram may have been a snapshot one rather than the delta: only rounds
        // that really made a gap count.
        if subscriber.stats().protocol.gaps > gaps_before {
            times.push(took);
        }
    }
    if times.is_empty() {
        anyhow::bail!("no round produced a gap");
    }
    let elapsed = started.elapsed().as_secs_f64();
    let snapshot_bytes = snapshotter.stats().bytes - bytes_before;
    times.sort();
    let pick = |q: f64| times[((times.len() - 1) as f64 * q).round() as usize];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let stats = subscriber.stats().protocol;
    println!(
        "recovery after a forced gap: {leaves} leaves, snapshots at {rate} leaves/s, {} rounds with a gap (of {rounds})",
        times.len()
    );
    println!(
        "  median {:.1} ms  p99 {:.1} ms  max {:.1} ms  (a cycle takes {:.1} ms plus a {} ms pause)",
        ms(pick(0.5)),
        ms(pick(0.99)),
        ms(*times.last().unwrap_or(&Duration::ZERO)),
        f64::from(leaves) / f64::from(rate) * 1e3,
        10
    );
    println!(
        "  snapshot bandwidth {:.2} MB/s; subscriber: gaps {} recoveries {}",
        snapshot_bytes as f64 / elapsed / 1e6,
        stats.gaps,
        stats.recoveries
    );
    Ok(())
}
