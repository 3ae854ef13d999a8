//! The uploader: copies every record the engine holds to the bucket, in log order.
//!
//! One task per partition asks the engine for the next batch of records past the
//! partition's replication cursor, uploads them (several at a time, bounded over all
//! partitions by `upload_concurrency`), and only then reports the batch done, which
//! moves and persists the cursor. The durable queue is therefore the local log
//! itself: nothing is copied into a separate queue, a crash replays at most the batch
//! in flight, and the engine refuses to evict a record the cursor has not passed.
//!
//! Failures come in two kinds ([`S3Error`]), handled differently:
//!
//! - **S3 unreachable** (no answer within the timeouts, no connection, 5xx): every
//!   request would fail alike, so the batch stops at the first such failure, is not
//!   reported done, and is retried whole with exponential backoff, while local writes
//!   carry on until the backlog fills the local budget. The node reports itself
//!   degraded.
//! - **An object rejected** (S3 answered, but refused that object, or answered in a
//!   way the SDK cannot read): the next object may well go through, so one such record
//!   must not hold back the rest of its partition for ever. The batch is reported done
//!   with that record marked still owed: the cursor moves past it, and the engine keeps
//!   the record's position in the persisted cursor, never evicts its segment, counts
//!   it in the backlog and offers it again through `Engine::replication_owed`. The
//!   partition retries its owed records on their own backoff, names each in a warning
//!   and in `cairn_s3_rejected_objects{key}`, and clears them once S3 takes them.
//!   A partition owes at most [`MAX_OWED`] records: an S3 that rejects everything
//!   (wrong credentials, a bucket policy) then stops the partition as an outage does,
//!   rather than growing the owed list without bound.
//!
//! Blobs the bucket index already knows (uploaded by another node, or read from S3
//! after a local miss and so written to the local log) are not uploaded again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_storage::{Digest, Replica, ReplicationBatch};
use futures::{stream, StreamExt, TryStreamExt};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::bucket::S3Error;
use super::Tier;

/// How long a partition with nothing to upload waits before looking again.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Records a partition may owe before a rejected record stops it like an outage.
/// Each costs a line in the partition's `replicated` file, rewritten at every batch.
const MAX_OWED: usize = 64;

/// Starts one upload task per partition on the current tokio runtime.
pub fn start(tier: Arc<Tier>) {
    let permits = Arc::new(Semaphore::new(tier.config.upload_concurrency));
    for partition in 0..tier.engine.partitions() {
        let tier = Arc::clone(&tier);
        let permits = Arc::clone(&permits);
        tokio::spawn(async move { replicate_partition(tier, permits, partition).await });
    }
}

/// When a partition next retries the records it owes.
struct OwedRetry {
    /// `None` while the partition owes nothing.
    due: Option<Instant>,
    /// Rounds of retries in a row that left a record owed.
    failures: u32,
}

impl OwedRetry {
    fn is_due(&self) -> bool {
        self.due.is_some_and(|due| due <= Instant::now())
    }

    fn failed(&mut self, tier: &Tier) {
        self.failures = self.failures.saturating_add(1);
        self.due = Some(Instant::now() + tier.config.backoff(self.failures));
    }
}

async fn replicate_partition(tier: Arc<Tier>, permits: Arc<Semaphore>, partition: u32) {
    let mut failures = 0u32;
    // Records owed before a restart are retried at once.
    let mut owed = OwedRetry {
        due: Some(Instant::now()),
        failures: 0,
    };
    loop {
        if owed.is_due() {
            match retry_owed(&tier, &permits, partition, owed.failures + 1).await {
                Ok(Retried::Nothing) => {
                    owed.due = None;
                    owed.failures = 0;
                }
                Ok(Retried::AllTaken) => {
                    owed.due = Some(Instant::now());
                    owed.failures = 0;
                }
                Ok(Retried::SomeRejected) => owed.failed(&tier),
                Err(error) => {
                    failed(&tier, partition, owed.failures + 1, &error);
                    owed.failed(&tier);
                }
            }
        }
        match next_batch(&tier, &permits, partition).await {
            Ok(done) => {
                failures = 0;
                if done.rejected && owed.due.is_none() {
                    owed.failed(&tier);
                }
                if !done.work {
                    tokio::time::sleep(IDLE_POLL).await;
                }
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                failed(&tier, partition, failures, &error);
                tokio::time::sleep(tier.config.backoff(failures)).await;
            }
        }
    }
}

/// Records a batch that will be retried whole.
fn failed(tier: &Tier, partition: u32, attempt: u32, error: &S3Error) {
    tier.status.upload_failures.inc();
    if error.is_unreachable() {
        tier.status.unreachable(error);
    }
    tracing::warn!(
        "replication of partition {partition} failed (attempt {attempt}), retrying: {error}"
    );
}

/// What a batch of new records did.
struct Done {
    /// The batch held records.
    work: bool,
    /// Some of them are now owed.
    rejected: bool,
}

/// Uploads the next batch of `partition`.
async fn next_batch(tier: &Tier, permits: &Semaphore, partition: u32) -> Result<Done, S3Error> {
    let mut batch: ReplicationBatch = tier
        .engine
        .replication_batch(partition, tier.config.batch_size.0)
        .await
        .map_err(|error| S3Error::rejected(format!("reading the replication batch: {error}")))?;
    let work = !batch.is_empty();
    let rejected = upload_all(tier, permits, &batch.replicas).await?;
    if batch.owed_records() + rejected.len() > MAX_OWED {
        let (_, error) = &rejected[0];
        return Err(S3Error::rejected(format!(
            "partition {partition} already owes {} records S3 rejected; the latest: {error}",
            batch.owed_records()
        )));
    }
    for (index, error) in &rejected {
        owe(tier, &mut batch, *index, 1, error);
    }
    tier.engine
        .replication_done(&batch)
        .await
        .map_err(|error| S3Error::rejected(format!("recording replication progress: {error}")))?;
    if work {
        tier.status.reachable();
    }
    Ok(Done {
        work,
        rejected: !rejected.is_empty(),
    })
}

/// What a retry of owed records did.
enum Retried {
    /// The partition owed nothing.
    Nothing,
    /// S3 took every record retried (more may be owed).
    AllTaken,
    /// S3 still rejects some.
    SomeRejected,
}

/// Uploads records `partition` owes; `attempt` counts the rounds so far.
async fn retry_owed(
    tier: &Tier,
    permits: &Semaphore,
    partition: u32,
    attempt: u32,
) -> Result<Retried, S3Error> {
    let mut batch = tier
        .engine
        .replication_owed(partition, tier.config.batch_size.0)
        .await
        .map_err(|error| S3Error::rejected(format!("reading the owed records: {error}")))?;
    if batch.is_empty() && batch.owed_records() == 0 {
        return Ok(Retried::Nothing);
    }
    let rejected = upload_all(tier, permits, &batch.replicas).await?;
    for (index, error) in &rejected {
        owe(tier, &mut batch, *index, attempt + 1, error);
    }
    tier.engine
        .replication_done(&batch)
        .await
        .map_err(|error| S3Error::rejected(format!("recording replication progress: {error}")))?;
    tier.status.reachable();
    Ok(if rejected.is_empty() {
        Retried::AllTaken
    } else {
        Retried::SomeRejected
    })
}

/// Marks `batch.replicas[index]`, which S3 rejected, as still owed, and says so.
fn owe(tier: &Tier, batch: &mut ReplicationBatch, index: usize, attempt: u32, error: &S3Error) {
    batch.still_owed(index);
    let key = object_key(tier, &batch.replicas[index]);
    tier.status.upload_failures.inc();
    tier.status.rejected(&key);
    tracing::warn!(
        "S3 rejected {key} (attempt {attempt}); replication goes on past it and retries it: \
         {error}"
    );
}

/// Uploads `replicas`; the index and error of each one S3 rejected. Stops at the first
/// failure that says S3 is unreachable.
async fn upload_all(
    tier: &Tier,
    permits: &Semaphore,
    replicas: &[Replica],
) -> Result<Vec<(usize, S3Error)>, S3Error> {
    let mut uploads = stream::iter(replicas.iter().cloned().enumerate())
        .map(|(index, replica)| async move {
            let _permit = permits
                .acquire()
                .await
                .map_err(|_| S3Error::unreachable("the upload limiter closed"))?;
            Ok::<_, S3Error>((index, upload(tier, replica).await))
        })
        .buffer_unordered(tier.config.upload_concurrency);
    let mut rejected = Vec::new();
    while let Some(uploaded) = uploads.next().await {
        match uploaded? {
            (_, Ok(())) => {}
            (_, Err(error)) if error.is_unreachable() => return Err(error),
            (index, Err(error)) => rejected.push((index, error)),
        }
    }
    Ok(rejected)
}

/// The object key `replica` is uploaded under.
fn object_key(tier: &Tier, replica: &Replica) -> String {
    match replica {
        Replica::Blob { digest, .. } => tier.bucket.cas_key(digest),
        Replica::ActionResult { key, .. } => tier.bucket.ac_key(key),
    }
}

async fn upload(tier: &Tier, replica: Replica) -> Result<(), S3Error> {
    let key = object_key(tier, &replica);
    match replica {
        Replica::Blob { digest, data } => {
            if tier.index.contains(&digest) {
                tier.status.accepted(&key);
                return Ok(());
            }
            upload_blob(tier, &key, digest, data).await?;
            tier.index.insert(digest);
            tier.status.uploads.with_label_values(&["cas"]).inc();
            tier.status.uploaded_bytes.inc_by(digest.size);
        }
        Replica::ActionResult { value, .. } => {
            let size = value.len() as u64;
            tier.bucket.put(&key, value).await?;
            tier.status.uploads.with_label_values(&["ac"]).inc();
            tier.status.uploaded_bytes.inc_by(size);
        }
    }
    tier.status.accepted(&key);
    Ok(())
}

async fn upload_blob(
    tier: &Tier,
    key: &str,
    digest: Digest,
    data: Option<Bytes>,
) -> Result<(), S3Error> {
    let unreadable = move |error: cairn_storage::Error| {
        S3Error::rejected(format!("reading {digest} to upload it: {error}"))
    };
    let multipart = digest.size > tier.config.multipart_threshold.0;
    match (data, multipart) {
        (Some(data), false) => tier.bucket.put(key, data).await,
        (Some(data), true) => {
            tier.bucket
                .put_multipart(key, stream::iter([Ok::<Bytes, S3Error>(data)]))
                .await
        }
        (None, false) => {
            let data = tier.engine.get_bytes(digest).await.map_err(unreadable)?;
            tier.bucket.put(key, data).await
        }
        (None, true) => {
            let blob = tier.engine.get(digest, 0, None).await.map_err(unreadable)?;
            tier.bucket
                .put_multipart(key, blob.map_err(unreadable))
                .await
        }
    }
}
