//! Closing a connection's socket without losing what was sent on it.
//!
//! When a socket is closed while bytes its peer sent are still unread, Linux answers
//! with a RST instead of a FIN, and the RST also throws away whatever the socket still
//! had queued for sending. An HTTP/2 server that finishes its last stream and closes
//! at once runs into exactly that: a client reading a response keeps sending
//! WINDOW_UPDATE frames as it reads, so there is nearly always something unread, and
//! the tail of the last response, still in the kernel's send queue because the client
//! reads more slowly than the node writes, never arrives. The client sees "connection
//! reset" in the middle of a body. A stop signal made this visible: about 1 stop in 5
//! cut a read in flight short (`*_lets_a_write_and_a_read_finish` in
//! tests/lifecycle.rs), though the node had written every byte and ended cleanly.
//!
//! So a connection's socket is lent to hyper and handed back when hyper drops it
//! ([`Lent`]), and [`close`] closes it the way web servers do (a "lingering close"):
//! shut down the sending side, which queues a FIN behind the data, then read and
//! discard what the peer still sends until it closes its side, or until the kernel
//! reports every byte sent as acknowledged by the peer (`TIOCOUTQ` is zero), checked
//! every [`LINGER_CHECK`], or [`LINGER_TOTAL`] passes in all. Only then is the
//! descriptor closed: from that moment a RST can no longer take anything the peer has
//! not received. A client that has read everything closes at once, so the usual cost
//! is one `shutdown` and one read that returns end of file; a client that does not
//! close costs one check.

use std::cell::Cell;
use std::io;
use std::net::Shutdown;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::future::{select, Either};
use futures::AsyncReadExt;
use glommio::net::TcpStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// How often a lingering close asks the kernel whether the peer has acknowledged
/// every byte sent.
pub const LINGER_CHECK: Duration = Duration::from_millis(50);

/// Longest a lingering close lasts, however the peer behaves: one that acknowledges
/// nothing for this long is not reading.
pub const LINGER_TOTAL: Duration = Duration::from_secs(30);

/// Where a lent socket goes back to when its borrower drops it.
pub(super) type Home<S> = Rc<Cell<Option<S>>>;

/// A socket lent to hyper: every read and write goes to it, and dropping the `Lent`
/// puts the socket back in its [`Home`] instead of closing it.
pub(super) struct Lent<S> {
    socket: Option<S>,
    home: Home<S>,
}

impl<S> Lent<S> {
    /// Lends `socket`; it returns to the `Home` given back with it.
    pub fn new(socket: S) -> (Self, Home<S>) {
        let home = Rc::new(Cell::new(None));
        let lent = Lent {
            socket: Some(socket),
            home: Rc::clone(&home),
        };
        (lent, home)
    }

    fn socket(&mut self) -> io::Result<Pin<&mut S>>
    where
        S: Unpin,
    {
        // The socket leaves only in `drop`, so this error is never seen by a caller.
        match self.socket.as_mut() {
            Some(socket) => Ok(Pin::new(socket)),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }
}

impl<S> Drop for Lent<S> {
    fn drop(&mut self) {
        if let Some(socket) = self.socket.take() {
            self.home.set(Some(socket));
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Lent<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.socket() {
            Ok(socket) => socket.poll_read(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Lent<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.socket() {
            Ok(socket) => socket.poll_write(cx, buf),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.socket() {
            Ok(socket) => socket.poll_flush(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.socket() {
            Ok(socket) => socket.poll_shutdown(cx),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.socket() {
            Ok(socket) => socket.poll_write_vectored(cx, bufs),
            Err(error) => Poll::Ready(Err(error)),
        }
    }

    fn is_write_vectored(&self) -> bool {
        self.socket
            .as_ref()
            .is_some_and(AsyncWrite::is_write_vectored)
    }
}

/// Closes `socket` once its peer has had the chance to read everything sent on it:
/// see the module documentation.
pub(super) async fn close(mut socket: TcpStream) {
    if socket.shutdown(Shutdown::Write).await.is_err() {
        return;
    }
    let started = Instant::now();
    let mut discard = [0u8; 4096];
    loop {
        let left = LINGER_TOTAL.saturating_sub(started.elapsed());
        if left.is_zero() {
            return;
        }
        let check = glommio::timer::sleep(LINGER_CHECK.min(left));
        match select(socket.read(&mut discard), Box::pin(check)).await {
            Either::Left((Ok(read), _)) if read > 0 => {}
            Either::Left(_) => return,
            Either::Right(_) => {
                if unacknowledged(&socket) == Some(0) {
                    return;
                }
            }
        }
    }
}

/// Bytes written to `socket` (and its FIN) that the peer has not acknowledged yet.
fn unacknowledged(socket: &TcpStream) -> Option<u32> {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for a TCP socket) writes one int through the pointer,
    // which points at a live local; the descriptor is owned by `socket`.
    let done = unsafe { libc::ioctl(socket.as_raw_fd(), libc::TIOCOUTQ, &mut queued) };
    (done == 0).then(|| u32::try_from(queued).unwrap_or(0))
}
