//! `gvctl`: look at what the local gvd knows, from its node list file (`GV_NODES_PATH`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use grapevine_kos::client::ConnectOptions;
use grapevine_kos::nodes::unix_ms;
use grapevine_kos::Kos;
use gvd::daemon::NodesFile;

/// Inspect the GrapeVine network as the local gvd sees it.
#[derive(Debug, Parser)]
#[command(name = "gvctl", version)]
struct Cli {
    /// The node list file gvd writes.
    #[arg(
        long,
        env = "GV_NODES_PATH",
        default_value = "/var/lib/gvd/nodes.json",
        global = true
    )]
    nodes_path: PathBuf,
    /// The network key file (as gvd's `key_file`): needed to call VDEVs when the nodes have a
    /// key.
    #[arg(long, env = "GV_KEY_FILE", global = true)]
    key_file: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print a shell completion script (e.g. `gvctl completions bash`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff: `gvctl manpage | man -l -`).
    Manpage,
    /// Every live or suspect node.
    Nodes,
    /// The VDEVs of every node, or of one (by name or hex id).
    Vdevs {
        /// A node name or id.
        node: Option<String>,
    },
    /// This node and a count of the others.
    Status,
    /// The replication zones, with each member's version and usage.
    Zones,
    /// Call FUNCTION of VDEV on NODE through a KOS connection, and print the answer.
    Call {
        /// A node name or hex id.
        node: String,
        /// The VDEV.
        vdev: String,
        /// The function.
        function: String,
        /// Arguments, joined with spaces and sent as bytes.
        args: Vec<String>,
        /// Binary arguments instead, as hex digits (e.g. 00000000000000100000000000000040).
        #[arg(long, conflicts_with_all = ["args", "args_file"])]
        args_hex: Option<String>,
        /// Binary arguments instead, read from a file (`-`: standard input).
        #[arg(long, conflicts_with = "args")]
        args_file: Option<PathBuf>,
        /// Print the answer in hex (default: as text when it is UTF-8).
        #[arg(long)]
        hex: bool,
        /// How long the call may take, ms.
        #[arg(long, default_value_t = 30_000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            // Runtime failures; usage errors are clap's (2).
            ExitCode::from(1)
        }
    }
}

fn call(
    cli: &Cli,
    node: &str,
    vdev: &str,
    function: &str,
    args: &[u8],
    hex: bool,
    timeout_ms: u64,
) -> Result<()> {
    let mut options = ConnectOptions::default();
    options.client = format!("gvctl[{}]", std::process::id());
    options.reply_timeout = std::time::Duration::from_millis(timeout_ms);
    if let Some(path) = &cli.key_file {
        let keyring = grapevine_core::auth::Keyring::from_file(path)?;
        options.key = Some(gvd::port_key(&keyring)?);
    }
    let mut kos = Kos::new(&cli.nodes_path, options);
    let list = kos.nodes()?;
    if list.node(node).is_none() {
        bail!("no node {node} in {}", cli.nodes_path.display());
    }
    let opened = kos.open(Some(node), vdev)?;
    let started = std::time::Instant::now();
    let answer = kos.call(&opened, function, args)?;
    let took = started.elapsed();
    let text = if hex {
        None
    } else {
        std::str::from_utf8(&answer).ok()
    };
    let hex_text: String = answer.iter().map(|b| format!("{b:02x}")).collect();
    if cli.json {
        println!(
            "{}",
            serde_json::json!({
                "node": opened.location.node,
                "vdev": vdev,
                "function": function,
                "text": text,
                "hex": hex_text,
                "micros": took.as_micros() as u64,
            })
        );
    } else {
        println!("{}", text.map_or(hex_text, str::to_string));
    }
    Ok(())
}

fn human(bytes: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < units.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", units[unit])
    }
}

/// The libnfs URL of a member's export of a zone.
fn nfs_url(
    node: &grapevine_kos::nodes::NodeEntry,
    zone: &grapevine_kos::nodes::ZoneStatus,
) -> String {
    let address = node.record.addresses.first().map_or("?", String::as_str);
    format!(
        "nfs://{address}/{}/?nfsport={port}&mountport={port}",
        zone.name,
        port = zone.nfs_port
    )
}

/// The lines of `gvctl zones`: one per zone and node, members with their figures, non-members
/// with the members they forward to.
fn zone_table(list: &NodesFile) -> Vec<String> {
    let mut rows: Vec<_> = list
        .nodes
        .iter()
        .flat_map(|n| n.record.zones.iter().map(move |z| (n, z)))
        .collect();
    rows.sort_by(|a, b| (&a.1.name, &a.0.record.name).cmp(&(&b.1.name, &b.0.record.name)));
    let mut lines = vec![format!(
        "{:<16} {:>10} {:<12} {:>8} {:>10} {:>10} {:>9}  NFS",
        "ZONE", "QUOTA", "NODE", "VERSION", "USED", "FREE", "CONFLICTS"
    )];
    // Members of each zone that announce holding it: where a non-member forwards.
    let holders = |zone: &str| -> Vec<&str> {
        rows.iter()
            .filter(|(_, z)| z.member && z.name == zone)
            .map(|(n, _)| n.record.name.as_str())
            .collect()
    };
    for (n, z) in &rows {
        if !z.member {
            let members = holders(&z.name);
            let to = if members.is_empty() {
                "no live member".to_string()
            } else {
                members.join(", ")
            };
            lines.push(format!(
                "{:<16} {:>10} {:<12} {:>8} {:>10} {:>10} {:>9}  {}  (not a member: forwards to {to})",
                z.name,
                human(z.quota_bytes),
                n.record.name,
                "-",
                "-",
                "-",
                "-",
                nfs_url(n, z),
            ));
            continue;
        }
        let warn = if z.free_bytes < z.quota_bytes {
            " (quota over free space)"
        } else {
            ""
        };
        lines.push(format!(
            "{:<16} {:>10} {:<12} {:>8} {:>10} {:>10} {:>9}  {}{warn}",
            z.name,
            human(z.quota_bytes),
            n.record.name,
            z.version,
            human(z.used_bytes),
            human(z.free_bytes),
            z.conflicts,
            nfs_url(n, z),
        ));
    }
    // Configured members that no listed node announces: offline (stopped, cut off, or not
    // started yet). Their data is safe on the others; they catch up when back.
    let mut configured: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
        std::collections::BTreeMap::new();
    for (_, z) in &rows {
        configured
            .entry(z.name.as_str())
            .or_default()
            .extend(z.members.iter().map(String::as_str));
    }
    for (zone, members) in configured {
        let heard: Vec<&str> = rows
            .iter()
            .filter(|(_, z)| z.name == zone)
            .map(|(n, _)| n.record.name.as_str())
            .collect();
        for member in members.into_iter().filter(|m| !heard.contains(m)) {
            lines.push(format!(
                "{zone:<16} {:>10} {member:<12} {:>8} {:>10} {:>10} {:>9}  -  (offline: not heard)",
                "-", "-", "-", "-", "-"
            ));
        }
    }
    lines.extend(activity_lines(list));
    lines
}

/// What the local node's zones are doing, below the table: pulls, stalls and their cause,
/// writes not settled, skipped symbolic links.
fn activity_lines(list: &NodesFile) -> Vec<String> {
    let local = list
        .nodes
        .iter()
        .find(|n| n.record.node_id == list.local_node)
        .map_or("this node", |n| n.record.name.as_str());
    let plural = |n: u64, one: &str, many: &str| format!("{n} {}", if n == 1 { one } else { many });
    let mut lines = Vec::new();
    for zone in &list.zone_activity {
        let mut parts = vec![format!(
            "pulls {} pending, {} done, {} failed",
            zone.pulls_pending, zone.pulls_done, zone.pulls_failed
        )];
        if zone.unsettled_writes > 0 {
            parts.push(format!(
                "{} not settled",
                plural(zone.unsettled_writes, "write", "writes")
            ));
        }
        if zone.skipped_links > 0 {
            parts.push(format!(
                "{} skipped (never replicated)",
                plural(zone.skipped_links, "symbolic link", "symbolic links")
            ));
        }
        lines.push(format!("{} on {local}: {}", zone.name, parts.join("; ")));
        for stall in &zone.stalls {
            let since = unix_ms().saturating_sub(stall.since_ms) / 1000;
            lines.push(format!(
                "  STALLED: nothing pulled from node {} for {since} s ({}): {}",
                stall.peer,
                plural(stall.failures, "failure", "failures"),
                stall.cause
            ));
        }
    }
    lines
}

/// Why the list is not what a running gvd sees now: its writer is gone, or it stopped
/// refreshing the file.
fn not_current(list: &NodesFile) -> Option<String> {
    if list.pid != 0 && !std::path::Path::new(&format!("/proc/{}", list.pid)).exists() {
        return Some(format!(
            "gvd (pid {}) is not running: the node list is what it last saw",
            list.pid
        ));
    }
    list.staleness(unix_ms())
}

fn run(cli: Cli) -> Result<()> {
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "gvctl",
                &mut std::io::stdout(),
            );
            return Ok(());
        }
        Command::Manpage => {
            clap_mangen::Man::new(<Cli as clap::CommandFactory>::command())
                .render(&mut std::io::stdout())?;
            return Ok(());
        }
        _ => {}
    }
    if let Command::Call {
        node,
        vdev,
        function,
        args,
        args_hex,
        args_file,
        hex,
        timeout_ms,
    } = &cli.command
    {
        let bytes = match (args_hex, args_file) {
            (Some(digits), _) => hex::decode(digits.trim())
                .context("--args-hex is not an even number of hex digits")?,
            (None, Some(path)) if path.as_os_str() == "-" => {
                let mut bytes = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut bytes)?;
                bytes
            }
            (None, Some(path)) => {
                std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
            }
            (None, None) => args.join(" ").into_bytes(),
        };
        return call(&cli, node, vdev, function, &bytes, *hex, *timeout_ms);
    }
    let text = std::fs::read(&cli.nodes_path).with_context(|| {
        format!(
            "cannot read {} (is gvd running? set GV_NODES_PATH or --nodes-path)",
            cli.nodes_path.display()
        )
    })?;
    let list: NodesFile = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a gvd node list", cli.nodes_path.display()))?;
    if let Some(reason) = not_current(&list) {
        bail!("{reason} ({})", cli.nodes_path.display());
    }
    match cli.command {
        // Answered above, before anything else is read.
        Command::Completions { .. } | Command::Manpage => {}
        Command::Nodes => {
            if cli.json {
                println!("{}", serde_json::to_string(&list.nodes)?);
                return Ok(());
            }
            println!(
                "{:<16}  {:<20} {:<8} {:<18} {:>5}  ADDRESSES",
                "NODE", "NAME", "STATE", "UNIQUE", "VDEVS"
            );
            for node in &list.nodes {
                let r = &node.record;
                println!(
                    "{:016x}  {:<20} {:<8} {:<18} {:>5}  {}",
                    r.node_id,
                    r.name,
                    format!("{:?}", node.liveness).to_lowercase(),
                    r.unique,
                    node.vdevs.len(),
                    r.addresses.join(",")
                );
            }
        }
        Command::Vdevs { node } => {
            let selected: Vec<_> = list
                .nodes
                .iter()
                .filter(|n| {
                    node.as_ref().is_none_or(|want| {
                        n.record.name == *want || format!("{:016x}", n.record.node_id) == *want
                    })
                })
                .collect();
            if let (Some(want), true) = (&node, selected.is_empty()) {
                bail!("no node {want} in {}", cli.nodes_path.display());
            }
            if cli.json {
                let rows: Vec<_> = selected
                    .iter()
                    .flat_map(|n| {
                        n.vdevs.iter().map(|v| {
                            serde_json::json!({
                                "node": n.record.name,
                                "node_id": format!("{:016x}", n.record.node_id),
                                "driver": v.driver,
                                "name": v.vdev.name,
                                "kind": v.vdev.kind,
                                "attributes": v.vdev.attributes,
                            })
                        })
                    })
                    .collect();
                println!("{}", serde_json::to_string(&rows)?);
                return Ok(());
            }
            println!(
                "{:<20} {:<16} {:<20} {:<8} ATTRIBUTES",
                "NODE", "DRIVER", "VDEV", "KIND"
            );
            for n in selected {
                for v in &n.vdevs {
                    println!(
                        "{:<20} {:<16} {:<20} {:<8} {}",
                        n.record.name, v.driver, v.vdev.name, v.vdev.kind, v.vdev.attributes
                    );
                }
            }
        }
        Command::Call { .. } => unreachable!("handled above"),
        Command::Zones => {
            let rows: Vec<_> = list
                .nodes
                .iter()
                .flat_map(|n| n.record.zones.iter().map(move |z| (n, z)))
                .collect();
            if cli.json {
                let rows: Vec<_> = rows
                    .iter()
                    .map(|(n, z)| {
                        let mut value = serde_json::to_value(z).unwrap_or_default();
                        value["node"] = n.record.name.clone().into();
                        value["nfs"] = nfs_url(n, z).into();
                        let activity = list.zone_activity.iter().find(|a| a.name == z.name);
                        if let (true, Some(activity)) =
                            (n.record.node_id == list.local_node, activity)
                        {
                            value["activity"] = serde_json::to_value(activity).unwrap_or_default();
                        }
                        value
                    })
                    .collect();
                println!("{}", serde_json::to_string(&rows)?);
                return Ok(());
            }
            for line in zone_table(&list) {
                println!("{line}");
            }
        }
        Command::Status => {
            let local = list
                .nodes
                .iter()
                .find(|n| n.record.node_id == list.local_node);
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "local_node": format!("{:016x}", list.local_node),
                        "local": local.map(|n| &n.record),
                        "nodes": list.nodes.len(),
                        "others": list.nodes.iter().filter(|n| n.record.node_id != list.local_node).count(),
                        "suspect": list.nodes.iter().filter(|n| n.liveness == gvd::elp::Liveness::Suspect).count(),
                    })
                );
                return Ok(());
            }
            match local {
                Some(n) => println!(
                    "node {:016x} ({}), unique {}, {} VDEVs",
                    n.record.node_id,
                    n.record.name,
                    n.record.unique,
                    n.vdevs.len()
                ),
                None => println!(
                    "node {:016x}: not yet heard its own announcement",
                    list.local_node
                ),
            }
            let others = list
                .nodes
                .iter()
                .filter(|n| n.record.node_id != list.local_node);
            let suspect = others
                .clone()
                .filter(|n| n.liveness == gvd::elp::Liveness::Suspect)
                .count();
            println!("{} other nodes known ({suspect} suspect)", others.count());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_non_member_shows_where_it_forwards_not_a_free_space_warning() {
        let zone = |member: bool| {
            format!(
                r#"{{"name":"z1","member":{member},"quota_bytes":1048576,"members":["a"],"version":{v},"used_bytes":0,"free_bytes":{f},"nfs_port":2049,"conflicts":0}}"#,
                v = u8::from(member) * 3,
                f = if member { 1u64 << 30 } else { 0 },
            )
        };
        let node = |id: u8, name: &str, zones: String| {
            format!(
                r#"{{"node_id":{id},"name":"{name}","addresses":["127.0.0.{id}"],"query_port":7173,"kos_port":7174,"repl_port":0,"zones":[{zones}],"unique":"x","elp_delay_ms":1000,"liveness":"alive","vdevs_current":true,"vdevs":[]}}"#
            )
        };
        let text = format!(
            r#"{{"version":2,"local_node":1,"nodes":[{},{}]}}"#,
            node(1, "a", zone(true)),
            node(2, "b", zone(false))
        );
        let list: NodesFile = serde_json::from_str(&text).unwrap();
        let lines = zone_table(&list);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[1].contains(" a ") && lines[1].contains("1.0 GiB"),
            "{lines:?}"
        );
        assert!(!lines[1].contains("over free space"));
        assert!(lines[2].contains("forwards to a"), "{lines:?}");
        assert!(!lines[2].contains("over free space"), "{lines:?}");
    }

    #[test]
    fn the_local_zones_show_their_pulls_and_stalls_with_the_cause() {
        let text = r#"{"version":2,"local_node":1,"nodes":[{"node_id":1,"name":"a","addresses":["127.0.0.1"],"query_port":7173,"kos_port":7174,"repl_port":0,"zones":[{"name":"z1","member":true,"quota_bytes":1048576,"members":["a"],"version":1,"used_bytes":0,"free_bytes":1073741824,"nfs_port":2049,"conflicts":0}],"unique":"x","elp_delay_ms":1000,"liveness":"alive","vdevs_current":true,"vdevs":[]}],
            "zone_activity":[{"name":"z1","pulls_pending":1,"pulls_done":4,"pulls_failed":3,"unsettled_writes":2,"skipped_links":1,
            "stalls":[{"peer":"00000000000000b2","cause":"peer 127.0.0.2:7175: connection refused","failures":3,"since_ms":1}]}]}"#;
        let list: NodesFile = serde_json::from_str(text).unwrap();
        let lines = zone_table(&list);
        assert_eq!(lines.len(), 4, "{lines:?}");
        assert_eq!(
            lines[2],
            "z1 on a: pulls 1 pending, 4 done, 3 failed; 2 writes not settled; 1 symbolic link skipped (never replicated)"
        );
        assert!(
            lines[3].starts_with("  STALLED: nothing pulled from node 00000000000000b2 for ")
                && lines[3].ends_with("(3 failures): peer 127.0.0.2:7175: connection refused"),
            "{lines:?}"
        );
    }

    #[test]
    fn configured_members_not_heard_are_listed_offline() {
        let text = r#"{"version":2,"local_node":1,"nodes":[{"node_id":1,"name":"a","addresses":["127.0.0.1"],"query_port":7173,"kos_port":7174,"repl_port":0,"zones":[{"name":"z1","member":true,"quota_bytes":1048576,"members":["a","c"],"version":1,"used_bytes":0,"free_bytes":1073741824,"nfs_port":2049,"conflicts":0}],"unique":"x","elp_delay_ms":1000,"liveness":"alive","vdevs_current":true,"vdevs":[]}]}"#;
        let list: NodesFile = serde_json::from_str(text).unwrap();
        let lines = zone_table(&list);
        assert_eq!(lines.len(), 3, "{lines:?}");
        assert!(
            lines[2].contains(" c ") && lines[2].contains("offline"),
            "{lines:?}"
        );
    }
}
