//! gvd's KOS listener: accepts CONN connections and starts one agent process per connection
//! (`gvd agent`, with the socket as its standard input), up to a configured number.

use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use grapevine_kos::proto::{encode_frame, ErrorKind, Reply};
use grapevine_kos::secure::{PortKey, Purpose};
use parking_lot::Mutex;

/// Settings of the listener and of the agents it starts.
#[derive(Clone, Debug)]
pub struct KosOptions {
    /// Where to listen.
    pub address: SocketAddr,
    /// Most agents alive at once; further connections are refused with an error.
    pub max_agents: usize,
    /// Most agents alive at once for one client address.
    pub max_agents_per_source: usize,
    /// The network key file, handed to agents (they run the handshake).
    pub key_file: Option<PathBuf>,
    /// The key derived from it, to refuse connections in a way keyed clients can read.
    pub port_key: Option<PortKey>,
    /// Longest a driver call may run.
    pub call_timeout: Duration,
    /// Largest request frame.
    pub max_frame: usize,
    /// The node serving.
    pub node_id: u64,
    /// The inventory file agents read.
    pub inventory_path: PathBuf,
    /// The `gvd` executable (agents are `gvd agent`).
    pub exe: PathBuf,
}

/// Counters of the listener.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct KosStats {
    /// Connections accepted and given an agent.
    pub accepted: u64,
    /// Connections refused because `max_agents` were running.
    pub refused: u64,
    /// Agents that could not be started.
    pub failed: u64,
}

/// A running KOS listener.
pub struct KosListener {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    agents: Arc<Mutex<Vec<(Child, IpAddr)>>>,
    accepted: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
}

impl KosListener {
    /// Binds and starts accepting.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound.
    pub fn start(settings: KosOptions) -> Result<Self> {
        let listener = TcpListener::bind(settings.address)
            .with_context(|| format!("cannot listen for KOS on {}", settings.address))?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let agents: Arc<Mutex<Vec<(Child, IpAddr)>>> = Arc::default();
        let (accepted, refused, failed) = (Arc::default(), Arc::default(), Arc::default());
        let thread = {
            let stop = Arc::clone(&stop);
            let agents = Arc::clone(&agents);
            let counters = (
                Arc::clone(&accepted),
                Arc::clone(&refused),
                Arc::clone(&failed),
            );
            std::thread::Builder::new()
                .name("kos-accept".into())
                .spawn(move || accept_loop(&listener, &settings, &stop, &agents, &counters))?
        };
        tracing::info!(%address, "KOS listener started");
        Ok(Self {
            address,
            stop,
            thread: Some(thread),
            agents,
            accepted,
            refused,
            failed,
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Agents alive now (finished ones are reaped first).
    pub fn agents(&self) -> Vec<u32> {
        let mut agents = self.agents.lock();
        reap(&mut agents);
        agents.iter().map(|(agent, _)| agent.id()).collect()
    }

    /// Counters.
    pub fn stats(&self) -> KosStats {
        KosStats {
            accepted: self.accepted.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
        }
    }

    /// Stops accepting and ends the agents it started.
    pub fn shutdown(mut self) {
        self.stop_all();
    }

    fn stop_all(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
        if let Some(thread) = self.thread.take() {
            // A panic in the thread was already reported by the panic hook.
            let _ = thread.join();
        }
        for (mut agent, _) in self.agents.lock().drain(..) {
            // It may have ended already: then there is nothing to kill.
            let _ = agent.kill();
            // Reaps it; an error means it was reaped already.
            let _ = agent.wait();
        }
    }
}

impl Drop for KosListener {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn reap(agents: &mut Vec<(Child, IpAddr)>) {
    agents.retain_mut(|(agent, _)| match agent.try_wait() {
        Ok(Some(status)) => {
            tracing::debug!(pid = agent.id(), %status, "agent ended");
            false
        }
        Ok(None) => true,
        Err(_) => false,
    });
}

fn accept_loop(
    listener: &TcpListener,
    settings: &KosOptions,
    stop: &AtomicBool,
    agents: &Mutex<Vec<(Child, IpAddr)>>,
    (accepted, refused, failed): &(Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>),
) {
    let refusing = Arc::new(AtomicU64::new(0));
    while !stop.load(Ordering::Relaxed) {
        let (stream, peer) = match listener.accept() {
            Ok(connection) => connection,
            Err(error) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(%error, "KOS accept failed");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stop.load(Ordering::Relaxed) {
            return;
        }
        let mut agents = agents.lock();
        reap(&mut agents);
        let from_peer = agents
            .iter()
            .filter(|(_, source)| *source == peer.ip())
            .count();
        let full = if agents.len() >= settings.max_agents {
            Some(format!(
                "this node serves {} KOS connections, its limit; try later",
                settings.max_agents
            ))
        } else if from_peer >= settings.max_agents_per_source {
            Some(format!(
                "this node serves {} KOS connections from {}, its limit per address; try later",
                settings.max_agents_per_source,
                peer.ip()
            ))
        } else {
            None
        };
        if let Some(message) = full {
            refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, "KOS connection refused: {message}");
            refuse(stream, message, settings.port_key.as_ref(), &refusing);
            continue;
        }
        match spawn_agent(stream, settings, &peer) {
            Ok(child) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, pid = child.id(), "agent started");
                agents.push((child, peer.ip()));
            }
            Err(error) => {
                failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%peer, %error, "cannot start an agent");
            }
        }
    }
}

/// Most refusals being written at once; past that, connections are just closed.
const MAX_REFUSING: u64 = 16;

/// Tells the client why it is refused: at once without a key; with one, after the client's
/// handshake (a keyed client reads nothing else), on a thread of its own bounded in number
/// and time so that refusing cannot be used to tie the listener up.
fn refuse(stream: TcpStream, message: String, key: Option<&PortKey>, refusing: &Arc<AtomicU64>) {
    use std::io::Write;
    let mut frame = Vec::new();
    let reply = Reply::Error {
        id: None,
        kind: ErrorKind::TooManyConnections,
        message,
    };
    if encode_frame(&reply, &mut frame).is_err() {
        return;
    }
    // Without the timeout the connection still works, only slower to notice a dead peer.
    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
    let Some(key) = key.cloned() else {
        // A refusal to a client that went away needs no answer.
        let _ = (&stream).write_all(&frame);
        return;
    };
    if refusing.fetch_add(1, Ordering::AcqRel) >= MAX_REFUSING {
        refusing.fetch_sub(1, Ordering::AcqRel);
        return;
    }
    let counter = Arc::clone(refusing);
    let spawned = std::thread::Builder::new()
        .name("kos-refuse".into())
        .spawn(move || {
            if let Ok(mut link) = grapevine_kos::secure::accept(stream, Some(&key), Purpose::Kos) {
                // A refusal to a client that went away needs no answer.
                let _ = link.write_all(&frame);
            }
            counter.fetch_sub(1, Ordering::AcqRel);
        });
    if spawned.is_err() {
        // The closure, and its decrement, never ran.
        refusing.fetch_sub(1, Ordering::AcqRel);
        tracing::warn!("cannot start a thread to refuse a KOS connection; closed instead");
    }
}

fn spawn_agent(
    stream: TcpStream,
    settings: &KosOptions,
    peer: &SocketAddr,
) -> std::io::Result<Child> {
    let socket = OwnedFd::from(stream);
    Command::new(&settings.exe)
        .arg("agent")
        .arg("--node-id")
        .arg(format!("{:016x}", settings.node_id))
        .arg("--inventory")
        .arg(&settings.inventory_path)
        .arg("--call-timeout-ms")
        .arg(settings.call_timeout.as_millis().to_string())
        .arg("--max-frame")
        .arg(settings.max_frame.to_string())
        .arg("--peer")
        .arg(peer.to_string())
        .args(
            settings
                .key_file
                .iter()
                .flat_map(|path| [std::ffi::OsStr::new("--key-file"), path.as_os_str()]),
        )
        .stdin(Stdio::from(socket))
        .stdout(Stdio::null())
        .spawn()
}

/// The inventory file of a state directory (written by gvd, read by its agents).
pub fn inventory_path(state_dir: &Path) -> PathBuf {
    state_dir.join("inventory.json")
}
