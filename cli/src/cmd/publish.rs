//! `grapevine pub`: an order-book publisher and its snapshotter.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use grapevine::core::state::{digest, short_hex, ReplicatedState};
use grapevine::order_book::{MarketGenerator, OrderBook};
use grapevine::publisher::Publisher;
use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};

use crate::{interrupted, publisher_options, snapshot_config, NetArgs};

#[derive(Args, Debug)]
pub(crate) struct PubArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Updates per second.
    #[arg(long, default_value_t = 10_000, value_parser = crate::values::rate, allow_negative_numbers = true)]
    rate: u64,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long, value_parser = crate::values::seconds, allow_negative_numbers = true)]
    seconds: Option<f64>,
    /// Stop publishing updates after this many, but keep sending heartbeats and snapshots.
    #[arg(long)]
    updates: Option<u64>,
    /// Instruments in the order book.
    #[arg(long, default_value_t = 8)]
    instruments: u16,
    /// Snapshot rate in leaves per second.
    #[arg(long, default_value_t = 50_000, value_parser = crate::values::rate_u32, allow_negative_numbers = true)]
    snapshot_rate: u32,
    /// Publisher id (several publishers may share a topic).
    #[arg(long, default_value_t = 0)]
    publisher_id: u32,
    /// Serve the counters for Prometheus on this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

pub(crate) fn publish(args: &PubArgs) -> Result<()> {
    let mut options = publisher_options(&args.net)?;
    options.session.publisher = args.publisher_id;
    let publisher = Publisher::start(options, OrderBook::default())?;
    let mut snapshot_options = SnapshotterOptions::new(args.net.snapshots());
    snapshot_options.snapshot = snapshot_config(args.snapshot_rate, &args.net)?;
    let snapshotter = Snapshotter::start(&publisher, snapshot_options)?;
    println!(
        "publishing topic {} as publisher {} session {:#x} on {} ({}), {} updates/s",
        args.net.topic,
        args.publisher_id,
        publisher.session_id(),
        args.net.group,
        args.net.iface,
        args.rate
    );
    let metrics = Arc::new(parking_lot::Mutex::new(String::new()));
    if let Some(address) = args.metrics {
        let metrics = Arc::clone(&metrics);
        crate::metrics::serve_metrics(address, move || metrics.lock().clone())?;
    }
    let labels = format!(
        "topic=\"{}\",publisher=\"{}\"",
        args.net.topic, args.publisher_id
    );
    let mut market = MarketGenerator::new(args.instruments, 20, publisher.session_id());
    let mut mirror = OrderBook::default();
    let started = Instant::now();
    let stop_at = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut published = 0u64;
    let mut next_report = started + Duration::from_secs(1);
    let mut batch = Vec::new();
    while stop_at.is_none_or(|t| Instant::now() < t) && !interrupted() {
        let due = (args.rate as f64 * started.elapsed().as_secs_f64()) as u64;
        let due = args.updates.map_or(due, |limit| due.min(limit));
        while published < due && batch.len() < 256 {
            let delta = market.next_delta(&mirror);
            mirror.apply(&delta);
            batch.push(delta);
            published += 1;
        }
        if batch.is_empty() {
            std::thread::sleep(Duration::from_micros(500));
        } else {
            publisher.publish_all(batch.drain(..))?;
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            let stats = publisher.stats();
            let snapshots = snapshotter.stats();
            *metrics.lock() = crate::metrics::prometheus(
                &labels,
                &[
                    (
                        "grapevine_publisher_deltas_total",
                        "Deltas published.",
                        stats.deltas,
                    ),
                    (
                        "grapevine_publisher_datagrams_total",
                        "Datagrams sent.",
                        stats.datagrams,
                    ),
                    (
                        "grapevine_publisher_bytes_total",
                        "Bytes sent.",
                        stats.bytes,
                    ),
                    (
                        "grapevine_publisher_heartbeats_total",
                        "Heartbeats sent.",
                        stats.heartbeats,
                    ),
                    (
                        "grapevine_snapshot_cycles_total",
                        "Snapshot cycles completed.",
                        snapshots.cycles,
                    ),
                    (
                        "grapevine_snapshot_leaves_total",
                        "Snapshot leaves sent.",
                        snapshots.leaves,
                    ),
                    (
                        "grapevine_snapshot_bytes_total",
                        "Snapshot bytes sent.",
                        snapshots.bytes,
                    ),
                    (
                        "grapevine_state_leaves",
                        "Leaves in the published state.",
                        mirror.len() as u64,
                    ),
                ],
            );
            println!(
                "[{:5.1}s] published {} ({} datagrams), {} levels, snapshot cycles {}",
                started.elapsed().as_secs_f64(),
                stats.deltas,
                stats.datagrams,
                mirror.len(),
                snapshotter.stats().cycles
            );
        }
    }
    snapshotter.shutdown();
    let final_digest = publisher.read(digest);
    let stats = publisher.shutdown();
    println!(
        "done: {} deltas in {} datagrams, digest {}",
        stats.deltas,
        stats.datagrams,
        short_hex(&final_digest)
    );
    Ok(())
}
