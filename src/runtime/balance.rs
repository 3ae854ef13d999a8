//! Evening out client connections over the shards.
//!
//! `SO_REUSEPORT` hands each new connection to a listener chosen by a hash of its
//! addresses, blind to how busy each core is. A client with few connections (the load
//! generator's two, a Bazel with a small channel pool) lands them all on one core half
//! of the time, and that core then decodes, hashes and serves everything while the
//! others idle: `bs-write` with two connections measured anywhere between 740 and
//! 1680 MB/s from one run to the next, depending on where they fell.
//!
//! So a shard that accepts a connection while another shard serves fewer hands it
//! over: the socket's descriptor travels through that shard's inbox, and the receiving
//! shard wraps it in a glommio stream of its own. A connection moves once, before its
//! first byte is read, and is then served where it landed for its whole life.

use std::os::fd::{AsRawFd, BorrowedFd, IntoRawFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use glommio::net::TcpStream;
use prometheus::IntGaugeVec;
use tokio::sync::mpsc;

/// Which protocol a connection speaks: the listener it arrived on.
#[derive(Clone, Copy, Debug)]
pub(super) enum Protocol {
    Grpc,
    Http,
}

/// A connection on its way to another shard, already counted there.
pub(super) struct Handoff {
    pub socket: OwnedFd,
    pub protocol: Protocol,
    pub slot: Slot,
}

/// The per-shard connection counts and inboxes, shared by all shards.
pub(super) struct Balancer {
    open: Vec<AtomicUsize>,
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
    /// `cairn_shard_connections{shard}`: the counts above, for operators and tests.
    gauge: IntGaugeVec,
}

/// One connection's place in a shard's count, given back on drop.
pub(super) struct Slot {
    balancer: Arc<Balancer>,
    shard: usize,
}

impl Balancer {
    /// A balancer for `shards` shards, and the inbox each shard reads handoffs from.
    pub fn new(shards: usize, gauge: IntGaugeVec) -> (Self, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let (inboxes, receivers) = (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
        let balancer = Balancer {
            open: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            inboxes,
            gauge,
        };
        for shard in 0..shards {
            balancer.publish(shard);
        }
        (balancer, receivers)
    }

    /// Picks the shard that should serve a connection accepted by `here`: the one
    /// with the fewest open connections, `here` on a tie, and counts it there.
    pub fn place(self: &Arc<Self>, here: usize) -> Slot {
        let mut best = here;
        for (shard, open) in self.open.iter().enumerate() {
            if open.load(Ordering::Relaxed) < self.open[best].load(Ordering::Relaxed) {
                best = shard;
            }
        }
        self.slot_on(best)
    }

    /// Counts a connection served by `shard`.
    pub fn slot_on(self: &Arc<Self>, shard: usize) -> Slot {
        self.open[shard].fetch_add(1, Ordering::Relaxed);
        self.publish(shard);
        Slot {
            balancer: Arc::clone(self),
            shard,
        }
    }

    fn publish(&self, shard: usize) {
        let open = self.open[shard].load(Ordering::Relaxed);
        self.gauge
            .with_label_values(&[&shard.to_string()])
            .set(open as i64);
    }
}

impl Slot {
    /// The shard this connection was placed on.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Sends `stream` to the shard this slot is on. On failure (the descriptor could
    /// not be duplicated, or that shard has stopped taking connections) the stream
    /// comes back, to be served where it is.
    pub fn hand_over(self, stream: TcpStream, protocol: Protocol) -> Result<(), TcpStream> {
        // SAFETY: the descriptor belongs to `stream`, which outlives this borrow.
        let borrowed = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
        let socket = match borrowed.try_clone_to_owned() {
            Ok(socket) => socket,
            Err(error) => {
                tracing::debug!("cannot hand a connection over: {error}");
                return Err(stream);
            }
        };
        let inbox = self.balancer.inboxes[self.shard].clone();
        let handoff = Handoff {
            socket,
            protocol,
            slot: self,
        };
        match inbox.send(handoff) {
            // The duplicate keeps the connection open; this shard's copy closes.
            Ok(()) => Ok(()),
            Err(_) => Err(stream),
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.balancer.open[self.shard].fetch_sub(1, Ordering::Relaxed);
        self.balancer.publish(self.shard);
    }
}

/// Turns a handed-over socket into a stream served by the current shard.
pub(super) fn adopt(socket: OwnedFd) -> TcpStream {
    use std::os::fd::FromRawFd;
    // SAFETY: `socket` is a connected TCP socket this process owns (duplicated from an
    // accepted stream); `into_raw_fd` gives up that ownership to the new stream.
    unsafe { TcpStream::from_raw_fd(socket.into_raw_fd()) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn balancer(shards: usize) -> Arc<Balancer> {
        let gauge = IntGaugeVec::new(Opts::new("shard_connections", "test"), &["shard"]).unwrap();
        Arc::new(Balancer::new(shards, gauge).0)
    }

    #[test]
    fn connections_accepted_by_one_shard_are_spread_over_all() {
        let balancer = balancer(3);
        let slots: Vec<Slot> = (0..6).map(|_| balancer.place(0)).collect();
        let shards: Vec<usize> = slots.iter().map(Slot::shard).collect();
        assert_eq!(shards, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_closed_connection_frees_its_shard_for_the_next() {
        let balancer = balancer(2);
        let first = balancer.place(0);
        let second = balancer.place(0);
        assert_eq!((first.shard(), second.shard()), (0, 1));
        drop(second);
        assert_eq!(balancer.place(0).shard(), 1);
        let gauge = balancer.gauge.with_label_values(&["0"]).get();
        assert_eq!(gauge, 1, "the gauge follows the count");
    }
}
