//! Assembling a cache node from its configuration.
//!
//! The order matters: the engine opens first (it runs the environment checks —
//! io_uring available, locked-memory limit, O_DIRECT on the data directory — and turns
//! each failure into a sentence before any executor starts), then the services are
//! built over it, then the runtime starts one executor per shard, and signals are
//! wired to a graceful stop.
//!
//! With execution configured, the node also starts its scheduler and worker (see
//! [`crate::embedded`]) once the data directory exists and before it listens, and
//! serves Execution and Operations by forwarding to that scheduler. A stop signal then
//! stops the worker and the scheduler first, while the cache still serves the
//! worker's last uploads, and only then the node itself.

use std::path::Path;
use std::sync::{Arc, Mutex};

use cairn_proto::asset::fetch_server::FetchServer;
use cairn_proto::asset::push_server::PushServer;
use cairn_proto::bytestream::byte_stream_server::ByteStreamServer;
use cairn_proto::longrunning::operations_server::OperationsServer;
use cairn_proto::reapi::action_cache_server::ActionCacheServer;
use cairn_proto::reapi::capabilities_server::CapabilitiesServer;
use cairn_proto::reapi::content_addressable_storage_server::ContentAddressableStorageServer;
use cairn_proto::reapi::execution_server::ExecutionServer;
use cairn_storage::{Engine, EngineConfig};
use tokio::sync::watch;

use crate::auth::Access;
use crate::config::Config;
use crate::embedded::Embedded;
use crate::engine_errors::engine_error;
use crate::error::{Error, Result};
use crate::exec_common::random_name;
use crate::grpc_ac::ActionCacheService;
use crate::grpc_asset::AssetService;
use crate::grpc_bytestream::ByteStreamService;
use crate::grpc_capabilities::CapabilitiesService;
use crate::grpc_cas::CasService;
use crate::grpc_execution::{ExecutionService, Forwarder, OperationsService};
use crate::http_cache::HttpFront;
use crate::http_status::Sampler;
use crate::metrics::Metrics;
use crate::runtime::ReceiveBudget;
use crate::sink::Sink;
use crate::slow_tier::SlowTier;
use crate::store::{Limits, Store};
use crate::tree_walk::TreeWalks;
use crate::uploads::PendingUploads;
use crate::{runtime, signals};

/// Share of the available space the store may use when no size is configured.
const DEFAULT_BUDGET_SHARE: f64 = 0.9;

/// Memory budget of a sink when no size is configured.
const DEFAULT_SINK_BUDGET: u64 = 1 << 30;

/// Budget of the (idle) engine under a sink: large enough for any engine layout.
const SINK_ENGINE_BUDGET: u64 = 4 << 30;

/// Runs a cache node until SIGTERM or SIGINT, then shuts it down cleanly.
pub fn run(config: Config) -> Result<()> {
    config.check_security()?;
    let metrics = Arc::new(Metrics::new()?);
    let (access, internal_token) = access_policy(&config, &metrics)?;
    let tls = tls_acceptors(&config)?;
    crate::reload::reload_on_sighup()?;
    let shards = config.shards.unwrap_or_else(runtime::available_cores);
    if shards == 0 {
        return Err(Error::invalid_argument("shards must be at least 1"));
    }
    let fd_limit = runtime::fd_limit::raise().map_err(|error| {
        Error::internal(format!("cannot read or raise the open-file limit: {error}"))
    })?;
    if fd_limit.now != fd_limit.before {
        tracing::info!(
            "raised the open-file limit from {} to {}",
            fd_limit.before,
            fd_limit.now
        );
    }
    let mut clamped_by = 0;
    let max_size = match config.max_size {
        Some(size) if config.sink => size.0,
        Some(size) => {
            let (budget, by) = clamp_budget(size.0, &config.data_dir)?;
            clamped_by = by;
            budget
        }
        None if config.sink => DEFAULT_SINK_BUDGET,
        None => default_budget(&config.data_dir)?,
    };
    tracing::info!(
        "data in {} with a budget of {}, {shards} shards",
        config.data_dir.display(),
        crate::byte_size::ByteSize(max_size)
    );
    let (engine, runners) = Engine::open(EngineConfig {
        dir: config.data_dir.clone(),
        max_size: if config.sink {
            SINK_ENGINE_BUDGET
        } else {
            max_size
        },
        shards,
        replicate: config.s3.is_some(),
        durability: config.durability.into(),
        memory_cache: config
            .memory_cache
            .map_or_else(cairn_storage::default_memory_cache, |size| size.0),
        ..EngineConfig::default()
    })
    .map_err(engine_error)?;
    let mut max_cas_blob_size = config.max_cas_blob_size.0;
    if !config.sink && engine.max_blob_size() < max_cas_blob_size {
        // Advertising more than the engine takes would let clients start uploads that
        // can only fail with RESOURCE_EXHAUSTED.
        tracing::info!(
            "largest blob: {} (half a partition's own budget; max_cas_blob_size asks for {})",
            crate::byte_size::ByteSize(engine.max_blob_size()),
            config.max_cas_blob_size
        );
        max_cas_blob_size = engine.max_blob_size();
    }
    let limits = Limits {
        max_batch_total_size: config.max_batch_total_size.0,
        max_cas_blob_size,
    };
    metrics.set_budget_clamped(clamped_by);
    let mut store = Store::new(engine.clone(), limits, Arc::clone(&metrics));
    if config.sink {
        tracing::warn!("sink mode: blobs are kept in memory only, up to the budget");
        store = store.with_sink(Sink::new(max_size));
    }
    let mut slow_tier_runtime = None;
    if let Some(s3) = &config.s3 {
        let (slow_tier, runtime) = SlowTier::start(s3.clone(), engine.clone())?;
        store = store.with_slow_tier(slow_tier);
        slow_tier_runtime = Some(runtime);
    }
    let pending = Arc::new(PendingUploads::new(
        config.upload_resume(),
        metrics.parked_uploads(),
    ));
    let (sweeping, sweep_until) = std::sync::mpsc::channel();
    let sweeper = pending
        .sweep_until(sweep_until)
        .map_err(|error| Error::internal(format!("cannot start the upload sweeper: {error}")))?;
    let (stop, _) = watch::channel(false);
    let mut routes = grpc_routes(&store, pending, limits, config.execution.is_some(), &access);
    // Downloads spool under the data directory: a body can be as large as the largest
    // blob, more than memory or a tmpfs `/tmp` should hold.
    let (assets, assets_runtime) = AssetService::start(
        store.clone(),
        access.clone(),
        config.data_dir.join("asset-downloads"),
        config.asset_fetch_timeout()?,
    )?;
    routes = routes
        .add_service(FetchServer::new(assets.clone()))
        .add_service(PushServer::new(assets));
    let mut execution = None;
    let mut scheduler_http = None;
    let mut internal = None;
    let mut scheduler_token = None;
    if let Some(settings) = &config.execution {
        // Behind TLS, the node's own scheduler and worker use a loopback port of their
        // own, always with the node's token (see runtime/internal.rs).
        let (cache, token) = match (&tls, internal_token) {
            (Some(_), token) => {
                let token = token.unwrap_or_else(new_token);
                let listener = runtime::Internal::bind(&token)?;
                let addr = listener.addr()?;
                internal = Some(listener);
                (addr, Some(token))
            }
            (None, token) => (config.listen, token),
        };
        let embedded = Embedded::start(
            cache,
            &config.data_dir,
            settings,
            runtime::available_cores(),
            config.shutdown_grace(),
            token.as_deref(),
        )?;
        scheduler_http = Some(embedded.scheduler_http());
        let (forwarder, forwarding) =
            Forwarder::start(&embedded.scheduler_url(), token.as_deref())?;
        scheduler_token = token;
        routes = routes
            .add_service(ExecutionServer::new(ExecutionService::new(
                forwarder.clone(),
                access.clone(),
            )))
            .add_service(OperationsServer::new(OperationsService::new(
                forwarder,
                access.clone(),
            )));
        let embedded = Arc::new(Mutex::new(embedded));
        stop_children_first(Arc::clone(&embedded), stop.clone())?;
        execution = Some((embedded, forwarding));
    } else {
        signals::stop_on_signal(stop.clone())?;
    }
    let max_connections = config.max_connections.unwrap_or_else(|| {
        let partitions = u64::from(engine.partitions());
        let derived = runtime::fd_limit::default_max_connections(fd_limit.now, partitions);
        usize::try_from(derived).unwrap_or(usize::MAX)
    });
    tracing::info!(
        "serving at most {max_connections} connections (open-file limit {})",
        fd_limit.now
    );
    metrics.set_limits(max_connections, fd_limit.now);
    let status = Sampler::start(store.clone(), scheduler_http, scheduler_token)?;
    let serve = runtime::Serve {
        grpc_addr: config.listen,
        http_addr: config.http_listen,
        grpc: routes,
        http: HttpFront::new(store, access).with_status(status.board()),
        tls,
        internal,
        engine,
        grace: config.shutdown_grace(),
        connections: metrics.connections(),
        max_connections,
        connections_refused: metrics.connections_refused(),
        accept_errors: metrics.accept_errors(),
        timeouts: config.connection_timeouts()?,
        timed_out: metrics.connections_timed_out(),
        receiving: {
            let (held, refused) = metrics.receiving();
            Arc::new(ReceiveBudget::new(
                config.max_receiving_bytes.0,
                held,
                refused,
            ))
        },
        max_streams_per_connection: config.max_streams_per_connection,
    };
    let served = runtime::run(serve, runners, stop);
    if let Some((embedded, _forwarding)) = execution {
        // Already done after a signal; needed when the node stopped on an error.
        if let Ok(mut embedded) = embedded.lock() {
            embedded.stop();
        }
    }
    drop(sweeping);
    if sweeper.join().is_err() {
        tracing::error!("the upload sweeper panicked");
    }
    drop(assets_runtime);
    drop(slow_tier_runtime);
    served?;
    tracing::info!("stopped cleanly");
    Ok(())
}

/// Routes the first SIGTERM or SIGINT through stopping `embedded` (worker, then
/// scheduler) before `stop` tells the node to stop.
fn stop_children_first(embedded: Arc<Mutex<Embedded>>, stop: watch::Sender<bool>) -> Result<()> {
    let (signalled, mut received) = watch::channel(false);
    signals::stop_on_signal(signalled)?;
    std::thread::Builder::new()
        .name("exec-stop".to_string())
        .spawn(move || {
            if futures::executor::block_on(received.wait_for(|stopping| *stopping)).is_ok() {
                if let Ok(mut embedded) = embedded.lock() {
                    embedded.stop();
                }
            }
            stop.send_replace(true);
        })
        .map_err(|error| Error::internal(format!("cannot start the stop thread: {error}")))?;
    Ok(())
}

/// The access policy of `config` (its auth file, read in full now so a malformed one
/// stops the node before anything binds, then watched for changes) and, when it asks
/// for credentials and the node runs execution, the token the node's own scheduler
/// and worker present: random per process, never written anywhere but the data
/// directory (mode 0600).
fn access_policy(config: &Config, metrics: &Metrics) -> Result<(Access, Option<String>)> {
    let access = match &config.auth {
        Some(path) => Access::from_file(path, config.read_only, metrics.auth_failures())?,
        None => Access::open(config.read_only, metrics.auth_failures()),
    };
    if config.read_only {
        tracing::info!("read-only: every write is refused");
    }
    if !access.enforced() || config.execution.is_none() {
        access.watch(metrics.auth_reloads())?;
        return Ok((access, None));
    }
    let token = new_token();
    let access = access.with_internal_token(&token);
    access.watch(metrics.auth_reloads())?;
    Ok((access, Some(token)))
}

/// A bearer token for the node's own scheduler and worker: random per process.
fn new_token() -> String {
    format!("{}{}", random_name(), random_name())
}

/// The TLS settings of `config`, read now so that unusable files stop the node
/// before anything binds, and reloaded when the files change.
fn tls_acceptors(config: &Config) -> Result<Option<crate::tls::Tls>> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let acceptors = crate::tls::Tls::start(cert, key, config.tls_client_ca.as_deref())?;
            tracing::info!(
                "TLS on every listener{}",
                if config.tls_client_ca.is_some() {
                    ", client certificates required"
                } else {
                    ""
                }
            );
            Ok(Some(acceptors))
        }
        (None, None) if config.tls_client_ca.is_none() => Ok(None),
        (None, None) => Err(Error::invalid_argument(
            "--tls-client-ca needs --tls-cert and --tls-key",
        )),
        _ => Err(Error::invalid_argument(
            "--tls-cert and --tls-key go together",
        )),
    }
}

/// Every cache service of the node, accepting messages as large as a full batch;
/// `execution` says whether the capabilities advertise remote execution; `access`
/// decides who may call what.
fn grpc_routes(
    store: &Store,
    pending: Arc<PendingUploads>,
    limits: Limits,
    execution: bool,
    access: &Access,
) -> tonic::service::Routes {
    let trees = Arc::new(TreeWalks::default());
    // A batch at the limit plus its framing must decode, so an over-limit batch reaches
    // the handler and gets a clear INVALID_ARGUMENT rather than a transport error.
    let message_limit = usize::try_from(limits.max_batch_total_size)
        .unwrap_or(usize::MAX)
        .saturating_mul(2)
        .saturating_add(1 << 20);
    tonic::service::Routes::new(
        CapabilitiesServer::new(CapabilitiesService::new(
            store.clone(),
            execution,
            access.clone(),
        ))
        .max_decoding_message_size(message_limit),
    )
    .add_service(
        ContentAddressableStorageServer::new(CasService::new(store.clone(), trees, access.clone()))
            .max_decoding_message_size(message_limit),
    )
    .add_service(
        ActionCacheServer::new(ActionCacheService::new(store.clone(), access.clone()))
            .max_decoding_message_size(message_limit),
    )
    .add_service(
        ByteStreamServer::new(ByteStreamService::new(
            store.clone(),
            pending,
            access.clone(),
        ))
        .max_decoding_message_size(message_limit),
    )
}

/// 90% of the space available to `dir`: the free space of its filesystem plus what the
/// directory already holds (so the budget does not shrink as the store fills).
fn default_budget(dir: &Path) -> Result<u64> {
    let (free, held) = space(dir)?;
    Ok(((free + held) as f64 * DEFAULT_BUDGET_SHARE) as u64)
}

/// The free space of `dir`'s filesystem and the bytes `dir` already holds.
fn space(dir: &Path) -> Result<(u64, u64)> {
    Ok((free_space(dir)?, directory_size(dir)))
}

/// `asked`, or, when the data directory can never hold that much, 90% of what it can
/// (the default budget), with a warning; also returns by how much it was lowered. A
/// budget the disk cannot hold is never reached: the disk fills first, and with
/// segments preallocated to a share of the budget it fills long before the store holds
/// as much as the disk does. The 10% kept back covers index checkpoints (two exist
/// while one is replaced), the manifest and filesystem metadata.
fn clamp_budget(asked: u64, dir: &Path) -> Result<(u64, u64)> {
    let (free, held) = space(dir)?;
    let fits = ((free + held) as f64 * DEFAULT_BUDGET_SHARE) as u64;
    if asked <= fits {
        return Ok((asked, 0));
    }
    tracing::warn!(
        "max_size {} is more than the data directory can ever hold ({} free on its \
         filesystem plus {} it holds): using a budget of {} instead (90% of that)",
        crate::byte_size::ByteSize(asked),
        crate::byte_size::ByteSize(free),
        crate::byte_size::ByteSize(held),
        crate::byte_size::ByteSize(fits)
    );
    Ok((fits, asked - fits))
}

/// Bytes available to unprivileged users on the filesystem that holds (or will hold)
/// `dir`.
fn free_space(dir: &Path) -> Result<u64> {
    let existing = dir
        .ancestors()
        .find(|candidate| candidate.exists())
        .unwrap_or_else(|| Path::new("."));
    let existing = if existing.as_os_str().is_empty() {
        Path::new(".")
    } else {
        existing
    };
    let path = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes())
        .map_err(|_| Error::invalid_argument("the data directory path contains a NUL byte"))?;
    // SAFETY: statvfs only writes into the struct passed; the path is NUL-terminated.
    let mut stats: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the duration of the call.
    if unsafe { libc::statvfs(path.as_ptr(), &mut stats) } != 0 {
        return Err(Error::internal(format!(
            "cannot measure free space at {}: {}",
            existing.display(),
            std::io::Error::last_os_error()
        )));
    }
    Ok(stats.f_bavail as u64 * stats.f_frsize as u64)
}

/// The total size of the files under `dir` (zero if it does not exist).
fn directory_size(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|entry| match entry.file_type() {
            Ok(kind) if kind.is_dir() => directory_size(&entry.path()),
            Ok(_) => entry.metadata().map(|meta| meta.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}
