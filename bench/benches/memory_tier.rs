//! The memory tier's own costs, each through the lock every thread takes: a hit (the
//! lookup, the key check, a `Bytes` clone), a miss, and an admission into a full tier
//! (the copy of the payload, the insert, and the evictions that make room).
//!
//! ```text
//! cargo bench -p cairn-bench --bench memory_tier
//! ```

use bytes::Bytes;
use cairn_storage::format::{Key, RecordKind};
use cairn_storage::internals::{Loc, Prefix, SharedTier};
use cairn_storage::DigestFunction;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use std::hint::black_box;

const ENTRIES: u64 = 10_000;
const SIZE: usize = 4096;

fn key(i: u64) -> (Prefix, Loc, Key) {
    let mut hash = [0u8; 32];
    let mixed = i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    hash[..8].copy_from_slice(&mixed.to_le_bytes());
    let key = Key {
        kind: RecordKind::Cas,
        function: DigestFunction::Sha256,
        hash,
        size: SIZE as u64,
    };
    let loc = Loc::new(
        (i / 1000) as u32,
        ((i % 1000) * 5000) as u32,
        SIZE as u64 + 72,
        false,
    );
    (Prefix::new(mixed), loc, key)
}

/// A tier holding `ENTRIES` 4 KiB records, full.
fn full_tier() -> SharedTier {
    let tier = SharedTier::new(ENTRIES * (SIZE as u64 + 320));
    let payload = vec![7u8; SIZE];
    for i in 0..ENTRIES * 2 {
        let (p, loc, k) = key(i);
        tier.lock()
            .admit(0, p, loc, k, Bytes::copy_from_slice(&payload));
    }
    tier
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("memory_tier");
    let tier = full_tier();
    let held: Vec<_> = (0..ENTRIES * 2)
        .map(key)
        .filter(|(p, loc, _)| tier.lock().holds(0, *p, loc))
        .collect();
    let mut n = 0usize;
    group.bench_function("hit_4KiB", |b| {
        b.iter(|| {
            let (p, _, k) = &held[n % held.len()];
            n += 1;
            black_box(tier.lock().get(0, *p, k, false))
        })
    });
    let mut m = 0u64;
    group.bench_function("miss", |b| {
        b.iter(|| {
            let (p, _, k) = key(1_000_000 + m % 100_000);
            m += 1;
            black_box(tier.lock().get(0, p, &k, false))
        })
    });
    let payload = vec![9u8; SIZE];
    let mut a = 0u64;
    group.bench_function("admit_4KiB_into_full_tier", |b| {
        b.iter_batched(
            || {
                a += 1;
                key(10_000_000 + a)
            },
            |(p, loc, k)| {
                tier.lock()
                    .admit(0, p, loc, k, Bytes::copy_from_slice(&payload))
            },
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
