//! A fleet of sensors, replicated: the state of docs/GUIDE.md ("Write your own state").
//!
//! Leaves are sensors; deltas are readings, calibrations (incremental: `offset += x`, safe under
//! loss because GrapeVine applies a delta only to the exact leaf value the publisher had) and
//! decommissions. One publisher with a snapshotter, one blocking and one async subscriber, each
//! dropping 5 % of what it receives; both wait until they hold the publisher's last `seq`
//! (no polling, no sleeping), then compare digests with the publisher.
//!
//! `cargo run --release --example sensor_fleet -- --deltas 100000`

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use grapevine::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// One sensor: its last reading and its calibration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Sensor {
    /// Last value read.
    pub value: f64,
    /// When, in milliseconds.
    pub ts: u64,
    /// Calibration offset, accumulated.
    pub offset: f64,
}

/// A change to one sensor (the delta is `(sensor id, change)`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub enum SensorChange {
    /// A new reading (a sensor not known yet is created).
    Reading {
        /// The value read.
        value: f64,
        /// When, in milliseconds.
        ts: u64,
    },
    /// Shift the calibration by `offset`.
    Calibrate {
        /// Added to the sensor's offset.
        offset: f64,
    },
    /// The sensor is gone.
    Decommission,
}

use SensorChange::{Calibrate, Decommission, Reading};

/// The fleet: the whole state definition is this impl.
pub struct Fleet;

impl LeafChanges for Fleet {
    type Key = u32;
    type Leaf = Sensor;
    type Change = SensorChange;
    fn apply(change: &SensorChange, sensor: &mut Option<Sensor>) {
        match change {
            Reading { value, ts } => {
                let s = sensor.get_or_insert_default();
                (s.value, s.ts) = (*value, *ts);
            }
            Calibrate { offset } => sensor.iter_mut().for_each(|s| s.offset += offset),
            Decommission => *sensor = None,
        }
    }
}

/// The replicated state.
pub type FleetState = LeafMap<Fleet>;

/// Replicate a sensor fleet to a blocking and an async subscriber over lossy loopback multicast.
#[derive(Debug, Parser)]
pub struct Args {
    /// Deltas to publish.
    #[arg(long, default_value_t = 100_000)]
    pub deltas: u64,
    /// Sensors in the fleet.
    #[arg(long, default_value_t = 1_000)]
    pub sensors: u32,
    /// Fraction of datagrams each subscriber drops on purpose.
    #[arg(long, default_value_t = 0.05)]
    pub loss: f64,
    /// Multicast group (on loopback).
    #[arg(long, default_value = "239.255.77.1:7701")]
    pub group: std::net::SocketAddr,
    /// How long each subscriber may take to catch up after the last delta.
    #[arg(long, default_value_t = 30)]
    pub timeout_seconds: u64,
}

const TOPIC: u32 = 77;

/// What a run showed.
#[derive(Debug)]
pub struct Report {
    /// Digest of the publisher's state at the end.
    pub published: [u8; 32],
    /// Digests of the blocking and the async subscriber's replicas.
    pub replicas: [[u8; 32]; 2],
    /// The blocking subscriber's counters.
    pub blocking: grapevine::subscriber::Stats,
    /// The async subscriber's counters.
    pub asynchronous: grapevine::subscriber::Stats,
}

/// Runs the example; fails if a subscriber does not catch up in time or ends up different.
pub fn run(args: &Args) -> Result<Report> {
    let group = MulticastConfig::new(args.group); // loopback unless an interface is named
    let subscribing = || {
        SubscriberOptions::new(TOPIC, group.clone())
            .with_injected_loss(args.loss)
            .with_applied_events(false)
    };
    let blocking = Subscriber::<FleetState>::join(subscribing())?;
    let (asynchronous, mut events) = Subscriber::<FleetState>::join_async(subscribing())?;
    let publisher = Publisher::start(
        PublisherOptions::new(TOPIC, group.clone()),
        FleetState::default(),
    )?;
    let snapshots = Snapshotter::start(&publisher, SnapshotterOptions::new(group))?;

    let started = Instant::now();
    let mut rng = SmallRng::seed_from_u64(7);
    let mut last_seq = 0;
    for i in 0..args.deltas {
        let sensor = rng.gen_range(0..args.sensors);
        let change = match rng.gen_range(0..100) {
            0 => Decommission,
            1..=9 => Calibrate {
                offset: f64::from(rng.gen_range(-50..50)) / 10.0,
            },
            _ => Reading {
                value: rng.gen_range(0.0..100.0),
                ts: i,
            },
        };
        last_seq = publisher.publish((sensor, change))?;
    }
    publisher.flush();
    println!(
        "published {} deltas in {:.2?} (last seq {last_seq})",
        args.deltas,
        started.elapsed()
    );

    // The async subscriber: drain its events while waiting to hold `last_seq`.
    let timeout = Duration::from_secs(args.timeout_seconds);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()?;
    let caught_up = asynchronous.caught_up(publisher.id(), last_seq);
    let (waited, live_events) = runtime.block_on(async {
        let mut live_events = 0u64;
        let waited = tokio::time::timeout(timeout, async {
            tokio::pin!(caught_up);
            loop {
                tokio::select! {
                    done = &mut caught_up => return done,
                    Some(event) = events.recv() => {
                        live_events += u64::from(matches!(event, SubscriberEvent::Live { .. }));
                    }
                }
            }
        })
        .await;
        (waited, live_events)
    });
    if !matches!(waited, Ok(true)) {
        bail!(
            "the async subscriber did not catch up within {timeout:?}: {:?}",
            asynchronous.progress()
        );
    }
    println!(
        "async subscriber caught up to seq {last_seq} after {:.2?} ({live_events} live events)",
        started.elapsed()
    );

    if !blocking.wait_caught_up(publisher.id(), last_seq, timeout) {
        bail!(
            "the blocking subscriber did not catch up within {timeout:?}: {:?}",
            blocking.progress()
        );
    }
    println!(
        "blocking subscriber caught up to seq {last_seq} after {:.2?}",
        started.elapsed()
    );

    let published = publisher.read(digest);
    let replica = |s: &Subscriber<FleetState>| {
        s.replica(publisher.id())
            .map(|r| digest(&r.state))
            .context("publisher not heard")
    };
    let replicas = [replica(&blocking)?, replica(&asynchronous)?];
    for warning in blocking.warnings() {
        println!("blocking subscriber: {warning:?}");
    }
    drop(snapshots);
    publisher.shutdown();
    let report = Report {
        published,
        replicas,
        blocking: blocking.shutdown(),
        asynchronous: asynchronous.shutdown(),
    };
    for (name, stats, replica) in [
        ("blocking", report.blocking, replicas[0]),
        ("async", report.asynchronous, replicas[1]),
    ] {
        let p = stats.protocol;
        println!(
            "{name}: applied {} superseded {} gaps {} lost {} recoveries {} joins {} digest {}",
            p.deltas_applied,
            p.superseded,
            p.gaps,
            p.messages_lost,
            p.recoveries,
            p.joins,
            short_hex(&replica)
        );
    }
    if replicas.iter().any(|r| *r != published) {
        bail!(
            "a replica differs from the publisher ({})",
            short_hex(&published)
        );
    }
    println!(
        "both replicas equal the publisher's state: digest {}",
        short_hex(&published)
    );
    Ok(report)
}

fn main() -> Result<()> {
    run(&Args::parse()).map(|_| ())
}
