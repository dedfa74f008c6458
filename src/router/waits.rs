//! Who waits for the broker: a connection's welcome until its user's DMs reach this node, a
//! `sub`'s ack until the channel's publications do. Later waiters of the same interest wait
//! on the same subscription (answered earlier, they could miss what is published before it
//! is active).

use std::sync::Arc;

use rustc_hash::FxHashMap;

use crate::hub::ConnId;

/// An interest whose Redis subscription is on its way.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(super) enum Interested {
    /// A user's DMs (at the user's home shard).
    User(Arc<str>),
    /// A channel's publications (per shard).
    Channel(Arc<str>),
}

/// Waiting for the broker to subscribe before answering a client.
#[derive(Debug)]
pub(super) enum ReadyWait {
    /// A connection is welcomed once its user's DMs reach this node.
    Registered(ConnId),
    /// A `sub` is acked once the channel's publications reach this node.
    SubAck(ConnId, Option<Box<str>>),
    /// A `sub` with `since` reads the channel's stream once its publications reach this
    /// node (read earlier, a message stored in between would be in neither).
    SubSince(ConnId, Option<Box<str>>, Arc<str>, crate::store::Since),
}

/// The subscriptions asked of the broker and not active yet, and their waiters.
#[derive(Debug, Default)]
pub(super) struct ReadyWaits {
    /// By token: the interest and everyone waiting on it.
    waits: FxHashMap<u64, (Interested, Vec<ReadyWait>)>,
    /// The token of each interest not active yet.
    pending: FxHashMap<Interested, u64>,
    last_token: u64,
}

impl ReadyWaits {
    /// A token for a subscription asked of the broker, with its waiters so far.
    pub(super) fn new_wait(&mut self, what: Interested, waits: Vec<ReadyWait>) -> u64 {
        self.last_token += 1;
        let t = self.last_token;
        self.pending.insert(what.clone(), t);
        self.waits.insert(t, (what, waits));
        t
    }

    /// Adds a waiter to subscription `token` (none when it is active already).
    pub(super) fn add(&mut self, token: u64, w: ReadyWait) {
        if let Some((_, waits)) = self.waits.get_mut(&token) {
            waits.push(w);
        }
    }

    /// The token of `what`'s subscription if it is not active yet.
    pub(super) fn pending(&self, what: &Interested) -> Option<u64> {
        self.pending.get(what).copied()
    }

    /// Waits on `what`'s subscription if it is not active yet; false when it is.
    pub(super) fn wait_on(&mut self, what: Interested, w: ReadyWait) -> bool {
        let Some(t) = self.pending(&what) else {
            return false;
        };
        self.add(t, w);
        true
    }

    /// Subscription `token` is active: its waiters, to answer.
    pub(super) fn ready(&mut self, token: u64) -> Vec<ReadyWait> {
        let Some((what, waits)) = self.waits.remove(&token) else {
            return Vec::new();
        };
        if self.pending.get(&what) == Some(&token) {
            self.pending.remove(&what);
        }
        waits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(slot: u32) -> ConnId {
        ConnId {
            shard: 0,
            slot,
            generation: 1,
        }
    }

    #[test]
    fn later_waiters_wait_on_the_same_subscription_until_it_is_active() {
        let mut w = ReadyWaits::default();
        let alice = Interested::User("alice".into());
        assert!(!w.wait_on(alice.clone(), ReadyWait::Registered(conn(1))));
        let t = w.new_wait(alice.clone(), vec![ReadyWait::Registered(conn(1))]);
        assert!(w.wait_on(alice.clone(), ReadyWait::Registered(conn(2))));
        assert_eq!(w.pending(&alice), Some(t));
        let waiting: Vec<u32> = w
            .ready(t)
            .into_iter()
            .map(|r| match r {
                ReadyWait::Registered(c) => c.slot,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(waiting, [1, 2]);
        assert_eq!(w.pending(&alice), None, "active now: nobody waits");
        assert!(w.ready(t).is_empty());
    }
}
