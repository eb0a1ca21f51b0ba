//! Helpers shared by gvd's integration tests.

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
