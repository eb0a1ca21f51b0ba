//! The replication port against a hostile peer, on real sockets: paths that try to leave the
//! zone are refused on the wire, whichever side names them.

#![allow(clippy::unwrap_used, clippy::expect_used)]
mod common;

use common::{serve_zone_keyed, Served};
use grapevine_test_support::scratch;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use grapevine_fs::repl::{pull, ReplServer, PROTOCOL};
use grapevine_fs::store::{Change, Entry, Kind, ZoneStore};
use grapevine_fs::version::VersionVector;
use grapevine_gvd_schema::frame::{encode_frame, frame_len, FRAME_HEADER_LEN};
use grapevine_gvd_schema::secure::PortKey;
use parking_lot::Mutex;
use serde::Serialize;

/// The replication messages as a peer that ignores the rules would encode them: same variants
/// and field order, paths as plain strings.
#[derive(Serialize)]
enum RawRequest {
    #[allow(dead_code)]
    Changes {
        zone: String,
        since: u64,
    },
    #[allow(dead_code)]
    Fs {
        zone: String,
    },
    Fetch {
        zone: String,
        path: String,
        offset: u64,
        len: u32,
        content: Change,
    },
    Hello {
        protocol: u32,
    },
}

#[derive(Serialize)]
enum RawReply {
    Changes {
        version: u64,
        entries: Vec<(String, Entry)>,
    },
    #[allow(dead_code)]
    Data,
    #[allow(dead_code)]
    Fs,
    #[allow(dead_code)]
    Error,
    Hello {
        protocol: u32,
    },
}

fn send_raw<T: Serialize>(stream: &mut TcpStream, message: &T) {
    let mut frame = Vec::new();
    encode_frame(message, &mut frame).unwrap();
    stream.write_all(&frame).unwrap();
}

/// The reply's bytes, or `None` when the server closed the connection instead.
fn read_raw(stream: &mut TcpStream) -> Option<Vec<u8>> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    stream.read_exact(&mut header).ok()?;
    let len = frame_len(header, 64 << 20).ok()?;
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).ok()?;
    Some(body)
}

/// A connection to `server` that gives up reading after `timeout`.
fn connect(server: &ReplServer, timeout: Duration) -> TcpStream {
    let stream = TcpStream::connect(server.address()).unwrap();
    stream.set_read_timeout(Some(timeout)).unwrap();
    stream
}

/// Says the protocol this build speaks, as every peer must first; the server agrees.
fn hello(stream: &mut TcpStream) {
    send_raw(stream, &RawRequest::Hello { protocol: PROTOCOL });
    let reply = read_raw(stream).expect("an answer to the hello");
    assert!(
        !String::from_utf8_lossy(&reply).contains("protocol"),
        "refused: {}",
        String::from_utf8_lossy(&reply)
    );
}

/// A request for the first 4 KiB of `path` in zone z1, at version `content`.
fn fetch_of(path: &str, content: Change) -> RawRequest {
    RawRequest::Fetch {
        zone: "z1".into(),
        path: path.into(),
        offset: 0,
        len: 4096,
        content,
    }
}

fn serve_zone(dir: &Path, runtime: &tokio::runtime::Runtime) -> Served {
    serve_zone_keyed(dir, runtime, None)
}

/// Records `path` as written in `store`'s index (as the zone's scan would) and returns its
/// version, which a fetch must name.
fn indexed(store: &Mutex<ZoneStore>, path: &str) -> Change {
    let mut store = store.lock();
    store.check(path);
    store.entry(path).expect("indexed").content
}

#[test]
fn fetch_never_reads_outside_the_zone() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = scratch("fetch");
    let (server, root, store) = serve_zone(&dir, &runtime);
    let secret = b"outside the zone: never served";
    std::fs::write(dir.join("secret"), secret).unwrap();
    std::fs::write(root.join("inside"), b"zone data").unwrap();
    let inside = indexed(&store, "inside");
    std::os::unix::fs::symlink(dir.join("secret"), root.join("leak")).unwrap();
    std::os::unix::fs::symlink(&dir, root.join("up")).unwrap();

    let hostile = [
        "../secret".to_string(),
        "../../../../etc/hostname".to_string(),
        dir.join("secret").display().to_string(),
        "/etc/hostname".to_string(),
        "leak".to_string(),
        "up/secret".to_string(),
        "inside\0".to_string(),
        String::new(),
    ];
    for path in hostile {
        let mut stream = connect(&server, Duration::from_secs(5));
        hello(&mut stream);
        send_raw(&mut stream, &fetch_of(&path, inside));
        if let Some(reply) = read_raw(&mut stream) {
            assert!(
                !reply.windows(secret.len()).any(|w| w == secret),
                "{path:?} leaked the file outside the zone"
            );
            let hostname = std::fs::read("/etc/hostname").unwrap_or_default();
            assert!(
                hostname.is_empty() || !reply.windows(hostname.len()).any(|w| w == hostname),
                "{path:?} leaked /etc/hostname"
            );
        }
    }

    // The zone's own file is still served.
    let mut stream = connect(&server, Duration::from_secs(5));
    hello(&mut stream);
    send_raw(&mut stream, &fetch_of("inside", inside));
    let reply = read_raw(&mut stream).expect("an answer");
    assert!(reply.windows(9).any(|w| w == b"zone data"));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rogue member answers a pull with entries that name paths outside the puller's zone.
#[test]
fn a_pull_never_writes_or_deletes_outside_the_zone() {
    let dir = scratch("pull");
    let victim = dir.join("victim.txt");
    std::fs::write(&victim, b"must survive").unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let rogue: SocketAddr = listener.local_addr().unwrap();
    let entry = |kind, deleted| Entry {
        id: 5,
        kind,
        vv: VersionVector([(9, 1)].into_iter().collect()),
        deleted,
        changed_at: 1,
        size: 0,
        mtime_ns: 0,
        content: Change {
            node: 9,
            counter: 1,
        },
        written_ms: 1,
        placements: VersionVector([(9, 1)].into_iter().collect()),
        displaced: VersionVector::default(),
        mode: 0o644,
    };
    let attacks: Vec<Vec<(String, Entry)>> = vec![
        vec![("../victim.txt".into(), entry(Kind::File, true))],
        vec![(victim.display().to_string(), entry(Kind::File, true))],
        vec![("../planted".into(), entry(Kind::Dir, false))],
        vec![("ok/../../planted".into(), entry(Kind::Dir, false))],
    ];
    let rounds = attacks.len();
    let server = std::thread::spawn(move || {
        for entries in attacks {
            let (mut stream, _) = listener.accept().unwrap();
            // The hello and the request, then the answers: the change list gets as far as
            // the checks of its paths.
            let _ = read_raw(&mut stream);
            let _ = read_raw(&mut stream);
            send_raw(&mut stream, &RawReply::Hello { protocol: PROTOCOL });
            send_raw(
                &mut stream,
                &RawReply::Changes {
                    version: 1,
                    entries,
                },
            );
        }
    });
    let store = ZoneStore::open(2, &dir.join("zone"), &dir.join("meta")).unwrap();
    let store = Arc::new(Mutex::new(store));
    for _ in 0..rounds {
        let outcome = pull(&store, "z1", (rogue, 9), Duration::from_secs(5), None);
        let error = outcome.expect_err("a hostile change list was accepted");
        assert!(
            !error.to_string().contains("protocol"),
            "refused for its paths, not at the hello: {error}"
        );
    }
    server.join().unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"must survive");
    assert!(!dir.join("planted").exists());
    assert_eq!(store.lock().seen(9), 0, "nothing recorded as seen");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A symbolic link put in the zone by hand is neither served nor indexed.
#[test]
fn links_in_the_zone_are_not_replicated() {
    let dir = scratch("index");
    let root = dir.join("zone");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(dir.join("secret"), b"outside").unwrap();
    std::fs::write(root.join("real"), b"inside").unwrap();
    std::os::unix::fs::symlink(dir.join("secret"), root.join("leak")).unwrap();
    let store = ZoneStore::open(1, &root, &dir.join("meta")).unwrap();
    let listed: Vec<String> = store.changes_since(0).into_iter().map(|(p, _)| p).collect();
    assert_eq!(listed, vec!["real".to_string()]);
    assert_eq!(store.skipped_links(), 1);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With a network key, the replication port serves only peers that prove it.
#[test]
fn with_a_key_only_key_holders_pull() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = scratch("keyed");
    let key = PortKey::from_network_key(b"the network key");
    let (server, root, _) = serve_zone_keyed(&dir, &runtime, Some(key.clone()));
    std::fs::write(root.join("inside"), b"zone data").unwrap();
    // The server's store indexes the file on its next check; a fresh store sees it at open.
    drop(server);
    let (server, _, store) = serve_zone_keyed(&dir, &runtime, Some(key.clone()));
    let inside = indexed(&store, "inside");

    // A stranger speaking plain frames gets nothing back.
    let mut stream = connect(&server, Duration::from_secs(10));
    send_raw(&mut stream, &RawRequest::Hello { protocol: PROTOCOL });
    send_raw(&mut stream, &fetch_of("inside", inside));
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    assert!(rest.is_empty(), "a stranger got {} bytes", rest.len());

    let puller = |tag: &str| {
        let store = ZoneStore::open(2, &dir.join(tag), &dir.join(format!("{tag}-meta"))).unwrap();
        Arc::new(Mutex::new(store))
    };
    let timeout = Duration::from_secs(10);
    let stranger = puller("no-key");
    assert!(pull(&stranger, "z1", (server.address(), 1), timeout, None).is_err());
    let wrong = PortKey::from_network_key(b"another key");
    assert!(pull(
        &stranger,
        "z1",
        (server.address(), 1),
        timeout,
        Some(&wrong)
    )
    .is_err());
    assert!(!dir.join("no-key/inside").exists());

    let member = puller("member");
    let outcome = pull(&member, "z1", (server.address(), 1), timeout, Some(&key)).unwrap();
    assert_eq!(outcome.applied, 1);
    assert_eq!(
        std::fs::read(dir.join("member/inside")).unwrap(),
        b"zone data"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// With access rules, only a zone's members may pull it and only nodes may forward operations:
/// a request from another address is answered with an error naming why, and nothing else.
#[test]
fn only_members_pull_a_zone() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = scratch("members");
    let (server, root, store) = serve_zone(&dir, &runtime);
    std::fs::write(root.join("inside"), b"zone data").unwrap();
    let inside = indexed(&store, "inside");
    let mut access = grapevine_fs::repl::Access::default();
    access
        .members
        .entry("z1".into())
        .or_default()
        .insert([127, 0, 0, 1].into());
    access.nodes.insert([127, 0, 0, 1].into());
    server.set_access(access);

    let from = |source: [u8; 4]| {
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        socket.bind(&SocketAddr::from((source, 0)).into()).unwrap();
        socket.connect(&server.address().into()).unwrap();
        let mut stream: TcpStream = socket.into();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        hello(&mut stream);
        stream
    };
    let fetch = fetch_of("inside", inside);
    let mut stranger = from([127, 0, 0, 9]);
    send_raw(&mut stranger, &fetch);
    let reply = read_raw(&mut stranger).expect("an answer");
    assert!(!reply.windows(9).any(|w| w == b"zone data"));
    assert!(String::from_utf8_lossy(&reply).contains("not a member of zone z1"));

    let mut member = from([127, 0, 0, 1]);
    send_raw(&mut member, &fetch);
    let reply = read_raw(&mut member).expect("an answer");
    assert!(reply.windows(9).any(|w| w == b"zone data"));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_address_cannot_hold_every_replication_connection() {
    use grapevine_fs::repl::MAX_CONNECTIONS_PER_SOURCE;
    use std::io::Read;
    let dir = scratch("slots");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (server, _root, _) = serve_zone(&dir, &runtime);
    // Idle connections (no handshake, no request) hold their slots.
    let held: Vec<TcpStream> = (0..MAX_CONNECTIONS_PER_SOURCE)
        .map(|_| TcpStream::connect(server.address()).unwrap())
        .collect();
    let mut refused = connect(&server, Duration::from_secs(5));
    let mut byte = [0u8; 1];
    // Closed at once by the server: end of stream (or a reset), not a timeout.
    let read = refused.read(&mut byte);
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() != std::io::ErrorKind::WouldBlock
                    && e.kind() != std::io::ErrorKind::TimedOut),
        "{read:?}"
    );
    assert!(grapevine_test_support::wait_until(
        Duration::from_secs(5),
        || server.refused_connections() >= 1
    ));
    // A slot given back is taken again.
    drop(held);
    let served = grapevine_test_support::wait_until(Duration::from_secs(5), || {
        let mut again = connect(&server, Duration::from_millis(300));
        // Served: the server waits for the handshake, so the read times out.
        matches!(again.read(&mut byte), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut)
    });
    assert!(served, "slots are given back when connections end");
    let _ = std::fs::remove_dir_all(&dir);
}

/// A member lists a file, then the file is replaced by another version of the same size (a
/// conflict resolved there, say) before the puller fetches it: the fetch names the version it
/// listed and gets an error, never the other version's bytes under the listed version's name.
#[test]
fn a_fetch_of_a_version_the_path_no_longer_holds_is_refused_even_at_the_same_size() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let dir = scratch("version");
    let (server, root, store) = serve_zone(&dir, &runtime);
    std::fs::write(root.join("three.txt"), b"from host0").unwrap();
    let listed = indexed(&store, "three.txt");
    // Replaced whole, as an install is: another write, the same length.
    std::fs::write(root.join("next"), b"from host1").unwrap();
    // File times tick coarsely: make the change visible to the scan whatever the clock did.
    std::fs::File::options()
        .write(true)
        .open(root.join("next"))
        .unwrap()
        .set_modified(std::time::SystemTime::now() + Duration::from_secs(5))
        .unwrap();
    std::fs::rename(root.join("next"), root.join("three.txt")).unwrap();
    let now = indexed(&store, "three.txt");
    assert_ne!(listed, now);

    let fetch = |content: Change| {
        let mut stream = connect(&server, Duration::from_secs(5));
        hello(&mut stream);
        send_raw(&mut stream, &fetch_of("three.txt", content));
        read_raw(&mut stream).expect("an answer")
    };
    let stale = fetch(listed);
    assert!(
        !stale.windows(10).any(|w| w == b"from host1"),
        "the bytes of another version were served as the listed one"
    );
    assert!(String::from_utf8_lossy(&stale).contains("changed since it was listed"));
    let current = fetch(now);
    assert!(current.windows(10).any(|w| w == b"from host1"));
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A peer from before protocol versions (no hello), or one that speaks another version, is
/// told which version this node speaks and hung up on before anything is served.
#[test]
fn peers_that_do_not_speak_this_protocol_are_told_why_and_get_nothing() {
    let dir = scratch("protocol");
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (server, root, store) = serve_zone(&dir, &runtime);
    std::fs::write(root.join("inside"), b"zone data").unwrap();
    let inside = indexed(&store, "inside");
    let refused = |first: &RawRequest| {
        let mut stream = connect(&server, Duration::from_secs(5));
        send_raw(&mut stream, first);
        let reply =
            String::from_utf8_lossy(&read_raw(&mut stream).expect("an answer")).into_owned();
        // Then nothing more is read: the connection is closed.
        send_raw(&mut stream, &fetch_of("inside", inside));
        assert!(
            read_raw(&mut stream).is_none(),
            "served after a refused hello"
        );
        reply
    };
    let old = refused(&fetch_of("inside", inside));
    assert!(!old.contains("zone data"));
    assert!(
        old.contains(&format!("replication protocol {PROTOCOL}")),
        "{old}"
    );
    assert!(old.contains("did not say"), "{old}");
    let other = refused(&RawRequest::Hello {
        protocol: PROTOCOL + 1,
    });
    assert!(
        other.contains(&format!(
            "protocol {PROTOCOL} and the peer {}",
            PROTOCOL + 1
        )),
        "{other}"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A member from before protocol versions cannot read the hello and hangs up: the pull says so.
#[test]
fn a_pull_from_a_peer_that_hangs_up_at_the_hello_says_it_may_be_older() {
    let dir = scratch("protocol-old");
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let old_node = listener.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        // What a node from before versions does with a request it cannot decode.
        let _ = read_raw(&mut stream);
    });
    let store = ZoneStore::open(2, &dir.join("zone"), &dir.join("meta")).unwrap();
    let store = Arc::new(Mutex::new(store));
    let error = pull(&store, "z1", (old_node, 9), Duration::from_secs(5), None)
        .expect_err("nothing to pull from a node that hung up");
    assert!(
        error
            .to_string()
            .contains("before replication protocol versions"),
        "{error}"
    );
    server.join().unwrap();
    assert_eq!(store.lock().seen(9), 0);
    let _ = std::fs::remove_dir_all(&dir);
}
