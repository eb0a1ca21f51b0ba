//! The NFSv3 front of a zone ([`nfsserve`]): every operation goes to the zone's directory and
//! tells the [`ZoneStore`] what it touched. WRITEs are synced before they are answered (the
//! server answers them `FILE_SYNC`), file handles carry stable ids (valid across restarts), the
//! quota is enforced (`NFS3ERR_DQUOT`), and paths a pull is about to replace answer
//! `NFS3ERR_JUKEBOX` ("try again").
//!
//! Its length (over 600 lines) is ~170 lines of unit tests kept beside the NFS handlers they test.

use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use nfsserve::fs_util::{metadata_to_fattr3, path_setattr};
use nfsserve::nfs::{
    fattr3, fileid3, filename3, ftype3, nfs_fh3, nfspath3, nfsstat3, nfstime3, sattr3, set_size3,
    specdata3,
};
use nfsserve::vfs::{DirEntry, NFSFileSystem, ReadDirResult, VFSCapabilities};
use parking_lot::Mutex;

use crate::attr_cache::{AttrCache, Stamp, ATTRIBUTE_TTL};
use crate::store::{ZoneStore, ROOT_ID};

/// The largest READ answered (nfsserve's `rtmax`); a client asking for more gets this much.
const MAX_READ_BYTES: u32 = 1 << 20;

/// Directory pages up to this many entries are stat'ed on the runtime's thread (see `readdir`).
const INLINE_LISTING_ENTRIES: usize = 64;

/// A zone served over NFS.
pub struct ZoneFs {
    store: Arc<Mutex<ZoneStore>>,
    quota_bytes: u64,
    /// First half of every file handle: tells this zone's handles from others'.
    tag: u64,
    read_only: bool,
    /// The WRITE/COMMIT verifier: new at every start, so that clients send again what they
    /// wrote UNSTABLE and had not committed when the server stopped. (File handles, unlike it,
    /// stay valid across restarts.)
    write_verifier: [u8; 8],
    attrs: AttrCache,
}

/// Runs an NFS handler's file-system work (reads, fsyncs, renames, directory listings): on a
/// multi-thread runtime the worker first hands its other tasks to another thread, so that one
/// slow disk call does not stall every other client and the zone's replication behind it.
fn blocking<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(runtime) if runtime.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        // A current-thread runtime (tests) has no other worker to hand tasks to.
        _ => work(),
    }
}

/// Reads up to `wanted` bytes of `file` at `offset` onto the end of `out`, straight into its
/// spare room (no zeroing of up to a MiB first), in as many reads as the kernel needs; fewer
/// only if the file ends sooner (it shrank meanwhile). Returns the bytes added.
fn read_appending(
    file: &std::fs::File,
    offset: u64,
    wanted: usize,
    out: &mut Vec<u8>,
) -> std::io::Result<usize> {
    out.reserve(wanted);
    let mut filled = 0;
    while filled < wanted {
        let room = &mut out.spare_capacity_mut()[..wanted - filled];
        match rustix::io::pread(file, room, offset + filled as u64) {
            Ok(([], _)) => break,
            Ok((read, _)) => {
                let read = read.len();
                // SAFETY: `pread` initialised the first `read` bytes of the spare capacity.
                #[allow(unsafe_code)]
                unsafe {
                    out.set_len(out.len() + read);
                }
                filled += read;
            }
            Err(rustix::io::Errno::INTR) => {}
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(filled)
}

/// What NFS clients are told of a regular file or a directory, from `fstatat` (as
/// nfsserve's `metadata_to_fattr3` tells it from `Metadata`: the owner always may write);
/// `None` for links, devices, FIFOs and sockets, which are never served.
fn stat_to_fattr3(id: fileid3, stat: &nix::sys::stat::FileStat) -> Option<fattr3> {
    use nix::sys::stat::SFlag;
    let kind = SFlag::from_bits_truncate(stat.st_mode) & SFlag::S_IFMT;
    let (ftype, nlink) = if kind == SFlag::S_IFREG {
        (ftype3::NF3REG, 1)
    } else if kind == SFlag::S_IFDIR {
        (ftype3::NF3DIR, 2)
    } else {
        return None;
    };
    // Seconds and nanoseconds as nfsserve gives them (NFSv3 times are 32-bit).
    let time = |seconds: i64, nanos: i64| nfstime3 {
        seconds: seconds as u32,
        nseconds: nanos as u32,
    };
    let size = u64::try_from(stat.st_size).unwrap_or(0);
    Some(fattr3 {
        ftype,
        mode: (stat.st_mode | 0o200) & 0o777,
        nlink,
        uid: stat.st_uid,
        gid: stat.st_gid,
        size,
        used: size,
        rdev: specdata3::default(),
        fsid: 0,
        fileid: id,
        atime: time(stat.st_atime, stat.st_atime_nsec),
        mtime: time(stat.st_mtime, stat.st_mtime_nsec),
        ctime: time(stat.st_ctime, stat.st_ctime_nsec),
    })
}

/// A verifier no earlier start of this process used: the start time in nanoseconds, mixed
/// with the process id and a per-process counter.
fn new_write_verifier() -> [u8; 8] {
    use std::sync::atomic::{AtomicU64, Ordering};
    static STARTS: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mixed = nanos
        ^ (u64::from(std::process::id()) << 40)
        ^ STARTS.fetch_add(1, Ordering::Relaxed).rotate_left(20);
    mixed.to_le_bytes()
}

impl ZoneFs {
    /// Serves `store`, holding at most `quota_bytes`; `tag` identifies the zone in handles.
    pub fn new(store: Arc<Mutex<ZoneStore>>, quota_bytes: u64, tag: u64) -> Self {
        Self {
            store,
            quota_bytes,
            tag,
            read_only: false,
            write_verifier: new_write_verifier(),
            attrs: AttrCache::new(ATTRIBUTE_TTL),
        }
    }

    /// Refuses every change with `NFS3ERR_ROFS` (an export users may read, not write).
    #[must_use]
    pub fn read_only(mut self, read_only: bool) -> Self {
        self.read_only = read_only;
        self
    }

    fn path(&self, id: fileid3) -> Result<String, nfsstat3> {
        self.store
            .lock()
            .path_of(id)
            .map(str::to_string)
            .ok_or(nfsstat3::NFS3ERR_STALE)
    }

    /// The path of `id`, and the stamp to read its attributes under (both under one lock).
    fn path_and_stamp(&self, id: fileid3) -> Result<(String, Stamp), nfsstat3> {
        let store = self.store.lock();
        let path = store.path_of(id).ok_or(nfsstat3::NFS3ERR_STALE)?;
        Ok((path.to_string(), self.attrs.stamp(store.version())))
    }

    fn child(&self, dirid: fileid3, name: &filename3) -> Result<String, nfsstat3> {
        let dir = self.path(dirid)?;
        let name = std::str::from_utf8(&name.0).map_err(|_| nfsstat3::NFS3ERR_INVAL)?;
        crate::zpath::check_name(name).map_err(|_| nfsstat3::NFS3ERR_INVAL)?;
        Ok(if dir.is_empty() {
            name.to_string()
        } else {
            format!("{dir}/{name}")
        })
    }

    fn disk(&self, path: &str) -> Result<std::path::PathBuf, nfsstat3> {
        self.store.lock().disk_path(path).map_err(path_status)
    }

    fn attr(&self, id: fileid3, path: &str) -> Result<fattr3, nfsstat3> {
        let disk = self.disk(path)?;
        let meta = std::fs::symlink_metadata(disk).map_err(status)?;
        Ok(metadata_to_fattr3(id, &meta))
    }

    fn writable(&self, path: &str) -> Result<(), nfsstat3> {
        if self.read_only {
            return Err(nfsstat3::NFS3ERR_ROFS);
        }
        if self.store.lock().is_incoming(path) {
            return Err(nfsstat3::NFS3ERR_JUKEBOX);
        }
        Ok(())
    }

    /// Refuses growth beyond the quota.
    /// Writes `data` at `offset` of file `id`; with `sync`, on disk before it returns (FILE_SYNC),
    /// otherwise left to the page cache until a COMMIT (UNSTABLE).
    fn write_at(
        &self,
        id: fileid3,
        offset: u64,
        data: &[u8],
        sync: bool,
    ) -> Result<fattr3, nfsstat3> {
        let _change = self.attrs.change();
        let path = self.path(id)?;
        self.writable(&path)?;
        if let Err(refused) = self.room_for(&path, offset.saturating_add(data.len() as u64)) {
            // A new file that cannot be finished (a copy that ran out of quota) goes, so that
            // no member keeps or replicates half of it; a file that had content is kept.
            match self.store.lock().abandon_new_file(&path) {
                Ok(true) => {
                    tracing::warn!(path, "write over quota: the unfinished new file is removed")
                }
                Ok(false) => {}
                Err(error) => tracing::error!(%error, path, "cannot remove an unfinished file"),
            }
            return Err(refused);
        }
        let disk = self.disk(&path)?;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk)
            .map_err(status)?;
        file.write_all_at(data, offset).map_err(status)?;
        if sync {
            // Answered FILE_SYNC: the data must be on disk before the reply.
            file.sync_data().map_err(status)?;
        }
        let size = file.metadata().map_or(0, |m| m.len());
        let end = offset.saturating_add(data.len() as u64);
        let growing = data.len() >= crate::store::FULL_WRITE && end == size;
        self.store
            .lock()
            .note_write(&path, size, (growing, !sync), Instant::now());
        self.attr(id, &path)
    }

    fn room_for(&self, path: &str, new_len: u64) -> Result<(), nfsstat3> {
        let store = self.store.lock();
        let current = store
            .disk_path(path)
            .ok()
            .and_then(|disk| std::fs::metadata(disk).ok())
            .map_or(0, |m| m.len());
        let growth = new_len.saturating_sub(current);
        if growth > 0 && store.used_bytes().saturating_add(growth) > self.quota_bytes {
            return Err(nfsstat3::NFS3ERR_DQUOT);
        }
        Ok(())
    }

    fn changed_now(&self, path: &str) {
        let mut store = self.store.lock();
        if store.check(path) {
            if let Err(error) = store.save() {
                tracing::error!(%error, "cannot save the zone index");
            }
        }
    }
}

/// A file handle: a tag naming the zone (and, for forwarded zones, the member), then the id.
pub(crate) fn handle(tag: u64, id: fileid3) -> nfs_fh3 {
    let mut data = Vec::with_capacity(16);
    data.extend_from_slice(&tag.to_le_bytes());
    data.extend_from_slice(&id.to_le_bytes());
    nfs_fh3 { data }
}

/// The tag and id of a handle made by [`handle`].
pub(crate) fn parse_handle(fh: &nfs_fh3) -> Result<(u64, fileid3), nfsstat3> {
    let bytes: &[u8; 16] = fh
        .data
        .as_slice()
        .try_into()
        .map_err(|_| nfsstat3::NFS3ERR_BADHANDLE)?;
    let (tag, id) = bytes.split_at(8);
    let word = |b: &[u8]| {
        b.try_into()
            .map(u64::from_le_bytes)
            .map_err(|_| nfsstat3::NFS3ERR_BADHANDLE)
    };
    Ok((word(tag)?, word(id)?))
}

/// A path that would leave the zone is refused as a permission matter, a malformed one as
/// invalid.
fn path_status(error: crate::zpath::PathError) -> nfsstat3 {
    use crate::zpath::PathError;
    match error {
        PathError::Symlink(_) => nfsstat3::NFS3ERR_ACCES,
        PathError::NotADirectory(_) => nfsstat3::NFS3ERR_NOTDIR,
        PathError::TooLong(_) => nfsstat3::NFS3ERR_NAMETOOLONG,
        _ => nfsstat3::NFS3ERR_INVAL,
    }
}

fn status(error: std::io::Error) -> nfsstat3 {
    use std::io::ErrorKind;
    match error.kind() {
        ErrorKind::NotFound => nfsstat3::NFS3ERR_NOENT,
        ErrorKind::PermissionDenied => nfsstat3::NFS3ERR_ACCES,
        ErrorKind::AlreadyExists => nfsstat3::NFS3ERR_EXIST,
        ErrorKind::DirectoryNotEmpty => nfsstat3::NFS3ERR_NOTEMPTY,
        ErrorKind::NotADirectory => nfsstat3::NFS3ERR_NOTDIR,
        ErrorKind::IsADirectory => nfsstat3::NFS3ERR_ISDIR,
        ErrorKind::StorageFull => nfsstat3::NFS3ERR_NOSPC,
        ErrorKind::QuotaExceeded => nfsstat3::NFS3ERR_DQUOT,
        // openat2 refusing a link or a way out of the zone.
        _ if error.raw_os_error() == Some(nix::libc::ELOOP)
            || error.raw_os_error() == Some(nix::libc::EXDEV) =>
        {
            nfsstat3::NFS3ERR_ACCES
        }
        _ => nfsstat3::NFS3ERR_IO,
    }
}

#[async_trait]
impl NFSFileSystem for ZoneFs {
    fn capabilities(&self) -> VFSCapabilities {
        if self.read_only {
            VFSCapabilities::ReadOnly
        } else {
            VFSCapabilities::ReadWrite
        }
    }

    fn root_dir(&self) -> fileid3 {
        ROOT_ID
    }

    async fn lookup(&self, dirid: fileid3, filename: &filename3) -> Result<fileid3, nfsstat3> {
        match filename.0.as_slice() {
            b"." => return Ok(dirid),
            b".." => {
                let dir = self.path(dirid)?;
                let parent = dir.rsplit_once('/').map_or("", |(p, _)| p);
                return Ok(self.store.lock().id_for(parent));
            }
            _ => {}
        }
        let path = self.child(dirid, filename)?;
        let mut store = self.store.lock();
        let disk = store.disk_path(&path).map_err(path_status)?;
        if std::fs::symlink_metadata(disk).is_err() {
            return Err(nfsstat3::NFS3ERR_NOENT);
        }
        Ok(store.id_for(&path))
    }

    async fn getattr(&self, id: fileid3) -> Result<fattr3, nfsstat3> {
        let (path, stamp) = self.path_and_stamp(id)?;
        let now = Instant::now();
        if let Some(attr) = self.attrs.get(id, stamp, now) {
            return Ok(attr);
        }
        let attr = self.attr(id, &path)?;
        self.attrs.put(id, stamp, now, attr);
        Ok(attr)
    }

    async fn setattr(&self, id: fileid3, setattr: sattr3) -> Result<fattr3, nfsstat3> {
        let _change = self.attrs.change();
        let path = self.path(id)?;
        self.writable(&path)?;
        if let set_size3::size(size) = setattr.size {
            self.room_for(&path, size)?;
        }
        let disk = self.disk(&path)?;
        path_setattr(&disk, &setattr).await?;
        blocking(|| {
            if let set_size3::size(_) = setattr.size {
                if let Ok(file) = std::fs::OpenOptions::new().write(true).open(&disk) {
                    // A truncation acknowledged to the client must survive a crash, as writes
                    // do.
                    file.sync_all().map_err(status)?;
                }
                let size = std::fs::metadata(&disk).map_or(0, |m| m.len());
                self.store
                    .lock()
                    .note_write(&path, size, (false, false), Instant::now());
            } else {
                // A chmod or a touch: replicated like a write.
                self.changed_now(&path);
            }
            self.attr(id, &path)
        })
    }

    async fn read(
        &self,
        id: fileid3,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        let mut data = Vec::new();
        let (_, eof) = self.read_into(id, offset, count, &mut data).await?;
        Ok((data, eof))
    }

    async fn read_into(
        &self,
        id: fileid3,
        offset: u64,
        count: u32,
        out: &mut Vec<u8>,
    ) -> Result<(usize, bool), nfsstat3> {
        blocking(|| {
            let path = self.path(id)?;
            let root = self.store.lock().root().to_path_buf();
            let file = crate::zpath::open_beneath(&root, &path).map_err(status)?;
            let len = file.metadata().map_err(status)?.len();
            // The count is the client's: never more than the largest READ we advertise.
            let wanted = u64::from(count.min(MAX_READ_BYTES)).min(len.saturating_sub(offset));
            let start = out.len();
            let filled = match read_appending(&file, offset, wanted as usize, out) {
                Ok(filled) => filled,
                Err(e) => {
                    out.truncate(start);
                    return Err(status(e));
                }
            };
            let eof = offset.saturating_add(filled as u64) >= len;
            Ok((filled, eof))
        })
    }

    /// READ's data goes from the file to the client's socket (`sendfile`): no copy through
    /// this process. A directory or anything else not a regular file is left to
    /// [`read_into`](Self::read_into), which answers the error.
    async fn read_source(
        &self,
        id: fileid3,
        offset: u64,
        count: u32,
    ) -> Result<Option<(std::fs::File, u32, bool)>, nfsstat3> {
        blocking(|| {
            let path = self.path(id)?;
            let root = self.store.lock().root().to_path_buf();
            let file = crate::zpath::open_beneath(&root, &path).map_err(status)?;
            let meta = file.metadata().map_err(status)?;
            if !meta.is_file() {
                return Ok(None);
            }
            let len = meta.len();
            // The count is the client's: never more than the largest READ we advertise.
            let wanted = u64::from(count.min(MAX_READ_BYTES)).min(len.saturating_sub(offset));
            // Started now, on this blocking thread: the runtime's thread that sends should
            // find the pages in memory.
            if let Some(length) = std::num::NonZeroU64::new(wanted) {
                let _ =
                    rustix::fs::fadvise(&file, offset, Some(length), rustix::fs::Advice::WillNeed);
            }
            let eof = offset.saturating_add(wanted) >= len;
            Ok(Some((file, wanted as u32, eof)))
        })
    }

    async fn write(&self, id: fileid3, offset: u64, data: &[u8]) -> Result<fattr3, nfsstat3> {
        blocking(|| self.write_at(id, offset, data, true))
    }

    async fn write_stable(
        &self,
        id: fileid3,
        offset: u64,
        data: &[u8],
        stable: bool,
    ) -> Result<(fattr3, bool), nfsstat3> {
        blocking(|| {
            self.write_at(id, offset, data, stable)
                .map(|attr| (attr, stable))
        })
    }

    async fn commit(&self, id: fileid3) -> Result<fattr3, nfsstat3> {
        let _change = self.attrs.change();
        blocking(|| {
            let path = self.path(id)?;
            let disk = self.disk(&path)?;
            // Flushes every UNSTABLE write to the file, from whichever request it came.
            std::fs::File::open(&disk)
                .and_then(|file| file.sync_data())
                .map_err(status)?;
            // The client is done with what it wrote: the file settles after the usual debounce,
            // not the longer quiet of a copy that may still be growing.
            self.store.lock().note_commit(&path);
            self.attr(id, &path)
        })
    }

    async fn create(
        &self,
        dirid: fileid3,
        filename: &filename3,
        attr: sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let _change = self.attrs.change();
        let (path, disk) = blocking(|| {
            let path = self.child(dirid, filename)?;
            self.writable(&path)?;
            let disk = self.disk(&path)?;
            let file = std::fs::File::create(&disk).map_err(status)?;
            file.sync_all().map_err(status)?;
            Ok::<_, nfsstat3>((path, disk))
        })?;
        path_setattr(&disk, &attr).await?;
        blocking(|| {
            crate::store::sync_dir(disk.parent().unwrap_or(&disk));
            self.changed_now(&path);
            let id = self.store.lock().id_for(&path);
            Ok((id, self.attr(id, &path)?))
        })
    }

    async fn create_exclusive(
        &self,
        dirid: fileid3,
        filename: &filename3,
    ) -> Result<fileid3, nfsstat3> {
        let _change = self.attrs.change();
        blocking(|| {
            let path = self.child(dirid, filename)?;
            self.writable(&path)?;
            let disk = self.disk(&path)?;
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&disk)
                .map_err(status)?
                .sync_all()
                .map_err(status)?;
            crate::store::sync_dir(disk.parent().unwrap_or(&disk));
            self.changed_now(&path);
            Ok(self.store.lock().id_for(&path))
        })
    }

    async fn mkdir(
        &self,
        dirid: fileid3,
        dirname: &filename3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        let _change = self.attrs.change();
        blocking(|| {
            let path = self.child(dirid, dirname)?;
            self.writable(&path)?;
            let disk = self.disk(&path)?;
            std::fs::create_dir(&disk).map_err(status)?;
            self.changed_now(&path);
            let id = self.store.lock().id_for(&path);
            Ok((id, self.attr(id, &path)?))
        })
    }

    async fn remove(&self, dirid: fileid3, filename: &filename3) -> Result<(), nfsstat3> {
        let _change = self.attrs.change();
        blocking(|| {
            let path = self.child(dirid, filename)?;
            self.writable(&path)?;
            let disk = self.disk(&path)?;
            let meta = std::fs::symlink_metadata(&disk).map_err(status)?;
            if meta.is_dir() {
                std::fs::remove_dir(&disk).map_err(status)?;
            } else {
                std::fs::remove_file(&disk).map_err(status)?;
            }
            crate::store::sync_dir(disk.parent().unwrap_or(&disk));
            self.changed_now(&path);
            Ok(())
        })
    }

    async fn rename(
        &self,
        from_dirid: fileid3,
        from_filename: &filename3,
        to_dirid: fileid3,
        to_filename: &filename3,
    ) -> Result<(), nfsstat3> {
        let _change = self.attrs.change();
        blocking(|| {
            let from = self.child(from_dirid, from_filename)?;
            let to = self.child(to_dirid, to_filename)?;
            self.writable(&from)?;
            self.writable(&to)?;
            let mut store = self.store.lock();
            let from_disk = store.disk_path(&from).map_err(path_status)?;
            let to_disk = store.disk_path(&to).map_err(path_status)?;
            std::fs::rename(&from_disk, &to_disk).map_err(status)?;
            if from == to {
                // Renamed onto itself: nothing changed (it must not look like a change of
                // everything under it to the other members).
                return Ok(());
            }
            crate::store::sync_dir(to_disk.parent().unwrap_or(&to_disk));
            store.renamed(&from, &to);
            if let Err(error) = store.save() {
                tracing::error!(%error, "cannot save the zone index");
            }
            Ok(())
        })
    }

    async fn readdir(
        &self,
        dirid: fileid3,
        start_after: fileid3,
        max_entries: usize,
    ) -> Result<ReadDirResult, nfsstat3> {
        let (dir, children, root, stamp) = {
            let store = self.store.lock();
            let dir = store.path_of(dirid).ok_or(nfsstat3::NFS3ERR_STALE)?;
            let stamp = self.attrs.stamp(store.version());
            let children = store.children(dir);
            (dir.to_string(), children, store.root().to_path_buf(), stamp)
        };
        let page = children.len().min(max_entries);
        // A page of a few dozen `fstatat`s costs less than handing the worker over
        // (`block_in_place` doubled a small READDIRPLUS), and GETATTR and LOOKUP stat inline
        // already; bigger pages go to a blocking thread.
        let list = || {
            let now = Instant::now();
            // Opened when an entry's attributes are not cached: once, beneath the zone's root
            // with links refused, and each entry is looked at relative to it: one name to
            // resolve per entry, not a whole path.
            let mut dir_file = None;
            let mut entries = Vec::new();
            let mut remaining = children
                .into_iter()
                .skip_while(|(id, _)| start_after != 0 && *id <= start_after)
                .peekable();
            while entries.len() < max_entries {
                let Some((id, name)) = remaining.next() else {
                    break;
                };
                // Index names were checked when they came in; checked again before they touch
                // the disk, as every name does. Gone from disk since it was indexed, or a link
                // (never served): skipped.
                if crate::zpath::check_name(&name).is_err() {
                    continue;
                }
                let attr = match self.attrs.get(id, stamp, now) {
                    Some(attr) => attr,
                    None => {
                        let dir_file = match &mut dir_file {
                            Some(file) => file,
                            None => dir_file
                                .insert(crate::zpath::open_beneath(&root, &dir).map_err(status)?),
                        };
                        let Ok(stat) = nix::sys::stat::fstatat(
                            &*dir_file,
                            name.as_str(),
                            nix::fcntl::AtFlags::AT_SYMLINK_NOFOLLOW,
                        ) else {
                            continue;
                        };
                        let Some(attr) = stat_to_fattr3(id, &stat) else {
                            continue;
                        };
                        self.attrs.put(id, stamp, now, attr);
                        attr
                    }
                };
                entries.push(DirEntry {
                    fileid: id,
                    name: name.into_bytes().into(),
                    attr,
                });
            }
            Ok(ReadDirResult {
                entries,
                end: remaining.peek().is_none(),
            })
        };
        if page <= INLINE_LISTING_ENTRIES {
            list()
        } else {
            blocking(list)
        }
    }

    async fn symlink(
        &self,
        _: fileid3,
        _: &filename3,
        _: &nfspath3,
        _: &sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    async fn readlink(&self, _: fileid3) -> Result<nfspath3, nfsstat3> {
        Err(nfsstat3::NFS3ERR_NOTSUPP)
    }

    fn id_to_fh(&self, id: fileid3) -> nfs_fh3 {
        handle(self.tag, id)
    }

    fn fh_to_id(&self, fh: &nfs_fh3) -> Result<fileid3, nfsstat3> {
        let (tag, id) = parse_handle(fh)?;
        if tag != self.tag {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        if self.store.lock().path_of(id).is_none() {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        Ok(id)
    }

    fn serverid(&self) -> [u8; 8] {
        self.tag.to_le_bytes()
    }

    fn write_verifier(&self) -> [u8; 8] {
        self.write_verifier
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A handler blocked on the disk must not hold up the runtime's other tasks: here the
    /// blocked work waits for a task spawned just before it, on a runtime with one worker.
    #[test]
    fn blocking_work_lets_the_other_tasks_of_the_runtime_run() {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        let (done, wait) = std::sync::mpsc::channel();
        let other_ran = runtime.block_on(async move {
            tokio::spawn(async move {
                tokio::spawn(async move {
                    let _ = done.send(());
                });
                blocking(|| wait.recv_timeout(Duration::from_secs(5)).is_ok())
            })
            .await
            .unwrap()
        });
        assert!(
            other_ran,
            "the blocked handler stalled the runtime's other task"
        );
    }

    fn run<T>(future: impl std::future::Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(future)
    }

    fn open(dir: &std::path::Path) -> Arc<Mutex<ZoneStore>> {
        Arc::new(Mutex::new(
            ZoneStore::open(3, &dir.join("data"), &dir.join("meta")).unwrap(),
        ))
    }

    #[test]
    fn readdir_lists_with_attributes_pages_and_never_serves_a_link() {
        let dir = std::env::temp_dir().join(format!("gvfs-nfs-readdir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let fs = ZoneFs::new(open(&dir), 1 << 20, 79);
        let name = |n: &str| filename3::from(n.as_bytes());
        let (a, _) = run(fs.create(ROOT_ID, &name("a"), sattr3::default())).unwrap();
        run(fs.write(a, 0, b"hello")).unwrap();
        run(fs.create(ROOT_ID, &name("b"), sattr3::default())).unwrap();
        run(fs.mkdir(ROOT_ID, &name("d"))).unwrap();
        // b is swapped for a link to a file outside the zone behind the server's back.
        let b_disk = dir.join("data").join("b");
        std::fs::remove_file(&b_disk).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &b_disk).unwrap();
        let all = run(fs.readdir(ROOT_ID, 0, 100)).unwrap();
        let listed: Vec<(String, u64)> = all
            .entries
            .iter()
            .map(|e| (String::from_utf8_lossy(&e.name.0).into_owned(), e.attr.size))
            .collect();
        assert!(all.end);
        assert_eq!(listed.len(), 2, "{listed:?}");
        assert!(listed.contains(&("a".to_string(), 5)), "{listed:?}");
        assert!(listed.iter().any(|(n, _)| n == "d"), "{listed:?}");
        let first = run(fs.readdir(ROOT_ID, 0, 1)).unwrap();
        assert_eq!(first.entries.len(), 1);
        assert!(!first.end);
        let rest = run(fs.readdir(ROOT_ID, first.entries[0].fileid, 100)).unwrap();
        assert!(rest.end);
        assert_eq!(first.entries.len() + rest.entries.len(), 2);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_append_to_the_reply_stop_at_the_end_and_are_capped_at_rtmax() {
        let dir = std::env::temp_dir().join(format!("gvfs-nfs-read-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let fs = ZoneFs::new(open(&dir), 4 << 20, 80);
        let name = |n: &str| filename3::from(n.as_bytes());
        let (small, _) = run(fs.create(ROOT_ID, &name("small"), sattr3::default())).unwrap();
        run(fs.write(small, 0, b"0123456789")).unwrap();
        let mut out = vec![9, 9];
        assert_eq!(
            run(fs.read_into(small, 3, 100, &mut out)).unwrap(),
            (7, true)
        );
        assert_eq!(out, b"\x09\x093456789");
        let mut out = Vec::new();
        assert_eq!(
            run(fs.read_into(small, 0, 4, &mut out)).unwrap(),
            (4, false)
        );
        assert_eq!(out, b"0123");
        assert_eq!(
            run(fs.read_into(small, 20, 5, &mut out)).unwrap(),
            (0, true)
        );
        assert_eq!(out, b"0123", "nothing appended past the end");
        // A client asking for 4 GiB gets at most rtmax.
        let (big, _) = run(fs.create(ROOT_ID, &name("big"), sattr3::default())).unwrap();
        let content: Vec<u8> = (0..(MAX_READ_BYTES as usize + 10))
            .map(|i| (i % 251) as u8)
            .collect();
        run(fs.write(big, 0, &content)).unwrap();
        let mut out = Vec::new();
        let (count, eof) = run(fs.read_into(big, 0, u32::MAX, &mut out)).unwrap();
        assert_eq!((count, eof), (MAX_READ_BYTES as usize, false));
        assert_eq!(out, content[..MAX_READ_BYTES as usize]);
        let (data, eof) = run(fs.read(big, u64::from(MAX_READ_BYTES), 100)).unwrap();
        assert_eq!(
            (data.as_slice(), eof),
            (&content[MAX_READ_BYTES as usize..], true)
        );
        // A stale handle's read leaves the reply as it was.
        let mut out = vec![1];
        assert!(run(fs.read_into(12345, 0, 10, &mut out)).is_err());
        assert_eq!(out, [1]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn attributes_served_from_memory_follow_every_change() {
        let dir = std::env::temp_dir().join(format!("gvfs-nfs-attrs-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = open(&dir);
        let fs = ZoneFs::new(Arc::clone(&store), 1 << 20, 81);
        let name = |n: &str| filename3::from(n.as_bytes());
        let size_listed = |fs: &ZoneFs, id: fileid3| {
            run(fs.readdir(ROOT_ID, 0, 100))
                .unwrap()
                .entries
                .iter()
                .find(|e| e.fileid == id)
                .map(|e| e.attr.size)
        };
        let (a, _) = run(fs.create(ROOT_ID, &name("a"), sattr3::default())).unwrap();
        run(fs.write(a, 0, b"hello")).unwrap();
        assert_eq!(run(fs.getattr(a)).unwrap().size, 5);
        assert_eq!(size_listed(&fs, a), Some(5));
        // Through NFS: a write, a truncation, a removal.
        run(fs.write(a, 5, b" world")).unwrap();
        assert_eq!(run(fs.getattr(a)).unwrap().size, 11);
        assert_eq!(size_listed(&fs, a), Some(11));
        let truncate = sattr3 {
            size: set_size3::size(2),
            ..sattr3::default()
        };
        run(fs.setattr(a, truncate)).unwrap();
        assert_eq!(run(fs.getattr(a)).unwrap().size, 2);
        assert_eq!(size_listed(&fs, a), Some(2));
        let root_before = run(fs.getattr(ROOT_ID)).unwrap();
        // File times move by the kernel's tick: make sure this change gets a later one.
        std::thread::sleep(Duration::from_millis(20));
        run(fs.mkdir(ROOT_ID, &name("d"))).unwrap();
        let mtime = |attr: fattr3| (attr.mtime.seconds, attr.mtime.nseconds);
        let root_after = mtime(run(fs.getattr(ROOT_ID)).unwrap());
        assert_ne!(root_after, mtime(root_before), "a child was made");
        assert_eq!(
            root_after,
            mtime(fs.attr(ROOT_ID, "").unwrap()),
            "as the disk has it now"
        );
        // Behind NFS's back, then seen by the zone's scan (as a pull's install is indexed).
        std::fs::write(dir.join("data").join("a"), b"changed on disk").unwrap();
        store.lock().scan().unwrap();
        assert_eq!(run(fs.getattr(a)).unwrap().size, 15);
        assert_eq!(size_listed(&fs, a), Some(15));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn handles_survive_a_restart_and_bad_ones_are_refused() {
        let dir = std::env::temp_dir().join(format!("gvfs-nfs-fh-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let fs = ZoneFs::new(open(&dir), 1 << 20, 77);
        let (id, _) = run(fs.create(ROOT_ID, &b"f".as_slice().into(), sattr3::default())).unwrap();
        let handle = fs.id_to_fh(id);
        drop(fs);
        let fs = ZoneFs::new(open(&dir), 1 << 20, 77);
        assert!(
            matches!(fs.fh_to_id(&handle), Ok(x) if x == id),
            "same id after reopening"
        );
        assert!(matches!(run(fs.lookup(ROOT_ID, &b"f".as_slice().into())), Ok(x) if x == id));
        let other_zone = ZoneFs::new(open(&dir), 1 << 20, 78);
        assert!(matches!(
            other_zone.fh_to_id(&handle),
            Err(nfsstat3::NFS3ERR_STALE)
        ));
        assert!(matches!(
            fs.fh_to_id(&nfs_fh3 {
                data: vec![1, 2, 3]
            }),
            Err(nfsstat3::NFS3ERR_BADHANDLE)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unstable_writes_settle_after_commit_and_the_verifier_changes_at_each_start() {
        let dir = std::env::temp_dir().join(format!("gvfs-nfs-commit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = open(&dir);
        let fs = ZoneFs::new(Arc::clone(&store), 1 << 30, 5);
        let (id, _) =
            run(fs.create(ROOT_ID, &b"big".as_slice().into(), sattr3::default())).unwrap();
        // A copy under way: whole 1 MiB pieces at the end of the file, UNSTABLE.
        let piece = vec![7u8; crate::store::FULL_WRITE];
        for i in 0..2u64 {
            let (attr, stable) =
                run(fs.write_stable(id, i * piece.len() as u64, &piece, false)).unwrap();
            assert!(!stable, "answered UNSTABLE, as asked");
            assert_eq!(attr.size, (i + 1) * piece.len() as u64);
        }
        // Still growing: not a change after the debounce alone.
        let debounce = Duration::from_millis(1);
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(!store.lock().settle(soon, debounce).unwrap());
        // After COMMIT the writer is done: it settles after the debounce.
        let attr = run(fs.commit(id)).unwrap();
        assert_eq!(attr.size, 2 * piece.len() as u64);
        assert!(store.lock().settle(soon, debounce).unwrap());
        assert_eq!(std::fs::read(dir.join("data/big")).unwrap().len(), 2 << 20);
        let (small, _) =
            run(fs.create(ROOT_ID, &b"small".as_slice().into(), sattr3::default())).unwrap();
        let (_, stable) = run(fs.write_stable(small, 0, b"now", true)).unwrap();
        assert!(stable, "FILE_SYNC when asked");
        // Another start: another verifier (clients then send uncommitted data again).
        let again = ZoneFs::new(Arc::clone(&store), 1 << 30, 5);
        assert_ne!(fs.write_verifier(), again.write_verifier());
        assert_eq!(fs.serverid(), again.serverid(), "handles stay valid");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn quota_and_incoming_paths_are_enforced() {
        let dir = std::env::temp_dir().join(format!("gvfs-nfs-quota-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = open(&dir);
        let fs = ZoneFs::new(Arc::clone(&store), 1000, 1);
        let (id, _) = run(fs.create(ROOT_ID, &b"f".as_slice().into(), sattr3::default())).unwrap();
        assert!(run(fs.write(id, 0, &[1; 600])).is_ok());
        assert!(
            run(fs.write(id, 0, &[2; 600])).is_ok(),
            "overwriting does not grow"
        );
        let (other, _) =
            run(fs.create(ROOT_ID, &b"g".as_slice().into(), sattr3::default())).unwrap();
        assert!(
            matches!(
                run(fs.write(other, 0, &[3; 500])),
                Err(nfsstat3::NFS3ERR_DQUOT)
            ),
            "600 + 500 > 1000, though the first write has not settled"
        );
        assert!(run(fs.write(other, 0, &[3; 400])).is_ok());
        store.lock().hold("f");
        assert!(matches!(
            run(fs.write(id, 0, &[4; 1])),
            Err(nfsstat3::NFS3ERR_JUKEBOX)
        ));
        assert!(matches!(
            run(fs.remove(ROOT_ID, &b"f".as_slice().into())),
            Err(nfsstat3::NFS3ERR_JUKEBOX)
        ));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_copy_that_runs_out_of_quota_leaves_nothing_behind() {
        let dir = std::env::temp_dir().join(format!("gvfs-nfs-partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = open(&dir);
        std::fs::write(dir.join("data/kept"), [7; 100]).unwrap();
        store.lock().scan().unwrap();
        let fs = ZoneFs::new(Arc::clone(&store), 1000, 1);
        let name = |n: &str| -> filename3 { n.as_bytes().into() };
        let (copy, _) = run(fs.create(ROOT_ID, &name("copy"), sattr3::default())).unwrap();
        assert!(run(fs.write(copy, 0, &[1; 512])).is_ok());
        assert!(matches!(
            run(fs.write(copy, 512, &[1; 512])),
            Err(nfsstat3::NFS3ERR_DQUOT)
        ));
        assert!(!dir.join("data/copy").exists(), "the half file is gone");
        let entry = store.lock().entry("copy").cloned().unwrap();
        assert!(entry.deleted, "and its deletion replicates: {entry:?}");
        // A file that had content is never removed for a refused write.
        let kept = run(fs.lookup(ROOT_ID, &name("kept"))).unwrap();
        assert!(matches!(
            run(fs.write(kept, 100, &[2; 1000])),
            Err(nfsstat3::NFS3ERR_DQUOT)
        ));
        assert_eq!(std::fs::read(dir.join("data/kept")).unwrap(), vec![7; 100]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_read_only_export_serves_reads_and_refuses_every_change() {
        let dir = std::env::temp_dir().join(format!("gvfs-nfs-ro-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = open(&dir);
        std::fs::write(dir.join("data/kept"), b"kept").unwrap();
        store.lock().scan().unwrap();
        let fs = ZoneFs::new(Arc::clone(&store), 1 << 20, 1).read_only(true);
        let name = |n: &str| -> filename3 { n.as_bytes().into() };
        let id = run(fs.lookup(ROOT_ID, &name("kept"))).unwrap();
        assert_eq!(run(fs.read(id, 0, 100)).unwrap().0, b"kept");
        let rofs = |result: Result<(), nfsstat3>| matches!(result, Err(nfsstat3::NFS3ERR_ROFS));
        assert!(rofs(run(fs.write(id, 0, b"x")).map(drop)));
        assert!(rofs(
            run(fs.create(ROOT_ID, &name("new"), sattr3::default())).map(drop)
        ));
        assert!(rofs(run(fs.mkdir(ROOT_ID, &name("dir"))).map(drop)));
        assert!(rofs(run(fs.remove(ROOT_ID, &name("kept")))));
        assert!(rofs(run(fs.rename(
            ROOT_ID,
            &name("kept"),
            ROOT_ID,
            &name("moved")
        ))));
        assert_eq!(std::fs::read(dir.join("data/kept")).unwrap(), b"kept");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A copy under way (full 1 MiB writes at the end of the file) is not recorded as a change,
    /// so not replicated, until it has been quiet for longer; its last, short, write ends it.
    #[test]
    fn a_copy_under_way_is_not_taken_for_a_finished_file() {
        let dir = std::env::temp_dir().join(format!("gvfs-nfs-growing-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = open(&dir);
        let fs = ZoneFs::new(Arc::clone(&store), 1 << 30, 1);
        let (id, _) =
            run(fs.create(ROOT_ID, &b"big".as_slice().into(), sattr3::default())).unwrap();
        let debounce = Duration::from_millis(200);
        let chunk = vec![7u8; crate::store::FULL_WRITE];
        run(fs.write(id, 0, &chunk)).unwrap();
        run(fs.write(id, chunk.len() as u64, &chunk)).unwrap();
        let version = store.lock().version();
        let soon = Instant::now() + Duration::from_millis(500);
        store.lock().settle(soon, debounce).unwrap();
        assert_eq!(store.lock().version(), version, "half a copy was recorded");
        run(fs.write(id, 2 * chunk.len() as u64, b"tail")).unwrap();
        let soon = Instant::now() + Duration::from_millis(500);
        store.lock().settle(soon, debounce).unwrap();
        assert!(
            store.lock().version() > version,
            "the finished copy is recorded"
        );
        assert_eq!(
            store.lock().entry("big").unwrap().size,
            2 * chunk.len() as u64 + 4
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn reads_append_no_more_than_wanted_whatever_room_the_buffer_has() {
        let dir = std::env::temp_dir().join(format!("gvfs-read-append-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let mut out = Vec::with_capacity(1 << 16);
        out.extend_from_slice(b"head:");
        assert_eq!(read_appending(&file, 2, 3, &mut out).unwrap(), 3);
        assert_eq!(out, b"head:234");
        // Past the end: what there is.
        assert_eq!(read_appending(&file, 8, 100, &mut out).unwrap(), 2);
        assert_eq!(out, b"head:23489");
        assert_eq!(read_appending(&file, 50, 100, &mut out).unwrap(), 0);
        assert_eq!(out, b"head:23489");
        // No room yet: it is made.
        let mut empty = Vec::new();
        assert_eq!(read_appending(&file, 0, 10, &mut empty).unwrap(), 10);
        assert_eq!(empty, b"0123456789");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
