//! `grapevine bench` runs end to end and reports every figure as JSON (tiny runs: the figures
//! themselves are for release builds, see docs/PERFORMANCE.md).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

fn bench(args: &[&str]) -> serde_json::Value {
    let output = Command::new(env!("CARGO_BIN_EXE_grapevine"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run grapevine bench");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{args:?} failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {stdout}"))
}

#[test]
fn throughput_reports_both_stacks_and_their_ratio() {
    let report = bench(&[
        "throughput",
        "--seconds",
        "0.3",
        "--pre-encoded",
        "--group",
        "239.255.78.1:47800",
    ]);
    assert!(
        report["pre_encoded_ratio"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert_eq!(
        report["grapevine_pre_encoded"]["loss"].as_f64(),
        Some(0.0),
        "{report}"
    );
    for stack in ["grapevine", "raw"] {
        let figures = &report[stack];
        assert!(
            figures["messages_per_second"].as_f64().unwrap() > 0.0,
            "{report}"
        );
        // Flow control keeps the receiver's buffer from overflowing; the tail of a debug-build
        // run may still miss a few datagrams, which the report shows.
        assert!(figures["loss"].as_f64().unwrap() < 0.01, "{report}");
    }
    assert!(report["ratio"].as_f64().unwrap() > 0.0);
}

#[test]
fn latency_reports_percentiles_for_both_stacks() {
    let report = bench(&["latency", "--count", "300", "--group", "239.255.78.2:47810"]);
    for stack in ["grapevine", "raw"] {
        let figures = &report[stack];
        assert_eq!(figures["count"], 300, "{report}");
        let p50 = figures["p50_us"].as_f64().unwrap();
        let p99 = figures["p99_us"].as_f64().unwrap();
        assert!(p50 > 0.0 && p99 >= p50, "{report}");
    }
}

#[test]
fn recovery_reports_time_to_live() {
    let report = bench(&[
        "recovery",
        "--leaves",
        "500",
        "--rounds",
        "3",
        "--group",
        "239.255.78.3:47820",
    ]);
    assert!(report["rounds"].as_u64().unwrap() >= 1, "{report}");
    let median = report["median_ms"].as_f64().unwrap();
    // 500 leaves at 100 000 leaves/s: a 5 ms walk plus a 10 ms pause per cycle.
    assert!(median > 0.0 && median < 5_000.0, "{report}");
}

#[test]
fn repeater_and_auth_report_their_costs() {
    let report = bench(&[
        "repeater",
        "--seconds",
        "0.3",
        "--group",
        "239.255.78.5:47850",
    ]);
    assert!(
        report["repeated_p50_us"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["repeated"]["messages_per_second"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    let report = bench(&[
        "throughput",
        "--auth",
        "--seconds",
        "0.3",
        "--group",
        "239.255.78.9:47890",
    ]);
    assert!(report["auth_ratio"].as_f64().unwrap() > 0.0, "{report}");
    assert!(
        report["grapevine_signed"]["loss"].as_f64().unwrap() < 0.05,
        "{report}"
    );
}

#[test]
fn fanout_reports_each_subscriber_process_against_one_alone() {
    let report = bench(&[
        "fanout",
        "--seconds",
        "0.3",
        "--subscribers",
        "2",
        "--group",
        "239.255.78.7:47870",
    ]);
    assert_eq!(
        report["single"]["subscribers"].as_array().unwrap().len(),
        1,
        "{report}"
    );
    let many = report["fanout"]["subscribers"].as_array().unwrap();
    assert_eq!(many.len(), 2, "{report}");
    for subscriber in many {
        assert!(subscriber["processed"].as_u64().unwrap() > 0, "{report}");
        assert_eq!(subscriber["lost"], 0, "paced by the slowest: {report}");
    }
    assert_eq!(report["ratios"].as_array().unwrap().len(), 2, "{report}");
    assert!(report["worst_ratio"].as_f64().unwrap() > 0.0, "{report}");
}

#[test]
fn repeater_bench_runs_over_quic() {
    let report = bench(&[
        "repeater",
        "--wan",
        "quic",
        "--seconds",
        "0.3",
        "--group",
        "239.255.78.8:47880",
    ]);
    assert_eq!(report["wan"], "quic", "{report}");
    assert!(
        report["throughput_ratio"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        report["repeated"]["received"].as_u64().unwrap() > 0,
        "{report}"
    );
}
