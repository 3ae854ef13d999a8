//! `cairn-scheduler`: REAPI remote execution in front of a cache node.
//!
//! Clients (Bazel) send Execute here; the scheduler answers from the action cache when
//! it can, otherwise queues the action and hands it to a worker that connected over
//! the worker protocol (`proto/cairn/worker/v1`). Workers fetch inputs from and upload
//! outputs to the cache node directly, so blob traffic never passes through the
//! scheduler: it only reads the (small) Action and Command to learn an action's
//! platform properties and timeout.
//!
//! The scheduler is a tokio program on tonic's transport. It never starts glommio or
//! the storage engine, so it runs on hosts without io_uring. The modules: [`config`]
//! (settings), [`intake`] (reading an Execute), [`matching`] (platform properties),
//! [`state`] (operations, jobs, queue and workers in memory), [`redis_state`] and
//! [`redis_scripts`] (the same in Redis, shared by several schedulers), [`backend`]
//! (either), [`service`] (the gRPC front), and [`http`] and [`metrics`] (`/metrics`
//! and the status page on `--http-listen`).

pub mod backend;
pub mod config;
pub mod http;
pub mod intake;
pub mod matching;
pub mod metrics;
pub mod redis_scripts;
pub mod redis_state;
pub mod service;
pub mod state;

use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;

use cairn_proto::longrunning::operations_server::OperationsServer;
use cairn_proto::reapi::capabilities_server::CapabilitiesServer;
use cairn_proto::reapi::execution_server::ExecutionServer;
use cairn_proto::worker::worker_api_server::WorkerApiServer;
use tokio_stream::wrappers::TcpListenerStream;

use crate::auth::Access;
use crate::client_tls::ClientTls;
use crate::error::{Error, Result};
use crate::exec_common::{cache_channel, read_token_file, write_ready_file};
use crate::tls::Tls;
use backend::Backend;
use config::SchedulerConfig;
use redis_state::RedisScheduler;
use service::{CapabilitiesService, ExecutionService, OperationsService, WorkerService};
use state::{Scheduler, TICK};

/// Serves until `shutdown` resolves. Once the listener is bound, logs
/// `cairn-scheduler listening on ADDR` and, if `ready_file` is given, writes the
/// bound address (`IP:PORT`) into it, which is how a parent process that passed port
/// 0 learns the port; `http_ready_file` gets the HTTP listener's, before `ready_file`.
pub async fn serve(
    config: SchedulerConfig,
    ready_file: Option<PathBuf>,
    http_ready_file: Option<PathBuf>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    config.check_security()?;
    let token = config
        .token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    let client_tls = ClientTls::from_files(
        config.tls_ca.as_ref(),
        config.tls_cert.as_ref(),
        config.tls_key.as_ref(),
    )?;
    let cache = cache_channel(&config.cache, token.as_deref(), &client_tls)?;
    let access = access_policy(&config)?;
    let tls = server_tls(&config)?;
    crate::reload::reload_on_sighup()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|error| {
            Error::new(
                crate::ErrorKind::Unavailable,
                format!("cannot listen on {}: {error}", config.listen),
            )
        })?;
    let address = listener.local_addr()?;
    let http_listen = config.http_listen;
    let mut background = Vec::new();
    let scheduler: Backend = match config.redis.clone() {
        None => Scheduler::new(config, cache.clone()).into(),
        Some(url) => {
            let client = redis_state::client(&url)?;
            let state = RedisScheduler::new(config, cache.clone(), client)?;
            tracing::info!(
                "the scheduler's state is in Redis at {}",
                url.rsplit('@').next().unwrap_or(&url)
            );
            background.push(tokio::spawn(Arc::clone(&state).follow_events()));
            background.push(tokio::spawn(Arc::clone(&state).dispatch_forever()));
            state.into()
        }
    };
    let _status = http::start(
        http_listen,
        &scheduler,
        access.clone(),
        http_ready_file.as_deref(),
    )
    .await?;
    let ticker = {
        let scheduler = scheduler.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                scheduler.tick().await;
            }
        })
    };
    tracing::info!(
        "cairn-scheduler listening on {address}{}",
        if tls.is_some() { " (TLS)" } else { "" }
    );
    if let Some(path) = &ready_file {
        write_ready_file(path, &address.to_string())?;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        .add_service(ExecutionServer::new(ExecutionService::new(
            scheduler.clone(),
            access.clone(),
        )))
        .add_service(OperationsServer::new(OperationsService::new(
            scheduler.clone(),
            access.clone(),
        )))
        .add_service(CapabilitiesServer::new(CapabilitiesService::new(
            cache,
            access.clone(),
        )))
        .add_service(
            WorkerApiServer::new(WorkerService::new(scheduler, access))
                .max_decoding_message_size(64 << 20),
        );
    let stopped = async {
        let _ = stopped.await;
    };
    let server: std::pin::Pin<Box<dyn Future<Output = std::result::Result<(), _>> + Send>> =
        match tls {
            None => Box::pin(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped),
            ),
            Some(tls) => {
                Box::pin(router.serve_with_incoming_shutdown(tls_incoming(listener, tls), stopped))
            }
        };
    tokio::pin!(server);
    // Worker sessions and Execute streams never end by themselves, so a graceful stop
    // gives them a moment to see the listener close and then ends regardless.
    let served = tokio::select! {
        served = &mut server => served,
        () = shutdown => {
            let _ = stop.send(());
            tokio::time::timeout(SHUTDOWN_GRACE, server).await.unwrap_or(Ok(()))
        }
    };
    ticker.abort();
    for task in background {
        task.abort();
    }
    served.map_err(|error| Error::internal(format!("server failed: {error}")))
}

/// The access policy of `config`: its auth file, read in full now so a malformed one
/// stops the scheduler before it binds, then watched for changes.
fn access_policy(config: &SchedulerConfig) -> Result<Access> {
    let failures = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "cairn_scheduler_auth_failures_total",
            "Requests refused by the auth policy, by reason.",
        ),
        &["reason"],
    )
    .map_err(|error| Error::internal(format!("auth metrics: {error}")))?;
    let reloads = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "cairn_scheduler_auth_reloads_total",
            "Changes of the auth file seen, by result.",
        ),
        &["result"],
    )
    .map_err(|error| Error::internal(format!("auth metrics: {error}")))?;
    let access = match &config.auth {
        Some(path) => Access::from_file(path, false, failures)?,
        None => Access::open(false, failures),
    };
    access.watch(reloads)?;
    Ok(access)
}

/// The listener's TLS settings, loaded now so unusable files stop the scheduler before
/// it binds.
fn server_tls(config: &SchedulerConfig) -> Result<Option<Tls>> {
    match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => Ok(Some(Tls::start(
            cert,
            key,
            config.tls_client_ca.as_deref(),
        )?)),
        (None, None) if config.tls_client_ca.is_none() => Ok(None),
        (None, None) => Err(Error::invalid_argument(
            "--tls-client-ca needs --tls-cert and --tls-key",
        )),
        _ => Err(Error::invalid_argument(
            "--tls-cert and --tls-key go together",
        )),
    }
}

/// The connections of `listener` once their TLS handshakes (with the acceptor in
/// force when each arrived) succeed. Handshakes run as tasks of their own, so a client
/// that connects and says nothing holds up no one else; failed ones are logged at
/// debug level and dropped.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    tls: Tls,
) -> impl futures::Stream<Item = std::io::Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>>
{
    let (ready, incoming) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (socket, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!("accept failed: {error}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let _ = socket.set_nodelay(true);
            let acceptor = tls.acceptors().grpc;
            let sender = ready.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(socket)).await {
                    Ok(Ok(stream)) => {
                        let _ = sender.send(Ok(stream)).await;
                    }
                    Ok(Err(error)) => tracing::debug!("TLS handshake with {peer} failed: {error}"),
                    Err(_) => tracing::debug!("TLS handshake with {peer} timed out"),
                }
            });
            if ready.is_closed() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(incoming)
}

/// How long a client has to complete its TLS handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The pause after a failed accept (out of file descriptors, say) before the next.
const ACCEPT_BACKOFF: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a stopping scheduler waits for open streams.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
