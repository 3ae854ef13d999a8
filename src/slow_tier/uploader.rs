//! The uploader: copies every record the engine holds to the bucket, in log order.
//!
//! One task per partition asks the engine for the next batch of records past the
//! partition's replication cursor, uploads them (several at a time, bounded over all
//! partitions by `upload_concurrency`), and only then reports the batch done, which
//! moves and persists the cursor. The durable queue is therefore the local log
//! itself: nothing is copied into a separate queue, a crash replays at most the batch
//! in flight, and the engine refuses to evict a record the cursor has not passed. When
//! S3 fails, the batch is retried for ever with exponential backoff while local
//! writes carry on, until the backlog fills the local budget.
//!
//! Blobs the bucket index already knows (uploaded by another node, or read from S3
//! after a local miss and so written to the local log) are not uploaded again.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cairn_storage::{Digest, Replica, ReplicationBatch};
use futures::{stream, StreamExt, TryStreamExt};
use tokio::sync::Semaphore;

use super::bucket::S3Error;
use super::Tier;

/// How long a partition with nothing to upload waits before looking again.
const IDLE_POLL: Duration = Duration::from_millis(200);

/// Starts one upload task per partition on the current tokio runtime.
pub fn start(tier: Arc<Tier>) {
    let permits = Arc::new(Semaphore::new(tier.config.upload_concurrency));
    for partition in 0..tier.engine.partitions() {
        let tier = Arc::clone(&tier);
        let permits = Arc::clone(&permits);
        tokio::spawn(async move { replicate_partition(tier, permits, partition).await });
    }
}

async fn replicate_partition(tier: Arc<Tier>, permits: Arc<Semaphore>, partition: u32) {
    let mut failures = 0u32;
    loop {
        match next_batch(&tier, &permits, partition).await {
            Ok(true) => failures = 0,
            Ok(false) => {
                failures = 0;
                tokio::time::sleep(IDLE_POLL).await;
            }
            Err(error) => {
                failures = failures.saturating_add(1);
                tier.status.upload_failures.inc();
                tier.status.unreachable(&error);
                tracing::warn!(
                    "replication of partition {partition} failed (attempt {failures}), retrying: {error}"
                );
                tokio::time::sleep(tier.config.backoff(failures)).await;
            }
        }
    }
}

/// Uploads the next batch of `partition`; `false` when there was nothing to do.
async fn next_batch(tier: &Tier, permits: &Semaphore, partition: u32) -> Result<bool, S3Error> {
    let batch: ReplicationBatch = tier
        .engine
        .replication_batch(partition, tier.config.batch_size.0)
        .await
        .map_err(|error| format!("reading the replication batch: {error}"))?;
    let work = !batch.is_empty();
    stream::iter(batch.replicas.iter().cloned())
        .map(|replica| async move {
            let _permit = permits
                .acquire()
                .await
                .map_err(|_| "the upload limiter closed".to_string())?;
            upload(tier, replica).await
        })
        .buffer_unordered(tier.config.upload_concurrency)
        .try_collect::<Vec<()>>()
        .await?;
    tier.engine
        .replication_done(&batch)
        .await
        .map_err(|error| format!("recording replication progress: {error}"))?;
    if work {
        tier.status.reachable();
    }
    Ok(work)
}

async fn upload(tier: &Tier, replica: Replica) -> Result<(), S3Error> {
    match replica {
        Replica::Blob { digest, data } => {
            if tier.index.contains(&digest) {
                return Ok(());
            }
            upload_blob(tier, digest, data).await?;
            tier.index.insert(digest);
            tier.status.uploads.with_label_values(&["cas"]).inc();
            tier.status.uploaded_bytes.inc_by(digest.size);
        }
        Replica::ActionResult { key, value } => {
            let size = value.len() as u64;
            tier.bucket.put(&tier.bucket.ac_key(&key), value).await?;
            tier.status.uploads.with_label_values(&["ac"]).inc();
            tier.status.uploaded_bytes.inc_by(size);
        }
    }
    Ok(())
}

async fn upload_blob(tier: &Tier, digest: Digest, data: Option<Bytes>) -> Result<(), S3Error> {
    let key = tier.bucket.cas_key(&digest);
    let multipart = digest.size > tier.config.multipart_threshold.0;
    match (data, multipart) {
        (Some(data), false) => tier.bucket.put(&key, data).await,
        (Some(data), true) => {
            tier.bucket
                .put_multipart(&key, stream::iter([Ok::<Bytes, S3Error>(data)]))
                .await
        }
        (None, false) => {
            let data = tier
                .engine
                .get_bytes(digest)
                .await
                .map_err(|error| format!("reading {digest} to upload it: {error}"))?;
            tier.bucket.put(&key, data).await
        }
        (None, true) => {
            let blob = tier
                .engine
                .get(digest, 0, None)
                .await
                .map_err(|error| format!("reading {digest} to upload it: {error}"))?;
            let chunks =
                blob.map_err(move |error| format!("reading {digest} to upload it: {error}"));
            tier.bucket.put_multipart(&key, chunks).await
        }
    }
}
