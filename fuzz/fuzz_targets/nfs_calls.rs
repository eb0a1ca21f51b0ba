//! What a client can send to a zone's NFS server never panics it, and whatever it sends, each
//! reply is one whole record: RPC records straight from the input (record marks, fragments and
//! lengths as the fuzzer makes them), and calls to every NFS and MOUNT procedure on real file
//! handles with the input as their arguments.
#![no_main]

use std::sync::{Arc, OnceLock};

use grapevine_fs::nfs::ZoneFs;
use grapevine_fs::store::{ZoneStore, ROOT_ID};
use libfuzzer_sys::fuzz_target;
use nfsserve::nfs::sattr3;
use nfsserve::vfs::NFSFileSystem;
use nfsserve::xdr::XDR;
use parking_lot::Mutex;

const EXPORT: &str = "/zone";

struct Server {
    runtime: tokio::runtime::Runtime,
    fs: Arc<ZoneFs>,
    /// XDR file handles: the zone's root and a file in it.
    handles: [Vec<u8>; 2],
}

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("gv-fuzz-nfs-{}", std::process::id()));
        let store = ZoneStore::open(9, &dir.join("data"), &dir.join("meta")).expect("a zone");
        // A small quota: the fuzzer's WRITEs cannot fill the disk.
        let fs = Arc::new(ZoneFs::new(Arc::new(Mutex::new(store)), 64 << 20, 11));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let creating = Arc::clone(&fs);
        let file = runtime
            .block_on(runtime.spawn(async move {
                let (id, _) = creating
                    .create(ROOT_ID, &b"file".as_slice().into(), sattr3::default())
                    .await
                    .expect("a file");
                creating.write(id, 0, &[7; 5000]).await.expect("written");
                id
            }))
            .expect("set up");
        let handle = |id| {
            let mut bytes = Vec::new();
            fs.id_to_fh(id).serialize(&mut bytes).expect("a handle");
            bytes
        };
        let handles = [handle(ROOT_ID), handle(file)];
        Server { runtime, fs, handles }
    })
}

/// One call as a record: `program`'s `procedure` with AUTH_UNIX credentials and `args`.
fn call(program: u32, procedure: u32, args: &[u8]) -> Vec<u8> {
    let words = [1, 0, 2, program, 3, procedure, 1, 20, 0, 0, 0, 0, 0, 0, 0];
    let mut record: Vec<u8> = words.iter().flat_map(|word: &u32| word.to_be_bytes()).collect();
    record.extend_from_slice(args);
    let mark = (record.len() as u32) | 1 << 31;
    [mark.to_be_bytes().to_vec(), record].concat()
}

fuzz_target!(|data: &[u8]| {
    let server = server();
    let stream = match data {
        [mode, procedure, handle, args @ ..] if mode & 1 == 1 => {
            let (program, procedures) = if mode & 2 == 0 { (100_003, 22) } else { (100_005, 6) };
            let mut arguments = server
                .handles
                .get(usize::from(*handle % 3))
                .cloned()
                .unwrap_or_default();
            arguments.extend_from_slice(args);
            call(program, u32::from(*procedure) % procedures, &arguments)
        }
        _ => data.to_vec(),
    };
    let fs = Arc::clone(&server.fs);
    let replies = server
        .runtime
        .block_on(server.runtime.spawn(async move { nfsserve::tcp::answer_stream(fs, EXPORT, &stream).await }))
        .expect("the server task did not panic");
    // Every reply is one whole single-fragment record.
    let mut rest = &replies[..];
    while !rest.is_empty() {
        let mark = u32::from_be_bytes(rest[..4].try_into().expect("a record mark"));
        assert!(mark & 1 << 31 != 0, "one fragment per reply");
        let len = (mark & !(1 << 31)) as usize;
        assert!(len >= 12 && rest.len() >= 4 + len, "a whole reply");
        rest = &rest[4 + len..];
    }
});
