//! Evening out client connections over the shards.
//!
//! Every shard accepts from the node's one listening socket, so which shard gets a
//! connection is whichever asked first, blind to how busy each is. (With one
//! `SO_REUSEPORT` socket per shard, as before, the kernel chose by a hash of the
//! addresses, just as blind.) A client with few connections (the load generator's
//! two, a Bazel with a small channel pool) could land them all on one core, which
//! then decoded, hashed and served everything while the others idled: `bs-write` with
//! two connections measured anywhere between 740 and 1680 MB/s from one run to the
//! next, depending on where they fell.
//!
//! So a shard that accepts a connection while another shard serves fewer hands it
//! over, through that shard's inbox, before reading a byte of it (glommio's
//! `shared_accept` gives a socket not yet tied to an executor); the receiving shard
//! serves it for the rest of its life.
//!
//! The counts also enforce `max_connections`: past it, [`Balancer::place`] gives no
//! slot and the accepting shard closes the connection at once. Shards admit
//! concurrently, so the node may exceed the limit by at most one connection per shard.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use glommio::net::AcceptedTcpStream;
use prometheus::{IntGauge, IntGaugeVec};
use tokio::sync::mpsc;

/// Which protocol a connection speaks: the listener it arrived on.
#[derive(Clone, Copy, Debug)]
pub(super) enum Protocol {
    Grpc,
    Http,
    /// gRPC from the node's own scheduler and worker (`internal.rs`).
    Internal,
}

/// A connection on its way to another shard, already counted there.
pub(super) struct Handoff {
    pub stream: AcceptedTcpStream,
    pub protocol: Protocol,
    pub slot: Slot,
}

/// The per-shard connection counts and inboxes, shared by all shards.
pub(super) struct Balancer {
    /// Open connections per shard: the `cairn_shard_connections{shard}` gauges are
    /// the counts themselves (atomic, moved by increments), for placement, operators
    /// and tests alike.
    open: Vec<IntGauge>,
    inboxes: Vec<mpsc::UnboundedSender<Handoff>>,
    /// Open connections on every shard together.
    total: AtomicUsize,
    /// `max_connections`: past it, [`Balancer::place`] refuses.
    limit: usize,
}

/// One connection's place in a shard's count, given back on drop.
pub(super) struct Slot {
    balancer: Arc<Balancer>,
    shard: usize,
}

impl Balancer {
    /// A balancer for `shards` shards admitting at most `limit` connections, and the
    /// inbox each shard reads handoffs from.
    pub fn new(
        shards: usize,
        gauge: IntGaugeVec,
        limit: usize,
    ) -> (Self, Vec<mpsc::UnboundedReceiver<Handoff>>) {
        let (inboxes, receivers) = (0..shards).map(|_| mpsc::unbounded_channel()).unzip();
        let open = (0..shards)
            .map(|shard| {
                let gauge = gauge.with_label_values(&[&shard.to_string()]);
                gauge.set(0);
                gauge
            })
            .collect();
        let balancer = Balancer {
            open,
            inboxes,
            total: AtomicUsize::new(0),
            limit,
        };
        (balancer, receivers)
    }

    /// Picks the shard that should serve a connection accepted by `here`: the one
    /// with the fewest open connections, `here` on a tie, and counts it there;
    /// `None` when the node already serves `max_connections`.
    pub fn place(self: &Arc<Self>, here: usize) -> Option<Slot> {
        if self.total.load(Ordering::Relaxed) >= self.limit {
            return None;
        }
        let mut best = here;
        for (shard, open) in self.open.iter().enumerate() {
            if open.get() < self.open[best].get() {
                best = shard;
            }
        }
        Some(self.slot_on(best))
    }

    /// Counts a connection served by `shard`.
    pub fn slot_on(self: &Arc<Self>, shard: usize) -> Slot {
        self.total.fetch_add(1, Ordering::Relaxed);
        self.open[shard].inc();
        Slot {
            balancer: Arc::clone(self),
            shard,
        }
    }
}

impl Slot {
    /// The shard this connection was placed on.
    pub fn shard(&self) -> usize {
        self.shard
    }

    /// Sends `stream` to the shard this slot is on. If that shard has stopped taking
    /// connections the stream comes back, to be served where it is.
    pub fn hand_over(
        self,
        stream: AcceptedTcpStream,
        protocol: Protocol,
    ) -> Result<(), AcceptedTcpStream> {
        let inbox = self.balancer.inboxes[self.shard].clone();
        let handoff = Handoff {
            stream,
            protocol,
            slot: self,
        };
        inbox.send(handoff).map_err(|returned| returned.0.stream)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.balancer.total.fetch_sub(1, Ordering::Relaxed);
        self.balancer.open[self.shard].dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::Opts;

    fn limited(shards: usize, limit: usize) -> Arc<Balancer> {
        let gauge = IntGaugeVec::new(Opts::new("shard_connections", "test"), &["shard"]).unwrap();
        Arc::new(Balancer::new(shards, gauge, limit).0)
    }

    fn balancer(shards: usize) -> Arc<Balancer> {
        limited(shards, usize::MAX)
    }

    #[test]
    fn connections_accepted_by_one_shard_are_spread_over_all() {
        let balancer = balancer(3);
        let slots: Vec<Slot> = (0..6).filter_map(|_| balancer.place(0)).collect();
        let shards: Vec<usize> = slots.iter().map(Slot::shard).collect();
        assert_eq!(shards, [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn a_closed_connection_frees_its_shard_for_the_next() {
        let balancer = balancer(2);
        let first = balancer.place(0).unwrap();
        let second = balancer.place(0).unwrap();
        assert_eq!((first.shard(), second.shard()), (0, 1));
        drop(second);
        let third = balancer.place(0).unwrap();
        assert_eq!(third.shard(), 1);
        let gauges: Vec<i64> = balancer.open.iter().map(IntGauge::get).collect();
        assert_eq!(gauges, [1, 1], "the gauges follow the counts");
        drop((first, third));
        let gauges: Vec<i64> = balancer.open.iter().map(IntGauge::get).collect();
        assert_eq!(gauges, [0, 0]);
    }

    #[test]
    fn connections_past_the_limit_are_refused_until_one_closes() {
        let balancer = limited(2, 3);
        let slots: Vec<Slot> = (0..3).map(|_| balancer.place(1).unwrap()).collect();
        assert!(
            balancer.place(0).is_none(),
            "a fourth connection was admitted"
        );
        assert!(balancer.place(1).is_none());
        let mut slots = slots.into_iter();
        drop(slots.next());
        let admitted = balancer.place(0).expect("a closed connection makes room");
        assert!(balancer.place(0).is_none());
        drop((admitted, slots));
        assert_eq!(balancer.total.load(Ordering::Relaxed), 0);
    }
}
