#![allow(clippy::indexing_slicing)]

use proptest::prelude::*;

use super::*;

/// A datagram of topic 0x0102_0304, publisher 5, session 0x1122334455667788 with one delta
/// (seq 9, prev 4, payload "hi") and one heartbeat (last seq 9), byte by byte.
const GOLDEN: [u8; 58] = [
    b'G',
    b'V',
    1,
    0, // magic, version, flags
    0x01,
    0x02,
    0x03,
    0x04, // topic
    0,
    0,
    0,
    5, // publisher
    0x11,
    0x22,
    0x33,
    0x44,
    0x55,
    0x66,
    0x77,
    0x88, // session
    0,
    2,
    0,
    0, // message count, reserved
    KIND_DELTA,
    0,
    0,
    18, // delta header: body 16 + 2
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    9, // seq
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    4, // prev
    b'h',
    b'i', // payload
    KIND_HEARTBEAT,
    0,
    0,
    8, // heartbeat header
    0,
    0,
    0,
    0,
    0,
    0,
    0,
    9, // last seq
];

#[test]
fn golden_construct() {
    let mut builder = DatagramBuilder::new(1400, 0x0102_0304, 5, 0x1122_3344_5566_7788);
    assert!(builder.push_delta(9, 4, b"hi"));
    assert!(builder.push_heartbeat(9));
    assert_eq!(builder.len(), GOLDEN.len());
    assert_eq!(&builder.finish().unwrap()[..], &GOLDEN[..]);
}

#[test]
fn golden_deconstruct() {
    let datagram = Datagram::parse(&GOLDEN).unwrap();
    let header = datagram.header();
    assert_eq!(header.topic(), 0x0102_0304);
    assert_eq!(header.publisher(), 5);
    assert_eq!(header.session(), 0x1122_3344_5566_7788);
    assert_eq!(header.message_count(), 2);
    let messages: Vec<_> = datagram.messages().collect();
    assert_eq!(
        messages,
        vec![
            Message::Delta {
                seq: 9,
                prev: 4,
                payload: b"hi"
            },
            Message::Heartbeat { last_seq: 9 }
        ]
    );
}

#[test]
fn rejects_malformed() {
    let cases: Vec<(Vec<u8>, DecodeError)> = vec![
        (GOLDEN[..10].to_vec(), DecodeError::Truncated(10)),
        (with(|b| b[0] = b'X'), DecodeError::BadMagic([b'X', b'V'])),
        (with(|b| b[2] = 9), DecodeError::UnsupportedVersion(9)),
        (with(|b| b[3] = 0x80), DecodeError::ReservedBits(0x80)),
        // One more message declared than present.
        (
            with(|b| b[21] = 3),
            DecodeError::MessageTruncated { index: 2, count: 3 },
        ),
        // The delta claims a longer body than the datagram holds.
        (
            with(|b| b[27] = 200),
            DecodeError::MessageTruncated { index: 0, count: 2 },
        ),
        // One message declared, two present.
        (with(|b| b[21] = 1), DecodeError::TrailingBytes(12)),
        (with(|b| b[24] = 77), DecodeError::UnknownKind(77)),
        (with(|b| b[25] = 1), DecodeError::ReservedBits(1)),
        // prev >= seq
        (
            with(|b| b[43] = 9),
            DecodeError::Inconsistent("delta prev must be below its seq"),
        ),
        // Heartbeat body with a byte too many (the delta body shrinks by one to make room).
        (
            with(|b| {
                b[49] = 9;
                b.push(0);
            }),
            DecodeError::BodyTooLong {
                kind: KIND_HEARTBEAT,
                extra: 1,
            },
        ),
        (
            vec![0; MAX_DATAGRAM + 1],
            DecodeError::Oversized(MAX_DATAGRAM + 1),
        ),
    ];
    for (bytes, want) in cases {
        assert_eq!(Datagram::parse(&bytes).unwrap_err(), want, "{bytes:02x?}");
    }
}

fn with(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
    let mut bytes = GOLDEN.to_vec();
    edit(&mut bytes);
    bytes
}

#[test]
fn snapshot_fields_are_checked() {
    let mut builder = DatagramBuilder::new(1400, 1, 1, 1);
    let position = CyclePosition {
        cycle: 3,
        index: 4,
        read_seq: 10,
    };
    // A leaf cannot be newer than the moment it was read.
    assert!(builder.push_leaf(position, 11, b"x"));
    let bytes = builder.finish().unwrap();
    assert_eq!(
        Datagram::parse(&bytes).unwrap_err(),
        DecodeError::Inconsistent("snapshot leaf as_of_seq must be in 1..=read_seq")
    );
}

#[test]
fn builder_respects_max_len_and_reports_no_fit() {
    let mut builder = DatagramBuilder::new(200, 1, 1, 1);
    let payload = [7u8; 40];
    let mut pushed = 0;
    while builder.push_delta(pushed + 1, 0, &payload) {
        pushed += 1;
    }
    // 24 header + n * (4 + 16 + 40) <= 200
    assert_eq!(pushed, 2);
    let bytes = builder.finish().unwrap();
    assert!(bytes.len() <= 200);
    assert_eq!(Datagram::parse(&bytes).unwrap().messages().count(), 2);
}

#[test]
fn fragments_reassemble() {
    let mut builder = DatagramBuilder::new(256, 1, 2, 3);
    let mut fragmenter = Fragmenter::new(1 << 20);
    let payload: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let mut datagrams = Vec::new();
    fragmenter
        .fragment_delta(&mut builder, 42, 41, &payload, |d| datagrams.push(d))
        .unwrap();
    assert!(datagrams.len() > 20);
    let mut reassembler =
        crate::proto::Reassembler::new(1 << 20, 1 << 20, std::time::Duration::from_secs(1));
    let now = std::time::Instant::now();
    let mut whole = None;
    // Deliver in reverse order, with a duplicate.
    for bytes in datagrams.iter().rev().chain(datagrams.first()) {
        assert!(bytes.len() <= 256);
        let datagram = Datagram::parse(bytes).unwrap();
        let Some(Message::Fragment(fragment)) = datagram.messages().next() else {
            panic!("expected a fragment");
        };
        if let Some(done) = reassembler
            .push(now, (2, 3, fragment.fragment_id), &fragment)
            .unwrap()
        {
            whole = Some(done);
        }
    }
    let whole = whole.unwrap();
    assert_eq!(
        decode_reassembled(&whole).unwrap(),
        Message::Delta {
            seq: 42,
            prev: 41,
            payload: &payload
        }
    );
    assert_eq!(reassembler.pending_bytes(), 0);
}

#[test]
fn fragmenter_refuses_oversized_messages() {
    let mut builder = DatagramBuilder::new(1400, 1, 2, 3);
    let mut fragmenter = Fragmenter::new(1000);
    let err = fragmenter
        .fragment_delta(&mut builder, 2, 1, &[0; 2000], |_| panic!("nothing sent"))
        .unwrap_err();
    assert_eq!(err.limit, 1000);
}

#[test]
fn conflicting_fragments_are_dropped() {
    let now = std::time::Instant::now();
    let mut reassembler =
        crate::proto::Reassembler::new(1 << 20, 1 << 20, std::time::Duration::from_secs(1));
    let a = Fragment {
        fragment_id: 1,
        index: 0,
        count: 2,
        total_len: 6,
        chunk: b"abc",
    };
    let b = Fragment { total_len: 7, ..a };
    assert_eq!(reassembler.push(now, (0, 0, 1), &a), Ok(None));
    assert!(reassembler.push(now, (0, 0, 1), &b).is_err());
    assert_eq!(reassembler.pending_bytes(), 0);
    let too_big = Fragment {
        total_len: 2 << 20,
        ..a
    };
    assert!(reassembler.push(now, (0, 0, 2), &too_big).is_err());
}

#[derive(Clone, Debug)]
enum Owned {
    Delta(u64, u64, Vec<u8>),
    Leaf(CyclePosition, u64, Vec<u8>),
    End(CyclePosition),
    Heartbeat(u64),
}

impl Owned {
    fn push(&self, builder: &mut DatagramBuilder) -> bool {
        match self {
            Self::Delta(seq, prev, p) => builder.push_delta(*seq, *prev, p),
            Self::Leaf(pos, as_of, p) => builder.push_leaf(*pos, *as_of, p),
            Self::End(pos) => builder.push_cycle_end(*pos),
            Self::Heartbeat(seq) => builder.push_heartbeat(*seq),
        }
    }

    fn matches(&self, message: &Message<'_>) -> bool {
        match (self, message) {
            (Self::Delta(s, p, b), Message::Delta { seq, prev, payload }) => {
                s == seq && p == prev && b == payload
            }
            (
                Self::Leaf(pos, a, b),
                Message::Leaf {
                    position,
                    as_of_seq,
                    payload,
                },
            ) => pos == position && a == as_of_seq && b == payload,
            (Self::End(pos), Message::CycleEnd { position }) => pos == position,
            (Self::Heartbeat(s), Message::Heartbeat { last_seq }) => s == last_seq,
            _ => false,
        }
    }
}

fn owned() -> impl Strategy<Value = Owned> {
    let payload = prop::collection::vec(any::<u8>(), 0..300);
    let position =
        (any::<u32>(), any::<u32>(), 1..u64::MAX).prop_map(|(cycle, index, read_seq)| {
            CyclePosition {
                cycle,
                index,
                read_seq,
            }
        });
    prop_oneof![
        (1..u64::MAX - 1, payload.clone()).prop_flat_map(
            |(seq, p)| (0..seq).prop_map(move |prev| Owned::Delta(seq, prev, p.clone()))
        ),
        (position.clone(), payload.clone()).prop_flat_map(|(pos, p)| {
            (1..=pos.read_seq).prop_map(move |as_of| Owned::Leaf(pos, as_of, p.clone()))
        }),
        position.prop_map(Owned::End),
        (0..u64::MAX - 1).prop_map(Owned::Heartbeat),
    ]
}

proptest! {
    /// encode → decode is the identity, `len()` equals the bytes written, and datagrams never
    /// exceed their size.
    #[test]
    fn round_trip(
        messages in prop::collection::vec(owned(), 1..40),
        max_len in MIN_DATAGRAM..4000usize,
        topic: u32, publisher: u32, session: u64,
    ) {
        let mut builder = DatagramBuilder::new(max_len, topic, publisher, session);
        let mut datagrams = Vec::new();
        let mut batches = vec![Vec::new()];
        for message in &messages {
            if !message.push(&mut builder) {
                let expected_len = builder.len();
                if let Some(d) = builder.finish() {
                    prop_assert_eq!(d.len(), expected_len);
                    datagrams.push(d);
                    batches.push(Vec::new());
                }
                if !message.push(&mut builder) {
                    continue; // larger than a datagram: the fragmenter's job
                }
            }
            batches.last_mut().unwrap().push(message.clone());
        }
        if let Some(d) = builder.finish() {
            datagrams.push(d);
        } else {
            batches.pop();
        }
        prop_assert_eq!(datagrams.len(), batches.len());
        for (bytes, batch) in datagrams.iter().zip(&batches) {
            prop_assert!(bytes.len() <= max_len);
            let datagram = Datagram::parse(bytes).unwrap();
            prop_assert_eq!(datagram.header().topic(), topic);
            prop_assert_eq!(datagram.header().publisher(), publisher);
            prop_assert_eq!(datagram.header().session(), session);
            let decoded: Vec<_> = datagram.messages().collect();
            prop_assert_eq!(decoded.len(), batch.len());
            for (want, got) in batch.iter().zip(&decoded) {
                prop_assert!(want.matches(got), "{:?} != {:?}", want, got);
            }
        }
    }

    /// Arbitrary bytes, and valid datagrams with bytes flipped, never panic the decoder.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..2000)) {
        if let Ok(datagram) = Datagram::parse(&bytes) {
            for _ in datagram.messages() {}
        }
        let _ = decode_reassembled(&bytes);
    }

    #[test]
    fn mutated_datagrams_never_panic(index in 0..GOLDEN.len(), value: u8, cut in 0..GOLDEN.len()) {
        let mut bytes = GOLDEN.to_vec();
        bytes[index] = value;
        for candidate in [&bytes[..], &bytes[..cut]] {
            if let Ok(datagram) = Datagram::parse(candidate) {
                prop_assert_eq!(datagram.messages().count(), usize::from(datagram.header().message_count()));
            }
        }
    }
}

/// A datagram holding a fragment and anything else (here a second fragment) is refused: one
/// datagram must not open several partial messages.
#[test]
fn a_fragment_must_be_alone_in_its_datagram() {
    let mut builder = DatagramBuilder::new(256, 1, 2, 3);
    let mut fragmenter = Fragmenter::new(1 << 20);
    let mut datagrams = Vec::new();
    fragmenter
        .fragment_delta(&mut builder, 5, 4, &[7; 600], |d| datagrams.push(d))
        .unwrap();
    let single = datagrams[0].to_vec();
    assert!(Datagram::parse(&single).is_ok());
    let message = &single[DATAGRAM_HEADER_LEN..];
    let mut doubled = single.clone();
    doubled.extend_from_slice(message);
    // message_count sits at offset 20.
    doubled[20..22].copy_from_slice(&2u16.to_be_bytes());
    assert!(matches!(
        Datagram::parse(&doubled),
        Err(DecodeError::Inconsistent(_))
    ));
}

/// A flood of one-byte fragments, each opening its own message, is held to the budget counted
/// with each entry's own overhead, not only the chunk bytes.
#[test]
fn tiny_fragments_cannot_exceed_the_reassembly_budget() {
    let now = std::time::Instant::now();
    let budget = 1 << 20;
    let mut reassembler =
        crate::proto::Reassembler::new(1 << 20, budget, std::time::Duration::from_secs(1));
    for id in 0..200_000u64 {
        let fragment = Fragment {
            fragment_id: id,
            index: 0,
            count: 2000,
            total_len: 2000,
            chunk: b"x",
        };
        assert_eq!(reassembler.push(now, (1, 2, id), &fragment), Ok(None));
        assert!(reassembler.pending_bytes() <= budget);
    }
    let per_entry = crate::proto::CHUNK_OVERHEAD + crate::proto::MESSAGE_OVERHEAD + 1;
    assert!(reassembler.dropped() >= 200_000 - (budget / per_entry) as u64);
}
