//! QUERY floods against a gvd process on loopback: a stranger cannot make a node multicast much
//! more than it does anyway, with or without a network key.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use grapevine_test_support::scratch;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant, SystemTime};

use common::Gvd;
use grapevine_core::net::{MulticastConfig, MulticastSocket, RecvBatch};
use grapevine_kos::nodes::{NodeRecord, NodesFile};
use gvd::query::{Query, QueryKey};

fn read_self(path: &std::path::Path) -> NodeRecord {
    NodesFile::read(path).unwrap().nodes[0].record.clone()
}

/// Datagrams seen on `group` during `window`, while `during` runs on another thread.
fn multicast_during(group: &str, window: Duration, during: impl FnOnce() + Send) -> usize {
    let receiver =
        MulticastSocket::receiver(&MulticastConfig::new(group.parse().unwrap())).unwrap();
    let mut batch = RecvBatch::new(64, 2048);
    std::thread::scope(|scope| {
        scope.spawn(during);
        let started = Instant::now();
        let mut seen = 0;
        while started.elapsed() < window {
            seen += receiver
                .recv_batch(&mut batch, Duration::from_millis(20))
                .unwrap_or(0);
        }
        seen
    })
}

fn flood(target: SocketAddr, datagrams: &[Vec<u8>], window: Duration) {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let started = Instant::now();
    // About 2 000 datagrams per second.
    for datagram in datagrams.iter().cycle() {
        if started.elapsed() >= window {
            return;
        }
        let _ = socket.send_to(datagram, target);
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn amplification(extra: &[&str], group: &str, queries: impl Fn(u64) -> Vec<Vec<u8>>) -> f64 {
    let dir = scratch(&group.replace([':', '.'], "-"));
    let node = Gvd::start(&dir, "target", group, extra);
    node.wait_list(Duration::from_secs(10), |list| list.nodes.len() == 1);
    let record = read_self(&node.nodes_path());
    let target = SocketAddr::from(([127, 0, 0, 1], record.query_port));
    let window = Duration::from_secs(2);
    let quiet = multicast_during(group, window, || {});
    let datagrams = queries(record.node_id);
    let flooded = multicast_during(group, window, || flood(target, &datagrams, window));
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
    let ratio = flooded as f64 / quiet.max(1) as f64;
    eprintln!("{group}: {quiet} datagrams quiet, {flooded} flooded ({ratio:.2}x)");
    ratio
}

#[test]
fn valid_queries_from_one_address_are_held_to_its_rate() {
    let ratio = amplification(&[], "239.255.79.60:47960", |node| {
        [gvd::elp::ELP_TOPIC, gvd::elp::VDEV_TOPIC]
            .iter()
            .map(|&topic| {
                Query {
                    topic,
                    to: node,
                    from: 99,
                }
                .encode()
                .to_vec()
            })
            .collect()
    });
    // About 4 000 valid QUERYs: unlimited, each would start a cycle (≈ 100 times the traffic).
    assert!(
        ratio < 4.0,
        "multicast grew {ratio:.1} times under a QUERY flood"
    );
}

#[test]
fn on_a_keyed_network_unsigned_and_forged_queries_cost_nothing() {
    let dir = scratch("keyfile");
    let key_file = dir.join("network.key");
    std::fs::write(&key_file, format!("1:{}\n", "3c".repeat(32))).unwrap();
    let stranger = QueryKey::new(&grapevine_core::auth::Keyring::single(1, [0x3d; 32])).unwrap();
    let ratio = amplification(
        &["--key-file", key_file.to_str().unwrap()],
        "239.255.79.61:47961",
        |node| {
            let query = Query {
                topic: gvd::elp::ELP_TOPIC,
                to: node,
                from: 99,
            };
            vec![
                query.encode().to_vec(),
                query.encode_signed(&stranger, SystemTime::now()).to_vec(),
            ]
        },
    );
    assert!(
        ratio < 1.6,
        "multicast grew {ratio:.1} times under forged QUERYs"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
