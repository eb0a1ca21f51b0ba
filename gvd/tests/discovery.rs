//! Several gvd processes on loopback: they find each other, see each other's VDEVs, notice new
//! drivers without restarts, and drop nodes that die or leave.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::built;
use grapevine_test_support::stdout_of;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gvd::daemon::NodesFile;

const ELP_DELAY_MS: u64 = 100;
// Long enough that a goodbye (immediate) and a death (after the TTL) cannot be confused.
const NODE_TTL: u64 = 20;

struct Node {
    child: Child,
    nodes_path: PathBuf,
}

struct Cluster {
    dir: PathBuf,
    nodes: Vec<Node>,
}

impl Cluster {
    fn start(tag: &str, count: usize, group: &str, drivers: &Path) -> Self {
        let dir = std::env::temp_dir().join(format!("gvd-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let nodes = (0..count)
            .map(|i| {
                let state = dir.join(format!("node{i}"));
                let child = Command::new(env!("CARGO_BIN_EXE_gvd"))
                    .args(["run", "--name", &format!("node{i}"), "--group", group])
                    .args(["--elp-delay-ms", &ELP_DELAY_MS.to_string()])
                    .args(["--node-ttl", &NODE_TTL.to_string()])
                    // Only SIGHUP or a driver file change may rescan during the test.
                    .args([
                        "--query-port",
                        "0",
                        "--kos-port",
                        "0",
                        "--rescan-interval-ms",
                        "600000",
                    ])
                    .arg("--state-dir")
                    .arg(&state)
                    .arg("--vdriver-path")
                    .arg(drivers)
                    .env("GV_DIRDEV_ROOT", drivers.join("devices"))
                    .env_remove("GV_NODES_PATH")
                    .env_remove("GVD_CONFIG")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("start gvd");
                Node {
                    child,
                    nodes_path: state.join("nodes.json"),
                }
            })
            .collect();
        Self { dir, nodes }
    }

    fn list(&self, i: usize) -> Option<NodesFile> {
        let text = std::fs::read(&self.nodes[i].nodes_path).ok()?;
        // Written atomically: a file that exists always parses.
        Some(serde_json::from_slice(&text).expect("a whole node list"))
    }

    /// Waits until `check` holds for node `i`'s list; returns how long it took.
    fn wait(&self, i: usize, timeout: Duration, check: impl Fn(&NodesFile) -> bool) -> Duration {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if self.list(i).as_ref().is_some_and(&check) {
                return started.elapsed();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "node {i}: condition not met within {timeout:?}: {:?}",
            self.list(i)
        );
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.kill();
            let _ = node.child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn names(list: &NodesFile) -> Vec<String> {
    let mut names: Vec<String> = list.nodes.iter().map(|n| n.record.name.clone()).collect();
    names.sort();
    names
}

fn signal(child: &Child, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status();
}

#[test]
fn nodes_find_each_other_and_notice_departures() {
    let drivers = std::env::temp_dir().join(format!("gvd-drivers-{}", std::process::id()));
    std::fs::create_dir_all(drivers.join("devices")).unwrap();
    std::fs::write(drivers.join("devices").join("disk0"), b"data").unwrap();
    std::fs::copy(built("gv_echo"), drivers.join("echo.so")).unwrap();
    let mut cluster = Cluster::start("discovery", 3, "239.255.79.10:47910", &drivers);
    let all = vec!["node0", "node1", "node2"];

    for i in 0..3 {
        let took = cluster.wait(i, Duration::from_secs(5), |l| names(l) == all);
        eprintln!("node {i} saw all three after {took:?}");
    }
    // A node is listed as soon as its announcement arrives; its VDEV list follows on the VDEV
    // topic (`vdevs_current` says when it has).
    cluster.wait(0, Duration::from_secs(5), |l| {
        names(l) == all
            && l.nodes
                .iter()
                .all(|n| n.vdevs_current && !n.vdevs.is_empty())
    });
    let list = cluster.list(0).unwrap();
    let gvctl = |args: &[&str]| {
        let output = Command::new(env!("CARGO_BIN_EXE_gvctl"))
            .args(args)
            .env("GV_NODES_PATH", &cluster.nodes[0].nodes_path)
            .output()
            .unwrap();
        stdout_of(&output);
        String::from_utf8(output.stdout).unwrap()
    };
    let table = gvctl(&["nodes"]);
    assert_eq!(
        table.lines().count(),
        4,
        "a header and three nodes:\n{table}"
    );
    let vdevs: serde_json::Value =
        serde_json::from_str(&gvctl(&["vdevs", "node1", "--json"])).unwrap();
    assert_eq!(vdevs.as_array().unwrap().len(), 2, "{vdevs}");
    assert!(gvctl(&["status"]).contains("2 other nodes known (0 suspect)"));
    for node in &list.nodes {
        let vdevs: Vec<&str> = node.vdevs.iter().map(|v| v.vdev.name.as_str()).collect();
        assert_eq!(vdevs, vec!["counter0", "echo0"], "{}", node.record.name);
        assert_eq!(node.record.addresses, vec!["127.0.0.1".to_string()]);
    }

    // A new driver file: the owner's `unique` changes and peers see the new VDEV, no restart.
    let before = list.nodes[0].record.unique.clone();
    std::fs::copy(built("gv_dir_devices"), drivers.join("dir-devices.so")).unwrap();
    let has_vdev = |l: &NodesFile, name: &str| {
        l.nodes.len() == 3
            && l.nodes
                .iter()
                .all(|n| n.vdevs_current && n.vdevs.iter().any(|v| v.vdev.name == name))
    };
    let took = cluster.wait(1, Duration::from_secs(5), |l| {
        has_vdev(l, "disk0") && l.nodes.iter().all(|n| n.record.unique != before)
    });
    eprintln!("a new driver's VDEVs reached a peer after {took:?}");

    // A VDEV that appears inside a driver is picked up on SIGHUP (the periodic rescan is
    // ten minutes away).
    std::fs::write(drivers.join("devices").join("disk1"), b"more").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !has_vdev(&cluster.list(1).unwrap(), "disk1"),
        "no rescan without SIGHUP"
    );
    for node in &cluster.nodes {
        signal(&node.child, "-HUP");
    }
    let took = cluster.wait(1, Duration::from_secs(5), |l| has_vdev(l, "disk1"));
    eprintln!("SIGHUP rescan reached a peer after {took:?}");

    // Garbage on the ELP group and on a query port changes nothing.
    let raw = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let query_port = cluster.list(0).unwrap().nodes[0].record.query_port;
    for bytes in [
        &b"GV\x01\x00garbage"[..],
        &[0u8; 1000][..],
        b"",
        b"GVQY\x01",
    ] {
        raw.send_to(bytes, "239.255.79.10:47910").unwrap();
        raw.send_to(bytes, ("127.0.0.1", query_port)).unwrap();
    }

    // Killed without a goodbye: gone within the TTL (plus one period and some scheduling).
    cluster.nodes[2].child.kill().unwrap();
    let _ = cluster.nodes[2].child.wait();
    let limit = Duration::from_millis(ELP_DELAY_MS * (NODE_TTL + 1) + 500);
    let took = cluster.wait(0, limit, |l| names(l) == vec!["node0", "node1"]);
    assert!(
        took >= Duration::from_millis(ELP_DELAY_MS),
        "not dropped at once: {took:?}"
    );

    // Stopped cleanly: says goodbye, dropped within a couple of periods.
    signal(&cluster.nodes[1].child, "-TERM");
    let took = cluster.wait(0, Duration::from_millis(ELP_DELAY_MS * 3), |l| {
        names(l) == vec!["node0"]
    });
    eprintln!("goodbye took {took:?}");
    let status = cluster.nodes[1].child.wait().unwrap();
    assert!(status.success(), "clean exit on SIGTERM: {status:?}");
    let _ = std::fs::remove_dir_all(&drivers);
}

#[test]
fn the_node_id_survives_restarts() {
    let dir = std::env::temp_dir().join(format!("gvd-id-{}", std::process::id()));
    let first = gvd::daemon::node_id(&dir).unwrap();
    assert_eq!(gvd::daemon::node_id(&dir).unwrap(), first);
    std::fs::write(dir.join("node-id"), "not hex").unwrap();
    assert_ne!(
        gvd::daemon::node_id(&dir).unwrap(),
        first,
        "a corrupt id is replaced"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_configuration_is_a_clear_error() {
    let dir = std::env::temp_dir().join(format!("gvd-conf-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("gvd.toml");
    std::fs::write(&file, "name = \"x\"\nelp_delay = 5\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_gvd"))
        .arg("run")
        .arg("--config")
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("bad configuration") && stderr.contains("elp_delay"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gvctl_says_when_there_is_no_node_list() {
    let output = Command::new(env!("CARGO_BIN_EXE_gvctl"))
        .args(["nodes", "--nodes-path", "/nonexistent/nodes.json"])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "a runtime failure");
    assert!(String::from_utf8_lossy(&output.stderr).contains("is gvd running?"));
}

#[test]
fn the_example_configuration_parses() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../gvd.example.toml");
    let config = gvd::daemon::Config::from_file(&path).unwrap();
    assert_eq!(config.query_port, 7173);
    assert_eq!(config.kos_port, 7174);
    assert_eq!(config.vdev_group().port(), 7172);
    assert_eq!(config.zones.len(), 1);
    assert_eq!(config.zones[0].members.len(), 3);
    assert_eq!(config.zones[0].nfs_clients.len(), 1);
    assert_eq!(config.max_agents_per_source, 8);
}

#[test]
fn nodes_with_another_key_are_not_listed() {
    let dir = std::env::temp_dir().join(format!("gvd-keys-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = |name: &str, byte: &str| {
        let path = dir.join(name);
        std::fs::write(&path, format!("1:{}\n", byte.repeat(32))).unwrap();
        path
    };
    let (ours, theirs) = (key("ours.key", "11"), key("theirs.key", "22"));
    let group = "239.255.79.15:47915";
    let flag = |path: &PathBuf| vec!["--key-file".to_string(), path.display().to_string()];
    let start = |name: &str, key: &PathBuf| {
        let args = flag(key);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        common::Gvd::start(&dir, name, group, &args)
    };
    let a = start("a", &ours);
    let b = start("b", &ours);
    let intruder = start("x", &theirs);
    a.wait_list(Duration::from_secs(10), |l| names(l) == vec!["a", "b"]);
    b.wait_list(Duration::from_secs(10), |l| names(l) == vec!["a", "b"]);
    intruder.wait_list(Duration::from_secs(10), |l| names(l) == vec!["x"]);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        names(&NodesFile::read(&a.nodes_path()).unwrap()),
        vec!["a", "b"]
    );
    drop((a, b, intruder));
    let _ = std::fs::remove_dir_all(&dir);
}
