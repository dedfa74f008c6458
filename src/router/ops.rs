//! Protocol v1 on an open connection, and routing between shards: joining the hub (and
//! the user's home-shard directory), the ops (`send`, `sub`, `unsub`, `pub`, `ping`), DMs
//! routed through the recipient's home shard, channel fan-out, and mail from other shards.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;

use super::table::Out;
use super::waits::{Interested, ReadyWait};
use super::Router;
use crate::auth;
use crate::broker::{BrokerMsg, BrokerReq, Counted, Interest};
use crate::conn::{ConnState, Flags, Transport, Welcome};
use crate::hub::{ConnId, ReplyTo};
use crate::mail::ShardMsg;
use crate::metrics::ShardMetrics;
use crate::protocol::{self, ErrorCode, Op, Target};
use crate::ws::close::{self as code};
use crate::ws::frame::Data;

pub use crate::protocol::{FORBIDDEN_CHANNEL, MAX_CHANNELS_PER_CONN};

/// A whole message from a client.
pub(super) enum Incoming<'a> {
    /// A text message, checked for UTF-8 once (`on_complete`).
    Text(&'a str),
    /// A binary message.
    Binary(&'a [u8]),
}

impl<T: Transport> Router<T> {
    /// Adds the connection to the hub: its user (and the home shard's directory) when named;
    /// anonymous connections only ever join channels.
    ///
    /// The welcome is sent once the user's home shard has recorded the connection, so a client
    /// that has its welcome is reachable by every DM sent after it.
    pub(super) fn register(&mut self, key: usize, welcome: bool) {
        let me = self.conn_id(key);
        let c = &mut self.conns[key];
        c.flags.set(Flags::REGISTERED);
        let Some(user) = c.user.clone() else {
            if welcome {
                self.welcome(key);
            }
            return;
        };
        let home = self.directory.place(&user).home;
        if home == self.index {
            let change = self.directory.presence(user.clone(), me, true);
            if self.tell_broker_user(user, true, change, welcome.then_some(me)) {
                // Welcomed once the node receives the user's DMs from the whole cluster.
                self.conns[key].state = ConnState::Open(Welcome::Registration);
            } else if welcome {
                self.open_or_welcome(key);
            }
        } else {
            if welcome {
                self.conns[key].state = ConnState::Open(Welcome::Registration);
            }
            self.mail.send(
                home,
                ShardMsg::Presence {
                    user,
                    conn: me,
                    online: true,
                    welcome,
                },
            );
        }
    }

    /// Queues the welcome event.
    pub(super) fn welcome(&mut self, key: usize) {
        let name = self.user_name(key);
        let id = self.conn_id(key);
        let welcome = protocol::welcome(&name, &id.to_string(), self.cfg.ping_interval_ms);
        self.conns.push_event(key, welcome);
    }

    /// The home shard recorded a connection: it may now be welcomed.
    pub(super) fn on_registered(&mut self, conn: ConnId) {
        let key = conn.slot as usize;
        let alive = self.conns.get(key).is_some_and(|c| {
            c.generation == conn.generation && c.state == ConnState::Open(Welcome::Registration)
        });
        if alive {
            self.conns[key].state = ConnState::Open(Welcome::Sent);
            self.open_or_welcome(key);
            if !self.conns[key].state.holds_input() {
                // Requests that arrived meanwhile are processed now, after the welcome.
                self.on_readable(key, true);
            }
        }
    }

    /// The user id a connection acts as: its own, or `anon-<shard>-<slot>-<generation>`.
    pub(super) fn user_name(&self, key: usize) -> Arc<str> {
        let c = &self.conns[key];
        match &c.user {
            Some(u) => u.clone(),
            None => format!("anon-{}-{}-{}", self.index, key, c.generation).into(),
        }
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
            let me = self.conn_id(key);
            self.forget_head(&user);
            self.presence_offline(user, me);
        }
    }

    /// The message rate limit as (µs between messages, µs of burst), none when off.
    fn message_rate(&self) -> Option<(u64, u64)> {
        let rate = self.cfg.max_messages_per_sec as u64;
        let interval_us = 1_000_000 / rate.max(1);
        (rate > 0).then_some((interval_us, interval_us * self.cfg.message_burst as u64))
    }

    /// The message rate limit (GCRA over `Conn::rate_debt_us`): true when this message is
    /// over the connection's rate and burst.
    fn over_rate(&mut self, key: usize) -> bool {
        let Some((interval_us, tolerance_us)) = self.message_rate() else {
            return false;
        };
        let c = &mut self.conns[key];
        let debt = c.rate_debt_us as u64 + interval_us;
        if debt <= tolerance_us {
            c.rate_debt_us = debt as u32;
            if let Some(e) = c.extra_if_mut() {
                e.rate_strikes = 0;
            }
            false
        } else {
            let e = c.extra_mut();
            e.rate_strikes = e.rate_strikes.saturating_add(1);
            true
        }
    }

    /// Answers an op over the rate `rate_limited` (it is not done); a connection that sends
    /// another whole burst while limited is closed with 1008.
    fn refuse_rate(&mut self, key: usize, id: Option<&str>) {
        ShardMetrics::add(&self.m().rate_limited, 1);
        let c = &self.conns[key];
        let strikes = c.extra().map_or(0, |e| e.rate_strikes);
        if strikes as u32 >= self.cfg.message_burst.min(u16::MAX as u32) {
            return self.fail(key, code::POLICY, "message rate limit exceeded");
        }
        let (interval_us, tolerance_us) = self.message_rate().expect("over the rate: limited");
        let wait_ms = (c.rate_debt_us as u64 + interval_us - tolerance_us).div_ceil(1000);
        let msg = format!(
            "over {} messages/s (burst {}): not done; retry after {wait_ms} ms",
            self.cfg.max_messages_per_sec, self.cfg.message_burst
        );
        let f = protocol::error(id, ErrorCode::RateLimited, &msg);
        self.deliver_reply(key, f);
    }

    pub(super) fn on_message(&mut self, key: usize, message: Incoming<'_>) {
        self.conns.turn_in += 1;
        if self.cfg.echo {
            let (opcode, payload) = match message {
                Incoming::Text(t) => (Data::Text, t.as_bytes()),
                Incoming::Binary(b) => (Data::Binary, b),
            };
            self.deliver_data(key, opcode, super::table::Out::Own(payload));
            return;
        }
        // A binary message is read as JSON text too, if it is UTF-8.
        let text = match message {
            Incoming::Text(t) => t,
            Incoming::Binary(b) => match simdutf8::basic::from_utf8(b) {
                Ok(t) => t,
                Err(_) => {
                    return self.fail(
                        key,
                        code::INVALID_PAYLOAD,
                        "text message is not valid UTF-8",
                    )
                }
            },
        };
        let parsed = match protocol::parse(text) {
            Ok(p) => p,
            Err(e) => {
                let f = protocol::error(e.id.map(|r| r.get()), e.code, &e.message);
                return self.deliver_reply(key, f);
            }
        };
        let id = parsed.id.map(|r| r.get());
        if self.over_rate(key) {
            return self.refuse_rate(key, id);
        }
        match parsed.op {
            Op::Ping { data } => {
                let f = protocol::pong(data);
                self.deliver(key, &f);
            }
            Op::Presence { channel } => {
                if !self.channel_allowed(key, &channel) {
                    let f = protocol::error(id, ErrorCode::Forbidden, FORBIDDEN_CHANNEL);
                    return self.deliver_reply(key, f);
                }
                self.presence_op(key, id, &channel);
            }
            Op::Sub {
                channel,
                since: Some(pos),
                join_leave,
            } => {
                if !self.channel_allowed(key, &channel) {
                    let f = protocol::error(id, ErrorCode::Forbidden, FORBIDDEN_CHANNEL);
                    return self.deliver_reply(key, f);
                }
                // An empty epoch is no epoch, as in `?since=:7`.
                let epoch = match pos
                    .epoch
                    .as_deref()
                    .filter(|e| !e.is_empty())
                    .map(str::parse)
                {
                    None => None,
                    Some(Ok(e)) => Some(e),
                    Some(Err(_)) => {
                        let f = protocol::error(
                            id,
                            ErrorCode::BadRequest,
                            "`since.epoch` is not an epoch",
                        );
                        return self.deliver_reply(key, f);
                    }
                };
                let since = crate::store::Since::Position {
                    epoch,
                    offset: pos.offset,
                };
                self.want_join_leave(key, &channel, join_leave);
                self.sub_since(key, id, Arc::from(channel.as_ref()), since);
            }
            Op::Sub {
                channel,
                since: None,
                join_leave,
            } => {
                if !self.channel_allowed(key, &channel) {
                    let f = protocol::error(id, ErrorCode::Forbidden, FORBIDDEN_CHANNEL);
                    return self.deliver_reply(key, f);
                }
                let c = &self.conns[key];
                if c.channel_list().iter().any(|x| **x == *channel) {
                    self.want_join_leave(key, &channel, join_leave);
                    return self.ack(key, id);
                }
                if c.channel_list().len() >= MAX_CHANNELS_PER_CONN {
                    let f = protocol::error(
                        id,
                        ErrorCode::BadRequest,
                        "too many subscriptions on one connection",
                    );
                    return self.deliver_reply(key, f);
                }
                self.want_join_leave(key, &channel, join_leave);
                if let Some(token) = self.subscribe(key, Arc::from(channel.as_ref())) {
                    // Acked once the channel's publications reach this node from the cluster.
                    let me = self.conn_id(key);
                    self.waits
                        .add(token, ReadyWait::SubAck(me, id.map(Into::into)));
                    return;
                }
                self.ack(key, id);
            }
            Op::Unsub { channel } => {
                self.unsubscribe_local(&channel, key);
                let c = &mut self.conns[key];
                if !c.channel_list().is_empty() {
                    c.channels_mut().retain(|x| **x != *channel);
                }
                if let Some(e) = c.extra_if_mut() {
                    e.channel_cursors.retain(|(c, _)| **c != *channel);
                    e.join_leave.retain(|x| **x != *channel);
                }
                self.ack(key, id);
            }
            Op::Pub { channel, data } => {
                if !self.channel_allowed(key, &channel) {
                    let f = protocol::error(id, ErrorCode::Forbidden, FORBIDDEN_CHANNEL);
                    return self.deliver_reply(key, f);
                }
                if self.streams_on() && self.cfg.stream_rule(&channel).is_some() {
                    // A channel with history: stored first, acked with its offset.
                    return self.publish_stored(key, id, &channel, data);
                }
                let from = self.user_name(key);
                let f = protocol::msg(
                    &from,
                    Target::Channel(&channel),
                    data,
                    self.conns.now_unix_ms,
                );
                let name: Arc<str> = Arc::from(channel.as_ref());
                self.publish(name, f);
                self.ack(key, id);
            }
            Op::Send { to, data, qos: 1 } => self.send_stored(key, id, &to, data),
            Op::Confirm { stream, offset } => self.confirm(key, id, &stream, offset),
            Op::History {
                stream,
                since,
                limit,
            } => self.history(key, id, &stream, since, limit),
            Op::Send { to, data, .. } => {
                let from = self.user_name(key);
                let mut buf = std::mem::take(&mut self.scratch_event);
                protocol::msg_into(
                    &mut buf,
                    &from,
                    Target::User(&to),
                    data,
                    self.conns.now_unix_ms,
                );
                let mut ev = Event::new(&buf);
                let me = self.conn_id(key);
                let reply = id.map(|id| Reply { conn: me, id });
                if *to == *from {
                    self.route_user(&to, &mut ev, Some(me), reply);
                } else if self.conns[key].user.is_some() {
                    self.route_user(&to, &mut ev, None, reply);
                    // The sender's other devices see the conversation too.
                    self.route_user(&from, &mut ev, Some(me), None);
                } else {
                    // Anonymous connections have no other devices.
                    self.route_user(&to, &mut ev, None, reply);
                }
                self.scratch_event = buf;
            }
        }
    }

    /// Whether the connection's token (if any) grants `channel` (see [`auth::channel_allowed`]).
    pub(super) fn channel_allowed(&self, key: usize, channel: &str) -> bool {
        auth::channel_allowed(self.conns[key].grant(), channel)
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
        if let Some(b) = &self.broker {
            b.interest(Interest::Channel {
                channel: name,
                on: true,
                ready: Some((self.index, t)),
            });
        }
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
        if let (true, 0, Some(b)) = (removed, self.hub.subscriber_count(channel), &self.broker) {
            b.interest(Interest::Channel {
                channel: channel.into(),
                on: false,
                ready: None,
            });
            self.forget_channel_head(channel);
        }
    }

    /// Turns the connection's `join`/`leave` events of `channel` on (`sub` with
    /// `"join_leave":true`) or off (a `sub` without it).
    fn want_join_leave(&mut self, key: usize, channel: &str, on: bool) {
        let has = self.conns[key]
            .extra()
            .is_some_and(|e| e.join_leave.iter().any(|c| **c == *channel));
        if on && !has {
            self.conns[key].extra_mut().join_leave.push(channel.into());
        } else if !on && has {
            let e = self.conns[key].extra_mut();
            e.join_leave.retain(|c| **c != *channel);
        }
    }

    /// A subscription of connection `key` to `channel` came or went: when the channel's
    /// rule says so, its subscribers that asked get a `join`/`leave` event, on every shard
    /// and node (not the connection itself).
    fn tell_join_leave(&mut self, key: usize, channel: &str, join: bool) {
        if !self.cfg.join_leave(channel) {
            return;
        }
        let user = self.user_name(key);
        let conn = self.conn_id(key).to_string();
        let f = protocol::join_leave(join, channel, &user, &conn);
        self.publish_except(Arc::from(channel), f, Some(key));
    }

    /// A `join`/`leave` event to the local subscribers of `channel` that asked for them.
    fn deliver_join_leave(&mut self, channel: &str, f: &Bytes, except: Option<usize>) -> u64 {
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
    fn deliver_to(&mut self, f: &Bytes, pick: impl FnOnce(&Self, &mut Vec<u32>)) -> u64 {
        self.deliver_out(Out::Shared(f.clone()), pick)
    }

    /// [`deliver_to`](Self::deliver_to) of shared or own bytes.
    fn deliver_out(&mut self, f: Out<'_>, pick: impl FnOnce(&Self, &mut Vec<u32>)) -> u64 {
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        pick(self, &mut slots);
        let mut n = 0;
        for &slot in &slots {
            n += u64::from(self.deliver_data(slot as usize, Data::Text, f.share()));
        }
        self.scratch_slots = slots;
        n
    }

    /// With a broker, keeps this node's count of `name` in Redis (for cluster-wide answers);
    /// a channel's subscribers are counted by `member` too (their user, `""` for anonymous
    /// ones: the channel's presence).
    fn count_in_cluster(
        &mut self,
        kind: Counted,
        name: &str,
        member: Option<Arc<str>>,
        delta: i64,
    ) {
        if let Some(b) = &self.broker {
            let req = BrokerReq::Presence {
                shard: self.index,
                kind,
                name: name.into(),
                member,
                delta,
            };
            if b.reachable(&req) && b.publish(req).is_err() {
                ShardMetrics::add(&self.m().dropped, 1);
            }
        }
    }

    /// [`Self::count_in_cluster`] for a subscription of connection `key` to `channel`.
    fn count_subscriber(&mut self, key: usize, channel: &str, delta: i64) {
        let user = self.conns[key].user.clone();
        let member = user.unwrap_or_else(|| Arc::from(""));
        self.count_in_cluster(Counted::Channels, channel, Some(member), delta);
    }

    /// After Redis came back, this shard's counts in Redis are rewritten from what it holds
    /// (changes while Redis was away were not counted). Called every turn; cheap when nothing
    /// changed.
    pub(super) fn resync_counts(&mut self) {
        let Some(b) = &self.broker else {
            return;
        };
        let g = b.generation();
        if g == self.broker_generation || !b.is_up() {
            return;
        }
        let users = self.directory.home_counts(self.index);
        let channels = self.hub.channel_counts();
        let members: Vec<_> = channels
            .iter()
            .map(|(c, _)| (c.clone(), self.channel_members(c)))
            .collect();
        let mut sent = true;
        for (kind, counts, members) in [
            (Counted::Users, users, Vec::new()),
            (Counted::Channels, channels, members),
        ] {
            let req = BrokerReq::Resync {
                kind,
                shard: self.index,
                counts,
                members,
            };
            sent &= b.publish(req).is_ok();
        }
        // A full queue: again on a later turn.
        if sent {
            self.broker_generation = g;
        }
    }

    /// At the home shard: reports the user's first or last connection in the process to the
    /// broker. With `ack`, true when the connection must wait for [`ShardMsg::Broker`]'s
    /// `Ready` before it is registered (its DMs reach this node from the whole cluster then).
    fn tell_broker_user(
        &mut self,
        user: Arc<str>,
        online: bool,
        change: Option<bool>,
        ack: Option<ConnId>,
    ) -> bool {
        // Counted per node in Redis, for `GET /api/users/<id>` on any node.
        self.count_in_cluster(Counted::Users, &user, None, if online { 1 } else { -1 });
        if self.broker.is_none() {
            return false;
        }
        let Some(on) = change else {
            // Not the first connection: it waits if the first one's subscription is not
            // active yet.
            return match (ack, online) {
                (Some(conn), true) => self
                    .waits
                    .wait_on(Interested::User(user), ReadyWait::Registered(conn)),
                _ => false,
            };
        };
        let ready = match ack {
            Some(conn) if on => {
                let waits = vec![ReadyWait::Registered(conn)];
                let t = self.waits.new_wait(Interested::User(user.clone()), waits);
                Some((self.index, t))
            }
            _ => None,
        };
        if let Some(b) = &self.broker {
            b.interest(Interest::User { user, on, ready });
        }
        ready.is_some()
    }

    /// The broker says subscription `token` is active: answer whoever waited for it.
    fn on_ready(&mut self, token: u64) {
        for w in self.waits.ready(token) {
            match w {
                ReadyWait::Registered(conn) if conn.shard == self.index => self.on_registered(conn),
                ReadyWait::Registered(conn) => {
                    self.mail.send(conn.shard, ShardMsg::Registered { conn })
                }
                ReadyWait::SubAck(conn, id) => {
                    if let Some(key) = self.live_open(conn) {
                        self.ack(key, id.as_deref());
                    }
                }
                ReadyWait::SubSince(conn, id, channel, since) => {
                    if let Some(key) = self.live_open(conn) {
                        self.open_channel(key, id.as_deref(), channel, since);
                    }
                }
            }
        }
    }

    /// Mail from the broker.
    fn on_broker(&mut self, m: BrokerMsg) {
        match m {
            BrokerMsg::User { user, payload } => {
                self.deliver_located(&user, &mut Event::shared_from(&payload), None);
            }
            BrokerMsg::Channel { channel, payload } => {
                self.deliver_channel_local(&channel, &payload);
            }
            BrokerMsg::Broadcast { payload } => {
                self.exec_api(&crate::mail::ApiCmd::Broadcast { payload });
            }
            BrokerMsg::Stored {
                user,
                payload,
                offset,
                exclude,
            } => self.route_stored(user, payload, offset, exclude, None),
            BrokerMsg::ChannelStored {
                channel,
                payload,
                offset,
            } => self.deliver_channel_stored(&channel, &payload, offset),
            BrokerMsg::Disconnect { user, code, reason } => {
                self.exec_api(&crate::mail::ApiCmd::Disconnect { user, code, reason });
            }
            BrokerMsg::Routed { reply, online } => self.reply_local(reply, Some(online)),
            BrokerMsg::Unavailable { reply } => self.reply_unavailable(reply),
            BrokerMsg::Busy { reply } => self.reply_local(reply, None),
            BrokerMsg::Ready { token } => self.on_ready(token),
            BrokerMsg::Resubscribed => self.on_resubscribed(),
            BrokerMsg::Counted {
                kind,
                conn,
                name,
                total,
            } => self.api_counted(kind, conn, name, total),
            BrokerMsg::Members { ticket, members } => self.api_members(ticket.id, members),
        }
    }

    /// Answers a send that other nodes should have delivered while Redis is unreachable.
    fn reply_unavailable(&mut self, reply: ReplyTo) {
        if let Some(key) = self.live_open(reply.conn) {
            let f = protocol::error(
                Some(&reply.id),
                ErrorCode::Unavailable,
                "the cluster broker is unreachable; not delivered to other nodes",
            );
            self.deliver(key, &f);
        }
    }

    pub(super) fn ack(&mut self, key: usize, id: Option<&str>) {
        if let Some(id) = id {
            let f = protocol::ack(id);
            self.deliver(key, &f);
        }
    }

    /// Publishes how many channels have local subscribers (a relaxed store: a publish that
    /// races with this shard's first subscription is one that came before it).
    fn count_channels(&self) {
        self.subscribed[self.index as usize].store(self.hub.channel_count(), Ordering::Relaxed);
    }

    /// Fans a channel frame out to every shard's subscribers.
    pub(super) fn publish(&mut self, channel: Arc<str>, f: Bytes) {
        self.publish_except(channel, f, None);
    }

    /// [`Self::publish`], but not to the local connection `except` (the one whose
    /// subscription a `join`/`leave` event tells).
    fn publish_except(&mut self, channel: Arc<str>, f: Bytes, except: Option<usize>) {
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

    /// With a broker, one publish for the other nodes.
    pub(super) fn publish_remote(&mut self, channel: Arc<str>, payload: Bytes) {
        self.send_to_other_nodes(BrokerReq::Channel { channel, payload });
    }

    /// With a broker, a qos-0 message for the other nodes: Redis down or a full queue drops
    /// it, counted in `dropped` (at most once).
    pub(super) fn send_to_other_nodes(&mut self, req: BrokerReq) {
        if let Some(b) = &self.broker {
            if !b.reachable(&req) || b.publish(req).is_err() {
                ShardMetrics::add(&self.m().dropped, 1);
            }
        }
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
                if let Err(BrokerReq::User { reply: back, .. }) = b.publish(req) {
                    ShardMetrics::add(&self.m().dropped, 1);
                    if let Some(r) = back {
                        return self.reply_local(r, None);
                    }
                }
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
    fn deliver_located(
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
                    if me.delivers_to(id) {
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
    fn reply_to(&mut self, conn: ConnId, id: &str, to: &str, online: Option<bool>) {
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
    fn deliver_user_local_out(&mut self, to: &str, f: Out<'_>, exclude: Option<ConnId>) -> u64 {
        self.deliver_out(f, |me, slots| me.local_conns_of(to, exclude, slots))
    }

    pub(super) fn deliver_channel_local(&mut self, channel: &str, f: &Bytes) -> u64 {
        self.deliver_channel_except(channel, f, None)
    }

    /// To the local subscribers of `channel` but `except` (a `join`/`leave` event only to
    /// those that asked for them).
    fn deliver_channel_except(&mut self, channel: &str, f: &Bytes, except: Option<usize>) -> u64 {
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

    /// Mail from another shard (at most [`super::MAILBOX_PER_TURN`] per turn).
    pub fn on_mail(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Presence {
                user,
                conn,
                online,
                welcome,
            } => {
                let change = self.directory.presence(user.clone(), conn, online);
                let ack = welcome.then_some(conn);
                if self.tell_broker_user(user, online, change, ack) {
                    return;
                }
                if welcome {
                    self.mail.send(conn.shard, ShardMsg::Registered { conn });
                }
            }
            ShardMsg::Registered { conn } => self.on_registered(conn),
            ShardMsg::DeliverUser {
                to,
                payload,
                exclude,
            } => {
                self.deliver_user_local(&to, &payload, exclude);
            }
            ShardMsg::DeliverChannel { channel, payload } => {
                self.deliver_channel_local(&channel, &payload);
            }
            ShardMsg::Api { ticket, cmd } => self.on_api(ticket, &cmd),
            ShardMsg::ApiDone { id, count, members } => self.on_api_done(id, count, members),
            ShardMsg::Store(m) => self.on_store(*m),
            ShardMsg::StoreBatch(ms) => ms.into_iter().for_each(|m| self.on_store(m)),
            ShardMsg::DeliverStream {
                user,
                payload,
                offset,
                exclude,
            } => self.deliver_stream_local(&user, &payload, offset, exclude),
            ShardMsg::Shutdown => self.begin_shutdown(),
            ShardMsg::Broker(m) => self.on_broker(*m),
        }
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
    fn shared_from(b: &'a Bytes) -> Event<'a> {
        Event {
            bytes: b,
            shared: Some(b.clone()),
        }
    }

    /// What this shard's recipients get: the shared payload once there is one, else a copy
    /// of the bytes.
    fn local(&self) -> Out<'_> {
        match &self.shared {
            Some(b) => Out::Shared(b.clone()),
            None => Out::Own(self.bytes),
        }
    }

    /// The payload as shared bytes (made on first use).
    fn shared(&mut self) -> Bytes {
        self.shared
            .get_or_insert_with(|| Bytes::copy_from_slice(self.bytes))
            .clone()
    }
}

/// Whom to answer about a `send`, borrowed from the request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Reply<'a> {
    conn: ConnId,
    /// Raw JSON of the request's `id`.
    id: &'a str,
}

impl Reply<'_> {
    /// The owned form, for an answer that comes later (from the broker).
    fn owned(self, to: &str) -> ReplyTo {
        ReplyTo {
            conn: self.conn,
            id: self.id.into(),
            to: Arc::from(to),
        }
    }
}
