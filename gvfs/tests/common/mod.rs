//! What the replication tests share: a zone served on a real socket.
#![allow(clippy::unwrap_used, dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use grapevine_fs::nfs::ZoneFs;
use grapevine_fs::repl::{ReplServer, ServedZone};
use grapevine_fs::store::ZoneStore;
use grapevine_gvd_schema::secure::PortKey;
use parking_lot::Mutex;

/// A served zone: the replication server, the zone's directory and its store.
pub type Served = (ReplServer, PathBuf, Arc<Mutex<ZoneStore>>);

/// Zone `z1` of node 1, in `dir/zone` (its index in `dir/meta`), served on a free loopback
/// port, behind `key` when given.
pub fn serve_zone_keyed(
    dir: &Path,
    runtime: &tokio::runtime::Runtime,
    key: Option<PortKey>,
) -> Served {
    let root = dir.join("zone");
    let store = ZoneStore::open(1, &root, &dir.join("meta")).unwrap();
    let store = Arc::new(Mutex::new(store));
    let mut zones = HashMap::new();
    zones.insert(
        "z1".to_string(),
        ServedZone {
            fs: ZoneFs::new(Arc::clone(&store), 1 << 30, 7),
            store: Arc::clone(&store),
        },
    );
    let server = ReplServer::start(
        "127.0.0.1:0".parse().unwrap(),
        Arc::new(zones),
        runtime.handle().clone(),
        key,
    )
    .unwrap();
    (server, root, store)
}
