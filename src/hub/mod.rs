//! Who is where: each shard's local registry of users and channel subscriptions, the
//! process-wide [`Directory`] of which shards hold each named user, and the messages shards
//! exchange to route a DM or a publication.
//!
//! Routing a DM takes one hop: the sender's shard reads the recipient's entry in the
//! directory (written only by the user's *home shard*, a hash of the user id, as
//! connections open and close) and posts the shared payload once to each shard that holds
//! a connection of the user; it answers the sender itself. Channels are fanned out to every
//! shard with subscribers, each of which knows its local ones. The hub does no I/O: it only
//! answers questions, so it is tested without sockets.

use std::sync::Arc;

use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::hash_map::Entry;

use crate::broker::BrokerMsg;
pub use crate::ids::{home_of, ApiTicket, ConnId, ReplyTo};
use crate::store::StoreMsg;

mod directory;
pub use directory::Directory;

/// Messages between shards (bounded mailboxes; see `shard::mailbox`).
#[derive(Debug)]
pub enum ShardMsg {
    /// To the home shard of `user`: a connection of it opened (`online`) or closed on shard
    /// `from`. With `ack`, the home answers [`ShardMsg::Registered`] so the connection can be
    /// welcomed. Never dropped (posted with retry).
    Presence {
        user: Arc<str>,
        from: u16,
        online: bool,
        ack: Option<ConnId>,
    },
    /// The home shard recorded connection `conn`.
    Registered { conn: ConnId },
    /// To a shard holding connections of `to`: deliver locally.
    DeliverUser {
        to: Arc<str>,
        payload: Bytes,
        exclude: Option<ConnId>,
    },
    /// Deliver to local subscribers of `channel`.
    DeliverChannel { channel: Arc<str>, payload: Bytes },
    /// Execute an API command on local connections and answer [`ShardMsg::ApiDone`].
    Api { ticket: ApiTicket, cmd: Arc<ApiCmd> },
    /// A shard's count for API request `id` of this shard (and, for
    /// [`ApiCmd::Members`], its members: user → subscriptions, `""` for anonymous ones).
    ApiDone {
        id: u32,
        count: u64,
        members: Vec<(Arc<str>, u64)>,
    },
    /// From a home shard passing on a stored message's ack.
    Store(Box<StoreMsg>),
    /// From the store thread: its answers of one commit for this shard, in order (one
    /// mailbox entry and at most one wake per commit).
    StoreBatch(Vec<StoreMsg>),
    /// To a shard holding connections of `user`: a stored message of the user's inbox.
    DeliverStream {
        user: Arc<str>,
        payload: Bytes,
        offset: u64,
        exclude: Option<ConnId>,
    },
    /// Stop accepting, close every connection with 1001, exit within the grace period.
    Shutdown,
    /// From the broker: another node's message, or an answer about one of ours.
    Broker(Box<BrokerMsg>),
}

impl ShardMsg {
    /// How many messages this is (a batch counts what it carries): what a shard's turn counts.
    pub fn weight(&self) -> usize {
        match self {
            ShardMsg::StoreBatch(v) => v.len(),
            _ => 1,
        }
    }
}

/// What an API request asks every shard to do; each answers with a count.
#[derive(Debug)]
pub enum ApiCmd {
    /// Deliver to local subscribers of `channel` (WebSocket and SSE).
    Publish { channel: Arc<str>, payload: Bytes },
    /// Deliver to every local connection of `user`.
    SendUser { user: Arc<str>, payload: Bytes },
    /// Deliver to every open local connection.
    Broadcast { payload: Bytes },
    /// Close every local connection of `user` with `code`.
    Disconnect {
        user: Arc<str>,
        code: u16,
        reason: Arc<str>,
    },
    /// Count local connections of `user`.
    CountUser { user: Arc<str> },
    /// Count local subscribers of `channel`.
    CountChannel { channel: Arc<str> },
    /// List local subscribers of `channel` by user (the `presence` op and route).
    Members { channel: Arc<str> },
}

/// One item inline, or several on the heap: most users have one connection, on one shard,
/// and a million of them should not cost a million small heap blocks (16–32 B each).
#[derive(Debug)]
enum Few<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Copy> Few<T> {
    fn as_slice(&self) -> &[T] {
        match self {
            Few::One(x) => std::slice::from_ref(x),
            Few::Many(v) => v,
        }
    }

    fn as_mut_slice(&mut self) -> &mut [T] {
        match self {
            Few::One(x) => std::slice::from_mut(x),
            Few::Many(v) => v,
        }
    }

    fn push(&mut self, x: T) {
        match self {
            Few::One(a) => *self = Few::Many(vec![*a, x]),
            Few::Many(v) => v.push(x),
        }
    }

    /// Removes item `i` (the last one takes its place).
    fn swap_remove(&mut self, i: usize) {
        match self {
            Few::One(_) => *self = Few::Many(Vec::new()),
            Few::Many(v) => {
                v.swap_remove(i);
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.as_slice().is_empty()
    }
}

/// One shard's view: local users and subscriptions (the process-wide [`Directory`] says
/// which shards hold a user).
#[derive(Debug, Default)]
pub struct Hub {
    users: FxHashMap<Arc<str>, Few<u32>>,
    channels: FxHashMap<Arc<str>, FxHashSet<u32>>,
}

impl Hub {
    /// Adds a local connection of `user`; true when it is the user's first on this shard.
    /// (Every connection is reported to the home shard, which counts them per shard.)
    pub fn add_user(&mut self, user: &Arc<str>, slot: u32) -> bool {
        match self.users.entry(user.clone()) {
            Entry::Vacant(e) => {
                e.insert(Few::One(slot));
                true
            }
            Entry::Occupied(mut e) => {
                e.get_mut().push(slot);
                false
            }
        }
    }

    /// Removes a local connection; true when it was the user's last on this shard.
    pub fn remove_user(&mut self, user: &str, slot: u32) -> bool {
        let Some(slots) = self.users.get_mut(user) else {
            return false;
        };
        if let Some(i) = slots.as_slice().iter().position(|&s| s == slot) {
            slots.swap_remove(i);
        }
        if slots.is_empty() {
            self.users.remove(user);
            true
        } else {
            false
        }
    }

    /// Local connections of `user`.
    pub fn user_slots(&self, user: &str) -> &[u32] {
        self.users.get(user).map_or(&[], |v| v.as_slice())
    }

    /// The shared key for `name` if the channel has local subscribers (avoids a new
    /// allocation per subscription).
    pub fn channel_key(&self, name: &str) -> Option<Arc<str>> {
        self.channels.get_key_value(name).map(|(k, _)| k.clone())
    }

    /// Subscribes a local connection; false when it already was.
    pub fn subscribe(&mut self, channel: &Arc<str>, slot: u32) -> bool {
        self.channels
            .entry(channel.clone())
            .or_default()
            .insert(slot)
    }

    /// Unsubscribes a local connection; false when it was not subscribed.
    pub fn unsubscribe(&mut self, channel: &str, slot: u32) -> bool {
        let Some(set) = self.channels.get_mut(channel) else {
            return false;
        };
        let removed = set.remove(&slot);
        if set.is_empty() {
            self.channels.remove(channel);
        }
        removed
    }

    /// Local subscribers of `channel`.
    pub fn subscribers(&self, channel: &str) -> impl Iterator<Item = u32> + '_ {
        self.channels
            .get(channel)
            .into_iter()
            .flat_map(|s| s.iter().copied())
    }

    /// Channels with local subscribers.
    pub fn channel_count(&self) -> usize {
        self.channels.len()
    }

    /// Number of local subscribers of `channel`.
    pub fn subscriber_count(&self, channel: &str) -> usize {
        self.channels.get(channel).map_or(0, |s| s.len())
    }

    /// Every channel with its local subscribers.
    pub fn channel_counts(&self) -> Vec<(Arc<str>, u64)> {
        self.channels
            .iter()
            .map(|(c, set)| (c.clone(), set.len() as u64))
            .collect()
    }

    /// Local users with at least one connection.
    pub fn local_users(&self) -> usize {
        self.users.len()
    }

    /// Channels with local subscribers.
    pub fn local_channels(&self) -> usize {
        self.channels.len()
    }

    /// Every local slot the hub lists (users and channels; repeats possible), for checks.
    pub fn all_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.users
            .values()
            .flat_map(|v| v.as_slice().iter().copied())
            .chain(self.channels.values().flat_map(|s| s.iter().copied()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_connection_lives_inline_and_more_spill_to_the_heap_and_back() {
        // A map value no bigger than the Vec it replaces.
        assert!(std::mem::size_of::<Few<(u16, u32)>>() <= std::mem::size_of::<Vec<u32>>());
        let mut h = Hub::default();
        let bob: Arc<str> = "bob".into();
        assert!(h.add_user(&bob, 7));
        assert!(matches!(h.users["bob"], Few::One(7)));
        assert!(!h.add_user(&bob, 8) && !h.add_user(&bob, 9));
        assert_eq!(h.user_slots("bob"), &[7, 8, 9]);
        assert!(!h.remove_user("bob", 7));
        assert_eq!(h.user_slots("bob"), &[9, 8]);
        assert!(!h.remove_user("bob", 9) && h.remove_user("bob", 8));
        assert_eq!(h.local_users(), 0);
    }

    #[test]
    fn users_first_and_last() {
        let mut h = Hub::default();
        let alice: Arc<str> = "alice".into();
        assert!(h.add_user(&alice, 1));
        assert!(!h.add_user(&alice, 2));
        assert_eq!(h.user_slots("alice"), &[1, 2]);
        assert!(!h.remove_user("alice", 1));
        assert!(h.remove_user("alice", 2));
        assert!(h.user_slots("alice").is_empty());
        assert!(!h.remove_user("alice", 2));
    }

    #[test]
    fn channels() {
        let mut h = Hub::default();
        let r: Arc<str> = "room".into();
        assert!(h.subscribe(&r, 1));
        assert!(!h.subscribe(&r, 1));
        assert!(h.subscribe(&r, 2));
        let mut subs: Vec<_> = h.subscribers("room").collect();
        subs.sort();
        assert_eq!(subs, vec![1, 2]);
        assert!(h.unsubscribe("room", 1));
        assert!(!h.unsubscribe("room", 1));
        assert!(h.unsubscribe("room", 2));
        assert_eq!(h.local_channels(), 0);
        assert!(h.channel_key("room").is_none());
    }

    #[test]
    fn homes_spread() {
        let mut counts = [0usize; 4];
        for i in 0..10_000 {
            counts[home_of(&format!("user{i}"), 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 2000), "{counts:?}");
    }
}
