//! Who is where: the process-wide [`Directory`] of each named user's connections, each
//! shard's local registry of channel subscriptions, and the messages shards exchange to
//! route a DM or a publication.
//!
//! Routing a DM takes one hop: the sender's shard reads the recipient's entry in the
//! directory (written only by the user's *home shard*, a hash of the user id, as
//! connections open and close) and posts the shared payload once to each shard that holds
//! a connection of the user; it answers the sender itself. The holding shard finds its own
//! connections of the user in the same entry. Channels are fanned out to every
//! shard with subscribers, each of which knows its local ones. The hub does no I/O: it only
//! answers questions, so it is tested without sockets.

use std::sync::Arc;

use bytes::Bytes;
use rustc_hash::{FxHashMap, FxHashSet};

use crate::broker::BrokerMsg;
pub use crate::ids::{home_of, ApiTicket, ConnId, ReplyTo};
use crate::store::StoreMsg;

mod directory;
pub use directory::Directory;

/// Messages between shards (bounded mailboxes; see `shard::mailbox`).
#[derive(Debug)]
pub enum ShardMsg {
    /// To the home shard of `user`: its connection `conn` opened (`online`) or closed. With
    /// `welcome`, the home answers [`ShardMsg::Registered`] so the connection can be
    /// welcomed. Never dropped (posted with retry).
    Presence {
        user: Arc<str>,
        conn: ConnId,
        online: bool,
        welcome: bool,
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

/// One shard's local channel subscriptions (named users' connections, local ones too, are
/// in the process-wide [`Directory`]).
#[derive(Debug, Default)]
pub struct Hub {
    channels: FxHashMap<Arc<str>, FxHashSet<u32>>,
}

impl Hub {
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

    /// Channels with local subscribers.
    pub fn local_channels(&self) -> usize {
        self.channels.len()
    }

    /// Every local slot the hub lists (repeats possible), for checks.
    pub fn all_slots(&self) -> impl Iterator<Item = u32> + '_ {
        self.channels.values().flat_map(|s| s.iter().copied())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
