//! The other nodes, through the broker: interest in a user's DMs and a channel's
//! publications, counts kept in Redis for the cluster's answers, copies for the other
//! nodes, and what the broker says back.

use std::sync::Arc;

use bytes::Bytes;

use super::routes::Event;
use super::waits::{Interested, ReadyWait};
use super::Router;
use crate::broker::{BrokerMsg, BrokerReq, Counted, Interest};
use crate::conn::Transport;
use crate::hub::{ConnId, ReplyTo};
use crate::mail::ShardMsg;
use crate::metrics::ShardMetrics;
use crate::protocol::{self, ErrorCode};

impl<T: Transport> Router<T> {
    /// With a broker, keeps this node's count of `name` in Redis (for cluster-wide answers);
    /// a channel's subscribers are counted by `member` too (their user, `""` for anonymous
    /// ones: the channel's presence).
    pub(super) fn count_in_cluster(
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
            if b.reachable(&req) {
                self.broker_out.push(req);
            }
        }
    }

    /// [`Self::count_in_cluster`] for a subscription of connection `key` to `channel`.
    pub(super) fn count_subscriber(&mut self, key: usize, channel: &str, delta: i64) {
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
            self.broker_out.push(req);
        }
        // Refused by a full queue: again on a later turn (`broker_refused`).
        self.broker_generation = g;
    }

    /// At the home shard: reports the user's first or last connection in the process to the
    /// broker. With `ack`, true when the connection must wait for [`ShardMsg::Broker`]'s
    /// `Ready` before it is registered (its DMs reach this node from the whole cluster then).
    pub(super) fn tell_broker_user(
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
        self.interest_out.push(Interest::User { user, on, ready });
        ready.is_some()
    }

    /// The broker says subscription `token` is active: answer whoever waited for it.
    pub(super) fn on_ready(&mut self, token: u64) {
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
    pub(super) fn on_broker(&mut self, m: BrokerMsg) {
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
    pub(super) fn reply_unavailable(&mut self, reply: ReplyTo) {
        if let Some(key) = self.live_open(reply.conn) {
            let f = protocol::error(
                Some(&reply.id),
                ErrorCode::Unavailable,
                "the cluster broker is unreachable; not delivered to other nodes",
            );
            self.deliver(key, &f);
        }
    }

    /// With a broker, one publish for the other nodes.
    pub(super) fn publish_remote(&mut self, channel: Arc<str>, payload: Bytes) {
        self.send_to_other_nodes(BrokerReq::Channel { channel, payload });
    }

    /// With a broker, a qos-0 message for the other nodes: Redis down or a full queue drops
    /// it, counted in `dropped` (at most once).
    pub(super) fn send_to_other_nodes(&mut self, req: BrokerReq) {
        if let Some(b) = &self.broker {
            if b.reachable(&req) {
                self.broker_out.push(req);
            } else {
                ShardMetrics::add(&self.m().dropped, 1);
            }
        }
    }

    /// Hands this turn's interest changes to `interest` (never refused: subscriptions must
    /// follow them), then its publications to `publish`, in order; `publish` gives one back
    /// when the broker's queue is full, and whoever waits on it is answered from what this
    /// node knows ([`Self::broker_refused`]). Call beside [`Self::post_requests`].
    pub fn post_broker(
        &mut self,
        publish: &mut dyn FnMut(BrokerReq) -> Result<(), BrokerReq>,
        interest: &mut dyn FnMut(Interest),
    ) {
        for i in self.interest_out.drain(..) {
            interest(i);
        }
        let mut out = std::mem::take(&mut self.broker_out);
        for req in out.drain(..) {
            if let Err(req) = publish(req) {
                self.broker_refused(req);
            }
        }
        debug_assert!(self.broker_out.is_empty(), "answers publish nothing");
        self.broker_out = out;
    }

    /// A publication the broker's queue refused: a copy for other nodes is dropped (counted;
    /// a DM's sender is answered from this node), a count change is rewritten by the next
    /// resync, a resync goes again on a later turn, a count or presence request of the API
    /// is answered with this node's part.
    fn broker_refused(&mut self, req: BrokerReq) {
        match req {
            BrokerReq::User { reply, .. } => {
                ShardMetrics::add(&self.m().dropped, 1);
                if let Some(r) = reply {
                    self.reply_local(r, None);
                }
            }
            BrokerReq::Channel { .. }
            | BrokerReq::Broadcast { .. }
            | BrokerReq::Disconnect { .. }
            | BrokerReq::Presence { .. } => ShardMetrics::add(&self.m().dropped, 1),
            // Never equal to the broker's generation: resynced on a later turn.
            BrokerReq::Resync { .. } => self.broker_generation = u64::MAX,
            // Answered with this node's members, marked incomplete.
            BrokerReq::Members { ticket, .. } => self.api_members(ticket.id, None),
            BrokerReq::Count {
                kind,
                name,
                conn,
                local,
            } => self.api_counted(kind, conn, name, local),
        }
    }
}
