//! `grapevine demo`: publisher, snapshotter and subscribers in one process, with injected loss.

use std::io::Write;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use grapevine::core::net::self_test;
use grapevine::core::state::{digest, short_hex, ReplicatedState};
use grapevine::order_book::{MarketGenerator, OrderBook};
use grapevine::publisher::Publisher;
use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine::subscriber::Subscriber;

use crate::{publisher_options, snapshot_config, subscriber_options, NetArgs};

#[derive(Args, Debug)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Number of subscribers.
    #[arg(long, default_value_t = 3)]
    subscribers: usize,
    /// Fraction of datagrams each subscriber drops on receipt (0..1).
    #[arg(long, default_value_t = 0.1, value_parser = crate::values::fraction, allow_negative_numbers = true)]
    loss: f64,
    /// Updates to publish.
    #[arg(long, default_value_t = 200_000)]
    updates: u64,
    /// Seconds over which to publish them.
    #[arg(long, default_value_t = 5.0, value_parser = crate::values::seconds, allow_negative_numbers = true)]
    seconds: f64,
    /// Instruments in the order book.
    #[arg(long, default_value_t = 8)]
    instruments: u16,
    /// Snapshot rate in leaves per second.
    #[arg(long, default_value_t = 50_000, value_parser = crate::values::rate_u32, allow_negative_numbers = true)]
    snapshot_rate: u32,
    /// Seconds to wait for convergence after publishing stops.
    #[arg(long, default_value_t = 15.0, value_parser = crate::values::seconds, allow_negative_numbers = true)]
    settle: f64,
}

pub(crate) fn demo(args: &DemoArgs) -> Result<bool> {
    if args.subscribers == 0 {
        bail!("--subscribers must be at least 1");
    }
    self_test(&args.net.live(), Duration::from_secs(2)).context("multicast self-test")?;
    let subscribers = (0..args.subscribers)
        .map(|_| {
            subscriber_options(&args.net, args.loss)
                .and_then(|o| Ok(Subscriber::<OrderBook>::join(o)?))
        })
        .collect::<Result<Vec<_>>>()
        .context("starting subscribers")?;
    let publisher = Publisher::start(publisher_options(&args.net)?, OrderBook::default())
        .context("starting the publisher")?;
    let mut snapshot_options = SnapshotterOptions::new(args.net.snapshots());
    snapshot_options.snapshot = snapshot_config(args.snapshot_rate, &args.net)?;
    let snapshotter =
        Snapshotter::start(&publisher, snapshot_options).context("starting the snapshotter")?;
    println!(
        "demo: {} subscribers, {:.0}% loss each, {} updates over {}s on {} ({})",
        args.subscribers,
        args.loss * 100.0,
        args.updates,
        args.seconds,
        args.net.group,
        args.net.iface
    );

    let mut market = MarketGenerator::new(args.instruments, 20, 1);
    let mut mirror = OrderBook::default();
    let started = Instant::now();
    let duration = Duration::from_secs_f64(args.seconds.max(0.001));
    let mut published = 0u64;
    let mut next_report = started + Duration::from_millis(500);
    let mut batch = Vec::new();
    while published < args.updates {
        let elapsed = started.elapsed();
        let due = if elapsed >= duration {
            args.updates
        } else {
            (args.updates as f64 * elapsed.as_secs_f64() / duration.as_secs_f64()) as u64
        };
        while published < due.min(args.updates) && batch.len() < 256 {
            let delta = market.next_delta(&mirror);
            mirror.apply(&delta);
            batch.push(delta);
            published += 1;
        }
        if !batch.is_empty() {
            publisher.publish_all(batch.drain(..))?;
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_millis(500);
            report(started, published, &subscribers, snapshotter.stats().cycles);
        }
    }
    publisher.flush();
    println!(
        "published {published} updates in {:.2}s ({:.0}/s), {} datagrams; settling",
        started.elapsed().as_secs_f64(),
        published as f64 / started.elapsed().as_secs_f64(),
        publisher.stats().datagrams
    );

    let want = publisher.read(digest);
    let session = publisher.session_id();
    let converged_at = |s: &Subscriber<OrderBook>| {
        s.read(|session_state| {
            session_state.is_live()
                && session_state
                    .stream(0)
                    .is_some_and(|v| v.session == session && digest(v.state) == want)
        })
    };
    let settle_until = Instant::now() + Duration::from_secs_f64(args.settle);
    while Instant::now() < settle_until && !subscribers.iter().all(converged_at) {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next_report {
            next_report += Duration::from_millis(500);
            report(started, published, &subscribers, snapshotter.stats().cycles);
        }
    }

    let mut converged = 0;
    for (i, subscriber) in subscribers.iter().enumerate() {
        let ok = converged_at(subscriber);
        converged += usize::from(ok);
        let stats = subscriber.stats();
        let p = stats.protocol;
        let recovery = p.last_recovery.map_or("-".to_string(), |d| {
            format!("{:.1}ms", d.as_secs_f64() * 1e3)
        });
        let got = subscriber.read(|s| s.stream(0).map(|v| short_hex(&digest(v.state))));
        tracing::debug!(subscriber = i, stats = ?stats, "final counters");
        println!(
            "subscriber {i}: {} applied {} gaps {} lost {} recoveries {} (last {recovery}) stale-leaf events {} snapshot leaves replaced {} removed {} malformed {} kernel drops {} digest {}",
            if ok { "converged" } else { "DIVERGED" },
            p.deltas_applied,
            p.gaps,
            p.messages_lost,
            p.recoveries,
            p.stale_leaves,
            p.snapshot_replaced,
            p.snapshot_removed,
            p.malformed,
            stats.kernel_drops,
            got.unwrap_or_else(|| "none".into())
        );
    }
    let cycles = snapshotter.shutdown().cycles;
    let pub_stats = publisher.shutdown();
    println!(
        "publisher: {} deltas in {} datagrams ({:.1} per datagram), {} snapshot cycles",
        pub_stats.deltas,
        pub_stats.datagrams,
        pub_stats.deltas as f64 / pub_stats.datagrams.max(1) as f64,
        cycles
    );
    println!(
        "converged: {converged}/{} subscribers, digest {}",
        subscribers.len(),
        short_hex(&want)
    );
    Ok(converged == subscribers.len())
}

fn report(started: Instant, published: u64, subscribers: &[Subscriber<OrderBook>], cycles: u64) {
    let elapsed = started.elapsed().as_secs_f64();
    let mut live = 0;
    let (mut applied, mut gaps, mut lost, mut recoveries, mut stale) = (0, 0, 0, 0, 0);
    let mut leaves = 0;
    for subscriber in subscribers {
        let p = subscriber.stats().protocol;
        applied += p.deltas_applied;
        gaps += p.gaps;
        lost += p.messages_lost;
        recoveries += p.recoveries;
        let (is_live, stale_now, leaves_now) = subscriber.read(|s| {
            (
                s.is_live(),
                s.streams().map(|v| v.stale.len()).sum::<usize>(),
                s.streams().map(|v| v.state.len()).sum::<usize>(),
            )
        });
        live += usize::from(is_live);
        stale += stale_now;
        leaves += leaves_now;
    }
    // Under steady loss a stream is rarely wholly live, yet almost every leaf is trusted:
    // show both.
    let trusted = if leaves == 0 {
        100.0
    } else {
        100.0 * (leaves - stale.min(leaves)) as f64 / leaves as f64
    };
    let line = format!(
        "[{elapsed:5.1}s] published {published} ({:.0}/s) | live {live}/{} leaves trusted {trusted:.2} % (stale now {stale}) | applied {applied} gaps {gaps} lost {lost} recoveries {recoveries} | snapshot cycles {cycles}",
        published as f64 / elapsed.max(1e-9),
        subscribers.len()
    );
    println!("{line}");
    // A closed stdout only loses the progress line.
    let _ = std::io::stdout().flush();
}
