//! A REAPI load generator: drives a cache node over gRPC with reproducible data and
//! checks every byte it reads back (the `cairn-bench` binary).
//!
//! Work is spread over `concurrency` tasks sharing `connections` HTTP/2 channels.
//! Each task draws its data from its own seeded generator, so two runs with the same
//! options send the same bytes. A scenario's operations are timed one by one; the
//! report gives operations and bytes per second and latency percentiles. A read that
//! returns other bytes than were written, or an answer that differs from the expected
//! one, is a verification failure, which makes the run fail.

pub mod data;
pub mod report;
pub mod scenarios;

use std::time::{Duration, Instant};

use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// Largest gRPC message the clients accept.
const MAX_MESSAGE: usize = 64 << 20;

/// How long a scenario runs.
#[derive(Debug, Clone, Copy)]
pub enum Budget {
    /// Until this much time has passed.
    Time(Duration),
    /// This many operations in total, over all tasks.
    Ops(u64),
}

/// Options shared by every scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// gRPC address, e.g. `grpc://127.0.0.1:50051`; `grpcs://` for TLS.
    pub addr: String,
    /// PEM CA certificates trusted for a `grpcs://` address.
    pub tls_ca: Option<std::path::PathBuf>,
    /// Operations in flight.
    pub concurrency: usize,
    /// HTTP/2 connections the operations are spread over.
    pub connections: usize,
    /// How long each scenario runs.
    pub budget: Budget,
    /// Size of the large blobs of `bs-write` and `bs-read`.
    pub blob_size: usize,
    /// Seed of the data generators.
    pub seed: u64,
}

/// Opens `options.connections` channels to the node.
pub async fn connect(options: &Options) -> Result<Vec<Channel>, String> {
    let uri = options
        .addr
        .replacen("grpcs://", "https://", 1)
        .replacen("grpc://", "http://", 1);
    let tls = match &options.tls_ca {
        Some(path) => {
            let ca = std::fs::read(path)
                .map_err(|error| format!("cannot read {}: {error}", path.display()))?;
            Some(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
        }
        None => None,
    };
    let mut channels = Vec::with_capacity(options.connections);
    for _ in 0..options.connections.max(1) {
        let mut endpoint = Endpoint::from_shared(uri.clone())
            .map_err(|error| format!("invalid address {}: {error}", options.addr))?;
        if uri.starts_with("https://") {
            let config = tls.clone().unwrap_or_default();
            endpoint = endpoint
                .tls_config(config)
                .map_err(|error| format!("TLS for {}: {error}", options.addr))?;
        }
        let endpoint = endpoint
            .tcp_nodelay(true)
            .initial_stream_window_size(Some(8 << 20))
            .initial_connection_window_size(Some(32 << 20));
        let channel = endpoint
            .connect()
            .await
            .map_err(|error| format!("cannot connect to {}: {error}", options.addr))?;
        channels.push(channel);
    }
    Ok(channels)
}

/// Tells tasks when to stop.
#[derive(Clone)]
pub struct Deadline {
    end: Option<Instant>,
    ops: std::sync::Arc<std::sync::atomic::AtomicU64>,
    max_ops: u64,
}

impl Deadline {
    /// A deadline for `budget`, starting now.
    pub fn new(budget: Budget) -> Self {
        let (end, max_ops) = match budget {
            Budget::Time(duration) => (Some(Instant::now() + duration), u64::MAX),
            Budget::Ops(ops) => (None, ops),
        };
        Self {
            end,
            ops: Default::default(),
            max_ops,
        }
    }

    /// Claims one more operation; `false` once the budget is spent.
    pub fn next(&self) -> bool {
        if self.end.is_some_and(|end| Instant::now() >= end) {
            return false;
        }
        self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < self.max_ops
    }
}
