//! SHA-256 of one message against several hashed together: the figures behind
//! `storage-engine/src/sha256.rs` and the node's upload hashing (`upload_hash.rs`).
//!
//! Every streamed upload is hashed before it becomes visible; under `bs-write` that
//! was 38% of the node's CPU. One stream leaves the SHA unit waiting on each round's
//! result; two to four streams fill the gaps. Each case hashes 64 KiB per message (the
//! load generator's chunk size), so MB/s compare directly.

use cairn_storage::internals::{update_together, Sha256};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use sha2::Digest as _;
use std::hint::black_box;

const CHUNK: usize = 64 << 10;

fn bench(c: &mut Criterion) {
    let messages: Vec<Vec<u8>> = (0..4u8)
        .map(|seed| {
            (0..CHUNK)
                .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                .collect()
        })
        .collect();
    let mut group = c.benchmark_group("sha256_64KiB");
    group.throughput(Throughput::Bytes(CHUNK as u64));
    group.bench_function("sha2_one_message", |b| {
        b.iter(|| black_box(sha2::Sha256::digest(black_box(&messages[0]))))
    });
    for count in 1..=4 {
        group.throughput(Throughput::Bytes((count * CHUNK) as u64));
        group.bench_function(format!("together_{count}"), |b| {
            let mut hashers = vec![Sha256::default(); count];
            b.iter(|| {
                let mut items: Vec<(&mut Sha256, &[u8])> = hashers
                    .iter_mut()
                    .zip(&messages)
                    .map(|(hasher, message)| (hasher, &message[..]))
                    .collect();
                update_together(black_box(&mut items));
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
