//! Prometheus metrics of the node, served at `/metrics` on the HTTP listener.
//!
//! Request, byte and hit/miss counters are updated by the services as they work; the
//! storage figures (per-partition usage, objects, evictions, CRC failures, syncs,
//! per-shard queue depth) are read from the engine when the endpoint is scraped, so
//! they cost nothing between scrapes and are never stale.

use cairn_storage::Stats;
use prometheus::core::Collector;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::error::{Error, Result};

/// The node's metrics.
pub struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    lookups: IntCounterVec,
    received: IntCounter,
    sent: IntCounter,
    used_bytes: IntGaugeVec,
    budget_bytes: IntGaugeVec,
    objects: IntGaugeVec,
    evictions: IntGaugeVec,
    crc_failures: IntGaugeVec,
    syncs: IntGaugeVec,
    sync_failures: IntGaugeVec,
    sync_micros: IntGaugeVec,
    queue_depth: IntGaugeVec,
    /// Each shard's memory tier: reads served, reads that went to the log, bytes held,
    /// records admitted and evicted.
    tier_hits: IntGaugeVec,
    tier_misses: IntGaugeVec,
    tier_bytes: IntGaugeVec,
    tier_admissions: IntGaugeVec,
    tier_evictions: IntGaugeVec,
    connections: IntGaugeVec,
    connections_refused: IntCounter,
    accept_errors: IntCounter,
    max_connections: IntGauge,
    open_files_limit: IntGauge,
    connections_timed_out: IntCounterVec,
    receiving_bytes: IntGauge,
    parked_uploads: IntGauge,
    receiving_refused: IntCounter,
    auth_failures: IntCounterVec,
    auth_reloads: IntCounterVec,
    recovery_records: IntGaugeVec,
    recovery_scanned_bytes: IntGauge,
    tree_reads: IntCounter,
    budget_clamped_bytes: IntGauge,
    disk_full_reclaims: IntGauge,
    disk_full_refusing: IntGauge,
    upload_overflow_bytes: IntGauge,
    asset_fetches: IntCounterVec,
    asset_downloaded: IntCounter,
}

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Result<Self> {
        let registry = Registry::new_custom(Some("cairn".to_string()), None)
            .map_err(|error| Error::internal(error.to_string()))?;
        let counter_vec = |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec> {
            let metric = IntCounterVec::new(Opts::new(name, help), labels)
                .map_err(|error| Error::internal(error.to_string()))?;
            registry
                .register(Box::new(metric.clone()))
                .map_err(|error| Error::internal(error.to_string()))?;
            Ok(metric)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter> {
            let metric =
                IntCounter::new(name, help).map_err(|error| Error::internal(error.to_string()))?;
            registry
                .register(Box::new(metric.clone()))
                .map_err(|error| Error::internal(error.to_string()))?;
            Ok(metric)
        };
        let single_gauge = |name: &str, help: &str| -> Result<IntGauge> {
            let metric =
                IntGauge::new(name, help).map_err(|error| Error::internal(error.to_string()))?;
            registry
                .register(Box::new(metric.clone()))
                .map_err(|error| Error::internal(error.to_string()))?;
            Ok(metric)
        };
        let gauge = |name: &str, help: &str, label: &str| -> Result<IntGaugeVec> {
            let metric = IntGaugeVec::new(Opts::new(name, help), &[label])
                .map_err(|error| Error::internal(error.to_string()))?;
            registry
                .register(Box::new(metric.clone()))
                .map_err(|error| Error::internal(error.to_string()))?;
            Ok(metric)
        };
        Ok(Self {
            requests: counter_vec(
                "requests_total",
                "Requests served, by service and method",
                &["service", "method"],
            )?,
            lookups: counter_vec(
                "lookups_total",
                "Cache lookups, by store (cas, ac) and result (hit, miss)",
                &["store", "result"],
            )?,
            received: counter("received_bytes_total", "Blob bytes received from clients")?,
            auth_failures: counter_vec(
                "auth_failures_total",
                "Requests refused by the access policy, by reason: no credentials \
                 (missing), an unreadable authorization header (malformed), a token or \
                 user and password nobody has (unknown_token, bad_password), a principal \
                 lacking a permission or instance (denied), a write to a read-only node \
                 (read_only)",
                &["reason"],
            )?,
            auth_reloads: counter_vec(
                "auth_reloads_total",
                "Changes to the auth file seen while running: put in force (ok) or \
                 refused for not parsing, the previous file staying in force (refused)",
                &["result"],
            )?,
            connections_timed_out: counter_vec(
                "connections_timed_out_total",
                "Connections closed for not completing their handshake in time (handshake) \
                 or for idleness (idle)",
                &["reason"],
            )?,
            receiving_bytes: single_gauge(
                "receiving_bytes",
                "Bytes of gRPC messages received in part and not yet complete, over every \
                 connection (at most max_receiving_bytes)",
            )?,
            parked_uploads: single_gauge(
                "parked_uploads",
                "Interrupted ByteStream uploads kept for the client to resume \
                 (upload_resume_seconds; at most 1024)",
            )?,
            receiving_refused: counter(
                "receiving_refused_total",
                "gRPC calls ended with RESOURCE_EXHAUSTED because their incomplete message \
                 would have overrun max_receiving_bytes",
            )?,
            tree_reads: counter(
                "get_tree_directories_read_total",
                "Directories read by GetTree walks (a resumed page reads only its own)",
            )?,
            recovery_records: gauge(
                "recovery_records",
                "What the start-up recovery found, over every partition: index entries \
                 loaded from checkpoints (checkpoint), records found by scanning past them \
                 (scan), checkpoint entries of reclaimed segments (stale), damaged records \
                 skipped (damaged)",
                "source",
            )?,
            recovery_scanned_bytes: single_gauge(
                "recovery_scanned_bytes",
                "Bytes of segment files the start-up recovery scanned",
            )?,
            sent: counter("sent_bytes_total", "Blob bytes sent to clients")?,
            used_bytes: gauge(
                "partition_used_bytes",
                "Bytes used by each partition",
                "partition",
            )?,
            budget_bytes: gauge(
                "partition_budget_bytes",
                "Byte budget of each partition",
                "partition",
            )?,
            objects: gauge(
                "partition_objects",
                "Objects held by each partition",
                "partition",
            )?,
            evictions: gauge(
                "partition_evictions",
                "Objects evicted by each partition",
                "partition",
            )?,
            crc_failures: gauge(
                "partition_crc_failures",
                "Records that failed their checksum, by partition",
                "partition",
            )?,
            syncs: gauge(
                "partition_syncs",
                "Group commits (one fdatasync per segment written since the previous) run by each partition",
                "partition",
            )?,
            sync_failures: gauge(
                "partition_sync_failures",
                "Failed fdatasyncs, by partition (a failed partition refuses writes until restarted)",
                "partition",
            )?,
            sync_micros: gauge(
                "partition_sync_microseconds",
                "Time spent in fdatasync, by partition",
                "partition",
            )?,
            queue_depth: gauge(
                "shard_queue_depth",
                "Requests waiting for each shard",
                "shard",
            )?,
            tier_hits: gauge(
                "memory_tier_hits",
                "Reads served from each shard's memory tier",
                "shard",
            )?,
            tier_misses: gauge(
                "memory_tier_misses",
                "Reads of a stored record that each shard's memory tier did not hold",
                "shard",
            )?,
            tier_bytes: gauge(
                "memory_tier_bytes",
                "Bytes held by each shard's memory tier (payloads plus 320 bytes an entry)",
                "shard",
            )?,
            tier_admissions: gauge(
                "memory_tier_admissions",
                "Records admitted into each shard's memory tier",
                "shard",
            )?,
            tier_evictions: gauge(
                "memory_tier_evictions",
                "Records evicted from each shard's memory tier to make room",
                "shard",
            )?,
            connections: gauge(
                "shard_connections",
                "Open client connections served by each shard",
                "shard",
            )?,
            connections_refused: counter(
                "connections_refused_total",
                "Connections closed at once because the node served max_connections",
            )?,
            accept_errors: counter(
                "accept_errors_total",
                "Failed accept calls (EMFILE and the like pause accepting)",
            )?,
            max_connections: single_gauge(
                "max_connections",
                "Most client connections the node serves at once",
            )?,
            open_files_limit: single_gauge(
                "open_files_limit",
                "The process's open-file limit (soft RLIMIT_NOFILE)",
            )?,
            budget_clamped_bytes: single_gauge(
                "budget_clamped_bytes",
                "How far max_size was lowered at start to what the data directory can hold (0: not lowered)",
            )?,
            disk_full_reclaims: single_gauge(
                "disk_full_reclaims_total",
                "Segments reclaimed below the budget because the disk was full",
            )?,
            disk_full_refusing: single_gauge(
                "disk_full_refusing_partitions",
                "Partitions whose last allocation of disk space (a segment, or an upload's write unit) failed even after reclaiming",
            )?,
            upload_overflow_bytes: single_gauge(
                "upload_overflow_bytes",
                "Bytes of the node-wide overflow pool (1/8 of the budget) borrowed by partitions whose uploads in flight outgrew their own budget",
            )?,
            asset_fetches: counter_vec(
                "asset_fetches_total",
                "Remote Asset FetchBlob requests, by outcome: answered from a known \
                 mapping or the CAS (hit), by a download, alone or shared with concurrent \
                 requests (downloaded), refused for not matching checksum.sri \
                 (checksum_mismatch), or failed otherwise (failed)",
                &["outcome"],
            )?,
            asset_downloaded: counter(
                "asset_downloaded_bytes_total",
                "Bytes downloaded from origins by Remote Asset fetches",
            )?,
            registry,
        })
    }

    /// The per-shard connection gauge, kept up to date by the runtime.
    pub fn connections(&self) -> IntGaugeVec {
        self.connections.clone()
    }

    /// The counter of connections refused for `max_connections`.
    pub fn connections_refused(&self) -> IntCounter {
        self.connections_refused.clone()
    }

    /// The counter of requests the access policy refused, by reason.
    pub fn auth_failures(&self) -> IntCounterVec {
        self.auth_failures.clone()
    }

    /// The counter of auth file changes, by result.
    pub fn auth_reloads(&self) -> IntCounterVec {
        self.auth_reloads.clone()
    }

    /// The counter of connections closed by a timeout, by reason.
    pub fn connections_timed_out(&self) -> IntCounterVec {
        self.connections_timed_out.clone()
    }

    /// The gauge of bytes of incomplete gRPC messages, and the counter of calls
    /// refused for them.
    pub fn receiving(&self) -> (IntGauge, IntCounter) {
        (self.receiving_bytes.clone(), self.receiving_refused.clone())
    }

    /// The gauge of parked uploads.
    pub fn parked_uploads(&self) -> IntGauge {
        self.parked_uploads.clone()
    }

    /// The counter of failed `accept` calls.
    pub fn accept_errors(&self) -> IntCounter {
        self.accept_errors.clone()
    }

    /// Records the connection limit and the open-file limit it was derived from.
    pub fn set_limits(&self, max_connections: usize, open_files: u64) {
        self.max_connections
            .set(i64::try_from(max_connections).unwrap_or(i64::MAX));
        self.open_files_limit
            .set(i64::try_from(open_files).unwrap_or(i64::MAX));
    }

    /// Records by how much the configured budget was lowered at start.
    pub fn set_budget_clamped(&self, bytes: u64) {
        self.budget_clamped_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }

    /// By how much the configured budget was lowered at start.
    pub fn budget_clamped(&self) -> u64 {
        u64::try_from(self.budget_clamped_bytes.get()).unwrap_or(0)
    }

    /// Counts one request.
    pub fn request(&self, service: &str, method: &str) {
        self.requests.with_label_values(&[service, method]).inc();
    }

    /// Counts one lookup in `store`.
    pub fn lookup(&self, store: &str, hit: bool) {
        let result = if hit { "hit" } else { "miss" };
        self.lookups.with_label_values(&[store, result]).inc();
    }

    /// Counts a batch of lookups in `store`.
    pub fn lookups(&self, store: &str, hits: usize, misses: usize) {
        self.lookups
            .with_label_values(&[store, "hit"])
            .inc_by(hits as u64);
        self.lookups
            .with_label_values(&[store, "miss"])
            .inc_by(misses as u64);
    }

    /// Counts blob bytes received.
    pub fn bytes_received(&self, bytes: u64) {
        self.received.inc_by(bytes);
    }

    /// Counts directories read by a GetTree walk.
    pub fn tree_directories_read(&self, count: u64) {
        self.tree_reads.inc_by(count);
    }

    /// Counts one FetchBlob request by its outcome (`hit`, `downloaded`,
    /// `checksum_mismatch`, `failed`).
    pub fn asset_fetch(&self, outcome: &str) {
        self.asset_fetches.with_label_values(&[outcome]).inc();
    }

    /// Counts bytes downloaded from an origin.
    pub fn asset_bytes_downloaded(&self, bytes: u64) {
        self.asset_downloaded.inc_by(bytes);
    }

    /// Counts blob bytes sent.
    pub fn bytes_sent(&self, bytes: u64) {
        self.sent.inc_by(bytes);
    }

    /// The text exposition of every metric, with the storage figures of `stats`.
    pub fn render(&self, stats: &Stats) -> Result<String> {
        let set = |gauge: &IntGaugeVec, label: String, value: u64| {
            gauge
                .with_label_values(&[label.as_str()])
                .set(i64::try_from(value).unwrap_or(i64::MAX));
        };
        for partition in &stats.partitions {
            let label = || partition.partition.to_string();
            set(&self.used_bytes, label(), partition.used_bytes);
            set(&self.budget_bytes, label(), partition.budget_bytes);
            set(&self.objects, label(), partition.objects);
            set(&self.evictions, label(), partition.evictions);
            set(&self.crc_failures, label(), partition.crc_failures);
            set(&self.syncs, label(), partition.syncs);
            set(&self.sync_failures, label(), partition.sync_failures);
            set(&self.sync_micros, label(), partition.sync_micros);
        }
        let recovery = stats.recovery();
        for (source, count) in [
            ("checkpoint", recovery.from_checkpoint),
            ("scan", recovery.scanned_records),
            ("stale", recovery.checkpoint_stale),
            ("damaged", recovery.skipped_damaged),
        ] {
            set(&self.recovery_records, source.to_string(), count);
        }
        self.recovery_scanned_bytes
            .set(i64::try_from(recovery.scanned_bytes).unwrap_or(i64::MAX));
        self.disk_full_reclaims
            .set(i64::try_from(stats.disk_full_reclaims()).unwrap_or(i64::MAX));
        self.disk_full_refusing
            .set(i64::try_from(stats.disk_full_refusing()).unwrap_or(i64::MAX));
        self.upload_overflow_bytes
            .set(i64::try_from(stats.overflow_bytes).unwrap_or(i64::MAX));
        for (shard, depth) in stats.queue_depths.iter().enumerate() {
            set(&self.queue_depth, shard.to_string(), *depth);
        }
        for tier in &stats.memory_tiers {
            let label = || tier.shard.to_string();
            set(&self.tier_hits, label(), tier.hits);
            set(&self.tier_misses, label(), tier.misses);
            set(&self.tier_bytes, label(), tier.bytes);
            set(&self.tier_admissions, label(), tier.admissions);
            set(&self.tier_evictions, label(), tier.evictions);
        }
        let mut text = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut text)
            .map_err(|error| Error::internal(error.to_string()))?;
        String::from_utf8(text).map_err(|error| Error::internal(error.to_string()))
    }

    /// The request, lookup and byte counters as they stand, for the status page's
    /// samples (src/http_status.rs): a few dozen label sets, read without the
    /// registry's text encoding.
    pub fn counters(&self) -> Counters {
        let mut counters = Counters {
            received_bytes: self.received.get(),
            sent_bytes: self.sent.get(),
            ..Counters::default()
        };
        for family in self.requests.collect() {
            for metric in family.get_metric() {
                let service = metric
                    .get_label()
                    .iter()
                    .find(|label| label.name() == "service")
                    .map(|label| label.value().to_string())
                    .unwrap_or_default();
                *counters.requests.entry(service).or_default() +=
                    metric.get_counter().get_value() as u64;
            }
        }
        for (store, hits, misses) in [
            ("cas", &mut counters.cas_hits, &mut counters.cas_misses),
            ("ac", &mut counters.ac_hits, &mut counters.ac_misses),
        ] {
            *hits = self.lookups.with_label_values(&[store, "hit"]).get();
            *misses = self.lookups.with_label_values(&[store, "miss"]).get();
        }
        counters
    }
}

/// The node's monotonic traffic counters at one moment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests served, by service (`cas`, `ac`, `bytestream`, `http`, ...).
    pub requests: std::collections::BTreeMap<String, u64>,
    /// CAS lookups that found the blob.
    pub cas_hits: u64,
    /// CAS lookups that did not.
    pub cas_misses: u64,
    /// Action-cache lookups that found a result.
    pub ac_hits: u64,
    /// Action-cache lookups that did not.
    pub ac_misses: u64,
    /// Blob bytes received from clients.
    pub received_bytes: u64,
    /// Blob bytes sent to clients.
    pub sent_bytes: u64,
}
