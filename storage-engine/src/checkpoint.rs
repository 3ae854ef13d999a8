//! Index checkpoints: the whole index of a partition in one rkyv file, so that a
//! restart loads it without parsing and replays only what was written after it.
//!
//! A checkpoint names, for every segment, the offset from which recovery must scan
//! again ("replay from"): the flushed end of the packed segment, the lowest extent
//! still being uploaded into, or the end of a segment nothing is being written to.
//! Segments created after the checkpoint are scanned whole. Entries naming segments
//! that were reclaimed since are dropped on load.
//!
//! File layout (see FORMAT.md): 8-byte magic, u32 CRC32 and u32 length of the archive,
//! then the rkyv archive at offset 16, zero-padded to a multiple of 4096 bytes.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{align_up, crc};
use crate::io::SegFile;
use crate::partition::Partition;
use rkyv::{Archive, Deserialize, Serialize};
use std::path::Path;

pub const FILE: &str = "checkpoint";
const TMP_FILE: &str = "checkpoint.tmp";
/// Version 2: CAS prefixes leave the blob's size out (see `key.rs`). A version-1
/// checkpoint holds prefixes this build would never look up, so it is ignored and the
/// index rebuilt by scanning the segments, whose records are unchanged.
const MAGIC: &[u8; 8] = b"CRNCKPT2";
/// Magics of checkpoints from older builds, recognised only to say why they are ignored.
const OLD_MAGICS: [&[u8; 8]; 1] = [b"CRNCKPT1"];
const PREAMBLE: usize = 16;

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub nonce: u64,
    pub next_seq: u64,
    pub next_seg: u32,
    pub segments: Vec<SegmentMark>,
    pub entries: Vec<Entry>,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentMark {
    pub id: u32,
    pub replay_from: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub prefix: u64,
    pub seg: u32,
    pub off: u32,
    pub len: u32,
    pub flags: u8,
}

/// Encodes a checkpoint into its file image.
pub fn encode(cp: &Checkpoint) -> Result<Vec<u8>> {
    let archive = rkyv::to_bytes::<rkyv::rancor::Error>(cp)
        .map_err(|e| Error::new(ErrorKind::Internal, format!("encoding checkpoint: {e}")))?;
    let mut out = Vec::with_capacity(PREAMBLE + archive.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&crc(&archive).to_le_bytes());
    out.extend_from_slice(&(archive.len() as u32).to_le_bytes());
    out.extend_from_slice(&archive);
    Ok(out)
}

/// Decodes a checkpoint file image; `None` for anything damaged or foreign.
pub fn decode(image: &[u8], nonce: u64) -> Option<Checkpoint> {
    if image.get(..8)? != MAGIC {
        return None;
    }
    let want_crc = u32::from_le_bytes(image.get(8..12)?.try_into().ok()?);
    let len = u32::from_le_bytes(image.get(12..16)?.try_into().ok()?) as usize;
    let body = image.get(PREAMBLE..PREAMBLE.checked_add(len)?)?;
    if crc(body) != want_crc {
        return None;
    }
    // rkyv needs the archive aligned; the image slice may not be.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(body.len());
    aligned.extend_from_slice(body);
    let cp = rkyv::from_bytes::<Checkpoint, rkyv::rancor::Error>(&aligned).ok()?;
    (cp.nonce == nonce).then_some(cp)
}

/// Reads the checkpoint of a partition directory, if there is a valid one.
pub async fn load(dir: &Path, nonce: u64) -> Result<Option<(Checkpoint, u64)>> {
    let path = dir.join(FILE);
    if !path.exists() {
        return Ok(None);
    }
    let file = SegFile::open(&path).await?;
    let read = async {
        let size = file.size().await?;
        Ok::<_, Error>((size, file.read(0, size as usize).await?))
    }
    .await;
    file.close().await?;
    let (size, image) = read?;
    if OLD_MAGICS
        .iter()
        .any(|old| image.get(..8) == Some(&old[..]))
    {
        tracing::info!(
            "{} is from an older index format; rebuilding the index by scanning segments",
            path.display()
        );
        return Ok(None);
    }
    match decode(&image, nonce) {
        Some(cp) => Ok(Some((cp, size))),
        None => {
            tracing::warn!(
                "{} is damaged; rebuilding the index by scanning segments",
                path.display()
            );
            Ok(None)
        }
    }
}

impl Partition {
    /// Snapshots the index and writes it atomically (tmp file, sync, rename).
    pub async fn write_checkpoint(&self) -> Result<()> {
        let _roll = self.roll_lock.lock().await;
        let (cp, changes) = self.snapshot();
        let image = encode(&cp)?;
        let new_bytes = align_up(image.len() as u64);
        let hot = self.make_room(new_bytes).await?;
        let tmp = self.dir.join(TMP_FILE);
        let _ = std::fs::remove_file(&tmp);
        let installed = async {
            let file = SegFile::create(&tmp, new_bytes, true).await?;
            let written = async {
                file.write_padded(&image, 0).await?;
                file.sync().await
            }
            .await;
            if let Err(e) = written {
                let _ = file.remove().await;
                let _ = file.close().await;
                return Err(e);
            }
            file.close().await?;
            std::fs::rename(&tmp, self.dir.join(FILE))
                .and_then(|()| std::fs::File::open(&self.dir)?.sync_all())
                .map_err(|e| Error::io("installing checkpoint", e))
        }
        .await;
        // `make_room` charged the new file; the old one, replaced, or the new one,
        // never installed, no longer takes space.
        let freed = match &installed {
            Ok(()) => std::mem::replace(&mut self.st.borrow_mut().checkpoint_bytes, new_bytes),
            Err(_) => new_bytes,
        };
        self.uncharge(freed);
        installed?;
        {
            let mut st = self.st.borrow_mut();
            st.changes -= changes.min(st.changes);
        }
        drop(_roll);
        self.reinsert(hot).await;
        Ok(())
    }

    fn snapshot(&self) -> (Checkpoint, u64) {
        let st = self.st.borrow();
        let segments = st
            .segments
            .iter()
            .map(|(&id, seg)| SegmentMark {
                id,
                replay_from: st.committed_end(id, seg).0,
            })
            .collect();
        let entries = st
            .index
            .iter()
            .map(|(&prefix, loc)| Entry {
                prefix: prefix.get(),
                seg: loc.seg,
                off: loc.off,
                len: loc.record_len(),
                flags: u8::from(loc.accessed()),
            })
            .collect();
        (
            Checkpoint {
                nonce: self.nonce,
                next_seq: st.next_seq,
                next_seg: st.next_seg,
                segments,
                entries,
            },
            st.changes,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::{Digest, DigestFunction};
    use crate::format::Key;
    use crate::key::{ac_key, cas_key, prefix};
    use crate::{Engine, EngineConfig};
    use bytes::Bytes;
    use futures::executor::block_on;
    use std::collections::HashMap;

    /// The index prefix of version-1 checkpoints, which mixed in every key's size.
    fn v1_prefix(key: &Key) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&key.hash[..8]);
        let tag = (u64::from(key.kind.code()) << 8) | u64::from(key.function.code());
        u64::from_le_bytes(first)
            ^ key.size.wrapping_mul(0x9E37_79B9_7F4A_7C15)
            ^ tag.rotate_left(56)
    }

    fn small_engine(dir: &Path) -> Engine {
        Engine::start(EngineConfig {
            dir: dir.to_path_buf(),
            max_size: 128 << 20,
            shards: 2,
            partitions: 4,
            segment_size: Some(8 << 20),
            checkpoint_interval: None,
            pin_shards: false,
            ..EngineConfig::default()
        })
        .unwrap()
    }

    /// A data directory whose checkpoints a version-1 build wrote (prefixes with the
    /// size mixed in, magic `CRNCKPT1`) finds every blob after the upgrade: the old
    /// checkpoint is ignored and the index rebuilt from the unchanged records. Were it
    /// loaded, every CAS blob would be missing, since no lookup asks for those prefixes.
    #[test]
    fn a_version_1_checkpoint_is_rebuilt_not_misread() {
        let dir = tempfile::tempdir().unwrap();
        let engine = small_engine(dir.path());
        let mut blobs = Vec::new();
        let mut v1_of = HashMap::new();
        for (i, size) in [100usize, 5_000, 60_000, 150_000, 3 << 20]
            .into_iter()
            .enumerate()
        {
            let data = Bytes::from(vec![i as u8 + 1; size]);
            let d = Digest::of(DigestFunction::Sha256, &data);
            block_on(engine.put(d, data.clone())).unwrap();
            v1_of.insert(prefix(&cas_key(&d)).get(), v1_prefix(&cas_key(&d)));
            blobs.push((d, data));
        }
        let action = Digest::of(DigestFunction::Sha256, b"action");
        block_on(engine.ac_put("", action, Bytes::from_static(b"result"))).unwrap();
        let ac = ac_key("", &action);
        v1_of.insert(prefix(&ac).get(), v1_prefix(&ac));
        block_on(engine.checkpoint()).unwrap();
        block_on(engine.shutdown()).unwrap();

        let mut rewritten = 0;
        for part in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let path = part.path().join(FILE);
            let Ok(image) = std::fs::read(&path) else {
                continue;
            };
            let len = u32::from_le_bytes(image[12..16].try_into().unwrap()) as usize;
            let mut aligned = rkyv::util::AlignedVec::<16>::new();
            aligned.extend_from_slice(&image[PREAMBLE..PREAMBLE + len]);
            let mut cp = rkyv::from_bytes::<Checkpoint, rkyv::rancor::Error>(&aligned).unwrap();
            for e in &mut cp.entries {
                e.prefix = v1_of[&e.prefix];
                rewritten += 1;
            }
            let mut old = encode(&cp).unwrap();
            old[..8].copy_from_slice(b"CRNCKPT1");
            std::fs::write(&path, old).unwrap();
        }
        assert_eq!(rewritten, blobs.len() + 1, "every record was checkpointed");

        let engine = small_engine(dir.path());
        let digests: Vec<Digest> = blobs.iter().map(|(d, _)| *d).collect();
        assert_eq!(block_on(engine.find_missing(digests)).unwrap(), vec![]);
        for (d, data) in &blobs {
            assert!(block_on(engine.get_bytes(*d)).unwrap() == *data);
            let (found, blob) = block_on(engine.get_by_hash(d.function, d.hash)).unwrap();
            assert_eq!(found, *d);
            assert!(block_on(blob.collect_bytes()).unwrap() == *data);
        }
        assert_eq!(
            block_on(engine.ac_get("", action)).unwrap(),
            Bytes::from_static(b"result")
        );
        block_on(engine.shutdown()).unwrap();
    }

    #[test]
    fn corrupted_checkpoint_is_ignored() {
        let cp = Checkpoint {
            nonce: 7,
            next_seq: 10,
            next_seg: 3,
            segments: vec![SegmentMark {
                id: 1,
                replay_from: 4096,
            }],
            entries: vec![Entry {
                prefix: 1,
                seg: 1,
                off: 0,
                len: 100,
                flags: 1,
            }],
        };
        let image = encode(&cp).unwrap();
        assert_eq!(decode(&image, 7), Some(cp));
        assert_eq!(
            decode(&image, 8),
            None,
            "checkpoint of another directory accepted"
        );
        for i in [0, 9, 20, image.len() - 1] {
            let mut bad = image.clone();
            bad[i] ^= 0x40;
            assert_eq!(decode(&bad, 7), None, "flip at {i} accepted");
        }
        assert_eq!(decode(&image[..image.len() - 1], 7), None);
    }
}
