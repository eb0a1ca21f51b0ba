//! What an operator sees: gvd says what it runs with when it starts and that it stopped, warns
//! about a VDRIVER directory that does not exist, and keeps colours out of non-terminals.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use grapevine_test_support::{run, scratch};

#[test]
fn gvd_logs_one_start_line_and_one_stop_line() {
    let dir = scratch("gvd-logs");
    let child = Command::new(env!("CARGO_BIN_EXE_gvd"))
        .args(["run", "--name", "logger", "--group", "239.255.79.61:47961"])
        .args(["--query-port", "0", "--kos-port", "0", "--repl-port", "0"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--vdriver-path")
        .arg(dir.join("no-such-directory"))
        .env_remove("RUST_LOG")
        .env_remove("GVD_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed and reaped whatever the test does (a failed assertion included).
    let mut child = grapevine_test_support::Reaped(child);
    let (lines, received) = mpsc::channel();
    let stderr = child.0.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if lines.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    while !seen.iter().any(|l: &String| l.contains("gvd started")) {
        let line = received
            .recv_timeout(Duration::from_secs(10))
            .unwrap_or_else(|_| panic!("no start line: {seen:#?}"));
        seen.push(line);
    }
    run(&["kill", "-TERM", &child.0.id().to_string()]).unwrap();
    let status = child.0.wait().unwrap();
    seen.extend(received.iter());
    let text = seen.join("\n");
    assert!(status.success(), "{text}");
    let started = seen.iter().find(|l| l.contains("gvd started")).unwrap();
    for field in [
        "node=",
        "name=logger",
        "iface=lo",
        "group=239.255.79.61:47961",
        "query_port=",
        "kos=",
        "zones=",
        "drivers=0",
        "keyed=false",
    ] {
        assert!(started.contains(field), "{field} missing from {started}");
    }
    assert!(text.contains("VDRIVER directory not found"), "{text}");
    assert_eq!(text.matches("gvd started").count(), 1, "{text}");
    assert_eq!(text.matches("gvd stopped").count(), 1, "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "no colour codes in a pipe: {text}"
    );
    assert!(
        !text.contains("publisher started"),
        "library chatter filtered: {text}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

fn gvd(dir: &std::path::Path, name: &str, group: &str) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_gvd"));
    command
        .args([
            "run",
            "--name",
            name,
            "--group",
            group,
            "--elp-delay-ms",
            "200",
        ])
        .args(["--query-port", "0", "--kos-port", "0", "--repl-port", "0"])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--vdriver-path")
        .arg(dir.join("drivers"))
        .env_remove("GVD_CONFIG")
        .stdout(Stdio::null());
    command
}

fn gvctl_nodes(dir: &std::path::Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_gvctl"))
        .arg("nodes")
        .env("GV_NODES_PATH", dir.join("state").join("nodes.json"))
        .output()
        .unwrap()
}

#[test]
fn gvctl_says_when_gvd_is_not_running() {
    let dir = scratch("gvd-stopped");
    std::fs::create_dir_all(dir.join("drivers")).unwrap();
    let child = gvd(&dir, "stopper", "239.255.79.62:47962")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed and reaped whatever the test does (a failed assertion included).
    let mut child = grapevine_test_support::Reaped(child);
    let listed = grapevine_test_support::wait_until(Duration::from_secs(10), || {
        let output = gvctl_nodes(&dir);
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("stopper")
    });
    assert!(listed, "gvctl nodes lists the node while gvd runs");
    // The groups it uses are in the list, for `grapevine spy --via-gvd`.
    let list: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state").join("nodes.json")).unwrap())
            .unwrap();
    let groups: Vec<&str> = list["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["group"].as_str().unwrap())
        .collect();
    assert_eq!(groups, ["239.255.79.62:47962", "239.255.79.62:47963"]);
    run(&["kill", "-TERM", &child.0.id().to_string()]).unwrap();
    assert!(child.0.wait().unwrap().success());
    let output = gvctl_nodes(&dir);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("is not running"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_second_gvd_on_the_same_state_directory_is_refused() {
    let dir = scratch("gvd-twice");
    std::fs::create_dir_all(dir.join("drivers")).unwrap();
    let first = gvd(&dir, "first", "239.255.79.63:47963")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let first = grapevine_test_support::Reaped(first);
    assert!(grapevine_test_support::wait_until(
        Duration::from_secs(10),
        || dir.join("state").join("nodes.json").exists()
    ));
    let second = gvd(&dir, "second", "239.255.79.63:47963")
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains("another gvd is running on the state directory"),
        "{stderr}"
    );
    drop(first);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_config_prints_the_merged_settings_or_says_what_is_wrong() {
    let output = Command::new(env!("CARGO_BIN_EXE_gvd"))
        .args([
            "check-config",
            "--name",
            "checked",
            "--elp-delay-ms",
            "250",
            "--zone-debounce-ms",
            "900",
            "--zone-scan-interval-ms",
            "7000",
            "--max-frame",
            "65536",
            "--dht-interval-ms",
            "60000",
        ])
        .env_remove("GVD_CONFIG")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    for setting in [
        "name = \"checked\"",
        "elp_delay_ms = 250",
        "zone_debounce_ms = 900",
        "zone_scan_interval_ms = 7000",
        "max_frame = 65536",
        "dht_interval_ms = 60000",
    ] {
        assert!(text.contains(setting), "{setting}: {text}");
    }
    let output = Command::new(env!("CARGO_BIN_EXE_gvd"))
        .args(["check-config", "--node-ttl", "0"])
        .env_remove("GVD_CONFIG")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("node_ttl = 0 is out of range"), "{stderr}");
}

#[test]
fn gvd_tells_systemd_when_it_is_ready_and_when_it_stops() {
    let dir = scratch("gvd-notify");
    std::fs::create_dir_all(dir.join("drivers")).unwrap();
    let socket_path = dir.join("notify.sock");
    let socket = std::os::unix::net::UnixDatagram::bind(&socket_path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let child = gvd(&dir, "notified", "239.255.79.64:47964")
        .env("NOTIFY_SOCKET", &socket_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Killed and reaped whatever the test does (a failed assertion included).
    let mut child = grapevine_test_support::Reaped(child);
    let mut buffer = [0u8; 256];
    let len = socket.recv(&mut buffer).expect("a readiness message");
    assert!(String::from_utf8_lossy(&buffer[..len]).contains("READY=1"));
    run(&["kill", "-TERM", &child.0.id().to_string()]).unwrap();
    let len = socket.recv(&mut buffer).expect("a stopping message");
    assert!(String::from_utf8_lossy(&buffer[..len]).contains("STOPPING=1"));
    assert!(child.0.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = scratch("gvd-json-logs");
    std::fs::create_dir_all(dir.join("drivers")).unwrap();
    let child = gvd(&dir, "jsonlog", "239.255.79.65:47965")
        .arg("--log-format")
        .arg("json")
        .env_remove("RUST_LOG")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Killed and reaped whatever the test does (a failed assertion included).
    let mut child = grapevine_test_support::Reaped(child);
    let stderr = child.0.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let mut started = false;
    for line in lines.by_ref().take(20) {
        let line = line.unwrap();
        let object: serde_json::Value = serde_json::from_str(&line).expect("a JSON object");
        if object["fields"]["message"] == "gvd started" {
            assert_eq!(object["fields"]["name"], "jsonlog");
            started = true;
            break;
        }
    }
    assert!(started, "a JSON start line");
    run(&["kill", "-TERM", &child.0.id().to_string()]).unwrap();
    for line in lines {
        serde_json::from_str::<serde_json::Value>(&line.unwrap()).expect("a JSON object");
    }
    assert!(child.0.wait().unwrap().success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn gvd_and_gvctl_have_completions_and_manual_pages() {
    for (binary, name) in [
        (env!("CARGO_BIN_EXE_gvd"), "gvd"),
        (env!("CARGO_BIN_EXE_gvctl"), "gvctl"),
    ] {
        let bash = Command::new(binary)
            .args(["completions", "bash"])
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&bash.stdout).contains(&format!("_{name}()")));
        let man = Command::new(binary).arg("manpage").output().unwrap();
        assert!(String::from_utf8_lossy(&man.stdout).contains(&format!(".TH {name} 1")));
    }
}
