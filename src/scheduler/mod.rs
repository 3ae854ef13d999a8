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
//! (settings), [`matching`] (platform properties), [`state`] (operations, jobs,
//! queue and workers), [`service`] (the gRPC front), and [`http`] and [`metrics`]
//! (`/metrics` and the status page on `--http-listen`).

pub mod config;
pub mod http;
pub mod matching;
pub mod metrics;
pub mod service;
pub mod state;

use std::future::Future;
use std::path::PathBuf;

use cairn_proto::longrunning::operations_server::OperationsServer;
use cairn_proto::reapi::capabilities_server::CapabilitiesServer;
use cairn_proto::reapi::execution_server::ExecutionServer;
use cairn_proto::worker::worker_api_server::WorkerApiServer;
use tokio_stream::wrappers::TcpListenerStream;

use crate::error::{Error, Result};
use crate::exec_common::{cache_channel, read_token_file, write_ready_file};
use config::SchedulerConfig;
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
    let token = config
        .token_file
        .as_deref()
        .map(read_token_file)
        .transpose()?;
    let cache = cache_channel(&config.cache, token.as_deref())?;
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
    let scheduler = Scheduler::new(config, cache.clone());
    let _status = http::start(http_listen, &scheduler, http_ready_file.as_deref()).await?;
    let ticker = {
        let scheduler = scheduler.clone();
        tokio::spawn(async move {
            let mut interval = tokio::time::interval(TICK);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                scheduler.tick();
            }
        })
    };
    tracing::info!("cairn-scheduler listening on {address}");
    if let Some(path) = &ready_file {
        write_ready_file(path, &address.to_string())?;
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .add_service(ExecutionServer::new(ExecutionService::new(
            scheduler.clone(),
        )))
        .add_service(OperationsServer::new(OperationsService::new(
            scheduler.clone(),
        )))
        .add_service(CapabilitiesServer::new(CapabilitiesService::new(cache)))
        .add_service(
            WorkerApiServer::new(WorkerService::new(scheduler)).max_decoding_message_size(64 << 20),
        )
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
            let _ = stopped.await;
        });
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
    served.map_err(|error| Error::internal(format!("server failed: {error}")))
}

/// How long a stopping scheduler waits for open streams.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(2);
