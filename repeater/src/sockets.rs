//! [`Repeater`]: a [`Relay`] run on a multicast socket and a WAN leg (plain UDP or QUIC), one
//! thread per direction.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use grapevine_core::auth::Keyring;
use grapevine_core::net::{
    recv_batch_on, send_batch_to, unicast_socket, MulticastConfig, MulticastSocket, NetError,
    RecvBatch,
};
use parking_lot::Mutex;

use crate::quic::{QuicLeg, QuicPath};
use crate::relay::{Relay, Verdict, HELLO_INTERVAL, PEER_TIMEOUT};

/// Datagrams received (and sent on) per system call on each leg.
const BATCH: usize = 32;

/// How datagrams cross between repeaters.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum WanTransport {
    /// Plain UDP, one datagram per datagram: no congestion control, for a LAN between sites
    /// or a link sized for the traffic.
    #[default]
    Udp,
    /// QUIC (`quinn`): one connection per peer, datagrams congestion-controlled (when the link
    /// is full the oldest queued datagram gives way, and subscribers recover from snapshots),
    /// peers authenticated with the network key when the keyring holds a shared key.
    Quic,
}

/// Settings of a [`Repeater`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct RepeaterOptions {
    /// The local group (and interface) relayed.
    pub local: MulticastConfig,
    /// The unicast address this repeater receives remote traffic on.
    pub listen: SocketAddr,
    /// The remote repeaters.
    pub peers: Vec<SocketAddr>,
    /// Topics relayed; all when `None`.
    pub topics: Option<Vec<u32>>,
    /// Check datagrams from remote repeaters against this keyring (and sign hellos with it
    /// when it is a shared key). Default none.
    pub keyring: Option<Arc<Keyring>>,
    /// This repeater's id in its network's forwarder election (the lowest forwards). Default
    /// random at start.
    pub id: Option<u64>,
    /// How datagrams cross to the peers. Default [`WanTransport::Udp`]; every repeater of a
    /// link must use the same.
    pub wan: WanTransport,
    /// The shared key QUIC peers prove they hold (gvd's network key, say). Default the
    /// keyring's when it is a shared key; without either, QUIC peers are recognised by
    /// address only.
    pub link_key: Option<Arc<Keyring>>,
}

impl RepeaterOptions {
    /// Relays every topic of `local` to and from `peers`, receiving on `listen`.
    pub fn new(local: MulticastConfig, listen: SocketAddr, peers: Vec<SocketAddr>) -> Self {
        Self {
            local,
            listen,
            peers,
            topics: None,
            keyring: None,
            id: None,
            wan: WanTransport::Udp,
            link_key: None,
        }
    }
}

/// Counters of a repeater.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq, serde::Serialize)]
pub struct RepeaterStats {
    /// Datagrams relayed from the local group to the peers.
    pub relayed_out: u64,
    /// Datagrams from peers emitted on the local group.
    pub relayed_in: u64,
    /// Copies of datagrams from another network seen again (loops broken).
    pub loops: u64,
    /// Copies of datagrams already relayed, brought by another path.
    pub duplicates: u64,
    /// Local datagrams not relayed because another repeater of this network forwards.
    pub standby: u64,
    /// Datagrams refused: malformed, other topics, unauthenticated, or from unknown senders.
    pub refused: u64,
    /// Sends to peers or to the local group that failed.
    pub send_errors: u64,
    /// Datagrams the kernel dropped because a receive buffer (the local group's or the peers'
    /// port) was full.
    pub kernel_drops: u64,
    /// Peers heard within [`PEER_TIMEOUT`].
    pub peers_up: u64,
    /// Peers that get local traffic now: one per remote network once keepalives told which
    /// network each peer is on.
    pub targets: u64,
    /// Whether this repeater is its network's forwarder now.
    pub forwarder: bool,
    /// Other repeaters heard on the local group within [`FORWARDER_TIMEOUT`](crate::FORWARDER_TIMEOUT).
    pub neighbours: u64,
    /// Datagrams to peers dropped because the link's congestion window was full (QUIC only:
    /// plain UDP sends regardless and the network drops instead).
    pub congestion_drops: u64,
}

/// One peer as a repeater sees it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PeerLink {
    /// The peer's address.
    pub peer: SocketAddr,
    /// Heard within [`PEER_TIMEOUT`].
    pub up: bool,
    /// Whether local traffic goes to it now (one repeater per remote network gets it).
    pub target: bool,
    /// The transport.
    pub wan: WanTransport,
    /// The QUIC connection's path, when there is one.
    pub quic: Option<QuicPath>,
}

/// The WAN leg.
enum Wan {
    Udp(std::net::UdpSocket),
    Quic(Box<QuicLeg>),
}

impl Wan {
    /// Sends each datagram to its peer; returns how many went.
    fn send_batch(&self, outgoing: &[(&[u8], SocketAddr)]) -> usize {
        match self {
            Self::Udp(socket) => send_batch_to(socket, outgoing).unwrap_or(0),
            Self::Quic(leg) => leg.send_batch(outgoing),
        }
    }
}

#[derive(Debug, Default)]
struct Counters {
    relayed_out: AtomicU64,
    relayed_in: AtomicU64,
    loops: AtomicU64,
    duplicates: AtomicU64,
    standby: AtomicU64,
    refused: AtomicU64,
    send_errors: AtomicU64,
    local_drops: AtomicU64,
    remote_drops: AtomicU64,
}

impl Counters {
    fn count(&self, verdict: Verdict) {
        let counter = match verdict {
            Verdict::Relay | Verdict::Hello | Verdict::OtherTopic => return,
            Verdict::Loop => &self.loops,
            Verdict::Duplicate => &self.duplicates,
            Verdict::Standby => &self.standby,
            Verdict::Malformed | Verdict::Unauthenticated => &self.refused,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Why the repeater could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepeaterError {
    /// Multicast socket.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The unicast socket or a thread.
    #[error("{what}: {error}")]
    Io {
        /// What was being set up.
        what: String,
        /// What failed.
        error: std::io::Error,
    },
}

/// What the thread relaying peers' datagrams to the local group works with.
struct Inbound<'a> {
    relay: &'a Mutex<Relay>,
    peers: &'a Mutex<Vec<SocketAddr>>,
    counters: &'a Counters,
    sender: &'a MulticastSocket,
    /// Peers already told they seem to speak QUIC to this UDP leg.
    warned: std::collections::HashSet<SocketAddr>,
}

impl Inbound<'_> {
    /// Decides on one batch from the peers (each with its sender) and emits what is relayed
    /// on the local group, in one system call.
    fn relay_in<'b>(&mut self, batch: impl Iterator<Item = (Option<SocketAddr>, &'b [u8])>) {
        let now = Instant::now();
        let mut emit: Vec<&[u8]> = Vec::with_capacity(BATCH);
        {
            let peers = self.peers.lock().clone();
            let mut relay = self.relay.lock();
            for (source, bytes) in batch {
                // Only configured peers may inject into the local group.
                let Some(from) = source.filter(|from| peers.iter().any(|p| p.ip() == from.ip()))
                else {
                    self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if relay.on_keepalive(now, from, bytes) {
                    continue;
                }
                let verdict = relay.from_remote(now, from, bytes);
                self.counters.count(verdict);
                if verdict == Verdict::Malformed
                    && looks_like_quic(bytes)
                    && self.warned.len() < 64
                    && self.warned.insert(from)
                {
                    tracing::warn!(
                        peer = %from,
                        "the peer sends QUIC to this plain-UDP repeater: every repeater of a link needs the same --wan"
                    );
                }
                match verdict {
                    Verdict::Relay => emit.push(bytes),
                    Verdict::OtherTopic => {
                        self.counters.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {}
                }
            }
        }
        let sent = self.sender.send_batch(&emit).unwrap_or(0);
        self.counters
            .relayed_in
            .fetch_add(sent as u64, Ordering::Relaxed);
        let failed = emit.len() - sent;
        if failed > 0 {
            self.counters
                .send_errors
                .fetch_add(failed as u64, Ordering::Relaxed);
        }
    }
}

/// Whether `bytes` starts like a QUIC long-header packet of version 1 (a handshake).
fn looks_like_quic(bytes: &[u8]) -> bool {
    bytes.len() >= 5 && bytes[0] & 0xc0 == 0xc0 && bytes[1..5] == [0, 0, 0, 1]
}

/// A running repeater.
pub struct Repeater {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    relay: Arc<Mutex<Relay>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    listen: SocketAddr,
    wan: Arc<Wan>,
}

impl Repeater {
    /// Starts relaying.
    ///
    /// # Errors
    ///
    /// [`RepeaterError`] when a socket or thread cannot be set up.
    pub fn start(options: RepeaterOptions) -> Result<Self, RepeaterError> {
        let io = |what: &str| {
            let what = what.to_string();
            move |error| RepeaterError::Io { what, error }
        };
        let receiver = MulticastSocket::receiver(&options.local)?;
        let sender = Arc::new(MulticastSocket::sender(&options.local)?);
        // The group loops this repeater's emissions back to its own receiver: dropped in the
        // kernel, they cost neither a wake-up nor a copy. Without the filter (a link-local
        // IPv6 sender has no fixed source), the relay still recognises them by their sender.
        if let Err(error) = sender
            .as_std()
            .local_addr()
            .and_then(|own| receiver.ignore_source(own))
        {
            tracing::debug!(%error, "own emissions are filtered in user space");
        }
        let unicast =
            unicast_socket(options.listen, 8 << 20).map_err(io("binding the repeater port"))?;
        let listen = unicast.local_addr().map_err(io("repeater port"))?;
        let shared_peers = Arc::new(Mutex::new(options.peers.clone()));
        let wan = Arc::new(match options.wan {
            WanTransport::Udp => Wan::Udp(unicast),
            WanTransport::Quic => Wan::Quic(Box::new(
                QuicLeg::start(
                    unicast,
                    Arc::clone(&shared_peers),
                    options
                        .link_key
                        .as_deref()
                        .or(options.keyring.as_deref())
                        .and_then(crate::quic::network_proof_key),
                )
                .map_err(io("starting the QUIC endpoint"))?,
            )),
        });
        let relay = Relay::with_id(
            options.id.unwrap_or_else(rand::random),
            options.topics.clone(),
            options.keyring.clone(),
        );
        tracing::info!(id = relay.id(), %listen, wan = ?options.wan, "repeater starting");
        let relay = Arc::new(Mutex::new(relay));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let mut threads = Vec::new();
        // Local group → peers.
        {
            let (relay, stop, counters, wan) = (
                Arc::clone(&relay),
                Arc::clone(&stop),
                Arc::clone(&counters),
                Arc::clone(&wan),
            );
            let peers = Arc::clone(&shared_peers);
            threads.push(
                std::thread::Builder::new()
                    .name("gv-repeat-out".into())
                    .spawn(move || {
                        let mut batch = RecvBatch::new(BATCH, 65_536);
                        while !stop.load(Ordering::Relaxed) {
                            let Ok(n) = receiver.recv_batch(&mut batch, Duration::from_millis(100))
                            else {
                                continue;
                            };
                            counters
                                .local_drops
                                .store(u64::from(batch.kernel_drops()), Ordering::Relaxed);
                            let now = Instant::now();
                            // Never hold the peer list and the relay together (lock order).
                            let peer_list = peers.lock().clone();
                            let mut relay = relay.lock();
                            let targets = relay.targets(now, &peer_list);
                            let mut relayed = 0;
                            let mut outgoing: Vec<(&[u8], SocketAddr)> =
                                Vec::with_capacity(n * targets.len());
                            for (index, bytes) in batch.datagrams().take(n).enumerate() {
                                let verdict =
                                    relay.from_local_source(now, batch.source(index), bytes);
                                counters.count(verdict);
                                if verdict == Verdict::Relay {
                                    relayed += 1;
                                    outgoing.extend(targets.iter().map(|peer| (bytes, *peer)));
                                }
                            }
                            drop(relay);
                            // One sendmmsg (or one lock of the QUIC links) for the whole batch,
                            // in arrival order.
                            let sent = wan.send_batch(&outgoing);
                            let failed = outgoing.len() - sent;
                            if failed > 0 {
                                counters
                                    .send_errors
                                    .fetch_add(failed as u64, Ordering::Relaxed);
                            }
                            counters.relayed_out.fetch_add(relayed, Ordering::Relaxed);
                        }
                    })
                    .map_err(io("repeater thread"))?,
            );
        }
        // Peers → local group.
        {
            let (relay, stop, counters, wan, sender) = (
                Arc::clone(&relay),
                Arc::clone(&stop),
                Arc::clone(&counters),
                Arc::clone(&wan),
                Arc::clone(&sender),
            );
            let peers = Arc::clone(&shared_peers);
            threads.push(
                std::thread::Builder::new()
                    .name("gv-repeat-in".into())
                    .spawn(move || {
                        let mut inbound = Inbound {
                            relay: &relay,
                            peers: &peers,
                            counters: &counters,
                            sender: &sender,
                            warned: std::collections::HashSet::new(),
                        };
                        match &*wan {
                            Wan::Udp(socket) => {
                                let mut batch = RecvBatch::new(BATCH, 65_536);
                                while !stop.load(Ordering::Relaxed) {
                                    let Ok(n) = recv_batch_on(
                                        socket,
                                        &mut batch,
                                        Duration::from_millis(100),
                                    ) else {
                                        continue;
                                    };
                                    counters
                                        .remote_drops
                                        .store(u64::from(batch.kernel_drops()), Ordering::Relaxed);
                                    inbound.relay_in(
                                        batch
                                            .datagrams()
                                            .take(n)
                                            .enumerate()
                                            .map(|(index, bytes)| (batch.source(index), bytes)),
                                    );
                                }
                            }
                            Wan::Quic(leg) => {
                                let mut received = Vec::with_capacity(BATCH);
                                while !stop.load(Ordering::Relaxed) {
                                    let Ok(first) =
                                        leg.received().recv_timeout(Duration::from_millis(100))
                                    else {
                                        continue;
                                    };
                                    received.push(first);
                                    received.extend(leg.received().try_iter().take(BATCH - 1));
                                    inbound.relay_in(
                                        received
                                            .iter()
                                            .map(|(from, bytes)| (Some(*from), &bytes[..])),
                                    );
                                    received.clear();
                                }
                            }
                        }
                    })
                    .map_err(io("repeater thread"))?,
            );
        }
        // Hellos on the local group (the forwarder election) and keepalives to peers (they
        // learn this one is up, and which repeater forwards for this network), probing less
        // often while a peer stays silent.
        {
            let (relay, stop, wan, counters) = (
                Arc::clone(&relay),
                Arc::clone(&stop),
                Arc::clone(&wan),
                Arc::clone(&counters),
            );
            let peers = Arc::clone(&shared_peers);
            threads.push(
                std::thread::Builder::new()
                    .name("gv-repeat-keepalive".into())
                    .spawn(move || {
                        let started = Instant::now();
                        let mut backoff: HashMap<SocketAddr, (Duration, Instant)> = HashMap::new();
                        let mut up: HashMap<SocketAddr, bool> = HashMap::new();
                        let mut next_hello = started;
                        let mut was_forwarder = None;
                        let mut last_keepalive = None;
                        while !stop.load(Ordering::Relaxed) {
                            let now = Instant::now();
                            if now >= next_hello {
                                let hello = relay.lock().hello();
                                if sender.send(&hello).is_err() {
                                    counters.send_errors.fetch_add(1, Ordering::Relaxed);
                                }
                                next_hello = now + HELLO_INTERVAL;
                            }
                            let peer_list = peers.lock().clone();
                            let (keepalive, forwarder, alive) = {
                                let relay = relay.lock();
                                let alive: Vec<(SocketAddr, bool)> = peer_list
                                    .iter()
                                    .map(|peer| (*peer, relay.peer_alive(now, *peer)))
                                    .collect();
                                (relay.keepalive(now), relay.is_forwarder(now), alive)
                            };
                            if was_forwarder != Some(forwarder) {
                                tracing::info!(forwarder, "repeater role: {}", if forwarder { "forwarding for this network" } else { "standing by" });
                                was_forwarder = Some(forwarder);
                            }
                            // A new forwarder is told to every peer at once: until they know,
                            // they send to every repeater of this network.
                            let changed = last_keepalive != Some(keepalive);
                            last_keepalive = Some(keepalive);
                            for (peer, alive) in alive {
                                // Silence is news only once a keepalive could have arrived.
                                let settled = now.duration_since(started) >= PEER_TIMEOUT;
                                let before = up.get(&peer).copied();
                                let (interval, next) = backoff
                                    .entry(peer)
                                    .or_insert((Duration::from_millis(500), now));
                                if alive && before != Some(true) {
                                    tracing::info!(%peer, "repeater peer up");
                                    up.insert(peer, true);
                                    // It may have heard nothing of this one yet (its data
                                    // arrived first): tell it now, not after the backoff.
                                    *next = now;
                                } else if !alive && settled && before != Some(false) {
                                    tracing::warn!(%peer, "repeater peer silent; probing with backoff");
                                    up.insert(peer, false);
                                }
                                if alive {
                                    *interval = Duration::from_millis(500);
                                }
                                if now >= *next || changed {
                                    if wan.send_batch(&[(&keepalive[..], peer)]) == 0 {
                                        counters.send_errors.fetch_add(1, Ordering::Relaxed);
                                    }
                                    *next = now + *interval;
                                    if !alive {
                                        *interval = (*interval * 2).min(Duration::from_secs(30));
                                    }
                                }
                            }
                            std::thread::sleep(Duration::from_millis(50));
                        }
                    })
                    .map_err(io("repeater thread"))?,
            );
        }
        Ok(Self {
            stop,
            threads,
            counters,
            relay,
            peers: shared_peers,
            listen,
            wan,
        })
    }

    /// Replaces the remote repeaters (peers found later, through a DHT say).
    pub fn set_peers(&self, peers: Vec<SocketAddr>) {
        *self.peers.lock() = peers;
    }

    /// The remote repeaters now.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.peers.lock().clone()
    }

    /// The unicast address it receives on.
    pub fn listen_address(&self) -> SocketAddr {
        self.listen
    }

    /// Counters.
    pub fn stats(&self) -> RepeaterStats {
        let now = Instant::now();
        let peers = self.peers.lock().clone();
        let relay = self.relay.lock();
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let quic = match &*self.wan {
            Wan::Udp(_) => None,
            Wan::Quic(leg) => Some(&**leg),
        };
        RepeaterStats {
            relayed_out: load(&self.counters.relayed_out),
            relayed_in: load(&self.counters.relayed_in),
            loops: load(&self.counters.loops),
            duplicates: load(&self.counters.duplicates),
            standby: load(&self.counters.standby),
            send_errors: load(&self.counters.send_errors),
            peers_up: peers
                .iter()
                .filter(|peer| relay.peer_alive(now, **peer))
                .count() as u64,
            targets: relay.targets(now, &peers).len() as u64,
            forwarder: relay.is_forwarder(now),
            neighbours: relay.neighbour_count(now) as u64,
            congestion_drops: quic.map_or(0, QuicLeg::congestion_drops),
            refused: load(&self.counters.refused) + quic.map_or(0, QuicLeg::refused),
            kernel_drops: load(&self.counters.local_drops)
                + load(&self.counters.remote_drops)
                + quic.map_or(0, QuicLeg::queue_drops),
        }
    }

    /// Each peer: whether it is up, whether it gets local traffic, and its QUIC path.
    pub fn links(&self) -> Vec<PeerLink> {
        let now = Instant::now();
        let peers = self.peers.lock().clone();
        let (targets, alive): (Vec<SocketAddr>, Vec<bool>) = {
            let relay = self.relay.lock();
            (
                relay.targets(now, &peers),
                peers.iter().map(|p| relay.peer_alive(now, *p)).collect(),
            )
        };
        let (wan, mut paths) = match &*self.wan {
            Wan::Udp(_) => (WanTransport::Udp, HashMap::new()),
            Wan::Quic(leg) => (WanTransport::Quic, leg.paths()),
        };
        peers
            .iter()
            .zip(alive)
            .map(|(peer, up)| PeerLink {
                peer: *peer,
                up,
                target: targets.contains(peer),
                wan,
                quic: paths.remove(peer),
            })
            .collect()
    }
}

impl Drop for Repeater {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            // A panic in the thread was already reported by the panic hook.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::looks_like_quic;

    #[test]
    fn a_quic_handshake_is_told_apart_from_grapevine_datagrams() {
        assert!(looks_like_quic(&[0xc3, 0, 0, 0, 1, 8, 1, 2]));
        assert!(!looks_like_quic(b"GV\x01\x00\x00\x00"));
        assert!(!looks_like_quic(&[0xc3, 0, 0, 0]));
        assert!(!looks_like_quic(&[0x43, 0, 0, 0, 1]), "a short header");
    }
}
