//! Finding VDRIVERs, checking each in a child process, and `unique`.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::vdriver::{Driver, DriverError, Vdev};

/// What one driver exposes.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct DriverInventory {
    /// The library file.
    pub path: PathBuf,
    /// The driver's own name.
    pub driver: String,
    /// Its VDEVs, sorted by name.
    pub vdevs: Vec<Vdev>,
}

/// A driver that was skipped, and why.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct SkippedDriver {
    /// The library file.
    pub path: PathBuf,
    /// Why it was skipped.
    pub reason: String,
}

/// Every driver found in the search path.
#[derive(Clone, Debug, Deserialize, Eq, PartialEq, Serialize)]
pub struct Inventory {
    /// Drivers that loaded, by path.
    pub drivers: Vec<DriverInventory>,
    /// Drivers that did not, by path.
    pub skipped: Vec<SkippedDriver>,
    /// Digest of the exposed VDEVs (see [`unique`]).
    pub unique: String,
}

/// How long a driver may take to be probed before it is killed and skipped.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Splits a `VDRIVER_PATH` value (colon-separated; empty parts ignored).
pub fn search_path(value: &str) -> Vec<PathBuf> {
    value
        .split(':')
        .filter(|part| !part.is_empty())
        .map(PathBuf::from)
        .collect()
}

/// The driver files (`*.so`) in `directories`, sorted; missing directories are skipped.
pub fn driver_files(directories: &[PathBuf]) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = directories
        .iter()
        .filter_map(|dir| std::fs::read_dir(dir).ok())
        .flat_map(|entries| entries.flatten())
        .map(|entry| entry.path())
        .filter(|path| path.is_file() && path.extension().is_some_and(|e| e == "so"))
        .collect();
    files.sort();
    files.dedup();
    files
}

/// What identifies the driver files as they are now: each path with its size and modification
/// time, so that a library replaced in place (same name, new build) counts as a change too.
pub type DriverStamps = Vec<(PathBuf, u64, Option<std::time::SystemTime>)>;

/// The [`DriverStamps`] of `directories`.
pub fn driver_stamps(directories: &[PathBuf]) -> DriverStamps {
    driver_files(directories)
        .into_iter()
        .map(|path| {
            let meta = std::fs::metadata(&path).ok();
            let len = meta.as_ref().map_or(0, std::fs::Metadata::len);
            let modified = meta.and_then(|m| m.modified().ok());
            (path, len, modified)
        })
        .collect()
}

/// Inventories every driver of `directories`, probing each with `probe_exe probe-driver FILE`
/// (the `gvd` binary) so that a crashing driver only ends its probe.
pub fn scan(directories: &[PathBuf], probe_exe: &Path) -> Inventory {
    let mut drivers = Vec::new();
    let mut skipped = Vec::new();
    for path in driver_files(directories) {
        match probe(probe_exe, &path, PROBE_TIMEOUT) {
            Ok(found) => drivers.push(found),
            Err(reason) => {
                tracing::warn!(path = %path.display(), %reason, "VDRIVER skipped");
                skipped.push(SkippedDriver { path, reason });
            }
        }
    }
    let unique = unique(&drivers);
    Inventory {
        drivers,
        skipped,
        unique,
    }
}

/// Runs `probe_exe probe-driver PATH` and reads its answer; the reason on failure.
///
/// # Errors
///
/// A readable reason: the driver's error, a crash (signal), a timeout or an unreadable answer.
pub fn probe(probe_exe: &Path, path: &Path, timeout: Duration) -> Result<DriverInventory, String> {
    let mut child = Command::new(probe_exe)
        .arg("probe-driver")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start the probe {}: {e}", probe_exe.display()))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if started.elapsed() < timeout => std::thread::sleep(Duration::from_millis(5)),
            Ok(None) => {
                // It may have ended already: then there is nothing to kill.
                let _ = child.kill();
                // Reaps it; an error means it was reaped already.
                let _ = child.wait();
                return Err(format!("did not answer within {timeout:?}"));
            }
            Err(e) => return Err(format!("probe failed: {e}")),
        }
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        // What could be read is reported; the rest is lost with the process.
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        // What could be read is reported; the rest is lost with the process.
        let _ = err.read_to_string(&mut stderr);
    }
    if !status.success() {
        let reason = stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
            .trim();
        return Err(match status.code() {
            Some(_) if !reason.is_empty() => reason.trim_start_matches("error: ").to_string(),
            Some(code) => format!("probe exited with code {code}"),
            None => {
                use std::os::unix::process::ExitStatusExt;
                format!(
                    "crashed the probe (signal {})",
                    status.signal().unwrap_or(0)
                )
            }
        });
    }
    serde_json::from_str(stdout.trim()).map_err(|e| format!("unreadable probe answer: {e}"))
}

/// Loads one driver in this process and lists it: the body of `gvd probe-driver`.
///
/// # Errors
///
/// The [`DriverError`] that made the driver unusable.
pub fn probe_here(path: &Path) -> Result<DriverInventory, DriverError> {
    let driver = Driver::load(path)?;
    let vdevs = driver.vdevs()?;
    Ok(DriverInventory {
        path: path.to_path_buf(),
        driver: driver.name().to_string(),
        vdevs,
    })
}

/// `unique`: the first 16 hex digits of a BLAKE3 digest over the sorted
/// `(driver, vdev, kind, attributes)` of every loaded driver. Paths do not count, so moving a
/// driver file does not change it.
pub fn unique(drivers: &[DriverInventory]) -> String {
    let mut entries: Vec<(&str, &Vdev)> = drivers
        .iter()
        .flat_map(|d| d.vdevs.iter().map(move |v| (d.driver.as_str(), v)))
        .collect();
    entries.sort();
    let mut hasher = blake3::Hasher::new();
    for (driver, vdev) in entries {
        for part in [driver, &vdev.name, &vdev.kind, &vdev.attributes] {
            hasher.update(&(part.len() as u64).to_be_bytes());
            hasher.update(part.as_bytes());
        }
    }
    hasher.finalize().to_hex()[..16].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_driver_replaced_in_place_changes_the_stamps() {
        let dir = std::env::temp_dir().join(format!("gvd-stamps-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let directories = vec![dir.clone()];
        std::fs::write(dir.join("a.so"), b"first build").unwrap();
        std::fs::write(dir.join("notes.txt"), b"not a driver").unwrap();
        let before = driver_stamps(&directories);
        assert_eq!(before.len(), 1);
        assert_eq!(before, driver_stamps(&directories), "nothing changed");
        std::fs::write(dir.join("a.so"), b"second, longer build").unwrap();
        assert_ne!(before, driver_stamps(&directories));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn driver(name: &str, vdevs: &[&str]) -> DriverInventory {
        DriverInventory {
            path: PathBuf::from(format!("/x/{name}.so")),
            driver: name.into(),
            vdevs: vdevs
                .iter()
                .map(|v| Vdev {
                    name: (*v).into(),
                    kind: "echo".into(),
                    attributes: "{}".into(),
                })
                .collect(),
        }
    }

    #[test]
    fn unique_depends_on_vdevs_only() {
        let a = unique(&[driver("a", &["x", "y"]), driver("b", &["z"])]);
        let reordered = unique(&[driver("b", &["z"]), driver("a", &["x", "y"])]);
        assert_eq!(a, reordered);
        assert_ne!(a, unique(&[driver("a", &["x", "y"])]));
        assert_ne!(a, unique(&[driver("a", &["x", "y2"]), driver("b", &["z"])]));
        assert_eq!(a.len(), 16);
    }

    #[test]
    fn search_path_splits_on_colons() {
        assert_eq!(
            search_path("/a::/b:"),
            vec![PathBuf::from("/a"), PathBuf::from("/b")]
        );
        assert!(search_path("").is_empty());
    }
}
