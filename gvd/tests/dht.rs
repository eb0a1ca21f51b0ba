//! Two gvd on different groups (no multicast between them) find each other through a private
//! DHT on loopback; a node of another network name is not found. Never the public DHT: the
//! bootstrap nodes are a testnet in this process, bound to 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::Gvd;
use gvd::daemon::NodesFile;

/// A private DHT on 127.0.0.1, a scratch directory, and the `--dht-bootstrap` value.
fn private_dht(tag: &str) -> (mainline::Testnet, std::path::PathBuf, String) {
    let testnet = mainline::Testnet::builder(5)
        .bind_address(std::net::Ipv4Addr::LOCALHOST)
        .build()
        .unwrap();
    assert!(
        testnet
            .bootstrap
            .iter()
            .all(|b| b.starts_with("127.0.0.1:")),
        "{:?}",
        testnet.bootstrap
    );
    let dir = std::env::temp_dir().join(format!("gvd-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bootstrap = testnet.bootstrap.join(",");
    (testnet, dir, bootstrap)
}

#[test]
fn nodes_on_two_networks_find_each_other_through_the_dht() {
    let (_testnet, dir, bootstrap) = private_dht("dht");
    let start = |name: &str, group: &str, network: &str| {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(&config, "dht_bind = \"127.0.0.1\"\ndht_interval_ms = 300\n").unwrap();
        Gvd::start(
            &dir,
            name,
            group,
            &[
                "--config",
                config.to_str().unwrap(),
                "--dht-bootstrap",
                &bootstrap,
                "--network",
                network,
            ],
        )
    };
    let a = start("a", "239.255.79.50:47950", "office");
    let b = start("b", "239.255.79.52:47952", "office");
    let x = start("x", "239.255.79.54:47954", "elsewhere");
    let kos_port = |node: &Gvd, name: &str| {
        node.wait_list(Duration::from_secs(10), |l| l.node(name).is_some());
        let list = NodesFile::read(&node.nodes_path()).unwrap();
        list.node(name).unwrap().record.kos_port
    };
    let (a_port, b_port, x_port) = (kos_port(&a, "a"), kos_port(&b, "b"), kos_port(&x, "x"));
    let has = |list: &NodesFile, port: u16| {
        list.remote_peers
            .iter()
            .any(|p| p.ends_with(&format!(":{port}")))
    };
    a.wait_list(Duration::from_secs(20), |l| has(l, b_port));
    b.wait_list(Duration::from_secs(20), |l| has(l, a_port));
    // Several lookups later, still only the same network.
    std::thread::sleep(Duration::from_secs(1));
    let a_list = NodesFile::read(&a.nodes_path()).unwrap();
    assert!(
        !has(&a_list, x_port),
        "another network name is not found: {:?}",
        a_list.remote_peers
    );
    assert_eq!(
        a_list.nodes.len(),
        1,
        "no multicast between the groups: only itself"
    );
    drop((a, b, x));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn repeaters_found_through_the_dht_carry_a_stream() {
    repeaters_found_through_the_dht_carry_a_stream_over(
        "udp",
        [
            "239.255.79.56:47956",
            "239.255.79.58:47958",
            "239.255.79.60:47960",
            "239.255.79.61:47961",
        ],
    );
}

#[test]
fn repeaters_found_through_the_dht_carry_a_stream_over_quic() {
    repeaters_found_through_the_dht_carry_a_stream_over(
        "quic",
        [
            "239.255.81.62:48162",
            "239.255.81.63:48163",
            "239.255.81.64:48164",
            "239.255.81.65:48165",
        ],
    );
}

/// Two gvd with the repeater role over `wan` find each other on a private DHT; `groups` are
/// the gvd groups of each and the two relayed groups.
fn repeaters_found_through_the_dht_carry_a_stream_over(wan: &str, groups: [&str; 4]) {
    use grapevine::core::net::MulticastConfig;
    use grapevine::core::state::{digest, KeyedMap, MapDelta};
    use grapevine::core::StreamStatus;
    use grapevine::publisher::{Publisher, PublisherOptions};
    use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};
    use grapevine::subscriber::{Subscriber, SubscriberOptions};

    let (_testnet, dir, bootstrap) = private_dht(&format!("dht-rep-{wan}"));
    let start = |name: &str, group: &str, relayed: &str| {
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "dht_bind = \"127.0.0.1\"\ndht_interval_ms = 300\nnetwork = \"office\"\n\
                 [repeater]\ngroup = \"{relayed}\"\nlisten = \"127.0.0.1:0\"\nwan = \"{wan}\"\n"
            ),
        )
        .unwrap();
        Gvd::start(
            &dir,
            name,
            group,
            &[
                "--config",
                config.to_str().unwrap(),
                "--dht-bootstrap",
                &bootstrap,
            ],
        )
    };
    let [a_group, b_group, near_group, far_group] = groups;
    let a = start("a", a_group, near_group);
    let b = start("b", b_group, far_group);
    type Map = KeyedMap<u32, u64>;
    let near = MulticastConfig::new(near_group.parse().unwrap());
    let far = MulticastConfig::new(far_group.parse().unwrap());
    let subscriber = Subscriber::<Map>::join(SubscriberOptions::new(5, far)).unwrap();
    let publisher =
        Publisher::start(PublisherOptions::new(5, near.clone()), Map::default()).unwrap();
    let _snapshots = Snapshotter::start(&publisher, SnapshotterOptions::new(near)).unwrap();
    for i in 0..500u32 {
        publisher
            .publish(MapDelta::Put(i % 40, u64::from(i)))
            .unwrap();
    }
    publisher.flush();
    let started = std::time::Instant::now();
    let mut converged = false;
    while started.elapsed() < Duration::from_secs(30) && !converged {
        let want = publisher.read(digest);
        converged = subscriber.read(|s| {
            s.stream(0)
                .is_some_and(|v| v.status == StreamStatus::Live && digest(v.state) == want)
        });
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        converged,
        "the far group got the stream through repeaters found on the DHT"
    );
    eprintln!("{wan}: converged {:?} after publishing", started.elapsed());
    // The gvds first: alive, they would write their state into the directory again.
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}
