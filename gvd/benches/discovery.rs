//! Discovery at scale: N gvd nodes in one process, each with its own sockets, state directory
//! and node list, announcing over loopback multicast. Reports how long until every node lists
//! every other with its VDEVs, the ELP/VDEV traffic each node sends, and, run again with
//! receive loss injected, how often live nodes were wrongly suspected or declared dead.
//!
//! `cargo bench -p gvd --bench discovery -- [--nodes 50] [--seconds 20] [--loss 0.1]
//! [--elp-delay-ms 200] [--node-ttl 5] [--json]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gvd::daemon::{Config, Daemon, DaemonStats};
use parking_lot::Mutex;

struct Settings {
    nodes: usize,
    seconds: u64,
    loss: f64,
    elp_delay_ms: u64,
    node_ttl: u32,
    json: bool,
}

fn settings() -> Settings {
    let mut s = Settings {
        nodes: 50,
        seconds: 20,
        loss: 0.1,
        elp_delay_ms: 200,
        node_ttl: 5,
        json: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().expect("a value after the flag");
        match arg.as_str() {
            "--nodes" => s.nodes = value().parse().expect("--nodes N"),
            "--seconds" => s.seconds = value().parse().expect("--seconds S"),
            "--loss" => s.loss = value().parse().expect("--loss F"),
            "--elp-delay-ms" => s.elp_delay_ms = value().parse().expect("--elp-delay-ms MS"),
            "--node-ttl" => s.node_ttl = value().parse().expect("--node-ttl N"),
            "--json" => s.json = true,
            _ => {} // cargo bench passes --bench
        }
    }
    s
}

/// What a node's thread reports after each step.
#[derive(Clone, Copy, Default)]
struct Report {
    complete_at: Option<Instant>,
    stats: DaemonStats,
    sent: (u64, u64),
}

struct Run {
    convergence_from_last_start: Duration,
    slowest_node_from_its_start: Duration,
    datagrams_per_node_per_second: f64,
    bytes_per_node_per_second: f64,
    suspected: u64,
    died: u64,
    queries_sent: u64,
    node_seconds: f64,
}

fn driver_dir() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_gvd"));
    let target = bin.parent().unwrap();
    let file = "libgv_echo.so";
    let built = [target.join("deps").join(file), target.join(file)]
        .into_iter()
        .find(|p| p.exists())
        .expect("gv-echo built (a dev-dependency of gvd)");
    let dir = std::env::temp_dir().join(format!("gvd-bench-drivers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(built, dir.join("echo.so")).unwrap();
    dir
}

fn run(s: &Settings, loss: f64, group_port: u16, drivers: &Path) -> Run {
    let root = std::env::temp_dir().join(format!("gvd-bench-{}-{group_port}", std::process::id()));
    let stop = Arc::new(AtomicBool::new(false));
    let n = s.nodes;
    let reports: Vec<Arc<Mutex<Report>>> = (0..n).map(|_| Arc::default()).collect();
    let mut starts = Vec::new();
    let mut threads = Vec::new();
    for (i, report) in reports.iter().enumerate() {
        let config = Config {
            name: format!("node{i:02}"),
            state_dir: root.join(format!("node{i}")),
            vdriver_path: drivers.display().to_string(),
            group: format!("239.255.79.30:{group_port}").parse().unwrap(),
            // Every node of the process needs its own ports: 0 picks free ones.
            query_port: 0,
            kos_port: 0,
            repl_port: 0,
            iface: "lo".into(),
            elp_delay_ms: s.elp_delay_ms,
            node_ttl: s.node_ttl,
            inject_loss: loss,
            // Fifty status pages in one process would only compete for one port.
            admin: false,
            ..Config::default()
        };
        let started = Instant::now();
        let mut daemon =
            Daemon::start(&config, Path::new(env!("CARGO_BIN_EXE_gvd"))).expect("start a node");
        starts.push(started);
        if std::env::var_os("GVD_BENCH_TRACE").is_some() {
            eprintln!("node {i} started in {:?}", started.elapsed());
        }
        let report = Arc::clone(report);
        let stop = Arc::clone(&stop);
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                let wait = daemon
                    .poll_timeout()
                    .saturating_duration_since(Instant::now());
                std::thread::sleep(wait.min(Duration::from_millis(20)));
                daemon.step(Instant::now()).unwrap();
                let complete = daemon
                    .node_list()
                    .is_some_and(|l| l.nodes.len() == n && l.nodes.iter().all(|e| e.vdevs_current));
                let mut r = report.lock();
                if std::env::var_os("GVD_BENCH_TRACE").is_some() && r.complete_at.is_none() {
                    if let Some(l) = daemon.node_list() {
                        eprintln!(
                            "node {i} {:?}: {} listed, {} with VDEVs",
                            Instant::now(),
                            l.nodes.len(),
                            l.nodes.iter().filter(|e| e.vdevs_current).count()
                        );
                    }
                }
                if complete && r.complete_at.is_none() {
                    r.complete_at = Some(Instant::now());
                }
                r.stats = daemon.stats();
                r.sent = daemon.sent();
            }
            daemon.shutdown();
        }));
    }
    let last_start = *starts.last().unwrap();
    let deadline = last_start + Duration::from_millis(s.elp_delay_ms * 50);
    while Instant::now() < deadline && reports.iter().any(|r| r.lock().complete_at.is_none()) {
        std::thread::sleep(Duration::from_millis(5));
    }
    let completions: Vec<Option<Instant>> = reports.iter().map(|r| r.lock().complete_at).collect();
    assert!(
        completions.iter().all(Option::is_some),
        "{} of {n} nodes never listed everyone",
        completions.iter().filter(|c| c.is_none()).count()
    );
    let convergence_from_last_start = completions
        .iter()
        .flatten()
        .map(|c| c.saturating_duration_since(last_start))
        .max()
        .unwrap_or_default();
    let slowest_node_from_its_start = completions
        .iter()
        .zip(&starts)
        .map(|(c, s)| c.unwrap().saturating_duration_since(*s))
        .max()
        .unwrap_or_default();

    // Steady state: traffic and false suspicions while nobody fails.
    let before: Vec<Report> = reports.iter().map(|r| *r.lock()).collect();
    let measured_from = Instant::now();
    let mut next_progress = measured_from;
    while measured_from.elapsed() < Duration::from_secs(s.seconds) {
        if Instant::now() >= next_progress && !s.json {
            let died: u64 = reports
                .iter()
                .map(|r| r.lock().stats.transitions.died)
                .sum();
            eprint!(
                "\r  steady state {:>3}/{} s, false deaths so far {died}",
                measured_from.elapsed().as_secs(),
                s.seconds
            );
            next_progress += Duration::from_secs(1);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if !s.json {
        eprintln!();
    }
    let elapsed = measured_from.elapsed().as_secs_f64();
    let after: Vec<Report> = reports.iter().map(|r| *r.lock()).collect();
    stop.store(true, Ordering::Relaxed);
    for thread in threads {
        thread.join().unwrap();
    }
    let _ = std::fs::remove_dir_all(&root);
    let sum = |f: &dyn Fn(&Report) -> u64| -> u64 {
        after.iter().zip(&before).map(|(a, b)| f(a) - f(b)).sum()
    };
    Run {
        convergence_from_last_start,
        slowest_node_from_its_start,
        datagrams_per_node_per_second: sum(&|r| r.sent.0) as f64 / n as f64 / elapsed,
        bytes_per_node_per_second: sum(&|r| r.sent.1) as f64 / n as f64 / elapsed,
        suspected: sum(&|r| r.stats.transitions.suspected),
        died: sum(&|r| r.stats.transitions.died),
        queries_sent: sum(&|r| r.stats.queries_sent),
        node_seconds: elapsed * n as f64,
    }
}

fn main() {
    let s = settings();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let drivers = driver_dir();
    let mut results = Vec::new();
    let losses = if s.loss > 0.0 {
        vec![0.0, s.loss]
    } else {
        vec![0.0]
    };
    for (round, loss) in losses.into_iter().enumerate() {
        if !s.json {
            eprintln!(
                "{} nodes, ELP_DELAY {} ms, NODE_TTL {}, receive loss {:.0} %",
                s.nodes,
                s.elp_delay_ms,
                s.node_ttl,
                loss * 100.0
            );
        }
        let r = run(&s, loss, 47_930 + 2 * round as u16, &drivers);
        // Each node watches every other: the chances to wrongly suspect or kill are per pair.
        let pair_hours = r.node_seconds * (s.nodes - 1) as f64 / 3600.0;
        if !s.json {
            println!(
                "  converged {:>6.0} ms after the last start ({:.1} ELP_DELAY); slowest node {:.0} ms after its own start",
                r.convergence_from_last_start.as_secs_f64() * 1e3,
                r.convergence_from_last_start.as_secs_f64() * 1e3 / s.elp_delay_ms as f64,
                r.slowest_node_from_its_start.as_secs_f64() * 1e3,
            );
            println!(
                "  traffic sent per node: {:.1} datagrams/s, {:.0} B/s (ELP + VDEV topics, snapshots included)",
                r.datagrams_per_node_per_second, r.bytes_per_node_per_second
            );
            println!(
                "  false suspicions {} ({:.2} per pair-hour), false deaths {} ({:.3} per pair-hour), QUERYs {}",
                r.suspected,
                r.suspected as f64 / pair_hours,
                r.died,
                r.died as f64 / pair_hours,
                r.queries_sent
            );
        }
        results.push(serde_json::json!({
            "nodes": s.nodes,
            "elp_delay_ms": s.elp_delay_ms,
            "node_ttl": s.node_ttl,
            "loss": loss,
            "convergence_ms": r.convergence_from_last_start.as_secs_f64() * 1e3,
            "slowest_node_ms": r.slowest_node_from_its_start.as_secs_f64() * 1e3,
            "datagrams_per_node_per_second": r.datagrams_per_node_per_second,
            "bytes_per_node_per_second": r.bytes_per_node_per_second,
            "false_suspicions": r.suspected,
            "false_deaths": r.died,
            "pair_hours": pair_hours,
            "queries_sent": r.queries_sent,
        }));
    }
    if s.json {
        println!("{}", serde_json::Value::Array(results));
    }
    let _ = std::fs::remove_dir_all(&drivers);
}
