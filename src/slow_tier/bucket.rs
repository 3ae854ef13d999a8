//! The bucket itself: object keys and the few S3 calls the slow tier makes.
//!
//! Everything here runs on the slow tier's tokio runtime, never on a shard's executor.
//! Object keys are derived from content alone, the same on every node, which is what
//! lets several nodes share one bucket without talking to each other:
//! `{prefix}cas/{function}/{hash}-{size}` for blobs and `{prefix}ac/{key}` for
//! action-cache values, `key` being the engine's hash of instance name and action.
//! Because a key names its content, an upload repeated after a crash or by another
//! node rewrites identical bytes and needs no coordination.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{DisplayErrorContext, SdkError};
use aws_sdk_s3::primitives::ByteStream as S3Body;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_sdk_s3::Client;
use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
use bytes::{Bytes, BytesMut};
use cairn_storage::{Digest, DigestFunction};
use futures::{Stream, StreamExt};

use super::config::S3Config;

/// A failed S3 call, described for logs and `/healthz`, and why it failed.
///
/// The uploader treats the two kinds differently. An *unreachable* S3 (no answer
/// within the timeouts, no connection, a 5xx or throttling answer after the SDK's
/// retries) fails every request alike, so the whole batch waits and is retried with
/// backoff. A *rejected* object (any other answer S3 gave about that object: a 4xx, or
/// an answer the SDK cannot parse) says nothing about the next object, so replication
/// moves past it and retries it on its own.
#[derive(Debug, Clone)]
pub struct S3Error {
    message: String,
    unreachable: bool,
}

impl S3Error {
    /// S3 did not answer usefully: a timeout, a connection failure, a 5xx.
    pub fn unreachable(message: impl Into<String>) -> S3Error {
        S3Error {
            message: message.into(),
            unreachable: true,
        }
    }

    /// A failure tied to one object: S3 answered, but refused it.
    pub fn rejected(message: impl Into<String>) -> S3Error {
        S3Error {
            message: message.into(),
            unreachable: false,
        }
    }

    /// Whether S3 itself failed rather than one object.
    pub fn is_unreachable(&self) -> bool {
        self.unreachable
    }
}

impl std::fmt::Display for S3Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn describe<E>(what: &str, error: SdkError<E, HttpResponse>) -> S3Error
where
    E: std::error::Error + 'static,
{
    let unreachable = match &error {
        SdkError::TimeoutError(_) | SdkError::DispatchFailure(_) => true,
        SdkError::ServiceError(service) => {
            let status = service.raw().status().as_u16();
            status >= 500 || status == 429
        }
        _ => false,
    };
    let message = format!("{what}: {}", DisplayErrorContext(error));
    S3Error {
        message,
        unreachable,
    }
}

/// The bucket and the client that reaches it.
pub struct Bucket {
    client: Client,
    bucket: String,
    prefix: String,
    part_size: usize,
}

impl Bucket {
    /// A client for `config`'s bucket, with credentials from the standard AWS sources.
    /// Nothing is sent until the first request.
    pub async fn connect(config: &S3Config) -> Bucket {
        let http = aws_smithy_http_client::Builder::new()
            .tls_provider(Provider::Rustls(CryptoMode::Ring))
            .build_https();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .region(Region::new(config.region.clone()))
            .http_client(http)
            .retry_config(
                RetryConfig::standard()
                    .with_max_attempts(config.max_attempts)
                    .with_initial_backoff(Duration::from_millis(config.retry_initial_ms))
                    .with_max_backoff(Duration::from_millis(config.retry_max_ms)),
            )
            .timeout_config(
                TimeoutConfig::builder()
                    .connect_timeout(Duration::from_millis(config.connect_timeout_ms))
                    .operation_attempt_timeout(Duration::from_millis(config.attempt_timeout_ms))
                    .operation_timeout(Duration::from_millis(config.operation_timeout_ms))
                    .build(),
            );
        if let Some(endpoint) = &config.endpoint {
            loader = loader.endpoint_url(endpoint);
        }
        let shared = loader.load().await;
        let s3 = aws_sdk_s3::config::Builder::from(&shared)
            .force_path_style(config.path_style)
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
            .build();
        Bucket {
            client: Client::from_conf(s3),
            bucket: config.bucket.clone(),
            prefix: config.prefix.clone(),
            part_size: usize::try_from(config.part_size.0).unwrap_or(usize::MAX),
        }
    }

    /// The object key of a blob.
    pub fn cas_key(&self, digest: &Digest) -> String {
        cas_key(&self.prefix, digest)
    }

    /// The object key of an action-cache value.
    pub fn ac_key(&self, key: &[u8; 32]) -> String {
        format!("{}ac/{}", self.prefix, hex::encode(key))
    }

    /// Stores `data` under `key` in one request.
    pub async fn put(&self, key: &str, data: Bytes) -> Result<(), S3Error> {
        self.client
            .put_object()
            .bucket(&self.bucket)
            .key(key)
            .body(S3Body::from(data))
            .send()
            .await
            .map(|_| ())
            .map_err(|error| describe(&format!("PUT {key}"), error))
    }

    /// Stores the bytes of `chunks` under `key` as a multipart upload of `part_size`
    /// parts. A failed upload is aborted so the bucket keeps no orphaned parts.
    pub async fn put_multipart<S>(&self, key: &str, chunks: S) -> Result<(), S3Error>
    where
        S: Stream<Item = Result<Bytes, S3Error>> + Send,
    {
        let created = self
            .client
            .create_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
            .map_err(|error| describe(&format!("starting a multipart upload of {key}"), error))?;
        let upload_id = created
            .upload_id()
            .ok_or_else(|| S3Error::rejected(format!("the multipart upload of {key} has no id")))?
            .to_string();
        let outcome = self.upload_parts(key, &upload_id, chunks).await;
        if outcome.is_err() {
            let aborted = self
                .client
                .abort_multipart_upload()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(&upload_id)
                .send()
                .await;
            if let Err(error) = aborted {
                tracing::debug!("{}", describe("aborting a multipart upload", error));
            }
        }
        outcome
    }

    async fn upload_parts<S>(&self, key: &str, upload_id: &str, chunks: S) -> Result<(), S3Error>
    where
        S: Stream<Item = Result<Bytes, S3Error>> + Send,
    {
        let mut chunks = std::pin::pin!(chunks);
        let mut parts = Vec::new();
        let mut pending = BytesMut::new();
        let mut ended = false;
        loop {
            while !ended && pending.len() < self.part_size {
                match chunks.next().await {
                    Some(chunk) => pending.extend_from_slice(&chunk?),
                    None => ended = true,
                }
            }
            if pending.is_empty() && !parts.is_empty() {
                break;
            }
            let take = pending.len().min(self.part_size);
            let body = pending.split_to(take).freeze();
            let number = i32::try_from(parts.len() + 1)
                .map_err(|_| S3Error::rejected(format!("{key} needs too many parts")))?;
            let part = self
                .client
                .upload_part()
                .bucket(&self.bucket)
                .key(key)
                .upload_id(upload_id)
                .part_number(number)
                .body(S3Body::from(body))
                .send()
                .await
                .map_err(|error| describe(&format!("uploading part {number} of {key}"), error))?;
            parts.push(
                CompletedPart::builder()
                    .set_e_tag(part.e_tag().map(str::to_string))
                    .part_number(number)
                    .build(),
            );
            if ended && pending.is_empty() {
                break;
            }
        }
        self.client
            .complete_multipart_upload()
            .bucket(&self.bucket)
            .key(key)
            .upload_id(upload_id)
            .multipart_upload(
                CompletedMultipartUpload::builder()
                    .set_parts(Some(parts))
                    .build(),
            )
            .send()
            .await
            .map(|_| ())
            .map_err(|error| describe(&format!("completing the upload of {key}"), error))
    }

    /// The body of the object `key`, or `None` when the bucket does not hold it.
    pub async fn get(&self, key: &str) -> Result<Option<S3Body>, S3Error> {
        match self
            .client
            .get_object()
            .bucket(&self.bucket)
            .key(key)
            .send()
            .await
        {
            Ok(output) => Ok(Some(output.body)),
            Err(error) => {
                let missing = error
                    .as_service_error()
                    .is_some_and(|service| service.is_no_such_key());
                if missing {
                    Ok(None)
                } else {
                    Err(describe(&format!("GET {key}"), error))
                }
            }
        }
    }

    /// Every blob the bucket holds, page by page, handed to `found`.
    pub async fn list_blobs(&self, mut found: impl FnMut(Digest)) -> Result<(), S3Error> {
        let prefix = format!("{}cas/", self.prefix);
        let mut token: Option<String> = None;
        loop {
            let page = self
                .client
                .list_objects_v2()
                .bucket(&self.bucket)
                .prefix(&prefix)
                .set_continuation_token(token.take())
                .send()
                .await
                .map_err(|error| describe(&format!("listing {prefix}"), error))?;
            for object in page.contents() {
                if let Some(digest) = object.key().and_then(|key| parse_cas_key(&prefix, key)) {
                    found(digest);
                }
            }
            match page.next_continuation_token() {
                Some(next) if page.is_truncated() == Some(true) => token = Some(next.to_string()),
                _ => return Ok(()),
            }
        }
    }
}

fn cas_key(prefix: &str, digest: &Digest) -> String {
    format!(
        "{prefix}cas/{}/{}-{}",
        digest.function.name(),
        digest.hash_hex(),
        digest.size
    )
}

/// The digest named by a blob's object key (`cas_prefix` included), if it is one.
fn parse_cas_key(cas_prefix: &str, key: &str) -> Option<Digest> {
    let (function, name) = key.strip_prefix(cas_prefix)?.split_once('/')?;
    let function = [DigestFunction::Sha256, DigestFunction::Blake3]
        .into_iter()
        .find(|candidate| candidate.name() == function)?;
    let (hash, size) = name.split_once('-')?;
    let size = size.parse().ok()?;
    Digest::from_hex(function, hash, size).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blob_keys_round_trip() {
        let digest = Digest::of(DigestFunction::Blake3, b"hello");
        let key = cas_key("fleet/", &digest);
        assert_eq!(key, format!("fleet/cas/blake3/{}-5", digest.hash_hex()));
        assert_eq!(parse_cas_key("fleet/cas/", &key), Some(digest));
    }

    #[test]
    fn foreign_keys_are_ignored() {
        assert_eq!(parse_cas_key("cas/", "cas/md5/abc-1"), None);
        assert_eq!(parse_cas_key("cas/", "cas/sha256/zz-1"), None);
        assert_eq!(parse_cas_key("cas/", "other/sha256/abc-1"), None);
        let digest = Digest::of(DigestFunction::Sha256, b"x");
        let no_size = format!("cas/sha256/{}", digest.hash_hex());
        assert_eq!(parse_cas_key("cas/", &no_size), None);
    }
}
