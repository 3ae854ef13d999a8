//! One shard's life: run the storage runner, accept connections until told to stop,
//! drain, and take part in the engine's shutdown.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cairn_storage::{Engine, ShardRunner};
use futures::future::{select, Either};
use glommio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Barrier};
use tokio_util::compat::FuturesAsyncReadCompatExt;

use super::balance::{Balancer, Handoff, Protocol, Slot};
use super::connections::Connections;
use super::hyper_glue;
use super::internal::TokenCheck;
use super::listener::{Listeners, ShardListeners};
use super::tls::{Stream, WithPeer};
use crate::engine_errors::engine_error;
use crate::error::{Error, Result};
use crate::http_cache::HttpFront;
use crate::tls::Tls;

/// What all shards share.
pub(super) struct Shared {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub grpc: tonic::service::Routes,
    pub http: HttpFront,
    /// TLS for both listeners, if configured.
    pub tls: Option<Tls>,
    /// The token the internal listener's callers must present, if it is open.
    pub internal_check: Option<TokenCheck>,
    pub engine: Engine,
    pub grace: Duration,
    pub stop: watch::Sender<bool>,
    /// Set once the engine has recovered every partition (`Some(true)`) or failed to.
    pub ready: watch::Sender<Option<bool>>,
    /// Every shard waits here after draining, so the engine stops only when no shard
    /// can send it another request.
    pub drained: Barrier,
    pub failure: Mutex<Option<Error>>,
    pub balancer: Arc<Balancer>,
    /// Connections closed at once because the node served `max_connections`.
    pub connections_refused: prometheus::IntCounter,
    /// Failed `accept` calls.
    pub accept_errors: prometheus::IntCounter,
    /// Timeouts, keepalive and their counter, for every connection.
    pub connection_settings: hyper_glue::ConnectionSettings,
    /// Bound once the engine has recovered, before `ready` says so, with the number
    /// of shards yet to take their copies.
    pub listeners: Mutex<Option<(Listeners, usize)>>,
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
pub(super) async fn run(
    index: usize,
    runner: ShardRunner,
    shared: Arc<Shared>,
    inbox: mpsc::UnboundedReceiver<Handoff>,
) {
    let runner = {
        let shared = Arc::clone(&shared);
        glommio::spawn_local(async move {
            if let Err(error) = runner.run().await {
                shared.record(engine_error(error));
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
        Some(Ok(ShardListeners {
            grpc,
            http,
            internal,
        })) => {
            if index == 0 {
                tracing::info!("serving gRPC on {}", shared.grpc_addr);
                if let Some(addr) = shared.http_addr {
                    tracing::info!("serving HTTP on {addr}");
                }
            }
            let here = Here {
                index,
                shared: &shared,
                connections: &connections,
            };
            let optional = |listener: Option<TcpListener>, protocol| async move {
                if let Some(listener) = listener {
                    accept_loop(listener, here, protocol).await;
                }
            };
            futures::join!(
                accept_loop(grpc, here, Protocol::Grpc),
                optional(http, Protocol::Http),
                optional(internal, Protocol::Internal),
                inbox_loop(inbox, here)
            );
        }
        Some(Err(error)) => shared.record(error),
    }
    connections.drained().await;
    if shared.drained.wait().await.is_leader() {
        tracing::info!("connections drained; writing checkpoints");
        if let Err(error) = shared.engine.shutdown().await {
            shared.record(engine_error(error));
        }
    }
    runner.await;
}

/// This shard's copies of the listening sockets. The last shard to take its copies
/// closes the originals, so that once every shard has stopped accepting, the ports
/// refuse new connections instead of queueing them unserved.
fn bind(shared: &Shared) -> Result<ShardListeners> {
    let mut held = shared
        .listeners
        .lock()
        .map_err(|_| Error::internal("a shard panicked while taking the listening sockets"))?;
    let Some((listeners, copies_left)) = held.as_mut() else {
        return Err(Error::internal("the listening sockets were not bound"));
    };
    let copies = listeners.for_this_shard();
    *copies_left -= 1;
    if *copies_left == 0 {
        *held = None;
    }
    copies
}

/// The shard a loop runs on, and what it serves with.
#[derive(Clone, Copy)]
struct Here<'a> {
    index: usize,
    shared: &'a Arc<Shared>,
    connections: &'a Rc<Connections>,
}

/// The first pause after `accept` fails for want of descriptors or memory; each
/// further failure doubles it, up to [`ACCEPT_PAUSE_MAX`].
const ACCEPT_PAUSE_MIN: Duration = Duration::from_millis(5);
const ACCEPT_PAUSE_MAX: Duration = Duration::from_secs(1);

/// Accepts connections until a stop is asked for, and serves each on the shard with
/// the fewest (see [`super::balance`]).
///
/// `accept` failing with EMFILE, ENFILE, ENOMEM or ENOBUFS leaves the connection in
/// the listen backlog, so retrying at once fails again at once: glommio's accept tries
/// the socket before it ever waits, and the loop spun without yielding, starving
/// every connection on the shard (their closes went unnoticed, holding the very
/// descriptors it lacked) and the stop signal with them. Such failures pause the loop,
/// longer each time, and log once per run of failures; the first success resets both.
async fn accept_loop(listener: TcpListener, here: Here<'_>, protocol: Protocol) {
    let mut stopped = Box::pin(stop_requested(here.shared.stop.subscribe()));
    let mut pause = ACCEPT_PAUSE_MIN;
    let mut failing = false;
    loop {
        let accepted = match select(Box::pin(listener.shared_accept()), stopped.as_mut()).await {
            Either::Left((accepted, _)) => accepted,
            Either::Right(((), _)) => return,
        };
        let stream = match accepted {
            Ok(stream) => {
                if failing {
                    tracing::info!("accepting connections again");
                }
                pause = ACCEPT_PAUSE_MIN;
                failing = false;
                stream
            }
            Err(error) => {
                let error = std::io::Error::from(error);
                here.shared.accept_errors.inc();
                let starved = matches!(
                    error.raw_os_error(),
                    Some(libc::EMFILE | libc::ENFILE | libc::ENOMEM | libc::ENOBUFS)
                );
                if !starved {
                    tracing::debug!("accept failed: {error}");
                    continue;
                }
                if !failing {
                    tracing::warn!(
                        "cannot accept connections: {error}; pausing (see max_connections \
                         and the open-file limit)"
                    );
                    failing = true;
                }
                let sleep = Box::pin(glommio::timer::sleep(pause));
                if let Either::Right(((), _)) = select(sleep, stopped.as_mut()).await {
                    return;
                }
                pause = (pause * 2).min(ACCEPT_PAUSE_MAX);
                continue;
            }
        };
        let Some(slot) = here.shared.balancer.place(here.index) else {
            // Closing at once tells the client to retry, where a connection left
            // unserved would hold a descriptor until it gave up.
            here.shared.connections_refused.inc();
            drop(stream.bind_to_executor());
            continue;
        };
        if slot.shard() == here.index {
            serve(stream.bind_to_executor(), here, protocol, slot);
        } else if let Err(stream) = slot.hand_over(stream, protocol) {
            let slot = here.shared.balancer.slot_on(here.index);
            serve(stream.bind_to_executor(), here, protocol, slot);
        }
    }
}

/// Serves the connections other shards hand over, until a stop is asked for.
async fn inbox_loop(mut inbox: mpsc::UnboundedReceiver<Handoff>, here: Here<'_>) {
    let mut stopped = Box::pin(stop_requested(here.shared.stop.subscribe()));
    loop {
        let handoff = match select(Box::pin(inbox.recv()), stopped.as_mut()).await {
            Either::Left((Some(handoff), _)) => handoff,
            Either::Left((None, _)) | Either::Right(((), _)) => return,
        };
        let stream = handoff.stream.bind_to_executor();
        serve(stream, here, handoff.protocol, handoff.slot);
    }
}

fn serve(stream: TcpStream, here: Here<'_>, protocol: Protocol, slot: Slot) {
    if let Err(error) = stream.set_nodelay(true) {
        tracing::debug!("cannot set TCP_NODELAY: {error}");
    }
    let guard = here.connections.open();
    let stop = stop_requested(here.shared.stop.subscribe());
    let shared = Arc::clone(here.shared);
    glommio::spawn_local(async move {
        let stream = match (&shared.tls, protocol) {
            (Some(tls), Protocol::Grpc) => handshake(tls.acceptors().grpc, stream, &shared).await,
            (Some(tls), Protocol::Http) => handshake(tls.acceptors().http, stream, &shared).await,
            (None, _) | (_, Protocol::Internal) => Some(Stream::Plain(stream.compat())),
        };
        let grace = shared.grace;
        let settings = &shared.connection_settings;
        match (stream, protocol) {
            (None, _) => {}
            (Some(stream), Protocol::Grpc) => {
                let routes = WithPeer {
                    inner: shared.grpc.clone(),
                    peer: stream.peer_names(),
                    require: None,
                };
                let (connection, watch) = hyper_glue::serve_http2(stream, routes, settings);
                hyper_glue::drive(connection, watch, stop, grace).await;
            }
            (Some(stream), Protocol::Internal) => {
                let Some(check) = shared.internal_check.clone() else {
                    return;
                };
                let routes = WithPeer {
                    inner: shared.grpc.clone(),
                    peer: None,
                    require: Some(check),
                };
                let (connection, watch) = hyper_glue::serve_http2(stream, routes, settings);
                hyper_glue::drive(connection, watch, stop, grace).await;
            }
            (Some(stream), Protocol::Http) => {
                let front = shared.http.clone().with_peer(stream.peer_names());
                let (connection, watch) = hyper_glue::serve_http1(stream, front, settings);
                hyper_glue::drive(connection, watch, stop, grace).await;
            }
        }
        drop((guard, slot));
    })
    .detach();
}

/// The TLS handshake of a new connection, bounded by the handshake timeout (the
/// HTTP-level handshake check starts only once it is done); `None` when it fails or
/// times out.
async fn handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    shared: &Shared,
) -> Option<Stream> {
    let limit = shared.connection_settings.timeouts.handshake;
    let accept = Box::pin(acceptor.accept(stream.compat()));
    match select(accept, Box::pin(glommio::timer::sleep(limit))).await {
        Either::Left((Ok(stream), _)) => Some(Stream::Tls(Box::new(stream))),
        Either::Left((Err(error), _)) => {
            tracing::debug!("TLS handshake failed: {error}");
            None
        }
        Either::Right(_) => {
            let expired = &shared.connection_settings.expired;
            expired.with_label_values(&["handshake"]).inc();
            tracing::debug!("closing a connection: TLS handshake timeout");
            None
        }
    }
}

/// Completes once a stop has been asked for (or the sender is gone).
async fn stop_requested(mut stop: watch::Receiver<bool>) {
    // An error means the sender was dropped, which only happens on the way out.
    let _ = stop.wait_for(|stopped| *stopped).await;
}
