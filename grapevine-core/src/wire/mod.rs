//! The GrapeVine wire format: datagram and message headers, decoding and batching.
//!
//! Every datagram starts with a [`DatagramHeader`] followed by `message_count` messages, each a
//! [`MessageHeader`] and a body whose layout depends on the kind. All integers are big-endian.
//! `docs/PROTOCOL.md` is the normative description; this module is its implementation.
//!
//! Decoding is two-level (as smoltcp does it): [`Datagram::parse`] validates the whole datagram
//! once (magic, version, flags, every message length, trailing bytes); after that, iterating its
//! [`Message`]s cannot fail or panic.
#![deny(clippy::indexing_slicing)]

mod builder;
pub mod consts;

use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

pub use builder::{
    repair_request, DatagramBuilder, Fragmenter, MessageTooLarge, FIRST_LEAF_FRAGMENT_ID,
};
pub use consts::*;

/// The header that starts every datagram.
///
/// ```text
/// 0     2     3     4           8           12                      20    22    24
/// | "GV" | ver | flg | topic_id  | publisher |       session_id       | cnt | rsv |
/// ```
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct DatagramHeader {
    magic: [u8; 2],
    version: u8,
    flags: u8,
    topic: U32,
    publisher: U32,
    session: U64,
    message_count: U16,
    reserved: U16,
}
const _: () = assert!(size_of::<DatagramHeader>() == DATAGRAM_HEADER_LEN);

impl DatagramHeader {
    /// A header for a datagram of `topic` from `publisher`'s `session`.
    pub fn new(topic: u32, publisher: u32, session: u64, flags: u8) -> Self {
        Self {
            magic: MAGIC,
            version: VERSION,
            flags,
            topic: U32::new(topic),
            publisher: U32::new(publisher),
            session: U64::new(session),
            message_count: U16::new(0),
            reserved: U16::new(0),
        }
    }

    /// The topic the datagram belongs to.
    pub fn topic(&self) -> u32 {
        self.topic.get()
    }

    /// The publisher (stable identity) that sent it.
    pub fn publisher(&self) -> u32 {
        self.publisher.get()
    }

    /// The publisher's session: random, drawn at each publisher start.
    pub fn session(&self) -> u64 {
        self.session.get()
    }

    /// Datagram flags ([`FLAG_PROBE`]).
    pub fn flags(&self) -> u8 {
        self.flags
    }

    /// How many messages follow the header.
    pub fn message_count(&self) -> u16 {
        self.message_count.get()
    }

    fn set_message_count(&mut self, count: u16) {
        self.message_count = U16::new(count);
    }
}

/// The header in front of every message inside a datagram.
///
/// ```text
/// 0      1       2          4
/// | kind | flags | body_len |  body (body_len bytes)
/// ```
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
pub struct MessageHeader {
    kind: u8,
    flags: u8,
    body_len: U16,
}
const _: () = assert!(size_of::<MessageHeader>() == MESSAGE_HEADER_LEN);

/// Fixed fields of a delta body, followed by the encoded delta.
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
struct DeltaFields {
    seq: U64,
    prev: U64,
}

/// Fixed fields of a snapshot leaf body, followed by the encoded `(key, leaf)`.
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
struct LeafFields {
    cycle: U32,
    index: U32,
    read_seq: U64,
    as_of_seq: U64,
}

/// Fixed fields of a cycle-end body.
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
struct CycleEndFields {
    cycle: U32,
    index: U32,
    read_seq: U64,
}

#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
struct HeartbeatFields {
    last_seq: U64,
}

/// Fields of a repair request body.
#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
struct RepairFields {
    first: U64,
    last: U64,
}
const _: () = assert!(size_of::<RepairFields>() == REPAIR_FIELDS_LEN);

#[derive(Clone, Copy, Debug, FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned)]
#[repr(C)]
struct FragmentFields {
    fragment_id: U64,
    index: U16,
    count: U16,
    total_len: U32,
}

const _: () = assert!(size_of::<DeltaFields>() == DELTA_FIELDS_LEN);
const _: () = assert!(size_of::<LeafFields>() == LEAF_FIELDS_LEN);
const _: () = assert!(size_of::<CycleEndFields>() == CYCLE_END_FIELDS_LEN);
const _: () = assert!(size_of::<HeartbeatFields>() == HEARTBEAT_FIELDS_LEN);
const _: () = assert!(size_of::<FragmentFields>() == FRAGMENT_FIELDS_LEN);

/// Where a snapshot message sits in its cycle, and when it was read.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct CyclePosition {
    /// Cycle number, incremented (wrapping) at each new cycle of a session.
    pub cycle: u32,
    /// Position in the cycle's walk over the keys in increasing order: 0 for the smallest key.
    pub index: u32,
    /// The publisher's last `seq` when this position was read.
    pub read_seq: u64,
}

/// One decoded message, borrowing its payload from the datagram.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub enum Message<'a> {
    /// A change to one leaf.
    Delta {
        /// Sequence number of this delta in its (session, topic).
        seq: u64,
        /// `seq` of the previous delta that touched the same leaf; 0 when the leaf was absent.
        prev: u64,
        /// The encoded delta.
        payload: &'a [u8],
    },
    /// One leaf of a snapshot cycle: the next key after the previous index's, when read.
    Leaf {
        /// Position in the cycle.
        position: CyclePosition,
        /// `seq` of the last delta applied to this leaf when it was read.
        as_of_seq: u64,
        /// The encoded `(key, leaf)`.
        payload: &'a [u8],
    },
    /// The end of a cycle: when read, no key followed the previous index's (or, at index 0,
    /// the state was empty).
    CycleEnd {
        /// Position in the cycle (`index` is the number of leaves the cycle sent).
        position: CyclePosition,
    },
    /// The publisher's last `seq`, sent when idle.
    Heartbeat {
        /// Last sequence number the publisher assigned.
        last_seq: u64,
    },
    /// A piece of a message too large for one datagram.
    Fragment(Fragment<'a>),
    /// A subscriber asks the session named in the datagram header to resend the deltas
    /// `first..=last` (sent on the repair group, never by a publisher).
    RepairRequest {
        /// First missing `seq`.
        first: u64,
        /// Last missing `seq`.
        last: u64,
    },
}

/// One fragment of a message larger than a datagram.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Fragment<'a> {
    /// Identifies the fragmented message within its session.
    pub fragment_id: u64,
    /// Index of this fragment, `< count`.
    pub index: u16,
    /// Number of fragments.
    pub count: u16,
    /// Length of the whole reassembled message (`kind`, `flags`, body).
    pub total_len: u32,
    /// This fragment's bytes.
    pub chunk: &'a [u8],
}

/// Why a datagram or message was rejected.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Shorter than a datagram header.
    #[error("datagram truncated: {0} bytes, header needs {DATAGRAM_HEADER_LEN}")]
    Truncated(usize),
    /// Not a GrapeVine datagram.
    #[error("bad magic {0:02x?}")]
    BadMagic([u8; 2]),
    /// A protocol version this build does not speak.
    #[error("unsupported protocol version {0} (this build speaks {VERSION})")]
    UnsupportedVersion(u8),
    /// Reserved flag bits or fields were set.
    #[error("reserved bits set: flags {0:#04x}")]
    ReservedBits(u8),
    /// Larger than any UDP payload.
    #[error("datagram of {0} bytes exceeds the {MAX_DATAGRAM}-byte maximum")]
    Oversized(usize),
    /// A message header or body runs past the end of the datagram.
    #[error("message {index} of {count} runs past the end of the datagram")]
    MessageTruncated {
        /// Index of the offending message.
        index: u16,
        /// Declared message count.
        count: u16,
    },
    /// Bytes left over after the declared messages.
    #[error("{0} trailing bytes after the last message")]
    TrailingBytes(usize),
    /// A message kind this version does not define.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// A message body is shorter than its kind's fixed fields.
    #[error("message kind {kind} body of {len} bytes is shorter than its {need}-byte fields")]
    BodyTooShort {
        /// Message kind.
        kind: u8,
        /// Body length.
        len: usize,
        /// Required length.
        need: usize,
    },
    /// A body that must be exactly its fixed fields has extra bytes.
    #[error("message kind {kind} body has {extra} unexpected bytes")]
    BodyTooLong {
        /// Message kind.
        kind: u8,
        /// Extra bytes.
        extra: usize,
    },
    /// Fields that contradict each other (index beyond count, zero count, ...).
    #[error("inconsistent fields: {0}")]
    Inconsistent(&'static str),
    /// A payload that does not decode as the topic's type.
    #[error("payload does not decode: {0}")]
    Payload(String),
}

/// A validated datagram: the header and a body whose messages are known to be well-formed.
#[derive(Clone, Copy, Debug)]
pub struct Datagram<'a> {
    header: DatagramHeader,
    body: &'a [u8],
}

impl<'a> Datagram<'a> {
    /// Validates a whole datagram.
    ///
    /// # Errors
    ///
    /// Any [`DecodeError`]: the datagram is rejected as a whole, nothing of it is used.
    ///
    /// ```
    /// use grapevine_core::wire::{Datagram, DatagramBuilder, Message};
    /// let mut builder = DatagramBuilder::new(1400, 7, 1, 0xfeed);
    /// assert!(builder.push_heartbeat(42));
    /// let bytes = builder.finish().unwrap();
    /// let datagram = Datagram::parse(&bytes).unwrap();
    /// assert_eq!(datagram.header().topic(), 7);
    /// assert_eq!(datagram.messages().next(), Some(Message::Heartbeat { last_seq: 42 }));
    /// ```
    pub fn parse(bytes: &'a [u8]) -> Result<Self, DecodeError> {
        if bytes.len() > MAX_DATAGRAM {
            return Err(DecodeError::Oversized(bytes.len()));
        }
        let (header, body) = DatagramHeader::read_from_prefix(bytes)
            .map_err(|_| DecodeError::Truncated(bytes.len()))?;
        if header.magic != MAGIC {
            return Err(DecodeError::BadMagic(header.magic));
        }
        if header.version != VERSION {
            return Err(DecodeError::UnsupportedVersion(header.version));
        }
        if header.flags & !KNOWN_DATAGRAM_FLAGS != 0 || header.reserved.get() != 0 {
            return Err(DecodeError::ReservedBits(header.flags));
        }
        // A signed datagram's trailer is checked by `auth`, not parsed as messages.
        let trailer = match (header.flags & FLAG_AUTH != 0, header.flags & FLAG_SIG != 0) {
            (false, false) => 0,
            (true, false) => AUTH_TRAILER_LEN,
            (false, true) => SIG_TRAILER_LEN,
            (true, true) => return Err(DecodeError::ReservedBits(header.flags)),
        };
        let body = split(
            body,
            body.len()
                .checked_sub(trailer)
                .ok_or(DecodeError::Truncated(bytes.len()))?,
        )
        .map(|(messages, _)| messages)
        .ok_or(DecodeError::Truncated(bytes.len()))?;
        let count = header.message_count();
        let mut rest = body;
        for index in 0..count {
            let (message_header, after) = MessageHeader::ref_from_prefix(rest)
                .map_err(|_| DecodeError::MessageTruncated { index, count })?;
            let len = usize::from(message_header.body_len.get());
            let (message_body, after) =
                split(after, len).ok_or(DecodeError::MessageTruncated { index, count })?;
            decode_message(message_header.kind, message_header.flags, message_body)?;
            // One fragment per datagram, alone (PROTOCOL.md §3.4): otherwise one datagram
            // could open hundreds of partial messages at the reassembler.
            if message_header.kind == KIND_FRAGMENT && count != 1 {
                return Err(DecodeError::Inconsistent(
                    "a fragment must be the only message of its datagram",
                ));
            }
            rest = after;
        }
        if !rest.is_empty() {
            return Err(DecodeError::TrailingBytes(rest.len()));
        }
        Ok(Self { header, body })
    }

    /// The datagram header.
    pub fn header(&self) -> &DatagramHeader {
        &self.header
    }

    /// Whether this is a transport self-test probe rather than topic data.
    pub fn is_probe(&self) -> bool {
        self.header.flags & FLAG_PROBE != 0
    }

    /// The messages, in order. Cannot fail: [`Datagram::parse`] checked them.
    pub fn messages(&self) -> Messages<'a> {
        Messages {
            rest: self.body,
            remaining: self.header.message_count(),
        }
    }
}

/// Iterator over the messages of a validated [`Datagram`].
#[derive(Clone, Debug)]
pub struct Messages<'a> {
    rest: &'a [u8],
    remaining: u16,
}

impl<'a> Iterator for Messages<'a> {
    type Item = Message<'a>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.remaining == 0 {
            return None;
        }
        self.remaining -= 1;
        // Validated by `Datagram::parse`; a failure here would be a bug, and ends iteration
        // rather than panicking.
        let (header, after) = MessageHeader::ref_from_prefix(self.rest).ok()?;
        let (body, after) = split(after, usize::from(header.body_len.get()))?;
        self.rest = after;
        decode_message(header.kind, header.flags, body).ok()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(usize::from(self.remaining)))
    }
}

/// Decodes a reassembled message: `kind`, `flags`, then the body (no length field: the
/// reassembled buffer's length is the body's).
///
/// # Errors
///
/// As for a message inside a datagram; a fragment cannot itself contain a fragment.
pub fn decode_reassembled(bytes: &[u8]) -> Result<Message<'_>, DecodeError> {
    let [kind, flags, body @ ..] = bytes else {
        return Err(DecodeError::Inconsistent(
            "reassembled message shorter than 2 bytes",
        ));
    };
    if *kind == KIND_FRAGMENT || *kind == KIND_REPAIR_REQUEST {
        return Err(DecodeError::Inconsistent(
            "fragment or request inside a fragment",
        ));
    }
    decode_message(*kind, *flags, body)
}

fn decode_message(kind: u8, flags: u8, body: &[u8]) -> Result<Message<'_>, DecodeError> {
    if flags != 0 {
        return Err(DecodeError::ReservedBits(flags));
    }
    match kind {
        KIND_DELTA => {
            let (fields, payload) = fixed::<DeltaFields>(kind, body)?;
            let (seq, prev) = (fields.seq.get(), fields.prev.get());
            if seq == 0 || seq == u64::MAX || prev >= seq {
                return Err(DecodeError::Inconsistent(
                    "delta prev must be below its seq",
                ));
            }
            Ok(Message::Delta { seq, prev, payload })
        }
        KIND_LEAF => {
            let (fields, payload) = fixed::<LeafFields>(kind, body)?;
            let position = CyclePosition {
                cycle: fields.cycle.get(),
                index: fields.index.get(),
                read_seq: fields.read_seq.get(),
            };
            let as_of_seq = fields.as_of_seq.get();
            if as_of_seq == 0 || as_of_seq > position.read_seq {
                return Err(DecodeError::Inconsistent(
                    "snapshot leaf as_of_seq must be in 1..=read_seq",
                ));
            }
            Ok(Message::Leaf {
                position,
                as_of_seq,
                payload,
            })
        }
        KIND_CYCLE_END => {
            let fields = exact::<CycleEndFields>(kind, body)?;
            Ok(Message::CycleEnd {
                position: CyclePosition {
                    cycle: fields.cycle.get(),
                    index: fields.index.get(),
                    read_seq: fields.read_seq.get(),
                },
            })
        }
        KIND_REPAIR_REQUEST => {
            let fields = exact::<RepairFields>(kind, body)?;
            let (first, last) = (fields.first.get(), fields.last.get());
            if first == 0 || last < first || last - first >= MAX_REPAIR_RANGE {
                return Err(DecodeError::Inconsistent("repair range"));
            }
            Ok(Message::RepairRequest { first, last })
        }
        KIND_HEARTBEAT => {
            let fields = exact::<HeartbeatFields>(kind, body)?;
            let last_seq = fields.last_seq.get();
            if last_seq == u64::MAX {
                return Err(DecodeError::Inconsistent("heartbeat seq out of range"));
            }
            Ok(Message::Heartbeat { last_seq })
        }
        KIND_FRAGMENT => {
            let (fields, chunk) = fixed::<FragmentFields>(kind, body)?;
            let fragment = Fragment {
                fragment_id: fields.fragment_id.get(),
                index: fields.index.get(),
                count: fields.count.get(),
                total_len: fields.total_len.get(),
                chunk,
            };
            if fragment.count < 2 || fragment.index >= fragment.count {
                return Err(DecodeError::Inconsistent("fragment index/count"));
            }
            if chunk.is_empty() || chunk.len() > fragment.total_len as usize {
                return Err(DecodeError::Inconsistent("fragment chunk length"));
            }
            Ok(Message::Fragment(fragment))
        }
        other => Err(DecodeError::UnknownKind(other)),
    }
}

fn fixed<T: FromBytes + KnownLayout + Immutable>(
    kind: u8,
    body: &[u8],
) -> Result<(&T, &[u8]), DecodeError> {
    T::ref_from_prefix(body).map_err(|_| DecodeError::BodyTooShort {
        kind,
        len: body.len(),
        need: size_of::<T>(),
    })
}

fn exact<T: FromBytes + KnownLayout + Immutable>(kind: u8, body: &[u8]) -> Result<&T, DecodeError> {
    let (fields, rest) = fixed::<T>(kind, body)?;
    if !rest.is_empty() {
        return Err(DecodeError::BodyTooLong {
            kind,
            extra: rest.len(),
        });
    }
    Ok(fields)
}

fn split(bytes: &[u8], at: usize) -> Option<(&[u8], &[u8])> {
    (at <= bytes.len()).then(|| bytes.split_at(at))
}

#[cfg(test)]
mod tests;
