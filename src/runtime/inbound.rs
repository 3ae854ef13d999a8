//! A node-wide budget for the bytes of gRPC messages being received.
//!
//! tonic assembles each gRPC message whole before decoding it, so whatever a client
//! has sent of a message it has not finished sits in the node's memory. Many streams
//! each holding all but the last byte of a large message add up without limit:
//! 100 streams of 9 MB FindMissingBlobs messages on 2 connections took the node from
//! 37 MB to 969 MB of RSS in under 5 s, and it would have gone on. A limit on
//! streams per connection alone does not help (a client opens more connections), nor
//! does the message size limit (each message is within it).
//!
//! So every gRPC request body passes through [`MeteredBody`], which follows the gRPC
//! framing as the bytes go by (a 5-byte prefix: a compression flag and a big-endian
//! length, then the message) and charges a shared [`ReceiveBudget`] for the bytes of
//! the message not yet complete, from its first byte until its last arrives and the
//! decoder can turn it into a value. A message that would overrun the budget ends its
//! call with RESOURCE_EXHAUSTED, which clients retry with backoff; nothing it carried
//! was stored. What the budget bounds is what clients can make the node hold without
//! finishing anything; complete messages are the handlers' business (a batch is
//! bounded by `max_batch_total_size`, a ByteStream chunk is written out as it comes).
//! The bytes HTTP/2 itself buffers per connection before anyone reads them are bounded
//! separately, by the flow-control windows (`hyper_glue.rs`).

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use hyper::body::{Body, Frame, Incoming, SizeHint};

/// Length of the prefix before every gRPC message.
const PREFIX: usize = 5;

/// The bytes of incomplete gRPC messages the node may hold at once, shared by every
/// connection of every shard.
pub struct ReceiveBudget {
    limit: u64,
    held: AtomicU64,
    held_gauge: prometheus::IntGauge,
    refused: prometheus::IntCounter,
}

impl ReceiveBudget {
    /// A budget of `limit` bytes, reporting what is held in `held_gauge` and counting
    /// the calls refused in `refused`.
    pub fn new(
        limit: u64,
        held_gauge: prometheus::IntGauge,
        refused: prometheus::IntCounter,
    ) -> Self {
        ReceiveBudget {
            limit,
            held: AtomicU64::new(0),
            held_gauge,
            refused,
        }
    }

    /// Takes `bytes` from the budget, if that many are left.
    fn take(&self, bytes: u64) -> bool {
        let taken = self
            .held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&after| after <= self.limit)
            });
        match taken {
            Ok(before) => {
                self.held_gauge.set(gauge_value(before + bytes));
                true
            }
            Err(_) => {
                self.refused.inc();
                false
            }
        }
    }

    /// Returns `bytes` taken earlier.
    fn give_back(&self, bytes: u64) {
        let before = self.held.fetch_sub(bytes, Ordering::AcqRel);
        self.held_gauge
            .set(gauge_value(before.saturating_sub(bytes)));
    }
}

fn gauge_value(bytes: u64) -> i64 {
    i64::try_from(bytes).unwrap_or(i64::MAX)
}

/// Where the framing of a request body stands.
#[derive(Default)]
struct Framing {
    /// Prefix bytes of the current message seen so far (all of it once `PREFIX`).
    prefix: [u8; PREFIX],
    prefix_seen: usize,
    /// Message bytes still to come after a complete prefix.
    remaining: u64,
    /// Bytes of the current message received so far, prefix included.
    received: u64,
}

impl Framing {
    /// Follows `data` through the framing; returns the bytes of the message still
    /// incomplete at its end (0 when `data` ends on a message boundary).
    fn advance(&mut self, mut data: &[u8]) -> u64 {
        while !data.is_empty() {
            if self.prefix_seen < PREFIX {
                let take = (PREFIX - self.prefix_seen).min(data.len());
                self.prefix[self.prefix_seen..self.prefix_seen + take]
                    .copy_from_slice(&data[..take]);
                self.prefix_seen += take;
                self.received += take as u64;
                data = &data[take..];
                if self.prefix_seen == PREFIX {
                    let length = [
                        self.prefix[1],
                        self.prefix[2],
                        self.prefix[3],
                        self.prefix[4],
                    ];
                    self.remaining = u64::from(u32::from_be_bytes(length));
                    self.end_if_complete();
                }
                continue;
            }
            let take = self.remaining.min(data.len() as u64);
            self.remaining -= take;
            self.received += take;
            // `take` is at most `data.len()`, so the cast is exact.
            data = &data[take as usize..];
            self.end_if_complete();
        }
        self.received
    }

    fn end_if_complete(&mut self) {
        if self.prefix_seen == PREFIX && self.remaining == 0 {
            *self = Framing::default();
        }
    }
}

/// A gRPC request body that charges the [`ReceiveBudget`] for its incomplete message.
pub(super) struct MeteredBody {
    inner: Incoming,
    budget: Arc<ReceiveBudget>,
    framing: Framing,
    charged: u64,
}

impl MeteredBody {
    fn new(inner: Incoming, budget: Arc<ReceiveBudget>) -> Self {
        MeteredBody {
            inner,
            budget,
            framing: Framing::default(),
            charged: 0,
        }
    }

    /// Charges for `incomplete` bytes held instead of what was charged before.
    fn charge(&mut self, incomplete: u64) -> Result<(), tonic::Status> {
        if incomplete > self.charged {
            if !self.budget.take(incomplete - self.charged) {
                return Err(tonic::Status::resource_exhausted(format!(
                    "the node is receiving more request bytes than it may hold at once \
                     (max_receiving_bytes = {}); retry later",
                    self.budget.limit
                )));
            }
        } else {
            self.budget.give_back(self.charged - incomplete);
        }
        self.charged = incomplete;
        Ok(())
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        self.budget.give_back(self.charged);
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let frame = match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => return Poll::Ready(Some(Err(Box::new(error)))),
            Poll::Ready(None) => {
                let charged = std::mem::take(&mut self.charged);
                self.budget.give_back(charged);
                return Poll::Ready(None);
            }
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            let incomplete = self.framing.advance(data.chunk());
            if let Err(status) = self.charge(incomplete) {
                return Poll::Ready(Some(Err(Box::new(status))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A service whose request bodies are [`MeteredBody`]s.
pub(super) struct Metered<S> {
    inner: S,
    budget: Arc<ReceiveBudget>,
}

impl<S> Metered<S> {
    pub fn new(inner: S, budget: Arc<ReceiveBudget>) -> Self {
        Metered { inner, budget }
    }
}

impl<S> hyper::service::Service<http::Request<Incoming>> for Metered<S>
where
    S: hyper::service::Service<http::Request<MeteredBody>>,
    S::Future: Future,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let budget = Arc::clone(&self.budget);
        self.inner
            .call(request.map(|body| MeteredBody::new(body, budget)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(length: u32) -> Vec<u8> {
        let mut framed = vec![0];
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend(std::iter::repeat_n(7u8, length as usize));
        framed
    }

    #[test]
    fn a_complete_message_holds_nothing() {
        let mut framing = Framing::default();
        assert_eq!(framing.advance(&message(100)), 0);
        assert_eq!(framing.advance(&message(0)), 0);
    }

    #[test]
    fn an_incomplete_message_holds_what_arrived_of_it() {
        let mut framing = Framing::default();
        let framed = message(1000);
        assert_eq!(framing.advance(&framed[..3]), 3);
        assert_eq!(framing.advance(&framed[3..600]), 600);
        assert_eq!(framing.advance(&framed[600..]), 0);
    }

    #[test]
    fn a_chunk_may_end_one_message_and_start_the_next() {
        let mut framing = Framing::default();
        let mut stream = message(10);
        stream.extend_from_slice(&message(50));
        let first = message(10).len() + 20;
        assert_eq!(framing.advance(&stream[..first]), 20);
        assert_eq!(framing.advance(&stream[first..]), 0);
    }

    #[test]
    fn a_declared_length_costs_nothing_until_it_arrives() {
        let mut framing = Framing::default();
        let mut prefix = vec![0];
        prefix.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(framing.advance(&prefix), 5);
        assert_eq!(framing.advance(&[1, 2, 3]), 8);
    }

    fn budget(limit: u64) -> ReceiveBudget {
        ReceiveBudget::new(
            limit,
            prometheus::IntGauge::new("held", "held").unwrap(),
            prometheus::IntCounter::new("refused", "refused").unwrap(),
        )
    }

    #[test]
    fn the_budget_refuses_what_would_overrun_it_and_counts_it() {
        let budget = budget(100);
        assert!(budget.take(60));
        assert!(!budget.take(41));
        assert!(budget.take(40));
        budget.give_back(100);
        assert!(budget.take(100));
        assert_eq!(budget.refused.get(), 1);
        assert_eq!(budget.held_gauge.get(), 100);
    }
}
