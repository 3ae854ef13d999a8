//! Read-through of blobs: a local miss is streamed from S3 to the client while it
//! populates the local log.
//!
//! One pass over the object feeds two consumers: the engine's upload and the reading
//! client, through a channel a few pieces deep, so a fetch holds a few pieces of memory
//! whatever the blob's size, and a slow client slows the fetch rather than growing a
//! buffer. The fetch checks the digest itself instead of relying on the engine's
//! verifying upload, so that a blob the engine cannot take (larger than its largest
//! blob, a budget held by not-yet-replicated data, a full disk) is still served,
//! verified, straight from S3, only not cached.
//!
//! The last piece a client would receive is held back until the whole object has been
//! read and its digest checked, and, when it is being cached, until the local copy is
//! durable. So a client never holds every byte of a blob whose copy in S3 is corrupt
//! (its stream ends in `NOT_FOUND`, which Bazel treats as a cache miss), and a client
//! that has every byte finds the blob locally on its next read. A ranged read trims
//! what is forwarded, but the fetch still reads the whole object, to verify and cache
//! it. A client that goes away does not stop the fetch: the local copy is still made.
//!
//! Concurrent misses for one blob share one fetch through the fetch table: the first
//! reader starts it and streams it, the others wait for its outcome and then read the
//! local copy, or get its error. A reader can miss locally just before a fetch stores
//! the blob and reach the table just after that fetch left it; so a fetch first looks
//! for a local copy, and serves that one when it finds it, rather than asking S3
//! again. An entry leaves the table when its fetch ends, however it ends, so the table
//! holds one entry per blob being fetched and nothing more.
//!
//! A miss waits on S3 for a bounded time: when S3 has not started answering within
//! `read_miss_timeout_ms` the client gets `NOT_FOUND`, as when the bucket lacks the
//! object, and the node counts S3 as unreachable. A hung S3 thus costs each miss that
//! long, not the client's whole deadline. Once the object streams, a pause longer than
//! `attempt_timeout_ms` ends the fetch (and the client's stream) the same way.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_s3::primitives::{ByteStream as S3Body, ByteStreamError};
use bytes::{Bytes, BytesMut};
use cairn_storage::{Digest, Engine};
use futures::future::{BoxFuture, FutureExt, Shared};
use futures::stream::{self, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use super::{SlowTier, Tier};
use crate::engine_errors::engine_error;
use crate::error::{Error, ErrorKind, Result};
use crate::store::{engine_stream, ByteStream};

/// Bytes forwarded to a client at a time, as much as one ByteStream ReadResponse
/// carries; S3 bodies arrive in much smaller and irregular pieces.
const PIECE: usize = 256 << 10;

/// Pieces queued for a client that reads slower than S3 sends.
const FORWARD_DEPTH: usize = 2;

/// Where a fetched and verified blob went.
#[derive(Debug, Clone, Copy)]
pub(super) enum Kept {
    /// Into the local engine: later reads are local.
    Locally,
    /// To the client only, because the local engine could not take it.
    PassedThrough,
}

/// A running fetch that other readers of the same blob wait for.
pub(super) type Fetch = Shared<BoxFuture<'static, Result<Kept>>>;

impl SlowTier {
    /// Streams `[offset, offset + limit)` of `digest` (to its end when `limit` is
    /// `None`) from the bucket, storing the whole blob locally on the way when the
    /// engine can take it. Concurrent calls for one digest share one fetch: the first
    /// streams it, the others wait for it to end and then read the local copy (or, when
    /// it could not be kept, fetch again for themselves). `NotFound` when the bucket does
    /// not hold the blob or cannot be reached; a stream that ends in `NotFound` when the
    /// object turns out to be corrupt.
    pub async fn read_blob(
        &self,
        digest: Digest,
        offset: u64,
        limit: Option<u64>,
    ) -> Result<ByteStream> {
        let range = Range::new(&digest, offset, limit);
        let role = {
            let mut fetches = self
                .tier
                .fetches
                .lock()
                .map_err(|_| Error::internal("the fetch table is poisoned"))?;
            match fetches.get(&digest) {
                Some(fetch) => Role::Follow(fetch.clone()),
                None => {
                    let (task, reader) = self.spawn_fetch(digest, range, true);
                    let fetch = async move {
                        task.await.unwrap_or_else(|error| {
                            Err(Error::internal(format!("the S3 fetch stopped: {error}")))
                        })
                    }
                    .boxed()
                    .shared();
                    fetches.insert(digest, fetch);
                    Role::Lead(reader)
                }
            }
        };
        let fetch = match role {
            Role::Follow(fetch) => fetch,
            Role::Lead(reader) => return reader.stream().await,
        };
        match fetch.await? {
            Kept::Locally => Ok(engine_stream(
                self.tier
                    .engine
                    .get(digest, offset, limit)
                    .await
                    .map_err(engine_error)?,
            )),
            Kept::PassedThrough => self.spawn_fetch(digest, range, false).1.stream().await,
        }
    }

    /// Starts fetching `digest` for a reader of `range`. A `shared` fetch is the one
    /// in the fetch table: it first looks for a copy stored since the reader missed,
    /// and removes itself from the table when it ends.
    fn spawn_fetch(
        &self,
        digest: Digest,
        range: Range,
        shared: bool,
    ) -> (JoinHandle<Result<Kept>>, Reader) {
        let (started_tx, started) = oneshot::channel();
        let (chunks_tx, chunks) = mpsc::channel(FORWARD_DEPTH);
        let forward = Forward {
            started: Some(started_tx),
            chunks: Some(chunks_tx),
            range,
            pending: None,
        };
        let tier = Arc::clone(&self.tier);
        let task = self.runtime.spawn(async move {
            let mut forward = forward;
            let entry = shared.then(|| TableEntry {
                tier: Arc::clone(&tier),
                digest,
            });
            let outcome = if entry.is_some() && stored_locally(&tier, digest).await {
                forward.local();
                Ok(Kept::Locally)
            } else {
                fetch(&tier, digest, &mut forward).await
            };
            // Leave the table before the client hears the outcome: a read that starts
            // after an earlier one ended must fetch anew, not be handed that result.
            drop(entry);
            forward.end(&outcome).await;
            outcome
        });
        let reader = Reader {
            started,
            chunks,
            engine: self.tier.engine.clone(),
            digest,
            range,
        };
        (task, reader)
    }
}

/// A fetch's place in the fetch table, given up when the fetch ends, also when its
/// task panics or is cancelled: an entry left behind would answer every later read of
/// the blob with that fetch's end.
struct TableEntry {
    tier: Arc<Tier>,
    digest: Digest,
}

impl Drop for TableEntry {
    fn drop(&mut self) {
        if let Ok(mut fetches) = self.tier.fetches.lock() {
            fetches.remove(&self.digest);
        }
    }
}

/// Whether the local engine holds `digest` now: stored by a fetch that ended after the
/// reader missed. An engine that cannot answer counts as not holding it.
async fn stored_locally(tier: &Tier, digest: Digest) -> bool {
    tier.engine.contains(digest).await.unwrap_or(false)
}

/// Where the bytes of a fetch that started come from.
enum Source {
    /// The object in S3, through the reader's channel.
    S3,
    /// The local engine, which stored the blob since the reader missed.
    Local,
}

/// What a reader does on a local miss.
enum Role {
    /// Streams the blob from the fetch it started.
    Lead(Reader),
    /// Waits for another reader's fetch of the blob.
    Follow(Fetch),
}

/// The part of a blob a client asked for, in blob offsets.
#[derive(Debug, Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
}

impl Range {
    fn new(digest: &Digest, offset: u64, limit: Option<u64>) -> Range {
        let start = offset.min(digest.size);
        let end = limit.map_or(digest.size, |limit| {
            start.saturating_add(limit).min(digest.size)
        });
        Range { start, end }
    }

    fn len(self) -> u64 {
        self.end - self.start
    }

    /// What of `piece`, which starts at `position` in the blob, lies in the range.
    fn trim(self, position: u64, piece: &Bytes) -> Bytes {
        let piece_end = position + piece.len() as u64;
        let from = self.start.clamp(position, piece_end) - position;
        let to = self.end.clamp(position, piece_end) - position;
        piece.slice(from as usize..to as usize)
    }
}

/// The reading client's end of a fetch.
struct Reader {
    started: oneshot::Receiver<Result<Source>>,
    chunks: mpsc::Receiver<Result<Bytes>>,
    engine: Engine,
    digest: Digest,
    range: Range,
}

impl Reader {
    /// Waits until S3 answered with the object, then streams the range (or reads it
    /// locally, when the fetch found the blob stored). The stream reports an error in
    /// place of whatever part of the range did not arrive, so a fetch that stops early
    /// never looks like a shorter blob.
    async fn stream(self) -> Result<ByteStream> {
        let source = self
            .started
            .await
            .unwrap_or_else(|_| Err(Error::internal("the S3 fetch stopped before it started")))?;
        if let Source::Local = source {
            let local = self
                .engine
                .get(self.digest, self.range.start, Some(self.range.len()))
                .await
                .map_err(engine_error)?;
            return Ok(engine_stream(local));
        }
        let expected = self.range.len();
        let pieces = stream::unfold(Some((self.chunks, 0u64)), move |state| async move {
            let (mut chunks, received) = state?;
            match chunks.recv().await {
                Some(Ok(piece)) => {
                    let received = received + piece.len() as u64;
                    Some((Ok(piece), Some((chunks, received))))
                }
                Some(Err(error)) => Some((Err(error), None)),
                None if received < expected => Some((
                    Err(Error::new(
                        ErrorKind::Unavailable,
                        "the S3 fetch stopped before the end of the blob",
                    )),
                    None,
                )),
                None => None,
            }
        });
        Ok(pieces.boxed())
    }
}

/// The fetch's end of the client's stream.
struct Forward {
    started: Option<oneshot::Sender<Result<Source>>>,
    chunks: Option<mpsc::Sender<Result<Bytes>>>,
    range: Range,
    /// The last piece trimmed to the range, held back until the blob is verified.
    pending: Option<Bytes>,
}

impl Forward {
    /// Tells the client that S3 holds the object and bytes will follow.
    fn start(&mut self) {
        if let Some(started) = self.started.take() {
            // A reader that stopped waiting is not a reason to stop the fetch.
            let _ = started.send(Ok(Source::S3));
        }
    }

    /// Tells the client to read the copy the local engine holds.
    fn local(&mut self) {
        if let Some(started) = self.started.take() {
            let _ = started.send(Ok(Source::Local));
        }
    }

    /// Forwards the piece held back so far and holds back the part of `piece` (which
    /// starts at `position` in the blob) that the client asked for, if any.
    async fn piece(&mut self, position: u64, piece: &Bytes) {
        let wanted = self.range.trim(position, piece);
        if wanted.is_empty() {
            return;
        }
        if let Some(previous) = self.pending.replace(wanted) {
            self.send(Ok(previous)).await;
        }
    }

    async fn send(&mut self, item: Result<Bytes>) {
        if let Some(chunks) = &self.chunks {
            if chunks.send(item).await.is_err() {
                // The client went away; the fetch goes on to make the local copy.
                self.chunks = None;
            }
        }
    }

    /// Releases the piece held back when the blob is verified, or ends the client's
    /// stream with the fetch's error.
    async fn end(mut self, outcome: &Result<Kept>) {
        match outcome {
            Ok(_) => {
                if let Some(last) = self.pending.take() {
                    self.send(Ok(last)).await;
                }
            }
            Err(error) => match self.started.take() {
                Some(started) => {
                    let _ = started.send(Err(error.clone()));
                }
                None => self.send(Err(error.clone())).await,
            },
        }
    }
}

/// Why a fetch served nothing verified.
enum Failure {
    Missing,
    Corrupt(String),
    Unreachable(String),
}

/// Fetches `digest`, forwarding all but the last piece, and records the outcome in the
/// metrics and the bucket index.
async fn fetch(tier: &Tier, digest: Digest, forward: &mut Forward) -> Result<Kept> {
    let key = tier.bucket.cas_key(&digest);
    let outcome = stream_object(tier, digest, &key, forward).await;
    if !matches!(outcome, Err(Failure::Unreachable(_))) {
        // S3 answered: a node that only reads learns this way that S3 is back.
        tier.status.reachable();
    }
    let result = match &outcome {
        Ok(Kept::Locally) => {
            tier.index.insert(digest);
            "hit"
        }
        Ok(Kept::PassedThrough) => {
            tier.index.insert(digest);
            "passthrough"
        }
        Err(Failure::Missing) => {
            tier.index.remove(&digest);
            "miss"
        }
        Err(Failure::Corrupt(why)) => {
            tier.index.remove(&digest);
            tracing::warn!("object {key} in the bucket is corrupt, ignoring it: {why}");
            "corrupt"
        }
        Err(Failure::Unreachable(why)) => {
            tier.status.unreachable(why);
            "error"
        }
    };
    tier.status.fetches.with_label_values(&[result]).inc();
    let outcome = outcome.map_err(|failure| match failure {
        Failure::Missing => Error::not_found(format!("blob {key} is neither local nor in S3")),
        Failure::Corrupt(why) => Error::not_found(format!(
            "blob {key} is not stored locally and its copy in S3 is corrupt: {why}"
        )),
        Failure::Unreachable(why) => Error::not_found(format!(
            "blob {key} is not stored locally and S3 cannot be reached: {why}"
        )),
    });
    outcome
}

/// Reads the object once, hashing it, writing it into a local upload while the engine
/// takes it, and forwarding the client's range.
async fn stream_object(
    tier: &Tier,
    digest: Digest,
    key: &str,
    forward: &mut Forward,
) -> std::result::Result<Kept, Failure> {
    let body = tokio::time::timeout(tier.config.read_miss_timeout(), tier.bucket.get(key))
        .await
        .map_err(|_| {
            Failure::Unreachable(format!(
                "GET {key}: no answer within {} ms",
                tier.config.read_miss_timeout_ms
            ))
        })?
        .map_err(|error| Failure::Unreachable(error.to_string()))?
        .ok_or(Failure::Missing)?;
    forward.start();
    let mut upload = match tier.engine.begin_put(digest).await {
        Ok(upload) => Some(upload),
        Err(error) => {
            not_kept(key, &error);
            None
        }
    };
    let mut pieces = Pieces::new(body, tier.config.attempt_timeout());
    let mut hasher = digest.function.hasher();
    let mut received = 0u64;
    while let Some(piece) = pieces
        .next()
        .await
        .map_err(|error| Failure::Unreachable(format!("reading {key}: {error}")))?
    {
        let position = received;
        received += piece.len() as u64;
        if received > digest.size {
            return Err(Failure::Corrupt(format!(
                "it is longer than {} bytes",
                digest.size
            )));
        }
        hasher.update(&piece);
        forward.piece(position, &piece).await;
        if let Some(local) = &mut upload {
            if let Err(error) = local.write(piece).await {
                not_kept(key, &error);
                upload = None;
            }
        }
    }
    if received != digest.size {
        return Err(Failure::Corrupt(format!(
            "it holds {received} bytes, not {}",
            digest.size
        )));
    }
    let hash = hasher.finalize();
    if hash != digest.hash {
        return Err(Failure::Corrupt(format!(
            "its content hashes to {}",
            hex::encode(hash)
        )));
    }
    let Some(upload) = upload else {
        return Ok(Kept::PassedThrough);
    };
    match upload.finish().await {
        Ok(()) => Ok(Kept::Locally),
        Err(error) => {
            not_kept(key, &error);
            Ok(Kept::PassedThrough)
        }
    }
}

fn not_kept(key: &str, error: &cairn_storage::Error) {
    tracing::info!("{key} is served from S3 without a local copy: {error}");
}

/// An object's bytes in pieces of [`PIECE`] bytes (the last one shorter), whatever
/// sizes the HTTP body arrives in.
struct Pieces {
    body: S3Body,
    buffer: BytesMut,
    ended: bool,
    /// Longest wait for the next bytes of the body.
    stall: Duration,
}

impl Pieces {
    fn new(body: S3Body, stall: Duration) -> Pieces {
        Pieces {
            body,
            buffer: BytesMut::new(),
            ended: false,
            stall,
        }
    }

    async fn next(&mut self) -> std::result::Result<Option<Bytes>, String> {
        self.buffer.reserve(PIECE.saturating_sub(self.buffer.len()));
        while !self.ended && self.buffer.len() < PIECE {
            let chunk = tokio::time::timeout(self.stall, self.body.try_next())
                .await
                .map_err(|_| format!("no bytes for {} ms", self.stall.as_millis()))?
                .map_err(|error: ByteStreamError| error.to_string())?;
            match chunk {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => self.ended = true,
            }
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let take = self.buffer.len().min(PIECE);
        Ok(Some(self.buffer.split_to(take).freeze()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cairn_storage::DigestFunction;

    fn range(size: usize, offset: u64, limit: Option<u64>) -> Range {
        let data = vec![7u8; size];
        Range::new(&Digest::of(DigestFunction::Sha256, &data), offset, limit)
    }

    #[test]
    fn a_range_is_clipped_to_the_blob() {
        let whole = range(100, 0, None);
        assert_eq!((whole.start, whole.end), (0, 100));
        let past = range(100, 90, Some(50));
        assert_eq!((past.start, past.end), (90, 100));
        let inside = range(100, 10, Some(20));
        assert_eq!(inside.len(), 20);
    }

    #[test]
    fn pieces_are_trimmed_to_the_range() {
        let inside = range(100, 10, Some(20));
        let piece = Bytes::from((0u8..40).collect::<Vec<_>>());
        assert_eq!(inside.trim(0, &piece), piece.slice(10..30));
        assert_eq!(inside.trim(25, &piece), piece.slice(0..5));
        assert!(inside.trim(30, &piece).is_empty());
        assert!(inside.trim(60, &piece).is_empty());
    }
}
