//! `gvctl`: look at what the local gvd knows, from its node list file (`GV_NODES_PATH`).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use gvd::daemon::NodesFile;

/// Inspect the GrapeVine network as the local gvd sees it.
#[derive(Debug, Parser)]
#[command(name = "gvctl", version, about)]
struct Cli {
    /// The node list file gvd writes.
    #[arg(
        long,
        env = "GV_NODES_PATH",
        default_value = "/var/lib/gvd/nodes.json",
        global = true
    )]
    nodes_path: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Every live or suspect node.
    Nodes,
    /// The VDEVs of every node, or of one (by name or hex id).
    Vdevs {
        /// A node name or id.
        node: Option<String>,
    },
    /// This node and a count of the others.
    Status,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let text = std::fs::read(&cli.nodes_path).with_context(|| {
        format!(
            "cannot read {} (is gvd running? set GV_NODES_PATH or --nodes-path)",
            cli.nodes_path.display()
        )
    })?;
    let list: NodesFile = serde_json::from_slice(&text)
        .with_context(|| format!("{} is not a gvd node list", cli.nodes_path.display()))?;
    match cli.command {
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
                                "node_id": n.record.node_id,
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
        Command::Status => {
            let local = list
                .nodes
                .iter()
                .find(|n| n.record.node_id == list.local_node);
            if cli.json {
                println!(
                    "{}",
                    serde_json::json!({
                        "local_node": list.local_node,
                        "local": local.map(|n| &n.record),
                        "nodes": list.nodes.len(),
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
            println!("{} nodes known", list.nodes.len());
        }
    }
    Ok(())
}
