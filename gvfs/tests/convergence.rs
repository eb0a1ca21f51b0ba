//! Members of a zone converge: several replicas on real replication sockets, changed through
//! their NFS file systems as clients would, then synchronised until quiet; every member must
//! hold the same tree and contents, and nothing deleted may come back.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use grapevine_fs::nfs::ZoneFs;
use grapevine_fs::repl::{pull, ReplServer, ServedZone};
use grapevine_fs::store::{ZoneStore, ROOT_ID};
use nfsserve::nfs::{fileid3, filename3, sattr3};
use nfsserve::vfs::NFSFileSystem;
use parking_lot::Mutex;

struct Member {
    node: u64,
    root: PathBuf,
    store: Arc<Mutex<ZoneStore>>,
    fs: ZoneFs,
    server: ReplServer,
}

struct Zone {
    dir: PathBuf,
    members: Vec<Member>,
    runtime: tokio::runtime::Runtime,
}

fn name(n: &str) -> filename3 {
    n.as_bytes().into()
}

impl Zone {
    fn new(tag: &str, count: u64) -> Self {
        let dir = std::env::temp_dir().join(format!("gvfs-conv-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let members = (1..=count)
            .map(|node| {
                let root = dir.join(format!("m{node}"));
                let store = ZoneStore::open(node, &root, &dir.join(format!("meta{node}"))).unwrap();
                let store = Arc::new(Mutex::new(store));
                let mut zones = HashMap::new();
                zones.insert(
                    "z".to_string(),
                    ServedZone {
                        store: Arc::clone(&store),
                        fs: ZoneFs::new(Arc::clone(&store), 1 << 30, 7),
                    },
                );
                let server = ReplServer::start(
                    "127.0.0.1:0".parse().unwrap(),
                    Arc::new(zones),
                    runtime.handle().clone(),
                    None,
                )
                .unwrap();
                Member {
                    node,
                    root,
                    fs: ZoneFs::new(Arc::clone(&store), 1 << 30, 7),
                    store,
                    server,
                }
            })
            .collect();
        Self {
            dir,
            members,
            runtime,
        }
    }

    fn fs(&self, member: usize) -> &ZoneFs {
        &self.members[member].fs
    }

    fn run<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.runtime.block_on(future)
    }

    /// The id of `path` on `member` (directories walked from the root).
    fn id(&self, member: usize, path: &str) -> fileid3 {
        let mut id = ROOT_ID;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            id = self.run(self.fs(member).lookup(id, &name(part))).unwrap();
        }
        id
    }

    fn split(path: &str) -> (&str, &str) {
        path.rsplit_once('/').unwrap_or(("", path))
    }

    fn mkdir(&self, member: usize, path: &str) {
        let (parent, leaf) = Self::split(path);
        let dir = self.id(member, parent);
        self.run(self.fs(member).mkdir(dir, &name(leaf))).unwrap();
    }

    fn write(&self, member: usize, path: &str, content: &[u8]) {
        let (parent, leaf) = Self::split(path);
        let dir = self.id(member, parent);
        let fs = self.fs(member);
        let id = match self.run(fs.lookup(dir, &name(leaf))) {
            Ok(id) => id,
            Err(_) => {
                self.run(fs.create(dir, &name(leaf), sattr3::default()))
                    .unwrap()
                    .0
            }
        };
        self.run(fs.write(id, 0, content)).unwrap();
    }

    fn remove(&self, member: usize, path: &str) {
        let (parent, leaf) = Self::split(path);
        let dir = self.id(member, parent);
        self.run(self.fs(member).remove(dir, &name(leaf))).unwrap();
    }

    fn rename(&self, member: usize, from: &str, to: &str) {
        let (from_parent, from_leaf) = Self::split(from);
        let (to_parent, to_leaf) = Self::split(to);
        let (a, b) = (self.id(member, from_parent), self.id(member, to_parent));
        self.run(
            self.fs(member)
                .rename(a, &name(from_leaf), b, &name(to_leaf)),
        )
        .unwrap();
    }

    /// What gvd's worker does between announcements: settle written files, scan the directory.
    fn settle(&self) {
        for member in &self.members {
            let mut store = member.store.lock();
            store
                .settle(Instant::now() + Duration::from_secs(3600), Duration::ZERO)
                .unwrap();
            store.scan().unwrap();
        }
    }

    /// Every member pulls from every other until nothing changes.
    fn sync(&self) {
        for _round in 0..10 {
            self.settle();
            let mut applied = 0;
            for puller in &self.members {
                for peer in &self.members {
                    if peer.node == puller.node {
                        continue;
                    }
                    let outcome = pull(
                        &puller.store,
                        "z",
                        (peer.server.address(), peer.node),
                        Duration::from_secs(10),
                        None,
                    )
                    .unwrap();
                    applied += outcome.applied;
                }
            }
            if applied == 0 {
                self.settle();
                let changed = self.members.iter().any(|m| {
                    let store = m.store.lock();
                    self.members
                        .iter()
                        .filter(|p| p.node != m.node)
                        .any(|p| p.store.lock().version() > store.seen(p.node))
                });
                if !changed {
                    return;
                }
            }
        }
        panic!("members did not become quiet within 10 rounds");
    }

    fn tree(&self, member: usize) -> BTreeMap<String, Option<Vec<u8>>> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, Option<Vec<u8>>>) {
            for entry in std::fs::read_dir(dir).unwrap().flatten() {
                let path = entry.path();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                if entry.file_type().unwrap().is_dir() {
                    out.insert(rel, None);
                    walk(root, &path, out);
                } else {
                    out.insert(rel, Some(std::fs::read(&path).unwrap()));
                }
            }
        }
        let mut out = BTreeMap::new();
        let root = &self.members[member].root;
        walk(root, root, &mut out);
        out
    }

    /// Every member holds the same tree; returns it.
    fn converged(&self) -> BTreeMap<String, Option<Vec<u8>>> {
        let first = self.tree(0);
        for member in 1..self.members.len() {
            assert_eq!(
                self.tree(member).keys().collect::<Vec<_>>(),
                first.keys().collect::<Vec<_>>(),
                "member {member} differs from member 0"
            );
            assert_eq!(
                self.tree(member),
                first,
                "member {member}'s contents differ"
            );
        }
        first
    }
}

impl Drop for Zone {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_renamed_directory_does_not_come_back() {
    let zone = Zone::new("dirmv", 3);
    zone.mkdir(0, "dirX");
    zone.mkdir(0, "dirX/sub");
    zone.write(0, "dirX/sub/f", b"content");
    zone.write(0, "dirX/g", b"more");
    zone.sync();
    assert!(zone.converged().contains_key("dirX/sub/f"));
    zone.rename(0, "dirX", "dirY");
    zone.sync();
    let tree = zone.converged();
    assert_eq!(
        tree.keys().map(String::as_str).collect::<Vec<_>>(),
        ["dirY", "dirY/g", "dirY/sub", "dirY/sub/f"]
    );
}

#[test]
fn a_deleted_tree_does_not_come_back() {
    let zone = Zone::new("rmr", 2);
    for dir in ["rmr", "rmr/sub", "d1", "d1/d2", "d1/d2/d3"] {
        zone.mkdir(0, dir);
    }
    zone.write(0, "rmr/sub/f", b"x");
    zone.write(0, "d1/d2/d3/f", b"y");
    zone.sync();
    zone.converged();
    for path in [
        "rmr/sub/f",
        "rmr/sub",
        "rmr",
        "d1/d2/d3/f",
        "d1/d2/d3",
        "d1/d2",
        "d1",
    ] {
        zone.remove(1, path);
    }
    zone.sync();
    assert!(zone.converged().is_empty());
}

#[test]
fn a_three_way_conflict_converges_with_every_version_kept() {
    let zone = Zone::new("three", 3);
    let texts: [&[u8]; 3] = [b"from A", b"from B", b"from C"];
    for (member, text) in texts.iter().enumerate() {
        zone.write(member, "name.txt", text);
    }
    zone.sync();
    let tree = zone.converged();
    let mut contents: Vec<&[u8]> = tree.values().flatten().map(Vec::as_slice).collect();
    contents.sort_unstable();
    assert_eq!(contents, texts.to_vec(), "every version, once: {tree:?}");
    for path in tree.keys() {
        assert!(
            path.matches(".conflict-").count() <= 1,
            "nested conflict copy {path}"
        );
    }
}
