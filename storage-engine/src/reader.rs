//! The read path. Nothing leaves it unverified.
//!
//! A record is found through the index, then its header is compared with the full key
//! (the index only holds a prefix) and its payload checked against the CRCs before a
//! single byte is handed out. Small records are read whole in one I/O (or copied from
//! the packed tail when they are that recent); large ones are streamed one CRC chunk
//! at a time, each verified before it is sent. A failed check drops the record from
//! the index and is counted and logged; the caller sees NOT_FOUND (or, mid-stream,
//! DATA_LOSS), never the damaged bytes.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    decode_chunk_table, record_len, verify_body, Header, Key, CRC_CHUNK, HEADER_LEN,
};
use crate::index::{Loc, Prefix};
use crate::io::{self, SegFile};
use crate::key::{answers, prefix};
use crate::partition::Partition;
use bytes::{Bytes, BytesMut};
use std::rc::Rc;

/// `[offset, offset+limit)` of a whole verified payload.
fn whole(payload: Bytes, offset: u64, limit: Option<u64>) -> Found {
    let len = payload.len() as u64;
    Found::Whole(slice(payload, offset, limit), len)
}

/// `[offset, offset + limit)` of a payload, cut to its end.
pub fn slice(payload: Bytes, offset: u64, limit: Option<u64>) -> Bytes {
    let len = payload.len() as u64;
    let start = offset.min(len);
    let end = limit.map_or(len, |l| start.saturating_add(l).min(len));
    payload.slice(start as usize..end as usize)
}

/// Records up to this length are read and verified in one piece.
pub const WHOLE_READ_MAX: u64 = 4 << 20;

/// What a read found.
pub enum Found {
    /// The payload slice requested, already verified, and the whole payload's length.
    Whole(Bytes, u64),
    /// A large record: verified header and chunk table, payload still on disk.
    Large(LargeRecord),
}

pub struct LargeRecord {
    pub file: Rc<SegFile>,
    /// The key its header holds.
    pub key: Key,
    pub prefix: Prefix,
    pub loc: Loc,
    pub payload_len: u64,
    pub crcs: Vec<u32>,
}

impl Partition {
    /// Whether the record of exactly `key` is stored, without marking it accessed.
    /// Answered from the index unless the record is 2 GiB or more, when the length it
    /// holds is saturated and the header is read.
    pub async fn holds(&self, key: &Key) -> Result<bool> {
        let p = prefix(key);
        let Some(loc) = self.st.borrow().index.get(&p).copied() else {
            return Ok(false);
        };
        if let Some(fits) = loc.fits(record_len(key.size)) {
            return Ok(fits);
        }
        let Some(file) = self.segment_file(loc.seg) else {
            return Ok(false);
        };
        let head = file.read(u64::from(loc.off), HEADER_LEN).await?;
        Ok(Header::decode(&head, self.nonce).is_ok_and(|h| h.key == *key))
    }

    /// Finds a record and, for small ones, reads `[offset, offset+limit)` of its payload.
    /// With `any_size`, `key`'s size is ignored: a CAS blob looked up by hash alone.
    /// `Ok(None)`: not stored, or dropped as corrupt.
    pub async fn find(
        &self,
        key: &Key,
        any_size: bool,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<Option<Found>> {
        let Some((prefix, loc)) = self.lookup(key) else {
            return Ok(None);
        };
        if !any_size && offset > key.size {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!(
                    "read offset {offset} is past the end of a {}-byte blob",
                    key.size
                ),
            ));
        }
        let held = self.tier.lock().peek(self.id, prefix, key, any_size);
        if let Some(payload) = held {
            return Ok(Some(whole(payload, offset, limit)));
        }
        let Some(file) = self.segment_file(loc.seg) else {
            return Ok(None);
        };
        if u64::from(loc.record_len()) <= WHOLE_READ_MAX {
            let bytes = match self.read_from_tail(&loc) {
                Some(b) => b,
                None => {
                    file.read(u64::from(loc.off), loc.record_len() as usize)
                        .await?
                }
            };
            let Some((found, payload)) = self.check_whole(prefix, loc, key, any_size, bytes) else {
                return Ok(None);
            };
            let len = payload.len() as u64;
            if self.tier.lock().takes_read(self.id, prefix, len) {
                self.admit(prefix, loc, found, len, || Bytes::copy_from_slice(&payload));
            }
            return Ok(Some(whole(payload, offset, limit)));
        }
        let head = file.read(u64::from(loc.off), HEADER_LEN).await?;
        let header = match Header::decode(&head, self.nonce) {
            Ok(h) if answers(&h.key, key, any_size) => h,
            _ => {
                self.drop_corrupt(prefix, loc, "a record header");
                return Ok(None);
            }
        };
        let table_len = 4 * header.chunk_count() as usize;
        let table_off = u64::from(loc.off) + HEADER_LEN as u64 + header.payload_len;
        let table = file.read(table_off, table_len).await?;
        if table.len() != table_len || crate::format::crc(&table) != header.payload_crc {
            self.drop_corrupt(prefix, loc, "a chunk table");
            return Ok(None);
        }
        Ok(Some(Found::Large(LargeRecord {
            file,
            key: header.key,
            prefix,
            loc,
            payload_len: header.payload_len,
            crcs: decode_chunk_table(&table),
        })))
    }

    /// Checks a whole record read from disk; returns its key and payload.
    fn check_whole(
        &self,
        prefix: Prefix,
        loc: Loc,
        key: &Key,
        any_size: bool,
        bytes: Bytes,
    ) -> Option<(Key, Bytes)> {
        let header = match Header::decode(&bytes, self.nonce) {
            Ok(h) if answers(&h.key, key, any_size) => h,
            Ok(_) => return None,
            Err(_) => {
                self.drop_corrupt(prefix, loc, "a record header");
                return None;
            }
        };
        let body = bytes.slice(HEADER_LEN..);
        if !verify_body(&header, &body) {
            self.drop_corrupt(prefix, loc, "a record payload");
            return None;
        }
        Some((header.key, body.slice(..header.payload_len as usize)))
    }

    /// Streams `[offset, end)` of a large record chunk by chunk into `tx`.
    pub async fn stream_large(
        &self,
        rec: LargeRecord,
        offset: u64,
        end: u64,
        tx: flume::Sender<Result<Bytes>>,
    ) {
        let payload_start = u64::from(rec.loc.off) + HEADER_LEN as u64;
        // One chunk is read ahead while the previous one is checked and sent, so the
        // device never waits for the consumer.
        let read_chunk = |chunk: u64| {
            let file = rec.file.clone();
            let start = chunk * CRC_CHUNK;
            let len = CRC_CHUNK.min(rec.payload_len - start);
            io::spawn_joinable(async move { file.read(payload_start + start, len as usize).await })
        };
        // A read of the whole payload gathers it for the memory tier as it goes, each
        // chunk after its check; admitted only once every chunk passed.
        let whole_read = offset == 0 && end == rec.payload_len;
        let mut gathered = (whole_read
            && self
                .tier
                .lock()
                .takes_read(self.id, rec.prefix, rec.payload_len))
        .then(|| BytesMut::with_capacity(rec.payload_len as usize));
        let mut chunk = offset / CRC_CHUNK;
        let mut ahead = (chunk * CRC_CHUNK < end).then(|| read_chunk(chunk));
        while let Some(pending) = ahead.take() {
            let start = chunk * CRC_CHUNK;
            let len = CRC_CHUNK.min(rec.payload_len - start);
            let data = match pending.await {
                Ok(d) => d,
                Err(e) => {
                    let _ = tx.send_async(Err(e)).await;
                    return;
                }
            };
            if (chunk + 1) * CRC_CHUNK < end {
                ahead = Some(read_chunk(chunk + 1));
                // Hands the read-ahead to the kernel now, not when this task next
                // waits after checking and sending this chunk (see `io::submit_queued`).
                io::submit_queued().await;
            }
            let want = rec.crcs.get(chunk as usize).copied();
            if data.len() as u64 != len || want != Some(crate::format::crc(&data)) {
                self.drop_corrupt(rec.prefix, rec.loc, "a payload chunk");
                let _ = tx
                    .send_async(Err(Error::new(
                        ErrorKind::DataLoss,
                        "stored blob failed its checksum; it has been dropped, upload it again",
                    )))
                    .await;
                return;
            }
            if let Some(g) = gathered.as_mut() {
                g.extend_from_slice(&data);
            }
            let from = offset.max(start) - start;
            let to = end.min(start + len) - start;
            if tx
                .send_async(Ok(data.slice(from as usize..to as usize)))
                .await
                .is_err()
            {
                return;
            }
            chunk += 1;
        }
        if let Some(g) = gathered {
            if g.len() as u64 == rec.payload_len {
                self.admit(rec.prefix, rec.loc, rec.key, rec.payload_len, || g.freeze());
            }
        }
    }
}
