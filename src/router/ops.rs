//! Protocol v1 on an open connection: the ops (`send`, `sub`, `unsub`, `pub`, `ping`,
//! `history`, `ack`, `presence`) read from a client's message, checked (rate, rights,
//! names) and handed to the routes.

use std::sync::Arc;

use super::routes::{Event, Reply};
use super::waits::ReadyWait;
use super::Router;
use crate::conn::Transport;
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
    /// The message rate limit (GCRA over `Conn::rate_debt_us`): true when this message is
    /// over the connection's rate and burst.
    pub(super) fn over_rate(&mut self, key: usize) -> bool {
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
    pub(super) fn refuse_rate(&mut self, key: usize, id: Option<&str>) {
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

    /// A whole message from a WebSocket client: echoed back (`--echo`, inline in the frame
    /// loop), or read as an op ([`Self::on_op`], out of line).
    #[inline(always)]
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
        self.on_op(key, message)
    }

    /// A client's message read as JSON and acted on.
    #[inline(never)]
    fn on_op(&mut self, key: usize, message: Incoming<'_>) {
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
                if !self.conns.channel_allowed(key, &channel) {
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
                if !self.conns.channel_allowed(key, &channel) {
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
                self.conns.want_join_leave(key, &channel, join_leave);
                self.sub_since(key, id, Arc::from(channel.as_ref()), since);
            }
            Op::Sub {
                channel,
                since: None,
                join_leave,
            } => {
                if !self.conns.channel_allowed(key, &channel) {
                    let f = protocol::error(id, ErrorCode::Forbidden, FORBIDDEN_CHANNEL);
                    return self.deliver_reply(key, f);
                }
                let c = &self.conns[key];
                if c.channel_list().iter().any(|x| **x == *channel) {
                    self.conns.want_join_leave(key, &channel, join_leave);
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
                self.conns.want_join_leave(key, &channel, join_leave);
                if let Some(token) = self.subscribe(key, Arc::from(channel.as_ref())) {
                    // Acked once the channel's publications reach this node from the cluster.
                    let me = self.conns.conn_id(key);
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
                if !self.conns.channel_allowed(key, &channel) {
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
                let me = self.conns.conn_id(key);
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
}
