//! The other nodes, through the broker: interest in a user's DMs and a channel's
//! publications, counts kept in Redis for the cluster's answers, copies for the other
//! nodes, and what the broker says back.

use std::sync::Arc;

use bytes::Bytes;

use super::waits::{Interested, ReadyWait};
use super::Core;
use crate::broker::{BrokerReq, Counted, Interest};
use crate::conn::Transport;
use crate::hub::{ConnId, ReplyTo};
use crate::metrics::ShardMetrics;
use crate::protocol::{self, ErrorCode};

impl<T: Transport> Core<T> {
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

    /// Answers a send that other nodes should have delivered while Redis is unreachable.
    pub(super) fn reply_unavailable(&mut self, reply: ReplyTo) {
        if let Some(key) = self.conns.live_open(reply.conn) {
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
}
