//! Engine configuration. Every field states its default; `EngineConfig::default()` is
//! what `cairn` runs with when nothing is configured.

use crate::error::{Error, Result};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Data directory, created if missing. Default: `./cairn-data`.
    pub dir: PathBuf,
    /// Byte budget for every segment and checkpoint file under `dir`; disk usage never
    /// goes over it. With more than one partition, an eighth of it is the node-wide
    /// overflow pool for uploads in flight (see [`OVERFLOW_SHARE`]) and the rest is
    /// split evenly between partitions; a single partition has it all. Default: 10 GiB.
    pub max_size: u64,
    /// Number of shards (glommio executors) the partitions are spread over.
    /// Default: the number of CPUs this process may run on.
    pub shards: usize,
    /// Number of partitions, fixed when the data directory is created (the manifest
    /// wins over this field afterwards). Default: 16.
    pub partitions: u32,
    /// Size of each segment file. `None` picks one sixteenth of a partition's share of
    /// `max_size` (pool included),
    /// rounded down to a power of two and clamped to 1 MiB..=64 MiB. Default: `None`.
    pub segment_size: Option<u64>,
    /// CAS blobs up to this size are staged in memory and group-committed into the
    /// packed segment; larger ones stream into a reserved extent. Clamped to a quarter
    /// segment less the 72-byte record header. Default: 256 KiB.
    pub small_blob_max: u64,
    /// Largest action-cache value accepted, clamped like `small_blob_max`.
    /// Default: 1 MiB.
    pub max_ac_value: u64,
    /// When a write is acknowledged: after an `fdatasync` covering it
    /// ([`Durability::Sync`]) or as soon as it is written ([`Durability::Interval`]).
    /// Default: [`Durability::Sync`].
    pub durability: Durability,
    /// With [`Durability::Interval`]: how often written segments are `fdatasync`ed,
    /// which bounds the acknowledged writes a power loss can take (a process crash
    /// loses nothing acknowledged either way). `None` syncs only at shutdown. Ignored
    /// under [`Durability::Sync`]. Default: 1 s.
    pub sync_interval: Option<Duration>,
    /// How often each partition writes an index checkpoint (also written on clean
    /// shutdown). `None` writes one only at shutdown. Default: 300 s.
    pub checkpoint_interval: Option<Duration>,
    /// Fraction of a segment that eviction may rewrite at the head for records read
    /// since they were written (0 = pure FIFO). Default: 0.5.
    pub reinsert_fraction: f64,
    /// Pin shard k to CPU k when the engine runs its own threads (`Engine::start`).
    /// Default: false.
    pub pin_shards: bool,
    /// Keep every record until an uploader confirms it reached a slow tier (see
    /// `Engine::replication_batch`). Default: false.
    pub replicate: bool,
    /// Bytes of verified records kept in memory in front of the log, split evenly
    /// between shards (`memory_tier.rs`); 0 turns the tier off. Each entry is charged
    /// its payload plus `ENTRY_OVERHEAD` (320) bytes. Default:
    /// [`default_memory_cache`], a sixteenth of physical memory.
    pub memory_cache: u64,
}

/// A sixteenth of physical memory (1 GiB when it cannot be read). The log reads with
/// O_DIRECT, so the page cache holds none of it and this memory would otherwise sit
/// idle; a sixteenth leaves the rest to the workers and builds sharing the host in a
/// single-node setup, and still holds a warm build's action results, Directory and
/// Tree messages and small outputs many times over (1.4 GiB on a 23 GiB host).
pub fn default_memory_cache() -> u64 {
    // SAFETY: sysconf only reads system configuration.
    let (pages, page) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    if pages <= 0 || page <= 0 {
        return 1 << 30;
    }
    (pages as u64).saturating_mul(page as u64) / 16
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            dir: PathBuf::from("cairn-data"),
            max_size: 10 << 30,
            shards: std::thread::available_parallelism().map_or(1, |n| n.get()),
            partitions: 16,
            segment_size: None,
            small_blob_max: 256 << 10,
            max_ac_value: 1 << 20,
            durability: Durability::Sync,
            sync_interval: Some(Duration::from_secs(1)),
            checkpoint_interval: Some(Duration::from_secs(300)),
            reinsert_fraction: 0.5,
            pin_shards: false,
            replicate: false,
            memory_cache: default_memory_cache(),
        }
    }
}

/// What "stored" means when a write is acknowledged.
///
/// Writes are O_DIRECT, so an acknowledged write survives a crash of the process
/// either way; the two settings differ on power loss, when the device's volatile
/// write cache (and the filesystem's record of a new segment) is lost unless an
/// `fdatasync` flushed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// A write is acknowledged, and becomes visible to reads, only after an
    /// `fdatasync` that started after the write completed has succeeded. Group
    /// commit: one `fdatasync` covers every write that completed while the previous
    /// one ran, so concurrent writers share its cost.
    Sync,
    /// A write is acknowledged once written; `fdatasync` runs every
    /// `EngineConfig::sync_interval`. A power loss can drop the writes acknowledged
    /// since the last sync (up to one interval).
    Interval,
}

impl std::str::FromStr for Durability {
    type Err = Error;

    fn from_str(s: &str) -> Result<Durability> {
        match s {
            "sync" => Ok(Durability::Sync),
            "interval" => Ok(Durability::Interval),
            other => Err(Error::invalid(format!(
                "durability must be `sync` or `interval`, not `{other}`"
            ))),
        }
    }
}

/// The share of `max_size` kept as the node-wide overflow pool: one eighth.
///
/// Uploads are charged as they write, and a segment holding one in flight cannot be
/// reclaimed, so a partition that happens to draw more than its share of concurrent
/// uploads runs out of its own budget with nothing it may evict. It then borrows from
/// the pool, which every partition shares. Sizing it, for 200 concurrent 64 MiB
/// uploads on a 16 GiB budget of 16 partitions (78% of the budget in flight, 12.5
/// uploads per partition on average): with the pool at 1/8, a partition holds 896 MiB
/// of its own, its active packed segment and 13 uploads; the uploads beyond 13 in
/// every partition add up to 18 on average (multinomial draws, 400,000 simulated) and
/// exceed the pool's 32 once in a thousand bursts. A pool of 1/16 (one partition's
/// worth) is exceeded in 15% of them. The cost is that stored data fills at most 7/8
/// of the budget, since partitions evict down to their own budget before borrowing.
pub const OVERFLOW_SHARE: u64 = 8;

/// The per-partition numbers derived from a config and the manifest.
#[derive(Debug, Clone)]
pub(crate) struct PartitionLimits {
    /// This partition's own budget: `max_size` less the overflow pool, split evenly.
    pub budget: u64,
    /// `max_size` split evenly: the own budget plus an even part of the pool.
    pub share: u64,
    /// Bytes of the node-wide overflow pool.
    pub overflow_pool: u64,
    pub segment_size: u64,
    pub small_blob_max: u64,
    pub max_ac_value: u64,
    pub reinsert_budget: u64,
    pub replicate: bool,
    pub durability: Durability,
    /// Partitions in the store, all of the same budget: with keys spread evenly, one
    /// partition's usage times this estimates the whole store's.
    pub partitions: u32,
}

impl PartitionLimits {
    /// The largest blob accepted: half a partition's budget, so that storing one never
    /// reclaims more than half of what the partition holds.
    pub fn max_blob_size(&self) -> u64 {
        self.budget / 2
    }
}

/// Segments a partition needs at least: the packed one, the extent one, and room to
/// roll either over while the oldest is reclaimed.
const MIN_SEGMENTS: u64 = 4;

impl EngineConfig {
    pub(crate) fn limits(&self, partitions: u32) -> Result<PartitionLimits> {
        if self.shards == 0 {
            return Err(Error::invalid("shards must be at least 1"));
        }
        let share = self.max_size / u64::from(partitions);
        let overflow_pool = if partitions > 1 {
            self.max_size / OVERFLOW_SHARE
        } else {
            0
        };
        let budget = (self.max_size - overflow_pool) / u64::from(partitions);
        let segment_size = match self.segment_size {
            Some(s) => s,
            None => {
                let s = (share / 16).clamp(1 << 20, 64 << 20);
                1 << (63 - s.leading_zeros())
            }
        };
        if segment_size % crate::format::ALIGN != 0 || segment_size > u64::from(u32::MAX) {
            return Err(Error::invalid(
                "segment_size must be a multiple of 4096 and below 4 GiB",
            ));
        }
        // Checked against the share, pool included: only packed segments are charged
        // whole, and a partition short of its own budget borrows from the pool.
        if share < MIN_SEGMENTS * segment_size {
            return Err(Error::new(
                crate::ErrorKind::InvalidArgument,
                format!(
                    "max_size {} is too small for {} partitions of {}-byte segments: \
                     need at least {} bytes",
                    self.max_size,
                    partitions,
                    segment_size,
                    MIN_SEGMENTS * segment_size * u64::from(partitions)
                ),
            ));
        }
        // Small records must fit a quarter segment; small budgets get small segments,
        // so the two limits shrink with them rather than making the budget an error.
        let quarter = segment_size / 4 - crate::format::HEADER_LEN as u64;
        let small_blob_max = self.small_blob_max.min(quarter);
        let max_ac_value = self.max_ac_value.min(quarter);
        Ok(PartitionLimits {
            budget,
            share,
            overflow_pool,
            segment_size,
            small_blob_max,
            max_ac_value,
            reinsert_budget: (segment_size as f64 * self.reinsert_fraction.clamp(0.0, 0.9)) as u64,
            replicate: self.replicate,
            durability: self.durability,
            partitions,
        })
    }
}
