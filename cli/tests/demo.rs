//! The README's main command: the demo converges under loss and says so.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

#[test]
fn demo_converges_under_loss() {
    let output = Command::new(env!("CARGO_BIN_EXE_grapevine"))
        .args([
            "demo",
            "--subscribers",
            "3",
            "--loss",
            "0.1",
            "--updates",
            "20000",
            "--seconds",
            "1",
            "--group",
            "239.255.73.1:47301",
        ])
        .output()
        .expect("run grapevine demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let last = stdout.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("converged: 3/3 subscribers, digest "),
        "{last}"
    );
    assert!(
        stdout.contains("[  0.5s] published"),
        "live figures while running:\n{stdout}"
    );
}

#[test]
fn demo_rejects_bad_arguments() {
    let output = Command::new(env!("CARGO_BIN_EXE_grapevine"))
        .args(["demo", "--loss", "1.5"])
        .output()
        .expect("run grapevine demo");
    assert_eq!(output.status.code(), Some(2), "a usage error");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("--loss") && stderr.contains("must be in [0, 1)"),
        "{stderr}"
    );
}
