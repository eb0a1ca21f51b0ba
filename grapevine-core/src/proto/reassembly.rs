//! Reassembly of messages fragmented over several datagrams, with bounded memory.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::wire::Fragment;

/// Why a fragment was dropped.
#[derive(Clone, Debug, Eq, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ReassemblyError {
    /// The announced message is larger than the configured limit.
    #[error("fragmented message of {len} bytes exceeds the {limit}-byte limit")]
    TooLarge {
        /// Announced length.
        len: u32,
        /// The limit.
        limit: usize,
    },
    /// A fragment contradicts earlier fragments of the same message.
    #[error("fragment {index} conflicts with earlier fragments of message {fragment_id}")]
    Conflict {
        /// The message.
        fragment_id: u64,
        /// The offending fragment.
        index: u16,
    },
    /// The reassembled fragments do not add up to the announced length.
    #[error("fragments of message {fragment_id} add up to {got} bytes, {want} announced")]
    LengthMismatch {
        /// The message.
        fragment_id: u64,
        /// Bytes received.
        got: usize,
        /// Bytes announced.
        want: u32,
    },
}

/// Identifies a fragmented message: the stream it belongs to and its fragment id.
pub type FragmentKey = (u32, u64, u64);

#[derive(Debug)]
struct Partial {
    total_len: u32,
    count: u16,
    chunks: BTreeMap<u16, Vec<u8>>,
    bytes: usize,
    started: Instant,
}

/// Collects fragments until each message is complete.
///
/// Memory is bounded: messages above `max_message_len` are refused, incomplete messages expire
/// after `timeout`, and when more than `max_bytes` are pending the oldest messages are dropped.
///
/// ```
/// use std::time::{Duration, Instant};
/// use grapevine_core::proto::Reassembler;
/// use grapevine_core::wire::Fragment;
///
/// let now = Instant::now();
/// let mut reassembler = Reassembler::new(1 << 20, 4 << 20, Duration::from_secs(1));
/// let first = Fragment { fragment_id: 1, index: 0, count: 2, total_len: 5, chunk: b"abc" };
/// let second = Fragment { fragment_id: 1, index: 1, count: 2, total_len: 5, chunk: b"de" };
/// assert_eq!(reassembler.push(now, (0, 9, 1), &first), Ok(None));
/// assert_eq!(reassembler.push(now, (0, 9, 1), &second), Ok(Some(b"abcde".to_vec())));
/// ```
#[derive(Debug)]
pub struct Reassembler {
    partial: HashMap<FragmentKey, Partial>,
    pending_bytes: usize,
    max_message_len: usize,
    max_bytes: usize,
    timeout: Duration,
    dropped: u64,
    /// Recently completed messages, so that late duplicates of their fragments are ignored
    /// instead of starting a partial that can only expire.
    completed: VecDeque<FragmentKey>,
    /// Partial messages in the order they were started (removed ones are skipped lazily), so
    /// that the oldest is found without a scan.
    started: VecDeque<(Instant, FragmentKey)>,
}

const REMEMBERED_COMPLETIONS: usize = 256;
/// Memory held per chunk besides its bytes (the vector's header and the map's node share), so
/// that a flood of tiny fragments cannot hold many times the budget.
pub const CHUNK_OVERHEAD: usize = 64;
/// Memory held per incomplete message besides its chunks: its map entry, the first node of its
/// chunk map and its place in the eviction order (measured: a flood of one-byte fragments,
/// each opening a message, held about 450 bytes per message).
pub const MESSAGE_OVERHEAD: usize = 512;

impl Reassembler {
    /// A reassembler with the given limits.
    pub fn new(max_message_len: usize, max_bytes: usize, timeout: Duration) -> Self {
        Self {
            partial: HashMap::new(),
            pending_bytes: 0,
            max_message_len,
            max_bytes,
            timeout,
            dropped: 0,
            completed: VecDeque::new(),
            started: VecDeque::new(),
        }
    }

    /// Adds a fragment; returns the whole message when this fragment completes it.
    ///
    /// # Errors
    ///
    /// [`ReassemblyError`] when the fragment is refused; conflicting messages are dropped whole.
    pub fn push(
        &mut self,
        now: Instant,
        key: FragmentKey,
        fragment: &Fragment<'_>,
    ) -> Result<Option<Vec<u8>>, ReassemblyError> {
        if fragment.total_len as usize > self.max_message_len {
            return Err(ReassemblyError::TooLarge {
                len: fragment.total_len,
                limit: self.max_message_len,
            });
        }
        if self.completed.contains(&key) {
            return Ok(None);
        }
        // Entries of completed or dropped messages leave the order from its front.
        while let Some((started, oldest)) = self.started.front() {
            if self
                .partial
                .get(oldest)
                .is_some_and(|p| p.started == *started)
            {
                break;
            }
            self.started.pop_front();
        }
        let partial = match self.partial.entry(key) {
            std::collections::hash_map::Entry::Occupied(entry) => entry.into_mut(),
            std::collections::hash_map::Entry::Vacant(entry) => {
                self.started.push_back((now, key));
                self.pending_bytes += MESSAGE_OVERHEAD;
                entry.insert(Partial {
                    total_len: fragment.total_len,
                    count: fragment.count,
                    chunks: BTreeMap::new(),
                    bytes: 0,
                    started: now,
                })
            }
        };
        let conflict = partial.total_len != fragment.total_len
            || partial.count != fragment.count
            || partial
                .chunks
                .get(&fragment.index)
                .is_some_and(|chunk| chunk.as_slice() != fragment.chunk)
            || partial.bytes + fragment.chunk.len() > fragment.total_len as usize;
        if conflict {
            self.remove(&key);
            self.dropped += 1;
            return Err(ReassemblyError::Conflict {
                fragment_id: key.2,
                index: fragment.index,
            });
        }
        if partial.chunks.contains_key(&fragment.index) {
            return Ok(None);
        }
        partial
            .chunks
            .insert(fragment.index, fragment.chunk.to_vec());
        partial.bytes += fragment.chunk.len();
        self.pending_bytes += fragment.chunk.len() + CHUNK_OVERHEAD;
        if partial.chunks.len() < usize::from(partial.count) {
            self.enforce_budget(key);
            return Ok(None);
        }
        let Some(done) = self.remove(&key) else {
            return Ok(None);
        };
        if self.completed.len() >= REMEMBERED_COMPLETIONS {
            self.completed.pop_front();
        }
        self.completed.push_back(key);
        if done.bytes != done.total_len as usize {
            self.dropped += 1;
            return Err(ReassemblyError::LengthMismatch {
                fragment_id: key.2,
                got: done.bytes,
                want: done.total_len,
            });
        }
        let mut message = Vec::with_capacity(done.bytes);
        for chunk in done.chunks.into_values() {
            message.extend_from_slice(&chunk);
        }
        Ok(Some(message))
    }

    /// Drops incomplete messages older than the timeout.
    pub fn handle_timeout(&mut self, now: Instant) {
        let timeout = self.timeout;
        let expired: Vec<FragmentKey> = self
            .partial
            .iter()
            .filter(|(_, p)| now.saturating_duration_since(p.started) >= timeout)
            .map(|(k, _)| *k)
            .collect();
        for key in expired {
            self.remove(&key);
            self.dropped += 1;
        }
    }

    /// When the oldest incomplete message expires.
    #[must_use]
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.partial
            .values()
            .map(|p| p.started + self.timeout)
            .min()
    }

    /// Incomplete messages dropped so far (expired, conflicting or over budget).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Bytes held in incomplete messages.
    pub fn pending_bytes(&self) -> usize {
        self.pending_bytes
    }

    fn remove(&mut self, key: &FragmentKey) -> Option<Partial> {
        let partial = self.partial.remove(key)?;
        self.pending_bytes -=
            partial.bytes + partial.chunks.len() * CHUNK_OVERHEAD + MESSAGE_OVERHEAD;
        if self.partial.is_empty() {
            self.started.clear();
        }
        Some(partial)
    }

    /// Drops the oldest incomplete messages (the one just added last) until the budget holds.
    fn enforce_budget(&mut self, keep: FragmentKey) {
        let mut skipped_keep = None;
        while self.pending_bytes > self.max_bytes {
            let Some((started, victim)) = self.started.pop_front() else {
                break;
            };
            // An entry whose message is gone, or was restarted since, is stale.
            if self
                .partial
                .get(&victim)
                .is_none_or(|p| p.started != started)
            {
                continue;
            }
            if victim == keep && self.partial.len() > 1 {
                skipped_keep = Some((started, victim));
                continue;
            }
            self.remove(&victim);
            self.dropped += 1;
        }
        if let Some(entry) = skipped_keep {
            if self.partial.contains_key(&entry.1) {
                self.started.push_front(entry);
            }
        }
    }
}
