//! Settings of the S3 slow tier: the `s3` section of the node's config.
//!
//! Only the bucket is required. Credentials are deliberately not settings: they come
//! from the standard AWS sources (the `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`
//! environment variables, then the shared profile files named by `AWS_PROFILE`), so a
//! config file can be committed and shared by every node of a fleet.

use std::time::Duration;

use serde::Deserialize;

use crate::byte_size::ByteSize;
use crate::error::{Error, Result};

/// Where and how the node keeps its slow tier in S3 (or any S3-compatible service).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S3Config {
    /// Endpoint URL, e.g. `http://127.0.0.1:9000` for an S3-compatible service.
    /// Default: none, AWS's own endpoint for `region`.
    pub endpoint: Option<String>,
    /// Region of the bucket (also used for request signing). Default `us-east-1`.
    pub region: String,
    /// Bucket name. Required; an empty name is an error at startup. Default: empty.
    pub bucket: String,
    /// Prefix of every object key, e.g. `cairn/` (include the trailing slash if you
    /// want one). Objects are `{prefix}cas/{function}/{hash}-{size}` and
    /// `{prefix}ac/{key}`. Default: empty.
    pub prefix: String,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual-hosted style
    /// (`bucket.endpoint/key`), as most S3-compatible services need. Default `false`.
    pub path_style: bool,
    /// Objects uploaded at the same time, over all partitions. Default `8`.
    pub upload_concurrency: usize,
    /// Blobs larger than this are uploaded in parts (multipart upload). Default `64MiB`.
    pub multipart_threshold: ByteSize,
    /// Size of each part of a multipart upload (S3 wants at least 5 MiB). Default `16MiB`.
    pub part_size: ByteSize,
    /// Roughly how many bytes the uploader takes from one partition at a time.
    /// Default `32MiB`.
    pub batch_size: ByteSize,
    /// Attempts the SDK makes for one request before the caller sees the failure.
    /// Default `3`.
    pub max_attempts: u32,
    /// First wait before an upload is retried, in milliseconds; it doubles after
    /// every failure. Default `200`.
    pub retry_initial_ms: u64,
    /// Longest wait between two attempts at an upload, in milliseconds. Uploads are
    /// retried for ever: a record leaves the local log only once it is in the
    /// bucket. Default `10000`.
    pub retry_max_ms: u64,
    /// Time allowed to open a connection to the endpoint, in milliseconds.
    /// Default `3000`.
    pub connect_timeout_ms: u64,
    /// Time allowed for one attempt at a request, in milliseconds: from sending it
    /// until the answer's headers (for an upload, until the whole body was sent and
    /// answered). A server that keeps the connection open but stops answering fails
    /// the attempt after this long, and the SDK tries again (`max_attempts`). Also the
    /// longest pause allowed while a blob read from S3 streams in. A part upload must
    /// go at `part_size` per this long (16 MiB in 10 s: 1.6 MB/s). Default `10000`.
    pub attempt_timeout_ms: u64,
    /// Time allowed for a whole request, all its attempts and the waits between them,
    /// in milliseconds. A request S3 leaves unanswered fails after at most this long,
    /// which marks the node degraded (`/healthz`, `cairn_s3_up` 0). Default `30000`.
    pub operation_timeout_ms: u64,
    /// Longest time a read that missed locally waits for S3 to start answering, in
    /// milliseconds, before the client gets `NOT_FOUND`. A healthy S3 answers in tens
    /// of milliseconds; this bounds what a hung one costs each read. Default `5000`.
    pub read_miss_timeout_ms: u64,
    /// How often the bucket index is rebuilt by listing the bucket, in seconds, so
    /// objects removed by lifecycle rules or added by other nodes are noticed; `0`
    /// lists only at startup. Default `3600`.
    pub relist_seconds: u64,
    /// Worker threads of the runtime that talks to S3. Default `2`.
    pub threads: usize,
}

impl Default for S3Config {
    fn default() -> Self {
        Self {
            endpoint: None,
            region: "us-east-1".to_string(),
            bucket: String::new(),
            prefix: String::new(),
            path_style: false,
            upload_concurrency: 8,
            multipart_threshold: ByteSize(64 << 20),
            part_size: ByteSize(16 << 20),
            batch_size: ByteSize(32 << 20),
            max_attempts: 3,
            retry_initial_ms: 200,
            retry_max_ms: 10_000,
            connect_timeout_ms: 3_000,
            attempt_timeout_ms: 10_000,
            operation_timeout_ms: 30_000,
            read_miss_timeout_ms: 5_000,
            relist_seconds: 3_600,
            threads: 2,
        }
    }
}

impl S3Config {
    /// Rejects settings that cannot work, with a sentence naming the setting.
    pub fn validate(&self) -> Result<()> {
        if self.bucket.len() < 3 {
            return Err(Error::invalid_argument(
                "s3.bucket must name a bucket (at least 3 characters)",
            ));
        }
        if self.part_size.0 < 5 << 20 {
            return Err(Error::invalid_argument(
                "s3.part_size must be at least 5MiB, the smallest part S3 accepts",
            ));
        }
        if self.multipart_threshold.0 < self.part_size.0 {
            return Err(Error::invalid_argument(
                "s3.multipart_threshold must be at least s3.part_size",
            ));
        }
        if self.connect_timeout_ms == 0
            || self.attempt_timeout_ms == 0
            || self.operation_timeout_ms == 0
            || self.read_miss_timeout_ms == 0
        {
            return Err(Error::invalid_argument(
                "s3.connect_timeout_ms, s3.attempt_timeout_ms, s3.operation_timeout_ms and \
                 s3.read_miss_timeout_ms must be at least 1",
            ));
        }
        if self.attempt_timeout_ms > self.operation_timeout_ms {
            return Err(Error::invalid_argument(
                "s3.attempt_timeout_ms must not exceed s3.operation_timeout_ms",
            ));
        }
        if self.upload_concurrency == 0 || self.threads == 0 || self.max_attempts == 0 {
            return Err(Error::invalid_argument(
                "s3.upload_concurrency, s3.threads and s3.max_attempts must be at least 1",
            ));
        }
        Ok(())
    }

    /// How long one attempt at a request, or a pause in a streamed body, may last.
    pub fn attempt_timeout(&self) -> Duration {
        Duration::from_millis(self.attempt_timeout_ms)
    }

    /// How long a local miss waits for S3 to start answering.
    pub fn read_miss_timeout(&self) -> Duration {
        Duration::from_millis(self.read_miss_timeout_ms)
    }

    /// The wait before retry number `failures` (counting from 1) of an upload.
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 1u64 << failures.saturating_sub(1).min(20);
        Duration::from_millis(
            self.retry_initial_ms
                .saturating_mul(factor)
                .min(self.retry_max_ms),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_a_bucket() {
        assert!(S3Config::default().validate().is_err());
        let config = S3Config {
            bucket: "cache".into(),
            ..S3Config::default()
        };
        assert!(config.validate().is_ok());
    }

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let config = S3Config::default();
        assert_eq!(config.backoff(1), Duration::from_millis(200));
        assert_eq!(config.backoff(2), Duration::from_millis(400));
        assert_eq!(config.backoff(40), Duration::from_millis(10_000));
    }

    #[test]
    fn an_attempt_may_not_outlast_its_operation() {
        let config = S3Config {
            bucket: "cache".into(),
            attempt_timeout_ms: 40_000,
            ..S3Config::default()
        };
        assert!(config.validate().is_err());
    }

    #[test]
    fn small_parts_are_rejected() {
        let config = S3Config {
            bucket: "cache".into(),
            part_size: ByteSize(1 << 20),
            ..S3Config::default()
        };
        assert!(config.validate().is_err());
    }
}
