//! Serving hyper connections on glommio sockets.
//!
//! glommio's `TcpStream` speaks the `futures` I/O traits; tokio-util's compat layer
//! turns them into tokio's, and hyper-util's `TokioIo` into hyper's. hyper needs an
//! executor for the tasks of an HTTP/2 connection: [`LocalSpawner`] spawns them on the
//! current glommio executor, so a connection's streams all run on the core that
//! accepted it. Handlers are `Send` (tonic requires it), but nothing here needs to be.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::{select, Either};
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;

use super::inbound::{Metered, ReceiveBudget};
use super::linger::{self, Home, Lent};
use super::timeouts::{
    Activity, Counted, Expired, PingTimer, Timeouts, Watched, HTTP2_HANDSHAKE_BYTES, PING_ANSWER,
};
use super::tls::{Stream, WithPeer};
use crate::http_cache::HttpFront;
use crate::traces::Traced;

type Io = TokioIo<Watched<Lent<Stream>>>;

/// hyper's executor: spawns a connection's tasks on the current glommio executor.
#[derive(Clone, Copy)]
pub(super) struct LocalSpawner;

impl<F> hyper::rt::Executor<F> for LocalSpawner
where
    F: Future + 'static,
{
    fn execute(&self, future: F) {
        glommio::spawn_local(future).detach();
    }
}

/// An HTTP/2 connection serving the gRPC routes.
pub(super) type GrpcConnection =
    http2::Connection<Io, Counted<Metered<TowerToHyperService<Traced<GrpcService>>>>, LocalSpawner>;

/// The gRPC routes, with the connection's client-certificate names.
pub(super) type GrpcService = WithPeer<tonic::service::Routes>;

/// An HTTP/1.1 connection serving the HTTP cache protocol.
pub(super) type HttpConnection = http1::Connection<Io, Counted<HttpFront>>;

/// What a connection's driver watches to close it when it expires.
pub(super) struct Watch {
    activity: Arc<Activity>,
    timeouts: Timeouts,
    /// Bytes a client must send to be past its handshake (0: hyper checks it).
    handshake_bytes: u64,
    /// Counts connections closed, by reason (`handshake`, `idle`).
    expired: prometheus::IntCounterVec,
    /// Where the socket returns when hyper drops the connection, to be closed
    /// without losing the tail of a response (`linger.rs`).
    home: Home<Stream>,
}

/// The HTTP/2 window sizes: large enough that a stream of 1 MiB writes never waits
/// for a window update on a low-latency link.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

/// What every connection is served with besides its socket.
#[derive(Clone)]
pub(super) struct ConnectionSettings {
    pub timeouts: Timeouts,
    pub timer: PingTimer,
    pub expired: prometheus::IntCounterVec,
    /// What every gRPC request body is charged against (`inbound.rs`).
    pub receiving: Arc<ReceiveBudget>,
    /// Most concurrent streams a client may open on one connection.
    pub max_streams: u32,
}

pub(super) fn serve_http2(
    stream: Stream,
    routes: GrpcService,
    settings: &ConnectionSettings,
) -> (GrpcConnection, Watch) {
    let activity = Activity::new();
    let (socket, home) = Lent::new(stream);
    let connection = http2::Builder::new(LocalSpawner)
        .timer(settings.timer.clone())
        .keep_alive_interval(settings.timeouts.keepalive)
        .keep_alive_timeout(settings.timeouts.keepalive.min(PING_ANSWER))
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(1 << 20)
        .max_concurrent_streams(settings.max_streams)
        .serve_connection(
            TokioIo::new(Watched::new(socket, Arc::clone(&activity))),
            Counted::new(
                Metered::new(
                    TowerToHyperService::new(Traced(routes)),
                    Arc::clone(&settings.receiving),
                ),
                Arc::clone(&activity),
            ),
        );
    let watch = Watch {
        activity,
        timeouts: settings.timeouts,
        handshake_bytes: HTTP2_HANDSHAKE_BYTES,
        expired: settings.expired.clone(),
        home,
    };
    (connection, watch)
}

pub(super) fn serve_http1(
    stream: Stream,
    front: HttpFront,
    settings: &ConnectionSettings,
) -> (HttpConnection, Watch) {
    let activity = Activity::new();
    let (socket, home) = Lent::new(stream);
    let connection = http1::Builder::new()
        .timer(settings.timer.clone())
        .header_read_timeout(settings.timeouts.handshake)
        .serve_connection(
            TokioIo::new(Watched::new(socket, Arc::clone(&activity))),
            Counted::new(front, Arc::clone(&activity)),
        );
    let watch = Watch {
        activity,
        timeouts: settings.timeouts,
        handshake_bytes: 0,
        expired: settings.expired.clone(),
        home,
    };
    (connection, watch)
}

/// A hyper connection that can be asked to finish its in-flight requests and close.
pub(super) trait Graceful: Future<Output = hyper::Result<()>> {
    fn graceful_shutdown(self: Pin<&mut Self>);
}

impl Graceful for GrpcConnection {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http2::Connection::graceful_shutdown(self);
    }
}

impl Graceful for HttpConnection {
    fn graceful_shutdown(self: Pin<&mut Self>) {
        http1::Connection::graceful_shutdown(self);
    }
}

/// Serves `connection` until it ends, it expires (see `timeouts.rs`) or `stop`
/// completes; an idle connection and a stopping node let in-flight requests finish
/// for at most `grace`, then drop the connection. The socket is then closed so that
/// the client still receives everything written to it (`linger.rs`), except after a
/// handshake timeout: a client that never spoke has nothing to receive.
pub(super) async fn drive<C: Graceful>(
    connection: C,
    watch: Watch,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut connection = Box::pin(connection);
    let mut stop = Box::pin(stop);
    let outcome = loop {
        let deadline = match watch.activity.check(&watch.timeouts, watch.handshake_bytes) {
            Ok(deadline) => deadline,
            Err(expired) => {
                watch.expired.with_label_values(&[expired.label()]).inc();
                tracing::debug!("closing a connection: {} timeout", expired.label());
                if expired == Expired::Handshake {
                    return;
                }
                break finish(connection.as_mut(), grace).await;
            }
        };
        let wait = glommio::timer::sleep(deadline.saturating_duration_since(Instant::now()));
        let stopping =
            match select(connection.as_mut(), select(stop.as_mut(), Box::pin(wait))).await {
                Either::Left((outcome, _)) => break outcome,
                Either::Right((Either::Left(_), _)) => true,
                Either::Right((Either::Right(_), _)) => false,
            };
        if stopping {
            break finish(connection.as_mut(), grace).await;
        }
    };
    if let Err(error) = outcome {
        tracing::debug!("connection ended: {error:?}");
    }
    drop(connection);
    if let Some(socket) = watch.home.take() {
        linger::close(socket.into_socket()).await;
    }
}

/// Asks `connection` to finish its in-flight requests and close, waiting at most
/// `grace`.
async fn finish<C: Graceful>(mut connection: Pin<&mut C>, grace: Duration) -> hyper::Result<()> {
    connection.as_mut().graceful_shutdown();
    match select(connection, Box::pin(glommio::timer::sleep(grace))).await {
        Either::Left((outcome, _)) => outcome,
        Either::Right(_) => {
            tracing::debug!("closing a connection still busy after the grace period");
            Ok(())
        }
    }
}
