//! What a shard sends other shards during a turn, posted by the driver at its end: mail in
//! order per target, and the mail that must not be lost waiting for room in a full mailbox.

use std::collections::VecDeque;

use crate::broker::BrokerMsg;
use crate::mail::ShardMsg;

/// Mail out of one shard.
#[derive(Debug)]
pub(super) struct Postbox {
    shard: u16,
    /// Mail produced this turn, in order, for the driver to post.
    outgoing: Vec<(u16, ShardMsg)>,
    /// Mail that must not be lost, waiting for room in a full mailbox, per target shard.
    retry: Vec<VecDeque<ShardMsg>>,
}

impl Postbox {
    /// The postbox of shard `shard` of `shards`.
    pub(super) fn new(shard: u16, shards: u16) -> Postbox {
        Postbox {
            shard,
            outgoing: Vec::new(),
            retry: (0..shards).map(|_| VecDeque::new()).collect(),
        }
    }

    /// Queues mail for shard `to`.
    pub(super) fn send(&mut self, to: u16, msg: ShardMsg) {
        debug_assert!(to != self.shard, "a shard never mails itself");
        self.outgoing.push((to, msg));
    }

    /// Whether mail waits for room in a full mailbox.
    pub(super) fn has_retries(&self) -> bool {
        self.retry.iter().any(|q| !q.is_empty())
    }

    /// Hands the waiting mail, then this turn's, to `post` in order; `post` gives a message
    /// back when the target's mailbox is full. Mail that must arrive ([`is_reliable`]) waits
    /// for the next call, in order; the rest is dropped. Returns how many were dropped.
    pub(super) fn post(
        &mut self,
        mut post: impl FnMut(u16, ShardMsg) -> Result<(), ShardMsg>,
    ) -> u64 {
        for target in 0..self.retry.len() {
            while let Some(msg) = self.retry[target].pop_front() {
                if let Err(msg) = post(target as u16, msg) {
                    self.retry[target].push_front(msg);
                    break;
                }
            }
        }
        let mut dropped = 0;
        let mut out = std::mem::take(&mut self.outgoing);
        for (target, msg) in out.drain(..) {
            let reliable = is_reliable(&msg);
            if reliable && !self.retry[target as usize].is_empty() {
                self.retry[target as usize].push_back(msg);
                continue;
            }
            match post(target, msg) {
                Ok(()) => {}
                Err(msg) if reliable => self.retry[target as usize].push_back(msg),
                Err(_) => dropped += 1,
            }
        }
        // Posting queues no mail: the emptied list keeps its capacity for the next turn.
        debug_assert!(self.outgoing.is_empty());
        self.outgoing = out;
        dropped
    }
}

/// Mail that must arrive (retried when a mailbox is full, in order per target).
pub(super) fn is_reliable(msg: &ShardMsg) -> bool {
    match msg {
        ShardMsg::Presence { .. }
        | ShardMsg::Registered { .. }
        | ShardMsg::Api { .. }
        | ShardMsg::ApiDone { .. }
        | ShardMsg::Store(_)
        | ShardMsg::StoreBatch(_)
        | ShardMsg::DeliverStream { .. }
        // Copies of a message its sender was (or will be) told was accepted: a DM on its
        // way to the shard holding the recipient, a channel publication, the sender's own
        // copy for her other devices. Never acked and then dropped: they wait for room, and
        // the shard reads no client input meanwhile (`on_readable`), which bounds the wait.
        | ShardMsg::DeliverUser { .. }
        | ShardMsg::DeliverChannel { .. } => true,
        ShardMsg::Broker(m) => matches!(
            **m,
            BrokerMsg::Unavailable { .. } | BrokerMsg::Busy { .. }
        ),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::ConnId;

    fn registered(slot: u32) -> ShardMsg {
        ShardMsg::Registered {
            conn: ConnId {
                shard: 0,
                slot,
                generation: 1,
            },
        }
    }

    #[test]
    fn mail_that_must_arrive_waits_in_order_and_the_rest_is_dropped_when_a_mailbox_is_full() {
        let mut p = Postbox::new(0, 2);
        p.send(1, registered(1));
        p.send(1, ShardMsg::Broker(Box::new(BrokerMsg::Resubscribed)));
        p.send(1, registered(2));
        let dropped = p.post(|_, m| Err(m));
        assert_eq!(dropped, 1, "the unreliable one");
        assert!(p.has_retries());
        p.send(1, registered(3));
        let mut got = Vec::new();
        let all = p.post(|_, m| {
            got.push(m);
            Ok(())
        });
        assert_eq!(all, 0);
        let slots: Vec<u32> = got
            .iter()
            .map(|m| match m {
                ShardMsg::Registered { conn } => conn.slot,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(slots, [1, 2, 3], "waiting mail first, in order");
        assert!(!p.has_retries());
    }
}
