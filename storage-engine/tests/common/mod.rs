//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use bytes::Bytes;
use cairn_storage::{Digest, DigestFunction, Durability, Engine, EngineConfig};
use std::path::{Path, PathBuf};

pub use futures::executor::block_on;

pub const MIB: u64 = 1 << 20;

/// A small engine: 4 partitions of 8 MiB segments, 128 MiB in all, syncing only at
/// shutdown (tests of power-loss durability set `Durability::Sync`), with a 64 MiB
/// memory tier.
pub fn config(dir: &Path) -> EngineConfig {
    EngineConfig {
        dir: dir.to_path_buf(),
        max_size: 128 * MIB,
        shards: 2,
        partitions: 4,
        segment_size: Some(8 * MIB),
        small_blob_max: 64 << 10,
        max_ac_value: 64 << 10,
        durability: Durability::Interval,
        sync_interval: None,
        checkpoint_interval: None,
        reinsert_fraction: 0.5,
        pin_shards: false,
        replicate: false,
        memory_cache: 64 * MIB,
    }
}

pub fn start(config: EngineConfig) -> Engine {
    Engine::start(config).expect("engine starts")
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

pub fn digest(data: &[u8]) -> Digest {
    Digest::of(DigestFunction::Sha256, data)
}

pub fn put(engine: &Engine, data: &Bytes) -> Digest {
    let d = digest(data);
    block_on(engine.put(d, data.clone())).expect("put succeeds");
    d
}

/// Bytes the data directory occupies on disk (allocated blocks of every file).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0;
    let mut stack: Vec<PathBuf> = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else if entry.file_name() != "MANIFEST" {
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// Copies a live data directory: what a crash at this moment would leave on disk,
/// for everything acknowledged so far.
pub fn crash_image(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap().flatten() {
        let target = to.join(entry.file_name());
        if entry.metadata().unwrap().is_dir() {
            crash_image(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// All segment files of a data directory, oldest first within each partition.
pub fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for p in std::fs::read_dir(dir).unwrap().flatten() {
        if !p.path().is_dir() {
            continue;
        }
        for f in std::fs::read_dir(p.path()).unwrap().flatten() {
            let path = f.path();
            let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
            if ["packed", "extents", "huge"].contains(&ext) {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

/// The header-checksum nonce of a data directory, from its MANIFEST.
pub fn nonce(dir: &Path) -> u64 {
    let text = std::fs::read_to_string(dir.join("MANIFEST")).unwrap();
    let hex = text
        .lines()
        .find_map(|l| l.strip_prefix("nonce="))
        .expect("manifest names a nonce");
    u64::from_str_radix(hex, 16).unwrap()
}

/// Where a blob's record sits: (segment file, offset of its header).
pub fn locate(dir: &Path, d: &Digest) -> (PathBuf, usize) {
    let nonce = nonce(dir);
    for f in segment_files(dir) {
        let bytes = std::fs::read(&f).unwrap();
        let (found, _) = cairn_storage::format::scan_records(&bytes, 0, nonce);
        if let Some((pos, _)) = found.iter().find(|(_, h)| h.key.hash == d.hash) {
            return (f, *pos);
        }
    }
    panic!("{d} not found on disk");
}

pub fn flip_byte(path: &Path, at: usize) {
    let mut bytes = std::fs::read(path).unwrap();
    bytes[at] ^= 0x5a;
    std::fs::write(path, bytes).unwrap();
}
