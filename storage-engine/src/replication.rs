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

use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::{align_down, scan_records, Header, RecordKind, HEADER_LEN};
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
}

const DONE: u64 = u64::MAX;

impl Cursor {
    /// Whether segment `id` was replicated completely.
    pub fn is_done(&self, id: u32) -> bool {
        id < self.base || self.offsets.get(&id) == Some(&DONE)
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
        while self.offsets.get(&self.base) == Some(&DONE)
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
        for line in lines {
            let (id, off) = line.split_once(' ')?;
            offsets.insert(id.parse().ok()?, off.parse().ok()?);
        }
        Some(Cursor { base, offsets })
    }
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
    pub(crate) next: Cursor,
}

impl ReplicationBatch {
    /// True when the partition had nothing new to replicate.
    pub fn is_empty(&self) -> bool {
        self.replicas.is_empty()
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
                        replicas.extend(replica(&h, None));
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
                        replicas.extend(replica(&h, Some(payload)));
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
            next: cur,
        })
    }

    /// Records that every record of a batch reached the slow tier.
    pub fn replication_done(&self, next: &Cursor) -> Result<()> {
        let mut st = self.st.borrow_mut();
        let live: Vec<u32> = st.segments.keys().copied().collect();
        let Some(cur) = st.replicated.as_mut() else {
            return Ok(());
        };
        let before = cur.clone();
        cur.merge(next, live.into_iter());
        if *cur != before {
            store_cursor(&self.dir, cur)?;
        }
        Ok(())
    }

    /// Bytes of finished records not yet replicated.
    pub fn replication_backlog(&self) -> u64 {
        let st = self.st.borrow();
        let Some(cur) = &st.replicated else { return 0 };
        st.segments
            .iter()
            .map(|(&id, s)| {
                let off = cur.offset(id);
                if off == DONE {
                    0
                } else {
                    st.committed_end(id, s).0.saturating_sub(off)
                }
            })
            .sum()
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
}
