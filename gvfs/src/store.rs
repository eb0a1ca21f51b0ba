//! The local replica of a zone: the zone's directory, and an index of every path with its
//! stable file id, version vector and tombstone, kept in gvd's state directory.
//!
//! Changes are found by comparing what is on disk with the index (size and modification
//! time): the NFS front asks for a check of the paths it touched (debounced for writes, since
//! NFSv3 has no close), and a periodic scan catches anything else. Each local change bumps the
//! file's version vector for this node and the zone's version, which peers see in the ELP.
//!
//! It is over 1 000 lines: the index, the scan, applying pulled changes and the conflict rules
//! share the index's invariants. Its callers do its disk work off the async runtime's workers
//! (NFS handlers in `block_in_place`, pulls and scans on threads of their own); the index is
//! still saved whole after each change (an incremental index is GrapeVineFS work still open,
//! docs/GVFS.md).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

use crate::journal::{Entries, Journal, JournalError, Journaled};

use crate::version::{Relation, VersionVector};
use crate::zpath::{self, PathError};

/// The id of a zone's root directory.
pub const ROOT_ID: u64 = 1;

/// What a path is.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub enum Kind {
    /// A regular file.
    File,
    /// A directory.
    Dir,
}

/// One change made by a node: the node, and its counter at the change (its zone version then,
/// so a node never numbers two changes alike, whatever their paths).
#[derive(
    Clone, Copy, Debug, Default, Deserialize, Eq, Hash, Ord, PartialEq, PartialOrd, Serialize,
)]
pub struct Change {
    /// The node that made it.
    pub node: u64,
    /// That node's counter at it.
    pub counter: u64,
}

/// What the index knows of one path.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct Entry {
    /// Stable file id (NFS file handles are built from it).
    pub id: u64,
    /// File or directory.
    pub kind: Kind,
    /// Changes seen, per node.
    pub vv: VersionVector,
    /// Deleted (a tombstone, kept so that the deletion replicates and nothing resurrects).
    pub deleted: bool,
    /// The zone version at which this node last changed or received it.
    pub changed_at: u64,
    /// Size in bytes, as last seen.
    pub size: u64,
    /// Modification time in nanoseconds, as last seen (to notice changes).
    pub mtime_ns: i128,
    /// The write that produced this content: two entries with the same one hold the same bytes,
    /// wherever renames took them. With `written_ms`, it picks the winner of a conflict the
    /// same way on every member, and names the loser's copy.
    pub content: Change,
    /// When that write was made (ms since the epoch, the writer's clock).
    pub written_ms: u64,
    /// The changes that put what this entry holds at its path (a write, a mkdir, the rename
    /// that moved it here), one per node at most, less those a deletion of the path has seen.
    /// A concurrent deletion wins over a live entry only if it saw every one of them: a
    /// directory made on two members survives a deletion that saw one mkdir, and goes with one
    /// that saw both, whichever member merged what first. Empty for a tombstone.
    pub placements: VersionVector,
    /// The versions that lost a conflict at this path on a member that held this entry (they
    /// live on in conflict copies). Not part of `vv`: a deletion of this version by a member
    /// that saw only it is not concurrent with them. The next change made here follows them
    /// too: whoever makes it saw them set aside, and a member still holding one at this path
    /// must take that change rather than weigh it as a new conflict.
    pub displaced: VersionVector,
    /// Permission bits (`st_mode & 0o7777`); 0 when not known (an index from before they were
    /// replicated, until the next change).
    pub mode: u32,
}

/// The index file in gvd's state directory (version 4: entries carry every change that placed
/// them at their path that no deletion has seen).
const INDEX_FILE: &str = "index.v4.bin";
/// The journaled index of version 3 (one placing change per entry): replayed once and migrated.
const LEGACY_JOURNALED_INDEX_FILE: &str = "index.v3.bin";
/// The whole-file index files of earlier releases, newest first: read once and migrated.
const LEGACY_INDEX_FILES: [&str; 2] = ["index.v2.bin", "index.bin"];

/// The index as earlier releases wrote it (postcard has no optional fields).
mod legacy {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::{Change, Kind, VersionVector};

    /// An entry of the first release, before modes were replicated.
    #[derive(Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub(super) struct EntryV1 {
        id: u64,
        kind: Kind,
        vv: VersionVector,
        deleted: bool,
        changed_at: u64,
        size: u64,
        mtime_ns: i128,
        writer: u64,
        written_ms: u64,
    }

    /// An entry of version 2: a mode, and the content known only by its writer.
    #[derive(Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub(super) struct EntryV2 {
        id: u64,
        kind: Kind,
        vv: VersionVector,
        deleted: bool,
        changed_at: u64,
        size: u64,
        mtime_ns: i128,
        writer: u64,
        written_ms: u64,
        mode: u32,
    }

    /// An entry of version 3: one change placed it at its path.
    #[derive(Clone, Deserialize, serde::Serialize)]
    pub(super) struct EntryV3 {
        pub(super) id: u64,
        pub(super) kind: Kind,
        pub(super) vv: VersionVector,
        pub(super) deleted: bool,
        pub(super) changed_at: u64,
        pub(super) size: u64,
        pub(super) mtime_ns: i128,
        pub(super) content: Change,
        pub(super) written_ms: u64,
        pub(super) placed: Change,
        pub(super) displaced: VersionVector,
        pub(super) mode: u32,
    }

    impl From<EntryV3> for super::Entry {
        fn from(old: EntryV3) -> Self {
            super::Entry {
                id: old.id,
                kind: old.kind,
                vv: old.vv,
                deleted: old.deleted,
                changed_at: old.changed_at,
                size: old.size,
                mtime_ns: old.mtime_ns,
                content: old.content,
                written_ms: old.written_ms,
                placements: super::placed_by(old.deleted, old.placed),
                displaced: old.displaced,
                mode: old.mode,
            }
        }
    }

    #[derive(Deserialize)]
    #[cfg_attr(test, derive(serde::Serialize))]
    pub(super) struct Index<E> {
        next_id: u64,
        version: u64,
        entries: BTreeMap<String, E>,
        seen: BTreeMap<u64, u64>,
        conflicts: u64,
    }

    /// An old index of one file written by node 7, as the first release wrote it, or as the
    /// second did when `mode` is given.
    #[cfg(test)]
    pub(super) fn one_file(path: &str, size: u64, mtime_ns: i128, mode: Option<u32>) -> Vec<u8> {
        let entry = EntryV1 {
            id: 2,
            kind: Kind::File,
            vv: VersionVector([(7, 1)].into_iter().collect()),
            deleted: false,
            changed_at: 1,
            size,
            mtime_ns,
            writer: 7,
            written_ms: 1,
        };
        fn index<E>(path: &str, entry: E) -> Index<E> {
            Index {
                next_id: 3,
                version: 1,
                entries: [(path.to_string(), entry)].into_iter().collect(),
                seen: BTreeMap::new(),
                conflicts: 0,
            }
        }
        match mode {
            None => postcard::to_stdvec(&index(path, entry)),
            Some(mode) => postcard::to_stdvec(&index(
                path,
                EntryV2 {
                    id: entry.id,
                    kind: entry.kind,
                    vv: entry.vv,
                    deleted: entry.deleted,
                    changed_at: entry.changed_at,
                    size: entry.size,
                    mtime_ns: entry.mtime_ns,
                    writer: entry.writer,
                    written_ms: entry.written_ms,
                    mode,
                },
            )),
        }
        .unwrap_or_default()
    }

    impl EntryV1 {
        fn into_entry(self, mode: u32) -> super::Entry {
            // Before renames kept a content's identity, the writer's counter in the vector was
            // its write, and the write put it at its path.
            let content = Change {
                node: self.writer,
                counter: self.vv.0.get(&self.writer).copied().unwrap_or(0),
            };
            super::Entry {
                id: self.id,
                kind: self.kind,
                vv: self.vv,
                deleted: self.deleted,
                changed_at: self.changed_at,
                size: self.size,
                mtime_ns: self.mtime_ns,
                content,
                written_ms: self.written_ms,
                placements: super::placed_by(self.deleted, content),
                displaced: VersionVector::default(),
                mode,
            }
        }
    }

    impl From<EntryV1> for super::Entry {
        fn from(old: EntryV1) -> Self {
            old.into_entry(0)
        }
    }

    impl From<EntryV2> for super::Entry {
        fn from(old: EntryV2) -> Self {
            let v1 = EntryV1 {
                id: old.id,
                kind: old.kind,
                vv: old.vv,
                deleted: old.deleted,
                changed_at: old.changed_at,
                size: old.size,
                mtime_ns: old.mtime_ns,
                writer: old.writer,
                written_ms: old.written_ms,
            };
            v1.into_entry(old.mode)
        }
    }

    impl<E: Into<super::Entry>> From<Index<E>> for super::Index {
        fn from(old: Index<E>) -> Self {
            Self {
                next_id: old.next_id,
                version: old.version,
                entries: old
                    .entries
                    .into_iter()
                    .map(|(path, e)| (path, e.into()))
                    .collect(),
                seen: old.seen,
                conflicts: old.conflicts,
            }
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
struct Index<E = Entry> {
    next_id: u64,
    version: u64,
    entries: Entries<E>,
    /// The version of each peer this node has pulled everything up to.
    seen: BTreeMap<u64, u64>,
    conflicts: u64,
}

/// The index's fields other than its entries: small, logged whole with every save.
#[derive(Debug, Deserialize, Serialize)]
struct IndexHeader {
    next_id: u64,
    version: u64,
    seen: BTreeMap<u64, u64>,
    conflicts: u64,
}

impl<E> Default for Index<E> {
    fn default() -> Self {
        Self {
            next_id: 0,
            version: 0,
            entries: Entries::default(),
            seen: BTreeMap::new(),
            conflicts: 0,
        }
    }
}

impl Index<legacy::EntryV3> {
    fn migrate(self) -> Index {
        Index {
            next_id: self.next_id,
            version: self.version,
            entries: self
                .entries
                .iter()
                .map(|(path, e)| (path.clone(), Entry::from(e.clone())))
                .collect(),
            seen: self.seen,
            conflicts: self.conflicts,
        }
    }
}

impl<E: Serialize + for<'de> Deserialize<'de> + Clone> Journaled for Index<E> {
    type Header = IndexHeader;
    type Entry = E;

    fn header(&self) -> IndexHeader {
        IndexHeader {
            next_id: self.next_id,
            version: self.version,
            seen: self.seen.clone(),
            conflicts: self.conflicts,
        }
    }

    fn set_header(&mut self, header: IndexHeader) {
        self.next_id = header.next_id;
        self.version = header.version;
        self.seen = header.seen;
        self.conflicts = header.conflicts;
    }

    fn entries(&self) -> &Entries<E> {
        &self.entries
    }

    fn entries_mut(&mut self) -> &mut Entries<E> {
        &mut self.entries
    }
}

impl From<JournalError> for StoreError {
    fn from(error: JournalError) -> Self {
        match error {
            JournalError::Io { path, error } => Self::Io { path, error },
            JournalError::Unreadable { path, reason } => Self::Index { path, reason },
        }
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// File system error.
    #[error("{path}: {error}")]
    Io {
        /// Where.
        path: PathBuf,
        /// What.
        error: std::io::Error,
    },
    /// A path that may not be used in a zone (malformed, or leading outside it).
    #[error(transparent)]
    Path(#[from] PathError),
    /// The index file is unreadable.
    #[error("index {path} is unreadable: {reason}")]
    Index {
        /// Where.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |error| StoreError::Io {
        path: path.to_path_buf(),
        error,
    }
}

/// What a store reads the wall clock with, in milliseconds since the Unix epoch: it stamps each
/// local change (conflict resolution compares the stamps). Tests give a store a clock they
/// control.
pub type WallClock = std::sync::Arc<dyn Fn() -> u64 + Send + Sync>;

fn system_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Gives `file` the permissions and modification time `entry` carries (those it knows).
fn set_mode_and_mtime(file: &Path, entry: &Entry) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    if entry.mode != 0 {
        std::fs::set_permissions(file, std::fs::Permissions::from_mode(entry.mode))?;
    }
    if entry.mtime_ns > 0 {
        let nanos = u64::try_from(entry.mtime_ns).unwrap_or(u64::MAX);
        let when = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
        std::fs::File::options()
            .write(true)
            .open(file)?
            .set_times(std::fs::FileTimes::new().set_modified(when))?;
    }
    Ok(())
}

/// Whether `name` is that of a pull's file on its way in or out (`.gvfs-<pid>-<n>.part`).
fn is_pull_temp(name: &str) -> bool {
    name.strip_prefix(".gvfs-")
        .and_then(|rest| rest.strip_suffix(".part"))
        .and_then(|rest| rest.split_once('-'))
        .is_some_and(|(pid, n)| {
            [pid, n]
                .iter()
                .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
        })
}

/// Puts `new` at `path` in one step. When `path` held a file, it is swapped with `new` (so
/// that the caller can look at what was replaced, with any write that reached it) and `true`
/// is returned; otherwise (nothing there, or a file system without exchange) `new` is renamed
/// over it and `false` is returned.
fn exchange(new: &Path, path: &Path) -> std::io::Result<bool> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if std::fs::symlink_metadata(path).is_ok_and(|m| m.is_file()) {
        use nix::fcntl::{renameat2, RenameFlags, AT_FDCWD};
        match renameat2(AT_FDCWD, new, AT_FDCWD, path, RenameFlags::RENAME_EXCHANGE) {
            Ok(()) => return Ok(true),
            // Not supported here (or the file went meanwhile): a plain rename.
            Err(nix::errno::Errno::EINVAL | nix::errno::Errno::ENOENT) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    std::fs::rename(new, path)?;
    Ok(false)
}

/// Whether a process (this one included) holds `file` open for writing: the kernel refuses a
/// read lease on such a file. `false` when that cannot be told (leases unsupported by the file
/// system or disabled, or the file owned by another user without `CAP_LEASE`).
///
/// A pull that moves a file off its path checks the file it moved: a program that opened it
/// for writing before goes on writing to it, wherever its name is now.
fn held_open_for_writing(file: &Path) -> bool {
    use std::os::fd::AsRawFd;
    // <asm-generic/fcntl.h>, the same on every Linux architecture; libc leaves it out.
    const F_SETSIG: nix::libc::c_int = 10;
    use std::os::unix::fs::OpenOptionsExt;
    // Never through a link, and never waiting on a FIFO put at this name meanwhile.
    let flags = nix::fcntl::OFlag::O_NOFOLLOW | nix::fcntl::OFlag::O_NONBLOCK;
    let Ok(reader) = std::fs::File::options()
        .read(true)
        .custom_flags(flags.bits())
        .open(file)
    else {
        return false;
    };
    if !reader.metadata().is_ok_and(|m| m.is_file()) {
        return false;
    }
    let fd = reader.as_raw_fd();
    // SAFETY: `fd` is open for the whole block (owned by `reader`), and these fcntl commands
    // take an integer argument and touch no memory of ours.
    #[allow(unsafe_code)]
    unsafe {
        // A program opening the file for writing while the lease is held breaks it, and the
        // kernel signals the holder: SIGIO by default, which ends the process. SIGWINCH is
        // ignored unless handled, and gvd handles it nowhere.
        if nix::libc::fcntl(fd, F_SETSIG, nix::libc::SIGWINCH) == -1 {
            return false;
        }
        if nix::libc::fcntl(fd, nix::libc::F_SETLEASE, nix::libc::F_RDLCK) == -1 {
            return std::io::Error::last_os_error().raw_os_error() == Some(nix::libc::EAGAIN);
        }
        nix::libc::fcntl(fd, nix::libc::F_SETLEASE, nix::libc::F_UNLCK);
    }
    false
}

fn mtime_ns(meta: &std::fs::Metadata) -> i128 {
    i128::from(meta.mtime()) * 1_000_000_000 + i128::from(meta.mtime_nsec())
}

fn mtime_ns_of(time: SystemTime) -> i128 {
    match time.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(after) => i128::try_from(after.as_nanos()).unwrap_or(i128::MAX),
        Err(before) => -i128::try_from(before.duration().as_nanos()).unwrap_or(i128::MAX),
    }
}

/// What to do with a peer's version of a path.
#[derive(Clone, Debug, Eq, PartialEq)]
pub enum Decision {
    /// Ours has it already.
    Skip,
    /// Theirs follows ours: take it.
    Take,
    /// Concurrent changes, ours wins: keep ours, store theirs as a conflict copy.
    KeepOursCopyTheirs,
    /// Concurrent changes, theirs wins: move ours to a conflict copy, take theirs.
    TakeTheirsCopyOurs,
    /// Concurrent, and one side deleted it: the surviving content wins, no copy needed.
    MergeOnly,
}

/// Decides between our entry (if any) and a peer's. Every member decides the same way for the
/// same pair, so all converge: a later write wins (then the higher node id), the other is kept
/// as a conflict copy; a directory wins over a file (which is kept as the copy); what lives
/// wins over a concurrent deletion that did not see every change that placed it.
pub fn decide(ours: Option<&Entry>, theirs: &Entry) -> Decision {
    let Some(ours) = ours else {
        return Decision::Take;
    };
    match ours.vv.relation(&theirs.vv) {
        Relation::Equal | Relation::After => Decision::Skip,
        Relation::Before => Decision::Take,
        Relation::Concurrent => match (ours.deleted, theirs.deleted) {
            (true, true) => Decision::MergeOnly,
            // What lives wins over a concurrent deletion, unless the deletion came after it
            // (the vectors are concurrent only through other changes merged in).
            (true, false) if saw_every_placement(ours, theirs) => Decision::MergeOnly,
            (true, false) => Decision::Take,
            (false, true) if saw_every_placement(theirs, ours) => Decision::Take,
            (false, true) => Decision::MergeOnly,
            (false, false) => {
                if ours.kind == Kind::Dir && theirs.kind == Kind::Dir {
                    Decision::MergeOnly
                } else if ours.kind != theirs.kind {
                    // A directory and a file made at one path: the directory stays (its
                    // children need it, and a tree cannot become a conflict copy without
                    // renaming all of them), the file becomes the copy, on every member.
                    if ours.kind == Kind::Dir {
                        Decision::KeepOursCopyTheirs
                    } else {
                        Decision::TakeTheirsCopyOurs
                    }
                } else if ours.content == theirs.content {
                    // The same write, with different deletions merged in on each side: one
                    // content, nothing to keep twice.
                    Decision::MergeOnly
                } else if (theirs.written_ms, theirs.content) > (ours.written_ms, ours.content) {
                    Decision::TakeTheirsCopyOurs
                } else {
                    Decision::KeepOursCopyTheirs
                }
            }
        },
    }
}

/// Whether `deletion` was made by a member that held `live` as it is: its vector counts every
/// change that placed it. (A write alone is not enough: a file written elsewhere by the
/// deleting node and then renamed here is news to that node. Nor is one mkdir of a directory
/// made on two members.) An entry that knows of no placement (an index of an early release)
/// is never taken for seen.
fn saw_every_placement(deletion: &Entry, live: &Entry) -> bool {
    !live.placements.0.is_empty()
        && live
            .placements
            .0
            .iter()
            .all(|(node, counter)| deletion.vv.saw(*node, *counter))
}

/// The placements of an entry that one change placed (none for a tombstone).
fn placed_by(deleted: bool, change: Change) -> VersionVector {
    if deleted || change.counter == 0 {
        VersionVector::default()
    } else {
        VersionVector([(change.node, change.counter)].into_iter().collect())
    }
}

/// The placements of one live version merged from two members' entries, `(placements,
/// vector)` each: those both hold, and those either holds that the other never saw (the other
/// did not drop them for a deletion). Order does not matter, so members agree whoever merged
/// what first.
fn merge_placements(
    ours: (&VersionVector, &VersionVector),
    theirs: (&VersionVector, &VersionVector),
) -> VersionVector {
    fn kept<'a>(
        mine: &'a VersionVector,
        (other, other_vv): (&'a VersionVector, &'a VersionVector),
    ) -> impl Iterator<Item = (u64, u64)> + 'a {
        mine.0
            .iter()
            .filter(move |(node, counter)| {
                other.0.get(node) == Some(counter) || !other_vv.saw(**node, **counter)
            })
            .map(|(node, counter)| (*node, *counter))
    }
    let mut merged = VersionVector::default();
    for (node, counter) in kept(ours.0, theirs).chain(kept(theirs.0, ours)) {
        let slot = merged.0.entry(node).or_insert(0);
        *slot = (*slot).max(counter);
    }
    merged
}

/// The placements of `live` that a concurrent `deletion` (which lost to it) never saw: those
/// it saw are gone with it.
fn unseen_placements(live: &VersionVector, deletion: &VersionVector) -> VersionVector {
    VersionVector(
        live.0
            .iter()
            .filter(|(node, counter)| !deletion.saw(**node, **counter))
            .map(|(node, counter)| (*node, *counter))
            .collect(),
    )
}

/// The name of the conflict copy of `path` for the version whose content `content` wrote:
/// `dir/name.conflict-<writer>-<writer's counter>.ext`.
///
/// The change, not the write time, names the copy: two versions by one writer in the same
/// millisecond would otherwise share a copy, and members would fill it differently.
pub fn conflict_path(path: &str, content: Change) -> String {
    let Change {
        node: writer,
        counter: change,
    } = content;
    let (dir, name) = path.rsplit_once('/').map_or(("", path), |(d, n)| (d, n));
    let (stem, ext) = match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() => (stem, Some(ext)),
        _ => (name, None),
    };
    let copy = match ext {
        Some(ext) => format!("{stem}.conflict-{writer:016x}-{change}.{ext}"),
        None => format!("{stem}.conflict-{writer:016x}-{change}"),
    };
    if dir.is_empty() {
        copy
    } else {
        format!("{dir}/{copy}")
    }
}

/// How long a file whose last write was a full-size one at its end must be quiet before it
/// counts as changed: NFSv3 has no close, and a copy sends such writes until its last, short,
/// one.
pub const GROWING_QUIET: Duration = Duration::from_secs(2);

/// Writes smaller than this end a copy (clients write whole 1 MiB pieces until the last).
pub const FULL_WRITE: usize = 1 << 20;

/// How long a file written UNSTABLE and not committed must be quiet before it counts as
/// changed: its writer has not said it is done (NFS clients COMMIT when they close or flush),
/// and a pause in a copy (the page cache throttling writes) must not publish half of it.
pub const UNCOMMITTED_QUIET: Duration = Duration::from_secs(30);

/// How close to the check that records a file its modification time must be for a rewrite to
/// be able to hide behind it: file system timestamps advance in ticks (a few milliseconds on
/// Linux file systems, 2 s on FAT), and a same-size rewrite within one tick keeps the mtime.
pub const RACY_WINDOW: Duration = Duration::from_secs(2);

/// Larger files are not watched for rewrites hiding in a timestamp tick: writing this much
/// takes longer than a tick on the file systems whose ticks are milliseconds, and hashing
/// them at every settle would delay their replication.
pub const RACY_MAX_SIZE: u64 = 16 << 20;

/// A file recorded while its timestamp could still hide a rewrite (see [`RACY_WINDOW`]).
#[derive(Clone, Copy, Debug)]
struct RacyFile {
    /// The version recorded with it.
    content: Change,
    size: u64,
    mtime_ns: i128,
    digest: [u8; 32],
}

fn file_digest(path: &Path) -> std::io::Result<[u8; 32]> {
    let mut hasher = blake3::Hasher::new();
    hasher.update_reader(std::fs::File::open(path)?)?;
    Ok(*hasher.finalize().as_bytes())
}

/// A write not yet recorded as a change.
#[derive(Clone, Copy, Debug)]
struct PendingWrite {
    at: Instant,
    size: u64,
    growing: bool,
    /// Written UNSTABLE since the last COMMIT.
    uncommitted: bool,
}

/// The local replica of one zone.
pub struct ZoneStore {
    node: u64,
    clock: WallClock,
    root: PathBuf,
    /// Where the index is saved: a base file and a log of what changed since.
    journal: Journal,
    tmp_dir: PathBuf,
    index: Index,
    by_id: HashMap<u64, String>,
    /// Paths written through NFS, checked once they have been quiet for the debounce, with
    /// their size now (counted against the quota before the check).
    pending_checks: HashMap<String, PendingWrite>,
    /// Paths pulls are about to replace (with how many pulls): local writes to them wait.
    incoming: HashMap<String, usize>,
    temp_counter: u64,
    /// Sum of the indexed sizes of live files; `None` after the index changed.
    used_cache: std::cell::Cell<Option<u64>>,
    /// Symbolic links found in the zone directory (never replicated), each warned about once.
    skipped_links: BTreeSet<String>,
    /// Files whose recorded modification time was within [`RACY_WINDOW`] of the check that
    /// recorded it, with a digest of what they held then: a rewrite of the same size within
    /// the same timestamp tick leaves size and mtime as they were, so for these the next check
    /// compares contents.
    racy: HashMap<String, RacyFile>,
    /// Files a crash left on their way in or out of the zone, each warned about once.
    skipped_temps: BTreeSet<String>,
}

impl std::fmt::Debug for ZoneStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZoneStore")
            .field("node", &self.node)
            .field("root", &self.root)
            .field("version", &self.index.version)
            .field("entries", &self.index.entries.len())
            .finish_non_exhaustive()
    }
}

impl ZoneStore {
    /// Opens (or creates) the replica whose data lives in `root` and whose index and temporary
    /// files live in `meta`, for node `node`; scans the directory for changes made while gvd
    /// was down.
    ///
    /// # Errors
    ///
    /// When the directories cannot be created or the index cannot be read.
    pub fn open(node: u64, root: &Path, meta: &Path) -> Result<Self, StoreError> {
        Self::open_with_clock(node, root, meta, std::sync::Arc::new(system_ms))
    }

    /// [`ZoneStore::open`] with the wall clock that stamps local changes.
    ///
    /// # Errors
    ///
    /// As [`ZoneStore::open`].
    pub fn open_with_clock(
        node: u64,
        root: &Path,
        meta: &Path,
        clock: WallClock,
    ) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root).map_err(io(root))?;
        let tmp_dir = meta.join("incoming");
        std::fs::create_dir_all(&tmp_dir).map_err(io(&tmp_dir))?;
        let device = |p: &Path| std::fs::metadata(p).map(|m| m.dev()).ok();
        if device(&tmp_dir) != device(root) {
            tracing::warn!(
                zone = %root.display(),
                state = %tmp_dir.display(),
                "the zone and gvd's state directory are on different file systems: every pulled file is copied once more to reach the zone"
            );
        }
        let index_path = meta.join(INDEX_FILE);
        let (journal, loaded) = Journal::open::<Index>(&index_path)?;
        if loaded.replayed > 0 {
            tracing::debug!(records = loaded.replayed, path = %journal.log_path().display(), "zone index log replayed");
        }
        let (index, migrated_from) = match loaded.index {
            Some(index) => (index, None),
            None => match Self::read_legacy_index(meta)? {
                Some((index, path)) => (index, Some(path)),
                None => (
                    Index {
                        next_id: ROOT_ID + 1,
                        ..Index::default()
                    },
                    None,
                ),
            },
        };
        let by_id = index
            .entries
            .iter()
            .map(|(path, entry)| (entry.id, path.clone()))
            .collect();
        let mut store = Self {
            node,
            clock,
            root: root.to_path_buf(),
            journal,
            tmp_dir,
            index,
            by_id,
            pending_checks: HashMap::new(),
            incoming: HashMap::new(),
            temp_counter: 0,
            used_cache: std::cell::Cell::new(None),
            skipped_links: BTreeSet::new(),
            racy: HashMap::new(),
            skipped_temps: BTreeSet::new(),
        };
        store.scan()?;
        if let Some(legacy_paths) = migrated_from {
            // Migrated: written in the new format at once; the old files go once it is.
            store.save()?;
            for legacy_path in legacy_paths {
                match std::fs::remove_file(&legacy_path) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(error) => {
                        tracing::warn!(%error, path = %legacy_path.display(), "old zone index left behind");
                    }
                }
            }
        }
        Ok(store)
    }

    /// The index an earlier release left in `meta` (the newest there is), taken over; and the
    /// files it came from.
    fn read_legacy_index(meta: &Path) -> Result<Option<(Index, Vec<PathBuf>)>, StoreError> {
        let journaled = meta.join(LEGACY_JOURNALED_INDEX_FILE);
        let (v3, loaded) = Journal::open::<Index<legacy::EntryV3>>(&journaled)?;
        if let Some(index) = loaded.index {
            tracing::info!(path = %journaled.display(), records = loaded.replayed, "zone index of an earlier release migrated");
            return Ok(Some((
                index.migrate(),
                vec![journaled, v3.log_path().to_path_buf()],
            )));
        }
        for (format, name) in LEGACY_INDEX_FILES.iter().enumerate() {
            let path = meta.join(name);
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(&path)(e)),
            };
            let parsed = match format {
                0 => postcard::from_bytes::<legacy::Index<legacy::EntryV2>>(&bytes).map(Into::into),
                _ => postcard::from_bytes::<legacy::Index<legacy::EntryV1>>(&bytes).map(Into::into),
            };
            let index = parsed.map_err(|e| StoreError::Index {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            tracing::info!(path = %path.display(), "zone index of an earlier release migrated");
            return Ok(Some((index, vec![path])));
        }
        Ok(None)
    }

    /// The zone's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// This node's version of the zone.
    pub fn version(&self) -> u64 {
        self.index.version
    }

    /// Symbolic links found in the zone directory by the last scan (never replicated).
    pub fn skipped_links(&self) -> usize {
        self.skipped_links.len()
    }

    /// Files written through NFS whose writes have not settled yet.
    pub fn unsettled_writes(&self) -> usize {
        self.pending_checks.len()
    }

    /// Conflicts kept so far.
    pub fn conflicts(&self) -> u64 {
        self.index.conflicts
    }

    /// Bytes held (live files, including writes not yet settled). Called on every NFS
    /// WRITE for the quota: the indexed total is cached until the index changes, and only the
    /// few unsettled paths are looked at each time.
    pub fn used_bytes(&self) -> u64 {
        let indexed = self.used_cache.get().unwrap_or_else(|| {
            let total = self
                .index
                .entries
                .values()
                .filter(|e| !e.deleted && e.kind == Kind::File)
                .map(|e| e.size)
                .sum();
            self.used_cache.set(Some(total));
            total
        });
        self.pending_checks
            .iter()
            .fold(indexed, |used, (path, PendingWrite { size, .. })| {
                let settled = self
                    .index
                    .entries
                    .get(path)
                    .filter(|e| !e.deleted && e.kind == Kind::File)
                    .map_or(0, |e| e.size);
                used - settled.min(used) + size
            })
    }

    /// The peer version this node has everything up to.
    pub fn seen(&self, peer: u64) -> u64 {
        self.index.seen.get(&peer).copied().unwrap_or(0)
    }

    /// The entry of `path`.
    pub fn entry(&self, path: &str) -> Option<&Entry> {
        self.index.entries.get(path)
    }

    /// The path of file id `id` (live or not).
    pub fn path_of(&self, id: u64) -> Option<&str> {
        if id == ROOT_ID {
            return Some("");
        }
        self.by_id.get(&id).map(String::as_str)
    }

    /// The on-disk location of a zone path, resolved strictly beneath the zone's root (see
    /// [`zpath::resolve_beneath`]).
    ///
    /// # Errors
    ///
    /// When the path is malformed or would leave the root (`..`, a symbolic link).
    pub fn disk_path(&self, path: &str) -> Result<PathBuf, PathError> {
        zpath::resolve_beneath(&self.root, path)
    }

    /// Whether a pull is about to replace `path` (writes must be retried later).
    pub fn is_incoming(&self, path: &str) -> bool {
        self.incoming.contains_key(path)
    }

    /// A pull is about to replace `path`.
    pub fn hold(&mut self, path: &str) {
        *self.incoming.entry(path.to_string()).or_insert(0) += 1;
    }

    /// A pull is done with `path`.
    pub fn release(&mut self, path: &str) {
        if let Some(count) = self.incoming.get_mut(path) {
            *count -= 1;
            if *count == 0 {
                self.incoming.remove(path);
            }
        }
    }

    /// The id of `path`, assigning one if it has none (a file that exists on disk but was not
    /// indexed yet).
    pub fn id_for(&mut self, path: &str) -> u64 {
        if path.is_empty() {
            return ROOT_ID;
        }
        if let Some(entry) = self.index.entries.get(path) {
            return entry.id;
        }
        let id = self.index.next_id;
        self.index.next_id += 1;
        // A placeholder with no changes: the next check records it as this node's.
        self.index.entries.insert(
            path.to_string(),
            Entry {
                id,
                kind: Kind::File,
                vv: VersionVector::default(),
                deleted: true,
                changed_at: 0,
                size: 0,
                mtime_ns: i128::MIN,
                content: Change {
                    node: self.node,
                    counter: 0,
                },
                written_ms: 0,
                placements: VersionVector::default(),
                displaced: VersionVector::default(),
                mode: 0,
            },
        );
        self.by_id.insert(id, path.to_string());
        id
    }

    /// Live children of directory `dir`, by id.
    pub fn children(&self, dir: &str) -> Vec<(u64, String)> {
        children_in(&self.index.entries, dir, |entry| {
            (!entry.deleted).then_some(entry.id)
        })
    }

    /// Notes a write to `path`, which is now `size` bytes long; it is checked once quiet for
    /// the debounce, or for [`GROWING_QUIET`] when the write was a full-size one at the end of
    /// the file (a copy under way: its next piece is coming, and a peer should not take the
    /// half file).
    /// `unstable`: written UNSTABLE (then it waits for a COMMIT, or [`UNCOMMITTED_QUIET`]).
    /// Until it settles, the path is not offered to peers: they keep the previous version.
    pub fn note_write(
        &mut self,
        path: &str,
        size: u64,
        (growing, unstable): (bool, bool),
        now: Instant,
    ) {
        let uncommitted = unstable || self.pending_checks.get(path).is_some_and(|p| p.uncommitted);
        self.pending_checks.insert(
            path.to_string(),
            PendingWrite {
                at: now,
                size,
                growing,
                uncommitted,
            },
        );
    }

    /// The client committed what it wrote to `path` (NFS COMMIT): it is done, so the file
    /// settles after the debounce, not after the longer quiet of a copy still growing.
    pub fn note_commit(&mut self, path: &str) {
        if let Some(pending) = self.pending_checks.get_mut(path) {
            pending.growing = false;
            pending.uncommitted = false;
        }
    }

    /// Removes `path` if it is a file created empty whose written content never settled (a
    /// copy that cannot be finished), and records the deletion; returns whether it did.
    ///
    /// # Errors
    ///
    /// When the file cannot be removed or the index saved.
    pub fn abandon_new_file(&mut self, path: &str) -> Result<bool, StoreError> {
        let is_new = self
            .index
            .entries
            .get(path)
            .is_some_and(|e| !e.deleted && e.kind == Kind::File && e.size == 0);
        if !is_new || !self.pending_checks.contains_key(path) {
            return Ok(false);
        }
        let disk = self.disk_path(path)?;
        match std::fs::remove_file(&disk) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(StoreError::Io { path: disk, error }),
        }
        self.pending_checks.remove(path);
        if self.check(path) {
            self.save()?;
        }
        Ok(true)
    }

    /// Checks the paths whose last write is at least `debounce` old; returns whether anything
    /// changed.
    ///
    /// # Errors
    ///
    /// When the index cannot be saved.
    pub fn settle(&mut self, now: Instant, debounce: Duration) -> Result<bool, StoreError> {
        let due: Vec<String> = self
            .pending_checks
            .iter()
            .filter(|(_, pending)| {
                let quiet = if pending.uncommitted {
                    debounce.max(UNCOMMITTED_QUIET)
                } else if pending.growing {
                    debounce.max(GROWING_QUIET)
                } else {
                    debounce
                };
                now.saturating_duration_since(pending.at) >= quiet
            })
            .map(|(path, _)| path.clone())
            .collect();
        let mut changed = false;
        for path in due {
            self.pending_checks.remove(&path);
            if self.check(&path) {
                changed = true;
            } else {
                // Its last recorded version was withheld while it was written (see
                // `changes_since`): offered again, or peers that pulled meanwhile miss it.
                changed |= self.offer_again(&path);
            }
        }
        if changed {
            self.save()?;
        }
        Ok(changed)
    }

    /// Gives `path`'s entry a new zone version without changing it, so that peers are offered
    /// it again; returns whether there was an entry to offer.
    fn offer_again(&mut self, path: &str) -> bool {
        let Some(entry) = self.index.entries.get_mut(path) else {
            return false;
        };
        if entry.changed_at == 0 {
            return false;
        }
        self.index.version += 1;
        entry.changed_at = self.index.version;
        true
    }

    /// Compares `path` on disk with the index and records a change if they differ (created,
    /// modified or deleted); returns whether it did.
    pub fn check(&mut self, path: &str) -> bool {
        if self.incoming.contains_key(path) {
            return false;
        }
        self.check_held(path)
    }

    /// [`ZoneStore::check`] for a path a pull holds, just before the pull replaces it: a
    /// write made directly in the zone directory since the pull planned is recorded (and so
    /// weighed and kept) rather than overwritten or set aside under another version's name.
    pub fn check_held(&mut self, path: &str) -> bool {
        if path.is_empty() {
            return false;
        }
        // A path that cannot be resolved beneath the root (a symbolic link put there by hand)
        // is not part of the zone.
        let on_disk = self.disk_path(path).ok().and_then(|disk| {
            let meta = std::fs::symlink_metadata(&disk).ok()?;
            Some((disk, meta))
        });
        self.id_for(path);
        let Some(entry) = self.index.entries.get_mut(path) else {
            return false;
        };
        // A file to watch for a rewrite hiding in its timestamp tick: its size, time and digest.
        let mut watch = None;
        let changed = match &on_disk {
            None => {
                if entry.deleted {
                    false
                } else {
                    entry.deleted = true;
                    entry.size = 0;
                    true
                }
            }
            Some((disk, meta)) => {
                let kind = if meta.is_dir() { Kind::Dir } else { Kind::File };
                let size = if meta.is_dir() { 0 } else { meta.len() };
                let mtime = mtime_ns(meta);
                let mode = meta.mode() & 0o7777;
                // An unknown mode (0, an older index) is learnt without counting as a change.
                let mut differs = entry.deleted
                    || entry.kind != kind
                    || (entry.mode != 0 && entry.mode != mode)
                    || (kind == Kind::File && (entry.size != size || entry.mtime_ns != mtime));
                if kind == Kind::File {
                    // Only the version this node recorded from disk: one a pull installed since
                    // may carry the same size and time with other bytes.
                    let racy = self
                        .racy
                        .get(path)
                        .filter(|r| {
                            !differs
                                && r.content == entry.content
                                && (r.size, r.mtime_ns) == (size, mtime)
                        })
                        .copied();
                    let now_ns = mtime_ns_of(SystemTime::now());
                    let recent = size <= RACY_MAX_SIZE
                        && now_ns.saturating_sub(mtime) < RACY_WINDOW.as_nanos() as i128;
                    let digest = (recent || racy.is_some())
                        .then(|| file_digest(disk).ok())
                        .flatten();
                    if let Some(racy) = racy {
                        // Size and time as recorded, and the time was recent then: only a
                        // rewrite within that tick can hide here; the contents tell.
                        differs = digest != Some(racy.digest);
                    }
                    watch = digest
                        .filter(|_| recent)
                        .map(|digest| (size, mtime, digest));
                }
                entry.kind = kind;
                entry.size = size;
                entry.mtime_ns = mtime;
                entry.mode = mode;
                entry.deleted = false;
                differs
            }
        };
        if changed {
            self.record_local_change(path);
        }
        match (watch, self.index.entries.get(path)) {
            (Some((size, mtime_ns, digest)), Some(entry)) => {
                let content = entry.content;
                self.racy.insert(
                    path.to_string(),
                    RacyFile {
                        content,
                        size,
                        mtime_ns,
                        digest,
                    },
                );
            }
            _ => {
                self.racy.remove(path);
            }
        }
        changed
    }

    /// Makes what the index holds for `path` a change of this node (a new version following
    /// everything its entry has seen and set aside).
    fn record_local_change(&mut self, path: &str) {
        let node = self.node;
        let id = self.id_for(path);
        let Some(entry) = self.index.entries.get_mut(path) else {
            return;
        };
        self.used_cache.set(None);
        self.index.version += 1;
        let displaced = std::mem::take(&mut entry.displaced);
        entry.vv.merge(&displaced);
        entry.vv.record(node, self.index.version);
        entry.changed_at = self.index.version;
        entry.content = Change {
            node,
            counter: self.index.version,
        };
        // It follows every earlier placement: a deletion that sees it sees them all.
        entry.placements = placed_by(entry.deleted, entry.content);
        entry.written_ms = (self.clock)();
        tracing::debug!(
            path,
            id,
            version = self.index.version,
            deleted = entry.deleted,
            "local change"
        );
    }

    /// Moves the file at `path` to its conflict copy (named by its content) so that a
    /// directory can take its place, and indexes the copy; returns the copy's path.
    fn set_aside_file(&mut self, path: &str, file: Entry) -> Result<String, StoreError> {
        let disk = self.disk_path(path)?;
        let copy = conflict_path(path, file.content);
        let copy_disk = self.disk_path(&copy)?;
        std::fs::rename(&disk, &copy_disk).map_err(io(&copy_disk))?;
        let meta = std::fs::metadata(&copy_disk).map_err(io(&copy_disk))?;
        let copied = Entry {
            displaced: VersionVector::default(),
            ..file
        };
        self.index_received(&copy, &copied, meta.len(), mtime_ns(&meta));
        self.index.conflicts += 1;
        Ok(copy)
    }

    /// A directory that holds something a file made at its path never saw stays a directory
    /// (as in a concurrent conflict, the directory wins): the file at `path` (on disk, or the
    /// incoming `file`) becomes its conflict copy, and the directory a new version that
    /// follows the file's, so that every member ends with the directory and the copy.
    fn directory_wins_over(
        &mut self,
        path: &str,
        file: &Entry,
        fetched: Option<&Path>,
    ) -> Result<(), StoreError> {
        let copy = conflict_path(path, file.content);
        let mut their_copy = file.clone();
        their_copy.displaced = VersionVector::default();
        self.install(&copy, &their_copy, fetched)?;
        self.index.conflicts += 1;
        self.make_directory_entry(path, &file.vv);
        tracing::warn!(
            path,
            copy,
            "conflict: a file made where a directory holds newer things; kept both"
        );
        Ok(())
    }

    /// Indexes `path` as a live directory that follows `after`, as a change of this node.
    fn make_directory_entry(&mut self, path: &str, after: &VersionVector) {
        let id = self.id_for(path);
        let entry = self.index.entries.get_or_insert_with(path, || Entry {
            id,
            kind: Kind::Dir,
            vv: VersionVector::default(),
            deleted: false,
            changed_at: 0,
            size: 0,
            mtime_ns: 0,
            content: Change::default(),
            written_ms: 0,
            placements: VersionVector::default(),
            displaced: VersionVector::default(),
            mode: 0,
        });
        entry.vv.merge(after);
        entry.kind = Kind::Dir;
        entry.deleted = false;
        entry.size = 0;
        self.record_local_change(path);
    }

    /// Whether anything live under directory `path` is news to a version with vector `vv`.
    fn holds_unseen(&self, path: &str, vv: &VersionVector) -> bool {
        let prefix = format!("{path}/");
        self.index.entries.iter().any(|(p, e)| {
            p.starts_with(&prefix)
                && !e.deleted
                && !matches!(e.vv.relation(vv), Relation::Before | Relation::Equal)
        })
    }

    /// Checks every indexed path and every file under the directory; returns how many changed.
    ///
    /// # Errors
    ///
    /// When the directory cannot be walked or the index saved.
    pub fn scan(&mut self) -> Result<usize, StoreError> {
        let mut paths: BTreeSet<String> = self
            .index
            .entries
            .iter()
            .filter(|(_, e)| !e.deleted)
            .map(|(p, _)| p.clone())
            .collect();
        // Links are counted afresh each scan; only new ones are warned about.
        let known_links = std::mem::take(&mut self.skipped_links);
        let mut stack = vec![String::new()];
        while let Some(dir) = stack.pop() {
            let Ok(disk) = self.disk_path(&dir) else {
                continue;
            };
            let Ok(entries) = std::fs::read_dir(&disk) else {
                continue;
            };
            for entry in entries.flatten() {
                let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                    continue;
                };
                let path = if dir.is_empty() {
                    name
                } else {
                    format!("{dir}/{name}")
                };
                if is_pull_temp(path.rsplit('/').next().unwrap_or_default())
                    && !self.index.entries.contains_key(&path)
                {
                    // A pull's file on its way in or out, left by a crash: not zone content.
                    if self.skipped_temps.insert(path.clone()) {
                        tracing::warn!(
                            path,
                            root = %self.root.display(),
                            "left by an interrupted pull (a pulled file not yet in place, or a replaced one): not replicated; look at it and remove it"
                        );
                    }
                    continue;
                }
                if entry.file_type().is_ok_and(|t| t.is_symlink()) {
                    if self.skipped_links.insert(path.clone()) && !known_links.contains(&path) {
                        tracing::warn!(
                            path,
                            root = %self.root.display(),
                            "symbolic link in a zone: not replicated"
                        );
                    }
                    continue;
                }
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(path.clone());
                }
                paths.insert(path);
            }
        }
        let mut changed = 0;
        for path in paths {
            // A file being written over NFS is checked when its writes settle: a scan in the
            // middle of a copy would publish half of it.
            if self.pending_checks.contains_key(&path) {
                continue;
            }
            if self.check(&path) {
                changed += 1;
            }
        }
        if changed > 0 {
            self.save()?;
        }
        Ok(changed)
    }

    /// Entries changed after zone version `since`, for a peer's pull.
    pub fn changes_since(&self, since: u64) -> Vec<(String, Entry)> {
        let mut changes: Vec<(String, Entry)> = self
            .index
            .entries
            .iter()
            .filter(|(_, e)| e.changed_at > since)
            // A file still being written is not offered: peers keep the version they have
            // until it settles (then it is offered again with a new zone version).
            .filter(|(p, _)| !self.pending_checks.contains_key(*p))
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect();
        sort_for_applying(&mut changes);
        changes
    }

    /// Records that everything of `peer` up to `version` is here.
    ///
    /// # Errors
    ///
    /// When the index cannot be saved.
    pub fn set_seen(&mut self, peer: u64, version: u64) -> Result<(), StoreError> {
        let seen = self.index.seen.entry(peer).or_insert(0);
        *seen = (*seen).max(version);
        self.save()
    }

    /// A temporary file for incoming data.
    pub fn temp_file(&mut self) -> PathBuf {
        self.temp_counter += 1;
        self.tmp_dir
            .join(format!("{}-{}.part", std::process::id(), self.temp_counter))
    }

    /// Applies a peer's version of `path` whose content (for a live file) was fetched into
    /// `fetched`, as `decision` says (see [`decide`]).
    ///
    /// # Errors
    ///
    /// File system errors; the index is then left as it was for that path.
    pub fn apply(
        &mut self,
        path: &str,
        theirs: &Entry,
        decision: &Decision,
        fetched: Option<&Path>,
    ) -> Result<(), StoreError> {
        match decision {
            Decision::Skip => return Ok(()),
            Decision::MergeOnly => {
                self.merge_into(path, theirs);
                return self.save();
            }
            Decision::KeepOursCopyTheirs => {
                let copy = conflict_path(path, theirs.content);
                let mut their_copy = theirs.clone();
                their_copy.deleted = false;
                their_copy.displaced = VersionVector::default();
                self.install(&copy, &their_copy, fetched)?;
                if let Some(entry) = self.index.entries.get_mut(path) {
                    entry.displaced.merge(&theirs.vv);
                }
                self.index.conflicts += 1;
                tracing::warn!(
                    path,
                    copy,
                    "conflict: concurrent changes, kept both (ours wins)"
                );
                // Our vector stays as it is: theirs lives on in its copy, and a later deletion
                // of ours must not meet their changes at the path.
                return self.save();
            }
            Decision::TakeTheirsCopyOurs => {
                let ours = self.index.entries.get(path).cloned();
                let mut theirs = theirs.clone();
                if let Some(ours) = ours {
                    theirs.displaced.merge(&ours.displaced);
                    theirs.displaced.merge(&ours.vv);
                    let copy = self.set_aside_file(path, ours)?;
                    tracing::warn!(
                        path,
                        copy,
                        "conflict: concurrent changes, kept both (theirs wins)"
                    );
                }
                // Not merged with ours: that version lives on in its copy, and the path holds
                // theirs alone (a later deletion of theirs must not meet our changes there).
                self.install(path, &theirs, fetched)?;
            }
            Decision::Take => {
                // Theirs follows ours, or wins over it (content over a deletion, a deletion
                // over the content it saw): it includes our changes from now on.
                let mut merged = theirs.clone();
                if let Some(ours) = self.index.entries.get(path) {
                    if ours.deleted
                        && !theirs.deleted
                        && ours.vv.relation(&theirs.vv) == Relation::Concurrent
                    {
                        // Our deletion lost, and so did what it saw.
                        merged.placements = unseen_placements(&theirs.placements, &ours.vv);
                    }
                    merged.vv.merge(&ours.vv);
                    merged.displaced.merge(&ours.displaced);
                }
                self.install(path, &merged, fetched)?;
            }
        }
        self.save()
    }

    /// Our entry for `path` now includes every change of `theirs` (content unchanged).
    fn merge_into(&mut self, path: &str, theirs: &Entry) {
        self.id_for(path);
        if let Some(entry) = self.index.entries.get_mut(path) {
            match (entry.deleted, theirs.deleted) {
                // One directory made on two members, or one content placed here twice (the
                // same rename on two members): a deletion wins only if it saw every placement.
                (false, false) => {
                    entry.placements = merge_placements(
                        (&entry.placements, &entry.vv),
                        (&theirs.placements, &theirs.vv),
                    );
                }
                (false, true) => {
                    entry.placements = unseen_placements(&entry.placements, &theirs.vv);
                }
                (true, _) => entry.placements = VersionVector::default(),
            }
            entry.vv.merge(&theirs.vv);
            entry.displaced.merge(&theirs.displaced);
            self.index.version += 1;
            entry.changed_at = self.index.version;
        }
    }

    /// Puts a peer's version in place: the fetched file renamed over the path, a directory
    /// created, or the path removed for a tombstone; then indexes it as received.
    fn install(
        &mut self,
        path: &str,
        theirs: &Entry,
        fetched: Option<&Path>,
    ) -> Result<(), StoreError> {
        self.used_cache.set(None);
        let disk = match self.disk_path(path) {
            Ok(disk) => disk,
            // A deletion under what is a file here now (a directory that lost to a file, or
            // was replaced by one): nothing of it is on disk, only the tombstone to keep.
            Err(PathError::NotADirectory(_)) if theirs.deleted => {
                self.index_received(path, theirs, 0, i128::MIN);
                return Ok(());
            }
            // Something made under what is a file here (a file that replaced its directory
            // without seeing it): the directory wins, the file becomes a conflict copy.
            Err(PathError::NotADirectory(ancestor)) => {
                let file = self
                    .index
                    .entries
                    .get(&ancestor)
                    .filter(|e| !e.deleted && e.kind == Kind::File)
                    .cloned()
                    .ok_or_else(|| PathError::NotADirectory(ancestor.clone()))?;
                let copy = self.set_aside_file(&ancestor, file.clone())?;
                let ancestor_disk = self.disk_path(&ancestor)?;
                std::fs::create_dir_all(&ancestor_disk).map_err(io(&ancestor_disk))?;
                self.make_directory_entry(&ancestor, &file.vv);
                tracing::warn!(
                    path = ancestor,
                    copy,
                    "conflict: a directory's contents arrived where a file replaced it; kept both"
                );
                // Deeper ancestors, if any, the same way.
                return self.install(path, theirs, fetched);
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(parent) = disk.parent() {
            std::fs::create_dir_all(parent).map_err(io(parent))?;
        }
        let (size, mtime) = if theirs.deleted {
            let removed = match std::fs::symlink_metadata(&disk) {
                Ok(meta) if meta.is_dir() => std::fs::remove_dir(&disk),
                Ok(_) => {
                    // Moved aside first (beside it: the same file system), so that a write
                    // made directly on disk since the pull looked is seen on the file it went
                    // to, and kept. A file that cannot go fails the pull, which retries: as a
                    // tombstone over a file still there, the next scan would bring it back.
                    let aside = self.sibling_temp(&disk);
                    std::fs::rename(&disk, &aside).map_err(io(&disk))?;
                    self.keep_or_drop_replaced(path, &aside)
                        .map_err(io(&aside))?;
                    Ok(())
                }
                Err(_) => Ok(()),
            };
            if let Err(e) = removed {
                // A directory that still holds files stays until they are gone too.
                tracing::debug!(path, error = %e, "not removed");
            }
            (0, i128::MIN)
        } else if theirs.kind == Kind::Dir {
            // Their directory follows whatever is there (a file it replaced): make room.
            if std::fs::symlink_metadata(&disk).is_ok_and(|m| !m.is_dir()) {
                std::fs::remove_file(&disk).map_err(io(&disk))?;
            }
            std::fs::create_dir_all(&disk).map_err(io(&disk))?;
            if theirs.mode != 0 {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(theirs.mode))
                    .map_err(io(&disk))?;
            }
            (0, 0)
        } else {
            let Some(fetched) = fetched else {
                return Ok(());
            };
            // Their file follows a directory that was there: it goes if empty (its children's
            // deletions come later in the same pull otherwise, and the next pull finishes it),
            // unless it holds something the file's writer never saw.
            if std::fs::symlink_metadata(&disk).is_ok_and(|m| m.is_dir()) {
                if self.holds_unseen(path, &theirs.vv) {
                    return self.directory_wins_over(path, theirs, Some(fetched));
                }
                std::fs::remove_dir(&disk).map_err(io(&disk))?;
            }
            // Renamed into place from the zone's own file system: a state directory elsewhere
            // costs one more copy.
            let staged = self.staged_beside(fetched, &disk)?;
            let result = self.put_in_place(path, theirs, &staged, &disk);
            if staged != fetched {
                // Cleanup: gone already unless something failed.
                let _ = std::fs::remove_file(&staged);
            }
            result?;
            sync_dir(disk.parent().unwrap_or(&self.root));
            let meta = std::fs::metadata(&disk).map_err(io(&disk))?;
            (meta.len(), mtime_ns(&meta))
        };
        self.index_received(path, theirs, size, mtime);
        Ok(())
    }

    /// `fetched`, or a copy of it beside `disk` when the two are on different file systems (a
    /// state directory outside the zone's): a rename cannot cross them.
    fn staged_beside(&mut self, fetched: &Path, disk: &Path) -> Result<PathBuf, StoreError> {
        let parent = disk.parent().unwrap_or(&self.root);
        let device = |p: &Path| std::fs::metadata(p).map(|m| m.dev());
        if device(fetched).map_err(io(fetched))? == device(parent).map_err(io(parent))? {
            return Ok(fetched.to_path_buf());
        }
        let staged = self.sibling_temp(disk);
        let copied =
            std::fs::copy(fetched, &staged).and_then(|_| std::fs::File::open(&staged)?.sync_all());
        if let Err(error) = copied {
            // Cleanup: a partial copy is never indexed, and removed here.
            let _ = std::fs::remove_file(&staged);
            return Err(io(&staged)(error));
        }
        Ok(staged)
    }

    /// Puts the file at `staged` (theirs) at `path`; a file it replaces is looked at and kept
    /// if a direct write reached it.
    fn put_in_place(
        &mut self,
        path: &str,
        theirs: &Entry,
        staged: &Path,
        disk: &Path,
    ) -> Result<(), StoreError> {
        // The writer's permissions and modification time, set before the file appears.
        set_mode_and_mtime(staged, theirs).map_err(io(staged))?;
        if exchange(staged, disk).map_err(io(disk))? {
            // The replaced file is at `staged` now: a write made directly on disk since the
            // pull looked is seen on it, and kept.
            self.keep_or_drop_replaced(path, staged)
                .map_err(io(staged))?;
        }
        Ok(())
    }

    /// A name beside `disk` for a file on its way in or out (hidden, unique to this process,
    /// short whatever the file's name; the store's lock is held while it exists, so no scan
    /// sees it, and one left by a crash is skipped by scans: see [`is_pull_temp`]).
    fn sibling_temp(&mut self, disk: &Path) -> PathBuf {
        self.temp_counter += 1;
        disk.with_file_name(format!(
            ".gvfs-{}-{}.part",
            std::process::id(),
            self.temp_counter
        ))
    }

    /// The file a pull just moved off `path` (to `aside`): removed if it is the version the
    /// index holds and no program holds it open for writing; otherwise a write was made
    /// directly on disk after the pull's last check, or may still be (through a descriptor
    /// opened before), and it is kept as a conflict copy beside the path, recorded as this
    /// node's change. Later writes through that descriptor land in the copy, and scans see
    /// them there.
    fn keep_or_drop_replaced(&mut self, path: &str, aside: &Path) -> std::io::Result<()> {
        let meta = std::fs::symlink_metadata(aside)?;
        let writing = meta.is_file() && held_open_for_writing(aside);
        let recorded = self
            .index
            .entries
            .get(path)
            .filter(|e| !e.deleted && e.kind == Kind::File);
        let unchanged = recorded.is_some_and(|entry| {
            (entry.size, entry.mtime_ns) == (meta.len(), mtime_ns(&meta))
                && self
                    .racy
                    .get(path)
                    .filter(|r| r.content == entry.content)
                    .is_none_or(|r| file_digest(aside).is_ok_and(|d| d == r.digest))
        });
        if (unchanged && !writing) || !meta.is_file() {
            return std::fs::remove_file(aside);
        }
        // Named by the change that records it (the next of this node).
        let copy = conflict_path(
            path,
            Change {
                node: self.node,
                counter: self.index.version + 1,
            },
        );
        let copy_disk = self
            .disk_path(&copy)
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        std::fs::rename(aside, &copy_disk)?;
        self.index.conflicts += 1;
        if writing {
            tracing::warn!(
                path,
                copy,
                "a program holds the file a pull replaced open for writing: the replaced file is kept as a conflict copy, where its later writes go"
            );
        } else {
            tracing::warn!(
                path,
                copy,
                "a write made directly in the zone directory while a pull replaced the file is kept as a conflict copy"
            );
        }
        self.check(&copy);
        Ok(())
    }

    /// Indexes a peer's version of `path` as installed, with what the disk now holds.
    fn index_received(&mut self, path: &str, theirs: &Entry, size: u64, mtime: i128) {
        let id = self.id_for(path);
        self.index.version += 1;
        let version = self.index.version;
        self.index.entries.insert(
            path.to_string(),
            Entry {
                id,
                changed_at: version,
                size,
                mtime_ns: mtime,
                ..theirs.clone()
            },
        );
    }

    /// Moves the index entry of `from` (and of everything under it) to `to`, after the rename
    /// on disk, so that file ids survive renames; records both paths as changed.
    pub fn renamed(&mut self, from: &str, to: &str) {
        if from == to {
            return;
        }
        self.used_cache.set(None);
        let moved: Vec<String> = self
            .index
            .entries
            .keys()
            .filter(|p| *p == from || p.starts_with(&format!("{from}/")))
            .cloned()
            .collect();
        for old in moved {
            let new = format!("{to}{}", &old[from.len()..]);
            let Some(entry) = self.index.entries.get(&old).cloned() else {
                continue;
            };
            if entry.deleted {
                continue;
            }
            // The old path becomes a tombstone (a fresh id, so handles follow the file).
            let tomb_id = self.index.next_id;
            self.index.next_id += 1;
            let mut tomb = entry.clone();
            tomb.id = tomb_id;
            self.by_id.insert(tomb_id, old.clone());
            self.index.entries.insert(old.clone(), tomb);
            // The new path takes the file's id; whatever it replaced becomes a tombstone.
            if let Some(replaced) = self.index.entries.get(&new) {
                self.by_id.remove(&replaced.id);
            }
            // It keeps its content's identity (its write and write time), so that two members
            // making the same rename concurrently hold one version, not a conflict; its vector
            // follows both what was at the new path and its own history; the rename places it.
            let mut moved_entry = entry;
            let mut vv = VersionVector::default();
            if let Some(replaced) = self.index.entries.get(&new) {
                vv.merge(&replaced.vv);
                vv.merge(&replaced.displaced);
            }
            vv.merge(&moved_entry.vv);
            moved_entry.vv = vv;
            // What lost conflicts at the old path is no news at the new one.
            moved_entry.displaced = VersionVector::default();
            self.by_id.insert(moved_entry.id, new.clone());
            self.index.entries.insert(new.clone(), moved_entry);
            self.check(&old);
            // Content that differs from what was indexed (writes not settled) is a change of
            // its own; otherwise the move is recorded as this node's change of the new path.
            if !self.check(&new) {
                let node = self.node;
                self.index.version += 1;
                let version = self.index.version;
                if let Some(entry) = self.index.entries.get_mut(&new) {
                    entry.vv.record(node, version);
                    entry.changed_at = version;
                    entry.placements = placed_by(
                        false,
                        Change {
                            node,
                            counter: version,
                        },
                    );
                }
            }
        }
    }

    /// Saves what changed in the index since the last save (one appended, synced log record;
    /// now and then the whole index, atomically).
    ///
    /// # Errors
    ///
    /// When it cannot be written (full disk): what was saved before stays, and the next save
    /// writes these changes too.
    pub fn save(&mut self) -> Result<(), StoreError> {
        // Every change of the index is saved: what was cached from it is recomputed.
        self.used_cache.set(None);
        self.journal.save(&mut self.index)?;
        Ok(())
    }

    /// Index saves since the store was opened: (records appended to the log, whole rewrites).
    pub fn index_saves(&self) -> (u64, u64) {
        self.journal.counts()
    }
}

/// The children of `dir` among `entries` (path → entry), as (id, name) sorted by id; `live`
/// gives an entry's id, or `None` for one to leave out (a tombstone).
///
/// Each child's subtree is stepped over in one range lookup (its descendants are the paths in
/// `child/`..`child0`, `0` being the character after `/`), so listing a directory costs its
/// children, not every path beneath it: the zone's root is not a scan of the whole zone.
fn children_in<E>(
    entries: &BTreeMap<String, E>,
    dir: &str,
    live: impl Fn(&E) -> Option<u64>,
) -> Vec<(u64, String)> {
    use std::ops::Bound;
    let prefix = if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    };
    let mut children = Vec::new();
    let mut from = Bound::Included(prefix.clone());
    while let Some((path, entry)) = entries.range((from, Bound::Unbounded)).next() {
        let Some(rest) = path.strip_prefix(&prefix) else {
            break;
        };
        match rest.find('/') {
            Some(slash) => {
                from = Bound::Included(format!("{}0", &path[..prefix.len() + slash]));
            }
            None => {
                if let Some(id) = live(entry) {
                    children.push((id, rest.to_string()));
                }
                from = Bound::Excluded(path.clone());
            }
        }
    }
    children.sort_unstable();
    children
}

/// Puts changes in the order they can be applied in: directories that exist, shallow before
/// deep (parents before children), then files, then deletions deepest first (children before
/// their directory, which can then be removed instead of lingering and coming back).
pub fn sort_for_applying<T>(changes: &mut [(T, Entry)])
where
    T: AsRef<str>,
{
    changes.sort_by_cached_key(|(path, entry)| {
        let path = path.as_ref();
        let depth = path.matches('/').count();
        let stage = match (entry.deleted, entry.kind) {
            (false, Kind::Dir) => 0,
            (false, Kind::File) => 1,
            (true, _) => 2,
        };
        let depth_order = if entry.deleted {
            usize::MAX - depth
        } else {
            depth
        };
        (stage, depth_order, path.to_string())
    });
}

/// Makes a rename durable.
pub(crate) fn sync_dir(dir: &Path) {
    if let Ok(dir) = std::fs::File::open(dir) {
        // Some file systems cannot sync a directory (tmpfs, some FUSE); the rename stands.
        let _ = dir.sync_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    proptest::proptest! {
        /// Listing by stepping over subtrees finds exactly what filtering every path finds.
        #[test]
        fn children_are_the_paths_one_level_below(
            paths in proptest::collection::btree_set("[ab0./-]{1,3}(/[ab0./-]{1,3}){0,3}", 0..60),
            dir_index in 0usize..64,
        ) {
            let entries: BTreeMap<String, u64> = paths
                .iter()
                .enumerate()
                .map(|(i, p)| (p.clone(), i as u64))
                .collect();
            let dirs: Vec<&str> = std::iter::once("").chain(paths.iter().map(String::as_str)).collect();
            let dir = dirs[dir_index % dirs.len()];
            let prefix = if dir.is_empty() { String::new() } else { format!("{dir}/") };
            let mut naive: Vec<(u64, String)> = entries
                .iter()
                .filter_map(|(p, id)| {
                    let rest = p.strip_prefix(&prefix)?;
                    (!rest.contains('/') && id % 5 != 0).then(|| (*id, rest.to_string()))
                })
                .collect();
            naive.sort_unstable();
            let listed = children_in(&entries, dir, |id| (id % 5 != 0).then_some(*id));
            proptest::prop_assert_eq!(listed, naive);
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gvfs-store-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// `to` pulls `from`'s changes, fetching content from `from`'s directory.
    fn pull_from(to: &mut ZoneStore, from: &ZoneStore) {
        for (path, theirs) in from.changes_since(to.seen(from.node)) {
            let decision = decide(to.entry(&path), &theirs);
            let fetched = (!theirs.deleted && theirs.kind == Kind::File).then(|| {
                let tmp = to.temp_file();
                std::fs::copy(from.disk_path(&path).unwrap(), &tmp).unwrap();
                tmp
            });
            to.apply(&path, &theirs, &decision, fetched.as_deref())
                .unwrap();
        }
        to.set_seen(from.node, from.version()).unwrap();
    }

    fn entry(vv: &[(u64, u64)], writer: u64, written_ms: u64, deleted: bool) -> Entry {
        let content = Change {
            node: writer,
            counter: vv.iter().find(|(n, _)| *n == writer).map_or(0, |(_, c)| *c),
        };
        Entry {
            id: 9,
            kind: Kind::File,
            vv: VersionVector(vv.iter().copied().collect()),
            deleted,
            changed_at: 1,
            size: 1,
            mtime_ns: 0,
            content,
            written_ms,
            placements: placed_by(deleted, content),
            displaced: VersionVector::default(),
            mode: 0o644,
        }
    }

    #[test]
    fn decisions() {
        let base = entry(&[(1, 1)], 1, 10, false);
        let newer = entry(&[(1, 1), (2, 1)], 2, 20, false);
        let rival = entry(&[(1, 2)], 1, 30, false);
        assert_eq!(decide(None, &base), Decision::Take);
        assert_eq!(decide(Some(&base), &base), Decision::Skip);
        assert_eq!(decide(Some(&newer), &base), Decision::Skip);
        assert_eq!(decide(Some(&base), &newer), Decision::Take);
        // Concurrent: the later write wins on both sides.
        assert_eq!(decide(Some(&newer), &rival), Decision::TakeTheirsCopyOurs);
        assert_eq!(decide(Some(&rival), &newer), Decision::KeepOursCopyTheirs);
        // Content beats a concurrent deletion.
        let deleted = entry(&[(1, 2)], 1, 40, true);
        assert_eq!(decide(Some(&newer), &deleted), Decision::MergeOnly);
        assert_eq!(decide(Some(&deleted), &newer), Decision::Take);
    }

    #[test]
    fn conflict_names_keep_the_extension() {
        assert_eq!(
            conflict_path(
                "a/b/report.txt",
                Change {
                    node: 0xab,
                    counter: 5
                }
            ),
            "a/b/report.conflict-00000000000000ab-5.txt"
        );
        assert_eq!(
            conflict_path(
                "README",
                Change {
                    node: 1,
                    counter: 2
                }
            ),
            "README.conflict-0000000000000001-2"
        );
        assert_eq!(
            conflict_path(
                ".hidden",
                Change {
                    node: 1,
                    counter: 2
                }
            ),
            ".hidden.conflict-0000000000000001-2"
        );
    }

    #[test]
    fn a_file_being_written_is_withheld_from_peers_until_it_settles() {
        let dir = scratch("withheld");
        let (root, meta) = (dir.join("data"), dir.join("meta"));
        let mut store = ZoneStore::open(7, &root, &meta).unwrap();
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("copy.bin"), b"").unwrap();
        assert!(
            store.check("copy.bin"),
            "the create is recorded (NFS shows it)"
        );
        let now = Instant::now();
        std::fs::write(root.join("copy.bin"), vec![1u8; 4096]).unwrap();
        store.note_write("copy.bin", 4096, (false, true), now);
        assert!(
            store.changes_since(0).is_empty(),
            "a peer pulling now gets nothing of it, not the empty create"
        );
        let offered_before = store.version();
        // Uncommitted UNSTABLE writes wait for the writer's COMMIT, not for a pause.
        let debounce = Duration::from_millis(100);
        assert!(!store
            .settle(now + Duration::from_secs(5), debounce)
            .unwrap());
        store.note_commit("copy.bin");
        assert!(store
            .settle(now + Duration::from_millis(200), debounce)
            .unwrap());
        let offered = store.changes_since(offered_before);
        assert_eq!(offered.len(), 1);
        assert_eq!(offered[0].1.size, 4096, "the whole file");
        // Settled without a difference (rewritten with the same bytes and times): still
        // offered again, for peers that pulled while it was withheld.
        let seen = store.version();
        store.note_write("copy.bin", 4096, (false, false), now);
        assert!(store
            .settle(now + Duration::from_secs(1), debounce)
            .unwrap());
        assert_eq!(store.changes_since(seen).len(), 1);
        // Never committed: published after UNCOMMITTED_QUIET all the same.
        store.note_write("copy.bin", 4096, (false, true), now);
        assert!(!store
            .settle(now + Duration::from_secs(29), debounce)
            .unwrap());
        assert!(store.settle(now + UNCOMMITTED_QUIET, debounce).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn local_changes_bump_versions_and_survive_reopening() {
        let dir = scratch("local");
        let (root, meta) = (dir.join("data"), dir.join("meta"));
        let mut store = ZoneStore::open(7, &root, &meta).unwrap();
        assert_eq!(store.version(), 0);
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join("d/f"), b"hello").unwrap();
        assert_eq!(store.scan().unwrap(), 2);
        let id = store.entry("d/f").unwrap().id;
        assert_eq!(store.version(), 2);
        assert_eq!(store.scan().unwrap(), 0, "nothing new");
        std::fs::write(root.join("d/f"), b"hello, world").unwrap();
        assert!(store.check("d/f"));
        // A node's counter for a path is the zone version of its latest change there.
        assert_eq!(store.version(), 3);
        assert_eq!(store.entry("d/f").unwrap().vv.0.get(&7), Some(&3));
        std::fs::remove_file(root.join("d/f")).unwrap();
        assert!(store.check("d/f"));
        assert!(store.entry("d/f").unwrap().deleted);
        store.save().unwrap();
        let reopened = ZoneStore::open(7, &root, &meta).unwrap();
        assert_eq!(reopened.entry("d/f").unwrap().id, id, "ids are stable");
        assert_eq!(reopened.version(), store.version());
        assert_eq!(reopened.changes_since(0)[0].0, "d", "directories first");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn recording_one_change_in_a_large_zone_appends_a_small_record() {
        let dir = scratch("journal");
        let (root, meta) = (dir.join("data"), dir.join("meta"));
        std::fs::create_dir_all(&root).unwrap();
        for i in 0..2_000 {
            std::fs::write(root.join(format!("file-{i:04}.txt")), b"x").unwrap();
        }
        let mut store = ZoneStore::open(7, &root, &meta).unwrap();
        assert_eq!(
            store.index_saves(),
            (0, 1),
            "the first scan writes the whole index"
        );
        let base_len = std::fs::metadata(meta.join(INDEX_FILE)).unwrap().len();
        let log_path = meta.join(INDEX_FILE).with_extension("log");
        let log_before = std::fs::metadata(&log_path).unwrap().len();

        std::fs::write(root.join("file-0042.txt"), b"changed").unwrap();
        assert!(store.check("file-0042.txt"));
        store.save().unwrap();

        assert_eq!(store.index_saves(), (1, 1));
        let record = std::fs::metadata(&log_path).unwrap().len() - log_before;
        assert!(
            record * 100 < base_len,
            "a {record} B record against a {base_len} B index"
        );
        let changed = store.entry("file-0042.txt").unwrap().clone();
        let reopened = ZoneStore::open(7, &root, &meta).unwrap();
        assert_eq!(reopened.version(), store.version());
        assert_eq!(reopened.entry("file-0042.txt"), Some(&changed));
        assert_eq!(reopened.changes_since(0), store.changes_since(0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_index_of_an_earlier_release_is_taken_over_without_a_change() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        for (file, mode) in [("index.bin", None), ("index.v2.bin", Some(0o640))] {
            let dir = scratch("legacy");
            let (root, meta) = (dir.join("data"), dir.join("meta"));
            std::fs::create_dir_all(&root).unwrap();
            std::fs::create_dir_all(&meta).unwrap();
            std::fs::write(root.join("f"), b"old").unwrap();
            std::fs::set_permissions(root.join("f"), std::fs::Permissions::from_mode(0o640))
                .unwrap();
            let on_disk = std::fs::metadata(root.join("f")).unwrap();
            let mtime =
                i128::from(on_disk.mtime()) * 1_000_000_000 + i128::from(on_disk.mtime_nsec());
            std::fs::write(meta.join(file), legacy::one_file("f", 3, mtime, mode)).unwrap();
            let mut store = ZoneStore::open(7, &root, &meta).unwrap();
            assert_eq!(store.version(), 1, "{file}");
            let entry = store.entry("f").unwrap();
            assert_eq!(entry.id, 2, "ids survive the migration");
            let written = Change {
                node: 7,
                counter: 1,
            };
            assert_eq!(
                (entry.content, entry.placements.clone()),
                (written, placed_by(false, written)),
                "{file}"
            );
            assert_eq!(
                store.scan().unwrap(),
                0,
                "{file}: an unknown mode is learnt, not a change"
            );
            assert_eq!(store.entry("f").unwrap().mode, 0o640);
            assert!(meta.join(INDEX_FILE).exists());
            assert!(!meta.join(file).exists(), "{file} is replaced");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    #[test]
    fn a_journaled_index_of_version_3_is_replayed_and_taken_over() {
        let dir = scratch("legacy-v3");
        let (root, meta) = (dir.join("data"), dir.join("meta"));
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::create_dir_all(&meta).unwrap();
        let made = Change {
            node: 7,
            counter: 2,
        };
        let v3_entry = |id, kind, deleted, placed| legacy::EntryV3 {
            id,
            kind,
            vv: VersionVector([(7, 2)].into_iter().collect()),
            deleted,
            changed_at: 2,
            size: 0,
            mtime_ns: 0,
            content: placed,
            written_ms: 1,
            placed,
            displaced: VersionVector::default(),
            mode: 0o755,
        };
        let base_path = meta.join(LEGACY_JOURNALED_INDEX_FILE);
        let (mut journal, _) = Journal::open::<Index<legacy::EntryV3>>(&base_path).unwrap();
        let mut index = Index::<legacy::EntryV3> {
            next_id: 4,
            version: 2,
            ..Index::default()
        };
        index
            .entries
            .insert("d".into(), v3_entry(2, Kind::Dir, false, made));
        journal.save(&mut index).unwrap();
        // The tombstone reaches only the log: migrating must replay it.
        index
            .entries
            .insert("gone".into(), v3_entry(3, Kind::File, true, made));
        journal.save(&mut index).unwrap();
        let log_path = journal.log_path().to_path_buf();
        assert!(log_path.exists());

        let store = ZoneStore::open(7, &root, &meta).unwrap();
        let d = store.entry("d").unwrap();
        assert_eq!((d.id, d.kind, d.deleted), (2, Kind::Dir, false));
        assert_eq!(d.placements, placed_by(false, made));
        let gone = store
            .entry("gone")
            .expect("the logged tombstone is replayed");
        assert!(gone.deleted && gone.placements.0.is_empty());
        assert!(meta.join(INDEX_FILE).exists());
        assert!(
            !base_path.exists() && !log_path.exists(),
            "version 3 files go"
        );
        drop(store);
        // And the migrated index reads back as it was written.
        let reopened = ZoneStore::open(7, &root, &meta).unwrap();
        assert_eq!(
            reopened.entry("d").unwrap().placements,
            placed_by(false, made)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn dir_entry(vv: &[(u64, u64)], placements: &[(u64, u64)], deleted: bool) -> Entry {
        Entry {
            kind: Kind::Dir,
            placements: VersionVector(placements.iter().copied().collect()),
            ..entry(vv, 1, 1, deleted)
        }
    }

    #[test]
    fn a_directory_goes_with_a_deletion_that_saw_every_mkdir_of_it() {
        // Made on nodes 1 and 2 concurrently, merged on a third member.
        let both = dir_entry(&[(1, 1), (2, 1)], &[(1, 1), (2, 1)], false);
        // Removed by node 2 having seen only its own mkdir: node 1's stands.
        let saw_one = dir_entry(&[(2, 2)], &[], true);
        assert_eq!(decide(Some(&both), &saw_one), Decision::MergeOnly);
        assert_eq!(decide(Some(&saw_one), &both), Decision::Take);
        // Removed by a member that saw both, with another deletion merged into the directory:
        // the deletion wins although the vectors are concurrent.
        let saw_both = dir_entry(&[(1, 1), (2, 1), (3, 5)], &[], true);
        let with_other_deletion = dir_entry(&[(1, 1), (2, 1), (4, 9)], &[(1, 1), (2, 1)], false);
        assert_eq!(
            decide(Some(&with_other_deletion), &saw_both),
            Decision::Take
        );
        assert_eq!(
            decide(Some(&saw_both), &with_other_deletion),
            Decision::MergeOnly
        );
        // A deletion that saw what survived a first deletion wins too.
        assert_eq!(
            unseen_placements(&both.placements, &saw_one.vv),
            VersionVector([(1, 1)].into_iter().collect())
        );
    }

    proptest::proptest! {
        /// Merging two members' placements gives the same whichever merges first: members that
        /// merged the same versions in another order hold the same placements.
        #[test]
        fn merging_placements_does_not_depend_on_the_order(
            a in proptest::collection::btree_map(1u64..4, 1u64..6, 0..3),
            b in proptest::collection::btree_map(1u64..4, 1u64..6, 0..3),
            c in proptest::collection::btree_map(1u64..4, 1u64..6, 0..3),
            extra in proptest::collection::btree_map(1u64..5, 1u64..8, 0..3),
        ) {
            // Each version's vector holds its placements and maybe more (deletions merged in).
            let version = |p: &BTreeMap<u64, u64>| {
                let placements = VersionVector(p.clone());
                let mut vv = placements.clone();
                vv.merge(&VersionVector(extra.clone()));
                (placements, vv)
            };
            let (a, b, c) = (version(&a), version(&b), version(&c));
            let merge = |x: &(VersionVector, VersionVector), y: &(VersionVector, VersionVector)| {
                let mut vv = x.1.clone();
                vv.merge(&y.1);
                (merge_placements((&x.0, &x.1), (&y.0, &y.1)), vv)
            };
            proptest::prop_assert_eq!(merge(&a, &b), merge(&b, &a));
            proptest::prop_assert_eq!(merge(&merge(&a, &b), &c), merge(&a, &merge(&b, &c)));
            proptest::prop_assert_eq!(merge(&a, &a), a.clone());
        }
    }

    #[test]
    fn a_same_size_rewrite_within_one_timestamp_tick_is_a_change() {
        let dir = scratch("racy");
        let (root, meta) = (dir.join("data"), dir.join("meta"));
        let mut store = ZoneStore::open(3, &root, &meta).unwrap();
        let file = root.join("f");
        std::fs::write(&file, b"first").unwrap();
        assert_eq!(store.scan().unwrap(), 1);
        let recorded = store.entry("f").unwrap().clone();
        // Rewritten in place, same size, and within the tick the scan saw: the timestamp is
        // the one recorded (set back here, which a coarse clock does by itself).
        std::fs::write(&file, b"other").unwrap();
        let at = SystemTime::UNIX_EPOCH
            + Duration::from_nanos(u64::try_from(recorded.mtime_ns).unwrap());
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_modified(at))
            .unwrap();
        assert_eq!(store.scan().unwrap(), 1, "the rewrite is found");
        let after = store.entry("f").unwrap();
        assert_eq!(
            (after.size, after.mtime_ns),
            (recorded.size, recorded.mtime_ns)
        );
        assert_ne!(after.content, recorded.content, "a new version");
        // Unchanged since: no change, however often it is scanned.
        assert_eq!(store.scan().unwrap(), 0);
        assert_eq!(store.scan().unwrap(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A store of node 3 that recorded `f.txt` (`recorded` in it), and a version of it by node
    /// 4 that follows ours (a deletion when `deleted`).
    fn recorded_file_and_a_following_version(
        tag: &str,
        recorded: &[u8],
        deleted: bool,
    ) -> (PathBuf, PathBuf, ZoneStore, Entry, Entry) {
        let dir = scratch(tag);
        let (root, meta) = (dir.join("data"), dir.join("meta"));
        let mut store = ZoneStore::open(3, &root, &meta).unwrap();
        std::fs::write(root.join("f.txt"), recorded).unwrap();
        assert_eq!(store.scan().unwrap(), 1);
        let ours = store.entry("f.txt").unwrap().clone();
        let mut theirs = ours.clone();
        theirs.vv.record(4, 1);
        theirs.content = Change {
            node: 4,
            counter: 1,
        };
        theirs.deleted = deleted;
        theirs.placements = placed_by(deleted, theirs.content);
        (dir, root, store, ours, theirs)
    }

    /// Applies `theirs` over `f.txt` as a pull that fetched `bytes` would; returns the
    /// temporary file the bytes were fetched into.
    fn take_fetched(store: &mut ZoneStore, theirs: &Entry, bytes: &[u8]) -> PathBuf {
        let fetched = store.temp_file();
        std::fs::write(&fetched, bytes).unwrap();
        store
            .apply("f.txt", theirs, &Decision::Take, Some(&fetched))
            .unwrap();
        fetched
    }

    #[test]
    fn a_pulled_version_with_the_recorded_size_and_time_is_not_taken_for_a_rewrite() {
        // A peer's version that follows ours, written in the same tick: same size and time.
        let (dir, root, mut store, ours, theirs) =
            recorded_file_and_a_following_version("racy-pull", b"from a", false);
        take_fetched(&mut store, &theirs, b"from b");
        assert_eq!(std::fs::read(root.join("f.txt")).unwrap(), b"from b");
        assert_eq!(store.entry("f.txt").unwrap().mtime_ns, ours.mtime_ns);
        assert_eq!(
            store.scan().unwrap(),
            0,
            "the pulled version is not a local change"
        );
        assert_eq!(store.entry("f.txt").unwrap().content, theirs.content);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A pull replaces (or deletes) a file that a program rewrote directly on disk after the
    /// pull's last look: the rewrite is kept as a conflict copy, recorded as this node's change.
    #[test]
    fn a_direct_write_racing_a_pull_is_kept_as_a_conflict_copy() {
        for deletion in [false, true] {
            let (dir, root, mut store, _, theirs) = recorded_file_and_a_following_version(
                &format!("race-{deletion}"),
                b"recorded",
                deletion,
            );
            let fetched = (!deletion).then(|| {
                let tmp = store.temp_file();
                std::fs::write(&tmp, b"from the peer").unwrap();
                tmp
            });
            // Written directly after the pull decided, before it installs.
            std::fs::write(root.join("f.txt"), b"written directly, late").unwrap();
            store
                .apply("f.txt", &theirs, &Decision::Take, fetched.as_deref())
                .unwrap();
            let f = std::fs::read(root.join("f.txt")).ok();
            let expected: Option<&[u8]> = (!deletion).then_some(b"from the peer");
            assert_eq!(f.as_deref(), expected, "deletion {deletion}");
            let copies: Vec<String> = store
                .changes_since(0)
                .into_iter()
                .filter(|(p, e)| p.contains(".conflict-") && !e.deleted)
                .map(|(p, _)| p)
                .collect();
            assert_eq!(copies.len(), 1, "deletion {deletion}: {copies:?}");
            assert_eq!(
                std::fs::read(root.join(&copies[0])).unwrap(),
                b"written directly, late"
            );
            let copy = store.entry(&copies[0]).unwrap();
            assert_eq!(copy.content.node, 3, "this node's change");
            assert_eq!(
                store.scan().unwrap(),
                0,
                "deletion {deletion}: all recorded"
            );
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// A program opened a file for writing, has not written yet, and a pull replaces (or
    /// deletes) the file: what it writes afterwards through its descriptor is kept, in a
    /// conflict copy that scans follow, instead of going to a file unlinked under it.
    #[test]
    fn writes_through_a_descriptor_opened_before_a_pull_are_kept() {
        use std::io::Write;
        for deletion in [false, true] {
            let (dir, root, mut store, _, theirs) = recorded_file_and_a_following_version(
                &format!("open-writer-{deletion}"),
                b"recorded",
                deletion,
            );
            let mut writer = std::fs::File::options()
                .append(true)
                .open(root.join("f.txt"))
                .unwrap();
            let fetched = (!deletion).then(|| {
                let tmp = store.temp_file();
                std::fs::write(&tmp, b"from the peer").unwrap();
                tmp
            });
            store
                .apply("f.txt", &theirs, &Decision::Take, fetched.as_deref())
                .unwrap();
            writer.write_all(b", then appended").unwrap();
            drop(writer);
            let f = std::fs::read(root.join("f.txt")).ok();
            let expected: Option<&[u8]> = (!deletion).then_some(b"from the peer");
            assert_eq!(f.as_deref(), expected, "deletion {deletion}");
            assert_eq!(store.scan().unwrap(), 1, "deletion {deletion}: the append");
            let copies: Vec<(String, Entry)> = store
                .changes_since(0)
                .into_iter()
                .filter(|(p, e)| p.contains(".conflict-") && !e.deleted)
                .collect();
            assert_eq!(copies.len(), 1, "deletion {deletion}: {copies:?}");
            let (copy, entry) = &copies[0];
            assert_eq!(
                std::fs::read(root.join(copy)).unwrap(),
                b"recorded, then appended"
            );
            assert_eq!(entry.size, 23, "the index follows the append");
            let _ = std::fs::remove_dir_all(&dir);
        }
    }

    /// A file nobody holds open is still simply replaced: no conflict copy.
    #[test]
    fn a_file_closed_before_a_pull_leaves_no_copy() {
        let (dir, root, mut store, _, theirs) =
            recorded_file_and_a_following_version("closed-writer", b"recorded", false);
        drop(
            std::fs::File::options()
                .append(true)
                .open(root.join("f.txt"))
                .unwrap(),
        );
        assert!(!held_open_for_writing(&root.join("f.txt")));
        take_fetched(&mut store, &theirs, b"from the peer");
        assert!(store
            .changes_since(0)
            .iter()
            .all(|(p, _)| !p.contains(".conflict-")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// gvd's state directory (where pulls fetch into) on another file system than the zone:
    /// pulled files, deletions and kept direct writes still reach the zone (a rename cannot
    /// cross file systems).
    #[test]
    fn pulls_reach_a_zone_on_another_file_system_than_the_state_directory() {
        use std::os::unix::fs::MetadataExt;
        let shm = Path::new("/dev/shm");
        let dir = scratch("xdev");
        let (root, meta) = (
            shm.join(format!("gvfs-store-xdev-{}", std::process::id())),
            dir.join("meta"),
        );
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&meta).unwrap();
        assert_ne!(
            std::fs::metadata(&root).unwrap().dev(),
            std::fs::metadata(&meta).unwrap().dev(),
            "/dev/shm (tmpfs) and the temporary directory must be two file systems for this test"
        );
        let mut store = ZoneStore::open(3, &root, &meta).unwrap();
        std::fs::write(root.join("f.txt"), b"recorded").unwrap();
        assert_eq!(store.scan().unwrap(), 1);
        let mut theirs = store.entry("f.txt").unwrap().clone();
        theirs.vv.record(4, 1);
        theirs.content = Change {
            node: 4,
            counter: 1,
        };
        theirs.placements = placed_by(false, theirs.content);
        std::fs::write(root.join("f.txt"), b"written directly, late").unwrap();
        take_fetched(&mut store, &theirs, b"from the peer");
        assert_eq!(std::fs::read(root.join("f.txt")).unwrap(), b"from the peer");
        let mut deletion = store.entry("f.txt").unwrap().clone();
        deletion.vv.record(4, 2);
        deletion.deleted = true;
        deletion.placements = VersionVector::default();
        store
            .apply("f.txt", &deletion, &Decision::Take, None)
            .unwrap();
        let mut names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names.len(), 1, "only the kept direct write: {names:?}");
        assert!(names[0].starts_with("f.conflict-0000000000000003-"));
        assert_eq!(
            std::fs::read(root.join(&names[0])).unwrap(),
            b"written directly, late"
        );
        assert_eq!(store.scan().unwrap(), 0);
        let _ = std::fs::remove_dir_all(&root);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// What a crash leaves of a pull in the zone directory is not taken for zone content; a
    /// file whose name is as long as names go is still replaced and deleted by pulls.
    #[test]
    fn pull_temporaries_are_not_content_and_long_names_still_replicate() {
        assert!(is_pull_temp(".gvfs-123-4.part"));
        for name in [
            ".gvfs--4.part",
            ".gvfs-1-.part",
            ".gvfs-1-2.txt",
            "gvfs-1-2.part",
            ".gvfs-a-2.part",
        ] {
            assert!(!is_pull_temp(name), "{name}");
        }
        let dir = scratch("temps");
        let (root, meta) = (dir.join("data"), dir.join("meta"));
        let mut store = ZoneStore::open(3, &root, &meta).unwrap();
        std::fs::create_dir_all(root.join("d")).unwrap();
        std::fs::write(root.join(".gvfs-77-1.part"), b"half a pulled file").unwrap();
        std::fs::write(root.join("d/.gvfs-77-2.part"), b"a replaced file").unwrap();
        let long = "n".repeat(255);
        std::fs::write(root.join(&long), b"long").unwrap();
        assert_eq!(store.scan().unwrap(), 2, "d and the long name only");
        assert!(store.entry(".gvfs-77-1.part").is_none());
        assert!(store.entry("d/.gvfs-77-2.part").is_none());
        let mut deletion = store.entry(&long).unwrap().clone();
        deletion.vv.record(4, 1);
        deletion.deleted = true;
        deletion.placements = VersionVector::default();
        store
            .apply(&long, &deletion, &Decision::Take, None)
            .unwrap();
        assert!(!root.join(&long).exists());
        assert_eq!(store.scan().unwrap(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The same replacement with nothing written meanwhile leaves no copy behind.
    #[test]
    fn a_pull_over_an_unchanged_file_leaves_no_copy() {
        let (dir, root, mut store, _, theirs) =
            recorded_file_and_a_following_version("race-none", b"recorded", false);
        let tmp = take_fetched(&mut store, &theirs, b"from the peer");
        assert_eq!(std::fs::read(root.join("f.txt")).unwrap(), b"from the peer");
        let names: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["f.txt"]);
        assert!(!tmp.exists(), "the replaced file is gone");
        assert_eq!(store.scan().unwrap(), 0);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn mode_and_mtime_replicate_and_a_chmod_is_a_change() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let dir = scratch("mode");
        let mut a = ZoneStore::open(1, &dir.join("a"), &dir.join("ma")).unwrap();
        let mut b = ZoneStore::open(2, &dir.join("b"), &dir.join("mb")).unwrap();
        let file = dir.join("a/script.sh");
        std::fs::write(&file, b"#!/bin/sh").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o750)).unwrap();
        let old = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_times(std::fs::FileTimes::new().set_modified(old))
            .unwrap();
        std::fs::create_dir(dir.join("a/private")).unwrap();
        std::fs::set_permissions(
            dir.join("a/private"),
            std::fs::Permissions::from_mode(0o700),
        )
        .unwrap();
        assert_eq!(a.scan().unwrap(), 2);
        let pull = pull_from;
        pull(&mut b, &a);
        let copy = std::fs::metadata(dir.join("b/script.sh")).unwrap();
        assert_eq!(copy.mode() & 0o7777, 0o750);
        assert_eq!(copy.mtime(), 1_700_000_000);
        let private = std::fs::metadata(dir.join("b/private")).unwrap();
        assert_eq!(private.mode() & 0o7777, 0o700);
        assert_eq!(
            b.scan().unwrap(),
            0,
            "what was installed is not a local change"
        );
        // A chmod alone is a change, and it replicates.
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(a.check("script.sh"));
        pull(&mut b, &a);
        let copy = std::fs::metadata(dir.join("b/script.sh")).unwrap();
        assert_eq!(copy.mode() & 0o7777, 0o755);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn two_replicas_converge_after_a_conflict() {
        let dir = scratch("conflict");
        let mut a = ZoneStore::open(1, &dir.join("a"), &dir.join("ma")).unwrap();
        let mut b = ZoneStore::open(2, &dir.join("b"), &dir.join("mb")).unwrap();
        std::fs::write(dir.join("a/f.txt"), b"from a").unwrap();
        a.scan().unwrap();
        std::thread::sleep(Duration::from_millis(5));
        std::fs::write(dir.join("b/f.txt"), b"from b, later").unwrap();
        b.scan().unwrap();
        // Each pulls the other's changes, fetching content from the other's directory.
        let exchange = pull_from;
        exchange(&mut a, &b);
        exchange(&mut b, &a);
        exchange(&mut a, &b);
        for (store, dir) in [(&a, dir.join("a")), (&b, dir.join("b"))] {
            assert_eq!(std::fs::read(dir.join("f.txt")).unwrap(), b"from b, later");
            let copies: Vec<_> = std::fs::read_dir(&dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".conflict-"))
                .collect();
            assert_eq!(copies.len(), 1, "{copies:?}");
            assert_eq!(std::fs::read(dir.join(&copies[0])).unwrap(), b"from a");
            // The winner's changes only: the loser's live on in its copy (a later deletion of
            // the winner must not meet them at the path).
            assert_eq!(
                store
                    .entry("f.txt")
                    .unwrap()
                    .vv
                    .0
                    .keys()
                    .collect::<Vec<_>>(),
                [&2],
                "not merged"
            );
        }
        // Detected (and announced) once, by whoever pulled the concurrent change first.
        assert_eq!(a.conflicts() + b.conflicts(), 1);
        assert_eq!(a.changes_since(a.version() - 1).len(), 1);
        let (va, vb) = (a.version(), b.version());
        exchange(&mut b, &a);
        exchange(&mut a, &b);
        assert_eq!(
            a.changes_since(va).len() + b.changes_since(vb).len(),
            0,
            "quiet once converged"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
