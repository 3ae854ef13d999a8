//! The listener a TLS node's own scheduler and worker use.
//!
//! A node that serves TLS and runs its own execution starts `cairn-scheduler` and a
//! `cairn-worker` that need its CAS, action cache and ByteStream. They cannot use the
//! TLS port: its certificate names the host clients know it by (rarely 127.0.0.1),
//! and under mutual TLS it wants a client certificate they have no key for. So the
//! node also listens on an ephemeral loopback port, in plaintext, for them alone,
//! and every request there must carry the node's own bearer token (random per
//! process, handed to the children in a file of mode 0600 in the data directory,
//! see `embedded.rs`): another local user who finds the port is refused with
//! `UNAUTHENTICATED` before any service sees the call. Behind the check the request
//! meets the same services and access policy as on the public port, where (with
//! `--auth`) the same token is the principal holding every permission.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::listener;
use crate::auth::Credentials;
use crate::error::{Error, Result};

/// The bound loopback socket and the token its callers must present.
pub struct Internal {
    pub(super) socket: std::net::TcpListener,
    check: TokenCheck,
}

impl Internal {
    /// Binds an ephemeral port on 127.0.0.1 for callers presenting `token`.
    pub fn bind(token: &str) -> Result<Internal> {
        Ok(Internal {
            socket: listener::listen(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)))?,
            check: TokenCheck(Arc::new(Sha256::digest(token.as_bytes()).into())),
        })
    }

    /// The bound address, for the children's `--cache`.
    pub fn addr(&self) -> Result<SocketAddr> {
        self.socket.local_addr().map_err(|error| {
            Error::internal(format!("the loopback listener has no address: {error}"))
        })
    }

    pub(super) fn check(&self) -> TokenCheck {
        self.check.clone()
    }
}

/// The SHA-256 of the token the internal listener's callers must present.
#[derive(Clone)]
pub(super) struct TokenCheck(Arc<[u8; 32]>);

impl TokenCheck {
    /// Whether `request` carries `authorization: Bearer TOKEN`, by the auth module's
    /// parsing and constant-time comparison.
    pub(super) fn admits<B>(&self, request: &http::Request<B>) -> bool {
        Credentials::from_headers(request.headers()).bears(&self.0)
    }
}

/// The answer to a request on the internal listener without the node's token.
pub(super) fn refusal() -> http::Response<tonic::body::Body> {
    tonic::Status::unauthenticated(
        "this port serves only the node's own scheduler and worker, with the node's token",
    )
    .into_http()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(authorization: Option<&str>) -> http::Request<()> {
        let mut builder = http::Request::builder();
        if let Some(value) = authorization {
            builder = builder.header(http::header::AUTHORIZATION, value);
        }
        builder.body(()).expect("request")
    }

    #[test]
    fn only_the_nodes_own_token_is_admitted() {
        let check = TokenCheck(Arc::new(Sha256::digest(b"secret").into()));
        assert!(check.admits(&request(Some("Bearer secret"))));
        assert!(!check.admits(&request(Some("Bearer secreT"))));
        assert!(!check.admits(&request(Some("Bearer "))));
        assert!(!check.admits(&request(Some("secret"))));
        assert!(!check.admits(&request(Some("Basic c2VjcmV0"))));
        assert!(!check.admits(&request(None)));
    }
}
