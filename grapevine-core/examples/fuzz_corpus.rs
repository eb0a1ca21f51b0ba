//! Writes seed inputs for the `subscriber_session` and `decode_datagram` fuzz targets from real
//! publisher and snapshot traffic, so the fuzzers start from valid datagrams.
//!
//! `cargo run -p grapevine-core --features testing --example fuzz_corpus -- fuzz/corpus`

use std::time::{Duration, Instant};

use grapevine_core::proto::{
    new_session_id, PublisherConfig, PublisherSession, SnapshotConfig, SnapshotSession,
};
use grapevine_core::sim::{CounterDelta, Counters};

fn main() -> std::io::Result<()> {
    let out = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "fuzz/corpus".into());
    let sessions = format!("{out}/subscriber_session");
    let datagrams = format!("{out}/decode_datagram");
    std::fs::create_dir_all(&sessions)?;
    std::fs::create_dir_all(&datagrams)?;
    let now = Instant::now();
    for seed in 0..16u64 {
        let mut config = PublisherConfig::new(1);
        config.max_datagram = 200 + 100 * seed as usize;
        let mut publisher =
            PublisherSession::new(config, new_session_id(seed, seed), Counters::default(), now);
        let mut snapshot = SnapshotSession::new(SnapshotConfig::default());
        let mut traffic = Vec::new();
        let mut t = now;
        for i in 0..40u64 {
            let key = ((i * 7 + seed) % 13) as u8;
            let delta = match i % 5 {
                0 => CounterDelta::Remove(key),
                1 => CounterDelta::Set(key, i as i64),
                _ => CounterDelta::Add(key, 3),
            };
            let _ = publisher.publish(t, delta);
            t += Duration::from_millis(1);
            publisher.handle_timeout(t);
            snapshot.handle_timeout(t, &publisher);
            traffic.extend(std::iter::from_fn(|| publisher.poll_transmit()));
            traffic.extend(std::iter::from_fn(|| snapshot.poll_transmit()));
        }
        let mut input = Vec::new();
        for (i, datagram) in traffic.iter().enumerate() {
            // Drop and repeat some, as a lossy network would.
            if (i as u64 + seed).is_multiple_of(4) {
                continue;
            }
            let copies = if i % 7 == 0 { 2 } else { 1 };
            for _ in 0..copies {
                input.push((i % 3) as u8);
                input.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
                input.extend_from_slice(datagram);
            }
            std::fs::write(format!("{datagrams}/seed{seed}-{i}"), datagram)?;
        }
        std::fs::write(format!("{sessions}/seed{seed}"), input)?;
    }
    println!("wrote seeds to {sessions} and {datagrams}");
    Ok(())
}
