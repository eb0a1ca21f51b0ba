//! gvd, the GrapeVine daemon. This version inventories VDRIVERs (it finds driver libraries in
//! `VDRIVER_PATH`, checks each one in a child process, lists the virtual devices they expose
//! and computes `unique`) and runs echolocation: every node announces its record on the ELP
//! topic and keeps the list of live nodes in a file for local readers. It serves KOS clients
//! (crate `grapevine-kos`) through one agent process per connection, and GrapeVineFS zones
//! (crate `grapevine-fs`) over NFS.
//!
//! # Layout
//!
//! - [`vdriver`]: the C ABI of docs/VDRIVER.md, loading a library and calling it (used inside
//!   the probe and agent processes, never by the daemon itself).
//! - [`inventory`]: scanning directories, probing each driver in a child process, `unique`.
//! - [`elp`]: the node records and VDEV lists of echolocation and the alive / suspect / dead
//!   detector.
//! - [`query`]: QUERY, the request for a snapshot cycle now.
//! - [`kos_server`]: the KOS listener, which starts an agent process per connection.
//! - [`dht`]: finding nodes on other networks through a BEP-5 DHT (`mainline`).
//! - [`agent`]: the agent: the CONN protocol's server side, on the drivers it loads.
//! - [`config`]: the settings schema, its validation and the durations it implies.
//! - [`admin`]: the status page, JSON status and Prometheus metrics endpoint.
//! - [`peers`]: the peer table's decisions without I/O (QUERYs due, zone offers, who may pull).
//! - [`daemon`]: the node id and the [`daemon::Daemon`] that announces, follows, answers
//!   QUERYs and keeps the node list file; `topic` bundles a topic's publisher, snapshotter and
//!   subscriber.

pub mod admin;
pub mod agent;
pub mod config;
pub mod daemon;
pub mod dht;
pub mod elp;
pub mod inventory;
pub mod kos_server;
pub mod peers;
pub mod query;
mod query_server;
mod topic;
pub mod vdriver;

/// The key gvd's TCP ports (KOS, replication) authenticate with, derived from the network key
/// so that the datagram-signing key itself is never used for anything else.
///
/// # Errors
///
/// When the keyring holds no shared key (gvd's network key must be one: every node signs).
pub fn port_key(
    keyring: &grapevine_core::auth::Keyring,
) -> Result<grapevine_kos::secure::PortKey, NotANetworkKey> {
    keyring
        .derive_key("grapevine gvd tcp ports 2026-12")
        .map(|key| grapevine_kos::secure::PortKey::from_network_key(&key))
        .ok_or(NotANetworkKey)
}

/// A key file given to gvd holds no shared key.
#[derive(Debug, thiserror::Error)]
#[error("gvd's key_file must hold a shared key (`<id>:<64 hex digits>`): every node signs with it")]
pub struct NotANetworkKey;
