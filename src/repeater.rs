//! Stream repeaters: relay chosen topics between a local multicast group and repeaters on
//! other networks over unicast UDP, datagrams untouched (same framing, session ids, sequence
//! numbers and authentication tags), so subscribers on the far side see the same streams and
//! recover from the same snapshots.
//!
//! Loops are broken by remembering, for a few seconds, what was relayed each way: a datagram
//! that comes back from the network it was relayed to is not relayed again. [`Relay`] is that
//! logic without I/O; [`Repeater`] runs it on sockets.
//!
//! ```no_run
//! use grapevine::core::net::MulticastConfig;
//! use grapevine::repeater::{Repeater, RepeaterOptions};
//! let local = MulticastConfig::new("239.255.70.86:7086".parse()?);
//! let options = RepeaterOptions::new(local, "10.0.0.1:7190".parse()?, vec!["192.0.2.7:7190".parse()?]);
//! let repeater = Repeater::start(options)?;
//! println!("{:?}", repeater.stats());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::collections::{HashMap, VecDeque};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use grapevine_core::auth::{Keyring, Verifier};
use grapevine_core::net::{MulticastConfig, MulticastSocket, NetError, RecvBatch};
use grapevine_core::wire::Datagram;
use parking_lot::Mutex;

/// How long a relayed datagram is remembered for loop detection.
pub const LOOP_MEMORY: Duration = Duration::from_secs(5);
/// Most datagrams remembered per direction.
const MEMORY_LIMIT: usize = 1 << 20;
/// First byte of a keepalive between repeaters (not a GrapeVine datagram: those start `GV`).
const KEEPALIVE: &[u8] = b"GVRK";

/// Datagrams relayed recently in one direction, each remembered once.
#[derive(Debug, Default)]
struct Memory {
    seen: HashMap<[u8; 16], u32>,
    order: VecDeque<(Instant, [u8; 16])>,
}

impl Memory {
    fn expire(&mut self, now: Instant) {
        while let Some((at, digest)) = self.order.front().copied() {
            if now.saturating_duration_since(at) < LOOP_MEMORY && self.order.len() <= MEMORY_LIMIT {
                break;
            }
            self.order.pop_front();
            if let Some(count) = self.seen.get_mut(&digest) {
                *count -= 1;
                if *count == 0 {
                    self.seen.remove(&digest);
                }
            }
        }
    }

    fn insert(&mut self, now: Instant, digest: [u8; 16]) {
        *self.seen.entry(digest).or_insert(0) += 1;
        self.order.push_back((now, digest));
    }

    /// Whether `digest` was remembered; forgets one occurrence of it.
    fn take(&mut self, digest: &[u8; 16]) -> bool {
        match self.seen.get_mut(digest) {
            Some(count) => {
                *count -= 1;
                if *count == 0 {
                    self.seen.remove(digest);
                }
                true
            }
            None => false,
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 16] {
    let mut out = [0u8; 16];
    out.copy_from_slice(&blake3::hash(bytes).as_bytes()[..16]);
    out
}

/// What to do with a datagram.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Verdict {
    /// Relay it.
    Relay,
    /// Not a GrapeVine datagram.
    Malformed,
    /// A topic not relayed.
    OtherTopic,
    /// It is coming back from where it was relayed to: a loop, broken here.
    Loop,
    /// It fails authentication (from a remote repeater, with a keyring).
    Unauthenticated,
}

/// The relaying decisions of a repeater, without I/O.
#[derive(Debug)]
pub struct Relay {
    topics: Option<Vec<u32>>,
    sent_out: Memory,
    emitted: Memory,
    verifier: Option<Verifier>,
}

impl Relay {
    /// Relays `topics` (all when `None`); checks datagrams from remote repeaters against
    /// `keyring` when given.
    pub fn new(topics: Option<Vec<u32>>, keyring: Option<Arc<Keyring>>) -> Self {
        Self {
            topics,
            sent_out: Memory::default(),
            emitted: Memory::default(),
            verifier: keyring.map(Verifier::new),
        }
    }

    fn check(&self, bytes: &[u8]) -> Result<(u32, u64), Verdict> {
        let datagram = Datagram::parse(bytes).map_err(|_| Verdict::Malformed)?;
        if datagram.is_probe() {
            return Err(Verdict::OtherTopic);
        }
        let header = datagram.header();
        if self
            .topics
            .as_ref()
            .is_some_and(|t| !t.contains(&header.topic()))
        {
            return Err(Verdict::OtherTopic);
        }
        Ok((header.publisher(), header.session()))
    }

    /// A datagram received on the local group: relay it to the remote repeaters?
    pub fn from_local(&mut self, now: Instant, bytes: &[u8]) -> Verdict {
        self.sent_out.expire(now);
        self.emitted.expire(now);
        if let Err(verdict) = self.check(bytes) {
            return verdict;
        }
        let digest = digest(bytes);
        if self.emitted.take(&digest) {
            // Our own emission of a remote datagram, looped back by the local group.
            return Verdict::Loop;
        }
        self.sent_out.insert(now, digest);
        Verdict::Relay
    }

    /// A datagram from a remote repeater: emit it on the local group?
    pub fn from_remote(&mut self, now: Instant, bytes: &[u8]) -> Verdict {
        self.sent_out.expire(now);
        self.emitted.expire(now);
        let (publisher, session) = match self.check(bytes) {
            Ok(ids) => ids,
            Err(verdict) => return verdict,
        };
        let digest = digest(bytes);
        if self.sent_out.take(&digest) {
            // Relayed from here, coming back through another path.
            return Verdict::Loop;
        }
        if let Some(verifier) = &mut self.verifier {
            if verifier.verify(bytes, publisher, session).is_err() {
                return Verdict::Unauthenticated;
            }
        }
        self.emitted.insert(now, digest);
        Verdict::Relay
    }
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
    /// Check datagrams from remote repeaters against this keyring. Default none.
    pub keyring: Option<Arc<Keyring>>,
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
    /// Loops broken.
    pub loops: u64,
    /// Datagrams refused: malformed, other topics, unauthenticated, or from unknown senders.
    pub refused: u64,
    /// Peers heard within the last 3 seconds.
    pub peers_up: u64,
}

#[derive(Debug, Default)]
struct Counters {
    relayed_out: AtomicU64,
    relayed_in: AtomicU64,
    loops: AtomicU64,
    refused: AtomicU64,
}

/// Why the repeater could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RepeaterError {
    /// Multicast socket.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The unicast socket or a thread.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// What failed.
        source: std::io::Error,
    },
}

/// A running repeater.
pub struct Repeater {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    counters: Arc<Counters>,
    peers_heard: Arc<Mutex<HashMap<SocketAddr, Instant>>>,
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
            move |source| RepeaterError::Io { what, source }
        };
        let receiver = MulticastSocket::receiver(&options.local)?;
        let sender = MulticastSocket::sender(&options.local)?;
        let unicast = UdpSocket::bind(options.listen).map_err(io("binding the repeater port"))?;
        let listen = unicast.local_addr().map_err(io("repeater port"))?;
        unicast
            .set_read_timeout(Some(Duration::from_millis(100)))
            .map_err(io("repeater port"))?;
        let unicast = Arc::new(unicast);
        let relay = Arc::new(Mutex::new(Relay::new(
            options.topics.clone(),
            options.keyring.clone(),
        )));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let peers_heard: Arc<Mutex<HashMap<SocketAddr, Instant>>> = Arc::default();
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
                        let mut batch = RecvBatch::new(32, 65_536);
                        while !stop.load(Ordering::Relaxed) {
                            let Ok(n) = receiver.recv_batch(&mut batch, Duration::from_millis(100))
                            else {
                                continue;
                            };
                            let now = Instant::now();
                            let mut relay = relay.lock();
                            let peers = peers.lock();
                            for bytes in batch.datagrams().take(n) {
                                match relay.from_local(now, bytes) {
                                    Verdict::Relay => {
                                        for peer in peers.iter() {
                                            let _ = unicast.send_to(bytes, peer);
                                        }
                                        counters.relayed_out.fetch_add(1, Ordering::Relaxed);
                                    }
                                    Verdict::Loop => {
                                        counters.loops.fetch_add(1, Ordering::Relaxed);
                                    }
                                    _ => {}
                                }
                            }
                        }
                    })
                    .map_err(io("repeater thread"))?,
            );
        }
        // Peers → local group.
        {
            let (relay, stop, counters, unicast, heard) = (
                Arc::clone(&relay),
                Arc::clone(&stop),
                Arc::clone(&counters),
                Arc::clone(&unicast),
                Arc::clone(&peers_heard),
            );
            let peers = Arc::clone(&shared_peers);
            threads.push(
                std::thread::Builder::new()
                    .name("gv-repeat-in".into())
                    .spawn(move || {
                        let mut buffer = vec![0u8; 65_536];
                        while !stop.load(Ordering::Relaxed) {
                            let Ok((len, from)) = unicast.recv_from(&mut buffer) else {
                                continue;
                            };
                            // Only configured peers may inject into the local group.
                            if !peers.lock().iter().any(|p| p.ip() == from.ip()) {
                                counters.refused.fetch_add(1, Ordering::Relaxed);
                                continue;
                            }
                            let now = Instant::now();
                            heard.lock().insert(from, now);
                            let bytes = &buffer[..len];
                            if bytes == KEEPALIVE {
                                continue;
                            }
                            match relay.lock().from_remote(now, bytes) {
                                Verdict::Relay => {
                                    if sender.send(bytes).is_ok() {
                                        counters.relayed_in.fetch_add(1, Ordering::Relaxed);
                                    }
                                }
                                Verdict::Loop => {
                                    counters.loops.fetch_add(1, Ordering::Relaxed);
                                }
                                _ => {
                                    counters.refused.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    })
                    .map_err(io("repeater thread"))?,
            );
        }
        // Keepalives: peers learn this one is up (and log when a peer goes quiet or returns),
        // probing less often while a peer stays silent.
        {
            let (stop, unicast, heard) = (
                Arc::clone(&stop),
                Arc::clone(&unicast),
                Arc::clone(&peers_heard),
            );
            let peers = Arc::clone(&shared_peers);
            threads.push(
                std::thread::Builder::new()
                    .name("gv-repeat-keepalive".into())
                    .spawn(move || {
                        let mut backoff: HashMap<SocketAddr, (Duration, Instant)> = HashMap::new();
                        let mut up: HashMap<SocketAddr, bool> = HashMap::new();
                        while !stop.load(Ordering::Relaxed) {
                            let now = Instant::now();
                            let current = peers.lock().clone();
                            for peer in &current {
                                let alive = heard
                                    .lock()
                                    .iter()
                                    .any(|(a, t)| a.ip() == peer.ip() && now.duration_since(*t) < Duration::from_secs(3));
                                if up.insert(*peer, alive) != Some(alive) {
                                    if alive {
                                        tracing::info!(%peer, "repeater peer up");
                                    } else {
                                        tracing::warn!(%peer, "repeater peer silent; probing with backoff");
                                    }
                                }
                                let (interval, next) = backoff
                                    .entry(*peer)
                                    .or_insert((Duration::from_millis(500), now));
                                if alive {
                                    *interval = Duration::from_millis(500);
                                }
                                if now >= *next {
                                    let _ = unicast.send_to(KEEPALIVE, peer);
                                    *next = now + *interval;
                                    if !alive {
                                        *interval = (*interval * 2).min(Duration::from_secs(30));
                                    }
                                }
                            }
                            std::thread::sleep(Duration::from_millis(100));
                        }
                    })
                    .map_err(io("repeater thread"))?,
            );
        }
        Ok(Self {
            stop,
            threads,
            counters,
            peers_heard,
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
        RepeaterStats {
            relayed_out: self.counters.relayed_out.load(Ordering::Relaxed),
            relayed_in: self.counters.relayed_in.load(Ordering::Relaxed),
            loops: self.counters.loops.load(Ordering::Relaxed),
            refused: self.counters.refused.load(Ordering::Relaxed),
            peers_up: self
                .peers_heard
                .lock()
                .values()
                .filter(|t| now.duration_since(**t) < Duration::from_secs(3))
                .count() as u64,
        }
    }
}

impl Drop for Repeater {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grapevine_core::wire::DatagramBuilder;

    fn datagram(topic: u32, seq: u64) -> Vec<u8> {
        let mut builder = DatagramBuilder::new(1400, topic, 1, 9);
        assert!(builder.push_heartbeat(seq));
        builder.finish().map(|b| b.to_vec()).unwrap_or_default()
    }

    #[test]
    fn loops_are_broken_and_repeats_still_flow() {
        let now = Instant::now();
        let mut relay = Relay::new(None, None);
        let hb = datagram(1, 5);
        // A local heartbeat goes out; the same bytes coming back from the remote side are a loop.
        assert_eq!(relay.from_local(now, &hb), Verdict::Relay);
        assert_eq!(relay.from_remote(now, &hb), Verdict::Loop);
        // The next identical heartbeat of the local publisher still goes out.
        assert_eq!(relay.from_local(now, &hb), Verdict::Relay);
        // A remote datagram is emitted once; its echo on the local group is not sent back.
        let remote = datagram(1, 6);
        assert_eq!(relay.from_remote(now, &remote), Verdict::Relay);
        assert_eq!(relay.from_local(now, &remote), Verdict::Loop);
        // Memories expire.
        let later = now + LOOP_MEMORY + Duration::from_millis(1);
        assert_eq!(relay.from_local(later, &hb), Verdict::Relay);
    }

    #[test]
    fn topics_garbage_and_keys_are_filtered() {
        let now = Instant::now();
        let key = Arc::new(Keyring::single(1, [3; 32]));
        let mut relay = Relay::new(Some(vec![1]), Some(Arc::clone(&key)));
        assert_eq!(relay.from_local(now, b"garbage"), Verdict::Malformed);
        assert_eq!(relay.from_local(now, &datagram(2, 1)), Verdict::OtherTopic);
        assert_eq!(
            relay.from_remote(now, &datagram(1, 1)),
            Verdict::Unauthenticated
        );
        let signed = grapevine_core::auth::Signer::new(key, 0).sign(&datagram(1, 2));
        assert_eq!(relay.from_remote(now, &signed), Verdict::Relay);
    }
}
