//! The zone index on disk: a base file written whole now and then, and an append-only log of
//! the entries changed since, so that recording one pulled or written file costs one small
//! append and one `fdatasync`, not a rewrite of every entry of the zone.
//!
//! The log starts with the BLAKE3 digest of the base it continues. A log whose digest does not
//! match the base (a crash between writing a new base and starting its log) is ignored: the
//! new base already holds everything the old log said. Each record carries its own length and
//! digest; a torn or corrupt record ends the replay, and what follows it was never
//! acknowledged (each append is synced before `save` returns).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

const LOG_MAGIC: &[u8; 8] = b"GVIXLOG1";
const DIGEST_LEN: usize = 16;
const LOG_HEADER_LEN: usize = LOG_MAGIC.len() + DIGEST_LEN;
/// Per record: body length (u32 LE) and the body's digest.
const RECORD_HEADER_LEN: usize = 4 + DIGEST_LEN;
/// The log is folded into a new base once it outgrows the base, and never before this size.
const MIN_COMPACT_LEN: u64 = 256 * 1024;

fn digest(bytes: &[u8]) -> [u8; DIGEST_LEN] {
    let full = blake3::hash(bytes);
    let mut short = [0; DIGEST_LEN];
    short.copy_from_slice(&full.as_bytes()[..DIGEST_LEN]);
    short
}

/// A map of index entries that remembers which paths changed since it was last saved.
///
/// Reading goes through `Deref` to the map; every way to change an entry marks its path.
#[derive(Debug)]
pub(crate) struct Entries<E> {
    map: BTreeMap<String, E>,
    dirty: BTreeSet<String>,
}

impl<E> Default for Entries<E> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
            dirty: BTreeSet::new(),
        }
    }
}

impl<E> std::ops::Deref for Entries<E> {
    type Target = BTreeMap<String, E>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<E> FromIterator<(String, E)> for Entries<E> {
    fn from_iter<I: IntoIterator<Item = (String, E)>>(iter: I) -> Self {
        Self {
            map: iter.into_iter().collect(),
            dirty: BTreeSet::new(),
        }
    }
}

impl<E: Serialize> Serialize for Entries<E> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.map.serialize(serializer)
    }
}

impl<'de, E: Deserialize<'de>> Deserialize<'de> for Entries<E> {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        BTreeMap::deserialize(deserializer).map(|map| Self {
            map,
            dirty: BTreeSet::new(),
        })
    }
}

impl<E> Entries<E> {
    /// Inserts or replaces the entry of `path`.
    pub(crate) fn insert(&mut self, path: String, entry: E) {
        self.dirty.insert(path.clone());
        self.map.insert(path, entry);
    }

    /// The entry of `path`, to change.
    pub(crate) fn get_mut(&mut self, path: &str) -> Option<&mut E> {
        let entry = self.map.get_mut(path)?;
        if !self.dirty.contains(path) {
            self.dirty.insert(path.to_string());
        }
        Some(entry)
    }

    /// The entry of `path`, to change; made by `make` if there is none.
    pub(crate) fn get_or_insert_with(&mut self, path: &str, make: impl FnOnce() -> E) -> &mut E {
        if !self.dirty.contains(path) {
            self.dirty.insert(path.to_string());
        }
        self.map.entry(path.to_string()).or_insert_with(make)
    }

    /// Takes an entry the log replays.
    fn replay(&mut self, path: String, entry: E) {
        self.map.insert(path, entry);
    }
}

/// What the log records per save: the index's small fields whole, and the changed entries.
#[derive(Debug, Deserialize, Serialize)]
pub(crate) struct Record<H, E> {
    pub(crate) header: H,
    pub(crate) entries: Vec<(String, E)>,
}

/// Why the index could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum JournalError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} is unreadable: {reason}")]
    Unreadable { path: PathBuf, reason: String },
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> JournalError + '_ {
    move |error| JournalError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// The base file and its log, as open for appending.
#[derive(Debug)]
pub(crate) struct Journal {
    base_path: PathBuf,
    log_path: PathBuf,
    /// The log, open for appending, when it continues the base on disk; `None` makes the next
    /// save write a new base.
    log: Option<File>,
    log_len: u64,
    base_len: u64,
    /// The log is folded into a new base once it is longer than the base and this.
    min_compact_len: u64,
    /// Saves since the base was written, and since this journal was opened: figures for tests
    /// and `gvctl`.
    appends: u64,
    rewrites: u64,
}

/// What [`Journal::open`] read.
pub(crate) struct Loaded<I> {
    /// The base, with the log's records replayed onto it; `None` when there is no base.
    pub(crate) index: Option<I>,
    /// Records replayed from the log.
    pub(crate) replayed: usize,
}

/// An index the journal can keep: its small fields travel whole in each record, its entries
/// only when they changed.
pub(crate) trait Journaled: Serialize + for<'de> Deserialize<'de> {
    type Header: Serialize + for<'de> Deserialize<'de>;
    type Entry: Serialize + for<'de> Deserialize<'de> + Clone;

    fn header(&self) -> Self::Header;
    fn set_header(&mut self, header: Self::Header);
    fn entries(&self) -> &Entries<Self::Entry>;
    fn entries_mut(&mut self) -> &mut Entries<Self::Entry>;
}

impl Journal {
    /// Reads the base at `base_path` and replays the log beside it (`<base>.log`).
    pub(crate) fn open<I: Journaled>(base_path: &Path) -> Result<(Self, Loaded<I>), JournalError> {
        let log_path = base_path.with_extension("log");
        let mut journal = Self {
            base_path: base_path.to_path_buf(),
            log_path,
            log: None,
            log_len: 0,
            base_len: 0,
            min_compact_len: MIN_COMPACT_LEN,
            appends: 0,
            rewrites: 0,
        };
        let base = match std::fs::read(base_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok((
                    journal,
                    Loaded {
                        index: None,
                        replayed: 0,
                    },
                ))
            }
            Err(e) => return Err(io(base_path)(e)),
        };
        journal.base_len = base.len() as u64;
        let mut index: I = postcard::from_bytes(&base).map_err(|e| JournalError::Unreadable {
            path: base_path.to_path_buf(),
            reason: e.to_string(),
        })?;
        let log = match std::fs::read(&journal.log_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(io(&journal.log_path)(e)),
        };
        let replayed = replay(&log, &digest(&base), &mut index, &journal.log_path);
        if replayed.complete {
            // The log continues this base to its last byte: keep appending to it.
            let file = OpenOptions::new()
                .append(true)
                .open(&journal.log_path)
                .map_err(io(&journal.log_path))?;
            journal.log = Some(file);
            journal.log_len = log.len() as u64;
        }
        Ok((
            journal,
            Loaded {
                index: Some(index),
                replayed: replayed.records,
            },
        ))
    }

    /// Saves what changed in `index` since the last save: one appended record, or a new base
    /// when there is no usable log or the log has outgrown the base. Nothing is forgotten on
    /// failure: the changed paths stay marked and the next save retries.
    pub(crate) fn save<I: Journaled>(&mut self, index: &mut I) -> Result<(), JournalError> {
        let compact_at = self.base_len.max(self.min_compact_len);
        if self.log.is_some() && self.log_len < compact_at {
            match self.append(index) {
                Ok(()) => {
                    index.entries_mut().dirty.clear();
                    return Ok(());
                }
                Err(error) => {
                    tracing::warn!(%error, "zone index log not appended to; writing the whole index");
                    self.log = None;
                }
            }
        }
        self.rewrite(index)?;
        index.entries_mut().dirty.clear();
        Ok(())
    }

    fn append<I: Journaled>(&mut self, index: &I) -> Result<(), JournalError> {
        let entries = index.entries();
        let record = Record {
            header: index.header(),
            entries: entries
                .dirty
                .iter()
                .filter_map(|path| Some((path.clone(), entries.map.get(path)?.clone())))
                .collect(),
        };
        let body = postcard::to_stdvec(&record).map_err(|e| JournalError::Unreadable {
            path: self.log_path.clone(),
            reason: e.to_string(),
        })?;
        let len = u32::try_from(body.len()).map_err(|_| JournalError::Unreadable {
            path: self.log_path.clone(),
            reason: format!("a record of {} bytes", body.len()),
        })?;
        let mut framed = Vec::with_capacity(RECORD_HEADER_LEN + body.len());
        framed.extend_from_slice(&len.to_le_bytes());
        framed.extend_from_slice(&digest(&body));
        framed.extend_from_slice(&body);
        let Some(file) = self.log.as_mut() else {
            return Err(io(&self.log_path)(std::io::Error::other("no log open")));
        };
        let written = file.write_all(&framed).and_then(|()| file.sync_data());
        if let Err(error) = written {
            // Cut what was written of the record, so that a later record does not follow a
            // torn one (replay stops at the first bad record).
            if file.set_len(self.log_len).is_err() {
                self.log = None;
            }
            return Err(io(&self.log_path)(error));
        }
        self.log_len += framed.len() as u64;
        self.appends += 1;
        Ok(())
    }

    /// Writes the whole index as a new base, then starts an empty log for it.
    fn rewrite<I: Journaled>(&mut self, index: &I) -> Result<(), JournalError> {
        self.log = None;
        let base = postcard::to_stdvec(index).map_err(|e| JournalError::Unreadable {
            path: self.base_path.clone(),
            reason: e.to_string(),
        })?;
        let dir = self.base_path.parent().unwrap_or(Path::new("."));
        // Temporary files in the same directory, removed on drop if anything fails.
        let write_base = || -> std::io::Result<()> {
            let mut file = tempfile::NamedTempFile::new_in(dir)?;
            file.write_all(&base)?;
            file.as_file().sync_all()?;
            file.persist(&self.base_path).map_err(|e| e.error)?;
            Ok(())
        };
        write_base().map_err(io(&self.base_path))?;
        self.base_len = base.len() as u64;
        self.rewrites += 1;
        // Until the new log is in place, the old one names the old base and is ignored.
        let write_log = || -> std::io::Result<File> {
            let mut file = tempfile::NamedTempFile::new_in(dir)?;
            file.write_all(LOG_MAGIC)?;
            file.write_all(&digest(&base))?;
            file.as_file().sync_all()?;
            file.persist(&self.log_path).map_err(|e| e.error)?;
            // The renames are durable once the directory is.
            File::open(dir)?.sync_all()?;
            // Appending mode: after a failed append is cut off, the next one goes at the end.
            OpenOptions::new().append(true).open(&self.log_path)
        };
        match write_log() {
            Ok(file) => {
                self.log = Some(file);
                self.log_len = LOG_HEADER_LEN as u64;
            }
            Err(error) => {
                // The base holds everything; the next save writes a base again.
                tracing::warn!(%error, path = %self.log_path.display(), "zone index log not started");
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn compact_from(&mut self, len: u64) {
        self.min_compact_len = len;
    }

    /// Records appended and bases written since this journal was opened.
    pub(crate) fn counts(&self) -> (u64, u64) {
        (self.appends, self.rewrites)
    }

    /// The log's path.
    pub(crate) fn log_path(&self) -> &Path {
        &self.log_path
    }
}

struct Replayed {
    records: usize,
    /// Whether the log matched the base and every byte of it was a good record.
    complete: bool,
}

fn replay<I: Journaled>(log: &[u8], base_digest: &[u8], index: &mut I, path: &Path) -> Replayed {
    let mut replayed = Replayed {
        records: 0,
        complete: false,
    };
    let Some((header, mut rest)) = log.split_at_checked(LOG_HEADER_LEN) else {
        if !log.is_empty() {
            tracing::warn!(path = %path.display(), "zone index log too short: ignored");
        }
        return replayed;
    };
    if &header[..LOG_MAGIC.len()] != LOG_MAGIC || &header[LOG_MAGIC.len()..] != base_digest {
        // A log of an older base (a crash right after a new base was written): the base holds
        // all of it.
        tracing::debug!(path = %path.display(), "zone index log of another base: ignored");
        return replayed;
    }
    while !rest.is_empty() {
        let Some(record) = next_record::<I>(&mut rest) else {
            tracing::warn!(
                path = %path.display(),
                records = replayed.records,
                ignored_bytes = rest.len(),
                "zone index log ends in a torn or corrupt record (a save that never completed): ignored"
            );
            return replayed;
        };
        index.set_header(record.header);
        for (entry_path, entry) in record.entries {
            index.entries_mut().replay(entry_path, entry);
        }
        replayed.records += 1;
    }
    replayed.complete = true;
    replayed
}

/// Decodes the record at the start of `rest` and steps over it; `None` when it is torn or
/// corrupt (`rest` is left as it was).
fn next_record<I: Journaled>(rest: &mut &[u8]) -> Option<Record<I::Header, I::Entry>> {
    let (frame, after) = rest.split_at_checked(RECORD_HEADER_LEN)?;
    let (len, sum) = frame.split_at(4);
    let len = usize::try_from(u32::from_le_bytes(len.try_into().ok()?)).ok()?;
    let (body, after) = after.split_at_checked(len)?;
    if digest(body) != sum {
        return None;
    }
    let record = postcard::from_bytes(body).ok()?;
    *rest = after;
    Some(record)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use proptest::prelude::*;

    use super::*;

    #[derive(Debug, Default, Deserialize, Serialize)]
    struct TestIndex {
        saves: u64,
        entries: Entries<u32>,
    }

    impl Journaled for TestIndex {
        type Header = u64;
        type Entry = u32;

        fn header(&self) -> u64 {
            self.saves
        }
        fn set_header(&mut self, header: u64) {
            self.saves = header;
        }
        fn entries(&self) -> &Entries<u32> {
            &self.entries
        }
        fn entries_mut(&mut self) -> &mut Entries<u32> {
            &mut self.entries
        }
    }

    /// What a reopened index must equal: its header and entries.
    fn contents(index: &TestIndex) -> (u64, BTreeMap<String, u32>) {
        (index.saves, (*index.entries).clone())
    }

    fn reopen(base: &Path) -> (Journal, TestIndex) {
        let (journal, loaded) = Journal::open::<TestIndex>(base).unwrap();
        (journal, loaded.index.unwrap_or_default())
    }

    fn change_and_save(journal: &mut Journal, index: &mut TestIndex, key: u32, value: u32) {
        index.entries.insert(format!("k{key}"), value);
        index.saves += 1;
        journal.save(index).unwrap();
    }

    #[test]
    fn saves_append_one_record_each_and_reopen_to_the_same_index() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("index.bin");
        let (mut journal, mut index) = reopen(&base);
        for i in 0..200 {
            change_and_save(&mut journal, &mut index, i % 50, i);
        }
        if let Some(entry) = index.entries.get_mut("k3") {
            *entry = 7_777;
        }
        journal.save(&mut index).unwrap();
        // The first save wrote a base; every later one appended.
        assert_eq!(journal.counts(), (200, 1));
        let (_, reopened) = reopen(&base);
        assert_eq!(contents(&reopened), contents(&index));
        assert_eq!(reopened.entries.get("k3"), Some(&7_777));
    }

    #[test]
    fn a_log_longer_than_its_base_is_folded_into_a_new_base() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("index.bin");
        let (mut journal, mut index) = reopen(&base);
        journal.compact_from(0);
        for i in 0..100 {
            change_and_save(&mut journal, &mut index, i % 10, i);
        }
        let (appends, rewrites) = journal.counts();
        assert!(rewrites > 1, "{rewrites} rewrites, {appends} appends");
        assert!(appends > 0, "{rewrites} rewrites, {appends} appends");
        let log_len = std::fs::metadata(journal.log_path()).unwrap().len();
        let base_len = std::fs::metadata(&base).unwrap().len();
        assert!(
            log_len <= base_len + 64,
            "log {log_len} B, base {base_len} B"
        );
        let (_, reopened) = reopen(&base);
        assert_eq!(contents(&reopened), contents(&index));
    }

    #[test]
    fn the_log_of_an_older_base_is_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("index.bin");
        let (mut journal, mut index) = reopen(&base);
        change_and_save(&mut journal, &mut index, 1, 1);
        change_and_save(&mut journal, &mut index, 1, 2);
        let old_log = std::fs::read(journal.log_path()).unwrap();
        // A new base (as after compaction), then a crash before its log replaced the old one.
        journal.compact_from(0);
        change_and_save(&mut journal, &mut index, 1, 3);
        change_and_save(&mut journal, &mut index, 2, 4);
        let log_path = journal.log_path().to_path_buf();
        drop(journal);
        std::fs::write(&base, postcard::to_stdvec(&index).unwrap()).unwrap();
        std::fs::write(&log_path, &old_log).unwrap();
        let (mut journal, mut reopened) = reopen(&base);
        assert_eq!(contents(&reopened), contents(&index));
        // It is not appended to: the next save starts a log for this base.
        change_and_save(&mut journal, &mut reopened, 5, 5);
        assert_eq!(journal.counts(), (0, 1));
        let (_, again) = reopen(&base);
        assert_eq!(contents(&again), contents(&reopened));
    }

    #[test]
    fn a_corrupt_record_ends_the_replay_and_the_next_save_rewrites() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("index.bin");
        let (mut journal, mut index) = reopen(&base);
        change_and_save(&mut journal, &mut index, 1, 1);
        let after_first = contents(&index);
        let log_len = std::fs::metadata(journal.log_path()).unwrap().len();
        change_and_save(&mut journal, &mut index, 2, 2);
        change_and_save(&mut journal, &mut index, 3, 3);
        let log_path = journal.log_path().to_path_buf();
        drop(journal);
        // One flipped bit in the second record's body.
        let mut log = std::fs::read(&log_path).unwrap();
        let at = usize::try_from(log_len).unwrap() + RECORD_HEADER_LEN;
        log[at] ^= 1;
        std::fs::write(&log_path, &log).unwrap();
        let (mut journal, mut reopened) = reopen(&base);
        assert_eq!(contents(&reopened), after_first);
        change_and_save(&mut journal, &mut reopened, 9, 9);
        assert_eq!(journal.counts(), (0, 1));
        let (_, again) = reopen(&base);
        assert_eq!(contents(&again), contents(&reopened));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Cut the log anywhere (a crash mid-append): the index reopens as it was after the
        /// last save whose record is whole, and saving on from there loses nothing.
        #[test]
        fn a_log_cut_anywhere_reopens_to_the_last_whole_save(
            changes in proptest::collection::vec((0u32..20, any::<u32>()), 1..40),
            compact in any::<bool>(),
            cut in any::<prop::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path().join("index.bin");
            let (mut journal, mut index) = reopen(&base);
            if compact {
                journal.compact_from(512);
            }
            // (log length, contents) after each save since the last base.
            let mut saved = Vec::new();
            for (key, value) in changes {
                let rewrites = journal.counts().1;
                change_and_save(&mut journal, &mut index, key, value);
                if journal.counts().1 != rewrites {
                    saved.clear();
                }
                let len = std::fs::metadata(journal.log_path()).unwrap().len();
                saved.push((len, contents(&index)));
            }
            let log_path = journal.log_path().to_path_buf();
            drop(journal);
            let log = std::fs::read(&log_path).unwrap();
            let cut_at = cut.index(log.len() + 1);
            std::fs::write(&log_path, &log[..cut_at]).unwrap();
            let base_contents: (u64, BTreeMap<String, u32>) = {
                let bytes = std::fs::read(&base).unwrap();
                contents(&postcard::from_bytes::<TestIndex>(&bytes).unwrap())
            };
            let expected = saved
                .iter()
                .rev()
                .find(|(len, _)| *len <= cut_at as u64)
                .map_or(base_contents, |(_, contents)| contents.clone());
            let (mut journal, mut reopened) = reopen(&base);
            prop_assert_eq!(contents(&reopened), expected);
            change_and_save(&mut journal, &mut reopened, 99, 99);
            let (_, again) = reopen(&base);
            prop_assert_eq!(contents(&again), contents(&reopened));
        }
    }
}
