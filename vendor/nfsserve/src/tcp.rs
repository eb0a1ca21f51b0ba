use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow;
use async_trait::async_trait;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, Notify, Semaphore};
use tracing::{debug, error, info};

use crate::context::RPCContext;
use crate::rpcwire::*;
use crate::transaction_tracker::TransactionTracker;
use crate::vfs::NFSFileSystem;

/// A NFS Tcp Connection Handler
pub struct NFSTcpListener<T: NFSFileSystem + Send + Sync + 'static> {
    listener: TcpListener,
    port: u16,
    arcfs: Arc<T>,
    mount_signal: Option<mpsc::Sender<bool>>,
    export_name: Arc<String>,
    transaction_tracker: Arc<TransactionTracker>,
}

pub fn generate_host_ip(hostnum: u16) -> String {
    format!("127.88.{}.{}", ((hostnum >> 8) & 0xFF) as u8, (hostnum & 0xFF) as u8)
}

/// GrapeVine addition: the largest RPC record accepted, well above a WRITE of `wtmax` (1 MiB).
pub const MAX_RECORD_BYTES: usize = 4 << 20;
/// GrapeVine addition: calls of one connection answered concurrently; the next record is read
/// only when one finishes, so a client that pipelines without bound is held back by TCP.
pub const MAX_CALLS_IN_FLIGHT: usize = 64;

/// Reads records straight from the connection and answers each in a task of its own; the reply
/// goes out in one write under the connection's write lock. (GrapeVine change: upstream copied
/// requests through an in-memory pipe and replies through a channel to a loop that owned the
/// socket, two task hops and two writes per call.)
async fn process_socket(socket: tokio::net::TcpStream, context: RPCContext) -> Result<(), anyhow::Error> {
    let _ = socket.set_nodelay(true);
    let (reader, writer) = socket.into_split();
    let writer = Arc::new(tokio::sync::Mutex::new(writer));
    let in_flight = Arc::new(Semaphore::new(MAX_CALLS_IN_FLIGHT));
    let broken = Arc::new(Notify::new());
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    loop {
        let permit = in_flight.clone().acquire_owned().await?;
        let record = tokio::select! {
            record = read_record(&mut reader, MAX_RECORD_BYTES) => record,
            _ = broken.notified() => return Err(anyhow::anyhow!("a call failed; connection closed")),
        };
        let record = match record {
            Ok(Some(record)) => record,
            Ok(None) => return Ok(()),
            Err(e) => {
                debug!("Message handling closed : {:?}", e);
                return Err(e);
            },
        };
        let context = context.clone();
        let writer = writer.clone();
        let broken = broken.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match reply_to_record(record, context).await {
                Ok(Some(reply)) => {
                    if let Err(e) = send_reply(&mut *writer.lock().await, reply).await {
                        debug!("Write error {:?}", e);
                        broken.notify_one();
                    }
                },
                Ok(None) => {},
                Err(e) => {
                    error!("RPC Error: {:?}", e);
                    broken.notify_one();
                },
            }
        });
    }
}

/// GrapeVine addition: sends a reply: its head, then its file tail with `sendfile` (the data
/// goes from the page cache to the socket without a copy through this process), then the
/// padding. Bytes the file no longer holds (it shrank after the head announced them) go as
/// zeros, so that the record keeps its announced length.
async fn send_reply(writer: &mut tokio::net::tcp::OwnedWriteHalf, reply: Reply) -> io::Result<()> {
    writer.write_all(&reply.head).await?;
    let Some(tail) = reply.tail else {
        return Ok(());
    };
    let socket: &tokio::net::TcpStream = writer.as_ref();
    let mut offset = tail.offset;
    let mut left = tail.count as usize;
    while left > 0 {
        socket.writable().await?;
        let sent = socket.try_io(tokio::io::Interest::WRITABLE, || {
            rustix::fs::sendfile(socket, &tail.file, Some(&mut offset), left).map_err(io::Error::from)
        });
        match sent {
            Ok(0) => break,
            Ok(sent) => left -= sent,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {},
            Err(e) => return Err(e),
        }
    }
    if left + tail.pad > 0 {
        writer.write_all(&vec![0; left + tail.pad]).await?;
    }
    Ok(())
}

#[async_trait]
pub trait NFSTcp: Send + Sync {
    /// Gets the true listening port. Useful if the bound port number is 0
    fn get_listen_port(&self) -> u16;

    /// Gets the true listening IP. Useful on windows when the IP may be random
    fn get_listen_ip(&self) -> IpAddr;

    /// Sets a mount listener. A "true" signal will be sent on a mount
    /// and a "false" will be sent on an unmount
    fn set_mount_listener(&mut self, signal: mpsc::Sender<bool>);

    /// Loops forever and never returns handling all incoming connections.
    async fn handle_forever(&self) -> io::Result<()>;
}

impl<T: NFSFileSystem + Send + Sync + 'static> NFSTcpListener<T> {
    /// Binds to a ipstr of the form [ip address]:port. For instance
    /// "127.0.0.1:12000". fs is an instance of an implementation
    /// of NFSFileSystem.
    pub async fn bind(ipstr: &str, fs: T) -> io::Result<NFSTcpListener<T>> {
        let (ip, port) = ipstr
            .split_once(':')
            .ok_or_else(|| io::Error::new(io::ErrorKind::AddrNotAvailable, "IP Address must be of form ip:port"))?;
        let port = port
            .parse::<u16>()
            .map_err(|_| io::Error::new(io::ErrorKind::AddrNotAvailable, "Port not in range 0..=65535"))?;

        let arcfs: Arc<T> = Arc::new(fs);

        if ip == "auto" {
            let mut num_tries_left = 32;

            for try_ip in 1u16.. {
                let ip = generate_host_ip(try_ip);

                let result = NFSTcpListener::bind_internal(&ip, port, arcfs.clone()).await;

                match &result {
                    Err(_) => {
                        if num_tries_left == 0 {
                            return result;
                        } else {
                            num_tries_left -= 1;
                            continue;
                        }
                    },
                    Ok(_) => {
                        return result;
                    },
                }
            }
            unreachable!(); // Does not detect automatically that loop above never terminates.
        } else {
            // Otherwise, try this.
            NFSTcpListener::bind_internal(ip, port, arcfs).await
        }
    }

    async fn bind_internal(ip: &str, port: u16, arcfs: Arc<T>) -> io::Result<NFSTcpListener<T>> {
        let ipstr = format!("{ip}:{port}");
        let listener = TcpListener::bind(&ipstr).await?;
        info!("Listening on {:?}", &ipstr);

        let port = match listener.local_addr().unwrap() {
            SocketAddr::V4(s) => s.port(),
            SocketAddr::V6(s) => s.port(),
        };
        Ok(NFSTcpListener {
            listener,
            port,
            arcfs,
            mount_signal: None,
            export_name: Arc::from("/".to_string()),
            transaction_tracker: Arc::new(TransactionTracker::new(Duration::from_secs(60))),
        })
    }

    /// Sets an optional NFS export name.
    ///
    /// - `export_name`: The desired export name without slashes.
    ///
    /// Example: Name `foo` results in the export path `/foo`.
    /// Default path is `/` if not set.
    pub fn with_export_name<S: AsRef<str>>(&mut self, export_name: S) {
        self.export_name = Arc::new(format!("/{}", export_name.as_ref().trim_end_matches('/').trim_start_matches('/')))
    }
}

#[async_trait]
impl<T: NFSFileSystem + Send + Sync + 'static> NFSTcp for NFSTcpListener<T> {
    /// Gets the true listening port. Useful if the bound port number is 0
    fn get_listen_port(&self) -> u16 {
        let addr = self.listener.local_addr().unwrap();
        addr.port()
    }

    fn get_listen_ip(&self) -> IpAddr {
        let addr = self.listener.local_addr().unwrap();
        addr.ip()
    }

    /// Sets a mount listener. A "true" signal will be sent on a mount
    /// and a "false" will be sent on an unmount
    fn set_mount_listener(&mut self, signal: mpsc::Sender<bool>) {
        self.mount_signal = Some(signal);
    }

    /// Loops forever and never returns handling all incoming connections.
    async fn handle_forever(&self) -> io::Result<()> {
        loop {
            let (socket, _) = self.listener.accept().await?;
            let context = RPCContext {
                local_port: self.port,
                client_addr: socket.peer_addr().unwrap().to_string(),
                auth: crate::rpc::auth_unix::default(),
                vfs: self.arcfs.clone(),
                mount_signal: self.mount_signal.clone(),
                export_name: self.export_name.clone(),
                transaction_tracker: self.transaction_tracker.clone(),
            };
            info!("Accepting connection from {}", context.client_addr);
            debug!("Accepting socket {:?} {:?}", socket, context);
            tokio::spawn(async move {
                let _ = process_socket(socket, context).await;
            });
        }
    }
}

/// GrapeVine addition, for fuzzing and tests: answers the RPC records in `stream` (the bytes a
/// client would send on one connection) as a connection of a server exporting `fs` as
/// `export_name` would, one call at a time, and returns the bytes of the replies, record marks
/// included. It stops where a connection would be closed: at the first malformed or
/// oversized record, or a call that fails.
pub async fn answer_stream<T: NFSFileSystem + Send + Sync + 'static>(
    fs: Arc<T>,
    export_name: &str,
    mut stream: &[u8],
) -> Vec<u8> {
    let context = RPCContext {
        local_port: 2049,
        client_addr: "127.0.0.1:700".to_string(),
        auth: crate::rpc::auth_unix::default(),
        vfs: fs,
        mount_signal: None,
        export_name: Arc::new(export_name.to_string()),
        transaction_tracker: Arc::new(TransactionTracker::new(Duration::from_secs(60))),
    };
    let mut replies = Vec::new();
    while let Ok(Some(record)) = read_record(&mut stream, MAX_RECORD_BYTES).await {
        match reply_to_record(record, context.clone()).await {
            Ok(Some(reply)) => {
                replies.extend_from_slice(&reply.head);
                match reply.tail.map(|tail| tail.read_all()) {
                    Some(Ok(data)) => replies.extend_from_slice(&data),
                    Some(Err(_)) => break,
                    None => {},
                }
            },
            Ok(None) => {}
            Err(_) => break,
        }
    }
    replies
}
