//! `grapevine repeat`: relay topics between the local group and repeaters elsewhere.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use grapevine::core::net::{InterfaceSpec, MulticastConfig};

use crate::interrupted;

/// `grapevine repeat`.
#[derive(Args, Debug)]
pub struct RepeatArgs {
    /// The local group relayed.
    #[arg(long, env = "GRAPEVINE_GROUP", default_value = "239.255.70.86:7086", value_parser = crate::values::group)]
    group: SocketAddr,
    /// Interface of the local group; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Unicast address to receive from the remote repeaters on.
    #[arg(long, value_parser = crate::values::endpoint)]
    listen: SocketAddr,
    /// A remote repeater (repeat the flag for several).
    #[arg(long = "peer", required = true, value_parser = crate::values::endpoint)]
    peers: Vec<SocketAddr>,
    /// A topic to relay (repeat the flag for several; all when none is given).
    #[arg(long = "topic")]
    topics: Vec<u32>,
    /// Refuse datagrams from the peers that are not signed with a key of this file.
    #[arg(long, env = "GRAPEVINE_KEY_FILE")]
    key_file: Option<PathBuf>,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long, value_parser = crate::values::seconds, allow_negative_numbers = true)]
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
