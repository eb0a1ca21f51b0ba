//! `grapevine bench`: GrapeVine against raw UDP multicast, measured side by side in one run.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use clap::{Args, Subcommand};
use grapevine::core::auth::Keyring;
use grapevine::core::net::{MulticastConfig, MulticastSocket, RecvBatch};
use grapevine::core::proto::SnapshotRate;
use grapevine::core::state::{digest, KeyedMap, MapDelta};
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine::subscriber::{Subscriber, SubscriberOptions};
use serde_json::json;

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
    Latency(LatencyArgs),
    /// The far end of `latency` (started by it).
    #[command(hide = true)]
    Echo(EchoArgs),
    /// What a repeater pair costs: latency and throughput through it against direct.
    Repeater(ThroughputArgs),
}

#[derive(Args, Debug)]
pub(crate) struct ThroughputArgs {
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Distinct keys the messages update.
    #[arg(long, default_value_t = 10_000)]
    keys: u32,
    /// Group and port (loopback).
    #[arg(long, default_value = "239.255.77.1:47700")]
    group: SocketAddr,
    /// Bytes of messages the sender may be ahead of the receiver (a credit window, so that
    /// the figure is the rate sustained without loss); 0 sends open-loop, as fast as it can.
    #[arg(long, default_value_t = 1 << 20)]
    window: u64,
    /// A snapshotter cycles the state on the publisher's group at this many leaves per
    /// second, as in a deployment (its datagrams share the link and the subscriber's
    /// socket); 0 runs none.
    #[arg(long, default_value_t = 10_000)]
    snapshot_rate: u32,
    /// Also run GrapeVine with every datagram signed and verified, and report the cost.
    #[arg(long)]
    auth: bool,
    /// Also run GrapeVine with every datagram signed with the publisher's ed25519 key and
    /// verified with its public key, and report the cost.
    #[arg(long)]
    auth_ed25519: bool,
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
    #[arg(long, default_value_t = 100_000)]
    snapshot_rate: u32,
    /// Forced gaps to measure.
    #[arg(long, default_value_t = 30)]
    rounds: u32,
    /// Group and port (loopback).
    #[arg(long, default_value = "239.255.77.2:47701")]
    group: SocketAddr,
    /// Turn on repair by request (a repair group on the next port): the lost datagram is
    /// asked for and resent instead of waiting for the snapshot cycle.
    #[arg(long)]
    repair: bool,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

pub(crate) fn run(command: &BenchCommand) -> Result<()> {
    if cfg!(debug_assertions) {
        eprintln!(
            "warning: a debug build; run `cargo run --release -- bench ...` for real figures"
        );
    }
    match command {
        BenchCommand::Throughput(args) => throughput(args),
        BenchCommand::Recovery(args) => recovery(args),
        BenchCommand::Latency(args) => latency(args),
        BenchCommand::Echo(args) => echo(args),
        BenchCommand::Repeater(args) => repeater(args),
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

fn throughput(args: &ThroughputArgs) -> Result<()> {
    if args.payload == 0 || args.payload > 60_000 {
        bail!("--payload must be 1..=60000 bytes");
    }
    let duration = Duration::from_secs_f64(args.seconds.max(0.1));
    // The window in messages: what `window` bytes of framed messages hold.
    let window = if args.window == 0 {
        0
    } else {
        (args.window / (args.payload as u64 + 32)).max(1)
    };
    let group = MulticastConfig::new(args.group);
    let (gv, per_datagram) = throughput_grapevine(args, &group, duration, window, None)?;
    let signed = if args.auth {
        let keyring = Arc::new(Keyring::single(1, rand::random()));
        let mut signed_group = args.group;
        signed_group.set_port(args.group.port().wrapping_add(2));
        let group = MulticastConfig::new(signed_group);
        Some(throughput_grapevine(args, &group, duration, window, Some(keyring))?.0)
    } else {
        None
    };
    let ed25519 = if args.auth_ed25519 {
        let keyring = Arc::new(Keyring::ed25519_secret(1, rand::random()));
        let mut signed_group = args.group;
        signed_group.set_port(args.group.port().wrapping_add(3));
        let group = MulticastConfig::new(signed_group);
        Some(throughput_grapevine(args, &group, duration, window, Some(keyring))?.0)
    } else {
        None
    };
    // Raw UDP with exactly GrapeVine's packing: as many messages of the same payload per
    // datagram, sent with the same sendmmsg batches, on another port.
    let mut raw_group = args.group;
    raw_group.set_port(args.group.port().wrapping_add(1));
    let raw = throughput_raw(
        &MulticastConfig::new(raw_group),
        args.payload,
        per_datagram.max(1),
        duration,
        window,
    )?;
    let ratio = gv.rate() / raw.rate().max(1.0);
    if args.json {
        println!(
            "{}",
            json!({
                "bench": "throughput",
                "payload": args.payload,
                "messages_per_datagram": per_datagram,
                "window": args.window,
                "grapevine": gv.json(args.payload),
                "raw": raw.json(args.payload),
                "ratio": ratio,
                "grapevine_signed": signed.as_ref().map(|m| m.json(args.payload)),
                "auth_ratio": signed.as_ref().map(|m| m.rate() / gv.rate().max(1.0)),
                "grapevine_ed25519": ed25519.as_ref().map(|m| m.json(args.payload)),
                "ed25519_ratio": ed25519.as_ref().map(|m| m.rate() / gv.rate().max(1.0)),
            })
        );
        return Ok(());
    }
    let mode = if args.window == 0 {
        "open loop".to_string()
    } else {
        format!("sender at most {} KiB ahead", args.window / 1024)
    };
    println!(
        "throughput, {} B payloads, {per_datagram} messages per datagram, {:.1} s each, loopback multicast, {mode}",
        args.payload, args.seconds
    );
    let mut rows = vec![("grapevine", &gv), ("raw udp", &raw)];
    if let Some(signed) = &signed {
        rows.insert(1, ("signed", signed));
    }
    for (name, m) in rows {
        println!(
            "  {name:<10} {:>10.0} msgs/s {:>8.1} MB/s  loss {:>5.1} %  cpu {:>5.1} %  kernel drops {}{}",
            m.rate(),
            m.rate() * args.payload as f64 / 1e6,
            m.loss() * 100.0,
            m.cpu_seconds / m.seconds * 100.0,
            m.kernel_drops,
            m.counted_lost
                .map_or(String::new(), |n| format!("  lost and counted by the subscriber {n}"))
        );
    }
    println!("ratio: {ratio:.2}");
    if let Some(signed) = &signed {
        println!(
            "authentication (keyed BLAKE3 on every datagram, verified with a replay window): {:.2} of unsigned",
            signed.rate() / gv.rate().max(1.0)
        );
    }
    if let Some(signed) = &ed25519 {
        println!(
            "publisher signatures (ed25519 on every datagram, verified with the public key): {:.2} of unsigned ({:.0} msgs/s)",
            signed.rate() / gv.rate().max(1.0),
            signed.rate()
        );
    }
    Ok(())
}

/// The `q` quantile (0..=1) of sorted samples, by the nearest rank; zero for none. Every
/// bench reports its percentiles through this one rule. (Samples are kept exactly, at most
/// a few hundred thousand per run, so a histogram would only add rounding.)
fn quantile(sorted: &[Duration], q: f64) -> Duration {
    let rank = (sorted.len().saturating_sub(1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
    sorted.get(rank).copied().unwrap_or_default()
}

fn payload_bytes(size: usize) -> Bytes {
    Bytes::from((0..size).map(|i| i as u8).collect::<Vec<u8>>())
}

fn throughput_grapevine(
    args: &ThroughputArgs,
    group: &MulticastConfig,
    duration: Duration,
    window: u64,
    keyring: Option<Arc<Keyring>>,
) -> Result<(Measured, u64)> {
    throughput_between(args, group, group, duration, window, keyring)
}

/// As `throughput_grapevine`, with the subscriber on `subscribe_on` (a repeater's far side).
fn throughput_between(
    args: &ThroughputArgs,
    group: &MulticastConfig,
    subscribe_on: &MulticastConfig,
    duration: Duration,
    window: u64,
    keyring: Option<Arc<Keyring>>,
) -> Result<(Measured, u64)> {
    let mut options = SubscriberOptions::new(1, subscribe_on.clone());
    options.session.emit_applied = false;
    options.session.keyring = keyring.clone();
    options.batch = 64;
    let subscriber = Subscriber::<PayloadMap>::join(options)?;
    let mut publisher_options = PublisherOptions::new(1, group.clone());
    publisher_options.session.heartbeat_interval = Duration::from_millis(50);
    publisher_options.session.keyring = keyring;
    let publisher = Publisher::start(publisher_options, PayloadMap::default())?;
    let snapshotter = if args.snapshot_rate > 0 {
        let mut options = SnapshotterOptions::new(group.clone());
        options.snapshot.rate = SnapshotRate::LeavesPerSecond(args.snapshot_rate);
        Some(Snapshotter::start(&publisher, options)?)
    } else {
        None
    };
    let payload = payload_bytes(args.payload);
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let mut sent = 0u64;
    let mut key = 0u32;
    while started.elapsed() < duration {
        if window > 0 && sent.saturating_sub(subscriber.processed()) > window {
            // The receiver lags: flush what is batched and let it catch up.
            publisher.flush();
            std::thread::yield_now();
            continue;
        }
        let batch = (0..256).map(|_| {
            key = (key + 1) % args.keys.max(1);
            MapDelta::Put(key, payload.clone())
        });
        publisher.publish_all(batch)?;
        sent += 256;
    }
    publisher.flush();
    let seconds = started.elapsed().as_secs_f64();
    // Let the subscriber drain what is in flight (bounded).
    let drained_by = Instant::now() + Duration::from_millis(500);
    let mut last = 0;
    while Instant::now() < drained_by {
        std::thread::sleep(Duration::from_millis(20));
        let now_received = subscriber.processed();
        if now_received == last {
            break;
        }
        last = now_received;
    }
    let cpu_seconds = process_cpu_seconds() - cpu_before;
    let stats = subscriber.stats();
    let datagrams = publisher.stats().datagrams;
    let snapshot_datagrams = snapshotter.map_or(0, |snapshotter| snapshotter.shutdown().datagrams);
    let measured = Measured {
        sent,
        received: subscriber.processed(),
        datagrams,
        seconds,
        cpu_seconds,
        kernel_drops: stats.kernel_drops,
        counted_lost: Some(stats.protocol.messages_lost),
        send_errors: publisher.send_errors(),
        fragments_dropped: stats.protocol.fragments_dropped,
        snapshot_datagrams,
    };
    drop(subscriber);
    let per_datagram = ((sent as f64 / datagrams.max(1) as f64).round() as u64).max(1);
    publisher.shutdown();
    Ok((measured, per_datagram))
}

fn throughput_raw(
    group: &MulticastConfig,
    payload: usize,
    per_datagram: u64,
    duration: Duration,
    window: u64,
) -> Result<Measured> {
    let receiver = MulticastSocket::receiver(group)?;
    let sender = MulticastSocket::sender(group)?;
    // Same framing cost as a GrapeVine message: a 4-byte header and 16 bytes of seq/prev.
    let message = 20 + payload;
    let datagram = Bytes::from(vec![7u8; 24 + message * per_datagram as usize]);
    let batch: Vec<Bytes> = (0..16).map(|_| datagram.clone()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let received = Arc::new(AtomicU64::new(0));
    let drops = Arc::new(AtomicU64::new(0));
    let reader = {
        let (stop, received, drops) =
            (Arc::clone(&stop), Arc::clone(&received), Arc::clone(&drops));
        std::thread::spawn(move || {
            let mut buffers = RecvBatch::new(64, 65_536);
            let mut checksum = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let n = receiver
                    .recv_batch(&mut buffers, Duration::from_millis(20))
                    .unwrap_or(0);
                for bytes in buffers.datagrams().take(n) {
                    // Touch every message, as a receiver would.
                    for m in bytes.chunks(message) {
                        checksum = checksum.wrapping_add(u64::from(m[0]));
                    }
                    received.fetch_add(per_datagram, Ordering::Relaxed);
                }
                drops.store(u64::from(buffers.kernel_drops()), Ordering::Relaxed);
            }
            checksum
        })
    };
    let cpu_before = process_cpu_seconds();
    let started = Instant::now();
    let mut datagrams = 0u64;
    while started.elapsed() < duration {
        let sent = datagrams * per_datagram;
        if window > 0 && sent.saturating_sub(received.load(Ordering::Relaxed)) > window {
            std::thread::yield_now();
            continue;
        }
        datagrams += sender.send_batch(&batch).context("raw send")? as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    let _ = reader.join();
    Ok(Measured {
        sent: datagrams * per_datagram,
        received: received.load(Ordering::Relaxed),
        datagrams,
        seconds,
        cpu_seconds: process_cpu_seconds() - cpu_before,
        kernel_drops: drops.load(Ordering::Relaxed),
        counted_lost: None,
        ..Measured::default()
    })
}

fn recovery(args: &RecoveryArgs) -> Result<()> {
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

#[derive(Args, Debug)]
pub(crate) struct LatencyArgs {
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Round trips to measure (after 1 000 of warm-up).
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Spin instead of sleeping while waiting (both sides, both stacks).
    #[arg(long)]
    busy_poll: bool,
    /// Group of the pings; the pongs go to the next port.
    #[arg(long, default_value = "239.255.77.3:47710")]
    group: SocketAddr,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The far end of `bench latency`, started as a child process.
#[derive(Args, Debug)]
pub(crate) struct EchoArgs {
    /// `grapevine` or `raw`.
    #[arg(long)]
    stack: String,
    #[arg(long)]
    payload: usize,
    #[arg(long)]
    busy_poll: bool,
    /// Group the pings arrive on.
    #[arg(long)]
    ping: SocketAddr,
    /// Group the pongs go to.
    #[arg(long)]
    pong: SocketAddr,
    /// Round trips to serve before exiting.
    #[arg(long)]
    count: u64,
}

const WARM_UP: u64 = 1_000;
/// A round trip that takes longer than this counts as lost and ends the run.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(2);

fn latency(args: &LatencyArgs) -> Result<()> {
    let mut pong = args.group;
    pong.set_port(args.group.port().wrapping_add(1));
    let total = args.count + WARM_UP;
    let mut results = Vec::new();
    for stack in ["raw", "grapevine"] {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["bench", "echo", "--stack", stack, "--payload"])
            .arg(args.payload.to_string())
            .args([
                "--ping",
                &args.group.to_string(),
                "--pong",
                &pong.to_string(),
            ])
            .args(["--count", &total.to_string()])
            .args(args.busy_poll.then_some("--busy-poll"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the echo process")?;
        // Let the echo join its group before the first ping.
        std::thread::sleep(Duration::from_millis(300));
        let times = if stack == "raw" {
            ping_raw(args, pong, total)
        } else {
            ping_grapevine(args, pong, total)
        };
        let _ = child.kill();
        let _ = child.wait();
        let mut times = times?;
        times.drain(..(WARM_UP as usize).min(times.len()));
        times.sort_unstable();
        results.push((stack, times));
    }
    let quantile = |times: &[Duration], q: f64| quantile(times, q).as_secs_f64() * 1e6;
    let figures = |times: &[Duration]| {
        json!({
            "count": times.len(),
            "p50_us": quantile(times, 0.5),
            "p99_us": quantile(times, 0.99),
            "p999_us": quantile(times, 0.999),
            "max_us": quantile(times, 1.0),
        })
    };
    let (raw, gv) = (&results[0].1, &results[1].1);
    let ratio_p50 = quantile(gv, 0.5) / quantile(raw, 0.5).max(1e-9);
    let ratio_p99 = quantile(gv, 0.99) / quantile(raw, 0.99).max(1e-9);
    if args.json {
        println!(
            "{}",
            json!({
                "bench": "latency",
                "payload": args.payload,
                "busy_poll": args.busy_poll,
                "grapevine": figures(gv),
                "raw": figures(raw),
                "ratio_p50": ratio_p50,
                "ratio_p99": ratio_p99,
            })
        );
        return Ok(());
    }
    println!(
        "latency, {} B ping-pong between two processes over two groups, {} round trips, {}",
        args.payload,
        args.count,
        if args.busy_poll {
            "busy polling"
        } else {
            "blocking"
        }
    );
    for (name, times) in [("grapevine", gv), ("raw udp", raw)] {
        println!(
            "  {name:<10} p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  max {:>8.1} µs",
            quantile(times, 0.5),
            quantile(times, 0.99),
            quantile(times, 0.999),
            quantile(times, 1.0)
        );
    }
    println!("ratio: p50 {ratio_p50:.2}, p99 {ratio_p99:.2}");
    Ok(())
}

fn ping_raw(args: &LatencyArgs, pong: SocketAddr, total: u64) -> Result<Vec<Duration>> {
    let sender = MulticastSocket::sender(&MulticastConfig::new(args.group))?;
    let receiver = MulticastSocket::receiver(&MulticastConfig::new(pong))?;
    let mut batch = RecvBatch::new(1, 65_536);
    let mut message = vec![0u8; args.payload.max(8)];
    let mut times = Vec::with_capacity(total as usize);
    let wait = if args.busy_poll {
        Duration::ZERO
    } else {
        Duration::from_millis(100)
    };
    for i in 0..total {
        message[..8].copy_from_slice(&i.to_be_bytes());
        let t0 = Instant::now();
        sender.send(&message)?;
        loop {
            if t0.elapsed() > ROUND_TRIP_TIMEOUT {
                bail!("raw round trip {i} lost");
            }
            if receiver.recv_batch(&mut batch, wait)? == 0 {
                continue;
            }
            let back = batch.datagrams().next().unwrap_or_default();
            if back.get(..8) == Some(&i.to_be_bytes()[..]) {
                break;
            }
        }
        times.push(t0.elapsed());
    }
    Ok(times)
}

fn ping_grapevine(args: &LatencyArgs, pong: SocketAddr, total: u64) -> Result<Vec<Duration>> {
    let mut options = PublisherOptions::new(1, MulticastConfig::new(args.group));
    options.session.flush_delay = Duration::ZERO;
    let publisher = Publisher::start(options, PayloadMap::default())?;
    let sub_options = SubscriberOptions::new(2, MulticastConfig::new(pong));
    let mut pongs = Pongs::join(sub_options, args.busy_poll)?;
    let payload = payload_bytes(args.payload);
    let mut times = Vec::with_capacity(total as usize);
    for i in 0..total {
        let key = (i % 1024) as u32;
        let t0 = Instant::now();
        publisher.publish(MapDelta::Put(key, payload.clone()))?;
        loop {
            if t0.elapsed() > ROUND_TRIP_TIMEOUT {
                bail!("grapevine round trip {i} lost");
            }
            if pongs.next_applied()? == Some(key) {
                break;
            }
        }
        times.push(t0.elapsed());
    }
    Ok(times)
}

/// Receives the keys of applied deltas: through the threaded subscriber and its channel
/// (blocking), or an inline subscriber polled on this thread (busy poll).
enum Pongs {
    Threaded(Subscriber<PayloadMap>),
    Inline(
        Box<grapevine::subscriber::InlineSubscriber<PayloadMap>>,
        Vec<u32>,
    ),
}

impl Pongs {
    fn join(options: SubscriberOptions, busy_poll: bool) -> Result<Self> {
        Ok(if busy_poll {
            Self::Inline(
                Box::new(grapevine::subscriber::InlineSubscriber::join(options)?),
                Vec::new(),
            )
        } else {
            Self::Threaded(Subscriber::join(options)?)
        })
    }

    /// The key of the next applied delta, if one arrives soon.
    fn next_applied(&mut self) -> Result<Option<u32>> {
        use grapevine::core::proto::SubscriberEvent::Applied;
        match self {
            Self::Threaded(subscriber) => {
                match subscriber.events().recv_timeout(Duration::from_millis(100)) {
                    Ok(Applied { key, .. }) => Ok(Some(key)),
                    _ => Ok(None),
                }
            }
            Self::Inline(subscriber, pending) => {
                if pending.is_empty() {
                    for event in subscriber.poll(Duration::ZERO) {
                        if let Applied { key, .. } = event {
                            pending.push(key);
                        }
                    }
                    pending.reverse();
                }
                Ok(pending.pop())
            }
        }
    }
}

pub(crate) fn echo(args: &EchoArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    if args.stack == "raw" {
        let receiver = MulticastSocket::receiver(&MulticastConfig::new(args.ping))?;
        let sender = MulticastSocket::sender(&MulticastConfig::new(args.pong))?;
        let mut batch = RecvBatch::new(1, 65_536);
        let wait = if args.busy_poll {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        let mut served = 0;
        while served < args.count && Instant::now() < deadline {
            if receiver.recv_batch(&mut batch, wait)? == 1 {
                sender.send(batch.datagrams().next().unwrap_or_default())?;
                served += 1;
            }
        }
        return Ok(());
    }
    let mut options = PublisherOptions::new(2, MulticastConfig::new(args.pong));
    options.session.flush_delay = Duration::ZERO;
    let publisher = Publisher::start(options, PayloadMap::default())?;
    let sub_options = SubscriberOptions::new(1, MulticastConfig::new(args.ping));
    let mut pings = Pongs::join(sub_options, args.busy_poll)?;
    let payload = payload_bytes(args.payload);
    let mut served = 0;
    while served < args.count && Instant::now() < deadline {
        if let Some(key) = pings.next_applied()? {
            publisher.publish(MapDelta::Put(key, payload.clone()))?;
            served += 1;
        }
    }
    Ok(())
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

fn repeater(args: &ThroughputArgs) -> Result<()> {
    use grapevine::repeater::{Repeater, RepeaterOptions};
    let near = MulticastConfig::new(args.group);
    let mut far_group = args.group;
    far_group.set_port(args.group.port().wrapping_add(1));
    let far = MulticastConfig::new(far_group);
    let mut direct_group = args.group;
    direct_group.set_port(args.group.port().wrapping_add(2));
    let direct = MulticastConfig::new(direct_group);
    let a: SocketAddr = "127.0.0.1:0".parse()?;
    let left = Repeater::start(RepeaterOptions::new(near.clone(), a, vec![]))?;
    // The pair needs each other's ports: start the far one first, then restart the near one
    // pointing at it.
    let right = Repeater::start(RepeaterOptions::new(
        far.clone(),
        a,
        vec![left.listen_address()],
    ))?;
    let left_address = left.listen_address();
    drop(left);
    let left = Repeater::start(RepeaterOptions::new(
        near.clone(),
        left_address,
        vec![right.listen_address()],
    ))?;
    let duration = Duration::from_secs_f64(args.seconds.max(0.1));
    let window = (args.window / (args.payload as u64 + 32)).max(1);
    let direct_times = delivery_times(&direct, &direct, 2_000)?;
    let repeated_times = delivery_times(&near, &far, 2_000)?;
    let (plain, _) = throughput_between(args, &direct, &direct, duration, window, None)?;
    let (through, _) = throughput_between(args, &near, &far, duration, window, None)?;
    let p = |t: &[Duration], q: f64| quantile(t, q).as_secs_f64() * 1e6;
    if args.json {
        println!(
            "{}",
            json!({
                "bench": "repeater",
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
    println!("repeater pair on loopback (group -> repeater -> unicast -> repeater -> group)");
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
            "  {side} repeater: out {} in {} loops {} duplicates {} kernel drops {} send errors {}",
            stats.relayed_out,
            stats.relayed_in,
            stats.loops,
            stats.duplicates,
            stats.kernel_drops,
            stats.send_errors
        );
    }
    Ok(())
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
