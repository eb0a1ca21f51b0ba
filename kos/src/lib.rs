//! KOS, the client side of gvd: an application on one host reaches the VDEVs of another.
//!
//! The node list gvd keeps (`GV_NODES_PATH`, [`nodes`]) says which node exposes which VDEV
//! and where its KOS listener is; a [`client::Connection`] (blocking) or
//! [`client::AsyncConnection`] (tokio) speaks the CONN protocol ([`proto`], docs/KOS.md) to
//! the agent process the node starts for this connection; [`Kos`] puts both together and
//! keeps one connection per node.
//!
//! ```no_run
//! use grapevine_kos::Kos;
//! let mut kos = Kos::from_env();
//! let echo = kos.open(None, "echo0")?;
//! let answer = kos.call(&echo, "reverse", b"hello")?;
//! assert_eq!(answer, b"olleh");
//! # Ok::<(), grapevine_kos::KosError>(())
//! ```

pub mod client;
pub mod proto;

pub use grapevine_gvd_schema::{nodes, secure};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use client::{ConnectOptions, Connection, Handle};
use nodes::{NodesFile, VdevLocation};
use proto::{ErrorKind, ProtoError};

/// Where gvd keeps the node list unless `GV_NODES_PATH` says otherwise.
pub const DEFAULT_NODES_PATH: &str = "/var/lib/gvd/nodes.json";

/// Why a KOS operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KosError {
    /// The node list could not be used.
    #[error("node list {path}: {reason}")]
    NodeList {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        reason: String,
    },
    /// No node exposes the VDEV (with a KOS listener).
    #[error("no VDEV {vdev}{} in the node list", node.as_ref().map(|n| format!(" on {n}")).unwrap_or_default())]
    NotFound {
        /// The VDEV asked for.
        vdev: String,
        /// The node asked for, if any.
        node: Option<String>,
    },
    /// Several nodes expose it: name one.
    #[error("VDEV {vdev} is on several nodes ({}): name one", nodes.join(", "))]
    Ambiguous {
        /// The VDEV.
        vdev: String,
        /// The nodes exposing it.
        nodes: Vec<String>,
    },
    /// The node's KOS listener could not be reached.
    #[error("cannot connect to {address}: {error}")]
    Connect {
        /// Where.
        address: SocketAddr,
        /// Why.
        error: std::io::Error,
    },
    /// The node does not hold our network key, or we do not hold its key.
    #[error("authentication failed: {0}")]
    Authentication(String),
    /// The agent refused the request.
    #[error("{message} ({kind:?})")]
    Remote {
        /// What kind of refusal.
        kind: ErrorKind,
        /// Details.
        message: String,
    },
    /// The connection ended: the agent exited (a driver crashed it, or it timed out) or the
    /// node went away. Open again to get a new agent.
    #[error("the connection was closed by the node (its agent ended)")]
    Closed,
    /// No answer within the reply timeout.
    #[error("no answer within the reply timeout")]
    Timeout,
    /// A frame could not be read or written.
    #[error(transparent)]
    Proto(#[from] ProtoError),
    /// The agent answered something that does not fit the request.
    #[error("unexpected answer: {0}")]
    Unexpected(String),
    /// Socket error.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// An open VDEV reached through [`Kos`].
#[derive(Clone, Debug)]
pub struct RemoteVdev {
    /// Where it lives.
    pub location: VdevLocation,
    /// Its handle on the node's connection.
    pub handle: Handle,
}

/// Reaches VDEVs by name through the node list, one connection per node.
#[derive(Debug)]
pub struct Kos {
    nodes_path: PathBuf,
    options: ConnectOptions,
    connections: HashMap<SocketAddr, Connection>,
}

impl Kos {
    /// A KOS reading the node list at `nodes_path`.
    pub fn new(nodes_path: impl AsRef<Path>, options: ConnectOptions) -> Self {
        Self {
            nodes_path: nodes_path.as_ref().to_path_buf(),
            options,
            connections: HashMap::new(),
        }
    }

    /// A KOS reading `GV_NODES_PATH` (or [`DEFAULT_NODES_PATH`]) with default options.
    pub fn from_env() -> Self {
        let path = std::env::var_os("GV_NODES_PATH")
            .map_or_else(|| PathBuf::from(DEFAULT_NODES_PATH), PathBuf::from);
        Self::new(path, ConnectOptions::default())
    }

    /// The node list as it is now.
    ///
    /// # Errors
    ///
    /// [`KosError::NodeList`].
    pub fn nodes(&self) -> Result<NodesFile, KosError> {
        NodesFile::read(&self.nodes_path).map_err(|e| KosError::NodeList {
            path: e.path,
            reason: e.reason,
        })
    }

    /// Opens `vdev` on `node` (a name or hex id), or on the only node exposing it. The node's
    /// connection is made on first use and reused afterwards; a broken one is replaced.
    ///
    /// # Errors
    ///
    /// [`KosError::NotFound`], [`KosError::Ambiguous`], or what connecting and opening say.
    pub fn open(&mut self, node: Option<&str>, vdev: &str) -> Result<RemoteVdev, KosError> {
        let mut found = self.nodes()?.locate(node, vdev);
        let location = match found.len() {
            0 => {
                return Err(KosError::NotFound {
                    vdev: vdev.into(),
                    node: node.map(Into::into),
                })
            }
            1 => found.remove(0),
            _ => {
                return Err(KosError::Ambiguous {
                    vdev: vdev.into(),
                    nodes: found.into_iter().map(|l| l.node).collect(),
                })
            }
        };
        let connection = self.connection(location.address)?;
        let opened = connection.open(vdev, Some(&location.driver));
        let handle = self.keep_if_alive(location.address, opened)?;
        Ok(RemoteVdev { location, handle })
    }

    /// Calls `function` of an open VDEV.
    ///
    /// # Errors
    ///
    /// [`KosError::Closed`] when the agent ended (open the VDEV again for a new one), or the
    /// driver's error.
    pub fn call(
        &mut self,
        vdev: &RemoteVdev,
        function: &str,
        args: &[u8],
    ) -> Result<Vec<u8>, KosError> {
        let address = vdev.location.address;
        let connection = self.connections.get_mut(&address).ok_or(KosError::Closed)?;
        let result = connection.call(vdev.handle, function, args);
        self.keep_if_alive(address, result)
    }

    fn connection(&mut self, address: SocketAddr) -> Result<&mut Connection, KosError> {
        if !self.connections.contains_key(&address) {
            let connection = Connection::connect(address, &self.options)?;
            self.connections.insert(address, connection);
        }
        self.connections.get_mut(&address).ok_or(KosError::Closed)
    }

    /// Forgets a connection that broke, so the next open makes a new one.
    fn keep_if_alive<T>(
        &mut self,
        address: SocketAddr,
        result: Result<T, KosError>,
    ) -> Result<T, KosError> {
        if matches!(
            result,
            Err(KosError::Closed | KosError::Io(_) | KosError::Timeout | KosError::Proto(_))
        ) {
            self.connections.remove(&address);
        }
        result
    }
}
