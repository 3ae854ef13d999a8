//! The streaming write path for blobs too large to stage in memory.
//!
//! An upload declares its size, so its whole record (header, payload, chunk table) is
//! given an address range up front: a 4 KiB-aligned extent of the extents segment, or
//! a huge segment of its own when it would not fit a quarter of one. Space is another
//! matter: both kinds of segment are sparse, and each write unit is charged against
//! the budget and allocated only when it is written (`reclaimer.rs`), so a declared
//! size costs nothing until bytes arrive. Many uploads write into their own extents
//! at once; each holds two write units of memory, whatever the blob's size. The payload is checksummed as it streams; the `Upload` feeding it hashes the
//! same bytes on the caller's core, and `finish` compares that hash with the key.
//!
//! The header is written last. Until then the extent starts with zeros, which the
//! recovery scan treats as dead space, so a crash or an abandoned upload leaves an
//! extent no one can see; only after the digest verifies is the first block rewritten
//! with the real header, and only after that write completes (under `Durability::Sync`,
//! after the sync covering it: `syncer.rs`) is the record indexed.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{
    align_up, encode_chunk_table, record_len, Header, Key, ALIGN, CRC_CHUNK, HEADER_LEN,
};
use crate::index::Loc;
use crate::io::{self, IoBuf, SegFile};
use crate::key::prefix;
use crate::partition::{reclaim_order_now, ExtentHead, Partition, Pending, SegKind};
use futures::future::LocalBoxFuture;
use futures::FutureExt;
use std::rc::Rc;

/// Bytes an upload buffers before writing them (one O_DIRECT write each). An upload
/// holds two: one being written while the next fills.
pub const WRITE_UNIT: usize = 1 << 20;

impl Partition {
    /// Places a record with a payload of `payload_len` bytes: an extent, or a huge
    /// segment. Nothing is charged against the budget yet.
    pub async fn reserve_extent(
        self: &Rc<Self>,
        key: Key,
        payload_len: u64,
    ) -> Result<ExtentWriter> {
        self.check_writable()?;
        let aligned = align_up(record_len(payload_len));
        let (seg, off) = if aligned > self.limits.segment_size / 4 {
            let (seg, hot) = {
                let _roll = self.roll_lock.lock().await;
                self.new_segment(SegKind::Huge, aligned).await?
            };
            self.register_extent(seg, 0);
            self.reinsert(hot).await;
            (seg, 0)
        } else {
            loop {
                if let Some(found) = self.try_reserve(aligned) {
                    break found;
                }
                self.roll_extents(aligned).await?;
            }
        };
        let file = self.segment_file(seg).ok_or_else(|| {
            Error::new(
                ErrorKind::Unavailable,
                "segment reclaimed during reservation; retry",
            )
        })?;
        Ok(ExtentWriter::new(
            self.clone(),
            file,
            seg,
            off,
            key,
            payload_len,
        ))
    }

    fn try_reserve(&self, aligned: u64) -> Option<(u32, u64)> {
        let (seg, off) = {
            let mut st = self.st.borrow_mut();
            let e = st.extents.as_mut()?;
            if e.head + aligned > self.limits.segment_size {
                return None;
            }
            let off = e.head;
            e.head += aligned;
            (e.seg, off)
        };
        self.register_extent(seg, off);
        Some((seg, off))
    }

    fn register_extent(&self, seg: u32, off: u64) {
        if let Some(s) = self.st.borrow_mut().segments.get_mut(&seg) {
            s.inflight.push(off as u32);
        }
    }

    fn release_extent(&self, seg: u32, off: u64) {
        if let Some(s) = self.st.borrow_mut().segments.get_mut(&seg) {
            if let Some(i) = s.inflight.iter().position(|&o| u64::from(o) == off) {
                s.inflight.swap_remove(i);
            }
        }
    }

    async fn roll_extents(&self, need: u64) -> Result<()> {
        let hot = {
            let _roll = self.roll_lock.lock().await;
            let has_room = self
                .st
                .borrow()
                .extents
                .as_ref()
                .is_some_and(|e| e.head + need <= self.limits.segment_size);
            if has_room {
                return Ok(());
            }
            let (seg, hot) = self
                .new_segment(SegKind::Extents, self.limits.segment_size)
                .await?;
            self.st.borrow_mut().extents = Some(ExtentHead { seg, head: 0 });
            hot
        };
        self.reinsert(hot).await;
        Ok(())
    }
}

/// One upload streaming into its reserved extent.
pub struct ExtentWriter {
    part: Rc<Partition>,
    file: Rc<SegFile>,
    seg: u32,
    base: u64,
    key: Key,
    payload_len: u64,
    received: u64,
    chunk_crc: crc32fast::Hasher,
    chunk_fill: u64,
    crcs: Vec<u32>,
    /// The record's first block as last buffered, header still zero.
    first_block: Vec<u8>,
    buf: IoBuf,
    buf_len: usize,
    /// The previous unit's write, still in flight while this one fills: hashing and
    /// copying overlap with the device instead of adding to it. It hands its buffer
    /// back, to be filled again.
    inflight: Option<LocalBoxFuture<'static, Result<IoBuf>>>,
    spare: Option<IoBuf>,
    /// Record offset at which `buf` starts.
    buf_start: u64,
}

impl ExtentWriter {
    fn new(
        part: Rc<Partition>,
        file: Rc<SegFile>,
        seg: u32,
        base: u64,
        key: Key,
        payload_len: u64,
    ) -> Self {
        let unit = WRITE_UNIT.min(align_up(record_len(payload_len)) as usize);
        let mut buf = file.alloc(unit);
        buf.as_mut()[..HEADER_LEN].fill(0);
        ExtentWriter {
            part,
            file,
            seg,
            base,
            key,
            payload_len,
            received: 0,
            chunk_crc: crc32fast::Hasher::new(),
            chunk_fill: 0,
            crcs: Vec::new(),
            first_block: Vec::new(),
            buf,
            buf_len: HEADER_LEN,
            inflight: None,
            spare: None,
            buf_start: 0,
        }
    }

    /// Adds payload bytes; a stream longer than declared is refused at once.
    pub async fn write(&mut self, mut data: &[u8]) -> Result<()> {
        if self.received + data.len() as u64 > self.payload_len {
            return Err(Error::invalid(format!(
                "upload is longer than its declared size of {} bytes",
                self.payload_len
            )));
        }
        self.received += data.len() as u64;
        while !data.is_empty() {
            let room = (CRC_CHUNK - self.chunk_fill) as usize;
            let n = room.min(data.len());
            self.chunk_crc.update(&data[..n]);
            self.chunk_fill += n as u64;
            if self.chunk_fill == CRC_CHUNK {
                let done = std::mem::replace(&mut self.chunk_crc, crc32fast::Hasher::new());
                self.crcs.push(done.finalize());
                self.chunk_fill = 0;
            }
            self.push(&data[..n]).await?;
            data = &data[n..];
        }
        Ok(())
    }

    /// Copies record bytes into the write unit, writing each full unit out.
    async fn push(&mut self, mut data: &[u8]) -> Result<()> {
        while !data.is_empty() {
            let cap = self.buf.len();
            let n = (cap - self.buf_len).min(data.len());
            self.buf.as_mut()[self.buf_len..self.buf_len + n].copy_from_slice(&data[..n]);
            self.buf_len += n;
            data = &data[n..];
            if self.buf_len == cap {
                self.write_unit().await?;
            }
        }
        Ok(())
    }

    async fn write_unit(&mut self) -> Result<()> {
        self.drain().await?;
        let next = match self.spare.take() {
            Some(buf) => buf,
            None => self.file.alloc(self.buf.len()),
        };
        let mut full = std::mem::replace(&mut self.buf, next);
        let len = self.buf_len;
        full.as_mut()[len..].fill(0);
        if self.buf_start == 0 {
            self.first_block = full.as_mut()[..ALIGN as usize].to_vec();
        }
        let file = self.file.clone();
        let pos = self.base + self.buf_start;
        self.part
            .allocate(self.seg, &file, pos, full.len() as u64)
            .await?;
        self.inflight = Some(
            io::spawn_joinable(async move { file.write_reusing(full, pos).await }).boxed_local(),
        );
        self.buf_start += len as u64;
        self.buf_len = 0;
        io::submit_queued().await;
        Ok(())
    }

    /// Waits for the write in flight, if any, and keeps its buffer.
    async fn drain(&mut self) -> Result<()> {
        if let Some(write) = self.inflight.take() {
            self.spare = Some(write.await?);
        }
        Ok(())
    }

    /// Verifies the size and the payload's `hash` against the key, writes the rest and
    /// then the header, and indexes the record. Any error leaves the extent dead and
    /// invisible.
    /// Commits the upload once `hash` matches; returns where the record lives.
    pub async fn finish(mut self, hash: [u8; 32]) -> Result<Loc> {
        match self.commit(hash).await {
            Ok((generation, loc)) => self
                .part
                .wait_durable_generation(generation)
                .await
                .map(|()| loc),
            Err(e) => {
                self.abandon().await;
                Err(e)
            }
        }
    }

    /// Everything `finish` does up to indexing the record (an error leaves it
    /// unindexed); returns the sync generation that makes it durable, and the
    /// record's location.
    async fn commit(&mut self, hash: [u8; 32]) -> Result<(u64, Loc)> {
        let declared = crate::Digest {
            function: self.key.function,
            hash: self.key.hash,
            size: self.key.size,
        };
        declared.check_sent(self.received, hash)?;
        if self.chunk_fill > 0 {
            let last = std::mem::replace(&mut self.chunk_crc, crc32fast::Hasher::new());
            self.crcs.push(last.finalize());
        }
        let payload_crc = if self.payload_len > CRC_CHUNK {
            let table = encode_chunk_table(&self.crcs);
            self.push(&table).await?;
            crate::format::crc(&table)
        } else {
            self.crcs.first().copied().unwrap_or(0)
        };
        let seq = self.part.next_seq();
        let header = Header {
            key: self.key,
            seq,
            payload_len: self.payload_len,
            payload_crc,
        }
        .encode(self.part.nonce);
        self.drain().await?;
        if self.buf_start == 0 {
            // The whole record is still in memory: one write, header included.
            self.buf.as_mut()[..HEADER_LEN].copy_from_slice(&header);
            self.write_tail().await?;
        } else {
            if self.buf_len > 0 {
                self.write_tail().await?;
            }
            let mut block = std::mem::take(&mut self.first_block);
            block[..HEADER_LEN].copy_from_slice(&header);
            self.file.write_padded(&block, self.base).await?;
        }
        if self.part.segment_file(self.seg).is_none() {
            return Err(Error::new(
                ErrorKind::Unavailable,
                "the segment holding this upload was reclaimed before it finished; retry",
            ));
        }
        let loc = Loc::new(
            self.seg,
            self.base as u32,
            record_len(self.payload_len),
            false,
        );
        {
            let mut st = self.part.st.borrow_mut();
            let next_seg = st.next_seg;
            if let Some(s) = st.segments.get_mut(&self.seg) {
                s.dirty = true;
                if s.kind == SegKind::Huge {
                    s.order = reclaim_order_now(next_seg);
                }
            }
        }
        let generation = self.part.syncer.next_generation();
        let pending = Pending {
            prefix: prefix(&self.key),
            loc,
            if_absent: false,
        };
        for item in self.part.index_now(vec![pending]) {
            self.part.insert(item.prefix, item.loc, item.if_absent);
        }
        Ok((generation, loc))
    }

    /// Gives the upload up. A huge segment holds nothing else, so it is removed at
    /// once, with what was written to it: abandoned uploads leave neither charged
    /// space nor open files behind (a client cancelling large uploads would otherwise
    /// pile up sparse segments, one descriptor each, until reclaim reached them). An
    /// extent stays dead space in its segment until that segment is reclaimed.
    pub async fn abandon(mut self) {
        // The write in flight holds the file; its error no longer matters.
        let _ = self.drain().await;
        self.part.discard_huge(self.seg).await;
    }

    /// Writes the partially filled last unit, zero-padded to the block size.
    async fn write_tail(&mut self) -> Result<()> {
        let padded = align_up(self.buf_len as u64) as usize;
        let pos = self.base + self.buf_start;
        self.part
            .allocate(self.seg, &self.file, pos, padded as u64)
            .await?;
        let mut buf = self.file.alloc(padded);
        buf.as_mut()[..self.buf_len].copy_from_slice(&self.buf.as_mut()[..self.buf_len]);
        buf.as_mut()[self.buf_len..].fill(0);
        self.file.write(buf, pos).await
    }
}

impl Drop for ExtentWriter {
    fn drop(&mut self) {
        self.part.release_extent(self.seg, self.base);
    }
}
