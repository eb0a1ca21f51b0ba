use std::io::{Cursor, Read};

use anyhow::anyhow;
use tokio::io::{AsyncRead, AsyncReadExt};
use tracing::{debug, error, trace, warn};

use crate::context::RPCContext;
use crate::rpc::*;
use crate::xdr::*;
use crate::{mount, mount_handlers, nfs, nfs_handlers, portmap, portmap_handlers};

// Information from RFC 5531
// https://datatracker.ietf.org/doc/html/rfc5531

const NFS_ACL_PROGRAM: u32 = 100227;
const NFS_ID_MAP_PROGRAM: u32 = 100270;
const NFS_METADATA_PROGRAM: u32 = 200024;

async fn handle_rpc(
    input: &mut impl Read,
    output: &mut Vec<u8>,
    mut context: RPCContext,
) -> Result<bool, anyhow::Error> {
    let mut recv = rpc_msg::default();
    recv.deserialize(input)?;
    let xid = recv.xid;
    if let rpc_body::CALL(call) = recv.body {
        if let auth_flavor::AUTH_UNIX = call.cred.flavor {
            let mut auth = auth_unix::default();
            auth.deserialize(&mut Cursor::new(&call.cred.body))?;
            context.auth = auth;
        }
        if call.rpcvers != 2 {
            warn!("Invalid RPC version {} != 2", call.rpcvers);
            rpc_vers_mismatch(xid).serialize(output)?;
            return Ok(true);
        }

        if context.transaction_tracker.is_retransmission(xid, &context.client_addr) {
            // This is a retransmission
            // Drop the message and return
            debug!("Retransmission detected, xid: {}, client_addr: {}, call: {:?}", xid, context.client_addr, call);
            return Ok(false);
        }

        let res = {
            if call.prog == nfs::PROGRAM {
                nfs_handlers::handle_nfs(xid, call, input, output, &context).await
            } else if call.prog == portmap::PROGRAM {
                portmap_handlers::handle_portmap(xid, call, input, output, &context)
            } else if call.prog == mount::PROGRAM {
                mount_handlers::handle_mount(xid, call, input, output, &context).await
            } else if call.prog == NFS_ACL_PROGRAM
                || call.prog == NFS_ID_MAP_PROGRAM
                || call.prog == NFS_METADATA_PROGRAM
            {
                trace!("ignoring NFS_ACL packet");
                prog_unavail_reply_message(xid).serialize(output)?;
                Ok(())
            } else {
                warn!("Unknown RPC Program number {} != {}", call.prog, nfs::PROGRAM);
                prog_unavail_reply_message(xid).serialize(output)?;
                Ok(())
            }
        }
        .map(|_| true);
        context.transaction_tracker.mark_processed(xid, &context.client_addr);
        res
    } else {
        error!("Unexpectedly received a Reply instead of a Call");
        Err(anyhow!("Bad RPC Call format"))
    }
}

/// RFC 1057 Section 10
/// When RPC messages are passed on top of a byte stream transport
/// protocol (like TCP), it is necessary to delimit one message from
/// another in order to detect and possibly recover from protocol errors.
/// This is called record marking (RM).  Sun uses this RM/TCP/IP
/// transport for passing RPC messages on TCP streams.  One RPC message
/// fits into one RM record.
///
/// A record is composed of one or more record fragments.  A record
/// fragment is a four-byte header followed by 0 to (2**31) - 1 bytes of
/// fragment data.  The bytes encode an unsigned binary number; as with
/// XDR integers, the byte order is from highest to lowest.  The number
/// encodes two values -- a boolean which indicates whether the fragment
/// is the last fragment of the record (bit value 1 implies the fragment
/// is the last fragment) and a 31-bit unsigned binary value which is the
/// length in bytes of the fragment's data.  The boolean value is the
/// highest-order bit of the header; the length is the 31 low-order bits.
/// (Note that this record specification is NOT in XDR standard form!)
///
/// GrapeVine addition: reads one whole record straight from the connection (upstream copied
/// every byte through an in-memory pipe first). `Ok(None)` is a clean end of the connection
/// between records. A record longer than `max_len` is refused before anything is allocated
/// for it: the length comes from the client, and upstream allocated whatever it said.
pub async fn read_record<R: AsyncRead + Unpin>(socket: &mut R, max_len: usize) -> Result<Option<Vec<u8>>, anyhow::Error> {
    let mut record = Vec::new();
    loop {
        let mut header_buf = [0_u8; 4];
        match socket.read_exact(&mut header_buf).await {
            Ok(_) => {},
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && record.is_empty() => return Ok(None),
            Err(e) => return Err(e.into()),
        }
        let fragment_header = u32::from_be_bytes(header_buf);
        let is_last = (fragment_header & (1 << 31)) > 0;
        let length = (fragment_header & ((1 << 31) - 1)) as usize;
        trace!("Reading fragment length:{}, last:{}", length, is_last);
        if record.len() + length > max_len {
            return Err(anyhow!("RPC record of over {max_len} bytes refused"));
        }
        // Room for the whole fragment first: a big WRITE is then read straight into it, past
        // the connection's buffer, instead of in doubling steps.
        record.reserve_exact(length);
        let read = socket.take(length as u64).read_to_end(&mut record).await?;
        if read != length {
            return Err(anyhow!("connection closed inside an RPC record"));
        }
        if is_last {
            return Ok(Some(record));
        }
    }
}

/// GrapeVine addition: READ data that ends a reply, sent straight from the file (`sendfile`)
/// rather than copied into the reply first.
#[derive(Debug)]
pub struct FileTail {
    /// The file the data is in.
    pub file: std::fs::File,
    /// Where the data starts in it.
    pub offset: u64,
    /// How many bytes of it the reply's head announced.
    pub count: u32,
    /// XDR padding after the data.
    pub pad: usize,
}

impl FileTail {
    /// The data and padding in memory, for a sink that is not a socket. Bytes the file no
    /// longer holds (it shrank since the head was made) are zeros: the record's length was
    /// announced.
    pub fn read_all(&self) -> std::io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let mut data = vec![0; self.count as usize + self.pad];
        let mut filled = 0;
        while filled < self.count as usize {
            match self.file.read_at(&mut data[filled..self.count as usize], self.offset + filled as u64) {
                Ok(0) => break,
                Ok(read) => filled += read,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(data)
    }
}

/// GrapeVine addition: one reply, record mark included: its head goes out in one write, then
/// the file data that ends it, if any.
#[derive(Debug)]
pub struct Reply {
    /// The record mark and the reply (all of it, unless `tail` ends it).
    pub head: Vec<u8>,
    /// READ data to send after `head`.
    pub tail: Option<FileTail>,
}

tokio::task_local! {
    /// Set while [`reply_to_record`] answers one call: a READ handler may leave its data here,
    /// to be sent from the file, instead of in the reply.
    pub(crate) static FILE_TAIL: std::cell::RefCell<Option<FileTail>>;
}

/// GrapeVine addition: answers one RPC record. The reply comes back whole, record mark included,
/// so that it goes out in one write (and, for READ, a file tail); `None` when the call gets no
/// reply (a retransmission).
pub async fn reply_to_record(record: Vec<u8>, context: RPCContext) -> Result<Option<Reply>, anyhow::Error> {
    let mut reply: Vec<u8> = Vec::with_capacity(512);
    reply.extend_from_slice(&[0; 4]);
    let (answered, tail) = FILE_TAIL
        .scope(std::cell::RefCell::new(None), async {
            let answered = handle_rpc(&mut Cursor::new(record), &mut reply, context).await;
            (answered, FILE_TAIL.with(|tail| tail.borrow_mut().take()))
        })
        .await;
    if !answered? {
        return Ok(None);
    }
    let length = reply.len() - 4 + tail.as_ref().map_or(0, |t| t.count as usize + t.pad);
    if length >= 1 << 31 {
        return Err(anyhow!("RPC reply of {length} bytes does not fit one record fragment"));
    }
    let fragment_header = length as u32 | (1 << 31);
    reply[..4].copy_from_slice(&fragment_header.to_be_bytes());
    trace!("Writing fragment length:{}", length);
    Ok(Some(Reply { head: reply, tail }))
}
