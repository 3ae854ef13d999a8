//! One shard's life: run the storage runner, accept connections until told to stop,
//! drain, and take part in the engine's shutdown.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_storage::{Engine, ShardRunner};
use futures::future::{select, Either};
use glommio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Barrier};

use super::connections::Connections;
use super::hyper_glue;
use crate::error::{Error, Result};
use crate::http_cache::HttpFront;

/// What all shards share.
pub(super) struct Shared {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub grpc: tonic::service::Routes,
    pub http: HttpFront,
    pub engine: Engine,
    pub grace: Duration,
    pub stop: watch::Sender<bool>,
    /// Set once the engine has recovered every partition (`Some(true)`) or failed to.
    pub ready: watch::Sender<Option<bool>>,
    /// Every shard waits here after draining, so the engine stops only when no shard
    /// can send it another request.
    pub drained: Barrier,
    pub failure: Mutex<Option<Error>>,
}

impl Shared {
    /// Keeps the first error and asks every shard to stop.
    pub fn record(&self, error: Error) {
        tracing::error!("{error}");
        if let Ok(mut failure) = self.failure.lock() {
            failure.get_or_insert(error);
        }
        self.stop.send_replace(true);
    }
}

/// The body of shard `index`'s executor.
pub(super) async fn run(index: usize, runner: ShardRunner, shared: Arc<Shared>) {
    let runner = {
        let shared = Arc::clone(&shared);
        glommio::spawn_local(async move {
            if let Err(error) = runner.run().await {
                shared.record(Error::from(error));
            }
        })
    };
    let connections = Rc::new(Connections::default());
    let recovered = matches!(
        shared
            .ready
            .subscribe()
            .wait_for(Option::is_some)
            .await
            .as_deref(),
        Ok(Some(true))
    );
    let listeners = if recovered { Some(bind(&shared)) } else { None };
    match listeners {
        None => {}
        Some(Ok((grpc, http))) => {
            if index == 0 {
                tracing::info!("serving gRPC on {}", shared.grpc_addr);
                if let Some(addr) = shared.http_addr {
                    tracing::info!("serving HTTP on {addr}");
                }
            }
            let grpc_loop = accept_loop(grpc, &shared, &connections, Protocol::Grpc);
            match http {
                Some(http) => {
                    let http_loop = accept_loop(http, &shared, &connections, Protocol::Http);
                    futures::join!(grpc_loop, http_loop);
                }
                None => grpc_loop.await,
            }
        }
        Some(Err(error)) => shared.record(error),
    }
    connections.drained().await;
    if shared.drained.wait().await.is_leader() {
        tracing::info!("connections drained; writing checkpoints");
        if let Err(error) = shared.engine.shutdown().await {
            shared.record(Error::from(error));
        }
    }
    runner.await;
}

fn bind(shared: &Shared) -> Result<(TcpListener, Option<TcpListener>)> {
    let grpc = TcpListener::bind(shared.grpc_addr).map_err(|error| {
        Error::internal(format!("cannot listen on {}: {error}", shared.grpc_addr))
    })?;
    let http = match shared.http_addr {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .map_err(|error| Error::internal(format!("cannot listen on {addr}: {error}")))?,
        ),
        None => None,
    };
    Ok((grpc, http))
}

#[derive(Clone, Copy)]
enum Protocol {
    Grpc,
    Http,
}

/// Accepts connections until a stop is asked for; each one is served on this core.
async fn accept_loop(
    listener: TcpListener,
    shared: &Arc<Shared>,
    connections: &Rc<Connections>,
    protocol: Protocol,
) {
    let mut stopped = Box::pin(stop_requested(shared.stop.subscribe()));
    loop {
        let accepted = match select(Box::pin(listener.accept()), stopped.as_mut()).await {
            Either::Left((accepted, _)) => accepted,
            Either::Right(((), _)) => return,
        };
        match accepted {
            Ok(stream) => serve(stream, shared, connections, protocol),
            Err(error) => tracing::warn!("accept failed: {error}"),
        }
    }
}

fn serve(
    stream: TcpStream,
    shared: &Arc<Shared>,
    connections: &Rc<Connections>,
    protocol: Protocol,
) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {error}");
    }
    let guard = connections.open();
    let stop = stop_requested(shared.stop.subscribe());
    let grace = shared.grace;
    let task = match protocol {
        Protocol::Grpc => {
            let connection = hyper_glue::serve_http2(stream, shared.grpc.clone());
            glommio::spawn_local(async move {
                hyper_glue::drive(connection, stop, grace).await;
                drop(guard);
            })
        }
        Protocol::Http => {
            let connection = hyper_glue::serve_http1(stream, shared.http.clone());
            glommio::spawn_local(async move {
                hyper_glue::drive(connection, stop, grace).await;
                drop(guard);
            })
        }
    };
    task.detach();
}

/// Completes once a stop has been asked for (or the sender is gone).
async fn stop_requested(mut stop: watch::Receiver<bool>) {
    // An error means the sender was dropped, which only happens on the way out.
    let _ = stop.wait_for(|stopped| *stopped).await;
}
