//! `grapevine`: run a replication demo, a publisher or a subscriber from the command line.

mod bench;
mod tools;

use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use grapevine::core::net::{self_test, InterfaceSpec, MulticastConfig};
use grapevine::core::proto::{SnapshotConfig, SnapshotRate, StreamStatus};
use grapevine::core::state::{digest, short_hex, ReplicatedState};
use grapevine::order_book::{MarketGenerator, OrderBook};
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine::subscriber::{Subscriber, SubscriberOptions};

/// Replicated state over UDP multicast.
#[derive(Debug, Parser)]
#[command(name = "grapevine", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Publisher, snapshotter and N subscribers in one process on loopback, with injected loss;
    /// exits 0 only when every subscriber converged to the publisher's state.
    Demo(DemoArgs),
    /// Publish a simulated order book until stopped (or for --seconds).
    Pub(PubArgs),
    /// Subscribe to an order book and print top of book and counters every second.
    Sub(SubArgs),
    /// Check that multicast flows on the group and interface.
    Selftest(NetArgs),
    /// Watch groups: per topic and publisher, rates, sequence, gaps, losses, snapshot cycles.
    Spy(tools::SpyArgs),
    /// Record every datagram of some groups, with receive times, into a file.
    Record(tools::RecordArgs),
    /// Play recordings back onto groups, or rebuild a topic's state from them offline.
    Replay(tools::ReplayArgs),
    /// Relay topics between the local group and repeaters on other networks (unicast UDP).
    Repeat(tools::RepeatArgs),
    /// Make a key file: a shared key (every holder can sign), or a publisher's ed25519 secret
    /// key and the public key its subscribers verify with.
    Keygen(tools::KeygenArgs),
    /// Measure GrapeVine against raw UDP multicast in the same run (use a release build).
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(Args, Clone, Debug)]
struct NetArgs {
    /// Multicast group and port of the live stream.
    #[arg(long, env = "GRAPEVINE_GROUP", default_value = "239.255.70.86:7086")]
    group: SocketAddr,
    /// Separate group for snapshots, joined by subscribers only while recovering.
    #[arg(long, env = "GRAPEVINE_RECOVERY_GROUP")]
    recovery_group: Option<SocketAddr>,
    /// Interface (name or address) to join and send on; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Topic id.
    #[arg(long, env = "GRAPEVINE_TOPIC", default_value_t = 1)]
    topic: u32,
    /// Sign (pub) or require (sub) authenticated datagrams with the keys in this file (made by
    /// `grapevine keygen`): shared keys `<id>:<64 hex digits>` (the last signs, all verify), or
    /// a publisher's `ed25519-secret` key and, for subscribers, its `ed25519-public` key.
    /// See docs/SECURITY.md.
    #[arg(long, env = "GRAPEVINE_KEY_FILE")]
    key_file: Option<std::path::PathBuf>,
}

impl NetArgs {
    /// The keyring of `--key-file`, read once; the keys themselves are never printed.
    fn keyring(&self) -> Result<Option<Arc<grapevine::core::auth::Keyring>>> {
        if self.key_file.is_none() {
            static WARNED: std::sync::Once = std::sync::Once::new();
            WARNED.call_once(|| {
                tracing::warn!(
                    group = %self.group,
                    "no --key-file: anyone who can send to this group can forge or silence the \
                     feed (see docs/SECURITY.md)"
                );
            });
        }
        self.key_file
            .as_deref()
            .map(|path| grapevine::core::auth::Keyring::from_file(path).map(Arc::new))
            .transpose()
            .context("--key-file")
    }

    fn live(&self) -> MulticastConfig {
        MulticastConfig::new(self.group).on(self.iface.clone())
    }

    fn recovery(&self) -> Option<MulticastConfig> {
        self.recovery_group
            .map(|g| MulticastConfig::new(g).on(self.iface.clone()))
    }

    fn snapshots(&self) -> MulticastConfig {
        self.recovery().unwrap_or_else(|| self.live())
    }
}

#[derive(Args, Debug)]
struct DemoArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Number of subscribers.
    #[arg(long, default_value_t = 3)]
    subscribers: usize,
    /// Fraction of datagrams each subscriber drops on receipt (0..1).
    #[arg(long, default_value_t = 0.1)]
    loss: f64,
    /// Updates to publish.
    #[arg(long, default_value_t = 200_000)]
    updates: u64,
    /// Seconds over which to publish them.
    #[arg(long, default_value_t = 5.0)]
    seconds: f64,
    /// Instruments in the order book.
    #[arg(long, default_value_t = 8)]
    instruments: u16,
    /// Snapshot rate in leaves per second.
    #[arg(long, default_value_t = 50_000)]
    snapshot_rate: u32,
    /// Seconds to wait for convergence after publishing stops.
    #[arg(long, default_value_t = 15.0)]
    settle: f64,
}

#[derive(Args, Debug)]
struct PubArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Updates per second.
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long)]
    seconds: Option<f64>,
    /// Stop publishing updates after this many, but keep sending heartbeats and snapshots.
    #[arg(long)]
    updates: Option<u64>,
    /// Instruments in the order book.
    #[arg(long, default_value_t = 8)]
    instruments: u16,
    /// Snapshot rate in leaves per second.
    #[arg(long, default_value_t = 50_000)]
    snapshot_rate: u32,
    /// Publisher id (several publishers may share a topic).
    #[arg(long, default_value_t = 0)]
    publisher_id: u32,
    /// Serve the counters for Prometheus on this address (e.g. 127.0.0.1:9464).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

#[derive(Args, Debug)]
struct SubArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Stop after this many seconds (default: run until killed).
    #[arg(long)]
    seconds: Option<f64>,
    /// Fraction of datagrams to drop on receipt, to watch recovery.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Print one JSON object per second instead of text.
    #[arg(long)]
    json: bool,
    /// Serve the counters for Prometheus on this address (e.g. 127.0.0.1:9465).
    #[arg(long)]
    metrics: Option<SocketAddr>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Ctrl-C / SIGTERM end `pub` and `sub` cleanly: the publisher flushes what is batched.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = Arc::clone(&interrupted);
        if let Err(error) = ctrlc::set_handler(move || interrupted.store(true, Ordering::Relaxed)) {
            eprintln!("warning: cannot handle Ctrl-C: {error}");
        }
    }
    let _ = STOP.set(interrupted);
    let result = match cli.command {
        Command::Demo(args) => demo(&args),
        Command::Pub(args) => publish(&args).map(|()| true),
        Command::Sub(args) => subscribe(&args).map(|()| true),
        Command::Selftest(args) => selftest(&args).map(|()| true),
        Command::Spy(args) => tools::spy(&args).map(|()| true),
        Command::Record(args) => tools::record(&args).map(|()| true),
        Command::Replay(args) => tools::replay(&args).map(|()| true),
        Command::Repeat(args) => tools::repeat(&args).map(|()| true),
        Command::Bench { command } => bench::run(&command).map(|()| true),
        Command::Keygen(args) => tools::keygen(&args).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

static STOP: std::sync::OnceLock<Arc<AtomicBool>> = std::sync::OnceLock::new();

/// Whether Ctrl-C or SIGTERM arrived.
fn interrupted() -> bool {
    STOP.get().is_some_and(|flag| flag.load(Ordering::Relaxed))
}

fn snapshot_config(rate: u32, net: &NetArgs) -> Result<SnapshotConfig> {
    let mut config = SnapshotConfig::default();
    config.rate = SnapshotRate::LeavesPerSecond(rate.max(1));
    config.keyring = net.keyring()?;
    Ok(config)
}

fn publisher_options(net: &NetArgs) -> Result<PublisherOptions> {
    let mut options = PublisherOptions::new(net.topic, net.live());
    options.session.keyring = net.keyring()?;
    if options
        .session
        .keyring
        .as_ref()
        .is_some_and(|keyring| !keyring.can_sign())
    {
        bail!("--key-file holds only a public key: a publisher needs its secret key to sign");
    }
    Ok(options)
}

fn subscriber_options(net: &NetArgs, loss: f64) -> Result<SubscriberOptions> {
    let mut options = SubscriberOptions::new(net.topic, net.live());
    options.recovery = net.recovery();
    options.inject_loss = loss;
    options.session.emit_applied = false;
    options.session.keyring = net.keyring()?;
    Ok(options)
}

fn demo(args: &DemoArgs) -> Result<bool> {
    if !(0.0..1.0).contains(&args.loss) {
        bail!("--loss must be in [0, 1), got {}", args.loss);
    }
    if args.subscribers == 0 {
        bail!("--subscribers must be at least 1");
    }
    self_test(&args.net.live(), Duration::from_secs(2)).context("multicast self-test")?;
    let subscribers = (0..args.subscribers)
        .map(|_| {
            subscriber_options(&args.net, args.loss)
                .and_then(|o| Ok(Subscriber::<OrderBook>::join(o)?))
        })
        .collect::<Result<Vec<_>>>()
        .context("starting subscribers")?;
    let publisher = Publisher::start(publisher_options(&args.net)?, OrderBook::default())
        .context("starting the publisher")?;
    let mut snapshot_options = SnapshotterOptions::new(args.net.snapshots());
    snapshot_options.snapshot = snapshot_config(args.snapshot_rate, &args.net)?;
    let snapshotter =
        Snapshotter::start(&publisher, snapshot_options).context("starting the snapshotter")?;
    println!(
        "demo: {} subscribers, {:.0}% loss each, {} updates over {}s on {} ({})",
        args.subscribers,
        args.loss * 100.0,
        args.updates,
        args.seconds,
        args.net.group,
        args.net.iface
    );

    let mut market = MarketGenerator::new(args.instruments, 20, 1);
    let mut mirror = OrderBook::default();
    let started = Instant::now();
    let duration = Duration::from_secs_f64(args.seconds.max(0.001));
    let mut published = 0u64;
    let mut next_report = started + Duration::from_millis(500);
    let mut batch = Vec::new();
    while published < args.updates {
        let elapsed = started.elapsed();
        let due = if elapsed >= duration {
            args.updates
        } else {
            (args.updates as f64 * elapsed.as_secs_f64() / duration.as_secs_f64()) as u64
        };
        while published < due.min(args.updates) && batch.len() < 256 {
            let delta = market.next_delta(&mirror);
            mirror.apply(&delta);
            batch.push(delta);
            published += 1;
        }
        if !batch.is_empty() {
            publisher.publish_all(batch.drain(..))?;
        } else {
            std::thread::sleep(Duration::from_micros(200));
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_millis(500);
            report(started, published, &subscribers, snapshotter.stats().cycles);
        }
    }
    publisher.flush();
    println!(
        "published {published} updates in {:.2}s ({:.0}/s), {} datagrams; settling",
        started.elapsed().as_secs_f64(),
        published as f64 / started.elapsed().as_secs_f64(),
        publisher.stats().datagrams
    );

    let want = publisher.read(digest);
    let session = publisher.session_id();
    let converged_at = |s: &Subscriber<OrderBook>| {
        s.read(|session_state| {
            session_state.is_live()
                && session_state
                    .stream(0)
                    .is_some_and(|v| v.session == session && digest(v.state) == want)
        })
    };
    let settle_until = Instant::now() + Duration::from_secs_f64(args.settle);
    while Instant::now() < settle_until && !subscribers.iter().all(converged_at) {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next_report {
            next_report += Duration::from_millis(500);
            report(started, published, &subscribers, snapshotter.stats().cycles);
        }
    }

    let mut converged = 0;
    for (i, subscriber) in subscribers.iter().enumerate() {
        let ok = converged_at(subscriber);
        converged += usize::from(ok);
        let stats = subscriber.stats();
        let p = stats.protocol;
        let recovery = p.last_recovery.map_or("-".to_string(), |d| {
            format!("{:.1}ms", d.as_secs_f64() * 1e3)
        });
        let got = subscriber.read(|s| s.stream(0).map(|v| short_hex(&digest(v.state))));
        tracing::debug!(subscriber = i, stats = ?stats, "final counters");
        println!(
            "subscriber {i}: {} applied {} gaps {} lost {} recoveries {} (last {recovery}) stale-leaf events {} snapshot leaves replaced {} removed {} malformed {} kernel drops {} digest {}",
            if ok { "converged" } else { "DIVERGED" },
            p.deltas_applied,
            p.gaps,
            p.messages_lost,
            p.recoveries,
            p.stale_leaves,
            p.snapshot_replaced,
            p.snapshot_removed,
            p.malformed,
            stats.kernel_drops,
            got.unwrap_or_else(|| "none".into())
        );
    }
    let cycles = snapshotter.shutdown().cycles;
    let pub_stats = publisher.shutdown();
    println!(
        "publisher: {} deltas in {} datagrams ({:.1} per datagram), {} snapshot cycles",
        pub_stats.deltas,
        pub_stats.datagrams,
        pub_stats.deltas as f64 / pub_stats.datagrams.max(1) as f64,
        cycles
    );
    println!(
        "converged: {converged}/{} subscribers, digest {}",
        subscribers.len(),
        short_hex(&want)
    );
    Ok(converged == subscribers.len())
}

fn report(started: Instant, published: u64, subscribers: &[Subscriber<OrderBook>], cycles: u64) {
    let elapsed = started.elapsed().as_secs_f64();
    let mut live = 0;
    let (mut applied, mut gaps, mut lost, mut recoveries, mut stale) = (0, 0, 0, 0, 0);
    for subscriber in subscribers {
        let p = subscriber.stats().protocol;
        applied += p.deltas_applied;
        gaps += p.gaps;
        lost += p.messages_lost;
        recoveries += p.recoveries;
        let (is_live, stale_now) = subscriber.read(|s| {
            (
                s.is_live(),
                s.streams().map(|v| v.stale.len()).sum::<usize>(),
            )
        });
        live += usize::from(is_live);
        stale += stale_now;
    }
    let line = format!(
        "[{elapsed:5.1}s] published {published} ({:.0}/s) | live {live}/{} | applied {applied} gaps {gaps} lost {lost} recoveries {recoveries} stale now {stale} | snapshot cycles {cycles}",
        published as f64 / elapsed.max(1e-9),
        subscribers.len()
    );
    println!("{line}");
    let _ = std::io::stdout().flush();
}

fn publish(args: &PubArgs) -> Result<()> {
    let mut options = publisher_options(&args.net)?;
    options.session.publisher = args.publisher_id;
    let publisher = Publisher::start(options, OrderBook::default())?;
    let mut snapshot_options = SnapshotterOptions::new(args.net.snapshots());
    snapshot_options.snapshot = snapshot_config(args.snapshot_rate, &args.net)?;
    let snapshotter = Snapshotter::start(&publisher, snapshot_options)?;
    println!(
        "publishing topic {} as publisher {} session {:#x} on {} ({}), {} updates/s",
        args.net.topic,
        args.publisher_id,
        publisher.session_id(),
        args.net.group,
        args.net.iface,
        args.rate
    );
    let metrics = Arc::new(parking_lot::Mutex::new(String::new()));
    if let Some(address) = args.metrics {
        let metrics = Arc::clone(&metrics);
        tools::serve_metrics(address, move || metrics.lock().clone())?;
    }
    let labels = format!(
        "topic=\"{}\",publisher=\"{}\"",
        args.net.topic, args.publisher_id
    );
    let mut market = MarketGenerator::new(args.instruments, 20, publisher.session_id());
    let mut mirror = OrderBook::default();
    let started = Instant::now();
    let stop_at = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut published = 0u64;
    let mut next_report = started + Duration::from_secs(1);
    let mut batch = Vec::new();
    while stop_at.is_none_or(|t| Instant::now() < t) && !interrupted() {
        let due = (args.rate as f64 * started.elapsed().as_secs_f64()) as u64;
        let due = args.updates.map_or(due, |limit| due.min(limit));
        while published < due && batch.len() < 256 {
            let delta = market.next_delta(&mirror);
            mirror.apply(&delta);
            batch.push(delta);
            published += 1;
        }
        if batch.is_empty() {
            std::thread::sleep(Duration::from_micros(500));
        } else {
            publisher.publish_all(batch.drain(..))?;
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            let stats = publisher.stats();
            let snapshots = snapshotter.stats();
            *metrics.lock() = tools::prometheus(
                &labels,
                &[
                    (
                        "grapevine_publisher_deltas_total",
                        "Deltas published.",
                        stats.deltas,
                    ),
                    (
                        "grapevine_publisher_datagrams_total",
                        "Datagrams sent.",
                        stats.datagrams,
                    ),
                    (
                        "grapevine_publisher_bytes_total",
                        "Bytes sent.",
                        stats.bytes,
                    ),
                    (
                        "grapevine_publisher_heartbeats_total",
                        "Heartbeats sent.",
                        stats.heartbeats,
                    ),
                    (
                        "grapevine_snapshot_cycles_total",
                        "Snapshot cycles completed.",
                        snapshots.cycles,
                    ),
                    (
                        "grapevine_snapshot_leaves_total",
                        "Snapshot leaves sent.",
                        snapshots.leaves,
                    ),
                    (
                        "grapevine_snapshot_bytes_total",
                        "Snapshot bytes sent.",
                        snapshots.bytes,
                    ),
                    (
                        "grapevine_state_leaves",
                        "Leaves in the published state.",
                        mirror.len() as u64,
                    ),
                ],
            );
            println!(
                "[{:5.1}s] published {} ({} datagrams), {} levels, snapshot cycles {}",
                started.elapsed().as_secs_f64(),
                stats.deltas,
                stats.datagrams,
                mirror.len(),
                snapshotter.stats().cycles
            );
        }
    }
    snapshotter.shutdown();
    let final_digest = publisher.read(digest);
    let stats = publisher.shutdown();
    println!(
        "done: {} deltas in {} datagrams, digest {}",
        stats.deltas,
        stats.datagrams,
        short_hex(&final_digest)
    );
    Ok(())
}

fn subscribe(args: &SubArgs) -> Result<()> {
    let subscriber = Subscriber::<OrderBook>::join(subscriber_options(&args.net, args.loss)?)?;
    let started = Instant::now();
    let stop_at = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let tty = std::io::stdout().is_terminal();
    let metrics = Arc::new(parking_lot::Mutex::new(String::new()));
    if let Some(address) = args.metrics {
        let metrics = Arc::clone(&metrics);
        tools::serve_metrics(address, move || metrics.lock().clone())?;
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
        *metrics.lock() = tools::prometheus(
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
                    "Datagrams the kernel dropped (receive buffer full).",
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
                            "session": view.session,
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
                "applied {} gaps {} lost {} recoveries {} (last {:?}) malformed {} kernel drops {} rcvbuf {} unauthenticated {} replayed {} retired-session {}",
                p.deltas_applied,
                p.gaps,
                p.messages_lost,
                p.recoveries,
                p.last_recovery,
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

fn selftest(args: &NetArgs) -> Result<()> {
    let took = self_test(&args.live(), Duration::from_secs(2))?;
    println!(
        "multicast OK on {} ({}): probe came back in {:.3} ms",
        args.group,
        args.iface,
        took.as_secs_f64() * 1e3
    );
    Ok(())
}
