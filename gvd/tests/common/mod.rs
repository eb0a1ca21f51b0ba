//! Helpers shared by gvd's integration tests.
// Each test crate uses a part of these helpers.
#![allow(dead_code)]

use std::path::PathBuf;

/// A driver library built by this workspace (a dev-dependency of gvd, so cargo builds it).
pub fn built(name: &str) -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_gvd"));
    let dir = bin.parent().expect("target directory");
    let file = format!("lib{name}.so");
    [dir.join("deps").join(&file), dir.join(&file)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| panic!("{file} not built next to {}", bin.display()))
}

/// A gvd process for a test, killed and cleaned up on drop.
pub struct Gvd {
    pub child: std::process::Child,
    pub state: PathBuf,
    pub drivers: PathBuf,
}

impl Gvd {
    /// Starts `gvd run` named `name` on `group`, with drivers from `drivers` (created) and
    /// state under `dir`, free query and KOS ports, and `extra` flags.
    pub fn start(dir: &std::path::Path, name: &str, group: &str, extra: &[&str]) -> Self {
        let state = dir.join(name);
        let drivers = dir.join(format!("{name}-drivers"));
        std::fs::create_dir_all(drivers.join("devices")).expect("driver directory");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_gvd"))
            .args(["run", "--name", name, "--group", group])
            .args([
                "--elp-delay-ms",
                "100",
                "--query-port",
                "0",
                "--kos-port",
                "0",
            ])
            .args(extra)
            .arg("--state-dir")
            .arg(&state)
            .arg("--vdriver-path")
            .arg(&drivers)
            .env("GV_DIRDEV_ROOT", drivers.join("devices"))
            .env_remove("GV_NODES_PATH")
            .env_remove("GVD_CONFIG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start gvd");
        Self {
            child,
            state,
            drivers,
        }
    }

    pub fn nodes_path(&self) -> PathBuf {
        self.state.join("nodes.json")
    }

    /// Waits until this node's list satisfies `check`.
    pub fn wait_list(
        &self,
        timeout: std::time::Duration,
        check: impl Fn(&gvd::daemon::NodesFile) -> bool,
    ) {
        let started = std::time::Instant::now();
        let mut last = None;
        while started.elapsed() < timeout {
            if let Ok(text) = std::fs::read(self.nodes_path()) {
                if let Ok(list) = serde_json::from_slice::<gvd::daemon::NodesFile>(&text) {
                    if check(&list) {
                        return;
                    }
                    last = Some(list);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("node list not as expected within {timeout:?}: {last:?}");
    }

    /// Whether the process is still running.
    pub fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Gvd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether process `pid` has ended (gone, or a zombie waiting to be reaped).
pub fn ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}
