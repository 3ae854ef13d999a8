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
