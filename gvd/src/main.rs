//! `gvd`, the GrapeVine daemon. This version inventories VDRIVERs; discovery, the node list,
//! KOS agents and GrapeVineFS are the next steps (see README).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use gvd::inventory::{probe_here, scan, search_path};

/// The GrapeVine daemon.
#[derive(Debug, Parser)]
#[command(name = "gvd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Find the VDRIVERs in VDRIVER_PATH, check each, and print the VDEVs and `unique`.
    Inventory {
        /// Colon-separated directories of driver libraries.
        #[arg(long, env = "VDRIVER_PATH", default_value = "/usr/lib/gvd/vdrivers")]
        vdriver_path: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Load one driver in this process and print its inventory as JSON (used by gvd itself, in
    /// a child process, so that a bad driver cannot take the daemon down).
    #[command(hide = true)]
    ProbeDriver {
        /// The library.
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Inventory { vdriver_path, json } => {
            let exe = std::env::current_exe()?;
            let inventory = scan(&search_path(&vdriver_path), &exe);
            if json {
                println!("{}", serde_json::to_string(&inventory)?);
                return Ok(());
            }
            println!("unique {}", inventory.unique);
            for driver in &inventory.drivers {
                println!("{} ({})", driver.driver, driver.path.display());
                for vdev in &driver.vdevs {
                    println!("  {:<20} {:<8} {}", vdev.name, vdev.kind, vdev.attributes);
                }
            }
            for skipped in &inventory.skipped {
                println!("skipped {}: {}", skipped.path.display(), skipped.reason);
            }
            Ok(())
        }
        Command::ProbeDriver { path } => {
            let found = probe_here(&path)?;
            println!("{}", serde_json::to_string(&found)?);
            Ok(())
        }
    }
}
