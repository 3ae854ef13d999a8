//! Recovery paths agree: an index from checkpoint + replay equals one rebuilt by a
//! full scan; a different shard count finds every blob; AC keeps the newest value.

mod common;

use bytes::Bytes;
use cairn_storage::{Digest, DigestFunction, EngineConfig, ErrorKind};
use common::*;
use std::path::Path;

/// Writes blobs and AC entries, checkpoints halfway, writes more, and returns a crash
/// image taken before shutdown (so the tail is only reachable by replay).
fn crash_image_with_replay(dir: &Path, image: &Path) -> Vec<(Digest, Bytes)> {
    let engine = start(config(dir));
    let mut blobs = Vec::new();
    for i in 0..200u64 {
        let size = if i % 10 == 9 {
            150_000
        } else {
            300 + (i as usize * 131) % 9000
        };
        let data = blob(i, size);
        blobs.push((put(&engine, &data), data));
        if i == 100 {
            block_on(engine.checkpoint()).unwrap();
        }
    }
    crash_image(dir, image);
    block_on(engine.shutdown()).unwrap();
    blobs
}

#[test]
fn checkpoint_plus_replay_equals_full_scan() {
    let live = tempfile::tempdir().unwrap();
    let with_cp = tempfile::tempdir().unwrap();
    let blobs = crash_image_with_replay(live.path(), with_cp.path());
    let scanned = tempfile::tempdir().unwrap();
    crash_image(with_cp.path(), scanned.path());
    for p in std::fs::read_dir(scanned.path()).unwrap().flatten() {
        let _ = std::fs::remove_file(p.path().join("checkpoint"));
    }
    let a = start(config(with_cp.path()));
    let b = start(config(scanned.path()));
    let sa = block_on(a.stats()).unwrap();
    let sb = block_on(b.stats()).unwrap();
    let per_partition =
        |s: &cairn_storage::Stats| s.partitions.iter().map(|p| p.objects).collect::<Vec<_>>();
    assert_eq!(per_partition(&sa), per_partition(&sb));
    assert_eq!(sa.objects(), blobs.len() as u64);
    for (d, data) in &blobs {
        assert!(block_on(a.get_bytes(*d)).unwrap() == *data);
        assert!(block_on(b.get_bytes(*d)).unwrap() == *data);
    }
    block_on(a.shutdown()).unwrap();
    block_on(b.shutdown()).unwrap();
}

#[test]
fn restart_with_another_shard_count_finds_every_blob() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(EngineConfig {
        shards: 2,
        ..config(dir.path())
    });
    let blobs: Vec<_> = (0..100u64)
        .map(|i| blob(i, 1000 + i as usize * 50))
        .collect();
    let digests: Vec<_> = blobs.iter().map(|b| put(&engine, b)).collect();
    block_on(engine.shutdown()).unwrap();
    for shards in [1, 3, 4] {
        let engine = start(EngineConfig {
            shards,
            ..config(dir.path())
        });
        assert!(
            block_on(engine.find_missing(digests.clone()))
                .unwrap()
                .is_empty(),
            "{shards} shards"
        );
        for (d, data) in digests.iter().zip(&blobs) {
            assert!(block_on(engine.get_bytes(*d)).unwrap() == *data);
        }
        block_on(engine.shutdown()).unwrap();
    }
}

#[test]
fn ac_newest_value_wins_across_restarts() {
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    let action = Digest::of(DigestFunction::Sha256, b"action");
    let engine = start(config(dir.path()));
    block_on(engine.ac_put("", action, Bytes::from_static(b"v1"))).unwrap();
    block_on(engine.ac_put("other", action, Bytes::from_static(b"other-v1"))).unwrap();
    block_on(engine.checkpoint()).unwrap();
    block_on(engine.ac_put("", action, Bytes::from_static(b"v2"))).unwrap();
    block_on(engine.ac_put("", action, Bytes::from_static(b"v3"))).unwrap();
    assert_eq!(
        block_on(engine.ac_get("", action)).unwrap(),
        Bytes::from_static(b"v3")
    );
    crash_image(dir.path(), image.path());
    block_on(engine.shutdown()).unwrap();

    // Clean restart: from the final checkpoint.
    let engine = start(config(dir.path()));
    assert_eq!(
        block_on(engine.ac_get("", action)).unwrap(),
        Bytes::from_static(b"v3")
    );
    assert_eq!(
        block_on(engine.ac_get("other", action)).unwrap(),
        Bytes::from_static(b"other-v1")
    );
    assert_eq!(
        block_on(engine.ac_get("third", action)).unwrap_err().kind(),
        ErrorKind::NotFound
    );
    block_on(engine.shutdown()).unwrap();

    // Crash restart: v1 in the checkpoint, v2 and v3 only in the log.
    let engine = start(config(image.path()));
    assert_eq!(
        block_on(engine.ac_get("", action)).unwrap(),
        Bytes::from_static(b"v3")
    );
    block_on(engine.shutdown()).unwrap();

    // Full scan: every version on disk, the highest sequence number wins.
    for p in std::fs::read_dir(image.path()).unwrap().flatten() {
        let _ = std::fs::remove_file(p.path().join("checkpoint"));
    }
    let engine = start(config(image.path()));
    assert_eq!(
        block_on(engine.ac_get("", action)).unwrap(),
        Bytes::from_static(b"v3")
    );
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn oversized_ac_value_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    let action = Digest::of(DigestFunction::Sha256, b"big");
    let err = block_on(engine.ac_put("", action, blob(1, 65 << 10))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn data_directory_of_another_format_version_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(config(dir.path()));
    block_on(engine.shutdown()).unwrap();
    let manifest = dir.path().join("MANIFEST");
    let text = std::fs::read_to_string(&manifest).unwrap();
    std::fs::write(
        &manifest,
        text.replace("format_version=1", "format_version=2"),
    )
    .unwrap();
    let err = cairn_storage::Engine::start(config(dir.path()))
        .err()
        .unwrap();
    assert_eq!(err.kind(), ErrorKind::FailedPrecondition);
    assert!(err.message().contains("format 2"), "{err}");
}

#[test]
fn restarts_report_what_the_checkpoint_gave_and_what_was_scanned() {
    let live = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    // 200 blobs, the checkpoint taken after the 101st; the image misses the final one.
    let blobs = crash_image_with_replay(live.path(), image.path());

    // Clean restart: everything from the checkpoint written at shutdown, nothing scanned.
    let engine = start(config(live.path()));
    let r = block_on(engine.stats()).unwrap().recovery();
    assert_eq!((r.from_checkpoint, r.scanned_records), (200, 0), "{r:?}");
    block_on(engine.shutdown()).unwrap();

    // Crash restart: the checkpoint's 101, the other 99 replayed from the log.
    let engine = start(config(image.path()));
    let r = block_on(engine.stats()).unwrap().recovery();
    assert_eq!((r.from_checkpoint, r.scanned_records), (101, 99), "{r:?}");
    for (d, data) in &blobs {
        assert!(block_on(engine.get_bytes(*d)).unwrap() == *data);
    }
    block_on(engine.shutdown()).unwrap();

    // No checkpoint: every record scanned.
    let scanned = tempfile::tempdir().unwrap();
    crash_image(live.path(), scanned.path());
    for p in std::fs::read_dir(scanned.path()).unwrap().flatten() {
        let _ = std::fs::remove_file(p.path().join("checkpoint"));
    }
    let engine = start(config(scanned.path()));
    let r = block_on(engine.stats()).unwrap().recovery();
    assert_eq!((r.from_checkpoint, r.scanned_records), (0, 200), "{r:?}");
    assert_eq!(r.skipped_damaged, 0);
    block_on(engine.shutdown()).unwrap();
}

/// One partition of four 1 MiB segments: a few MiB of writes evict.
fn tiny(dir: &Path) -> EngineConfig {
    EngineConfig {
        shards: 1,
        partitions: 1,
        max_size: 4 * MIB,
        segment_size: Some(MIB),
        ..config(dir)
    }
}

/// Every blob reads back intact or is absent; returns the digests present.
fn present_and_intact(engine: &cairn_storage::Engine, blobs: &[(Digest, Bytes)]) -> Vec<Digest> {
    let mut present = Vec::new();
    for (d, data) in blobs {
        match block_on(engine.get_bytes(*d)) {
            Ok(got) => {
                assert!(got == *data, "{d} has wrong bytes");
                present.push(*d);
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::NotFound, "{d}: {e}"),
        }
    }
    present
}

#[test]
fn restart_after_eviction_and_mid_reclaim() {
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    let engine = start(tiny(dir.path()));
    let mut blobs = Vec::new();
    for i in 0..60u64 {
        let data = blob(1000 + i, 30_000);
        blobs.push((put(&engine, &data), data));
    }
    block_on(engine.checkpoint()).unwrap();
    // Read a few so the reclaimer copies them forward (reinsertion).
    for (d, _) in &blobs[..5] {
        block_on(engine.get_bytes(*d)).unwrap();
    }
    // Three times the budget more: the checkpoint's segments are all reclaimed.
    for i in 60..460u64 {
        let data = blob(1000 + i, 30_000);
        blobs.push((put(&engine, &data), data));
    }
    let stats = block_on(engine.stats()).unwrap();
    assert!(stats.evictions() > 0, "nothing was evicted");
    assert!(stats.used_bytes() <= 4 * MIB);
    let present = present_and_intact(&engine, &blobs);
    assert!(present.len() < blobs.len(), "nothing was evicted");
    let newest = blobs[blobs.len() - 10..].iter().map(|(d, _)| *d);
    assert!(newest.clone().all(|d| present.contains(&d)));
    // A crash now: the checkpoint names segments that were reclaimed since.
    crash_image(dir.path(), image.path());
    block_on(engine.shutdown()).unwrap();

    for (what, path) in [("crash", image.path()), ("clean", dir.path())] {
        let engine = start(tiny(path));
        let stats = block_on(engine.stats()).unwrap();
        let r = stats.recovery();
        if what == "crash" {
            assert!(r.checkpoint_stale > 0, "{what}: {r:?}");
        } else {
            assert_eq!(r.scanned_records, 0, "{what}: {r:?}");
        }
        assert_eq!(r.skipped_damaged, 0, "{what}: {r:?}");
        assert!(disk_usage(path) <= 4 * MIB, "{what}: over budget");
        let after = present_and_intact(&engine, &blobs);
        assert_eq!(after, present, "{what}: restart changed what is stored");
        assert_eq!(stats.objects(), present.len() as u64, "{what}");
        // And it keeps evicting after the restart.
        for i in 0..200u64 {
            put(&engine, &blob(5000 + i, 30_000));
        }
        assert!(block_on(engine.stats()).unwrap().evictions() > 0, "{what}");
        assert_eq!(block_on(engine.stats()).unwrap().crc_failures(), 0);
        block_on(engine.shutdown()).unwrap();
    }
}

/// A huge segment (a record larger than a quarter of a segment) whose payload is at
/// most one CRC chunk has no chunk table: its header's CRC is the payload's own. The
/// scan must verify that, not a table that was never written, or such a blob exists
/// only while a checkpoint lists it and is lost after a crash before the next one.
#[test]
fn a_huge_record_without_a_chunk_table_is_found_by_the_scan() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(tiny(dir.path()));
    let blobs: Vec<(Digest, Bytes)> = [300_000usize, 700_000, 1_200_000]
        .into_iter()
        .enumerate()
        .map(|(i, size)| {
            let data = blob(900 + i as u64, size);
            (put(&engine, &data), data)
        })
        .collect();
    block_on(engine.shutdown()).unwrap();
    for p in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let _ = std::fs::remove_file(p.path().join("checkpoint"));
    }
    let engine = start(tiny(dir.path()));
    let report = block_on(engine.stats()).unwrap().recovery();
    assert_eq!(report.skipped_damaged, 0, "{report:?}");
    let present = present_and_intact(&engine, &blobs);
    assert_eq!(present.len(), blobs.len(), "lost by the scan: {report:?}");
    block_on(engine.shutdown()).unwrap();
}
