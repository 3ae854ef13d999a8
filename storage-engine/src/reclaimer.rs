//! Space management: new segments within the byte budget, reclaiming the oldest.
//!
//! The budget is honoured before a segment file exists: a new segment is created only
//! once the oldest ones have been removed to make room for it, and its full size is
//! preallocated, so disk usage never exceeds the budget and a disk that another
//! process filled shows up as a clear RESOURCE_EXHAUSTED at creation, never as a
//! failed write of data already acknowledged.
//!
//! A disk can also be smaller than the budget (the node lowers a budget the disk can
//! never hold, but checkpoints, metadata and other files still take their share). When
//! creating a segment hits ENOSPC or EDQUOT while the store's own files are most of
//! the filesystem, the oldest segments are reclaimed below the budget and the creation
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
use crate::partition::{reclaim_order, segment_path, Partition, SegKind, Segment};
use bytes::Bytes;
use std::rc::Rc;

/// A record saved from a reclaimed segment, to be appended again.
pub struct Hot {
    pub key: Key,
    pub payload: Bytes,
}

impl Partition {
    /// Creates a segment of `size` bytes after reclaiming enough old ones. The caller
    /// holds `roll_lock`. Returns the new id and the hot records to reinsert.
    pub async fn new_segment(&self, kind: SegKind, size: u64) -> Result<(u32, Vec<Hot>)> {
        let hot = self.make_room(size).await?;
        let id = {
            let mut st = self.st.borrow_mut();
            let id = st.next_seg;
            st.next_seg += 1;
            id
        };
        let path = segment_path(&self.dir, id, kind);
        let file = match SegFile::create(&path, size).await {
            Err(e) if e.kind() == ErrorKind::ResourceExhausted && self.disk_mostly_ours() => {
                self.reclaim_for_disk(size).await?;
                SegFile::create(&path, size).await
            }
            created => created,
        };
        self.counters.disk_full.set(matches!(
            &file,
            Err(e) if e.kind() == ErrorKind::ResourceExhausted
        ));
        let file = file?;
        self.syncer.created_file();
        let mut st = self.st.borrow_mut();
        st.used += size;
        st.segments.insert(
            id,
            Segment {
                file: Rc::new(file),
                kind,
                size,
                inflight: Vec::new(),
                dirty: true,
                order: reclaim_order(id),
            },
        );
        Ok((id, hot))
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
    /// after creating a segment hit a full disk below the budget. Nothing is
    /// reinserted: the copies would take the space just freed.
    async fn reclaim_for_disk(&self, extra: u64) -> Result<()> {
        let mut freed = 0;
        while freed < extra {
            let Some(victim) = self.victim() else {
                break;
            };
            freed += self.st.borrow().segments.get(&victim).map_or(0, |s| s.size);
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

    /// Reclaims the oldest segments until `extra` more bytes fit in the budget.
    pub async fn make_room(&self, extra: u64) -> Result<Vec<Hot>> {
        let mut hot = Vec::new();
        let mut reinsert_left = self.limits.reinsert_budget;
        loop {
            if self.st.borrow().used + extra <= self.limits.budget {
                return Ok(hot);
            }
            // When nothing can be taken the budget is truly full.
            let Some(victim) = self.victim() else {
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "partition {} cannot fit {extra} more bytes in its budget of {} bytes{}",
                        self.id,
                        self.limits.budget,
                        if st_replicating(self) {
                            ": it holds data not yet replicated to the slow tier, which is never \
                             evicted; writes are taken again as that backlog drains"
                        } else {
                            ""
                        }
                    ),
                ));
            };
            hot.extend(self.reclaim(victim, &mut reinsert_left).await?);
        }
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
            st.index.retain(|_, loc| {
                if loc.seg != victim {
                    return true;
                }
                let len = u64::from(loc.record_len());
                if loc.accessed() && len <= small_max && len <= *reinsert_left {
                    *reinsert_left -= len;
                    keep.push(*loc);
                }
                false
            });
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
        let mut st = self.st.borrow_mut();
        st.used -= seg.size;
        self.counters
            .evictions
            .set(self.counters.evictions.get() + 1);
        self.counters
            .evicted_bytes
            .set(self.counters.evicted_bytes.get() + seg.size);
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

fn st_replicating(p: &Partition) -> bool {
    p.st.borrow().replicated.is_some()
}
