//! Recovery time: how long `Engine::start` takes on a data directory holding N small
//! objects, with the index checkpoints a clean shutdown writes, and without them (every
//! segment scanned record by record).
//!
//! The directory is built once: N distinct 32-byte blobs written with 256 uploads in
//! flight into 1 MiB segments, then `shutdown()`, which writes the checkpoints. Each
//! timed iteration is one `Engine::start` (recovery of every partition, then ready) in
//! a fresh child process, which times it and reports back; the untimed `shutdown()`
//! after it writes the checkpoints again, and the no-checkpoint variant deletes every
//! `p*/checkpoint` before each start.
//!
//! It also prints the engine's heap per object after recovery (allocator-counted
//! growth over an empty engine's), which includes everything the engine keeps per
//! object: the index and the per-segment key lists.
//!
//! `CAIRN_BENCH_RECOVERY_OBJECTS` sets N (default 1000000 under `cargo bench`, 10000
//! without `--bench`, as `cargo test --benches` runs it).

use cairn_bench::{env_u64, fill, live_heap_bytes, result, scratch_dir, CountingAlloc, KIB, MIB};
use cairn_storage::{Engine, EngineConfig};
use criterion::{Criterion, SamplingMode};
use futures::executor::block_on;
use std::path::Path;
use std::time::{Duration, Instant};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

/// 1 MiB segments, and a budget of at least 1 GiB with room for every object twice
/// over (nothing is evicted).
fn config(dir: &Path, objects: u64) -> EngineConfig {
    EngineConfig {
        dir: dir.to_path_buf(),
        max_size: (1 << 30u64).max(objects * 256),
        partitions: 16,
        segment_size: Some(MIB as u64),
        small_blob_max: 64 * KIB as u64,
        max_ac_value: 64 * KIB as u64,
        checkpoint_interval: None,
        ..EngineConfig::default()
    }
}

fn remove_checkpoints(dir: &Path) {
    let entries = std::fs::read_dir(dir).expect("listing the data directory");
    for entry in entries.flatten() {
        let cp = entry.path().join("checkpoint");
        if entry.file_name().to_string_lossy().starts_with('p') && cp.exists() {
            std::fs::remove_file(&cp).expect("removing a checkpoint");
        }
    }
}

/// Set in the child process that performs one timed start.
const CHILD_ENV: &str = "CAIRN_BENCH_RECOVERY_CHILD";

/// Starts the engine once in a fresh child process (a restart is a new process, and
/// nothing one engine leaves behind can affect the next), returning the time
/// `Engine::start` took, the object count it recovered, and the heap it held.
fn start_once(dir: &Path, objects: u64) -> (Duration, u64, usize) {
    let exe = std::env::current_exe().expect("locating the bench binary");
    let out = std::process::Command::new(exe)
        .env(CHILD_ENV, dir)
        .env("CAIRN_BENCH_RECOVERY_OBJECTS", objects.to_string())
        .output()
        .expect("running a recovery child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "recovery child failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    let fields: Vec<u64> = stdout
        .lines()
        .find_map(|l| l.strip_prefix("CHILD "))
        .expect("the child reports its numbers")
        .split_whitespace()
        .map(|f| f.parse().expect("a number"))
        .collect();
    (
        Duration::from_nanos(fields[0]),
        fields[1],
        fields[2] as usize,
    )
}

/// The child's side of `start_once`.
fn child(dir: &Path, objects: u64) {
    let before = live_heap_bytes();
    let t = Instant::now();
    let engine = Engine::start(config(dir, objects)).expect("engine starts");
    let elapsed = t.elapsed();
    let heap = live_heap_bytes().saturating_sub(before);
    let found = block_on(engine.stats()).expect("stats").objects();
    block_on(engine.shutdown()).expect("engine shuts down");
    println!("CHILD {} {found} {heap}", elapsed.as_nanos());
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    let objects = env_u64(
        "CAIRN_BENCH_RECOVERY_OBJECTS",
        if quick { 10_000 } else { 1_000_000 },
    );
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        child(Path::new(&dir), objects);
        return;
    }
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(10)
        .configure_from_args();

    let empty_dir = scratch_dir();
    let (_, _, empty_heap) = start_once(empty_dir.path(), objects);

    let dir = scratch_dir();
    let t = Instant::now();
    let engine = Engine::start(config(dir.path(), objects)).expect("engine starts");
    fill(&engine, 40, objects, 32, 256).expect("filling the data directory");
    block_on(engine.shutdown()).expect("engine shuts down");
    let build = t.elapsed();
    println!(
        "wrote {objects} objects in {:.1} s ({:.0} puts/s)",
        build.as_secs_f64(),
        objects as f64 / build.as_secs_f64()
    );
    result("recovery.objects", objects as f64, "objects");
    result(
        "recovery.fill_rate",
        objects as f64 / build.as_secs_f64(),
        "puts/s",
    );

    let (_, found, heap) = start_once(dir.path(), objects);
    assert_eq!(found, objects, "every object recovered from the checkpoint");
    result(
        "recovery.engine_heap_per_object",
        heap.saturating_sub(empty_heap) as f64 / objects as f64,
        "bytes",
    );

    let mut group = c.benchmark_group("recovery");
    group.sampling_mode(SamplingMode::Flat);
    let mut times = [Vec::new(), Vec::new()];
    for (variant, with_checkpoint) in [("with_checkpoint", true), ("without_checkpoint", false)] {
        let times = &mut times[usize::from(!with_checkpoint)];
        group.bench_function(variant, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    if !with_checkpoint {
                        remove_checkpoints(dir.path());
                    }
                    let (elapsed, found, _) = start_once(dir.path(), objects);
                    assert_eq!(found, objects, "every object recovered ({variant})");
                    times.push(elapsed);
                    total += elapsed;
                }
                total
            })
        });
    }
    group.finish();
    let median = |v: &mut Vec<Duration>| {
        v.sort_unstable();
        v.get(v.len() / 2).map(Duration::as_secs_f64)
    };
    let [with, without] = &mut times;
    if let (Some(w), Some(wo)) = (median(with), median(without)) {
        result("recovery.with_checkpoint.median", w * 1e3, "ms");
        result("recovery.without_checkpoint.median", wo * 1e3, "ms");
        result("recovery.checkpoint_speedup", wo / w, "x");
    }
    c.final_summary();
}
