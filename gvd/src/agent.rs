//! The KOS agent: one process per KOS connection, serving OPEN / CALL / CLOSE / PING on it.
//!
//! gvd accepts the connection and starts `gvd agent` with the socket as its standard input
//! ([`crate::kos_server`]); the agent loads the drivers it needs, so a driver that crashes or
//! hangs takes only this agent down. The agent ends when the connection does, when a call
//! outlives the call timeout, or when gvd is gone.
//!
//! [`AgentSession`] is the protocol logic without I/O; [`serve`] runs it on a socket.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::select;
use grapevine_kos::proto::{
    decode, encode_frame, frame_len, ErrorKind, ProtoError, Reply, Request, FRAME_HEADER_LEN,
    PROTOCOL_VERSION,
};

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

    /// Handles one frame body.
    pub fn handle(&mut self, body: &[u8], devices: &mut dyn Devices) -> Action {
        let request =
            match decode::<Request>(body) {
                Ok(request) => request,
                Err(e) if !self.connected => {
                    return Action::ReplyAndClose(error(
                        None,
                        ErrorKind::NotConnected,
                        format!("expected CONN first: {e}"),
                    ))
                }
                Err(e) => return Action::Reply(error(
                    None,
                    ErrorKind::UnknownMessage,
                    format!(
                        "unknown or malformed message ({e}); protocol version {PROTOCOL_VERSION}"
                    ),
                )),
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
pub struct AgentLimits {
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

enum Incoming {
    Frame(Vec<u8>),
    TooLarge(ProtoError),
    Closed,
}

fn reader(mut stream: TcpStream, max_frame: usize, out: crossbeam_channel::Sender<Incoming>) {
    loop {
        let mut header = [0u8; FRAME_HEADER_LEN];
        if stream.read_exact(&mut header).is_err() {
            let _ = out.send(Incoming::Closed);
            return;
        }
        let len = match frame_len(header, max_frame) {
            Ok(len) => len,
            Err(e) => {
                let _ = out.send(Incoming::TooLarge(e));
                return;
            }
        };
        let mut body = vec![0u8; len];
        if stream.read_exact(&mut body).is_err() {
            let _ = out.send(Incoming::Closed);
            return;
        }
        if out.send(Incoming::Frame(body)).is_err() {
            return;
        }
    }
}

type CallJob = (u64, Arc<Driver>, String, String, Vec<u8>);
type CallDone = (u64, Result<Vec<u8>, DriverError>);

/// Serves a KOS connection until it ends.
///
/// # Errors
///
/// When the socket cannot be cloned or a thread started.
pub fn serve(
    stream: TcpStream,
    session: &mut AgentSession,
    devices: &mut DriverDevices,
    limits: &AgentLimits,
) -> std::io::Result<Ended> {
    stream.set_nodelay(true)?;
    let (frames_in, frames) = crossbeam_channel::bounded::<Incoming>(64);
    {
        let stream = stream.try_clone()?;
        let max_frame = limits.max_frame;
        std::thread::Builder::new()
            .name("kos-reader".into())
            .spawn(move || reader(stream, max_frame, frames_in))?;
    }
    // Driver calls run on their own thread so that pings are answered and timeouts noticed
    // while one runs.
    let (jobs, job_queue) = crossbeam_channel::bounded::<CallJob>(1);
    let (results_out, results) = crossbeam_channel::bounded::<CallDone>(1);
    std::thread::Builder::new()
        .name("kos-driver".into())
        .spawn(move || {
            for (id, driver, vdev, function, args) in job_queue {
                let outcome = driver.call(&vdev, &function, &args);
                if results_out.send((id, outcome)).is_err() {
                    return;
                }
            }
        })?;
    let mut out = stream;
    let mut buffer = Vec::new();
    let mut send = |reply: &Reply| -> bool {
        buffer.clear();
        encode_frame(reply, &mut buffer).is_ok() && out.write_all(&buffer).is_ok()
    };
    let mut waiting: VecDeque<Vec<u8>> = VecDeque::new();
    let mut running: Option<(u64, Instant)> = None;
    loop {
        // Requests wait behind a running call, so replies keep the order of requests (pings
        // excepted: they are answered at once).
        if running.is_none() {
            if let Some(body) = waiting.pop_front() {
                match handle(session, devices, &body, &jobs, &mut send) {
                    Step::Continue => {}
                    Step::Started(id) => running = Some((id, Instant::now() + limits.call_timeout)),
                    Step::End(ended) => return Ok(ended),
                }
                continue;
            }
        }
        let timeout = running.map_or(Duration::from_secs(3600), |(_, deadline)| {
            deadline.saturating_duration_since(Instant::now())
        });
        select! {
            recv(frames) -> incoming => match incoming {
                Ok(Incoming::Frame(body)) => {
                    let is_ping = matches!(decode::<Request>(&body), Ok(Request::Ping { .. }));
                    if running.is_some() && !is_ping {
                        waiting.push_back(body);
                    } else {
                        waiting.push_front(body);
                        if running.is_some() {
                            // A ping while a call runs: answer it now.
                            if let Some(body) = waiting.pop_front() {
                                if let Step::End(ended) = handle(session, devices, &body, &jobs, &mut send) {
                                    return Ok(ended);
                                }
                            }
                        }
                    }
                }
                Ok(Incoming::TooLarge(e)) => {
                    let max = u32::try_from(limits.max_frame).unwrap_or(u32::MAX);
                    send(&error(None, ErrorKind::FrameTooLarge { max }, e.to_string()));
                    return Ok(Ended::Refused);
                }
                Ok(Incoming::Closed) | Err(_) => return Ok(Ended::Disconnected),
            },
            recv(results) -> done => {
                let Ok((id, outcome)) = done else { return Ok(Ended::Disconnected) };
                running = None;
                if !send(&session.call_done(id, outcome)) {
                    return Ok(Ended::Disconnected);
                }
            },
            default(timeout) => {
                if let Some((id, deadline)) = running {
                    if Instant::now() >= deadline {
                        send(&error(
                            Some(id),
                            ErrorKind::Timeout,
                            format!("the driver call did not return within {:?}; the agent ends", limits.call_timeout),
                        ));
                        return Ok(Ended::CallTimedOut);
                    }
                }
            },
        }
    }
}

enum Step {
    Continue,
    Started(u64),
    End(Ended),
}

fn handle(
    session: &mut AgentSession,
    devices: &mut DriverDevices,
    body: &[u8],
    jobs: &crossbeam_channel::Sender<CallJob>,
    send: &mut impl FnMut(&Reply) -> bool,
) -> Step {
    match session.handle(body, devices) {
        Action::Reply(reply) => {
            if send(&reply) {
                Step::Continue
            } else {
                Step::End(Ended::Disconnected)
            }
        }
        Action::ReplyAndClose(reply) => {
            send(&reply);
            Step::End(Ended::Refused)
        }
        Action::Call {
            id,
            driver,
            vdev,
            function,
            args,
        } => {
            let Some(loaded) = devices.driver(&driver) else {
                let reply = error(
                    Some(id),
                    ErrorKind::Internal,
                    format!("driver {driver} not loaded"),
                );
                return if send(&reply) {
                    Step::Continue
                } else {
                    Step::End(Ended::Disconnected)
                };
            };
            if jobs.send((id, loaded, vdev, function, args)).is_err() {
                return Step::End(Ended::Disconnected);
            }
            Step::Started(id)
        }
    }
}

/// Ends the process when gvd (its parent) is gone: an agent outliving its daemon would be an
/// orphan nobody counts.
pub fn exit_with_parent() {
    let parent = std::os::unix::process::parent_id();
    let _ = std::thread::Builder::new()
        .name("kos-parent-watch".into())
        .spawn(move || loop {
            std::thread::sleep(Duration::from_millis(500));
            if std::os::unix::process::parent_id() != parent {
                tracing::warn!("gvd is gone: the agent ends");
                std::process::exit(0);
            }
        });
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
