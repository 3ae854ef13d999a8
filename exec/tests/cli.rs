//! The execution programs' command lines, run as built.
//!
//! Besides checking what an operator sees, this file makes `cargo test --workspace`
//! build `cairn-scheduler` and `cairn-worker` before any test runs: cargo builds a
//! package's binaries for its integration tests, and the cache node's tests (in the
//! root package) start these two from the same directory.

use std::process::Command;

const SCHEDULER: &str = env!("CARGO_BIN_EXE_cairn-scheduler");
const WORKER: &str = env!("CARGO_BIN_EXE_cairn-worker");

#[test]
fn both_programs_print_their_name_and_version() {
    for (name, path) in [("cairn-scheduler", SCHEDULER), ("cairn-worker", WORKER)] {
        let output = Command::new(path).arg("--version").output().unwrap();
        assert!(output.status.success(), "{name} --version failed");
        let printed = String::from_utf8_lossy(&output.stdout);
        assert!(
            printed.starts_with(&format!("{name} {} (commit ", env!("CARGO_PKG_VERSION"))),
            "{printed}"
        );
    }
}

#[test]
fn a_worker_with_an_empty_scheduler_list_refuses_to_start_and_says_why() {
    let temp = tempfile::tempdir().unwrap();
    let config = temp.path().join("worker.json5");
    std::fs::write(&config, "{ scheduler: [] }").unwrap();
    let output = Command::new(WORKER)
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the list of schedulers is empty"),
        "{stderr}"
    );
}
