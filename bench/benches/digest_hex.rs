//! Hex digests in and out: every FindMissingBlobs digest, resource name and HTTP path
//! is parsed from 64 hex characters, and every missing digest is printed back.
//!
//! Profiling the node under `cairn-bench --scenario find-missing` showed parsing as the
//! largest single cost of that call (32% of the node's CPU); this bench keeps the
//! parser's cost visible per digest.

use cairn_storage::{Digest, DigestFunction};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::hint::black_box;

const COUNT: usize = 1000;

fn hashes() -> Vec<String> {
    (0..COUNT as u64)
        .map(|i| Digest::of(DigestFunction::Sha256, &i.to_le_bytes()).hash_hex())
        .collect()
}

fn bench(c: &mut Criterion) {
    let texts = hashes();
    let digests: Vec<Digest> = texts
        .iter()
        .filter_map(|text| Digest::from_hex(DigestFunction::Sha256, text, 1).ok())
        .collect();
    let mut group = c.benchmark_group("digest_hex");
    group.throughput(Throughput::Elements(COUNT as u64));
    group.bench_function("parse_1000", |b| {
        b.iter(|| {
            for text in &texts {
                black_box(Digest::from_hex(DigestFunction::Sha256, black_box(text), 1).ok());
            }
        })
    });
    group.bench_function("format_1000", |b| {
        b.iter(|| {
            for digest in &digests {
                black_box(black_box(digest).hash_hex());
            }
        })
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
