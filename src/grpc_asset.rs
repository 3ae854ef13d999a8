//! The Remote Asset API (`build.bazel.remote.asset.v1`): Fetch and Push.
//!
//! Bazel started with `--experimental_remote_downloader=grpc://…` asks the node for
//! every `http_archive`, `http_file` and toolchain download instead of fetching it
//! itself: FetchBlob names the URLs and, in a `checksum.sri` qualifier, the expected
//! hash, and gets back the digest of the content, which it then reads from the CAS.
//! A fleet of CI machines thus downloads each dependency once, and builds keep
//! working while an upstream host is slow, rate-limits or is gone.
//!
//! The node remembers which content a URL and its qualifiers named as a *mapping*:
//! the content's digest and when it was stored. Mappings live in the action-cache
//! partitions, under keys that no action result can have (see [`Store::asset_get`]),
//! so they survive restarts, age out with the store's budget like any entry, and go
//! to the S3 slow tier like any action result. A mapping key is a SHA-256 of a
//! canonical encoding of what identifies the asset: blob or directory, the digest
//! function, the URL and the qualifiers sorted by name (clients may send them in any
//! order). Each URL of a request is its own mapping, so a later request listing the
//! mirrors differently still finds the content.
//!
//! FetchBlob answers, in order:
//! 1. from a mapping of any of the URLs, if its blob is still in the CAS, it has not
//!    expired (a pushed `expire_at`) and it is not older than the request's
//!    `oldest_content_accepted`;
//! 2. from the CAS alone when `checksum.sri` names a single SHA-256 and the digest
//!    function is SHA-256: content is content, whoever uploaded it (skipped when
//!    `oldest_content_accepted` is set, since the blob's age is unknown);
//! 3. by downloading the URLs in order ([`crate::asset_fetch`]) until one works, within
//!    the request's `timeout` (default `asset_fetch_timeout_seconds`, at most
//!    [`MAX_TIMEOUT`]) for all of them together. The body must match `checksum.sri`
//!    when given, else nothing is stored and the answer is `ABORTED`. The verified
//!    blob is streamed into the CAS and the mapping is written for the URL that
//!    worked.
//!
//! Failures of the origin are reported inside the response's `status`, as the API
//! asks (`NOT_FOUND`, `DEADLINE_EXCEEDED`, `ABORTED`, …), naming every URL tried;
//! failures of the request or of the node are gRPC errors. Concurrent requests for
//! the same asset share one download: the first starts a task on the download
//! runtime, the others wait for its result, and the task first looks again for a
//! mapping, so a request arriving just after a download finished does not repeat it.
//! The task outlives a client that hangs up, so a retry finds the content.
//!
//! Downloading needs the `write` permission besides `read` (it adds content to the
//! cache and makes the node reach out to the network); a reader's miss is answered
//! `PERMISSION_DENIED`. Push records a client's own mapping and needs `write`; the
//! pushed content is trusted to match its qualifiers, as the API allows. The
//! qualifiers a download understands are `checksum.sri` and `bazel.canonical_id`
//! (part of the identity, nothing more); a download asked with any other qualifier is
//! refused with `INVALID_ARGUMENT` naming it, since the node cannot honour it, while a
//! pushed mapping with any qualifiers is found by an exact match.
//!
//! FetchDirectory is answered only from PushDirectory mappings (whose root Directory
//! must still be in the CAS), `NOT_FOUND` otherwise: the node does not unpack archives.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use cairn_proto::asset::fetch_server::Fetch;
use cairn_proto::asset::push_server::Push;
use cairn_proto::asset::{
    FetchBlobRequest, FetchBlobResponse, FetchDirectoryRequest, FetchDirectoryResponse,
    PushBlobRequest, PushBlobResponse, PushDirectoryRequest, PushDirectoryResponse, Qualifier,
};
use cairn_proto::{reapi, rpc};
use cairn_storage::{Digest, DigestFunction};
use futures::future::{BoxFuture, FutureExt, Shared};
use prost::Message;
use serde::{Deserialize, Serialize};
use sha2::Digest as _;
use tokio::io::AsyncReadExt;
use tonic::{Request, Response, Status};

use crate::asset_fetch::{Downloader, DownloaderRuntime, FetchFailure, Spooled};
use crate::auth::{Access, Credentials, Need, Permission};
use crate::digests::{self, function_of_request, function_to_proto};
use crate::engine_errors::engine_error;
use crate::error::{Error, ErrorKind, Result};
use crate::sri::Sri;
use crate::store::{is_empty, Store};

/// Longest a download may take, whatever `timeout` a request asks for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);

/// The qualifier holding a Subresource Integrity checksum.
pub const CHECKSUM_SRI: &str = "checksum.sri";

/// Qualifiers a download honours: the checksum, and Bazel's canonical id, which only
/// tells two otherwise identical requests apart.
const DOWNLOAD_QUALIFIERS: [&str; 2] = [CHECKSUM_SRI, "bazel.canonical_id"];

/// Bytes read from a spool file per CAS write.
const STORE_CHUNK: usize = 1 << 20;

/// Which of the API's two kinds of asset a mapping names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Blob,
    Directory,
}

/// What a mapping holds: the content's digest, when it was stored and when it
/// expires (seconds since the epoch), serialised as JSON.
#[derive(Debug, Serialize, Deserialize)]
struct Mapping {
    function: String,
    hash: String,
    size: u64,
    stored_at: u64,
    expires_at: Option<u64>,
}

/// The qualifiers of a request, validated and in canonical order.
struct Qualifiers {
    sorted: Vec<(String, String)>,
    sri: Option<Sri>,
}

impl Qualifiers {
    /// Validates `qualifiers`: unique names, and a well-formed `checksum.sri`.
    fn parse(qualifiers: &[Qualifier]) -> Result<Self> {
        let mut sorted: Vec<(String, String)> = qualifiers
            .iter()
            .map(|q| (q.name.clone(), q.value.clone()))
            .collect();
        sorted.sort();
        if let Some(pair) = sorted.windows(2).find(|pair| pair[0].0 == pair[1].0) {
            return Err(Error::invalid_argument(format!(
                "qualifier `{}` is given twice; names must be unique",
                pair[0].0
            )));
        }
        let sri = sorted
            .iter()
            .find(|(name, _)| name == CHECKSUM_SRI)
            .map(|(_, value)| Sri::parse(value))
            .transpose()?;
        Ok(Self { sorted, sri })
    }

    /// The names a download cannot honour.
    fn unsupported(&self) -> Vec<&str> {
        self.sorted
            .iter()
            .map(|(name, _)| name.as_str())
            .filter(|name| !DOWNLOAD_QUALIFIERS.contains(name))
            .collect()
    }
}

/// The key of the mapping of `uri` with `qualifiers`: SHA-256 over a domain tag and
/// length-prefixed fields, so two different assets never encode alike.
fn mapping_key(
    kind: Kind,
    function: DigestFunction,
    uri: &str,
    qualifiers: &Qualifiers,
) -> [u8; 32] {
    let mut hasher = sha2::Sha256::new();
    hasher.update(b"cairn remote asset v1\0");
    hasher.update(match kind {
        Kind::Blob => b"blob\0".as_slice(),
        Kind::Directory => b"directory\0".as_slice(),
    });
    hasher.update([function.code()]);
    let mut field = |bytes: &[u8]| {
        hasher.update((bytes.len() as u64).to_le_bytes());
        hasher.update(bytes);
    };
    field(uri.as_bytes());
    for (name, value) in &qualifiers.sorted {
        field(name.as_bytes());
        field(value.as_bytes());
    }
    hasher.finalize().into()
}

/// Seconds since the epoch.
fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// Seconds since the epoch of a protobuf timestamp (0 for times before it).
fn seconds(timestamp: &prost_types::Timestamp) -> u64 {
    u64::try_from(timestamp.seconds).unwrap_or(0)
}

/// What a fetch found: the content's digest and the URL it is known by.
#[derive(Debug, Clone)]
struct Found {
    uri: String,
    digest: Digest,
}

/// How a shared download ended, for every request waiting on it.
#[derive(Debug, Clone)]
enum Outcome {
    /// The content is in the CAS (downloaded now, or found by the task's second look).
    Stored(Found),
    /// The origin failed: answered inside the response.
    Origin { uri: String, failure: FetchFailure },
    /// The node failed: answered as a gRPC error.
    Node(Error),
}

type SharedOutcome = Shared<BoxFuture<'static, Outcome>>;

/// The state Fetch and Push share.
struct Assets {
    store: Store,
    downloader: Downloader,
    default_timeout: Duration,
    in_flight: Mutex<HashMap<[u8; 32], SharedOutcome>>,
}

/// The Fetch and Push services. Cheap to clone.
#[derive(Clone)]
pub struct AssetService {
    assets: Arc<Assets>,
    access: Access,
}

impl AssetService {
    /// The services over `store`, downloading with a runtime of their own (returned;
    /// dropping it stops the downloads) and spooling under `spool`. A request without
    /// a `timeout` gets `default_timeout`.
    pub fn start(
        store: Store,
        access: Access,
        spool: std::path::PathBuf,
        default_timeout: Duration,
    ) -> Result<(AssetService, DownloaderRuntime)> {
        let max_size = store.limits().max_cas_blob_size;
        let metrics = store.metrics_handle();
        let (downloader, runtime) = Downloader::start(spool, max_size, metrics)?;
        let service = AssetService {
            assets: Arc::new(Assets {
                store,
                downloader,
                default_timeout: default_timeout.min(MAX_TIMEOUT),
                in_flight: Mutex::new(HashMap::new()),
            }),
            access,
        };
        Ok((service, runtime))
    }
}

impl Assets {
    /// The content a mapping of one of `uris` names, if still usable.
    async fn lookup(
        &self,
        instance: &str,
        kind: Kind,
        function: DigestFunction,
        uris: &[String],
        qualifiers: &Qualifiers,
        oldest: Option<u64>,
    ) -> Result<Option<Found>> {
        for uri in uris {
            let key = mapping_key(kind, function, uri, qualifiers);
            let value = match self.store.asset_get(instance, key).await {
                Ok(value) => value,
                Err(error) if error.kind() == ErrorKind::NotFound => continue,
                Err(error) => return Err(error),
            };
            let Ok(mapping) = serde_json::from_slice::<Mapping>(&value) else {
                tracing::warn!("the asset mapping of {uri} does not decode; ignored");
                continue;
            };
            if mapping.function != function.name()
                || mapping.expires_at.is_some_and(|expires| expires <= now())
                || oldest.is_some_and(|oldest| mapping.stored_at < oldest)
            {
                continue;
            }
            let Ok(digest) = Digest::from_lower_hex(function, &mapping.hash, mapping.size) else {
                continue;
            };
            if self.store.contains(digest).await? {
                return Ok(Some(Found {
                    uri: uri.clone(),
                    digest,
                }));
            }
        }
        Ok(None)
    }

    /// Records that `uri` with `qualifiers` names `digest`.
    async fn remember(
        &self,
        instance: &str,
        kind: Kind,
        uri: &str,
        qualifiers: &Qualifiers,
        digest: &Digest,
        expires_at: Option<u64>,
    ) -> Result<()> {
        let mapping = Mapping {
            function: digest.function.name().to_string(),
            hash: digest.hash_hex(),
            size: digest.size,
            stored_at: now(),
            expires_at,
        };
        let value = serde_json::to_vec(&mapping)
            .map_err(|error| Error::internal(format!("cannot encode a mapping: {error}")))?;
        self.store
            .asset_put(
                instance,
                mapping_key(kind, digest.function, uri, qualifiers),
                Bytes::from(value),
            )
            .await
    }

    /// Downloads the first of `uris` that works, or joins the download of the same
    /// asset already in flight.
    async fn download_once(
        self: &Arc<Self>,
        instance: &str,
        function: DigestFunction,
        uris: Vec<String>,
        qualifiers: Arc<Qualifiers>,
        timeout: Duration,
    ) -> Outcome {
        let mut identity = sha2::Sha256::new();
        identity.update((instance.len() as u64).to_le_bytes());
        identity.update(instance.as_bytes());
        for uri in &uris {
            identity.update(mapping_key(Kind::Blob, function, uri, &qualifiers));
        }
        let identity: [u8; 32] = identity.finalize().into();
        let shared = {
            let mut in_flight = self.in_flight.lock().unwrap_or_else(|e| e.into_inner());
            match in_flight.get(&identity) {
                Some(shared) => shared.clone(),
                None => {
                    let assets = Arc::clone(self);
                    let instance = instance.to_string();
                    let task = self.downloader.runtime().spawn(async move {
                        let outcome = assets
                            .fetch_from_origin(&instance, function, &uris, &qualifiers, timeout)
                            .await;
                        assets
                            .in_flight
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .remove(&identity);
                        outcome
                    });
                    let shared = async move {
                        task.await.unwrap_or_else(|error| {
                            Outcome::Node(Error::internal(format!("the download stopped: {error}")))
                        })
                    }
                    .boxed()
                    .shared();
                    in_flight.insert(identity, shared.clone());
                    shared
                }
            }
        };
        shared.await
    }

    /// The body of a shared download, on the download runtime.
    async fn fetch_from_origin(
        &self,
        instance: &str,
        function: DigestFunction,
        uris: &[String],
        qualifiers: &Qualifiers,
        timeout: Duration,
    ) -> Outcome {
        match self
            .lookup(instance, Kind::Blob, function, uris, qualifiers, None)
            .await
        {
            Ok(Some(found)) => return Outcome::Stored(found),
            Ok(None) => {}
            Err(error) => return Outcome::Node(error),
        }
        let deadline = tokio::time::Instant::now() + timeout;
        let mut failures: Vec<(String, FetchFailure)> = Vec::new();
        for uri in uris {
            let download = self
                .downloader
                .download(uri, function, qualifiers.sri.as_ref());
            let spooled = match tokio::time::timeout_at(deadline, download).await {
                Ok(Ok(spooled)) => spooled,
                Ok(Err(failure)) => {
                    failures.push((uri.clone(), failure));
                    continue;
                }
                Err(_) => {
                    let failure = FetchFailure {
                        code: tonic::Code::DeadlineExceeded,
                        message: format!(
                            "{uri}: not downloaded within the timeout of {} ms",
                            timeout.as_millis()
                        ),
                        mismatch: false,
                    };
                    failures.push((uri.clone(), failure));
                    break;
                }
            };
            if let Err(error) = self.store_spooled(&spooled).await {
                return Outcome::Node(error);
            }
            let digest = spooled.digest;
            if let Err(error) = self
                .remember(instance, Kind::Blob, uri, qualifiers, &digest, None)
                .await
            {
                return Outcome::Node(error);
            }
            tracing::info!("fetched {uri}: {}/{}", digest.hash_hex(), digest.size);
            return Outcome::Stored(Found {
                uri: uri.clone(),
                digest,
            });
        }
        summarise(failures)
    }

    /// Streams a spooled download into the CAS, unless the CAS holds it already.
    async fn store_spooled(&self, spooled: &Spooled) -> Result<()> {
        let digest = spooled.digest;
        if is_empty(&digest) || self.store.contains(digest).await? {
            return Ok(());
        }
        let mut file = tokio::fs::File::open(spooled.path()).await?;
        let mut upload = self.store.begin_put(digest).await?;
        loop {
            let mut chunk = BytesMut::with_capacity(STORE_CHUNK);
            while chunk.len() < STORE_CHUNK {
                if file.read_buf(&mut chunk).await? == 0 {
                    break;
                }
            }
            if chunk.is_empty() {
                break;
            }
            upload.write(chunk.freeze()).await.map_err(engine_error)?;
        }
        upload.finish().await.map_err(engine_error)?;
        Ok(())
    }
}

/// The outcome of a download whose every URL failed: the status of the last failure
/// (`ABORTED` if any body failed its checksum: the content on offer is wrong, which
/// outweighs a mirror being down), with every URL's reason in the message.
fn summarise(failures: Vec<(String, FetchFailure)>) -> Outcome {
    let message = failures
        .iter()
        .map(|(_, failure)| failure.message.as_str())
        .collect::<Vec<_>>()
        .join("; ");
    let chosen = failures
        .iter()
        .find(|(_, failure)| failure.mismatch)
        .or(failures.last());
    match chosen {
        Some((uri, failure)) => Outcome::Origin {
            uri: uri.clone(),
            failure: FetchFailure {
                code: failure.code,
                message,
                mismatch: failure.mismatch,
            },
        },
        None => Outcome::Node(Error::invalid_argument("no URI to fetch")),
    }
}

/// `INVALID_ARGUMENT` naming `names`, with the `BadRequest` detail the API asks for.
fn unsupported_qualifiers(names: &[&str]) -> Status {
    let violations = names
        .iter()
        .map(|name| rpc::bad_request::FieldViolation {
            field: "qualifiers.name".to_string(),
            description: format!("\"{name}\" not supported"),
            ..Default::default()
        })
        .collect();
    let message = format!(
        "qualifiers not supported for downloads: {} (supported: {})",
        names.join(", "),
        DOWNLOAD_QUALIFIERS.join(", ")
    );
    let details = rpc::Status {
        code: tonic::Code::InvalidArgument as i32,
        message: message.clone(),
        details: vec![prost_types::Any {
            type_url: "type.googleapis.com/google.rpc.BadRequest".to_string(),
            value: rpc::BadRequest {
                field_violations: violations,
            }
            .encode_to_vec(),
        }],
    };
    Status::with_details(
        tonic::Code::InvalidArgument,
        message,
        Bytes::from(details.encode_to_vec()),
    )
}

/// The download timeout a request asks for, `default` when unset or zero, at most
/// [`MAX_TIMEOUT`].
fn timeout_of(requested: Option<&prost_types::Duration>, default: Duration) -> Result<Duration> {
    let Some(requested) = requested else {
        return Ok(default);
    };
    if requested.seconds < 0 || requested.nanos < 0 {
        return Err(Error::invalid_argument("timeout is negative"));
    }
    let asked = Duration::new(requested.seconds as u64, requested.nanos as u32);
    Ok(if asked.is_zero() {
        default
    } else {
        asked.min(MAX_TIMEOUT)
    })
}

fn ok_status() -> Option<rpc::Status> {
    Some(rpc::Status::default())
}

#[tonic::async_trait]
impl Fetch for AssetService {
    async fn fetch_blob(
        &self,
        request: Request<FetchBlobRequest>,
    ) -> Result<Response<FetchBlobResponse>, Status> {
        let store = &self.assets.store;
        store.metrics().request("asset", "FetchBlob");
        let instance = request.get_ref().instance_name.clone();
        self.access
            .check_grpc(&request, Need::One(Permission::Read), Some(&instance))?;
        let credentials = Credentials::of_grpc(&request);
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        if request.uris.is_empty() {
            return Err(
                Error::invalid_argument("a FetchBlob request needs at least one URI").into(),
            );
        }
        let qualifiers = Qualifiers::parse(&request.qualifiers)?;
        let timeout = timeout_of(request.timeout.as_ref(), self.assets.default_timeout)?;
        let oldest = request.oldest_content_accepted.as_ref().map(seconds);
        let answer = |found: Found| FetchBlobResponse {
            status: ok_status(),
            uri: found.uri,
            qualifiers: request.qualifiers.clone(),
            expires_at: None,
            blob_digest: Some(digests::to_proto(&found.digest)),
            digest_function: function_to_proto(function) as i32,
        };
        let known = self
            .assets
            .lookup(
                &instance,
                Kind::Blob,
                function,
                &request.uris,
                &qualifiers,
                oldest,
            )
            .await?;
        if let Some(found) = known {
            store.metrics().asset_fetch("hit");
            return Ok(Response::new(answer(found)));
        }
        let by_checksum = qualifiers.sri.as_ref().and_then(Sri::sha256);
        if let (Some(hash), DigestFunction::Sha256, None) = (by_checksum, function, oldest) {
            match store
                .digest_by_hash(DigestFunction::Sha256, &hex::encode(hash))
                .await
            {
                Ok(digest) => {
                    store.metrics().asset_fetch("hit");
                    return Ok(Response::new(answer(Found {
                        uri: request.uris[0].clone(),
                        digest,
                    })));
                }
                Err(error) if error.kind() == ErrorKind::NotFound => {}
                Err(error) => return Err(error.into()),
            }
        }
        let unsupported = qualifiers.unsupported();
        if !unsupported.is_empty() {
            store.metrics().asset_fetch("failed");
            return Err(unsupported_qualifiers(&unsupported));
        }
        if let Err(error) =
            self.access
                .check(&credentials, Need::One(Permission::Write), Some(&instance))
        {
            store.metrics().asset_fetch("failed");
            return Err(Error::permission_denied(format!(
                "{} (the asset is not cached, and downloading it needs `write`)",
                error.message()
            ))
            .into());
        }
        let outcome = self
            .assets
            .download_once(
                &instance,
                function,
                request.uris.clone(),
                Arc::new(qualifiers),
                timeout,
            )
            .await;
        match outcome {
            Outcome::Stored(found) => {
                store.metrics().asset_fetch("downloaded");
                Ok(Response::new(answer(found)))
            }
            Outcome::Origin { uri, failure } => {
                store.metrics().asset_fetch(if failure.mismatch {
                    "checksum_mismatch"
                } else {
                    "failed"
                });
                Ok(Response::new(FetchBlobResponse {
                    status: Some(rpc::Status {
                        code: failure.code as i32,
                        message: failure.message,
                        details: Vec::new(),
                    }),
                    uri,
                    qualifiers: request.qualifiers,
                    expires_at: None,
                    blob_digest: None,
                    digest_function: function_to_proto(function) as i32,
                }))
            }
            Outcome::Node(error) => {
                store.metrics().asset_fetch("failed");
                Err(error.into())
            }
        }
    }

    async fn fetch_directory(
        &self,
        request: Request<FetchDirectoryRequest>,
    ) -> Result<Response<FetchDirectoryResponse>, Status> {
        self.assets
            .store
            .metrics()
            .request("asset", "FetchDirectory");
        let instance = request.get_ref().instance_name.clone();
        self.access
            .check_grpc(&request, Need::One(Permission::Read), Some(&instance))?;
        let request = request.into_inner();
        let function = function_of_request(request.digest_function)?;
        if request.uris.is_empty() {
            return Err(
                Error::invalid_argument("a FetchDirectory request needs at least one URI").into(),
            );
        }
        let qualifiers = Qualifiers::parse(&request.qualifiers)?;
        let oldest = request.oldest_content_accepted.as_ref().map(seconds);
        let found = self
            .assets
            .lookup(
                &instance,
                Kind::Directory,
                function,
                &request.uris,
                &qualifiers,
                oldest,
            )
            .await?
            .ok_or_else(|| {
                Error::not_found(
                    "no directory was pushed for these URIs and qualifiers (FetchDirectory \
                     serves only PushDirectory mappings; archives are not unpacked)",
                )
            })?;
        Ok(Response::new(FetchDirectoryResponse {
            status: ok_status(),
            uri: found.uri,
            qualifiers: request.qualifiers,
            expires_at: None,
            root_directory_digest: Some(digests::to_proto(&found.digest)),
            digest_function: function_to_proto(function) as i32,
        }))
    }
}

impl AssetService {
    /// Records `digest` for each of `uris` with `qualifiers` (the body of both Push
    /// calls).
    #[allow(clippy::too_many_arguments)]
    async fn push(
        &self,
        instance: &str,
        kind: Kind,
        uris: &[String],
        qualifiers: &[Qualifier],
        digest: Option<&reapi::Digest>,
        function: i32,
        expire_at: Option<&prost_types::Timestamp>,
    ) -> Result<()> {
        if uris.is_empty() {
            return Err(Error::invalid_argument("a push needs at least one URI"));
        }
        let function = function_of_request(function)?;
        let what = match kind {
            Kind::Blob => "blob_digest",
            Kind::Directory => "root_directory_digest",
        };
        let digest = digests::required(function, digest, what)?;
        let qualifiers = Qualifiers::parse(qualifiers)?;
        let expires_at = expire_at.map(seconds);
        for uri in uris {
            self.assets
                .remember(instance, kind, uri, &qualifiers, &digest, expires_at)
                .await?;
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl Push for AssetService {
    async fn push_blob(
        &self,
        request: Request<PushBlobRequest>,
    ) -> Result<Response<PushBlobResponse>, Status> {
        self.assets.store.metrics().request("asset", "PushBlob");
        let instance = request.get_ref().instance_name.clone();
        self.access
            .check_grpc(&request, Need::One(Permission::Write), Some(&instance))?;
        let request = request.into_inner();
        self.push(
            &instance,
            Kind::Blob,
            &request.uris,
            &request.qualifiers,
            request.blob_digest.as_ref(),
            request.digest_function,
            request.expire_at.as_ref(),
        )
        .await?;
        Ok(Response::new(PushBlobResponse {}))
    }

    async fn push_directory(
        &self,
        request: Request<PushDirectoryRequest>,
    ) -> Result<Response<PushDirectoryResponse>, Status> {
        self.assets
            .store
            .metrics()
            .request("asset", "PushDirectory");
        let instance = request.get_ref().instance_name.clone();
        self.access
            .check_grpc(&request, Need::One(Permission::Write), Some(&instance))?;
        let request = request.into_inner();
        self.push(
            &instance,
            Kind::Directory,
            &request.uris,
            &request.qualifiers,
            request.root_directory_digest.as_ref(),
            request.digest_function,
            request.expire_at.as_ref(),
        )
        .await?;
        Ok(Response::new(PushDirectoryResponse {}))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn qualifiers(pairs: &[(&str, &str)]) -> Qualifiers {
        let list: Vec<Qualifier> = pairs
            .iter()
            .map(|(name, value)| Qualifier {
                name: name.to_string(),
                value: value.to_string(),
            })
            .collect();
        Qualifiers::parse(&list).unwrap()
    }

    #[test]
    fn qualifier_order_does_not_change_the_key() {
        let a = qualifiers(&[("a", "1"), ("b", "2")]);
        let b = qualifiers(&[("b", "2"), ("a", "1")]);
        let key = |q| mapping_key(Kind::Blob, DigestFunction::Sha256, "https://x/y", q);
        assert_eq!(key(&a), key(&b));
    }

    #[test]
    fn keys_separate_kinds_functions_uris_and_qualifiers() {
        let none = qualifiers(&[]);
        let one = qualifiers(&[("a", "1")]);
        let split = qualifiers(&[("a", ""), ("1", "")]);
        let keys = [
            mapping_key(Kind::Blob, DigestFunction::Sha256, "u", &none),
            mapping_key(Kind::Directory, DigestFunction::Sha256, "u", &none),
            mapping_key(Kind::Blob, DigestFunction::Blake3, "u", &none),
            mapping_key(Kind::Blob, DigestFunction::Sha256, "v", &none),
            mapping_key(Kind::Blob, DigestFunction::Sha256, "u", &one),
            mapping_key(Kind::Blob, DigestFunction::Sha256, "u", &split),
            mapping_key(Kind::Blob, DigestFunction::Sha256, "ua1", &none),
        ];
        for (i, a) in keys.iter().enumerate() {
            for b in &keys[i + 1..] {
                assert_ne!(a, b);
            }
        }
    }

    #[test]
    fn duplicate_qualifiers_are_refused() {
        let list = vec![
            Qualifier {
                name: "a".into(),
                value: "1".into(),
            },
            Qualifier {
                name: "a".into(),
                value: "2".into(),
            },
        ];
        let error = Qualifiers::parse(&list).err().unwrap();
        assert_eq!(error.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn timeouts_default_and_clamp() {
        let default = Duration::from_secs(600);
        assert_eq!(timeout_of(None, default).unwrap(), default);
        let zero = prost_types::Duration::default();
        assert_eq!(timeout_of(Some(&zero), default).unwrap(), default);
        let long = prost_types::Duration {
            seconds: 1 << 40,
            nanos: 0,
        };
        assert_eq!(timeout_of(Some(&long), default).unwrap(), MAX_TIMEOUT);
        let negative = prost_types::Duration {
            seconds: -1,
            nanos: 0,
        };
        assert!(timeout_of(Some(&negative), default).is_err());
    }
}
