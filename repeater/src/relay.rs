//! The relay decisions without I/O: which datagrams to emit locally, send to which peers, or
//! drop (and why), which repeater forwards for a network, and what keepalives say.
//!
//! Its length (about 750 lines) is ~320 lines of unit tests (a simulated lab of repeater pairs and
//! meshes) kept beside the decisions they test.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_core::auth::{Keyring, Verifier};
use grapevine_core::wire::Datagram;

/// How long a datagram is remembered, by content, once seen from either side.
pub const LOOP_MEMORY: Duration = Duration::from_secs(1);
/// How often a repeater announces itself on its local group.
pub const HELLO_INTERVAL: Duration = Duration::from_millis(250);
/// A repeater not heard on the local group for this long no longer counts for the election.
pub const FORWARDER_TIMEOUT: Duration = Duration::from_millis(1000);
/// A peer not heard for this long is silent: no data is sent to it, keepalives back off.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(3);
/// Most remote senders whose keepalive state is kept.
const MAX_PEER_STATES: usize = 1024;
/// Most datagrams remembered.
const MEMORY_LIMIT: usize = 1 << 20;
/// Start of a keepalive between repeaters (not a GrapeVine datagram: those start `GV`).
const KEEPALIVE: &[u8] = b"GVRK";
/// Keepalive layout version after [`KEEPALIVE`]: then the sender's id and its forwarder's.
const KEEPALIVE_V1: u8 = 1;
const KEEPALIVE_LEN: usize = 4 + 1 + 8 + 8;
/// The `publisher` field of a repeater's hello (a probe datagram; `session` is its id).
pub const HELLO_PUBLISHER: u32 = u32::from_be_bytes(*b"GVRH");

/// Which side a datagram was first seen on.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
enum Side {
    Local,
    Remote,
}

/// Every datagram seen recently, from either side, by digest.
///
/// The digest is two 64-bit keyed hashes (`foldhash`, seeds drawn per repeater), not a
/// cryptographic one: it only has to tell datagrams apart by accident, and hashing every
/// datagram twice per hop with BLAKE3 took more of a repeater's time than moving it. A
/// stranger cannot aim a collision at seeds they never see, and on a keyed network only
/// datagrams that passed authentication are remembered.
#[derive(Debug)]
struct Memory {
    seen: HashMap<u128, (Instant, Side), foldhash::fast::RandomState>,
    order: VecDeque<(Instant, u128)>,
    seeds: [foldhash::quality::SeedableRandomState; 2],
}

impl Default for Memory {
    fn default() -> Self {
        Self {
            seen: HashMap::default(),
            order: VecDeque::new(),
            seeds: [
                foldhash::quality::SeedableRandomState::random(),
                foldhash::quality::SeedableRandomState::random(),
            ],
        }
    }
}

impl Memory {
    fn digest(&self, bytes: &[u8]) -> u128 {
        use std::hash::BuildHasher;
        let [low, high] = &self.seeds;
        u128::from(low.hash_one(bytes)) | (u128::from(high.hash_one(bytes)) << 64)
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, digest)) = self.order.front().copied() {
            if now.saturating_duration_since(at) < LOOP_MEMORY && self.order.len() <= MEMORY_LIMIT {
                break;
            }
            self.order.pop_front();
            // A digest seen again after it expired has a newer entry: keep that one.
            if self
                .seen
                .get(&digest)
                .is_some_and(|(seen_at, _)| *seen_at == at)
            {
                self.seen.remove(&digest);
            }
        }
    }

    /// Where `digest` was seen within [`LOOP_MEMORY`].
    fn recent(&self, now: Instant, digest: &u128) -> Option<Side> {
        self.seen
            .get(digest)
            .filter(|(at, _)| now.saturating_duration_since(*at) < LOOP_MEMORY)
            .map(|(_, side)| *side)
    }

    /// Remembers `digest` as seen now on `side` (not refreshed by later copies, so that
    /// identical datagrams still cross once per [`LOOP_MEMORY`]).
    fn remember(&mut self, now: Instant, digest: u128, side: Side) {
        self.seen.insert(digest, (now, side));
        self.order.push_back((now, digest));
    }
}

/// The entry of `key` in a map of at most `max` entries: when it is full and `key` new, the
/// entries no longer `live` go first; `None` if it is still full (the newcomer is not kept).
fn bounded_entry<K: std::hash::Hash + Eq, V>(
    map: &mut HashMap<K, V>,
    key: K,
    max: usize,
    live: impl Fn(&V) -> bool,
) -> Option<std::collections::hash_map::Entry<'_, K, V>> {
    if map.len() >= max && !map.contains_key(&key) {
        map.retain(|_, value| live(value));
        if map.len() >= max {
            return None;
        }
    }
    Some(map.entry(key))
}

/// Whether `bytes` is a repeater's hello (read from the header alone).
fn is_hello(bytes: &[u8]) -> bool {
    zerocopy::FromBytes::ref_from_prefix(bytes).is_ok_and(
        |(header, _): (&grapevine_core::wire::DatagramHeader, _)| {
            header.publisher() == HELLO_PUBLISHER
        },
    )
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
    /// A copy of a datagram that came from another network (a loop, broken here).
    Loop,
    /// A copy of a datagram already relayed (another path brought it).
    Duplicate,
    /// Local traffic while another repeater of this network is the forwarder.
    Standby,
    /// Another repeater's hello on the local group (taken into the election).
    Hello,
    /// It fails authentication (from a remote repeater, with a keyring).
    Unauthenticated,
}

/// What a peer said of itself in its last keepalive.
#[derive(Clone, Copy, Debug)]
struct PeerState {
    heard: Instant,
    /// Its id and its network's forwarder, once it sent a versioned keepalive.
    ids: Option<(u64, u64)>,
}

/// The relaying decisions of a repeater, without I/O: content memory, the forwarder election
/// on the local group and the choice of remote peers.
#[derive(Debug)]
pub struct Relay {
    id: u64,
    topics: Option<Vec<u32>>,
    memory: Memory,
    verifier: Option<Verifier>,
    hello_verifier: Option<Verifier>,
    hello_signer: Option<grapevine_core::auth::Signer>,
    /// Other repeaters heard on the local group, by id.
    neighbours: HashMap<u64, Instant>,
    /// Where repeaters of this network (this one included) multicast from, as their hellos
    /// showed: what comes from there is a relayed copy, never local traffic to relay out.
    relay_senders: HashMap<SocketAddr, Instant>,
    peers: HashMap<SocketAddr, PeerState>,
    /// Where this repeater's own emissions come from, once its own hello came back: those are
    /// recognised by address alone, without parsing or hashing them again.
    own_sender: Option<SocketAddr>,
}

impl Relay {
    /// Relays `topics` (all when `None`); checks datagrams from remote repeaters against
    /// `keyring` when given. Its id is random.
    pub fn new(topics: Option<Vec<u32>>, keyring: Option<Arc<Keyring>>) -> Self {
        Self::with_id(rand::random(), topics, keyring)
    }

    /// As [`Relay::new`] with a chosen id: the lowest id of a network's repeaters forwards.
    pub fn with_id(id: u64, topics: Option<Vec<u32>>, keyring: Option<Arc<Keyring>>) -> Self {
        // Hellos are signed when the key can sign (a shared key), so that a stranger cannot
        // win the election and silence a network; with a publisher's public key they cannot be.
        let signing = keyring.as_ref().filter(|k| k.is_shared()).cloned();
        Self {
            id,
            topics,
            memory: Memory::default(),
            verifier: keyring.clone().map(Verifier::new),
            hello_verifier: signing.clone().map(Verifier::new),
            hello_signer: signing.map(|k| {
                grapevine_core::auth::Signer::new(k, grapevine_core::auth::REQUEST_SENDER)
            }),
            neighbours: HashMap::new(),
            relay_senders: HashMap::new(),
            peers: HashMap::new(),
            own_sender: None,
        }
    }

    /// This repeater's id.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The forwarder of the local network now: the lowest id among this repeater and those
    /// heard on the local group within [`FORWARDER_TIMEOUT`].
    pub fn forwarder(&self, now: Instant) -> u64 {
        self.neighbours
            .iter()
            .filter(|(_, heard)| now.saturating_duration_since(**heard) < FORWARDER_TIMEOUT)
            .map(|(id, _)| *id)
            .fold(self.id, u64::min)
    }

    /// Other repeaters heard on the local group within [`FORWARDER_TIMEOUT`].
    pub fn neighbour_count(&self, now: Instant) -> usize {
        self.neighbours
            .values()
            .filter(|heard| now.saturating_duration_since(**heard) < FORWARDER_TIMEOUT)
            .count()
    }

    /// Whether this repeater relays its network's traffic out now.
    pub fn is_forwarder(&self, now: Instant) -> bool {
        self.forwarder(now) == self.id
    }

    /// The hello to send on the local group every [`HELLO_INTERVAL`].
    pub fn hello(&mut self) -> Vec<u8> {
        let header = grapevine_core::wire::DatagramHeader::new(
            0,
            HELLO_PUBLISHER,
            self.id,
            grapevine_core::wire::FLAG_PROBE,
        );
        let bytes = zerocopy::IntoBytes::as_bytes(&header).to_vec();
        match &mut self.hello_signer {
            Some(signer) => signer.sign(&bytes).to_vec(),
            None => bytes,
        }
    }

    fn on_hello(
        &mut self,
        now: Instant,
        source: Option<SocketAddr>,
        bytes: &[u8],
        id: u64,
    ) -> Verdict {
        if let Some(verifier) = &mut self.hello_verifier {
            if verifier.verify(bytes, HELLO_PUBLISHER, id).is_err() {
                return Verdict::Unauthenticated;
            }
        }
        // Bounded: a network has a handful of repeaters; the long gone are forgotten first.
        if let Some(source) = source {
            if let Some(heard) = bounded_entry(&mut self.relay_senders, source, 256, |heard| {
                now.saturating_duration_since(*heard) < PEER_TIMEOUT
            }) {
                *heard.or_insert(now) = now;
            }
        }
        if id == self.id {
            self.own_sender = source;
        } else {
            if let Some(heard) = bounded_entry(&mut self.neighbours, id, 256, |heard| {
                now.saturating_duration_since(*heard) < FORWARDER_TIMEOUT
            }) {
                *heard.or_insert(now) = now;
            }
        }
        Verdict::Hello
    }

    /// The keepalive to send to peers: this repeater's id and its network's forwarder.
    pub fn keepalive(&self, now: Instant) -> [u8; KEEPALIVE_LEN] {
        let mut out = [0u8; KEEPALIVE_LEN];
        out[..4].copy_from_slice(KEEPALIVE);
        out[4] = KEEPALIVE_V1;
        out[5..13].copy_from_slice(&self.id.to_be_bytes());
        out[13..21].copy_from_slice(&self.forwarder(now).to_be_bytes());
        out
    }

    /// Whether `bytes` is a keepalive; if so, what it says of `from` is recorded.
    pub fn on_keepalive(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) -> bool {
        if !bytes.starts_with(KEEPALIVE) {
            return false;
        }
        let ids = (bytes.len() == KEEPALIVE_LEN && bytes[4] == KEEPALIVE_V1).then(|| {
            let word = |range: std::ops::Range<usize>| {
                bytes
                    .get(range)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map_or(0, u64::from_be_bytes)
            };
            (word(5..13), word(13..21))
        });
        self.heard(now, from, ids);
        true
    }

    /// Records that `from` was heard (any datagram from a peer counts).
    fn heard(&mut self, now: Instant, from: SocketAddr, ids: Option<(u64, u64)>) {
        // Bounded: senders are checked by address only, so one peer host could use many ports.
        let Some(entry) = bounded_entry(&mut self.peers, from, MAX_PEER_STATES, |p| {
            now.saturating_duration_since(p.heard) < PEER_TIMEOUT
        }) else {
            return;
        };
        let entry = entry.or_insert(PeerState { heard: now, ids });
        entry.heard = now;
        if ids.is_some() {
            entry.ids = ids;
        }
    }

    /// Whether `peer` was heard within [`PEER_TIMEOUT`].
    pub fn peer_alive(&self, now: Instant, peer: SocketAddr) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| now.saturating_duration_since(p.heard) < PEER_TIMEOUT)
    }

    /// Which of `peers` get local traffic now: one per remote network (peers that name the
    /// same forwarder share a network), preferring the forwarder itself; peers never heard
    /// from get it too (their network is not known yet); silent peers get none.
    pub fn targets(&self, now: Instant, peers: &[SocketAddr]) -> Vec<SocketAddr> {
        let mut by_network: HashMap<u64, (SocketAddr, bool, u64)> = HashMap::new();
        let mut out = Vec::new();
        for peer in peers {
            match self.peers.get(peer) {
                None => out.push(*peer),
                Some(state) if now.saturating_duration_since(state.heard) >= PEER_TIMEOUT => {}
                Some(PeerState { ids: None, .. }) => out.push(*peer),
                Some(PeerState {
                    ids: Some((id, forwarder)),
                    ..
                }) => {
                    let candidate = (*peer, id == forwarder, *id);
                    by_network
                        .entry(*forwarder)
                        .and_modify(|best| {
                            // The forwarder first, then the lowest id: every sender agrees.
                            if (!candidate.1, candidate.2) < (!best.1, best.2) {
                                *best = candidate;
                            }
                        })
                        .or_insert(candidate);
                }
            }
        }
        out.extend(by_network.into_values().map(|(peer, _, _)| peer));
        out.sort();
        out.dedup();
        out
    }

    fn check(&self, bytes: &[u8]) -> Result<(u32, u64), Verdict> {
        let datagram = Datagram::parse(bytes).map_err(|_| Verdict::Malformed)?;
        let header = datagram.header();
        if datagram.is_probe() {
            return Err(if header.publisher() == HELLO_PUBLISHER {
                Verdict::Hello
            } else {
                Verdict::OtherTopic
            });
        }
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
        self.from_local_source(now, None, bytes)
    }

    /// As [`Relay::from_local`], knowing who multicast the datagram: a copy another repeater
    /// of this network (or this one) emitted is recognised by its sender, even when it
    /// arrives before the remote copy that would have told.
    pub fn from_local_source(
        &mut self,
        now: Instant,
        source: Option<SocketAddr>,
        bytes: &[u8],
    ) -> Verdict {
        self.memory.expire(now);
        // Its own emission looped back by the group: a remote datagram it remembered when
        // it emitted it (or its own hello, which only refreshes the election).
        if source.is_some() && source == self.own_sender && !is_hello(bytes) {
            return Verdict::Loop;
        }
        match self.check(bytes) {
            Ok(_) => {}
            Err(Verdict::Hello) => {
                let id = Datagram::parse(bytes).map_or(0, |d| d.header().session());
                return self.on_hello(now, source, bytes, id);
            }
            Err(verdict) => return verdict,
        }
        let digest = self.memory.digest(bytes);
        match self.memory.recent(now, &digest) {
            Some(Side::Remote) => return Verdict::Loop,
            Some(Side::Local) => return Verdict::Duplicate,
            None => {}
        }
        let relayed = source.is_some_and(|source| {
            self.relay_senders
                .get(&source)
                .is_some_and(|heard| now.saturating_duration_since(*heard) < PEER_TIMEOUT)
        });
        if relayed {
            // Another repeater's emission of a remote datagram: remembered as remote, so the
            // copy a peer may still bring is a duplicate too.
            self.memory.remember(now, digest, Side::Remote);
            return Verdict::Loop;
        }
        // Remembered even on standby, so that a take-over does not resend what just crossed.
        self.memory.remember(now, digest, Side::Local);
        if self.is_forwarder(now) {
            Verdict::Relay
        } else {
            Verdict::Standby
        }
    }

    /// A datagram from the remote repeater at `from`: emit it on the local group?
    pub fn from_remote(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) -> Verdict {
        self.memory.expire(now);
        let checked = self.check(bytes);
        // Garbage (another protocol on the port, say) does not make a peer up.
        if checked != Err(Verdict::Malformed) {
            self.heard(now, from, None);
        }
        let (publisher, session) = match checked {
            Ok(ids) => ids,
            Err(Verdict::Hello) => return Verdict::OtherTopic,
            Err(verdict) => return verdict,
        };
        let digest = self.memory.digest(bytes);
        match self.memory.recent(now, &digest) {
            // Relayed from here (or seen here first), coming back through another path.
            Some(Side::Local) => return Verdict::Loop,
            Some(Side::Remote) => return Verdict::Duplicate,
            None => {}
        }
        // Checked before it is remembered: a forgery must not hide the genuine datagram.
        if let Some(verifier) = &mut self.verifier {
            if verifier.verify(bytes, publisher, session).is_err() {
                return Verdict::Unauthenticated;
            }
        }
        self.memory.remember(now, digest, Side::Remote);
        Verdict::Relay
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use grapevine_core::wire::DatagramBuilder;

    #[test]
    fn only_grapevine_datagrams_and_keepalives_make_a_peer_up() {
        let now = Instant::now();
        let mut relay = Relay::with_id(1, None, None);
        let quic_initial = [0xc3, 0, 0, 0, 1, 8, 1, 2, 3, 4];
        assert_eq!(
            relay.from_remote(now, peer(9), &quic_initial),
            Verdict::Malformed
        );
        assert!(!relay.peer_alive(now, peer(9)));
        assert_eq!(
            relay.from_remote(now, peer(9), &datagram(1, 1)),
            Verdict::Relay
        );
        assert!(relay.peer_alive(now, peer(9)));
    }

    fn datagram(topic: u32, seq: u64) -> Vec<u8> {
        let mut builder = DatagramBuilder::new(1400, topic, 1, 9);
        assert!(builder.push_heartbeat(seq));
        builder.finish().map(|b| b.to_vec()).unwrap_or_default()
    }

    fn peer(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn copies_are_recognised_by_content_whichever_side_they_come_from() {
        let now = Instant::now();
        let mut relay = Relay::with_id(1, None, None);
        let hb = datagram(1, 5);
        // A local heartbeat goes out; the same bytes coming back from any peer are a loop.
        assert_eq!(relay.from_local(now, &hb), Verdict::Relay);
        assert_eq!(relay.from_remote(now, peer(1), &hb), Verdict::Loop);
        assert_eq!(relay.from_remote(now, peer(2), &hb), Verdict::Loop);
        // A second local copy (another repeater's emission, A/B feeds) is not relayed again.
        assert_eq!(relay.from_local(now, &hb), Verdict::Duplicate);
        // A remote datagram is emitted once, whichever peers bring it; its copies on the local
        // group (ours or a sibling repeater's) are never sent back.
        let remote = datagram(1, 6);
        assert_eq!(relay.from_remote(now, peer(1), &remote), Verdict::Relay);
        assert_eq!(relay.from_remote(now, peer(2), &remote), Verdict::Duplicate);
        assert_eq!(relay.from_local(now, &remote), Verdict::Loop);
        assert_eq!(relay.from_local(now, &remote), Verdict::Loop);
        // Identical datagrams (a quiet publisher's heartbeats) cross again once the memory
        // expired, and a copy seen meanwhile does not extend it.
        let later = now + LOOP_MEMORY / 2;
        assert_eq!(relay.from_local(later, &hb), Verdict::Duplicate);
        let after = now + LOOP_MEMORY + Duration::from_millis(1);
        assert_eq!(relay.from_local(after, &hb), Verdict::Relay);
    }

    #[test]
    fn topics_garbage_and_keys_are_filtered() {
        let now = Instant::now();
        let key = Arc::new(Keyring::single(1, [3; 32]));
        let mut relay = Relay::with_id(1, Some(vec![1]), Some(Arc::clone(&key)));
        assert_eq!(relay.from_local(now, b"garbage"), Verdict::Malformed);
        assert_eq!(relay.from_local(now, &datagram(2, 1)), Verdict::OtherTopic);
        let forged = datagram(1, 1);
        assert_eq!(
            relay.from_remote(now, peer(1), &forged),
            Verdict::Unauthenticated
        );
        let signed = grapevine_core::auth::Signer::new(Arc::clone(&key), 0).sign(&forged);
        // The forgery was not remembered: the genuine datagram with the same body goes through.
        assert_eq!(relay.from_remote(now, peer(1), &signed), Verdict::Relay);
        // A stranger's hello cannot make it stand by; a keyed sibling's can.
        let mut stranger = Relay::with_id(0, None, None);
        assert_eq!(
            relay.from_local(now, &stranger.hello()),
            Verdict::Unauthenticated
        );
        assert!(relay.is_forwarder(now));
        let mut sibling = Relay::with_id(0, None, Some(key));
        assert_eq!(relay.from_local(now, &sibling.hello()), Verdict::Hello);
        assert!(!relay.is_forwarder(now));
    }

    #[test]
    fn the_lowest_id_forwards_and_the_next_takes_over() {
        let now = Instant::now();
        let mut low = Relay::with_id(3, None, None);
        let mut high = Relay::with_id(7, None, None);
        assert!(high.is_forwarder(now), "alone, it forwards");
        assert_eq!(high.from_local(now, &low.hello()), Verdict::Hello);
        assert_eq!(low.from_local(now, &high.hello()), Verdict::Hello);
        assert!(low.is_forwarder(now));
        assert!(!high.is_forwarder(now));
        let data = datagram(1, 1);
        assert_eq!(high.from_local(now, &data), Verdict::Standby);
        assert_eq!(low.from_local(now, &data), Verdict::Relay);
        // The forwarder goes silent: the other takes over after the timeout.
        let later = now + FORWARDER_TIMEOUT;
        assert!(high.is_forwarder(later));
        assert_eq!(high.from_local(later, &datagram(1, 2)), Verdict::Relay);
    }

    #[test]
    fn a_sibling_repeaters_emissions_are_recognised_by_their_sender() {
        let now = Instant::now();
        let mut forwarder = Relay::with_id(1, None, None);
        let mut standby = Relay::with_id(2, None, None);
        let (sibling, publisher) = (peer(2), peer(9));
        // The standby's hello comes from the socket it also emits relayed datagrams from.
        assert_eq!(
            forwarder.from_local_source(now, Some(sibling), &standby.hello()),
            Verdict::Hello
        );
        let relayed = datagram(1, 1);
        assert_eq!(
            forwarder.from_local_source(now, Some(sibling), &relayed),
            Verdict::Loop,
            "a copy the standby brought from another network"
        );
        assert_eq!(
            forwarder.from_remote(now, peer(5), &relayed),
            Verdict::Duplicate,
            "and the same datagram from a peer is not emitted again"
        );
        let local = datagram(1, 2);
        assert_eq!(
            forwarder.from_local_source(now, Some(publisher), &local),
            Verdict::Relay
        );
    }

    #[test]
    fn its_own_emissions_are_known_by_address_once_its_hello_came_back() {
        let now = Instant::now();
        let mut relay = Relay::with_id(1, None, None);
        let (own, publisher) = (peer(1), peer(9));
        let hello = relay.hello();
        assert_eq!(
            relay.from_local_source(now, Some(own), &hello),
            Verdict::Hello
        );
        assert!(relay.is_forwarder(now), "its own hello is no neighbour");
        let remote = datagram(1, 1);
        assert_eq!(relay.from_remote(now, peer(5), &remote), Verdict::Relay);
        assert_eq!(
            relay.from_local_source(now, Some(own), &remote),
            Verdict::Loop
        );
        // Anything from that address is its own emission, not local traffic to relay out.
        assert_eq!(
            relay.from_local_source(now, Some(own), &datagram(1, 2)),
            Verdict::Loop
        );
        assert_eq!(
            relay.from_local_source(now, Some(publisher), &datagram(1, 3)),
            Verdict::Relay
        );
        // Its hellos keep coming through the election.
        assert_eq!(
            relay.from_local_source(now, Some(own), &hello),
            Verdict::Hello
        );
    }

    #[test]
    fn one_peer_per_remote_network_gets_local_traffic() {
        let now = Instant::now();
        let relay_id = 1;
        let mut relay = Relay::with_id(relay_id, None, None);
        let (b3, b4, c5) = (peer(3), peer(4), peer(5));
        let keepalive = |id: u64, forwarder: u64| {
            let mut other = Relay::with_id(id, None, None);
            if forwarder != id {
                other.neighbours.insert(forwarder, now);
            }
            other.keepalive(now)
        };
        // Before any keepalive the networks are unknown: every peer gets it.
        assert_eq!(relay.targets(now, &[b3, b4, c5]), vec![b3, b4, c5]);
        assert!(relay.on_keepalive(now, b3, &keepalive(30, 30)));
        assert!(relay.on_keepalive(now, b4, &keepalive(40, 30)));
        assert!(relay.on_keepalive(now, c5, &keepalive(50, 50)));
        assert_eq!(relay.targets(now, &[b3, b4, c5]), vec![b3, c5]);
        // B's forwarder is not our peer: B's lowest-id repeater among ours gets it.
        assert_eq!(relay.targets(now, &[b4, c5]), vec![b4, c5]);
        // Silent peers get nothing; an old 4-byte keepalive counts as heard, network unknown.
        let later = now + PEER_TIMEOUT;
        assert!(relay.on_keepalive(later, c5, b"GVRK"));
        assert_eq!(relay.targets(later, &[b3, b4, c5]), vec![c5]);
        assert!(!relay.on_keepalive(later, c5, &datagram(1, 1)));
    }

    #[test]
    fn the_peer_table_stays_bounded_whatever_ports_a_peer_host_uses() {
        let now = Instant::now();
        let mut relay = Relay::with_id(1, None, None);
        for port in 0..5_000u16 {
            relay.on_keepalive(now, peer(port), b"GVRK");
        }
        assert!(relay.peers.len() <= MAX_PEER_STATES);
        // Once the flood is silent, real peers are recorded again.
        let later = now + PEER_TIMEOUT;
        assert!(relay.on_keepalive(later, peer(60_000), b"GVRK"));
        assert!(relay.peer_alive(later, peer(60_000)));
    }

    /// Repeaters on several networks, driven without sockets: counts how often each datagram
    /// is multicast on each network.
    struct Lab {
        relays: Vec<(Relay, usize, Vec<SocketAddr>, bool)>,
        networks: usize,
    }

    impl Lab {
        /// `placement[i]` is repeater i's network; `links` are unicast peerings (both ways).
        fn new(placement: &[usize], links: &[(usize, usize)]) -> Self {
            let relays = placement
                .iter()
                .enumerate()
                .map(|(i, network)| {
                    let peers = links
                        .iter()
                        .filter_map(|&(a, b)| match () {
                            () if a == i => Some(peer(b as u16)),
                            () if b == i => Some(peer(a as u16)),
                            () => None,
                        })
                        .collect();
                    (
                        Relay::with_id(i as u64 + 10, None, None),
                        *network,
                        peers,
                        true,
                    )
                })
                .collect();
            let networks = placement.iter().max().map_or(0, |m| m + 1);
            Self { relays, networks }
        }

        /// Hellos and keepalives, as the keepalive thread sends them.
        fn settle(&mut self, now: Instant) {
            for _ in 0..2 {
                for i in 0..self.relays.len() {
                    if !self.relays[i].3 {
                        continue;
                    }
                    let hello = self.relays[i].0.hello();
                    let keepalive = self.relays[i].0.keepalive(now);
                    for j in 0..self.relays.len() {
                        if self.relays[j].3 && self.relays[j].1 == self.relays[i].1 {
                            self.relays[j].0.from_local(now, &hello);
                        }
                    }
                    for target in self.relays[i].2.clone() {
                        let j = usize::from(target.port());
                        if self.relays[j].3 {
                            self.relays[j]
                                .0
                                .on_keepalive(now, peer(i as u16), &keepalive);
                        }
                    }
                }
            }
        }

        /// Multicasts `bytes` on `network` and runs every relay until nothing moves; returns
        /// how many times it was multicast on each network.
        fn inject(&mut self, now: Instant, network: usize, bytes: &[u8]) -> Vec<usize> {
            let mut on_network = vec![0; self.networks];
            let mut queue = VecDeque::from([(network, None::<(usize, usize)>)]);
            let mut steps = 0;
            while let Some((net, unicast)) = queue.pop_front() {
                steps += 1;
                assert!(steps < 10_000, "a storm: {on_network:?}");
                match unicast {
                    Some((from, to)) => {
                        if !self.relays[to].3 {
                            continue;
                        }
                        let verdict = self.relays[to].0.from_remote(now, peer(from as u16), bytes);
                        if verdict == Verdict::Relay {
                            queue.push_back((self.relays[to].1, None));
                        }
                    }
                    None => {
                        on_network[net] += 1;
                        for i in 0..self.relays.len() {
                            if !self.relays[i].3 || self.relays[i].1 != net {
                                continue;
                            }
                            if self.relays[i].0.from_local(now, bytes) == Verdict::Relay {
                                let peers = self.relays[i].2.clone();
                                for target in self.relays[i].0.targets(now, &peers) {
                                    let to = usize::from(target.port());
                                    queue.push_back((self.relays[to].1, Some((i, to))));
                                }
                            }
                        }
                    }
                }
            }
            on_network
        }
    }

    fn exactly_once(lab: &mut Lab, start: Instant, rounds: u64) {
        for seq in 1..=rounds {
            let now = start + Duration::from_millis(seq);
            let counts = lab.inject(now, 0, &datagram(1, 1_000 + seq));
            assert!(counts.iter().all(|n| *n == 1), "datagram {seq}: {counts:?}");
        }
    }

    #[test]
    fn two_pairs_deliver_each_datagram_once_per_network() {
        let now = Instant::now();
        // Repeaters 0, 1 on network A; 2, 3 on B; pairs 0-2 and 1-3.
        let mut lab = Lab::new(&[0, 0, 1, 1], &[(0, 2), (1, 3)]);
        // Before hellos and keepalives every repeater forwards: copies are bounded, no storm.
        let counts = lab.inject(now, 0, &datagram(1, 1));
        assert!(counts[1] <= 2 && counts[0] == 1, "{counts:?}");
        lab.settle(now);
        exactly_once(&mut lab, now, 50);
        // B → A too.
        let counts = lab.inject(now + Duration::from_millis(100), 1, &datagram(2, 1));
        assert_eq!(counts, vec![1, 1]);
    }

    #[test]
    fn a_full_mesh_delivers_each_datagram_once_per_network() {
        let now = Instant::now();
        let mut lab = Lab::new(&[0, 0, 1, 1], &[(0, 2), (0, 3), (1, 2), (1, 3)]);
        let counts = lab.inject(now, 0, &datagram(1, 1));
        assert!(counts[0] == 1 && counts[1] <= 4, "{counts:?}");
        lab.settle(now);
        exactly_once(&mut lab, now, 50);
        // Three networks, two repeaters each, everyone peered with every remote repeater.
        let placement = [0, 0, 1, 1, 2, 2];
        let links: Vec<(usize, usize)> = (0..6)
            .flat_map(|a| (a + 1..6).map(move |b| (a, b)))
            .filter(|&(a, b)| placement[a] != placement[b])
            .collect();
        let mut lab = Lab::new(&placement, &links);
        lab.settle(now);
        exactly_once(&mut lab, now, 50);
    }

    #[test]
    fn when_a_forwarder_fails_the_standby_takes_over() {
        let now = Instant::now();
        let mut lab = Lab::new(&[0, 0, 1, 1], &[(0, 2), (0, 3), (1, 2), (1, 3)]);
        lab.settle(now);
        exactly_once(&mut lab, now, 10);
        // A's forwarder (the lowest id, repeater 0) dies, then B's.
        lab.relays[0].3 = false;
        let later = now + FORWARDER_TIMEOUT + Duration::from_millis(1);
        lab.settle(later);
        exactly_once(&mut lab, later, 10);
        lab.relays[2].3 = false;
        let later = later + PEER_TIMEOUT + Duration::from_millis(1);
        lab.settle(later);
        exactly_once(&mut lab, later, 10);
    }
}
