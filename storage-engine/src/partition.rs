//! One partition: a directory of segment files and the index over them, owned by
//! exactly one shard thread.
//!
//! A partition keeps two segments open for writing. The *packed* segment receives
//! small records back to back, staged in a tail buffer and group-committed by the
//! flusher (`flusher.rs`); the *extents* segment hands out 4 KiB-aligned extents to
//! streaming uploads (`extent.rs`), so that many large uploads proceed in parallel
//! without buffering whole blobs. A record too large for a quarter of a segment gets a
//! *huge* segment of its own. All three kinds share one id sequence, and the reclaimer
//! (`reclaimer.rs`) frees the oldest id first, whatever its kind.
//!
//! State lives in a `RefCell` and is never borrowed across an `.await`; the async
//! locks order the only multi-step operations (rolling a segment over, flushing).

use crate::config::PartitionLimits;
use crate::format::Key;
use crate::index::{Index, Loc, Prefix};
use crate::io::SegFile;
use crate::key::prefix;
use crate::memory_tier::SharedTier;
use crate::reclaimer::OverflowPool;
use bytes::Bytes;
use futures::lock::Mutex;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegKind {
    Packed,
    Extents,
    Huge,
}

impl SegKind {
    pub fn extension(self) -> &'static str {
        match self {
            SegKind::Packed => "packed",
            SegKind::Extents => "extents",
            SegKind::Huge => "huge",
        }
    }

    pub fn from_extension(ext: &str) -> Option<SegKind> {
        match ext {
            "packed" => Some(SegKind::Packed),
            "extents" => Some(SegKind::Extents),
            "huge" => Some(SegKind::Huge),
            _ => None,
        }
    }
}

pub fn segment_path(dir: &Path, id: u32, kind: SegKind) -> PathBuf {
    dir.join(format!("{id:08x}.{}", kind.extension()))
}

pub struct Segment {
    pub file: Rc<SegFile>,
    pub kind: SegKind,
    /// Length of the file: the address range records are placed in.
    pub size: u64,
    /// Bytes counted against the budget, the space the file occupies: all of a
    /// packed segment, created preallocated; of an extents or huge segment, created
    /// sparse, each write unit as it is written (`reclaimer.rs`).
    pub charged: u64,
    /// Offsets of extents reserved here whose upload has not finished.
    pub inflight: Vec<u32>,
    /// Written since the last fdatasync.
    pub dirty: bool,
    /// Reclaim order, lowest first: twice the id at creation, and for a huge segment,
    /// renewed when its upload finishes (see [`reclaim_order_now`]), because its one
    /// record is written then, however long ago the segment was created: ordered by id
    /// alone, a blob uploaded slowly would be the next evicted the moment it is
    /// acknowledged. Recovery orders by id alone.
    pub order: u64,
}

/// The reclaim order of a segment created with `id`.
pub fn reclaim_order(id: u32) -> u64 {
    u64::from(id) << 1
}

/// The reclaim order of a huge segment whose upload finishes now: after every segment
/// created so far, before the next one (whose id is `next_seg`).
pub fn reclaim_order_now(next_seg: u32) -> u64 {
    reclaim_order(next_seg) - 1
}

/// The packed segment currently receiving small records.
pub struct Packed {
    pub seg: u32,
    /// End of the last appended record.
    pub head: u64,
    /// Everything before this offset is on the device.
    pub flushed: u64,
    /// Bytes `[tail_base, head)` of the segment, kept in memory: unflushed records plus
    /// recently written ones, which reads are served from.
    pub tail_base: u64,
    pub tail: Vec<u8>,
    /// Appended but not yet flushed: indexed by the flush that writes them.
    pub pending: Vec<Pending>,
    /// Set while the segment is being rolled over; appends wait for the new one.
    pub sealed: bool,
}

pub struct Pending {
    pub prefix: Prefix,
    pub loc: Loc,
    /// A reinsertion: it must not replace a newer value written meanwhile.
    pub if_absent: bool,
}

/// The extents segment currently handing out reservations.
pub struct ExtentHead {
    pub seg: u32,
    pub head: u64,
}

impl State {
    /// How far segment `id` holds only finished records (the packed segment's flushed
    /// end, the lowest extent still being uploaded, or its size), and whether nothing
    /// more will ever be written to it.
    pub fn committed_end(&self, id: u32, seg: &Segment) -> (u64, bool) {
        let (head, active) = if self.packed.as_ref().map(|p| p.seg) == Some(id) {
            (self.packed.as_ref().map_or(seg.size, |p| p.flushed), true)
        } else if self.extents.as_ref().map(|e| e.seg) == Some(id) {
            (self.extents.as_ref().map_or(seg.size, |e| e.head), true)
        } else {
            (seg.size, false)
        };
        match seg.inflight.iter().map(|&o| u64::from(o)).min() {
            Some(o) => (o.min(head), false),
            None => (head, !active),
        }
    }
}

pub struct State {
    pub index: Index,
    pub segments: BTreeMap<u32, Segment>,
    pub packed: Option<Packed>,
    pub extents: Option<ExtentHead>,
    pub next_seg: u32,
    pub next_seq: u64,
    /// Bytes of segment and checkpoint files on disk.
    pub used: u64,
    /// Bytes borrowed from the overflow pool, at most what `used` exceeds the own
    /// budget by.
    pub borrowed: u64,
    pub checkpoint_bytes: u64,
    /// Index changes since the last checkpoint.
    pub changes: u64,
    /// With replication on: everything before this position reached the slow tier.
    pub replicated: Option<crate::replication::Cursor>,
}

#[derive(Default)]
pub struct Counters {
    pub evictions: Cell<u64>,
    pub evicted_bytes: Cell<u64>,
    pub reinserted: Cell<u64>,
    pub crc_failures: Cell<u64>,
    pub disk_full_reclaims: Cell<u64>,
    pub disk_full: Cell<bool>,
    pub recovery: Cell<crate::recover::RecoveryReport>,
}

pub struct Partition {
    pub id: u32,
    pub dir: PathBuf,
    pub nonce: u64,
    pub limits: PartitionLimits,
    /// The node-wide overflow pool, shared by every partition (`reclaimer.rs`).
    pub pool: Arc<OverflowPool>,
    /// The shard's memory tier, shared by its partitions (`memory_tier.rs`).
    pub tier: SharedTier,
    pub st: RefCell<State>,
    /// Serialises segment creation and eviction.
    pub roll_lock: Mutex<()>,
    /// Serialises writes of the packed tail, so a rewrite of the shared last block can
    /// never overtake an older one.
    pub flush_lock: Mutex<()>,
    pub syncer: crate::syncer::Syncer,
    pub counters: Counters,
}

impl Partition {
    pub fn new(
        id: u32,
        dir: PathBuf,
        nonce: u64,
        limits: PartitionLimits,
        pool: Arc<OverflowPool>,
        tier: SharedTier,
        st: State,
    ) -> Self {
        Partition {
            id,
            dir,
            nonce,
            limits,
            pool,
            tier,
            st: RefCell::new(st),
            roll_lock: Mutex::new(()),
            flush_lock: Mutex::new(()),
            syncer: Default::default(),
            counters: Counters::default(),
        }
    }

    /// Looks a key up and marks it accessed (for the reclaimer's reinsertion).
    pub fn lookup(&self, key: &Key) -> Option<(Prefix, Loc)> {
        let p = prefix(key);
        let mut st = self.st.borrow_mut();
        let loc = st.index.get_mut(&p)?;
        loc.mark_accessed();
        Some((p, *loc))
    }

    /// Whether the record at `prefix` is `record_len` bytes long (see `Loc::fits`):
    /// `None` when only its header can tell.
    pub fn holds_len(&self, prefix: Prefix, record_len: u64) -> Option<bool> {
        match self.st.borrow().index.get(&prefix) {
            Some(loc) => loc.fits(record_len),
            None => Some(false),
        }
    }

    /// Adds a record to the index, unless its segment was reclaimed meanwhile.
    pub fn insert(&self, prefix: Prefix, loc: Loc, if_absent: bool) {
        let mut st = self.st.borrow_mut();
        if !st.segments.contains_key(&loc.seg) {
            return;
        }
        if if_absent && st.index.contains_key(&prefix) {
            return;
        }
        if st.index.insert(prefix, loc).is_some() {
            // A replaced record (an action result written again, a record moved by
            // reinsertion) must leave the tier before anyone can be served it again.
            self.tier.lock().forget_other_than(self.id, prefix, &loc);
        }
        st.changes += 1;
    }

    /// Forgets a record that failed its checksum, unless the index moved on meanwhile.
    pub fn drop_corrupt(&self, prefix: Prefix, loc: Loc, what: &str) {
        self.counters
            .crc_failures
            .set(self.counters.crc_failures.get() + 1);
        tracing::error!(
            partition = self.id,
            segment = loc.seg,
            offset = loc.off,
            "checksum failure in {what}; record dropped and reported as not found"
        );
        self.tier.lock().forget(self.id, prefix, &loc);
        let mut st = self.st.borrow_mut();
        if st.index.get(&prefix) == Some(&loc) {
            st.index.remove(&prefix);
            st.changes += 1;
        }
    }

    /// Keeps the verified payload of record `key` at `loc`, `len` bytes made by
    /// `payload` (a buffer of its own, see `memory_tier.rs`), in the memory tier, if
    /// the index still points there (it may have moved on while the bytes were read).
    pub fn admit(
        &self,
        prefix: Prefix,
        loc: Loc,
        key: Key,
        len: u64,
        payload: impl FnOnce() -> Bytes,
    ) {
        if !self.tier.takes(len) {
            return;
        }
        let indexed = self.st.borrow().index.get(&prefix).is_some_and(|l| {
            l.seg == loc.seg && l.off == loc.off && l.record_len() == loc.record_len()
        });
        if indexed {
            let payload = payload();
            self.tier.lock().admit(self.id, prefix, loc, key, payload);
        }
    }

    pub fn segment_file(&self, seg: u32) -> Option<Rc<SegFile>> {
        self.st.borrow().segments.get(&seg).map(|s| s.file.clone())
    }

    pub fn next_seq(&self) -> u64 {
        let mut st = self.st.borrow_mut();
        let s = st.next_seq;
        st.next_seq += 1;
        s
    }

    /// Closes every segment file at shutdown (those no reader still holds).
    pub async fn close_files(&self) {
        let segments = {
            let mut st = self.st.borrow_mut();
            st.packed = None;
            st.extents = None;
            st.index = Default::default();
            std::mem::take(&mut st.segments)
        };
        for seg in segments.into_values() {
            if let Ok(file) = Rc::try_unwrap(seg.file) {
                if let Err(e) = file.close().await {
                    tracing::warn!(partition = self.id, "{e}");
                }
            }
        }
    }

    /// Partition statistics for `Engine::stats`.
    pub fn stats(&self) -> crate::PartitionStats {
        let backlog = self.replication_backlog();
        let st = self.st.borrow();
        crate::PartitionStats {
            partition: self.id,
            used_bytes: st.used,
            budget_bytes: self.limits.share,
            borrowed_bytes: st.borrowed,
            objects: st.index.len() as u64,
            segments: st.segments.len() as u64,
            evictions: self.counters.evictions.get(),
            evicted_bytes: self.counters.evicted_bytes.get(),
            reinserted: self.counters.reinserted.get(),
            crc_failures: self.counters.crc_failures.get(),
            disk_full_reclaims: self.counters.disk_full_reclaims.get(),
            disk_full: self.counters.disk_full.get(),
            replication_backlog_bytes: backlog,
            syncs: self.syncer.syncs.get(),
            sync_failures: self.syncer.failures.get(),
            sync_micros: self.syncer.sync_micros.get(),
            recovery: self.counters.recovery.get(),
        }
    }
}
