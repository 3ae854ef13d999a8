//! Durability settings: under `Durability::Sync` a write is acknowledged, and served,
//! only after an `fdatasync` covering it succeeded; concurrent writes share syncs
//! (group commit); a failed sync is an error for the writes it covered and refuses
//! later writes to the partition until a restart. Syncs are held or failed through
//! the engine's fault-injection layer (`cairn_storage::faults`).

mod common;

use bytes::Bytes;
use cairn_storage::faults::SyncFaults;
use cairn_storage::{Durability, EngineConfig, ErrorKind};
use common::*;
use std::path::Path;
use std::time::Duration;

fn sync_config(dir: &Path) -> EngineConfig {
    EngineConfig {
        durability: Durability::Sync,
        ..config(dir)
    }
}

/// One partition, so that a write after a failed sync goes to the failed partition.
fn one_partition(dir: &Path) -> EngineConfig {
    EngineConfig {
        shards: 1,
        partitions: 1,
        ..sync_config(dir)
    }
}

/// Polls `cond` up to `attempts` times, 10 ms apart; whether it became true.
fn poll(attempts: u32, mut cond: impl FnMut() -> bool) -> bool {
    for _ in 0..attempts {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    cond()
}

#[test]
fn sync_write_is_acknowledged_only_after_its_fdatasync() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(sync_config(dir.path()));
    let faults = SyncFaults::hold(dir.path());
    // A small blob (packed, group-committed) and a large one (its own extent).
    let small = blob(1, 3000);
    let large = blob(2, 300_000);
    let digests = [digest(&small), digest(&large)];
    let (done_tx, done) = std::sync::mpsc::channel();
    for data in [small.clone(), large.clone()] {
        let engine = engine.clone();
        let done_tx = done_tx.clone();
        std::thread::spawn(move || {
            let _ = done_tx.send(block_on(engine.put(digest(&data), data)));
        });
    }
    // Both writes reach the device, and a sync covering them starts and is held.
    // An engine that acknowledges before syncing answers first.
    let mut acknowledged = 0;
    let held = poll(1000, || {
        while done.try_recv().is_ok() {
            acknowledged += 1;
        }
        acknowledged > 0 || faults.started() >= 1
    });
    assert!(held, "no sync started and no write acknowledged");
    assert_eq!(
        acknowledged, 0,
        "a write was acknowledged before any fdatasync"
    );
    for d in digests {
        assert!(
            !block_on(engine.contains(d)).unwrap(),
            "an unsynced blob is served"
        );
    }
    faults.release(1000);
    for _ in 0..2 {
        done.recv().unwrap().expect("put succeeds once synced");
    }
    assert!(block_on(engine.get_bytes(digests[0])).unwrap() == small);
    assert!(block_on(engine.get_bytes(digests[1])).unwrap() == large);
    assert!(block_on(engine.stats()).unwrap().syncs() >= 1);
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn group_commit_covers_concurrent_writes_with_fewer_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(sync_config(dir.path()));
    let before = block_on(engine.stats()).unwrap().syncs();
    let blobs: Vec<Bytes> = (0..256u64).map(|i| blob(i, 500 + i as usize)).collect();
    let puts = blobs.iter().map(|b| engine.put(digest(b), b.clone()));
    for result in block_on(futures::future::join_all(puts)) {
        result.expect("put succeeds");
    }
    let syncs = block_on(engine.stats()).unwrap().syncs() - before;
    assert!(syncs >= 1, "256 writes acknowledged without an fdatasync");
    assert!(
        syncs <= blobs.len() as u64 / 4,
        "{syncs} syncs for {} concurrent writes",
        blobs.len()
    );
    for b in &blobs {
        assert!(block_on(engine.get_bytes(digest(b))).unwrap() == *b);
    }
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn failed_sync_is_an_error_and_refuses_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(one_partition(dir.path()));
    let kept = blob(10, 2000);
    let kept_digest = put(&engine, &kept);

    let faults = SyncFaults::fail(dir.path(), 1);
    for (seed, len) in [(11, 2000), (12, 300_000)] {
        let lost = blob(seed, len);
        let d = digest(&lost);
        let err = block_on(engine.put(d, lost)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Internal, "{err}");
        assert!(
            !block_on(engine.contains(d)).unwrap(),
            "unsynced blob served"
        );
        assert_eq!(
            block_on(engine.get_bytes(d)).unwrap_err().kind(),
            ErrorKind::NotFound
        );
    }
    let err = block_on(engine.ac_put("", digest(b"action"), Bytes::from_static(b"v"))).unwrap_err();
    assert!(err.message().contains("refuses writes"), "{err}");
    assert!(block_on(engine.get_bytes(kept_digest)).unwrap() == kept);
    let stats = block_on(engine.stats()).unwrap();
    assert_eq!(stats.sync_failures(), 1);
    assert!(
        block_on(engine.shutdown()).is_err(),
        "shutdown reports the failed partition"
    );
    drop(faults);

    // A restart recovers from what is on disk and takes writes again.
    let engine = start(one_partition(dir.path()));
    assert!(block_on(engine.get_bytes(kept_digest)).unwrap() == kept);
    let fresh = blob(13, 4000);
    let d = put(&engine, &fresh);
    assert!(block_on(engine.get_bytes(d)).unwrap() == fresh);
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn failed_interval_sync_refuses_later_writes() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(EngineConfig {
        durability: Durability::Interval,
        sync_interval: Some(Duration::from_millis(5)),
        ..one_partition(dir.path())
    });
    let faults = SyncFaults::fail(dir.path(), 1);
    put(&engine, &blob(20, 1000));
    assert!(
        poll(1000, || block_on(engine.stats()).unwrap().sync_failures()
            == 1),
        "the periodic sync never failed"
    );
    let err = block_on(engine.put(digest(&blob(21, 1000)), blob(21, 1000))).unwrap_err();
    assert!(err.message().contains("refuses writes"), "{err}");
    drop(faults);
    let _ = block_on(engine.shutdown());
}
