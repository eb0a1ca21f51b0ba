//! Replication between the members of a zone: a peer that announces a higher zone version
//! is asked for what changed since the version last pulled from it (have/want), and the
//! wanted files are fetched in chunks with several requests in flight. Only once everything is
//! applied does this node record the peer's version as seen; each applied change bumps this
//! node's own zone version, so members that only see this one catch up from it in turn.
//!
//! Frames are those of the KOS protocol (4-byte length, postcard body).

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use grapevine_gvd_schema::frame::{decode, encode_frame, frame_len, FRAME_HEADER_LEN};
use grapevine_gvd_schema::secure::{self, Link, PortKey, Purpose};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::store::{decide, Change, Decision, Entry, Kind, ZoneStore};
use crate::zpath::{open_beneath, ZonePath};

/// The replication protocol this node speaks, said first on every connection
/// ([`ReplRequest::Hello`]). Version 2: an entry carries every change that placed it
/// ([`Entry::placements`]) where version 1 (before there were versions) carried one. Members
/// that speak different versions refuse each other with an error that says so, rather than
/// misreading each other's change lists.
pub const PROTOCOL: u32 = 2;
/// Bytes per data request.
pub const CHUNK: u32 = 1 << 20;
/// Data requests in flight per file.
pub const WINDOW: usize = 8;
/// Largest request frame the server reads.
const MAX_REQUEST: usize = 64 << 10;
/// Most replication connections served at once, and from one address: a stranger opening
/// connections cannot take every thread.
pub const MAX_CONNECTIONS: usize = 64;
/// Most replication connections served at once from one address.
pub const MAX_CONNECTIONS_PER_SOURCE: usize = 8;
/// Largest reply frame the client reads (a long change list).
const MAX_REPLY: usize = 256 << 20;

/// What a puller asks.
#[derive(Debug, Deserialize, Serialize)]
pub enum ReplRequest {
    /// Everything changed after `since` (the "have": what I have of yours).
    Changes {
        /// The zone.
        zone: String,
        /// The server's version the client has everything up to.
        since: u64,
    },
    /// A file system operation, from a node serving a zone it does not hold.
    Fs {
        /// The zone.
        zone: String,
        /// The operation.
        op: crate::remote::FsOp,
    },
    /// A piece of a file (the "request").
    Fetch {
        /// The zone.
        zone: String,
        /// The path (checked when decoded: relative, no `..`, no NUL).
        path: ZonePath,
        /// Where.
        offset: u64,
        /// How much.
        len: u32,
        /// The version listed (its [`Entry::content`]): served only while the path holds it,
        /// so that bytes of another version of the same size are never taken for it.
        content: Change,
    },
    /// The protocol the client speaks: the first request of every connection (the last
    /// variant, so that a node from before versions reads it as a request it does not know).
    Hello {
        /// Its [`PROTOCOL`].
        protocol: u32,
    },
}

/// What the server answers.
#[derive(Debug, Deserialize, Serialize)]
pub enum ReplReply {
    /// The changes, and the version they bring the client to.
    Changes {
        /// The server's zone version when listing.
        version: u64,
        /// Changed paths, directories first (checked when decoded).
        entries: Vec<(ZonePath, Entry)>,
    },
    /// File data (the "data").
    Data {
        /// The bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The outcome of a file system operation.
    Fs(crate::remote::FsResult),
    /// The request failed.
    Error {
        /// Why.
        message: String,
    },
    /// The server speaks the client's protocol too.
    Hello {
        /// Its [`PROTOCOL`].
        protocol: u32,
    },
}

/// Why a pull failed; nothing was recorded as seen, so the next one starts over.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PullError {
    /// The peer could not be reached or stopped answering (slow peers time out).
    #[error("peer {peer}: {error}")]
    Io {
        /// The peer.
        peer: SocketAddr,
        /// What happened.
        error: std::io::Error,
    },
    /// The peer answered something unusable.
    #[error("peer {peer}: {reason}")]
    Protocol {
        /// The peer.
        peer: SocketAddr,
        /// What was wrong.
        reason: String,
    },
    /// The local replica could not take the change.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// What a pull brought.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct PullOutcome {
    /// Paths applied (taken, merged or kept as conflict copies).
    pub applied: usize,
    /// Bytes fetched.
    pub bytes: u64,
    /// The peer version now seen.
    pub version: u64,
}

fn send<T: Serialize>(
    stream: &mut impl Write,
    message: &T,
    buffer: &mut Vec<u8>,
) -> std::io::Result<()> {
    buffer.clear();
    encode_frame(message, buffer).map_err(std::io::Error::other)?;
    stream.write_all(buffer)
}

fn receive<T: serde::de::DeserializeOwned>(
    stream: &mut impl Read,
    max: usize,
) -> std::io::Result<T> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut header)?;
    let len = frame_len(header, max).map_err(std::io::Error::other)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    decode(&body).map_err(std::io::Error::other)
}

/// A zone a node holds, as the replication server sees it.
pub struct ServedZone {
    /// Its replica.
    pub store: Arc<Mutex<ZoneStore>>,
    /// Its file system, for operations forwarded by non-members.
    pub fs: crate::nfs::ZoneFs,
}

/// The zones a node holds, by name.
pub type ZoneMap = Arc<HashMap<String, ServedZone>>;

/// Who may ask what of the replication server, by address: the members of each zone may pull
/// it, any node of the network may forward file operations. Kept up to date from the node list
/// ([`ReplServer::set_access`]); until it is first set, everyone may.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// Addresses of the members of each zone.
    pub members: HashMap<String, std::collections::HashSet<IpAddr>>,
    /// Addresses of every node.
    pub nodes: std::collections::HashSet<IpAddr>,
}

/// The access rules a server applies; `None`: not set yet, or not enforced.
pub type SharedAccess = Arc<parking_lot::RwLock<Option<Access>>>;

/// Serves the zones' changes and data to pulling peers, a thread per connection. With a
/// network key, a peer must complete the handshake of [`grapevine_gvd_schema::secure`] first; with
/// [`Access`] rules, only a zone's members may pull it.
pub struct ReplServer {
    address: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    access: SharedAccess,
    refused: Arc<AtomicU64>,
}

/// Connections being served, in total and per source address.
#[derive(Debug, Default)]
struct Slots {
    per_source: Mutex<HashMap<IpAddr, usize>>,
}

/// One connection's place in [`Slots`], given back when it ends.
struct Slot {
    slots: Arc<Slots>,
    source: IpAddr,
}

impl Slots {
    fn take(self: &Arc<Self>, source: IpAddr) -> Option<Slot> {
        let mut per_source = self.per_source.lock();
        let total: usize = per_source.values().sum();
        let from_source = per_source.get(&source).copied().unwrap_or(0);
        if total >= MAX_CONNECTIONS || from_source >= MAX_CONNECTIONS_PER_SOURCE {
            return None;
        }
        *per_source.entry(source).or_default() += 1;
        Some(Slot {
            slots: Arc::clone(self),
            source,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut per_source = self.slots.per_source.lock();
        if let Some(count) = per_source.get_mut(&self.source) {
            *count -= 1;
            if *count == 0 {
                per_source.remove(&self.source);
            }
        }
    }
}

impl ReplServer {
    /// Listens on `address`.
    ///
    /// # Errors
    ///
    /// When it cannot be bound.
    pub fn start(
        address: SocketAddr,
        zones: ZoneMap,
        runtime: tokio::runtime::Handle,
        key: Option<PortKey>,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(address)?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let access: SharedAccess = Arc::default();
        let refused = Arc::new(AtomicU64::new(0));
        let slots = Arc::new(Slots::default());
        let thread = {
            let stop = Arc::clone(&stop);
            let access = Arc::clone(&access);
            let refused = Arc::clone(&refused);
            std::thread::Builder::new()
                .name("gvfs-repl".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let Ok(stream) = stream else { continue };
                        let source = stream
                            .peer_addr()
                            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
                        let Some(slot) = slots.take(source) else {
                            // Dropped at once: the peer retries at its next pull.
                            if refused.fetch_add(1, Ordering::Relaxed).is_multiple_of(100) {
                                tracing::warn!(%source, "replication connections at their limit; refused");
                            }
                            continue;
                        };
                        let zones = Arc::clone(&zones);
                        let runtime = runtime.clone();
                        let key = key.clone();
                        let access = Arc::clone(&access);
                        let spawned = std::thread::Builder::new()
                            .name("gvfs-repl-peer".into())
                            .spawn(move || {
                                serve_peer(stream, &zones, &runtime, key.as_ref(), &access);
                                drop(slot);
                            });
                        if let Err(error) = spawned {
                            // Out of threads: this peer's connection is dropped; it pulls again.
                            tracing::warn!(%error, "cannot serve a replication peer");
                        }
                    }
                })?
        };
        Ok(Self {
            address,
            stop,
            thread: Some(thread),
            access,
            refused,
        })
    }

    /// Where it listens.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// Connections refused because [`MAX_CONNECTIONS`] or [`MAX_CONNECTIONS_PER_SOURCE`] were
    /// being served.
    pub fn refused_connections(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Sets who may ask what (applied to every request from then on).
    pub fn set_access(&self, access: Access) {
        *self.access.write() = Some(access);
    }
}

impl Drop for ReplServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wakes the accept loop so it sees the stop flag; failing means it is gone already.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
        if let Some(thread) = self.thread.take() {
            // A panic in the thread was already reported by the panic hook.
            let _ = thread.join();
        }
    }
}

fn serve_peer(
    stream: TcpStream,
    zones: &ZoneMap,
    runtime: &tokio::runtime::Handle,
    key: Option<&PortKey>,
    access: &SharedAccess,
) {
    // Latency only: the connection works without it.
    let _ = stream.set_nodelay(true);
    let peer = stream.peer_addr().ok();
    // A peer that goes quiet is dropped.
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut stream = match secure::accept(stream, key, Purpose::Replication) {
        Ok(link) => link,
        Err(error) => {
            tracing::warn!(?peer, %error, "replication connection refused");
            return;
        }
    };
    let mut buffer = Vec::new();
    let greeting = match receive::<ReplRequest>(&mut stream, MAX_REQUEST) {
        Ok(first) => greet(&first),
        Err(_) => return,
    };
    let greeted = matches!(greeting, ReplReply::Hello { .. });
    if let ReplReply::Error { message } = &greeting {
        tracing::warn!(?peer, reason = message, "replication connection refused");
    }
    if send(&mut stream, &greeting, &mut buffer).is_err() || !greeted {
        return;
    }
    // File data is read into this, reused from chunk to chunk.
    let mut chunk = Vec::new();
    while let Ok(request) = receive::<ReplRequest>(&mut stream, MAX_REQUEST) {
        let reply = match refusal(&request, peer.map(|p| p.ip()), access) {
            Some(reason) => {
                tracing::warn!(?peer, reason, "replication request refused");
                ReplReply::Error { message: reason }
            }
            None => answer(request, zones, runtime, std::mem::take(&mut chunk)),
        };
        if send(&mut stream, &reply, &mut buffer).is_err() {
            return;
        }
        if let ReplReply::Data { bytes } = reply {
            chunk = bytes;
        }
    }
}

/// The answer to a connection's first request: the client must say which protocol it speaks,
/// and speak this node's.
fn greet(first: &ReplRequest) -> ReplReply {
    match first {
        ReplRequest::Hello { protocol } if *protocol == PROTOCOL => {
            ReplReply::Hello { protocol: PROTOCOL }
        }
        ReplRequest::Hello { protocol } => ReplReply::Error {
            message: format!(
                "this node speaks replication protocol {PROTOCOL} and the peer {protocol}: \
                 every member of a zone needs a gvd that speaks the same"
            ),
        },
        _ => ReplReply::Error {
            message: format!(
                "this node speaks replication protocol {PROTOCOL} and the peer did not say which \
                 it speaks (a gvd from before protocol versions, which misreads this one's \
                 change lists): upgrade it"
            ),
        },
    }
}

/// Says which protocol this node speaks on a new connection; the server's answer is read by
/// [`check_greeting`]. Sent ahead of the first request, so that it costs no round trip.
fn hello(stream: &mut impl Write, buffer: &mut Vec<u8>) -> std::io::Result<()> {
    send(stream, &ReplRequest::Hello { protocol: PROTOCOL }, buffer)
}

/// Whether the server's answer to [`hello`] says it speaks this node's protocol; why not
/// otherwise.
pub(crate) fn check_greeting(reply: std::io::Result<ReplReply>) -> Result<(), String> {
    match reply {
        Ok(ReplReply::Hello { protocol }) if protocol == PROTOCOL => Ok(()),
        Ok(ReplReply::Hello { protocol }) => Err(format!(
            "the peer speaks replication protocol {protocol}, this node {PROTOCOL}"
        )),
        Ok(ReplReply::Error { message }) => Err(message),
        Ok(_) => Err("an answer to another request where the protocol's was due".into()),
        // A node from before versions cannot read the hello and hangs up.
        Err(error)
            if matches!(
                error.kind(),
                std::io::ErrorKind::UnexpectedEof
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
            ) =>
        {
            Err(format!(
                "the peer hung up at the protocol exchange: it may run a gvd from before \
             replication protocol versions (this node speaks {PROTOCOL})"
            ))
        }
        Err(error) => Err(error.to_string()),
    }
}

/// Why `peer` may not make `request`, if it may not.
fn refusal(request: &ReplRequest, peer: Option<IpAddr>, access: &SharedAccess) -> Option<String> {
    let access = access.read();
    let access = access.as_ref()?;
    let Some(peer) = peer else {
        return Some("unknown peer address".into());
    };
    match request {
        ReplRequest::Changes { zone, .. } | ReplRequest::Fetch { zone, .. } => {
            let member = access
                .members
                .get(zone)
                .is_some_and(|members| members.contains(&peer));
            (!member).then(|| format!("{peer} is not a member of zone {zone}"))
        }
        ReplRequest::Fs { .. } => {
            (!access.nodes.contains(&peer)).then(|| format!("{peer} is not a node of this network"))
        }
        ReplRequest::Hello { .. } => None,
    }
}

/// The reply to `request`; file data is read into `chunk` (a buffer to reuse).
fn answer(
    request: ReplRequest,
    zones: &ZoneMap,
    runtime: &tokio::runtime::Handle,
    mut chunk: Vec<u8>,
) -> ReplReply {
    let zone_of = |name: &str| zones.get(name).map(|z| Arc::clone(&z.store));
    match request {
        hello @ ReplRequest::Hello { .. } => greet(&hello),
        ReplRequest::Fs { zone, op } => match zones.get(&zone) {
            Some(served) => ReplReply::Fs(runtime.block_on(crate::remote::execute(&served.fs, op))),
            None => ReplReply::Error {
                message: format!("no zone {zone} here"),
            },
        },
        ReplRequest::Changes { zone, since } => match zone_of(&zone) {
            Some(store) => {
                let store = store.lock();
                let entries = store
                    .changes_since(since)
                    .into_iter()
                    .filter_map(|(path, entry)| match ZonePath::new(path) {
                        Ok(path) => Some((path, entry)),
                        Err(error) => {
                            tracing::warn!(zone, %error, "not offered to peers");
                            None
                        }
                    })
                    .collect();
                ReplReply::Changes {
                    version: store.version(),
                    entries,
                }
            }
            None => ReplReply::Error {
                message: format!("no zone {zone} here"),
            },
        },
        ReplRequest::Fetch {
            zone,
            path,
            offset,
            len,
            content,
        } => {
            let Some(store) = zone_of(&zone) else {
                return ReplReply::Error {
                    message: format!("no zone {zone} here"),
                };
            };
            let root = store.lock().root().to_path_buf();
            let holds_listed_version = || {
                store.lock().entry(path.as_str()).is_some_and(|entry| {
                    !entry.deleted && entry.kind == Kind::File && entry.content == content
                })
            };
            let changed = || std::io::Error::other("changed since it was listed");
            let mut read = || -> std::io::Result<Vec<u8>> {
                // A new version replaces the path (a rename) and is recorded under the store's
                // lock: listed before and after the open, the file opened is the listed one.
                if !holds_listed_version() {
                    return Err(changed());
                }
                // The kernel keeps the open beneath the zone's root, links refused.
                let file = open_beneath(&root, path.as_str())?;
                if !holds_listed_version() {
                    return Err(changed());
                }
                if !file.metadata()?.is_file() {
                    return Err(std::io::Error::other("not a regular file"));
                }
                let mut bytes = std::mem::take(&mut chunk);
                bytes.resize(len.min(CHUNK) as usize, 0);
                let mut filled = 0;
                while filled < bytes.len() {
                    let n = file.read_at(&mut bytes[filled..], offset + filled as u64)?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                bytes.truncate(filled);
                Ok(bytes)
            };
            match read() {
                Ok(bytes) => ReplReply::Data { bytes },
                Err(e) => ReplReply::Error {
                    message: format!("{path}: {e}"),
                },
            }
        }
    }
}

/// Pulls from the peer at `peer` (node `peer_node`) everything of `zone` this replica lacks,
/// proving `key` to it when the network has one.
///
/// # Errors
///
/// [`PullError`]; nothing is recorded as seen then, and paths already applied stay applied.
pub fn pull(
    store: &Arc<Mutex<ZoneStore>>,
    zone: &str,
    (peer, peer_node): (SocketAddr, u64),
    timeout: Duration,
    key: Option<&PortKey>,
) -> Result<PullOutcome, PullError> {
    let started = std::time::Instant::now();
    let io = |error| PullError::Io { peer, error };
    let stream = TcpStream::connect_timeout(&peer, timeout).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    let mut stream = secure::connect(stream, key, Purpose::Replication).map_err(io)?;
    let mut buffer = Vec::new();
    let since = store.lock().seen(peer_node);
    // Said ahead of the request; a peer that refuses the hello explains itself (or hangs
    // up), which says more than a failed send would.
    let sent = hello(&mut stream, &mut buffer).and_then(|()| {
        send(
            &mut stream,
            &ReplRequest::Changes {
                zone: zone.into(),
                since,
            },
            &mut buffer,
        )
    });
    check_greeting(receive::<ReplReply>(&mut stream, MAX_REPLY))
        .map_err(|reason| PullError::Protocol { peer, reason })?;
    sent.map_err(io)?;
    let (version, mut entries) = match receive::<ReplReply>(&mut stream, MAX_REPLY).map_err(io)? {
        ReplReply::Changes { version, entries } => (version, entries),
        ReplReply::Error { message } => {
            return Err(PullError::Protocol {
                peer,
                reason: message,
            })
        }
        ReplReply::Data { .. } | ReplReply::Fs(_) | ReplReply::Hello { .. } => {
            return Err(PullError::Protocol {
                peer,
                reason: "an answer to another request".into(),
            })
        }
    };
    // Whatever order the peer sent: parents before children, deletions children first.
    crate::store::sort_for_applying(&mut entries);
    // The "want": what is newer there; writes to those paths wait until they are in.
    let plan: Vec<(String, Entry, Decision)> = {
        let mut store = store.lock();
        let plan: Vec<_> = entries
            .into_iter()
            .filter_map(|(path, theirs)| {
                let path = path.into_string();
                // A local change not recorded yet (a write still settling, or made outside
                // NFS) is recorded first, so that it is weighed rather than overwritten.
                if store.check(&path) {
                    tracing::debug!(path, "local change recorded before a pull");
                }
                let decision = decide(store.entry(&path), &theirs);
                (decision != Decision::Skip).then_some((path, theirs, decision))
            })
            .collect();
        for (path, _, _) in &plan {
            store.hold(path);
        }
        plan
    };
    let held: Vec<String> = plan.iter().map(|(p, _, _)| p.clone()).collect();
    let result = apply_plan(store, zone, &mut stream, &mut buffer, peer, plan);
    {
        let mut store = store.lock();
        for path in &held {
            store.release(path);
        }
    }
    let (applied, bytes) = result?;
    store.lock().set_seen(peer_node, version)?;
    if applied > 0 {
        let took_ms = started.elapsed().as_millis();
        tracing::info!(zone, %peer, applied, bytes, version, took_ms, "pulled");
    }
    Ok(PullOutcome {
        applied,
        bytes,
        version,
    })
}

fn apply_plan(
    store: &Arc<Mutex<ZoneStore>>,
    zone: &str,
    stream: &mut Link,
    buffer: &mut Vec<u8>,
    peer: SocketAddr,
    plan: Vec<(String, Entry, Decision)>,
) -> Result<(usize, u64), PullError> {
    let mut applied = 0;
    let mut bytes = 0;
    let mut failed = None;
    for (path, theirs, decision) in plan {
        let needs_content =
            !theirs.deleted && theirs.kind == Kind::File && decision != Decision::MergeOnly;
        let fetched = if needs_content {
            let tmp = store.lock().temp_file();
            match fetch(stream, buffer, zone, (&path, &theirs), &tmp, peer) {
                Ok(()) => {
                    bytes += theirs.size;
                    Some(tmp)
                }
                Err(error) => {
                    // Cleanup: a leftover temporary is harmless and replaced next time.
                    let _ = std::fs::remove_file(&tmp);
                    return Err(error);
                }
            }
        } else {
            None
        };
        let outcome = {
            let mut store = store.lock();
            // Decided again: a concurrent pull from another member may have brought this path
            // meanwhile, or a write made directly on disk; the fetched content is still this
            // peer's version.
            store.check_held(&path);
            let now = decide(store.entry(&path), &theirs);
            let content_ready = fetched.is_some() || !needs_content;
            if content_ready || matches!(now, Decision::Skip | Decision::MergeOnly) {
                store.apply(&path, &theirs, &now, fetched.as_deref())
            } else {
                Ok(())
            }
        };
        if let Some(tmp) = &fetched {
            // Cleanup: a leftover temporary is harmless and replaced next time.
            let _ = std::fs::remove_file(tmp);
        }
        // One path that cannot be applied now (a directory still holding files its peer
        // deleted, later in this list) must not hold up the others: go on, and report it, so
        // that the peer's version is not recorded as seen and the next pull retries.
        match outcome {
            Ok(()) => applied += 1,
            Err(error) => {
                tracing::debug!(path, %error, "not applied in this pull");
                failed.get_or_insert(error);
            }
        }
    }
    match failed {
        Some(error) => Err(error.into()),
        None => Ok((applied, bytes)),
    }
}

/// Fetches `size` bytes of `path` into `into`, up to [`WINDOW`] chunk requests in flight.
fn fetch(
    stream: &mut Link,
    buffer: &mut Vec<u8>,
    zone: &str,
    (path, theirs): (&str, &Entry),
    into: &PathBuf,
    peer: SocketAddr,
) -> Result<(), PullError> {
    let size = theirs.size;
    let io = |error| PullError::Io { peer, error };
    let path = ZonePath::new(path).map_err(|e| PullError::Protocol {
        peer,
        reason: e.to_string(),
    })?;
    let started = std::time::Instant::now();
    let mut sink = ChunkSink::create(into, size).map_err(io)?;
    let chunks = size.div_ceil(u64::from(CHUNK));
    let mut requested = 0u64;
    let mut received = 0u64;
    while received < chunks {
        while requested < chunks && requested - received < WINDOW as u64 {
            let request = ReplRequest::Fetch {
                zone: zone.into(),
                path: path.clone(),
                offset: requested * u64::from(CHUNK),
                len: CHUNK,
                content: theirs.content,
            };
            send(stream, &request, buffer).map_err(io)?;
            requested += 1;
        }
        let offset = received * u64::from(CHUNK);
        match receive_chunk(stream, sink.chunk_buffer().map_err(io)?).map_err(io)? {
            Received::Data(len) => {
                let expected = (size - offset).min(u64::from(CHUNK));
                if len as u64 != expected {
                    // Changed there since it was listed: the next pull gets the new version.
                    return Err(PullError::Protocol {
                        peer,
                        reason: format!("{path} changed while being fetched"),
                    });
                }
                sink.write_chunk(len, offset).map_err(io)?;
            }
            Received::Other(ReplReply::Error { message }) => {
                return Err(PullError::Protocol {
                    peer,
                    reason: message,
                })
            }
            Received::Other(_) => {
                return Err(PullError::Protocol {
                    peer,
                    reason: "an answer to another request".into(),
                })
            }
        }
        received += 1;
    }
    let transferred = started.elapsed();
    let direct = sink.finish(size).map_err(io)?;
    tracing::debug!(
        %path,
        size,
        direct,
        transfer_ms = transferred.as_millis(),
        sync_ms = (started.elapsed() - transferred).as_millis(),
        "fetched"
    );
    Ok(())
}

/// Files at least this large are written past the page cache (`O_DIRECT`): on the machines
/// measured, copying a large file into the page cache and then flushing it took 3–4 times as
/// long as writing it to the disk directly (docs/GVFS.md), and nothing reads it back soon.
const DIRECT_MIN: u64 = 8 << 20;
/// Alignment of `O_DIRECT` buffers, offsets and lengths (the largest logical block size).
const DIRECT_ALIGN: usize = 4096;

/// Buffers of a large fetch: one being received into while the others wait for, or are in,
/// the writer thread.
const WRITE_BEHIND_BUFFERS: usize = 3;

/// A chunk for the writer thread: its buffer, its length and its offset in the file.
type PendingChunk = (Vec<u8>, usize, u64);

/// Where a fetched file's chunks go: reused buffers the replies are read into, and the file.
/// A large file is written with `O_DIRECT` (when the file system allows it) by a writer thread,
/// so that receiving the next chunk overlaps writing this one: each direct write waits for the
/// disk, and while receiving and writing took turns their times added up (docs/GVFS.md).
struct ChunkSink {
    /// The buffer the next chunk is read into (empty while waiting for one back from the writer).
    current: Vec<u8>,
    output: Output,
}

enum Output {
    /// Written on the fetching thread, through the page cache.
    Buffered(std::fs::File),
    /// Written by a writer thread, past the page cache.
    Behind {
        chunks: Option<crossbeam_channel::Sender<PendingChunk>>,
        free: crossbeam_channel::Receiver<Vec<u8>>,
        writer: Option<JoinHandle<std::io::Result<Written>>>,
    },
}

/// What the writer thread hands back: the file, whether it stayed direct, and whether its last
/// chunk was padded to the alignment.
struct Written {
    file: std::fs::File,
    direct: bool,
    padded: bool,
}

impl ChunkSink {
    fn create(path: &PathBuf, size: u64) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct_file = (size >= DIRECT_MIN)
            .then(|| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
                    .open(path)
                    // A file system without O_DIRECT (tmpfs): the page cache it is.
                    .ok()
            })
            .flatten();
        let buffer = || vec![0; CHUNK as usize + 2 * DIRECT_ALIGN];
        let output = match direct_file {
            None => Output::Buffered(std::fs::File::create(path)?),
            Some(file) => {
                let (chunks, to_write) = crossbeam_channel::bounded(WRITE_BEHIND_BUFFERS);
                let (give_back, free) = crossbeam_channel::bounded(WRITE_BEHIND_BUFFERS);
                for _ in 1..WRITE_BEHIND_BUFFERS {
                    give_back.send(buffer()).map_err(std::io::Error::other)?;
                }
                let written = Written {
                    file,
                    direct: true,
                    padded: false,
                };
                let path = path.clone();
                let writer = std::thread::Builder::new()
                    .name("gvfs-fetch-writer".into())
                    .spawn(move || write_behind(written, &path, &to_write, &give_back))?;
                Output::Behind {
                    chunks: Some(chunks),
                    free,
                    writer: Some(writer),
                }
            }
        };
        Ok(Self {
            current: buffer(),
            output,
        })
    }

    /// Where the next chunk is read to: [`CHUNK`] bytes, aligned for `O_DIRECT`.
    fn chunk_buffer(&mut self) -> std::io::Result<&mut [u8]> {
        if self.current.is_empty() {
            if let Output::Behind { free, .. } = &self.output {
                match free.recv() {
                    Ok(buffer) => self.current = buffer,
                    // The writer stopped: its error says why.
                    Err(_) => return Err(self.stop_writer()),
                }
            }
        }
        Ok(&mut aligned(&mut self.current)[..CHUNK as usize])
    }

    /// Writes (or hands to the writer) the `len` bytes read into
    /// [`chunk_buffer`](Self::chunk_buffer), which belong at `offset`.
    fn write_chunk(&mut self, len: usize, offset: u64) -> std::io::Result<()> {
        match &mut self.output {
            Output::Buffered(file) => file.write_all_at(&aligned(&mut self.current)[..len], offset),
            Output::Behind { chunks, .. } => {
                let buffer = std::mem::take(&mut self.current);
                let sent = chunks
                    .as_ref()
                    .is_some_and(|chunks| chunks.send((buffer, len, offset)).is_ok());
                if sent {
                    Ok(())
                } else {
                    Err(self.stop_writer())
                }
            }
        }
    }

    /// Ends the writer thread and returns the error it stopped on.
    fn stop_writer(&mut self) -> std::io::Error {
        match self.join_writer() {
            Some(Err(error)) => error,
            _ => std::io::Error::other("the fetch's writer thread stopped"),
        }
    }

    fn join_writer(&mut self) -> Option<std::io::Result<Written>> {
        let Output::Behind { chunks, writer, .. } = &mut self.output else {
            return None;
        };
        // Closing the channel lets the writer finish what it holds and return.
        drop(chunks.take());
        let joined = writer.take()?.join();
        Some(
            joined.unwrap_or_else(|_| {
                Err(std::io::Error::other("the fetch's writer thread panicked"))
            }),
        )
    }

    /// Cuts any padding and makes the file durable; returns whether it went past the cache.
    fn finish(mut self, size: u64) -> std::io::Result<bool> {
        if let Output::Buffered(file) = &self.output {
            file.sync_all()?;
            return Ok(false);
        }
        let written = self
            .join_writer()
            .unwrap_or_else(|| Err(std::io::Error::other("the fetch's writer thread stopped")))?;
        if written.padded {
            written.file.set_len(size)?;
        }
        written.file.sync_all()?;
        Ok(written.direct)
    }
}

impl Drop for ChunkSink {
    fn drop(&mut self) {
        // A fetch that failed: the writer still holds up to two chunks of a file that is
        // about to be removed; wait for it rather than leave it writing.
        let _ = self.join_writer();
    }
}

/// The writer thread of a large fetch: writes each chunk at its offset and gives its buffer back.
fn write_behind(
    mut written: Written,
    path: &std::path::Path,
    chunks: &crossbeam_channel::Receiver<PendingChunk>,
    give_back: &crossbeam_channel::Sender<Vec<u8>>,
) -> std::io::Result<Written> {
    for (mut storage, len, offset) in chunks {
        write_direct(&mut written, path, aligned(&mut storage), len, offset)?;
        // The fetch may have ended and dropped its side: nothing more to receive then.
        let _ = give_back.send(storage);
    }
    Ok(written)
}

/// Writes the first `len` bytes of `buffer` at `offset`, past the page cache while the file
/// system accepts it.
fn write_direct(
    written: &mut Written,
    path: &std::path::Path,
    buffer: &mut [u8],
    len: usize,
    offset: u64,
) -> std::io::Result<()> {
    if !written.direct {
        return written.file.write_all_at(&buffer[..len], offset);
    }
    // Only the last chunk can be short: padded with zeros to the alignment, cut at the end.
    let padded_len = len.next_multiple_of(DIRECT_ALIGN);
    buffer[len..padded_len].fill(0);
    match written.file.write_all_at(&buffer[..padded_len], offset) {
        Ok(()) => {
            written.padded |= padded_len != len;
            Ok(())
        }
        Err(error) if error.raw_os_error() == Some(nix::libc::EINVAL) => {
            // Opened, yet refused (an alignment this file system wants larger): go on
            // through the page cache.
            tracing::debug!(path = %path.display(), "O_DIRECT refused; writing buffered");
            written.file = std::fs::OpenOptions::new().write(true).open(path)?;
            written.direct = false;
            written.file.write_all_at(&buffer[..len], offset)
        }
        Err(error) => Err(error),
    }
}

/// The part of `storage` (`CHUNK` + 2 alignments long) that starts on an `O_DIRECT` boundary:
/// a chunk and its padding.
fn aligned(storage: &mut [u8]) -> &mut [u8] {
    let start = storage.as_ptr().align_offset(DIRECT_ALIGN);
    &mut storage[start..start + CHUNK as usize + DIRECT_ALIGN]
}

/// A reply read by [`receive_chunk`].
#[derive(Debug)]
enum Received {
    /// File data of this many bytes, now at the start of the buffer.
    Data(usize),
    /// Any other reply.
    Other(ReplReply),
}

/// Postcard's tag of [`ReplReply::Data`] (its variant index, a one-byte varint).
const DATA_TAG: u8 = 1;

/// Reads one reply; file data goes straight into `into` rather than into a message (one copy
/// less, and no allocation per chunk), anything else is decoded as usual.
fn receive_chunk(stream: &mut impl Read, into: &mut [u8]) -> std::io::Result<Received> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut header)?;
    let len = frame_len(header, MAX_REPLY).map_err(std::io::Error::other)?;
    let mut tag = [0u8; 1];
    if len == 0 {
        return Err(std::io::Error::other("an empty reply"));
    }
    stream.read_exact(&mut tag)?;
    if tag[0] != DATA_TAG {
        let mut body = vec![0u8; len];
        body[0] = tag[0];
        stream.read_exact(&mut body[1..])?;
        return decode(&body)
            .map(Received::Other)
            .map_err(std::io::Error::other);
    }
    // The data's length, a varint (postcard: 7 bits a byte, low first).
    let (mut data_len, mut prefix) = (0u64, 1usize);
    for shift in (0..64).step_by(7) {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        prefix += 1;
        data_len |= u64::from(byte[0] & 0x7f) << shift;
        if byte[0] & 0x80 == 0 {
            break;
        }
        if shift >= 63 {
            return Err(std::io::Error::other("a data length over 64 bits"));
        }
    }
    let data_len = usize::try_from(data_len)
        .ok()
        .filter(|n| prefix + n == len && *n <= into.len())
        .ok_or_else(|| {
            std::io::Error::other(format!(
                "a data reply of {data_len} bytes in a {len}-byte frame, at most {} wanted",
                into.len()
            ))
        })?;
    stream.read_exact(&mut into[..data_len])?;
    Ok(Received::Data(data_len))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn framed(reply: &ReplReply) -> Vec<u8> {
        let mut wire = Vec::new();
        send(&mut wire, reply, &mut Vec::new()).unwrap();
        wire
    }

    fn data(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8).collect()
    }

    #[test]
    fn data_replies_are_read_into_the_buffer_whatever_their_length() {
        let mut into = vec![0u8; CHUNK as usize];
        for len in [0, 1, 127, 128, 300, 16_383, 16_384, 70_000, CHUNK as usize] {
            let wire = framed(&ReplReply::Data { bytes: data(len) });
            match receive_chunk(&mut &wire[..], &mut into).unwrap() {
                Received::Data(n) => {
                    assert_eq!(n, len);
                    assert_eq!(into[..n], data(len)[..]);
                }
                other => panic!("{len}: {other:?}"),
            }
        }
    }

    #[test]
    fn other_replies_are_decoded_as_usual() {
        let mut into = vec![0u8; 16];
        let wire = framed(&ReplReply::Error {
            message: "gone".into(),
        });
        match receive_chunk(&mut &wire[..], &mut into).unwrap() {
            Received::Other(ReplReply::Error { message }) => assert_eq!(message, "gone"),
            other => panic!("{other:?}"),
        }
        let wire = framed(&ReplReply::Changes {
            version: 7,
            entries: Vec::new(),
        });
        assert!(matches!(
            receive_chunk(&mut &wire[..], &mut into).unwrap(),
            Received::Other(ReplReply::Changes { version: 7, .. })
        ));
    }

    #[test]
    fn data_replies_that_do_not_fit_or_do_not_add_up_are_refused() {
        // More than asked for.
        let mut into = vec![0u8; 100];
        let wire = framed(&ReplReply::Data { bytes: data(101) });
        assert!(receive_chunk(&mut &wire[..], &mut into).is_err());
        // A length that disagrees with the frame's.
        let mut wire = framed(&ReplReply::Data { bytes: data(50) });
        wire[FRAME_HEADER_LEN + 1] = 40;
        assert!(receive_chunk(&mut &wire[..], &mut into).is_err());
        // A varint that never ends, and a frame cut short.
        let mut endless = 20u32.to_be_bytes().to_vec();
        endless.push(DATA_TAG);
        endless.extend([0xff; 19]);
        assert!(receive_chunk(&mut &endless[..], &mut into).is_err());
        let wire = framed(&ReplReply::Data { bytes: data(50) });
        assert!(receive_chunk(&mut &wire[..wire.len() - 1], &mut into).is_err());
        // An empty frame.
        assert!(receive_chunk(&mut &[0u8, 0, 0, 0][..], &mut into).is_err());
    }

    /// Writes `content` through a sink chunk by chunk; returns whether it went past the cache.
    fn write_through_sink(path: &PathBuf, content: &[u8]) -> bool {
        let mut sink = ChunkSink::create(path, content.len() as u64).unwrap();
        for (index, piece) in content.chunks(CHUNK as usize).enumerate() {
            sink.chunk_buffer().unwrap()[..piece.len()].copy_from_slice(piece);
            sink.write_chunk(piece.len(), index as u64 * u64::from(CHUNK))
                .unwrap();
        }
        sink.finish(content.len() as u64).unwrap()
    }

    #[test]
    fn large_files_are_written_past_the_cache_and_come_out_whole() {
        let dir = tempfile::tempdir().unwrap();
        // Not a multiple of the alignment: the padded tail is cut off.
        let large = data(DIRECT_MIN as usize + 3 * CHUNK as usize + 1_234);
        let path = dir.path().join("large");
        let direct = write_through_sink(&path, &large);
        assert_eq!(std::fs::read(&path).unwrap(), large);
        // Where the file system has no O_DIRECT (tmpfs before Linux 6.6), the page cache is
        // used instead.
        let has_direct = {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(nix::fcntl::OFlag::O_DIRECT.bits())
                .open(dir.path().join("probe"))
                .is_ok()
        };
        assert_eq!(direct, has_direct);
        let small = data(5_000);
        let path = dir.path().join("small");
        assert!(
            !write_through_sink(&path, &small),
            "small files are buffered"
        );
        assert_eq!(std::fs::read(&path).unwrap(), small);
        let empty = dir.path().join("empty");
        assert!(!write_through_sink(&empty, &[]));
        assert_eq!(std::fs::metadata(&empty).unwrap().len(), 0);
    }
}
