//! A shard: one executor thread that owns a fixed set of partitions.
//!
//! Requests reach a shard over a channel from any thread (the `Engine` handle routes by
//! partition), and each runs as a task on the shard's executor, where the partition's
//! state is touched without locks. Replies travel back over `Send` channels, so the
//! futures callers await are `Send` even though everything inside the shard is `Rc`.

use crate::config::{Durability, PartitionLimits};
use crate::digest::Digest;
use crate::error::{Error, Result};
use crate::format::Key;
use crate::index::Prefix;
use crate::io;
use crate::key::prefix;
use crate::memory_tier::SharedTier;
use crate::partition::Partition;
use crate::reader::Found;
use crate::reclaimer::OverflowPool;
use crate::replication::{ReplicationBatch, Settlement};
use crate::stream::BlobStream;
use crate::PartitionStats;
use bytes::{Bytes, BytesMut};
use futures::channel::oneshot;
use futures::FutureExt;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

pub(crate) enum Request {
    /// A small blob already whole in memory: one message instead of an upload's
    /// request, chunk and finish messages (BatchUpdateBlobs sends hundreds of these).
    PutWhole {
        part: u32,
        digest: Digest,
        key: Key,
        data: Bytes,
        reply: oneshot::Sender<Result<()>>,
    },
    Put {
        part: u32,
        digest: Digest,
        key: Key,
        chunks: flume::Receiver<UploadMsg>,
        accepted: oneshot::Sender<Result<Accepted>>,
        done: oneshot::Sender<Result<()>>,
    },
    /// Which of `items` (position in the caller's list, partition, index prefix,
    /// record length) are not stored. Prefixes rather than 42-byte keys: the index
    /// holds nothing else, and the smaller items halved the bytes moved per
    /// FindMissingBlobs digest. The record length keeps the answer exact for a CAS
    /// prefix, which leaves the size out. The reply is (missing, unsure): records of
    /// 2 GiB and more whose saturated length cannot tell, asked again as `Holds`.
    Missing {
        items: Vec<(usize, u32, Prefix, u64)>,
        reply: oneshot::Sender<(Vec<usize>, Vec<usize>)>,
    },
    /// Whether exactly `key` is stored, reading its header if need be.
    Holds {
        part: u32,
        key: Key,
        reply: oneshot::Sender<Result<bool>>,
    },
    /// A read; with `any_size`, a CAS blob found by hash alone. The reply carries the
    /// payload's whole length with the stream of the part asked for.
    Get {
        part: u32,
        key: Key,
        any_size: bool,
        offset: u64,
        limit: Option<u64>,
        reply: oneshot::Sender<Result<(u64, BlobStream)>>,
    },
    AcPut {
        part: u32,
        key: Key,
        value: Bytes,
        reply: oneshot::Sender<Result<()>>,
    },
    Stats {
        reply: oneshot::Sender<Vec<PartitionStats>>,
    },
    Checkpoint {
        reply: oneshot::Sender<Result<()>>,
    },
    ReplicationBatch {
        part: u32,
        max_bytes: u64,
        reply: oneshot::Sender<Result<ReplicationBatch>>,
    },
    ReplicationOwed {
        part: u32,
        max_bytes: u64,
        reply: oneshot::Sender<Result<ReplicationBatch>>,
    },
    ReplicationDone {
        part: u32,
        done: Settlement,
        reply: oneshot::Sender<Result<()>>,
    },
    Shutdown {
        reply: oneshot::Sender<Result<()>>,
    },
}

pub(crate) enum UploadMsg {
    Data(Bytes),
    /// The end of the stream, with the digest of every byte sent. The `Upload` hashes
    /// on the caller's core as it sends, so that hashing a chunk overlaps with the
    /// shard copying, checksumming and writing the one before: one SHA-256 upload
    /// went from 1280 to 1500 MiB/s (engine-seq, 16 MiB blobs; one core hashes 1710).
    /// The shard still decides: the record becomes visible only if this equals the
    /// declared digest.
    Finish([u8; 32]),
}

/// How a shard takes a new upload.
pub(crate) enum Accepted {
    /// Send the content.
    Streaming,
    /// The blob is already stored; nothing needs to be sent.
    AlreadyStored,
}

/// What every shard of one engine shares.
pub(crate) struct Shared {
    pub dir: PathBuf,
    pub nonce: u64,
    pub limits: PartitionLimits,
    /// The node-wide overflow pool every partition borrows from.
    pub pool: Arc<OverflowPool>,
    pub sync_interval: Option<Duration>,
    pub checkpoint_interval: Option<Duration>,
}

/// The work of one shard, to be run inside a glommio executor (the cache node runs
/// shard k on its core-k executor, next to that core's network tasks).
pub struct ShardRunner {
    pub(crate) shard: usize,
    pub(crate) partitions: Vec<u32>,
    pub(crate) requests: flume::Receiver<Request>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) ready: flume::Sender<Result<()>>,
    /// This shard's memory tier, which the `Engine` handle reads too.
    pub(crate) tier: SharedTier,
}

type Parts = Rc<HashMap<u32, Rc<Partition>>>;

impl ShardRunner {
    /// Recovers the shard's partitions, then serves requests until shutdown.
    pub async fn run(self) -> Result<()> {
        let recovered = match io::prime_iopoll_probe(&self.shared.dir, self.shard).await {
            Ok(()) => self.recover().await,
            Err(e) => Err(e),
        };
        let recovered = match recovered {
            Ok(parts) if self.shared.limits.durability == Durability::Sync => {
                sync_all(&parts).await.map(|()| parts)
            }
            other => other,
        };
        let parts = match recovered {
            Ok(p) => {
                let _ = self.ready.send(Ok(()));
                p
            }
            Err(e) => {
                let _ = self.ready.send(Err(e.clone()));
                return Err(e);
            }
        };
        // Dropping `stop` wakes the background loops, which then end.
        let (stop, stopped) = flume::bounded::<()>(1);
        let mut loops = Vec::new();
        let interval = match self.shared.limits.durability {
            Durability::Sync => None,
            Durability::Interval => self.shared.sync_interval,
        };
        if let Some(every) = interval {
            loops.push(
                io::spawn_joinable(sync_loop(parts.clone(), every, stopped.clone())).boxed_local(),
            );
        }
        if let Some(every) = self.shared.checkpoint_interval {
            loops.push(
                io::spawn_joinable(checkpoint_loop(parts.clone(), every, stopped)).boxed_local(),
            );
        }
        let mut reply_to = None;
        while let Ok(req) = self.requests.recv_async().await {
            if let Request::Shutdown { reply } = req {
                reply_to = Some(reply);
                break;
            }
            dispatch(&parts, req);
        }
        drop(stop);
        futures::future::join_all(loops).await;
        let result = checkpoint_all(&parts).await.and(sync_all(&parts).await);
        for part in parts.values() {
            part.close_files().await;
        }
        if let Some(reply) = reply_to {
            let _ = reply.send(result);
        }
        Ok(())
    }

    /// Recovers the shard's partitions concurrently, so that one partition's reads
    /// overlap with another's index building.
    async fn recover(&self) -> Result<Parts> {
        let recovered = futures::future::join_all(self.partitions.iter().map(|&p| async move {
            let started = std::time::Instant::now();
            let dir = self.shared.dir.join(format!("p{p:03}"));
            let limits = self.shared.limits.clone();
            let pool = self.shared.pool.clone();
            let nonce = self.shared.nonce;
            let res =
                crate::recover::recover(p, &dir, nonce, limits, pool, self.tier.clone(), true)
                    .await;
            (p, started, res)
        }))
        .await;
        let mut parts = HashMap::new();
        for (p, started, res) in recovered {
            let (part, report) = res?;
            part.counters.recovery.set(report);
            tracing::info!(
                shard = self.shard,
                partition = p,
                objects = part.st.borrow().index.len(),
                from_checkpoint = report.from_checkpoint,
                scanned = report.scanned_records,
                damaged = report.skipped_damaged,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "partition recovered"
            );
            parts.insert(p, part);
        }
        Ok(Rc::new(parts))
    }
}

async fn checkpoint_all(parts: &Parts) -> Result<()> {
    let mut result = Ok(());
    for part in parts.values() {
        if let Err(e) = part.write_checkpoint().await {
            tracing::error!(partition = part.id, "checkpoint failed: {e}");
            result = Err(e);
        }
    }
    result
}

/// Sleeps for `every`, or returns false at once when the shard is stopping.
async fn tick(every: Duration, stop: &flume::Receiver<()>) -> bool {
    let sleep = std::pin::pin!(io::sleep(every));
    let stopped = std::pin::pin!(stop.recv_async());
    matches!(
        futures::future::select(sleep, stopped).await,
        futures::future::Either::Left(_)
    )
}

/// Syncs every partition; the first failure wins (each failure is logged and refuses
/// its partition's writes, see `syncer.rs`).
async fn sync_all(parts: &Parts) -> Result<()> {
    let mut result = Ok(());
    for part in parts.values() {
        if let Err(e) = part.sync_dirty().await {
            result = result.and(Err(e));
        }
    }
    result
}

async fn sync_loop(parts: Parts, every: Duration, stop: flume::Receiver<()>) {
    while tick(every, &stop).await {
        // A failure is logged and counted by the syncer, and refuses later writes.
        let _ = sync_all(&parts).await;
    }
}

async fn checkpoint_loop(parts: Parts, every: Duration, stop: flume::Receiver<()>) {
    while tick(every, &stop).await {
        for part in parts.values() {
            if part.st.borrow().changes == 0 {
                continue;
            }
            if let Err(e) = part.write_checkpoint().await {
                tracing::error!(partition = part.id, "periodic checkpoint failed: {e}");
            }
        }
    }
}

fn partition(parts: &Parts, id: u32) -> Result<Rc<Partition>> {
    parts.get(&id).cloned().ok_or_else(|| {
        Error::new(
            crate::ErrorKind::Internal,
            format!("partition {id} routed to a shard that does not own it"),
        )
    })
}

/// Serves one request: the ones answered from memory at once, the others in a task of
/// their own. One task type per kind of request rather than one `handle` future for
/// all: a future is as large as its largest state (a streaming upload's), and every
/// spawn copied that whole size: 2.2% of the node's CPU under `cairn-bench --scenario
/// batch-small`, 0.6% with per-kind tasks.
fn dispatch(parts: &Parts, req: Request) {
    match req {
        Request::PutWhole {
            part,
            digest,
            key,
            data,
            reply,
        } => match partition(parts, part) {
            Ok(p) => io::spawn(async move {
                let _ = reply.send(put_whole(&p, digest, key, &data).await);
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        Request::Put {
            part,
            digest,
            key,
            chunks,
            accepted,
            done,
        } => match partition(parts, part) {
            Ok(p) => io::spawn(upload(p, digest, key, chunks, accepted, done)),
            Err(e) => {
                let _ = accepted.send(Err(e));
            }
        },
        Request::Missing { items, reply } => {
            let mut missing = Vec::new();
            let mut unsure = Vec::new();
            for (i, p, prefix, len) in items {
                match parts.get(&p).map(|p| p.holds_len(prefix, len)) {
                    Some(Some(true)) => {}
                    Some(None) => unsure.push(i),
                    Some(Some(false)) | None => missing.push(i),
                }
            }
            let _ = reply.send((missing, unsure));
        }
        Request::Holds { part, key, reply } => match partition(parts, part) {
            Ok(p) => io::spawn(async move {
                let _ = reply.send(p.holds(&key).await);
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        Request::Get {
            part,
            key,
            any_size,
            offset,
            limit,
            reply,
        } => {
            let parts = parts.clone();
            io::spawn(async move {
                let _ = reply.send(get(&parts, part, key, any_size, offset, limit).await);
            });
        }
        Request::AcPut {
            part,
            key,
            value,
            reply,
        } => match partition(parts, part) {
            Ok(p) => io::spawn(async move {
                let _ = reply.send(p.append(key, &value, false).await);
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        Request::Stats { reply } => {
            let _ = reply.send(parts.values().map(|p| p.stats()).collect());
        }
        Request::Checkpoint { reply } => {
            let parts = parts.clone();
            io::spawn(async move {
                let _ = reply.send(checkpoint_all(&parts).await);
            });
        }
        Request::ReplicationBatch {
            part,
            max_bytes,
            reply,
        } => match partition(parts, part) {
            Ok(p) => io::spawn(async move {
                let _ = reply.send(p.replication_batch(max_bytes).await);
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        Request::ReplicationOwed {
            part,
            max_bytes,
            reply,
        } => match partition(parts, part) {
            Ok(p) => io::spawn(async move {
                let _ = reply.send(p.replication_owed(max_bytes).await);
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        },
        Request::ReplicationDone { part, done, reply } => {
            let _ = reply.send(partition(parts, part).and_then(|p| p.replication_done(&done)));
        }
        Request::Shutdown { reply } => {
            let _ = reply.send(Ok(()));
        }
    }
}

async fn get(
    parts: &Parts,
    part: u32,
    key: Key,
    any_size: bool,
    offset: u64,
    limit: Option<u64>,
) -> Result<(u64, BlobStream)> {
    let p = partition(parts, part)?;
    match p.find(&key, any_size, offset, limit).await? {
        None => Err(Error::not_found("not found")),
        Some(Found::Whole(bytes, len)) => Ok((len, BlobStream::once(bytes))),
        Some(Found::Large(rec)) => {
            let len = rec.payload_len;
            let start = offset.min(len);
            let end = limit.map_or(len, |l| start.saturating_add(l).min(len));
            let (tx, rx) = flume::bounded(2);
            let owner = p.clone();
            io::spawn(async move { owner.stream_large(rec, start, end, tx).await });
            Ok((len, BlobStream::channel(rx)))
        }
    }
}

/// Stores a small blob given whole, after checking it against its digest.
async fn put_whole(part: &Partition, digest: Digest, key: Key, data: &[u8]) -> Result<()> {
    if part.holds(&key).await? {
        return Ok(());
    }
    verify_whole(digest, data)?;
    part.append(key, data, false).await
}

/// Checks a whole small blob's length and content against its digest.
fn verify_whole(digest: Digest, data: &[u8]) -> Result<()> {
    digest.check_sent(data.len() as u64, Digest::of(digest.function, data).hash)
}

/// Receives one upload. Small blobs are staged whole (bounded by `small_blob_max`) and
/// appended; larger ones stream into a reserved extent. A blob already stored is
/// acknowledged without being written again.
async fn upload(
    part: Rc<Partition>,
    digest: Digest,
    key: Key,
    chunks: flume::Receiver<UploadMsg>,
    accepted: oneshot::Sender<Result<Accepted>>,
    done: oneshot::Sender<Result<()>>,
) {
    match part.holds(&key).await {
        Ok(true) => {
            let _ = accepted.send(Ok(Accepted::AlreadyStored));
            return;
        }
        Ok(false) => {}
        Err(e) => {
            let _ = accepted.send(Err(e));
            return;
        }
    }
    if digest.size <= part.limits.small_blob_max {
        let _ = accepted.send(Ok(Accepted::Streaming));
        let res = upload_small(&part, digest, key, &chunks).await;
        if let Some(res) = res {
            let _ = done.send(res);
        }
        return;
    }
    let mut writer = match part.reserve_extent(key, digest.size).await {
        Ok(w) => {
            let _ = accepted.send(Ok(Accepted::Streaming));
            w
        }
        Err(e) => {
            let _ = accepted.send(Err(e));
            return;
        }
    };
    // Small blobs streamed in are gathered for the memory tier as they arrive, and
    // admitted once the digest matched and the record is committed; larger ones enter
    // on their second read (`memory_tier::ADMIT_AT_ONCE_MAX`).
    let mut gathered = part
        .tier
        .takes_written(digest.size)
        .then(|| BytesMut::with_capacity(digest.size as usize));
    loop {
        match chunks.recv_async().await {
            Ok(UploadMsg::Data(data)) => {
                if let Err(e) = writer.write(&data).await {
                    let _ = done.send(Err(e));
                    writer.abandon().await;
                    return;
                }
                if let Some(g) = gathered.as_mut() {
                    g.extend_from_slice(&data);
                }
            }
            Ok(UploadMsg::Finish(hash)) => {
                let result = writer.finish(hash).await;
                if let (Ok(loc), Some(g)) = (&result, gathered) {
                    if g.len() as u64 == digest.size {
                        part.admit(prefix(&key), *loc, key, digest.size, || g.freeze());
                    }
                }
                let _ = done.send(result.map(|_| ()));
                return;
            }
            // The client went away: the extent stays dead and invisible.
            Err(_) => {
                writer.abandon().await;
                return;
            }
        }
    }
}

/// Stages a small upload; `None` when the client abandoned it.
async fn upload_small(
    part: &Partition,
    digest: Digest,
    key: Key,
    chunks: &flume::Receiver<UploadMsg>,
) -> Option<Result<()>> {
    let mut buf = BytesMut::with_capacity(digest.size as usize);
    loop {
        match chunks.recv_async().await {
            Ok(UploadMsg::Data(data)) => {
                if buf.len() as u64 + data.len() as u64 > digest.size {
                    return Some(Err(Error::invalid(format!(
                        "upload is longer than its declared size of {} bytes",
                        digest.size
                    ))));
                }
                buf.extend_from_slice(&data);
            }
            Ok(UploadMsg::Finish(hash)) => {
                if let Err(e) = digest.check_sent(buf.len() as u64, hash) {
                    return Some(Err(e));
                }
                break;
            }
            Err(_) => return None,
        }
    }
    Some(part.append(key, &buf, false).await)
}
