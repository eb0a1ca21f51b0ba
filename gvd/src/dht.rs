//! Finding gvd nodes on other networks through a BitTorrent (BEP-5) DHT, with the `mainline`
//! crate. Each node announces itself on the info-hash of its network name and looks the same
//! hash up; the addresses found are the peers on other networks (for repeaters and KOS). With
//! no bootstrap node configured, nothing of this runs: a static peer list works without it.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mainline::{Dht, Id};
use parking_lot::Mutex;

/// The info-hash of a GrapeVine network: the first 20 bytes of BLAKE3 over its name.
pub fn network_hash(network: &str) -> Id {
    let hash = blake3::hash(format!("grapevine network {network}").as_bytes());
    let mut id = [0u8; 20];
    id.copy_from_slice(&hash.as_bytes()[..20]);
    Id::from(id)
}

/// Settings of [`DhtDiscovery`].
#[derive(Clone, Debug)]
pub struct DhtOptions {
    /// Bootstrap nodes (`host:port`); a private one for a private DHT.
    pub bootstrap: Vec<String>,
    /// Address to bind the DHT node to.
    pub bind: Ipv4Addr,
    /// The network name: nodes of the same name find each other (a role can be appended,
    /// `office#repeater`, to find only the nodes announcing that role).
    pub network: String,
    /// The port to announce (this node's KOS port).
    pub port: u16,
    /// How often to announce and look up again.
    pub interval: Duration,
}

/// A running DHT node announcing this gvd and collecting the others.
pub struct DhtDiscovery {
    found: Arc<Mutex<Vec<SocketAddr>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl DhtDiscovery {
    /// Starts the DHT node and its announce/lookup loop.
    ///
    /// # Errors
    ///
    /// When the DHT node cannot bind its socket.
    pub fn start(settings: DhtOptions) -> Result<Self> {
        let dht = Dht::builder()
            .bootstrap(&settings.bootstrap)
            .bind_address(settings.bind)
            .server_mode()
            .build()
            .context("cannot start the DHT node")?;
        let found: Arc<Mutex<Vec<SocketAddr>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (found, stop) = (Arc::clone(&found), Arc::clone(&stop));
            std::thread::Builder::new()
                .name("gvd-dht".into())
                .spawn(move || discovery_loop(&dht, &settings, &found, &stop))?
        };
        Ok(Self {
            found,
            stop,
            thread: Some(thread),
        })
    }

    /// The peers found at the last lookup.
    pub fn peers(&self) -> Vec<SocketAddr> {
        self.found.lock().clone()
    }
}

impl Drop for DhtDiscovery {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            // A panic in the thread was already reported by the panic hook.
            let _ = thread.join();
        }
    }
}

fn discovery_loop(
    dht: &Dht,
    settings: &DhtOptions,
    found: &Mutex<Vec<SocketAddr>>,
    stop: &AtomicBool,
) {
    let hash = network_hash(&settings.network);
    let mut next = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() < next {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        next = Instant::now() + settings.interval;
        if let Err(error) = dht.announce_peer(hash, Some(settings.port)) {
            tracing::debug!(%error, "DHT announce failed; retried");
        }
        let mut peers: Vec<SocketAddr> = dht
            .get_peers(hash)
            .flatten()
            .map(SocketAddr::V4)
            // This node's own announcement, when its address is known (bound to one).
            .filter(|p| !(p.port() == settings.port && p.ip() == settings.bind))
            .collect();
        peers.sort();
        peers.dedup();
        let mut current = found.lock();
        if *current != peers {
            tracing::info!(count = peers.len(), "DHT peers");
            *current = peers;
        }
    }
}
