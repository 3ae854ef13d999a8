//! cairn's storage engine: a shard-per-core, log-structured blob store.
//!
//! It stores CAS blobs (keyed by digest) and action-cache entries (keyed by instance
//! name and action digest) on local NVMe, and knows nothing of gRPC. The cache node is
//! its first user; benchmarks and tests drive it directly.
//!
//! The pieces, each in its own module, in the order data flows through them:
//!
//! - [`engine`]: the `Send + Sync` handle that routes requests to shards;
//! - `shard`: one executor thread owning a fixed set of partitions, no locks;
//! - `partition`: a directory of segment files and the in-memory `index` over them;
//! - `flusher`: small records, packed and group-committed with O_DIRECT;
//! - `extent`: large uploads streaming into reserved, aligned extents;
//! - `syncer`: `fdatasync` with group commit, before writes are acknowledged;
//! - `reader`: reads, every byte checked against its CRC before it leaves;
//! - `reclaimer`: the byte budget, FIFO segment reclaim with reinsertion of hot records;
//! - `checkpoint` and `recover`: rkyv index checkpoints and the recovery scan;
//! - [`format`]: the record format (documented byte by byte in FORMAT.md);
//! - `io`: the only module that touches glommio's file API.

mod checkpoint;
mod checks;
mod config;
mod digest;
pub mod engine;
mod error;
mod extent;
#[cfg(feature = "fault-injection")]
pub mod faults;
mod flusher;
pub mod format;
mod index;
mod io;
mod key;
mod manifest;
mod memory_tier;
mod partition;
mod reader;
mod reclaimer;
mod recover;
mod replication;
mod sha256;
mod shard;
mod stream;
mod syncer;
mod upload_hash;

/// The in-memory index type and the SHA-256 lanes, for `bench/benches/` only (feature
/// `bench-internals`). Not a stable API.
#[cfg(feature = "bench-internals")]
#[doc(hidden)]
pub mod internals {
    pub use crate::index::{Index, Loc, Prefix};
    pub use crate::memory_tier::{Counts, MemoryTier, S3Fifo, SharedTier, ENTRY_OVERHEAD};
    pub use crate::sha256::{update_together, Sha256};
}

/// Index checkpoint images, for `fuzz/` only (feature `fuzz-internals`). Not a stable
/// API.
#[cfg(feature = "fuzz-internals")]
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::checkpoint::{decode, encode, Checkpoint, Entry, SegmentMark};
}

pub use config::{default_memory_cache, Durability, EngineConfig, OVERFLOW_SHARE};
pub use digest::{Digest, DigestFunction, Hasher};
pub use engine::{Engine, Upload};
pub use error::{Error, ErrorKind, Result};
pub use memory_tier::MemoryTierStats;
pub use recover::RecoveryReport;
pub use replication::{Replica, ReplicationBatch};
pub use shard::ShardRunner;
pub use stream::BlobStream;
pub use upload_hash::UploadHasher;

/// Engine-wide statistics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub partitions: Vec<PartitionStats>,
    /// Requests waiting in each shard's queue.
    pub queue_depths: Vec<u64>,
    /// Bytes of the node-wide overflow pool that partitions over their own budget
    /// have borrowed for uploads (see `EngineConfig::max_size`).
    pub overflow_bytes: u64,
    /// Size of that pool.
    pub overflow_pool_bytes: u64,
    /// Each shard's memory tier.
    pub memory_tiers: Vec<MemoryTierStats>,
}

impl Stats {
    pub fn used_bytes(&self) -> u64 {
        self.partitions.iter().map(|p| p.used_bytes).sum()
    }

    pub fn objects(&self) -> u64 {
        self.partitions.iter().map(|p| p.objects).sum()
    }

    pub fn crc_failures(&self) -> u64 {
        self.partitions.iter().map(|p| p.crc_failures).sum()
    }

    /// What the recoveries of every partition did, added up.
    pub fn recovery(&self) -> RecoveryReport {
        let mut total = RecoveryReport::default();
        for p in &self.partitions {
            total.from_checkpoint += p.recovery.from_checkpoint;
            total.checkpoint_stale += p.recovery.checkpoint_stale;
            total.scanned_records += p.recovery.scanned_records;
            total.skipped_damaged += p.recovery.skipped_damaged;
            total.scanned_bytes += p.recovery.scanned_bytes;
        }
        total
    }

    /// Segments reclaimed below the budget because the disk was full.
    pub fn disk_full_reclaims(&self) -> u64 {
        self.partitions.iter().map(|p| p.disk_full_reclaims).sum()
    }

    /// Partitions refusing writes because the disk is full even after reclaiming.
    pub fn disk_full_refusing(&self) -> u64 {
        self.partitions.iter().filter(|p| p.disk_full).count() as u64
    }

    pub fn evictions(&self) -> u64 {
        self.partitions.iter().map(|p| p.evictions).sum()
    }

    pub fn syncs(&self) -> u64 {
        self.partitions.iter().map(|p| p.syncs).sum()
    }

    pub fn sync_failures(&self) -> u64 {
        self.partitions.iter().map(|p| p.sync_failures).sum()
    }

    /// Reads served from the memory tiers.
    pub fn memory_tier_hits(&self) -> u64 {
        self.memory_tiers.iter().map(|t| t.hits).sum()
    }

    pub fn replication_backlog_bytes(&self) -> u64 {
        self.partitions
            .iter()
            .map(|p| p.replication_backlog_bytes)
            .sum()
    }
}

/// One partition's usage and counters.
#[derive(Debug, Clone, Default)]
pub struct PartitionStats {
    pub partition: u32,
    pub used_bytes: u64,
    /// This partition's share of the node's budget: its own budget plus an even part
    /// of the overflow pool, so that the shares add up to `max_size`.
    pub budget_bytes: u64,
    /// Bytes borrowed from the overflow pool: how far usage is over the own budget.
    pub borrowed_bytes: u64,
    pub objects: u64,
    pub segments: u64,
    pub evictions: u64,
    pub evicted_bytes: u64,
    pub reinserted: u64,
    pub crc_failures: u64,
    /// Segments reclaimed below the budget because allocating space hit a full disk.
    pub disk_full_reclaims: u64,
    /// The last allocation (a segment, or a unit of an upload) failed for lack of disk
    /// space even after reclaiming (another process holds the space): writes needing
    /// space are refused.
    pub disk_full: bool,
    /// Bytes written locally but not yet confirmed in the slow tier.
    pub replication_backlog_bytes: u64,
    /// Sync generations run (each one `fdatasync` per segment written since the
    /// previous one), those that failed, and the time spent in them.
    pub syncs: u64,
    pub sync_failures: u64,
    pub sync_micros: u64,
    /// What this partition's recovery did when the engine started.
    pub recovery: RecoveryReport,
}
