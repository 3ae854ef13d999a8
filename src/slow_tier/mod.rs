//! The slow tier: S3 (or any S3-compatible service) behind the local log.
//!
//! The local engine stays the only thing a request waits on when it can: a write is
//! acknowledged once it is durable locally, and the engine (configured with
//! `replicate`) keeps it until the [`uploader`] has copied it to the bucket. The
//! bucket is the fleet's shared memory: several nodes configured with one bucket serve
//! each other's blobs and action results, because object keys are derived from
//! content alone ([`bucket`]).
//!
//! Reads fall through: a local miss streams the object from S3 to the client while
//! it is written into the local engine ([`fetch`]). The fetch checks the digest itself
//! and holds the last piece back until it matched, so an object altered in the bucket
//! is neither cached nor served whole (the client's stream ends in `NOT_FOUND`), and a
//! blob the local engine cannot take is still served from S3, verified. Concurrent
//! misses for one blob share a single fetch. Existence questions (FindMissingBlobs,
//! the action-cache completeness check) never go to S3 per digest: they are answered
//! from the [`index`].
//!
//! S3 is never waited on without a bound. Every request has a per-attempt and a
//! per-operation timeout (`attempt_timeout_ms`, `operation_timeout_ms`), so a server
//! that keeps its connections open but stops answering (a hung process, a black-holed
//! route) fails requests instead of stalling them: the uploader retries with backoff
//! and the node reports itself degraded within `operation_timeout_ms`. A read that
//! missed locally waits at most `read_miss_timeout_ms` for S3 to start answering before
//! the client gets `NOT_FOUND`.
//!
//! Shard executors must never block nor await anything that is not `Send`, and
//! aws-sdk-s3 wants tokio, so all S3 traffic runs on a small tokio runtime owned by
//! this module; handlers reach it through `Send` join handles. The engine handle is
//! usable from any thread, so the uploader and the fetches talk to it directly from
//! that runtime.

pub mod bucket;
pub mod config;
mod fetch;
pub mod index;
pub mod status;
mod uploader;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cairn_storage::{Digest, DigestFunction, Engine, Stats};
use tokio::runtime::Runtime;

use crate::engine_errors::engine_error;
use crate::error::{Error, Result};
use bucket::{Bucket, S3Error};
use config::S3Config;
use fetch::Fetch;
use index::BucketIndex;
use status::Status;

/// How long the runtime is given to finish its tasks when the node stops.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// A handle on the slow tier. Cheap to clone; every method may be awaited from any
/// executor.
#[derive(Clone)]
pub struct SlowTier {
    tier: Arc<Tier>,
    runtime: tokio::runtime::Handle,
}

/// The state shared by the handle, the uploader and the fetches.
struct Tier {
    config: S3Config,
    engine: Engine,
    bucket: Bucket,
    index: BucketIndex,
    status: Status,
    fetches: Mutex<HashMap<Digest, Fetch>>,
}

/// How S3 is doing.
#[derive(Debug, Clone)]
pub struct TierState {
    /// Why the last exchange with S3 failed; `None` while it succeeds.
    pub failing: Option<String>,
    /// Blobs the node knows the bucket holds.
    pub index_objects: usize,
    /// Whether a listing of the whole bucket has completed.
    pub listed: bool,
}

/// Owns the slow tier's runtime; dropping it stops the uploader and the listings.
pub struct SlowTierRuntime {
    runtime: Option<Runtime>,
}

impl Drop for SlowTierRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_timeout(SHUTDOWN_WAIT);
        }
    }
}

impl SlowTier {
    /// Starts the runtime, the uploader and the first listing of the bucket.
    pub fn start(config: S3Config, engine: Engine) -> Result<(SlowTier, SlowTierRuntime)> {
        config.validate()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.threads)
            .thread_name("cairn-s3")
            .enable_all()
            .build()
            .map_err(|error| Error::internal(format!("cannot start the S3 runtime: {error}")))?;
        let bucket = runtime.block_on(Bucket::connect(&config));
        tracing::info!(
            "slow tier: bucket {} at {}, key prefix {:?}",
            config.bucket,
            config.endpoint.as_deref().unwrap_or("the AWS endpoint"),
            config.prefix
        );
        let tier = Arc::new(Tier {
            config,
            engine,
            bucket,
            index: BucketIndex::default(),
            status: Status::new()?,
            fetches: Mutex::new(HashMap::new()),
        });
        {
            let _entered = runtime.enter();
            uploader::start(Arc::clone(&tier));
            tokio::spawn(list_periodically(Arc::clone(&tier)));
        }
        let handle = SlowTier {
            tier,
            runtime: runtime.handle().clone(),
        };
        Ok((
            handle,
            SlowTierRuntime {
                runtime: Some(runtime),
            },
        ))
    }

    /// Whether the bucket is known to hold `digest` (no request is made).
    pub fn holds(&self, digest: &Digest) -> bool {
        self.tier.index.contains(digest)
    }

    /// The full digest of the blob named by `function` and `hash`, if the bucket is
    /// known to hold it (no request is made).
    pub fn find_by_hash(&self, function: DigestFunction, hash: &[u8; 32]) -> Option<Digest> {
        let size = self.tier.index.size_of(function, hash)?;
        Some(Digest {
            function,
            hash: *hash,
            size,
        })
    }

    /// Reads the action-cache value of `action` in `instance` from the bucket and
    /// stores it locally. `NotFound` when the bucket has none or cannot be reached.
    pub async fn fetch_action_result(&self, instance: &str, action: Digest) -> Result<Bytes> {
        let tier = Arc::clone(&self.tier);
        let instance = instance.to_string();
        self.runtime
            .spawn(async move { fetch_action_result(&tier, &instance, action).await })
            .await
            .unwrap_or_else(|error| Err(Error::internal(format!("the S3 fetch stopped: {error}"))))
    }

    /// The `/healthz` body.
    pub fn health(&self, stats: &Stats) -> String {
        self.tier.status.health(stats)
    }

    /// How S3 is doing, for the status page.
    pub fn state(&self) -> TierState {
        TierState {
            failing: self.tier.status.degraded(),
            index_objects: self.tier.index.len(),
            listed: self.tier.index.listed(),
        }
    }

    /// The slow tier's metrics in Prometheus text format.
    pub fn render_metrics(&self, stats: &Stats) -> Result<String> {
        let index = &self.tier.index;
        self.tier.status.render(stats, index.len(), index.listed())
    }
}

async fn fetch_action_result(tier: &Tier, instance: &str, action: Digest) -> Result<Bytes> {
    let key = tier
        .bucket
        .ac_key(&Engine::ac_object_key(instance, &action));
    let missing = || Error::not_found(format!("no action result for {key}, locally or in S3"));
    // An action result is small: the whole exchange gets the read-miss bound.
    let read = tokio::time::timeout(
        tier.config.read_miss_timeout(),
        read_action_result(tier, &key),
    );
    let read = read.await;
    if matches!(read, Ok(Ok(_)) | Ok(Err(AcFetchError::TooLarge(_)))) {
        tier.status.reachable();
    }
    let value = match read {
        Ok(Ok(Some(value))) => value,
        Ok(Ok(None)) => {
            tier.status.fetches.with_label_values(&["miss"]).inc();
            return Err(missing());
        }
        Ok(Err(AcFetchError::TooLarge(limit))) => {
            tier.status.fetches.with_label_values(&["corrupt"]).inc();
            return Err(Error::not_found(format!(
                "the action result {key} in S3 is larger than {limit} bytes"
            )));
        }
        Ok(Err(AcFetchError::S3(why))) => return Err(unreachable(tier, &why)),
        Err(_) => {
            let why = S3Error::unreachable(format!(
                "GET {key}: no answer within {} ms",
                tier.config.read_miss_timeout_ms
            ));
            return Err(unreachable(tier, &why));
        }
    };
    tier.engine
        .ac_put(instance, action, value.clone())
        .await
        .map_err(engine_error)?;
    tier.status.fetches.with_label_values(&["hit"]).inc();
    Ok(value)
}

/// Why an action result could not be read from the bucket.
enum AcFetchError {
    S3(S3Error),
    /// The object is larger than the engine's largest action-cache value.
    TooLarge(u64),
}

/// The action-cache value stored under `key`, `None` when the bucket has none.
async fn read_action_result(
    tier: &Tier,
    key: &str,
) -> std::result::Result<Option<Bytes>, AcFetchError> {
    let Some(mut body) = tier.bucket.get(key).await.map_err(AcFetchError::S3)? else {
        return Ok(None);
    };
    let limit = tier.engine.max_ac_value();
    let mut value = BytesMut::new();
    while let Some(chunk) = body.try_next().await.map_err(|error| {
        AcFetchError::S3(S3Error::unreachable(format!(
            "reading {key} from S3 failed: {error}"
        )))
    })? {
        if (value.len() + chunk.len()) as u64 > limit {
            return Err(AcFetchError::TooLarge(limit));
        }
        value.extend_from_slice(&chunk);
    }
    Ok(Some(value.freeze()))
}

/// Records that an action-cache read found S3 unreachable; the error the client gets.
fn unreachable(tier: &Tier, why: &S3Error) -> Error {
    tier.status.unreachable(why);
    tier.status.fetches.with_label_values(&["error"]).inc();
    Error::not_found(format!(
        "no action result stored locally and S3 cannot be reached: {why}"
    ))
}

/// Lists the bucket now and then every `relist_seconds`, retrying failed listings.
async fn list_periodically(tier: Arc<Tier>) {
    let mut failures = 0u32;
    loop {
        tier.index.begin_listing();
        let mut listed = HashSet::new();
        match tier
            .bucket
            .list_blobs(|digest| {
                listed.insert(digest);
            })
            .await
        {
            Ok(()) => {
                tracing::info!("bucket index: {} blobs in S3", listed.len());
                tier.index.finish_listing(listed);
                tier.status.reachable();
                failures = 0;
                if tier.config.relist_seconds == 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_secs(tier.config.relist_seconds)).await;
            }
            Err(error) => {
                tier.index.abandon_listing();
                tier.status.unreachable(&error);
                failures = failures.saturating_add(1);
                tracing::warn!("listing the bucket failed, retrying: {error}");
                tokio::time::sleep(tier.config.backoff(failures)).await;
            }
        }
    }
}
