//! Multicast transport: sockets built with `socket2`, batched I/O, a self-test and a tokio
//! wrapper.
//!
//! The interface is always explicit. [`MulticastConfig::default`] uses the loopback interface,
//! so nothing leaves the machine unless the caller names another interface: a socket left to
//! the kernel's choice would send multicast out of the default route's interface.
//!
//! Its length (just over 600 lines) is socket setup for IPv4 and IPv6 alike, each option with the
//! reason it is set; batched I/O is in `batch.rs`, tests in `tests.rs`.

mod batch;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

pub use batch::{RecvBatch, RecvMeta};

use crate::wire::{Datagram, DatagramHeader, FLAG_PROBE};
use zerocopy::IntoBytes;

/// Which interface multicast is joined and sent on.
#[derive(Clone, Debug, Default, Eq, PartialEq)]
pub enum InterfaceSpec {
    /// The loopback interface (127.0.0.1 / ::1): the safe default.
    #[default]
    Loopback,
    /// An interface by name, e.g. `eth0`.
    Name(String),
    /// The interface that holds this address.
    Addr(IpAddr),
}

impl FromStr for InterfaceSpec {
    type Err = std::convert::Infallible;

    /// `lo`/`loopback` → loopback, an IP address → that address, anything else → a name.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "lo" | "loopback" => Self::Loopback,
            _ => match s.parse::<IpAddr>() {
                Ok(addr) => Self::Addr(addr),
                Err(_) => Self::Name(s.to_string()),
            },
        })
    }
}

impl fmt::Display for InterfaceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Loopback => f.write_str("loopback"),
            Self::Name(name) => f.write_str(name),
            Self::Addr(addr) => write!(f, "{addr}"),
        }
    }
}

/// An interface resolved to its name, index and the address used for the group's family.
#[derive(Clone, Debug, Eq, PartialEq)]
pub struct ResolvedInterface {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Its address in the group's family.
    pub addr: IpAddr,
}

/// Settings of a multicast socket.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct MulticastConfig {
    /// Group address and port. Default `239.255.70.86:7086`.
    pub group: SocketAddr,
    /// Interface to join and send on. Default loopback.
    pub interface: InterfaceSpec,
    /// Multicast TTL / hop limit. Default 1 (this subnet only).
    pub ttl: u32,
    /// Whether this host's own receivers get what it sends. Default true.
    pub loopback: bool,
    /// Receive buffer to ask the kernel for. Default 8 MiB; the kernel may cap it
    /// (`net.core.rmem_max`) and [`MulticastSocket::recv_buffer_size`] reports what was granted.
    pub recv_buffer: usize,
    /// Send buffer to ask for. Default 1 MiB.
    pub send_buffer: usize,
    /// Send runs of equal-size datagrams as one buffer the kernel cuts up (UDP generic
    /// segmentation offload, `UDP_SEGMENT`) where the kernel has it: one pass through the
    /// network stack for up to 64 datagrams. Receivers see the same datagrams either way. A
    /// socket whose kernel or device refuses it falls back to one datagram per message. Default
    /// true.
    pub segmentation_offload: bool,
    /// Receivers ask the kernel to hand over a run of datagrams from one sender as one buffer
    /// (UDP generic receive offload, `UDP_GRO`) where it has it: on loopback a run sent with
    /// segmentation offload then crosses the stack whole instead of being cut up for every
    /// receiving socket. [`RecvBatch`] gives the datagrams one by one either way, with their
    /// boundaries; its buffers grow to 64 KiB each. The kernel then counts a dropped run once in
    /// [`RecvBatch::kernel_drops`]: turn this off to count drops datagram by datagram.
    /// Default true.
    pub receive_offload: bool,
}

impl MulticastConfig {
    /// Settings for `group` on loopback.
    pub fn new(group: SocketAddr) -> Self {
        Self {
            group,
            ..Self::default()
        }
    }

    /// The same settings on `interface`.
    #[must_use]
    pub fn on(mut self, interface: InterfaceSpec) -> Self {
        self.interface = interface;
        self
    }
}

impl Default for MulticastConfig {
    fn default() -> Self {
        Self {
            group: SocketAddr::from((Ipv4Addr::new(239, 255, 70, 86), 7086)),
            interface: InterfaceSpec::Loopback,
            ttl: 1,
            loopback: true,
            recv_buffer: 8 << 20,
            send_buffer: 1 << 20,
            segmentation_offload: true,
            receive_offload: true,
        }
    }
}

/// Why a multicast socket could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// No IPv6 multicast route out of the interface (Linux loopback has none by default).
    #[error(
        "cannot send to {group} on {interface}: no IPv6 multicast route there (Linux gives \
         loopback none by default). Add one as root (`ip -6 route add multicast ff00::/8 dev \
         {interface} table local` and `ip link set {interface} multicast on`), or use an \
         interface with IPv6 multicast (--iface)"
    )]
    NoIpv6MulticastRoute {
        /// The group.
        group: SocketAddr,
        /// The interface.
        interface: String,
    },
    /// The group address is not a multicast address.
    #[error("{0} is not a multicast address (IPv4 224.0.0.0/4, IPv6 ff00::/8)")]
    NotMulticast(IpAddr),
    /// No interface of that name or address.
    #[error("no interface {0} on this host (see `ip addr`)")]
    NoSuchInterface(String),
    /// The interface exists but has no address of the group's family.
    #[error("interface {name} has no {family} address")]
    NoAddress {
        /// Interface name.
        name: String,
        /// "IPv4" or "IPv6".
        family: &'static str,
    },
    /// A socket call failed.
    // The OS error is part of the message and not also a `source`: chains printed with
    // `{:#}` would show it twice.
    #[error("{op} failed for {group} on {interface}: {error}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The group.
        group: SocketAddr,
        /// The interface.
        interface: String,
        /// The OS error.
        error: io::Error,
    },
    /// The self-test sent probes but none came back.
    #[error(
        "multicast does not flow on {interface} for {group}: no probe came back within {waited:?}. \
         Check that the interface is up and has the MULTICAST flag (`ip link show {interface}`), \
         that a firewall does not drop UDP port {port}, and, on loopback, that multicast is \
         routed to it (`ip route add 224.0.0.0/4 dev lo`)",
        port = group.port()
    )]
    MulticastBlocked {
        /// The group.
        group: SocketAddr,
        /// The interface.
        interface: String,
        /// How long probes were sent.
        waited: Duration,
    },
}

/// Finds the interface `spec` names, with an address of the family of `ipv6`.
///
/// # Errors
///
/// [`NetError::NoSuchInterface`] or [`NetError::NoAddress`].
///
/// ```
/// use grapevine_core::net::{resolve_interface, InterfaceSpec};
/// let lo = resolve_interface(&InterfaceSpec::Loopback, false).unwrap();
/// assert_eq!(lo.addr, std::net::Ipv4Addr::LOCALHOST);
/// assert!(resolve_interface(&"no-such-if0".parse().unwrap(), false).is_err());
/// ```
pub fn resolve_interface(spec: &InterfaceSpec, ipv6: bool) -> Result<ResolvedInterface, NetError> {
    let family = if ipv6 { "IPv6" } else { "IPv4" };
    let interfaces = if_addrs::get_if_addrs().map_err(|e| NetError::Io {
        op: "listing interfaces",
        group: SocketAddr::from(([0, 0, 0, 0], 0)),
        interface: spec.to_string(),
        error: e,
    })?;
    let matches_spec = |iface: &if_addrs::Interface| match spec {
        InterfaceSpec::Loopback => iface.is_loopback(),
        InterfaceSpec::Name(name) => &iface.name == name,
        InterfaceSpec::Addr(addr) => iface.ip() == *addr,
    };
    let named: Vec<_> = interfaces.iter().filter(|i| matches_spec(i)).collect();
    let Some(first) = named.first() else {
        return Err(NetError::NoSuchInterface(spec.to_string()));
    };
    // For an address spec, the interface is the one holding it; look at all its addresses.
    let name = first.name.clone();
    let candidates = interfaces.iter().filter(|i| i.name == name);
    let mut chosen = None;
    for iface in candidates {
        let ip = iface.ip();
        if ip.is_ipv6() != ipv6 {
            continue;
        }
        if let InterfaceSpec::Addr(addr) = spec {
            if addr.is_ipv6() == ipv6 && ip != *addr {
                continue;
            }
        }
        chosen = Some((ip, iface.index.unwrap_or(0)));
        break;
    }
    let Some((addr, index)) = chosen else {
        return Err(NetError::NoAddress { name, family });
    };
    Ok(ResolvedInterface { name, index, addr })
}

/// A UDP socket joined to (receiver) or sending to (sender) a multicast group on one interface.
#[derive(Debug)]
pub struct MulticastSocket {
    socket: UdpSocket,
    group: SocketAddr,
    interface: ResolvedInterface,
    recv_buffer: usize,
    /// Whether sends still try `UDP_SEGMENT` (cleared for good when the kernel refuses it).
    segmentation: std::sync::atomic::AtomicBool,
    /// Whether the kernel coalesces what this socket receives (`UDP_GRO`).
    coalescing: bool,
}

impl MulticastSocket {
    /// A socket that receives the group's datagrams on the configured interface.
    ///
    /// It binds the group address and port with `SO_REUSEADDR`/`SO_REUSEPORT` (several
    /// subscribers on one host share the group), joins on the interface, turns on kernel drop
    /// counting (`SO_RXQ_OVFL`) and asks for `recv_buffer` bytes of buffer.
    ///
    /// # Errors
    ///
    /// [`NetError`] when the group is not multicast, the interface is unknown or a socket call
    /// fails.
    ///
    /// ```no_run
    /// use grapevine_core::net::{MulticastConfig, MulticastSocket};
    /// let config = MulticastConfig::new("239.255.0.1:7000".parse().unwrap());
    /// let receiver = MulticastSocket::receiver(&config)?;
    /// println!("receive buffer: {} bytes", receiver.recv_buffer_size());
    /// # Ok::<(), grapevine_core::net::NetError>(())
    /// ```
    pub fn receiver(config: &MulticastConfig) -> Result<Self, NetError> {
        let (socket, interface) = Self::open(config)?;
        let err = io_error(config.group, interface.name.clone());
        socket
            .set_reuse_address(true)
            .map_err(err("SO_REUSEADDR"))?;
        socket.set_reuse_port(true).map_err(err("SO_REUSEPORT"))?;
        // Ask for the buffer; the kernel silently caps it, so read back what we got.
        let _ = socket.set_recv_buffer_size(config.recv_buffer);
        let recv_buffer = socket.recv_buffer_size().map_err(err("SO_RCVBUF"))?;
        batch::enable_drop_counter(&socket).map_err(err("SO_RXQ_OVFL"))?;
        let coalescing = config.receive_offload
            && match batch::enable_coalescing(&socket) {
                Ok(()) => true,
                Err(error) => {
                    tracing::debug!(%error, "UDP_GRO refused: datagrams are received one by one");
                    false
                }
            };
        match (config.group.ip(), interface.addr) {
            (IpAddr::V4(group), IpAddr::V4(iface)) => {
                socket
                    .set_multicast_all_v4(false)
                    .map_err(err("IP_MULTICAST_ALL"))?;
                socket
                    .bind(&SockAddr::from(config.group))
                    .map_err(err("bind"))?;
                socket
                    .join_multicast_v4(&group, &iface)
                    .map_err(err("IP_ADD_MEMBERSHIP"))?;
            }
            (IpAddr::V6(group), _) => {
                // Scoped groups (ff02::, ff12::) need the interface as the bind scope.
                let bind_to =
                    std::net::SocketAddrV6::new(group, config.group.port(), 0, interface.index);
                socket.bind(&SockAddr::from(bind_to)).map_err(err("bind"))?;
                socket
                    .join_multicast_v6(&group, interface.index)
                    .map_err(err("IPV6_JOIN_GROUP"))?;
                if interface.addr.is_loopback() && !ipv6_route_exists(config.group, interface.index)
                {
                    // Joining works, but nothing on this host can send to the group there: a
                    // subscriber would wait in silence.
                    tracing::warn!(
                        group = %config.group,
                        interface = %interface.name,
                        "no IPv6 multicast route on loopback: no publisher on this host can send \
                         to this group (add one as root: `ip -6 route add multicast ff00::/8 dev \
                         lo table local` and `ip link set lo multicast on`)"
                    );
                }
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => {
                return Err(NetError::NoAddress {
                    name: interface.name,
                    family: "IPv4",
                })
            }
        }
        tracing::debug!(group = %config.group, interface = %interface.name, recv_buffer, "receiver joined");
        Ok(Self {
            socket: socket.into(),
            group: config.group,
            interface,
            recv_buffer,
            segmentation: std::sync::atomic::AtomicBool::new(false),
            coalescing,
        })
    }

    /// A socket that sends to the group on the configured interface (`IP_MULTICAST_IF` set
    /// explicitly), with the configured TTL and loopback.
    ///
    /// # Errors
    ///
    /// As [`MulticastSocket::receiver`].
    pub fn sender(config: &MulticastConfig) -> Result<Self, NetError> {
        let (socket, interface) = Self::open(config)?;
        let err = io_error(config.group, interface.name.clone());
        // The kernel may cap it: the size granted is read back and reported.
        let _ = socket.set_send_buffer_size(config.send_buffer);
        match (config.group.ip(), interface.addr) {
            (IpAddr::V4(_), IpAddr::V4(iface)) => {
                socket
                    .set_multicast_if_v4(&iface)
                    .map_err(err("IP_MULTICAST_IF"))?;
                socket
                    .set_multicast_ttl_v4(config.ttl)
                    .map_err(err("IP_MULTICAST_TTL"))?;
                socket
                    .set_multicast_loop_v4(config.loopback)
                    .map_err(err("IP_MULTICAST_LOOP"))?;
                socket
                    .bind(&SockAddr::from(SocketAddr::from((iface, 0))))
                    .map_err(err("bind"))?;
            }
            (IpAddr::V6(_), iface) => {
                socket
                    .set_multicast_if_v6(interface.index)
                    .map_err(err("IPV6_MULTICAST_IF"))?;
                socket
                    .set_multicast_hops_v6(config.ttl)
                    .map_err(err("IPV6_MULTICAST_HOPS"))?;
                socket
                    .set_multicast_loop_v6(config.loopback)
                    .map_err(err("IPV6_MULTICAST_LOOP"))?;
                // Only the source address is left open for link-local interfaces (binding one
                // needs a scope); the sending interface is pinned by IPV6_MULTICAST_IF above.
                let bind_to = match iface {
                    IpAddr::V6(addr) if !is_link_local(&addr) => SocketAddr::from((addr, 0)),
                    _ => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
                };
                socket.bind(&SockAddr::from(bind_to)).map_err(err("bind"))?;
            }
            (IpAddr::V4(_), IpAddr::V6(_)) => {
                return Err(NetError::NoAddress {
                    name: interface.name,
                    family: "IPv4",
                })
            }
        }
        let connect_to = match config.group {
            SocketAddr::V6(group) => SocketAddr::V6(std::net::SocketAddrV6::new(
                *group.ip(),
                group.port(),
                0,
                interface.index,
            )),
            v4 => v4,
        };
        socket
            .connect(&SockAddr::from(connect_to))
            .map_err(|error| {
                // Linux gives loopback no IPv6 multicast route: say so, and how to add one,
                // rather than a bare "Network is unreachable".
                if config.group.is_ipv6() && error.kind() == io::ErrorKind::NetworkUnreachable {
                    NetError::NoIpv6MulticastRoute {
                        group: config.group,
                        interface: interface.name.clone(),
                    }
                } else {
                    err("connect")(error)
                }
            })?;
        Ok(Self {
            socket: socket.into(),
            group: config.group,
            interface,
            recv_buffer: 0,
            segmentation: std::sync::atomic::AtomicBool::new(config.segmentation_offload),
            coalescing: false,
        })
    }

    fn open(config: &MulticastConfig) -> Result<(Socket, ResolvedInterface), NetError> {
        let group = config.group.ip();
        if !group.is_multicast() {
            return Err(NetError::NotMulticast(group));
        }
        let interface = resolve_interface(&config.interface, group.is_ipv6())?;
        let domain = if group.is_ipv6() {
            Domain::IPV6
        } else {
            Domain::IPV4
        };
        let socket = Socket::new(domain, Type::DGRAM, Some(Protocol::UDP)).map_err(|error| {
            NetError::Io {
                op: "socket",
                group: config.group,
                interface: interface.name.clone(),
                error,
            }
        })?;
        Ok((socket, interface))
    }

    /// Sends one datagram to the group.
    ///
    /// # Errors
    ///
    /// The OS error of `send`.
    pub fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        self.socket.send(datagram)
    }

    /// Sends datagrams to the group with as few `sendmmsg` calls as possible; returns how many
    /// were sent (fewer than given only on error after a partial send).
    ///
    /// # Errors
    ///
    /// The OS error when not even the first datagram could be sent.
    pub fn send_batch<B: AsRef<[u8]>>(&self, datagrams: &[B]) -> io::Result<usize> {
        batch::send_batch(&self.socket, datagrams, &self.segmentation)
    }

    /// Whether [`send_batch`](Self::send_batch) sends runs of equal-size datagrams with
    /// segmentation offload (see [`MulticastConfig::segmentation_offload`]): asked for, and
    /// not refused by the kernel so far.
    pub fn segmentation_offload(&self) -> bool {
        self.segmentation.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether the kernel hands this receiver runs of datagrams coalesced (see
    /// [`MulticastConfig::receive_offload`]).
    pub fn receive_offload(&self) -> bool {
        self.coalescing
    }

    /// Receives a batch of datagrams (`recvmmsg`), waiting at most `timeout` for the first.
    /// Returns how many datagrams were received (a coalesced run counts each of its
    /// datagrams); 0 on timeout.
    ///
    /// # Errors
    ///
    /// OS errors other than a timeout or an interrupted call.
    pub fn recv_batch(&self, batch: &mut RecvBatch, timeout: Duration) -> io::Result<usize> {
        batch::recv_batch(&self.socket, batch, timeout, self.coalescing)
    }

    /// The group.
    pub fn group(&self) -> SocketAddr {
        self.group
    }

    /// The interface joined or sent on.
    pub fn interface(&self) -> &ResolvedInterface {
        &self.interface
    }

    /// The receive buffer the kernel granted (0 for senders).
    pub fn recv_buffer_size(&self) -> usize {
        self.recv_buffer
    }

    /// Has the kernel drop, before they are queued, the datagrams that `source` (an address
    /// and port bound on this host, such as another [`MulticastSocket::sender`]'s
    /// [`local_addr`](UdpSocket::local_addr)) sends to the group: a socket that both emits on
    /// the group and listens to it (a repeater) is then not woken for its own looped-back
    /// emissions. The filter is a classic BPF program (`SO_ATTACH_FILTER`) on this socket
    /// only; other members of the group still receive them. Replaces any filter set before.
    ///
    /// # Errors
    ///
    /// `InvalidInput` for an unspecified address or port (no datagram can be told apart by
    /// it), or the kernel's refusal.
    ///
    /// ```no_run
    /// use grapevine_core::net::{MulticastConfig, MulticastSocket};
    /// let config = MulticastConfig::new("239.255.0.1:7000".parse().unwrap());
    /// let (receiver, sender) = (MulticastSocket::receiver(&config)?, MulticastSocket::sender(&config)?);
    /// receiver.ignore_source(sender.as_std().local_addr()?)?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn ignore_source(&self, source: SocketAddr) -> io::Result<()> {
        let program = batch::drop_source_filter(source).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{source} does not name one sender"),
            )
        })?;
        socket2::SockRef::from(&self.socket).attach_filter(&program)
    }

    /// The underlying socket. On a receiver with [`receive_offload`](Self::receive_offload)
    /// one `recv` can return a coalesced run of datagrams: receive with
    /// [`recv_batch`](Self::recv_batch), which cuts it up, or turn the option off.
    pub fn as_std(&self) -> &UdpSocket {
        &self.socket
    }

    /// Converts into a tokio socket. Must be called within a tokio runtime. Receive
    /// coalescing is turned off: the tokio socket receives one datagram per `recv_from`.
    ///
    /// # Errors
    ///
    /// When the socket cannot be made non-blocking, coalescing cannot be turned off, or the
    /// socket cannot be registered with the runtime.
    pub fn into_tokio(self) -> io::Result<AsyncMulticastSocket> {
        if self.coalescing {
            batch::disable_coalescing(&self.socket)?;
        }
        self.socket.set_nonblocking(true)?;
        Ok(AsyncMulticastSocket {
            socket: tokio::net::UdpSocket::from_std(self.socket)?,
            group: self.group,
        })
    }
}

/// A multicast socket for tokio tasks.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use grapevine_core::net::{MulticastConfig, MulticastSocket};
/// let config = MulticastConfig::new("239.255.0.2:7001".parse()?);
/// let receiver = MulticastSocket::receiver(&config)?.into_tokio()?;
/// let sender = MulticastSocket::sender(&config)?.into_tokio()?;
/// sender.send(b"hello").await?;
/// let mut buf = [0u8; 2048];
/// let (len, from) = receiver.recv_from(&mut buf).await?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct AsyncMulticastSocket {
    socket: tokio::net::UdpSocket,
    group: SocketAddr,
}

impl AsyncMulticastSocket {
    /// Sends one datagram to the group.
    ///
    /// # Errors
    ///
    /// The OS error.
    pub async fn send(&self, datagram: &[u8]) -> io::Result<usize> {
        self.socket.send_to(datagram, self.group).await
    }

    /// Receives one datagram.
    ///
    /// # Errors
    ///
    /// The OS error.
    pub async fn recv_from(&self, buf: &mut [u8]) -> io::Result<(usize, SocketAddr)> {
        self.socket.recv_from(buf).await
    }

    /// The tokio socket.
    pub fn get_ref(&self) -> &tokio::net::UdpSocket {
        &self.socket
    }
}

/// A unicast UDP socket bound to `address` for [`recv_batch_on`]: `recv_buffer` bytes of
/// receive buffer asked for (as much as `net.core.rmem_max` grants), the kernel's drop
/// counter on ([`RecvBatch::kernel_drops`]) and receive coalescing (`UDP_GRO`, see
/// [`MulticastConfig::receive_offload`]) where the kernel has it: receive with
/// [`recv_batch_on`], which cuts coalesced runs back into datagrams (a plain `recv_from` would
/// get a run as one buffer).
///
/// # Errors
///
/// When the socket cannot be created or bound.
pub fn unicast_socket(address: SocketAddr, recv_buffer: usize) -> io::Result<UdpSocket> {
    let socket = Socket::new(
        Domain::for_address(address),
        Type::DGRAM,
        Some(Protocol::UDP),
    )?;
    // Best effort: the kernel caps it, and a smaller buffer still works.
    if let Err(error) = socket.set_recv_buffer_size(recv_buffer) {
        tracing::debug!(%error, "SO_RCVBUF refused");
    }
    batch::enable_drop_counter(&socket)?;
    if let Err(error) = batch::enable_coalescing(&socket) {
        tracing::debug!(%error, "UDP_GRO refused: datagrams are received one by one");
    }
    socket.bind(&SockAddr::from(address))?;
    Ok(socket.into())
}

/// Receives a batch of datagrams on any UDP socket (`recvmmsg`), waiting at most `timeout`
/// for the first; [`RecvBatch::source`] tells who sent each. Returns how many were received.
///
/// # Errors
///
/// OS errors other than a timeout or an interrupted call.
pub fn recv_batch_on(
    socket: &UdpSocket,
    batch: &mut RecvBatch,
    timeout: Duration,
) -> io::Result<usize> {
    // Buffers too small for a coalesced run are grown when the socket coalesces (checked
    // only then: one getsockopt).
    let coalescing = batch.holds_coalesced() || batch::coalesces(socket);
    batch::recv_batch(socket, batch, timeout, coalescing)
}

/// Sends each datagram to its own address with as few `sendmmsg` calls as fit; returns how
/// many were sent (fewer only when errors stopped some). The datagrams for one address keep
/// their order and go in runs of equal size segmented (`UDP_SEGMENT`) where the kernel
/// allows; those for different addresses may be reordered between them.
///
/// ```
/// let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
/// let to = socket.local_addr()?;
/// let sent = grapevine_core::net::send_batch_to(&socket, &[(&b"one"[..], to), (&b"two"[..], to)])?;
/// assert_eq!(sent, 2);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// The OS error of the first datagram when none was sent.
pub fn send_batch_to(socket: &UdpSocket, datagrams: &[(&[u8], SocketAddr)]) -> io::Result<usize> {
    batch::send_batch_to(socket, datagrams)
}

/// Whether this host can send to IPv6 `group` out of interface `index` (a route exists).
fn ipv6_route_exists(group: SocketAddr, index: u32) -> bool {
    let SocketAddr::V6(group) = group else {
        return true;
    };
    let scoped = std::net::SocketAddrV6::new(*group.ip(), group.port(), 0, index);
    // As a sender would: the multicast interface set, then connect.
    let Ok(probe) = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) else {
        return true;
    };
    if probe.set_multicast_if_v6(index).is_err() {
        return true;
    }
    !matches!(
        probe.connect(&SockAddr::from(scoped)),
        Err(e) if e.kind() == io::ErrorKind::NetworkUnreachable
    )
}

/// Checks that multicast actually flows on the configured group and interface: joins, sends
/// probe datagrams (which subscribers ignore) and waits for one to come back.
///
/// This is the first thing to run when "nothing arrives": it turns a silent failure into a
/// message that says what to check. Returns the time the first probe took.
///
/// # Errors
///
/// [`NetError::MulticastBlocked`] when no probe came back within `timeout`, or the errors of
/// socket setup.
///
/// ```no_run
/// use std::time::Duration;
/// use grapevine_core::net::{self_test, MulticastConfig};
/// let took = self_test(&MulticastConfig::default(), Duration::from_secs(1))?;
/// println!("multicast OK in {took:?}");
/// # Ok::<(), grapevine_core::net::NetError>(())
/// ```
pub fn self_test(config: &MulticastConfig, timeout: Duration) -> Result<Duration, NetError> {
    let receiver = MulticastSocket::receiver(config)?;
    let mut probe_config = config.clone();
    // The probe must come back to this host whatever the user chose for loopback.
    probe_config.loopback = true;
    let sender = MulticastSocket::sender(&probe_config)?;
    let nonce = {
        use std::hash::{BuildHasher, Hasher};
        // A per-call random value without a random-number dependency: std seeds each
        // RandomState from the OS.
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish()
    };
    let header = DatagramHeader::new(0, 0, nonce, FLAG_PROBE);
    let probe = header.as_bytes().to_vec();
    let mut batch = RecvBatch::new(8, 2048);
    let started = Instant::now();
    let io_err = io_error(config.group, sender.interface().name.clone());
    while started.elapsed() < timeout {
        sender.send(&probe).map_err(io_err("send probe"))?;
        let wait = Duration::from_millis(50).min(timeout.saturating_sub(started.elapsed()));
        let count = receiver
            .recv_batch(&mut batch, wait)
            .map_err(io_err("receive probe"))?;
        let came_back = batch.datagrams().take(count).any(|bytes| {
            Datagram::parse(bytes).is_ok_and(|d| d.is_probe() && d.header().session() == nonce)
        });
        if came_back {
            return Ok(started.elapsed());
        }
    }
    Err(NetError::MulticastBlocked {
        group: config.group,
        interface: sender.interface().name.clone(),
        waited: timeout,
    })
}

/// Builds the error of a failed socket operation `op` on `group` and `interface`.
fn io_error(
    group: SocketAddr,
    interface: String,
) -> impl Fn(&'static str) -> Box<dyn FnOnce(io::Error) -> NetError> {
    move |op| {
        let interface = interface.clone();
        Box::new(move |error| NetError::Io {
            op,
            group,
            interface,
            error,
        })
    }
}

fn is_link_local(addr: &Ipv6Addr) -> bool {
    addr.segments()
        .first()
        .is_some_and(|s| s & 0xffc0 == 0xfe80)
}

#[cfg(test)]
mod tests;
