//! Closing connections that never start or have gone quiet.
//!
//! Without these, a connection that never sends the HTTP/2 preface, or one left open
//! with nothing in flight, holds a descriptor and a `max_connections` slot forever:
//! 2,000 such connections were seen held for a minute, all still established. So each
//! connection carries an [`Activity`] record, fed by its socket (bytes read) and its
//! service (requests in flight), which the connection's driver checks whenever its
//! next deadline passes:
//!
//! - **handshake**: an HTTP/2 connection that has not sent the 24-byte preface and its
//!   first SETTINGS frame within `handshake_timeout_seconds` is dropped (there is no
//!   HTTP/2 session yet to send GOAWAY on). HTTP/1.1 connections get hyper's own
//!   header-read timeout, which also covers every later request's headers.
//! - **idle**: a connection with no request in flight and nothing read for
//!   `idle_timeout_seconds` is shut down gracefully (GOAWAY on HTTP/2), which clients
//!   treat as a normal reconnect.
//! - **dead peers**: a peer that vanished without a FIN (a killed VM, a dropped NAT
//!   mapping) while a stream was open is found by HTTP/2 keepalive pings every
//!   `keepalive_interval_seconds`, unanswered for that interval (at most 20 s).
//!   hyper's pings need `Send`
//!   sleeps, which glommio's per-thread timers are not, so [`PingTimer`] takes them
//!   from one small tokio runtime (one thread, timers only) shared by every shard.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The connection timeouts (config `handshake_timeout_seconds`,
/// `idle_timeout_seconds`, `keepalive_interval_seconds`).
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub handshake: Duration,
    pub idle: Duration,
    pub keepalive: Duration,
}

/// Longest a keepalive ping may go unanswered before the connection is closed (a
/// shorter keepalive interval is also the answer's limit).
pub(super) const PING_ANSWER: Duration = Duration::from_secs(20);

/// The HTTP/2 client preface (24 bytes) and the header of its SETTINGS frame (9).
pub(super) const HTTP2_HANDSHAKE_BYTES: u64 = 33;

/// What a connection has done, as its driver needs to know.
pub(super) struct Activity {
    opened: Instant,
    read: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` of the last byte read or request finished.
    last: AtomicU64,
}

impl Activity {
    pub fn new() -> Arc<Activity> {
        Arc::new(Activity {
            opened: Instant::now(),
            read: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            last: AtomicU64::new(0),
        })
    }

    fn touch(&self) {
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Why the connection should be closed now, if it should; otherwise when to look
    /// again. `handshake_bytes` is what a client must have sent to be past its
    /// handshake (0: hyper checks it).
    pub fn check(&self, timeouts: &Timeouts, handshake_bytes: u64) -> Result<Instant, Expired> {
        let now = Instant::now();
        if self.read.load(Ordering::Relaxed) < handshake_bytes {
            let deadline = self.opened + timeouts.handshake;
            return if now >= deadline {
                Err(Expired::Handshake)
            } else {
                Ok(deadline)
            };
        }
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            return Ok(now + timeouts.idle);
        }
        let last = self.opened + Duration::from_millis(self.last.load(Ordering::Relaxed));
        let deadline = last + timeouts.idle;
        if now >= deadline {
            Err(Expired::Idle)
        } else {
            Ok(deadline)
        }
    }
}

/// Why a connection was closed by its driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Expired {
    Handshake,
    Idle,
}

impl Expired {
    pub fn label(self) -> &'static str {
        match self {
            Expired::Handshake => "handshake",
            Expired::Idle => "idle",
        }
    }
}

/// A socket that records the bytes read from it in an [`Activity`].
pub(super) struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Watched<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Watched { inner, activity }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() - before;
        if read > 0 {
            self.activity.read.fetch_add(read as u64, Ordering::Relaxed);
            self.activity.touch();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// A service that counts its requests in flight, from the call until the response
/// body has been sent (or dropped).
#[derive(Clone)]
pub(super) struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S> Counted<S> {
    pub fn new(inner: S, activity: Arc<Activity>) -> Self {
        Counted { inner, activity }
    }
}

/// One request in flight; finishing it counts as activity.
struct InFlight(Arc<Activity>);

impl InFlight {
    fn new(activity: &Arc<Activity>) -> Self {
        activity.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(Arc::clone(activity))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S, R, B> hyper::service::Service<R> for Counted<S>
where
    S: hyper::service::Service<R, Response = http::Response<B>>,
    S::Future: 'static,
{
    type Response = http::Response<Tracked<B>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>>>>;

    fn call(&self, request: R) -> Self::Future {
        let in_flight = InFlight::new(&self.activity);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Tracked {
                inner: Box::pin(body),
                _in_flight: in_flight,
            }))
        })
    }
}

/// A response body that keeps its request counted in flight until it ends.
pub(super) struct Tracked<B> {
    inner: Pin<Box<B>>,
    _in_flight: InFlight,
}

impl<B: Body> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        self.inner.as_mut().poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// hyper's timer for keepalive pings and HTTP/1.1 header reads (see the module docs).
#[derive(Clone)]
pub(super) struct PingTimer(tokio::runtime::Handle);

impl PingTimer {
    pub fn new(handle: tokio::runtime::Handle) -> Self {
        PingTimer(handle)
    }
}

impl hyper::rt::Timer for PingTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let _runtime = self.0.enter();
        Box::pin(TokioSleep(Box::pin(tokio::time::sleep(duration))))
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let _runtime = self.0.enter();
        Box::pin(TokioSleep(Box::pin(tokio::time::sleep_until(
            deadline.into(),
        ))))
    }
}

struct TokioSleep(Pin<Box<tokio::time::Sleep>>);

impl Future for TokioSleep {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        self.0.as_mut().poll(cx)
    }
}

impl hyper::rt::Sleep for TokioSleep {}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeouts() -> Timeouts {
        Timeouts {
            handshake: Duration::from_secs(10),
            idle: Duration::from_secs(600),
            keepalive: Duration::from_secs(60),
        }
    }

    #[test]
    fn a_connection_is_judged_by_its_handshake_then_by_its_idleness() {
        let activity = Activity::new();
        let opened = activity.opened;
        assert_eq!(
            activity.check(&timeouts(), HTTP2_HANDSHAKE_BYTES),
            Ok(opened + Duration::from_secs(10))
        );
        let expired = Timeouts {
            handshake: Duration::ZERO,
            ..timeouts()
        };
        assert_eq!(
            activity.check(&expired, HTTP2_HANDSHAKE_BYTES),
            Err(Expired::Handshake)
        );
        activity
            .read
            .store(HTTP2_HANDSHAKE_BYTES, Ordering::Relaxed);
        let idle = Timeouts {
            idle: Duration::ZERO,
            ..timeouts()
        };
        assert_eq!(
            activity.check(&idle, HTTP2_HANDSHAKE_BYTES),
            Err(Expired::Idle)
        );
        let busy = InFlight::new(&activity);
        assert!(activity.check(&idle, HTTP2_HANDSHAKE_BYTES).is_ok());
        drop(busy);
        assert_eq!(
            activity.check(&idle, HTTP2_HANDSHAKE_BYTES),
            Err(Expired::Idle)
        );
    }
}
