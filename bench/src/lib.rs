//! Shared helpers for cairn's storage-engine benchmarks: engine fixtures in scratch
//! directories, deterministic blobs, latency summaries, an allocation-counting
//! allocator, and the `RESULT name=value unit` lines every bench prints.
//!
//! Scratch directories are created under `$CAIRN_BENCH_DIR` when it is set, else under
//! the system temporary directory. Either must be on a filesystem with O_DIRECT (not
//! tmpfs), like a real data directory.
//!
//! [`loadgen`] is the REAPI load generator behind the `cairn-bench` binary.

use bytes::Bytes;
use cairn_storage::{Digest, DigestFunction, Engine, EngineConfig, Result};
use futures::executor::block_on;
use futures::StreamExt;
use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tempfile::TempDir;

pub mod loadgen;

pub const KIB: usize = 1 << 10;
pub const MIB: usize = 1 << 20;

/// Chunk size uploads are streamed in, like a ByteStream client's write requests.
pub const UPLOAD_CHUNK: usize = MIB;

/// A fresh scratch directory (see the crate docs for where).
pub fn scratch_dir() -> TempDir {
    let base = std::env::var_os("CAIRN_BENCH_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    if let Err(e) = std::fs::create_dir_all(&base) {
        panic!("creating {}: {e}", base.display());
    }
    tempfile::Builder::new()
        .prefix("cairn-bench-")
        .tempdir_in(&base)
        .unwrap_or_else(|e| panic!("creating a scratch directory in {}: {e}", base.display()))
}

/// The benchmark configuration: the defaults (one shard per CPU, 16 partitions,
/// segment size derived from the budget, `Durability::Sync`) with a 4 GiB budget and
/// no periodic checkpoints. `CAIRN_BENCH_DURABILITY=interval` (or `sync`) picks the
/// durability setting, to measure what each costs.
pub fn config(dir: &Path) -> EngineConfig {
    let durability = match std::env::var("CAIRN_BENCH_DURABILITY") {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|e| panic!("CAIRN_BENCH_DURABILITY: {e}")),
        Err(_) => EngineConfig::default().durability,
    };
    EngineConfig {
        dir: dir.to_path_buf(),
        max_size: 4 << 30,
        checkpoint_interval: None,
        durability,
        ..EngineConfig::default()
    }
}

/// An engine running in its own scratch directory; shut down (and the directory
/// removed) on drop.
pub struct Fixture {
    pub engine: Engine,
    config: EngineConfig,
    _dir: TempDir,
}

impl Fixture {
    pub fn new(configure: impl FnOnce(&mut EngineConfig)) -> Fixture {
        let dir = scratch_dir();
        let mut config = config(dir.path());
        configure(&mut config);
        let engine = Engine::start(config.clone()).expect("engine starts");
        Fixture {
            engine,
            config,
            _dir: dir,
        }
    }

    /// Shuts the engine down and starts it again on the same directory: afterwards
    /// nothing is in any write buffer, every read goes to the device.
    pub fn restart(&mut self) {
        block_on(self.engine.shutdown()).expect("engine shuts down");
        self.engine = Engine::start(self.config.clone()).expect("engine restarts");
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = block_on(self.engine.shutdown());
    }
}

/// Deterministic pseudo-random bytes (xorshift), distinct per seed.
pub fn blob(seed: u64, len: usize) -> Bytes {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    Bytes::from(out)
}

/// A copy of `base` with `n` stamped over its first 8 bytes: a distinct blob per `n`.
pub fn stamped(base: &[u8], n: u64) -> Bytes {
    let mut v = base.to_vec();
    let stamp = n.to_le_bytes();
    let k = stamp.len().min(v.len());
    v[..k].copy_from_slice(&stamp[..k]);
    Bytes::from(v)
}

pub fn digest(data: &[u8]) -> Digest {
    Digest::of(DigestFunction::Sha256, data)
}

/// Uploads a blob in `UPLOAD_CHUNK` pieces (zero-copy slices of `data`).
pub async fn put_chunked(engine: &Engine, d: Digest, data: &Bytes) -> Result<()> {
    let mut upload = engine.begin_put(d).await?;
    let mut at = 0;
    while at < data.len() {
        let end = (at + UPLOAD_CHUNK).min(data.len());
        upload.write(data.slice(at..end)).await?;
        at = end;
    }
    upload.finish().await
}

/// Streams a whole blob and returns how many bytes arrived (nothing is copied).
pub async fn read_all(engine: &Engine, d: Digest) -> Result<u64> {
    let mut stream = engine.get(d, 0, None).await?;
    let mut n = 0;
    while let Some(chunk) = stream.next().await {
        n += chunk?.len() as u64;
    }
    Ok(n)
}

/// Stores `count` distinct blobs of `size` bytes (at least 8), `inflight` at a time.
/// Blob `i` is `stamped(blob(seed, size), i)`.
pub fn fill(engine: &Engine, seed: u64, count: u64, size: usize, inflight: usize) -> Result<()> {
    let base = blob(seed, size.max(8));
    block_on(
        futures::stream::iter(0..count)
            .map(|i| {
                let data = stamped(&base, i);
                let d = digest(&data);
                async move { engine.put(d, data).await }
            })
            .buffer_unordered(inflight)
            .fold(Ok(()), |acc: Result<()>, r| async move { acc.and(r) }),
    )
}

/// Prints one headline number in the stable, greppable form `RESULT name=value unit`.
pub fn result(name: &str, value: f64, unit: &str) {
    println!("RESULT {name}={value:.3} {unit}");
}

/// Per-operation latencies of one benchmark, and the bytes each operation moved.
#[derive(Default)]
pub struct Latencies {
    ops: Vec<Duration>,
    bytes_per_op: u64,
    wall: Duration,
}

impl Latencies {
    pub fn new(bytes_per_op: u64) -> Latencies {
        Latencies {
            ops: Vec::new(),
            bytes_per_op,
            wall: Duration::ZERO,
        }
    }

    pub fn record(&mut self, d: Duration) {
        self.ops.push(d);
    }

    /// Adds wall-clock time for operations that ran concurrently; when any is added,
    /// throughput is computed over it instead of over the sum of latencies.
    pub fn add_wall(&mut self, d: Duration) {
        self.wall += d;
    }

    /// Prints p50, p99 (µs) and throughput over the operations timed, warm-up
    /// included. Throughput is bytes over the sum of latencies (for operations run
    /// one at a time, that is wall-clock throughput) or over `add_wall` time.
    pub fn report(&mut self, name: &str) {
        if self.ops.is_empty() {
            return;
        }
        self.ops.sort_unstable();
        let pct = |p: f64| {
            let i = ((self.ops.len() as f64 * p).ceil() as usize).clamp(1, self.ops.len()) - 1;
            self.ops[i].as_secs_f64() * 1e6
        };
        result(&format!("{name}.p50"), pct(0.50), "us");
        result(&format!("{name}.p99"), pct(0.99), "us");
        result(&format!("{name}.ops"), self.ops.len() as f64, "ops");
        if self.bytes_per_op > 0 {
            let total: f64 = if self.wall.is_zero() {
                self.ops.iter().map(Duration::as_secs_f64).sum()
            } else {
                self.wall.as_secs_f64()
            };
            let mib = (self.bytes_per_op as f64 * self.ops.len() as f64) / MIB as f64;
            result(&format!("{name}.throughput"), mib / total, "MiB/s");
        }
    }
}

static LIVE: AtomicUsize = AtomicUsize::new(0);

/// A global allocator that counts live heap bytes; install it in a bench binary with
/// `#[global_allocator] static A: CountingAlloc = CountingAlloc;` and read
/// [`live_heap_bytes`].
pub struct CountingAlloc;

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

/// Heap bytes currently allocated through [`CountingAlloc`] (0 if it is not installed).
pub fn live_heap_bytes() -> usize {
    LIVE.load(Ordering::Relaxed)
}

/// Resident set size of this process, from `/proc/self/statm`.
pub fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

/// Reads an unsigned integer from an environment variable, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .replace('_', "")
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}
