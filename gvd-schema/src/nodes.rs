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
    /// Stable node id (persisted in the state directory); 16 hex digits in JSON, as in every
    /// table, and a plain integer on the wire.
    #[serde(with = "hex_id")]
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
    /// The node that wrote it (hex, as `node_id`).
    #[serde(with = "hex_id")]
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
    /// What the writer's own zones are doing (pulls, stalls, unsettled writes): local
    /// figures, not announced to peers.
    #[serde(default)]
    pub zone_activity: Vec<ZoneActivity>,
}

/// Node ids in human-readable formats (JSON) are 16 hex digits, the way every table prints
/// them: a decimal u64 is unreadable and past 2^53 loses digits in JavaScript. Binary formats
/// (postcard on the wire) keep the integer. Reading accepts the decimal integer of files
/// written by earlier releases too.
pub mod hex_id {
    use serde::{de, Deserializer, Serializer};

    /// Writes `id`: hex text for people, an integer for machines.
    ///
    /// # Errors
    ///
    /// Those of the serializer.
    pub fn serialize<S: Serializer>(id: &u64, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            serializer.serialize_str(&format!("{id:016x}"))
        } else {
            serializer.serialize_u64(*id)
        }
    }

    /// Reads an id written by [`serialize`] (or a plain integer).
    ///
    /// # Errors
    ///
    /// Neither an integer nor hex text of at most 16 digits.
    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u64, D::Error> {
        struct Id;
        impl de::Visitor<'_> for Id {
            type Value = u64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a node id: 16 hex digits")
            }
            fn visit_u64<E: de::Error>(self, id: u64) -> Result<u64, E> {
                Ok(id)
            }
            fn visit_str<E: de::Error>(self, text: &str) -> Result<u64, E> {
                if text.is_empty() || text.len() > 16 {
                    return Err(E::invalid_value(de::Unexpected::Str(text), &self));
                }
                u64::from_str_radix(text, 16)
                    .map_err(|_| E::invalid_value(de::Unexpected::Str(text), &self))
            }
        }
        if deserializer.is_human_readable() {
            deserializer.deserialize_any(Id)
        } else {
            deserializer.deserialize_u64(Id)
        }
    }
}

/// Milliseconds since the Unix epoch (0 before it): the clock of `written_at_ms` and
/// `since_ms`.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The replication work of one zone this node holds.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct ZoneActivity {
    /// The zone.
    pub name: String,
    /// Pulls wanted or under way (at most one per peer).
    pub pulls_pending: u64,
    /// Pulls completed since gvd started.
    pub pulls_done: u64,
    /// Pulls that failed since gvd started (each is retried at the peer's next announcement).
    pub pulls_failed: u64,
    /// Peers whose last pull failed: their changes are not arriving.
    pub stalls: Vec<ZoneStall>,
    /// Files written through NFS that are not quiet yet (not offered to peers until they are).
    pub unsettled_writes: u64,
    /// Symbolic links in the zone directory: never replicated.
    pub skipped_links: u64,
}

/// A peer this node cannot pull a zone from.
#[derive(Clone, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct ZoneStall {
    /// The peer's node id, in hex.
    pub peer: String,
    /// Why its last pull failed.
    pub cause: String,
    /// Failed pulls in a row.
    pub failures: u64,
    /// When the first of them failed, in milliseconds since the Unix epoch.
    pub since_ms: u64,
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
        if let Some(reason) = list.staleness(unix_ms()) {
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
    /// let list: NodesFile = serde_json::from_str(r#"{"version":2,"local_node":"0000000000000001","nodes":[
    ///   {"node_id":"0000000000000001","name":"a","addresses":["127.0.0.1"],"query_port":7173,"kos_port":7174,"repl_port":0,"zones":[],
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

#[cfg(test)]
mod tests {
    use super::*;

    fn record(node_id: u64) -> NodeRecord {
        NodeRecord {
            node_id,
            name: "a".into(),
            addresses: vec!["127.0.0.1".into()],
            query_port: 1,
            kos_port: 2,
            repl_port: 3,
            zones: Vec::new(),
            unique: "u".into(),
            elp_delay_ms: 1000,
        }
    }

    #[test]
    fn node_ids_are_hex_in_json_and_integers_on_the_wire() {
        let id = 0xfedc_ba98_7654_3210;
        let json = serde_json::to_value(record(id)).unwrap();
        assert_eq!(json["node_id"], "fedcba9876543210");
        let back: NodeRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back.node_id, id);
        let wire = postcard::to_allocvec(&record(id)).unwrap();
        assert_eq!(
            postcard::from_bytes::<NodeRecord>(&wire).unwrap(),
            record(id)
        );
        // 10 bytes of varint, not 16 characters of text.
        assert!(wire.len() < 40, "{}", wire.len());
    }

    #[test]
    fn node_lists_of_earlier_releases_with_decimal_ids_still_read() {
        let mut json = serde_json::to_value(record(5)).unwrap();
        json["node_id"] = 18_364_758_544_493_064_720u64.into();
        let back: NodeRecord = serde_json::from_value(json).unwrap();
        assert_eq!(back.node_id, 0xfedc_ba98_7654_3210);
    }

    #[test]
    fn malformed_node_ids_are_refused() {
        for bad in ["", "xyz", "00000000000000001", "-1"] {
            let mut json = serde_json::to_value(record(5)).unwrap();
            json["node_id"] = bad.into();
            assert!(
                serde_json::from_value::<NodeRecord>(json).is_err(),
                "{bad:?}"
            );
        }
    }
}
