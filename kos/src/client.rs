//! Connections to a node's agent: blocking ([`Connection`]) and async ([`AsyncConnection`]).
//! Requests are answered in order, one at a time per connection.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use crate::proto::{
    decode, encode_frame, frame_len, Reply, Request, DEFAULT_MAX_FRAME, FRAME_HEADER_LEN,
    PROTOCOL_VERSION,
};
use crate::secure::{AsyncLink, Link, PortKey, Purpose};
use crate::KosError;

/// An open VDEV on a connection.
#[derive(Clone, Copy, Debug, Eq, Hash, PartialEq)]
pub struct Handle(pub u32);

/// Settings of a connection.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ConnectOptions {
    /// Who is connecting, for the agent's logs. Default: this program's name and pid.
    pub client: String,
    /// How long connecting may take. Default 5 s.
    pub connect_timeout: Duration,
    /// How long an answer may take (a driver call included). Default 30 s.
    pub reply_timeout: Duration,
    /// Largest reply accepted. Default 16 MiB.
    pub max_frame: usize,
    /// The network key, when the nodes have one: the connection is then authenticated and
    /// encrypted (see [`crate::secure`]). Default: none (plain TCP).
    pub key: Option<PortKey>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        let program = std::env::args()
            .next()
            .and_then(|p| {
                std::path::Path::new(&p)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
            })
            .unwrap_or_else(|| "kos".into());
        Self {
            client: format!("{program}[{}]", std::process::id()),
            connect_timeout: Duration::from_secs(5),
            reply_timeout: Duration::from_secs(30),
            max_frame: DEFAULT_MAX_FRAME,
            key: None,
        }
    }
}

/// What the agent said when it accepted the connection.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Accepted {
    /// The node serving the connection.
    pub node_id: u64,
    /// The agent process serving it.
    pub agent_pid: u32,
}

/// Request ids and reply checks, shared by the blocking and async connections.
#[derive(Debug, Default)]
struct Requests {
    next_id: u64,
    out: Vec<u8>,
}

impl Requests {
    fn frame(&mut self, make: impl FnOnce(u64) -> Request) -> Result<(u64, &[u8]), KosError> {
        self.next_id += 1;
        let id = self.next_id;
        self.out.clear();
        encode_frame(&make(id), &mut self.out)?;
        Ok((id, &self.out))
    }

    fn conn(&mut self, client: &str) -> Result<&[u8], KosError> {
        self.out.clear();
        encode_frame(
            &Request::Conn {
                version: PROTOCOL_VERSION,
                client: client.to_string(),
            },
            &mut self.out,
        )?;
        Ok(&self.out)
    }
}

fn accepted(reply: Reply) -> Result<Accepted, KosError> {
    match reply {
        Reply::Conn {
            version,
            node_id,
            agent_pid,
        } if version == PROTOCOL_VERSION => Ok(Accepted { node_id, agent_pid }),
        Reply::Conn { version, .. } => Err(KosError::Unexpected(format!(
            "agent answered with protocol version {version}, this KOS speaks {PROTOCOL_VERSION}"
        ))),
        Reply::Error { kind, message, .. } => Err(KosError::Remote { kind, message }),
        other => Err(KosError::Unexpected(format!("{other:?} before CONN"))),
    }
}

/// Checks that `reply` answers request `id`; turns errors into [`KosError::Remote`].
fn answer(id: u64, reply: Reply) -> Result<Reply, KosError> {
    let replied = match &reply {
        Reply::Opened { id, .. }
        | Reply::Result { id, .. }
        | Reply::Closed { id }
        | Reply::Pong { id } => Some(*id),
        Reply::Error { id, .. } => *id,
        Reply::Conn { .. } => None,
    };
    match reply {
        Reply::Error { kind, message, .. } if replied.is_none_or(|r| r == id) => {
            Err(KosError::Remote { kind, message })
        }
        reply if replied == Some(id) => Ok(reply),
        other => Err(KosError::Unexpected(format!(
            "{other:?} in answer to request {id}"
        ))),
    }
}

fn closed_or(error: std::io::Error) -> KosError {
    match error.kind() {
        std::io::ErrorKind::UnexpectedEof
        | std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe => KosError::Closed,
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => KosError::Timeout,
        std::io::ErrorKind::PermissionDenied => KosError::Authentication(error.to_string()),
        _ => KosError::Io(error),
    }
}

/// A blocking connection to the agent serving this KOS on a node.
///
/// ```no_run
/// use grapevine_kos::client::{Connection, ConnectOptions};
/// let mut connection = Connection::connect("127.0.0.1:7174".parse()?, &ConnectOptions::default())?;
/// let echo = connection.open("echo0", None)?;
/// assert_eq!(connection.call(echo, "reverse", b"abc")?, b"cba");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct Connection {
    stream: Link,
    accepted: Accepted,
    requests: Requests,
    body: Vec<u8>,
    max_frame: usize,
}

impl Connection {
    /// Connects and says CONN.
    ///
    /// # Errors
    ///
    /// [`KosError`]: unreachable, refused (too many connections, version mismatch), timeout.
    pub fn connect(address: SocketAddr, options: &ConnectOptions) -> Result<Self, KosError> {
        let stream = TcpStream::connect_timeout(&address, options.connect_timeout)
            .map_err(|e| KosError::Connect { address, error: e })?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(options.reply_timeout))?;
        let stream = crate::secure::connect(stream, options.key.as_ref(), Purpose::Kos)
            .map_err(closed_or)?;
        let mut connection = Self {
            stream,
            accepted: Accepted {
                node_id: 0,
                agent_pid: 0,
            },
            requests: Requests::default(),
            body: Vec::new(),
            max_frame: options.max_frame,
        };
        let hello = connection.requests.conn(&options.client)?;
        connection.stream.write_all(hello).map_err(closed_or)?;
        let reply = connection.read_reply()?;
        connection.accepted = accepted(reply)?;
        Ok(connection)
    }

    /// Who accepted the connection.
    pub fn accepted(&self) -> Accepted {
        self.accepted
    }

    /// Opens a VDEV of the node (also one that appeared after connecting).
    ///
    /// # Errors
    ///
    /// [`KosError::Remote`] with [`crate::proto::ErrorKind::NoSuchVdev`] and the like.
    pub fn open(&mut self, vdev: &str, driver: Option<&str>) -> Result<Handle, KosError> {
        let reply = self.request(|id| Request::Open {
            id,
            vdev: vdev.into(),
            driver: driver.map(Into::into),
        })?;
        match reply {
            Reply::Opened { handle, .. } => Ok(Handle(handle)),
            other => Err(KosError::Unexpected(format!("{other:?} to OPEN"))),
        }
    }

    /// Calls `function` of an open VDEV.
    ///
    /// # Errors
    ///
    /// [`KosError::Remote`] for the driver's errors, [`KosError::Closed`] when the agent ended
    /// (a driver crashed it).
    pub fn call(
        &mut self,
        handle: Handle,
        function: &str,
        args: &[u8],
    ) -> Result<Vec<u8>, KosError> {
        let reply = self.request(|id| Request::Call {
            id,
            handle: handle.0,
            function: function.into(),
            args: args.to_vec(),
        })?;
        match reply {
            Reply::Result { data, .. } => Ok(data),
            other => Err(KosError::Unexpected(format!("{other:?} to CALL"))),
        }
    }

    /// Closes a handle.
    ///
    /// # Errors
    ///
    /// [`KosError::Remote`] when it was not open.
    pub fn close(&mut self, handle: Handle) -> Result<(), KosError> {
        self.request(|id| Request::Close {
            id,
            handle: handle.0,
        })
        .map(drop)
    }

    /// Round trip to the agent.
    ///
    /// # Errors
    ///
    /// When the connection is broken.
    pub fn ping(&mut self) -> Result<Duration, KosError> {
        let started = Instant::now();
        self.request(|id| Request::Ping { id })?;
        Ok(started.elapsed())
    }

    fn request(&mut self, make: impl FnOnce(u64) -> Request) -> Result<Reply, KosError> {
        let (id, frame) = self.requests.frame(make)?;
        self.stream.write_all(frame).map_err(closed_or)?;
        let reply = self.read_reply()?;
        answer(id, reply)
    }

    fn read_reply(&mut self) -> Result<Reply, KosError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        self.stream.read_exact(&mut header).map_err(closed_or)?;
        let len = frame_len(header, self.max_frame)?;
        self.body.resize(len, 0);
        self.stream.read_exact(&mut self.body).map_err(closed_or)?;
        Ok(decode(&self.body)?)
    }
}

/// An async (tokio) connection to the agent serving this KOS on a node.
///
/// ```no_run
/// # async fn demo() -> Result<(), grapevine_kos::KosError> {
/// use grapevine_kos::client::{AsyncConnection, ConnectOptions};
/// let address = "127.0.0.1:7174".parse().unwrap();
/// let mut connection = AsyncConnection::connect(address, &ConnectOptions::default()).await?;
/// let echo = connection.open("echo0", None).await?;
/// assert_eq!(connection.call(echo, "echo", b"hi").await?, b"hi");
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AsyncConnection {
    stream: AsyncLink<tokio::net::TcpStream>,
    accepted: Accepted,
    requests: Requests,
    body: Vec<u8>,
    max_frame: usize,
    reply_timeout: Duration,
}

impl AsyncConnection {
    /// Connects and says CONN.
    ///
    /// # Errors
    ///
    /// As [`Connection::connect`].
    pub async fn connect(address: SocketAddr, options: &ConnectOptions) -> Result<Self, KosError> {
        let stream = tokio::time::timeout(
            options.connect_timeout,
            tokio::net::TcpStream::connect(address),
        )
        .await
        .map_err(|_| KosError::Timeout)?
        .map_err(|e| KosError::Connect { address, error: e })?;
        stream.set_nodelay(true)?;
        let stream = AsyncLink::connect(stream, options.key.as_ref(), Purpose::Kos)
            .await
            .map_err(closed_or)?;
        let mut connection = Self {
            stream,
            accepted: Accepted {
                node_id: 0,
                agent_pid: 0,
            },
            requests: Requests::default(),
            body: Vec::new(),
            max_frame: options.max_frame,
            reply_timeout: options.reply_timeout,
        };
        let hello = connection.requests.conn(&options.client)?;
        connection
            .stream
            .write_all(hello)
            .await
            .map_err(closed_or)?;
        let reply = connection.read_reply().await?;
        connection.accepted = accepted(reply)?;
        Ok(connection)
    }

    /// Who accepted the connection.
    pub fn accepted(&self) -> Accepted {
        self.accepted
    }

    /// As [`Connection::open`].
    ///
    /// # Errors
    ///
    /// As [`Connection::open`].
    pub async fn open(&mut self, vdev: &str, driver: Option<&str>) -> Result<Handle, KosError> {
        let reply = self
            .request(|id| Request::Open {
                id,
                vdev: vdev.into(),
                driver: driver.map(Into::into),
            })
            .await?;
        match reply {
            Reply::Opened { handle, .. } => Ok(Handle(handle)),
            other => Err(KosError::Unexpected(format!("{other:?} to OPEN"))),
        }
    }

    /// As [`Connection::call`].
    ///
    /// # Errors
    ///
    /// As [`Connection::call`].
    pub async fn call(
        &mut self,
        handle: Handle,
        function: &str,
        args: &[u8],
    ) -> Result<Vec<u8>, KosError> {
        let reply = self
            .request(|id| Request::Call {
                id,
                handle: handle.0,
                function: function.into(),
                args: args.to_vec(),
            })
            .await?;
        match reply {
            Reply::Result { data, .. } => Ok(data),
            other => Err(KosError::Unexpected(format!("{other:?} to CALL"))),
        }
    }

    /// As [`Connection::close`].
    ///
    /// # Errors
    ///
    /// As [`Connection::close`].
    pub async fn close(&mut self, handle: Handle) -> Result<(), KosError> {
        self.request(|id| Request::Close {
            id,
            handle: handle.0,
        })
        .await
        .map(drop)
    }

    /// As [`Connection::ping`].
    ///
    /// # Errors
    ///
    /// As [`Connection::ping`].
    pub async fn ping(&mut self) -> Result<Duration, KosError> {
        let started = Instant::now();
        self.request(|id| Request::Ping { id }).await?;
        Ok(started.elapsed())
    }

    async fn request(&mut self, make: impl FnOnce(u64) -> Request) -> Result<Reply, KosError> {
        let (id, frame) = self.requests.frame(make)?;
        self.stream.write_all(frame).await.map_err(closed_or)?;
        let reply = tokio::time::timeout(self.reply_timeout, self.read_reply())
            .await
            .map_err(|_| KosError::Timeout)??;
        answer(id, reply)
    }

    async fn read_reply(&mut self) -> Result<Reply, KosError> {
        let mut header = [0u8; FRAME_HEADER_LEN];
        self.stream
            .read_exact(&mut header)
            .await
            .map_err(closed_or)?;
        let len = frame_len(header, self.max_frame)?;
        self.body.resize(len, 0);
        self.stream
            .read_exact(&mut self.body)
            .await
            .map_err(closed_or)?;
        Ok(decode(&self.body)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::ErrorKind;

    #[test]
    fn replies_must_answer_the_request() {
        assert!(answer(3, Reply::Pong { id: 3 }).is_ok());
        assert!(matches!(
            answer(3, Reply::Pong { id: 2 }),
            Err(KosError::Unexpected(_))
        ));
        let error = Reply::Error {
            id: None,
            kind: ErrorKind::UnknownMessage,
            message: "x".into(),
        };
        assert!(matches!(
            answer(3, error),
            Err(KosError::Remote {
                kind: ErrorKind::UnknownMessage,
                ..
            })
        ));
    }
}
