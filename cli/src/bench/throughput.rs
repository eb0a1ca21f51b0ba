//! `bench throughput`: one publisher to one subscriber, against raw UDP with the same packing.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use grapevine::core::auth::Keyring;
use grapevine::core::net::{MulticastConfig, MulticastSocket, RecvBatch};
use grapevine::core::proto::SnapshotRate;
use grapevine::core::state::{DenseMap, MapDelta, ReplicatedState};
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine::subscriber::{Subscriber, SubscriberOptions};
use serde_json::json;

use super::{payload_bytes, process_cpu_seconds, Measured, PayloadMap, ThroughputArgs};

/// The bench's payloads in a dense state, beside `PayloadMap`'s tree (keys stay below
/// `--keys`, at most 1 000 000).
type DensePayloads = DenseMap<Bytes, 1_000_000>;

pub(super) fn throughput(args: &ThroughputArgs) -> Result<()> {
    if args.payload == 0 || args.payload > 60_000 {
        bail!("--payload must be 1..=60000 bytes");
    }
    if args.dense && args.keys > 1_000_000 {
        bail!("--dense takes at most 1000000 --keys (the dense state's capacity)");
    }
    let duration = Duration::from_secs_f64(args.seconds.max(0.1));
    // The window in messages: what `window` bytes of framed messages hold.
    let window = if args.window == 0 {
        0
    } else {
        (args.window / (args.payload as u64 + 32)).max(1)
    };
    let group = multicast(args, args.group);
    eprintln!(
        "measuring GrapeVine, then raw UDP with the same packing: {:.1} s each ...",
        duration.as_secs_f64()
    );
    let (gv, per_datagram) = throughput_grapevine(args, &group, duration, window, None)?;
    super::check_interrupted()?;
    let dense = if args.dense {
        let mut dense_group = args.group;
        dense_group.set_port(args.group.port().wrapping_add(4));
        let group = multicast(args, dense_group);
        let measured = throughput_between::<DensePayloads>(
            args, &group, &group, duration, window, None, false,
        )?;
        super::check_interrupted()?;
        Some(measured.0)
    } else {
        None
    };
    let pre_encoded = if args.pre_encoded {
        let mut encoded_group = args.group;
        encoded_group.set_port(args.group.port().wrapping_add(5));
        let group = multicast(args, encoded_group);
        let measured =
            throughput_between::<PayloadMap>(args, &group, &group, duration, window, None, true)?;
        super::check_interrupted()?;
        Some(measured.0)
    } else {
        None
    };
    let signed = if args.auth {
        let keyring = Arc::new(Keyring::single(1, rand::random()));
        let mut signed_group = args.group;
        signed_group.set_port(args.group.port().wrapping_add(2));
        let group = multicast(args, signed_group);
        Some(throughput_grapevine(args, &group, duration, window, Some(keyring))?.0)
    } else {
        None
    };
    let ed25519 = if args.auth_ed25519 {
        let keyring = Arc::new(Keyring::ed25519_secret(1, rand::random()));
        let mut signed_group = args.group;
        signed_group.set_port(args.group.port().wrapping_add(3));
        let group = multicast(args, signed_group);
        Some(throughput_grapevine(args, &group, duration, window, Some(keyring))?.0)
    } else {
        None
    };
    // Raw UDP with exactly GrapeVine's packing: as many messages of the same payload per
    // datagram, sent with the same sendmmsg batches, on another port.
    let mut raw_group = args.group;
    raw_group.set_port(args.group.port().wrapping_add(1));
    let raw = throughput_raw(
        &multicast(args, raw_group),
        args.payload,
        per_datagram.max(1),
        duration,
        window,
    )?;
    super::check_interrupted()?;
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
                "grapevine_dense": dense.as_ref().map(|m| m.json(args.payload)),
                "dense_ratio": dense.as_ref().map(|m| m.rate() / raw.rate().max(1.0)),
                "grapevine_pre_encoded": pre_encoded.as_ref().map(|m| m.json(args.payload)),
                "pre_encoded_ratio": pre_encoded.as_ref().map(|m| m.rate() / raw.rate().max(1.0)),
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
    if let Some(dense) = &dense {
        rows.insert(1, ("dense", dense));
    }
    if let Some(encoded) = &pre_encoded {
        rows.insert(1, ("pre-enc", encoded));
    }
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
    if let Some(dense) = &dense {
        println!(
            "ratio with a dense state (DenseMap: slots in an array, no tree): {:.2}",
            dense.rate() / raw.rate().max(1.0)
        );
    }
    if let Some(encoded) = &pre_encoded {
        println!(
            "ratio publishing pre-encoded deltas (Publisher::publish_encoded): {:.2}",
            encoded.rate() / raw.rate().max(1.0)
        );
    }
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

fn throughput_grapevine(
    args: &ThroughputArgs,
    group: &MulticastConfig,
    duration: Duration,
    window: u64,
    keyring: Option<Arc<Keyring>>,
) -> Result<(Measured, u64)> {
    throughput_between::<PayloadMap>(args, group, group, duration, window, keyring, false)
}

/// As `throughput_grapevine`, with the subscriber on `subscribe_on` (a repeater's far side).
pub(super) fn throughput_between<S>(
    args: &ThroughputArgs,
    group: &MulticastConfig,
    subscribe_on: &MulticastConfig,
    duration: Duration,
    window: u64,
    keyring: Option<Arc<Keyring>>,
    pre_encoded: bool,
) -> Result<(Measured, u64)>
where
    S: ReplicatedState<Delta = MapDelta<u32, Bytes>>,
{
    let mut options = SubscriberOptions::new(1, subscribe_on.clone());
    options.session.emit_applied = false;
    options.session.keyring = keyring.clone();
    options.batch = 64;
    let subscriber = Subscriber::<S>::join(options)?;
    let mut publisher_options = PublisherOptions::new(1, group.clone());
    publisher_options.session.heartbeat_interval = Duration::from_millis(50);
    publisher_options.session.keyring = keyring;
    let publisher = Publisher::start(publisher_options, S::default())?;
    let snapshotter = if args.snapshot_rate > 0 {
        let mut options = SnapshotterOptions::new(group.clone());
        options.snapshot.rate = SnapshotRate::LeavesPerSecond(args.snapshot_rate);
        Some(Snapshotter::start(&publisher, options)?)
    } else {
        None
    };
    let payload = payload_bytes(args.payload);
    // A producer that holds its deltas encoded: one per key, encoded before the clock starts.
    let encoded: Vec<Vec<u8>> = if pre_encoded {
        (0..args.keys.max(1))
            .map(|key| {
                let mut bytes = Vec::new();
                grapevine::core::codec::encode_into(
                    &MapDelta::Put(key, payload.clone()),
                    &mut bytes,
                )
                .map(|()| bytes)
            })
            .collect::<Result<_, _>>()?
    } else {
        Vec::new()
    };
    let cpu_before = process_cpu_seconds();
    let (sent, seconds) = super::publish_paced(
        &publisher,
        args,
        &payload,
        &encoded,
        duration,
        window,
        || subscriber.processed(),
    )?;
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
    while started.elapsed() < duration && !crate::interrupted() {
        let sent = datagrams * per_datagram;
        if window > 0 && sent.saturating_sub(received.load(Ordering::Relaxed)) > window {
            super::wait_for_credit(
                sent,
                window,
                || received.load(Ordering::Relaxed),
                started + duration,
            );
            continue;
        }
        datagrams += sender.send_batch(&batch).context("raw send")? as u64;
    }
    let seconds = started.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, Ordering::Relaxed);
    // A panic in the thread was already reported by the panic hook.
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

/// The bench's multicast settings for `group`: on loopback, with segmentation offload unless
/// `--no-gso` and receive coalescing unless `--no-gro`.
fn multicast(args: &ThroughputArgs, group: std::net::SocketAddr) -> MulticastConfig {
    let mut config = MulticastConfig::new(group);
    config.segmentation_offload = !args.no_gso;
    config.receive_offload = !args.no_gro;
    config
}
