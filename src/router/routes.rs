//! Routes between connections and shards: joining the hub (and the user's home-shard
//! directory), channel subscriptions and their join/leave events, DMs routed through the
//! recipient's home shard, channel fan-out, replies, and mail from other shards.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::table::Out;
use super::waits::Interested;
use super::Core;
use crate::broker::{BrokerReq, Interest};
use crate::conn::{Flags, Transport};
use crate::hub::{ConnId, ReplyTo};
use crate::mail::ShardMsg;
use crate::protocol::{self, ErrorCode};
use crate::ws::frame::Data;

/// From this many local recipients on, a fan-out writes each frame as it queues it
/// ([`Core::deliver_out`]); below it, frames wait for the end of the turn, where one write
/// carries all of a connection's.
const WRITE_THROUGH_FANOUT: usize = 256;

/// A large fan-out's payload up to this size gets a copy of its own in each shard.
const SHARD_COPY_MAX: usize = 16 * 1024;

impl<T: Transport> Core<T> {
    /// Queues the welcome event.
    pub(super) fn welcome(&mut self, key: usize) {
        let name = self.user_name(key);
        let id = self.conns.conn_id(key);
        let welcome = protocol::welcome(&name, &id.to_string(), self.cfg.ping_interval_ms);
        self.conns.push_event(key, welcome);
    }

    /// Connection `conn` of `user` closed: its home shard drops it from the directory.
    pub(super) fn presence_offline(&mut self, user: Arc<str>, conn: ConnId) {
        let home = self.directory.place(&user).home;
        if home == self.index {
            let change = self.directory.presence(user.clone(), conn, false);
            self.tell_broker_user(user, false, change, None);
        } else {
            self.mail.send(
                home,
                ShardMsg::Presence {
                    user,
                    conn,
                    online: false,
                    welcome: false,
                },
            );
        }
    }

    /// Removes the connection from the hub: no more deliveries reach it.
    pub(super) fn unregister(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if !c.flags.has(Flags::REGISTERED) {
            return;
        }
        c.flags.clear(Flags::REGISTERED);
        let channels = c.take_channels();
        let user = c.user.clone();
        for ch in &channels {
            self.unsubscribe_local(ch, key);
        }
        if let Some(user) = user {
            // Deliveries stop now (they skip an unregistered connection); the directory
            // drops it when the home shard reads the mail.
            let me = self.conns.conn_id(key);
            self.forget_head(&user);
            self.presence_offline(user, me);
        }
    }

    /// Adds a local subscription (the caller checked the name, permission and limit),
    /// sharing the hub's key for the name when the channel already has local subscribers.
    /// With a broker, the shard's first subscriber of a channel is reported: the token to
    /// wait for before the subscription is active cluster-wide.
    pub(super) fn subscribe(&mut self, key: usize, channel: Arc<str>) -> Option<u64> {
        let name = self.hub.channel_key(&channel).unwrap_or(channel);
        let added = self.hub.subscribe(&name, key as u32);
        self.count_channels();
        if added {
            self.count_subscriber(key, &name, 1);
            self.tell_join_leave(key, &name, true);
        }
        self.conns[key].channels_mut().push(name.clone());
        let first = added && self.hub.subscriber_count(&name) == 1;
        self.broker.as_ref()?;
        let what = Interested::Channel(name.clone());
        if !first {
            return self.waits.pending(&what);
        }
        // The caller adds its waiter (`add_wait`); later subscribers wait on the same token.
        let t = self.waits.new_wait(what, Vec::new());
        self.interest_out.push(Interest::Channel {
            channel: name,
            on: true,
            ready: Some((self.index, t)),
        });
        Some(t)
    }

    /// Removes a local subscription; the shard's last subscriber of a channel is reported to
    /// the broker.
    pub(super) fn unsubscribe_local(&mut self, channel: &str, key: usize) {
        let removed = self.hub.unsubscribe(channel, key as u32);
        self.count_channels();
        if removed {
            self.count_subscriber(key, channel, -1);
            self.tell_join_leave(key, channel, false);
        }
        if let (true, 0, true) = (
            removed,
            self.hub.subscriber_count(channel),
            self.broker.is_some(),
        ) {
            self.interest_out.push(Interest::Channel {
                channel: channel.into(),
                on: false,
                ready: None,
            });
            self.forget_channel_head(channel);
        }
    }

    /// A subscription of connection `key` to `channel` came or went: when the channel's
    /// rule says so, its subscribers that asked get a `join`/`leave` event, on every shard
    /// and node (not the connection itself).
    pub(super) fn tell_join_leave(&mut self, key: usize, channel: &str, join: bool) {
        if !self.cfg.join_leave(channel) {
            return;
        }
        let user = self.user_name(key);
        let conn = self.conns.conn_id(key).to_string();
        let f = protocol::join_leave(join, channel, &user, &conn);
        self.publish_except(Arc::from(channel), f, Some(key));
    }

    /// A `join`/`leave` event to the local subscribers of `channel` that asked for them.
    pub(super) fn deliver_join_leave(
        &mut self,
        channel: &str,
        f: &Bytes,
        except: Option<usize>,
    ) -> u64 {
        self.deliver_to(f, |me, slots| {
            slots.extend(me.hub.subscribers(channel).filter(|&s| {
                Some(s as usize) != except
                    && me.conns[s as usize]
                        .extra()
                        .is_some_and(|e| e.join_leave.iter().any(|c| **c == *channel))
            }))
        })
    }

    /// Delivers `f` to the slots `pick` lists (into the reused scratch list: the hub is
    /// borrowed while listing); how many connections took it.
    pub(super) fn deliver_to(&mut self, f: &Bytes, pick: impl FnOnce(&Self, &mut Vec<u32>)) -> u64 {
        self.deliver_out(Out::Shared(f.clone()), pick)
    }

    /// [`deliver_to`](Self::deliver_to) of shared or own bytes.
    pub(super) fn deliver_out(
        &mut self,
        f: Out<'_>,
        pick: impl FnOnce(&Self, &mut Vec<u32>),
    ) -> u64 {
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        pick(self, &mut slots);
        let mut n = 0;
        if slots.len() < WRITE_THROUGH_FANOUT {
            for &slot in &slots {
                n += u64::from(self.deliver_data(slot as usize, Data::Text, f.share()));
            }
        } else {
            // A large fan-out: this shard's own copy of a small shared payload (its count is
            // then touched by this thread alone; a large one is shared as it is, not copied
            // once per shard), and each frame written as it is queued to a connection that
            // had nothing waiting, so its outbox goes back to the pool at once: a broadcast
            // to 1M holds a few outboxes per shard, not one per connection.
            let f = match f {
                Out::Shared(b) if b.len() <= SHARD_COPY_MAX => {
                    Out::Shared(Bytes::copy_from_slice(&b))
                }
                f => f,
            };
            for &slot in &slots {
                let idle = self
                    .conns
                    .get(slot as usize)
                    .is_some_and(|c| c.queued_bytes() == 0 && c.flags.has(Flags::WRITABLE));
                let queued = self.deliver_data(slot as usize, Data::Text, f.share());
                if queued && idle {
                    self.conns.write_early(slot as usize);
                }
                n += u64::from(queued);
            }
        }
        self.scratch_slots = slots;
        n
    }

    /// Publishes how many channels have local subscribers (a relaxed store: a publish that
    /// races with this shard's first subscription is one that came before it).
    pub(super) fn count_channels(&self) {
        self.subscribed[self.index as usize].store(self.hub.channel_count(), Ordering::Relaxed);
    }

    /// Fans a channel frame out to every shard's subscribers.
    pub(super) fn publish(&mut self, channel: Arc<str>, f: Bytes) {
        self.publish_except(channel, f, None);
    }

    /// [`Self::publish`], but not to the local connection `except` (the one whose
    /// subscription a `join`/`leave` event tells).
    pub(super) fn publish_except(&mut self, channel: Arc<str>, f: Bytes, except: Option<usize>) {
        for s in 0..self.shards as usize as u16 {
            let none = self.subscribed[s as usize].load(Ordering::Relaxed) == 0;
            if s != self.index && !none {
                self.mail.send(
                    s,
                    ShardMsg::DeliverChannel {
                        channel: channel.clone(),
                        payload: f.clone(),
                    },
                );
            }
        }
        self.deliver_channel_except(&channel, &f, except);
        self.publish_remote(channel, f);
    }

    /// Routes a DM (or the sender's copy for her other devices) in one hop: the directory
    /// names the shards holding `to`; this shard's connections get a copy of the event, each
    /// other holding shard one mail with the shared payload, and with a broker one publish
    /// goes to the other nodes. With `reply`, the sender is answered here: ack,
    /// `user_offline`, `overloaded` or `unavailable`.
    pub(super) fn route_user(
        &mut self,
        to: &str,
        ev: &mut Event<'_>,
        exclude: Option<ConnId>,
        reply: Option<Reply<'_>>,
    ) {
        let name = self.deliver_located(to, ev, exclude);
        let online = name.is_some();
        let mut reply = reply;
        if let Some(b) = &self.broker {
            // In a cluster only the master that carries `to`'s DMs matters.
            if !b.reachable_user(to) {
                if !online {
                    if let Some(r) = reply.take() {
                        return self.reply_unavailable(r.owned(to));
                    }
                }
            } else {
                // Answered here when someone on this node got it; else by the broker, from
                // the number of nodes that did.
                let ask = if online { None } else { reply.take() };
                let req = BrokerReq::User {
                    user: name.unwrap_or_else(|| Arc::from(to)),
                    payload: ev.shared(),
                    reply: ask.map(|r| r.owned(to)),
                };
                // Refused by a full queue: dropped, the sender answered from this node.
                self.broker_out.push(req);
            }
        }
        if let Some(r) = reply {
            self.reply_to(r.conn, r.id, to, Some(online));
        }
    }

    /// Delivers to the user's connections in this process, found in the directory: this
    /// shard's get the event directly, each other holding shard one mail with the shared
    /// payload. Skips a shard whose only connection of the user is `exclude` (no trip for
    /// nothing when a user without other devices sends). One read of the user's entry does
    /// both. The user's shared name when it has any connection.
    pub(super) fn deliver_located(
        &mut self,
        to: &str,
        ev: &mut Event<'_>,
        exclude: Option<ConnId>,
    ) -> Option<Arc<str>> {
        let mut shards = std::mem::take(&mut self.scratch_shards);
        shards.clear();
        let mut name = None;
        self.deliver_out(ev.local(), |me, slots| {
            name = me
                .directory
                .route(to, exclude, Some(me.index), &mut shards, |id| {
                    if me.conns.delivers_to(id) {
                        slots.push(id.slot);
                    }
                });
        });
        if let Some(name) = &name {
            for &s in &shards {
                let msg = ShardMsg::DeliverUser {
                    to: name.clone(),
                    payload: ev.shared(),
                    exclude,
                };
                self.mail.send(s, msg);
            }
        }
        self.scratch_shards = shards;
        name
    }

    /// Answers a routed `send`: ack, `user_offline`, or `overloaded` (`online` = None).
    pub(super) fn reply_local(&mut self, reply: ReplyTo, online: Option<bool>) {
        self.reply_to(reply.conn, &reply.id, &reply.to, online);
    }

    /// [`reply_local`](Self::reply_local) from borrowed parts: the connection, the raw JSON
    /// of its request's id, the recipient.
    pub(super) fn reply_to(&mut self, conn: ConnId, id: &str, to: &str, online: Option<bool>) {
        let key = conn.slot as usize;
        let alive = self
            .conns
            .get(key)
            .is_some_and(|c| c.generation == conn.generation && c.state.is_open());
        if !alive {
            return;
        }
        let f = match online {
            Some(true) => {
                let mut s = std::mem::take(&mut self.scratch_reply);
                s.clear();
                protocol::ack_into(&mut s, id);
                self.deliver_data(key, Data::Text, Out::Own(&s));
                self.scratch_reply = s;
                return;
            }
            Some(false) => protocol::error(
                Some(id),
                ErrorCode::UserOffline,
                &format!("user {to} has no open connection"),
            ),
            None => protocol::error(
                Some(id),
                ErrorCode::Overloaded,
                "server busy; message not delivered",
            ),
        };
        self.deliver(key, &f);
    }

    pub(super) fn deliver_user_local(
        &mut self,
        to: &str,
        f: &Bytes,
        exclude: Option<ConnId>,
    ) -> u64 {
        self.deliver_user_local_out(to, Out::Shared(f.clone()), exclude)
    }

    /// [`deliver_user_local`](Self::deliver_user_local) of shared or own bytes.
    pub(super) fn deliver_user_local_out(
        &mut self,
        to: &str,
        f: Out<'_>,
        exclude: Option<ConnId>,
    ) -> u64 {
        self.deliver_out(f, |me, slots| me.local_conns_of(to, exclude, slots))
    }

    pub(super) fn deliver_channel_local(&mut self, channel: &str, f: &Bytes) -> u64 {
        self.deliver_channel_except(channel, f, None)
    }

    /// To the local subscribers of `channel` but `except` (a `join`/`leave` event only to
    /// those that asked for them).
    pub(super) fn deliver_channel_except(
        &mut self,
        channel: &str,
        f: &Bytes,
        except: Option<usize>,
    ) -> u64 {
        if protocol::is_join_leave(f) {
            return self.deliver_join_leave(channel, f, except);
        }
        self.deliver_to(f, |me, slots| {
            slots.extend(
                me.hub
                    .subscribers(channel)
                    .filter(|&s| Some(s as usize) != except),
            )
        })
    }
}

/// A DM event on its way: written once into a reused buffer, copied from it into local
/// recipients' outboxes; shared (one allocation) only once it must leave the shard.
pub(super) struct Event<'a> {
    bytes: &'a [u8],
    shared: Option<Bytes>,
}

impl<'a> Event<'a> {
    pub(super) fn new(bytes: &'a [u8]) -> Event<'a> {
        Event {
            bytes,
            shared: None,
        }
    }

    /// An event that arrived already shared (another node's DM).
    pub(super) fn shared_from(b: &'a Bytes) -> Event<'a> {
        Event {
            bytes: b,
            shared: Some(b.clone()),
        }
    }

    /// What this shard's recipients get: the shared payload once there is one, else a copy
    /// of the bytes.
    pub(super) fn local(&self) -> Out<'_> {
        match &self.shared {
            Some(b) => Out::Shared(b.clone()),
            None => Out::Own(self.bytes),
        }
    }

    /// The payload as shared bytes (made on first use).
    pub(super) fn shared(&mut self) -> Bytes {
        self.shared
            .get_or_insert_with(|| Bytes::copy_from_slice(self.bytes))
            .clone()
    }
}

/// Whom to answer about a `send`, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reply<'a> {
    /// The sending connection.
    pub(super) conn: ConnId,
    /// Raw JSON of the request's `id`.
    pub(super) id: &'a str,
}

impl Reply<'_> {
    /// The owned form, for an answer that comes later (from the broker).
    pub(super) fn owned(self, to: &str) -> ReplyTo {
        ReplyTo {
            conn: self.conn,
            id: self.id.into(),
            to: Arc::from(to),
        }
    }
}
