//! What reaches a shard from outside its connections, dispatched to the layer that acts on
//! it: mail from other shards, broker messages and their answers, a connection's
//! registration at its home shard (and the welcome that waits for it); and the broker
//! requests of the turn, posted by the driver.

use super::routes::Event;
use super::waits::ReadyWait;
use super::Router;
use crate::broker::{BrokerMsg, BrokerReq, Counted, Interest};
use crate::conn::{ConnState, Flags, Transport, Welcome};
use crate::hub::ConnId;
use crate::mail::ShardMsg;
use crate::metrics::ShardMetrics;

impl<T: Transport> Router<T> {
    /// Adds the connection to the hub: its user (and the home shard's directory) when named;
    /// anonymous connections only ever join channels.
    ///
    /// The welcome is sent once the user's home shard has recorded the connection, so a client
    /// that has its welcome is reachable by every DM sent after it.
    pub(super) fn register(&mut self, key: usize, welcome: bool) {
        let me = self.conns.conn_id(key);
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

    /// The broker says subscription `token` is active: answer whoever waited for it.
    pub(super) fn on_ready(&mut self, token: u64) {
        for w in self.waits.ready(token) {
            match w {
                ReadyWait::Registered(conn) if conn.shard == self.index => self.on_registered(conn),
                ReadyWait::Registered(conn) => {
                    self.mail.send(conn.shard, ShardMsg::Registered { conn })
                }
                ReadyWait::SubAck(conn, id) => {
                    if let Some(key) = self.conns.live_open(conn) {
                        self.ack(key, id.as_deref());
                    }
                }
                ReadyWait::SubSince(conn, id, channel, since) => {
                    if let Some(key) = self.conns.live_open(conn) {
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
}
