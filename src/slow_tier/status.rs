//! How the slow tier is doing: its Prometheus metrics and the `/healthz` verdict.
//!
//! An unreachable bucket is a degraded node, not a failed one: every write still
//! lands locally and every local blob is still served, so a load balancer must keep
//! sending traffic. What operators need to see is the growing replication backlog
//! (bytes written locally that S3 has not confirmed yet; when it reaches the local
//! budget, writes fail with RESOURCE_EXHAUSTED) and the last error S3 returned.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use cairn_storage::Stats;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::{Error, Result};

/// Counters and state of the slow tier.
pub struct Status {
    registry: Registry,
    /// Objects uploaded, by kind (`cas`, `ac`).
    pub uploads: IntCounterVec,
    /// Bytes uploaded.
    pub uploaded_bytes: IntCounter,
    /// Failed upload attempts (each is retried).
    pub upload_failures: IntCounter,
    /// Reads from S3 after a local miss, by result.
    pub fetches: IntCounterVec,
    /// 1 for each object whose upload S3 keeps rejecting, by object key.
    rejected: IntGaugeVec,
    index_objects: IntGauge,
    index_listed: IntGauge,
    backlog: IntGauge,
    up: IntGauge,
    failing: AtomicBool,
    last_error: Mutex<Option<String>>,
}

impl Status {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self> {
        let registry = Registry::new_custom(Some("cairn".to_string()), None).map_err(internal)?;
        let counter_vec = |name: &str, help: &str, label: &str| -> Result<IntCounterVec> {
            let metric = IntCounterVec::new(Opts::new(name, help), &[label]).map_err(internal)?;
            registry
                .register(Box::new(metric.clone()))
                .map_err(internal)?;
            Ok(metric)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter> {
            let metric = IntCounter::new(name, help).map_err(internal)?;
            registry
                .register(Box::new(metric.clone()))
                .map_err(internal)?;
            Ok(metric)
        };
        let rejected = IntGaugeVec::new(
            Opts::new(
                "s3_rejected_objects",
                "Objects S3 keeps rejecting, by key: 1 while the upload is owed and retried",
            ),
            &["key"],
        )
        .map_err(internal)?;
        registry
            .register(Box::new(rejected.clone()))
            .map_err(internal)?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let metric = IntGauge::new(name, help).map_err(internal)?;
            registry
                .register(Box::new(metric.clone()))
                .map_err(internal)?;
            Ok(metric)
        };
        Ok(Self {
            uploads: counter_vec(
                "s3_uploads_total",
                "Objects uploaded to S3, by kind",
                "kind",
            )?,
            uploaded_bytes: counter("s3_uploaded_bytes_total", "Bytes uploaded to S3")?,
            upload_failures: counter(
                "s3_upload_failures_total",
                "Failed attempts to upload to S3 (each is retried)",
            )?,
            fetches: counter_vec(
                "s3_fetches_total",
                "Reads from S3 after a local miss, by result (hit, passthrough, miss, corrupt, error)",
                "result",
            )?,
            rejected,
            index_objects: gauge(
                "s3_bucket_index_objects",
                "Blobs the node knows the bucket holds",
            )?,
            index_listed: gauge(
                "s3_bucket_index_listed",
                "1 once a listing of the whole bucket has completed",
            )?,
            backlog: gauge(
                "replication_backlog_bytes",
                "Bytes stored locally that have not reached S3 yet",
            )?,
            up: gauge("s3_up", "1 when the last request to S3 succeeded")?,
            failing: AtomicBool::new(false),
            last_error: Mutex::new(None),
            registry,
        })
    }

    /// Records a successful exchange with S3.
    pub fn reachable(&self) {
        self.failing.store(false, Ordering::Release);
    }

    /// Records that S3 rejected the upload of `key`; it stays listed until
    /// [`Status::accepted`].
    pub fn rejected(&self, key: &str) {
        self.rejected.with_label_values(&[key]).set(1);
    }

    /// Records that `key` was uploaded, after it may have been rejected before.
    pub fn accepted(&self, key: &str) {
        // An error only means the key was never rejected.
        let _ = self.rejected.remove_label_values(&[key]);
    }

    /// Records a failed exchange with S3.
    pub fn unreachable(&self, error: &impl std::fmt::Display) {
        self.failing.store(true, Ordering::Release);
        if let Ok(mut last) = self.last_error.lock() {
            *last = Some(error.to_string());
        }
    }

    /// `None` when healthy, else why the node is degraded.
    pub fn degraded(&self) -> Option<String> {
        if !self.failing.load(Ordering::Acquire) {
            return None;
        }
        let last = self
            .last_error
            .lock()
            .ok()
            .and_then(|last| last.clone())
            .unwrap_or_default();
        Some(format!("S3 unreachable ({last})"))
    }

    /// The `/healthz` body: `ok` or `degraded`, with the replication backlog.
    pub fn health(&self, stats: &Stats) -> String {
        let backlog = stats.replication_backlog_bytes();
        match self.degraded() {
            None => format!("ok\nreplication backlog: {backlog} bytes\n"),
            Some(reason) => {
                format!("degraded: {reason}\nreplication backlog: {backlog} bytes\n")
            }
        }
    }

    /// The text exposition of the slow tier's metrics.
    pub fn render(&self, stats: &Stats, index_objects: usize, listed: bool) -> Result<String> {
        self.backlog
            .set(i64::try_from(stats.replication_backlog_bytes()).unwrap_or(i64::MAX));
        self.index_objects
            .set(i64::try_from(index_objects).unwrap_or(i64::MAX));
        self.index_listed.set(i64::from(listed));
        self.up
            .set(i64::from(!self.failing.load(Ordering::Acquire)));
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .map_err(internal)?;
        String::from_utf8(text).map_err(internal)
    }
}

fn internal(error: impl std::fmt::Display) -> Error {
    Error::internal(error.to_string())
}
