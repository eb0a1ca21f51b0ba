//! GrapeVineFS with three gvd processes on loopback and a real NFS client (libnfs-utils):
//! replication, quota, conflicts, catching up after downtime, deletions.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Gvd;
use grapevine_kos::nodes::NodesFile;

const WAIT: Duration = Duration::from_secs(20);
const GROUP: &str = "239.255.79.44:47944";

fn have_nfs_tools() -> bool {
    ["nfs-cp", "nfs-cat"]
        .iter()
        .all(|tool| Command::new(tool).arg("--help").output().is_ok())
}

fn config(dir: &Path, name: &str) -> PathBuf {
    let file = dir.join(format!("{name}.toml"));
    std::fs::write(
        &file,
        format!(
            "repl_port = 0\nzone_debounce_ms = 100\nzone_scan_interval_ms = 300\n\
             [[zones]]\nname = \"z\"\nquota_bytes = 8000000\nmembers = [\"a\", \"b\", \"c\"]\n\
             path = \"{}\"\n",
            dir.join(format!("{name}-data")).display()
        ),
    )
    .unwrap();
    file
}

fn start(dir: &Path, name: &str) -> Gvd {
    let config = config(dir, name);
    Gvd::start(dir, name, GROUP, &["--config", config.to_str().unwrap()])
}

fn nfs_port(node: &Gvd, name: &str) -> u16 {
    let list = NodesFile::read(&node.nodes_path()).unwrap();
    list.node(name).unwrap().record.zones[0].nfs_port
}

fn url(port: u16, file: &str) -> String {
    format!("nfs://127.0.0.1/z/{file}?nfsport={port}&mountport={port}&auto-traverse-mounts=0")
}

fn wait_for(what: &str, check: impl Fn() -> bool) -> Duration {
    let started = Instant::now();
    while started.elapsed() < WAIT {
        if check() {
            return started.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: not within {WAIT:?}");
}

/// Conflict copies of `notes.txt`.
fn conflict_copies(dir: &Path) -> Vec<String> {
    let mut copies: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("notes") && n.contains(".conflict-"))
        .collect();
    copies.sort();
    copies
}

#[test]
#[ignore = "needs nfs-cp and nfs-cat (Debian libnfs-utils); .ci/run installs them and runs it with --include-ignored"]
fn a_zone_replicates_between_three_nodes() {
    assert!(
        have_nfs_tools(),
        "needs nfs-cp and nfs-cat (Debian libnfs-utils)"
    );
    let dir = std::env::temp_dir().join(format!("gvd-zones-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let data = |name: &str| dir.join(format!("{name}-data"));
    let a = start(&dir, "a");
    let mut b = start(&dir, "b");
    let mut c = start(&dir, "c");
    a.wait_list(WAIT, |l| {
        l.nodes.len() == 3 && l.nodes.iter().all(|n| n.record.zones.len() == 1)
    });

    // Written through A's NFS server, read back through C's.
    let original: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let source = dir.join("hello.bin");
    std::fs::write(&source, &original).unwrap();
    let status = Command::new("nfs-cp")
        .arg(&source)
        .arg(url(nfs_port(&a, "a"), "hello.bin"))
        .status()
        .unwrap();
    assert!(status.success(), "nfs-cp to A");
    let took = wait_for("hello.bin on C", || {
        std::fs::read(data("c").join("hello.bin")).is_ok_and(|d| d == original)
    });
    eprintln!("1 MB written on A was on C after {took:?}");
    let read = Command::new("nfs-cat")
        .arg(url(nfs_port(&a, "c"), "hello.bin"))
        .output()
        .unwrap();
    assert!(read.status.success());
    assert_eq!(read.stdout, original, "identical bytes through C's server");

    // Over the quota: refused.
    let big = dir.join("big.bin");
    std::fs::write(&big, vec![1u8; 9_000_000]).unwrap();
    let over = Command::new("nfs-cp")
        .arg(&big)
        .arg(url(nfs_port(&a, "a"), "big.bin"))
        .output()
        .unwrap();
    assert!(!over.status.success(), "a write past the quota fails");
    // ... and leaves no half file behind, on any member.
    let sentinel = |name: &str| {
        // A change made after what is checked: once it is everywhere, so is what came before.
        std::fs::write(data("a").join(name), name.as_bytes()).unwrap();
        wait_for(name, || {
            ["a", "b", "c"]
                .iter()
                .all(|n| std::fs::read(data(n).join(name)).is_ok_and(|d| d == name.as_bytes()))
        });
    };
    sentinel("after-quota");
    for n in ["a", "b", "c"] {
        assert!(
            !data(n).join("big.bin").exists(),
            "a partial big.bin on {n}"
        );
    }

    // Permission bits replicate, a chmod alone included.
    {
        use std::os::unix::fs::PermissionsExt;
        let script = data("a").join("run.sh");
        std::fs::write(&script, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o750)).unwrap();
        let mode_everywhere = |mode: u32| {
            ["b", "c"].iter().all(|n| {
                std::fs::metadata(data(n).join("run.sh"))
                    .is_ok_and(|m| m.permissions().mode() & 0o7777 == mode)
            })
        };
        wait_for("mode 0750 on B and C", || mode_everywhere(0o750));
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o700)).unwrap();
        wait_for("the chmod to 0700 on B and C", || mode_everywhere(0o700));
    }

    // A renamed directory and a deleted tree stay gone everywhere (they used to come back).
    std::fs::create_dir_all(data("a").join("dirX/sub")).unwrap();
    std::fs::write(data("a").join("dirX/sub/f.txt"), b"in a tree").unwrap();
    std::fs::create_dir_all(data("a").join("rmr/d1/d2")).unwrap();
    std::fs::write(data("a").join("rmr/d1/d2/g.txt"), b"doomed").unwrap();
    wait_for("the trees on every member", || {
        ["a", "b", "c"].iter().all(|n| {
            data(n).join("dirX/sub/f.txt").exists() && data(n).join("rmr/d1/d2/g.txt").exists()
        })
    });
    std::fs::rename(data("a").join("dirX"), data("a").join("dirY")).unwrap();
    std::fs::remove_dir_all(data("a").join("rmr")).unwrap();
    wait_for("the renamed tree on every member", || {
        ["a", "b", "c"]
            .iter()
            .all(|n| std::fs::read(data(n).join("dirY/sub/f.txt")).is_ok_and(|d| d == b"in a tree"))
    });
    sentinel("after-rename");
    sentinel("after-rename-2");
    for n in ["a", "b", "c"] {
        assert!(!data(n).join("dirX").exists(), "dirX came back on {n}");
        assert!(
            !data(n).join("rmr").exists(),
            "the deleted tree came back on {n}"
        );
    }

    // The same new file written on all three members at once: every member ends with the same
    // three versions (the file and two conflict copies), none empty, none nested.
    for n in ["a", "b", "c"] {
        std::fs::write(data(n).join("three.txt"), format!("from {n}")).unwrap();
    }
    let versions = |n: &str| -> Vec<(String, Vec<u8>)> {
        let mut found: Vec<(String, Vec<u8>)> = std::fs::read_dir(data(n))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| name.starts_with("three"))
            .map(|name| {
                let body = std::fs::read(data(n).join(&name)).unwrap_or_default();
                (name, body)
            })
            .collect();
        found.sort();
        found
    };
    wait_for("three identical sets of three versions", || {
        let a = versions("a");
        a.len() == 3 && versions("b") == a && versions("c") == a
    });
    let all = versions("a");
    let mut bodies: Vec<Vec<u8>> = all.iter().map(|(_, body)| body.clone()).collect();
    bodies.sort();
    assert_eq!(
        bodies,
        vec![b"from a".to_vec(), b"from b".to_vec(), b"from c".to_vec()],
        "{all:?}"
    );
    assert!(
        all.iter()
            .all(|(name, _)| name.matches(".conflict-").count() <= 1),
        "no nested conflict copies: {all:?}"
    );

    // Concurrent changes on A and B: both versions kept, on every member.
    std::fs::write(data("a").join("notes.txt"), b"from a").unwrap();
    std::fs::write(data("b").join("notes.txt"), b"from b").unwrap();
    wait_for("a conflict copy on every member", || {
        ["a", "b", "c"]
            .iter()
            .all(|n| conflict_copies(&data(n)).len() == 1)
    });
    wait_for("the same winner and copy everywhere", || {
        let contents: Vec<_> = ["a", "b", "c"]
            .iter()
            .map(|n| {
                let copy = conflict_copies(&data(n));
                (
                    std::fs::read(data(n).join("notes.txt")).ok(),
                    copy.clone(),
                    copy.first()
                        .and_then(|c| std::fs::read(data(n).join(c)).ok()),
                )
            })
            .collect();
        contents.windows(2).all(|w| w[0] == w[1])
    });
    let copy = conflict_copies(&data("a")).remove(0);
    let mut both = vec![
        std::fs::read(data("a").join("notes.txt")).unwrap(),
        std::fs::read(data("a").join(&copy)).unwrap(),
    ];
    both.sort();
    assert_eq!(both, vec![b"from a".to_vec(), b"from b".to_vec()]);

    // D does not hold the zone but serves it, forwarding to a member.
    let d = start(&dir, "d");
    d.wait_list(WAIT, |l| l.nodes.len() == 4);
    let d_port = {
        let list = NodesFile::read(&d.nodes_path()).unwrap();
        let zone = &list.node("d").unwrap().record.zones[0];
        assert!(!zone.member);
        zone.nfs_port
    };
    let via_d = dir.join("via-d.txt");
    std::fs::write(
        &via_d,
        b"written through a node that does not hold the zone",
    )
    .unwrap();
    wait_for("D forwards", || {
        Command::new("nfs-cp")
            .arg(&via_d)
            .arg(url(d_port, "via-d.txt"))
            .output()
            .is_ok_and(|o| o.status.success())
    });
    wait_for("via-d.txt on every member", || {
        ["a", "b", "c"].iter().all(|n| {
            std::fs::read(data(n).join("via-d.txt"))
                .is_ok_and(|d| d == b"written through a node that does not hold the zone")
        })
    });
    let read = Command::new("nfs-cat")
        .arg(url(d_port, "notes.txt"))
        .output()
        .unwrap();
    assert!(read.status.success());
    assert_eq!(
        read.stdout,
        std::fs::read(data("a").join("notes.txt")).unwrap()
    );
    assert!(!dir.join("d-data").exists(), "D holds nothing");
    drop(d);

    // C is down while A takes a write; it catches up when it returns.
    Command::new("kill")
        .args(["-TERM", &c.child.id().to_string()])
        .status()
        .unwrap();
    let _ = c.child.wait();
    let away = dir.join("away.bin");
    std::fs::write(&away, b"written while C was down").unwrap();
    assert!(Command::new("nfs-cp")
        .arg(&away)
        .arg(url(nfs_port(&a, "a"), "away.bin"))
        .status()
        .unwrap()
        .success());
    drop(c);
    c = start(&dir, "c");
    let took = wait_for("C caught up", || {
        std::fs::read(data("c").join("away.bin")).is_ok_and(|d| d == b"written while C was down")
    });
    eprintln!("C caught up {took:?} after its restart");

    // A deletion replicates, and a member that restarts does not bring the file back.
    std::fs::remove_file(data("a").join("hello.bin")).unwrap();
    wait_for("hello.bin deleted everywhere", || {
        ["a", "b", "c"]
            .iter()
            .all(|n| !data(n).join("hello.bin").exists())
    });
    Command::new("kill")
        .args(["-TERM", &b.child.id().to_string()])
        .status()
        .unwrap();
    let _ = b.child.wait();
    drop(b);
    b = start(&dir, "b");
    b.wait_list(WAIT, |l| l.nodes.len() == 3);
    std::thread::sleep(Duration::from_secs(1));
    for n in ["a", "b", "c"] {
        assert!(!data(n).join("hello.bin").exists(), "resurrected on {n}");
    }
    drop((a, b, c));
    let _ = std::fs::remove_dir_all(&dir);
}
