//! Wire constants: the one place where the protocol's numbers live.

/// First two bytes of every GrapeVine datagram: ASCII `GV`.
pub const MAGIC: [u8; 2] = *b"GV";
/// The protocol version this build speaks.
pub const VERSION: u8 = 1;

/// Size of the datagram header.
pub const DATAGRAM_HEADER_LEN: usize = 24;
/// Size of a message header (`kind`, `flags`, `body_len`).
pub const MESSAGE_HEADER_LEN: usize = 4;
/// Fixed fields of a delta body (`seq`, `prev`).
pub const DELTA_FIELDS_LEN: usize = 16;
/// Fixed fields of a snapshot leaf body (cycle, index, read seq, as-of seq).
pub const LEAF_FIELDS_LEN: usize = 24;
/// Fixed fields of a cycle-end body (cycle, index, read seq).
pub const CYCLE_END_FIELDS_LEN: usize = 16;
/// Fixed fields of a heartbeat body (`last_seq`).
pub const HEARTBEAT_FIELDS_LEN: usize = 8;
/// Fixed fields of a fragment body (id, index, count, total length).
pub const FRAGMENT_FIELDS_LEN: usize = 16;

/// Default datagram size: safe on the paths GrapeVine is used on (below a 1500-byte MTU with
/// room for IP/UDP headers and tunnels).
pub const DEFAULT_MAX_DATAGRAM: usize = 1400;
/// Largest datagram GrapeVine accepts or builds: the largest IPv4 UDP payload.
pub const MAX_DATAGRAM: usize = 65_507;
/// Smallest configurable datagram size: a header, a message header and a fragment's fields with
/// room for a useful chunk.
pub const MIN_DATAGRAM: usize = 128;

/// Message kind: a delta.
pub const KIND_DELTA: u8 = 1;
/// Message kind: a snapshot leaf.
pub const KIND_LEAF: u8 = 2;
/// Message kind: a heartbeat.
pub const KIND_HEARTBEAT: u8 = 4;
/// Message kind: a fragment of a larger message.
pub const KIND_FRAGMENT: u8 = 5;
/// Message kind: the end of a snapshot cycle (no key after the last leaf sent).
pub const KIND_CYCLE_END: u8 = 6;
/// Message kind: a subscriber asks a publisher session to resend deltas `first..=last`.
pub const KIND_REPAIR_REQUEST: u8 = 7;
/// Fixed fields of a repair request body (first, last).
pub const REPAIR_FIELDS_LEN: usize = 16;
/// Most sequence numbers one repair request may name.
pub const MAX_REPAIR_RANGE: u64 = 4096;

/// Datagram flag: a transport self-test probe, ignored by subscribers.
pub const FLAG_PROBE: u8 = 0x01;
/// Datagram flag: the datagram ends with an authentication trailer (see `auth`).
pub const FLAG_AUTH: u8 = 0x02;
/// Datagram flag: signed with the publisher's own ed25519 key ([`SIG_TRAILER_LEN`] bytes of
/// trailer).
pub const FLAG_SIG: u8 = 0x04;
/// Length of the trailer of a datagram with [`FLAG_AUTH`] (a shared-key tag; `auth` makes and
/// checks it).
pub const AUTH_TRAILER_LEN: usize = 26;
/// Length of the trailer of a datagram with [`FLAG_SIG`].
pub const SIG_TRAILER_LEN: usize = 74;
/// Every datagram flag this version defines.
pub const KNOWN_DATAGRAM_FLAGS: u8 = FLAG_PROBE | FLAG_AUTH | FLAG_SIG;
