//! An API request gathered across shards (and nodes): each shard executes it and answers a
//! count (presence: its members); the shard holding the HTTP connection sums them.

use std::sync::Arc;

use super::answers::json;
use super::Api;
use crate::broker::Counted;
use crate::conn::{ConnState, Flags, HttpWait, Transport};
use crate::http::api::Route;
use crate::hub::ApiTicket;
use crate::mail::{ApiCmd, ShardMsg};
use crate::protocol::{self};
use crate::router::Core;
use crate::store::StoreReq;

/// An API request waiting for the other shards' counts.
#[derive(Debug)]
pub struct PendingApi {
    key: usize,
    generation: u32,
    remaining: usize,
    count: u64,
    route: Route,
    close: bool,
    /// For `GET /api/users/<id>` and `/api/channels/<name>`: whom the cluster counts (and,
    /// for a user, whose unread count the store adds).
    user: Option<Arc<str>>,
    /// For presence: the members counted so far (user → subscriptions, `""` for anonymous
    /// ones), and where the answer goes.
    presence: Option<Box<Presence>>,
}

/// A presence request being gathered (shards, then the other nodes).
#[derive(Debug)]
struct Presence {
    members: Vec<(Arc<str>, u64)>,
    /// `Some(id)`: a WebSocket's `presence` op (the raw JSON of its id, if any); `None`: HTTP.
    ws: Option<Option<Box<str>>>,
    /// The other nodes were asked (with a broker).
    asked: bool,
    /// Every node answered (false: Redis could not be asked).
    complete: bool,
}

/// Sums the counts of each user, sorted by user.
fn merge_members(mut v: Vec<(Arc<str>, u64)>) -> Vec<(Arc<str>, u64)> {
    v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    let mut out: Vec<(Arc<str>, u64)> = Vec::with_capacity(v.len());
    for (u, n) in v {
        match out.last_mut() {
            Some(last) if last.0 == u => last.1 += n,
            _ => out.push((u, n)),
        }
    }
    out
}

impl<T: Transport> Api<T> {
    /// Runs `cmd` here and on every other shard; answers when all have counted.
    pub(in crate::router) fn start_api(
        &mut self,
        key: usize,
        route: Route,
        cmd: ApiCmd,
        close: bool,
    ) {
        self.start_gather(key, route, cmd, close, None);
    }

    /// [`Self::start_api`], or with `ws` a WebSocket's `presence` op (never holds input).
    pub(in crate::router) fn start_gather(
        &mut self,
        key: usize,
        route: Route,
        cmd: ApiCmd,
        close: bool,
        ws: Option<Option<Box<str>>>,
    ) {
        let cmd = Arc::new(cmd);
        let others = self.shards as usize - 1;
        let http = ws.is_none();
        let id = self.pending_api.insert(PendingApi {
            key,
            generation: self.conns[key].generation,
            remaining: others,
            count: 0,
            route,
            close,
            user: match &*cmd {
                ApiCmd::CountUser { user } => Some(user.clone()),
                ApiCmd::CountChannel { channel } | ApiCmd::Members { channel } => {
                    Some(channel.clone())
                }
                _ => None,
            },
            presence: matches!(&*cmd, ApiCmd::Members { .. }).then(|| {
                Box::new(Presence {
                    members: Vec::new(),
                    ws,
                    asked: false,
                    complete: true,
                })
            }),
        }) as u32;
        let ticket = ApiTicket {
            shard: self.index,
            id,
        };
        for s in 0..self.shards {
            if s != self.index {
                self.mail.send(
                    s,
                    ShardMsg::Api {
                        ticket,
                        cmd: cmd.clone(),
                    },
                );
            }
        }
        let local = self.exec_api(&cmd);
        let members = self.members_of(&cmd);
        let p = &mut self.pending_api[id as usize];
        p.count += local;
        if let Some(pr) = p.presence.as_mut() {
            pr.members.extend(members);
        }
        self.api_to_cluster(&cmd);
        if others == 0 {
            self.complete_api(id, false);
        } else if http {
            // Later requests on this connection wait for this answer (responses stay in order).
            self.wait_answer(key);
        }
    }

    /// With a broker, a publication, a send or a disconnect also goes to the other nodes (one
    /// publish; the answer's count is this node's).
    pub(in crate::router) fn api_to_cluster(&mut self, cmd: &ApiCmd) {
        use crate::broker::BrokerReq;
        if self.broker.is_none() {
            return;
        }
        let req = match cmd {
            ApiCmd::Publish { channel, payload } => BrokerReq::Channel {
                channel: channel.clone(),
                payload: payload.clone(),
            },
            ApiCmd::Broadcast { payload } => BrokerReq::Broadcast {
                payload: payload.clone(),
            },
            ApiCmd::SendUser { user, payload } => BrokerReq::User {
                user: user.clone(),
                payload: payload.clone(),
                reply: None,
            },
            ApiCmd::Disconnect { user, code, reason } => BrokerReq::Disconnect {
                user: user.clone(),
                code: *code,
                reason: reason.clone(),
            },
            _ => return,
        };
        self.send_to_other_nodes(req);
    }

    pub(in crate::router) fn on_api(&mut self, ticket: ApiTicket, cmd: &ApiCmd) {
        let count = self.exec_api(cmd);
        let members = self.members_of(cmd);
        self.mail.send(
            ticket.shard,
            ShardMsg::ApiDone {
                id: ticket.id,
                count,
                members,
            },
        );
    }

    pub(in crate::router) fn on_api_done(
        &mut self,
        id: u32,
        count: u64,
        members: Vec<(Arc<str>, u64)>,
    ) {
        let Some(p) = self.pending_api.get_mut(id as usize) else {
            return;
        };
        p.count += count;
        if let Some(pr) = p.presence.as_mut() {
            pr.members.extend(members);
        }
        p.remaining -= 1;
        if p.remaining == 0 {
            self.complete_api(id, true);
        }
    }

    /// The other nodes' members of a channel (`None`: Redis could not be asked).
    pub(in crate::router) fn api_members(
        &mut self,
        id: u32,
        members: Option<Vec<(Arc<str>, u64)>>,
    ) {
        let Some(pr) = self
            .pending_api
            .get_mut(id as usize)
            .and_then(|p| p.presence.as_mut())
        else {
            return;
        };
        match members {
            Some(m) => pr.members.extend(m),
            None => pr.complete = false,
        }
        self.complete_api(id, true);
    }

    /// Every shard counted a presence request: with a broker, the other nodes next (the
    /// answer waits; an HTTP connection holds its later requests), then the answer.
    pub(in crate::router) fn complete_presence(&mut self, id: u32) {
        let core = &mut self.streams.core;
        let p = &mut self.pending_api[id as usize];
        let pr = p.presence.as_mut().expect("a presence request");
        let channel = p.user.clone().expect("a channel");
        if !pr.asked {
            if let Some(b) = &core.broker {
                pr.asked = true;
                let ticket = ApiTicket {
                    shard: core.index,
                    id,
                };
                let req = crate::broker::BrokerReq::Members { channel, ticket };
                if b.is_up() {
                    // Refused by a full queue: answered with this node's members.
                    core.broker_out.push(req);
                    let http = pr.ws.is_none();
                    let (key, generation) = (p.key, p.generation);
                    if let Some(c) = core.conns.get_mut(key) {
                        // The same connection (not a reuse of its slot): an HTTP one holds
                        // its later requests until the answer.
                        if http && c.generation == generation {
                            c.state = ConnState::Http(HttpWait::Answer);
                        }
                    }
                    return;
                }
                pr.complete = false;
            }
        }
        let p = self.pending_api.remove(id as usize);
        let alive = self
            .conns
            .get(p.key)
            .is_some_and(|c| c.generation == p.generation);
        let pr = p.presence.expect("a presence request");
        if !alive {
            return;
        }
        let members = merge_members(pr.members);
        let channel = p.user.as_deref().unwrap_or_default();
        match pr.ws {
            Some(ws_id) => {
                let f = protocol::presence(ws_id.as_deref(), channel, &members, pr.complete);
                self.deliver_reply(p.key, f);
            }
            None => {
                let body =
                    serde_json::to_vec(&protocol::presence_json(channel, &members, pr.complete))
                        .unwrap_or_default();
                if self.conns[p.key].state == ConnState::Http(HttpWait::Answer) {
                    if p.close {
                        self.conns[p.key].extra_mut().api_close = true;
                    }
                    self.api_store_answer(p.key, Route::Presence, 200, &body);
                } else {
                    self.api_answer(p.key, Route::Presence, 200, &body, p.close);
                }
            }
        }
    }

    /// `{"op":"presence","channel":..}` on a WebSocket: the channel's members across shards
    /// (and nodes), answered as a `presence` event.
    pub(in crate::router) fn presence_op(&mut self, key: usize, id: Option<&str>, channel: &str) {
        let cmd = ApiCmd::Members {
            channel: Arc::from(channel),
        };
        self.start_gather(key, Route::Presence, cmd, false, Some(id.map(Into::into)));
    }

    pub(in crate::router) fn complete_api(&mut self, id: u32, resume: bool) {
        if self.pending_api[id as usize].presence.is_some() {
            return self.complete_presence(id);
        }
        let p = self.pending_api.remove(id as usize);
        let alive = self
            .conns
            .get(p.key)
            .is_some_and(|c| c.generation == p.generation);
        if !alive {
            return;
        }
        let counted = match (p.route, &p.user) {
            (Route::User, Some(u)) => Some((Counted::Users, u.clone())),
            (Route::Channel, Some(c)) => Some((Counted::Channels, c.clone())),
            _ => None,
        };
        if let (Some((kind, name)), Some(b)) = (counted, &self.broker) {
            // The other nodes' counts first (Redis); for a user, then the store's unread.
            if b.is_up() {
                let req = crate::broker::BrokerReq::Count {
                    kind,
                    name,
                    conn: self.conns.conn_id(p.key),
                    local: p.count,
                };
                // Refused by a full queue: answered with this node's count.
                self.broker_out.push(req);
                self.wait_answer(p.key);
                if p.close {
                    self.conns[p.key].extra_mut().api_close = true;
                }
                return;
            }
        }
        if let (Route::User, Some(user), true) = (p.route, &p.user, self.streams_on()) {
            // The store adds the unread count; the answer waits for it.
            let req = StoreReq::Unread {
                user: user.clone(),
                conn: self.conns.conn_id(p.key),
                connections: p.count,
            };
            return self.api_ask_store(p.key, p.close, req, Route::User, p.count);
        }
        let body = match p.route {
            Route::Publish | Route::Send | Route::Broadcast => {
                json(serde_json::json!({ "delivered": p.count }))
            }
            Route::Disconnect => json(serde_json::json!({ "disconnected": p.count })),
            Route::User => {
                json(serde_json::json!({ "online": p.count > 0, "connections": p.count }))
            }
            Route::Channel => json(serde_json::json!({ "subscribers": p.count })),
            Route::Stats | Route::History | Route::Presence | Route::Drain | Route::Unknown => {
                unreachable!("answered without the other shards")
            }
        };
        self.api_answer(p.key, p.route, 200, &body, p.close);
        if resume {
            self.conns[p.key].state = ConnState::Http(HttpWait::Reading);
            // Pipelined requests that arrived meanwhile: read on from the backlog.
            self.conns.defer_read(p.key);
        }
    }
}

impl<T: Transport> Core<T> {
    /// For [`ApiCmd::Members`]: this shard's subscribers of the channel by user.
    pub(in crate::router) fn members_of(&self, cmd: &ApiCmd) -> Vec<(Arc<str>, u64)> {
        match cmd {
            ApiCmd::Members { channel } => self.channel_members(channel),
            _ => Vec::new(),
        }
    }

    /// This shard's subscribers of `channel` by user (`""` for anonymous ones).
    pub(in crate::router) fn channel_members(&self, channel: &str) -> Vec<(Arc<str>, u64)> {
        let anonymous: Arc<str> = Arc::from("");
        let users = self.hub.subscribers(channel).map(|slot| {
            let u = self.conns.get(slot as usize).and_then(|c| c.user.clone());
            (u.unwrap_or_else(|| anonymous.clone()), 1)
        });
        merge_members(users.collect())
    }

    /// Executes an API command on this shard's connections; returns its count.
    pub(in crate::router) fn exec_api(&mut self, cmd: &ApiCmd) -> u64 {
        match cmd {
            ApiCmd::Publish { channel, payload } => self.deliver_channel_local(channel, payload),
            ApiCmd::SendUser { user, payload } => self.deliver_user_local(user, payload, None),
            ApiCmd::Broadcast { payload } => self.deliver_to(payload, |me, slots| {
                slots.extend(
                    me.conns
                        .iter()
                        .filter(|(_, c)| {
                            c.state.is_open()
                                && (c.flags.has(Flags::SSE) || c.flags.has(Flags::WEBSOCKET))
                        })
                        .map(|(k, _)| k as u32),
                )
            }),
            ApiCmd::Disconnect { user, code, reason } => {
                let mut slots = Vec::new();
                self.local_conns_of(user, None, &mut slots);
                for &s in &slots {
                    self.start_close_with(s as usize, *code, reason.to_string().into());
                }
                slots.len() as u64
            }
            ApiCmd::CountUser { user } => {
                let mut slots = Vec::new();
                self.local_conns_of(user, None, &mut slots);
                slots.len() as u64
            }
            ApiCmd::CountChannel { channel } | ApiCmd::Members { channel } => {
                self.hub.subscriber_count(channel) as u64
            }
        }
    }
}
