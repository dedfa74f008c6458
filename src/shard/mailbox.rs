//! A shard's inbox: a bounded crossbeam channel plus the shard's `mio::Waker`, woken only on
//! the empty → non-empty edge so a burst of posts costs one eventfd write.
//!
//! The bound counts messages, not entries: a batch ([`ShardMsg::StoreBatch`]) weighs what
//! it carries, so batching keeps the back-pressure
//! (a full mailbox still means `capacity` messages waiting). An empty mailbox takes a batch
//! of any size, so no batch is refused for ever.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use mio::Waker;

use crate::hub::ShardMsg;

/// The sending side, cloned into every shard.
#[derive(Debug, Clone)]
pub struct Mailbox {
    tx: Sender<ShardMsg>,
    waker: Arc<Waker>,
    armed: Arc<AtomicBool>,
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
    let (tx, rx) = crossbeam_channel::bounded(capacity);
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
        let weight = msg.weight();
        let queued = self.queued.load(Ordering::Acquire);
        if queued > 0 && queued + weight > self.capacity {
            return Err(msg);
        }
        self.queued.fetch_add(weight, Ordering::AcqRel);
        match self.tx.try_send(msg) {
            Ok(()) => {
                if !self.armed.swap(true, Ordering::AcqRel) {
                    // A failed wake means the shard is gone; the message is then moot.
                    let _ = self.waker.wake();
                }
                Ok(())
            }
            Err(TrySendError::Full(m)) | Err(TrySendError::Disconnected(m)) => {
                self.queued.fetch_sub(weight, Ordering::AcqRel);
                Err(m)
            }
        }
    }

    /// Messages waiting (a batch counts what it carries).
    pub fn len(&self) -> usize {
        self.queued.load(Ordering::Acquire)
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
        let msg = self.rx.try_recv().ok()?;
        self.queued.fetch_sub(msg.weight(), Ordering::AcqRel);
        Some(msg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ConnId;
    use crate::store::StoreMsg;
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

    #[test]
    fn a_batch_weighs_its_messages_and_an_empty_mailbox_takes_any_batch() {
        let poll = Poll::new().unwrap();
        let waker = Waker::new(poll.registry(), Token(7)).unwrap();
        let (tx, rx) = mailbox(waker, 4);
        let conn = ConnId {
            shard: 0,
            slot: 0,
            generation: 0,
        };
        let unread = || StoreMsg::Unread {
            conn,
            connections: 0,
            unread: 0,
        };
        let batch = |n| ShardMsg::StoreBatch((0..n).map(|_| unread()).collect());
        tx.post(batch(3)).unwrap();
        assert_eq!(tx.len(), 3);
        assert!(tx.post(batch(2)).is_err(), "3 + 2 messages are over 4");
        tx.post(ShardMsg::Shutdown).unwrap();
        assert!(tx.post(ShardMsg::Shutdown).is_err(), "full at 4 messages");
        assert!(rx.try_recv().is_some() && rx.try_recv().is_some());
        assert_eq!(tx.len(), 0);
        tx.post(batch(9))
            .expect("an empty mailbox takes a batch over its capacity");
        assert!(tx.post(ShardMsg::Shutdown).is_err());
    }
}
