//! The operator tools: record then replay reproduces the publisher's state, a damaged recording
//! replays up to the damage, spy sees topics, rates and a gap, and pub serves its counters.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use grapevine_test_support::{scratch, stdout_of};
use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use grapevine::core::wire::{Datagram, Message};
use grapevine_cli::recording::{RecordReader, RecordWriter};

fn grapevine(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_grapevine"));
    command.args(args);
    command
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Records `group` while a publisher sends 3000 updates on it; returns the publisher's final
/// digest.
fn record_a_publisher(group: &str, file: &Path) -> String {
    let recorder = grapevine(&[
        "record",
        file.to_str().unwrap(),
        "--group",
        group,
        "--seconds",
        "3",
    ])
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let publisher = grapevine(&[
        "pub",
        "--group",
        group,
        "--rate",
        "3000",
        "--updates",
        "3000",
        "--seconds",
        "2",
    ])
    .output()
    .unwrap();
    assert!(publisher.status.success());
    let mut recorder = recorder;
    assert!(recorder.wait().unwrap().success());
    let stdout = String::from_utf8_lossy(&publisher.stdout);
    stdout
        .lines()
        .last()
        .and_then(|l| l.split("digest ").nth(1))
        .expect("the publisher prints its digest")
        .trim()
        .to_string()
}

fn replayed_digests(output: &Output) -> Vec<String> {
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("JSON state");
    json["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["digest"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn record_then_replay_reproduces_the_state() {
    let dir = scratch("replay");
    let file = dir.join("feed.gvrec");
    let digest = record_a_publisher("239.255.73.20:47320", &file);
    let replay = grapevine(&["replay", file.to_str().unwrap(), "--to-state", "--json"])
        .output()
        .unwrap();
    stdout_of(&replay);
    assert_eq!(replayed_digests(&replay), vec![digest.clone()]);

    // Cut in the middle of a record: replays up to the damage and says where.
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.join("cut.gvrec");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3 + 5]).unwrap();
    let replay = grapevine(&["replay", cut.to_str().unwrap(), "--to-state", "--json"])
        .output()
        .unwrap();
    assert!(replay.status.success());
    let stderr = String::from_utf8_lossy(&replay.stderr);
    assert!(
        stderr.contains("damaged at byte") && stderr.contains("truncated"),
        "{stderr}"
    );
    assert_eq!(
        replayed_digests(&replay).len(),
        1,
        "the part before the damage is replayed"
    );
    let garbage = dir.join("garbage.gvrec");
    std::fs::write(&garbage, b"hello").unwrap();
    let replay = grapevine(&["replay", garbage.to_str().unwrap(), "--to-state"])
        .output()
        .unwrap();
    assert_eq!(replay.status.code(), Some(1), "a runtime error");
    assert!(String::from_utf8_lossy(&replay.stderr).contains("not a recording"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spy_sees_topics_rates_and_an_injected_gap() {
    let dir = scratch("spy");
    let file = dir.join("feed.gvrec");
    record_a_publisher("239.255.73.21:47321", &file);
    // The same recording without one datagram of deltas: a gap.
    let records: Vec<_> = RecordReader::new(std::fs::File::open(&file).unwrap())
        .unwrap()
        .map(Result::unwrap)
        .collect();
    let mut dropped = false;
    let mut writer = RecordWriter::new(Vec::new()).unwrap();
    for (i, record) in records.iter().enumerate() {
        let has_delta = Datagram::parse(&record.payload)
            .is_ok_and(|d| d.messages().any(|m| matches!(m, Message::Delta { .. })));
        if !dropped && has_delta && i > records.len() / 3 {
            dropped = true;
            continue;
        }
        writer.write(record).unwrap();
    }
    assert!(dropped);
    let gapped = dir.join("gapped.gvrec");
    std::fs::write(&gapped, writer.finish().unwrap()).unwrap();

    let group = "239.255.73.22:47322";
    let spy = grapevine(&[
        "spy",
        "--group",
        group,
        "--seconds",
        "3",
        "--interval",
        "0.5",
        "--json",
    ])
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    let spy = Running(spy);
    std::thread::sleep(Duration::from_millis(300));
    let replay = grapevine(&[
        "replay",
        gapped.to_str().unwrap(),
        "--group",
        group,
        "--speed",
        "2",
    ])
    .output()
    .unwrap();
    stdout_of(&replay);
    let mut spy = spy;
    let mut stdout = String::new();
    spy.0
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    let lines: Vec<serde_json::Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let last = lines.last().expect("spy reported");
    assert_eq!(last["topic"], 1);
    assert_eq!(last["gaps"], 1, "{last}");
    assert!(last["lost"].as_u64().unwrap() >= 1);
    assert_eq!(last["last_seq"], 3000);
    assert!(last["cycles"].as_u64().unwrap() > 0, "snapshot cycles seen");
    assert!(
        lines
            .iter()
            .any(|l| l["messages_per_second"].as_f64().unwrap() > 100.0),
        "a rate while it played"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pub_serves_its_counters_for_prometheus() {
    let publisher = grapevine(&[
        "pub",
        "--group",
        "239.255.73.23:47323",
        "--rate",
        "1000",
        "--seconds",
        "4",
        "--metrics",
        "127.0.0.1:47324",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let _publisher = Running(publisher);
    let mut body = String::new();
    for _ in 0..40 {
        std::thread::sleep(Duration::from_millis(100));
        let Ok(mut stream) = std::net::TcpStream::connect("127.0.0.1:47324") else {
            continue;
        };
        stream.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
        body.clear();
        stream.read_to_string(&mut body).unwrap();
        if body.contains("grapevine_publisher_deltas_total{") {
            break;
        }
    }
    assert!(
        body.contains("# TYPE grapevine_publisher_deltas_total counter"),
        "{body}"
    );
    assert!(
        body.contains("grapevine_snapshot_cycles_total{topic=\"1\",publisher=\"0\"}"),
        "{body}"
    );
}

/// On a keyed feed, an unkeyed publisher on the same group is refused, and `sub --json` says
/// so in its counters while showing the real publisher's book.
#[test]
fn sub_json_counts_refused_datagrams() {
    let dir = scratch("keyed-sub");
    let key = dir.join("feed.key");
    std::fs::write(&key, format!("1:{}\n", "4b".repeat(32))).unwrap();
    let group = "239.255.70.95:7095";
    let key = key.to_str().unwrap();
    let subscriber = grapevine(&[
        "sub",
        "--group",
        group,
        "--key-file",
        key,
        "--json",
        "--seconds",
        "3",
    ])
    .stderr(Stdio::null())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let run = |extra: &[&str]| {
        let mut args = vec![
            "pub",
            "--group",
            group,
            "--rate",
            "2000",
            "--updates",
            "2000",
            "--seconds",
            "2",
        ];
        args.extend_from_slice(extra);
        grapevine(&args).stderr(Stdio::null()).spawn().unwrap()
    };
    let mut real = run(&["--key-file", key]);
    let mut forger = run(&["--publisher-id", "7"]);
    assert!(real.wait().unwrap().success());
    assert!(forger.wait().unwrap().success());
    let output = subscriber.wait_with_output().unwrap();
    let last: serde_json::Value = String::from_utf8_lossy(&output.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a status line");
    assert_eq!(
        last["publisher"], 0,
        "only the keyed publisher is followed: {last}"
    );
    assert!(last["unauthenticated"].as_u64().unwrap() > 0, "{last}");
    for counter in ["replayed", "retired_session", "streams_refused"] {
        assert!(last[counter].is_u64(), "{counter} missing: {last}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `keygen --ed25519` makes a key pair: the publisher signs with the secret key, a subscriber
/// with only the public key follows it, and the public key cannot publish. Nothing is
/// overwritten.
#[test]
fn keygen_makes_a_publisher_key_pair_that_works_end_to_end() {
    let dir = scratch("keygen");
    let (secret, public) = (dir.join("pub.key"), dir.join("sub.key"));
    let keygen = grapevine(&[
        "keygen",
        secret.to_str().unwrap(),
        "--ed25519",
        "--public",
        public.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert!(keygen.status.success());
    let again = grapevine(&["keygen", secret.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!again.status.success(), "an existing key file was replaced");
    assert!(std::fs::read_to_string(&secret)
        .unwrap()
        .starts_with("ed25519-secret"));
    let refused = grapevine(&[
        "pub",
        "--key-file",
        public.to_str().unwrap(),
        "--seconds",
        "1",
    ])
    .output()
    .unwrap();
    assert!(!refused.status.success(), "a public key cannot publish");

    let group = "239.255.70.96:7096";
    let subscriber = grapevine(&[
        "sub",
        "--group",
        group,
        "--key-file",
        public.to_str().unwrap(),
        "--json",
        "--seconds",
        "3",
    ])
    .stderr(Stdio::null())
    .stdout(Stdio::piped())
    .spawn()
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let publisher = grapevine(&[
        "pub",
        "--group",
        group,
        "--key-file",
        secret.to_str().unwrap(),
        "--rate",
        "2000",
        "--updates",
        "2000",
        "--seconds",
        "2",
    ])
    .output()
    .unwrap();
    assert!(publisher.status.success());
    let digest = String::from_utf8_lossy(&publisher.stdout)
        .lines()
        .last()
        .and_then(|l| l.split("digest ").nth(1))
        .unwrap()
        .trim()
        .to_string();
    let output = subscriber.wait_with_output().unwrap();
    let last: serde_json::Value = String::from_utf8_lossy(&output.stdout)
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .expect("a status line");
    assert_eq!(last["status"], "live", "{last}");
    assert_eq!(last["digest"], digest.as_str(), "{last}");
    assert_eq!(last["unauthenticated"], 0, "{last}");
    let _ = std::fs::remove_dir_all(&dir);
}
