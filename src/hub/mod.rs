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
//! answers questions, so it is tested without sockets. The messages themselves are in
//! `mail/`.

use std::sync::Arc;

use rustc_hash::{FxHashMap, FxHashSet};

pub use crate::ids::{home_of, ApiTicket, ConnId, ReplyTo};

mod directory;
pub use directory::Directory;

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
