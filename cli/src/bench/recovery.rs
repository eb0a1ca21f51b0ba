//! `bench recovery`: time from a forced gap to live again, and the snapshot bandwidth used.

use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use bytes::Bytes;
use grapevine::core::net::MulticastConfig;
use grapevine::core::proto::SnapshotRate;
use grapevine::core::state::{digest, MapDelta};
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine::subscriber::{Subscriber, SubscriberOptions};
use serde_json::json;

use super::{payload_bytes, quantile, rss_mib, PayloadMap, RecoveryArgs};

pub(super) fn recovery(args: &RecoveryArgs) -> Result<()> {
    let group = MulticastConfig::new(args.group);
    let payload = payload_bytes(args.payload.max(4));
    let initial: PayloadMap = (0..args.leaves).map(|k| (k, payload.clone())).collect();
    let mut repair_group = args.group;
    repair_group.set_port(args.group.port().wrapping_add(1));
    let repair_group = args.repair.then(|| MulticastConfig::new(repair_group));
    let mut publisher_options = PublisherOptions::new(1, group.clone());
    publisher_options.repair = repair_group.clone();
    let publisher = Publisher::start(publisher_options, initial)?;
    let mut snapshot = SnapshotterOptions::new(group.clone());
    snapshot.snapshot.rate = SnapshotRate::LeavesPerSecond(args.snapshot_rate);
    let cycle_pause = snapshot.snapshot.cycle_pause;
    let snapshotter = Snapshotter::start(&publisher, snapshot)?;
    let mut options = SubscriberOptions::new(1, group);
    options.session.emit_applied = false;
    if repair_group.is_some() {
        // Room for the request, the resend and the scheduling of three threads on two cores.
        options.session.reorder_window = Duration::from_millis(10);
    }
    options.repair = repair_group;
    let subscriber = Subscriber::<PayloadMap>::join(options)?;
    if !subscriber.wait_live(Duration::from_secs(120)) {
        bail!("the subscriber never caught up: {:?}", subscriber.stats());
    }
    let converged = |want: [u8; 32]| {
        subscriber.read(|s| s.is_live() && s.stream(0).is_some_and(|v| digest(v.state) == want))
    };
    let cycle =
        Duration::from_secs_f64(f64::from(args.leaves) / f64::from(args.snapshot_rate.max(1)))
            + cycle_pause;
    let mut phase = 0x9e37_79b9_7f4a_7c15u64;
    let mut times = Vec::new();
    let bytes_before = snapshotter.stats().bytes;
    let started = Instant::now();
    for round in 0..args.rounds {
        // Start each round at a random phase of the cycle, or rounds lock onto its boundaries.
        phase = phase
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        std::thread::sleep(cycle.mul_f64((phase >> 11) as f64 / (1u64 << 53) as f64));
        let gaps_before = subscriber.stats().protocol.gaps;
        let repairs_before = subscriber.stats().protocol.repairs_requested;
        subscriber.inject_drop(1);
        // Values that differ from everything before, so convergence really means the new state.
        let marked = |tag: u32| {
            let mut bytes = payload.to_vec();
            for (b, t) in bytes.iter_mut().zip(tag.to_be_bytes()) {
                *b = t;
            }
            Bytes::from(bytes)
        };
        publisher.publish(MapDelta::Put(
            round % args.leaves.max(1),
            marked(2 * round + 1),
        ))?;
        publisher.flush();
        let t0 = Instant::now();
        publisher.publish(MapDelta::Put(
            (round * 7919) % args.leaves.max(1),
            marked(2 * round + 2),
        ))?;
        publisher.flush();
        let want = publisher.read(digest);
        // Cheap checks first: the digest of the whole state is computed under the subscriber's
        // lock, and computing it too often would itself delay the subscriber.
        while !(subscriber.is_live() && converged(want)) {
            super::check_interrupted()?;
            if t0.elapsed() > Duration::from_secs(60) {
                bail!("no recovery within 60 s: {:?}", subscriber.stats());
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        // The dropped datagram may have been a snapshot one: only rounds with a gap (or, with
        // repair, a request) count.
        let protocol = subscriber.stats().protocol;
        if protocol.gaps > gaps_before || protocol.repairs_requested > repairs_before {
            times.push(t0.elapsed());
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    if times.is_empty() {
        bail!("no round produced a gap");
    }
    times.sort();
    let pick = |q: f64| quantile(&times, q).as_secs_f64() * 1e3;
    let snapshot_rate = (snapshotter.stats().bytes - bytes_before) as f64 / elapsed;
    if args.json {
        println!(
            "{}",
            json!({
                "bench": "recovery",
                "repair": args.repair,
                "leaves": args.leaves,
                "payload": args.payload,
                "snapshot_rate_leaves": args.snapshot_rate,
                "cycle_ms": cycle.as_secs_f64() * 1e3,
                "rounds": times.len(),
                "median_ms": pick(0.5),
                "p99_ms": pick(0.99),
                "max_ms": pick(1.0),
                "snapshot_bytes_per_second": snapshot_rate,
                "process_rss_mib": rss_mib(),
            })
        );
        return Ok(());
    }
    println!(
        "recovery after a forced gap{}: {} leaves of {} B, snapshots at {} leaves/s (cycle {:.1} ms with its pause), {} rounds",
        if args.repair { ", with repair by request" } else { "" },
        args.leaves,
        args.payload,
        args.snapshot_rate,
        cycle.as_secs_f64() * 1e3,
        times.len()
    );
    println!(
        "  median {:.1} ms  p99 {:.1} ms  max {:.1} ms; snapshots {:.2} MB/s; process RSS {:.1} MiB (publisher + subscriber)",
        pick(0.5),
        pick(0.99),
        pick(1.0),
        snapshot_rate / 1e6,
        rss_mib()
    );
    Ok(())
}
