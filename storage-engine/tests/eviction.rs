mod common;

use cairn_storage::{Digest, EngineConfig, ErrorKind};
use common::*;

/// Ten times the budget written in blobs of every size class: disk usage, as the
/// filesystem counts it, never exceeds the budget, and recent blobs stay readable.
#[test]
fn disk_usage_stays_under_budget_through_ten_budgets_of_writes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = EngineConfig {
        max_size: 48 * MIB,
        partitions: 2,
        segment_size: Some(2 * MIB),
        small_blob_max: 64 << 10,
        max_ac_value: 64 << 10,
        checkpoint_interval: Some(std::time::Duration::from_millis(50)),
        ..config(dir.path())
    };
    let budget = cfg.max_size;
    let engine = start(cfg);
    let mut written = 0u64;
    let mut recent: Vec<Digest> = Vec::new();
    let mut i = 0u64;
    while written < 10 * budget {
        let size = match i % 10 {
            0..=5 => 1000 + (i % 7) * 3000,
            6..=8 => 150_000,
            _ => 1_500_000, // larger than a quarter segment: huge
        } as usize;
        let data = blob(i, size);
        recent.push(put(&engine, &data));
        if recent.len() > 8 {
            recent.remove(0);
        }
        written += size as u64;
        i += 1;
        if i.is_multiple_of(20) {
            let on_disk = disk_usage(dir.path());
            assert!(
                on_disk <= budget,
                "{on_disk} bytes on disk, budget {budget}"
            );
            assert!(block_on(engine.stats()).unwrap().used_bytes() <= budget);
        }
    }
    for d in recent {
        assert!(
            block_on(engine.contains(d)).unwrap(),
            "recent blob {d} evicted"
        );
    }
    let stats = block_on(engine.stats()).unwrap();
    assert!(stats.evictions() > 0);
    block_on(engine.shutdown()).unwrap();
    assert!(disk_usage(dir.path()) <= budget);
}

/// Hit ratio of a cache client that reads a hot set while a stream of one-off blobs
/// flows through, re-uploading whatever misses.
fn hot_set_hit_ratio(reinsert_fraction: f64) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let engine = start(EngineConfig {
        max_size: 8 * MIB,
        partitions: 1,
        shards: 1,
        segment_size: Some(MIB),
        small_blob_max: 64 << 10,
        max_ac_value: 64 << 10,
        reinsert_fraction,
        ..config(dir.path())
    });
    let hot: Vec<_> = (0..100u64).map(|i| blob(i, 4096)).collect();
    let hot_digests: Vec<_> = hot.iter().map(|b| put(&engine, b)).collect();
    let (mut hits, mut reads) = (0u32, 0u32);
    for step in 0..3000u64 {
        put(&engine, &blob(1_000_000 + step, 16 << 10));
        let k = (step % 100) as usize;
        reads += 1;
        match block_on(engine.get_bytes(hot_digests[k])) {
            Ok(b) => {
                assert!(b == hot[k]);
                hits += 1;
            }
            Err(e) if e.kind() == ErrorKind::NotFound => {
                put(&engine, &hot[k]);
            }
            Err(e) => panic!("{e}"),
        }
    }
    block_on(engine.shutdown()).unwrap();
    f64::from(hits) / f64::from(reads)
}

#[test]
fn hot_set_survives_eviction_better_than_fifo() {
    let fifo = hot_set_hit_ratio(0.0);
    let reinsert = hot_set_hit_ratio(0.5);
    println!("hit ratio: fifo {fifo:.3}, with reinsertion {reinsert:.3}");
    assert!(
        reinsert >= fifo + 0.1,
        "reinsertion {reinsert:.3} is not clearly above FIFO {fifo:.3}"
    );
}
