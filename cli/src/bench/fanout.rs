//! `bench fanout`: one publisher, N subscriber *processes* on the same group, flow-controlled by
//! the slowest; each subscriber's rate against one subscriber process alone, in the same run.
//!
//! Each subscriber process (`bench fanout-subscriber`, started by this one) reports how many
//! deltas it processed over loopback UDP every half millisecond, which is what the publisher's
//! credit window waits on; when its stdin closes it prints its counters as one JSON line.

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use grapevine::core::net::MulticastConfig;
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::snapshotter::{SnapshotRate, Snapshotter, SnapshotterOptions};
use grapevine::subscriber::{Subscriber, SubscriberOptions};
use serde_json::json;

use super::{payload_bytes, PayloadMap, ThroughputArgs};

/// `bench fanout`.
#[derive(Args, Debug)]
pub(crate) struct FanoutArgs {
    #[command(flatten)]
    throughput: ThroughputArgs,
    /// Subscriber processes in the fan-out run (the baseline run has one).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=32))]
    subscribers: u32,
}

/// `bench fanout-subscriber` (started by `bench fanout`).
#[derive(Args, Debug)]
pub(crate) struct FanoutSubscriberArgs {
    /// The group.
    #[arg(long, value_parser = crate::values::group)]
    group: SocketAddr,
    /// Where to report progress (loopback UDP).
    #[arg(long, value_parser = crate::values::endpoint)]
    report: SocketAddr,
    /// This subscriber's index.
    #[arg(long)]
    index: u32,
}

/// What one subscriber process said at the end.
#[derive(Debug, serde::Deserialize, serde::Serialize)]
struct SubscriberReport {
    index: u32,
    processed: u64,
    lost: u64,
    gaps: u64,
    kernel_drops: u64,
    cpu_seconds: f64,
}

/// One run: the publisher's side and each subscriber's report.
struct Run {
    sent: u64,
    seconds: f64,
    reports: Vec<SubscriberReport>,
}

impl Run {
    fn rate(&self, report: &SubscriberReport) -> f64 {
        report.processed as f64 / self.seconds.max(1e-9)
    }

    /// Deltas a subscriber processed per second of CPU it used: what it costs, apart from how
    /// many cores there are to share.
    fn per_cpu_second(report: &SubscriberReport) -> f64 {
        report.processed as f64 / report.cpu_seconds.max(1e-9)
    }
}

/// Kills and reaps the subscriber processes of a run however it ends.
struct Children(Vec<Child>);

impl Drop for Children {
    fn drop(&mut self) {
        for child in &mut self.0 {
            // It may have exited already: then there is nothing to kill.
            let _ = child.kill();
            // Reaps it; an error means it was reaped already.
            let _ = child.wait();
        }
    }
}

pub(super) fn fanout(args: &FanoutArgs) -> Result<()> {
    let single = run(&args.throughput, 1)?;
    let many = run(&args.throughput, args.subscribers)?;
    let baseline = single
        .reports
        .first()
        .map(|r| single.rate(r))
        .unwrap_or_default();
    let ratios: Vec<f64> = many
        .reports
        .iter()
        .map(|r| many.rate(r) / baseline.max(1.0))
        .collect();
    let worst = ratios.iter().copied().fold(f64::INFINITY, f64::min);
    let baseline_cost = single
        .reports
        .first()
        .map(Run::per_cpu_second)
        .unwrap_or_default();
    let cost_ratios: Vec<f64> = many
        .reports
        .iter()
        .map(|r| Run::per_cpu_second(r) / baseline_cost.max(1.0))
        .collect();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    if args.throughput.json {
        let side = |run: &Run| {
            json!({
                "sent": run.sent,
                "seconds": run.seconds,
                "subscribers": run.reports.iter().map(|r| json!({
                    "index": r.index,
                    "processed": r.processed,
                    "messages_per_second": run.rate(r),
                    "lost": r.lost,
                    "gaps": r.gaps,
                    "kernel_drops": r.kernel_drops,
                    "cpu_percent": r.cpu_seconds / run.seconds.max(1e-9) * 100.0,
                    "messages_per_cpu_second": Run::per_cpu_second(r),
                })).collect::<Vec<_>>(),
            })
        };
        println!(
            "{}",
            json!({
                "bench": "fanout",
                "payload": args.throughput.payload,
                "window": args.throughput.window,
                "single": side(&single),
                "fanout": side(&many),
                "ratios": ratios,
                "worst_ratio": worst,
                "per_cpu_second_ratios": cost_ratios,
                "cores": cores,
            })
        );
        return Ok(());
    }
    println!(
        "fan-out on loopback, {} B deltas, credit window {} B, the slowest subscriber paces the publisher",
        args.throughput.payload, args.throughput.window
    );
    let print = |title: &str, run: &Run| {
        println!("  {title}: {} sent in {:.2} s", run.sent, run.seconds);
        for report in &run.reports {
            println!(
                "    subscriber {}: {:>10.0} msgs/s ({:.0} per CPU-second), lost {}, gaps {}, kernel drops {}, CPU {:.0} %",
                report.index,
                run.rate(report),
                Run::per_cpu_second(report),
                report.lost,
                report.gaps,
                report.kernel_drops,
                report.cpu_seconds / run.seconds.max(1e-9) * 100.0
            );
        }
    };
    print("one subscriber process", &single);
    print(&format!("{} subscriber processes", args.subscribers), &many);
    println!(
        "  each of {} against one alone: {} (worst {:.2}; target 0.8)",
        args.subscribers,
        ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        worst
    );
    println!(
        "  per CPU-second against one alone: {} ({cores} cores shared by the publisher and {} subscribers)",
        cost_ratios
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", "),
        args.subscribers
    );
    Ok(())
}

/// Publishes for `args.seconds` to `count` subscriber processes, as fast as the slowest lets.
fn run(args: &ThroughputArgs, count: u32) -> Result<Run> {
    let group = MulticastConfig::new(args.group);
    let reports = UdpSocket::bind("127.0.0.1:0").context("report socket")?;
    reports.set_read_timeout(Some(Duration::from_millis(50)))?;
    let report_address = reports.local_addr()?;
    let processed: Arc<Vec<AtomicU64>> = Arc::new((0..count).map(|_| AtomicU64::new(0)).collect());
    let heard: Arc<Vec<AtomicBool>> =
        Arc::new((0..count).map(|_| AtomicBool::new(false)).collect());
    let stop = Arc::new(AtomicBool::new(false));
    let listener = {
        let (processed, heard, stop) = (
            Arc::clone(&processed),
            Arc::clone(&heard),
            Arc::clone(&stop),
        );
        std::thread::spawn(move || {
            let mut buffer = [0u8; 16];
            while !stop.load(Ordering::Relaxed) {
                let Ok(len) = reports.recv(&mut buffer) else {
                    continue;
                };
                let Some((index, count)) = parse_progress(&buffer[..len]) else {
                    continue;
                };
                if let (Some(slot), Some(seen)) =
                    (processed.get(index as usize), heard.get(index as usize))
                {
                    slot.fetch_max(count, Ordering::Relaxed);
                    seen.store(true, Ordering::Relaxed);
                }
            }
        })
    };
    let program = std::env::current_exe().context("this program's path")?;
    let mut children = Children(Vec::new());
    for index in 0..count {
        let child = Command::new(&program)
            .args(["bench", "fanout-subscriber", "--group"])
            .arg(args.group.to_string())
            .arg("--report")
            .arg(report_address.to_string())
            .arg("--index")
            .arg(index.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting a subscriber process")?;
        children.0.push(child);
    }
    let waited = Instant::now();
    while !heard.iter().all(|h| h.load(Ordering::Relaxed)) {
        if waited.elapsed() > Duration::from_secs(10) {
            bail!("the subscriber processes did not report within 10 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut options = PublisherOptions::new(1, group.clone());
    options.session.heartbeat_interval = Duration::from_millis(50);
    let publisher = Publisher::start(options, PayloadMap::default())?;
    let _snapshotter = if args.snapshot_rate > 0 {
        let mut options = SnapshotterOptions::new(group);
        options.snapshot.rate = SnapshotRate::LeavesPerSecond(args.snapshot_rate);
        Some(Snapshotter::start(&publisher, options)?)
    } else {
        None
    };
    let window = if args.window == 0 {
        0
    } else {
        (args.window / (args.payload as u64 + 32)).max(1)
    };
    let payload = payload_bytes(args.payload);
    let duration = Duration::from_secs_f64(args.seconds.max(0.1));
    let slowest = || {
        processed
            .iter()
            .map(|p| p.load(Ordering::Relaxed))
            .min()
            .unwrap_or(0)
    };
    let (sent, seconds) =
        super::publish_paced(&publisher, args, &payload, &[], duration, window, slowest)?;
    // What is in flight lands (bounded), then each process reports.
    let drained_by = Instant::now() + Duration::from_millis(500);
    while slowest() < sent && Instant::now() < drained_by {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut reports = Vec::new();
    for child in &mut children.0 {
        // Closing stdin asks the process for its report.
        drop(child.stdin.take());
    }
    for child in &mut children.0 {
        let mut out = String::new();
        child
            .stdout
            .take()
            .context("subscriber stdout")?
            .read_to_string(&mut out)?;
        let line = out.lines().last().unwrap_or_default();
        reports.push(
            serde_json::from_str::<SubscriberReport>(line)
                .with_context(|| format!("a subscriber process reported {line:?}"))?,
        );
    }
    stop.store(true, Ordering::Relaxed);
    // The listener wakes within its read timeout.
    let _ = listener.join();
    publisher.shutdown();
    Ok(Run {
        sent,
        seconds,
        reports,
    })
}

fn parse_progress(bytes: &[u8]) -> Option<(u32, u64)> {
    let index = u32::from_be_bytes(bytes.get(..4)?.try_into().ok()?);
    let count = u64::from_be_bytes(bytes.get(4..12)?.try_into().ok()?);
    Some((index, count))
}

fn progress(index: u32, count: u64) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&index.to_be_bytes());
    out[4..].copy_from_slice(&count.to_be_bytes());
    out
}

/// One subscriber process of `bench fanout`: reports progress until stdin closes, then prints
/// its counters.
pub(super) fn fanout_subscriber(args: &FanoutSubscriberArgs) -> Result<()> {
    let mut options = SubscriberOptions::new(1, MulticastConfig::new(args.group));
    options.session.emit_applied = false;
    options.batch = 64;
    let subscriber = Subscriber::<PayloadMap>::join(options)?;
    let cpu_before = super::process_cpu_seconds();
    let reporter = UdpSocket::bind("127.0.0.1:0")?;
    let done = Arc::new(AtomicBool::new(false));
    let stdin_closed = {
        let done = Arc::clone(&done);
        std::thread::spawn(move || {
            // Any line or the end of stdin ends the run.
            let mut line = String::new();
            let _ = std::io::stdin().lock().read_line(&mut line);
            done.store(true, Ordering::Relaxed);
        })
    };
    while !done.load(Ordering::Relaxed) {
        // Best effort: a lost report only delays the publisher by one period.
        let _ = reporter.send_to(&progress(args.index, subscriber.processed()), args.report);
        std::thread::sleep(Duration::from_micros(500));
    }
    let _ = stdin_closed.join();
    let stats = subscriber.stats();
    let report = SubscriberReport {
        index: args.index,
        processed: subscriber.processed(),
        lost: stats.protocol.messages_lost,
        gaps: stats.protocol.gaps,
        kernel_drops: stats.kernel_drops,
        cpu_seconds: super::process_cpu_seconds() - cpu_before,
    };
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(&report)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_reports_round_trip_and_short_ones_are_ignored() {
        assert_eq!(parse_progress(&progress(3, 1 << 40)), Some((3, 1 << 40)));
        assert_eq!(parse_progress(&progress(3, 7)[..11]), None);
        assert_eq!(parse_progress(&[]), None);
    }
}
