//! Three gvd on three namespace hosts joined by a bridge (DESIGN.md §7): they list each other
//! and each other's VDEVs within two announcement periods of starting, and a killed one leaves
//! the lists within the TTL plus one period. Needs root and `ip`; skips with a message
//! otherwise, and removes its namespaces and processes whatever happens.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use grapevine_test_support::stdout_of;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::built;
use grapevine_test_support::netns;
use gvd::daemon::NodesFile;

const HOSTS: usize = 3;
const ELP_DELAY_MS: u64 = 200;
const NODE_TTL: u64 = 3;

struct Lab {
    // Fields drop in order: the hosts' processes end before their directory is removed (they
    // wrote into it while it was being removed, and left it behind).
    lab: netns::Lab,
    dir: RemovedOnDrop,
}

/// A directory removed, with what it holds, when dropped.
struct RemovedOnDrop(PathBuf);

impl std::ops::Deref for RemovedOnDrop {
    type Target = PathBuf;
    fn deref(&self) -> &PathBuf {
        &self.0
    }
}

impl AsRef<std::path::Path> for RemovedOnDrop {
    fn as_ref(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for RemovedOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Lab {
    fn ns(&self, name: &str) -> String {
        self.lab.ns(name)
    }

    /// Three hosts on one bridge, 10.231.0.1–3.
    fn setup(&mut self) -> Result<(), String> {
        let br = self.lab.add_bridge("br")?;
        for i in 0..HOSTS {
            self.lab
                .add_bridged_host(&br, i, &format!("10.231.0.{}/24", i + 1))?;
        }
        Ok(())
    }

    fn nodes_path(&self, i: usize) -> PathBuf {
        self.dir.join(format!("h{i}")).join("nodes.json")
    }

    /// Starts host `i`'s gvd (child `i` of the lab).
    fn start(&mut self, i: usize, drivers: &PathBuf) {
        let child = self.spawn(i, drivers);
        self.lab.adopt(child);
    }

    fn spawn(&self, i: usize, drivers: &PathBuf) -> Child {
        self.lab
            .exec(&self.ns(&format!("h{i}")), env!("CARGO_BIN_EXE_gvd"))
            .arg("run")
            .args([
                "--name",
                &format!("host{i}"),
                "--group",
                "239.255.79.20:47920",
            ])
            .args(["--iface", &self.lab.link('v', i)])
            .args([
                "--elp-delay-ms",
                &ELP_DELAY_MS.to_string(),
                "--node-ttl",
                &NODE_TTL.to_string(),
            ])
            .args(["--query-port", "7173", "--kos-port", "7174"])
            .arg("--config")
            .arg(self.zone_config(i))
            .arg("--state-dir")
            .arg(self.dir.join(format!("h{i}")))
            .arg("--vdriver-path")
            .arg(drivers)
            .env("RUST_LOG", "gvd=debug")
            .stdout(Stdio::null())
            .stderr(self.log_file(i))
            .spawn()
            .expect("start gvd in a namespace")
    }

    /// Host `i`'s log, appended to across restarts and shown when a check fails.
    fn log_file(&self, i: usize) -> std::fs::File {
        std::fs::create_dir_all(&self.dir).unwrap();
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("h{i}.log")))
            .expect("open the host's log")
    }

    /// A zone on all three hosts, each holding it in its own directory.
    fn zone_config(&self, i: usize) -> PathBuf {
        let file = self.dir.join(format!("h{i}.toml"));
        std::fs::create_dir_all(&self.dir).unwrap();
        std::fs::write(
            &file,
            format!(
                "repl_port = 7175\nzone_debounce_ms = 100\n[[zones]]\nname = \"z\"\n\
                 quota_bytes = 100000000\nmembers = [\"host0\", \"host1\", \"host2\"]\n\
                 path = \"{}\"\nnfs_port = 2049\nnfs_clients = [\"10.231.0.{}/32\"]\n",
                self.zone_dir(i).display(),
                i + 1
            ),
        )
        .unwrap();
        file
    }

    fn zone_dir(&self, i: usize) -> PathBuf {
        self.dir.join(format!("h{i}-zone"))
    }

    /// Starts host `i`'s gvd again (after it was stopped), in the place of the old process.
    fn restart(&mut self, i: usize, drivers: &PathBuf) {
        let child = self.spawn(i, drivers);
        self.lab.replace(i, child);
    }

    fn list(&self, i: usize) -> Option<NodesFile> {
        serde_json::from_slice(&std::fs::read(self.nodes_path(i)).ok()?).ok()
    }

    fn wait(&self, i: usize, timeout: Duration, want: &[&str]) -> Duration {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(list) = self.list(i) {
                let mut names: Vec<String> =
                    list.nodes.iter().map(|n| n.record.name.clone()).collect();
                names.sort();
                // Listed with their VDEVs (two each: the echo driver), fetched after `unique`.
                let vdevs = list
                    .nodes
                    .iter()
                    .all(|n| n.vdevs_current && n.vdevs.len() == 2);
                if names == want && vdevs {
                    return started.elapsed();
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!(
            "host {i} did not list {want:?} within {timeout:?}: {:?}",
            self.list(i)
        );
    }
}

/// Each host's zone (top level: names and the start of each file) and the last lines of its
/// log, for a failure message.
fn what_each_host_holds(lab_dir: &std::path::Path) -> String {
    (0..HOSTS)
        .map(|i| {
            let mut files: Vec<String> = std::fs::read_dir(lab_dir.join(format!("h{i}-zone")))
                .map(|d| {
                    d.flatten()
                        .map(|e| {
                            let content = std::fs::read(e.path())
                                .map(|c| String::from_utf8_lossy(&c).chars().take(24).collect())
                                .unwrap_or_else(|_| "<dir>".to_string());
                            format!("{}={content:?}", e.file_name().to_string_lossy())
                        })
                        .collect()
                })
                .unwrap_or_default();
            files.sort();
            let log =
                std::fs::read_to_string(lab_dir.join(format!("h{i}.log"))).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = lines[lines.len().saturating_sub(40)..].join("\n");
            format!("--- host{i}: {}\n{tail}", files.join(", "))
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
#[ignore = "needs root, iproute2 and libnfs-utils (namespaces, a real NFS client); .ci/run installs them and runs it with --include-ignored"]
fn three_hosts_discover_each_other_and_a_dead_one_leaves() {
    let mut lab = Lab {
        lab: netns::Lab::new("gd", &[]),
        dir: RemovedOnDrop(std::env::temp_dir().join(format!("gvd-ns-{}", std::process::id()))),
    };
    if let Err(why) = lab.setup() {
        panic!("cannot create namespaces: {why}");
    }
    let drivers = lab.dir.join("drivers");
    std::fs::create_dir_all(&drivers).unwrap();
    std::fs::copy(built("gv_echo"), drivers.join("echo.so")).unwrap();

    for i in 0..HOSTS {
        lab.start(i, &drivers);
    }
    let all = ["host0", "host1", "host2"];
    // Within two announcement periods of starting (plus process start-up).
    let within = Duration::from_millis(2 * ELP_DELAY_MS + 1_000);
    for i in 0..HOSTS {
        let took = lab.wait(i, within, &all);
        eprintln!("host {i} listed all three after {took:?}");
    }
    let list = lab.list(0).unwrap();
    for node in &list.nodes {
        let index: usize = node.record.name.trim_start_matches("host").parse().unwrap();
        assert_eq!(
            node.record.addresses,
            vec![format!("10.231.0.{}", index + 1)]
        );
        assert_eq!(node.vdevs.len(), 2, "each other's VDEVs: {node:?}");
    }

    // A KOS on host0 calls a VDEV of host1 across the bridge (gvctl uses the KOS library).
    let output = Command::new("ip")
        .args(["netns", "exec", &lab.ns("h0"), env!("CARGO_BIN_EXE_gvctl")])
        .args(["call", "host1", "echo0", "reverse", "namespaces"])
        .env("GV_NODES_PATH", lab.nodes_path(0))
        .output()
        .unwrap();
    stdout_of(&output);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "secapseman");

    // GrapeVineFS: written through host0's NFS server with a real NFS client, read back
    // through host2's.
    assert!(
        Command::new("nfs-cp").arg("--help").output().is_ok(),
        "needs nfs-cp (Debian libnfs-utils)"
    );
    {
        let original: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let source = lab.dir.join("payload.bin");
        std::fs::write(&source, &original).unwrap();
        let url = |host: usize| {
            format!(
                "nfs://10.231.0.{}/z/payload.bin?nfsport=2049&mountport=2049&auto-traverse-mounts=0",
                host + 1
            )
        };
        let copied = Command::new("ip")
            .args(["netns", "exec", &lab.ns("h0"), "nfs-cp"])
            .arg(&source)
            .arg(url(0))
            .output()
            .unwrap();
        stdout_of(&copied);
        let started = Instant::now();
        let replicated = loop {
            let read = Command::new("ip")
                .args(["netns", "exec", &lab.ns("h2"), "nfs-cat", &url(2)])
                .output()
                .unwrap();
            if read.status.success() && read.stdout == original {
                break true;
            }
            if started.elapsed() > Duration::from_secs(15) {
                break false;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        assert!(
            replicated,
            "the file written on host0 is readable, identical, on host2"
        );
        eprintln!("host0 -> host2 through NFS after {:?}", started.elapsed());
        // Each host lets only itself mount its zone over the network (nfs_clients).
        let foreign = Command::new("ip")
            .args(["netns", "exec", &lab.ns("h1"), "nfs-cat", &url(2)])
            .output()
            .unwrap();
        assert!(
            !foreign.status.success() && foreign.stdout.is_empty(),
            "host1 read host2's zone though host2 exports it only to itself"
        );

        let lab_dir = lab.dir.to_path_buf();
        let wait = |what: &str, check: &dyn Fn() -> bool| {
            let started = Instant::now();
            while !check() {
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "{what}: not within 20 s\n{}",
                    what_each_host_holds(&lab_dir)
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        };
        let copies = |i: usize| -> Vec<String> {
            std::fs::read_dir(lab.zone_dir(i))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.contains(".conflict-"))
                        .collect()
                })
                .unwrap_or_default()
        };
        // Concurrent changes on host0 and host1: both versions kept, on every member.
        std::fs::write(lab.zone_dir(0).join("notes.txt"), b"from host0").unwrap();
        std::fs::write(lab.zone_dir(1).join("notes.txt"), b"from host1").unwrap();
        wait("a conflict copy on every host", &|| {
            (0..HOSTS).all(|i| copies(i).len() == 1)
        });
        wait("the same result everywhere", &|| {
            let seen: Vec<_> = (0..HOSTS)
                .map(|i| {
                    let copy = copies(i);
                    (
                        std::fs::read(lab.zone_dir(i).join("notes.txt")).ok(),
                        copy.first()
                            .and_then(|c| std::fs::read(lab.zone_dir(i).join(c)).ok()),
                    )
                })
                .collect();
            seen.windows(2).all(|w| w[0] == w[1])
        });

        // A directory tree made on host0, renamed, then deleted: it never comes back anywhere.
        std::fs::create_dir_all(lab.zone_dir(0).join("dirX/sub")).unwrap();
        std::fs::write(lab.zone_dir(0).join("dirX/sub/f"), b"in a tree").unwrap();
        wait("the tree everywhere", &|| {
            (0..HOSTS).all(|i| lab.zone_dir(i).join("dirX/sub/f").exists())
        });
        std::fs::rename(lab.zone_dir(0).join("dirX"), lab.zone_dir(0).join("dirY")).unwrap();
        wait("the renamed tree everywhere, the old name nowhere", &|| {
            (0..HOSTS).all(|i| {
                lab.zone_dir(i).join("dirY/sub/f").exists()
                    && !lab.zone_dir(i).join("dirX").exists()
            })
        });
        std::fs::remove_dir_all(lab.zone_dir(0).join("dirY")).unwrap();
        // A change made after the deletion: once it is everywhere, so is the deletion.
        std::fs::write(lab.zone_dir(0).join("after-tree.txt"), b"later").unwrap();
        wait("the deletion everywhere", &|| {
            (0..HOSTS).all(|i| {
                lab.zone_dir(i).join("after-tree.txt").exists()
                    && !lab.zone_dir(i).join("dirY").exists()
                    && !lab.zone_dir(i).join("dirX").exists()
            })
        });

        // The same new file written on all three hosts at once: every host ends with the same
        // three versions (the file and two conflict copies), none empty, none nested.
        for i in 0..HOSTS {
            std::fs::write(lab.zone_dir(i).join("three.txt"), format!("from host{i}")).unwrap();
        }
        let versions = |i: usize| -> Vec<(String, Vec<u8>)> {
            let mut found: Vec<(String, Vec<u8>)> = std::fs::read_dir(lab.zone_dir(i))
                .map(|d| {
                    d.flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .filter(|n| n.starts_with("three"))
                        .map(|n| {
                            let body = std::fs::read(lab.zone_dir(i).join(&n)).unwrap_or_default();
                            (n, body)
                        })
                        .collect()
                })
                .unwrap_or_default();
            found.sort();
            found
        };
        wait("three identical sets of three versions", &|| {
            let first = versions(0);
            first.len() == 3 && (1..HOSTS).all(|i| versions(i) == first)
        });
        let mut bodies: Vec<Vec<u8>> = versions(0).into_iter().map(|(_, b)| b).collect();
        bodies.sort();
        assert_eq!(
            bodies,
            vec![
                b"from host0".to_vec(),
                b"from host1".to_vec(),
                b"from host2".to_vec()
            ]
        );
        assert!(
            versions(0)
                .iter()
                .all(|(n, _)| n.matches(".conflict-").count() <= 1),
            "no nested conflict copies"
        );

        // A large file copied to host0 through NFS: host2 never shows part of it, on disk or
        // through its NFS server, while the copy runs; then it has all of it.
        let big: Vec<u8> = (0..(64u32 << 20)).map(|i| (i % 249) as u8).collect();
        let big_source = lab.dir.join("big.bin");
        std::fs::write(&big_source, &big).unwrap();
        let mut copying = Command::new("ip")
            .args(["netns", "exec", &lab.ns("h0"), "nfs-cp"])
            .arg(&big_source)
            .arg(url(0).replace("payload.bin", "big.bin"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let on_host2 = lab.zone_dir(2).join("big.bin");
        let mut looks = 0;
        let copied = loop {
            if let Some(status) = copying.try_wait().unwrap() {
                break status;
            }
            if let Ok(meta) = std::fs::metadata(&on_host2) {
                assert_eq!(
                    meta.len(),
                    big.len() as u64,
                    "host2 showed part of the file being written"
                );
            }
            if looks % 20 == 0 {
                let read = Command::new("ip")
                    .args(["netns", "exec", &lab.ns("h2"), "nfs-cat"])
                    .arg(url(2).replace("payload.bin", "big.bin"))
                    .output()
                    .unwrap();
                assert!(
                    !read.status.success() || read.stdout.len() == big.len(),
                    "host2's NFS server served {} bytes of the file being written",
                    read.stdout.len()
                );
            }
            looks += 1;
            std::thread::sleep(Duration::from_millis(5));
        };
        assert!(copied.success(), "nfs-cp of the large file");
        wait("the large file on host2", &|| {
            std::fs::metadata(&on_host2).is_ok_and(|m| m.len() == big.len() as u64)
                && std::fs::read(&on_host2).is_ok_and(|d| d == big)
        });
        eprintln!("host2 looked at the large file {looks} times while it was written");

        // host2 is down while host0 takes a write; it catches up when it returns.
        let _ = Command::new("kill")
            .args(["-TERM", &lab.lab.child(2).id().to_string()])
            .status();
        let _ = lab.lab.child(2).wait();
        let away = lab.dir.join("away.bin");
        std::fs::write(&away, b"written while host2 was down").unwrap();
        let copied = Command::new("ip")
            .args(["netns", "exec", &lab.ns("h0"), "nfs-cp"])
            .arg(&away)
            .arg(url(0).replace("payload.bin", "away.bin"))
            .output()
            .unwrap();
        stdout_of(&copied);
        lab.restart(2, &drivers);
        wait("host2 caught up", &|| {
            std::fs::read(lab.zone_dir(2).join("away.bin"))
                .is_ok_and(|d| d == b"written while host2 was down")
        });

        // A deleted file stays deleted.
        std::fs::remove_file(lab.zone_dir(0).join("payload.bin")).unwrap();
        wait("payload.bin deleted everywhere", &|| {
            (0..HOSTS).all(|i| !lab.zone_dir(i).join("payload.bin").exists())
        });
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            (0..HOSTS).all(|i| !lab.zone_dir(i).join("payload.bin").exists()),
            "resurrected"
        );
        // Back to three listed hosts before the death test below.
        for i in 0..HOSTS {
            lab.wait(i, Duration::from_secs(10), &all);
        }
    }

    let _ = lab.lab.child(2).kill();
    let _ = lab.lab.child(2).wait();
    let limit = Duration::from_millis(ELP_DELAY_MS * (NODE_TTL + 1) + 500);
    for i in 0..2 {
        let took = lab.wait(i, limit, &["host0", "host1"]);
        eprintln!("host {i} dropped the killed host after {took:?}");
    }
}
