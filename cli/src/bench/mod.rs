//! `grapevine bench`: GrapeVine against raw UDP multicast, measured side by side in one run.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use clap::{Args, Subcommand};
use grapevine::core::state::KeyedMap;
use serde_json::json;

mod fanout;
mod latency;
mod recovery;
mod repeater;
mod throughput;

/// A state of `u32` keys and opaque payloads: what the throughput bench publishes.
type PayloadMap = KeyedMap<u32, Bytes>;

#[derive(Debug, Subcommand)]
pub(crate) enum BenchCommand {
    /// Messages per second from one publisher to one subscriber, against raw UDP with the same
    /// packing and syscalls.
    Throughput(ThroughputArgs),
    /// Time from a forced gap to live again, and the snapshot bandwidth used.
    Recovery(RecoveryArgs),
    /// Round-trip time between two processes over two groups, against raw UDP.
    Latency(latency::LatencyArgs),
    /// The far end of `latency` (started by it).
    #[command(hide = true)]
    Echo(latency::EchoArgs),
    /// What a repeater pair costs: latency and throughput through it against direct.
    Repeater(repeater::RepeaterBenchArgs),
    /// One publisher to several subscriber processes, paced by the slowest: each one's rate
    /// against a single subscriber process's.
    Fanout(fanout::FanoutArgs),
    /// One subscriber process of `fanout` (started by it).
    #[command(hide = true)]
    FanoutSubscriber(fanout::FanoutSubscriberArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ThroughputArgs {
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0, value_parser = crate::values::seconds, allow_negative_numbers = true)]
    seconds: f64,
    /// Distinct keys the messages update.
    #[arg(long, default_value_t = 10_000)]
    keys: u32,
    /// Group and port (loopback).
    #[arg(long, default_value = "239.255.77.1:47700", value_parser = crate::values::group)]
    group: SocketAddr,
    /// Bytes of messages the sender may be ahead of the receiver (a credit window, so that
    /// the figure is the rate sustained without loss); 0 sends open-loop, as fast as it can.
    #[arg(long, default_value_t = 1 << 20)]
    window: u64,
    /// A snapshotter cycles the state on the publisher's group at this many leaves per
    /// second, as in a deployment (its datagrams share the link and the subscriber's
    /// socket); 0 runs none.
    #[arg(long, default_value_t = 10_000, value_parser = crate::values::rate_u32, allow_negative_numbers = true)]
    snapshot_rate: u32,
    /// Also run GrapeVine with every datagram signed and verified, and report the cost.
    #[arg(long)]
    auth: bool,
    /// Also run GrapeVine with every datagram signed with the publisher's ed25519 key and
    /// verified with its public key, and report the cost.
    #[arg(long)]
    auth_ed25519: bool,
    /// Also run GrapeVine with a dense state (`DenseMap`: slots in an array) on both sides,
    /// beside the default `KeyedMap` (a tree), and report both.
    #[arg(long)]
    dense: bool,
    /// Also run GrapeVine with the publisher given pre-encoded deltas
    /// (`Publisher::publish_encoded`: bytes out as they are, decoded once for the state).
    #[arg(long)]
    pre_encoded: bool,
    /// Send without UDP segmentation offload (one datagram per message), GrapeVine and the
    /// raw baseline alike; by default both send runs of equal-size datagrams segmented.
    #[arg(long)]
    no_gso: bool,
    /// Receive without UDP receive coalescing (`UDP_GRO`), GrapeVine and the raw baseline
    /// alike; by default both receive runs sent segmented as one buffer each.
    #[arg(long)]
    no_gro: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug)]
pub(crate) struct RecoveryArgs {
    /// Leaves in the state.
    #[arg(long, default_value_t = 10_000)]
    leaves: u32,
    /// Payload bytes per leaf.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Snapshot rate in leaves per second.
    #[arg(long, default_value_t = 100_000, value_parser = crate::values::rate_u32, allow_negative_numbers = true)]
    snapshot_rate: u32,
    /// Forced gaps to measure.
    #[arg(long, default_value_t = 30)]
    rounds: u32,
    /// Group and port (loopback).
    #[arg(long, default_value = "239.255.77.2:47701", value_parser = crate::values::group)]
    group: SocketAddr,
    /// Turn on repair by request (a repair group on the next port): the lost datagram is
    /// asked for and resent instead of waiting for the snapshot cycle.
    #[arg(long)]
    repair: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Ends a bench at Ctrl-C: an error, so no partial figure is printed as if it were whole.
fn check_interrupted() -> Result<()> {
    if crate::interrupted() {
        anyhow::bail!("interrupted: no figures");
    }
    Ok(())
}

pub(crate) fn run(command: &BenchCommand) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: a debug build; run `cargo run --release -- bench ...` for real figures"
        );
    }
    match command {
        BenchCommand::Throughput(args) => throughput::throughput(args),
        BenchCommand::Recovery(args) => recovery::recovery(args),
        BenchCommand::Latency(args) => latency::latency(args),
        BenchCommand::Echo(args) => latency::echo(args),
        BenchCommand::Repeater(args) => repeater::repeater(args),
        BenchCommand::Fanout(args) => fanout::fanout(args),
        BenchCommand::FanoutSubscriber(args) => fanout::fanout_subscriber(args),
    }
}

/// What one side of a throughput run measured.
#[derive(Debug, Default)]
struct Measured {
    sent: u64,
    received: u64,
    datagrams: u64,
    seconds: f64,
    cpu_seconds: f64,
    kernel_drops: u64,
    /// Messages the receiver itself knows it lost (GrapeVine's gap accounting; raw UDP has none).
    counted_lost: Option<u64>,
    /// Sends the publisher saw fail or stop part-way.
    send_errors: u64,
    /// Incomplete fragmented messages the subscriber gave up on (its own buffers).
    fragments_dropped: u64,
    /// Snapshot datagrams sent during the run.
    snapshot_datagrams: u64,
}

impl Measured {
    fn rate(&self) -> f64 {
        self.received as f64 / self.seconds
    }

    fn loss(&self) -> f64 {
        1.0 - self.received as f64 / self.sent.max(1) as f64
    }

    fn json(&self, payload: usize) -> serde_json::Value {
        json!({
            "sent": self.sent,
            "received": self.received,
            "datagrams": self.datagrams,
            "seconds": self.seconds,
            "messages_per_second": self.rate(),
            "megabytes_per_second": self.rate() * payload as f64 / 1e6,
            "loss": self.loss(),
            "cpu_percent": self.cpu_seconds / self.seconds * 100.0,
            "kernel_drops": self.kernel_drops,
            "counted_lost": self.counted_lost,
            "lost_by_cause": {
                "kernel_dropped_datagrams": self.kernel_drops,
                "send_errors": self.send_errors,
                "fragments_dropped": self.fragments_dropped,
                "declared_by_protocol": self.counted_lost,
            },
            "snapshot_datagrams": self.snapshot_datagrams,
        })
    }
}

/// The `q` quantile (0..=1) of sorted samples, by the nearest rank; zero for none. Every
/// bench reports its percentiles through this one rule. (Samples are kept exactly, at most
/// a few hundred thousand per run, so a histogram would only add rounding.)
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = (sorted.len().saturating_sub(1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted.get(rank).copied().unwrap_or_default()
}

/// Publishes for `duration`, as fast as the receivers let: deltas of `payload` on keys cycling
/// through `args.keys`, 256 per batch (taken from `encoded`, one per key, when it is not
/// empty), never more than `window` messages ahead of `received()` (0: open loop). Returns
/// how many were sent and how long it took.
fn publish_paced<S>(
    publisher: &grapevine::publisher::Publisher<S>,
    args: &ThroughputArgs,
    payload: &Bytes,
    encoded: &[Vec<u8>],
    duration: Duration,
    window: u64,
    received: impl Fn() -> u64,
) -> Result<(u64, f64)>
where
    S: grapevine::core::state::ReplicatedState<
        Delta = grapevine::core::state::MapDelta<u32, Bytes>,
    >,
{
    let keys = args.keys.max(1);
    let started = Instant::now();
    let (mut sent, mut key) = (0u64, 0u32);
    while started.elapsed() < duration && !crate::interrupted() {
        if window > 0 && sent.saturating_sub(received()) > window {
            // The receivers lag: flush what is batched and let them catch up.
            publisher.flush();
            wait_for_credit(sent, window, &received, started + duration);
            continue;
        }
        let mut next_key = || {
            key = (key + 1) % keys;
            key
        };
        if encoded.is_empty() {
            publisher.publish_all(
                (0..256)
                    .map(|_| grapevine::core::state::MapDelta::Put(next_key(), payload.clone())),
            )?;
        } else {
            publisher.publish_encoded((0..256).map(|_| encoded[next_key() as usize].as_slice()))?;
        }
        sent += 256;
    }
    publisher.flush();
    Ok((sent, started.elapsed().as_secs_f64()))
}

/// Returns once the receivers are at most half a `window` of messages behind `sent`, or at
/// `deadline`. It sleeps rather than spins: with more busy threads than cores (a publisher,
/// repeaters, a subscriber on two), a sender polling for credit takes the CPU the receivers
/// need to grant it.
fn wait_for_credit(sent: u64, window: u64, received: impl Fn() -> u64, deadline: Instant) {
    while sent.saturating_sub(received()) > window / 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(20));
    }
}

fn payload_bytes(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| i as u8).collect::<Vec<u8>>())
}

/// User + system CPU time of this process so far.
fn process_cpu_seconds() -> f64 {
    // /proc/self/stat fields 14 and 15 are utime and stime in clock ticks (100 Hz on Linux).
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / 100.0
}

/// Resident memory of this process, in MiB.
fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let samples: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(quantile(&samples, 0.0), Duration::from_micros(1));
        assert_eq!(quantile(&samples, 0.5), Duration::from_micros(51));
        assert_eq!(quantile(&samples, 0.99), Duration::from_micros(99));
        assert_eq!(quantile(&samples, 1.0), Duration::from_micros(100));
        assert_eq!(quantile(&[], 0.5), Duration::ZERO);
    }
}
