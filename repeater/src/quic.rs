//! The WAN leg over QUIC (`quinn`): one connection per peer, relayed datagrams carried as QUIC
//! datagrams (unreliable, like the multicast they came from, but congestion-controlled), and
//! the rare datagram too large for one QUIC packet on a unidirectional stream.
//!
//! Peers authenticate with the network key, not with certificates: each side generates a
//! throw-away certificate, and once TLS is up both prove knowledge of a key derived from the
//! shared key over the session's exported keying material (RFC 5705). The proof binds the
//! TLS session, so a machine in the middle (which holds two different sessions) cannot relay
//! it. Without a shared key the leg accepts connections from the configured peers' addresses
//! only, as the UDP leg does, and says so at start.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use grapevine_core::wire::MAX_DATAGRAM;
use parking_lot::Mutex;
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName, UnixTime};

/// The TLS server name every repeater presents (certificates are not what authenticates).
const SERVER_NAME: &str = "grapevine-repeater";
/// Context of the key derived from the network key for the proofs.
const PROOF_KEY_CONTEXT: &str = "grapevine repeater quic v1";
/// Label of the keying material exported from each TLS session.
const EXPORTER_LABEL: &[u8] = b"EXPORTER-grapevine-repeater";
/// How long a new connection has to prove itself.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection with nothing received for this long is closed, so that a peer that crashed
/// (and cannot say so) is redialed: the relay's own silence threshold.
const IDLE_TIMEOUT: Duration = crate::relay::PEER_TIMEOUT;
/// QUIC pings keep a quiet link from idling out.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Least time between two dials of one peer.
const REDIAL_INTERVAL: Duration = Duration::from_secs(1);
/// The repeater with the higher address waits this long for the lower one to dial, so that a
/// pair usually shares one connection.
const DEFER_DIAL: Duration = Duration::from_millis(1500);
/// Datagrams too large for a QUIC datagram queued per connection for its stream.
const STREAM_QUEUE: usize = 1024;
/// Datagrams received from all connections and not yet taken by the relay.
const RECEIVE_QUEUE: usize = 1 << 16;

/// Why a connection was not kept.
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connecting: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error(transparent)]
    Connection(#[from] quinn::ConnectionError),
    #[error("handshake stream: {0}")]
    Stream(String),
    #[error("no keying material: {0:?}")]
    Exporter(quinn::crypto::ExportKeyingMaterialError),
    #[error("the peer does not hold the network key")]
    BadProof,
    #[error("the peer did not prove itself within {0:?}")]
    Timeout(Duration),
}

/// What the relay sees of one peer's connection.
#[derive(Clone, Debug, serde::Serialize)]
pub struct QuicPath {
    /// Smoothed round-trip time, in microseconds.
    pub rtt_us: u64,
    /// Congestion window, in bytes.
    pub congestion_window: u64,
    /// Congestion events so far.
    pub congestion_events: u64,
    /// QUIC packets lost so far.
    pub lost_packets: u64,
    /// Largest relayed datagram that fits one QUIC datagram now.
    pub max_datagram: Option<usize>,
}

/// A peer's connection: the one datagrams to it go on.
struct Link {
    connection: quinn::Connection,
    stream: tokio::sync::mpsc::Sender<Bytes>,
}

#[derive(Default)]
struct Dial {
    first_needed: Option<Instant>,
    last_attempt: Option<Instant>,
    in_flight: bool,
}

struct Shared {
    local: SocketAddr,
    proof_key: Option<[u8; 32]>,
    /// Addresses allowed to connect: the repeater's peers.
    peers: Arc<Mutex<Vec<SocketAddr>>>,
    links: Mutex<HashMap<SocketAddr, Link>>,
    dials: Mutex<HashMap<SocketAddr, Dial>>,
    received: crossbeam_channel::Sender<(SocketAddr, Bytes)>,
    congestion_drops: AtomicU64,
    queue_drops: AtomicU64,
    refused: AtomicU64,
}

/// The QUIC endpoint of a repeater and its connections.
pub(crate) struct QuicLeg {
    /// Owned until drop, which may happen inside someone else's runtime.
    runtime: Option<tokio::runtime::Runtime>,
    handle: tokio::runtime::Handle,
    endpoint: quinn::Endpoint,
    client: quinn::ClientConfig,
    shared: Arc<Shared>,
    received: crossbeam_channel::Receiver<(SocketAddr, Bytes)>,
}

impl QuicLeg {
    /// Runs a QUIC endpoint on `socket` (already bound), accepting `peers`; `network_key`
    /// (derived from a shared key) makes both ends prove they hold it.
    pub(crate) fn start(
        socket: UdpSocket,
        peers: Arc<Mutex<Vec<SocketAddr>>>,
        network_key: Option<[u8; 32]>,
    ) -> std::io::Result<Self> {
        let local = socket.local_addr()?;
        socket.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("gv-repeat-quic")
            .enable_all()
            .build()?;
        let (server, client) = configs().map_err(std::io::Error::other)?;
        let endpoint = {
            let _entered = runtime.enter();
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                Some(server),
                socket,
                Arc::new(quinn::TokioRuntime),
            )?
        };
        let (sender, received) = crossbeam_channel::bounded(RECEIVE_QUEUE);
        let shared = Arc::new(Shared {
            local,
            proof_key: network_key,
            peers,
            links: Mutex::new(HashMap::new()),
            dials: Mutex::new(HashMap::new()),
            received: sender,
            congestion_drops: AtomicU64::new(0),
            queue_drops: AtomicU64::new(0),
            refused: AtomicU64::new(0),
        });
        if network_key.is_none() {
            tracing::warn!(
                "QUIC leg without a shared network key: peers are recognised by address only"
            );
        }
        runtime.spawn(accept(endpoint.clone(), Arc::clone(&shared)));
        Ok(Self {
            handle: runtime.handle().clone(),
            runtime: Some(runtime),
            endpoint,
            client,
            shared,
            received,
        })
    }

    /// Datagrams received from peers, with the peer each came from.
    pub(crate) fn received(&self) -> &crossbeam_channel::Receiver<(SocketAddr, Bytes)> {
        &self.received
    }

    /// Sends each datagram to its peer; returns how many were handed to a connection. A peer
    /// without a connection is dialed (not more than once per [`REDIAL_INTERVAL`]) and its
    /// datagrams dropped meanwhile, as a lossy link would.
    pub(crate) fn send_batch(&self, outgoing: &[(&[u8], SocketAddr)]) -> usize {
        let mut sent = 0;
        let mut missing = Vec::new();
        {
            let links = self.shared.links.lock();
            for (bytes, peer) in outgoing {
                match links.get(peer) {
                    Some(link) => sent += usize::from(self.send_on(link, bytes)),
                    None => {
                        if !missing.contains(peer) {
                            missing.push(*peer);
                        }
                    }
                }
            }
        }
        for peer in missing {
            self.dial_if_due(peer);
        }
        sent
    }

    fn send_on(&self, link: &Link, bytes: &[u8]) -> bool {
        let data = Bytes::copy_from_slice(bytes);
        match link.connection.max_datagram_size() {
            Some(max) if bytes.len() <= max => {
                // A full buffer means the congestion controller is holding traffic back: the
                // oldest queued datagram makes room (fresher state is worth more).
                if link.connection.datagram_send_buffer_space() < bytes.len() {
                    self.shared.congestion_drops.fetch_add(1, Ordering::Relaxed);
                }
                link.connection.send_datagram(data).is_ok()
            }
            _ => match link.stream.try_send(data) {
                Ok(()) => true,
                Err(tokio::sync::mpsc::error::TrySendError::Full(_)) => {
                    self.shared.congestion_drops.fetch_add(1, Ordering::Relaxed);
                    false
                }
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_)) => false,
            },
        }
    }

    fn dial_if_due(&self, peer: SocketAddr) {
        let now = Instant::now();
        {
            let mut dials = self.shared.dials.lock();
            let dial = dials.entry(peer).or_default();
            let first_needed = *dial.first_needed.get_or_insert(now);
            let our_turn = self.shared.local < peer
                || now.saturating_duration_since(first_needed) >= DEFER_DIAL;
            let too_soon = dial
                .last_attempt
                .is_some_and(|at| now.saturating_duration_since(at) < REDIAL_INTERVAL);
            if !our_turn || too_soon || dial.in_flight {
                return;
            }
            dial.last_attempt = Some(now);
            dial.in_flight = true;
        }
        let (endpoint, client, shared) = (
            self.endpoint.clone(),
            self.client.clone(),
            Arc::clone(&self.shared),
        );
        self.handle.spawn(async move {
            // A peer that is down does not answer at all: give up after the timeout and let
            // the next keepalive dial again.
            let result = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
                let connection = endpoint.connect_with(client, peer, SERVER_NAME)?.await?;
                prove_as_dialer(&connection, shared.proof_key.as_ref()).await?;
                Ok::<_, LinkError>(connection)
            })
            .await
            .unwrap_or(Err(LinkError::Timeout(HANDSHAKE_TIMEOUT)));
            if let Some(dial) = shared.dials.lock().get_mut(&peer) {
                dial.in_flight = false;
            }
            match result {
                Ok(connection) => {
                    let dialer = shared.local;
                    register(&shared, peer, connection, dialer);
                }
                Err(error) => tracing::debug!(%peer, %error, "QUIC dial failed"),
            }
        });
    }

    /// The path of each connected peer.
    pub(crate) fn paths(&self) -> HashMap<SocketAddr, QuicPath> {
        self.shared
            .links
            .lock()
            .iter()
            .map(|(peer, link)| {
                let stats = link.connection.stats();
                (
                    *peer,
                    QuicPath {
                        rtt_us: u64::try_from(stats.path.rtt.as_micros()).unwrap_or(u64::MAX),
                        congestion_window: stats.path.cwnd,
                        congestion_events: stats.path.congestion_events,
                        lost_packets: stats.path.lost_packets,
                        max_datagram: link.connection.max_datagram_size(),
                    },
                )
            })
            .collect()
    }

    /// Datagrams dropped because a connection's congestion window held them back.
    pub(crate) fn congestion_drops(&self) -> u64 {
        self.shared.congestion_drops.load(Ordering::Relaxed)
    }

    /// Received datagrams dropped because the relay did not take them fast enough.
    pub(crate) fn queue_drops(&self) -> u64 {
        self.shared.queue_drops.load(Ordering::Relaxed)
    }

    /// Connections refused: from unknown addresses, or without the network key.
    pub(crate) fn refused(&self) -> u64 {
        self.shared.refused.load(Ordering::Relaxed)
    }
}

impl Drop for QuicLeg {
    fn drop(&mut self) {
        // Peers learn at once that this one is gone (instead of after their idle timeout).
        self.endpoint.close(0u32.into(), b"repeater stopping");
        self.shared.links.lock().clear();
        let Some(runtime) = self.runtime.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            // Inside an application's runtime nothing may block: the close goes out with
            // the endpoint's last poll, or the peers' idle timeout tells them.
            runtime.shutdown_background();
            return;
        }
        let endpoint = self.endpoint.clone();
        runtime.block_on(async move {
            let _ = tokio::time::timeout(Duration::from_millis(200), endpoint.wait_idle()).await;
        });
    }
}

async fn accept(endpoint: quinn::Endpoint, shared: Arc<Shared>) {
    while let Some(incoming) = endpoint.accept().await {
        let remote = incoming.remote_address();
        if !shared.peers.lock().iter().any(|p| p.ip() == remote.ip()) {
            tracing::debug!(%remote, "QUIC connection from an unknown address refused");
            shared.refused.fetch_add(1, Ordering::Relaxed);
            incoming.refuse();
            continue;
        }
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let result = async {
                let connection = incoming.await?;
                tokio::time::timeout(
                    HANDSHAKE_TIMEOUT,
                    prove_as_listener(&connection, shared.proof_key.as_ref()),
                )
                .await
                .map_err(|_| LinkError::Timeout(HANDSHAKE_TIMEOUT))??;
                Ok::<_, LinkError>(connection)
            }
            .await;
            match result {
                Ok(connection) => register(&shared, remote, connection, remote),
                Err(error) => {
                    shared.refused.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(%remote, %error, "QUIC connection refused");
                }
            }
        });
    }
}

/// Keeps `connection` as the link to `peer` (unless a pair's agreed one is up) and starts
/// reading from it.
fn register(
    shared: &Arc<Shared>,
    peer: SocketAddr,
    connection: quinn::Connection,
    dialer: SocketAddr,
) {
    let (stream, queued) = tokio::sync::mpsc::channel(STREAM_QUEUE);
    {
        // The newest connection carries what goes to the peer: a peer that restarted dialed
        // it, while the old one only waits to idle out. (Both ends dial at once rarely: the
        // higher address waits for the lower's dial; then each end may send on a different
        // one, and both are read.)
        tracing::info!(%peer, %dialer, rtt = ?connection.rtt(), "QUIC link up");
        shared.links.lock().insert(
            peer,
            Link {
                connection: connection.clone(),
                stream,
            },
        );
    }
    shared.dials.lock().remove(&peer);
    tokio::spawn(write_large(connection.clone(), queued));
    tokio::spawn(read_large(connection.clone(), peer, Arc::clone(shared)));
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let reason = loop {
            match connection.read_datagram().await {
                Ok(bytes) => shared.deliver(peer, bytes),
                Err(reason) => break reason,
            }
        };
        let mut links = shared.links.lock();
        if links
            .get(&peer)
            .is_some_and(|link| link.connection.stable_id() == connection.stable_id())
        {
            links.remove(&peer);
            tracing::info!(%peer, %reason, "QUIC link down");
        }
    });
}

impl Shared {
    fn deliver(&self, peer: SocketAddr, bytes: Bytes) {
        if self.received.try_send((peer, bytes)).is_err() {
            self.queue_drops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Sends datagrams too large for a QUIC datagram on one unidirectional stream, each behind
/// its length (two bytes, big-endian).
async fn write_large(
    connection: quinn::Connection,
    mut queued: tokio::sync::mpsc::Receiver<Bytes>,
) {
    let mut stream = None;
    while let Some(bytes) = queued.recv().await {
        if stream.is_none() {
            match connection.open_uni().await {
                Ok(opened) => stream = Some(opened),
                Err(_) => return,
            }
        }
        let Some(open) = stream.as_mut() else { return };
        let Ok(length) = u16::try_from(bytes.len()) else {
            continue;
        };
        if open.write_all(&length.to_be_bytes()).await.is_err()
            || open.write_all(&bytes).await.is_err()
        {
            return;
        }
    }
}

/// Reads the streams [`write_large`] writes; a frame of a length no datagram has closes the
/// connection (the peer is broken or hostile).
async fn read_large(connection: quinn::Connection, peer: SocketAddr, shared: Arc<Shared>) {
    while let Ok(mut stream) = connection.accept_uni().await {
        let connection = connection.clone();
        let shared = Arc::clone(&shared);
        tokio::spawn(async move {
            let mut length = [0u8; 2];
            while stream.read_exact(&mut length).await.is_ok() {
                let length = usize::from(u16::from_be_bytes(length));
                if length == 0 || length > MAX_DATAGRAM {
                    connection.close(1u32.into(), b"bad frame length");
                    return;
                }
                let mut bytes = vec![0u8; length];
                if stream.read_exact(&mut bytes).await.is_err() {
                    return;
                }
                shared.deliver(peer, Bytes::from(bytes));
            }
        });
    }
}

/// What one side sends to prove it holds the network key, bound to this TLS session.
fn proof(key: &[u8; 32], role: &[u8], keying_material: &[u8; 32]) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new_keyed(key);
    hasher.update(role);
    hasher.update(keying_material);
    *hasher.finalize().as_bytes()
}

fn keying_material(connection: &quinn::Connection) -> Result<[u8; 32], LinkError> {
    let mut out = [0u8; 32];
    connection
        .export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(LinkError::Exporter)?;
    Ok(out)
}

const DIALER: &[u8] = b"dialer";
const LISTENER: &[u8] = b"listener";

/// Sends this side's proof for `role` and closes the stream.
async fn send_proof(
    send: &mut quinn::SendStream,
    key: &[u8; 32],
    role: &[u8],
    material: &[u8; 32],
) -> Result<(), LinkError> {
    let stream_error = |e: &dyn std::fmt::Display| LinkError::Stream(e.to_string());
    send.write_all(&proof(key, role, material))
        .await
        .map_err(|e| stream_error(&e))?;
    send.finish().map_err(|e| stream_error(&e))
}

/// Reads the peer's proof for `role`; closes the connection when it is wrong.
async fn expect_proof(
    connection: &quinn::Connection,
    receive: &mut quinn::RecvStream,
    key: &[u8; 32],
    role: &[u8],
    material: &[u8; 32],
) -> Result<(), LinkError> {
    let mut theirs = [0u8; 32];
    receive
        .read_exact(&mut theirs)
        .await
        .map_err(|e| LinkError::Stream(e.to_string()))?;
    if !grapevine_core::auth::tags_equal(&proof(key, role, material), &theirs) {
        connection.close(2u32.into(), b"not authenticated");
        return Err(LinkError::BadProof);
    }
    Ok(())
}

async fn prove_as_dialer(
    connection: &quinn::Connection,
    key: Option<&[u8; 32]>,
) -> Result<(), LinkError> {
    let Some(key) = key else { return Ok(()) };
    let material = keying_material(connection)?;
    let (mut send, mut receive) = connection.open_bi().await?;
    send_proof(&mut send, key, DIALER, &material).await?;
    expect_proof(connection, &mut receive, key, LISTENER, &material).await
}

async fn prove_as_listener(
    connection: &quinn::Connection,
    key: Option<&[u8; 32]>,
) -> Result<(), LinkError> {
    let Some(key) = key else { return Ok(()) };
    let material = keying_material(connection)?;
    let (mut send, mut receive) = connection.accept_bi().await?;
    expect_proof(connection, &mut receive, key, DIALER, &material).await?;
    send_proof(&mut send, key, LISTENER, &material).await
}

/// The key both ends of a keyed QUIC leg prove they hold, derived from the network key.
pub(crate) fn network_proof_key(keyring: &grapevine_core::auth::Keyring) -> Option<[u8; 32]> {
    keyring
        .is_shared()
        .then(|| keyring.derive_key(PROOF_KEY_CONTEXT))
        .flatten()
}

fn transport() -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(quinn::IdleTimeout::try_from(IDLE_TIMEOUT).ok())
        .keep_alive_interval(Some(PING_INTERVAL))
        .max_concurrent_bidi_streams(1u32.into())
        .max_concurrent_uni_streams(4u32.into())
        .datagram_receive_buffer_size(Some(8 << 20))
        .datagram_send_buffer_size(4 << 20);
    Arc::new(transport)
}

/// The server and client TLS settings: a fresh self-signed certificate, and a client that
/// checks the server's handshake signature but not who issued its certificate (the network
/// key proof does that).
fn configs() -> Result<(quinn::ServerConfig, quinn::ClientConfig), String> {
    let certified = rcgen::generate_simple_self_signed(vec![SERVER_NAME.to_string()])
        .map_err(|e| format!("certificate: {e}"))?;
    let certificate = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_tls = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(vec![certificate], key.into())
        .map_err(|e| e.to_string())?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(
        QuicServerConfig::try_from(server_tls).map_err(|e| e.to_string())?,
    ));
    server.transport_config(transport());
    let client_tls = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(HandshakeOnly(provider)))
        .with_no_client_auth();
    let mut client = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(client_tls).map_err(|e| e.to_string())?,
    ));
    client.transport_config(transport());
    Ok((server, client))
}

/// Accepts any certificate, but checks that the server holds its key.
#[derive(Debug)]
struct HandshakeOnly(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for HandshakeOnly {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        // TLS 1.2 is never offered (QUIC is TLS 1.3 only).
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_depend_on_the_key_the_role_and_the_session() {
        let (key, other_key) = ([1u8; 32], [2u8; 32]);
        let (session, other_session) = ([7u8; 32], [8u8; 32]);
        let dialer = proof(&key, DIALER, &session);
        assert_eq!(dialer, proof(&key, DIALER, &session));
        assert_ne!(dialer, proof(&key, LISTENER, &session), "a reflected proof");
        assert_ne!(dialer, proof(&other_key, DIALER, &session));
        assert_ne!(
            dialer,
            proof(&key, DIALER, &other_session),
            "a relayed proof"
        );
    }

    #[test]
    fn only_a_shared_key_gives_a_proof_key() {
        let shared = grapevine_core::auth::Keyring::single(1, [9u8; 32]);
        let signer = grapevine_core::auth::Keyring::ed25519_secret(1, [9u8; 32]);
        assert!(network_proof_key(&shared).is_some());
        assert!(network_proof_key(&signer.public_only()).is_none());
    }
}
