//! KOS connections to gvd processes on loopback: calls across nodes, one agent process per
//! connection, crashes and hangs confined to their agent, limits and bad input.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use grapevine_test_support::{scratch, stdout_of};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::{built, ended, Gvd};
use grapevine_kos::client::{AsyncConnection, ConnectOptions, Connection};
use grapevine_kos::nodes::NodesFile;
use grapevine_kos::proto::{decode, encode_frame, ErrorKind, Reply, Request, PROTOCOL_VERSION};
use grapevine_kos::{Kos, KosError};

const WAIT: Duration = Duration::from_secs(10);

/// One gvd with the echo driver; returns it and its KOS address once announced.
fn echo_node(dir: &std::path::Path, group: &str, extra: &[&str]) -> (Gvd, SocketAddr) {
    let node = Gvd::start(dir, "b", group, extra);
    std::fs::copy(built("gv_echo"), node.drivers.join("echo.so")).unwrap();
    // The driver arrived after the start: the file watch picks it up.
    node.wait_list(WAIT, |l| {
        l.nodes
            .iter()
            .any(|n| n.vdevs.iter().any(|v| v.vdev.name == "echo0"))
    });
    let list = NodesFile::read(&node.nodes_path()).unwrap();
    let address = list.nodes[0].record.kos_address().expect("a KOS port");
    (node, address)
}

fn remote_kind(result: Result<impl std::fmt::Debug, KosError>) -> ErrorKind {
    match result {
        Err(KosError::Remote { kind, .. }) => kind,
        other => panic!("expected an error from the agent, got {other:?}"),
    }
}

#[test]
fn a_kos_on_one_host_calls_a_vdev_on_another() {
    let dir = scratch("across");
    let group = "239.255.79.40:47940";
    let a = Gvd::start(&dir, "a", group, &[]);
    let b = Gvd::start(&dir, "b", group, &[]);
    std::fs::copy(built("gv_echo"), b.drivers.join("echo.so")).unwrap();
    // Node a's list, as a KOS on host a reads it, shows b's VDEVs.
    a.wait_list(WAIT, |l| {
        l.nodes.len() == 2
            && l.nodes
                .iter()
                .any(|n| n.record.name == "b" && n.vdevs_current && !n.vdevs.is_empty())
    });
    let mut kos = Kos::new(a.nodes_path(), ConnectOptions::default());
    let echo = kos.open(None, "echo0").unwrap();
    assert_eq!(echo.location.node, "b");
    assert_eq!(kos.call(&echo, "reverse", b"abc").unwrap(), b"cba");
    assert!(matches!(
        kos.open(None, "disk7"),
        Err(KosError::NotFound { .. })
    ));

    // The async API against the same node.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut connection =
            AsyncConnection::connect(echo.location.address, &ConnectOptions::default())
                .await
                .unwrap();
        let counter = connection.open("counter0", None).await.unwrap();
        let first: u64 = String::from_utf8(connection.call(counter, "next", b"").await.unwrap())
            .unwrap()
            .parse()
            .unwrap();
        let second: u64 = String::from_utf8(connection.call(counter, "next", b"").await.unwrap())
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(second, first + 1, "one agent, one driver instance");
        assert!(connection.ping().await.unwrap() < WAIT);
        connection.close(counter).await.unwrap();
        assert_eq!(
            remote_kind(connection.call(counter, "next", b"").await),
            ErrorKind::NotOpen
        );
    });

    // A VDEV that appears while connected is opened on the same connection; one that
    // disappears leaves the others usable.
    let mut connection =
        Connection::connect(echo.location.address, &ConnectOptions::default()).unwrap();
    let echo_handle = connection.open("echo0", None).unwrap();
    std::fs::write(b.drivers.join("devices").join("disk0"), b"0123456789").unwrap();
    std::fs::copy(built("gv_dir_devices"), b.drivers.join("dir-devices.so")).unwrap();
    a.wait_list(WAIT, |l| {
        l.nodes
            .iter()
            .any(|n| n.vdevs_current && n.vdevs.iter().any(|v| v.vdev.name == "disk0"))
    });
    let disk = connection.open("disk0", None).unwrap();
    assert_eq!(connection.call(disk, "size", b"").unwrap(), b"10");
    std::fs::remove_file(b.drivers.join("dir-devices.so")).unwrap();
    a.wait_list(WAIT, |l| {
        l.nodes
            .iter()
            .all(|n| n.vdevs_current && n.vdevs.iter().all(|v| v.vdev.name != "disk0"))
    });
    assert_eq!(
        remote_kind(connection.open("disk0", None)),
        ErrorKind::NoSuchVdev
    );
    assert_eq!(
        connection.call(echo_handle, "echo", b"still").unwrap(),
        b"still"
    );

    // gvctl call, by hand.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gvctl"))
        .args(["call", "b", "echo0", "reverse", "hello", "world"])
        .env("GV_NODES_PATH", a.nodes_path())
        .output()
        .unwrap();
    stdout_of(&output);
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "dlrow olleh"
    );
    // Binary arguments, and the answer in hex.
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gvctl"))
        .args([
            "call",
            "b",
            "echo0",
            "echo",
            "--args-hex",
            "00ff10",
            "--hex",
        ])
        .env("GV_NODES_PATH", a.nodes_path())
        .output()
        .unwrap();
    assert!(stdout_of(&output).contains("00ff10"));
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_gvctl"))
        .args(["call", "b", "echo0", "nosuchfunction"])
        .env("GV_NODES_PATH", a.nodes_path())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1), "a runtime failure");
    assert!(String::from_utf8_lossy(&output.stderr).contains("no such function"));
    drop((a, b));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn agents_end_with_their_connection_and_crashes_stay_inside() {
    let dir = scratch("agents");
    // Long enough that a panicking call answers before it under load (300 ms did not, once, in a
    // full parallel run), short against the 5 s sleep below.
    let (mut node, address) =
        echo_node(&dir, "239.255.79.41:47941", &["--call-timeout-ms", "2000"]);
    let options = ConnectOptions::default();

    // Closing the connection ends its agent.
    let connection = Connection::connect(address, &options).unwrap();
    let pid = connection.accepted().agent_pid;
    assert!(!ended(pid), "agent {pid} runs while connected");
    drop(connection);
    let started = Instant::now();
    while !ended(pid) && started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        ended(pid),
        "agent {pid} still running after its connection closed"
    );

    // A panicking call is an error for that call; an aborting one ends only its agent.
    let mut first = Connection::connect(address, &options).unwrap();
    let mut second = Connection::connect(address, &options).unwrap();
    assert_ne!(first.accepted().agent_pid, second.accepted().agent_pid);
    let echo = first.open("echo0", None).unwrap();
    assert_eq!(
        remote_kind(first.call(echo, "panic", b"")),
        ErrorKind::DriverFailed { code: -1 }
    );
    assert_eq!(first.call(echo, "echo", b"ok").unwrap(), b"ok");
    assert!(matches!(
        first.call(echo, "abort", b""),
        Err(KosError::Closed)
    ));
    let other = second.open("echo0", None).unwrap();
    assert_eq!(
        second.call(other, "echo", b"unaffected").unwrap(),
        b"unaffected"
    );

    // A call that hangs past the call timeout: an error, then the agent ends.
    let pid = second.accepted().agent_pid;
    assert_eq!(
        remote_kind(second.call(other, "sleep", b"5000")),
        ErrorKind::Timeout
    );
    let started = Instant::now();
    while !ended(pid) && started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(ended(pid), "a timed-out agent ends");
    assert!(node.running(), "gvd survives its agents");
    let mut third = Connection::connect(address, &options).unwrap();
    assert!(third.ping().is_ok());
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn fifty_concurrent_connections_get_their_own_agents() {
    let dir = scratch("fifty");
    let (node, address) = echo_node(
        &dir,
        "239.255.79.42:47942",
        &["--max-agents", "50", "--max-agents-per-source", "50"],
    );
    let connections: Vec<Connection> = std::thread::scope(|scope| {
        let threads: Vec<_> = (0..50)
            .map(|_| {
                scope.spawn(|| Connection::connect(address, &ConnectOptions::default()).unwrap())
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let mut pids: Vec<u32> = connections.iter().map(|c| c.accepted().agent_pid).collect();
    pids.sort_unstable();
    pids.dedup();
    assert_eq!(pids.len(), 50, "one agent each");
    assert!(pids.iter().all(|pid| !ended(*pid)));
    let mut connections = connections;
    for (i, connection) in connections.iter_mut().enumerate() {
        let echo = connection.open("echo0", None).unwrap();
        let message = format!("client {i}");
        assert_eq!(
            connection.call(echo, "echo", message.as_bytes()).unwrap(),
            message.as_bytes()
        );
    }
    // The 51st is refused with a clear error; once one closes, there is room again.
    assert_eq!(
        remote_kind(Connection::connect(address, &ConnectOptions::default())),
        ErrorKind::TooManyConnections
    );
    let closed = connections.pop().unwrap();
    let pid = closed.accepted().agent_pid;
    drop(closed);
    let started = Instant::now();
    while !ended(pid) && started.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(50));
    assert!(Connection::connect(address, &ConnectOptions::default()).is_ok());
    drop(connections);
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

fn send(stream: &mut TcpStream, request: &Request) {
    let mut frame = Vec::new();
    encode_frame(request, &mut frame).unwrap();
    stream.write_all(&frame).unwrap();
}

fn receive(stream: &mut TcpStream) -> Option<Reply> {
    let mut header = [0u8; 4];
    stream.read_exact(&mut header).ok()?;
    let mut body = vec![0u8; u32::from_be_bytes(header) as usize];
    stream.read_exact(&mut body).ok()?;
    Some(decode(&body).unwrap())
}

fn error_kind(reply: Option<Reply>) -> ErrorKind {
    match reply {
        Some(Reply::Error { kind, .. }) => kind,
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let dir = scratch("bad");
    let (mut node, address) = echo_node(&dir, "239.255.79.43:47943", &[]);
    let connect = || {
        let stream = TcpStream::connect(address).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream
    };
    let conn = |version| Request::Conn {
        version,
        client: "raw".into(),
    };

    // Another protocol version: refused, naming both, and closed.
    let mut stream = connect();
    send(&mut stream, &conn(PROTOCOL_VERSION + 1));
    match receive(&mut stream) {
        Some(Reply::Error {
            kind: ErrorKind::VersionMismatch { server },
            message,
            ..
        }) => {
            assert_eq!(server, PROTOCOL_VERSION);
            assert!(message.contains("version"), "{message}");
        }
        other => panic!("expected a version error, got {other:?}"),
    }
    assert!(receive(&mut stream).is_none(), "closed after refusing");

    // Requests before CONN.
    let mut stream = connect();
    send(&mut stream, &Request::Ping { id: 1 });
    assert_eq!(error_kind(receive(&mut stream)), ErrorKind::NotConnected);

    // An oversized frame: refused and closed.
    let mut stream = connect();
    send(&mut stream, &conn(PROTOCOL_VERSION));
    assert!(matches!(receive(&mut stream), Some(Reply::Conn { .. })));
    stream.write_all(&u32::MAX.to_be_bytes()).unwrap();
    assert!(matches!(
        error_kind(receive(&mut stream)),
        ErrorKind::FrameTooLarge { .. }
    ));
    assert!(receive(&mut stream).is_none());

    // An unknown message type and a call on an unopened handle: errors, and the connection
    // stays usable.
    let mut stream = connect();
    send(&mut stream, &conn(PROTOCOL_VERSION));
    assert!(matches!(receive(&mut stream), Some(Reply::Conn { .. })));
    stream.write_all(&[0, 0, 0, 3, 42, 1, 2]).unwrap();
    assert_eq!(error_kind(receive(&mut stream)), ErrorKind::UnknownMessage);
    send(
        &mut stream,
        &Request::Call {
            id: 2,
            handle: 77,
            function: "echo".into(),
            args: vec![],
        },
    );
    assert_eq!(error_kind(receive(&mut stream)), ErrorKind::NotOpen);
    send(&mut stream, &Request::Ping { id: 3 });
    assert_eq!(receive(&mut stream), Some(Reply::Pong { id: 3 }));

    // A connection that sends half a frame and vanishes costs nothing.
    let mut stream = connect();
    stream.write_all(&[0, 0]).unwrap();
    drop(stream);
    assert!(node.running());
    let mut connection = Connection::connect(address, &ConnectOptions::default()).unwrap();
    assert!(connection.ping().is_ok());
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn with_a_network_key_only_key_holders_reach_vdevs() {
    let dir = scratch("keyed");
    let key_file = dir.join("network.key");
    std::fs::write(&key_file, format!("1:{}\n", "5a".repeat(32))).unwrap();
    let (node, address) = echo_node(
        &dir,
        "239.255.79.44:47944",
        &["--key-file", key_file.to_str().unwrap()],
    );

    // No key: the handshake never completes, and nothing of the agent's is ever sent.
    assert!(Connection::connect(address, &ConnectOptions::default()).is_err());
    let mut raw = TcpStream::connect(address).unwrap();
    raw.set_read_timeout(Some(WAIT)).unwrap();
    send(
        &mut raw,
        &Request::Conn {
            version: PROTOCOL_VERSION,
            client: "stranger".into(),
        },
    );
    send(
        &mut raw,
        &Request::Open {
            id: 1,
            vdev: "echo0".into(),
            driver: None,
        },
    );
    let mut answer = Vec::new();
    let _ = raw.read_to_end(&mut answer);
    assert!(answer.is_empty(), "a stranger got {} bytes", answer.len());

    // Another key: refused, and told so.
    let mut wrong = ConnectOptions::default();
    let other = grapevine_core::auth::Keyring::parse(&format!("1:{}", "a5".repeat(32))).unwrap();
    wrong.key = Some(gvd::port_key(&other).unwrap());
    assert!(matches!(
        Connection::connect(address, &wrong),
        Err(KosError::Authentication(_) | KosError::Closed)
    ));

    // The network's key: served as before, blocking and async.
    let mut options = ConnectOptions::default();
    let keyring = grapevine_core::auth::Keyring::from_file(&key_file).unwrap();
    options.key = Some(gvd::port_key(&keyring).unwrap());
    let mut connection = Connection::connect(address, &options).unwrap();
    let echo = connection.open("echo0", None).unwrap();
    assert_eq!(connection.call(echo, "reverse", b"abc").unwrap(), b"cba");
    let big = vec![7u8; 300_000];
    assert_eq!(connection.call(echo, "echo", &big).unwrap(), big);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut connection = AsyncConnection::connect(address, &options).await.unwrap();
        let echo = connection.open("echo0", None).await.unwrap();
        assert_eq!(connection.call(echo, "echo", b"hi").await.unwrap(), b"hi");
    });
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Connections that send one byte and then nothing (a slow-loris) hold at most the per-source
/// share of agents, and only until the handshake timeout.
#[test]
fn silent_connections_neither_hold_agents_nor_lock_out_others() {
    let dir = scratch("loris");
    let (node, address) = echo_node(&dir, "239.255.79.45:47945", &[]);
    let silent: Vec<TcpStream> = (0..70)
        .map(|_| {
            let mut stream = TcpStream::connect(address).unwrap();
            stream.write_all(&[0]).unwrap();
            stream
        })
        .collect();

    // A client from another address is served at once.
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 2], 0)).into())
        .unwrap();
    socket.connect(&address.into()).unwrap();
    let mut other: TcpStream = socket.into();
    other.set_read_timeout(Some(WAIT)).unwrap();
    send(
        &mut other,
        &Request::Conn {
            version: PROTOCOL_VERSION,
            client: "neighbour".into(),
        },
    );
    assert!(
        matches!(receive(&mut other), Some(Reply::Conn { .. })),
        "a client from another address must not be locked out"
    );

    // Every silent connection is closed, the refused ones at once and the others once the
    // handshake timeout has passed.
    let started = Instant::now();
    for mut stream in silent {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        let mut rest = Vec::new();
        let outcome = stream.read_to_end(&mut rest);
        assert!(
            !matches!(&outcome, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
            "a silent connection was still open after {:?}",
            started.elapsed()
        );
    }
    // And the address that sent them is served again.
    assert!(Connection::connect(address, &ConnectOptions::default()).is_ok());
    drop(node);
    let _ = std::fs::remove_dir_all(&dir);
}
