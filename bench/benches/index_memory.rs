//! Index memory per object, measured from the allocator.
//!
//! It fills the engine's own index type (`cairn_storage::internals::Index`: a hashbrown
//! map from 8-byte key prefix to a 16-byte location, exposed by the crate's
//! `bench-internals` feature) with N uniformly random prefixes, inserting one at a time
//! as the engine does, and divides the live-heap growth (counted by a wrapping global
//! allocator) by N. RSS growth is printed as a cross-check.
//!
//! This is the index alone. The engine also keeps, per segment, the list of prefixes
//! written there (8 bytes per object, for the reclaimer); `benches/recovery.rs` prints
//! the whole engine's heap per object after recovering a real data directory.
//!
//! `CAIRN_BENCH_INDEX_COUNTS` (comma-separated, default `1000000,10000000`) sets N.

use cairn_bench::{live_heap_bytes, result, rss_bytes, CountingAlloc};
use cairn_storage::internals::{Index, Loc, Prefix};
use std::hint::black_box;

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fn measure(count: u64) {
    let heap_before = live_heap_bytes();
    let rss_before = rss_bytes();
    let mut index = Index::default();
    let mut x: u64 = 0x2545_F491_4F6C_DD1D;
    for i in 0..count {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let loc = Loc::new((i >> 16) as u32, (i as u32).wrapping_mul(104), 104, false);
        index.insert(Prefix::new(x), loc);
    }
    let heap = live_heap_bytes() - heap_before;
    let rss = rss_bytes()
        .zip(rss_before)
        .map(|(after, before)| after.saturating_sub(before));
    let n = count as f64;
    let label = if count % 1_000_000 == 0 {
        format!("{}M", count / 1_000_000)
    } else {
        count.to_string()
    };
    println!(
        "index of {count} objects: {} entries, capacity {}, load {:.2}, {heap} heap bytes",
        index.len(),
        index.capacity(),
        index.len() as f64 / index.capacity() as f64 * 7.0 / 8.0,
    );
    result(
        &format!("index_memory.{label}.heap_per_object"),
        heap as f64 / n,
        "bytes",
    );
    if let Some(rss) = rss {
        result(
            &format!("index_memory.{label}.rss_per_object"),
            rss as f64 / n,
            "bytes",
        );
    }
    black_box(&index);
}

fn main() {
    // `cargo bench` passes `--bench`; without it (`cargo test --benches`), stay quick.
    let quick = !std::env::args().any(|a| a == "--bench");
    let counts = std::env::var("CAIRN_BENCH_INDEX_COUNTS")
        .unwrap_or_else(|_| if quick { "100000" } else { "1000000,10000000" }.to_string());
    for c in counts.split(',').filter(|s| !s.is_empty()) {
        let count: u64 = c
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("CAIRN_BENCH_INDEX_COUNTS: {c:?} is not a number"));
        measure(count);
    }
}
