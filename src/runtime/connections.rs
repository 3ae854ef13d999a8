//! Counting a shard's open connections, so shutdown can wait for them to finish.
//!
//! Each connection holds a guard for as long as its task runs; draining waits until
//! the count reaches zero. Every connection bounds its own drain by the grace period,
//! so the wait is bounded too.

use std::cell::Cell;
use std::pin::pin;
use std::rc::Rc;

use tokio::sync::Notify;

/// The open connections of one shard.
#[derive(Default)]
pub(super) struct Connections {
    open: Cell<usize>,
    closed_last: Notify,
}

/// Held by a connection's task; dropping it closes the connection's slot.
pub(super) struct Guard(Rc<Connections>);

impl Connections {
    /// Counts a new connection.
    pub fn open(self: &Rc<Self>) -> Guard {
        self.open.set(self.open.get() + 1);
        Guard(Rc::clone(self))
    }

    /// Completes when no connection is open.
    pub async fn drained(&self) {
        loop {
            let mut notified = pin!(self.closed_last.notified());
            notified.as_mut().enable();
            if self.open.get() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        let open = self.0.open.get() - 1;
        self.0.open.set(open);
        if open == 0 {
            self.0.closed_last.notify_waiters();
        }
    }
}
