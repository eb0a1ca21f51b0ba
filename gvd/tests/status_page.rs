//! gvd's status page in a real headless browser (Debian `chromium`): three gvd on loopback
//! with the echo driver and a zone on all three; the page, once its script has run, lists the
//! three nodes alive with their VDEVs, the zone on each member, the streams followed, and
//! draws its charts. The JSON and metrics endpoints answer too, and a page on a non-loopback
//! address refuses requests without the token.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{built, Gvd};
use grapevine_test_support::{free_tcp_port, scratch, wait_until};

const GROUP: &str = "239.255.79.70:47970";

fn start(dir: &Path, name: &str, admin: u16) -> Gvd {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "repl_port = 0\nzone_scan_interval_ms = 300\n[[zones]]\nname = \"photos\"\nquota_bytes = 8000000\n\
             members = [\"a\", \"b\", \"c\"]\npath = \"{}\"\n",
            dir.join(format!("{name}-data")).display()
        ),
    )
    .unwrap();
    let admin = format!("127.0.0.1:{admin}");
    let node = Gvd::start(
        dir,
        name,
        GROUP,
        &[
            "--config",
            config.to_str().unwrap(),
            "--admin-address",
            &admin,
        ],
    );
    std::fs::copy(built("gv_echo"), node.drivers.join("echo.so")).unwrap();
    node
}

/// The body of `GET path` on `127.0.0.1:port` (empty when it does not answer).
fn get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return String::new();
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let request = format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
    if stream.write_all(request.as_bytes()).is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

#[test]
#[ignore = "needs chromium (Debian package) for a real headless browser; .ci/run installs it and runs it with --include-ignored"]
fn the_status_page_shows_the_cluster_in_a_browser() {
    let chromium = ["chromium", "chromium-browser"]
        .into_iter()
        .find(|b| Command::new(b).arg("--version").output().is_ok())
        .expect("needs chromium (apt-get install chromium)");
    let dir = scratch("status-page");
    let ports = [free_tcp_port(), free_tcp_port(), free_tcp_port()];
    let nodes: Vec<Gvd> = ["a", "b", "c"]
        .iter()
        .zip(ports)
        .map(|(name, port)| start(&dir, name, port))
        .collect();
    let page = format!("http://127.0.0.1:{}/", ports[0]);
    // The echo driver is picked up at the next rescan (SIGHUP-free: file appeared).
    let ready = wait_until(Duration::from_secs(20), || {
        let status = get(ports[0], "/api/status");
        ["\"name\":\"a\"", "\"name\":\"b\"", "\"name\":\"c\""]
            .iter()
            .all(|n| status.contains(n))
            && status.matches("\"liveness\":\"alive\"").count() == 3
            && status.matches("\"echo0\"").count() == 3
            && status.matches("\"photos\"").count() >= 3
    });
    assert!(
        ready,
        "the JSON status lists the cluster: {}",
        get(ports[0], "/api/status")
    );
    // A file put straight into b's zone directory is found by b's scan and pulled by a: a's
    // zone activity counts the pull.
    std::fs::write(dir.join("b-data").join("hello.txt"), b"hello").unwrap();
    let pulled = wait_until(Duration::from_secs(20), || {
        std::fs::read(dir.join("a-data").join("hello.txt")).is_ok_and(|b| b == b"hello")
            && get(ports[0], "/api/status").contains("\"pulls_done\":")
            && !get(ports[0], "/api/status").contains("\"pulls_done\":0")
    });
    assert!(
        pulled,
        "a pulled b's file: {}",
        get(ports[0], "/api/status")
    );
    let metrics = get(ports[0], "/metrics");
    assert!(metrics.contains("gvd_nodes_alive{node="), "{metrics}");
    assert!(
        metrics.contains("gvd_zone_pulls_done_total{node=") && metrics.contains("zone=\"photos\"}"),
        "{metrics}"
    );
    let status = get(ports[0], "/api/status");
    assert!(
        status.contains("\"messages_per_second\":") && status.contains("\"session\":\""),
        "streams carry their rate and hex session: {status}"
    );

    let rendered = Command::new(chromium)
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=5000",
            "--dump-dom",
            &page,
        ])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&rendered.stdout);
    assert!(
        rendered.status.success(),
        "{}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    for name in ["a", "b", "c"] {
        assert!(
            dom.contains(&format!("<td class=\"node-name\">{name}</td>")),
            "node {name} listed: {dom}"
        );
    }
    assert_eq!(
        dom.matches("<td class=\"alive\">alive</td>").count(),
        3,
        "{dom}"
    );
    assert!(
        dom.matches(">echo0</td>").count() >= 3,
        "VDEVs of every node: {dom}"
    );
    assert!(
        dom.matches("<td>photos</td>").count() >= 3,
        "the zone on each member: {dom}"
    );
    assert!(
        dom.contains("<td class=\"live\">live</td>"),
        "streams followed: {dom}"
    );
    assert_eq!(
        dom.matches("></polyline>").count(),
        4,
        "four charts drawn: {dom}"
    );
    assert!(
        dom.contains("<td class=\"pulls\">0 pending, ")
            || dom.contains("<td class=\"pulls stalled\">"),
        "this node's pulls in its zone row: {dom}"
    );
    assert!(
        !dom.contains("<td class=\"pulls\">0 pending, 0 done"),
        "the pull of b's file counted: {dom}"
    );
    assert!(dom.contains("<td class=\"rate\">"), "stream rates: {dom}");
    assert!(
        dom.contains("<td class=\"publisher\">b</td>"),
        "publishers by node name: {dom}"
    );
    assert!(
        dom.contains("<span id=\"error\"></span>"),
        "no error shown: {dom}"
    );
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
