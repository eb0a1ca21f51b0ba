//! File attributes kept between NFS calls, so that a READDIRPLUS of a directory that has not
//! changed answers from memory instead of one `fstatat` per entry (nfs-ganesha keeps such a
//! cache too; it is what made its listings 2× faster than ours).
//!
//! An entry is good only while nothing changed since it was read: it carries a [`Stamp`] taken
//! *before* the disk was looked at, made of the zone index's version (bumped after every change
//! a pull or a scan puts on disk) and a count of changes made through NFS (bumped after each
//! one, by a [`ChangeGuard`]). Any change after the stamp was taken, even one that raced the
//! `stat`, makes the stamp old. What neither counts (a file written straight into the zone
//! directory, before the next scan notices it) is served at most [`ATTRIBUTE_TTL`] old, less
//! than the 3 s an NFS client itself keeps attributes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nfsserve::nfs::{fattr3, fileid3};
use parking_lot::Mutex;

/// How long attributes are served without a new `stat`, when nothing counted changed.
pub const ATTRIBUTE_TTL: Duration = Duration::from_secs(1);

/// Entries kept at most; past it the cache starts over (it only ever saves a `stat`).
const MAX_ENTRIES: usize = 1 << 16;

/// What had changed when attributes were read: the index version and the NFS changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    index_version: u64,
    nfs_changes: u64,
}

impl Stamp {
    /// Both counters only grow, so a stamp with either one behind is older.
    fn is_older_than(self, other: Stamp) -> bool {
        self.index_version < other.index_version || self.nfs_changes < other.nfs_changes
    }
}

struct Cached {
    filled_at: Instant,
    attr: fattr3,
}

struct Entries {
    /// The stamp every entry was read under; entries of an older stamp are dropped at once.
    stamp: Stamp,
    by_id: HashMap<fileid3, Cached>,
}

/// Attributes by file id, good for one [`Stamp`] and at most a TTL.
pub struct AttrCache {
    nfs_changes: AtomicU64,
    ttl: Duration,
    entries: Mutex<Entries>,
}

impl AttrCache {
    pub fn new(ttl: Duration) -> Self {
        AttrCache {
            nfs_changes: AtomicU64::new(0),
            ttl,
            entries: Mutex::new(Entries {
                stamp: Stamp {
                    index_version: 0,
                    nfs_changes: 0,
                },
                by_id: HashMap::new(),
            }),
        }
    }

    /// The stamp to read attributes under: take it before looking at the disk.
    pub fn stamp(&self, index_version: u64) -> Stamp {
        Stamp {
            index_version,
            nfs_changes: self.nfs_changes.load(Ordering::Acquire),
        }
    }

    /// The attributes of `id`, if read under `stamp` less than a TTL before `now`.
    pub fn get(&self, id: fileid3, stamp: Stamp, now: Instant) -> Option<fattr3> {
        let entries = self.entries.lock();
        if entries.stamp != stamp {
            return None;
        }
        entries
            .by_id
            .get(&id)
            .filter(|cached| now.saturating_duration_since(cached.filled_at) < self.ttl)
            .map(|cached| cached.attr)
    }

    /// Keeps `attr`, read under `stamp` at `now`, unless something changed since.
    pub fn put(&self, id: fileid3, stamp: Stamp, now: Instant, attr: fattr3) {
        let mut entries = self.entries.lock();
        let changed_since = stamp.nfs_changes < self.nfs_changes.load(Ordering::Acquire);
        if changed_since || stamp.is_older_than(entries.stamp) {
            return;
        }
        if entries.stamp != stamp || entries.by_id.len() >= MAX_ENTRIES {
            entries.stamp = stamp;
            entries.by_id.clear();
        }
        entries.by_id.insert(
            id,
            Cached {
                filled_at: now,
                attr,
            },
        );
    }

    /// Counts a change through NFS when dropped: hold it over the whole change, so that the
    /// count moves only once the disk holds the result (also when the change fails half-way).
    pub fn change(&self) -> ChangeGuard<'_> {
        ChangeGuard { cache: self }
    }
}

/// See [`AttrCache::change`].
pub struct ChangeGuard<'a> {
    cache: &'a AttrCache,
}

impl Drop for ChangeGuard<'_> {
    fn drop(&mut self) {
        self.cache.nfs_changes.fetch_add(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nfsserve::nfs::{ftype3, nfstime3, specdata3};

    fn attr(size: u64) -> fattr3 {
        fattr3 {
            ftype: ftype3::NF3REG,
            mode: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            size,
            used: size,
            rdev: specdata3::default(),
            fsid: 0,
            fileid: 7,
            atime: nfstime3::default(),
            mtime: nfstime3::default(),
            ctime: nfstime3::default(),
        }
    }

    #[test]
    fn attributes_are_served_while_nothing_changed_and_for_one_ttl_at_most() {
        let cache = AttrCache::new(Duration::from_secs(1));
        let t0 = Instant::now();
        let stamp = cache.stamp(5);
        assert!(cache.get(7, stamp, t0).is_none());
        cache.put(7, stamp, t0, attr(10));
        assert_eq!(cache.get(7, cache.stamp(5), t0).unwrap().size, 10);
        assert!(cache.get(8, cache.stamp(5), t0).is_none());
        // Past the TTL (changes nothing counted: a write straight into the directory).
        assert!(cache.get(7, stamp, t0 + Duration::from_secs(1)).is_none());
        // A pull or a scan changed the index.
        assert!(cache.get(7, cache.stamp(6), t0).is_none());
        // A change through NFS, once it is over.
        let stamp = cache.stamp(6);
        cache.put(7, stamp, t0, attr(20));
        {
            let _change = cache.change();
            assert_eq!(cache.get(7, cache.stamp(6), t0).unwrap().size, 20);
        }
        assert!(cache.get(7, cache.stamp(6), t0).is_none());
    }

    #[test]
    fn attributes_read_before_a_change_are_never_kept_after_it() {
        let cache = AttrCache::new(Duration::from_secs(1));
        let t0 = Instant::now();
        // Stamp taken, then a change finished, then the (old) attributes arrive.
        let before = cache.stamp(3);
        drop(cache.change());
        cache.put(7, before, t0, attr(1));
        assert!(cache.get(7, cache.stamp(3), t0).is_none());
        // Same with the index: a reader of version 3 after a reader of version 4.
        let newer = cache.stamp(4);
        cache.put(8, newer, t0, attr(2));
        cache.put(9, cache.stamp(3), t0, attr(3));
        assert!(cache.get(9, cache.stamp(3), t0).is_none());
        assert_eq!(cache.get(8, newer, t0).unwrap().size, 2);
    }
}
