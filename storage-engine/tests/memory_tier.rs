//! The memory tier serves only what a read of the log would return: never a record the
//! log replaced, reclaimed or dropped, never bytes that failed verification, and
//! nothing carried over a restart. Each shard's tier gets `memory_cache / shards`.

mod common;

use bytes::Bytes;
use cairn_storage::{Digest, DigestFunction, Durability, Engine, EngineConfig, ErrorKind};
use common::*;

const ENTRY_OVERHEAD: u64 = 320;

/// A tier whose shards (two) take payloads up to `max_object` bytes.
fn tier_for(max_object: u64) -> u64 {
    2 * 16 * (max_object + ENTRY_OVERHEAD)
}

fn with_tier(dir: &std::path::Path, memory_cache: u64) -> EngineConfig {
    EngineConfig {
        memory_cache,
        ..config(dir)
    }
}

fn hits(engine: &Engine) -> u64 {
    block_on(engine.stats()).unwrap().memory_tier_hits()
}

fn entries(engine: &Engine) -> u64 {
    let stats = block_on(engine.stats()).unwrap();
    stats.memory_tiers.iter().map(|t| t.entries).sum()
}

/// One shard, one partition, a log of eight 1 MiB segments: writing 8 MiB reclaims
/// every segment once; the tier takes records up to 4 KiB.
fn small_log(dir: &std::path::Path) -> Engine {
    start(EngineConfig {
        shards: 1,
        partitions: 1,
        max_size: 8 * MIB,
        segment_size: Some(MIB),
        memory_cache: 16 * (4096 + ENTRY_OVERHEAD),
        ..config(dir)
    })
}

fn action(n: u8) -> Digest {
    Digest::of(DigestFunction::Sha256, &[n])
}

#[test]
fn warm_reads_are_served_from_memory() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(with_tier(dir.path(), 64 * MIB));
    let data = blob(1, 4096);
    let d = put(&engine, &data);
    block_on(engine.ac_put("", action(1), Bytes::from_static(b"result"))).unwrap();
    let before = hits(&engine);
    for _ in 0..3 {
        assert_eq!(block_on(engine.get_bytes(d)).unwrap(), data);
        assert_eq!(
            block_on(engine.ac_get("", action(1))).unwrap(),
            &b"result"[..]
        );
    }
    assert_eq!(hits(&engine) - before, 6, "warm reads went to the log");
    let part: Vec<u8> = data[100..300].to_vec();
    let range = block_on(engine.get(d, 100, Some(200)))
        .unwrap()
        .collect_bytes();
    assert_eq!(block_on(range).unwrap(), part);
    block_on(engine.shutdown()).unwrap();
}

#[test]
fn a_memory_tier_of_zero_bytes_is_off() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(with_tier(dir.path(), 0));
    let data = blob(2, 4096);
    let d = put(&engine, &data);
    for _ in 0..3 {
        assert_eq!(block_on(engine.get_bytes(d)).unwrap(), data);
    }
    assert_eq!(hits(&engine), 0);
    assert_eq!(entries(&engine), 0);
    block_on(engine.shutdown()).unwrap();
}

/// An action result written again with a value too large for the tier: the index
/// points at the new record, and the entry for the old one must not answer.
#[test]
fn memory_tier_never_serves_a_replaced_action_result() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(with_tier(dir.path(), tier_for(4096)));
    let old = blob(3, 1000);
    let new = blob(4, 8000);
    block_on(engine.ac_put("", action(2), old.clone())).unwrap();
    assert_eq!(block_on(engine.ac_get("", action(2))).unwrap(), old);
    block_on(engine.ac_put("", action(2), new.clone())).unwrap();
    for _ in 0..2 {
        assert_eq!(block_on(engine.ac_get("", action(2))).unwrap(), new);
    }
    block_on(engine.shutdown()).unwrap();
}

/// A record whose segment is reclaimed leaves the tier with it; the key written again
/// (too large for the tier) reads as the new value.
#[test]
fn memory_tier_never_serves_a_reclaimed_record() {
    let dir = tempfile::tempdir().unwrap();
    let engine = small_log(dir.path());
    let old = blob(5, 1000);
    block_on(engine.ac_put("", action(3), old.clone())).unwrap();
    assert_eq!(block_on(engine.ac_get("", action(3))).unwrap(), old);
    assert_eq!(entries(&engine), 1);
    // Three budgets of blobs too large for the tier: every segment is reclaimed at
    // least twice, so the result, read once and reinserted once, is gone from the log.
    for i in 0..3 * 8 * 32 {
        put(&engine, &blob(1000 + i, 32 << 10));
    }
    assert!(block_on(engine.stats()).unwrap().evictions() > 8);
    let err = block_on(engine.ac_get("", action(3))).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NotFound);
    assert_eq!(entries(&engine), 0, "the reclaimed record stayed in memory");
    let new = blob(6, 8000);
    block_on(engine.ac_put("", action(3), new.clone())).unwrap();
    assert_eq!(block_on(engine.ac_get("", action(3))).unwrap(), new);
    block_on(engine.shutdown()).unwrap();
}

/// A record read only from memory was read all the same: when its segment is
/// reclaimed it is reinserted like any record read since it was written, not evicted
/// as if nobody wanted it.
#[test]
fn a_record_served_only_from_memory_is_kept_by_the_reclaimer() {
    let dir = tempfile::tempdir().unwrap();
    let engine = small_log(dir.path());
    let hot = blob(7, 1000);
    block_on(engine.ac_put("", action(4), hot.clone())).unwrap();
    let before = hits(&engine);
    assert_eq!(block_on(engine.ac_get("", action(4))).unwrap(), hot);
    assert_eq!(
        hits(&engine) - before,
        1,
        "the read did not come from memory"
    );
    // One budget of blobs too large for the tier: the result's segment is reclaimed.
    for i in 0..8 * 32 {
        put(&engine, &blob(3000 + i, 32 << 10));
    }
    assert!(block_on(engine.stats()).unwrap().evictions() > 0);
    assert_eq!(block_on(engine.ac_get("", action(4))).unwrap(), hot);
    block_on(engine.shutdown()).unwrap();
}

/// Hits are served on the reading thread, not the shard's: a reader that saw a write
/// acknowledged must never be served the value it replaced, from memory or the log.
#[test]
fn memory_tier_never_serves_a_replaced_value_to_another_thread() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let engine = start(with_tier(dir.path(), 64 * MIB));
    let value = |i: u64| Bytes::from(i.to_le_bytes().repeat(64));
    block_on(engine.ac_put("", action(5), value(0))).unwrap();
    let acknowledged = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (engine, acknowledged, done) = (engine.clone(), acknowledged.clone(), done.clone());
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(Ordering::Acquire) {
                    let floor = acknowledged.load(Ordering::Acquire);
                    let got = block_on(engine.ac_get("", action(5))).unwrap();
                    let seen = u64::from_le_bytes(got[..8].try_into().unwrap());
                    assert!(
                        seen >= floor,
                        "served value {seen} after {floor} was acknowledged"
                    );
                    assert_eq!(got, value(seen), "a torn value");
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for i in 1..=2000 {
        block_on(engine.ac_put("", action(5), value(i))).unwrap();
        acknowledged.store(i, Ordering::Release);
    }
    done.store(true, Ordering::Release);
    for reader in readers {
        assert!(reader.join().unwrap() > 0);
    }
    assert!(hits(&engine) > 0, "no read was served from memory");
    block_on(engine.shutdown()).unwrap();
}

/// Many more blobs than the tier holds, read over and over: every read returns the
/// blob's bytes, and the tier stays within its size.
#[test]
fn memory_tier_never_serves_an_evicted_blob() {
    let dir = tempfile::tempdir().unwrap();
    let cache = 2 * 64 * 1024;
    let engine = start(with_tier(dir.path(), cache));
    let blobs: Vec<(Digest, Bytes)> = (0..200)
        .map(|i| {
            let data = blob(100 + i, 1500 + (i as usize % 5) * 100);
            (put(&engine, &data), data)
        })
        .collect();
    for round in 0..3 {
        for (i, (d, data)) in blobs.iter().enumerate() {
            if round == 0 || i % 4 == 0 {
                assert_eq!(&block_on(engine.get_bytes(*d)).unwrap(), data);
            }
        }
    }
    let stats = block_on(engine.stats()).unwrap();
    for tier in &stats.memory_tiers {
        assert!(tier.evictions > 0);
        assert!(tier.bytes <= tier.capacity_bytes, "{tier:?}");
        assert_eq!(tier.capacity_bytes, cache / 2);
    }
    assert!(stats.memory_tier_hits() > 0);
    block_on(engine.shutdown()).unwrap();
}

/// What a crash leaves on disk starts with an empty tier, and reads after recovery
/// return what was acknowledged.
#[test]
fn memory_tier_starts_empty_after_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let image = tempfile::tempdir().unwrap();
    let cfg = |d: &std::path::Path| EngineConfig {
        durability: Durability::Sync,
        ..with_tier(d, 64 * MIB)
    };
    let engine = start(cfg(dir.path()));
    let data = blob(7, 3000);
    let d = put(&engine, &data);
    block_on(engine.ac_put("", action(4), Bytes::from_static(b"first"))).unwrap();
    block_on(engine.ac_put("", action(4), Bytes::from_static(b"second"))).unwrap();
    assert_eq!(block_on(engine.get_bytes(d)).unwrap(), data);
    assert!(entries(&engine) > 0);
    crash_image(dir.path(), image.path());
    let recovered = start(cfg(image.path()));
    assert_eq!(entries(&recovered), 0);
    for _ in 0..2 {
        assert_eq!(block_on(recovered.get_bytes(d)).unwrap(), data);
        assert_eq!(
            block_on(recovered.ac_get("", action(4))).unwrap(),
            &b"second"[..]
        );
    }
    assert_eq!(hits(&recovered), 2, "the second reads came from memory");
    block_on(recovered.shutdown()).unwrap();
    block_on(engine.shutdown()).unwrap();
}

/// A record that fails its checksum is neither served nor admitted; a blob whose bytes
/// do not match its digest is refused and not admitted either.
#[test]
fn memory_tier_admits_only_verified_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = blob(8, 5000);
    let d = {
        let engine = start(with_tier(dir.path(), 64 * MIB));
        let d = put(&engine, &data);
        block_on(engine.shutdown()).unwrap();
        d
    };
    let (file, at) = locate(dir.path(), &d);
    flip_byte(&file, at + 72 + 100);
    let engine = start(with_tier(dir.path(), 64 * MIB));
    for _ in 0..2 {
        assert!(block_on(engine.get_bytes(d)).is_err());
    }
    assert_eq!(entries(&engine), 0, "damaged bytes were admitted");
    let other = blob(9, 5000);
    let wrong = Digest {
        size: 5000,
        ..digest(&blob(10, 5000))
    };
    assert!(block_on(engine.put(wrong, other)).is_err());
    assert_eq!(entries(&engine), 0, "unverified bytes were admitted");
    block_on(engine.shutdown()).unwrap();
}

/// A record above 256 KiB enters memory neither on its write nor on its first read
/// (one read saves less than the copy into fresh memory costs), but on its second;
/// reads after that are served from memory, whole or in part. One of 1 MiB is read
/// whole in one I/O, one over 4 MiB gathered chunk by chunk, each chunk checked.
#[test]
fn a_large_blob_enters_memory_on_its_second_read() {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(with_tier(dir.path(), tier_for(8 * MIB)));
    for (seed, len) in [(11, MIB as usize), (12, 5 * MIB as usize + 123)] {
        let data = blob(seed, len);
        let held = entries(&engine);
        let d = put(&engine, &data);
        assert_eq!(entries(&engine), held, "admitted on its write");
        assert_eq!(block_on(engine.get_bytes(d)).unwrap(), data);
        assert_eq!(entries(&engine), held, "admitted on its first read");
        assert_eq!(block_on(engine.get_bytes(d)).unwrap(), data);
        assert_eq!(
            entries(&engine),
            held + 1,
            "not admitted on its second read"
        );
        let before = hits(&engine);
        assert_eq!(block_on(engine.get_bytes(d)).unwrap(), data);
        let at = len - 1007;
        let part = block_on(
            block_on(engine.get(d, at as u64, Some(1000)))
                .unwrap()
                .collect_bytes(),
        )
        .unwrap();
        assert_eq!(part, data.slice(at..at + 1000));
        assert_eq!(hits(&engine) - before, 2);
    }
    block_on(engine.shutdown()).unwrap();
}
