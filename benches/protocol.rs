//! Criterion benches of the sans-IO core: encode, decode, the subscriber's apply path, the
//! snapshot rebuild and a repeater's decisions. No sockets: these are the protocol's own costs.

#![allow(clippy::unwrap_used, clippy::expect_used)]
// criterion's macros generate undocumented items.
#![allow(missing_docs)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use grapevine::core::proto::{
    new_session_id, PublisherConfig, PublisherSession, SnapshotConfig, SnapshotRate,
    SnapshotSession, SubscriberConfig, SubscriberSession,
};
use grapevine::core::state::{KeyedMap, MapDelta};
use grapevine::core::wire::{Datagram, DatagramBuilder};

type PayloadMap = KeyedMap<u32, Bytes>;

const MESSAGES: u64 = 10_000;

fn payload() -> Bytes {
    Bytes::from(vec![0xab; 64])
}

/// Datagrams carrying `MESSAGES` 64-byte deltas over 10 000 keys.
fn delta_traffic() -> Vec<Bytes> {
    delta_traffic_rounds(1).pop().expect("one round")
}

/// `rounds` lists of datagrams, each carrying `MESSAGES` 64-byte deltas over the same 10 000
/// keys, one session: after the first round every delta updates a key the subscriber knows.
fn delta_traffic_rounds(rounds: usize) -> Vec<Vec<Bytes>> {
    let now = Instant::now();
    let mut config = PublisherConfig::new(1);
    config.flush_delay = Duration::from_secs(1);
    let mut publisher =
        PublisherSession::new(config, new_session_id(1, 1), PayloadMap::default(), now);
    (0..rounds)
        .map(|_| {
            let mut out = Vec::new();
            for i in 0..MESSAGES {
                publisher
                    .publish(now, MapDelta::Put((i % 10_000) as u32, payload()))
                    .expect("small delta");
                out.extend(std::iter::from_fn(|| publisher.poll_transmit()));
            }
            publisher.flush(now);
            out.extend(std::iter::from_fn(|| publisher.poll_transmit()));
            out
        })
        .collect()
}

fn wire(c: &mut Criterion) {
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(20));
    let body = [0u8; 80];
    group.bench_function("encode 20 deltas of 80 B", |b| {
        let mut builder = DatagramBuilder::new(1400, 1, 0, 1);
        b.iter(|| {
            for seq in 1..=20 {
                builder.push_delta(seq, seq - 1, &body);
            }
            builder.finish()
        });
    });
    let mut builder = DatagramBuilder::new(1400, 1, 0, 1);
    for seq in 1..=15 {
        builder.push_delta(seq, seq - 1, &body);
    }
    let datagram = builder.finish().expect("pushed");
    group.throughput(Throughput::Elements(15));
    group.bench_function("decode a datagram of 15 deltas", |b| {
        b.iter(|| {
            let parsed = Datagram::parse(&datagram).expect("valid");
            parsed.messages().count()
        });
    });
    group.finish();
}

fn publisher(c: &mut Criterion) {
    let mut group = c.benchmark_group("publisher");
    group.throughput(Throughput::Elements(MESSAGES));
    group.bench_function("publish 10k deltas of 64 B", |b| {
        b.iter_batched(
            || {
                let mut config = PublisherConfig::new(1);
                config.flush_delay = Duration::from_secs(1);
                PublisherSession::new(config, 1, PayloadMap::default(), Instant::now())
            },
            |mut publisher| {
                let now = Instant::now();
                let p = payload();
                for i in 0..MESSAGES {
                    let _ = publisher.publish(now, MapDelta::Put((i % 10_000) as u32, p.clone()));
                    while publisher.poll_transmit().is_some() {}
                }
                publisher
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn subscriber(c: &mut Criterion) {
    let traffic = delta_traffic();
    let mut group = c.benchmark_group("subscriber");
    group.throughput(Throughput::Elements(MESSAGES));
    group.bench_function("apply 10k deltas of 64 B", |b| {
        b.iter_batched(
            || {
                let mut config = SubscriberConfig::new(1);
                config.emit_applied = false;
                SubscriberSession::<PayloadMap>::new(config)
            },
            |mut subscriber| {
                let now = Instant::now();
                for datagram in &traffic {
                    subscriber.handle_datagram(now, datagram);
                }
                while subscriber.poll_event().is_some() {}
                subscriber
            },
            BatchSize::SmallInput,
        );
    });

    // Steady state: every delta updates a leaf the subscriber already holds, as in a long run.
    let rounds = delta_traffic_rounds(2);
    group.bench_function("apply 10k deltas of 64 B to known keys", |b| {
        b.iter_batched(
            || {
                let mut config = SubscriberConfig::new(1);
                config.emit_applied = false;
                let mut subscriber = SubscriberSession::<PayloadMap>::new(config);
                let now = Instant::now();
                for datagram in &rounds[0] {
                    subscriber.handle_datagram(now, datagram);
                }
                subscriber
            },
            |mut subscriber| {
                let now = Instant::now();
                for datagram in &rounds[1] {
                    subscriber.handle_datagram(now, datagram);
                }
                while subscriber.poll_event().is_some() {}
                subscriber
            },
            BatchSize::LargeInput,
        );
    });

    // Rebuild: a late joiner receives one whole cycle of 10 000 leaves.
    let now = Instant::now();
    let initial: PayloadMap = (0..10_000u32).map(|k| (k, payload())).collect();
    let publisher =
        PublisherSession::new(PublisherConfig::new(1), new_session_id(2, 2), initial, now);
    let mut snapshot_config = SnapshotConfig::default();
    snapshot_config.rate = SnapshotRate::LeavesPerSecond(u32::MAX);
    let mut cycle = SnapshotSession::new(snapshot_config);
    let mut heartbeat = DatagramBuilder::new(1400, 1, 0, publisher.session());
    heartbeat.push_heartbeat(publisher.last_seq());
    let heartbeat = heartbeat.finish().expect("pushed");
    let mut snapshots = Vec::new();
    let mut t = now;
    while cycle.stats().cycles == 0 {
        t += Duration::from_millis(1);
        cycle.handle_timeout(t, &publisher);
        snapshots.extend(std::iter::from_fn(|| cycle.poll_transmit()));
    }
    group.bench_function("rebuild 10k leaves from a cycle", |b| {
        b.iter_batched(
            || SubscriberSession::<PayloadMap>::new(SubscriberConfig::new(1)),
            |mut subscriber| {
                subscriber.handle_datagram(now, &heartbeat);
                for datagram in &snapshots {
                    subscriber.handle_datagram(now, datagram);
                }
                assert!(subscriber.is_live());
                subscriber
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

/// A repeater's decision per datagram, both ways: checked, remembered by digest, relayed. The
/// datagrams are a 64 B delta stream's (about 15 deltas each); a fresh relay per run, so that
/// none is a copy it already saw.
fn repeater(c: &mut Criterion) {
    use grapevine::repeater::{Relay, Verdict};
    let traffic = delta_traffic();
    let mut group = c.benchmark_group("repeater");
    group.throughput(Throughput::Elements(traffic.len() as u64));
    let peer = "127.0.0.1:7190".parse().expect("an address");
    group.bench_function(
        "relay a stream's datagrams out (local) and in (remote)",
        |b| {
            b.iter_batched(
                || (Relay::new(None, None), Relay::new(None, None)),
                |(mut near, mut far)| {
                    let now = Instant::now();
                    for datagram in &traffic {
                        assert_eq!(near.from_local(now, datagram), Verdict::Relay);
                        assert_eq!(far.from_remote(now, peer, datagram), Verdict::Relay);
                    }
                    (near, far)
                },
                BatchSize::SmallInput,
            );
        },
    );
    group.finish();
}

criterion_group!(benches, wire, publisher, subscriber, repeater);
criterion_main!(benches);
