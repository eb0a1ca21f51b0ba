//! Stream repeaters: relay chosen topics between a local multicast group and repeaters on
//! other networks over unicast UDP or QUIC ([`WanTransport`]), datagrams untouched (same framing, session ids, sequence
//! numbers and authentication tags), so subscribers on the far side see the same streams and
//! recover from the same snapshots.
//!
//! Loops cannot form, by construction rather than by timing:
//!
//! * **One forwarder per network.** Repeaters on the same local group announce themselves there
//!   every [`HELLO_INTERVAL`] (a probe datagram, which subscribers ignore); the one with the
//!   lowest id heard within [`FORWARDER_TIMEOUT`] is the network's forwarder and the only one
//!   that relays local traffic out. The others stand by and take over when it goes silent.
//! * **One copy per remote network.** Keepalives between repeaters carry the sender's id and
//!   its network's forwarder, so a forwarder sends each datagram to one repeater per remote
//!   network (the remote forwarder when it is a peer), not to every peer.
//! * **Copies recognised by content, whoever relayed them.** Every datagram seen, from either
//!   side and any path, is remembered by digest for [`LOOP_MEMORY`]: a copy of it is not relayed
//!   or emitted again within that time, so a datagram that comes back around any cycle of
//!   repeaters stops at the first repeater that saw it. (Legitimately identical datagrams, a
//!   quiet publisher's heartbeats, then cross at most once per `LOOP_MEMORY`, well within a
//!   subscriber's publisher timeout.) The digest is a keyed 128-bit `foldhash`, seeded per
//!   repeater: cheap next to moving the datagram, and not aimable by strangers.
//! * **Its own emissions never come back.** The group loops what a repeater emits back to its
//!   own receiving socket; a BPF filter on that socket drops them in the kernel
//!   ([`MulticastSocket::ignore_source`](grapevine_core::net::MulticastSocket::ignore_source)).
//!
//! Over QUIC (`quinn`) each peer gets one connection; relayed datagrams ride as QUIC datagrams,
//! so the link's congestion controller paces them (when it is full the oldest queued datagram
//! gives way, counted in [`RepeaterStats::congestion_drops`], and subscribers recover from the
//! snapshot cycle), and datagrams larger than a QUIC packet ride one stream. Peers prove they
//! hold the shared link key over the TLS session's exported keying material.
//!
//! [`Relay`] is that logic without I/O; [`Repeater`] runs it on sockets.
//!
//! ```no_run
//! use grapevine_core::net::MulticastConfig;
//! use grapevine_repeater::{Repeater, RepeaterOptions};
//! let local = MulticastConfig::new("239.255.70.86:7086".parse()?);
//! let options = RepeaterOptions::new(local, "10.0.0.1:7190".parse()?, vec!["192.0.2.7:7190".parse()?]);
//! let repeater = Repeater::start(options)?;
//! println!("{:?}", repeater.stats());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod quic;
mod relay;
mod sockets;

pub use quic::QuicPath;
pub use relay::{
    Relay, Verdict, FORWARDER_TIMEOUT, HELLO_INTERVAL, HELLO_PUBLISHER, LOOP_MEMORY, PEER_TIMEOUT,
};
pub use sockets::{
    PeerLink, Repeater, RepeaterError, RepeaterOptions, RepeaterStats, WanTransport,
};
