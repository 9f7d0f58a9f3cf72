//! Shared helpers for the integration tests.
#![allow(dead_code)]

pub mod capture;

use std::path::PathBuf;

/// `../shared/vectors` beside the repository. CI always has it; elsewhere a test that needs it skips with a
/// message, except under `CI=true`, where its absence is a failure.
pub fn vectors_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/vectors");
    if dir.join("connect-io-mtu1024.pcap").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but the captured vectors are missing at {}", dir.display());
    }
    eprintln!("SKIP: captured vectors not found at {} (they live in shared/vectors beside the repo)", dir.display());
    None
}
