//! Startup: rebuild a partition's state from its checkpoint and segment files.
//!
//! The checkpoint (if valid) gives the index as of some moment and, per segment, where
//! to resume scanning; segments are then scanned from those offsets in id order. A
//! scan reads records one after another; where a header does not decode (zeros after
//! the last write, an abandoned extent, a torn or flipped header) it searches forward
//! for the next magic number and tries again, so one damaged record costs only itself.
//! Records whose payload fails its CRC are skipped, which is how a torn tail is
//! truncated: the packed segment resumes right after the last intact record.
//!
//! When a key is found twice, the record with the higher sequence number wins (AC
//! entries: newest value).

use crate::checkpoint;
use crate::config::PartitionLimits;
use crate::error::Result;
use crate::format::{align_down, align_up, scan_records, Header, HEADER_LEN};
use crate::index::{Index, Loc, Prefix};
use crate::io::{describe, SegFile};
use crate::key::prefix;
use crate::partition::{ExtentHead, Packed, Partition, SegKind, Segment, State};
use crate::reclaimer::OverflowPool;
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::rc::Rc;
use std::sync::Arc;

/// What a partition's recovery did, for logs, `Engine::stats` and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Index entries taken from the checkpoint.
    pub from_checkpoint: u64,
    /// Checkpoint entries dropped because their segment was reclaimed after the
    /// checkpoint was written.
    pub checkpoint_stale: u64,
    /// Intact records found by scanning the segments past the checkpoint's marks.
    pub scanned_records: u64,
    /// Damaged records the scan skipped.
    pub skipped_damaged: u64,
    /// Bytes of segment files read by the scan.
    pub scanned_bytes: u64,
}

pub async fn recover(
    id: u32,
    dir: &Path,
    nonce: u64,
    limits: PartitionLimits,
    pool: Arc<OverflowPool>,
    tier: crate::memory_tier::SharedTier,
    use_checkpoint: bool,
) -> Result<(Rc<Partition>, RecoveryReport)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| crate::Error::io(format!("creating {}", dir.display()), e))?;
    let mut report = RecoveryReport::default();
    let mut files: Vec<(u32, SegKind)> = Vec::new();
    let entries = std::fs::read_dir(dir)
        .map_err(|e| crate::Error::io(format!("listing {}", dir.display()), e))?;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some((stem, ext)) = name.split_once('.') else {
            continue;
        };
        if let (Ok(seg), Some(kind)) = (u32::from_str_radix(stem, 16), SegKind::from_extension(ext))
        {
            if stem.len() == 8 {
                files.push((seg, kind));
            }
        }
    }
    files.sort_by_key(|&(seg, _)| seg);

    let mut segments = BTreeMap::new();
    let mut used = 0;
    for &(seg, kind) in &files {
        let path = crate::partition::segment_path(dir, seg, kind);
        let file = SegFile::open(&path).await?;
        let size = file.size().await?;
        // Extents and huge segments are sparse: what they occupy is what was written
        // (and allocated) of them, not their length.
        let charged = std::fs::metadata(&path)
            .map_err(|e| crate::Error::io(format!("stat of {}", describe(&path)), e))?
            .blocks()
            .saturating_mul(512)
            .min(size);
        used += charged;
        segments.insert(
            seg,
            Segment {
                file: Rc::new(file),
                kind,
                size,
                charged,
                inflight: Vec::new(),
                order: crate::partition::reclaim_order(seg),
                // What a previous run wrote may still sit in the device's cache: the
                // first sync covers it (under `Durability::Sync`, before serving).
                dirty: true,
            },
        );
    }

    let loaded = if use_checkpoint {
        checkpoint::load(dir, nonce).await?
    } else {
        None
    };
    let mut index = Index::default();
    let mut marks: HashMap<u32, u64> = HashMap::new();
    let mut next_seq = 0;
    let mut next_seg = files.last().map_or(0, |&(s, _)| s + 1);
    let mut checkpoint_bytes = 0;
    if let Some((cp, size)) = loaded {
        checkpoint_bytes = size;
        used += size;
        next_seq = cp.next_seq;
        next_seg = next_seg.max(cp.next_seg);
        for m in &cp.segments {
            marks.insert(m.id, m.replay_from);
        }
        // Sized once: growing a table of millions by doubling costs more than the load.
        index.reserve(cp.entries.len());
        for e in &cp.entries {
            if segments.contains_key(&e.seg) {
                let loc = Loc::new(e.seg, e.off, u64::from(e.len), e.flags & 1 != 0);
                index.insert(Prefix::new(e.prefix), loc);
                report.from_checkpoint += 1;
            } else {
                report.checkpoint_stale += 1;
            }
        }
    }

    let mut ends: HashMap<u32, u64> = HashMap::new();
    let ids: Vec<(u32, Rc<SegFile>, SegKind, u64)> = segments
        .iter()
        .map(|(&id, s)| (id, s.file.clone(), s.kind, s.size))
        .collect();
    for (seg_id, file, kind, size) in ids {
        let from = marks.get(&seg_id).copied().unwrap_or(0);
        if from >= size {
            continue;
        }
        let found = scan(&file, kind, from, size, nonce, &mut report).await?;
        let mut end = from;
        for (off, header) in found {
            end = end.max(off + header.record_len());
            next_seq = next_seq.max(header.seq + 1);
            let p = prefix(&header.key);
            let loc = Loc::new(seg_id, off as u32, header.record_len(), false);
            if let Some(old) = index.get(&p).copied() {
                if old.seg == loc.seg && old.off == loc.off {
                    continue;
                }
                let old_file = segments.get(&old.seg).map(|s| s.file.clone());
                if let Some(old_file) = old_file {
                    if !is_newer(&old_file, &header, old, nonce).await {
                        continue;
                    }
                }
            }
            index.insert(p, loc);
        }
        ends.insert(seg_id, end);
    }

    let packed = segments
        .iter()
        .rev()
        .find(|(_, s)| s.kind == SegKind::Packed)
        .and_then(|(&id, s)| ends.get(&id).map(|&end| (id, s.file.clone(), end)));
    let packed = match packed {
        Some((seg, file, head)) => {
            let tail_base = align_down(head);
            let mut tail = file
                .read(tail_base, (head - tail_base) as usize)
                .await?
                .to_vec();
            // A truncated file reads short; the missing bytes belonged to records that
            // are lost anyway, and the tail must stay aligned with the segment.
            tail.resize((head - tail_base) as usize, 0);
            Some(Packed {
                seg,
                head,
                flushed: head,
                tail_base,
                tail,
                pending: Vec::new(),
                sealed: false,
            })
        }
        None => None,
    };
    let extents = segments
        .iter()
        .rev()
        .find(|(_, s)| s.kind == SegKind::Extents)
        .and_then(|(&id, _)| {
            ends.get(&id).map(|&end| ExtentHead {
                seg: id,
                head: align_up(end),
            })
        });

    // A partition that had borrowed from the overflow pool when the store stopped
    // borrows again what it holds beyond its own budget, so that the pool's bytes are
    // not handed out twice. What the pool cannot cover (a smaller budget than last
    // time) is evicted by the next write.
    let borrowed = pool.borrow_up_to(used.saturating_sub(limits.budget));
    let state = State {
        index,
        segments,
        packed,
        extents,
        next_seg,
        next_seq,
        used,
        borrowed,
        checkpoint_bytes,
        changes: 0,
        replicated: limits
            .replicate
            .then(|| crate::replication::load_cursor(dir)),
    };
    Ok((
        Rc::new(Partition::new(
            id,
            dir.to_path_buf(),
            nonce,
            limits,
            pool,
            tier,
            state,
        )),
        report,
    ))
}

/// Whether `header` (just scanned) is newer than the record indexed at `old`.
async fn is_newer(old_file: &SegFile, header: &Header, old: Loc, nonce: u64) -> bool {
    match old_file.read(u64::from(old.off), HEADER_LEN).await {
        Ok(bytes) => match Header::decode(&bytes, nonce) {
            Ok(h) => header.seq > h.seq,
            Err(_) => true,
        },
        Err(_) => true,
    }
}

/// Scans `[from, size)` of a segment and returns the intact records in it.
async fn scan(
    file: &SegFile,
    kind: SegKind,
    from: u64,
    size: u64,
    nonce: u64,
    report: &mut RecoveryReport,
) -> Result<Vec<(u64, Header)>> {
    if kind == SegKind::Huge {
        return scan_huge(file, nonce, report).await;
    }
    let start = align_down(from);
    let bytes = file.read(start, (size - start) as usize).await?;
    report.scanned_bytes += bytes.len() as u64;
    let (found, damaged) = scan_records(&bytes, (from - start) as usize, nonce);
    report.scanned_records += found.len() as u64;
    report.skipped_damaged += damaged;
    Ok(found
        .into_iter()
        .map(|(pos, h)| (start + pos as u64, h))
        .collect())
}

/// A huge segment holds one record at offset 0, written header-last: a valid header
/// and chunk table mean the payload was completely written. A payload of at most one
/// CRC chunk has no table (the header holds the payload's own CRC, `format.rs`), so it
/// is read and checked whole; it is at most 1 MiB.
async fn scan_huge(
    file: &SegFile,
    nonce: u64,
    report: &mut RecoveryReport,
) -> Result<Vec<(u64, Header)>> {
    let head = file.read(0, HEADER_LEN).await?;
    let Ok(h) = Header::decode(&head, nonce) else {
        return Ok(Vec::new());
    };
    let table_len = 4 * h.chunk_count() as usize;
    let intact = if table_len == 0 {
        let payload = file.read(HEADER_LEN as u64, h.payload_len as usize).await?;
        report.scanned_bytes += payload.len() as u64;
        payload.len() as u64 == h.payload_len && crate::format::crc(&payload) == h.payload_crc
    } else {
        let table = file
            .read(HEADER_LEN as u64 + h.payload_len, table_len)
            .await?;
        table.len() == table_len && crate::format::crc(&table) == h.payload_crc
    };
    if !intact {
        report.skipped_damaged += 1;
        return Ok(Vec::new());
    }
    report.scanned_records += 1;
    Ok(vec![(0, h)])
}
