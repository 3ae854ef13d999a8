//! The node's view of the storage engine: the rules every protocol shares.
//!
//! gRPC and HTTP both read and write through a [`Store`], so the protocol-independent
//! rules live here once: the empty blob exists for every digest function without ever
//! being stored; action-cache keys ignore the action digest's size, because Bazel's
//! HTTP protocol names actions by hash alone and both protocols must see the same
//! entries; lookups count as hits or misses in the metrics. With a slow tier (S3)
//! configured, a local miss falls through to it here, once for every protocol, and
//! existence questions also count what the bucket index knows the bucket holds.
//! A node started with `--sink` sends the data calls to a [`Sink`] in memory instead
//! of the engine, to measure the network stack alone.

use std::sync::Arc;

use bytes::Bytes;
use cairn_storage::{BlobStream, Digest, DigestFunction, Engine, ErrorKind};
use futures::stream::{self, BoxStream, StreamExt, TryStreamExt};

use crate::engine_errors::engine_error;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::sink::{Sink, SinkUpload};
use crate::slow_tier::SlowTier;

/// Limits advertised in the capabilities and enforced by every service.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Largest total of blob bytes in one batch call.
    pub max_batch_total_size: u64,
    /// Largest blob accepted.
    pub max_cas_blob_size: u64,
}

/// The engine plus the rules shared by all protocols. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    engine: Engine,
    limits: Limits,
    metrics: Arc<Metrics>,
    slow_tier: Option<SlowTier>,
    sink: Option<Sink>,
}

/// A stream of a blob's bytes.
pub type ByteStream = BoxStream<'static, Result<Bytes>>;

impl Store {
    /// A store over `engine`.
    pub fn new(engine: Engine, limits: Limits, metrics: Arc<Metrics>) -> Self {
        Self {
            engine,
            limits,
            metrics,
            slow_tier: None,
            sink: None,
        }
    }

    /// This store with its data calls sent to `sink` instead of the engine.
    pub fn with_sink(mut self, sink: Sink) -> Self {
        self.sink = Some(sink);
        self
    }

    /// This store with `slow_tier` behind its engine.
    pub fn with_slow_tier(mut self, slow_tier: SlowTier) -> Self {
        self.slow_tier = Some(slow_tier);
        self
    }

    /// The slow tier, when one is configured.
    pub fn slow_tier(&self) -> Option<&SlowTier> {
        self.slow_tier.as_ref()
    }

    /// The limits every service enforces.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The metrics every service updates.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The metrics, for work that outlives a request (downloads).
    pub fn metrics_handle(&self) -> Arc<Metrics> {
        Arc::clone(&self.metrics)
    }

    /// The engine itself, for statistics.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Rejects blobs over the advertised maximum size.
    pub fn check_blob_size(&self, digest: &Digest) -> Result<()> {
        if digest.size > self.limits.max_cas_blob_size {
            return Err(Error::invalid_argument(format!(
                "blob {}/{} is larger than max_cas_blob_size_bytes ({})",
                digest.hash_hex(),
                digest.size,
                self.limits.max_cas_blob_size
            )));
        }
        Ok(())
    }

    /// Whether the CAS holds `digest`.
    pub async fn contains(&self, digest: Digest) -> Result<bool> {
        if is_empty(&digest) {
            return Ok(true);
        }
        let found = match &self.sink {
            Some(sink) => sink.contains(digest),
            None => {
                self.engine.contains(digest).await.map_err(engine_error)?
                    || self.in_slow_tier(&digest)
            }
        };
        self.metrics.lookup("cas", found);
        Ok(found)
    }

    /// The digests among `digests` that the CAS does not hold.
    pub async fn find_missing(&self, digests: Vec<Digest>) -> Result<Vec<Digest>> {
        let asked: Vec<Digest> = digests.into_iter().filter(|d| !is_empty(d)).collect();
        let count = asked.len();
        let mut missing = if asked.is_empty() {
            Vec::new()
        } else if let Some(sink) = &self.sink {
            sink.find_missing(asked)
        } else {
            self.engine
                .find_missing(asked)
                .await
                .map_err(engine_error)?
        };
        missing.retain(|digest| !self.in_slow_tier(digest));
        self.metrics
            .lookups("cas", count - missing.len(), missing.len());
        Ok(missing)
    }

    /// Starts an upload of `digest`.
    pub async fn begin_put(&self, digest: Digest) -> Result<Upload> {
        self.check_blob_size(&digest)?;
        let upload = match &self.sink {
            Some(sink) => Upload(UploadTo::Sink(sink.begin_put(digest))),
            None => Upload(UploadTo::Engine(
                self.engine.begin_put(digest).await.map_err(engine_error)?,
            )),
        };
        Ok(upload)
    }

    /// Stores a blob already held in memory, after checking that it matches `digest`.
    /// The engine checks what it stores itself; hashing here as well made every small
    /// blob hash twice, 17% of the node's CPU under `cairn-bench --scenario batch-small`.
    pub async fn put(&self, digest: Digest, data: Bytes) -> Result<()> {
        self.check_blob_size(&digest)?;
        let size = data.len() as u64;
        match &self.sink {
            Some(sink) => {
                let actual = Digest::of(digest.function, &data);
                if actual != digest {
                    return Err(Error::invalid_argument(format!(
                        "data does not match digest {}/{}: it hashes to {}/{}",
                        digest.hash_hex(),
                        digest.size,
                        actual.hash_hex(),
                        actual.size
                    )));
                }
                if !is_empty(&digest) {
                    sink.put(digest, vec![data]);
                }
            }
            None => self.engine.put(digest, data).await.map_err(engine_error)?,
        }
        self.metrics.bytes_received(size);
        Ok(())
    }

    /// Streams `digest` from `offset`, at most `limit` bytes.
    pub async fn get(&self, digest: Digest, offset: u64, limit: Option<u64>) -> Result<ByteStream> {
        if offset > digest.size {
            return Err(Error::out_of_range(format!(
                "read offset {offset} is past the end of blob {}/{}",
                digest.hash_hex(),
                digest.size
            )));
        }
        if is_empty(&digest) {
            return Ok(stream::empty().boxed());
        }
        if let Some(sink) = &self.sink {
            let chunks = sink.get(digest, offset, limit);
            self.metrics.lookup("cas", chunks.is_some());
            let chunks = chunks.ok_or_else(|| not_found(&digest))?;
            let metrics = Arc::clone(&self.metrics);
            return Ok(stream::iter(chunks)
                .map(move |chunk| {
                    metrics.bytes_sent(chunk.len() as u64);
                    Ok(chunk)
                })
                .boxed());
        }
        let found = self.read(digest, offset, limit).await;
        self.metrics.lookup("cas", found.is_ok());
        let metrics = Arc::clone(&self.metrics);
        Ok(found?
            .map(move |chunk| {
                let chunk = chunk?;
                metrics.bytes_sent(chunk.len() as u64);
                Ok(chunk)
            })
            .boxed())
    }

    /// A whole blob, for callers that bound its size themselves.
    pub async fn get_bytes(&self, digest: Digest) -> Result<Bytes> {
        if is_empty(&digest) {
            return Ok(Bytes::new());
        }
        let data = if let Some(sink) = &self.sink {
            let data = sink.get_bytes(digest);
            self.metrics.lookup("cas", data.is_some());
            data.ok_or_else(|| not_found(&digest))?
        } else {
            let found = self.read(digest, 0, None).await;
            self.metrics.lookup("cas", found.is_ok());
            collect(found?).await?
        };
        self.metrics.bytes_sent(data.len() as u64);
        Ok(data)
    }

    /// The action-cache entry of `action` in `instance`.
    pub async fn ac_get(&self, instance: &str, action: Digest) -> Result<Bytes> {
        let found = self.ac_read(instance, ac_key(action)).await;
        self.metrics.lookup("ac", found.is_ok());
        found
    }

    /// Stores the action-cache entry of `action` in `instance`.
    pub async fn ac_put(&self, instance: &str, action: Digest, value: Bytes) -> Result<()> {
        self.ac_write(instance, ac_key(action), value).await
    }

    /// The Remote Asset mapping stored under `key` in `instance` (see
    /// [`crate::grpc_asset`]); kept beside action results, so it is replicated and
    /// fetched from the slow tier like them.
    pub async fn asset_get(&self, instance: &str, key: [u8; 32]) -> Result<Bytes> {
        self.ac_read(instance, asset_key(key)).await
    }

    /// Stores the Remote Asset mapping `value` under `key` in `instance`.
    pub async fn asset_put(&self, instance: &str, key: [u8; 32], value: Bytes) -> Result<()> {
        self.ac_write(instance, asset_key(key), value).await
    }
}

impl Store {
    /// The whole blob named by its hash alone (Bazel's HTTP protocol names blobs so),
    /// with its full digest. The engine finds a CAS blob by hash without its size, and
    /// the slow tier's bucket index is keyed by hash too, so this is the blob gRPC sees
    /// under (hash, size), present or absent alike.
    pub async fn get_by_hash(
        &self,
        function: DigestFunction,
        hash: &str,
    ) -> Result<(Digest, ByteStream)> {
        match self.locate_by_hash(function, hash).await? {
            (digest, Some(local)) => Ok((digest, local)),
            (digest, None) => Ok((digest, self.get(digest, 0, None).await?)),
        }
    }

    /// The digest of the blob whose hash is `hash`, without reading it: a blob held only
    /// by the slow tier is answered from the bucket index, not fetched (HTTP `HEAD`).
    pub async fn digest_by_hash(&self, function: DigestFunction, hash: &str) -> Result<Digest> {
        Ok(self.locate_by_hash(function, hash).await?.0)
    }

    /// The digest of the blob whose hash is `hash`, with its bytes when the engine
    /// holds it (the engine finds a record by hash only by opening it).
    async fn locate_by_hash(
        &self,
        function: DigestFunction,
        hash: &str,
    ) -> Result<(Digest, Option<ByteStream>)> {
        let named = Digest::from_hex(function, hash, 0).map_err(engine_error)?;
        if is_empty(&named) {
            return Ok((named, Some(stream::empty().boxed())));
        }
        if let Some(sink) = &self.sink {
            let held = sink.find_by_hash(&named);
            return Ok((held.ok_or_else(|| not_found(&named))?, None));
        }
        let digest = match self.engine.get_by_hash(function, named.hash).await {
            Ok((digest, blob)) => {
                self.metrics.lookup("cas", true);
                let metrics = Arc::clone(&self.metrics);
                let blob = engine_stream(blob)
                    .map(move |chunk| {
                        let chunk = chunk?;
                        metrics.bytes_sent(chunk.len() as u64);
                        Ok(chunk)
                    })
                    .boxed();
                return Ok((digest, Some(blob)));
            }
            Err(e) if e.kind() == ErrorKind::NotFound => self
                .slow_tier
                .as_ref()
                .and_then(|slow_tier| slow_tier.find_by_hash(function, &named.hash)),
            Err(e) => return Err(engine_error(e)),
        };
        match digest {
            Some(digest) => Ok((digest, None)),
            None => {
                self.metrics.lookup("cas", false);
                Err(not_found(&named))
            }
        }
    }
}

impl Store {
    /// Whether the slow tier is known to hold `digest`, without asking it.
    fn in_slow_tier(&self, digest: &Digest) -> bool {
        self.slow_tier
            .as_ref()
            .is_some_and(|slow_tier| slow_tier.holds(digest))
    }

    /// Reads a blob locally; a local miss is streamed from the slow tier.
    async fn read(&self, digest: Digest, offset: u64, limit: Option<u64>) -> Result<ByteStream> {
        match (
            self.engine.get(digest, offset, limit).await,
            &self.slow_tier,
        ) {
            (Err(error), Some(slow_tier)) if error.kind() == ErrorKind::NotFound => {
                slow_tier.read_blob(digest, offset, limit).await
            }
            (found, _) => Ok(engine_stream(found.map_err(engine_error)?)),
        }
    }

    /// Reads an action-cache value locally, else from the slow tier.
    async fn ac_read(&self, instance: &str, key: Digest) -> Result<Bytes> {
        if let Some(sink) = &self.sink {
            return sink
                .ac_get(instance, key)
                .ok_or_else(|| Error::not_found("no action-cache entry for this key"));
        }
        match (self.engine.ac_get(instance, key).await, &self.slow_tier) {
            (Err(error), Some(slow_tier)) if error.kind() == ErrorKind::NotFound => {
                slow_tier.fetch_action_result(instance, key).await
            }
            (found, _) => Ok(found.map_err(engine_error)?),
        }
    }
}

impl Store {
    /// Writes an action-cache value to the engine, or to the sink.
    async fn ac_write(&self, instance: &str, key: Digest, value: Bytes) -> Result<()> {
        if let Some(sink) = &self.sink {
            sink.ac_put(instance, key, value);
            return Ok(());
        }
        self.engine
            .ac_put(instance, key, value)
            .await
            .map_err(engine_error)
    }
}

/// A streaming upload started by [`Store::begin_put`]. Dropping it without `finish`
/// abandons the upload.
pub struct Upload(UploadTo);

enum UploadTo {
    Engine(cairn_storage::Upload),
    Sink(SinkUpload),
}

impl Upload {
    /// Bytes accepted so far.
    pub fn committed(&self) -> u64 {
        match &self.0 {
            UploadTo::Engine(upload) => upload.committed(),
            UploadTo::Sink(upload) => upload.committed(),
        }
    }

    /// Appends `chunk` to the blob.
    pub async fn write(&mut self, chunk: Bytes) -> cairn_storage::Result<()> {
        match &mut self.0 {
            UploadTo::Engine(upload) => upload.write(chunk).await,
            UploadTo::Sink(upload) => {
                upload.write(chunk).await;
                Ok(())
            }
        }
    }

    /// Completes the upload: the blob is verified, durable and visible when this
    /// returns `Ok` (in a sink: verified and visible).
    pub async fn finish(self) -> cairn_storage::Result<()> {
        match self.0 {
            UploadTo::Engine(upload) => upload.finish().await,
            UploadTo::Sink(upload) => upload.finish(),
        }
    }
}

/// A stream of the engine's chunks with the crate's errors.
pub(crate) fn engine_stream(blob: BlobStream) -> ByteStream {
    blob.map_err(engine_error).boxed()
}

/// Reads a whole stream into one buffer.
async fn collect(blob: ByteStream) -> Result<Bytes> {
    let chunks: Vec<Bytes> = blob.try_collect().await?;
    Ok(match <[Bytes; 1]>::try_from(chunks) {
        Ok([only]) => only,
        Err(chunks) => Bytes::from(chunks.concat()),
    })
}

/// The error for a blob that is not stored.
fn not_found(digest: &Digest) -> Error {
    Error::not_found(format!(
        "blob {}/{} not found",
        digest.hash_hex(),
        digest.size
    ))
}

/// Whether `digest` is the empty blob of its function.
pub fn is_empty(digest: &Digest) -> bool {
    digest.size == 0 && *digest == Digest::empty(digest.function)
}

/// The action-cache key of a Remote Asset mapping. Its size, 2^63, is one no action
/// key has: [`ac_key`] makes every action's size 0, and a wire digest's size is at
/// most `i64::MAX` anyway; so no action result and no mapping ever share a key,
/// whatever hashes a client sends.
fn asset_key(hash: [u8; 32]) -> Digest {
    Digest {
        function: DigestFunction::Sha256,
        hash,
        size: 1 << 63,
    }
}

/// The action-cache key: the action's hash without its size, so that an action named
/// by hash alone (HTTP) and by full digest (gRPC) is one entry.
fn ac_key(action: Digest) -> Digest {
    Digest { size: 0, ..action }
}
