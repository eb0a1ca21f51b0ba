//! The KOS agent: one process per KOS connection, serving OPEN / CALL / CLOSE / PING on it.
//!
//! gvd accepts the connection and starts `gvd agent` with the socket as its standard input
//! ([`crate::kos_server`]); the agent loads the drivers it needs, so a driver that crashes or
//! hangs takes only this agent down. With a network key the agent runs the handshake itself
//! ([`grapevine_kos::secure`]) before reading anything; with or without one, a connection must
//! complete it and send CONN within [`HANDSHAKE_TIMEOUT`] or the agent ends. The agent ends when the connection does, when a call
//! outlives the call timeout, or when gvd is gone.
//!
//! [`AgentSession`] is the protocol logic without I/O; [`serve`] runs it on a socket.
//!
//! Its length (over 600 lines) is ~150 lines of unit tests kept beside the sans-IO session they
//! test.

use std::collections::{BTreeMap, HashMap};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_kos::proto::{
    decode, encode_frame, frame_len, ErrorKind, ProtoError, Reply, Request, FRAME_HEADER_LEN,
    PROTOCOL_VERSION,
};
use grapevine_kos::secure::{Link, HANDSHAKE_TIMEOUT};
use parking_lot::Mutex;

use crate::inventory::Inventory;
use crate::vdriver::{Driver, DriverError, Vdev};

/// Most VDEVs one connection may hold open.
pub const MAX_OPEN: usize = 1024;

/// Where VDEVs are found and opened.
pub trait Devices {
    /// Finds `vdev` (of `driver`, if given) as it exists now; returns the driver's name and
    /// the device.
    ///
    /// # Errors
    ///
    /// The error kind and message to send back.
    fn find(
        &mut self,
        vdev: &str,
        driver: Option<&str>,
    ) -> Result<(String, Vdev), (ErrorKind, String)>;
}

/// What the I/O layer must do after a request.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Send this.
    Reply(Reply),
    /// Send this, then end the connection.
    ReplyAndClose(Reply),
    /// Run this driver call, then hand the outcome to [`AgentSession::call_done`].
    Call {
        /// Request id.
        id: u64,
        /// The driver's name.
        driver: String,
        /// The VDEV.
        vdev: String,
        /// The function.
        function: String,
        /// Its arguments.
        args: Vec<u8>,
    },
}

/// The protocol state of one KOS connection.
#[derive(Debug)]
pub struct AgentSession {
    node_id: u64,
    pid: u32,
    connected: bool,
    open: BTreeMap<u32, (String, String)>,
    next_handle: u32,
}

fn error(id: Option<u64>, kind: ErrorKind, message: impl Into<String>) -> Reply {
    Reply::Error {
        id,
        kind,
        message: message.into(),
    }
}

impl AgentSession {
    /// A session for the agent `pid` on node `node_id`.
    pub fn new(node_id: u64, pid: u32) -> Self {
        Self {
            node_id,
            pid,
            connected: false,
            open: BTreeMap::new(),
            next_handle: 1,
        }
    }

    /// Whether CONN went through.
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Handles one frame body.
    pub fn handle(&mut self, body: &[u8], devices: &mut dyn Devices) -> Action {
        self.handle_request(decode::<Request>(body), devices)
    }

    /// Handles one request, already decoded (or not decodable).
    pub fn handle_request(
        &mut self,
        request: Result<Request, ProtoError>,
        devices: &mut dyn Devices,
    ) -> Action {
        let request = match request {
            Ok(request) => request,
            Err(e) if !self.connected => {
                return Action::ReplyAndClose(error(
                    None,
                    ErrorKind::NotConnected,
                    format!("expected CONN first: {e}"),
                ))
            }
            Err(e) => {
                return Action::Reply(error(
                    None,
                    ErrorKind::UnknownMessage,
                    format!(
                        "unknown or malformed message ({e}); protocol version {PROTOCOL_VERSION}"
                    ),
                ))
            }
        };
        match request {
            Request::Conn { version, client } => {
                if self.connected {
                    return Action::Reply(error(None, ErrorKind::UnknownMessage, "CONN twice"));
                }
                if version != PROTOCOL_VERSION {
                    return Action::ReplyAndClose(error(
                        None,
                        ErrorKind::VersionMismatch {
                            server: PROTOCOL_VERSION,
                        },
                        format!(
                            "this node speaks KOS protocol version {PROTOCOL_VERSION}, the client {version}"
                        ),
                    ));
                }
                tracing::info!(%client, pid = self.pid, "KOS connected");
                self.connected = true;
                Action::Reply(Reply::Conn {
                    version: PROTOCOL_VERSION,
                    node_id: self.node_id,
                    agent_pid: self.pid,
                })
            }
            _ if !self.connected => {
                Action::ReplyAndClose(error(None, ErrorKind::NotConnected, "expected CONN first"))
            }
            Request::Open { id, vdev, driver } => {
                if self.open.len() >= MAX_OPEN {
                    return Action::Reply(error(
                        Some(id),
                        ErrorKind::Internal,
                        format!("at most {MAX_OPEN} VDEVs open per connection"),
                    ));
                }
                match devices.find(&vdev, driver.as_deref()) {
                    Ok((driver, vdev)) => {
                        let handle = self.next_handle;
                        self.next_handle = self.next_handle.wrapping_add(1).max(1);
                        self.open
                            .insert(handle, (driver.clone(), vdev.name.clone()));
                        Action::Reply(Reply::Opened {
                            id,
                            handle,
                            driver,
                            vdev,
                        })
                    }
                    Err((kind, message)) => Action::Reply(error(Some(id), kind, message)),
                }
            }
            Request::Call {
                id,
                handle,
                function,
                args,
            } => match self.open.get(&handle) {
                Some((driver, vdev)) => Action::Call {
                    id,
                    driver: driver.clone(),
                    vdev: vdev.clone(),
                    function,
                    args,
                },
                None => Action::Reply(error(
                    Some(id),
                    ErrorKind::NotOpen,
                    format!("handle {handle} is not open"),
                )),
            },
            Request::Close { id, handle } => match self.open.remove(&handle) {
                Some(_) => Action::Reply(Reply::Closed { id }),
                None => Action::Reply(error(
                    Some(id),
                    ErrorKind::NotOpen,
                    format!("handle {handle} is not open"),
                )),
            },
            Request::Ping { id } => Action::Reply(Reply::Pong { id }),
        }
    }

    /// The reply to a finished call.
    pub fn call_done(&self, id: u64, outcome: Result<Vec<u8>, DriverError>) -> Reply {
        match outcome {
            Ok(data) => Reply::Result { id, data },
            Err(DriverError::Failed { code, .. }) => error(
                Some(id),
                ErrorKind::DriverFailed { code },
                format!("the driver returned {code} ({})", driver_code(code)),
            ),
            Err(e) => error(Some(id), ErrorKind::Internal, e.to_string()),
        }
    }
}

/// What the codes of docs/VDRIVER.md mean.
fn driver_code(code: i32) -> &'static str {
    match code {
        -1 => "failure",
        -2 => "answer too large",
        -3 => "no such VDEV",
        -4 => "no such function",
        _ => "driver-specific error",
    }
}

/// The drivers of gvd's current inventory (the file gvd rewrites at every scan), loaded on
/// first use. Only drivers the inventory lists as good are ever loaded.
#[derive(Debug)]
pub struct DriverDevices {
    inventory_path: PathBuf,
    loaded: HashMap<String, Arc<Driver>>,
}

impl DriverDevices {
    /// Devices of the inventory at `inventory_path`.
    pub fn new(inventory_path: PathBuf) -> Self {
        Self {
            inventory_path,
            loaded: HashMap::new(),
        }
    }

    /// A driver loaded by [`Devices::find`].
    pub fn driver(&self, name: &str) -> Option<Arc<Driver>> {
        self.loaded.get(name).cloned()
    }
}

impl Devices for DriverDevices {
    fn find(
        &mut self,
        vdev: &str,
        driver: Option<&str>,
    ) -> Result<(String, Vdev), (ErrorKind, String)> {
        let internal = |e: String| (ErrorKind::Internal, e);
        let text = std::fs::read(&self.inventory_path).map_err(|e| {
            internal(format!(
                "cannot read {}: {e}",
                self.inventory_path.display()
            ))
        })?;
        let inventory: Inventory =
            serde_json::from_slice(&text).map_err(|e| internal(format!("bad inventory: {e}")))?;
        let candidate = inventory.drivers.iter().find(|d| {
            driver.is_none_or(|want| d.driver == want) && d.vdevs.iter().any(|v| v.name == vdev)
        });
        let Some(entry) = candidate else {
            return Err((
                ErrorKind::NoSuchVdev,
                format!("no VDEV {vdev} on this node"),
            ));
        };
        if !self.loaded.contains_key(&entry.driver) {
            let loaded = Driver::load(&entry.path).map_err(|e| internal(e.to_string()))?;
            self.loaded.insert(entry.driver.clone(), Arc::new(loaded));
        }
        let loaded = self
            .loaded
            .get(&entry.driver)
            .ok_or_else(|| internal("lost driver".into()))?;
        // The inventory may be a scan old: ask the driver what it has now.
        let now = loaded.vdevs().map_err(|e| internal(e.to_string()))?;
        match now.into_iter().find(|v| v.name == vdev) {
            Some(found) => Ok((entry.driver.clone(), found)),
            None => Err((
                ErrorKind::NoSuchVdev,
                format!("VDEV {vdev} is gone from driver {}", entry.driver),
            )),
        }
    }
}

/// Limits of an agent.
#[derive(Clone, Debug)]
pub struct AgentOptions {
    /// Largest request frame.
    pub max_frame: usize,
    /// Longest a driver call may run before the agent gives up and ends.
    pub call_timeout: Duration,
}

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// The KOS closed the connection (or it broke).
    Disconnected,
    /// The agent closed it after a fatal protocol error (version, oversized frame, no CONN).
    Refused,
    /// A driver call outlived the timeout; the call's thread is still stuck, so the process
    /// must exit.
    CallTimedOut,
}

/// The connection's writing half, shared by the threads that answer.
struct Writer {
    socket: TcpStream,
    stream: Mutex<(Box<dyn Write + Send>, Vec<u8>)>,
}

impl Writer {
    /// Ends the connection both ways, which also wakes the thread reading it.
    fn shut(&self) {
        // The peer may have closed first; either way the connection is over.
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }

    fn send(&self, reply: &Reply) -> bool {
        let mut guard = self.stream.lock();
        let (stream, buffer) = &mut *guard;
        buffer.clear();
        encode_frame(reply, buffer).is_ok() && stream.write_all(buffer).is_ok()
    }
}

/// Serves a KOS connection until it ends.
///
/// This thread reads requests and answers pings itself; every other request goes, in order,
/// to one worker thread that owns the session and the drivers and writes its own replies (one
/// thread hop per call). A watchdog ends the connection when a call outlives the timeout.
///
/// # Errors
///
/// When the socket cannot be cloned or a thread started.
pub fn serve(
    link: Link,
    session: AgentSession,
    devices: DriverDevices,
    limits: &AgentOptions,
) -> std::io::Result<Ended> {
    let socket = link.socket().try_clone()?;
    socket.set_nodelay(true)?;
    // CONN must come soon: a connection that says nothing does not hold an agent for long.
    socket.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let (mut reader, writer) = link.split()?;
    let writer = Arc::new(Writer {
        socket: socket.try_clone()?,
        stream: Mutex::new((writer, Vec::new())),
    });
    let (requests, queue) = crossbeam_channel::unbounded::<Result<Request, ProtoError>>();
    let (ended_out, ended) = crossbeam_channel::bounded::<Ended>(2);
    // When the running call started (0: none), in milliseconds since `epoch`.
    let epoch = Instant::now();
    let call_started = Arc::new(AtomicU64::new(0));
    let connected = Arc::new(AtomicBool::new(false));
    {
        let writer = Arc::clone(&writer);
        let call_started = Arc::clone(&call_started);
        let connected = Arc::clone(&connected);
        let ended_out = ended_out.clone();
        std::thread::Builder::new()
            .name("kos-worker".into())
            .spawn(move || {
                let outcome = work(
                    &queue,
                    session,
                    devices,
                    &writer,
                    (&call_started, epoch),
                    &connected,
                );
                // The supervisor may be gone already (the agent is ending).
                let _ = ended_out.send(outcome);
                writer.shut();
            })?;
    }
    {
        let writer = Arc::clone(&writer);
        let timeout = limits.call_timeout;
        std::thread::Builder::new()
            .name("kos-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(
                    (timeout / 10).clamp(Duration::from_millis(5), Duration::from_millis(100)),
                );
                let started = call_started.load(Ordering::Acquire);
                if started == 0 {
                    continue;
                }
                let running = epoch
                    .elapsed()
                    .saturating_sub(Duration::from_millis(started - 1));
                if running >= timeout {
                    writer.send(&error(
                        None,
                        ErrorKind::Timeout,
                        format!("a driver call did not return within {timeout:?}; the agent ends"),
                    ));
                    // The supervisor may be gone already (the agent is ending).
                    let _ = ended_out.send(Ended::CallTimedOut);
                    writer.shut();
                    return;
                }
            })?;
    }
    let mut waiting_for_conn = true;
    loop {
        if let Ok(outcome) = ended.try_recv() {
            return Ok(outcome);
        }
        let mut header = [0u8; FRAME_HEADER_LEN];
        if reader.read_exact(&mut header).is_err() {
            return Ok(ended.try_recv().unwrap_or(Ended::Disconnected));
        }
        let len = match frame_len(header, limits.max_frame) {
            Ok(len) => len,
            Err(e) => {
                let max = u32::try_from(limits.max_frame).unwrap_or(u32::MAX);
                writer.send(&error(
                    None,
                    ErrorKind::FrameTooLarge { max },
                    e.to_string(),
                ));
                return Ok(Ended::Refused);
            }
        };
        let mut body = vec![0u8; len];
        if reader.read_exact(&mut body).is_err() {
            return Ok(ended.try_recv().unwrap_or(Ended::Disconnected));
        }
        if waiting_for_conn {
            waiting_for_conn = false;
            socket.set_read_timeout(None)?;
        }
        match decode::<Request>(&body) {
            // Answered at once, even while a call runs (only once connected).
            // Before CONN has gone through the worker, pings go there too (and are refused).
            Ok(Request::Ping { id }) if connected.load(Ordering::Acquire) => {
                if !writer.send(&Reply::Pong { id }) {
                    return Ok(Ended::Disconnected);
                }
            }
            request => {
                if requests.send(request).is_err() {
                    return Ok(ended.recv().unwrap_or(Ended::Disconnected));
                }
            }
        }
    }
}

fn work(
    queue: &crossbeam_channel::Receiver<Result<Request, ProtoError>>,
    mut session: AgentSession,
    mut devices: DriverDevices,
    writer: &Writer,
    (call_started, epoch): (&AtomicU64, Instant),
    connected: &AtomicBool,
) -> Ended {
    for request in queue {
        let action = session.handle_request(request, &mut devices);
        connected.store(session.is_connected(), Ordering::Release);
        let reply = match action {
            Action::Reply(reply) => reply,
            Action::ReplyAndClose(reply) => {
                writer.send(&reply);
                return Ended::Refused;
            }
            Action::Call {
                id,
                driver,
                vdev,
                function,
                args,
            } => match devices.driver(&driver) {
                Some(loaded) => {
                    let now = u64::try_from(epoch.elapsed().as_millis()).unwrap_or(u64::MAX - 1);
                    call_started.store(now + 1, Ordering::Release);
                    let outcome = loaded.call(&vdev, &function, &args);
                    call_started.store(0, Ordering::Release);
                    session.call_done(id, outcome)
                }
                None => error(
                    Some(id),
                    ErrorKind::Internal,
                    format!("driver {driver} not loaded"),
                ),
            },
        };
        if !writer.send(&reply) {
            return Ended::Disconnected;
        }
    }
    Ended::Disconnected
}

/// Ends the process when gvd (its parent) is gone: an agent outliving its daemon would be an
/// orphan nobody counts. (A watch thread rather than `prctl(PR_SET_PDEATHSIG)`: that signal
/// follows the *thread* that spawned the agent, not gvd, and would kill healthy agents when
/// that thread ends.)
pub fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    let spawned = std::thread::Builder::new()
        .name("kos-parent-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                tracing::warn!("gvd is gone: the agent ends");
                std::process::exit(0);
            }
        });
    if let Err(error) = spawned {
        tracing::warn!(%error, "cannot watch gvd: this agent may outlive it");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fake;

    impl Devices for Fake {
        fn find(
            &mut self,
            vdev: &str,
            _: Option<&str>,
        ) -> Result<(String, Vdev), (ErrorKind, String)> {
            if vdev == "echo0" {
                Ok((
                    "echo".into(),
                    Vdev {
                        name: vdev.into(),
                        kind: "echo".into(),
                        attributes: "{}".into(),
                    },
                ))
            } else {
                Err((ErrorKind::NoSuchVdev, "no".into()))
            }
        }
    }

    fn frame(request: &Request) -> Vec<u8> {
        let mut wire = Vec::new();
        encode_frame(request, &mut wire).unwrap_or_default();
        wire.split_off(FRAME_HEADER_LEN)
    }

    fn conn(version: u32) -> Vec<u8> {
        frame(&Request::Conn {
            version,
            client: "test".into(),
        })
    }

    #[test]
    fn conn_first_then_open_call_close() {
        let mut session = AgentSession::new(9, 42);
        let ping = frame(&Request::Ping { id: 1 });
        assert!(matches!(
            session.handle(&ping, &mut Fake),
            Action::ReplyAndClose(Reply::Error {
                kind: ErrorKind::NotConnected,
                ..
            })
        ));
        let mut session = AgentSession::new(9, 42);
        assert_eq!(
            session.handle(&conn(PROTOCOL_VERSION), &mut Fake),
            Action::Reply(Reply::Conn {
                version: PROTOCOL_VERSION,
                node_id: 9,
                agent_pid: 42
            })
        );
        let open = frame(&Request::Open {
            id: 2,
            vdev: "echo0".into(),
            driver: None,
        });
        let Action::Reply(Reply::Opened { handle, .. }) = session.handle(&open, &mut Fake) else {
            panic!("not opened");
        };
        let call = |handle| {
            frame(&Request::Call {
                id: 3,
                handle,
                function: "echo".into(),
                args: b"x".to_vec(),
            })
        };
        assert!(matches!(
            session.handle(&call(handle), &mut Fake),
            Action::Call { id: 3, .. }
        ));
        assert!(matches!(
            session.handle(&call(handle + 1), &mut Fake),
            Action::Reply(Reply::Error {
                kind: ErrorKind::NotOpen,
                ..
            })
        ));
        let close = frame(&Request::Close { id: 4, handle });
        assert_eq!(
            session.handle(&close, &mut Fake),
            Action::Reply(Reply::Closed { id: 4 })
        );
        assert!(matches!(
            session.handle(&call(handle), &mut Fake),
            Action::Reply(Reply::Error {
                kind: ErrorKind::NotOpen,
                ..
            })
        ));
        let missing = frame(&Request::Open {
            id: 5,
            vdev: "nope".into(),
            driver: None,
        });
        assert!(matches!(
            session.handle(&missing, &mut Fake),
            Action::Reply(Reply::Error {
                id: Some(5),
                kind: ErrorKind::NoSuchVdev,
                ..
            })
        ));
        assert!(matches!(
            session.handle(&[0xff, 0xff, 0xff], &mut Fake),
            Action::Reply(Reply::Error {
                id: None,
                kind: ErrorKind::UnknownMessage,
                ..
            })
        ));
    }

    #[test]
    fn another_version_is_refused_with_both_versions() {
        let mut session = AgentSession::new(9, 42);
        let Action::ReplyAndClose(Reply::Error { kind, message, .. }) =
            session.handle(&conn(PROTOCOL_VERSION + 1), &mut Fake)
        else {
            panic!("not refused");
        };
        assert_eq!(
            kind,
            ErrorKind::VersionMismatch {
                server: PROTOCOL_VERSION
            }
        );
        assert!(message.contains(&(PROTOCOL_VERSION + 1).to_string()));
    }

    #[test]
    fn driver_codes_are_named() {
        let session = AgentSession::new(9, 42);
        let reply = session.call_done(
            1,
            Err(DriverError::Failed {
                operation: "gv_vdriver_call",
                code: -4,
            }),
        );
        assert!(
            matches!(reply, Reply::Error { kind: ErrorKind::DriverFailed { code: -4 }, ref message, .. } if message.contains("no such function"))
        );
    }
}
