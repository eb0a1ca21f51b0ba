//! The daemon loop: inventory, echolocation, and the node list file.
//!
//! It is over 600 lines because it wires every subsystem (topics, KOS, zones, DHT, repeater, query
//! port) and keeps the node list; the decisions live in `peers`, `config`, `topic` and
//! `query_server`.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use grapevine_core::net::{resolve_interface, InterfaceSpec, MulticastConfig};
use grapevine_core::proto::StreamStatus;
use grapevine_core::state::{MapDelta, ReplicatedState};
use serde::Serialize;

use crate::elp::{
    liveness, Liveness, NodeRecord, NodeTable, NodeVdev, TransitionCounts, Transitions, VdevList,
    VdevTable, ELP_TOPIC, VDEV_TOPIC,
};
use crate::inventory::{driver_stamps, scan, search_path, DriverStamps, Inventory};
use crate::kos_server::{inventory_path, KosListener, KosOptions};
use crate::peers::{zone_access, zone_offers, Peer, QueryAction, QueryPlanner};
use crate::query::Query;
use crate::query_server::{QueryServer, QueryService};
use crate::topic::{ReplicatedTopic, TopicOptions};
use grapevine_fs::service::{Zones, ZonesOptions};
use grapevine_kos::nodes::{unix_ms, ZoneStatus};

pub use crate::config::{Config, RepeaterConfig};
pub use grapevine_kos::nodes::{NodeEntry, NodesFile, NODES_FILE_VERSION};

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
    // Removed on drop when anything below fails.
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    file.write_all(contents)?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Locks `state_dir` for this process (released when the file is closed, even by a crash).
///
/// # Errors
///
/// Another gvd holds it, or the directory cannot be created.
fn lock_state_dir(state_dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(state_dir)
        .with_context(|| format!("cannot create the state directory {}", state_dir.display()))?;
    let path = state_dir.join("lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow::anyhow!(
            "another gvd is running on the state directory {} (give each gvd its own \
             --state-dir)",
            state_dir.display()
        )),
        Err(std::fs::TryLockError::Error(error)) => {
            Err(anyhow::Error::new(error).context(format!("cannot lock {}", path.display())))
        }
    }
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

/// Counters of a running daemon.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct DaemonStats {
    /// How the node list changed.
    pub transitions: TransitionCounts,
    /// QUERYs sent to peers.
    pub queries_sent: u64,
    /// QUERYs received and answered with a snapshot cycle.
    pub queries_answered: u64,
    /// Datagrams on the query port that were not valid QUERYs for this node (malformed,
    /// another node's, unsigned or forged on a keyed network).
    pub queries_rejected: u64,
    /// Valid QUERYs not answered: over their address's rate, or a cycle of that topic was
    /// asked for moments ago (it answers them too).
    pub queries_limited: u64,
    /// Inventory scans.
    pub rescans: u64,
}

/// A running gvd: announces this node, follows the others, keeps the node list file and
/// answers QUERYs. [`run`] drives it; tests and benches may drive several in one process.
pub struct Daemon {
    node: u64,
    config: Config,
    probe_exe: PathBuf,
    address: IpAddr,
    delay: Duration,
    directories: Vec<PathBuf>,
    elp: ReplicatedTopic<NodeTable>,
    vdevs: ReplicatedTopic<VdevTable>,
    query_socket: UdpSocket,
    query_port: u16,
    kos: KosListener,
    dht: Option<crate::dht::DhtDiscovery>,
    repeater: Option<(
        grapevine_repeater::Repeater,
        Option<crate::dht::DhtDiscovery>,
    )>,
    zones: Zones,
    announced_zones: Vec<(String, u64)>,
    inventory: Inventory,
    driver_files: DriverStamps,
    last_rescan: Instant,
    rescan_requested: Arc<AtomicBool>,
    next_announce: Instant,
    queries: QueryPlanner,
    query_key: Option<crate::query::QueryKey>,
    /// Answers the query port on its own thread.
    query_server: QueryServer,
    /// When the last round ran: the next is due a quarter period later.
    last_step: Instant,
    transitions: Transitions,
    written: Option<NodesFile>,
    /// What the admin endpoint shows, refreshed every round.
    admin_status: crate::admin::SharedStatus,
    /// The admin endpoint, when enabled and its address was free.
    admin: Option<crate::admin::AdminServer>,
    started: Instant,
    /// Datagrams sent as of the last sample, and when.
    last_sample: (Instant, u64),
    /// Each followed stream's recent marks, for its rate.
    stream_marks: HashMap<(&'static str, u32), std::collections::VecDeque<StreamMark>>,
    /// Held while this gvd runs: a second one on the same state directory would share its
    /// node id and both would flap in every list.
    _state_lock: std::fs::File,
    /// When the node list was last written.
    last_written: Instant,
    stats: DaemonStats,
}

impl Daemon {
    /// Sets up sockets and topics, inventories the drivers and announces this node.
    ///
    /// # Errors
    ///
    /// When the state directory, the interface or a socket cannot be set up.
    pub fn start(config: &Config, probe_exe: &Path) -> Result<Self> {
        let state_lock = lock_state_dir(&config.state_dir)?;
        let node = node_id(&config.state_dir)?;
        let iface: InterfaceSpec = config
            .iface
            .parse()
            .map_err(|e| anyhow::anyhow!("bad interface {:?}: {e}", config.iface))?;
        let address = resolve_interface(&iface, config.group.is_ipv6())?.addr;
        let delay = config.elp_delay();
        let elp_group = MulticastConfig::new(config.group).on(iface.clone());
        let vdev_group = MulticastConfig::new(config.vdev_group()).on(iface);
        // ELP: announced every period, and a cycle every period so that late joiners need no
        // query. VDEVs: published on change; peers ask for them with QUERY, so the cycle is
        // only a backstop.
        let query_socket = UdpSocket::bind(SocketAddr::new(address, config.query_port))
            .with_context(|| {
                format!("cannot bind the query port {address}:{}", config.query_port)
            })?;
        let query_port = query_socket.local_addr()?.port();
        let directories = search_path(&config.vdriver_path);
        for missing in directories.iter().filter(|d| !d.is_dir()) {
            tracing::warn!(directory = %missing.display(), "VDRIVER directory not found (vdriver_path)");
        }
        let inventory = scan(&directories, probe_exe);
        write_inventory(&config.state_dir, &inventory);
        let keyring = config
            .key_file
            .as_deref()
            .map(|path| grapevine_core::auth::Keyring::from_file(path).map(Arc::new))
            .transpose()
            .context("key_file")?;
        let port_key = keyring
            .as_deref()
            .map(crate::port_key)
            .transpose()
            .context("key_file")?;
        if keyring.is_none() {
            tracing::warn!(
                "no key_file: anyone who can reach this host can read and forge its \
                 announcements, call its VDEVs over KOS and read and write its zones over \
                 replication; set key_file (docs/SECURITY.md)"
            );
        }
        let kos = KosListener::start(KosOptions {
            address: SocketAddr::new(address, config.kos_port),
            max_agents: config.max_agents,
            max_agents_per_source: config.max_agents_per_source,
            key_file: config.key_file.clone(),
            port_key: port_key.clone(),
            call_timeout: config.call_timeout(),
            max_frame: config.max_frame,
            node_id: node,
            inventory_path: inventory_path(&config.state_dir),
            exe: probe_exe.to_path_buf(),
        })?;
        let kos_port = kos.address().port();
        let dht = if config.dht_bootstrap.is_empty() {
            None
        } else {
            Some(crate::dht::DhtDiscovery::start(crate::dht::DhtOptions {
                bootstrap: config.dht_bootstrap.clone(),
                bind: config.dht_bind,
                network: config.network.clone(),
                port: kos_port,
                interval: config.dht_interval(),
            })?)
        };
        let repeater = match &config.repeater {
            None => None,
            Some(settings) => {
                let iface: InterfaceSpec = settings.iface.parse().map_err(|e| {
                    anyhow::anyhow!("bad repeater interface {:?}: {e}", settings.iface)
                })?;
                let mut options = grapevine_repeater::RepeaterOptions::new(
                    MulticastConfig::new(settings.group).on(iface),
                    settings.listen,
                    settings.peers.clone(),
                );
                options.topics = (!settings.topics.is_empty()).then(|| settings.topics.clone());
                options.keyring = keyring.clone();
                options.wan = settings.wan;
                let repeater = grapevine_repeater::Repeater::start(options)
                    .context("cannot start the repeater")?;
                // Repeaters of the same network find each other on the DHT under their own
                // name.
                let finder = if config.dht_bootstrap.is_empty() {
                    None
                } else {
                    Some(crate::dht::DhtDiscovery::start(crate::dht::DhtOptions {
                        bootstrap: config.dht_bootstrap.clone(),
                        bind: config.dht_bind,
                        network: format!("{}#repeater", config.network),
                        port: repeater.listen_address().port(),
                        interval: config.dht_interval(),
                    })?)
                };
                tracing::info!(listen = %repeater.listen_address(), "repeater started");
                Some((repeater, finder))
            }
        };
        let zones = Zones::start(&ZonesOptions {
            node,
            node_name: config.name.clone(),
            zones: config.zones.clone(),
            meta_dir: config.state_dir.join("zones"),
            address,
            repl_port: config.repl_port,
            debounce: config.zone_debounce(),
            scan_interval: config.zone_scan_interval(),
            peer_timeout: Duration::from_secs(5),
            port_key: port_key.clone(),
        })?;
        // Nobody may pull until the node list says who the members are.
        zones.set_access(grapevine_fs::repl::Access::default());
        let ports = Ports {
            query: query_port,
            kos: kos_port,
            repl: zones.repl_port(),
        };
        let record = record(node, config, address, ports, zones.statuses(), &inventory);
        let elp = ReplicatedTopic::start(
            ELP_TOPIC,
            &elp_group,
            MapDelta::Put(node, record),
            node,
            &TopicOptions {
                heartbeat: delay * 2,
                cycle_pause: delay,
                inject_loss: config.inject_loss,
                keyring: keyring.clone(),
            },
        )?;
        let vdevs = ReplicatedTopic::start(
            VDEV_TOPIC,
            &vdev_group,
            MapDelta::Put(node, vdev_list(&inventory)),
            node,
            &TopicOptions {
                heartbeat: delay * 2,
                cycle_pause: delay * 10,
                inject_loss: config.inject_loss,
                keyring: keyring.clone(),
            },
        )?;
        let query_key = keyring.as_deref().and_then(crate::query::QueryKey::new);
        let query_socket_for_server = query_socket
            .try_clone()
            .context("cannot share the query port")?;
        let (elp_cycles, vdev_cycles) = (
            elp.snapshotter.cycle_requester(),
            vdevs.snapshotter.cycle_requester(),
        );
        let admin_status = crate::admin::SharedStatus::default();
        let admin = if config.admin {
            let token = if config.admin_address.ip().is_loopback() {
                None
            } else {
                keyring.as_deref().and_then(crate::admin::token)
            };
            match crate::admin::AdminServer::start(
                config.admin_address,
                admin_status.clone(),
                token,
            ) {
                Ok(server) => Some(server),
                Err(error) => {
                    // Not fatal: the daemon's job does not depend on its status page.
                    tracing::warn!(address = %config.admin_address, %error, "admin endpoint not started");
                    None
                }
            }
        } else {
            None
        };
        let now = Instant::now();
        let daemon = Self {
            node,
            config: config.clone(),
            probe_exe: probe_exe.to_path_buf(),
            address,
            delay,
            driver_files: driver_stamps(&directories),
            directories,
            elp,
            vdevs,
            query_socket,
            query_port,
            kos,
            dht,
            repeater,
            zones,
            announced_zones: Vec::new(),
            inventory,
            last_rescan: now,
            rescan_requested: Arc::new(AtomicBool::new(false)),
            next_announce: now + delay,
            queries: QueryPlanner::new(node, delay),
            query_key: query_key.clone(),
            query_server: QueryServer::start(
                query_socket_for_server,
                QueryService {
                    node,
                    key: query_key,
                    period: delay,
                    elp: elp_cycles,
                    vdevs: vdev_cycles,
                },
            )
            .context("cannot start the query port's thread")?,
            // The first round is due at once.
            last_step: now.checked_sub(delay).unwrap_or(now),
            transitions: Transitions::default(),
            written: None,
            admin_status: admin_status.clone(),
            admin,
            started: now,
            last_sample: (now, 0),
            stream_marks: HashMap::new(),
            _state_lock: state_lock,
            last_written: now,
            stats: DaemonStats::default(),
        };
        let zones: Vec<&str> = config.zones.iter().map(|z| z.name.as_str()).collect();
        tracing::info!(
            node = format!("{node:016x}"),
            name = %config.name,
            iface = %config.iface,
            address = %address,
            group = %config.group,
            vdev_group = %config.vdev_group(),
            query_port,
            kos = %daemon.kos.address(),
            repl_port = daemon.zones.repl_port(),
            zones = ?zones,
            drivers = daemon.inventory.drivers.len(),
            skipped_drivers = daemon.inventory.skipped.len(),
            keyed = keyring.is_some(),
            admin = %daemon
                .admin_address()
                .map_or_else(|| "off".to_string(), |a| format!("http://{a}/")),
            "gvd started"
        );
        Ok(daemon)
    }

    /// This node's id.
    pub fn node_id(&self) -> u64 {
        self.node
    }

    /// Set it (from a signal handler, say) to have the drivers rescanned at the next step.
    pub fn rescan_flag(&self) -> Arc<AtomicBool> {
        Arc::clone(&self.rescan_requested)
    }

    /// Counters.
    pub fn stats(&self) -> DaemonStats {
        let queries = self.query_server.counters();
        DaemonStats {
            queries_answered: queries.answered.load(Ordering::Relaxed),
            queries_rejected: queries.rejected.load(Ordering::Relaxed),
            queries_limited: queries.limited.load(Ordering::Relaxed),
            ..self.stats
        }
    }

    /// The node list as last computed.
    pub fn node_list(&self) -> Option<&NodesFile> {
        self.written.as_ref()
    }

    /// Bytes and datagrams this node has sent on its two topics (deltas, heartbeats and
    /// snapshots), for traffic figures.
    pub fn sent(&self) -> (u64, u64) {
        let mut datagrams = 0;
        let mut bytes = 0;
        for (publisher, snapshots) in [
            (self.elp.publisher.stats(), self.elp.snapshotter.stats()),
            (self.vdevs.publisher.stats(), self.vdevs.snapshotter.stats()),
        ] {
            datagrams += publisher.datagrams + snapshots.datagrams;
            bytes += publisher.bytes + snapshots.bytes;
        }
        (datagrams, bytes)
    }

    /// When [`step`](Self::step) is due next: the next announcement, or a quarter period
    /// after the last round (liveness, queries and the node file are refreshed that often).
    pub fn poll_timeout(&self) -> Instant {
        self.next_announce.min(self.last_step + self.delay / 4)
    }

    /// Whether something happened that a round should act on before `poll_timeout`: a zone
    /// changed here (announce its version now: that is what makes members pull), or a peer's
    /// announcement arrived (a newer zone version there is pulled now, not a quarter period
    /// later). Cheap enough to ask every few milliseconds; a peer's announcements wake a
    /// round at most every [`NEWS_SPACING`].
    pub fn has_news(&self, now: Instant) -> bool {
        self.zones.versions() != self.announced_zones
            || (!self.elp.subscriber.events().is_empty()
                && now.saturating_duration_since(self.last_step) >= NEWS_SPACING)
    }

    /// One round, without blocking: rescan if due, announce if due, refresh the node list,
    /// ask peers for what is missing, and rewrite the file if it changed. (QUERYs are
    /// answered on their own thread meanwhile.)
    ///
    /// # Errors
    ///
    /// When publishing fails (the publisher was shut down).
    pub fn step(&mut self, now: Instant) -> Result<()> {
        self.last_step = now;
        self.rescan_if_due(now)?;
        // A zone that changed is announced at once: its version is what makes members pull.
        let zone_versions = self.zones.versions();
        if zone_versions != self.announced_zones {
            self.announced_zones = zone_versions;
            self.next_announce = now;
        }
        if now >= self.next_announce {
            self.elp
                .publisher
                .publish(MapDelta::Put(self.node, self.record()))?;
            self.next_announce = now + self.delay;
        }
        // Reaps agents that ended, so none lingers as a zombie.
        self.kos.agents();
        let now = Instant::now();
        self.elp.drain_events();
        self.vdevs.drain_events();
        let peers = self.peers(now);
        let joined_before = self.transitions.counts().joined;
        self.transitions.update(
            &peers
                .iter()
                .map(|(node, peer)| (*node, peer.liveness))
                .collect(),
        );
        self.stats.transitions = self.transitions.counts();
        if self.stats.transitions.joined > joined_before {
            // A newcomer knows nobody yet and cannot ask. It gets this node's leaves now, in
            // one multicast answer that serves every other newcomer too: a delta (which gives
            // its subscriber the current seq: snapshots before that are not trusted), then a
            // cycle read after it. Cycles are rate-bounded, so a crowd of joins costs little.
            self.elp
                .publisher
                .publish(MapDelta::Put(self.node, self.record()))?;
            self.next_announce = now + self.delay;
            self.publish_vdevs()?;
            self.elp.publisher.flush();
            self.vdevs.publisher.flush();
            self.elp.snapshotter.request_cycle();
            self.vdevs.snapshotter.request_cycle();
        }
        self.ask_for_missing(&peers, now);
        self.offer_zones(&peers);
        if let (Some((repeater, Some(finder))), Some(settings)) =
            (&self.repeater, &self.config.repeater)
        {
            let mut wanted: Vec<SocketAddr> = settings.peers.clone();
            wanted.extend(finder.peers());
            wanted.sort();
            wanted.dedup();
            if repeater.peers() != wanted {
                tracing::info!(peers = wanted.len(), "repeater peers");
                repeater.set_peers(wanted);
            }
        }
        let file = NodesFile {
            version: NODES_FILE_VERSION,
            local_node: self.node,
            nodes: peers
                .into_values()
                .filter(|p| p.liveness != Liveness::Dead)
                .map(|p| NodeEntry {
                    vdevs_current: p
                        .vdevs
                        .as_ref()
                        .is_some_and(|v| v.unique == p.record.unique),
                    vdevs: p.vdevs.map(|v| v.vdevs).unwrap_or_default(),
                    record: p.record,
                    liveness: p.liveness,
                })
                .collect(),
            remote_peers: self
                .dht
                .as_ref()
                .map(|d| d.peers().iter().map(ToString::to_string).collect())
                .unwrap_or_default(),
            groups: self.groups(),
            zone_activity: self.zones.activity(),
            pid: std::process::id(),
            written_at_ms: 0,
            period_ms: self.config.elp_delay_ms,
        };
        // Rewritten when it changed, and at least once a period so readers can tell a running
        // gvd from a stopped one by `written_at_ms`.
        if self.written.as_ref() != Some(&file) || now >= self.last_written + self.delay {
            let mut stamped = file.clone();
            stamped.written_at_ms = unix_ms();
            let json = serde_json::to_vec_pretty(&stamped)?;
            let path = self.config.nodes_path();
            match write_atomically(&path, &json) {
                Ok(()) => {
                    self.written = Some(file);
                    self.last_written = now;
                }
                Err(error) => {
                    // Kept for the next round: a full disk is retried, not fatal.
                    tracing::error!(%error, path = %path.display(), "cannot write the node list");
                }
            }
        }
        self.refresh_admin(now);
        Ok(())
    }

    /// The multicast groups this node uses, for the node list.
    fn groups(&self) -> Vec<grapevine_gvd_schema::nodes::GroupEntry> {
        use grapevine_gvd_schema::nodes::GroupEntry;
        let entry = |name: &str, group: SocketAddr, iface: &str| GroupEntry {
            name: name.into(),
            group,
            iface: iface.into(),
        };
        let mut groups = vec![
            entry("elp", self.config.group, &self.config.iface),
            entry("vdev", self.config.vdev_group(), &self.config.iface),
        ];
        if let Some(repeater) = &self.config.repeater {
            groups.push(entry("relayed", repeater.group, &repeater.iface));
        }
        groups
    }

    /// Where the admin endpoint listens, when it runs.
    pub fn admin_address(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(crate::admin::AdminServer::address)
    }

    /// Publishes this round's status for the admin endpoint.
    fn refresh_admin(&mut self, now: Instant) {
        // Once per quarter period, whatever woke the round: the charts' samples stay evenly
        // spaced.
        if self.admin.is_none()
            || now.saturating_duration_since(self.last_sample.0) < self.delay / 4
        {
            return;
        }
        let (sent, _) = self.sent();
        let elapsed = now
            .saturating_duration_since(self.last_sample.0)
            .as_secs_f64();
        let sent_per_second = if elapsed > 0.0 {
            sent.saturating_sub(self.last_sample.1) as f64 / elapsed
        } else {
            0.0
        };
        self.last_sample = (now, sent);
        let nodes = self.written.clone();
        let own = self.zones.statuses();
        let newest = |zone: &str| {
            nodes
                .iter()
                .flat_map(|f| f.nodes.iter())
                .flat_map(|n| n.record.zones.iter())
                .filter(|z| z.member && z.name == zone)
                .map(|z| z.version)
                .max()
                .unwrap_or(0)
        };
        let zone_lag = own
            .iter()
            .filter(|z| z.member)
            .map(|z| newest(&z.name).saturating_sub(z.version))
            .sum();
        let alive = nodes.as_ref().map_or(0, |f| {
            f.nodes
                .iter()
                .filter(|n| n.liveness == Liveness::Alive)
                .count()
        });
        let mut streams = Vec::new();
        let mut topics = crate::admin::TopicCounters::default();
        for (subscriber_stats, rows) in [
            (
                self.elp.subscriber.stats().protocol,
                self.elp.subscriber.read(|s| stream_rows("elp", s)),
            ),
            (
                self.vdevs.subscriber.stats().protocol,
                self.vdevs.subscriber.read(|s| stream_rows("vdev", s)),
            ),
        ] {
            topics.gaps += subscriber_stats.gaps;
            topics.lost += subscriber_stats.messages_lost;
            topics.recoveries += subscriber_stats.recoveries;
            topics.datagrams += subscriber_stats.datagrams;
            streams.extend(rows);
        }
        // Messages per second over the last few seconds (rounds are a quarter period: one
        // round's count would swing between 0 and 4 per period); a new session starts over.
        let mut marks = HashMap::with_capacity(streams.len());
        for row in &mut streams {
            let key = (row.topic, row.publisher);
            let mut history = self.stream_marks.remove(&key).unwrap_or_default();
            history.retain(|&(at, session, _)| {
                session == row.session && now.saturating_duration_since(at) <= RATE_WINDOW
            });
            if let Some(&(at, _, seq)) = history.front() {
                let seconds = now.saturating_duration_since(at).as_secs_f64();
                if seconds > 0.0 {
                    row.messages_per_second = row.last_seq.saturating_sub(seq) as f64 / seconds;
                }
            }
            history.push_back((now, row.session, row.last_seq));
            marks.insert(key, history);
        }
        self.stream_marks = marks;
        let messages_per_second = streams.iter().map(|r| r.messages_per_second).sum();
        let stats = self.stats();
        let mut status = self.admin_status.lock();
        status.node = format!("{:016x}", self.node);
        status.name = self.config.name.clone();
        status.uptime_seconds = now.saturating_duration_since(self.started).as_secs_f64();
        status.nodes = nodes;
        status.zones = own;
        status.streams = streams;
        status.topics = topics;
        status.stats = stats;
        status.repeater =
            self.repeater
                .as_ref()
                .map(|(repeater, _)| crate::admin::RepeaterStatus {
                    stats: repeater.stats(),
                    links: repeater.links(),
                });
        let uptime = status.uptime_seconds;
        crate::admin::record_sample(
            &mut status,
            crate::admin::Sample {
                t: uptime,
                sent_per_second,
                messages_per_second,
                alive,
                zone_lag,
            },
        );
    }

    /// Says goodbye (so that peers drop this node now rather than after the TTL) and stops.
    pub fn shutdown(self) {
        tracing::info!(node = format!("{:016x}", self.node), "gvd stopping");
        // A goodbye is a courtesy: peers drop this node after the TTL anyway.
        let _ = self.elp.publisher.publish(MapDelta::Remove(self.node));
        self.elp.publisher.flush();
        self.elp.shutdown();
        self.vdevs.shutdown();
        self.kos.shutdown();
        self.zones.shutdown();
        tracing::info!("gvd stopped");
    }

    /// The KOS listener (its address, agents and counters).
    pub fn kos(&self) -> &KosListener {
        &self.kos
    }

    fn rescan_if_due(&mut self, now: Instant) -> Result<()> {
        // Driver files appearing, disappearing or replaced in place, or SIGHUP, rescan at once
        // (a stat per file and period: `notify` would add a thread and a dependency for no
        // gain at this rate); VDEVs that change inside a driver are picked up by the periodic
        // rescan.
        let files = driver_stamps(&self.directories);
        let asked = self.rescan_requested.swap(false, Ordering::Relaxed);
        let interval = self.config.rescan_interval();
        if !asked && files == self.driver_files && now < self.last_rescan + interval {
            return Ok(());
        }
        self.driver_files = files;
        self.last_rescan = now;
        self.stats.rescans += 1;
        let fresh = scan(&self.directories, &self.probe_exe);
        write_inventory(&self.config.state_dir, &fresh);
        if fresh.unique != self.inventory.unique {
            tracing::info!(unique = %fresh.unique, "VDEVs changed");
            self.inventory = fresh;
            self.publish_vdevs()?;
            // Announce the new `unique` now: it is what tells peers to refresh.
            self.next_announce = now;
        } else {
            self.inventory = fresh;
        }
        Ok(())
    }

    fn publish_vdevs(&self) -> Result<()> {
        let list = vdev_list(&self.inventory);
        self.vdevs
            .publisher
            .publish(MapDelta::Put(self.node, list))?;
        Ok(())
    }

    fn record(&self) -> NodeRecord {
        let ports = Ports {
            query: self.query_port,
            kos: self.kos.address().port(),
            repl: self.zones.repl_port(),
        };
        record(
            self.node,
            &self.config,
            self.address,
            ports,
            self.zones.statuses(),
            &self.inventory,
        )
    }

    /// Tells the zones which versions live members announce, who their members are, and who
    /// may pull here.
    fn offer_zones(&self, peers: &BTreeMap<u64, Peer>) {
        let (offers, members) = zone_offers(self.node, peers, self.zones.forwarded());
        for offer in offers {
            self.zones
                .offer(&offer.zone, offer.node, offer.address, offer.version);
        }
        for (zone, members) in members {
            self.zones.set_members(&zone, members);
        }
        self.zones
            .set_access(zone_access(self.node, &self.config.zones, peers));
    }

    /// Sends the QUERYs the planner finds due.
    fn ask_for_missing(&mut self, peers: &BTreeMap<u64, Peer>, now: Instant) {
        for action in self.queries.due(peers, now) {
            match action {
                QueryAction::LocalCycle { topic: ELP_TOPIC } => {
                    self.elp.snapshotter.request_cycle()
                }
                QueryAction::LocalCycle { .. } => self.vdevs.snapshotter.request_cycle(),
                QueryAction::Send {
                    topic,
                    node,
                    target,
                } => {
                    let query = Query {
                        topic,
                        to: node,
                        from: self.node,
                    };
                    let sent = match &self.query_key {
                        Some(key) => self.query_socket.send_to(
                            &query.encode_signed(key, std::time::SystemTime::now()),
                            target,
                        ),
                        None => self.query_socket.send_to(&query.encode(), target),
                    };
                    match sent {
                        Ok(_) => self.stats.queries_sent += 1,
                        Err(error) => tracing::debug!(%error, %target, "QUERY not sent"),
                    }
                }
            }
        }
    }

    /// Every node with a record on the ELP topic, with its liveness and VDEVs.
    fn peers(&self, now: Instant) -> BTreeMap<u64, Peer> {
        let ttl = self.config.node_ttl;
        let mut peers: BTreeMap<u64, Peer> = self.elp.subscriber.read(|session| {
            session
                .streams()
                .flat_map(|stream| {
                    let silent = now.saturating_duration_since(stream.last_heard);
                    let elp_live = stream.status == StreamStatus::Live;
                    stream
                        .state
                        .leaves()
                        .map(|(node, record)| {
                            let period = Duration::from_millis(record.elp_delay_ms.max(1));
                            let peer = Peer {
                                record: record.clone(),
                                liveness: liveness(silent, period, ttl),
                                elp_live,
                                vdevs: None,
                                vdevs_live: false,
                            };
                            (*node, peer)
                        })
                        .collect::<Vec<_>>()
                })
                .collect()
        });
        self.vdevs.subscriber.read(|session| {
            for stream in session.streams() {
                for (node, list) in stream.state.leaves() {
                    if let Some(peer) = peers.get_mut(node) {
                        peer.vdevs = Some(list.clone());
                        peer.vdevs_live = stream.status == StreamStatus::Live;
                    }
                }
            }
        });
        peers
    }
}

/// Least time between two rounds woken by peers' announcements.
pub const NEWS_SPACING: Duration = Duration::from_millis(20);

/// Where a followed stream stood at a round: (when, session, last `seq`).
type StreamMark = (Instant, u64, u64);

/// The window of the admin page's stream rates.
const RATE_WINDOW: Duration = Duration::from_secs(5);

/// The admin page's rows for the streams of one topic.
fn stream_rows<S: ReplicatedState>(
    topic: &'static str,
    session: &grapevine_core::proto::SubscriberSession<S>,
) -> Vec<crate::admin::StreamRow> {
    session
        .streams()
        .map(|v| crate::admin::StreamRow {
            topic,
            publisher: v.publisher,
            session: v.session,
            status: format!("{:?}", v.status).to_lowercase(),
            silent: v.silent,
            last_seq: v.last_seq,
            messages_per_second: 0.0,
            stale: v.stale.len(),
            gaps: v.counters.gaps,
            lost: v.counters.messages_lost,
            recoveries: v.counters.recoveries,
        })
        .collect()
}

/// The ports a node announces.
struct Ports {
    query: u16,
    kos: u16,
    repl: u16,
}

fn record(
    node: u64,
    config: &Config,
    address: IpAddr,
    ports: Ports,
    zones: Vec<ZoneStatus>,
    inventory: &Inventory,
) -> NodeRecord {
    NodeRecord {
        node_id: node,
        name: config.name.clone(),
        addresses: vec![address.to_string()],
        query_port: ports.query,
        kos_port: ports.kos,
        repl_port: ports.repl,
        zones,
        unique: inventory.unique.clone(),
        elp_delay_ms: config.elp_delay_ms,
    }
}

/// Agents read the inventory from this file to find the driver of a VDEV; a failed write
/// leaves them the previous one.
fn write_inventory(state_dir: &Path, inventory: &Inventory) {
    let path = inventory_path(state_dir);
    let written = serde_json::to_vec(inventory)
        .map_err(std::io::Error::other)
        .and_then(|json| write_atomically(&path, &json));
    if let Err(error) = written {
        tracing::error!(%error, path = %path.display(), "cannot write the inventory for agents");
    }
}

fn vdev_list(inventory: &Inventory) -> VdevList {
    VdevList {
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
    }
}

/// Runs the daemon until `stop` is set; `rescan` set (by SIGHUP) rescans the drivers.
///
/// # Errors
///
/// When sockets or the state directory cannot be set up.
pub fn run(
    config: &Config,
    probe_exe: &Path,
    stop: &Arc<AtomicBool>,
    rescan: &Arc<AtomicBool>,
) -> Result<()> {
    let mut daemon = Daemon::start(config, probe_exe)?;
    // systemd (Type=notify, contrib/gvd.service): ready once announcing; a no-op elsewhere.
    if let Err(error) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::debug!(%error, "readiness not notified");
    }
    // Signals, zone changes and peers' announcements are noticed within this.
    const CHECK: Duration = Duration::from_millis(10);
    while !stop.load(Ordering::Relaxed) {
        if rescan.swap(false, Ordering::Relaxed) {
            tracing::info!("rescanning the drivers (SIGHUP)");
            daemon.rescan_flag().store(true, Ordering::Relaxed);
        }
        let now = Instant::now();
        if now >= daemon.poll_timeout() || daemon.has_news(now) {
            daemon.step(now)?;
        }
        let wait = daemon
            .poll_timeout()
            .saturating_duration_since(Instant::now());
        std::thread::sleep(wait.min(CHECK));
    }
    if let Err(error) = sd_notify::notify(&[sd_notify::NotifyState::Stopping]) {
        tracing::debug!(%error, "stopping not notified");
    }
    daemon.shutdown();
    Ok(())
}
