//! The node's runtime and listeners: the one place that knows about glommio.
//!
//! Each shard is a glommio `LocalExecutor` on a thread pinned to its own core. The
//! gRPC (and HTTP) port is bound once and every shard accepts from it ([`listener`]);
//! a shard that gets more than its share hands the new connection to the least busy
//! one ([`balance`]). A connection then lives and dies on that core: hyper drives the
//! HTTP/2 (or HTTP/1.1) protocol on that executor, spawning its per-stream tasks with
//! `spawn_local`, and the handlers it calls are ordinary `Send` futures that talk to
//! the storage engine through channels. Keeping glommio behind this module means a move
//! to another io_uring runtime touches these few files only.
//!
//! Shutdown is cooperative: a stop signal makes every shard close its listeners, ask
//! its open connections to finish their in-flight requests (bounded by a grace
//! period), wait for the other shards to do the same, and then one of them asks the
//! engine to write its checkpoints and stop, which ends every shard's runner.

mod balance;
mod connections;
pub mod fd_limit;
mod hyper_glue;
mod inbound;
mod internal;
mod linger;
mod listener;
mod shard;
mod timeouts;
mod tls;

use crate::engine_errors::engine_error;
use crate::tls::Tls;
pub use inbound::ReceiveBudget;
pub use internal::Internal;
pub use timeouts::Timeouts;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_storage::{Engine, ShardRunner};
use glommio::{LocalExecutorBuilder, Placement};
use tokio::sync::{watch, Barrier};

use crate::error::{Error, Result};
use crate::http_cache::HttpFront;

/// What every shard serves, and where.
pub struct Serve {
    /// The gRPC listener's address.
    pub grpc_addr: SocketAddr,
    /// The HTTP listener's address, if any.
    pub http_addr: Option<SocketAddr>,
    /// The gRPC services.
    pub grpc: tonic::service::Routes,
    /// The HTTP cache protocol, metrics and health.
    pub http: HttpFront,
    /// TLS for both listeners; `None`: plaintext.
    pub tls: Option<Tls>,
    /// The loopback listener of the node's own scheduler and worker, when the public
    /// ones serve TLS (see `internal.rs`).
    pub internal: Option<Internal>,
    /// The engine, shut down once every shard has drained.
    pub engine: Engine,
    /// How long in-flight requests may take to finish once a stop was asked for.
    pub grace: Duration,
    /// The gauge of open connections per shard (label `shard`).
    pub connections: prometheus::IntGaugeVec,
    /// Most client connections served at once, over both listeners.
    pub max_connections: usize,
    /// Counts connections refused for `max_connections`.
    pub connections_refused: prometheus::IntCounter,
    /// Counts failed `accept` calls.
    pub accept_errors: prometheus::IntCounter,
    /// When connections are closed for never starting or for idleness, and how often
    /// HTTP/2 peers are pinged.
    pub timeouts: Timeouts,
    /// Counts connections closed by a timeout (label `reason`).
    pub timed_out: prometheus::IntCounterVec,
    /// The bytes of incomplete gRPC messages every connection shares.
    pub receiving: Arc<ReceiveBudget>,
    /// Most concurrent streams on one HTTP/2 connection.
    pub max_streams_per_connection: u32,
}

/// Runs one shard per runner until `stop` turns true, then drains and shuts the
/// engine down. Returns the first error any shard met.
pub fn run(serve: Serve, runners: Vec<ShardRunner>, stop: watch::Sender<bool>) -> Result<()> {
    let cpus = allowed_cpus();
    // The runtime behind `PingTimer` (see timeouts.rs): one thread, timers only.
    let timer_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("cairn-timer")
        .enable_time()
        .build()
        .map_err(|error| Error::internal(format!("cannot start the timer thread: {error}")))?;
    let (balancer, inboxes) =
        balance::Balancer::new(runners.len(), serve.connections, serve.max_connections);
    let (internal, internal_check) = match serve.internal {
        Some(internal) => {
            let check = internal.check();
            (Some(internal.socket), Some(check))
        }
        None => (None, None),
    };
    let shared = Arc::new(shard::Shared {
        grpc_addr: serve.grpc_addr,
        http_addr: serve.http_addr,
        grpc: serve.grpc,
        http: serve.http,
        tls: serve.tls,
        internal_check,
        engine: serve.engine,
        grace: serve.grace,
        stop: stop.clone(),
        ready: watch::Sender::new(None),
        drained: Barrier::new(runners.len()),
        failure: Mutex::new(None),
        balancer: Arc::new(balancer),
        connections_refused: serve.connections_refused,
        accept_errors: serve.accept_errors,
        listeners: Mutex::new(None),
        connection_settings: hyper_glue::ConnectionSettings {
            timeouts: serve.timeouts,
            timer: timeouts::PingTimer::new(timer_runtime.handle().clone()),
            expired: serve.timed_out,
            receiving: serve.receiving,
            max_streams: serve.max_streams_per_connection,
        },
    });
    let mut handles = Vec::with_capacity(runners.len());
    for (index, (runner, inbox)) in runners.into_iter().zip(inboxes).enumerate() {
        let cpu = cpus[index % cpus.len()];
        let shared = Arc::clone(&shared);
        let builder =
            LocalExecutorBuilder::new(Placement::Fixed(cpu)).name(&format!("shard-{index}"));
        match builder.spawn(move || shard::run(index, runner, shared, inbox)) {
            Ok(handle) => handles.push(handle),
            Err(error) => {
                // Shards already started would wait on the drain barrier for this one;
                // there is no way to join them, so the process reports and exits.
                stop.send_replace(true);
                return Err(Error::internal(format!(
                    "cannot start the executor of shard {index}: {error}"
                )));
            }
        }
    }
    let recovered = futures::executor::block_on(shared.engine.wait_ready())
        .map_err(engine_error)
        .and_then(|()| listener::Listeners::bind(shared.grpc_addr, shared.http_addr, internal));
    let shards = handles.len();
    let ready = match (recovered, shared.listeners.lock()) {
        (Ok(listeners), Ok(mut held)) => {
            *held = Some((listeners, shards));
            true
        }
        (Ok(_), Err(_)) => {
            shared.record(Error::internal("a shard panicked before the node listened"));
            false
        }
        (Err(error), _) => {
            shared.record(error);
            false
        }
    };
    shared.ready.send_replace(Some(ready));
    for (index, handle) in handles.into_iter().enumerate() {
        if let Err(error) = handle.join() {
            shared.record(Error::internal(format!("shard {index} crashed: {error}")));
        }
    }
    let failure = shared.failure.lock().map(|mut failure| failure.take());
    match failure {
        Ok(Some(error)) => Err(error),
        Ok(None) => Ok(()),
        Err(_) => Err(Error::internal("a shard panicked while reporting an error")),
    }
}

/// The CPUs this process may run on, so each shard can be pinned to its own.
fn allowed_cpus() -> Vec<usize> {
    // SAFETY: `cpu_set_t` is plain data; sched_getaffinity fills it for this thread.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the pointer and size describe the `set` above.
    let found =
        unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) };
    let cpus: Vec<usize> = if found == 0 {
        // SAFETY: `set` was filled by sched_getaffinity and the index is in range.
        (0..libc::CPU_SETSIZE as usize)
            .filter(|cpu| unsafe { libc::CPU_ISSET(*cpu, &set) })
            .collect()
    } else {
        Vec::new()
    };
    if cpus.is_empty() {
        vec![0]
    } else {
        cpus
    }
}

/// The number of CPUs this process may run on: the default shard count.
pub fn available_cores() -> usize {
    allowed_cpus().len()
}
