//! The node list file gvd keeps for local clients (`GV_NODES_PATH`, docs/GVD.md), and the
//! records it is made of. gvd writes it; a KOS reads it to find where a VDEV lives.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use serde::{Deserialize, Serialize};

/// gvd's topic of echolocation packets (node records, one leaf per node).
pub const ELP_TOPIC: u32 = 0x0045_4c50;

/// gvd's topic of VDEV lists (one leaf per node).
pub const VDEV_TOPIC: u32 = 0x5644_4556;

/// A node's VDEVs as published on the VDEV topic.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct VdevList {
    /// The `unique` these VDEVs hash to.
    pub unique: String,
    /// The VDEVs, by driver then name.
    pub vdevs: Vec<NodeVdev>,
}

/// The node list file cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("node list {path}: {reason}")]
pub struct NodeListError {
    /// The file.
    pub path: std::path::PathBuf,
    /// What is wrong with it.
    pub reason: String,
}

/// The schema version of the node list file.
pub const NODES_FILE_VERSION: u32 = 2;

/// A virtual device exposed by a driver.
#[derive(Clone, Debug, Deserialize, Eq, Hash, Ord, PartialEq, PartialOrd, Serialize)]
pub struct Vdev {
    /// Name, unique within its driver.
    pub name: String,
    /// Kind: "block", "char", "echo", ...
    pub kind: String,
    /// Attributes, a JSON object as text.
    pub attributes: String,
}

/// What a node announces about itself every period (its ELP record).
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct NodeRecord {
    /// Stable node id (persisted in the state directory).
    pub node_id: u64,
    /// Human name.
    pub name: String,
    /// Unicast addresses peers can reach it on (those of the configured interface).
    pub addresses: Vec<String>,
    /// UDP port of its QUERY socket (snapshot requests).
    pub query_port: u16,
    /// TCP port of its KOS listener; 0 when it serves none.
    pub kos_port: u16,
    /// TCP port of its zone replication server; 0 when it holds no zone.
    pub repl_port: u16,
    /// The replication zones it knows of (those it holds, with their state).
    pub zones: Vec<ZoneStatus>,
    /// Digest of its VDEVs.
    pub unique: String,
    /// How often it announces itself, in milliseconds.
    pub elp_delay_ms: u64,
}

impl NodeRecord {
    /// Where a KOS connects to reach this node's VDEVs.
    pub fn kos_address(&self) -> Option<SocketAddr> {
        if self.kos_port == 0 {
            return None;
        }
        let ip = self
            .addresses
            .iter()
            .find_map(|a| a.parse::<IpAddr>().ok())?;
        Some(SocketAddr::new(ip, self.kos_port))
    }
}

/// A replication zone as one node announces it.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct ZoneStatus {
    /// The zone's name.
    pub name: String,
    /// Whether this node holds the zone (false: it serves it by forwarding to a member).
    pub member: bool,
    /// Most bytes the zone may hold.
    pub quota_bytes: u64,
    /// Names of the member nodes, as configured.
    pub members: Vec<String>,
    /// This node's version of the zone: it grows with every change it made or received.
    pub version: u64,
    /// Bytes the zone holds on this node.
    pub used_bytes: u64,
    /// Free bytes of the file system under the zone's directory.
    pub free_bytes: u64,
    /// Port of this node's NFS server for the zone (0: none).
    pub nfs_port: u16,
    /// Conflicts this node has kept both versions of.
    pub conflicts: u64,
}

/// One VDEV of a node.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct NodeVdev {
    /// The driver exposing it.
    pub driver: String,
    /// The device. (Nested, not flattened: records travel as postcard, which needs fixed
    /// shapes.)
    pub vdev: Vdev,
}

/// Where a node stands.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Liveness {
    /// Heard within two announcement periods.
    Alive,
    /// Missed announcements, not yet given up: loss must not make nodes flap.
    Suspect,
    /// Silent for `node_ttl` periods: left out of the node list.
    Dead,
}

/// The node list file.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct NodesFile {
    /// Schema version of this file.
    pub version: u32,
    /// The node that wrote it.
    pub local_node: u64,
    /// Every node alive or suspect, by node id.
    pub nodes: Vec<NodeEntry>,
    /// gvd nodes of the same network name found on other networks through the DHT
    /// (`address:kos_port`); empty without a DHT.
    #[serde(default)]
    pub remote_peers: Vec<String>,
    /// The pid of the gvd that writes it (0 in files of earlier releases).
    #[serde(default)]
    pub pid: u32,
    /// When it was last written, in milliseconds since the Unix epoch: gvd rewrites it at least
    /// once per announcement period, so an old time means gvd stopped or hangs.
    #[serde(default)]
    pub written_at_ms: u64,
    /// gvd's announcement period, milliseconds: how often `written_at_ms` moves.
    #[serde(default)]
    pub period_ms: u64,
    /// The multicast groups this gvd uses (its ELP and VDEV topics, a relayed group), for
    /// tools such as `grapevine spy --via-gvd`.
    #[serde(default)]
    pub groups: Vec<GroupEntry>,
}

/// A multicast group a gvd uses.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct GroupEntry {
    /// What it carries: `elp`, `vdev` or `relayed`.
    pub name: String,
    /// `address:port`.
    pub group: SocketAddr,
    /// The interface it is joined on (name or address).
    pub iface: String,
}

/// One node of the node list.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct NodeEntry {
    /// Its record, as it announced it.
    #[serde(flatten)]
    pub record: NodeRecord,
    /// Alive or suspect.
    pub liveness: Liveness,
    /// Its VDEVs, as last received.
    pub vdevs: Vec<NodeVdev>,
    /// Whether `vdevs` match the `unique` it announces (false while an update is fetched).
    pub vdevs_current: bool,
}

/// A VDEV and the node that exposes it.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct VdevLocation {
    /// The node's id.
    pub node_id: u64,
    /// The node's name.
    pub node: String,
    /// Where to connect.
    pub address: SocketAddr,
    /// The driver exposing it.
    pub driver: String,
    /// The device.
    pub vdev: Vdev,
}

impl NodesFile {
    /// Why this list cannot be trusted to be current at `now_ms` (milliseconds since the Unix
    /// epoch): not rewritten for three announcement periods (gvd stopped, hangs, or its disk is
    /// full). `None` when it is current, or when it comes from a release that did not say.
    pub fn staleness(&self, now_ms: u64) -> Option<String> {
        if self.written_at_ms == 0 || self.period_ms == 0 {
            return None;
        }
        let age = now_ms.saturating_sub(self.written_at_ms);
        (age > 3 * self.period_ms.max(1_000)).then(|| {
            format!(
                "the node list was last written {:.1} s ago by gvd pid {}: gvd is not running \
                 (or is stuck), so this list is out of date",
                age as f64 / 1000.0,
                self.pid
            )
        })
    }

    /// Reads and checks a node list file.
    ///
    /// # Errors
    ///
    /// [`NodeListError`] when the file is missing, unreadable, or of another schema.
    pub fn read(path: &Path) -> Result<Self, NodeListError> {
        let bad = |reason: String| NodeListError {
            path: path.to_path_buf(),
            reason,
        };
        let text = std::fs::read(path)
            .map_err(|e| bad(format!("{e} (is gvd running? set GV_NODES_PATH)")))?;
        let list: Self = serde_json::from_slice(&text).map_err(|e| bad(e.to_string()))?;
        if list.version != NODES_FILE_VERSION {
            return Err(bad(format!(
                "schema version {}, this KOS reads {NODES_FILE_VERSION}",
                list.version
            )));
        }
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if let Some(reason) = list.staleness(now_ms) {
            return Err(bad(reason));
        }
        Ok(list)
    }

    /// The node called `name` or whose hex id is `name`.
    pub fn node(&self, name: &str) -> Option<&NodeEntry> {
        self.nodes
            .iter()
            .find(|n| n.record.name == name || format!("{:016x}", n.record.node_id) == name)
    }

    /// Every place a VDEV called `vdev` can be reached, on `node` only if given (a name or a
    /// hex id). Nodes without a KOS listener are left out.
    ///
    /// ```
    /// use grapevine_gvd_schema::nodes::NodesFile;
    /// let list: NodesFile = serde_json::from_str(r#"{"version":2,"local_node":1,"nodes":[
    ///   {"node_id":1,"name":"a","addresses":["127.0.0.1"],"query_port":7173,"kos_port":7174,"repl_port":0,"zones":[],
    ///    "unique":"x","elp_delay_ms":1000,"liveness":"alive","vdevs_current":true,
    ///    "vdevs":[{"driver":"echo","vdev":{"name":"echo0","kind":"echo","attributes":"{}"}}]}]}"#)?;
    /// let found = list.locate(None, "echo0");
    /// assert_eq!(found[0].address.to_string(), "127.0.0.1:7174");
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn locate(&self, node: Option<&str>, vdev: &str) -> Vec<VdevLocation> {
        self.nodes
            .iter()
            .filter(|n| {
                node.is_none_or(|want| {
                    n.record.name == want || format!("{:016x}", n.record.node_id) == want
                })
            })
            .filter_map(|n| Some((n, n.record.kos_address()?)))
            .flat_map(|(n, address)| {
                n.vdevs
                    .iter()
                    .filter(|v| v.vdev.name == vdev)
                    .map(move |v| VdevLocation {
                        node_id: n.record.node_id,
                        node: n.record.name.clone(),
                        address,
                        driver: v.driver.clone(),
                        vdev: v.vdev.clone(),
                    })
            })
            .collect()
    }
}
