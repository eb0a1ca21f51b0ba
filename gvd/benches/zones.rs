//! GrapeVineFS figures: replication latency (a file written on A through its NFS server, until
//! it is complete on B), and NFS read/write throughput against a plain copy on the local disk
//! measured in the same run. Needs nfs-cp and nfs-cat (Debian libnfs-utils).
//!
//! `cargo bench -p gvd --bench zones -- [--small 30] [--big-mb 100] [--rounds 3] [--json]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grapevine_kos::nodes::NodesFile;

const DEBOUNCE_MS: u64 = 100;

struct Node {
    child: Child,
    state: PathBuf,
    data: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, name: &str) -> Node {
    let data = dir.join(format!("{name}-data"));
    let state = dir.join(name);
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "name = \"{name}\"\nquery_port = 0\nkos_port = 0\nrepl_port = 0\nelp_delay_ms = 200\n\
             group = \"239.255.79.70:47970\"\nzone_debounce_ms = {DEBOUNCE_MS}\n\
             [[zones]]\nname = \"z\"\nquota_bytes = 10000000000\nmembers = [\"a\", \"b\"]\npath = \"{}\"\n",
            data.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gvd"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .arg("--vdriver-path")
        .arg(dir.join("no-drivers"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Node { child, state, data }
}

fn percentile(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3
}

fn wait_identical(path: &Path, want: &[u8], limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.len() == want.len() as u64)
            && std::fs::read(path).is_ok_and(|d| d == want)
        {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < limit,
            "{} never arrived",
            path.display()
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

fn main() {
    let (mut small, mut big_mb, mut rounds, mut json) = (30usize, 100usize, 3usize, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--small" => small = args.next().and_then(|v| v.parse().ok()).expect("--small N"),
            "--big-mb" => {
                big_mb = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--big-mb N")
            }
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds N")
            }
            "--json" => json = true,
            _ => {}
        }
    }
    if Command::new("nfs-cp").arg("--help").output().is_err() {
        eprintln!("needs nfs-cp and nfs-cat (apt install libnfs-utils)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("gvd-zones-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let a = start(&dir, "a");
    let b = start(&dir, "b");
    let nodes = a.state.join("nodes.json");
    let started = Instant::now();
    let port = loop {
        let port = NodesFile::read(&nodes).ok().and_then(|l| {
            (l.nodes.len() == 2).then_some(())?;
            l.node("a").map(|n| n.record.zones[0].nfs_port)
        });
        if let Some(port) = port {
            break port;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gvd did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let url = |name: &str| {
        format!("nfs://127.0.0.1/z/{name}?nfsport={port}&mountport={port}&auto-traverse-mounts=0")
    };
    let nfs_cp = |from: &Path, name: &str| {
        let status = Command::new("nfs-cp")
            .arg(from)
            .arg(url(name))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "nfs-cp {name}");
    };

    // Small files: latency from the write's completion to the identical file on B.
    let mut latencies = Vec::new();
    for i in 0..small {
        let content: Vec<u8> = (0..4096u32).map(|j| (i as u32 * 31 + j) as u8).collect();
        let source = dir.join(format!("small-{i}"));
        std::fs::write(&source, &content).unwrap();
        nfs_cp(&source, &format!("small-{i}"));
        latencies.push(wait_identical(
            &b.data.join(format!("small-{i}")),
            &content,
            Duration::from_secs(20),
        ));
        if !json {
            eprint!("\r  small files {}/{small}", i + 1);
        }
    }
    if !json {
        eprintln!();
    }
    let small_p50 = percentile(&mut latencies, 0.5);
    let small_p99 = percentile(&mut latencies, 0.99);

    // Big files: throughput through NFS and the same on the local disk; replication latency.
    let big: Vec<u8> = (0..big_mb * (1 << 20)).map(|i| (i % 253) as u8).collect();
    let source = dir.join("big-source");
    std::fs::write(&source, &big).unwrap();
    let (mut nfs_write, mut local_write, mut nfs_read, mut local_read, mut big_latency) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let name = format!("big-{round}");
        let t = Instant::now();
        nfs_cp(&source, &name);
        nfs_write.push(t.elapsed());
        big_latency.push(wait_identical(
            &b.data.join(&name),
            &big,
            Duration::from_secs(120),
        ));
        let t = Instant::now();
        let local = dir.join(format!("local-{round}"));
        std::fs::copy(&source, &local).unwrap();
        std::fs::File::open(&local).unwrap().sync_all().unwrap();
        local_write.push(t.elapsed());
        let t = Instant::now();
        let read = Command::new("nfs-cat").arg(url(&name)).output().unwrap();
        nfs_read.push(t.elapsed());
        assert_eq!(read.stdout.len(), big.len());
        let t = Instant::now();
        let local_bytes = std::fs::read(&local).unwrap();
        local_read.push(t.elapsed());
        assert_eq!(local_bytes.len(), big.len());
        if !json {
            eprint!("\r  big files {}/{rounds}", round + 1);
        }
    }
    if !json {
        eprintln!();
    }
    let mb = big.len() as f64 / 1e6;
    let rate = |samples: &mut Vec<Duration>| mb / (percentile(samples, 0.5) / 1e3);
    let (nw, lw, nr, lr) = (
        rate(&mut nfs_write),
        rate(&mut local_write),
        rate(&mut nfs_read),
        rate(&mut local_read),
    );
    let big_p50 = percentile(&mut big_latency, 0.5);
    let big_max = percentile(&mut big_latency, 1.0);
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "debounce_ms": DEBOUNCE_MS,
                "small_files": small, "small_p50_ms": small_p50, "small_p99_ms": small_p99,
                "big_mb": big_mb, "big_rounds": rounds, "big_p50_ms": big_p50, "big_max_ms": big_max,
                "nfs_write_mb_s": nw, "local_write_mb_s": lw, "nfs_read_mb_s": nr, "local_read_mb_s": lr,
            })
        );
        return;
    }
    println!("GrapeVineFS, two members on loopback, debounce {DEBOUNCE_MS} ms");
    println!("  replication, 4 KiB files ({small}): p50 {small_p50:.0} ms, p99 {small_p99:.0} ms after the write returned");
    println!("  replication, {big_mb} MB files ({rounds}): p50 {big_p50:.0} ms, max {big_max:.0} ms after the write returned");
    println!(
        "  write: NFS {nw:.0} MB/s, local copy + fsync {lw:.0} MB/s (ratio {:.2})",
        nw / lw
    );
    println!(
        "  read:  NFS {nr:.0} MB/s, local read {lr:.0} MB/s (ratio {:.2})",
        nr / lr
    );
}
