//! A shard's inbox: a crossbeam channel plus the shard's `mio::Waker`, woken only on the
//! empty → non-empty edge so a burst of posts costs one eventfd write.
//!
//! Its memory grows with use ([`queue`]): 16,384 preallocated slots cost each shard ~1.4 MiB
//! before any message, 90 MB for 64 shards.
//!
//! The bound counts entries. Every entry is one message except the store's
//! [`ShardMsg::StoreBatch`]: one commit's answers for this shard, bounded by the store's batch.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mio::Waker;

use crate::mail::ShardMsg;
use crate::queue;

/// The sending side, cloned into every shard.
#[derive(Debug, Clone)]
pub struct Mailbox {
    tx: queue::Tx<ShardMsg>,
    waker: Arc<Waker>,
    armed: Arc<AtomicBool>,
}

/// The receiving side, owned by its shard.
#[derive(Debug)]
pub struct Inbox {
    rx: queue::Rx<ShardMsg>,
    armed: Arc<AtomicBool>,
}

/// A bounded mailbox of `capacity` messages waking `waker`.
pub fn mailbox(waker: Waker, capacity: usize) -> (Mailbox, Inbox) {
    let (tx, rx) = queue::bounded(capacity);
    let armed = Arc::new(AtomicBool::new(false));
    (
        Mailbox {
            tx,
            waker: Arc::new(waker),
            armed: armed.clone(),
        },
        Inbox { rx, armed },
    )
}

impl Mailbox {
    /// Posts without blocking; gives the message back when the mailbox is full or gone.
    pub fn post(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        match self.tx.try_send(msg) {
            Ok(()) => {
                if !self.armed.swap(true, Ordering::AcqRel) {
                    // A failed wake means the shard is gone; the message is then moot.
                    let _ = self.waker.wake();
                }
                Ok(())
            }
            Err(queue::TrySendError::Full(m)) | Err(queue::TrySendError::Disconnected(m)) => Err(m),
        }
    }

    /// Messages waiting.
    pub fn len(&self) -> usize {
        self.tx.len()
    }

    /// Whether nothing is waiting.
    pub fn is_empty(&self) -> bool {
        self.tx.is_empty()
    }
}

impl Inbox {
    /// Call before draining: the next post after this wakes the shard again.
    pub fn rearm(&self) {
        self.armed.store(false, Ordering::Release);
    }

    /// Takes one message if any.
    pub fn try_recv(&self) -> Option<ShardMsg> {
        self.rx.try_recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mio::{Events, Poll, Token};
    use std::time::Duration;

    #[test]
    fn wakes_once_per_edge_and_reports_full() {
        let mut poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), Token(7)).unwrap();
        let (tx, rx) = mailbox(waker, 2);
        tx.post(ShardMsg::Shutdown).unwrap();
        tx.post(ShardMsg::Shutdown).unwrap();
        assert!(tx.post(ShardMsg::Shutdown).is_err(), "bounded");
        let mut events = Events::with_capacity(4);
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(events.iter().count(), 1);
        rx.rearm();
        assert!(rx.try_recv().is_some() && rx.try_recv().is_some() && rx.try_recv().is_none());
        tx.post(ShardMsg::Shutdown).unwrap();
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert_eq!(events.iter().count(), 1, "re-armed inbox wakes again");
    }
}
