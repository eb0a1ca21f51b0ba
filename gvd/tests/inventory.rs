//! VDRIVER inventory: real drivers from this workspace, broken ones, and `unique`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::built;
use grapevine_test_support::stdout_of;

use std::path::{Path, PathBuf};
use std::process::Command;

use gvd::inventory::Inventory;
use gvd::vdriver::{Driver, DriverError};

struct Setup {
    dir: PathBuf,
    devices: PathBuf,
}

impl Setup {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("gvd-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let devices = dir.join("devices");
        std::fs::create_dir_all(&devices).unwrap();
        let drivers = dir.join("drivers");
        std::fs::create_dir_all(&drivers).unwrap();
        std::fs::copy(built("gv_echo"), drivers.join("echo.so")).unwrap();
        std::fs::copy(built("gv_dir_devices"), drivers.join("dir-devices.so")).unwrap();
        std::fs::write(devices.join("disk0"), b"0123456789").unwrap();
        Self { dir, devices }
    }

    fn drivers(&self) -> PathBuf {
        self.dir.join("drivers")
    }

    fn inventory(&self, fault: Option<&str>) -> Inventory {
        let mut command = Command::new(env!("CARGO_BIN_EXE_gvd"));
        command
            .args(["inventory", "--json"])
            .env(
                "VDRIVER_PATH",
                format!("/nonexistent:{}", self.drivers().display()),
            )
            .env("GV_DIRDEV_ROOT", &self.devices)
            .env_remove("GV_ECHO_FAULT");
        if let Some(fault) = fault {
            command.env("GV_ECHO_FAULT", fault);
        }
        let output = command.output().unwrap();
        stdout_of(&output);
        serde_json::from_slice(&output.stdout).unwrap()
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn names(inventory: &Inventory) -> Vec<String> {
    inventory
        .drivers
        .iter()
        .flat_map(|d| {
            d.vdevs
                .iter()
                .map(move |v| format!("{}/{}", d.driver, v.name))
        })
        .collect()
}

fn skipped_reason(inventory: &Inventory, file: &str) -> String {
    inventory
        .skipped
        .iter()
        .find(|s| s.path.file_name().is_some_and(|f| f == file))
        .map(|s| s.reason.clone())
        .unwrap_or_else(|| panic!("{file} not skipped: {inventory:?}"))
}

#[test]
fn both_drivers_list_their_vdevs() {
    let setup = Setup::new("list");
    let inventory = setup.inventory(None);
    assert_eq!(
        names(&inventory),
        vec!["dir-devices/disk0", "echo/counter0", "echo/echo0"]
    );
    assert!(inventory.skipped.is_empty());
    assert_eq!(inventory.unique.len(), 16);
}

#[test]
fn broken_drivers_are_skipped_with_the_reason() {
    let setup = Setup::new("broken");
    std::fs::write(setup.drivers().join("garbage.so"), b"not a library").unwrap();
    // A real shared library without the VDRIVER symbols, when a C compiler is at hand.
    let with_gcc = Command::new("gcc")
        .args(["-shared", "-fPIC", "-x", "c", "-", "-o"])
        .arg(setup.drivers().join("nosymbols.so"))
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(b"int gv_unrelated = 1;\n")?;
            child.wait()
        })
        .is_ok_and(|status| status.success());
    let inventory = setup.inventory(None);
    assert!(skipped_reason(&inventory, "garbage.so").starts_with("cannot load"));
    if with_gcc {
        assert_eq!(
            skipped_reason(&inventory, "nosymbols.so"),
            "missing symbol gv_vdriver_abi_version"
        );
    } else {
        eprintln!("gcc not found: the missing-symbol case was not checked");
    }
    assert_eq!(names(&inventory).len(), 3, "the good drivers still load");

    for (fault, reason) in [
        ("abi", "ABI version 99, this gvd speaks 1"),
        ("error", "gv_vdriver_list failed with code -1"),
        ("panic", "gv_vdriver_list failed with code -1"),
        ("abort", "crashed the probe (signal 6)"),
    ] {
        let inventory = setup.inventory(Some(fault));
        assert_eq!(
            skipped_reason(&inventory, "echo.so"),
            reason,
            "fault {fault}"
        );
        assert_eq!(
            names(&inventory),
            vec!["dir-devices/disk0"],
            "fault {fault}"
        );
    }
}

#[test]
fn unique_follows_the_exposed_vdevs() {
    let setup = Setup::new("unique");
    let first = setup.inventory(None).unique;
    assert_eq!(
        setup.inventory(None).unique,
        first,
        "stable while nothing changes"
    );
    std::fs::write(setup.devices.join("disk1"), b"x").unwrap();
    let grown = setup.inventory(None);
    assert_ne!(grown.unique, first);
    assert!(names(&grown).contains(&"dir-devices/disk1".to_string()));
    std::fs::remove_file(setup.devices.join("disk1")).unwrap();
    assert_eq!(
        setup.inventory(None).unique,
        first,
        "back to the same VDEVs, same unique"
    );
    std::fs::remove_file(setup.drivers().join("echo.so")).unwrap();
    assert_ne!(setup.inventory(None).unique, first);
}

#[test]
fn calls_reach_the_drivers() {
    let echo = Driver::load(&built("gv_echo")).unwrap();
    assert_eq!(echo.name(), "echo");
    assert_eq!(echo.call("echo0", "echo", b"ping").unwrap(), b"ping");
    assert_eq!(echo.call("echo0", "reverse", b"abc").unwrap(), b"cba");
    let big = vec![7u8; 10_000];
    assert_eq!(
        echo.call("echo0", "echo", &big).unwrap(),
        big,
        "answers above 4 KiB"
    );
    let first: u64 = String::from_utf8(echo.call("counter0", "next", b"").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    let second: u64 = String::from_utf8(echo.call("counter0", "next", b"").unwrap())
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(second, first + 1);
    assert!(matches!(
        echo.call("nope", "echo", b""),
        Err(DriverError::Failed { code: -3, .. })
    ));
    assert!(matches!(
        echo.call("echo0", "nope", b""),
        Err(DriverError::Failed { code: -4, .. })
    ));
    assert!(matches!(
        Driver::load(Path::new("/nonexistent/driver.so")),
        Err(DriverError::Load { .. })
    ));
}
