//! A bounded queue whose memory grows with use: crossbeam's list channel (blocks of slots
//! allocated as items arrive, freed as they are taken) under a count of its own. Crossbeam's
//! array channel touches every slot when it is made: the store's queue of 65,536 requests
//! held ~10 MB and each shard's mailbox ~1.4 MB before anything was sent.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender};
pub use crossbeam_channel::{RecvTimeoutError, SendError, TryRecvError, TrySendError};

/// The sending side (cloned by every sender).
#[derive(Debug)]
pub struct Tx<T> {
    tx: Sender<T>,
    /// Items sent and not yet taken, shared with the receiving side.
    queued: Arc<AtomicUsize>,
    capacity: usize,
}

impl<T> Clone for Tx<T> {
    fn clone(&self) -> Self {
        Tx {
            tx: self.tx.clone(),
            queued: self.queued.clone(),
            capacity: self.capacity,
        }
    }
}

/// The receiving side.
#[derive(Debug)]
pub struct Rx<T> {
    rx: Receiver<T>,
    queued: Arc<AtomicUsize>,
}

/// A queue of at most `capacity` items waiting.
pub fn bounded<T>(capacity: usize) -> (Tx<T>, Rx<T>) {
    let (tx, rx) = crossbeam_channel::unbounded();
    let queued = Arc::new(AtomicUsize::new(0));
    let tx = Tx {
        tx,
        queued: queued.clone(),
        capacity,
    };
    (tx, Rx { rx, queued })
}

/// A queue without a bound (tests that play the receiving side).
pub fn unbounded<T>() -> (Tx<T>, Rx<T>) {
    bounded(usize::MAX)
}

impl<T> Tx<T> {
    /// Queues `item` unless `capacity` items wait or the receiver is gone.
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        if self.queued.fetch_add(1, Ordering::AcqRel) >= self.capacity {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(TrySendError::Full(item));
        }
        self.tx.send(item).map_err(|e| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            TrySendError::Disconnected(e.into_inner())
        })
    }

    /// Queues `item` past the bound (a control message that must not be refused).
    pub fn send(&self, item: T) -> Result<(), SendError<T>> {
        self.queued.fetch_add(1, Ordering::AcqRel);
        self.tx.send(item).inspect_err(|_| {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        })
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<T> Rx<T> {
    fn took(&self, item: T) -> T {
        self.queued.fetch_sub(1, Ordering::AcqRel);
        item
    }

    /// Takes an item if one waits.
    pub fn try_recv(&self) -> Result<T, TryRecvError> {
        self.rx.try_recv().map(|i| self.took(i))
    }

    /// Waits up to `timeout` for an item.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        self.rx.recv_timeout(timeout).map(|i| self.took(i))
    }

    /// Takes the items waiting now, in order.
    pub fn try_iter(&self) -> impl Iterator<Item = T> + '_ {
        std::iter::from_fn(|| self.try_recv().ok())
    }

    /// Items waiting.
    pub fn len(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }

    /// Whether nothing waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_at_most_its_bound_and_frees_room_as_items_are_taken() {
        let (tx, rx) = bounded(2);
        tx.try_send(1).unwrap();
        tx.clone().try_send(2).unwrap();
        assert!(matches!(tx.try_send(3), Err(TrySendError::Full(3))));
        tx.send(4).unwrap(); // past the bound, on purpose
        assert_eq!((tx.len(), rx.len()), (3, 3));
        assert_eq!(rx.try_recv(), Ok(1));
        assert!(
            matches!(tx.try_send(5), Err(TrySendError::Full(5))),
            "still 3 waiting"
        );
        assert_eq!(rx.try_iter().collect::<Vec<_>>(), vec![2, 4]);
        tx.try_send(6).unwrap();
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)), Ok(6));
        assert!(rx.is_empty());
        drop(rx);
        assert!(matches!(tx.try_send(7), Err(TrySendError::Disconnected(7))));
        assert!(tx.is_empty(), "a refused item is not counted");
    }
}
