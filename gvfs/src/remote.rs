//! Zones on nodes that do not hold them: a non-member serves the zone over NFS by forwarding
//! every operation to a member, over the member's replication port. [`FsOp`] is the operation,
//! [`execute`] runs it on a member's [`ZoneFs`], and [`ProxyFs`] is the non-member's file
//! system, which picks the member that answers fastest and moves to another when it fails.
//!
//! It is over 600 lines because the forwarded operations, their execution on a member and the
//! non-member's failover belong to one protocol; splitting them would scatter each operation over
//! three files.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use grapevine_gvd_schema::frame::{decode, encode_frame, frame_len, FRAME_HEADER_LEN};
use grapevine_gvd_schema::secure::{AsyncLink, PortKey, Purpose};
use nfsserve::nfs::{
    fattr3, fileid3, filename3, ftype3, nfs_fh3, nfspath3, nfsstat3, nfstime3, sattr3, set_atime,
    set_gid3, set_mode3, set_mtime, set_size3, set_uid3, specdata3,
};
use nfsserve::vfs::{DirEntry, NFSFileSystem, ReadDirResult, VFSCapabilities};
use num_traits::FromPrimitive;
use serde::{Deserialize, Serialize};

use crate::nfs::ZoneFs;
use crate::repl::{ReplReply, ReplRequest};
use crate::store::ROOT_ID;

/// File attributes on the wire (NFSv3 `fattr3`).
#[derive(Clone, Copy, Debug, Default, Deserialize, Eq, PartialEq, Serialize)]
pub struct Attr {
    ftype: u32,
    mode: u32,
    nlink: u32,
    uid: u32,
    gid: u32,
    size: u64,
    used: u64,
    rdev: (u32, u32),
    fsid: u64,
    fileid: u64,
    atime: (u32, u32),
    mtime: (u32, u32),
    ctime: (u32, u32),
}

impl From<&fattr3> for Attr {
    fn from(a: &fattr3) -> Self {
        Self {
            ftype: a.ftype as u32,
            mode: a.mode,
            nlink: a.nlink,
            uid: a.uid,
            gid: a.gid,
            size: a.size,
            used: a.used,
            rdev: (a.rdev.specdata1, a.rdev.specdata2),
            fsid: a.fsid,
            fileid: a.fileid,
            atime: (a.atime.seconds, a.atime.nseconds),
            mtime: (a.mtime.seconds, a.mtime.nseconds),
            ctime: (a.ctime.seconds, a.ctime.nseconds),
        }
    }
}

impl Attr {
    fn to_nfs(self) -> fattr3 {
        let time = |(seconds, nseconds)| nfstime3 { seconds, nseconds };
        fattr3 {
            ftype: ftype3::from_u32(self.ftype).unwrap_or(ftype3::NF3REG),
            mode: self.mode,
            nlink: self.nlink,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            used: self.used,
            rdev: specdata3 {
                specdata1: self.rdev.0,
                specdata2: self.rdev.1,
            },
            fsid: self.fsid,
            fileid: self.fileid,
            atime: time(self.atime),
            mtime: time(self.mtime),
            ctime: time(self.ctime),
        }
    }
}

/// A time to set.
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub enum SetTime {
    /// Leave it.
    Keep,
    /// The server's clock.
    Server,
    /// This time (seconds, nanoseconds).
    Client(u32, u32),
}

/// Attributes to set (NFSv3 `sattr3`).
#[derive(Clone, Copy, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct SetAttr {
    mode: Option<u32>,
    uid: Option<u32>,
    gid: Option<u32>,
    size: Option<u64>,
    atime: SetTime,
    mtime: SetTime,
}

impl From<&sattr3> for SetAttr {
    fn from(s: &sattr3) -> Self {
        Self {
            mode: match s.mode {
                set_mode3::mode(m) => Some(m),
                set_mode3::Void => None,
            },
            uid: match s.uid {
                set_uid3::uid(u) => Some(u),
                set_uid3::Void => None,
            },
            gid: match s.gid {
                set_gid3::gid(g) => Some(g),
                set_gid3::Void => None,
            },
            size: match s.size {
                set_size3::size(n) => Some(n),
                set_size3::Void => None,
            },
            atime: match s.atime {
                set_atime::DONT_CHANGE => SetTime::Keep,
                set_atime::SET_TO_SERVER_TIME => SetTime::Server,
                set_atime::SET_TO_CLIENT_TIME(t) => SetTime::Client(t.seconds, t.nseconds),
            },
            mtime: match s.mtime {
                set_mtime::DONT_CHANGE => SetTime::Keep,
                set_mtime::SET_TO_SERVER_TIME => SetTime::Server,
                set_mtime::SET_TO_CLIENT_TIME(t) => SetTime::Client(t.seconds, t.nseconds),
            },
        }
    }
}

impl SetAttr {
    fn to_nfs(self) -> sattr3 {
        sattr3 {
            mode: self.mode.map_or(set_mode3::Void, set_mode3::mode),
            uid: self.uid.map_or(set_uid3::Void, set_uid3::uid),
            gid: self.gid.map_or(set_gid3::Void, set_gid3::gid),
            size: self.size.map_or(set_size3::Void, set_size3::size),
            atime: match self.atime {
                SetTime::Keep => set_atime::DONT_CHANGE,
                SetTime::Server => set_atime::SET_TO_SERVER_TIME,
                SetTime::Client(seconds, nseconds) => {
                    set_atime::SET_TO_CLIENT_TIME(nfstime3 { seconds, nseconds })
                }
            },
            mtime: match self.mtime {
                SetTime::Keep => set_mtime::DONT_CHANGE,
                SetTime::Server => set_mtime::SET_TO_SERVER_TIME,
                SetTime::Client(seconds, nseconds) => {
                    set_mtime::SET_TO_CLIENT_TIME(nfstime3 { seconds, nseconds })
                }
            },
        }
    }
}

/// A file system operation forwarded to a member.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[allow(missing_docs)]
pub enum FsOp {
    Lookup {
        dir: u64,
        name: Vec<u8>,
    },
    GetAttr {
        id: u64,
    },
    SetAttr {
        id: u64,
        attr: SetAttr,
    },
    Read {
        id: u64,
        offset: u64,
        count: u32,
    },
    Write {
        id: u64,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    Create {
        dir: u64,
        name: Vec<u8>,
        attr: SetAttr,
    },
    CreateExclusive {
        dir: u64,
        name: Vec<u8>,
    },
    Mkdir {
        dir: u64,
        name: Vec<u8>,
    },
    Remove {
        dir: u64,
        name: Vec<u8>,
    },
    Rename {
        from_dir: u64,
        from: Vec<u8>,
        to_dir: u64,
        to: Vec<u8>,
    },
    ReadDir {
        dir: u64,
        start_after: u64,
        max: u32,
    },
}

/// What a forwarded operation returned.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
#[allow(missing_docs)]
pub enum FsValue {
    Id(u64),
    Attr(Attr),
    IdAttr(u64, Attr),
    Data {
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
        eof: bool,
    },
    Entries {
        entries: Vec<(u64, Vec<u8>, Attr)>,
        end: bool,
    },
    Done,
}

/// The outcome of a forwarded operation: a value or an NFS status code.
pub type FsResult = Result<FsValue, u32>;

/// Runs `op` on a member's zone.
pub async fn execute(fs: &ZoneFs, op: FsOp) -> FsResult {
    let code = |status: nfsstat3| status as u32;
    let name = |bytes: Vec<u8>| -> filename3 { bytes.into() };
    match op {
        FsOp::Lookup { dir, name: n } => fs.lookup(dir, &name(n)).await.map(FsValue::Id),
        FsOp::GetAttr { id } => fs.getattr(id).await.map(|a| FsValue::Attr((&a).into())),
        FsOp::SetAttr { id, attr } => fs
            .setattr(id, attr.to_nfs())
            .await
            .map(|a| FsValue::Attr((&a).into())),
        FsOp::Read { id, offset, count } => fs
            .read(id, offset, count.min(crate::repl::CHUNK))
            .await
            .map(|(bytes, eof)| FsValue::Data { bytes, eof }),
        FsOp::Write { id, offset, data } => fs
            .write(id, offset, &data)
            .await
            .map(|a| FsValue::Attr((&a).into())),
        FsOp::Create { dir, name: n, attr } => fs
            .create(dir, &name(n), attr.to_nfs())
            .await
            .map(|(id, a)| FsValue::IdAttr(id, (&a).into())),
        FsOp::CreateExclusive { dir, name: n } => {
            fs.create_exclusive(dir, &name(n)).await.map(FsValue::Id)
        }
        FsOp::Mkdir { dir, name: n } => fs
            .mkdir(dir, &name(n))
            .await
            .map(|(id, a)| FsValue::IdAttr(id, (&a).into())),
        FsOp::Remove { dir, name: n } => fs.remove(dir, &name(n)).await.map(|()| FsValue::Done),
        FsOp::Rename {
            from_dir,
            from,
            to_dir,
            to,
        } => fs
            .rename(from_dir, &name(from), to_dir, &name(to))
            .await
            .map(|()| FsValue::Done),
        FsOp::ReadDir {
            dir,
            start_after,
            max,
        } => fs
            .readdir(dir, start_after, max.min(4096) as usize)
            .await
            .map(|r| FsValue::Entries {
                entries: r
                    .entries
                    .iter()
                    .map(|e| (e.fileid, e.name.0.clone(), (&e.attr).into()))
                    .collect(),
                end: r.end,
            }),
    }
    .map_err(code)
}

/// A member to forward to.
#[derive(Clone, Copy, Debug, Eq, PartialEq)]
pub struct Member {
    /// Its node id.
    pub node: u64,
    /// Its replication address.
    pub address: SocketAddr,
}

struct Link {
    member: Member,
    stream: AsyncLink<tokio::net::TcpStream>,
}

/// A zone this node does not hold, served by forwarding to a member.
pub struct ProxyFs {
    zone: String,
    tag: u64,
    members: Arc<parking_lot::Mutex<Vec<Member>>>,
    link: tokio::sync::Mutex<Option<Link>>,
    timeout: Duration,
    key: Option<PortKey>,
}

impl ProxyFs {
    /// Forwards `zone` to one of `members` (kept up to date by the caller), proving `key`
    /// to them when the network has one.
    pub fn new(
        zone: &str,
        tag: u64,
        members: Arc<parking_lot::Mutex<Vec<Member>>>,
        timeout: Duration,
        key: Option<PortKey>,
    ) -> Self {
        Self {
            zone: zone.into(),
            tag,
            members,
            link: tokio::sync::Mutex::new(None),
            timeout,
            key,
        }
    }

    /// Connects to the member that answers first: the nearest one.
    async fn connect(&self) -> Result<Link, nfsstat3> {
        let members = self.members.lock().clone();
        let mut best: Option<(Duration, Link)> = None;
        for member in members {
            let started = Instant::now();
            let connected = tokio::time::timeout(self.timeout, async {
                let stream = tokio::net::TcpStream::connect(member.address).await?;
                // Latency only: the connection works without it.
                let _ = stream.set_nodelay(true);
                let mut link =
                    AsyncLink::connect(stream, self.key.as_ref(), Purpose::Replication).await?;
                greet(&mut link).await?;
                Ok::<_, std::io::Error>(link)
            })
            .await;
            if let Ok(Err(error)) = &connected {
                tracing::warn!(zone = self.zone, member = %member.address, %error, "member unreachable");
            }
            if let Ok(Ok(stream)) = connected {
                let took = started.elapsed();
                if best.as_ref().is_none_or(|(t, _)| took < *t) {
                    best = Some((took, Link { member, stream }));
                }
            }
        }
        best.map(|(_, link)| {
            tracing::info!(zone = self.zone, member = %link.member.address, "zone forwarded to a member");
            link
        })
        .ok_or(nfsstat3::NFS3ERR_JUKEBOX)
    }

    async fn call(&self, op: FsOp) -> Result<FsValue, nfsstat3> {
        let mut link = self.link.lock().await;
        for _ in 0..2 {
            if link.is_none() {
                *link = Some(self.connect().await?);
            }
            let Some(current) = link.as_mut() else {
                continue;
            };
            match tokio::time::timeout(
                self.timeout,
                exchange(&mut current.stream, &self.zone, op.clone()),
            )
            .await
            {
                Ok(Ok(result)) => {
                    return result
                        .map_err(|code| nfsstat3::from_u32(code).unwrap_or(nfsstat3::NFS3ERR_IO))
                }
                _ => {
                    // The member failed: try the next one (its file ids differ, so handles
                    // from the old one go stale, which NFS clients handle by looking up again).
                    tracing::warn!(zone = self.zone, member = %current.member.address, "member failed");
                    *link = None;
                }
            }
        }
        Err(nfsstat3::NFS3ERR_JUKEBOX)
    }

    fn current_member(&self) -> u64 {
        self.link
            .try_lock()
            .ok()
            .and_then(|l| l.as_ref().map(|l| l.member.node))
            .unwrap_or(0)
    }
}

async fn exchange(
    stream: &mut AsyncLink<tokio::net::TcpStream>,
    zone: &str,
    op: FsOp,
) -> std::io::Result<FsResult> {
    let mut frame = Vec::new();
    encode_frame(
        &ReplRequest::Fs {
            zone: zone.into(),
            op,
        },
        &mut frame,
    )
    .map_err(std::io::Error::other)?;
    stream.write_all(&frame).await?;
    match read_reply(stream).await? {
        ReplReply::Fs(result) => Ok(result),
        ReplReply::Error { message } => Err(std::io::Error::other(message)),
        _ => Err(std::io::Error::other("unexpected reply")),
    }
}

async fn read_reply(stream: &mut AsyncLink<tokio::net::TcpStream>) -> std::io::Result<ReplReply> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut header).await?;
    let len = frame_len(header, 64 << 20).map_err(std::io::Error::other)?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await?;
    decode::<ReplReply>(&body).map_err(std::io::Error::other)
}

/// Says which replication protocol this node speaks, and checks the member speaks it too.
async fn greet(stream: &mut AsyncLink<tokio::net::TcpStream>) -> std::io::Result<()> {
    let mut frame = Vec::new();
    encode_frame(
        &ReplRequest::Hello {
            protocol: crate::repl::PROTOCOL,
        },
        &mut frame,
    )
    .map_err(std::io::Error::other)?;
    stream.write_all(&frame).await?;
    crate::repl::check_greeting(read_reply(stream).await).map_err(std::io::Error::other)
}

fn bad(value: FsValue) -> nfsstat3 {
    tracing::warn!(?value, "member answered the wrong kind of value");
    nfsstat3::NFS3ERR_SERVERFAULT
}

#[async_trait]
impl NFSFileSystem for ProxyFs {
    fn capabilities(&self) -> VFSCapabilities {
        VFSCapabilities::ReadWrite
    }

    fn root_dir(&self) -> fileid3 {
        ROOT_ID
    }

    async fn lookup(&self, dir: fileid3, name: &filename3) -> Result<fileid3, nfsstat3> {
        match self
            .call(FsOp::Lookup {
                dir,
                name: name.0.clone(),
            })
            .await?
        {
            FsValue::Id(id) => Ok(id),
            other => Err(bad(other)),
        }
    }

    async fn getattr(&self, id: fileid3) -> Result<fattr3, nfsstat3> {
        match self.call(FsOp::GetAttr { id }).await? {
            FsValue::Attr(a) => Ok(a.to_nfs()),
            other => Err(bad(other)),
        }
    }

    async fn setattr(&self, id: fileid3, attr: sattr3) -> Result<fattr3, nfsstat3> {
        match self
            .call(FsOp::SetAttr {
                id,
                attr: (&attr).into(),
            })
            .await?
        {
            FsValue::Attr(a) => Ok(a.to_nfs()),
            other => Err(bad(other)),
        }
    }

    async fn read(
        &self,
        id: fileid3,
        offset: u64,
        count: u32,
    ) -> Result<(Vec<u8>, bool), nfsstat3> {
        match self.call(FsOp::Read { id, offset, count }).await? {
            FsValue::Data { bytes, eof } => Ok((bytes, eof)),
            other => Err(bad(other)),
        }
    }

    async fn write(&self, id: fileid3, offset: u64, data: &[u8]) -> Result<fattr3, nfsstat3> {
        match self
            .call(FsOp::Write {
                id,
                offset,
                data: data.to_vec(),
            })
            .await?
        {
            FsValue::Attr(a) => Ok(a.to_nfs()),
            other => Err(bad(other)),
        }
    }

    async fn create(
        &self,
        dir: fileid3,
        name: &filename3,
        attr: sattr3,
    ) -> Result<(fileid3, fattr3), nfsstat3> {
        match self
            .call(FsOp::Create {
                dir,
                name: name.0.clone(),
                attr: (&attr).into(),
            })
            .await?
        {
            FsValue::IdAttr(id, a) => Ok((id, a.to_nfs())),
            other => Err(bad(other)),
        }
    }

    async fn create_exclusive(&self, dir: fileid3, name: &filename3) -> Result<fileid3, nfsstat3> {
        match self
            .call(FsOp::CreateExclusive {
                dir,
                name: name.0.clone(),
            })
            .await?
        {
            FsValue::Id(id) => Ok(id),
            other => Err(bad(other)),
        }
    }

    async fn mkdir(&self, dir: fileid3, name: &filename3) -> Result<(fileid3, fattr3), nfsstat3> {
        match self
            .call(FsOp::Mkdir {
                dir,
                name: name.0.clone(),
            })
            .await?
        {
            FsValue::IdAttr(id, a) => Ok((id, a.to_nfs())),
            other => Err(bad(other)),
        }
    }

    async fn remove(&self, dir: fileid3, name: &filename3) -> Result<(), nfsstat3> {
        match self
            .call(FsOp::Remove {
                dir,
                name: name.0.clone(),
            })
            .await?
        {
            FsValue::Done => Ok(()),
            other => Err(bad(other)),
        }
    }

    async fn rename(
        &self,
        from_dir: fileid3,
        from: &filename3,
        to_dir: fileid3,
        to: &filename3,
    ) -> Result<(), nfsstat3> {
        let op = FsOp::Rename {
            from_dir,
            from: from.0.clone(),
            to_dir,
            to: to.0.clone(),
        };
        match self.call(op).await? {
            FsValue::Done => Ok(()),
            other => Err(bad(other)),
        }
    }

    async fn readdir(
        &self,
        dir: fileid3,
        start_after: fileid3,
        max: usize,
    ) -> Result<ReadDirResult, nfsstat3> {
        let op = FsOp::ReadDir {
            dir,
            start_after,
            max: u32::try_from(max).unwrap_or(u32::MAX),
        };
        match self.call(op).await? {
            FsValue::Entries { entries, end } => Ok(ReadDirResult {
                entries: entries
                    .into_iter()
                    .map(|(fileid, name, attr)| DirEntry {
                        fileid,
                        name: name.into(),
                        attr: attr.to_nfs(),
                    })
                    .collect(),
                end,
            }),
            other => Err(bad(other)),
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
        // The member's ids mean nothing on another member: the handle names the member.
        crate::nfs::handle(self.tag ^ self.current_member(), id)
    }

    fn fh_to_id(&self, fh: &nfs_fh3) -> Result<fileid3, nfsstat3> {
        let (tag, id) = crate::nfs::parse_handle(fh)?;
        let member = self.current_member();
        // Before the first connection any handle of this zone is taken; after a move to
        // another member, the old member's handles are stale.
        if member != 0 && tag != self.tag ^ member && id != ROOT_ID {
            return Err(nfsstat3::NFS3ERR_STALE);
        }
        Ok(id)
    }

    fn serverid(&self) -> [u8; 8] {
        self.tag.to_le_bytes()
    }
}
