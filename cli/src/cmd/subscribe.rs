//! `grapevine sub`: an order-book subscriber printing top of book and counters.

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use grapevine::core::proto::StreamStatus;
use grapevine::core::state::{digest, short_hex, ReplicatedState};
use grapevine::order_book::OrderBook;
use grapevine::subscriber::Subscriber;

use crate::{interrupted, subscriber_options, NetArgs};

#[derive(Args, Debug)]
pub(crate) struct SubArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long, value_parser = crate::values::seconds, allow_negative_numbers = true)]
    seconds: Option<f64>,
    /// Fraction of datagrams to drop on receipt, to watch recovery.
    #[arg(long, default_value_t = 0.0, value_parser = crate::values::fraction, allow_negative_numbers = true)]
    loss: f64,
    /// Print one JSON object per second instead of text.
    #[arg(long)]
    json: bool,
    /// Serve the counters for Prometheus on this address (e.g. 127.0.0.1:9465).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

pub(crate) fn subscribe(args: &SubArgs) -> Result<()> {
    let subscriber = Subscriber::<OrderBook>::join(subscriber_options(&args.net, args.loss)?)?;
    let started = Instant::now();
    let stop_at = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let tty = std::io::stdout().is_terminal();
    let metrics = Arc::new(parking_lot::Mutex::new(String::new()));
    if let Some(address) = args.metrics {
        let metrics = Arc::clone(&metrics);
        crate::metrics::serve_metrics(address, move || metrics.lock().clone())?;
    }
    let labels = format!("topic=\"{}\"", args.net.topic);
    while stop_at.is_none_or(|t| Instant::now() < t) && !interrupted() {
        std::thread::sleep(Duration::from_secs(1));
        let stats = subscriber.stats();
        let p = stats.protocol;
        // One look at the streams (the session lock) for both gauges.
        let (live, silent) = subscriber.read(|s| {
            s.streams().fold((0, 0), |(live, silent), v| {
                (
                    live + usize::from(v.status == StreamStatus::Live),
                    silent + usize::from(v.silent),
                )
            })
        });
        *metrics.lock() = crate::metrics::prometheus(
            &labels,
            &[
                (
                    "grapevine_subscriber_datagrams_total",
                    "Datagrams received.",
                    p.datagrams,
                ),
                (
                    "grapevine_subscriber_malformed_total",
                    "Malformed datagrams.",
                    p.malformed,
                ),
                (
                    "grapevine_subscriber_deltas_applied_total",
                    "Deltas applied.",
                    p.deltas_applied,
                ),
                (
                    "grapevine_subscriber_duplicates_total",
                    "Duplicate deltas.",
                    p.duplicates,
                ),
                ("grapevine_subscriber_gaps_total", "Sequence gaps.", p.gaps),
                (
                    "grapevine_subscriber_messages_lost_total",
                    "Deltas lost.",
                    p.messages_lost,
                ),
                (
                    "grapevine_subscriber_recoveries_total",
                    "Recoveries from snapshots.",
                    p.recoveries,
                ),
                (
                    "grapevine_subscriber_restarts_total",
                    "Publisher restarts seen.",
                    p.restarts,
                ),
                (
                    "grapevine_subscriber_snapshot_messages_total",
                    "Snapshot messages received.",
                    p.snapshot_messages,
                ),
                (
                    "grapevine_subscriber_kernel_drops_total",
                    "Datagrams the kernel dropped (receive buffer full, or a bad UDP checksum).",
                    stats.kernel_drops,
                ),
                (
                    "grapevine_subscriber_unauthenticated_total",
                    "Datagrams refused by authentication (unsigned, unknown key, bad tag).",
                    p.unauthenticated,
                ),
                (
                    "grapevine_subscriber_replayed_total",
                    "Signed datagrams refused as replays.",
                    p.replayed,
                ),
                (
                    "grapevine_subscriber_retired_session_total",
                    "Datagrams of sessions older than the one followed.",
                    p.retired_session,
                ),
                (
                    "grapevine_subscriber_streams_refused_total",
                    "Datagrams of new publishers refused (max_streams reached).",
                    p.streams_refused,
                ),
                (
                    "grapevine_subscriber_truncated_total",
                    "Datagrams larger than the buffer.",
                    stats.truncated,
                ),
                (
                    "grapevine_subscriber_events_dropped_total",
                    "Events the application did not read.",
                    stats.events_dropped,
                ),
                (
                    "grapevine_subscriber_live_streams",
                    "Publisher streams that are live.",
                    live as u64,
                ),
                (
                    "grapevine_subscriber_silent_streams",
                    "Publisher streams not heard for the publisher timeout (stopped, or cut off).",
                    silent as u64,
                ),
            ],
        );
        let lines = subscriber.read(|s| {
            let mut lines = Vec::new();
            for view in s.streams() {
                let status = match view.status {
                    StreamStatus::Joining => "joining",
                    StreamStatus::Recovering => "recovering",
                    StreamStatus::Live => "live",
                };
                if args.json {
                    let tops: Vec<_> = view
                        .state
                        .instruments()
                        .into_iter()
                        .map(|i| {
                            serde_json::json!({
                                "instrument": i,
                                "bid": view.state.best_bid(i).map(|b| b.0),
                                "ask": view.state.best_ask(i).map(|a| a.0),
                            })
                        })
                        .collect();
                    lines.push(
                        serde_json::json!({
                            "t": started.elapsed().as_secs_f64(),
                            "publisher": view.publisher,
                            // Hex, as in the text output and `spy --json`.
                            "session": format!("{:016x}", view.session),
                            "status": status,
                            "publisher_silent": view.silent,
                            "seq": view.last_seq,
                            "levels": view.state.len(),
                            "stale": view.stale.len(),
                            "digest": short_hex(&digest(view.state)),
                            "top": tops,
                            "applied": p.deltas_applied,
                            "gaps": p.gaps,
                            "duplicates": p.duplicates,
                            "lost": p.messages_lost,
                            "recoveries": p.recoveries,
                            "malformed": p.malformed,
                            "kernel_drops": stats.kernel_drops,
                            "unauthenticated": p.unauthenticated,
                            "replayed": p.replayed,
                            "retired_session": p.retired_session,
                            "streams_refused": p.streams_refused,
                            "streams_evicted": p.streams_evicted,
                        })
                        .to_string(),
                    );
                    continue;
                }
                let silent = if view.silent {
                    format!(
                        " (publisher silent for {:.1} s: the state may be behind)",
                        view.last_heard.elapsed().as_secs_f64()
                    )
                } else {
                    String::new()
                };
                lines.push(format!(
                    "publisher {} session {:#x}: {status}{silent}, seq {}, {} levels, {} stale, digest {}",
                    view.publisher,
                    view.session,
                    view.last_seq,
                    view.state.len(),
                    view.stale.len(),
                    short_hex(&digest(view.state))
                ));
                for instrument in view.state.instruments().into_iter().take(8) {
                    let fmt = |l: Option<(i64, grapevine::order_book::Level)>| {
                        l.map_or("-".to_string(), |(p, l)| format!("{} x {}", p, l.quantity))
                    };
                    lines.push(format!(
                        "  #{instrument:<3} bid {:>16}   ask {:<16}",
                        fmt(view.state.best_bid(instrument)),
                        fmt(view.state.best_ask(instrument))
                    ));
                }
            }
            lines
        });
        if tty && !args.json {
            print!("\x1b[2J\x1b[H");
        }
        for line in lines {
            println!("{line}");
        }
        if !args.json {
            println!(
                "applied {} gaps {} lost {} recoveries {} (last {}) malformed {} kernel drops {} rcvbuf {} unauthenticated {} replayed {} retired-session {}",
                p.deltas_applied,
                p.gaps,
                p.messages_lost,
                p.recoveries,
                p.last_recovery
                    .map_or_else(|| "none".to_string(), |d| format!("{:.1} ms", d.as_secs_f64() * 1e3)),
                p.malformed,
                stats.kernel_drops,
                stats.recv_buffer,
                p.unauthenticated,
                p.replayed,
                p.retired_session
            );
        }
    }
    subscriber.shutdown();
    Ok(())
}
