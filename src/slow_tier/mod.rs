//! The slow tier: S3 (or any S3-compatible service) behind the local log.
//!
//! The local engine stays the only thing a request waits on when it can: a write is
//! acknowledged once it is durable locally, and the engine (configured with
//! `replicate`) keeps it until the [`uploader`] has copied it to the bucket. The
//! bucket is the fleet's shared memory: several nodes configured with one bucket serve
//! each other's blobs and action results, because object keys are derived from
//! content alone ([`bucket`]).
//!
//! Reads fall through: a local miss reads the object from S3 and writes it into the
//! local engine through the same verifying upload path clients use, so an object
//! altered in the bucket fails its digest check and is neither served nor cached;
//! the blob is then served from local disk. Concurrent misses for one blob share a
//! single fetch. Existence questions (FindMissingBlobs, the action-cache completeness
//! check) never go to S3 per digest: they are answered from the [`index`].
//!
//! Shard executors must never block nor await anything that is not `Send`, and
//! aws-sdk-s3 wants tokio, so all S3 traffic runs on a small tokio runtime owned by
//! this module; handlers reach it through `Send` join handles. The engine handle is
//! usable from any thread, so the uploader and the fetches talk to it directly from
//! that runtime.

pub mod bucket;
pub mod config;
pub mod index;
pub mod status;
mod uploader;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use cairn_storage::{Digest, Engine, Stats};
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::runtime::Runtime;

use crate::error::{Error, ErrorKind, Result};
use bucket::Bucket;
use config::S3Config;
use index::BucketIndex;
use status::Status;

/// How long the runtime is given to finish its tasks when the node stops.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

type Fetch = Shared<BoxFuture<'static, Result<()>>>;

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

    /// Copies `digest` from the bucket into the local engine, verifying it. Concurrent
    /// calls for one digest share one fetch. `NotFound` when the bucket does not hold
    /// it, cannot be reached, or holds bytes that do not match the digest.
    pub async fn fetch_blob(&self, digest: Digest) -> Result<()> {
        let fetch = {
            let mut fetches = self
                .tier
                .fetches
                .lock()
                .map_err(|_| Error::internal("the fetch table is poisoned"))?;
            match fetches.get(&digest) {
                Some(fetch) => fetch.clone(),
                None => {
                    let tier = Arc::clone(&self.tier);
                    let task = self.runtime.spawn(async move {
                        let outcome = fetch_into_engine(&tier, digest).await;
                        if let Ok(mut fetches) = tier.fetches.lock() {
                            fetches.remove(&digest);
                        }
                        outcome
                    });
                    let fetch = async move {
                        task.await.unwrap_or_else(|error| {
                            Err(Error::internal(format!("the S3 fetch stopped: {error}")))
                        })
                    }
                    .boxed()
                    .shared();
                    fetches.insert(digest, fetch.clone());
                    fetch
                }
            }
        };
        fetch.await
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

    /// The slow tier's metrics in Prometheus text format.
    pub fn render_metrics(&self, stats: &Stats) -> Result<String> {
        let index = &self.tier.index;
        self.tier.status.render(stats, index.len(), index.listed())
    }
}

async fn fetch_into_engine(tier: &Tier, digest: Digest) -> Result<()> {
    let key = tier.bucket.cas_key(&digest);
    let outcome = copy_object(tier, digest, &key).await;
    let result = match &outcome {
        Ok(()) => {
            tier.index.insert(digest);
            "hit"
        }
        Err(Fetched::Missing) => {
            tier.index.remove(&digest);
            "miss"
        }
        Err(Fetched::Corrupt(why)) => {
            tier.index.remove(&digest);
            tracing::warn!("object {key} in the bucket is corrupt, ignoring it: {why}");
            "corrupt"
        }
        Err(Fetched::Unreachable(why)) => {
            tier.status.unreachable(why);
            "error"
        }
        Err(Fetched::Local(_)) => "error",
    };
    tier.status.fetches.with_label_values(&[result]).inc();
    outcome.map_err(|failure| match failure {
        Fetched::Missing => Error::not_found(format!("blob {key} is neither local nor in S3")),
        Fetched::Corrupt(why) => Error::not_found(format!(
            "blob {key} is not stored locally and its copy in S3 is corrupt: {why}"
        )),
        Fetched::Unreachable(why) => Error::not_found(format!(
            "blob {key} is not stored locally and S3 cannot be reached: {why}"
        )),
        Fetched::Local(error) => error,
    })
}

/// Why a fetch did not produce a local copy.
enum Fetched {
    Missing,
    Corrupt(String),
    Unreachable(String),
    Local(Error),
}

/// Streams the object into a verifying local upload.
async fn copy_object(tier: &Tier, digest: Digest, key: &str) -> std::result::Result<(), Fetched> {
    let mut body = tier
        .bucket
        .get(key)
        .await
        .map_err(Fetched::Unreachable)?
        .ok_or(Fetched::Missing)?;
    let mut upload = tier
        .engine
        .begin_put(digest)
        .await
        .map_err(|error| Fetched::Local(Error::from(error)))?;
    loop {
        let chunk = body
            .try_next()
            .await
            .map_err(|error| Fetched::Unreachable(format!("reading {key}: {error}")))?;
        let Some(chunk) = chunk else { break };
        if upload.committed() + chunk.len() as u64 > digest.size {
            return Err(Fetched::Corrupt(format!(
                "it is longer than {} bytes",
                digest.size
            )));
        }
        upload
            .write(chunk)
            .await
            .map_err(|error| classify(Error::from(error)))?;
    }
    if upload.committed() != digest.size {
        return Err(Fetched::Corrupt(format!(
            "it holds {} bytes, not {}",
            upload.committed(),
            digest.size
        )));
    }
    upload
        .finish()
        .await
        .map_err(|error| classify(Error::from(error)))
}

/// Content that does not match its digest means the object is corrupt; any other
/// failure is the local engine's.
fn classify(error: Error) -> Fetched {
    match error.kind() {
        ErrorKind::InvalidArgument => Fetched::Corrupt(error.to_string()),
        _ => Fetched::Local(error),
    }
}

async fn fetch_action_result(tier: &Tier, instance: &str, action: Digest) -> Result<Bytes> {
    let key = tier
        .bucket
        .ac_key(&Engine::ac_object_key(instance, &action));
    let missing = || Error::not_found(format!("no action result for {key}, locally or in S3"));
    let body = match tier.bucket.get(&key).await {
        Ok(Some(body)) => body,
        Ok(None) => {
            tier.status.fetches.with_label_values(&["miss"]).inc();
            return Err(missing());
        }
        Err(why) => {
            tier.status.unreachable(&why);
            tier.status.fetches.with_label_values(&["error"]).inc();
            return Err(Error::not_found(format!(
                "no action result stored locally and S3 cannot be reached: {why}"
            )));
        }
    };
    let limit = tier.engine.max_ac_value();
    let mut body = body;
    let mut value = BytesMut::new();
    while let Some(chunk) = body
        .try_next()
        .await
        .map_err(|error| Error::not_found(format!("reading {key} from S3 failed: {error}")))?
    {
        if (value.len() + chunk.len()) as u64 > limit {
            tier.status.fetches.with_label_values(&["corrupt"]).inc();
            return Err(Error::not_found(format!(
                "the action result {key} in S3 is larger than {limit} bytes"
            )));
        }
        value.extend_from_slice(&chunk);
    }
    let value = value.freeze();
    tier.engine
        .ac_put(instance, action, value.clone())
        .await
        .map_err(Error::from)?;
    tier.status.fetches.with_label_values(&["hit"]).inc();
    Ok(value)
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
