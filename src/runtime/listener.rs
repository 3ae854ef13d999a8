//! The node's listening sockets: bound once, shared by every shard.
//!
//! glommio's `TcpListener::bind` sets `SO_REUSEPORT` so that each executor can bind
//! the same port. That also lets any other process of the same user bind it: a second
//! node started on the port by mistake (or, in a test suite, two nodes handed the same
//! free port) silently took a share of the connections, and clients were split
//! between two caches, or reset when the other one stopped. So the node binds each
//! address once, without `SO_REUSEPORT` (a second bind fails with "address in use"),
//! and every shard accepts from its own duplicate of that one socket.

use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd};

use glommio::net::TcpListener;
use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{Error, Result};

/// Pending connections the kernel queues per listening socket (before `somaxconn`
/// caps it): what glommio's own bind asked for.
const BACKLOG: i32 = 1024;

/// The gRPC socket, the HTTP one if configured, and the loopback one of a TLS node's
/// own scheduler and worker (`internal.rs`), bound before the node started them.
pub(super) struct Listeners {
    grpc: std::net::TcpListener,
    http: Option<std::net::TcpListener>,
    internal: Option<std::net::TcpListener>,
}

/// One shard's copies of [`Listeners`].
pub(super) struct ShardListeners {
    pub grpc: TcpListener,
    pub http: Option<TcpListener>,
    pub internal: Option<TcpListener>,
}

impl Listeners {
    pub fn bind(
        grpc: SocketAddr,
        http: Option<SocketAddr>,
        internal: Option<std::net::TcpListener>,
    ) -> Result<Self> {
        Ok(Listeners {
            grpc: listen(grpc)?,
            http: http.map(listen).transpose()?,
            internal,
        })
    }

    /// This shard's duplicates of the sockets, as glommio listeners.
    pub fn for_this_shard(&self) -> Result<ShardListeners> {
        Ok(ShardListeners {
            grpc: duplicate(&self.grpc)?,
            http: self.http.as_ref().map(duplicate).transpose()?,
            internal: self.internal.as_ref().map(duplicate).transpose()?,
        })
    }
}

pub(super) fn listen(addr: SocketAddr) -> Result<std::net::TcpListener> {
    let failed =
        |error: std::io::Error| Error::internal(format!("cannot listen on {addr}: {error}"));
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(failed)?;
    // Rebinding right after a restart, while the old connections sit in TIME_WAIT.
    socket.set_reuse_address(true).map_err(failed)?;
    // Non-blocking for good: glommio's accept flips the flag around a first try and
    // restores what it read, and shards doing so concurrently on one socket must not
    // be able to leave it blocking.
    socket.set_nonblocking(true).map_err(failed)?;
    socket.bind(&addr.into()).map_err(failed)?;
    socket.listen(BACKLOG).map_err(failed)?;
    Ok(socket.into())
}

fn duplicate(listener: &std::net::TcpListener) -> Result<TcpListener> {
    let copy = listener
        .try_clone()
        .map_err(|error| Error::internal(format!("cannot share the listening socket: {error}")))?;
    // SAFETY: `copy` is a bound, listening TCP socket owned by this process, and
    // `into_raw_fd` gives its ownership to the glommio listener, which closes it.
    Ok(unsafe { TcpListener::from_raw_fd(copy.into_raw_fd()) })
}
