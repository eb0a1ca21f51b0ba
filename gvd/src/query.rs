//! QUERY: "send a snapshot of your leaf on this topic now". A node that sees a peer whose
//! VDEV list it lacks (or holds an older one of), or whose stream it is rebuilding, sends a
//! QUERY to the peer's unicast query port; the peer answers by starting a snapshot cycle of
//! that topic at once (QUERY_RES is that cycle, on the topic's multicast group, so every node
//! that needed it gets it from one answer). The snapshot rate bounds what queries can cost.
//!
//! A QUERY is 28 bytes, big-endian:
//!
//! | bytes | field                      |
//! |-------|----------------------------|
//! | 0..4  | magic `GVQY`               |
//! | 4     | version (1)                |
//! | 5..8  | reserved, zero             |
//! | 8..12 | topic                      |
//! | 12..20| node id of the addressee   |
//! | 20..28| node id of the sender      |
//!
//! On a network with a key, a QUERY is 52 bytes: the 28 above, then the sender's clock in
//! milliseconds since the epoch (8 bytes) and a 16-byte keyed BLAKE3 tag over the first 36
//! bytes ([`QueryKey`]). Unsigned, forged or stale (more than [`MAX_QUERY_AGE`] away from the
//! receiver's clock) QUERYs are ignored there, and every node answers at most a few QUERYs per
//! second from one address.

use std::time::{Duration, SystemTime};

/// Length of an unsigned QUERY datagram.
pub const QUERY_LEN: usize = 28;
/// Length of a signed QUERY datagram.
pub const SIGNED_QUERY_LEN: usize = QUERY_LEN + 8 + 16;
/// How far a signed QUERY's clock may be from the receiver's (replays of older ones fail).
pub const MAX_QUERY_AGE: Duration = Duration::from_secs(30);

/// The key QUERYs are signed with, derived from the network key.
#[derive(Clone)]
pub struct QueryKey([u8; 32]);

impl std::fmt::Debug for QueryKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("QueryKey(..)")
    }
}

impl QueryKey {
    /// Derived from the network's keyring; `None` without a shared key in it.
    pub fn new(keyring: &grapevine_core::auth::Keyring) -> Option<Self> {
        keyring.derive_key("grapevine gvd query 2026-12").map(Self)
    }

    fn tag(&self, signed: &[u8]) -> [u8; 16] {
        let hash = blake3::keyed_hash(&self.0, signed);
        let mut tag = [0u8; 16];
        tag.copy_from_slice(&hash.as_bytes()[..16]);
        tag
    }
}

fn unix_millis(time: SystemTime) -> u64 {
    time.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

const MAGIC: &[u8; 4] = b"GVQY";
const VERSION: u8 = 1;

/// A snapshot request.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Query {
    /// The topic whose cycle is wanted.
    pub topic: u32,
    /// The node asked.
    pub to: u64,
    /// The node asking.
    pub from: u64,
}

/// Why a datagram is not a QUERY.
#[derive(Clone, Copy, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// Not 28 bytes.
    #[error("a QUERY is {QUERY_LEN} bytes, got {0}")]
    Length(usize),
    /// Does not start with `GVQY`.
    #[error("not a QUERY (bad magic)")]
    Magic,
    /// Another version.
    #[error("QUERY version {0}, this gvd speaks {VERSION}")]
    Version(u8),
    /// Reserved bytes set.
    #[error("reserved bytes of a QUERY are not zero")]
    Reserved,
    /// This network has a key and the QUERY is not signed with it.
    #[error("QUERY not signed with the network key")]
    Unsigned,
    /// Signed with another key, or altered.
    #[error("QUERY signed with another key, or altered")]
    BadTag,
    /// Signed too long ago (a replay) or by a clock far off.
    #[error("QUERY signed {0} s away from this clock")]
    Stale(u64),
}

impl Query {
    /// The datagram.
    ///
    /// ```
    /// use gvd::query::Query;
    /// let query = Query { topic: 7, to: 1, from: 2 };
    /// assert_eq!(Query::decode(&query.encode()), Ok(query));
    /// ```
    pub fn encode(&self) -> [u8; QUERY_LEN] {
        let mut out = [0u8; QUERY_LEN];
        out[0..4].copy_from_slice(MAGIC);
        out[4] = VERSION;
        out[8..12].copy_from_slice(&self.topic.to_be_bytes());
        out[12..20].copy_from_slice(&self.to.to_be_bytes());
        out[20..28].copy_from_slice(&self.from.to_be_bytes());
        out
    }

    /// The datagram signed with `key` at `now`.
    ///
    /// ```
    /// use std::time::SystemTime;
    /// use gvd::query::{Query, QueryKey};
    /// use grapevine_core::auth::Keyring;
    /// let key = QueryKey::new(&Keyring::single(1, [9; 32])).unwrap();
    /// let query = Query { topic: 7, to: 1, from: 2 };
    /// let now = SystemTime::now();
    /// let signed = query.encode_signed(&key, now);
    /// assert_eq!(Query::decode_checked(&signed, Some(&key), now), Ok(query));
    /// assert!(Query::decode_checked(&query.encode(), Some(&key), now).is_err());
    /// ```
    pub fn encode_signed(&self, key: &QueryKey, now: SystemTime) -> [u8; SIGNED_QUERY_LEN] {
        let mut out = [0u8; SIGNED_QUERY_LEN];
        out[..QUERY_LEN].copy_from_slice(&self.encode());
        out[QUERY_LEN..QUERY_LEN + 8].copy_from_slice(&unix_millis(now).to_be_bytes());
        let tag = key.tag(&out[..QUERY_LEN + 8]);
        out[QUERY_LEN + 8..].copy_from_slice(&tag);
        out
    }

    /// Parses a datagram; with a key, only a QUERY signed with it within [`MAX_QUERY_AGE`] of
    /// `now` passes.
    ///
    /// # Errors
    ///
    /// [`QueryError`].
    pub fn decode_checked(
        bytes: &[u8],
        key: Option<&QueryKey>,
        now: SystemTime,
    ) -> Result<Self, QueryError> {
        let Some(key) = key else {
            return Self::decode(bytes);
        };
        if bytes.len() != SIGNED_QUERY_LEN {
            return Err(if bytes.len() == QUERY_LEN {
                QueryError::Unsigned
            } else {
                QueryError::Length(bytes.len())
            });
        }
        let (signed, tag) = bytes.split_at(QUERY_LEN + 8);
        if !grapevine_core::auth::tags_equal(&key.tag(signed), tag) {
            return Err(QueryError::BadTag);
        }
        let mut sent = [0u8; 8];
        sent.copy_from_slice(&signed[QUERY_LEN..]);
        let sent = u64::from_be_bytes(sent);
        let age_ms = unix_millis(now).abs_diff(sent);
        if age_ms > MAX_QUERY_AGE.as_millis() as u64 {
            return Err(QueryError::Stale(age_ms / 1000));
        }
        Self::decode(&signed[..QUERY_LEN])
    }

    /// Parses an unsigned datagram.
    ///
    /// # Errors
    ///
    /// [`QueryError`] for anything but a well-formed version-1 QUERY.
    pub fn decode(bytes: &[u8]) -> Result<Self, QueryError> {
        let bytes: &[u8; QUERY_LEN] = bytes
            .try_into()
            .map_err(|_| QueryError::Length(bytes.len()))?;
        if &bytes[0..4] != MAGIC {
            return Err(QueryError::Magic);
        }
        if bytes[4] != VERSION {
            return Err(QueryError::Version(bytes[4]));
        }
        if bytes[5..8] != [0, 0, 0] {
            return Err(QueryError::Reserved);
        }
        let (topic, rest) = bytes[8..].split_at(4);
        let (to, from) = rest.split_at(8);
        Ok(Self {
            topic: u32::from_be_bytes(topic.try_into().map_err(|_| QueryError::Magic)?),
            to: u64::from_be_bytes(to.try_into().map_err(|_| QueryError::Magic)?),
            from: u64::from_be_bytes(from.try_into().map_err(|_| QueryError::Magic)?),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_queries_are_checked() {
        let key = QueryKey::new(&grapevine_core::auth::Keyring::single(1, [9; 32])).unwrap();
        let other = QueryKey::new(&grapevine_core::auth::Keyring::single(1, [8; 32])).unwrap();
        let query = Query {
            topic: 1,
            to: 2,
            from: 3,
        };
        let now = SystemTime::now();
        let signed = query.encode_signed(&key, now);
        assert_eq!(Query::decode_checked(&signed, Some(&key), now), Ok(query));
        assert_eq!(
            Query::decode_checked(&query.encode(), Some(&key), now),
            Err(QueryError::Unsigned)
        );
        assert_eq!(
            Query::decode_checked(&query.encode_signed(&other, now), Some(&key), now),
            Err(QueryError::BadTag)
        );
        let later = now + Duration::from_secs(120);
        assert_eq!(
            Query::decode_checked(&signed, Some(&key), later),
            Err(QueryError::Stale(120))
        );
        for i in 0..SIGNED_QUERY_LEN {
            let mut altered = signed;
            altered[i] ^= 1;
            assert!(
                Query::decode_checked(&altered, Some(&key), now).is_err(),
                "byte {i}"
            );
        }
    }

    #[test]
    fn bad_queries_are_named() {
        let good = Query {
            topic: 1,
            to: 2,
            from: 3,
        }
        .encode();
        assert_eq!(Query::decode(&good[..27]), Err(QueryError::Length(27)));
        let mut bad = good;
        bad[0] = b'X';
        assert_eq!(Query::decode(&bad), Err(QueryError::Magic));
        let mut bad = good;
        bad[4] = 2;
        assert_eq!(Query::decode(&bad), Err(QueryError::Version(2)));
        let mut bad = good;
        bad[6] = 1;
        assert_eq!(Query::decode(&bad), Err(QueryError::Reserved));
        assert_eq!(
            good,
            [
                b'G', b'V', b'Q', b'Y', 1, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0,
                0, 0, 0, 3
            ]
        );
    }
}
