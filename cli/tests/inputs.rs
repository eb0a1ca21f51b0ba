//! Bad input to the `grapevine` command is a one-line error with a non-zero exit and no
//! backtrace: usage errors (2) before anything runs, runtime errors (1); a closed pipe ends
//! quietly; an existing recording is never overwritten unless asked.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use grapevine_test_support::scratch;

fn grapevine(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_grapevine"));
    command.args(args).env_remove("GRAPEVINE_GROUP");
    command
}

#[test]
fn bad_values_are_usage_errors_that_say_what_is_allowed() {
    let cases: &[(&[&str], &str)] = &[
        (&["pub", "--seconds", "nan"], "out of range"),
        (&["pub", "--seconds", "inf"], "out of range"),
        (&["pub", "--seconds", "1e30"], "out of range"),
        (&["pub", "--seconds", "-1"], "out of range"),
        (&["demo", "--settle", "nan"], "out of range"),
        (
            &["replay", "x.gvrec", "--speed", "1e-300"],
            "speed 1e-300 is out of range",
        ),
        (&["sub", "--loss", "2"], "must be in [0, 1)"),
        (&["sub", "--loss", "NaN"], "must be in [0, 1)"),
        (&["demo", "--loss", "1.5"], "must be in [0, 1)"),
        (&["pub", "--rate", "0"], "a rate of 0 never sends anything"),
        (
            &["pub", "--snapshot-rate", "0"],
            "a rate of 0 never sends anything",
        ),
        (&["pub", "--group", "239.255.1.1"], "is not ADDRESS:PORT"),
        (
            &["sub", "--group", "10.0.0.1:7000"],
            "not a multicast address",
        ),
        (&["spy", "--group", "239.255.1.1:0"], "port other than 0"),
        (
            &["spy", "--group", "239.255.1.1:7000", "--interval", "0"],
            "too short",
        ),
        (
            &["repeat", "--listen", "127.0.0.1:0", "--peer", "127.0.0.1:7"],
            "must not be 0",
        ),
    ];
    for (args, expected) in cases {
        let output = grapevine(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let lines = stderr.lines().filter(|l| !l.trim().is_empty()).count();
        assert!(lines <= 2, "{args:?}: one line (and clap's hint): {stderr}");
    }
}

#[test]
fn a_runtime_failure_exits_1_with_one_line() {
    let dir = scratch("inputs-runtime");
    let missing = dir.join("missing.gvrec");
    let output = grapevine(&["replay", missing.to_str().unwrap(), "--to-state"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.starts_with("error: "), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

#[test]
fn an_existing_recording_is_not_overwritten_without_force() {
    let dir = scratch("inputs-record");
    let file = dir.join("feed.gvrec");
    std::fs::write(&file, b"precious").unwrap();
    let output = grapevine(&[
        "record",
        file.to_str().unwrap(),
        "--group",
        "239.255.73.91:47391",
        "--seconds",
        "0.2",
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("exists") && stderr.contains("--force"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
    let output = grapevine(&[
        "record",
        file.to_str().unwrap(),
        "--group",
        "239.255.73.91:47391",
        "--seconds",
        "0.2",
        "--force",
    ])
    .output()
    .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_ne!(std::fs::read(&file).unwrap(), b"precious");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_closed_pipe_ends_the_command_quietly() {
    // `pub` prints a line at start and a report every second: read the first byte, close the
    // pipe, and the publisher must end at its next report, with status 0 and no panic.
    let mut child = grapevine(&["pub", "--group", "239.255.73.92:47392", "--seconds", "20"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout.read_exact(&mut first).unwrap();
    drop(stdout);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "still running after its reader left"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
fn completions_and_a_manual_page_are_generated() {
    let bash = grapevine(&["completions", "bash"]).output().unwrap();
    assert!(bash.status.success());
    let script = String::from_utf8_lossy(&bash.stdout);
    assert!(
        script.contains("_grapevine()") && script.contains("record"),
        "{script}"
    );
    let man = grapevine(&["manpage"]).output().unwrap();
    assert!(man.status.success());
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(
        page.contains(".TH grapevine 1") && page.contains("spy"),
        "{page}"
    );
}

#[test]
fn ipv6_on_loopback_works_or_says_why_once() {
    let output = grapevine(&[
        "pub",
        "--group",
        "[ff15::4756:21]:47421",
        "--seconds",
        "0.3",
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    if output.status.success() {
        return; // this host routes IPv6 multicast on loopback
    }
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("no IPv6 multicast route"), "{stderr}");
    assert!(stderr.contains("ip -6 route add multicast"), "{stderr}");
    assert!(
        stderr.matches("unreachable").count() <= 1,
        "said once: {stderr}"
    );
    // A subscriber there would wait in silence: it says why instead.
    let output = grapevine(&[
        "sub",
        "--group",
        "[ff15::4756:21]:47421",
        "--seconds",
        "0.3",
    ])
    .output()
    .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("no IPv6 multicast route on loopback"),
        "{stderr}"
    );
}

/// Publishes a gvd-like node record on `group` until `until` returns, then returns its output.
fn publish_records_while(group: &str, spy: &mut std::process::Child) -> String {
    use grapevine::core::net::MulticastConfig;
    use grapevine::core::state::{KeyedMap, MapDelta};
    use grapevine::publisher::{Publisher, PublisherOptions};
    use grapevine_gvd_schema::nodes::{NodeRecord, ELP_TOPIC};

    let options = PublisherOptions::new(ELP_TOPIC, MulticastConfig::new(group.parse().unwrap()));
    let publisher = Publisher::start(options, KeyedMap::<u64, NodeRecord>::default()).unwrap();
    let record = NodeRecord {
        node_id: 7,
        name: "spied-node".into(),
        addresses: vec!["127.0.0.1".into()],
        query_port: 7173,
        kos_port: 7174,
        repl_port: 0,
        zones: Vec::new(),
        unique: "u".into(),
        elp_delay_ms: 100,
    };
    // Announced every 100 ms, as gvd does, until the spy has ended.
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline && spy.try_wait().unwrap().is_none() {
        publisher.publish(MapDelta::Put(7, record.clone())).unwrap();
        publisher.flush();
        std::thread::sleep(Duration::from_millis(100));
    }
    grapevine_test_support::finish(spy, Instant::now() + Duration::from_secs(5))
}

#[test]
fn spy_via_gvd_watches_the_groups_in_the_node_list() {
    let dir = scratch("spy-via-gvd");
    let nodes = dir.join("nodes.json");
    std::fs::write(
        &nodes,
        r#"{"version":2,"local_node":1,"nodes":[],"groups":[{"name":"elp","group":"239.255.73.94:47394","iface":"lo"}]}"#,
    )
    .unwrap();
    let mut spy = grapevine(&[
        "spy",
        "--via-gvd",
        nodes.to_str().unwrap(),
        "--json",
        "--seconds",
        "2",
        "--interval",
        "0.5",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let output = publish_records_while("239.255.73.94:47394", &mut spy);
    assert!(
        output.contains("spied-node"),
        "decoded as gvd's without --decode: {output}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn spy_decodes_gvd_node_records() {
    let mut spy = grapevine(&[
        "spy",
        "--group",
        "239.255.73.93:47393",
        "--decode",
        "gvd",
        "--json",
        "--seconds",
        "2",
        "--interval",
        "0.5",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let output = publish_records_while("239.255.73.93:47393", &mut spy);
    assert!(
        output.contains("spied-node"),
        "the record decoded: {output}"
    );
}

#[test]
fn spy_decodes_any_topic_with_a_schema_file_and_refuses_a_bad_schema() {
    use grapevine_gvd_schema::nodes::ELP_TOPIC;
    let dir = scratch("spy-schema");
    let schemas = dir.join("topics.schema");
    std::fs::write(
        &schemas,
        format!(
            "# gvd's node records, written out as an application would its own type\n\
             {ELP_TOPIC} = mapdelta<u64, {{node_id: u64, name: string, addresses: [string], \
             query_port: u16, kos_port: u16, repl_port: u16, zones: [unit], unique: string, \
             elp_delay_ms: u64}}>\n"
        ),
    )
    .unwrap();
    let mut spy = grapevine(&[
        "spy",
        "--group",
        "239.255.73.95:47395",
        "--schema-file",
        schemas.to_str().unwrap(),
        "--json",
        "--seconds",
        "2",
        "--interval",
        "0.5",
    ])
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let output = publish_records_while("239.255.73.95:47395", &mut spy);
    assert!(
        output.contains(r#""latest":{"Put":[7,{"addresses":["127.0.0.1"],"elp_delay_ms":100,"#)
            && output.contains(r#""name":"spied-node""#),
        "decoded by the schema: {output}"
    );

    std::fs::write(&schemas, "7 = mapdelta<u64 string>\n").unwrap();
    let refused = grapevine(&[
        "spy",
        "--group",
        "239.255.73.95:47395",
        "--schema-file",
        schemas.to_str().unwrap(),
    ])
    .output()
    .unwrap();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("topics.schema:1") && stderr.contains("expected ','"),
        "{stderr}"
    );
    let usage = grapevine(&["spy", "--group", "239.255.73.95:47395", "--schema", "x"])
        .output()
        .unwrap();
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("expected TOPIC=TYPE"));
    let _ = std::fs::remove_dir_all(&dir);
}
