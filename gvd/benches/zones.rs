//! GrapeVineFS figures: replication latency (a file written on A through its NFS server, until
//! it is complete on B), and NFS read/write throughput against a plain copy on the local disk
//! measured in the same run. Needs nfs-cp and nfs-cat (Debian libnfs-utils).
//!
//! `cargo bench -p gvd --bench zones -- [--small 30] [--big-mb 100] [--rounds 3] [--json]
//! [--ganesha] [--prefill N]`
//!
//! `--prefill N` puts N small files in A's zone (under `prefill/`) before gvd starts and times
//! how long B takes to hold them all: the cost of recording many pulled files in one index.
//!
//! It also times GETATTR, LOOKUP and READDIRPLUS inside one client session (`nfs3_client`: the
//! libnfs tools start a session per call), 2 000 of each, against the zone's root holding the
//! small files.
//!
//! With `--ganesha` (root, `ip`, and Debian's nfs-ganesha, nfs-ganesha-vfs and rpcbind:
//! `gvd/benches/zones-vs-ganesha.sh` installs them and runs this), the same client runs the
//! same writes and reads against nfs-ganesha with FSAL VFS on the same disk, in a network
//! namespace of its own (with its own rpcbind), and the ratios are printed. The large-file
//! rounds alternate between the two servers (GrapeVineFS first in odd rounds, ganesha first
//! in even ones), after a round that warms both up and is not counted, so that a change in the machine's speed during the run weighs on both; and
//! the clients for GrapeVineFS start through `ip netns exec` too (the bench's own namespace,
//! named for the run), since entering a namespace costs each command about 1.5 ms.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use grapevine_kos::nodes::NodesFile;

const DEBOUNCE_MS: u64 = 100;
/// GETATTR, LOOKUP and READDIRPLUS calls timed per server.
const METADATA_CALLS: usize = 2_000;

struct Node {
    child: Child,
    state: PathBuf,
    data: PathBuf,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(dir: &Path, name: &str) -> Node {
    let data = dir.join(format!("{name}-data"));
    let state = dir.join(name);
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "name = \"{name}\"\nquery_port = 0\nkos_port = 0\nrepl_port = 0\nelp_delay_ms = 200\n\
             group = \"239.255.79.70:47970\"\nzone_debounce_ms = {DEBOUNCE_MS}\n\
             [[zones]]\nname = \"z\"\nquota_bytes = 10000000000\nmembers = [\"a\", \"b\"]\npath = \"{}\"\n",
            data.display()
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_gvd"))
        .args(["run", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(&state)
        .arg("--vdriver-path")
        .arg(dir.join("no-drivers"))
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    Node { child, state, data }
}

/// nfs-ganesha (FSAL VFS) exporting a directory, with rpcbind, in a network namespace of its
/// own; everything is stopped and removed when dropped.
struct Ganesha {
    namespace: String,
    /// A name for the bench's own network namespace, so that clients of GrapeVineFS start the
    /// way ganesha's do.
    host_namespace: String,
    export: PathBuf,
    rpcbind: Child,
    ganesha: Child,
}

impl Ganesha {
    /// Why it cannot run here, if it cannot.
    fn missing() -> Option<String> {
        let have = |tool: &str| {
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        for tool in ["ip", "ganesha.nfsd", "rpcbind"] {
            if !have(tool) {
                return Some(format!(
                    "{tool} not found (gvd/benches/zones-vs-ganesha.sh installs it)"
                ));
            }
        }
        if Command::new("pgrep")
            .args(["-x", "rpcbind"])
            .output()
            .is_ok_and(|o| o.status.success())
        {
            return Some("an rpcbind is running already (its socket path is shared)".into());
        }
        None
    }

    fn start(dir: &Path) -> Self {
        let namespace = format!("gvzb{}", std::process::id());
        let export = dir.join("ganesha-export");
        std::fs::create_dir_all(&export).unwrap();
        let config = dir.join("ganesha.conf");
        std::fs::write(
            &config,
            format!(
                "NFS_CORE_PARAM {{ Protocols = 3; NFS_Port = 2049; MNT_Port = 20048; \
                 Enable_NLM = false; Enable_RQUOTA = false; }}\n\
                 NFSV4 {{ Graceless = true; }}\n\
                 EXPORT {{ Export_Id = 1; Path = {}; Pseudo = /export; Access_Type = RW; \
                 Squash = No_Root_Squash; Protocols = 3; Transports = TCP; SecType = sys; \
                 FSAL {{ Name = VFS; }} }}\n\
                 LOG {{ Default_Log_Level = EVENT; }}\n",
                export.display()
            ),
        )
        .unwrap();
        let ip = |args: &[&str]| {
            assert!(
                Command::new("ip").args(args).status().unwrap().success(),
                "ip {args:?}"
            );
        };
        ip(&["netns", "add", &namespace]);
        let host_namespace = format!("gvzh{}", std::process::id());
        ip(&[
            "netns",
            "attach",
            &host_namespace,
            &std::process::id().to_string(),
        ]);
        ip(&["netns", "exec", &namespace, "ip", "link", "set", "lo", "up"]);
        let in_namespace = |program: &str| {
            let mut command = Command::new("ip");
            command.args(["netns", "exec", &namespace, program]);
            command
        };
        let rpcbind = in_namespace("rpcbind")
            .args(["-f", "-w"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let ganesha = in_namespace("ganesha.nfsd")
            .arg("-F")
            .arg("-f")
            .arg(&config)
            .arg("-L")
            .arg(dir.join("ganesha.log"))
            .arg("-p")
            .arg(dir.join("ganesha.pid"))
            .args(["-N", "NIV_EVENT"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let server = Self {
            namespace,
            host_namespace,
            export,
            rpcbind,
            ganesha,
        };
        // Up once a client can list the export.
        let started = Instant::now();
        while !server
            .client("nfs-ls")
            .arg(server.url(""))
            .output()
            .is_ok_and(|o| o.status.success())
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "nfs-ganesha did not come up (see {})",
                dir.join("ganesha.log").display()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
        server
    }

    /// A libnfs tool run inside the namespace.
    fn client(&self, tool: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.namespace, tool]);
        command
    }

    /// A tool run in the bench's own namespace, started the way [`client`](Self::client)
    /// starts ganesha's.
    fn host_client(&self, tool: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.host_namespace, tool]);
        command
    }

    fn url(&self, name: &str) -> String {
        format!(
            "nfs://127.0.0.1{}/{name}?nfsport=2049&mountport=20048",
            self.export.display()
        )
    }
}

impl Drop for Ganesha {
    fn drop(&mut self) {
        for child in [&mut self.ganesha, &mut self.rpcbind] {
            let _ = child.kill();
            let _ = child.wait();
        }
        for namespace in [&self.namespace, &self.host_namespace] {
            // The bench's own namespace only loses its name.
            let _ = Command::new("ip")
                .args(["netns", "del", namespace])
                .status();
        }
        // rpcbind killed leaves its socket and lock behind; nothing else uses them (checked
        // before starting: no other rpcbind ran).
        let _ = std::fs::remove_file("/run/rpcbind.sock");
        let _ = std::fs::remove_file("/run/rpcbind.lock");
    }
}

/// What the same client measured against one NFS server: 4 KiB file writes, big file writes
/// and reads.
#[derive(Default)]
struct ClientFigures {
    small_write: Vec<Duration>,
    write: Vec<Duration>,
    read: Vec<Duration>,
    metadata: MetadataFigures,
}

fn percentile(samples: &mut [Duration], q: f64) -> f64 {
    samples.sort_unstable();
    samples[((samples.len() - 1) as f64 * q) as usize].as_secs_f64() * 1e3
}

/// How long until `path` holds `want`. Replicas install files whole (renamed into place), so
/// the time is taken when the full size appears; the content is then compared outside the
/// timing (reading back a large file would otherwise be counted as replication time), and a
/// mismatch goes on waiting.
fn wait_identical(path: &Path, want: &[u8], limit: Duration) -> Duration {
    let started = Instant::now();
    loop {
        if std::fs::metadata(path).is_ok_and(|m| m.len() == want.len() as u64) {
            let arrived = started.elapsed();
            if std::fs::read(path).is_ok_and(|d| d == want) {
                return arrived;
            }
        }
        assert!(
            started.elapsed() < limit,
            "{} never arrived",
            path.display()
        );
        std::thread::sleep(Duration::from_micros(500));
    }
}

/// GETATTR, LOOKUP and READDIRPLUS round trips timed inside one NFS session.
#[derive(Default, serde::Deserialize, serde::Serialize)]
struct MetadataFigures {
    getattr_us: Vec<f64>,
    lookup_us: Vec<f64>,
    readdirplus_us: Vec<f64>,
    entries: usize,
}

impl MetadataFigures {
    fn p(samples: &[f64], q: f64) -> f64 {
        let mut sorted = samples.to_vec();
        sorted.sort_by(f64::total_cmp);
        let rank = (sorted.len().saturating_sub(1) as f64 * q).round() as usize;
        sorted.get(rank).copied().unwrap_or(0.0)
    }

    fn summary(&self) -> serde_json::Value {
        let pair = |s: &[f64]| [Self::p(s, 0.5), Self::p(s, 0.99)];
        serde_json::json!({
            "getattr_p50_p99_us": pair(&self.getattr_us),
            "lookup_p50_p99_us": pair(&self.lookup_us),
            "readdirplus_p50_p99_us": pair(&self.readdirplus_us),
            "entries": self.entries,
        })
    }
}

/// Mounts `export` on 127.0.0.1 (`mount_port`, `nfs_port`) and times `calls` of each
/// operation on the export's root and its file `file`.
fn metadata_latency(
    mount_port: u16,
    nfs_port: u16,
    export: &str,
    file: &str,
    calls: usize,
) -> MetadataFigures {
    use nfs3_client::nfs3_types::nfs3::{
        cookieverf3, diropargs3, filename3, GETATTR3args, LOOKUP3args, Nfs3Result, READDIRPLUS3args,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut connection = nfs3_client::Nfs3ConnectionBuilder::new(
            nfs3_client::tokio::TokioConnector,
            "127.0.0.1",
            export,
        )
        .connect_from_privileged_port(false)
        // AUTH_SYS as the libnfs tools send it (nfs-ganesha refuses AUTH_NONE).
        .credential(nfs3_client::nfs3_types::rpc::opaque_auth::auth_unix(
            &nfs3_client::nfs3_types::rpc::auth_unix::default(),
        ))
        .mount_port(mount_port)
        .nfs3_port(nfs_port)
        .mount()
        .await
        .expect("mount");
        let root = connection.root_nfs_fh3();
        let lookup = |name: &str| LOOKUP3args {
            what: diropargs3 {
                dir: root.clone(),
                name: filename3::from(name.as_bytes().to_vec()),
            },
        };
        let Nfs3Result::Ok(found) = connection.lookup(&lookup(file)).await.expect("lookup") else {
            panic!("{file} not found in {export}");
        };
        let file_handle = found.object;
        let mut figures = MetadataFigures::default();
        let micros = |t: Instant| t.elapsed().as_secs_f64() * 1e6;
        for _ in 0..calls {
            let t = Instant::now();
            let reply = connection
                .getattr(&GETATTR3args {
                    object: file_handle.clone(),
                })
                .await
                .expect("getattr");
            figures.getattr_us.push(micros(t));
            assert!(matches!(reply, Nfs3Result::Ok(_)), "getattr failed");
            let t = Instant::now();
            let reply = connection.lookup(&lookup(file)).await.expect("lookup");
            figures.lookup_us.push(micros(t));
            assert!(matches!(reply, Nfs3Result::Ok(_)), "lookup failed");
            let t = Instant::now();
            let reply = connection
                .readdirplus(&READDIRPLUS3args {
                    dir: root.clone(),
                    cookie: 0,
                    cookieverf: cookieverf3::default(),
                    dircount: 64 * 1024,
                    maxcount: 256 * 1024,
                })
                .await
                .expect("readdirplus");
            figures.readdirplus_us.push(micros(t));
            let Nfs3Result::Ok(listing) = reply else {
                panic!("readdirplus failed");
            };
            figures.entries = listing.reply.entries.0.len();
        }
        figures
    })
}

/// Which server a turn of the large-file rounds measures.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Server {
    Ours,
    Ganesha,
}

/// Runs a client to completion and returns what it printed; fails the bench on its failure.
fn run(command: &mut Command) -> Vec<u8> {
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    output.stdout
}

/// Times an `nfs-cat` whose output goes to `sink` (a file in memory), and checks it gave
/// `len` bytes.
fn timed_read(command: &mut Command, sink: &Path, len: usize) -> Duration {
    let out = std::fs::File::create(sink).unwrap();
    let t = Instant::now();
    let status = command.stdout(out).status().unwrap();
    let took = t.elapsed();
    assert!(status.success(), "{command:?}");
    assert_eq!(std::fs::metadata(sink).unwrap().len(), len as u64);
    std::fs::remove_file(sink).unwrap();
    took
}

fn main() {
    // Run by itself inside nfs-ganesha's namespace: `--metadata-client MOUNT NFS EXPORT FILE`.
    if std::env::args().nth(1).as_deref() == Some("--metadata-client") {
        let args: Vec<String> = std::env::args().skip(2).collect();
        let port = |i: usize| args[i].parse::<u16>().expect("a port");
        let figures = metadata_latency(port(0), port(1), &args[2], &args[3], METADATA_CALLS);
        println!("{}", serde_json::to_string(&figures).unwrap());
        return;
    }
    let (mut small, mut big_mb, mut rounds, mut json) = (30usize, 100usize, 3usize, false);
    let mut with_ganesha = false;
    let mut prefill = 0usize;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--small" => small = args.next().and_then(|v| v.parse().ok()).expect("--small N"),
            "--big-mb" => {
                big_mb = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--big-mb N")
            }
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--rounds N")
            }
            "--prefill" => {
                prefill = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .expect("--prefill N")
            }
            "--json" => json = true,
            "--ganesha" => with_ganesha = true,
            _ => {}
        }
    }
    if Command::new("nfs-cp").arg("--help").output().is_err() {
        eprintln!("needs nfs-cp and nfs-cat (apt install libnfs-utils)");
        return;
    }
    let dir = std::env::temp_dir().join(format!("gvd-zones-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ganesha = if with_ganesha {
        match Ganesha::missing() {
            None => Some(Ganesha::start(&dir)),
            Some(why) => {
                eprintln!("no nfs-ganesha comparison: {why}");
                None
            }
        }
    } else {
        None
    };
    let prefill_dir = dir.join("a-data").join("prefill");
    if prefill > 0 {
        std::fs::create_dir_all(&prefill_dir).unwrap();
    }
    for i in 0..prefill {
        std::fs::write(prefill_dir.join(format!("f{i:06}")), format!("{i}\n")).unwrap();
    }
    let a = start(&dir, "a");
    let b = start(&dir, "b");
    let catch_up = (prefill > 0).then(|| {
        let started = Instant::now();
        let held =
            || std::fs::read_dir(b.data.join("prefill")).map_or(0, |entries| entries.count());
        loop {
            let count = held();
            if count >= prefill {
                break started.elapsed();
            }
            assert!(
                started.elapsed() < Duration::from_secs(900),
                "B holds {count} of {prefill} files after 900 s"
            );
            if !json {
                eprint!("\r  B holds {count}/{prefill} prefilled files");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    });
    if let Some(took) = catch_up {
        if !json {
            eprintln!();
            println!(
                "  catch-up: B held all {prefill} prefilled files {:.2} s after both started",
                took.as_secs_f64()
            );
        }
    }
    let nodes = a.state.join("nodes.json");
    let started = Instant::now();
    let port = loop {
        let port = NodesFile::read(&nodes).ok().and_then(|l| {
            (l.nodes.len() == 2).then_some(())?;
            l.node("a").map(|n| n.record.zones[0].nfs_port)
        });
        if let Some(port) = port {
            break port;
        }
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "gvd did not come up"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let url = |name: &str| {
        format!("nfs://127.0.0.1/z/{name}?nfsport={port}&mountport={port}&auto-traverse-mounts=0")
    };
    let client = |tool: &str| match &ganesha {
        Some(server) => server.host_client(tool),
        None => Command::new(tool),
    };
    let nfs_cp = |from: &Path, name: &str| {
        let status = client("nfs-cp")
            .arg(from)
            .arg(url(name))
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "nfs-cp {name}");
    };

    // Small files: latency from the write's completion to the identical file on B.
    let mut latencies = Vec::new();
    let mut ours = ClientFigures::default();
    for i in 0..small {
        let content: Vec<u8> = (0..4096u32).map(|j| (i as u32 * 31 + j) as u8).collect();
        let source = dir.join(format!("small-{i}"));
        std::fs::write(&source, &content).unwrap();
        let t = Instant::now();
        nfs_cp(&source, &format!("small-{i}"));
        ours.small_write.push(t.elapsed());
        latencies.push(wait_identical(
            &b.data.join(format!("small-{i}")),
            &content,
            Duration::from_secs(20),
        ));
        if !json {
            eprint!("\r  small files {}/{small}", i + 1);
        }
    }
    if !json {
        eprintln!();
    }
    let small_p50 = percentile(&mut latencies, 0.5);
    let small_p99 = percentile(&mut latencies, 0.99);
    let our_metadata = metadata_latency(port, port, "/z", "small-0", METADATA_CALLS);

    // Big files: throughput through NFS and the same on the local disk; replication latency.
    let big: Vec<u8> = (0..big_mb * (1 << 20)).map(|i| (i % 253) as u8).collect();
    let source = dir.join("big-source");
    std::fs::write(&source, &big).unwrap();
    let (mut nfs_write, mut local_write, mut nfs_read, mut local_read, mut big_latency) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    // Reads go to a file in memory rather than through a pipe to this process.
    let shm = Path::new("/dev/shm");
    let sink = if shm.is_dir() { shm } else { dir.as_path() }
        .join(format!("gvd-zones-bench-{}-read", std::process::id()));
    let mut theirs_big = ClientFigures::default();
    // Round 0 warms both servers up and is not counted: the first large copy of a run was
    // the slowest, whichever server it went to.
    for round in 0..=rounds {
        let name = format!("big-{round}");
        let counted = round > 0;
        let mut turns = [Server::Ours, Server::Ganesha];
        if round % 2 == 0 {
            turns.reverse();
        }
        for turn in turns {
            if turn == Server::Ganesha {
                if let Some(server) = &ganesha {
                    let t = Instant::now();
                    run(server.client("nfs-cp").arg(&source).arg(server.url(&name)));
                    let write = t.elapsed();
                    let read = timed_read(
                        server.client("nfs-cat").arg(server.url(&name)),
                        &sink,
                        big.len(),
                    );
                    if counted {
                        theirs_big.write.push(write);
                        theirs_big.read.push(read);
                    }
                }
                continue;
            }
            let t = Instant::now();
            nfs_cp(&source, &name);
            let write = t.elapsed();
            let replicated = wait_identical(&b.data.join(&name), &big, Duration::from_secs(120));
            let t = Instant::now();
            let local = dir.join(format!("local-{round}"));
            std::fs::copy(&source, &local).unwrap();
            std::fs::File::open(&local).unwrap().sync_all().unwrap();
            let copied = t.elapsed();
            let read = timed_read(client("nfs-cat").arg(url(&name)), &sink, big.len());
            let t = Instant::now();
            let local_bytes = std::fs::read(&local).unwrap();
            let read_locally = t.elapsed();
            assert_eq!(local_bytes.len(), big.len());
            if counted {
                nfs_write.push(write);
                ours.write.push(write);
                big_latency.push(replicated);
                local_write.push(copied);
                nfs_read.push(read);
                ours.read.push(read);
                local_read.push(read_locally);
            }
        }
        if !json {
            eprint!("\r  big files {round}/{rounds}");
        }
    }
    if !json {
        eprintln!();
    }
    let mb = big.len() as f64 / 1e6;
    let rate = |samples: &mut Vec<Duration>| mb / (percentile(samples, 0.5) / 1e3);
    let (nw, lw, nr, lr) = (
        rate(&mut nfs_write),
        rate(&mut local_write),
        rate(&mut nfs_read),
        rate(&mut local_read),
    );
    let big_p50 = percentile(&mut big_latency, 0.5);
    let big_max = percentile(&mut big_latency, 1.0);
    drop((a, b));
    // The same client, the same files and the same disk, against nfs-ganesha.
    let theirs = ganesha.as_ref().map(|server| {
        let mut figures = ClientFigures {
            write: theirs_big.write,
            read: theirs_big.read,
            ..ClientFigures::default()
        };
        for i in 0..small {
            let t = Instant::now();
            run(server
                .client("nfs-cp")
                .arg(dir.join(format!("small-{i}")))
                .arg(server.url(&format!("small-{i}"))));
            figures.small_write.push(t.elapsed());
        }
        let program = std::env::current_exe().unwrap();
        let export = server.export.display().to_string();
        let output = run(server.client(program.to_str().unwrap()).args([
            "--metadata-client",
            "20048",
            "2049",
            &export,
            "small-0",
        ]));
        figures.metadata = serde_json::from_slice(&output).unwrap();
        figures
    });
    drop(ganesha);
    let median_ms = |samples: &[Duration]| percentile(&mut samples.to_vec(), 0.5);
    let versus = theirs.map(|theirs| {
        let (ow, tw) = (
            mb / (median_ms(&ours.write) / 1e3),
            mb / (median_ms(&theirs.write) / 1e3),
        );
        let (or, tr) = (
            mb / (median_ms(&ours.read) / 1e3),
            mb / (median_ms(&theirs.read) / 1e3),
        );
        let (os, ts) = (median_ms(&ours.small_write), median_ms(&theirs.small_write));
        let p50 = |s: &[f64]| MetadataFigures::p(s, 0.5);
        serde_json::json!({
            "metadata": theirs.metadata.summary(),
            "getattr_ratio": p50(&our_metadata.getattr_us) / p50(&theirs.metadata.getattr_us),
            "lookup_ratio": p50(&our_metadata.lookup_us) / p50(&theirs.metadata.lookup_us),
            "readdirplus_ratio": p50(&our_metadata.readdirplus_us) / p50(&theirs.metadata.readdirplus_us),
            "write_mb_s": [ow, tw], "write_ratio": ow / tw,
            "read_mb_s": [or, tr], "read_ratio": or / tr,
            "small_write_ms": [os, ts], "small_write_ratio": os / ts,
        })
    });
    let _ = std::fs::remove_dir_all(&dir);
    if json {
        println!(
            "{}",
            serde_json::json!({
                "debounce_ms": DEBOUNCE_MS,
                "prefill": prefill, "catch_up_s": catch_up.map(|d| d.as_secs_f64()),
                "small_files": small, "small_p50_ms": small_p50, "small_p99_ms": small_p99,
                "big_mb": big_mb, "big_rounds": rounds, "big_p50_ms": big_p50, "big_max_ms": big_max,
                "nfs_write_mb_s": nw, "local_write_mb_s": lw, "nfs_read_mb_s": nr, "local_read_mb_s": lr,
                "small_write_ms": median_ms(&ours.small_write),
                "metadata": our_metadata.summary(),
                "versus_ganesha": versus,
            })
        );
        return;
    }
    println!("GrapeVineFS, two members on loopback, debounce {DEBOUNCE_MS} ms");
    println!("  replication, 4 KiB files ({small}): p50 {small_p50:.0} ms, p99 {small_p99:.0} ms after the write returned");
    println!("  replication, {big_mb} MB files ({rounds}): p50 {big_p50:.0} ms, max {big_max:.0} ms after the write returned");
    println!(
        "  write: NFS {nw:.0} MB/s, local copy + fsync {lw:.0} MB/s (ratio {:.2})",
        nw / lw
    );
    println!(
        "  read:  NFS {nr:.0} MB/s, local read {lr:.0} MB/s (ratio {:.2})",
        nr / lr
    );
    let line = |m: &MetadataFigures| {
        let q = |s: &[f64]| (MetadataFigures::p(s, 0.5), MetadataFigures::p(s, 0.99));
        let ((g50, g99), (l50, l99), (r50, r99)) =
            (q(&m.getattr_us), q(&m.lookup_us), q(&m.readdirplus_us));
        format!(
            "GETATTR p50 {g50:.0} µs p99 {g99:.0}; LOOKUP p50 {l50:.0} µs p99 {l99:.0}; \
             READDIRPLUS of {} entries p50 {r50:.0} µs p99 {r99:.0}",
            m.entries
        )
    };
    println!(
        "  one session, {METADATA_CALLS} calls each: {}",
        line(&our_metadata)
    );
    if let Some(v) = &versus {
        if let Ok(theirs) = serde_json::from_value::<serde_json::Value>(v["metadata"].clone()) {
            let ratio = |k: &str| v[k].as_f64().unwrap_or(0.0);
            println!(
                "  nfs-ganesha, same session pattern: GETATTR p50 {} µs, LOOKUP p50 {} µs, READDIRPLUS p50 {} µs (p50 ratios {:.2}, {:.2}, {:.2})",
                theirs["getattr_p50_p99_us"][0],
                theirs["lookup_p50_p99_us"][0],
                theirs["readdirplus_p50_p99_us"][0],
                ratio("getattr_ratio"),
                ratio("lookup_ratio"),
                ratio("readdirplus_ratio")
            );
        }
    }
    if let Some(v) = versus {
        let pair = |k: &str| {
            (
                v[k][0].as_f64().unwrap_or(0.0),
                v[k][1].as_f64().unwrap_or(0.0),
            )
        };
        let ((ow, tw), (or, tr), (os, ts)) = (
            pair("write_mb_s"),
            pair("read_mb_s"),
            pair("small_write_ms"),
        );
        println!("  against nfs-ganesha 4 (FSAL VFS), same client, files and disk:");
        println!("    write {ow:.0} vs {tw:.0} MB/s (ratio {:.2})", ow / tw);
        println!("    read  {or:.0} vs {tr:.0} MB/s (ratio {:.2})", or / tr);
        println!(
            "    4 KiB file write {os:.1} vs {ts:.1} ms (ratio {:.2})",
            os / ts
        );
    }
}
