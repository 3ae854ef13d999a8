//! Serving hyper connections on glommio sockets.
//!
//! glommio's `TcpStream` speaks the `futures` I/O traits; tokio-util's compat layer
//! turns them into tokio's, and hyper-util's `TokioIo` into hyper's. hyper needs an
//! executor for the tasks of an HTTP/2 connection: [`LocalSpawner`] spawns them on the
//! current glommio executor, so a connection's streams all run on the core that
//! accepted it. Handlers are `Send` (tonic requires it), but nothing here needs to be.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures::future::{select, Either};
use glommio::net::TcpStream;
use hyper::server::conn::{http1, http2};
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt};

use crate::http_cache::HttpFront;

type Io = TokioIo<Compat<TcpStream>>;

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
    http2::Connection<Io, TowerToHyperService<tonic::service::Routes>, LocalSpawner>;

/// An HTTP/1.1 connection serving the HTTP cache protocol.
pub(super) type HttpConnection = http1::Connection<Io, HttpFront>;

/// The HTTP/2 window sizes: large enough that a stream of 1 MiB writes never waits
/// for a window update on a low-latency link.
const STREAM_WINDOW: u32 = 4 << 20;
const CONNECTION_WINDOW: u32 = 16 << 20;

pub(super) fn serve_http2(stream: TcpStream, routes: tonic::service::Routes) -> GrpcConnection {
    http2::Builder::new(LocalSpawner)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(1 << 20)
        .serve_connection(
            TokioIo::new(stream.compat()),
            TowerToHyperService::new(routes),
        )
}

pub(super) fn serve_http1(stream: TcpStream, front: HttpFront) -> HttpConnection {
    http1::Builder::new().serve_connection(TokioIo::new(stream.compat()), front)
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

/// Serves `connection` until it ends; once `stop` completes, lets its in-flight
/// requests finish for at most `grace`, then drops it.
pub(super) async fn drive<C: Graceful>(
    connection: C,
    stop: impl Future<Output = ()>,
    grace: Duration,
) {
    let mut connection = Box::pin(connection);
    let outcome = match select(connection.as_mut(), Box::pin(stop)).await {
        Either::Left((outcome, _)) => outcome,
        Either::Right(((), _)) => {
            connection.as_mut().graceful_shutdown();
            match select(connection, Box::pin(glommio::timer::sleep(grace))).await {
                Either::Left((outcome, _)) => outcome,
                Either::Right(_) => {
                    tracing::debug!("closing a connection still busy after the grace period");
                    Ok(())
                }
            }
        }
    };
    if let Err(error) = outcome {
        tracing::debug!("connection ended: {error}");
    }
}
