//! Authenticated, encrypted connections for gvd's TCP ports (KOS and GrapeVineFS replication).
//!
//! With a network key set, both ends run a Noise `NNpsk0` handshake (the `snow` crate) whose
//! pre-shared key is derived from the network key and whose prologue names the port's purpose:
//! a peer that does not hold the key cannot complete it, and a handshake made for one port is
//! refused by another. Afterwards every byte travels in records (2-byte length, then a
//! ChaCha20-Poly1305 ciphertext of at most 65 535 bytes), so frames of any size pass through
//! unchanged. The reading and writing halves count their own nonces ([`SecureReader`],
//! [`SecureWriter`]), so one thread can read while another writes, as gvd's agents do.
//!
//! Without a key the connection is plain TCP; [`Link`] hides the difference from callers.
//!
//! # Examples
//!
//! ```
//! use std::io::{Read, Write};
//! use std::net::{TcpListener, TcpStream};
//! use grapevine_gvd_schema::secure::{accept, connect, PortKey, Purpose};
//!
//! let key = PortKey::from_network_key(b"a network key of the operator's choosing");
//! let listener = TcpListener::bind("127.0.0.1:0")?;
//! let address = listener.local_addr()?;
//! let server_key = key.clone();
//! let server = std::thread::spawn(move || -> std::io::Result<()> {
//!     let (stream, _) = listener.accept()?;
//!     let mut link = accept(stream, Some(&server_key), Purpose::Kos)?;
//!     let mut hello = [0u8; 5];
//!     link.read_exact(&mut hello)?;
//!     link.write_all(&hello)
//! });
//! let mut link = connect(TcpStream::connect(address)?, Some(&key), Purpose::Kos)?;
//! link.write_all(b"hello")?;
//! let mut echo = [0u8; 5];
//! link.read_exact(&mut echo)?;
//! assert_eq!(&echo, b"hello");
//! server.join().unwrap()?;
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! Its length (over 600 lines) is ~130 lines of unit tests kept beside the handshake they test.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const NOISE_PARAMS: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message.
const MAX_RECORD: usize = 65_535;
/// Authentication tag per record.
const TAG_LEN: usize = 16;
/// Largest plaintext per record.
const MAX_PLAIN: usize = MAX_RECORD - TAG_LEN;
/// How long a peer has to complete the handshake before it is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection is for; bound into the handshake so that one port's handshake is
/// refused by another.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Purpose {
    /// KOS clients to gvd's agents.
    Kos,
    /// GrapeVineFS replication and forwarded file operations between nodes.
    Replication,
}

impl Purpose {
    fn prologue(self) -> &'static [u8] {
        match self {
            Self::Kos => b"grapevine gvd kos v1",
            Self::Replication => b"grapevine gvd replication v1",
        }
    }
}

/// The secret both ends of a gvd connection prove they hold, derived from the network key.
#[derive(Clone)]
pub struct PortKey([u8; 32]);

impl PortKey {
    /// Derives the port key from the network key (the same key file that signs datagrams).
    pub fn from_network_key(network_key: &[u8]) -> Self {
        Self(blake3::derive_key(
            "grapevine gvd ports 2026-12 pre-shared key",
            network_key,
        ))
    }
}

impl std::fmt::Debug for PortKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PortKey(..)")
    }
}

fn refused(reason: impl std::fmt::Display) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::PermissionDenied,
        format!("peer failed authentication: {reason}"),
    )
}

fn builder<'a>(key: &'a PortKey, purpose: Purpose) -> std::io::Result<snow::Builder<'a>> {
    let params = NOISE_PARAMS.parse().map_err(std::io::Error::other)?;
    Ok(snow::Builder::new(params)
        .psk(0, &key.0)
        .prologue(purpose.prologue()))
}

/// The shared transport keys of an established connection.
struct Keys(snow::StatelessTransportState);

/// The reading half of an encrypted connection.
pub struct SecureReader<R> {
    inner: R,
    keys: Arc<Keys>,
    nonce: u64,
    record: Vec<u8>,
    plain: Vec<u8>,
    position: usize,
}

/// The writing half of an encrypted connection.
pub struct SecureWriter<W> {
    inner: W,
    keys: Arc<Keys>,
    nonce: u64,
    record: Vec<u8>,
}

impl<R> SecureReader<R> {
    fn open(&mut self, len: usize) -> std::io::Result<()> {
        self.plain.resize(len, 0);
        let n = self
            .keys
            .0
            .read_message(self.nonce, &self.record[..len], &mut self.plain)
            .map_err(|_| refused("a record failed its integrity check"))?;
        self.nonce += 1;
        self.plain.truncate(n);
        self.position = 0;
        Ok(())
    }

    fn take(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.plain.len() - self.position);
        buf[..n].copy_from_slice(&self.plain[self.position..self.position + n]);
        self.position += n;
        n
    }
}

impl<R: Read> Read for SecureReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.position == self.plain.len() {
            let mut header = [0u8; 2];
            match self.inner.read_exact(&mut header) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(0),
                Err(e) => return Err(e),
            }
            let len = usize::from(u16::from_be_bytes(header));
            self.record.resize(len, 0);
            self.inner.read_exact(&mut self.record)?;
            self.open(len)?;
        }
        Ok(self.take(buf))
    }
}

impl<W> SecureWriter<W> {
    /// Seals up to one record's worth of `buf`; returns how much it took.
    fn seal(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = buf.len().min(MAX_PLAIN);
        self.record.resize(2 + n + TAG_LEN, 0);
        let len = self
            .keys
            .0
            .write_message(self.nonce, &buf[..n], &mut self.record[2..])
            .map_err(std::io::Error::other)?;
        self.nonce += 1;
        let header = u16::try_from(len).map_err(std::io::Error::other)?;
        self.record[..2].copy_from_slice(&header.to_be_bytes());
        self.record.truncate(2 + len);
        Ok(n)
    }
}

impl<W: Write> Write for SecureWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let n = self.seal(buf)?;
        self.inner.write_all(&self.record)?;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

fn halves<R, W>(keys: snow::StatelessTransportState, reader: R, writer: W) -> Split<R, W> {
    let keys = Arc::new(Keys(keys));
    (
        SecureReader {
            inner: reader,
            keys: Arc::clone(&keys),
            nonce: 0,
            record: Vec::new(),
            plain: Vec::new(),
            position: 0,
        },
        SecureWriter {
            inner: writer,
            keys,
            nonce: 0,
            record: Vec::new(),
        },
    )
}

/// The encrypted reading and writing halves of a connection.
pub type Split<R, W> = (SecureReader<R>, SecureWriter<W>);

fn write_handshake(stream: &mut impl Write, message: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(message.len()).map_err(std::io::Error::other)?;
    let mut out = Vec::with_capacity(2 + message.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    stream.write_all(&out)
}

fn read_handshake(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut header = [0u8; 2];
    stream.read_exact(&mut header)?;
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(header))];
    stream.read_exact(&mut message)?;
    Ok(message)
}

/// A connection to or from a gvd port: plain TCP without a key, encrypted with one.
pub enum Link {
    /// No network key: anyone who reaches the port is served.
    Plain(TcpStream),
    /// Both ends proved the network key.
    Secure(SecureReader<TcpStream>, SecureWriter<TcpStream>),
}

impl Link {
    /// The reading and writing halves, for a thread each.
    ///
    /// # Errors
    ///
    /// When the socket cannot be cloned.
    pub fn split(self) -> std::io::Result<(Box<dyn Read + Send>, Box<dyn Write + Send>)> {
        Ok(match self {
            Self::Plain(stream) => (Box::new(stream.try_clone()?), Box::new(stream)),
            Self::Secure(reader, writer) => (Box::new(reader), Box::new(writer)),
        })
    }

    /// The socket underneath (for timeouts and shutdown).
    pub fn socket(&self) -> &TcpStream {
        match self {
            Self::Plain(stream) => stream,
            Self::Secure(reader, _) => &reader.inner,
        }
    }
}

impl std::fmt::Debug for Link {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain(stream) => f.debug_tuple("Plain").field(stream).finish(),
            Self::Secure(reader, _) => f.debug_tuple("Secure").field(&reader.inner).finish(),
        }
    }
}

impl<S: std::fmt::Debug> std::fmt::Debug for AsyncLink<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncLink")
            .field("stream", &self.stream)
            .field("secure", &self.keys.is_some())
            .finish()
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.read(buf),
            Self::Secure(reader, _) => reader.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Self::Plain(stream) => stream.write(buf),
            Self::Secure(_, writer) => writer.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Self::Plain(stream) => stream.flush(),
            Self::Secure(_, writer) => writer.flush(),
        }
    }
}

/// Runs `handshake` with the socket's read and write timeouts set to [`HANDSHAKE_TIMEOUT`],
/// then restores them.
fn with_deadline<T>(
    stream: &mut TcpStream,
    handshake: impl FnOnce(&mut TcpStream) -> std::io::Result<T>,
) -> std::io::Result<T> {
    let (read, write) = (stream.read_timeout()?, stream.write_timeout()?);
    stream.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
    stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT))?;
    let outcome = handshake(stream);
    stream.set_read_timeout(read)?;
    stream.set_write_timeout(write)?;
    outcome
}

/// Runs the client side of the handshake over a reading and a writing half (of a socket, or
/// anything else); the halves come back encrypted.
///
/// # Errors
///
/// `PermissionDenied` when the server does not prove the key; I/O errors.
pub fn connect_split<R: Read, W: Write>(
    mut reader: R,
    mut writer: W,
    key: &PortKey,
    purpose: Purpose,
) -> std::io::Result<Split<R, W>> {
    let mut noise = builder(key, purpose)?
        .build_initiator()
        .map_err(std::io::Error::other)?;
    let mut message = vec![0u8; MAX_RECORD];
    let n = noise
        .write_message(&[], &mut message)
        .map_err(std::io::Error::other)?;
    write_handshake(&mut writer, &message[..n])?;
    let answer = read_handshake(&mut reader)?;
    noise
        .read_message(&answer, &mut message)
        .map_err(|_| refused("the server does not hold the network key"))?;
    let keys = noise
        .into_stateless_transport_mode()
        .map_err(std::io::Error::other)?;
    Ok(halves(keys, reader, writer))
}

/// Runs the server side of the handshake over a reading and a writing half; the halves come
/// back encrypted.
///
/// # Errors
///
/// `PermissionDenied` when the client does not prove the key; I/O errors.
pub fn accept_split<R: Read, W: Write>(
    mut reader: R,
    mut writer: W,
    key: &PortKey,
    purpose: Purpose,
) -> std::io::Result<Split<R, W>> {
    let mut noise = builder(key, purpose)?
        .build_responder()
        .map_err(std::io::Error::other)?;
    let mut message = vec![0u8; MAX_RECORD];
    let hello = read_handshake(&mut reader)?;
    noise
        .read_message(&hello, &mut message)
        .map_err(|_| refused("the client does not hold the network key"))?;
    let n = noise
        .write_message(&[], &mut message)
        .map_err(std::io::Error::other)?;
    write_handshake(&mut writer, &message[..n])?;
    let keys = noise
        .into_stateless_transport_mode()
        .map_err(std::io::Error::other)?;
    Ok(halves(keys, reader, writer))
}

/// Opens the client side of a gvd connection over `stream`, within [`HANDSHAKE_TIMEOUT`].
///
/// # Errors
///
/// `PermissionDenied` when the server does not prove the key; I/O errors and timeouts.
pub fn connect(
    stream: TcpStream,
    key: Option<&PortKey>,
    purpose: Purpose,
) -> std::io::Result<Link> {
    open_link(stream, key, purpose, connect_split)
}

/// Opens the server side of a gvd connection over `stream`: the client must complete the
/// handshake within [`HANDSHAKE_TIMEOUT`].
///
/// # Errors
///
/// `PermissionDenied` when the client does not prove the key; I/O errors and timeouts.
pub fn accept(stream: TcpStream, key: Option<&PortKey>, purpose: Purpose) -> std::io::Result<Link> {
    open_link(stream, key, purpose, accept_split)
}

type Handshake =
    fn(TcpStream, TcpStream, &PortKey, Purpose) -> std::io::Result<Split<TcpStream, TcpStream>>;

fn open_link(
    mut stream: TcpStream,
    key: Option<&PortKey>,
    purpose: Purpose,
    handshake: Handshake,
) -> std::io::Result<Link> {
    let Some(key) = key else {
        return Ok(Link::Plain(stream));
    };
    let (reader, writer) = with_deadline(&mut stream, |stream| {
        handshake(stream.try_clone()?, stream.try_clone()?, key, purpose)
    })?;
    Ok(Link::Secure(reader, writer))
}

/// A connection to or from a gvd port, for tokio: plain or encrypted, as [`Link`].
pub struct AsyncLink<S> {
    stream: S,
    keys: Option<(SecureReader<()>, SecureWriter<()>)>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncLink<S> {
    /// Opens the client side over `stream` (see [`connect`]), within [`HANDSHAKE_TIMEOUT`].
    ///
    /// # Errors
    ///
    /// As [`connect`].
    pub async fn connect(
        mut stream: S,
        key: Option<&PortKey>,
        purpose: Purpose,
    ) -> std::io::Result<Self> {
        let Some(key) = key else {
            return Ok(Self { stream, keys: None });
        };
        let mut noise = builder(key, purpose)?
            .build_initiator()
            .map_err(std::io::Error::other)?;
        let handshake = async {
            let mut message = vec![0u8; MAX_RECORD];
            let n = noise
                .write_message(&[], &mut message)
                .map_err(std::io::Error::other)?;
            let len = u16::try_from(n).map_err(std::io::Error::other)?;
            stream.write_all(&len.to_be_bytes()).await?;
            stream.write_all(&message[..n]).await?;
            let mut header = [0u8; 2];
            stream.read_exact(&mut header).await?;
            let mut answer = vec![0u8; usize::from(u16::from_be_bytes(header))];
            stream.read_exact(&mut answer).await?;
            noise
                .read_message(&answer, &mut message)
                .map_err(|_| refused("the server does not hold the network key"))?;
            Ok::<(), std::io::Error>(())
        };
        tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))??;
        let keys = noise
            .into_stateless_transport_mode()
            .map_err(std::io::Error::other)?;
        Ok(Self {
            stream,
            keys: Some(halves(keys, (), ())),
        })
    }

    /// Reads exactly `buf.len()` bytes.
    ///
    /// # Errors
    ///
    /// I/O errors, end of stream, or a record that fails its integrity check.
    pub async fn read_exact(&mut self, buf: &mut [u8]) -> std::io::Result<()> {
        let Some((reader, _)) = &mut self.keys else {
            self.stream.read_exact(buf).await?;
            return Ok(());
        };
        let mut filled = 0;
        while filled < buf.len() {
            if reader.position == reader.plain.len() {
                let mut header = [0u8; 2];
                self.stream.read_exact(&mut header).await?;
                let len = usize::from(u16::from_be_bytes(header));
                reader.record.resize(len, 0);
                self.stream.read_exact(&mut reader.record).await?;
                reader.open(len)?;
            }
            filled += reader.take(&mut buf[filled..]);
        }
        Ok(())
    }

    /// Writes all of `buf`.
    ///
    /// # Errors
    ///
    /// I/O errors.
    pub async fn write_all(&mut self, mut buf: &[u8]) -> std::io::Result<()> {
        let Some((_, writer)) = &mut self.keys else {
            return self.stream.write_all(buf).await;
        };
        while !buf.is_empty() {
            let n = writer.seal(buf)?;
            self.stream.write_all(&writer.record).await?;
            buf = &buf[n..];
        }
        Ok(())
    }

    /// The stream underneath.
    pub fn get_ref(&self) -> &S {
        &self.stream
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn pair(
        server_key: Option<PortKey>,
        server_purpose: Purpose,
    ) -> (
        std::net::SocketAddr,
        std::thread::JoinHandle<std::io::Result<Vec<u8>>>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept()?;
            let mut link = accept(stream, server_key.as_ref(), server_purpose)?;
            let mut received = vec![0u8; 200_000];
            link.read_exact(&mut received)?;
            link.write_all(&received)?;
            Ok(received)
        });
        (address, server)
    }

    #[test]
    fn large_frames_cross_in_records_both_ways() {
        let key = PortKey::from_network_key(b"k1");
        let (address, server) = pair(Some(key.clone()), Purpose::Replication);
        let stream = TcpStream::connect(address).unwrap();
        let mut link = connect(stream, Some(&key), Purpose::Replication).unwrap();
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        link.write_all(&sent).unwrap();
        let mut echoed = vec![0u8; sent.len()];
        link.read_exact(&mut echoed).unwrap();
        assert_eq!(echoed, sent);
        assert_eq!(server.join().unwrap().unwrap(), sent);
    }

    #[test]
    fn a_wrong_key_or_another_port_is_refused_by_both_sides() {
        for (client_key, purpose) in [
            (b"wrong".as_slice(), Purpose::Replication),
            (b"k1".as_slice(), Purpose::Kos),
        ] {
            let (address, server) =
                pair(Some(PortKey::from_network_key(b"k1")), Purpose::Replication);
            let stream = TcpStream::connect(address).unwrap();
            let client = connect(
                stream,
                Some(&PortKey::from_network_key(client_key)),
                purpose,
            );
            let error = server.join().unwrap().unwrap_err();
            assert_eq!(
                error.kind(),
                std::io::ErrorKind::PermissionDenied,
                "{error}"
            );
            assert!(client.is_err(), "the client must not think it is connected");
        }
    }

    #[test]
    fn a_client_without_the_key_gets_nothing_and_is_dropped() {
        let (address, server) = pair(Some(PortKey::from_network_key(b"k1")), Purpose::Kos);
        let mut stream = TcpStream::connect(address).unwrap();
        // A plain KOS frame instead of a handshake.
        stream.write_all(&[0, 0, 0, 3, 0, 1, 2]).unwrap();
        assert!(server.join().unwrap().is_err());
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty(), "the server sent {} bytes", rest.len());
    }

    #[test]
    fn a_silent_client_is_dropped_after_the_handshake_timeout() {
        let (address, server) = pair(Some(PortKey::from_network_key(b"k1")), Purpose::Kos);
        let _silent = TcpStream::connect(address).unwrap();
        let started = std::time::Instant::now();
        let error = server.join().unwrap().unwrap_err();
        assert!(matches!(
            error.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ));
        assert!(started.elapsed() < HANDSHAKE_TIMEOUT * 3);
    }

    #[test]
    fn a_tampered_record_is_refused() {
        let key = PortKey::from_network_key(b"k1");
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let server_key = key.clone();
        let server = std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut link = accept(stream, Some(&server_key), Purpose::Kos).unwrap();
            let mut byte = [0u8; 1];
            link.read_exact(&mut byte)
        });
        let stream = TcpStream::connect(address).unwrap();
        let Link::Secure(_, mut writer) = connect(stream, Some(&key), Purpose::Kos).unwrap() else {
            panic!("keyed links are secure");
        };
        writer.seal(b"x").unwrap();
        let last = writer.record.len() - 1;
        writer.record[last] ^= 1;
        writer.inner.write_all(&writer.record).unwrap();
        let error = server.join().unwrap().unwrap_err();
        assert_eq!(error.kind(), std::io::ErrorKind::PermissionDenied);
    }

    #[tokio::test]
    async fn async_and_blocking_ends_talk() {
        let key = PortKey::from_network_key(b"k1");
        let (address, server) = pair(Some(key.clone()), Purpose::Kos);
        let stream = tokio::net::TcpStream::connect(address).await.unwrap();
        let mut link = AsyncLink::connect(stream, Some(&key), Purpose::Kos)
            .await
            .unwrap();
        let sent: Vec<u8> = (0..200_000u32).map(|i| (i % 7) as u8).collect();
        link.write_all(&sent).await.unwrap();
        let mut echoed = vec![0u8; sent.len()];
        link.read_exact(&mut echoed).await.unwrap();
        assert_eq!(echoed, sent);
        server.join().unwrap().unwrap();
    }
}
