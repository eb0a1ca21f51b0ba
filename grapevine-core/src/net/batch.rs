//! Batched datagram I/O: `recvmmsg`/`sendmmsg`, one syscall for many datagrams, segmentation
//! offload on send (`UDP_SEGMENT`) and coalescing on receive (`UDP_GRO`), and the kernel's
//! per-socket drop counter (`SO_RXQ_OVFL`).
//!
//! This is the one module of the core that needs `unsafe`: the syscalls take raw pointers into
//! buffers this module owns for the duration of each call.
#![allow(unsafe_code)]

use std::io;
use std::mem;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// Up to this many datagrams per `sendmmsg` call.
const SEND_BATCH: usize = 64;

/// Room for one `SO_RXQ_OVFL` and one `UDP_GRO` control message (an `int` each), with
/// alignment slack.
const CONTROL_LEN: usize = 64;

/// The largest buffer a coalesced receive (`UDP_GRO`) can fill: one UDP payload's worth.
/// A smaller buffer would cut a coalesced run and lose the datagrams past the cut.
pub(super) const COALESCED_MAX: usize = 65_536;

/// Metadata of one received datagram.
#[derive(Clone, Copy, Debug, Default, Eq, PartialEq)]
pub struct RecvMeta {
    /// Bytes received.
    pub len: usize,
    /// The datagram was larger than the buffer and was cut.
    pub truncated: bool,
}

/// Reusable buffers for [`MulticastSocket::recv_batch`](super::MulticastSocket::recv_batch):
/// `batch` receives of at most `buf_len` bytes each. On a socket that coalesces
/// ([`MulticastConfig::receive_offload`](super::MulticastConfig::receive_offload)) one receive
/// may hold a run of datagrams from one sender, so a batch can yield more datagrams than
/// `batch`; [`datagrams`](Self::datagrams) gives them one by one either way.
#[derive(Debug)]
pub struct RecvBatch {
    buffers: Vec<Vec<u8>>,
    /// Per buffer: what the kernel wrote into it.
    received: Vec<Received>,
    controls: Vec<[u8; CONTROL_LEN]>,
    /// Senders' addresses, as the kernel wrote them (decoded only when asked for).
    names: Vec<SockaddrBuf>,
    scratch: Scratch,
    /// Per datagram of the last receive: the buffer it is in and where it starts.
    spans: Vec<Span>,
    /// Per datagram of the last receive.
    meta: Vec<RecvMeta>,
    kernel_drops: u32,
}

/// What one `recvmmsg` entry received.
#[derive(Clone, Copy, Debug, Default)]
struct Received {
    len: usize,
    truncated: bool,
    /// The size of each coalesced datagram (`UDP_GRO`), 0 when the entry is one datagram.
    segment: usize,
}

/// Where one datagram of a batch is.
#[derive(Clone, Copy, Debug)]
struct Span {
    buffer: u32,
    start: u32,
}

/// The `iovec`/`mmsghdr` arrays handed to `recvmmsg`, kept between calls so that receiving
/// allocates nothing. Their pointers are refreshed before every call.
struct Scratch {
    iovecs: Vec<libc::iovec>,
    headers: Vec<libc::mmsghdr>,
}

/// A `sockaddr_storage` and the length the kernel wrote into it.
#[derive(Clone, Copy)]
struct SockaddrBuf(libc::sockaddr_storage, libc::socklen_t);

impl std::fmt::Debug for SockaddrBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SockaddrBuf")
    }
}

impl SockaddrBuf {
    fn empty() -> Self {
        // SAFETY: sockaddr_storage is plain old data; all-zero is a valid (AF_UNSPEC) value.
        Self(unsafe { mem::zeroed() }, 0)
    }

    fn decode(&self) -> Option<std::net::SocketAddr> {
        let storage = &self.0;
        match libc::c_int::from(storage.ss_family) {
            libc::AF_INET if self.1 as usize >= size_of::<libc::sockaddr_in>() => {
                // SAFETY: the family says sockaddr_in, and the kernel wrote at least its size.
                let v4 = unsafe {
                    &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>()
                };
                let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
                Some((ip, u16::from_be(v4.sin_port)).into())
            }
            libc::AF_INET6 if self.1 as usize >= size_of::<libc::sockaddr_in6>() => {
                // SAFETY: the family says sockaddr_in6, and the kernel wrote at least its size.
                let v6 = unsafe {
                    &*(storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>()
                };
                let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
                Some((ip, u16::from_be(v6.sin6_port)).into())
            }
            _ => None,
        }
    }
}

// SAFETY: the raw pointers in `Scratch` only ever point into buffers owned by the same
// `RecvBatch`, and are rewritten from those buffers before each use; nothing is shared.
unsafe impl Send for Scratch {}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch")
            .field("entries", &self.headers.len())
            .finish()
    }
}

impl RecvBatch {
    /// Buffers for `batch` datagrams of up to `buf_len` bytes.
    pub fn new(batch: usize, buf_len: usize) -> Self {
        let batch = batch.clamp(1, 1024);
        Self {
            buffers: vec![vec![0; buf_len.max(1)]; batch],
            received: vec![Received::default(); batch],
            controls: vec![[0; CONTROL_LEN]; batch],
            names: vec![SockaddrBuf::empty(); batch],
            scratch: Scratch {
                iovecs: (0..batch)
                    .map(|_| libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    })
                    .collect(),
                // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
                headers: (0..batch).map(|_| unsafe { mem::zeroed() }).collect(),
            },
            spans: Vec::with_capacity(batch),
            meta: Vec::with_capacity(batch),
            kernel_drops: 0,
        }
    }

    /// The datagrams of the last receive, in arrival order.
    pub fn datagrams(&self) -> impl Iterator<Item = &[u8]> {
        self.spans.iter().zip(&self.meta).map(|(span, meta)| {
            let start = span.start as usize;
            self.buffers
                .get(span.buffer as usize)
                .and_then(|buffer| buffer.get(start..start + meta.len))
                .unwrap_or_default()
        })
    }

    /// Who sent datagram `index` of the last receive.
    pub fn source(&self, index: usize) -> Option<std::net::SocketAddr> {
        let span = self.spans.get(index)?;
        self.names.get(span.buffer as usize)?.decode()
    }

    /// Metadata of the datagrams of the last receive, one per datagram.
    pub fn meta(&self) -> &[RecvMeta] {
        &self.meta
    }

    /// Whether every buffer can hold a coalesced receive.
    pub(super) fn holds_coalesced(&self) -> bool {
        self.buffers
            .iter()
            .all(|buffer| buffer.len() >= COALESCED_MAX)
    }

    /// Makes every buffer large enough for a coalesced receive (once; later calls find them so).
    fn ready_for_coalescing(&mut self) {
        for buffer in &mut self.buffers {
            if buffer.len() < COALESCED_MAX {
                buffer.resize(COALESCED_MAX, 0);
            }
        }
    }

    /// Cuts what the kernel wrote into datagrams: one per entry, or a coalesced entry's
    /// segments.
    fn index_datagrams(&mut self, entries: usize) {
        self.spans.clear();
        self.meta.clear();
        for (buffer, received) in self.received.iter().take(entries).enumerate() {
            let buffer = buffer as u32;
            if received.segment == 0 || received.len <= received.segment {
                self.spans.push(Span { buffer, start: 0 });
                self.meta.push(RecvMeta {
                    len: received.len,
                    truncated: received.truncated,
                });
                continue;
            }
            let mut start = 0;
            while start < received.len {
                let len = received.segment.min(received.len - start);
                self.spans.push(Span {
                    buffer,
                    start: start as u32,
                });
                start += len;
                self.meta.push(RecvMeta {
                    len,
                    // Only the last segment can have been cut.
                    truncated: received.truncated && start >= received.len,
                });
            }
        }
    }

    /// The kernel's count of datagrams this socket dropped because its buffer was full,
    /// cumulative since the socket opened, as last reported (the kernel reports it only once it
    /// is non-zero). On a coalescing socket the kernel counts a dropped run of datagrams once,
    /// so the count is a lower bound there (non-zero whenever anything was dropped).
    pub fn kernel_drops(&self) -> u32 {
        self.kernel_drops
    }

    /// Receives per batch (each one datagram, or a coalesced run of them).
    pub fn capacity(&self) -> usize {
        self.buffers.len()
    }
}

pub(super) fn enable_drop_counter(socket: &socket2::Socket) -> io::Result<()> {
    set_socket_flag(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_RXQ_OVFL)
}

/// Asks the kernel to hand runs of datagrams from one sender over as one buffer (`UDP_GRO`).
pub(super) fn enable_coalescing(socket: &socket2::Socket) -> io::Result<()> {
    set_socket_flag(socket.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO)
}

/// Turns `UDP_GRO` off: each receive is one datagram again.
pub(super) fn disable_coalescing(socket: &UdpSocket) -> io::Result<()> {
    set_socket_option(socket.as_raw_fd(), libc::SOL_UDP, libc::UDP_GRO, 0)
}

/// Whether `socket` has `UDP_GRO` on.
pub(super) fn coalesces(socket: &UdpSocket) -> bool {
    let mut value: libc::c_int = 0;
    let mut len = size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `value` and `len` are valid for writes and `len` holds `value`'s size.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&raw mut value).cast(),
            &mut len,
        )
    };
    rc == 0 && value != 0
}

/// Sets the integer option `option` of `level` to 1.
fn set_socket_flag(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    option: libc::c_int,
) -> io::Result<()> {
    set_socket_option(fd, level, option, 1)
}

/// Sets the integer option `option` of `level` to `value`.
fn set_socket_option(
    fd: std::os::fd::RawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a valid c_int that outlives the call; the length matches its size.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            level,
            option,
            (&raw const value).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Receives into `batch`; `coalescing` says whether the socket has `UDP_GRO` on (its buffers
/// are then grown to hold a whole coalesced run).
pub(super) fn recv_batch(
    socket: &UdpSocket,
    batch: &mut RecvBatch,
    timeout: Duration,
    coalescing: bool,
) -> io::Result<usize> {
    batch.spans.clear();
    batch.meta.clear();
    if coalescing {
        batch.ready_for_coalescing();
    }
    // Under load the first non-blocking call succeeds: one syscall per batch. Idle, wait in poll.
    match recvmmsg(socket, batch) {
        Ok(n) => return Ok(n),
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e),
    }
    if timeout.is_zero() {
        // Busy polling: one syscall per attempt.
        return Ok(0);
    }
    let mut pollfd = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let millis = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // Round sub-millisecond timeouts up so the call waits rather than spins.
    let millis = if millis == 0 && !timeout.is_zero() {
        1
    } else {
        millis
    };
    // SAFETY: `pollfd` is a valid, initialised pollfd and we pass a count of 1.
    let rc = unsafe { libc::poll(&mut pollfd, 1, millis) };
    if rc < 0 {
        let e = io::Error::last_os_error();
        return if e.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(e)
        };
    }
    if rc == 0 {
        return Ok(0);
    }
    match recvmmsg(socket, batch) {
        Ok(n) => Ok(n),
        Err(e)
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted =>
        {
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

fn recvmmsg(socket: &UdpSocket, batch: &mut RecvBatch) -> io::Result<usize> {
    let n = batch.buffers.len();
    let Scratch { iovecs, headers } = &mut batch.scratch;
    for ((((header, iov), buf), control), name) in headers
        .iter_mut()
        .zip(iovecs.iter_mut())
        .zip(batch.buffers.iter_mut())
        .zip(batch.controls.iter_mut())
        .zip(batch.names.iter_mut())
    {
        header.msg_hdr.msg_name = (&mut name.0 as *mut libc::sockaddr_storage).cast();
        header.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        iov.iov_base = buf.as_mut_ptr().cast();
        iov.iov_len = buf.len();
        header.msg_hdr.msg_iov = iov;
        header.msg_hdr.msg_iovlen = 1;
        header.msg_hdr.msg_control = control.as_mut_ptr().cast();
        // The kernel shrinks these to what it wrote: reset them for every call.
        header.msg_hdr.msg_controllen = CONTROL_LEN as _;
        header.msg_hdr.msg_flags = 0;
        header.msg_len = 0;
    }
    // SAFETY: every header points at an iovec, a control buffer and an address buffer that live
    // until the call returns, each of the stated length; `n` is the number of headers.
    let rc = unsafe {
        libc::recvmmsg(
            socket.as_raw_fd(),
            headers.as_mut_ptr(),
            n as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    let entries = rc as usize;
    for ((header, received), name) in headers
        .iter()
        .zip(batch.received.iter_mut())
        .zip(batch.names.iter_mut())
        .take(entries)
    {
        name.1 = header.msg_hdr.msg_namelen;
        let control = read_control(&header.msg_hdr);
        *received = Received {
            len: header.msg_len as usize,
            truncated: header.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
            segment: control.segment,
        };
        if let Some(drops) = control.kernel_drops {
            batch.kernel_drops = drops;
        }
    }
    batch.index_datagrams(entries);
    Ok(batch.spans.len())
}

/// What a received datagram's control messages said.
#[derive(Default)]
struct Control {
    /// `SO_RXQ_OVFL`: the socket's drop count.
    kernel_drops: Option<u32>,
    /// `UDP_GRO`: the size of each coalesced datagram.
    segment: usize,
}

fn read_control(msg: &libc::msghdr) -> Control {
    let mut control = Control::default();
    // SAFETY: `msg` was filled by recvmmsg; CMSG_* walk its control buffer within
    // `msg_controllen`, and we read an int only from SO_RXQ_OVFL and UDP_GRO messages, which
    // carry one each.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(msg);
        while !cmsg.is_null() {
            let data = libc::CMSG_DATA(cmsg);
            match ((*cmsg).cmsg_level, (*cmsg).cmsg_type) {
                (libc::SOL_SOCKET, libc::SO_RXQ_OVFL) => {
                    control.kernel_drops = Some(data.cast::<u32>().read_unaligned());
                }
                (libc::SOL_UDP, libc::UDP_GRO) => {
                    let segment = data.cast::<libc::c_int>().read_unaligned();
                    control.segment = usize::try_from(segment).unwrap_or(0);
                }
                _ => {}
            }
            cmsg = libc::CMSG_NXTHDR(msg, cmsg);
        }
    }
    control
}

/// Whether unicast sends still try `UDP_SEGMENT`: cleared for the whole process the first time
/// a kernel or device refuses it (unconnected sockets carry no state of their own here).
static UNICAST_SEGMENTATION: AtomicBool = AtomicBool::new(true);

/// Sends each datagram to its own address; returns how many were sent (fewer only when errors
/// stopped some). The datagrams for each address go together, in their order, runs of equal
/// size segmented (`UDP_SEGMENT`) where the kernel allows; datagrams for different addresses
/// may be reordered between them.
pub(super) fn send_batch_to(
    socket: &UdpSocket,
    datagrams: &[(&[u8], std::net::SocketAddr)],
) -> io::Result<usize> {
    if datagrams.len() < 2 || !UNICAST_SEGMENTATION.load(Ordering::Relaxed) {
        return send_mmsg(
            socket,
            datagrams,
            |(datagram, _)| datagram,
            |(_, to)| Some(*to),
        );
    }
    let mut sent = 0;
    let mut first_error = None;
    let mut done: Vec<std::net::SocketAddr> = Vec::new();
    let mut for_one: Vec<&[u8]> = Vec::with_capacity(datagrams.len());
    for (_, to) in datagrams {
        if done.contains(to) {
            continue;
        }
        done.push(*to);
        for_one.clear();
        for_one.extend(
            datagrams
                .iter()
                .filter(|(_, other)| other == to)
                .map(|(datagram, _)| *datagram),
        );
        match send_runs(socket, &for_one, Some(*to), &UNICAST_SEGMENTATION) {
            Ok(count) => sent += count,
            Err(error) => {
                first_error.get_or_insert(error);
            }
        }
    }
    match first_error {
        Some(error) if sent == 0 => Err(error),
        _ => Ok(sent),
    }
}

/// Sends the datagrams on a connected socket with `sendmmsg`; returns how many were sent.
/// While `segmentation` is set, runs of equal-size datagrams go as one message each with
/// `UDP_SEGMENT`; a kernel that refuses it clears `segmentation` and gets them one by one.
pub(super) fn send_batch<B: AsRef<[u8]>>(
    socket: &UdpSocket,
    datagrams: &[B],
    segmentation: &AtomicBool,
) -> io::Result<usize> {
    send_runs(socket, datagrams, None, segmentation)
}

/// Sends `datagrams` to `to` (or the connected peer), as [`send_batch`] does.
fn send_runs<B: AsRef<[u8]>>(
    socket: &UdpSocket,
    datagrams: &[B],
    to: Option<std::net::SocketAddr>,
    segmentation: &AtomicBool,
) -> io::Result<usize> {
    if datagrams.len() < 2 || !segmentation.load(Ordering::Relaxed) {
        return send_mmsg(socket, datagrams, AsRef::as_ref, |_| to);
    }
    let address = to.map(socket2::SockAddr::from);
    match send_segmented(socket, datagrams, address.as_ref()) {
        Ok(sent) => Ok(sent),
        // Refused at the first segmented message, which may follow single datagrams that
        // went out: the rest goes one by one.
        Err((sent, error)) if refuses_segmentation(&error) => {
            tracing::debug!(%error, "UDP segmentation offload refused: one datagram per message from now on");
            segmentation.store(false, Ordering::Relaxed);
            let rest = datagrams.get(sent..).unwrap_or_default();
            match send_mmsg(socket, rest, AsRef::as_ref, |_| to) {
                Ok(more) => Ok(sent + more),
                Err(error) if sent == 0 => Err(error),
                Err(_) => Ok(sent),
            }
        }
        Err((0, error)) => Err(error),
        Err((sent, _)) => Ok(sent),
    }
}

/// Turns off UDP checksums on `socket` (`SO_NO_CHECK`), with which the kernel refuses
/// segmentation offload: how tests reach the fallback.
#[cfg(test)]
pub(super) fn disable_udp_checksums(socket: &UdpSocket) -> io::Result<()> {
    set_socket_flag(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_NO_CHECK)
}

/// A classic BPF program for a UDP socket that drops datagrams from `source` and keeps every
/// other, or `None` when `source` cannot single out a sender (an unspecified address or port).
///
/// A UDP socket's filter sees the packet from the UDP header on (the source port is the first
/// half-word); the IP header is reached through the kernel's `SKF_NET_OFF` base. Loads are in
/// network order, so the constants compare as the numbers the addresses spell.
pub(super) fn drop_source_filter(source: std::net::SocketAddr) -> Option<Vec<libc::sock_filter>> {
    use std::net::IpAddr;
    if source.port() == 0 || source.ip().is_unspecified() {
        return None;
    }
    // Offsets of the source address's 32-bit words in the IPv4 and IPv6 headers.
    let words: Vec<(u32, u32)> = match source.ip() {
        IpAddr::V4(ip) => vec![(12, u32::from(ip))],
        IpAddr::V6(ip) => {
            let halves = ip.segments();
            (0u32..4)
                .zip(halves.chunks_exact(2))
                .map(|(i, pair)| (8 + 4 * i, u32::from(pair[0]) << 16 | u32::from(pair[1])))
                .collect()
        }
    };
    let statement = |code: u32, k: u32| libc::sock_filter {
        code: code as u16,
        jt: 0,
        jf: 0,
        k,
    };
    // Each test (a load, then a comparison) falls through when it matches and jumps to "keep"
    // otherwise; "drop" follows the last test and "keep" ends the program.
    let tests = if words.len() == 1 { 2u8 } else { 5u8 };
    let mut program = Vec::with_capacity(usize::from(2 * tests + 2));
    let jump_unless_equal = |program: &mut Vec<libc::sock_filter>, test: u8, k: u32| {
        program.push(libc::sock_filter {
            code: (libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K) as u16,
            jt: 0,
            // From the next instruction: the later tests, then "drop", then "keep".
            jf: 2 * (tests - 1 - test) + 1,
            k,
        });
    };
    program.push(statement(libc::BPF_LD | libc::BPF_H | libc::BPF_ABS, 0));
    jump_unless_equal(&mut program, 0, u32::from(source.port()));
    for (test, (offset, value)) in (1u8..).zip(words) {
        let network_base = libc::SKF_NET_OFF as u32;
        program.push(statement(
            libc::BPF_LD | libc::BPF_W | libc::BPF_ABS,
            network_base.wrapping_add(offset),
        ));
        jump_unless_equal(&mut program, test, value);
    }
    program.push(statement(libc::BPF_RET | libc::BPF_K, 0));
    program.push(statement(libc::BPF_RET | libc::BPF_K, u32::MAX));
    Some(program)
}

/// Errors that say the kernel or the device cannot segment (not a passing failure).
fn refuses_segmentation(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// Most datagrams in one segmented message (the kernel's `UDP_MAX_SEGMENTS` is 64 or more).
const MAX_SEGMENTS: usize = 64;
/// Most bytes in one segmented message: an IPv4 or IPv6 datagram's payload, with room for
/// the headers.
const MAX_SEGMENTED_BYTES: usize = 65_000;
/// Room for one `UDP_SEGMENT` control message (a `u16`), with alignment slack.
const SEGMENT_CONTROL_LEN: usize = 32;

/// The runs `send_segmented` makes of `lengths`: consecutive datagrams of one size (the last
/// may be shorter), within the kernel's limits. Each run is (first index, count, size).
pub(super) fn segment_runs(lengths: impl Iterator<Item = usize>) -> Vec<(usize, usize, usize)> {
    let mut runs: Vec<(usize, usize, usize)> = Vec::new();
    // Whether the open run ended with a shorter datagram (nothing may follow it).
    let mut closed = true;
    for (index, len) in lengths.enumerate() {
        if let Some((_, count, size)) = runs.last_mut().filter(|_| !closed) {
            let fits = len <= *size
                && *count < MAX_SEGMENTS
                && (*count + 1) * *size <= MAX_SEGMENTED_BYTES;
            if fits && len > 0 {
                *count += 1;
                closed = len < *size;
                continue;
            }
        }
        runs.push((index, 1, len));
        closed = len == 0;
    }
    runs
}

/// `sendmmsg` of `datagrams` grouped into [`segment_runs`], to `to` (or the connected peer);
/// returns how many datagrams were sent, or the error with how many were sent before it.
fn send_segmented<B: AsRef<[u8]>>(
    socket: &UdpSocket,
    datagrams: &[B],
    to: Option<&socket2::SockAddr>,
) -> Result<usize, (usize, io::Error)> {
    let mut sent = 0;
    for chunk in datagrams.chunks(SEND_BATCH) {
        let runs = segment_runs(chunk.iter().map(|d| d.as_ref().len()));
        let mut iovecs = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; SEND_BATCH];
        for (iov, datagram) in iovecs.iter_mut().zip(chunk) {
            let datagram = datagram.as_ref();
            iov.iov_base = datagram.as_ptr() as *mut libc::c_void;
            iov.iov_len = datagram.len();
        }
        let mut controls = [[0u8; SEGMENT_CONTROL_LEN]; SEND_BATCH];
        // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
        let mut headers: [libc::mmsghdr; SEND_BATCH] = unsafe { mem::zeroed() };
        for ((header, control), &(first, count, size)) in
            headers.iter_mut().zip(controls.iter_mut()).zip(&runs)
        {
            header.msg_hdr.msg_iov = iovecs[first..].as_mut_ptr();
            header.msg_hdr.msg_iovlen = count;
            if let Some(to) = to {
                header.msg_hdr.msg_name = to.as_ptr() as *mut libc::c_void;
                header.msg_hdr.msg_namelen = to.len();
            }
            if count > 1 {
                header.msg_hdr.msg_control = control.as_mut_ptr().cast();
                // SAFETY: CMSG_SPACE of a u16 is far below the buffer's length.
                header.msg_hdr.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
                // SAFETY: the header's control buffer was just set to `control`, long enough
                // for one cmsghdr and a u16; CMSG_FIRSTHDR/CMSG_DATA stay inside it.
                unsafe {
                    let cmsg = libc::CMSG_FIRSTHDR(&header.msg_hdr);
                    (*cmsg).cmsg_level = libc::SOL_UDP;
                    (*cmsg).cmsg_type = libc::UDP_SEGMENT;
                    (*cmsg).cmsg_len = libc::CMSG_LEN(2) as usize;
                    let segment = u16::try_from(size).unwrap_or(u16::MAX);
                    std::ptr::write_unaligned(libc::CMSG_DATA(cmsg).cast::<u16>(), segment);
                }
            }
        }
        let headers = headers.get_mut(..runs.len()).unwrap_or_default();
        // The headers point at iovecs, control buffers and an address that live until the end
        // of this iteration.
        let (messages, error) = sendmmsg_all(socket, headers);
        sent += runs[..messages]
            .iter()
            .map(|&(_, count, _)| count)
            .sum::<usize>();
        if let Some(error) = error {
            return Err((sent, error));
        }
    }
    Ok(sent)
}

/// Calls `sendmmsg` until every message of `headers` is sent (retrying interrupted calls);
/// returns how many were sent, and the error that stopped it early, if one did. The headers
/// must point at buffers (iovecs, data, addresses, control) valid for the whole call.
fn sendmmsg_all(socket: &UdpSocket, headers: &mut [libc::mmsghdr]) -> (usize, Option<io::Error>) {
    let mut offset = 0;
    while offset < headers.len() {
        let rest = headers.get_mut(offset..).unwrap_or_default();
        // SAFETY: the caller's headers point at buffers that outlive the call; the kernel
        // only reads them (and writes each header's `msg_len`).
        let rc = unsafe {
            libc::sendmmsg(
                socket.as_raw_fd(),
                rest.as_mut_ptr(),
                rest.len() as libc::c_uint,
                0,
            )
        };
        if rc < 0 {
            let error = io::Error::last_os_error();
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return (offset, Some(error));
        }
        offset += rc as usize;
    }
    (offset, None)
}

/// `sendmmsg` over `items`, `SEND_BATCH` at a time: each item gives its bytes and, on an
/// unconnected socket, its destination (all items or none). Headers live on the stack; a
/// connected send builds no addresses at all.
fn send_mmsg<T>(
    socket: &UdpSocket,
    items: &[T],
    bytes: impl Fn(&T) -> &[u8],
    destination: impl Fn(&T) -> Option<std::net::SocketAddr>,
) -> io::Result<usize> {
    let mut sent = 0;
    let mut iovecs = [libc::iovec {
        iov_base: std::ptr::null_mut(),
        iov_len: 0,
    }; SEND_BATCH];
    // SAFETY: mmsghdr is plain old data; all-zero is a valid (empty) value.
    let mut all_headers: [libc::mmsghdr; SEND_BATCH] = unsafe { mem::zeroed() };
    for chunk in items.chunks(SEND_BATCH) {
        // Collected before any header points into it (an empty Vec does not allocate).
        let names: Vec<socket2::SockAddr> = chunk
            .iter()
            .filter_map(&destination)
            .map(socket2::SockAddr::from)
            .collect();
        let headers = all_headers.get_mut(..chunk.len()).unwrap_or_default();
        for (index, ((header, iov), item)) in headers
            .iter_mut()
            .zip(iovecs.iter_mut())
            .zip(chunk)
            .enumerate()
        {
            let datagram = bytes(item);
            iov.iov_base = datagram.as_ptr() as *mut libc::c_void;
            iov.iov_len = datagram.len();
            header.msg_hdr.msg_iov = iov;
            header.msg_hdr.msg_iovlen = 1;
            match names.get(index) {
                Some(name) => {
                    header.msg_hdr.msg_name = name.as_ptr() as *mut libc::c_void;
                    header.msg_hdr.msg_namelen = name.len();
                }
                None => {
                    header.msg_hdr.msg_name = std::ptr::null_mut();
                    header.msg_hdr.msg_namelen = 0;
                }
            }
            header.msg_len = 0;
        }
        // The headers point at iovecs describing datagrams, and at addresses, that outlive
        // the call.
        let (messages, error) = sendmmsg_all(socket, headers);
        sent += messages;
        if let Some(error) = error {
            return if sent == 0 { Err(error) } else { Ok(sent) };
        }
    }
    Ok(sent)
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Each receive is cut into datagrams that cover it in order, none longer than its
        /// segment size, all of them full-size but the last; an uncoalesced receive stays whole.
        #[test]
        fn coalesced_receives_are_cut_into_their_datagrams_in_order(
            entries in proptest::collection::vec(
                (0usize..=COALESCED_MAX, proptest::prop_oneof![proptest::strategy::Just(0usize), 1usize..3000], proptest::bool::ANY),
                1..8,
            )
        ) {
            let mut batch = RecvBatch::new(entries.len(), 16);
            for (received, &(len, segment, truncated)) in batch.received.iter_mut().zip(&entries) {
                *received = Received { len, truncated, segment };
            }
            batch.index_datagrams(entries.len());
            proptest::prop_assert_eq!(batch.spans.len(), batch.meta.len());
            let mut datagrams = batch.spans.iter().zip(&batch.meta).peekable();
            for (buffer, &(len, segment, truncated)) in entries.iter().enumerate() {
                let expected = if segment == 0 || len <= segment { 1 } else { len.div_ceil(segment) };
                let mut covered = 0;
                for index in 0..expected {
                    let (span, meta) = datagrams.next().expect("a datagram per segment");
                    proptest::prop_assert_eq!(span.buffer as usize, buffer);
                    proptest::prop_assert_eq!(span.start as usize, covered);
                    let last = index + 1 == expected;
                    if segment > 0 && !last {
                        proptest::prop_assert_eq!(meta.len, segment);
                    }
                    proptest::prop_assert_eq!(meta.truncated, truncated && last);
                    covered += meta.len;
                }
                proptest::prop_assert_eq!(covered, len);
            }
            proptest::prop_assert!(datagrams.peek().is_none());
        }
    }
}
