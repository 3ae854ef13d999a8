//! TLS on the node's glommio listeners.
//!
//! A connection's socket goes through tokio-util's compat layer (as every connection
//! does, see `hyper_glue.rs`) and, when the listener has TLS, through a rustls
//! handshake with the acceptors of [`crate::tls::Tls`], before hyper sees it.
//! [`Stream`] is either, so that hyper's connection types stay one per protocol. With
//! a client CA, a client must present a certificate that CA signed (mutual TLS) or the
//! handshake fails; the certificate's names then go with every request of the
//! connection ([`WithPeer`], [`HttpFront::with_peer`]) for the auth file's `cert`
//! principals.
//!
//! [`HttpFront::with_peer`]: crate::http_cache::HttpFront::with_peer

use std::future::{ready, Ready};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::future::Either;
use glommio::net::TcpStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;
use tokio_util::compat::Compat;

use super::internal::{refusal, TokenCheck};
use crate::auth::PeerNames;

/// A connection's byte stream: plain, or TLS over the plain one.
pub(crate) enum Stream {
    Plain(Compat<TcpStream>),
    Tls(Box<TlsStream<Compat<TcpStream>>>),
}

impl Stream {
    /// The names of the client certificate the handshake verified, if any.
    pub(crate) fn peer_names(&self) -> Option<PeerNames> {
        let Stream::Tls(stream) = self else {
            return None;
        };
        let certificate = stream.get_ref().1.peer_certificates()?.first()?;
        Some(crate::tls::peer_names(certificate))
    }

    /// The TCP socket under the stream, for the lingering close (`linger.rs`). A TLS
    /// session has already sent its close_notify when hyper shut the stream down.
    pub(crate) fn into_socket(self) -> TcpStream {
        match self {
            Stream::Plain(socket) => socket.into_inner(),
            Stream::Tls(stream) => stream.into_inner().0.into_inner(),
        }
    }
}

/// A gRPC service that attaches the connection's client-certificate names to each
/// request it passes on; on the internal listener, only requests with the node's
/// token pass (`internal.rs`).
#[derive(Clone)]
pub(crate) struct WithPeer<S> {
    pub inner: S,
    pub peer: Option<PeerNames>,
    pub require: Option<TokenCheck>,
}

impl<S, B> tower_service::Service<http::Request<B>> for WithPeer<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<Ready<Result<S::Response, S::Error>>, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        if let Some(check) = &self.require {
            if !check.admits(&request) {
                return Either::Left(ready(Ok(refusal())));
            }
        }
        if let Some(peer) = &self.peer {
            request.extensions_mut().insert(peer.clone());
        }
        Either::Right(self.inner.call(request))
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write(cx, buf),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_flush(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(stream) => Pin::new(stream).poll_write_vectored(cx, bufs),
            Stream::Tls(stream) => Pin::new(stream.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(stream) => stream.is_write_vectored(),
            Stream::Tls(stream) => stream.is_write_vectored(),
        }
    }
}
