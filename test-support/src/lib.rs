//! Helpers for GrapeVine's integration tests, shared by every test crate: a network
//! namespace [`netns::Lab`] that removes what it made, [`run`] for setup commands,
//! [`wait_until`] (wait for an event with a deadline, never a bare sleep), free ports, and
//! reading what a child process printed.

// Test helpers: a failure to set up is the test failing, with the reason.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod netns;

use std::io::Read;
use std::net::{TcpListener, UdpSocket};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

/// Runs `args[0]` with the rest as arguments; its output when it succeeds, else a one-line
/// error with the command and its stderr.
///
/// # Errors
///
/// The command could not start, or exited unsuccessfully.
pub fn run(args: &[&str]) -> Result<Output, String> {
    let (program, rest) = args.split_first().ok_or("no command")?;
    let output = Command::new(program)
        .args(rest)
        .output()
        .map_err(|e| format!("{}: {e}", args.join(" ")))?;
    if !output.status.success() {
        return Err(format!(
            "{}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    Ok(output)
}

/// Checks `done` every few milliseconds until it holds (true) or `timeout` passes (false).
pub fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A UDP port free on loopback now (the kernel picks it; another process may take it later).
///
/// # Panics
///
/// No socket can be bound on loopback.
pub fn free_udp_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("bind a UDP socket on loopback")
}

/// A TCP port free on loopback now.
///
/// # Panics
///
/// No socket can be bound on loopback.
pub fn free_tcp_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .map(|a| a.port())
        .expect("bind a TCP socket on loopback")
}

/// Waits for `child` (killing it past `deadline`) and returns its stdout, with its exit status
/// and stderr appended when it failed or wrote to stderr.
pub fn finish(child: &mut Child, deadline: Instant) -> String {
    let ended = wait_until(deadline.saturating_duration_since(Instant::now()), || {
        child.try_wait().ok().flatten().is_some()
    });
    if !ended {
        // Past the deadline: the test reports what it printed so far.
        let _ = child.kill();
    }
    let status = child.wait().ok();
    let mut stdout = String::new();
    if let Some(mut out) = child.stdout.take() {
        // What could be read is reported; the rest is lost with the process.
        let _ = out.read_to_string(&mut stdout);
    }
    let mut stderr = String::new();
    if let Some(mut err) = child.stderr.take() {
        // What could be read is reported; the rest is lost with the process.
        let _ = err.read_to_string(&mut stderr);
    }
    if !stderr.is_empty() || status.is_none_or(|s| !s.success()) {
        stdout.push_str(&format!("\n[exit {status:?}; stderr: {stderr}]"));
    }
    stdout
}

/// A child process killed and reaped when dropped.
#[derive(Debug)]
pub struct Reaped(pub Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        // Already ended is fine: kill fails, wait reaps.
        let _ = self.0.kill();
        // Reaps it; an error means it was reaped already.
        let _ = self.0.wait();
    }
}

/// An empty directory for this test process under the system temp dir (emptied if a
/// previous run left it).
pub fn scratch(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("grapevine-test-{tag}-{}", std::process::id()));
    // Cleanup: a leftover temporary is harmless and replaced next time.
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

/// The stdout of a command that must have succeeded; panics with its stderr otherwise.
pub fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "{}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}
