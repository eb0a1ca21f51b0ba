//! KOS call round trips: a KOS calls `echo` on a VDEV served by a gvd agent over loopback TCP,
//! against a plain TCP echo (same 4-byte length framing, same payload) measured in the same
//! run. Reports p50/p99 round-trip latency and calls per second over one connection, also on a
//! node with a network key (the connection authenticated and encrypted).
//!
//! `cargo bench -p gvd --bench kos -- [--calls 20000] [--payload 64] [--json]`

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use grapevine_kos::client::{AsyncConnection, ConnectOptions, Connection};
use grapevine_kos::nodes::NodesFile;

struct Figures {
    p50_us: f64,
    p99_us: f64,
    calls_per_second: f64,
}

fn figures(mut samples: Vec<Duration>, total: Duration) -> Figures {
    samples.sort_unstable();
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e6;
    Figures {
        p50_us: at(0.5),
        p99_us: at(0.99),
        calls_per_second: samples.len() as f64 / total.as_secs_f64(),
    }
}

fn measure(calls: usize, mut call: impl FnMut()) -> Figures {
    for _ in 0..calls / 10 {
        call();
    }
    let mut samples = Vec::with_capacity(calls);
    let started = Instant::now();
    for _ in 0..calls {
        let t = Instant::now();
        call();
        samples.push(t.elapsed());
    }
    figures(samples, started.elapsed())
}

/// The baseline: a thread answering each length-prefixed frame with itself.
fn tcp_echo_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.set_nodelay(true).unwrap();
        let mut buffer = Vec::new();
        loop {
            let mut header = [0u8; 4];
            if stream.read_exact(&mut header).is_err() {
                return;
            }
            buffer.resize(u32::from_be_bytes(header) as usize, 0);
            if stream.read_exact(&mut buffer).is_err() {
                return;
            }
            let mut frame = header.to_vec();
            frame.extend_from_slice(&buffer);
            if stream.write_all(&frame).is_err() {
                return;
            }
        }
    });
    address
}

/// Starts a gvd with the echo driver under `dir`; returns it and its KOS address.
fn start_gvd(
    dir: &std::path::Path,
    group: &str,
    key_file: Option<&std::path::Path>,
) -> (std::process::Child, SocketAddr) {
    let drivers = dir.join("drivers");
    std::fs::create_dir_all(&drivers).unwrap();
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_gvd"));
    let target = bin.parent().unwrap();
    let echo = [
        target.join("deps/libgv_echo.so"),
        target.join("libgv_echo.so"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .expect("gv-echo built");
    std::fs::copy(echo, drivers.join("echo.so")).unwrap();
    let mut command = Command::new(&bin);
    command
        .args(["run", "--name", "bench", "--group", group])
        .args([
            "--query-port",
            "0",
            "--kos-port",
            "0",
            "--elp-delay-ms",
            "200",
        ])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--vdriver-path")
        .arg(&drivers)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(key_file) = key_file {
        command.arg("--key-file").arg(key_file);
    }
    let gvd = command.spawn().unwrap();
    let nodes = dir.join("state/nodes.json");
    let started = Instant::now();
    let address = loop {
        let found = NodesFile::read(&nodes)
            .ok()
            .and_then(|l| l.locate(None, "echo0").first().map(|l| l.address));
        if let Some(address) = found {
            break address;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gvd did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    (gvd, address)
}

fn main() {
    let mut calls = 20_000usize;
    let mut payload = 64usize;
    let mut json = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--calls" => calls = args.next().and_then(|v| v.parse().ok()).expect("--calls N"),
            "--payload" => {
                payload = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--payload B")
            }
            "--json" => json = true,
            _ => {}
        }
    }
    let dir = std::env::temp_dir().join(format!("gvd-kos-bench-{}", std::process::id()));
    let key_file = dir.join("network.key");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(&key_file, format!("1:{}\n", "6b".repeat(32))).unwrap();
    let (mut gvd, address) = start_gvd(&dir.join("plain"), "239.255.79.50:47950", None);
    let (mut keyed_gvd, keyed_address) =
        start_gvd(&dir.join("keyed"), "239.255.79.51:47951", Some(&key_file));
    let message = vec![0x5au8; payload];

    let mut connection = Connection::connect(address, &ConnectOptions::default()).unwrap();
    let handle = connection.open("echo0", None).unwrap();
    let kos = measure(calls, || {
        let answer = connection.call(handle, "echo", &message).unwrap();
        assert_eq!(answer.len(), message.len());
    });

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let kos_async = runtime.block_on(async {
        let mut connection = AsyncConnection::connect(address, &ConnectOptions::default())
            .await
            .unwrap();
        let handle = connection.open("echo0", None).await.unwrap();
        for _ in 0..calls / 10 {
            connection.call(handle, "echo", &message).await.unwrap();
        }
        let mut samples = Vec::with_capacity(calls);
        let started = Instant::now();
        for _ in 0..calls {
            let t = Instant::now();
            connection.call(handle, "echo", &message).await.unwrap();
            samples.push(t.elapsed());
        }
        figures(samples, started.elapsed())
    });

    let mut keyed_options = ConnectOptions::default();
    let keyring = grapevine_core::auth::Keyring::from_file(&key_file).unwrap();
    keyed_options.key = Some(gvd::port_key(&keyring).unwrap());
    let mut keyed = Connection::connect(keyed_address, &keyed_options).unwrap();
    let keyed_handle = keyed.open("echo0", None).unwrap();
    let kos_keyed = measure(calls, || {
        let answer = keyed.call(keyed_handle, "echo", &message).unwrap();
        assert_eq!(answer.len(), message.len());
    });

    let mut raw = TcpStream::connect(tcp_echo_server()).unwrap();
    raw.set_nodelay(true).unwrap();
    let mut frame = (payload as u32).to_be_bytes().to_vec();
    frame.extend_from_slice(&message);
    let mut answer = vec![0u8; frame.len()];
    let tcp = measure(calls, || {
        raw.write_all(&frame).unwrap();
        raw.read_exact(&mut answer).unwrap();
    });

    for child in [&mut gvd, &mut keyed_gvd] {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = std::fs::remove_dir_all(&dir);

    if json {
        let row = |f: &Figures| serde_json::json!({"p50_us": f.p50_us, "p99_us": f.p99_us, "calls_per_second": f.calls_per_second});
        println!(
            "{}",
            serde_json::json!({
                "payload": payload,
                "calls": calls,
                "kos_blocking": row(&kos),
                "kos_async": row(&kos_async),
                "kos_keyed": row(&kos_keyed),
                "tcp_echo": row(&tcp),
            })
        );
        return;
    }
    println!("KOS call round trips, {payload} B payload, {calls} calls over one connection");
    println!(
        "{:<22} {:>10} {:>10} {:>12} {:>10}",
        "", "p50 µs", "p99 µs", "calls/s", "p50 ratio"
    );
    for (name, f) in [
        ("plain TCP echo", &tcp),
        ("KOS blocking", &kos),
        ("KOS async (tokio)", &kos_async),
        ("KOS blocking, keyed", &kos_keyed),
    ] {
        println!(
            "{name:<22} {:>10.1} {:>10.1} {:>12.0} {:>10.2}",
            f.p50_us,
            f.p99_us,
            f.calls_per_second,
            f.p50_us / tcp.p50_us
        );
    }
}
