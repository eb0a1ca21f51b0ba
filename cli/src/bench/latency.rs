//! `bench latency`: round trips between two processes over two groups, against raw UDP.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use grapevine::core::net::{MulticastConfig, MulticastSocket, RecvBatch};
use grapevine::core::state::MapDelta;
use grapevine::publisher::{Publisher, PublisherOptions};
use grapevine::subscriber::{Subscriber, SubscriberOptions};
use serde_json::json;

use super::{payload_bytes, quantile, PayloadMap};

#[derive(Args, Debug)]
pub(crate) struct LatencyArgs {
    /// Payload bytes per message.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Round trips to measure (after 1 000 of warm-up).
    #[arg(long, default_value_t = 100_000)]
    count: u64,
    /// Spin instead of sleeping while waiting (both sides, both stacks).
    #[arg(long)]
    busy_poll: bool,
    /// Group of the pings; the pongs go to the next port.
    #[arg(long, default_value = "239.255.77.3:47710", value_parser = crate::values::group)]
    group: SocketAddr,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// The far end of `bench latency`, started as a child process.
#[derive(Args, Debug)]
pub(crate) struct EchoArgs {
    /// `grapevine`, `grapevine-inline` or `raw`.
    #[arg(long)]
    stack: String,
    #[arg(long)]
    payload: usize,
    #[arg(long)]
    busy_poll: bool,
    /// Group the pings arrive on.
    #[arg(long)]
    ping: SocketAddr,
    /// Group the pongs go to.
    #[arg(long)]
    pong: SocketAddr,
    /// Round trips to serve before exiting.
    #[arg(long)]
    count: u64,
}

const WARM_UP: u64 = 1_000;
/// A round trip that takes longer than this counts as lost and ends the run.
const ROUND_TRIP_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) fn latency(args: &LatencyArgs) -> Result<()> {
    let mut pong = args.group;
    pong.set_port(args.group.port().wrapping_add(1));
    let total = args.count + WARM_UP;
    let mut results = Vec::new();
    // Blocking, the threaded subscriber hands each delta to the application over a channel
    // (one more thread to wake); an inline subscriber receives on the application's thread.
    // Busy polling always runs inline.
    let stacks: &[&str] = if args.busy_poll {
        &["raw", "grapevine"]
    } else {
        &["raw", "grapevine", "grapevine-inline"]
    };
    for &stack in stacks {
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .args(["bench", "echo", "--stack", stack, "--payload"])
            .arg(args.payload.to_string())
            .args([
                "--ping",
                &args.group.to_string(),
                "--pong",
                &pong.to_string(),
            ])
            .args(["--count", &total.to_string()])
            .args(args.busy_poll.then_some("--busy-poll"))
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("starting the echo process")?;
        // Let the echo join its group before the first ping.
        std::thread::sleep(Duration::from_millis(300));
        let times = match stack {
            "raw" => ping_raw(args, pong, total),
            _ => ping_grapevine(args, pong, total, inline_mode(stack, args.busy_poll)),
        };
        // It may have ended already: then there is nothing to kill.
        let _ = child.kill();
        // Reaps it; an error means it was reaped already.
        let _ = child.wait();
        let mut times = times?;
        times.drain(..(WARM_UP as usize).min(times.len()));
        times.sort_unstable();
        results.push((stack, times));
    }
    let quantile = |times: &[Duration], q: f64| quantile(times, q).as_secs_f64() * 1e6;
    let figures = |times: &[Duration]| {
        json!({
            "count": times.len(),
            "p50_us": quantile(times, 0.5),
            "p99_us": quantile(times, 0.99),
            "p999_us": quantile(times, 0.999),
            "max_us": quantile(times, 1.0),
        })
    };
    let (raw, gv) = (&results[0].1, &results[1].1);
    let inline = results.get(2).map(|(_, times)| times);
    let ratio = |times: &[Duration], q: f64| quantile(times, q) / quantile(raw, q).max(1e-9);
    let (ratio_p50, ratio_p99) = (ratio(gv, 0.5), ratio(gv, 0.99));
    if args.json {
        println!(
            "{}",
            json!({
                "bench": "latency",
                "payload": args.payload,
                "busy_poll": args.busy_poll,
                "grapevine": figures(gv),
                "grapevine_inline": inline.map(|times| figures(times)),
                "raw": figures(raw),
                "ratio_p50": ratio_p50,
                "ratio_p99": ratio_p99,
                "inline_ratio_p50": inline.map(|times| ratio(times, 0.5)),
                "inline_ratio_p99": inline.map(|times| ratio(times, 0.99)),
            })
        );
        return Ok(());
    }
    println!(
        "latency, {} B ping-pong between two processes over two groups, {} round trips, {}",
        args.payload,
        args.count,
        if args.busy_poll {
            "busy polling"
        } else {
            "blocking"
        }
    );
    let threaded_name = if args.busy_poll {
        "grapevine"
    } else {
        "grapevine (threaded)"
    };
    let rows = [
        (threaded_name, Some(gv)),
        ("grapevine (inline)", inline),
        ("raw udp", Some(raw)),
    ];
    for (name, times) in rows {
        let Some(times) = times else { continue };
        println!(
            "  {name:<20} p50 {:>7.1} µs  p99 {:>7.1} µs  p99.9 {:>7.1} µs  max {:>8.1} µs",
            quantile(times, 0.5),
            quantile(times, 0.99),
            quantile(times, 0.999),
            quantile(times, 1.0)
        );
    }
    println!("ratio: p50 {ratio_p50:.2}, p99 {ratio_p99:.2}");
    if let Some(inline) = inline {
        println!(
            "ratio, inline subscriber: p50 {:.2}, p99 {:.2}",
            ratio(inline, 0.5),
            ratio(inline, 0.99)
        );
    }
    Ok(())
}

/// How a GrapeVine side of the bench receives.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Receive {
    /// The threaded subscriber, deltas over its channel.
    Threaded,
    /// An inline subscriber on this thread, blocking in its socket.
    InlineBlocking,
    /// An inline subscriber on this thread, spinning.
    InlineBusy,
}

fn inline_mode(stack: &str, busy_poll: bool) -> Receive {
    match (stack, busy_poll) {
        (_, true) => Receive::InlineBusy,
        ("grapevine-inline", false) => Receive::InlineBlocking,
        _ => Receive::Threaded,
    }
}

fn ping_raw(args: &LatencyArgs, pong: SocketAddr, total: u64) -> Result<Vec<Duration>> {
    let sender = MulticastSocket::sender(&MulticastConfig::new(args.group))?;
    let receiver = MulticastSocket::receiver(&MulticastConfig::new(pong))?;
    let mut batch = RecvBatch::new(1, 65_536);
    let mut message = vec![0u8; args.payload.max(8)];
    let mut times = Vec::with_capacity(total as usize);
    let wait = if args.busy_poll {
        Duration::ZERO
    } else {
        Duration::from_millis(100)
    };
    for i in 0..total {
        super::check_interrupted()?;
        message[..8].copy_from_slice(&i.to_be_bytes());
        let t0 = Instant::now();
        sender.send(&message)?;
        loop {
            if t0.elapsed() > ROUND_TRIP_TIMEOUT {
                bail!("raw round trip {i} lost");
            }
            if receiver.recv_batch(&mut batch, wait)? == 0 {
                continue;
            }
            let back = batch.datagrams().next().unwrap_or_default();
            if back.get(..8) == Some(&i.to_be_bytes()[..]) {
                break;
            }
        }
        times.push(t0.elapsed());
    }
    Ok(times)
}

fn ping_grapevine(
    args: &LatencyArgs,
    pong: SocketAddr,
    total: u64,
    receive: Receive,
) -> Result<Vec<Duration>> {
    let mut options = PublisherOptions::new(1, MulticastConfig::new(args.group));
    options.session.flush_delay = Duration::ZERO;
    let publisher = Publisher::start(options, PayloadMap::default())?;
    let sub_options = SubscriberOptions::new(2, MulticastConfig::new(pong));
    let mut pongs = Pongs::join(sub_options, receive)?;
    let payload = payload_bytes(args.payload);
    let mut times = Vec::with_capacity(total as usize);
    for i in 0..total {
        super::check_interrupted()?;
        let key = (i % 1024) as u32;
        let t0 = Instant::now();
        publisher.publish(MapDelta::Put(key, payload.clone()))?;
        loop {
            if t0.elapsed() > ROUND_TRIP_TIMEOUT {
                bail!("grapevine round trip {i} lost");
            }
            if pongs.next_applied()? == Some(key) {
                break;
            }
        }
        times.push(t0.elapsed());
    }
    Ok(times)
}

/// Receives the keys of applied deltas: through the threaded subscriber and its channel, or
/// an inline subscriber polled on this thread (waiting in its socket, or spinning).
enum Pongs {
    Threaded(Subscriber<PayloadMap>),
    Inline {
        subscriber: Box<grapevine::subscriber::InlineSubscriber<PayloadMap>>,
        pending: Vec<u32>,
        wait: Duration,
    },
}

impl Pongs {
    fn join(options: SubscriberOptions, receive: Receive) -> Result<Self> {
        let wait = match receive {
            Receive::Threaded => return Ok(Self::Threaded(Subscriber::join(options)?)),
            Receive::InlineBlocking => Duration::from_millis(100),
            Receive::InlineBusy => Duration::ZERO,
        };
        Ok(Self::Inline {
            subscriber: Box::new(grapevine::subscriber::InlineSubscriber::join(options)?),
            pending: Vec::new(),
            wait,
        })
    }

    /// The key of the next applied delta, if one arrives soon.
    fn next_applied(&mut self) -> Result<Option<u32>> {
        use grapevine::core::proto::SubscriberEvent::Applied;
        match self {
            Self::Threaded(subscriber) => {
                match subscriber.events().recv_timeout(Duration::from_millis(100)) {
                    Ok(Applied { key, .. }) => Ok(Some(key)),
                    _ => Ok(None),
                }
            }
            Self::Inline {
                subscriber,
                pending,
                wait,
            } => {
                if pending.is_empty() {
                    for event in subscriber.poll(*wait) {
                        if let Applied { key, .. } = event {
                            pending.push(key);
                        }
                    }
                    pending.reverse();
                }
                Ok(pending.pop())
            }
        }
    }
}

pub(super) fn echo(args: &EchoArgs) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    if args.stack == "raw" {
        let receiver = MulticastSocket::receiver(&MulticastConfig::new(args.ping))?;
        let sender = MulticastSocket::sender(&MulticastConfig::new(args.pong))?;
        let mut batch = RecvBatch::new(1, 65_536);
        let wait = if args.busy_poll {
            Duration::ZERO
        } else {
            Duration::from_millis(100)
        };
        let mut served = 0;
        while served < args.count && Instant::now() < deadline {
            if receiver.recv_batch(&mut batch, wait)? == 1 {
                sender.send(batch.datagrams().next().unwrap_or_default())?;
                served += 1;
            }
        }
        return Ok(());
    }
    let mut options = PublisherOptions::new(2, MulticastConfig::new(args.pong));
    options.session.flush_delay = Duration::ZERO;
    let publisher = Publisher::start(options, PayloadMap::default())?;
    let sub_options = SubscriberOptions::new(1, MulticastConfig::new(args.ping));
    let mut pings = Pongs::join(sub_options, inline_mode(&args.stack, args.busy_poll))?;
    let payload = payload_bytes(args.payload);
    let mut served = 0;
    while served < args.count && Instant::now() < deadline {
        if let Some(key) = pings.next_applied()? {
            publisher.publish(MapDelta::Put(key, payload.clone()))?;
            served += 1;
        }
    }
    Ok(())
}
