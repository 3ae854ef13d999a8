//! Space management: the byte budget, charged as bytes take space, reclaiming the
//! oldest segments to make room.
//!
//! The budget is honoured before bytes take space on disk. A packed segment is
//! created whole and preallocated, once the oldest segments have been removed to make
//! room for it. Extents and huge segments are created sparse, their address range
//! handed out to uploads at once, and each write unit of an upload is charged, and
//! allocated with `fallocate`, just before it is written: an upload evicts stored data
//! only for bytes it actually sends, an abandoned one costs what it wrote, and
//! reclaiming a segment gives back what it was charged. Disk usage never exceeds the
//! budget, and a full disk shows up as a clear RESOURCE_EXHAUSTED when space is
//! allocated, never as a failed write of data already acknowledged.
//!
//! A segment holding an upload in flight cannot be reclaimed, so a partition that
//! draws more than its share of concurrent uploads can exhaust its own budget with
//! nothing left to evict. It then borrows the bytes arriving from the node-wide
//! overflow pool ([`OverflowPool`], `config::OVERFLOW_SHARE` of the budget, taken out
//! of the partitions' own budgets), and gives them back as reclaims bring its usage
//! under its own budget again. Only when the pool is exhausted too is a write refused.
//!
//! A disk can also be smaller than the budget (the node lowers a budget the disk can
//! never hold, but checkpoints, metadata and other files still take their share). When
//! allocating space hits ENOSPC or EDQUOT while the store's own files are most of the
//! filesystem, the oldest segments are reclaimed below the budget and the allocation
//! is retried once: a disk full of cache degrades into a cache that evicts earlier,
//! never into one that refuses every write.
//!
//! Reclaiming is FIFO by segment id (purely sequential writes), with one refinement
//! that approximates LRU: records read since they were written are copied to the head
//! of the log, up to `reinsert_fraction` of a segment per reclaim, and lose their
//! "accessed" mark, so they survive another round only if read again.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{verify_body, Header, Key, HEADER_LEN};
use crate::index::Loc;
use crate::io::SegFile;
use crate::partition::{reclaim_order, segment_path, Partition, SegKind, Segment, State};
use bytes::Bytes;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Charged with the first bytes of a sparse segment, beyond them: the filesystem
/// block that holds the segment's list of extents once it has more than fit in the
/// inode (four on ext4). Allocating each write unit on its own fragments the file,
/// and that block counts against the disk like data: without it, about half of the
/// 1 MiB extents segments holding ten 100 KB records each took 4 KiB more than they
/// were charged, and the disk went over the budget (tests/digest_mismatch.rs).
const EXTENT_TREE_BLOCK: u64 = crate::format::ALIGN;

/// A record saved from a reclaimed segment, to be appended again.
pub struct Hot {
    pub key: Key,
    pub payload: Bytes,
}

impl Partition {
    /// Creates a segment of `size` bytes: a packed one preallocated, after reclaiming
    /// enough old ones; an extents or huge one sparse, charged as it is written. The
    /// caller holds `roll_lock`. Returns the new id and the hot records to reinsert.
    pub async fn new_segment(&self, kind: SegKind, size: u64) -> Result<(u32, Vec<Hot>)> {
        let whole = kind == SegKind::Packed;
        let (hot, charged) = if whole {
            (self.make_room(size).await?, size)
        } else {
            (Vec::new(), 0)
        };
        let id = {
            let mut st = self.st.borrow_mut();
            let id = st.next_seg;
            st.next_seg += 1;
            id
        };
        let path = segment_path(&self.dir, id, kind);
        let file = match SegFile::create(&path, size, whole).await {
            Err(e) if e.kind() == ErrorKind::ResourceExhausted && self.disk_mostly_ours() => {
                match self.reclaim_for_disk(size).await {
                    Ok(()) => SegFile::create(&path, size, whole).await,
                    Err(e) => Err(e),
                }
            }
            created => created,
        };
        self.counters.disk_full.set(matches!(
            &file,
            Err(e) if e.kind() == ErrorKind::ResourceExhausted
        ));
        let file = match file {
            Ok(file) => file,
            Err(e) => {
                self.uncharge(charged);
                return Err(e);
            }
        };
        self.syncer.created_file();
        self.st.borrow_mut().segments.insert(
            id,
            Segment {
                file: Rc::new(file),
                kind,
                size,
                charged,
                inflight: Vec::new(),
                dirty: true,
                order: reclaim_order(id),
            },
        );
        Ok((id, hot))
    }

    /// Charges `len` bytes at `pos` of segment `seg` (an extents or huge one, holding
    /// an upload in flight) and allocates them on disk, before they are written.
    /// Within the own budget this takes no lock; past it, the oldest segments are
    /// reclaimed first, then the overflow pool is drawn on (see [`Self::make_room`]).
    pub async fn allocate(&self, seg: u32, file: &SegFile, pos: u64, len: u64) -> Result<()> {
        let first = self
            .st
            .borrow()
            .segments
            .get(&seg)
            .is_some_and(|s| s.charged == 0);
        let charge = len + if first { EXTENT_TREE_BLOCK } else { 0 };
        let within = {
            let mut st = self.st.borrow_mut();
            let within = st.used + charge <= self.limits.budget;
            if within {
                st.used += charge;
            }
            within
        };
        if !within {
            let hot = {
                let _roll = self.roll_lock.lock().await;
                self.make_room(charge).await?
            };
            self.reinsert(hot).await;
        }
        let allocated = match file.allocate(pos, len) {
            Err(e) if e.kind() == ErrorKind::ResourceExhausted && self.disk_mostly_ours() => {
                let _roll = self.roll_lock.lock().await;
                match self.reclaim_for_disk(len).await {
                    Ok(()) => file.allocate(pos, len),
                    Err(e) => Err(e),
                }
            }
            allocated => allocated,
        };
        self.counters.disk_full.set(matches!(
            &allocated,
            Err(e) if e.kind() == ErrorKind::ResourceExhausted
        ));
        let charged = allocated.is_ok()
            && match self.st.borrow_mut().segments.get_mut(&seg) {
                Some(s) => {
                    s.charged += charge;
                    true
                }
                None => false,
            };
        if !charged {
            self.uncharge(charge);
            allocated?;
            return Err(Error::new(
                ErrorKind::Unavailable,
                "the segment holding this upload was reclaimed before it finished; retry",
            ));
        }
        Ok(())
    }

    /// Removes the huge segment `seg` of an abandoned upload and gives back what it was
    /// charged. Not counted as an eviction: it held no record.
    pub async fn discard_huge(&self, seg: u32) {
        let removed = {
            let mut st = self.st.borrow_mut();
            match st.segments.get(&seg) {
                Some(s) if s.kind == SegKind::Huge => st.segments.remove(&seg),
                _ => None,
            }
        };
        let Some(segment) = removed else {
            return;
        };
        // Closed when the upload's last handle on it is dropped.
        if let Err(e) = segment.file.remove().await {
            tracing::warn!(partition = self.id, "discarding an abandoned upload: {e}");
        }
        self.uncharge(segment.charged);
    }

    /// Gives back `bytes` no longer taking space, and what they had borrowed.
    pub fn uncharge(&self, bytes: u64) {
        let mut st = self.st.borrow_mut();
        st.used -= bytes.min(st.used);
        self.repay(&mut st);
    }

    /// Returns to the pool what usage no longer exceeds the own budget by.
    fn repay(&self, st: &mut State) {
        let keep = st.borrowed.min(st.used.saturating_sub(self.limits.budget));
        self.pool.give_back(st.borrowed - keep);
        st.borrowed = keep;
    }

    /// The oldest segment that may be reclaimed, if any.
    fn victim(&self) -> Option<u32> {
        let st = self.st.borrow();
        let active = [
            st.packed.as_ref().map(|p| p.seg),
            st.extents.as_ref().map(|e| e.seg),
        ];
        // With replication on, a segment is freed only once it reached the slow tier.
        // A segment holding an upload in flight is never taken: the upload would fail
        // for another's sake, and an upload that indexed its record but is still
        // waiting for its sync would be acknowledged after its record was dropped.
        st.segments
            .iter()
            .filter(|(id, seg)| {
                !active.contains(&Some(**id))
                    && seg.inflight.is_empty()
                    && st.replicated.as_ref().is_none_or(|c| c.is_done(**id))
            })
            .min_by_key(|(id, seg)| (seg.order, **id))
            .map(|(id, _)| *id)
    }

    /// Whether the store's own files are most of what fills this partition's
    /// filesystem. Only then does a full disk make the store evict below its budget:
    /// the disk is full of cache, and evicting is what a cache does. When another
    /// process took the space, evicting would hand that process the cache one segment
    /// at a time and fix nothing, so writers get RESOURCE_EXHAUSTED and the operator
    /// sees it (tests/disk_full.rs). The store's usage is estimated from this
    /// partition's, keys being spread evenly over partitions.
    fn disk_mostly_ours(&self) -> bool {
        let Some(fs_used) = filesystem_used(&self.dir) else {
            return false;
        };
        let ours = self.st.borrow().used * u64::from(self.limits.partitions);
        ours >= fs_used / 2
    }

    /// Reclaims the oldest segments of this partition until `extra` bytes were freed,
    /// after allocating space hit a full disk below the budget. Nothing is
    /// reinserted: the copies would take the space just freed.
    async fn reclaim_for_disk(&self, extra: u64) -> Result<()> {
        let mut freed = 0;
        while freed < extra {
            let Some(victim) = self.victim() else {
                break;
            };
            freed += self
                .st
                .borrow()
                .segments
                .get(&victim)
                .map_or(0, |s| s.charged);
            self.reclaim(victim, &mut 0).await?;
            self.counters
                .disk_full_reclaims
                .set(self.counters.disk_full_reclaims.get() + 1);
        }
        tracing::warn!(
            partition = self.id,
            freed,
            "the disk is full below the budget: reclaimed the oldest segments to make room"
        );
        Ok(())
    }

    /// Reclaims the oldest segments until `extra` more bytes fit in the own budget,
    /// borrowing from the overflow pool what does not fit once nothing is left to
    /// reclaim, and charges them. The caller holds `roll_lock`, so two writers never
    /// reclaim the same victim.
    pub async fn make_room(&self, extra: u64) -> Result<Vec<Hot>> {
        let mut hot = Vec::new();
        let mut reinsert_left = self.limits.reinsert_budget;
        loop {
            {
                let mut st = self.st.borrow_mut();
                if st.used + extra <= self.limits.budget + st.borrowed {
                    st.used += extra;
                    return Ok(hot);
                }
            }
            let Some(victim) = self.victim() else {
                break;
            };
            hot.extend(self.reclaim(victim, &mut reinsert_left).await?);
        }
        // Nothing left to reclaim: every segment holds an upload in flight, data not
        // yet replicated, or is being written to.
        let mut st = self.st.borrow_mut();
        let short = st.used + extra - (self.limits.budget + st.borrowed);
        if self.pool.borrow(short) {
            st.borrowed += short;
            st.used += extra;
            return Ok(hot);
        }
        Err(Error::new(
            ErrorKind::ResourceExhausted,
            format!(
                "partition {} cannot fit {extra} more bytes: its budget of {} bytes is \
                 full with nothing it may evict{}, and the node's overflow pool of {} bytes \
                 for uploads in flight is spent; retry once uploads finish",
                self.id,
                self.limits.budget,
                if st.replicated.is_some() {
                    " (it holds data not yet replicated to the slow tier, which is never \
                     evicted; writes are taken again as that backlog drains)"
                } else {
                    ""
                },
                self.pool.capacity,
            ),
        ))
    }

    /// Removes one segment: drops its records from the index, saving the ones read
    /// since they were written while `reinsert_left` allows.
    async fn reclaim(&self, victim: u32, reinsert_left: &mut u64) -> Result<Vec<Hot>> {
        let (seg, keep) = {
            let mut st = self.st.borrow_mut();
            let Some(seg) = st.segments.remove(&victim) else {
                return Ok(Vec::new());
            };
            let small_max =
                (HEADER_LEN as u64) + self.limits.small_blob_max.max(self.limits.max_ac_value);
            let mut keep: Vec<Loc> = Vec::new();
            let before = st.index.len();
            // The sweep meets every record of the segment: their memory-tier entries
            // go with them, at one lookup each rather than a sweep of the tier.
            let mut tier = self.tier.lock();
            st.index.retain(|p, loc| {
                if loc.seg != victim {
                    return true;
                }
                // A record served from memory was read although its index entry
                // never saw it (hits do not reach the shard).
                let served = tier.forget(self.id, *p, loc);
                let len = u64::from(loc.record_len());
                if (loc.accessed() || served) && len <= small_max && len <= *reinsert_left {
                    *reinsert_left -= len;
                    keep.push(*loc);
                }
                false
            });
            drop(tier);
            let dropped = (before - st.index.len()) as u64;
            st.changes += dropped;
            (seg, keep)
        };
        let mut hot = Vec::with_capacity(keep.len());
        for loc in keep {
            let bytes = seg
                .file
                .read(u64::from(loc.off), loc.record_len() as usize)
                .await?;
            let Ok(header) = Header::decode(&bytes, self.nonce) else {
                continue;
            };
            let body = bytes.slice(HEADER_LEN.min(bytes.len())..);
            if !verify_body(&header, &body) {
                continue;
            }
            hot.push(Hot {
                key: header.key,
                payload: body.slice(..header.payload_len as usize),
            });
        }
        seg.file.remove().await?;
        // The filesystem frees the space once the last descriptor is closed: closed
        // here, unless a read still streams from it, so that an allocation retried
        // after a full disk (`allocate`, a plain system call) finds the space free.
        if let Ok(file) = Rc::try_unwrap(seg.file) {
            if let Err(e) = file.close().await {
                tracing::warn!(partition = self.id, "{e}");
            }
        }
        self.uncharge(seg.charged);
        self.counters
            .evictions
            .set(self.counters.evictions.get() + 1);
        self.counters
            .evicted_bytes
            .set(self.counters.evicted_bytes.get() + seg.charged);
        tracing::debug!(partition = self.id, segment = victim, kind = ?seg.kind, "segment reclaimed");
        Ok(hot)
    }

    /// Appends saved records at the head; a record rewritten meanwhile is skipped.
    pub async fn reinsert(&self, hot: Vec<Hot>) {
        for h in hot {
            match self.append(h.key, &h.payload, true).await {
                Ok(()) => self
                    .counters
                    .reinserted
                    .set(self.counters.reinserted.get() + 1),
                Err(e) => {
                    tracing::warn!(partition = self.id, "reinsertion stopped: {e}");
                    return;
                }
            }
        }
    }
}

/// Bytes in use on the filesystem holding `dir` (by every process), if it can tell.
fn filesystem_used(dir: &std::path::Path) -> Option<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs only writes into the zeroed struct; the path is NUL-terminated.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return None;
    }
    Some((stats.f_blocks - stats.f_bfree) as u64 * stats.f_frsize as u64)
}

/// The node-wide overflow pool: bytes that partitions over their own budget borrow
/// for uploads in flight, shared by every partition of every shard.
#[derive(Debug)]
pub struct OverflowPool {
    pub capacity: u64,
    used: AtomicU64,
}

impl OverflowPool {
    pub fn new(capacity: u64) -> OverflowPool {
        OverflowPool {
            capacity,
            used: AtomicU64::new(0),
        }
    }

    /// Takes `bytes` if they fit in what is left; all or nothing.
    pub fn borrow(&self, bytes: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(bytes).filter(|&u| u <= self.capacity)
            })
            .is_ok()
    }

    /// Takes up to `bytes`, as many as are left; returns how many.
    pub fn borrow_up_to(&self, bytes: u64) -> u64 {
        let taken = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                (used < self.capacity).then(|| used + bytes.min(self.capacity - used))
            });
        match taken {
            Ok(before) => bytes.min(self.capacity - before),
            Err(_) => 0,
        }
    }

    pub fn give_back(&self, bytes: u64) {
        if bytes > 0 {
            self.used.fetch_sub(bytes, Ordering::AcqRel);
        }
    }

    /// Bytes borrowed now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::OverflowPool;

    #[test]
    fn the_pool_never_lends_more_than_it_holds() {
        let pool = OverflowPool::new(100);
        assert!(pool.borrow(60));
        assert!(!pool.borrow(41), "lent past its size");
        assert_eq!(pool.used(), 60);
        assert_eq!(pool.borrow_up_to(70), 40);
        assert_eq!(pool.borrow_up_to(1), 0);
        assert!(!pool.borrow(1));
        pool.give_back(30);
        assert!(pool.borrow(30));
        assert_eq!(pool.used(), 100);
        pool.give_back(100);
        assert_eq!(pool.used(), 0);
    }
}
