//! A zone's NFS server on a real socket: RPC record marking as clients split it, records that
//! claim more than any call needs, and READ replies (built in place) as a client decodes them.

#![allow(clippy::unwrap_used, clippy::expect_used)]
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use grapevine_fs::nfs::ZoneFs;
use grapevine_fs::store::{ZoneStore, ROOT_ID};
use grapevine_test_support::scratch;
use nfs3_client::nfs3_types::nfs3::{diropargs3, filename3, LOOKUP3args, Nfs3Result, READ3args};
use nfsserve::nfs::sattr3;
use nfsserve::tcp::{NFSTcp, NFSTcpListener, MAX_RECORD_BYTES};
use nfsserve::vfs::NFSFileSystem;
use parking_lot::Mutex;

const EXPORT: &str = "wire";

/// Serves a zone holding `content` as `file` on a loopback port; returns the port.
fn serve(runtime: &tokio::runtime::Runtime, dir: &std::path::Path, content: &[u8]) -> u16 {
    let store = ZoneStore::open(9, &dir.join("data"), &dir.join("meta")).unwrap();
    let fs = ZoneFs::new(Arc::new(Mutex::new(store)), 1 << 30, 11);
    runtime.block_on(async {
        let (id, _) = fs
            .create(ROOT_ID, &b"file".as_slice().into(), sattr3::default())
            .await
            .unwrap();
        fs.write(id, 0, content).await.unwrap();
        let mut listener = NFSTcpListener::bind("127.0.0.1:0", fs).await.unwrap();
        listener.with_export_name(EXPORT);
        let port = listener.get_listen_port();
        tokio::spawn(async move { listener.handle_forever().await });
        port
    })
}

/// An RPC call to the NFS program's NULL procedure, as XDR.
fn null_call(xid: u32) -> Vec<u8> {
    [xid, 0, 2, 100_003, 3, 0, 0, 0, 0, 0]
        .iter()
        .flat_map(|word| word.to_be_bytes())
        .collect()
}

/// Sends `call` as one record of one fragment.
fn send_record(stream: &mut TcpStream, call: &[u8]) {
    let mark = u32::try_from(call.len()).unwrap() | 1 << 31;
    stream.write_all(&mark.to_be_bytes()).unwrap();
    stream.write_all(call).unwrap();
}

/// Reads one single-fragment reply record; `None` if the server closed the connection.
fn read_reply(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut mark = [0; 4];
    stream.read_exact(&mut mark).ok()?;
    let mark = u32::from_be_bytes(mark);
    assert!(mark & (1 << 31) != 0, "one fragment per reply");
    let mut reply = vec![0; (mark & !(1 << 31)) as usize];
    stream.read_exact(&mut reply).ok()?;
    Some(reply)
}

/// Whether the server closed the connection (rather than leaving it open and silent).
fn closed(stream: &mut TcpStream) -> bool {
    let mut byte = [0; 1];
    matches!(stream.read(&mut byte), Ok(0))
}

fn connect(port: u16) -> TcpStream {
    let stream = TcpStream::connect(("127.0.0.1", port)).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    stream
}

#[test]
fn records_split_into_fragments_are_answered_and_oversized_ones_close_the_connection() {
    let dir = scratch("gvfs-nfs-wire-records");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let port = serve(&runtime, &dir, b"x");

    // One call in three fragments, the first two without the last-fragment bit, each in a
    // write of its own; then a second call in one fragment on the same connection.
    let mut stream = connect(port);
    let call = null_call(41);
    for (i, piece) in call.chunks(16).enumerate() {
        let last = (i + 1) * 16 >= call.len();
        let mark = piece.len() as u32 | if last { 1 << 31 } else { 0 };
        stream.write_all(&mark.to_be_bytes()).unwrap();
        stream.write_all(piece).unwrap();
        std::thread::sleep(Duration::from_millis(5));
    }
    let reply = read_reply(&mut stream).expect("a reply to the fragmented call");
    // xid, REPLY, MSG_ACCEPTED, verifier (flavor, length), SUCCESS.
    assert_eq!(
        reply[..24],
        [0, 0, 0, 41, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    let call = null_call(42);
    send_record(&mut stream, &call);
    assert_eq!(read_reply(&mut stream).unwrap()[..4], 42u32.to_be_bytes());

    // A record that claims 2 GiB is refused at once: no reply, the connection closed, nothing
    // allocated for it. The same with fragments that add up to more than the limit.
    let mut hostile = connect(port);
    hostile.write_all(&(u32::MAX).to_be_bytes()).unwrap();
    assert!(closed(&mut hostile));
    let mut hostile = connect(port);
    let half = (MAX_RECORD_BYTES / 2 + 1) as u32;
    hostile.write_all(&half.to_be_bytes()).unwrap();
    hostile.write_all(&vec![0; half as usize]).unwrap();
    hostile.write_all(&(half | 1 << 31).to_be_bytes()).unwrap();
    assert!(closed(&mut hostile));

    // A call whose XDR claims a 4 GiB credential body in 40 bytes: an error, the connection
    // closed (the body is read as it arrives, not allocated at the claimed length first).
    let mut hostile = connect(port);
    let mut call = null_call(43);
    call[28..32].copy_from_slice(&u32::MAX.to_be_bytes());
    send_record(&mut hostile, &call);
    assert!(closed(&mut hostile));

    // The first connection is still served.
    let call = null_call(44);
    send_record(&mut stream, &call);
    assert_eq!(read_reply(&mut stream).unwrap()[..4], 44u32.to_be_bytes());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reads_of_any_length_and_offset_decode_as_a_client_expects() {
    let dir = scratch("gvfs-nfs-wire-reads");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let content: Vec<u8> = (0..(3 << 20) + 5).map(|i: u32| (i % 253) as u8).collect();
    let port = serve(&runtime, &dir, &content);
    runtime.block_on(async {
        let mut connection = nfs3_client::Nfs3ConnectionBuilder::new(
            nfs3_client::tokio::TokioConnector,
            "127.0.0.1",
            format!("/{EXPORT}"),
        )
        .connect_from_privileged_port(false)
        .mount_port(port)
        .nfs3_port(port)
        .mount()
        .await
        .expect("mount");
        let root = connection.root_nfs_fh3();
        let Nfs3Result::Ok(found) = connection
            .lookup(&LOOKUP3args {
                what: diropargs3 {
                    dir: root,
                    name: filename3::from(b"file".to_vec()),
                },
            })
            .await
            .unwrap()
        else {
            panic!("file not found");
        };
        let file = found.object;
        // Lengths that need 0-3 bytes of XDR padding, a read past the end, rtmax pieces.
        for (offset, count) in [
            (0u64, 1u32),
            (1, 2),
            (2, 3),
            (3, 4),
            (7, 4096),
            (10, 1 << 20),
        ]
        .into_iter()
        .chain([(u64::try_from(content.len()).unwrap() - 3, 100)])
        .chain([(u64::try_from(content.len()).unwrap() + 10, 100)])
        {
            let Nfs3Result::Ok(reply) = connection
                .read(&READ3args {
                    file: file.clone(),
                    offset,
                    count,
                })
                .await
                .unwrap()
            else {
                panic!("read failed at {offset}");
            };
            let start = (offset as usize).min(content.len());
            let end = (start + count as usize).min(content.len());
            assert_eq!(
                reply.data.as_ref(),
                &content[start..end],
                "at {offset}+{count}"
            );
            assert_eq!(reply.count as usize, end - start);
            assert_eq!(reply.eof, end == content.len(), "eof at {offset}+{count}");
        }
        // The whole file in rtmax pieces, as nfs-cat reads it.
        let mut whole = Vec::new();
        loop {
            let Nfs3Result::Ok(reply) = connection
                .read(&READ3args {
                    file: file.clone(),
                    offset: whole.len() as u64,
                    count: 1 << 20,
                })
                .await
                .unwrap()
            else {
                panic!("read failed");
            };
            whole.extend_from_slice(reply.data.as_ref());
            if reply.eof {
                break;
            }
        }
        assert!(whole == content, "the whole file read back");
    });
    let _ = std::fs::remove_dir_all(&dir);
}
