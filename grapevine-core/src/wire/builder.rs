//! Encoding: packing messages into datagrams, and fragmenting messages larger than one.

use bytes::{BufMut, Bytes, BytesMut};
use zerocopy::byteorder::network_endian::{U16, U32, U64};
use zerocopy::IntoBytes;

use super::consts::*;
use super::{
    CycleEndFields, CyclePosition, DatagramHeader, DeltaFields, FragmentFields, HeartbeatFields,
    LeafFields, MessageHeader, RepairFields,
};

/// Packs messages into datagrams of at most `max_len` bytes.
///
/// The buffer is reused: [`DatagramBuilder::finish`] hands out the bytes written so far as a
/// [`Bytes`] and starts the next datagram in the same allocation when the previous ones have been
/// dropped.
///
/// ```
/// use grapevine_core::wire::{Datagram, DatagramBuilder};
/// let mut builder = DatagramBuilder::new(1400, 1, 0, 99);
/// assert!(builder.push_delta(1, 0, b"first"));
/// assert!(builder.push_delta(2, 1, b"second"));
/// let bytes = builder.finish().unwrap();
/// assert_eq!(Datagram::parse(&bytes).unwrap().messages().count(), 2);
/// assert!(builder.finish().is_none(), "nothing pushed since");
/// ```
#[derive(Debug)]
pub struct DatagramBuilder {
    buf: BytesMut,
    header: DatagramHeader,
    max_len: usize,
    count: u16,
}

impl DatagramBuilder {
    /// A builder of datagrams for `topic` from `publisher`'s `session`.
    ///
    /// `max_len` is clamped to [`MIN_DATAGRAM`]..=[`MAX_DATAGRAM`].
    pub fn new(max_len: usize, topic: u32, publisher: u32, session: u64) -> Self {
        Self::with_flags(max_len, DatagramHeader::new(topic, publisher, session, 0))
    }

    /// A builder whose datagrams carry `header` (its message count is filled in by `finish`).
    pub fn with_flags(max_len: usize, header: DatagramHeader) -> Self {
        let max_len = max_len.clamp(MIN_DATAGRAM, MAX_DATAGRAM);
        Self {
            buf: BytesMut::with_capacity(max_len * 4),
            header,
            max_len,
            count: 0,
        }
    }

    /// Maximum datagram size.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Largest message body that fits in an empty datagram.
    pub fn max_body_len(&self) -> usize {
        (self.max_len - DATAGRAM_HEADER_LEN - MESSAGE_HEADER_LEN).min(usize::from(u16::MAX))
    }

    /// Whether no message has been pushed since the last `finish`.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes the current datagram would have if finished now.
    pub fn len(&self) -> usize {
        if self.count == 0 {
            0
        } else {
            self.buf.len()
        }
    }

    /// Whether a message with a body of `body_len` bytes fits in the current datagram.
    pub fn fits(&self, body_len: usize) -> bool {
        let used = if self.count == 0 {
            DATAGRAM_HEADER_LEN
        } else {
            self.buf.len()
        };
        self.count < u16::MAX
            && body_len <= usize::from(u16::MAX)
            && used + MESSAGE_HEADER_LEN + body_len <= self.max_len
    }

    /// Appends a delta; `false` (and nothing written) when it does not fit.
    pub fn push_delta(&mut self, seq: u64, prev: u64, payload: &[u8]) -> bool {
        let fields = DeltaFields {
            seq: U64::new(seq),
            prev: U64::new(prev),
        };
        self.push(KIND_DELTA, fields.as_bytes(), payload)
    }

    /// Appends a snapshot leaf (`payload` is the encoded `(key, leaf)`).
    pub fn push_leaf(&mut self, position: CyclePosition, as_of_seq: u64, payload: &[u8]) -> bool {
        let fields = leaf_fields(position, as_of_seq);
        self.push(KIND_LEAF, fields.as_bytes(), payload)
    }

    /// Appends the end of a snapshot cycle.
    pub fn push_cycle_end(&mut self, position: CyclePosition) -> bool {
        let fields = CycleEndFields {
            cycle: U32::new(position.cycle),
            index: U32::new(position.index),
            read_seq: U64::new(position.read_seq),
        };
        self.push(KIND_CYCLE_END, fields.as_bytes(), &[])
    }

    /// Appends a heartbeat.
    pub fn push_heartbeat(&mut self, last_seq: u64) -> bool {
        let fields = HeartbeatFields {
            last_seq: U64::new(last_seq),
        };
        self.push(KIND_HEARTBEAT, fields.as_bytes(), &[])
    }

    fn push_repair(&mut self, first: u64, last: u64) -> bool {
        let fields = RepairFields {
            first: U64::new(first),
            last: U64::new(last),
        };
        self.push(KIND_REPAIR_REQUEST, fields.as_bytes(), &[])
    }

    fn push_fragment(&mut self, fields: &FragmentFields, chunk: &[u8]) -> bool {
        self.push(KIND_FRAGMENT, fields.as_bytes(), chunk)
    }

    /// Appends a message of `kind` whose body is `fields` then `payload`.
    fn push(&mut self, kind: u8, fields: &[u8], payload: &[u8]) -> bool {
        let body_len = fields.len() + payload.len();
        if !self.fits(body_len) {
            return false;
        }
        if self.count == 0 {
            self.buf.clear();
            self.buf.reserve(self.max_len);
            self.buf.put_slice(self.header.as_bytes());
        }
        let header = MessageHeader {
            kind,
            flags: 0,
            // `fits` checked body_len <= u16::MAX.
            body_len: U16::new(body_len as u16),
        };
        self.buf.put_slice(header.as_bytes());
        self.buf.put_slice(fields);
        self.buf.put_slice(payload);
        self.count += 1;
        true
    }

    /// Closes the current datagram and returns it, or `None` if it has no message.
    pub fn finish(&mut self) -> Option<Bytes> {
        if self.count == 0 {
            return None;
        }
        let mut header = self.header;
        header.set_message_count(self.count);
        if let Some(prefix) = self.buf.get_mut(..DATAGRAM_HEADER_LEN) {
            prefix.copy_from_slice(header.as_bytes());
        }
        self.count = 0;
        Some(self.buf.split().freeze())
    }
}

fn leaf_fields(position: CyclePosition, as_of_seq: u64) -> LeafFields {
    LeafFields {
        cycle: U32::new(position.cycle),
        index: U32::new(position.index),
        read_seq: U64::new(position.read_seq),
        as_of_seq: U64::new(as_of_seq),
    }
}

/// A message could not be sent because it is larger than the configured limit.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[error("message of {len} bytes exceeds the {limit}-byte limit")]
pub struct MessageTooLarge {
    /// Encoded size of the message.
    pub len: usize,
    /// The limit it exceeded.
    pub limit: usize,
}

/// The first fragment id a snapshotter uses: publishers number their fragments from 1 and
/// snapshotters from here, so a fragmented delta and a fragmented leaf of the same session
/// never share an id (the subscriber reassembles by publisher, session and id).
pub const FIRST_LEAF_FRAGMENT_ID: u64 = 1 << 63;

/// Splits messages too large for one datagram into fragments, one per datagram.
///
/// Fragment ids are unique within a session: a publisher's fragmenter ([`Fragmenter::new`])
/// and a snapshotter's ([`Fragmenter::for_leaves`]) draw from disjoint halves of the id space.
#[derive(Debug)]
pub struct Fragmenter {
    next_id: u64,
    max_message_len: usize,
    scratch: Vec<u8>,
}

impl Fragmenter {
    /// A publisher's fragmenter, refusing messages above `max_message_len` bytes.
    pub fn new(max_message_len: usize) -> Self {
        Self {
            next_id: 1,
            max_message_len,
            scratch: Vec::new(),
        }
    }

    /// A snapshotter's fragmenter: its ids start at [`FIRST_LEAF_FRAGMENT_ID`].
    pub fn for_leaves(max_message_len: usize) -> Self {
        Self {
            next_id: FIRST_LEAF_FRAGMENT_ID,
            ..Self::new(max_message_len)
        }
    }

    /// Fragments a message of `kind` (body: `fields` then `payload`) into datagrams built by
    /// `builder`, which must be empty; each datagram is passed to `emit`.
    ///
    /// # Errors
    ///
    /// [`MessageTooLarge`] when the message exceeds the limit or would need more than
    /// `u16::MAX` fragments.
    pub fn fragment(
        &mut self,
        builder: &mut DatagramBuilder,
        kind: u8,
        fields: &[u8],
        payload: &[u8],
        mut emit: impl FnMut(Bytes),
    ) -> Result<(), MessageTooLarge> {
        debug_assert!(builder.is_empty());
        let total = 2 + fields.len() + payload.len();
        let chunk_len = builder.max_body_len() - FRAGMENT_FIELDS_LEN;
        let count = total.div_ceil(chunk_len);
        let limit = self.max_message_len.min(u32::MAX as usize);
        if total > limit || count > usize::from(u16::MAX) {
            return Err(MessageTooLarge { len: total, limit });
        }
        self.scratch.clear();
        self.scratch.extend_from_slice(&[kind, 0]);
        self.scratch.extend_from_slice(fields);
        self.scratch.extend_from_slice(payload);
        let fragment_id = self.next_id;
        self.next_id += 1;
        for (index, chunk) in self.scratch.chunks(chunk_len).enumerate() {
            let fields = FragmentFields {
                fragment_id: U64::new(fragment_id),
                index: U16::new(index as u16),
                count: U16::new(count as u16),
                total_len: U32::new(total as u32),
            };
            let pushed = builder.push_fragment(&fields, chunk);
            debug_assert!(pushed, "a chunk always fits an empty datagram");
            if let Some(datagram) = builder.finish() {
                emit(datagram);
            }
        }
        Ok(())
    }

    /// Fragments a delta.
    ///
    /// # Errors
    ///
    /// See [`Fragmenter::fragment`].
    pub fn fragment_delta(
        &mut self,
        builder: &mut DatagramBuilder,
        seq: u64,
        prev: u64,
        payload: &[u8],
        emit: impl FnMut(Bytes),
    ) -> Result<(), MessageTooLarge> {
        let fields = DeltaFields {
            seq: U64::new(seq),
            prev: U64::new(prev),
        };
        self.fragment(builder, KIND_DELTA, fields.as_bytes(), payload, emit)
    }

    /// Fragments a snapshot leaf.
    ///
    /// # Errors
    ///
    /// See [`Fragmenter::fragment`].
    pub fn fragment_leaf(
        &mut self,
        builder: &mut DatagramBuilder,
        position: CyclePosition,
        as_of_seq: u64,
        payload: &[u8],
        emit: impl FnMut(Bytes),
    ) -> Result<(), MessageTooLarge> {
        let fields = leaf_fields(position, as_of_seq);
        self.fragment(builder, KIND_LEAF, fields.as_bytes(), payload, emit)
    }
}

/// A repair request datagram: asks `publisher`'s `session` on `topic` to resend the deltas
/// `first..=last` (at most [`MAX_REPAIR_RANGE`] of them; a longer range is cut to that).
pub fn repair_request(
    topic: u32,
    publisher: u32,
    session: u64,
    first: u64,
    last: u64,
) -> Option<Bytes> {
    let last = last.min(first.saturating_add(MAX_REPAIR_RANGE - 1));
    let mut builder = DatagramBuilder::new(MIN_DATAGRAM, topic, publisher, session);
    builder
        .push_repair(first, last)
        .then(|| builder.finish())
        .flatten()
}
