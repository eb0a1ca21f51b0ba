//! `grapevine replay`: recordings back onto groups, or a topic's state rebuilt offline.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, IsTerminal};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use grapevine::core::net::{InterfaceSpec, MulticastConfig, MulticastSocket};
use grapevine::core::proto::{StreamStatus, SubscriberConfig, SubscriberSession};
use grapevine::core::state::{digest, short_hex, ReplicatedState};
use grapevine::core::wire::Datagram;
use grapevine::order_book::OrderBook;
use grapevine_cli::recording::{Record, RecordReader};

use crate::interrupted;

/// `grapevine replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Recordings, played in order.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Send everything to this group instead of the recorded ones.
    #[arg(long, value_parser = crate::values::group)]
    group: Option<SocketAddr>,
    /// Interface to send on; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Playback speed: 1 is as recorded, 2 twice as fast.
    #[arg(long, default_value_t = 1.0, value_parser = crate::values::speed, allow_negative_numbers = true)]
    speed: f64,
    /// As fast as possible.
    #[arg(long)]
    max: bool,
    /// Only datagrams of this topic.
    #[arg(long)]
    topic: Option<u32>,
    /// Send nothing: rebuild the state of `--topic` (default 1) offline and print it.
    #[arg(long)]
    to_state: bool,
    /// With --to-state: JSON output.
    #[arg(long)]
    json: bool,
}

/// Reads records from several files in order; reports damage on stderr and stops there.
fn records(files: &[PathBuf]) -> Result<(Vec<Record>, Option<String>)> {
    let mut all = Vec::new();
    for path in files {
        let file = File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
        let reader = RecordReader::new(BufReader::new(file))
            .with_context(|| format!("{} is not a recording", path.display()))?;
        for record in reader {
            match record {
                Ok(record) => all.push(record),
                Err(damage) => {
                    let message = format!(
                        "{}: {damage}; replaying the {} records before it",
                        path.display(),
                        all.len()
                    );
                    return Ok((all, Some(message)));
                }
            }
        }
    }
    Ok((all, None))
}

fn topic_of(payload: &[u8]) -> Option<u32> {
    Datagram::parse(payload).ok().map(|d| d.header().topic())
}

/// `grapevine replay`: plays recordings onto groups, or rebuilds a topic's state offline.
pub fn replay(args: &ReplayArgs) -> Result<()> {
    let (records, damage) = records(&args.files)?;
    if let Some(message) = &damage {
        eprintln!("warning: {message}");
    }
    let wanted = |r: &&Record| args.topic.is_none_or(|t| topic_of(&r.payload) == Some(t));
    if args.to_state {
        return rebuild(args, records.iter().filter(wanted));
    }
    if args.speed.is_nan() || args.speed <= 0.0 {
        bail!("--speed must be positive");
    }
    let mut sockets: HashMap<SocketAddr, MulticastSocket> = HashMap::new();
    let first = records.first().map(|r| r.time);
    let started = Instant::now();
    let mut sent = 0u64;
    let total = records.iter().filter(wanted).count();
    // Progress redrawn in place on a terminal only: in a log file it would be clutter.
    let terminal = std::io::stderr().is_terminal();
    let mut next_progress = started + Duration::from_secs(1);
    for record in records.iter().filter(wanted) {
        if interrupted() {
            break;
        }
        if terminal && Instant::now() >= next_progress {
            next_progress += Duration::from_secs(1);
            eprint!(
                "\rreplaying: {sent}/{total} datagrams ({:.0} %)   ",
                100.0 * sent as f64 / total.max(1) as f64
            );
        }
        if let (false, Some(first)) = (args.max, first) {
            let offset = record.time.duration_since(first).unwrap_or_default();
            let due = started + offset.div_f64(args.speed);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        let group = args.group.unwrap_or(record.group);
        let socket = match sockets.entry(group) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                let config = MulticastConfig::new(group).on(args.iface.clone());
                entry.insert(
                    MulticastSocket::sender(&config)
                        .with_context(|| format!("sending to {group}"))?,
                )
            }
        };
        socket.send(&record.payload)?;
        sent += 1;
    }
    if terminal {
        eprintln!();
    }
    eprintln!(
        "replayed {sent} datagrams in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn rebuild<'a>(args: &ReplayArgs, records: impl Iterator<Item = &'a Record>) -> Result<()> {
    let topic = args.topic.unwrap_or(1);
    let mut session = SubscriberSession::<OrderBook>::new(SubscriberConfig::new(topic));
    let base = Instant::now();
    let mut first = None;
    let mut fed = 0u64;
    for record in records {
        let first = *first.get_or_insert(record.time);
        let now = base + record.time.duration_since(first).unwrap_or_default();
        session.handle_datagram(now, &record.payload);
        while session.poll_event().is_some() {}
        fed += 1;
    }
    let streams: Vec<serde_json::Value> = session
        .streams()
        .map(|view| {
            let status = match view.status {
                StreamStatus::Joining => "joining",
                StreamStatus::Recovering => "recovering",
                StreamStatus::Live => "live",
            };
            serde_json::json!({
                "publisher": view.publisher,
                "session": format!("{:016x}", view.session),
                "status": status,
                "last_seq": view.last_seq,
                "leaves": view.state.len(),
                "digest": short_hex(&digest(view.state)),
                "summary": view.state.summary(),
            })
        })
        .collect();
    if args.json {
        println!(
            "{}",
            serde_json::json!({ "topic": topic, "datagrams": fed, "streams": streams })
        );
    } else {
        println!("topic {topic}: {fed} datagrams replayed offline");
        for s in &streams {
            println!(
                "  publisher {} session {} {} at seq {}: {} leaves, digest {}",
                s["publisher"],
                s["session"].as_str().unwrap_or(""),
                s["status"].as_str().unwrap_or(""),
                s["last_seq"],
                s["leaves"],
                s["digest"].as_str().unwrap_or("")
            );
            println!("    {}", s["summary"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}
