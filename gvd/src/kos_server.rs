//! gvd's KOS listener: accepts CONN connections and starts one agent process per connection
//! (`gvd agent`, with the socket as its standard input), up to a configured number.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{Context, Result};
use grapevine_kos::proto::{encode_frame, ErrorKind, Reply};
use parking_lot::Mutex;

/// Settings of the listener and of the agents it starts.
#[derive(Clone, Debug)]
pub struct KosSettings {
    /// Where to listen.
    pub address: SocketAddr,
    /// Most agents alive at once; further connections are refused with an error.
    pub max_agents: usize,
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
    agents: Arc<Mutex<Vec<Child>>>,
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
    pub fn start(settings: KosSettings) -> Result<Self> {
        let listener = TcpListener::bind(settings.address)
            .with_context(|| format!("cannot listen for KOS on {}", settings.address))?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let agents: Arc<Mutex<Vec<Child>>> = Arc::default();
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
        agents.iter().map(Child::id).collect()
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
            let _ = thread.join();
        }
        for mut agent in self.agents.lock().drain(..) {
            let _ = agent.kill();
            let _ = agent.wait();
        }
    }
}

impl Drop for KosListener {
    fn drop(&mut self) {
        self.stop_all();
    }
}

fn reap(agents: &mut Vec<Child>) {
    agents.retain_mut(|agent| match agent.try_wait() {
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
    settings: &KosSettings,
    stop: &AtomicBool,
    agents: &Mutex<Vec<Child>>,
    (accepted, refused, failed): &(Arc<AtomicU64>, Arc<AtomicU64>, Arc<AtomicU64>),
) {
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
        if agents.len() >= settings.max_agents {
            refused.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(%peer, max = settings.max_agents, "KOS connection refused: too many agents");
            refuse(
                stream,
                format!(
                    "this node serves {} KOS connections, its limit; try later",
                    settings.max_agents
                ),
            );
            continue;
        }
        match spawn_agent(stream, settings, &peer) {
            Ok(child) => {
                accepted.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, pid = child.id(), "agent started");
                agents.push(child);
            }
            Err(error) => {
                failed.fetch_add(1, Ordering::Relaxed);
                tracing::error!(%peer, %error, "cannot start an agent");
            }
        }
    }
}

fn refuse(mut stream: TcpStream, message: String) {
    use std::io::Write;
    let mut frame = Vec::new();
    let reply = Reply::Error {
        id: None,
        kind: ErrorKind::TooManyConnections,
        message,
    };
    if encode_frame(&reply, &mut frame).is_ok() {
        let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
        let _ = stream.write_all(&frame);
    }
}

fn spawn_agent(
    stream: TcpStream,
    settings: &KosSettings,
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
        .stdin(Stdio::from(socket))
        .stdout(Stdio::null())
        .spawn()
}

/// The inventory file of a state directory (written by gvd, read by its agents).
pub fn inventory_path(state_dir: &Path) -> PathBuf {
    state_dir.join("inventory.json")
}
