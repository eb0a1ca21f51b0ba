//! gvd's settings: the TOML schema with its defaults, validation of the merged result (file,
//! then environment and flags, see `main.rs`), and the durations it implies.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use grapevine_fs::service::ZoneConfig;
use serde::{Deserialize, Serialize};

/// The repeater role of a gvd (docs/GVD.md): relays topics of a local group to repeaters on
/// other networks.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RepeaterConfig {
    /// The local group relayed.
    pub group: SocketAddr,
    /// Its interface. Default loopback.
    #[serde(default = "loopback")]
    pub iface: String,
    /// Unicast address to receive from remote repeaters on.
    pub listen: SocketAddr,
    /// Remote repeaters known in advance (those found through the DHT are added).
    #[serde(default)]
    pub peers: Vec<SocketAddr>,
    /// Topics relayed; all when empty.
    #[serde(default)]
    pub topics: Vec<u32>,
    /// How datagrams cross to the remote repeaters: `"udp"` (default) or `"quic"`
    /// (congestion-controlled; peers prove they hold the network key).
    #[serde(default)]
    pub wan: grapevine_repeater::WanTransport,
}

fn loopback() -> String {
    "lo".into()
}

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
    /// Multicast group of the VDEV topic. Default: the ELP group's address, next port.
    pub vdev_group: Option<SocketAddr>,
    /// UDP port for QUERYs (snapshot requests from peers); 0 picks a free one. Default 7173.
    pub query_port: u16,
    /// Interface to announce on (name or address). Default loopback.
    pub iface: String,
    /// Announcement period, milliseconds. Default 1000.
    pub elp_delay_ms: u64,
    /// A node silent for this many of its periods is dead. Default 5.
    pub node_ttl: u32,
    /// TCP port of the KOS listener, on the interface's address; 0 picks a free one (it is
    /// announced in the ELP record). Default 7174.
    pub kos_port: u16,
    /// Most KOS connections (agent processes) at once. Default 64.
    pub max_agents: usize,
    /// Most KOS connections at once from one address, so that one client cannot hold every
    /// agent. Default 8.
    pub max_agents_per_source: usize,
    /// Longest a driver call may run before its agent gives up and ends, ms. Default 30 000.
    pub call_timeout_ms: u64,
    /// Largest KOS request frame, bytes. Default 16 MiB.
    pub max_frame: usize,
    /// TCP port of the zone replication server; 0 picks a free one. Default 7175.
    pub repl_port: u16,
    /// Replication zones (`[[zones]]`); this node serves those that list it as a member.
    pub zones: Vec<ZoneConfig>,
    /// How long a file written over NFS must be quiet before it replicates, ms. Default 200.
    pub zone_debounce_ms: u64,
    /// How often zone directories are scanned for changes made outside NFS, ms. Default 5000.
    pub zone_scan_interval_ms: u64,
    /// How often drivers are asked again for their VDEVs when no driver file changed and no
    /// SIGHUP came, milliseconds. Default 10 000.
    pub rescan_interval_ms: u64,
    /// The network's key file (`<id>:<64 hex digits>` lines): ELP and VDEV datagrams are signed
    /// with it and unsigned or forged ones ignored. Default none.
    pub key_file: Option<PathBuf>,
    /// Serve the status page, JSON status and Prometheus metrics (docs/GVD.md). Default true.
    pub admin: bool,
    /// Where to serve them; port 0 picks a free one. Anything but loopback needs `key_file`
    /// (requests then carry the token of `gvd admin-token`). Default `127.0.0.1:7176`.
    pub admin_address: SocketAddr,
    /// The repeater role (`[repeater]`). Default none.
    pub repeater: Option<RepeaterConfig>,
    /// DHT bootstrap nodes (`host:port`): when given, this node announces itself on the DHT
    /// under `network` and lists the nodes of the same network found there. Default none.
    pub dht_bootstrap: Vec<String>,
    /// Address the DHT node binds to. Default 0.0.0.0.
    pub dht_bind: std::net::Ipv4Addr,
    /// The network name looked up on the DHT. Default "grapevine".
    pub network: String,
    /// How often to announce and look up on the DHT, ms. Default 30 000.
    pub dht_interval_ms: u64,
    /// Fraction of received ELP and VDEV datagrams to drop on purpose, to measure how
    /// detection behaves under loss. Default 0.
    pub inject_loss: f64,
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
            vdev_group: None,
            query_port: 7173,
            kos_port: 7174,
            max_agents: 64,
            max_agents_per_source: 8,
            call_timeout_ms: 30_000,
            max_frame: grapevine_kos::proto::DEFAULT_MAX_FRAME,
            repl_port: 7175,
            zones: Vec::new(),
            zone_debounce_ms: 200,
            zone_scan_interval_ms: 5_000,
            iface: "lo".into(),
            elp_delay_ms: 1000,
            node_ttl: 5,
            rescan_interval_ms: 10_000,
            key_file: None,
            repeater: None,
            dht_bootstrap: Vec::new(),
            dht_bind: std::net::Ipv4Addr::UNSPECIFIED,
            network: "grapevine".into(),
            dht_interval_ms: 30_000,
            inject_loss: 0.0,
            admin: true,
            admin_address: SocketAddr::from(([127, 0, 0, 1], 7176)),
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
        let config: Self = toml::from_str(&text)
            .with_context(|| format!("bad configuration in {}", path.display()))?;
        config
            .validate()
            .with_context(|| format!("bad configuration in {}", path.display()))?;
        Ok(config)
    }

    /// Rejects values that cannot work (or would melt the network), each with what is
    /// allowed: run once the file, environment and flags are merged, and on the file alone.
    ///
    /// # Errors
    ///
    /// The first setting out of range.
    pub fn validate(&self) -> Result<()> {
        let within = |name: &str, value: u64, range: std::ops::RangeInclusive<u64>| {
            if range.contains(&value) {
                Ok(())
            } else {
                Err(anyhow!(
                    "{name} = {value} is out of range ({}..={})",
                    range.start(),
                    range.end()
                ))
            }
        };
        const HOUR_MS: u64 = 3_600_000;
        within("elp_delay_ms", self.elp_delay_ms, 10..=HOUR_MS)?;
        within("node_ttl", u64::from(self.node_ttl), 1..=1_000)?;
        within("call_timeout_ms", self.call_timeout_ms, 1..=24 * HOUR_MS)?;
        within("zone_debounce_ms", self.zone_debounce_ms, 0..=HOUR_MS)?;
        within(
            "zone_scan_interval_ms",
            self.zone_scan_interval_ms,
            100..=24 * HOUR_MS,
        )?;
        within(
            "rescan_interval_ms",
            self.rescan_interval_ms,
            100..=24 * HOUR_MS,
        )?;
        within("dht_interval_ms", self.dht_interval_ms, 100..=24 * HOUR_MS)?;
        within("max_agents", self.max_agents as u64, 1..=65_536)?;
        within(
            "max_agents_per_source",
            self.max_agents_per_source as u64,
            1..=65_536,
        )?;
        within("max_frame", self.max_frame as u64, 1_024..=1 << 30)?;
        if !(0.0..1.0).contains(&self.inject_loss) {
            bail!("inject_loss = {} must be in [0, 1)", self.inject_loss);
        }
        if self.name.is_empty() || self.name.len() > 255 {
            bail!("name must be 1 to 255 bytes");
        }
        if !self.group.ip().is_multicast() {
            bail!("group {} is not a multicast address", self.group);
        }
        if !self.vdev_group().ip().is_multicast() {
            bail!(
                "vdev_group {} is not a multicast address",
                self.vdev_group()
            );
        }
        if self.admin && !self.admin_address.ip().is_loopback() && self.key_file.is_none() {
            bail!(
                "admin_address {} is not loopback: set key_file (its requests then need the \
                 token of `gvd admin-token`), or keep it on 127.0.0.1",
                self.admin_address
            );
        }
        let mut zone_names = std::collections::BTreeSet::new();
        for zone in &self.zones {
            // The name becomes an NFS export, a metadata directory and a metric label.
            let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if zone.name.is_empty()
                || zone.name.len() > 64
                || zone.name.starts_with('.')
                || !zone.name.chars().all(allowed)
            {
                bail!(
                    "zone name {:?}: use 1 to 64 letters, digits, '-', '_' or '.', not starting with '.'",
                    zone.name
                );
            }
            if !zone_names.insert(zone.name.as_str()) {
                bail!("zone {} is defined twice", zone.name);
            }
            if zone.members.is_empty() {
                bail!("zone {} has no members", zone.name);
            }
        }
        if let Some(repeater) = &self.repeater {
            if !repeater.group.ip().is_multicast() {
                bail!(
                    "repeater group {} is not a multicast address",
                    repeater.group
                );
            }
        }
        Ok(())
    }

    /// The announcement period.
    pub fn elp_delay(&self) -> Duration {
        Duration::from_millis(self.elp_delay_ms)
    }

    /// How long a driver call may run.
    pub fn call_timeout(&self) -> Duration {
        Duration::from_millis(self.call_timeout_ms)
    }

    /// How long a file written over NFS must be quiet before it replicates.
    pub fn zone_debounce(&self) -> Duration {
        Duration::from_millis(self.zone_debounce_ms)
    }

    /// How often zone directories are scanned.
    pub fn zone_scan_interval(&self) -> Duration {
        Duration::from_millis(self.zone_scan_interval_ms)
    }

    /// How often drivers are asked again for their VDEVs.
    pub fn rescan_interval(&self) -> Duration {
        Duration::from_millis(self.rescan_interval_ms)
    }

    /// How often to announce and look up on the DHT.
    pub fn dht_interval(&self) -> Duration {
        Duration::from_millis(self.dht_interval_ms)
    }

    /// The VDEV topic's group.
    pub fn vdev_group(&self) -> SocketAddr {
        self.vdev_group.unwrap_or_else(|| {
            let mut group = self.group;
            group.set_port(self.group.port().wrapping_add(1));
            group
        })
    }

    /// The node list path.
    pub fn nodes_path(&self) -> PathBuf {
        self.nodes_path
            .clone()
            .unwrap_or_else(|| self.state_dir.join("nodes.json"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn absurd_values_are_rejected_with_the_setting_named() {
        type Breakage = fn(&mut Config);
        let cases: [(&str, Breakage); 8] = [
            ("elp_delay_ms", |c| c.elp_delay_ms = 0),
            ("node_ttl", |c| c.node_ttl = 0),
            ("dht_interval_ms", |c| c.dht_interval_ms = 5),
            ("max_frame", |c| c.max_frame = 1 << 40),
            ("inject_loss", |c| c.inject_loss = 1.5),
            ("not a multicast", |c| {
                c.group = "10.0.0.1:7171".parse().unwrap()
            }),
            ("name", |c| c.name.clear()),
            ("admin_address", |c| {
                c.admin_address = "0.0.0.0:7176".parse().unwrap();
            }),
        ];
        for (named, break_it) in cases {
            let mut config = Config::default();
            break_it(&mut config);
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains(named), "{named}: {error}");
        }
    }

    #[test]
    fn zone_names_that_could_leave_their_directory_are_refused() {
        let zone = |name: &str| -> ZoneConfig {
            toml::from_str(&format!(
                "name = {name:?}\nquota_bytes = 1\nmembers = [\"a\"]\npath = \"/tmp/z\"\n"
            ))
            .unwrap()
        };
        for bad in ["", "../etc", "a/b", ".hidden", "zone name", &"z".repeat(65)] {
            let config = Config {
                zones: vec![zone(bad)],
                ..Config::default()
            };
            let error = config.validate().unwrap_err().to_string();
            assert!(error.contains("zone name"), "{bad:?}: {error}");
        }
        let mut config = Config {
            zones: vec![zone("photos-2026.v1_a")],
            ..Config::default()
        };
        config.validate().unwrap();
        config.zones.push(zone("photos-2026.v1_a"));
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("defined twice"), "{error}");
        config.zones = vec![zone("empty")];
        config.zones[0].members.clear();
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("no members"), "{error}");
    }

    #[test]
    fn a_file_with_an_absurd_value_does_not_load() {
        let dir = std::env::temp_dir().join(format!("gvd-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("gvd.toml");
        std::fs::write(&path, "elp_delay_ms = 1\n").unwrap();
        let error = format!("{:#}", Config::from_file(&path).unwrap_err());
        assert!(
            error.contains("elp_delay_ms = 1 is out of range"),
            "{error}"
        );
        std::fs::write(&path, "elp_delay_ms = 250\n").unwrap();
        assert_eq!(
            Config::from_file(&path).unwrap().elp_delay(),
            Duration::from_millis(250)
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
