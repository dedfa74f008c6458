//! The bottom layer of a shard's router: its connections and every route between them.
//! [`Core`] registers and unregisters connections (directory, hub, broker interest),
//! routes DMs and publications (locally, to other shards' mail, to other nodes through the
//! broker), delivers and answers, and closes; it queues what other threads must be told
//! (mail, broker requests) for the driver to post. It calls nothing above it: the layers
//! that do (`Streams`, `Api`, `Router`) reach it through `Deref`.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

use crate::broker::BrokerHandle;
use crate::config::Config;
use crate::conn::Transport;
use crate::hub::{ConnId, Directory, Hub};
use crate::metrics::ShardMetrics;
use crate::protocol;

use super::{admission, catchup, postbox, table, waits};

/// The shard's connections and routes (see the module docs).
pub struct Core<T: Transport> {
    pub(super) index: u16,
    pub(super) shards: u16,
    /// The process's directory of named users (this shard writes its home users' entries).
    pub(super) directory: Arc<Directory>,
    pub(super) cfg: Arc<Config>,
    pub(super) metrics: Arc<[ShardMetrics]>,
    pub(super) open_total: Arc<AtomicUsize>,
    pub(super) subscribed: Arc<[AtomicUsize]>,
    pub(super) ip_table: Arc<admission::IpTable>,
    /// The address bucket each connection counts against, by slab key (`bucket + 1`; 0: not
    /// counted): beside the slab, so `Conn` stays small.
    pub(super) ip_buckets: Vec<u16>,
    /// Connections holding part of an HTTP request (a slowloris pins a read buffer this
    /// way), capped by `--max-pending-handshakes`.
    pub(super) half_open: u32,
    /// Where a reply for one connection is written before it is copied into its outbox
    /// (reused: an `ack` allocates nothing).
    pub(super) scratch_reply: bytes::BytesMut,
    /// Publications for the broker this turn, for the driver to post
    /// ([`Router::post_broker`](super::Router::post_broker)).
    pub(super) broker_out: Vec<crate::broker::BrokerReq>,
    /// Interest changes for the broker this turn (posted with the publications).
    pub(super) interest_out: Vec<crate::broker::Interest>,
    pub(super) broker: Option<BrokerHandle>,
    /// Who waits for which subscription of the broker to be active.
    pub(super) waits: waits::ReadyWaits,
    /// The shard's connections, their buffers, deadlines and clock.
    pub(super) conns: table::Table<T>,
    pub(super) hub: Hub,
    /// Mail for other shards, posted at the end of the turn.
    pub(super) mail: postbox::Postbox,
    pub(super) scratch_slots: Vec<u32>,
    pub(super) scratch_shards: Vec<u16>,
    /// Per stream followed here (cluster only), where this shard stands in it: forgotten
    /// with the last connection that follows it, so it lives with the routes.
    pub(super) heads: catchup::Heads,
    pub(super) shutdown_deadline_ms: Option<u64>,
}

impl<T: Transport> Core<T> {
    pub(super) fn m(&self) -> &ShardMetrics {
        &self.metrics[self.index as usize]
    }

    /// A retry-after for connection `key`: `from_ms` plus jitter uniform over `span_ms`.
    pub(super) fn retry_jitter_ms(&self, key: usize, from_ms: u64, span_ms: u64) -> u64 {
        from_ms + admission::mix(self.salt(key)) % span_ms.max(1)
    }

    /// Jitter input for connection `key`: differs per connection and per moment.
    pub(super) fn salt(&self, key: usize) -> u64 {
        let g = self.conns.get(key).map_or(0, |c| c.generation) as u64;
        (key as u64) << 40 ^ g << 20 ^ self.conns.now_ms ^ (self.index as u64) << 56
    }

    /// Gives back the address place of connection `key` (at its end).
    pub(super) fn release_ip(&mut self, key: usize) {
        if let Some(b) = self.ip_buckets.get_mut(key) {
            if *b != 0 {
                self.ip_table.release(*b - 1);
                *b = 0;
            }
        }
    }

    /// Appends the slab keys of this shard's connections of `user` that deliveries reach,
    /// all but `exclude`.
    pub(super) fn local_conns_of(&self, user: &str, exclude: Option<ConnId>, out: &mut Vec<u32>) {
        self.directory.each_on(user, self.index, |id| {
            if self.conns.delivers_to(id) && Some(id) != exclude {
                out.push(id.slot);
            }
        });
    }

    /// The user id a connection acts as: its own, or `anon-<shard>-<slot>-<generation>`.
    pub(super) fn user_name(&self, key: usize) -> Arc<str> {
        let c = &self.conns[key];
        match &c.user {
            Some(u) => u.clone(),
            None => format!("anon-{}-{}-{}", self.index, key, c.generation).into(),
        }
    }

    /// The message rate limit as (µs between messages, µs of burst), none when off.
    pub(super) fn message_rate(&self) -> Option<(u64, u64)> {
        let rate = self.cfg.max_messages_per_sec as u64;
        let interval_us = 1_000_000 / rate.max(1);
        (rate > 0).then_some((interval_us, interval_us * self.cfg.message_burst as u64))
    }

    pub(super) fn ack(&mut self, key: usize, id: Option<&str>) {
        if let Some(id) = id {
            let f = protocol::ack(id);
            self.deliver(key, &f);
        }
    }
}
