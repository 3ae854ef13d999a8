//! TLS on the node's listeners, with rustls over the glommio sockets.
//!
//! A connection's socket goes through tokio-util's compat layer (as every connection
//! does, see `hyper_glue.rs`) and, when the listener has TLS, through a rustls
//! handshake, before hyper sees it. [`Stream`] is either, so that hyper's connection
//! types stay one per protocol. The gRPC listener offers ALPN `h2` only (gRPC is
//! HTTP/2); the HTTP listener `http/1.1`. With a client CA, a client must present a
//! certificate that CA signed (mutual TLS) or the handshake fails.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use glommio::net::TcpStream;
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::compat::Compat;

use crate::error::{Error, Result};

/// A connection's byte stream: plain, or TLS over the plain one.
pub(crate) enum Stream {
    Plain(Compat<TcpStream>),
    Tls(Box<TlsStream<Compat<TcpStream>>>),
}

/// The TLS settings of both listeners.
#[derive(Clone)]
pub struct Acceptors {
    pub(super) grpc: TlsAcceptor,
    pub(super) http: TlsAcceptor,
}

impl Acceptors {
    /// Reads the PEM certificate chain `cert`, its key `key` and, for mutual TLS, the
    /// PEM CA certificates `client_ca` that client certificates must chain to.
    pub fn load(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Acceptors> {
        let unreadable = |what: &str, path: &Path, error: &dyn std::fmt::Display| {
            Error::invalid_argument(format!(
                "cannot read the {what} {}: {error}",
                path.display()
            ))
        };
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|error| unreadable("TLS certificate", cert, &error))?;
        if chain.is_empty() {
            return Err(Error::invalid_argument(format!(
                "the TLS certificate file {} holds no PEM certificate",
                cert.display()
            )));
        }
        let private_key = PrivateKeyDer::from_pem_file(key)
            .map_err(|error| unreadable("TLS key", key, &error))?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| Error::internal(format!("TLS setup: {error}")))?;
        let builder = match client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let mut roots = RootCertStore::empty();
                for ca in CertificateDer::pem_file_iter(path)
                    .map_err(|error| unreadable("client CA", path, &error))?
                {
                    let ca = ca.map_err(|error| unreadable("client CA", path, &error))?;
                    roots.add(ca).map_err(|error| {
                        Error::invalid_argument(format!(
                            "the client CA {} is not usable: {error}",
                            path.display()
                        ))
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|error| {
                            Error::invalid_argument(format!(
                                "the client CA {} is not usable: {error}",
                                path.display()
                            ))
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, private_key)
            .map_err(|error| {
                Error::invalid_argument(format!(
                    "the TLS key {} does not fit the certificate {}: {error}",
                    key.display(),
                    cert.display()
                ))
            })?;
        let with_alpn = |protocol: &[u8]| {
            let mut config = config.clone();
            config.alpn_protocols = vec![protocol.to_vec()];
            TlsAcceptor::from(Arc::new(config))
        };
        Ok(Acceptors {
            grpc: with_alpn(b"h2"),
            http: with_alpn(b"http/1.1"),
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unusable_files_are_refused_naming_them() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let text = dir.path().join("text.pem");
        std::fs::write(&text, "not a certificate\n").unwrap();
        let error = Acceptors::load(&missing, &missing, None)
            .err()
            .expect("refused");
        assert!(error.message().contains("missing.pem"), "{error}");
        let error = Acceptors::load(&text, &missing, None)
            .err()
            .expect("refused");
        assert!(
            error.message().contains("holds no PEM certificate"),
            "{error}"
        );
    }
}
