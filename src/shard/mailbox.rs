//! A shard's inbox: a crossbeam channel plus the shard's `mio::Waker`, woken only on the
//! empty → non-empty edge so a burst of posts costs one eventfd write.
//!
//! Its memory grows with use: the channel is crossbeam's list (blocks of slots allocated as
//! messages arrive, freed as they are read), bounded by a count of its own. An array channel
//! touches every slot when it is made: 16,384 slots cost each shard ~1.4 MiB before any
//! message, 90 MB for 64 shards.
//!
//! The bound counts entries. Every entry is one message except the store's
//! [`ShardMsg::StoreBatch`]: one commit's answers for this shard, bounded by the store's batch.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use mio::Waker;

use crate::mail::ShardMsg;

/// The sending side, cloned into every shard.
#[derive(Debug, Clone)]
pub struct Mailbox {
    tx: Sender<ShardMsg>,
    waker: Arc<Waker>,
    armed: Arc<AtomicBool>,
    /// Entries posted and not yet taken (the bound), shared with the inbox.
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

/// The receiving side, owned by its shard.
#[derive(Debug)]
pub struct Inbox {
    rx: Receiver<ShardMsg>,
    armed: Arc<AtomicBool>,
    queued: Arc<AtomicUsize>,
}

/// A bounded mailbox of `capacity` messages waking `waker`.
pub fn mailbox(waker: Waker, capacity: usize) -> (Mailbox, Inbox) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let armed = Arc::new(AtomicBool::new(false));
    let queued = Arc::new(AtomicUsize::new(0));
    (
        Mailbox {
            tx,
            waker: Arc::new(waker),
            armed: armed.clone(),
            queued: queued.clone(),
            capacity,
        },
        Inbox { rx, armed, queued },
    )
}

impl Mailbox {
    /// Posts without blocking; gives the message back when the mailbox is full or gone.
    pub fn post(&self, msg: ShardMsg) -> Result<(), ShardMsg> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(msg);
        }
        match self.tx.send(msg) {
            Ok(()) => {
                if !self.armed.swap(true, Ordering::AcqRel) {
                    // A failed wake means the shard is gone; the message is then moot.
                    let _ = self.waker.wake();
                }
                Ok(())
            }
            Err(e) => {
                self.queued.fetch_sub(1, Ordering::AcqRel);
                Err(e.into_inner())
            }
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
        let m = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(1, Ordering::AcqRel);
        Some(m)
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
