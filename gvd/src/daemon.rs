//! The daemon loop: inventory, echolocation, and the node list file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use grapevine_core::net::{resolve_interface, InterfaceSpec, MulticastConfig};
use grapevine_core::proto::{SnapshotRate, SubscriberEvent};
use grapevine_core::state::{MapDelta, ReplicatedState};
use grapevine_publisher::{Publisher, PublisherOptions};
use grapevine_snapshotter::{Snapshotter, SnapshotterOptions};
use grapevine_subscriber::{Subscriber, SubscriberOptions};
use serde::{Deserialize, Serialize};

use crate::elp::{Liveness, LivenessTracker, NodeRecord, NodeTable, NodeVdev, ELP_TOPIC};
use crate::inventory::{driver_files, scan, search_path, Inventory};

/// gvd's settings. Read from a TOML file, then overridden by environment and flags.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's name. Default: the host name.
    pub name: String,
    /// Where the node id is kept. Default `/var/lib/gvd`.
    pub state_dir: PathBuf,
    /// The node list for local readers. Default `<state_dir>/nodes.json`.
    pub nodes_path: Option<PathBuf>,
    /// Colon-separated directories of VDRIVERs. Default `/usr/lib/gvd/vdrivers`.
    pub vdriver_path: String,
    /// Multicast group of the ELP topic. Default `239.255.71.71:7171`.
    pub group: SocketAddr,
    /// Interface to announce on (name or address). Default loopback.
    pub iface: String,
    /// Announcement period, milliseconds. Default 1000.
    pub elp_delay_ms: u64,
    /// A node silent for this many of its periods is dead. Default 5.
    pub node_ttl: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "gvd".into()),
            state_dir: PathBuf::from("/var/lib/gvd"),
            nodes_path: None,
            vdriver_path: "/usr/lib/gvd/vdrivers".into(),
            group: SocketAddr::from(([239, 255, 71, 71], 7171)),
            iface: "lo".into(),
            elp_delay_ms: 1000,
            node_ttl: 5,
        }
    }
}

impl Config {
    /// Reads a TOML file.
    ///
    /// # Errors
    ///
    /// When the file cannot be read or has unknown keys or bad values.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("bad configuration in {}", path.display()))
    }

    /// The node list path.
    pub fn nodes_path(&self) -> PathBuf {
        self.nodes_path
            .clone()
            .unwrap_or_else(|| self.state_dir.join("nodes.json"))
    }
}

/// The node list file (`GV_NODES_PATH`): what local readers (KOS clients) see.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct NodesFile {
    /// Schema version of this file.
    pub version: u32,
    /// The node that wrote it.
    pub local_node: u64,
    /// Every node alive or suspect, by node id.
    pub nodes: Vec<NodeEntry>,
}

/// One node of the node list.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct NodeEntry {
    /// Its record, as it announced it.
    #[serde(flatten)]
    pub record: NodeRecord,
    /// Alive or suspect.
    pub liveness: Liveness,
}

/// Writes `contents` to `path` atomically: a temporary file in the same directory, synced,
/// then renamed over the old one, so readers see the old or the new file, never a torn one.
///
/// # Errors
///
/// I/O errors (full disk, permissions); the old file is then left as it was.
pub fn write_atomically(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("nodes"),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(contents)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The node id kept in `state_dir/node-id`, created at the first start.
///
/// # Errors
///
/// When the state directory cannot be read or written.
pub fn node_id(state_dir: &Path) -> Result<u64> {
    let path = state_dir.join("node-id");
    if let Ok(text) = std::fs::read_to_string(&path) {
        if let Ok(id) = u64::from_str_radix(text.trim(), 16) {
            return Ok(id);
        }
        tracing::warn!(path = %path.display(), "unreadable node id, making a new one");
    }
    let id = rand::random::<u64>() | 1;
    write_atomically(&path, format!("{id:016x}\n").as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

/// Runs the daemon until `stop` is set.
///
/// # Errors
///
/// When sockets or the state directory cannot be set up.
pub fn run(config: &Config, probe_exe: &Path, stop: &Arc<AtomicBool>) -> Result<()> {
    let node = node_id(&config.state_dir)?;
    let iface: InterfaceSpec = config.iface.parse().unwrap_or_default();
    let multicast = MulticastConfig::new(config.group).on(iface.clone());
    let address = resolve_interface(&iface, config.group.is_ipv6())?.addr;
    let delay = Duration::from_millis(config.elp_delay_ms.max(10));
    let directories = search_path(&config.vdriver_path);

    let mut options = PublisherOptions::new(ELP_TOPIC, multicast.clone());
    // Publisher ids are 32 bits: the low half of the node id (collisions are 1 in 4 billion
    // per pair of nodes).
    options.session.publisher = node as u32;
    options.session.heartbeat_interval = delay;
    let publisher = Publisher::start(options, NodeTable::default())?;
    let mut snapshot = SnapshotterOptions::new(multicast.clone());
    snapshot.snapshot.rate = SnapshotRate::LeavesPerSecond(100);
    snapshot.snapshot.cycle_pause = delay;
    let snapshotter = Snapshotter::start(&publisher, snapshot)?;
    let subscriber = Subscriber::<NodeTable>::join(SubscriberOptions::new(ELP_TOPIC, multicast))?;
    tracing::info!(node = format!("{node:016x}"), group = %config.group, "gvd started");

    let mut tracker = LivenessTracker::new(config.node_ttl);
    let mut inventory = scan(&directories, probe_exe);
    let mut files = driver_files(&directories);
    let mut last_rescan = Instant::now();
    let mut next_announce = Instant::now();
    let mut written: Option<NodesFile> = None;
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // Drivers appearing or disappearing change the inventory without a restart; VDEVs that
        // change inside a driver are picked up by the periodic rescan.
        let current = driver_files(&directories);
        if current != files || now.duration_since(last_rescan) >= delay * 10 {
            files = current;
            let fresh = scan(&directories, probe_exe);
            if fresh.unique != inventory.unique {
                tracing::info!(unique = %fresh.unique, "VDEVs changed");
            }
            inventory = fresh;
            last_rescan = now;
        }
        if now >= next_announce {
            let record = record(node, config, &address.to_string(), &inventory);
            publisher.publish(MapDelta::Put(node, record))?;
            next_announce = now + delay;
        }
        for event in subscriber.events().try_iter() {
            match event {
                SubscriberEvent::Applied {
                    key,
                    seq,
                    publisher,
                } => {
                    tracing::trace!(node = format!("{key:016x}"), seq, publisher, "heard");
                    tracker.heard(key, now);
                }
                SubscriberEvent::PublisherRestarted { publisher, .. } => {
                    tracing::info!(publisher, "node restarted")
                }
                _ => {}
            }
        }
        let list = subscriber.read(|session| {
            let records: Vec<NodeRecord> = session
                .streams()
                .flat_map(|s| s.state.leaves().map(|(_, r)| r.clone()).collect::<Vec<_>>())
                .collect();
            tracker.classify(records.iter(), now)
        });
        let file = NodesFile {
            version: 1,
            local_node: node,
            nodes: list
                .into_values()
                .map(|(record, liveness)| NodeEntry { record, liveness })
                .collect(),
        };
        if written.as_ref() != Some(&file) {
            let json = serde_json::to_vec_pretty(&file)?;
            match write_atomically(&config.nodes_path(), &json) {
                Ok(()) => written = Some(file),
                Err(error) => {
                    tracing::error!(%error, path = %config.nodes_path().display(), "cannot write the node list")
                }
            }
        }
        std::thread::sleep(delay / 4);
    }
    // Say goodbye so that peers drop this node now rather than after the TTL.
    let _ = publisher.publish(MapDelta::Remove(node));
    publisher.flush();
    snapshotter.shutdown();
    publisher.shutdown();
    Ok(())
}

fn record(node: u64, config: &Config, address: &str, inventory: &Inventory) -> NodeRecord {
    NodeRecord {
        node_id: node,
        name: config.name.clone(),
        addresses: vec![address.to_string()],
        unique: inventory.unique.clone(),
        vdevs: inventory
            .drivers
            .iter()
            .flat_map(|d| {
                d.vdevs.iter().map(|v| NodeVdev {
                    driver: d.driver.clone(),
                    vdev: v.clone(),
                })
            })
            .collect(),
        elp_delay_ms: config.elp_delay_ms,
    }
}
