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
    /// How datagrams cross to the peers: `udp` (plain, for a LAN between sites) or `quic`
    /// (congestion-controlled; peers prove they hold the shared key of --key-file or
    /// --link-key-file). Every repeater of a link uses the same.
    #[arg(long, value_enum, default_value_t = Wan::Udp, env = "GRAPEVINE_WAN")]
    wan: Wan,
    /// A shared key file the QUIC peers prove they hold, when --key-file is a publisher's
    /// public key (or absent).
    #[arg(long)]
    link_key_file: Option<PathBuf>,
    /// Print the counters as one JSON object per second.
    #[arg(long)]
    json: bool,
}

/// `--wan`.
#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Wan {
    /// Plain UDP.
    Udp,
    /// QUIC.
    Quic,
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
    options.link_key = args
        .link_key_file
        .as_deref()
        .map(|p| grapevine::core::auth::Keyring::from_file(p).map(std::sync::Arc::new))
        .transpose()
        .context("--link-key-file")?;
    if let Some(key) = &options.link_key {
        anyhow::ensure!(
            key.is_shared(),
            "--link-key-file must hold a shared key (grapevine keygen), not a public key"
        );
    }
    options.wan = match args.wan {
        Wan::Udp => grapevine::repeater::WanTransport::Udp,
        Wan::Quic => grapevine::repeater::WanTransport::Quic,
    };
    let repeater = Repeater::start(options)?;
    eprintln!(
        "repeating {} ({}) <-> {} via {} ({:?})",
        args.group,
        args.iface,
        args.peers
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        repeater.listen_address(),
        args.wan
    );
    let started = Instant::now();
    let stop_at = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let mut next_report = started + Duration::from_secs(1);
    while stop_at.is_none_or(|t| Instant::now() < t) && !interrupted() {
        std::thread::sleep(Duration::from_millis(50));
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(1);
            let stats = repeater.stats();
            let links = repeater.links();
            if args.json {
                let mut value = serde_json::to_value(stats)?;
                value["links"] = serde_json::to_value(&links)?;
                println!("{value}");
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
                for link in &links {
                    let path = link.quic.as_ref().map_or(String::new(), |path| {
                        format!(
                            " rtt {:.2} ms cwnd {} B lost packets {} congestion drops {}",
                            path.rtt_us as f64 / 1e3,
                            path.congestion_window,
                            path.lost_packets,
                            stats.congestion_drops
                        )
                    });
                    println!(
                        "    peer {} {}{}{}",
                        link.peer,
                        if link.up { "up" } else { "silent" },
                        if link.target { ", sending to it" } else { "" },
                        path
                    );
                }
            }
        }
    }
    Ok(())
}
