//! Operator tools of the `grapevine` binary: `spy`, `record`, `replay`, and the metrics
//! endpoint of `pub` and `sub`.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{BufReader, BufWriter, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use crossbeam_channel::Receiver;
use grapevine::core::codec;
use grapevine::core::net::{InterfaceSpec, MulticastConfig, MulticastSocket, RecvBatch};
use grapevine::core::proto::{StreamStatus, SubscriberConfig, SubscriberSession};
use grapevine::core::recording::{Record, RecordReader, RecordWriter};
use grapevine::core::spy::{Spy, StreamStats};
use grapevine::core::state::{digest, short_hex, ReplicatedState};
use grapevine::core::wire::Datagram;
use grapevine::order_book::{BookDelta, OrderBook};

use crate::interrupted;

/// Decoders the spy knows for message payloads.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Decoder {
    /// Show payloads as hex.
    None,
    /// The order book of `grapevine pub` and the examples.
    OrderBook,
}

/// `grapevine spy`.
#[derive(Args, Debug)]
pub struct SpyArgs {
    /// Groups to watch (repeat the flag for several).
    #[arg(long = "group", required = true)]
    groups: Vec<SocketAddr>,
    /// Interface to join on; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Seconds between reports.
    #[arg(long, default_value_t = 1.0)]
    interval: f64,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    seconds: Option<f64>,
    /// How to show the latest message of each stream.
    #[arg(long, value_enum, default_value = "none")]
    decode: Decoder,
    /// One JSON object per stream and report instead of text.
    #[arg(long)]
    json: bool,
}

/// `grapevine record`.
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// The recording (rotated files get `.1`, `.2`, ... appended).
    file: PathBuf,
    /// Groups to record (repeat the flag for several).
    #[arg(long = "group", required = true)]
    groups: Vec<SocketAddr>,
    /// Interface to join on; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    seconds: Option<f64>,
    /// Start a new file when this one reaches this many MiB.
    #[arg(long)]
    rotate_mib: Option<u64>,
}

/// `grapevine replay`.
#[derive(Args, Debug)]
pub struct ReplayArgs {
    /// Recordings, played in order.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Send everything to this group instead of the recorded ones.
    #[arg(long)]
    group: Option<SocketAddr>,
    /// Interface to send on; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Playback speed: 1 is as recorded, 2 twice as fast.
    #[arg(long, default_value_t = 1.0)]
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

struct Received {
    at: Instant,
    time: SystemTime,
    group: SocketAddr,
    bytes: Vec<u8>,
}

/// One receiving thread per group, all into one channel; they stop when the receiver is
/// dropped.
fn receive_all(groups: &[SocketAddr], iface: &InterfaceSpec) -> Result<Receiver<Received>> {
    let (tx, rx) = crossbeam_channel::bounded::<Received>(65_536);
    for group in groups {
        let config = MulticastConfig::new(*group).on(iface.clone());
        let socket =
            MulticastSocket::receiver(&config).with_context(|| format!("joining {group}"))?;
        let tx = tx.clone();
        let group = *group;
        std::thread::Builder::new()
            .name(format!("rx-{group}"))
            .spawn(move || {
                let mut batch = RecvBatch::new(32, 65_536);
                loop {
                    let Ok(n) = socket.recv_batch(&mut batch, Duration::from_millis(50)) else {
                        continue;
                    };
                    let (at, time) = (Instant::now(), SystemTime::now());
                    for bytes in batch.datagrams().take(n) {
                        let received = Received {
                            at,
                            time,
                            group,
                            bytes: bytes.to_vec(),
                        };
                        if tx.send(received).is_err() {
                            return;
                        }
                    }
                    if n == 0 && tx.is_full() {
                        std::thread::yield_now();
                    }
                }
            })?;
    }
    Ok(rx)
}

fn decode_latest(decoder: Decoder, payload: &[u8]) -> serde_json::Value {
    match decoder {
        Decoder::OrderBook => match codec::decode::<BookDelta>(payload) {
            Ok(delta) => serde_json::to_value(delta).unwrap_or_default(),
            Err(e) => format!("undecodable: {e}").into(),
        },
        Decoder::None => payload
            .iter()
            .take(32)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into(),
    }
}

/// `grapevine spy`: per topic and publisher, rates, sequence, losses and the snapshot cycle.
pub fn spy(args: &SpyArgs) -> Result<()> {
    let rx = receive_all(&args.groups, &args.iface)?;
    let mut spy = Spy::default();
    let started = Instant::now();
    let interval = Duration::from_secs_f64(args.interval.max(0.05));
    let stop_at = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let tty = std::io::stdout().is_terminal() && !args.json;
    let mut previous: BTreeMap<(u32, u32), StreamStats> = BTreeMap::new();
    let mut last_report = started;
    while stop_at.is_none_or(|t| Instant::now() < t) && !interrupted() {
        let deadline = (last_report + interval).min(stop_at.unwrap_or(last_report + interval));
        while let Ok(received) = rx.recv_deadline(deadline) {
            spy.handle(received.at, &received.bytes);
        }
        let now = Instant::now();
        let seconds = now.duration_since(last_report).as_secs_f64().max(1e-6);
        last_report = now;
        let mut out = std::io::stdout().lock();
        if tty {
            write!(out, "\x1b[2J\x1b[H")?;
            writeln!(
                out,
                "grapevine spy  {}  {:.0} s  datagrams {}  malformed {}",
                args.groups
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(" "),
                started.elapsed().as_secs_f64(),
                spy.datagrams,
                spy.malformed
            )?;
            writeln!(
                out,
                "{:>8} {:>9} {:>18} {:>10} {:>10} {:>10} {:>6} {:>7} {:>13} {:>9}",
                "TOPIC",
                "PUBLISHER",
                "SESSION",
                "MSG/S",
                "KB/S",
                "LAST SEQ",
                "GAPS",
                "LOST",
                "CYCLE",
                "PERIOD"
            )?;
        }
        for (&(topic, publisher), stream) in spy.streams() {
            let before = previous.get(&(topic, publisher));
            let delta = |f: fn(&StreamStats) -> u64| {
                f(stream).saturating_sub(before.map_or(0, f)) as f64 / seconds
            };
            let rate = delta(|s| s.deltas);
            let kbps = delta(|s| s.bytes) / 1000.0;
            let cycle = stream
                .cycle
                .map_or_else(|| "-".to_string(), |(c, i)| format!("#{c}:{i}"));
            let period = stream.cycle_period.map_or_else(
                || "-".to_string(),
                |p| format!("{:.0} ms", p.as_secs_f64() * 1e3),
            );
            let latest = stream.latest.back().map(|p| decode_latest(args.decode, p));
            if args.json {
                let line = serde_json::json!({
                    "t": started.elapsed().as_secs_f64(),
                    "topic": topic, "publisher": publisher, "session": format!("{:016x}", stream.session),
                    "restarts": stream.restarts,
                    "messages_per_second": rate, "kilobytes_per_second": kbps,
                    "deltas": stream.deltas, "leaves": stream.leaves, "heartbeats": stream.heartbeats,
                    "last_seq": stream.last_seq, "gaps": stream.gaps, "lost": stream.lost,
                    "cycles": stream.cycles, "cycle": stream.cycle,
                    "cycle_period_ms": stream.cycle_period.map(|p| p.as_secs_f64() * 1e3),
                    "malformed": spy.malformed, "unsigned": stream.unsigned, "latest": latest,
                });
                writeln!(out, "{line}")?;
            } else if tty {
                writeln!(
                    out,
                    "{topic:>8} {publisher:>9} {:>18} {rate:>10.0} {kbps:>10.1} {:>10} {:>6} {:>7} {cycle:>13} {period:>9}",
                    format!("{:016x}", stream.session),
                    stream.last_seq,
                    stream.gaps,
                    stream.lost
                )?;
                if let Some(latest) = latest {
                    writeln!(out, "{:>8} latest: {latest}", "")?;
                }
            } else {
                writeln!(
                    out,
                    "topic {topic} publisher {publisher} session {:016x}: {rate:.0} msg/s {kbps:.1} kB/s seq {} gaps {} lost {} cycle {cycle} period {period} malformed {} unsigned {}{}",
                    stream.session,
                    stream.last_seq,
                    stream.gaps,
                    stream.lost,
                    spy.malformed,
                    stream.unsigned,
                    latest.map(|l| format!(" latest {l}")).unwrap_or_default()
                )?;
            }
        }
        out.flush()?;
        previous = spy.streams().map(|(k, v)| (*k, v.clone())).collect();
    }
    Ok(())
}

fn segment_path(file: &Path, index: u32) -> PathBuf {
    if index == 0 {
        file.to_path_buf()
    } else {
        let mut name = file.as_os_str().to_owned();
        name.push(format!(".{index}"));
        PathBuf::from(name)
    }
}

/// `grapevine record`: every datagram of the groups, with receive times, into a file.
pub fn record(args: &RecordArgs) -> Result<()> {
    let rx = receive_all(&args.groups, &args.iface)?;
    let open = |index: u32| -> Result<RecordWriter<BufWriter<File>>> {
        let path = segment_path(&args.file, index);
        let file =
            File::create(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(RecordWriter::new(BufWriter::new(file))?)
    };
    let mut segment = 0u32;
    let mut writer = open(segment)?;
    let limit = args.rotate_mib.map(|m| m.max(1) << 20);
    let started = Instant::now();
    let stop_at = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let (mut records, mut total_bytes) = (0u64, 0u64);
    let mut next_progress = started + Duration::from_secs(1);
    while stop_at.is_none_or(|t| Instant::now() < t) && !interrupted() {
        if let Ok(received) = rx.recv_timeout(Duration::from_millis(100)) {
            let written = writer.write(&Record {
                time: received.time,
                group: received.group,
                payload: received.bytes,
            })?;
            records += 1;
            total_bytes += written as u64;
            if limit.is_some_and(|l| writer.written() >= l) {
                writer.finish()?;
                segment += 1;
                writer = open(segment)?;
            }
        }
        if Instant::now() >= next_progress {
            next_progress += Duration::from_secs(1);
            eprint!(
                "\rrecording {}: {records} datagrams, {:.1} MiB, {} file(s)   ",
                args.file.display(),
                total_bytes as f64 / (1 << 20) as f64,
                segment + 1
            );
        }
    }
    writer.finish()?;
    eprintln!(
        "\nrecorded {records} datagrams ({:.1} MiB) in {} file(s) starting at {}",
        total_bytes as f64 / (1 << 20) as f64,
        segment + 1,
        args.file.display()
    );
    Ok(())
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
    for record in records.iter().filter(wanted) {
        if interrupted() {
            break;
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

/// Serves `render()` as a Prometheus text endpoint (any path) until the process ends.
pub fn serve_metrics(
    address: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> Result<()> {
    let server = tiny_http::Server::http(address)
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {address}: {e}"))?;
    eprintln!("metrics on http://{address}/metrics");
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            let content_type = tiny_http::Header::from_bytes(
                &b"Content-Type"[..],
                &b"text/plain; version=0.0.4"[..],
            )
            .ok();
            for request in server.incoming_requests() {
                let mut response = tiny_http::Response::from_string(render());
                if let Some(header) = content_type.clone() {
                    response.add_header(header);
                }
                let _ = request.respond(response);
            }
        })?;
    Ok(())
}

/// Prometheus text lines for counters: `(name, help, value)`, all with `labels`.
pub fn prometheus(labels: &str, counters: &[(&str, &str, u64)]) -> String {
    let mut out = String::new();
    for (name, help, value) in counters {
        let kind = if name.ends_with("_total") {
            "counter"
        } else {
            "gauge"
        };
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{{labels}}} {value}\n"
        ));
    }
    out
}

/// `grapevine repeat`.
#[derive(Args, Debug)]
pub struct RepeatArgs {
    /// The local group relayed.
    #[arg(long, env = "GRAPEVINE_GROUP", default_value = "239.255.70.86:7086")]
    group: SocketAddr,
    /// Interface of the local group; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Unicast address to receive from the remote repeaters on.
    #[arg(long)]
    listen: SocketAddr,
    /// A remote repeater (repeat the flag for several).
    #[arg(long = "peer", required = true)]
    peers: Vec<SocketAddr>,
    /// A topic to relay (repeat the flag for several; all when none is given).
    #[arg(long = "topic")]
    topics: Vec<u32>,
    /// Refuse datagrams from the peers that are not signed with a key of this file.
    #[arg(long, env = "GRAPEVINE_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long)]
    seconds: Option<f64>,
    /// This repeater's id in its network's forwarder election (the lowest forwards; default
    /// random): give the preferred repeater the lowest.
    #[arg(long)]
    id: Option<u64>,
    /// Print the counters as one JSON object per second.
    #[arg(long)]
    json: bool,
}

/// `grapevine repeat`: relays topics between the local group and remote repeaters.
pub fn repeat(args: &RepeatArgs) -> Result<()> {
    use grapevine::repeater::{Repeater, RepeaterOptions};
    let mut options = RepeaterOptions::new(
        MulticastConfig::new(args.group).on(args.iface.clone()),
        args.listen,
        args.peers.clone(),
    );
    options.topics = (!args.topics.is_empty()).then(|| args.topics.clone());
    options.id = args.id;
    options.keyring = args
        .key_file
        .as_deref()
        .map(|p| grapevine::core::auth::Keyring::from_file(p).map(std::sync::Arc::new))
        .transpose()
        .context("--key-file")?;
    let repeater = Repeater::start(options)?;
    eprintln!(
        "repeating {} ({}) <-> {} via {}",
        args.group,
        args.iface,
        args.peers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        repeater.listen_address()
    );
    let started = Instant::now();
    let stop_at = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut next_report = started + Duration::from_secs(1);
    while stop_at.is_none_or(|t| Instant::now() < t) && !interrupted() {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            let stats = repeater.stats();
            if args.json {
                println!("{}", serde_json::to_string(&stats)?);
            } else {
                println!(
                    "[{:5.1}s] {} out {} in {} loops broken {} duplicates {} standby {} refused {} peers up {} (sending to {}) repeaters beside {}",
                    started.elapsed().as_secs_f64(),
                    if stats.forwarder { "forwarder" } else { "standby  " },
                    stats.relayed_out,
                    stats.relayed_in,
                    stats.loops,
                    stats.duplicates,
                    stats.standby,
                    stats.refused,
                    stats.peers_up,
                    stats.targets,
                    stats.neighbours
                );
            }
        }
    }
    Ok(())
}

/// `grapevine keygen`.
#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the key (refused if the file exists). With --ed25519, the publisher's
    /// secret key.
    file: PathBuf,
    /// Make a publisher's ed25519 key pair instead of a shared key: subscribers then get only
    /// the public key (--public) and cannot sign.
    #[arg(long, requires = "public")]
    ed25519: bool,
    /// With --ed25519: where to write the public key for subscribers.
    #[arg(long)]
    public: Option<PathBuf>,
    /// The key id (0..=255), to tell keys apart during a rotation.
    #[arg(long, default_value_t = 1)]
    id: u8,
}

/// Writes `text` to a new file readable by its owner only; an existing file is never replaced.
fn write_new_private(path: &Path, text: &str, mode: u32) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {} (it is never overwritten)", path.display()))?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    Ok(())
}

/// `grapevine keygen`: a shared key, or an ed25519 key pair.
pub fn keygen(args: &KeygenArgs) -> Result<()> {
    use grapevine::core::auth::Keyring;
    let seed: [u8; 32] = {
        use rand::RngCore;
        let mut seed = [0u8; 32];
        rand::rngs::OsRng.fill_bytes(&mut seed);
        seed
    };
    if args.ed25519 {
        let public_path = args
            .public
            .as_deref()
            .context("--ed25519 needs --public FILE")?;
        let keyring = Keyring::ed25519_secret(args.id, seed);
        write_new_private(&args.file, &keyring.to_file_text(), 0o600)?;
        write_new_private(public_path, &keyring.public_only().to_file_text(), 0o644)?;
        eprintln!(
            "wrote the publisher's secret key to {} and its public key to {}",
            args.file.display(),
            public_path.display()
        );
    } else {
        write_new_private(
            &args.file,
            &Keyring::single(args.id, seed).to_file_text(),
            0o600,
        )?;
        eprintln!("wrote a shared key to {}", args.file.display());
    }
    Ok(())
}
