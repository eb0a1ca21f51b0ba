//! `grapevine spy`: per-stream rates, sequence, gaps, losses and snapshot cycles of live groups.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::{Args, ValueEnum};
use grapevine::core::codec;
use grapevine::core::net::InterfaceSpec;
use grapevine::order_book::BookDelta;
use grapevine_cli::payload_schema::Schema;
use grapevine_cli::spy::{Spy, StreamStats};

use crate::cmd::receive_all;
use crate::interrupted;

/// Decoders the spy knows for message payloads.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Decoder {
    /// Show payloads as hex.
    None,
    /// The order book of `grapevine pub` and the examples.
    OrderBook,
    /// gvd's own topics: node records on the ELP topic, VDEV lists on the VDEV topic (other
    /// topics as hex).
    Gvd,
}

/// `grapevine spy`.
#[derive(Args, Debug)]
pub struct SpyArgs {
    /// Groups to watch (repeat the flag for several).
    #[arg(long = "group", required_unless_present = "via_gvd", value_parser = crate::values::group)]
    groups: Vec<SocketAddr>,
    /// Also watch every group the local gvd uses, read from its node list file (give the
    /// file, or `GV_NODES_PATH`); implies `--decode gvd` unless another decoder is given.
    #[arg(long, num_args = 0..=1, default_missing_value = "")]
    via_gvd: Option<std::path::PathBuf>,
    /// Interface to join on; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Seconds between reports.
    #[arg(long, default_value_t = 1.0, value_parser = crate::values::positive_seconds, allow_negative_numbers = true)]
    interval: f64,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long, value_parser = crate::values::seconds, allow_negative_numbers = true)]
    seconds: Option<f64>,
    /// How to show the latest message of each stream (default: `gvd` with --via-gvd, else
    /// `none`).
    #[arg(long, value_enum)]
    decode: Option<Decoder>,
    /// Decode a topic's payloads with a schema, `TOPIC=TYPE` (repeat for several topics), e.g.
    /// `--schema '7=mapdelta<u64, {price: f64, qty: u32}>'`: the type language is in
    /// `grapevine_cli::payload_schema` (integers, floats, string, bytes, option<T>, [T],
    /// map<K, V>, tuples, {structs}, enum {…}, mapdelta<K, V>). Takes precedence over --decode.
    #[arg(long = "schema", value_name = "TOPIC=TYPE", value_parser = topic_schema)]
    schemas: Vec<(u32, Schema)>,
    /// A file of `TOPIC = TYPE` lines (`#` comments), as --schema.
    #[arg(long, value_name = "FILE")]
    schema_file: Option<std::path::PathBuf>,
    /// One JSON object per stream and report instead of text.
    #[arg(long)]
    json: bool,
}

/// `TOPIC=TYPE`.
fn topic_schema(text: &str) -> Result<(u32, Schema), String> {
    let (topic, schema) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected TOPIC=TYPE"))?;
    let topic = topic
        .trim()
        .parse()
        .map_err(|e| format!("topic {:?}: {e}", topic.trim()))?;
    let schema = schema.trim().parse().map_err(|e| format!("{e}"))?;
    Ok((topic, schema))
}

/// The schemas of --schema and --schema-file, by topic.
fn schemas(args: &SpyArgs) -> Result<BTreeMap<u32, Schema>> {
    let mut schemas: BTreeMap<u32, Schema> = BTreeMap::new();
    if let Some(path) = &args.schema_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("schema file {}: {e}", path.display()))?;
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (topic, schema) = topic_schema(line)
                .map_err(|e| anyhow::anyhow!("{}:{}: {e}", path.display(), number + 1))?;
            schemas.insert(topic, schema);
        }
    }
    schemas.extend(args.schemas.iter().cloned());
    Ok(schemas)
}

fn decode_latest(decoder: Decoder, topic: u32, payload: &[u8]) -> serde_json::Value {
    use grapevine::core::state::MapDelta;
    use grapevine_gvd_schema::nodes::{NodeRecord, VdevList, ELP_TOPIC, VDEV_TOPIC};
    fn json<T: serde::Serialize>(
        decoded: Result<T, grapevine::core::wire::DecodeError>,
    ) -> serde_json::Value {
        match decoded {
            Ok(value) => serde_json::to_value(value).unwrap_or_default(),
            Err(e) => format!("undecodable: {e}").into(),
        }
    }
    match decoder {
        Decoder::Gvd if topic == ELP_TOPIC => {
            json(codec::decode::<MapDelta<u64, NodeRecord>>(payload))
        }
        Decoder::Gvd if topic == VDEV_TOPIC => {
            json(codec::decode::<MapDelta<u64, VdevList>>(payload))
        }
        Decoder::Gvd => decode_latest(Decoder::None, topic, payload),
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
    let mut groups = args.groups.clone();
    let mut iface = args.iface.clone();
    if let Some(given) = &args.via_gvd {
        let path = if given.as_os_str().is_empty() {
            std::env::var_os("GV_NODES_PATH").map_or_else(
                || "/var/lib/gvd/nodes.json".into(),
                std::path::PathBuf::from,
            )
        } else {
            given.clone()
        };
        let list = grapevine_gvd_schema::nodes::NodesFile::read(&path)?;
        if list.groups.is_empty() {
            anyhow::bail!(
                "{} lists no groups (a gvd of an earlier release?)",
                path.display()
            );
        }
        for entry in &list.groups {
            groups.push(entry.group);
            eprintln!(
                "watching {} ({}) on {}",
                entry.group, entry.name, entry.iface
            );
        }
        if let Some(first) = list.groups.first() {
            iface = first
                .iface
                .parse()
                .map_err(|e| anyhow::anyhow!("gvd's interface {:?}: {e}", first.iface))?;
        }
    }
    groups.sort();
    groups.dedup();
    let decoder = args.decode.unwrap_or(if args.via_gvd.is_some() {
        Decoder::Gvd
    } else {
        Decoder::None
    });
    let schemas = schemas(args)?;
    let rx = receive_all(&groups, &iface)?;
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
            let latest = stream.latest.back().map(|p| match schemas.get(&topic) {
                Some(schema) => schema
                    .decode(p)
                    .unwrap_or_else(|e| format!("undecodable: {e}").into()),
                None => decode_latest(decoder, topic, p),
            });
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
        for repeater in spy.repeaters(now) {
            let silent = repeater
                .silent_for
                .map_or_else(|| "-".to_string(), |d| format!("{:.1} s", d.as_secs_f64()));
            let role = if repeater.forwarder {
                "forwarder"
            } else {
                "standing by"
            };
            if args.json {
                let line = serde_json::json!({
                    "t": started.elapsed().as_secs_f64(),
                    "repeater": format!("{:016x}", repeater.id),
                    "role": role, "hellos": repeater.hellos,
                    "silent_seconds": repeater.silent_for.map(|d| d.as_secs_f64()),
                    "signed": repeater.signed,
                });
                writeln!(out, "{line}")?;
            } else {
                writeln!(
                    out,
                    "repeater {:016x}: {role}, {} hellos, last {silent} ago{}",
                    repeater.id,
                    repeater.hellos,
                    if repeater.signed { ", signed" } else { "" }
                )?;
            }
        }
        out.flush()?;
        previous = spy.streams().map(|(k, v)| (*k, v.clone())).collect();
    }
    Ok(())
}
