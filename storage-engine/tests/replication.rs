//! The engine's half of S3 replication: batches carry every finished record exactly
//! when it is finished, the cursor survives restarts, and nothing is evicted before it
//! was replicated.

mod common;

use bytes::Bytes;
use cairn_storage::{Digest, DigestFunction, Engine, EngineConfig, ErrorKind, Replica};
use common::*;
use std::collections::HashMap;
use std::path::Path;

fn repl_config(dir: &Path) -> EngineConfig {
    EngineConfig {
        replicate: true,
        ..config(dir)
    }
}

/// Drains every partition; returns blobs (digest → bytes) and AC values (key → value).
fn drain(engine: &Engine) -> (HashMap<Digest, Bytes>, HashMap<[u8; 32], Bytes>) {
    let (mut blobs, mut ac) = (HashMap::new(), HashMap::new());
    for p in 0..engine.partitions() {
        loop {
            let batch = block_on(engine.replication_batch(p, 4 * MIB)).unwrap();
            if batch.is_empty() {
                break;
            }
            for r in &batch.replicas {
                match r {
                    Replica::Blob { digest, data } => {
                        let bytes = match data {
                            Some(b) => b.clone(),
                            None => block_on(engine.get_bytes(*digest)).unwrap(),
                        };
                        blobs.insert(*digest, bytes);
                    }
                    Replica::ActionResult { key, value } => {
                        ac.insert(*key, value.clone());
                    }
                }
            }
            block_on(engine.replication_done(&batch)).unwrap();
        }
    }
    (blobs, ac)
}

#[test]
fn every_finished_record_is_offered_once_finished() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(repl_config(dir.path()));
    let mut written = Vec::new();
    for (i, size) in [10usize, 5000, 100_000, 1_500_000, 9 * MIB as usize]
        .into_iter()
        .enumerate()
    {
        let data = blob(i as u64, size);
        written.push((put(&engine, &data), data));
    }
    let action = Digest::of(DigestFunction::Sha256, b"act");
    block_on(engine.ac_put("inst", action, Bytes::from_static(b"result"))).unwrap();
    // An upload still in flight is not offered, and not skipped either.
    let pending = blob(77, 300_000);
    let pending_digest = digest(&pending);
    let mut upload = block_on(engine.begin_put(pending_digest)).unwrap();
    block_on(upload.write(pending.slice(..100_000))).unwrap();

    let (blobs, ac) = drain(&engine);
    for (d, data) in &written {
        assert!(blobs.contains_key(d), "{d} not offered");
        assert!(blobs.get(d) == Some(data), "{d} not offered intact");
    }
    assert!(!blobs.contains_key(&pending_digest));
    assert_eq!(
        ac.get(&Engine::ac_object_key("inst", &action)),
        Some(&Bytes::from_static(b"result"))
    );

    block_on(upload.write(pending.slice(100_000..))).unwrap();
    block_on(upload.finish()).unwrap();
    let (blobs, _) = drain(&engine);
    assert!(
        blobs.get(&pending_digest) == Some(&pending),
        "finished upload never offered"
    );
    for (d, _) in &written {
        assert!(
            !blobs.contains_key(d),
            "{d} offered again after it was done"
        );
    }
    assert_eq!(
        block_on(engine.stats())
            .unwrap()
            .replication_backlog_bytes(),
        0
    );
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn replication_cursor_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(repl_config(dir.path()));
    let first: Vec<_> = (0..20u64).map(|i| put(&engine, &blob(i, 3000))).collect();
    let (blobs, _) = drain(&engine);
    assert!(first.iter().all(|d| blobs.contains_key(d)));
    let second: Vec<_> = (100..120u64)
        .map(|i| put(&engine, &blob(i, 3000)))
        .collect();
    block_on(engine.shutdown()).unwrap();

    let engine = start(repl_config(dir.path()));
    assert!(
        block_on(engine.stats())
            .unwrap()
            .replication_backlog_bytes()
            > 0
    );
    let (blobs, _) = drain(&engine);
    assert!(
        second.iter().all(|d| blobs.contains_key(d)),
        "backlog lost in restart"
    );
    assert!(
        first.iter().all(|d| !blobs.contains_key(d)),
        "replicated blobs offered again"
    );
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn unreplicated_data_is_never_evicted() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(EngineConfig {
        max_size: 16 * MIB,
        partitions: 1,
        segment_size: Some(MIB),
        small_blob_max: 64 << 10,
        max_ac_value: 64 << 10,
        ..repl_config(dir.path())
    });
    let mut stored = Vec::new();
    let err = loop {
        let data = blob(stored.len() as u64, 50_000);
        match block_on(engine.put(digest(&data), data.clone())) {
            Ok(()) => stored.push((digest(&data), data)),
            Err(e) => break e,
        }
        assert!(stored.len() < 1000, "budget never filled");
    };
    assert_eq!(err.kind(), ErrorKind::ResourceExhausted);
    assert!(err.message().contains("replicated"), "{err}");
    for (d, data) in &stored {
        assert!(
            block_on(engine.get_bytes(*d)).unwrap() == *data,
            "{d} evicted before replication"
        );
    }
    drain(&engine);
    for i in 0..100u64 {
        put(&engine, &blob(10_000 + i, 50_000));
    }
    assert!(block_on(engine.stats()).unwrap().evictions() > 0);
    block_on(engine.shutdown()).unwrap();
}

/// The digest of a blob replica.
fn blob_digest(replica: &Replica) -> Option<Digest> {
    match replica {
        Replica::Blob { digest, .. } => Some(*digest),
        Replica::ActionResult { .. } => None,
    }
}

#[test]
fn an_owed_record_is_passed_kept_and_offered_again_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let small = |dir: &Path| EngineConfig {
        max_size: 16 * MIB,
        partitions: 1,
        segment_size: Some(MIB),
        small_blob_max: 64 << 10,
        max_ac_value: 64 << 10,
        ..repl_config(dir)
    };
    let engine = start(small(dir.path()));
    let first: Vec<_> = (0..10u64).map(|i| put(&engine, &blob(i, 50_000))).collect();
    let mut batch = block_on(engine.replication_batch(0, 4 * MIB)).unwrap();
    let owed = blob_digest(&batch.replicas[0]).unwrap();
    assert_eq!(owed, first[0]);
    batch.still_owed(0);
    block_on(engine.replication_done(&batch)).unwrap();
    // The cursor went past the owed record: later ones are offered, it is not.
    let later: Vec<_> = (10..20u64)
        .map(|i| put(&engine, &blob(i, 50_000)))
        .collect();
    let (blobs, _) = drain(&engine);
    assert!(later.iter().all(|d| blobs.contains_key(d)));
    assert!(!blobs.contains_key(&owed));
    let backlog = block_on(engine.stats())
        .unwrap()
        .replication_backlog_bytes();
    assert!(
        (50_000..60_000).contains(&backlog),
        "the owed record is not the whole backlog: {backlog}"
    );

    // Writes far beyond the budget evict everything else, never the owed record.
    for i in 0..600u64 {
        put(&engine, &blob(1000 + i, 50_000));
        if i % 50 == 0 {
            drain(&engine);
        }
    }
    drain(&engine);
    assert!(block_on(engine.stats()).unwrap().evictions() > 0);
    assert!(block_on(engine.get_bytes(owed)).unwrap() == blob(0, 50_000));
    block_on(engine.shutdown()).unwrap();

    // Still owed after a restart; reporting it done clears it.
    let engine = start(small(dir.path()));
    assert!(block_on(engine.replication_batch(0, 4 * MIB))
        .unwrap()
        .is_empty());
    let batch = block_on(engine.replication_owed(0, 4 * MIB)).unwrap();
    let offered: Vec<_> = batch.replicas.iter().filter_map(blob_digest).collect();
    assert_eq!(offered, vec![owed]);
    block_on(engine.replication_done(&batch)).unwrap();
    assert!(block_on(engine.replication_owed(0, 4 * MIB))
        .unwrap()
        .is_empty());
    assert_eq!(
        block_on(engine.stats())
            .unwrap()
            .replication_backlog_bytes(),
        0
    );
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn an_owed_action_result_superseded_by_a_newer_value_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(EngineConfig {
        partitions: 1,
        ..repl_config(dir.path())
    });
    let action = Digest::of(DigestFunction::Sha256, b"act");
    block_on(engine.ac_put("inst", action, Bytes::from_static(b"old"))).unwrap();
    let mut batch = block_on(engine.replication_batch(0, 4 * MIB)).unwrap();
    assert_eq!(batch.replicas.len(), 1);
    batch.still_owed(0);
    block_on(engine.replication_done(&batch)).unwrap();
    block_on(engine.ac_put("inst", action, Bytes::from_static(b"new"))).unwrap();
    let (_, ac) = drain(&engine);
    assert_eq!(
        ac.get(&Engine::ac_object_key("inst", &action)),
        Some(&Bytes::from_static(b"new"))
    );
    // Uploading the old value now would overwrite the new one in the bucket.
    let batch = block_on(engine.replication_owed(0, 4 * MIB)).unwrap();
    assert!(batch.is_empty());
    assert_eq!(batch.owed_records(), 1);
    block_on(engine.replication_done(&batch)).unwrap();
    assert_eq!(
        block_on(engine.replication_owed(0, 4 * MIB))
            .unwrap()
            .owed_records(),
        0
    );
    assert_eq!(
        block_on(engine.stats())
            .unwrap()
            .replication_backlog_bytes(),
        0
    );
    block_on(engine.shutdown()).unwrap();
}
