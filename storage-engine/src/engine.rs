//! The `Engine` handle: `Send + Sync`, cheap to clone, usable from any thread.
//!
//! It routes each request to the shard owning the key's partition and awaits the reply
//! on a `Send` channel. Partitions are fixed when the data directory is created;
//! shards are not: partition p belongs to shard `p % shards`, so a restart with another
//! shard count simply hands whole partitions to different threads and finds every blob.

use crate::config::EngineConfig;
use crate::digest::{Digest, DigestFunction};
use crate::error::{Error, ErrorKind, Result};
use crate::format::{record_len, Key};
use crate::index::Prefix;
use crate::key::{ac_key, cas_key, partition_of, prefix};
use crate::manifest::Manifest;
use crate::memory_tier::SharedTier;
use crate::reader::slice;
use crate::reclaimer::OverflowPool;
use crate::replication::ReplicationBatch;
use crate::shard::{Accepted, Request, ShardRunner, Shared, UploadMsg};
use crate::stream::BlobStream;
use crate::upload_hash::UploadHasher;
use crate::{checks, io, PartitionStats, Stats};
use bytes::Bytes;
use futures::channel::oneshot;
use std::sync::{Arc, Mutex};

/// Capacity of each shard's request queue; senders wait when it is full.
const QUEUE_DEPTH: usize = 4096;
/// Chunks in flight between an `Upload` handle and its shard task.
const UPLOAD_DEPTH: usize = 4;

#[derive(Clone)]
pub struct Engine {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Vec<flume::Sender<Request>>,
    /// Each shard's memory tier. A hit is served on the calling thread: the hop to
    /// the owning shard and back (two cross-thread wake-ups) cost more than the rest
    /// of a small read; see bench/README.md "Memory tier".
    tiers: Vec<SharedTier>,
    /// Whether the tiers can hold anything (`memory_cache` above 0): if not, no read
    /// looks there.
    tiered: bool,
    partitions: u32,
    max_ac_value: u64,
    max_blob_size: u64,
    small_blob_max: u64,
    /// The overflow pool the partitions share, read for `stats`.
    pool: Arc<OverflowPool>,
    ready: Mutex<Option<(flume::Receiver<Result<()>>, usize)>>,
    threads: Mutex<Vec<io::ExecutorThread>>,
}

impl Engine {
    /// Opens (or creates) the data directory after the startup checks, and prepares one
    /// runner per shard. Nothing is served until the runners run inside glommio
    /// executors; `wait_ready` then reports whether every partition recovered.
    pub fn open(config: EngineConfig) -> Result<(Engine, Vec<ShardRunner>)> {
        checks::io_uring()?;
        if let Some(warning) = checks::memlock(config.shards) {
            tracing::warn!("{warning}");
        }
        let manifest = Manifest::load_or_create(&config.dir, config.partitions)?;
        if let Some(warning) = checks::data_dir(&config.dir)? {
            tracing::warn!("{warning}");
        }
        let limits = config.limits(manifest.partitions)?;
        let pool = Arc::new(OverflowPool::new(limits.overflow_pool));
        let shared = Arc::new(Shared {
            dir: config.dir.clone(),
            nonce: manifest.nonce,
            limits: limits.clone(),
            pool: pool.clone(),
            sync_interval: config.sync_interval,
            checkpoint_interval: config.checkpoint_interval,
        });
        // Empty at every start: what they would hold is read again from the log, verified.
        let tier_bytes = config.memory_cache / config.shards.max(1) as u64;
        let tiers: Vec<SharedTier> = (0..config.shards)
            .map(|_| SharedTier::new(tier_bytes))
            .collect();
        let (ready_tx, ready_rx) = flume::unbounded();
        let mut senders = Vec::new();
        let mut runners = Vec::new();
        for (shard, tier) in tiers.iter().enumerate() {
            let (tx, rx) = flume::bounded(QUEUE_DEPTH);
            senders.push(tx);
            runners.push(ShardRunner {
                shard,
                partitions: (0..manifest.partitions)
                    .filter(|p| *p as usize % config.shards == shard)
                    .collect(),
                requests: rx,
                shared: shared.clone(),
                ready: ready_tx.clone(),
                tier: tier.clone(),
            });
        }
        let engine = Engine {
            inner: Arc::new(Inner {
                shards: senders,
                tiers,
                tiered: tier_bytes > 0,
                partitions: manifest.partitions,
                max_ac_value: limits.max_ac_value,
                max_blob_size: limits.max_blob_size(),
                small_blob_max: limits.small_blob_max,
                pool,
                ready: Mutex::new(Some((ready_rx, config.shards))),
                threads: Mutex::new(Vec::new()),
            }),
        };
        Ok((engine, runners))
    }

    /// Opens the engine and runs each shard on an executor thread of its own; returns
    /// once every partition has recovered. For tests, benchmarks and tools; the cache
    /// node runs the shards on its own per-core executors instead.
    pub fn start(config: EngineConfig) -> Result<Engine> {
        let pin = config.pin_shards;
        let (engine, runners) = Engine::open(config)?;
        let mut threads = Vec::new();
        for runner in runners {
            let cpu = pin.then_some(runner.shard);
            let name = format!("cairn-shard-{}", runner.shard);
            threads.push(io::spawn_executor(&name, cpu, move || async move {
                if let Err(e) = runner.run().await {
                    tracing::error!("storage shard stopped: {e}");
                }
            })?);
        }
        if let Ok(mut t) = engine.inner.threads.lock() {
            *t = threads;
        }
        futures::executor::block_on(engine.wait_ready())?;
        Ok(engine)
    }

    /// Waits until every shard has recovered its partitions; the first failure wins.
    pub async fn wait_ready(&self) -> Result<()> {
        let taken = self.inner.ready.lock().ok().and_then(|mut r| r.take());
        let Some((rx, count)) = taken else {
            return Ok(());
        };
        for _ in 0..count {
            match rx.recv_async().await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e),
                Err(_) => return Err(Error::unavailable()),
            }
        }
        Ok(())
    }

    pub fn partitions(&self) -> u32 {
        self.inner.partitions
    }

    /// The largest CAS blob `begin_put` accepts (half of one partition's budget).
    pub fn max_blob_size(&self) -> u64 {
        self.inner.max_blob_size
    }

    /// The largest action-cache value `ac_put` accepts.
    pub fn max_ac_value(&self) -> u64 {
        self.inner.max_ac_value
    }

    fn route(&self, key: &Key) -> (u32, &flume::Sender<Request>) {
        let part = partition_of(key, self.inner.partitions);
        let shard = part as usize % self.inner.shards.len();
        (part, &self.inner.shards[shard])
    }

    /// The payload the memory tier of `key`'s shard holds for it, counted as a hit or
    /// a miss there; `None` also when the tier is off.
    fn held(&self, key: &Key, any_size: bool) -> Option<Bytes> {
        if !self.inner.tiered {
            return None;
        }
        let part = partition_of(key, self.inner.partitions);
        let shard = part as usize % self.inner.tiers.len();
        self.inner.tiers[shard]
            .lock()
            .get(part, prefix(key), key, any_size)
    }

    async fn call<T>(
        &self,
        tx: &flume::Sender<Request>,
        make: impl FnOnce(oneshot::Sender<T>) -> Request,
    ) -> Result<T> {
        let (reply, rx) = oneshot::channel();
        tx.send_async(make(reply))
            .await
            .map_err(|_| Error::unavailable())?;
        rx.await.map_err(|_| Error::unavailable())
    }

    /// Starts a streaming upload of a CAS blob with a declared digest. The content is
    /// verified as it streams; it becomes visible only when `Upload::finish` succeeds.
    pub async fn begin_put(&self, digest: Digest) -> Result<Upload> {
        if digest.is_empty_blob() {
            return Ok(Upload::already_stored());
        }
        if digest.size > self.inner.max_blob_size {
            return Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "blob {digest} is larger than the {}-byte limit of this cache",
                    self.inner.max_blob_size
                ),
            ));
        }
        let key = cas_key(&digest);
        let (part, tx) = self.route(&key);
        let (chunk_tx, chunk_rx) = flume::bounded(UPLOAD_DEPTH);
        let (done_tx, done_rx) = oneshot::channel();
        let accepted = self
            .call(tx, |accepted| Request::Put {
                part,
                digest,
                key,
                chunks: chunk_rx,
                accepted,
                done: done_tx,
            })
            .await??;
        Ok(match accepted {
            Accepted::AlreadyStored => Upload::already_stored(),
            Accepted::Streaming => Upload {
                chunks: Some((chunk_tx, UploadHasher::new(digest.function))),
                done: Some(done_rx),
                committed: 0,
            },
        })
    }

    /// Stores a CAS blob held in memory. A small one travels to its shard in a single
    /// message; a large one takes the streaming path.
    pub async fn put(&self, digest: Digest, data: Bytes) -> Result<()> {
        if data.len() as u64 != digest.size {
            return Err(Error::invalid(format!(
                "blob has {} bytes, not the {} its digest {digest} declares",
                data.len(),
                digest.size
            )));
        }
        if digest.size <= self.inner.small_blob_max && !digest.is_empty_blob() {
            let key = cas_key(&digest);
            let (part, tx) = self.route(&key);
            return self
                .call(tx, |reply| Request::PutWhole {
                    part,
                    digest,
                    key,
                    data,
                    reply,
                })
                .await?;
        }
        let mut upload = self.begin_put(digest).await?;
        upload.write(data).await?;
        upload.finish().await
    }

    pub async fn contains(&self, digest: Digest) -> Result<bool> {
        Ok(self.find_missing(vec![digest]).await?.is_empty())
    }

    /// Returns the digests that are not stored, in the order given. One request per
    /// shard, answered from the in-memory index alone, except for blobs of 2 GiB and
    /// more whose header is read (see `Loc::fits`). A right hash with a wrong size is
    /// missing.
    pub async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        let shards = self.inner.shards.len();
        let mut per_shard: Vec<Vec<(usize, u32, Prefix, u64)>> = vec![Vec::new(); shards];
        let mut keys: Vec<Vec<Key>> = vec![Vec::new(); shards];
        for (i, d) in digests.iter().enumerate() {
            if d.is_empty_blob() {
                continue;
            }
            let key = cas_key(d);
            let part = partition_of(&key, self.inner.partitions);
            let shard = part as usize % shards;
            per_shard[shard].push((i, part, prefix(&key), record_len(d.size)));
            keys[shard].push(key);
        }
        // What a shard's memory tier holds, its index holds too: a shard whose every
        // digest is in memory (an action result's outputs, read a moment ago) is not
        // asked at all.
        if self.inner.tiered {
            for ((items, keys), tier) in per_shard.iter_mut().zip(&keys).zip(&self.inner.tiers) {
                if items.is_empty() {
                    continue;
                }
                let tier = tier.lock();
                let mut keys = keys.iter();
                items.retain(|&(_, part, prefix, _)| {
                    keys.next()
                        .is_none_or(|key| !tier.holds_key(part, prefix, key))
                });
            }
        }
        let mut replies = Vec::new();
        for (shard, items) in per_shard.into_iter().enumerate() {
            if items.is_empty() {
                continue;
            }
            let (reply, rx) = oneshot::channel();
            self.inner.shards[shard]
                .send_async(Request::Missing { items, reply })
                .await
                .map_err(|_| Error::unavailable())?;
            replies.push(rx);
        }
        let mut missing = Vec::new();
        let mut unsure = Vec::new();
        for rx in replies {
            let (absent, unknown) = rx.await.map_err(|_| Error::unavailable())?;
            missing.extend(absent);
            unsure.extend(unknown);
        }
        for i in unsure {
            let key = cas_key(&digests[i]);
            let (part, tx) = self.route(&key);
            if !self
                .call(tx, |reply| Request::Holds { part, key, reply })
                .await??
            {
                missing.push(i);
            }
        }
        missing.sort_unstable();
        Ok(missing.into_iter().map(|i| digests[i]).collect())
    }

    /// Reads `[offset, offset + limit)` of a blob (to its end when `limit` is `None`).
    pub async fn get(&self, digest: Digest, offset: u64, limit: Option<u64>) -> Result<BlobStream> {
        if offset > digest.size {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("read offset {offset} is past the end of {digest}"),
            ));
        }
        if digest.is_empty_blob() {
            return Ok(BlobStream::once(Bytes::new()));
        }
        let key = cas_key(&digest);
        if let Some(payload) = self.held(&key, false) {
            return Ok(BlobStream::once(slice(payload, offset, limit)));
        }
        let (part, tx) = self.route(&key);
        self.call(tx, |reply| Request::Get {
            part,
            key,
            any_size: false,
            offset,
            limit,
            reply,
        })
        .await?
        .map(|(_, blob)| blob)
        .map_err(|e| match e.kind() {
            ErrorKind::NotFound => Error::not_found(format!("blob {digest} not found")),
            _ => e,
        })
    }

    /// Reads a whole CAS blob named by digest function and hash alone, as Bazel's HTTP
    /// cache protocol names them; the reply's digest carries the size the record
    /// holds. The index finds the blob without its size (see `key.rs`), so this is the
    /// same blob, present or absent, that `get` and `find_missing` see.
    pub async fn get_by_hash(
        &self,
        function: DigestFunction,
        hash: [u8; 32],
    ) -> Result<(Digest, BlobStream)> {
        let named = Digest {
            function,
            hash,
            size: 0,
        };
        if named.is_empty_blob() {
            return Ok((named, BlobStream::once(Bytes::new())));
        }
        let key = cas_key(&named);
        if let Some(payload) = self.held(&key, true) {
            let size = payload.len() as u64;
            return Ok((Digest { size, ..named }, BlobStream::once(payload)));
        }
        let (part, tx) = self.route(&key);
        let (size, blob) = self
            .call(tx, |reply| Request::Get {
                part,
                key,
                any_size: true,
                offset: 0,
                limit: None,
                reply,
            })
            .await?
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => {
                    Error::not_found(format!("blob {} not found", named.hash_hex()))
                }
                _ => e,
            })?;
        Ok((Digest { size, ..named }, blob))
    }

    /// Reads a whole blob into memory.
    pub async fn get_bytes(&self, digest: Digest) -> Result<Bytes> {
        self.get(digest, 0, None).await?.collect_bytes().await
    }

    /// Reads the action-cache value stored for `action` in `instance`.
    pub async fn ac_get(&self, instance: &str, action: Digest) -> Result<Bytes> {
        let key = ac_key(instance, &action);
        if let Some(value) = self.held(&key, false) {
            return Ok(value);
        }
        let (part, tx) = self.route(&key);
        let stream = self
            .call(tx, |reply| Request::Get {
                part,
                key,
                any_size: false,
                offset: 0,
                limit: None,
                reply,
            })
            .await?
            .map(|(_, blob)| blob)
            .map_err(|e| match e.kind() {
                ErrorKind::NotFound => {
                    Error::not_found(format!("no action result for {action} in {instance:?}"))
                }
                _ => e,
            })?;
        stream.collect_bytes().await
    }

    /// Stores an action-cache value; the newest value for a key wins, across restarts.
    pub async fn ac_put(&self, instance: &str, action: Digest, value: Bytes) -> Result<()> {
        if value.len() as u64 > self.inner.max_ac_value {
            return Err(Error::new(
                ErrorKind::ResourceExhausted,
                format!(
                    "action result of {} bytes exceeds the limit of {} bytes",
                    value.len(),
                    self.inner.max_ac_value
                ),
            ));
        }
        let key = ac_key(instance, &action);
        let (part, tx) = self.route(&key);
        self.call(tx, |reply| Request::AcPut {
            part,
            key,
            value,
            reply,
        })
        .await?
    }

    /// Usage and counters of every partition, and each shard's queue depth.
    pub async fn stats(&self) -> Result<Stats> {
        let mut partitions: Vec<PartitionStats> = Vec::new();
        let mut queue_depths = Vec::new();
        for tx in &self.inner.shards {
            queue_depths.push(tx.len() as u64);
            partitions.extend(self.call(tx, |reply| Request::Stats { reply }).await?);
        }
        let memory_tiers = (self.inner.tiers.iter().enumerate())
            .map(|(shard, tier)| tier.lock().stats(shard))
            .collect();
        partitions.sort_by_key(|p| p.partition);
        Ok(Stats {
            partitions,
            queue_depths,
            overflow_bytes: self.inner.pool.used(),
            overflow_pool_bytes: self.inner.pool.capacity,
            memory_tiers,
        })
    }

    /// The next finished records of `partition` that have not reached the slow tier,
    /// about `max_bytes` of them (requires `EngineConfig::replicate`).
    pub async fn replication_batch(
        &self,
        partition: u32,
        max_bytes: u64,
    ) -> Result<ReplicationBatch> {
        let tx = self.shard_of_partition(partition)?;
        self.call(tx, |reply| Request::ReplicationBatch {
            part: partition,
            max_bytes,
            reply,
        })
        .await?
    }

    /// Records of `partition` whose upload failed and that are still owed to the slow
    /// tier (see `ReplicationBatch::still_owed`), about `max_bytes` of them. Reporting
    /// the batch done clears those that went through.
    pub async fn replication_owed(
        &self,
        partition: u32,
        max_bytes: u64,
    ) -> Result<ReplicationBatch> {
        let tx = self.shard_of_partition(partition)?;
        self.call(tx, |reply| Request::ReplicationOwed {
            part: partition,
            max_bytes,
            reply,
        })
        .await?
    }

    /// Confirms that the records of `batch` reached the slow tier, but for those marked
    /// still owed: the others may now be evicted locally, and a restart will not offer
    /// them again.
    pub async fn replication_done(&self, batch: &ReplicationBatch) -> Result<()> {
        let tx = self.shard_of_partition(batch.partition)?;
        self.call(tx, |reply| Request::ReplicationDone {
            part: batch.partition,
            done: batch.settlement(),
            reply,
        })
        .await?
    }

    /// The key under which the action-cache value of `action` in `instance` is
    /// replicated: the same on every node.
    pub fn ac_object_key(instance: &str, action: &Digest) -> [u8; 32] {
        ac_key(instance, action).hash
    }

    fn shard_of_partition(&self, partition: u32) -> Result<&flume::Sender<Request>> {
        if partition >= self.inner.partitions {
            return Err(Error::invalid(format!("no partition {partition}")));
        }
        Ok(&self.inner.shards[partition as usize % self.inner.shards.len()])
    }

    /// Writes every partition's index checkpoint now.
    pub async fn checkpoint(&self) -> Result<()> {
        for tx in &self.inner.shards {
            self.call(tx, |reply| Request::Checkpoint { reply })
                .await??;
        }
        Ok(())
    }

    /// Writes every checkpoint and stops the shards. Uploads still in flight are
    /// abandoned (invisible). Threads started by `start` are joined.
    pub async fn shutdown(&self) -> Result<()> {
        let mut result = Ok(());
        for tx in &self.inner.shards {
            match self.call(tx, |reply| Request::Shutdown { reply }).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) | Err(e) => result = Err(e),
            }
        }
        let threads = self
            .inner
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            t.join();
        }
        result
    }
}

/// A streaming upload. Dropping it without `finish` abandons the upload.
///
/// It hashes what it sends, on the caller's core (see `UploadMsg::Finish`). For a
/// blob the engine already holds it sends nothing: the content is counted and dropped,
/// as storing it again would change nothing.
pub struct Upload {
    /// Where chunks go and the hash of those sent; `None` for a blob already stored.
    chunks: Option<(flume::Sender<UploadMsg>, UploadHasher)>,
    done: Option<oneshot::Receiver<Result<()>>>,
    committed: u64,
}

impl Upload {
    fn already_stored() -> Upload {
        Upload {
            chunks: None,
            done: None,
            committed: 0,
        }
    }

    /// Bytes accepted so far.
    pub fn committed(&self) -> u64 {
        self.committed
    }

    pub async fn write(&mut self, chunk: Bytes) -> Result<()> {
        let len = chunk.len() as u64;
        if let Some((tx, hasher)) = &mut self.chunks {
            hasher.update(&chunk).await;
            if tx.send_async(UploadMsg::Data(chunk)).await.is_err() {
                return Err(self.failure().await);
            }
        }
        self.committed += len;
        Ok(())
    }

    /// Completes the upload: the blob is verified, durable and visible when this
    /// returns `Ok`.
    pub async fn finish(mut self) -> Result<()> {
        if let Some((tx, hasher)) = self.chunks.take() {
            if tx
                .send_async(UploadMsg::Finish(hasher.finalize()))
                .await
                .is_err()
            {
                return Err(self.failure().await);
            }
        }
        match self.done.take() {
            Some(rx) => rx.await.map_err(|_| Error::unavailable())?,
            None => Ok(()),
        }
    }

    /// The error the shard reported after it stopped taking chunks.
    async fn failure(&mut self) -> Error {
        match self.done.take() {
            Some(rx) => match rx.await {
                Ok(Err(e)) => e,
                _ => Error::unavailable(),
            },
            None => Error::unavailable(),
        }
    }
}
