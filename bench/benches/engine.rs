//! Put, get and find-missing through the engine's public handle, driven from the bench
//! thread with `block_on` while the shards run on their own executor threads.
//!
//! - `put/SIZE`: one upload at a time (streamed in 1 MiB chunks), each a distinct blob;
//!   the client-side digest is computed outside the timed region.
//! - `put_x64/SIZE`: 64 small uploads in flight at once (group commit at work).
//! - `get_memory/SIZE`: small blobs just written, still in their partition's packed
//!   tail buffer, served from memory.
//! - `get_disk/SIZE`: blobs read after a restart, so every byte comes from the device
//!   (O_DIRECT, no page cache) and is CRC-checked.
//! - `find_missing/1000`: 1000 digests, half of them stored.
//!
//! Besides criterion's report, each benchmark prints `RESULT` lines: p50/p99 latency
//! per operation and throughput (see `Latencies::report`).

use cairn_bench::{
    blob, digest, fill, put_chunked, read_all, stamped, Fixture, Latencies, KIB, MIB,
};
use criterion::{Criterion, SamplingMode, Throughput};
use futures::executor::block_on;
use std::time::{Duration, Instant};

const SIZES: [(usize, &str); 4] = [
    (4 * KIB, "4KiB"),
    (64 * KIB, "64KiB"),
    (MIB, "1MiB"),
    (16 * MIB, "16MiB"),
];
const SMALL: [(usize, &str); 2] = [(4 * KIB, "4KiB"), (64 * KIB, "64KiB")];
/// Uploads in flight in `put_x64`.
const INFLIGHT: usize = 64;

fn put(c: &mut Criterion) {
    let fx = Fixture::new(|_| {});
    let mut group = c.benchmark_group("put");
    group.sampling_mode(SamplingMode::Flat);
    for (size, label) in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let base = blob(size as u64, size);
        let mut n = 0u64;
        let mut lat = Latencies::new(size as u64);
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    n += 1;
                    let data = stamped(&base, n);
                    let d = digest(&data);
                    let t = Instant::now();
                    block_on(put_chunked(&fx.engine, d, &data)).expect("put");
                    let e = t.elapsed();
                    lat.record(e);
                    total += e;
                }
                total
            })
        });
        lat.report(&format!("put.{label}"));
    }
    group.finish();
}

fn put_concurrent(c: &mut Criterion) {
    let fx = Fixture::new(|_| {});
    let mut group = c.benchmark_group("put_x64");
    group.sampling_mode(SamplingMode::Flat);
    for (size, label) in SMALL {
        group.throughput(Throughput::Bytes((size * INFLIGHT) as u64));
        let base = blob(size as u64 + 1, size);
        let mut n = 0u64;
        let mut lat = Latencies::new(size as u64);
        group.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let batch: Vec<_> = (0..INFLIGHT)
                        .map(|_| {
                            n += 1;
                            let data = stamped(&base, n);
                            (digest(&data), data)
                        })
                        .collect();
                    let t = Instant::now();
                    let times = block_on(futures::future::join_all(batch.into_iter().map(
                        |(d, data)| {
                            let engine = &fx.engine;
                            async move {
                                let t = Instant::now();
                                engine.put(d, data).await.expect("put");
                                t.elapsed()
                            }
                        },
                    )));
                    let e = t.elapsed();
                    times.into_iter().for_each(|d| lat.record(d));
                    lat.add_wall(e);
                    total += e;
                }
                total
            })
        });
        lat.report(&format!("put_x64.{label}"));
    }
    group.finish();
}

/// Reads `digests` round robin, one at a time.
fn bench_reads(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    fx: &Fixture,
    label: &str,
    size: usize,
    digests: &[cairn_storage::Digest],
    lat: &mut Latencies,
) {
    let mut next = 0usize;
    group.throughput(Throughput::Bytes(size as u64));
    group.bench_function(label, |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // A stride coprime with the count visits blobs out of write order.
                next = (next + 7919) % digests.len();
                let t = Instant::now();
                let got = block_on(read_all(&fx.engine, digests[next])).expect("get");
                let e = t.elapsed();
                assert_eq!(got, size as u64, "short read");
                lat.record(e);
                total += e;
            }
            total
        })
    });
}

/// Writes `count` blobs of `size` bytes and returns their digests.
fn store(fx: &Fixture, seed: u64, size: usize, count: usize) -> Vec<cairn_storage::Digest> {
    let base = blob(seed, size);
    (0..count as u64)
        .map(|i| {
            let data = stamped(&base, i);
            let d = digest(&data);
            block_on(put_chunked(&fx.engine, d, &data)).expect("put");
            d
        })
        .collect()
}

fn get_memory(c: &mut Criterion) {
    let mut group = c.benchmark_group("get_memory");
    group.sampling_mode(SamplingMode::Flat);
    // Few enough that every partition's tail (1 MiB kept after a flush) holds them all.
    for (size, label, count) in [(4 * KIB, "4KiB", 128), (64 * KIB, "64KiB", 32)] {
        let fx = Fixture::new(|_| {});
        let digests = store(&fx, 10 + size as u64, size, count);
        let mut lat = Latencies::new(size as u64);
        bench_reads(&mut group, &fx, label, size, &digests, &mut lat);
        lat.report(&format!("get_memory.{label}"));
    }
    group.finish();
}

fn get_disk(c: &mut Criterion) {
    let mut group = c.benchmark_group("get_disk");
    group.sampling_mode(SamplingMode::Flat);
    for ((size, label), count) in SIZES.into_iter().zip([4096, 1024, 128, 16]) {
        let mut fx = Fixture::new(|_| {});
        let digests = store(&fx, 20 + size as u64, size, count);
        fx.restart();
        let mut lat = Latencies::new(size as u64);
        bench_reads(&mut group, &fx, label, size, &digests, &mut lat);
        lat.report(&format!("get_disk.{label}"));
    }
    group.finish();
}

fn find_missing(c: &mut Criterion) {
    let fx = Fixture::new(|_| {});
    fill(&fx.engine, 30, 500, 100, 64).expect("fill");
    let present = blob(30, 100);
    let absent = blob(31, 100);
    let digests: Vec<_> = (0..1000u64)
        .map(|i| {
            let base = if i % 2 == 0 { &present } else { &absent };
            digest(&stamped(base, i / 2))
        })
        .collect();
    let mut group = c.benchmark_group("find_missing");
    group.throughput(Throughput::Elements(digests.len() as u64));
    let mut lat = Latencies::new(0);
    group.bench_function("1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let missing = block_on(fx.engine.find_missing(digests.clone())).expect("find");
                let e = t.elapsed();
                assert_eq!(missing.len(), 500, "half the digests are stored");
                lat.record(e);
                total += e;
            }
            total
        })
    });
    group.finish();
    lat.report("find_missing.1000");
}

fn main() {
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20)
        .configure_from_args();
    put(&mut c);
    put_concurrent(&mut c);
    get_memory(&mut c);
    get_disk(&mut c);
    find_missing(&mut c);
    c.final_summary();
}
