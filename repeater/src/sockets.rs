//! [`Repeater`]: a [`Relay`] run on a multicast socket and a unicast socket, one thread per leg.

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

use crate::relay::{Relay, Verdict, HELLO_INTERVAL, PEER_TIMEOUT};

/// Datagrams received (and sent on) per system call on each leg.
const BATCH: usize = 32;

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

/// A running repeater.
pub struct Repeater {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    relay: Arc<Mutex<Relay>>,
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    listen: SocketAddr,
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
        let unicast =
            unicast_socket(options.listen, 8 << 20).map_err(io("binding the repeater port"))?;
        let listen = unicast.local_addr().map_err(io("repeater port"))?;
        let unicast = Arc::new(unicast);
        let relay = Relay::with_id(
            options.id.unwrap_or_else(rand::random),
            options.topics.clone(),
            options.keyring.clone(),
        );
        tracing::info!(id = relay.id(), %listen, "repeater starting");
        let relay = Arc::new(Mutex::new(relay));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let shared_peers = Arc::new(Mutex::new(options.peers.clone()));
        let mut threads = Vec::new();
        // Local group → peers.
        {
            let (relay, stop, counters, unicast) = (
                Arc::clone(&relay),
                Arc::clone(&stop),
                Arc::clone(&counters),
                Arc::clone(&unicast),
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
                            // One sendmmsg for the whole batch, in arrival order.
                            let sent = send_batch_to(&unicast, &outgoing).unwrap_or(0);
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
            let (relay, stop, counters, unicast, sender) = (
                Arc::clone(&relay),
                Arc::clone(&stop),
                Arc::clone(&counters),
                Arc::clone(&unicast),
                Arc::clone(&sender),
            );
            let peers = Arc::clone(&shared_peers);
            threads.push(
                std::thread::Builder::new()
                    .name("gv-repeat-in".into())
                    .spawn(move || {
                        let mut batch = RecvBatch::new(BATCH, 65_536);
                        while !stop.load(Ordering::Relaxed) {
                            let Ok(n) =
                                recv_batch_on(&unicast, &mut batch, Duration::from_millis(100))
                            else {
                                continue;
                            };
                            counters
                                .remote_drops
                                .store(u64::from(batch.kernel_drops()), Ordering::Relaxed);
                            let now = Instant::now();
                            let mut emit: Vec<&[u8]> = Vec::with_capacity(n);
                            {
                                let peers = peers.lock().clone();
                                let mut relay = relay.lock();
                                for (index, bytes) in batch.datagrams().take(n).enumerate() {
                                    // Only configured peers may inject into the local group.
                                    let Some(from) = batch
                                        .source(index)
                                        .filter(|from| peers.iter().any(|p| p.ip() == from.ip()))
                                    else {
                                        counters.refused.fetch_add(1, Ordering::Relaxed);
                                        continue;
                                    };
                                    if relay.on_keepalive(now, from, bytes) {
                                        continue;
                                    }
                                    let verdict = relay.from_remote(now, from, bytes);
                                    counters.count(verdict);
                                    match verdict {
                                        Verdict::Relay => emit.push(bytes),
                                        Verdict::OtherTopic => {
                                            counters.refused.fetch_add(1, Ordering::Relaxed);
                                        }
                                        _ => {}
                                    }
                                }
                            }
                            let sent = sender.send_batch(&emit).unwrap_or(0);
                            counters
                                .relayed_in
                                .fetch_add(sent as u64, Ordering::Relaxed);
                            let failed = emit.len() - sent;
                            if failed > 0 {
                                counters
                                    .send_errors
                                    .fetch_add(failed as u64, Ordering::Relaxed);
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
            let (relay, stop, unicast, counters) = (
                Arc::clone(&relay),
                Arc::clone(&stop),
                Arc::clone(&unicast),
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
                                if alive && before != Some(true) {
                                    tracing::info!(%peer, "repeater peer up");
                                    up.insert(peer, true);
                                } else if !alive && settled && before != Some(false) {
                                    tracing::warn!(%peer, "repeater peer silent; probing with backoff");
                                    up.insert(peer, false);
                                }
                                let (interval, next) = backoff
                                    .entry(peer)
                                    .or_insert((Duration::from_millis(500), now));
                                if alive {
                                    *interval = Duration::from_millis(500);
                                }
                                if now >= *next || changed {
                                    if unicast.send_to(&keepalive, peer).is_err() {
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
        RepeaterStats {
            relayed_out: load(&self.counters.relayed_out),
            relayed_in: load(&self.counters.relayed_in),
            loops: load(&self.counters.loops),
            duplicates: load(&self.counters.duplicates),
            standby: load(&self.counters.standby),
            refused: load(&self.counters.refused),
            send_errors: load(&self.counters.send_errors),
            kernel_drops: load(&self.counters.local_drops) + load(&self.counters.remote_drops),
            peers_up: peers
                .iter()
                .filter(|peer| relay.peer_alive(now, **peer))
                .count() as u64,
            targets: relay.targets(now, &peers).len() as u64,
            forwarder: relay.is_forwarder(now),
            neighbours: relay.neighbour_count(now) as u64,
        }
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
