//! Shutdown releases what the engine held: restarting it many times in one process
//! (as tests, tools and benchmarks do) must not run out of file descriptors.

mod common;

use common::*;

/// Descriptors other than eventfds. glommio keeps one eventfd per executor it ever
/// started (its cross-thread wake-up notifier outlives the executor); that costs one
/// descriptor per executor thread, not per file, and is not the engine's to release.
fn open_fds() -> Vec<String> {
    let mut fds: Vec<String> = std::fs::read_dir("/proc/self/fd")
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .map(|p| p.display().to_string())
        .filter(|p| !p.contains("eventfd") && !p.starts_with("/proc/"))
        .collect();
    fds.sort();
    fds
}

#[test]
fn repeated_start_and_shutdown_leaks_no_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = || cairn_storage::EngineConfig {
        sync_interval: Some(std::time::Duration::from_millis(5)),
        checkpoint_interval: Some(std::time::Duration::from_millis(20)),
        ..config(dir.path())
    };
    // One cycle first, so that lazily created process-wide descriptors exist.
    let engine = start(cfg());
    block_on(engine.shutdown()).unwrap();
    let before = open_fds();
    for round in 0..8u64 {
        let engine = start(cfg());
        for i in 0..20 {
            put(&engine, &blob(round * 100 + i, 3000 + i as usize * 10_000));
        }
        block_on(engine.shutdown()).unwrap();
    }
    let after = open_fds();
    assert_eq!(after, before, "file descriptors leaked across restarts");
}
