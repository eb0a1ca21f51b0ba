//! A node that does not hold a zone serves it by forwarding each NFS operation to a member
//! ([`ProxyFs`]), over the replication port and its protocol exchange, on real sockets.

#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use std::sync::Arc;
use std::time::Duration;

use grapevine_fs::remote::{Member, ProxyFs};
use grapevine_test_support::scratch;
use nfsserve::nfs::{filename3, nfsstat3, sattr3};
use nfsserve::vfs::NFSFileSystem;
use parking_lot::Mutex;

fn name(n: &str) -> filename3 {
    n.as_bytes().into()
}

#[test]
fn a_non_member_reads_and_writes_a_zone_through_a_member() {
    let dir = scratch("proxy");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (server, root, _) = common::serve_zone_keyed(&dir, &runtime, None);
    let members = Arc::new(Mutex::new(vec![Member {
        node: 1,
        address: server.address(),
    }]));
    let proxy = ProxyFs::new("z1", 9, members, Duration::from_secs(5), None);
    runtime.block_on(async {
        let top = proxy.root_dir();
        let (file, _) = proxy
            .create(top, &name("through.txt"), sattr3::default())
            .await
            .unwrap();
        proxy.write(file, 0, b"via a member").await.unwrap();
        let (bytes, eof) = proxy.read(file, 0, 100).await.unwrap();
        assert_eq!((bytes.as_slice(), eof), (&b"via a member"[..], true));
        assert_eq!(proxy.lookup(top, &name("through.txt")).await.unwrap(), file);
        assert_eq!(proxy.getattr(file).await.unwrap().size, 12);
        assert!(matches!(
            proxy.lookup(top, &name("absent")).await,
            Err(nfsstat3::NFS3ERR_NOENT)
        ));
    });
    // On the member's disk, where its replication picks it up.
    assert_eq!(
        std::fs::read(root.join("through.txt")).unwrap(),
        b"via a member"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}
