//! `grapevine record`: every datagram of some groups, with receive times, into rotating files.

use std::fs::File;
use std::io::{BufWriter, IsTerminal};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Args;
use grapevine::core::net::InterfaceSpec;
use grapevine_cli::recording::{Record, RecordWriter};

use crate::cmd::receive_all;
use crate::interrupted;

/// `grapevine record`.
#[derive(Args, Debug)]
pub struct RecordArgs {
    /// The recording (rotated files get `.1`, `.2`, ... appended).
    file: PathBuf,
    /// Groups to record (repeat the flag for several).
    #[arg(long = "group", required = true, value_parser = crate::values::group)]
    groups: Vec<SocketAddr>,
    /// Interface to join on; loopback unless set.
    #[arg(long, env = "GRAPEVINE_IFACE", default_value = "lo")]
    iface: InterfaceSpec,
    /// Stop after this many seconds (default: until Ctrl-C).
    #[arg(long, value_parser = crate::values::seconds, allow_negative_numbers = true)]
    seconds: Option<f64>,
    /// Start a new file when this one reaches this many MiB.
    #[arg(long)]
    rotate_mib: Option<u64>,
    /// Overwrite an existing recording (without it, an existing file is an error).
    #[arg(long)]
    force: bool,
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
    if !args.force && args.file.exists() {
        // Before joining anything: nothing to undo.
        anyhow::bail!(
            "{} exists: give another name, or --force to overwrite it",
            args.file.display()
        );
    }
    let rx = receive_all(&args.groups, &args.iface)?;
    let open = |index: u32| -> Result<RecordWriter<BufWriter<File>>> {
        let path = segment_path(&args.file, index);
        let mut options = std::fs::OpenOptions::new();
        options.write(true);
        if args.force {
            options.create(true).truncate(true);
        } else {
            options.create_new(true);
        }
        let file = options.open(&path).map_err(|error| {
            if error.kind() == std::io::ErrorKind::AlreadyExists {
                anyhow::anyhow!(
                    "{} exists: give another name, or --force to overwrite it",
                    path.display()
                )
            } else {
                anyhow::Error::new(error).context(format!("cannot create {}", path.display()))
            }
        })?;
        Ok(RecordWriter::new(BufWriter::new(file))?)
    };
    let mut segment = 0u32;
    let mut writer = open(segment)?;
    let limit = args.rotate_mib.map(|m| m.max(1) << 20);
    let started = Instant::now();
    let stop_at = args.seconds.map(|s| started + Duration::from_secs_f64(s));
    let (mut records, mut total_bytes) = (0u64, 0u64);
    let mut next_progress = started + Duration::from_secs(1);
    let terminal = std::io::stderr().is_terminal();
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
        // Progress is redrawn in place on a terminal only: in a log file it would be clutter.
        if Instant::now() >= next_progress && terminal {
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
    if terminal {
        eprintln!();
    }
    eprintln!(
        "recorded {records} datagrams ({:.1} MiB) in {} file(s) starting at {}",
        total_bytes as f64 / (1 << 20) as f64,
        segment + 1,
        args.file.display()
    );
    Ok(())
}
