//! `bench repeater`: latency and throughput through a repeater pair against direct.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Args, ValueEnum};
use grapevine::core::net::MulticastConfig;
use grapevine::core::state::{KeyedMap, MapDelta};
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::subscriber::{Subscriber, SubscriberOptions};
use serde_json::json;

use super::throughput::throughput_between;
use super::{quantile, PayloadMap, ThroughputArgs};

/// One-way delivery times of `count` single deltas from a publisher on `group` to a subscriber
/// on `subscribe_on`, each sent after the previous arrived.
fn delivery_times(
    group: &MulticastConfig,
    subscribe_on: &MulticastConfig,
    count: u32,
) -> Result<Vec<Duration>> {
    let mut options = SubscriberOptions::new(2, subscribe_on.clone());
    options.session.emit_applied = false;
    let subscriber = Subscriber::<KeyedMap<u32, u64>>::join(options)?;
    let publisher = Publisher::start(
        PublisherOptions::new(2, group.clone()),
        KeyedMap::<u32, u64>::default(),
    )?;
    let mut times = Vec::with_capacity(count as usize);
    for i in 0..count + 100 {
        let before = subscriber.processed();
        let sent = Instant::now();
        publisher.publish(MapDelta::Put(i % 64, u64::from(i)))?;
        publisher.flush();
        while subscriber.processed() == before {
            if sent.elapsed() > Duration::from_secs(2) {
                bail!("delta {i} never arrived");
            }
            std::hint::spin_loop();
        }
        if i >= 100 {
            times.push(sent.elapsed());
        }
    }
    times.sort();
    Ok(times)
}

/// How the pair's repeaters talk to each other.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub(crate) enum Wan {
    /// Plain UDP.
    Udp,
    /// QUIC datagrams, congestion-controlled, keyed with a throw-away network key.
    Quic,
}

/// `bench repeater`.
#[derive(Args, Debug)]
pub(crate) struct RepeaterBenchArgs {
    #[command(flatten)]
    throughput: ThroughputArgs,
    /// The link between the pair.
    #[arg(long, value_enum, default_value_t = Wan::Udp)]
    wan: Wan,
}

pub(super) fn repeater(bench: &RepeaterBenchArgs) -> Result<()> {
    use grapevine::repeater::{Repeater, RepeaterOptions, WanTransport};
    let args = &bench.throughput;
    let keyring = std::sync::Arc::new(grapevine::core::auth::Keyring::single(1, rand::random()));
    let options = |group: &MulticastConfig, listen: SocketAddr, peers: Vec<SocketAddr>| {
        let mut options = RepeaterOptions::new(group.clone(), listen, peers);
        if matches!(bench.wan, Wan::Quic) {
            options.wan = WanTransport::Quic;
            // Only the link is keyed: the publisher does not sign, so the relay checks nothing.
            options.link_key = Some(std::sync::Arc::clone(&keyring));
        }
        options
    };
    let near = MulticastConfig::new(args.group);
    let mut far_group = args.group;
    far_group.set_port(args.group.port().wrapping_add(1));
    let far = MulticastConfig::new(far_group);
    let mut direct_group = args.group;
    direct_group.set_port(args.group.port().wrapping_add(2));
    let direct = MulticastConfig::new(direct_group);
    let a: SocketAddr = "127.0.0.1:0".parse()?;
    let left = Repeater::start(options(&near, a, vec![]))?;
    // The pair needs each other's ports: start the far one first, then restart the near one
    // pointing at it.
    let right = Repeater::start(options(&far, a, vec![left.listen_address()]))?;
    let left_address = left.listen_address();
    drop(left);
    let left = Repeater::start(options(&near, left_address, vec![right.listen_address()]))?;
    // A QUIC pair connects before the measurement starts.
    let connected = Instant::now();
    while left.links().iter().any(|link| !link.up) && connected.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let duration = Duration::from_secs_f64(args.seconds.max(0.1));
    let window = (args.window / (args.payload as u64 + 32)).max(1);
    let direct_times = delivery_times(&direct, &direct, 2_000)?;
    let repeated_times = delivery_times(&near, &far, 2_000)?;
    let (plain, _) =
        throughput_between::<PayloadMap>(args, &direct, &direct, duration, window, None, false)?;
    let (through, _) =
        throughput_between::<PayloadMap>(args, &near, &far, duration, window, None, false)?;
    let p = |t: &[Duration], q: f64| quantile(t, q).as_secs_f64() * 1e6;
    if args.json {
        println!(
            "{}",
            json!({
                "bench": "repeater",
                "wan": format!("{:?}", bench.wan).to_lowercase(),
                "direct_p50_us": p(&direct_times, 0.5), "direct_p99_us": p(&direct_times, 0.99),
                "repeated_p50_us": p(&repeated_times, 0.5), "repeated_p99_us": p(&repeated_times, 0.99),
                "direct": plain.json(args.payload), "repeated": through.json(args.payload),
                "throughput_ratio": through.rate() / plain.rate().max(1.0),
                "near_repeater": left.stats(),
                "far_repeater": right.stats(),
            })
        );
        return Ok(());
    }
    println!(
        "repeater pair on loopback (group -> repeater -> {} -> repeater -> group)",
        match bench.wan {
            Wan::Udp => "unicast UDP",
            Wan::Quic => "QUIC",
        }
    );
    println!(
        "  delivery, one delta at a time: direct p50 {:.1} us p99 {:.1} us; through the pair p50 {:.1} us p99 {:.1} us (+{:.1} us at p50)",
        p(&direct_times, 0.5),
        p(&direct_times, 0.99),
        p(&repeated_times, 0.5),
        p(&repeated_times, 0.99),
        p(&repeated_times, 0.5) - p(&direct_times, 0.5)
    );
    println!(
        "  throughput, {} B: direct {:.0} msgs/s, through the pair {:.0} msgs/s (ratio {:.2}, loss {:.1} %)",
        args.payload,
        plain.rate(),
        through.rate(),
        through.rate() / plain.rate().max(1.0),
        through.loss() * 100.0
    );
    for (side, stats) in [("near", left.stats()), ("far", right.stats())] {
        println!(
            "  {side} repeater: out {} in {} loops {} duplicates {} kernel drops {} send errors {} congestion drops {}",
            stats.relayed_out,
            stats.relayed_in,
            stats.loops,
            stats.duplicates,
            stats.kernel_drops,
            stats.send_errors,
            stats.congestion_drops
        );
    }
    Ok(())
}
