//! The zones a node holds, running: their stores, NFS servers, change checks and pulls.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender};
use grapevine_gvd_schema::nodes::{ZoneActivity, ZoneStall, ZoneStatus};
use nfsserve::tcp::{NFSTcp, NFSTcpListener};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::nfs::ZoneFs;
use crate::remote::{Member, ProxyFs};
use grapevine_gvd_schema::secure::PortKey;

use crate::repl::{pull, ReplServer, ServedZone, ZoneMap};
use crate::store::ZoneStore;

/// A zone as configured (gvd's `[[zones]]`).
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    /// Its name (also the NFS export name).
    pub name: String,
    /// Most bytes it may hold.
    pub quota_bytes: u64,
    /// The member nodes, by name.
    pub members: Vec<String>,
    /// The local directory holding it on this node (a ZFS dataset's mount point in
    /// production; any directory works).
    pub path: PathBuf,
    /// This node's NFS port for it; 0 picks a free one (announced in the ELP).
    #[serde(default)]
    pub nfs_port: u16,
    /// Addresses allowed to mount it over the network besides this host (`10.1.2.3`,
    /// `10.1.0.0/16`), like an NFS server's export list. Default none: the zone is served on
    /// loopback only.
    #[serde(default)]
    pub nfs_clients: Vec<ipnet::IpNet>,
    /// Serve it read-only over NFS (replication still brings peers' changes). Default false.
    #[serde(default)]
    pub read_only: bool,
}

/// Settings of [`Zones`].
#[derive(Clone, Debug)]
pub struct ZonesOptions {
    /// This node's id.
    pub node: u64,
    /// This node's name (membership is by name).
    pub node_name: String,
    /// Every zone configured; those naming this node as a member are served.
    pub zones: Vec<ZoneConfig>,
    /// Where indexes and incoming files go (`<state_dir>/zones`).
    pub meta_dir: PathBuf,
    /// The address to serve NFS and replication on.
    pub address: IpAddr,
    /// The replication port; 0 picks a free one.
    pub repl_port: u16,
    /// How long a file must be quiet after an NFS write before it counts as changed (NFSv3
    /// has no close).
    pub debounce: Duration,
    /// How often the zone directories are scanned for changes made outside NFS.
    pub scan_interval: Duration,
    /// How long a peer may take to answer before a pull gives up on it.
    pub peer_timeout: Duration,
    /// The key peers prove on the replication port (from the network key); none: the port
    /// serves anyone who reaches it.
    pub port_key: Option<PortKey>,
}

/// A pull to make: from `peer_node` at `address`, which announced `version`.
#[derive(Clone, Debug)]
struct Offer {
    peer_node: u64,
    address: SocketAddr,
    version: u64,
}

struct Zone {
    config: ZoneConfig,
    store: Arc<Mutex<ZoneStore>>,
    nfs_port: u16,
    offers: Sender<Offer>,
    pulls: Arc<Mutex<PullBook>>,
}

/// A zone's pulls: which are wanted, and how the finished ones went.
#[derive(Default)]
struct PullBook {
    /// Peer → the version wanted from it, while its pull is queued or running.
    wanted: HashMap<u64, u64>,
    done: u64,
    failed: u64,
    /// Peers whose last pull failed.
    stalls: HashMap<u64, ZoneStall>,
}

impl PullBook {
    fn finished(&mut self, peer: u64, outcome: Result<(), String>) {
        self.wanted.remove(&peer);
        match outcome {
            Ok(()) => {
                self.done += 1;
                self.stalls.remove(&peer);
            }
            Err(cause) => {
                self.failed += 1;
                let stall = self.stalls.entry(peer).or_insert_with(|| ZoneStall {
                    peer: format!("{peer:016x}"),
                    since_ms: grapevine_gvd_schema::nodes::unix_ms(),
                    ..ZoneStall::default()
                });
                stall.cause = cause;
                stall.failures += 1;
            }
        }
    }
}

/// A zone this node does not hold but serves, by forwarding to a member.
struct Proxy {
    config: ZoneConfig,
    nfs_port: u16,
    members: Arc<Mutex<Vec<Member>>>,
}

/// The zones this node holds, and those it serves for others.
pub struct Zones {
    zones: Vec<Zone>,
    proxies: Vec<Proxy>,
    repl: Option<ReplServer>,
    runtime: tokio::runtime::Runtime,
    stop: Arc<std::sync::atomic::AtomicBool>,
}

/// Why the zones could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ZonesError {
    /// A zone's store.
    #[error("zone {zone}: {error}")]
    Store {
        /// The zone.
        zone: String,
        /// What failed.
        error: crate::store::StoreError,
    },
    /// Sockets or threads.
    #[error("{what}: {error}")]
    Io {
        /// What was being set up.
        what: String,
        /// What failed.
        error: std::io::Error,
    },
}

/// Free bytes of the file system holding `path`.
// The statvfs field types differ between platforms (u64 on 64-bit Linux).
#[allow(clippy::useless_conversion)]
pub fn free_bytes(path: &Path) -> u64 {
    nix::sys::statvfs::statvfs(path).map_or(0, |s| {
        u64::from(s.blocks_available()).saturating_mul(u64::from(s.fragment_size()))
    })
}

/// Starts an NFS server for `fs`, exported as `/<zone>`; returns its port.
///
/// The server itself listens on loopback only. When the zone lists `nfs_clients` and this node
/// serves on another address, a relay on that address (same port) passes on connections from
/// listed addresses and closes the others at once; loopback clients connect directly.
fn serve_nfs<F>(
    runtime: &tokio::runtime::Runtime,
    address: IpAddr,
    config: &ZoneConfig,
    fs: F,
) -> std::io::Result<u16>
where
    F: nfsserve::vfs::NFSFileSystem + Send + Sync + 'static,
{
    let loopback: IpAddr = if address.is_ipv6() {
        std::net::Ipv6Addr::LOCALHOST.into()
    } else {
        std::net::Ipv4Addr::LOCALHOST.into()
    };
    let local = if address.is_loopback() {
        address
    } else {
        loopback
    };
    runtime.block_on(async {
        let bind = SocketAddr::new(local, config.nfs_port).to_string();
        let mut listener = NFSTcpListener::bind(&bind, fs).await?;
        listener.with_export_name(&config.name);
        let port = listener.get_listen_port();
        tokio::spawn(async move {
            if let Err(error) = listener.handle_forever().await {
                tracing::error!(%error, "NFS server stopped");
            }
        });
        if !address.is_loopback() {
            if config.nfs_clients.is_empty() {
                tracing::info!(
                    zone = config.name,
                    port,
                    "NFS on loopback only (no nfs_clients listed)"
                );
            } else {
                let relay = tokio::net::TcpListener::bind(SocketAddr::new(address, port)).await?;
                let allowed = config.nfs_clients.clone();
                let zone = config.name.clone();
                let target = SocketAddr::new(local, port);
                tokio::spawn(relay_allowed(relay, allowed, target, zone));
            }
        }
        Ok(port)
    })
}

/// Passes connections from allowed addresses on to the NFS server at `target`.
async fn relay_allowed(
    relay: tokio::net::TcpListener,
    allowed: Vec<ipnet::IpNet>,
    target: SocketAddr,
    zone: String,
) {
    loop {
        let (mut client, peer) = match relay.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(zone, %error, "NFS accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if !allowed.iter().any(|net| net.contains(&peer.ip())) {
            tracing::warn!(zone, %peer, "NFS client not in nfs_clients: refused");
            continue;
        }
        // Latency only: the connection works without it.
        let _ = client.set_nodelay(true);
        tokio::spawn(async move {
            if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                // Latency only: the connection works without it.
                let _ = server.set_nodelay(true);
                // Ends when either side closes; an error ends only this proxied connection.
                let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
            }
        });
    }
}

/// A tag for a zone's NFS file handles: stable across restarts, distinct between zones.
fn zone_tag(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |hash, byte| {
        (hash ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3)
    })
}

impl Zones {
    /// Opens and serves every zone this node is a member of, and serves the other configured
    /// zones by forwarding to their members.
    ///
    /// # Errors
    ///
    /// [`ZonesError`] when a store, a server or a thread cannot start.
    pub fn start(settings: &ZonesOptions) -> Result<Self, ZonesError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |error| ZonesError::Io { what, error }
        };
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("gvfs-nfs")
            .enable_all()
            .build()
            .map_err(io("NFS runtime"))?;
        let mut zones = Vec::new();
        let mut stores = HashMap::new();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        for config in settings
            .zones
            .iter()
            .filter(|z| z.members.contains(&settings.node_name))
        {
            let store = ZoneStore::open(
                settings.node,
                &config.path,
                &settings.meta_dir.join(&config.name),
            )
            .map_err(|error| ZonesError::Store {
                zone: config.name.clone(),
                error,
            })?;
            let free = free_bytes(&config.path);
            if free < config.quota_bytes {
                tracing::warn!(
                    zone = config.name,
                    quota = config.quota_bytes,
                    free,
                    "the zone's quota is larger than the free space under its directory (over-committed)"
                );
            }
            let store = Arc::new(Mutex::new(store));
            let fs = ZoneFs::new(
                Arc::clone(&store),
                config.quota_bytes,
                zone_tag(&config.name),
            )
            .read_only(config.read_only);
            let nfs_port =
                serve_nfs(&runtime, settings.address, config, fs).map_err(io(&format!(
                    "NFS server for zone {} on port {}",
                    config.name, config.nfs_port
                )))?;
            tracing::info!(zone = config.name, nfs_port, path = %config.path.display(), "zone served");
            let (offers, queue) = crossbeam_channel::unbounded();
            let pulls = Arc::new(Mutex::new(PullBook::default()));
            spawn_worker(
                config.name.clone(),
                Arc::clone(&store),
                (queue, Arc::clone(&pulls)),
                settings.clone(),
                Arc::clone(&stop),
            )
            .map_err(io("zone worker"))?;
            stores.insert(
                config.name.clone(),
                ServedZone {
                    store: Arc::clone(&store),
                    fs: ZoneFs::new(
                        Arc::clone(&store),
                        config.quota_bytes,
                        zone_tag(&config.name),
                    )
                    .read_only(config.read_only),
                },
            );
            zones.push(Zone {
                config: config.clone(),
                store,
                nfs_port,
                offers,
                pulls,
            });
        }
        let mut proxies = Vec::new();
        for config in settings
            .zones
            .iter()
            .filter(|z| !z.members.contains(&settings.node_name))
        {
            let members = Arc::new(Mutex::new(Vec::new()));
            let fs = ProxyFs::new(
                &config.name,
                zone_tag(&config.name),
                Arc::clone(&members),
                settings.peer_timeout,
                settings.port_key.clone(),
            );
            let nfs_port =
                serve_nfs(&runtime, settings.address, config, fs).map_err(io(&format!(
                    "NFS server for zone {} on port {}",
                    config.name, config.nfs_port
                )))?;
            tracing::info!(
                zone = config.name,
                nfs_port,
                "zone served for its members (this node does not hold it)"
            );
            proxies.push(Proxy {
                config: config.clone(),
                nfs_port,
                members,
            });
        }
        // Only members serve replication (and forwarded operations): a node holding no zone
        // opens no port.
        let repl = if stores.is_empty() {
            None
        } else {
            let map: ZoneMap = Arc::new(stores);
            Some(
                ReplServer::start(
                    SocketAddr::new(settings.address, settings.repl_port),
                    map,
                    runtime.handle().clone(),
                    settings.port_key.clone(),
                )
                .map_err(io("replication server"))?,
            )
        };
        Ok(Self {
            zones,
            proxies,
            repl,
            runtime,
            stop,
        })
    }

    /// The replication port; 0 when this node holds no zone.
    pub fn repl_port(&self) -> u16 {
        self.repl.as_ref().map_or(0, |r| r.address().port())
    }

    /// The version of each zone this node holds (cheap: no usage or free-space figures).
    pub fn versions(&self) -> Vec<(String, u64)> {
        self.zones
            .iter()
            .map(|zone| (zone.config.name.clone(), zone.store.lock().version()))
            .collect()
    }

    /// The zones this node serves by forwarding to a member.
    pub fn forwarded(&self) -> impl Iterator<Item = &str> {
        self.proxies.iter().map(|p| p.config.name.as_str())
    }

    /// What this node announces about its zones.
    pub fn statuses(&self) -> Vec<ZoneStatus> {
        self.zones
            .iter()
            .map(|zone| {
                let store = zone.store.lock();
                ZoneStatus {
                    name: zone.config.name.clone(),
                    member: true,
                    quota_bytes: zone.config.quota_bytes,
                    members: zone.config.members.clone(),
                    version: store.version(),
                    used_bytes: store.used_bytes(),
                    free_bytes: free_bytes(store.root()),
                    nfs_port: zone.nfs_port,
                    conflicts: store.conflicts(),
                }
            })
            .chain(self.proxies.iter().map(|proxy| ZoneStatus {
                name: proxy.config.name.clone(),
                member: false,
                quota_bytes: proxy.config.quota_bytes,
                members: proxy.config.members.clone(),
                version: 0,
                used_bytes: 0,
                free_bytes: 0,
                nfs_port: proxy.nfs_port,
                conflicts: 0,
            }))
            .collect()
    }

    /// What each zone this node holds is doing: pulls, stalls, writes not settled yet.
    pub fn activity(&self) -> Vec<ZoneActivity> {
        self.zones
            .iter()
            .map(|zone| {
                let (unsettled_writes, skipped_links) = {
                    let store = zone.store.lock();
                    (
                        store.unsettled_writes() as u64,
                        store.skipped_links() as u64,
                    )
                };
                let pulls = zone.pulls.lock();
                let mut stalls: Vec<ZoneStall> = pulls.stalls.values().cloned().collect();
                stalls.sort_by(|a, b| a.peer.cmp(&b.peer));
                ZoneActivity {
                    name: zone.config.name.clone(),
                    pulls_pending: pulls.wanted.len() as u64,
                    pulls_done: pulls.done,
                    pulls_failed: pulls.failed,
                    stalls,
                    unsettled_writes,
                    skipped_links,
                }
            })
            .collect()
    }

    /// Who may pull which zone from this node, and forward operations to it (by address, from
    /// the node list); until called, the replication port serves anyone who completes its
    /// handshake.
    pub fn set_access(&self, access: crate::repl::Access) {
        if let Some(repl) = &self.repl {
            repl.set_access(access);
        }
    }

    /// The members currently reachable for a zone this node serves without holding it.
    pub fn set_members(&self, zone: &str, members: Vec<Member>) {
        if let Some(proxy) = self.proxies.iter().find(|p| p.config.name == zone) {
            *proxy.members.lock() = members;
        }
    }

    /// A peer announced `version` of `zone`: pull from it if that is newer than what was
    /// pulled from it so far (and no pull of it is already queued).
    pub fn offer(&self, zone: &str, peer_node: u64, address: SocketAddr, version: u64) {
        let Some(zone) = self.zones.iter().find(|z| z.config.name == zone) else {
            return;
        };
        if version <= zone.store.lock().seen(peer_node) {
            return;
        }
        let mut pulls = zone.pulls.lock();
        if pulls.wanted.get(&peer_node).is_some_and(|v| *v >= version) {
            return;
        }
        pulls.wanted.insert(peer_node, version);
        // A zone whose puller ended takes no offers; it is shutting down.
        let _ = zone.offers.send(Offer {
            peer_node,
            address,
            version,
        });
    }

    /// Stops serving.
    pub fn shutdown(self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        drop(self.repl);
        self.runtime.shutdown_timeout(Duration::from_millis(500));
    }
}

/// The zone's background work: settle debounced writes, scan now and then, and pull.
fn spawn_worker(
    zone: String,
    store: Arc<Mutex<ZoneStore>>,
    (offers, pulls): (Receiver<Offer>, Arc<Mutex<PullBook>>),
    settings: ZonesOptions,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name(format!("gvfs-{zone}"))
        .spawn(move || {
            let tick = (settings.debounce / 4).max(Duration::from_millis(10));
            let mut last_scan = Instant::now();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok(offer) = offers.recv_timeout(tick) {
                    // Newest offer per peer only.
                    let mut latest: HashMap<u64, Offer> = HashMap::new();
                    for offer in std::iter::once(offer).chain(offers.try_iter()) {
                        latest.insert(offer.peer_node, offer);
                    }
                    // From several members at once: one thread per peer (at most one pull per
                    // peer runs, see `offer`).
                    for offer in latest.into_values() {
                        let job = (Arc::clone(&store), zone.clone(), Arc::clone(&pulls));
                        let timeout = settings.peer_timeout;
                        let key = settings.port_key.clone();
                        let spawned = std::thread::Builder::new()
                            .name(format!("gvfs-pull-{zone}"))
                            .spawn(move || {
                                let (store, zone, pulls) = job;
                                let result = match pull(&store, &zone, (offer.address, offer.peer_node), timeout, key.as_ref()) {
                                    Ok(outcome) => {
                                        tracing::debug!(zone, peer = %offer.address, ?outcome, wanted = offer.version, "pull done");
                                        Ok(())
                                    }
                                    Err(error) => {
                                        tracing::warn!(zone, %error, "pull failed; retried at the next announcement");
                                        Err(error.to_string())
                                    }
                                };
                                // Offers of this peer are taken again (a failed pull is retried).
                                pulls.lock().finished(offer.peer_node, result);
                            });
                        if let Err(error) = spawned {
                            tracing::error!(zone, %error, "cannot start a pull");
                            pulls
                                .lock()
                                .finished(offer.peer_node, Err(format!("cannot start a pull: {error}")));
                        }
                    }
                }
                let now = Instant::now();
                if let Err(error) = store.lock().settle(now, settings.debounce) {
                    tracing::error!(zone, %error, "cannot record changes");
                }
                if now.duration_since(last_scan) >= settings.scan_interval {
                    last_scan = now;
                    if let Err(error) = store.lock().scan() {
                        tracing::error!(zone, %error, "cannot scan the zone directory");
                    }
                }
            }
        })
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_pull_is_a_stall_until_a_pull_from_that_peer_succeeds() {
        let mut book = PullBook::default();
        book.wanted.insert(7, 3);
        book.wanted.insert(9, 1);
        book.finished(7, Err("peer 127.0.0.1:1: timed out".into()));
        book.wanted.insert(7, 4);
        book.finished(7, Err("peer 127.0.0.1:1: refused".into()));
        assert_eq!((book.done, book.failed), (0, 2));
        let stall = &book.stalls[&7];
        assert_eq!(stall.peer, "0000000000000007");
        assert_eq!(stall.failures, 2);
        assert_eq!(stall.cause, "peer 127.0.0.1:1: refused");
        assert!(stall.since_ms > 0);
        // Another peer's success does not clear it; its own does.
        book.finished(9, Ok(()));
        assert!(book.stalls.contains_key(&7));
        book.finished(7, Ok(()));
        assert!(book.stalls.is_empty());
        assert!(book.wanted.is_empty());
        assert_eq!((book.done, book.failed), (2, 2));
    }
}
