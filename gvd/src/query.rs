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

/// Length of a QUERY datagram.
pub const QUERY_LEN: usize = 28;

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

    /// Parses a datagram.
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
