//! Replication to a slower tier (S3): the engine's half.
//!
//! With `EngineConfig::replicate` on, every record stays on local disk until an
//! external uploader has confirmed that it reached the slow tier. The engine keeps, per
//! partition, a cursor into its log: everything before it has been replicated. The
//! uploader asks for the next batch after the cursor (`Engine::replication_batch`),
//! uploads it, and reports it done (`Engine::replication_done`), which moves the cursor
//! and persists it in the partition's `replicated` file. The reclaimer never frees a
//! segment the cursor has not passed, so a backlog can fill the local budget (writers
//! then see RESOURCE_EXHAUSTED) but never loses a record, and after a restart the
//! uploader resumes at the persisted cursor. Uploading a record twice after a crash is
//! harmless: objects are content-addressed, or for the AC, the newest value.
//!
//! Batches only ever contain finished records: the flushed part of the packed segment,
//! and extents below the lowest upload still in flight.
//!
//! A record the slow tier keeps refusing must not hold back every record after it, so
//! the uploader may report a record of a batch as still owed
//! (`ReplicationBatch::still_owed`). The cursor then moves past it anyway, and the
//! record's position (segment, offset, length) is kept in the cursor's `owed` list,
//! persisted in the same `replicated` file with the same rename, so it survives a
//! restart exactly like the offsets do. A segment holding an owed record is not done:
//! the reclaimer never frees it and the cursor's base never passes it, so the owed
//! record cannot be evicted before it is uploaded. `Engine::replication_owed` reads the
//! owed records again for the uploader to retry on its own schedule; reporting that
//! batch done clears the ones that went through. Owed records count in the backlog.
//! An owed action-cache value that was superseded by a newer value of the same key is
//! dropped rather than retried: uploading it late would overwrite the newer value in
//! the bucket, and the newer record is replicated in its own turn.

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{align_down, scan_records, Header, RecordKind, HEADER_LEN};
use crate::key::prefix;
use crate::partition::{Partition, SegKind};
use bytes::Bytes;
use std::collections::BTreeMap;
use std::path::Path;

const FILE: &str = "replicated";

/// How far replication got: every segment below `base` is done; for the others, the
/// offset up to which their records were replicated (`u64::MAX`: done).
///
/// Progress is tracked per segment because the packed and the extents segment are
/// written at the same time: a single log position could not pass the packed segment
/// until it was sealed, holding back every extent written meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cursor {
    base: u32,
    offsets: BTreeMap<u32, u64>,
    /// Records the offsets passed although their upload failed: (segment, offset) to
    /// record length.
    owed: BTreeMap<(u32, u64), u64>,
}

const DONE: u64 = u64::MAX;

impl Cursor {
    /// Whether segment `id` was replicated completely, owed records included.
    pub fn is_done(&self, id: u32) -> bool {
        (id < self.base || self.offsets.get(&id) == Some(&DONE)) && !self.owes(id)
    }

    /// Whether a record of segment `id` is still owed to the slow tier.
    fn owes(&self, id: u32) -> bool {
        self.owed.range((id, 0)..=(id, u64::MAX)).next().is_some()
    }

    /// Clears the records of a batch that went through and adds the ones still owed.
    fn settle(&mut self, settled: &[Position], owed: &[Position]) {
        for at in settled {
            self.owed.remove(&(at.seg, at.off));
        }
        for at in owed {
            self.owed.insert((at.seg, at.off), at.len);
        }
    }

    fn offset(&self, id: u32) -> u64 {
        if id < self.base {
            DONE
        } else {
            self.offsets.get(&id).copied().unwrap_or(0)
        }
    }

    /// Takes in progress reported by a batch, and forgets segments that no longer exist.
    fn merge(&mut self, other: &Cursor, live: impl Iterator<Item = u32>) {
        self.base = self.base.max(other.base);
        for (&id, &off) in &other.offsets {
            let e = self.offsets.entry(id).or_insert(0);
            *e = (*e).max(off);
        }
        let live: std::collections::BTreeSet<u32> = live.collect();
        self.offsets
            .retain(|id, _| *id >= self.base && live.contains(id));
        self.owed.retain(|(id, _), _| live.contains(id));
        while (self.offsets.get(&self.base) == Some(&DONE) && !self.owes(self.base))
            || (!live.contains(&self.base) && live.range(self.base..).next().is_some())
        {
            self.offsets.remove(&self.base);
            self.base += 1;
        }
    }

    fn encode(&self) -> String {
        let mut out = format!("cairn-replicated {}\n", self.base);
        for (id, off) in &self.offsets {
            out.push_str(&format!("{id} {off}\n"));
        }
        for ((id, off), len) in &self.owed {
            out.push_str(&format!("owed {id} {off} {len}\n"));
        }
        out
    }

    fn decode(text: &str) -> Option<Cursor> {
        let mut lines = text.lines();
        let base = lines
            .next()?
            .strip_prefix("cairn-replicated ")?
            .parse()
            .ok()?;
        let mut offsets = BTreeMap::new();
        let mut owed = BTreeMap::new();
        for line in lines {
            if let Some(record) = line.strip_prefix("owed ") {
                let mut fields = record.split(' ').map(str::parse::<u64>);
                let (id, off, len) = (
                    fields.next()?.ok()?,
                    fields.next()?.ok()?,
                    fields.next()?.ok()?,
                );
                owed.insert((u32::try_from(id).ok()?, off), len);
            } else {
                let (id, off) = line.split_once(' ')?;
                offsets.insert(id.parse().ok()?, off.parse().ok()?);
            }
        }
        Some(Cursor {
            base,
            offsets,
            owed,
        })
    }
}

/// Where a record of a batch lies in the partition's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Position {
    seg: u32,
    off: u64,
    len: u64,
}

/// What reporting a batch done changes: the offsets it reached, and its records that
/// went through or are still owed.
#[derive(Debug, Clone)]
pub(crate) struct Settlement {
    next: Cursor,
    settled: Vec<Position>,
    owed: Vec<Position>,
}

/// One record to copy to the slow tier.
#[derive(Debug, Clone)]
pub enum Replica {
    /// A CAS blob. `data` holds it when it came with the batch; otherwise read it
    /// with `Engine::get` (records of huge segments).
    Blob { digest: Digest, data: Option<Bytes> },
    /// An action-cache value under its derived key (see `Engine::ac_object_key`).
    ActionResult { key: [u8; 32], value: Bytes },
}

/// The next records of one partition to replicate.
#[derive(Debug, Clone)]
pub struct ReplicationBatch {
    pub partition: u32,
    pub replicas: Vec<Replica>,
    /// Where each of `replicas` lies, in the same order.
    positions: Vec<Position>,
    /// Records the batch settles without offering them: owed action-cache values
    /// superseded since, or owed records that can no longer be read.
    dropped: Vec<Position>,
    next: Cursor,
    /// Indexes into `replicas` of the records still owed.
    owed: Vec<usize>,
}

impl ReplicationBatch {
    /// True when the partition had nothing new to replicate.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
    }

    /// Records the partition owed when the batch was read.
    pub fn owed_records(&self) -> usize {
        self.next.owed.len()
    }

    /// Marks `replicas[index]` as not uploaded: reporting the batch done moves past
    /// it but keeps it owed, protected from eviction and offered again by
    /// `Engine::replication_owed`.
    pub fn still_owed(&mut self, index: usize) {
        if index < self.replicas.len() {
            self.owed.push(index);
        }
    }

    pub(crate) fn settlement(&self) -> Settlement {
        let owed: Vec<Position> = self.owed.iter().map(|&i| self.positions[i]).collect();
        let settled = self
            .positions
            .iter()
            .chain(&self.dropped)
            .filter(|at| !owed.contains(at))
            .copied()
            .collect();
        Settlement {
            next: self.next.clone(),
            settled,
            owed,
        }
    }
}

/// Reads a partition's replication progress; a missing or unreadable file means
/// nothing was replicated yet, so everything is offered again (uploads are idempotent).
pub fn load_cursor(dir: &Path) -> Cursor {
    std::fs::read_to_string(dir.join(FILE))
        .ok()
        .and_then(|t| Cursor::decode(&t))
        .unwrap_or_default()
}

fn store_cursor(dir: &Path, c: &Cursor) -> Result<()> {
    let tmp = dir.join("replicated.tmp");
    std::fs::write(&tmp, c.encode())
        .and_then(|()| std::fs::rename(&tmp, dir.join(FILE)))
        .map_err(|e| Error::io("recording the replication cursor", e))
}

impl Partition {
    /// Collects finished records not yet replicated, about `max_bytes` of them.
    pub async fn replication_batch(&self, max_bytes: u64) -> Result<ReplicationBatch> {
        let mut cur = self.st.borrow().replicated.clone().unwrap_or_default();
        let ids: Vec<u32> = self.st.borrow().segments.keys().copied().collect();
        let mut replicas = Vec::new();
        let mut positions = Vec::new();
        let mut bytes = 0u64;
        for id in ids {
            if bytes >= max_bytes {
                break;
            }
            let off = cur.offset(id);
            let seg = {
                let st = self.st.borrow();
                st.segments.get(&id).map(|seg| {
                    let (end, finished) = st.committed_end(id, seg);
                    (seg.file.clone(), seg.kind, end, finished)
                })
            };
            let Some((file, kind, end, finished)) = seg else {
                continue;
            };
            if off == DONE {
                continue;
            }
            let mut reached = off;
            if off < end {
                if kind == SegKind::Huge {
                    let head = file.read(0, HEADER_LEN).await?;
                    if let Ok(h) = Header::decode(&head, self.nonce) {
                        if let Some(r) = replica(&h, None) {
                            replicas.push(r);
                            positions.push(Position {
                                seg: id,
                                off: 0,
                                len: h.record_len(),
                            });
                        }
                        bytes += h.payload_len;
                    }
                    reached = end;
                } else {
                    // Dead space (an abandoned extent) and the record after it are each at
                    // most a quarter segment: a window this large always makes progress.
                    let window = (max_bytes - bytes).max(self.limits.segment_size / 2 + 8192);
                    let stop = end.min(off + window);
                    let start = align_down(off);
                    let image = file.read(start, (stop - start) as usize).await?;
                    let (found, _) = scan_records(&image, (off - start) as usize, self.nonce);
                    let mut last_end = off;
                    for (pos, h) in found {
                        let body_at = pos + HEADER_LEN;
                        let payload = image.slice(body_at..body_at + h.payload_len as usize);
                        if let Some(r) = replica(&h, Some(payload)) {
                            replicas.push(r);
                            positions.push(Position {
                                seg: id,
                                off: start + pos as u64,
                                len: h.record_len(),
                            });
                        }
                        bytes += h.record_len();
                        last_end = start + pos as u64 + h.record_len();
                    }
                    // A window that ended inside a record resumes at that record; one that
                    // covered the whole committed region skips dead space at its end.
                    reached = if stop == end || last_end == off {
                        stop
                    } else {
                        last_end
                    };
                }
            }
            let done = finished && reached >= end;
            cur.offsets.insert(id, if done { DONE } else { reached });
        }
        Ok(ReplicationBatch {
            partition: self.id,
            replicas,
            positions,
            dropped: Vec::new(),
            next: cur,
            owed: Vec::new(),
        })
    }

    /// Reads records still owed to the slow tier, about `max_bytes` of them (at least
    /// one when any is owed).
    pub async fn replication_owed(&self, max_bytes: u64) -> Result<ReplicationBatch> {
        let cur = self.st.borrow().replicated.clone().unwrap_or_default();
        let mut replicas = Vec::new();
        let mut positions = Vec::new();
        let mut dropped = Vec::new();
        let mut bytes = 0u64;
        for (&(seg, off), &len) in &cur.owed {
            if bytes >= max_bytes {
                break;
            }
            let at = Position { seg, off, len };
            let file = {
                let st = self.st.borrow();
                st.segments.get(&seg).map(|s| (s.file.clone(), s.kind))
            };
            let Some((file, kind)) = file else {
                dropped.push(at);
                continue;
            };
            let found = if kind == SegKind::Huge {
                let head = file.read(0, HEADER_LEN).await?;
                Header::decode(&head, self.nonce)
                    .ok()
                    .map(|h| (replica(&h, None), h))
            } else {
                let start = align_down(off);
                let image = file.read(start, (off + len - start) as usize).await?;
                let skip = (off - start) as usize;
                let (found, _) = scan_records(&image, skip, self.nonce);
                found
                    .into_iter()
                    .find(|(pos, _)| *pos == skip)
                    .map(|(pos, h)| {
                        let body_at = pos + HEADER_LEN;
                        let payload = image.slice(body_at..body_at + h.payload_len as usize);
                        (replica(&h, Some(payload)), h)
                    })
            };
            let current = found.as_ref().is_some_and(|(_, h)| {
                h.key.kind != RecordKind::Ac
                    || self
                        .st
                        .borrow()
                        .index
                        .get(&prefix(&h.key))
                        .is_none_or(|loc| (loc.seg, u64::from(loc.off)) == (seg, off))
            });
            match found {
                Some((Some(r), h)) if current => {
                    bytes += h.record_len();
                    replicas.push(r);
                    positions.push(at);
                }
                _ => {
                    tracing::warn!(
                        partition = self.id,
                        segment = seg,
                        offset = off,
                        "an owed record is unreadable or superseded; it is no longer offered"
                    );
                    dropped.push(at);
                }
            }
        }
        Ok(ReplicationBatch {
            partition: self.id,
            replicas,
            positions,
            dropped,
            next: cur,
            owed: Vec::new(),
        })
    }

    /// Records that the records of a batch reached the slow tier, but for those still
    /// owed.
    pub(crate) fn replication_done(&self, done: &Settlement) -> Result<()> {
        let mut st = self.st.borrow_mut();
        let live: Vec<u32> = st.segments.keys().copied().collect();
        let Some(cur) = st.replicated.as_mut() else {
            return Ok(());
        };
        let before = cur.clone();
        cur.settle(&done.settled, &done.owed);
        cur.merge(&done.next, live.into_iter());
        if *cur != before {
            store_cursor(&self.dir, cur)?;
        }
        Ok(())
    }

    /// Bytes of finished records not yet replicated, owed ones included.
    pub fn replication_backlog(&self) -> u64 {
        let st = self.st.borrow();
        let Some(cur) = &st.replicated else { return 0 };
        let owed: u64 = cur.owed.values().sum();
        owed + st
            .segments
            .iter()
            .map(|(&id, s)| {
                let off = cur.offset(id);
                if off == DONE {
                    0
                } else {
                    st.committed_end(id, s).0.saturating_sub(off)
                }
            })
            .sum::<u64>()
    }
}

fn replica(h: &Header, payload: Option<Bytes>) -> Option<Replica> {
    match h.key.kind {
        RecordKind::Cas => Some(Replica::Blob {
            digest: Digest {
                function: h.key.function,
                hash: h.key.hash,
                size: h.key.size,
            },
            data: payload,
        }),
        RecordKind::Ac => payload.map(|value| Replica::ActionResult {
            key: h.key.hash,
            value,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursor_round_trips_and_advances_its_base() {
        let mut c = Cursor::default();
        let mut reported = Cursor::default();
        reported.offsets.insert(0, DONE);
        reported.offsets.insert(1, 4096);
        reported.offsets.insert(2, DONE);
        c.merge(&reported, [0, 1, 2, 3].into_iter());
        assert_eq!(c.base, 1);
        assert!(c.is_done(0) && !c.is_done(1) && c.is_done(2) && !c.is_done(3));
        assert_eq!(Cursor::decode(&c.encode()), Some(c.clone()));
        reported.offsets.insert(1, DONE);
        c.merge(&reported, [1, 2, 3].into_iter());
        assert_eq!(c.base, 3);
        assert_eq!(Cursor::decode("garbage"), None);
    }

    #[test]
    fn an_owed_record_holds_its_segment_and_the_base() {
        let mut c = Cursor::default();
        let mut reported = Cursor::default();
        reported.offsets.insert(0, DONE);
        reported.offsets.insert(1, DONE);
        let owed = Position {
            seg: 0,
            off: 4096,
            len: 100,
        };
        c.settle(&[], &[owed]);
        c.merge(&reported, [0, 1, 2].into_iter());
        assert_eq!(c.base, 0);
        assert!(!c.is_done(0) && c.is_done(1));
        assert_eq!(Cursor::decode(&c.encode()), Some(c.clone()));
        c.settle(&[owed], &[]);
        c.merge(&reported, [0, 1, 2].into_iter());
        assert_eq!(c.base, 2);
        assert!(c.is_done(0) && c.is_done(1));
    }
}
