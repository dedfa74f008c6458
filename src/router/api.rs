//! The push API and Server-Sent Events: an API request is executed by every shard (each
//! answers a count) and answered by the shard that holds the HTTP connection; SSE streams
//! live in the same slab, hub and wheel as WebSockets.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use tracing::debug;

use super::Router;
use crate::auth::Identity;
use crate::broker::Counted;
use crate::conn::{sse, ConnState, Flags, HttpWait, Transport};
use crate::http::api::{self, ApiError, Route};
use crate::http::{response, Method, Request};
use crate::hub::{ApiTicket, ReplyTo};
use crate::mail::{ApiCmd, ShardMsg};
use crate::metrics::{HandshakeFailure, ShardMetrics};
use crate::protocol::{self, ErrorCode, Target};
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

fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap_or_default()
}

impl<T: Transport> Router<T> {
    /// Browser requests (those with `Origin`) must come from an allowed origin, if any are set.
    pub(super) fn origin_allowed(&self, req: &Request) -> bool {
        match (&req.origin, self.cfg.allowed_origins.is_empty()) {
            (_, true) | (None, _) => true,
            (Some(o), false) => self.cfg.allowed_origins.iter().any(|a| a == o),
        }
    }

    /// `GET /events?channel=a&channel=b`: an event stream of the user's DMs and the channels.
    pub(super) fn open_sse(&mut self, key: usize, req: &Request) {
        if !matches!(req.method, Some(Method::Get)) {
            return self.http_fail(key, 405, "method not allowed", HandshakeFailure::Method);
        }
        if !self.origin_allowed(req) {
            return self.http_fail(key, 403, "origin not allowed", HandshakeFailure::Origin);
        }
        let (user, grant) = match self.auth.resolve(req, self.conns.now_unix_ms / 1000) {
            Ok(Identity::User(u, g)) => (Some(Arc::<str>::from(u)), g),
            Ok(Identity::Anonymous) => (None, None),
            Err(e) => {
                return self.http_fail(key, e.status(), &e.to_string(), HandshakeFailure::BadUser)
            }
        };
        let query = req.query.as_deref();
        let stream =
            match sse::Request::parse(query, req.last_event_id.as_deref(), grant.as_deref()) {
                Ok(s) => s,
                Err(r) => {
                    let why = match r.status {
                        403 => HandshakeFailure::Forbidden,
                        _ => HandshakeFailure::Malformed,
                    };
                    return self.http_fail(key, r.status, r.message, why);
                }
            };
        let streams_on = self.streams_on();
        self.conns[key].flags.set(Flags::COUNTED);
        if let Err(busy) = self.admit_handshake(key) {
            return self.http_refuse(key, 503, busy.message, busy.why, busy.wait_ms);
        }
        let m = &self.metrics[self.index as usize];
        let c = &mut self.conns[key];
        m.open_http.fetch_sub(1, Ordering::Relaxed);
        ShardMetrics::add(&m.open_sse, 1);
        c.state = ConnState::UPGRADED;
        c.flags.set(Flags::SSE);
        c.user = user;
        if let Some(g) = grant {
            c.extra_mut().grant = Some(g);
        }
        if c.user.is_some() && streams_on {
            c.extra_mut().cursor = Some(Box::new(stream.cursor()));
        }
        let channels = stream.channels;
        if c.user.is_some() {
            // A named stream opens (its headers go out) once the user's home shard recorded
            // it, like a WebSocket's welcome: whatever is sent to the user after that reaches
            // it, and a resuming one asks the store only then, so nothing stored in between
            // is missed. Its channels are joined then too: no event may precede the head.
            c.extra_mut().sse_channels = channels;
            self.register(key, true);
        } else {
            self.push_sse_headers(key);
            self.register(key, false);
            for ch in channels {
                self.subscribe(key, ch);
            }
        }
        let deadline = self.conns.next_heartbeat_check(key);
        self.conns.arm(key, deadline);
    }

    /// The response head of an event stream.
    pub(super) fn push_sse_headers(&mut self, key: usize) {
        self.conns.push_raw(key, Bytes::from_static(sse::HEAD));
    }

    /// Routes `/api/...`: authorization, method, body, then the command on every shard.
    pub(super) fn route_api(&mut self, key: usize, req: &Request, body: &[u8]) {
        let (route, arg, method) = Route::of(&req.path);
        let result = self.api_request(key, req, body, route, arg, method);
        if let Err(e) = result {
            self.api_answer(
                key,
                route,
                e.status,
                &api::error_body(&e.message),
                req.connection_close,
            );
        }
    }

    pub(super) fn api_request(
        &mut self,
        key: usize,
        req: &Request,
        body: &[u8],
        route: Route,
        arg: Option<&str>,
        method: &str,
    ) -> Result<(), ApiError> {
        self.api_authorize(key, req)?;
        if route == Route::Unknown {
            return Err(ApiError {
                status: 404,
                message: "no such API route".into(),
            });
        }
        let method_ok = match req.method {
            Some(Method::Get) => method == "GET",
            Some(Method::Post) => method == "POST",
            _ => false,
        };
        if !method_ok {
            return Err(ApiError {
                status: 405,
                message: format!("use {method} for this route"),
            });
        }
        let ts = self.conns.now_unix_ms;
        let cmd = match route {
            Route::Drain => {
                let Some(drain) = self.on_drain.clone() else {
                    return Err(ApiError {
                        status: 503,
                        message: "no process to drain here".into(),
                    });
                };
                drain();
                let body = br#"{"draining":true}"#;
                self.api_answer(key, route, 200, body, req.connection_close);
                return Ok(());
            }
            Route::Publish => {
                let p: api::Publish = api::parse_body(body)?;
                api::check_channel(&p.channel)?;
                let from = api::check_from(p.from.as_deref())?;
                match p.qos {
                    None | Some(0) | Some(1) => {}
                    Some(_) => return Err(ApiError::bad("`qos` must be 0 or 1")),
                }
                if let (true, Some(rule)) = (self.streams_on(), self.cfg.stream_rule(&p.channel)) {
                    // A channel with history is always stored; the answer waits for the commit.
                    let retention = crate::store::Retention {
                        max_count: rule.history,
                        ttl_ms: rule.ttl_ms,
                    };
                    let prefix =
                        protocol::msg_prefix(from, Target::Channel(&p.channel), p.data, ts);
                    let channel: Arc<str> = Arc::from(p.channel.as_str());
                    let sreq = StoreReq::Publish {
                        channel: channel.clone(),
                        retention,
                        prefix,
                        id: p.id.as_deref().map(|i| format!("api:{i}").into()),
                        publisher: Arc::from(from),
                        reply: Some(ReplyTo {
                            conn: self.conn_id(key),
                            id: "null".into(),
                            to: channel,
                        }),
                    };
                    return self.api_ask_store(key, req.connection_close, sreq);
                }
                let payload = protocol::msg(from, Target::Channel(&p.channel), p.data, ts);
                ApiCmd::Publish {
                    channel: p.channel.into(),
                    payload,
                }
            }
            Route::Send => {
                let p: api::Send = api::parse_body(body)?;
                api::check_user("to", &p.to)?;
                let from = api::check_from(p.from.as_deref())?;
                match p.qos {
                    None | Some(0) => {}
                    Some(1) => return self.api_send_stored(key, req, from, &p),
                    Some(_) => return Err(ApiError::bad("`qos` must be 0 or 1")),
                }
                let payload = protocol::msg(from, Target::User(&p.to), p.data, ts);
                ApiCmd::SendUser {
                    user: p.to.into(),
                    payload,
                }
            }
            Route::Broadcast => {
                let p: api::Broadcast = api::parse_body(body)?;
                let from = api::check_from(p.from.as_deref())?;
                let payload = protocol::msg(from, Target::Broadcast, p.data, ts);
                ApiCmd::Broadcast { payload }
            }
            Route::Disconnect => {
                let p: api::Disconnect = api::parse_body(body)?;
                api::check_user("user", &p.user)?;
                if !(4000..=4999).contains(&p.code) {
                    return Err(ApiError::bad("`code` must be 4000-4999"));
                }
                let reason = p
                    .reason
                    .unwrap_or_else(|| "disconnected by the server".into());
                if reason.len() > 123 {
                    return Err(ApiError::bad("`reason` must be at most 123 bytes"));
                }
                ApiCmd::Disconnect {
                    user: p.user.into(),
                    code: p.code,
                    reason: reason.into(),
                }
            }
            Route::User => {
                let id = arg
                    .and_then(crate::http::request::percent_decode)
                    .unwrap_or_default();
                api::check_user("user", &id)?;
                ApiCmd::CountUser { user: id.into() }
            }
            Route::Channel | Route::Presence => {
                let name = arg
                    .and_then(crate::http::request::percent_decode)
                    .unwrap_or_default();
                api::check_channel(&name)?;
                let channel = name.into();
                if route == Route::Channel {
                    ApiCmd::CountChannel { channel }
                } else {
                    ApiCmd::Members { channel }
                }
            }
            Route::Stats => {
                let body = self.stats_json();
                self.api_answer(key, route, 200, &body, req.connection_close);
                return Ok(());
            }
            Route::History => return self.api_history(key, req, arg),
            Route::Unknown => unreachable!("answered above"),
        };
        self.start_api(key, route, cmd, req.connection_close);
        Ok(())
    }

    /// `Authorization: Bearer <api key>`; without a configured key, loopback peers only.
    pub(super) fn api_authorize(&self, key: usize, req: &Request) -> Result<(), ApiError> {
        match &self.cfg.api_key {
            Some(k) => {
                let given = req
                    .authorization
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .map(str::trim);
                if given.is_some_and(|g| constant_time_eq(g.as_bytes(), k.as_bytes())) {
                    Ok(())
                } else {
                    Err(ApiError {
                        status: 401,
                        message: "missing or wrong API key (Authorization: Bearer <key>)".into(),
                    })
                }
            }
            None => {
                let loopback = self.conns[key].flags.has(Flags::LOOPBACK);
                if loopback {
                    Ok(())
                } else {
                    Err(ApiError {
                        status: 403,
                        message: "no --api-key is set: the API answers loopback peers only".into(),
                    })
                }
            }
        }
    }

    /// The Prometheus text of `/metrics`: the shards', the store's (with one) and the node's.
    pub(super) fn metrics_text(&self) -> String {
        let mut text = crate::metrics::render(&self.metrics);
        if self.store.is_some() {
            crate::metrics::render_store(&mut text, &self.store_metrics);
        }
        crate::metrics::render_node(&mut text, &self.node, self.broker_metrics.as_deref());
        text
    }

    /// `GET /api/stats`: a summary, and under `metrics` every series of `/metrics`.
    pub(super) fn stats_json(&self) -> Vec<u8> {
        let sum = |f: &dyn Fn(&ShardMetrics) -> u64| -> u64 { self.metrics.iter().map(f).sum() };
        let r = Ordering::Relaxed;
        json(serde_json::json!({
            "metrics": crate::metrics::text_to_json(&self.metrics_text()),
            "node": &*self.node,
            "cluster": self.broker.is_some(),
            "shards": self.metrics.len(),
            "connections": {
                "ws": sum(&|m| m.open_ws.load(r)),
                "sse": sum(&|m| m.open_sse.load(r)),
                "http": sum(&|m| m.open_http.load(r)),
            },
            "accepted": sum(&|m| m.accepted.load(r)),
            "messages_in": sum(&|m| m.messages_in.load(r)),
            "messages_out": sum(&|m| m.messages_out.load(r)),
            "bytes_in": sum(&|m| m.bytes_in.load(r)),
            "bytes_out": sum(&|m| m.bytes_out.load(r)),
            "dropped": sum(&|m| m.dropped.load(r)),
            "slow_consumer_closes": sum(&|m| m.slow_consumers.load(r)),
            "close_resets": sum(&|m| m.closes_reset.load(r)),
            "timer_wheel_entries": sum(&|m| m.wheel_entries.load(r)),
        }))
    }

    /// Runs `cmd` here and on every other shard; answers when all have counted.
    pub(super) fn start_api(&mut self, key: usize, route: Route, cmd: ApiCmd, close: bool) {
        self.start_gather(key, route, cmd, close, None);
    }

    /// [`Self::start_api`], or with `ws` a WebSocket's `presence` op (never holds input).
    fn start_gather(
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
    fn api_to_cluster(&mut self, cmd: &ApiCmd) {
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

    pub(super) fn on_api(&mut self, ticket: ApiTicket, cmd: &ApiCmd) {
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

    /// For [`ApiCmd::Members`]: this shard's subscribers of the channel by user.
    fn members_of(&self, cmd: &ApiCmd) -> Vec<(Arc<str>, u64)> {
        match cmd {
            ApiCmd::Members { channel } => self.channel_members(channel),
            _ => Vec::new(),
        }
    }

    /// This shard's subscribers of `channel` by user (`""` for anonymous ones).
    pub(super) fn channel_members(&self, channel: &str) -> Vec<(Arc<str>, u64)> {
        let anonymous: Arc<str> = Arc::from("");
        let users = self.hub.subscribers(channel).map(|slot| {
            let u = self.conns.get(slot as usize).and_then(|c| c.user.clone());
            (u.unwrap_or_else(|| anonymous.clone()), 1)
        });
        merge_members(users.collect())
    }

    pub(super) fn on_api_done(&mut self, id: u32, count: u64, members: Vec<(Arc<str>, u64)>) {
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
    pub(super) fn api_members(&mut self, id: u32, members: Option<Vec<(Arc<str>, u64)>>) {
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
    fn complete_presence(&mut self, id: u32) {
        let p = &mut self.pending_api[id as usize];
        let pr = p.presence.as_mut().expect("a presence request");
        let channel = p.user.clone().expect("a channel");
        if !pr.asked {
            if let Some(b) = &self.broker {
                pr.asked = true;
                let ticket = ApiTicket {
                    shard: self.index,
                    id,
                };
                let req = crate::broker::BrokerReq::Members { channel, ticket };
                if b.is_up() && b.publish(req).is_ok() {
                    let http = pr.ws.is_none();
                    let (key, generation) = (p.key, p.generation);
                    if let Some(c) = self.conns.get_mut(key) {
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
    pub(super) fn presence_op(&mut self, key: usize, id: Option<&str>, channel: &str) {
        let cmd = ApiCmd::Members {
            channel: Arc::from(channel),
        };
        self.start_gather(key, Route::Presence, cmd, false, Some(id.map(Into::into)));
    }

    pub(super) fn complete_api(&mut self, id: u32, resume: bool) {
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
                    conn: self.conn_id(p.key),
                    local: p.count,
                };
                if b.publish(req).is_ok() {
                    self.wait_answer(p.key);
                    if p.close {
                        self.conns[p.key].extra_mut().api_close = true;
                    }
                    return;
                }
            }
        }
        if let (Route::User, Some(user), true) = (p.route, &p.user, self.streams_on()) {
            // The store adds the unread count; the answer waits for it.
            let req = StoreReq::Unread {
                user: user.clone(),
                conn: self.conn_id(p.key),
                connections: p.count,
            };
            if self.api_ask_store(p.key, p.close, req).is_ok() {
                return;
            }
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
            // Pipelined requests that arrived meanwhile.
            self.on_readable(p.key, true);
        }
    }

    pub(super) fn api_answer(
        &mut self,
        key: usize,
        route: Route,
        status: u16,
        body: &[u8],
        close: bool,
    ) {
        ShardMetrics::add(
            &self.metrics[self.index as usize].api_requests[route as usize]
                [api::status_index(status)],
            1,
        );
        if status != 200 {
            debug!(
                shard = self.index,
                conn = key,
                status,
                route = route.label(),
                "API request refused"
            );
        }
        let resp = response::simple(status, "application/json", body, "", close);
        self.http_respond(key, resp, close);
    }

    /// `POST /api/send` with `"qos":1`: stored in the recipient's inbox, then delivered; the
    /// answer waits for the commit (`{"stored":true,"offset":N,"epoch":..,"queued":bool}`).
    fn api_send_stored(
        &mut self,
        key: usize,
        req: &Request,
        from: &str,
        p: &api::Send<'_>,
    ) -> Result<(), ApiError> {
        if !self.streams_on() {
            return Err(ApiError::bad("qos 1 needs a store"));
        }
        let prefix =
            protocol::msg_prefix(from, Target::User(&p.to), p.data, self.conns.now_unix_ms);
        let to: Arc<str> = Arc::from(p.to.as_str());
        let reply = ReplyTo {
            conn: self.conn_id(key),
            id: "null".into(),
            to: to.clone(),
        };
        let sreq = StoreReq::SendDm {
            from: Arc::from(from),
            to,
            prefix,
            id: p.id.as_deref().map(|i| format!("api:{i}").into()),
            reply: Some(reply),
            sender: None,
            sender_copy: false,
        };
        self.api_ask_store(key, req.connection_close, sreq)
    }

    /// Hands an API request to the store; the HTTP answer waits for the store's (later
    /// pipelined requests wait too).
    /// Later requests of HTTP connection `key` wait unread until its API request is answered
    /// (responses stay in order).
    fn wait_answer(&mut self, key: usize) {
        let c = &mut self.conns[key];
        debug_assert!(c.state.is_http(), "only HTTP requests wait for an answer");
        c.state = ConnState::Http(HttpWait::Answer);
    }

    fn api_ask_store(&mut self, key: usize, close: bool, sreq: StoreReq) -> Result<(), ApiError> {
        let store = self.store.as_ref().expect("streams on");
        if store.request(sreq).is_err() {
            return Err(ApiError {
                status: 503,
                message: "server busy; try again".into(),
            });
        }
        self.wait_answer(key);
        if close {
            self.conns[key].extra_mut().api_close = true;
        }
        Ok(())
    }

    /// Answers an API request that waited for the store, then reads what was pipelined.
    fn api_store_answer(&mut self, key: usize, route: Route, status: u16, body: &[u8]) {
        let c = &mut self.conns[key];
        c.state = ConnState::Http(HttpWait::Reading);
        let close = c.take_api_close();
        self.api_answer(key, route, status, body, close);
        if self.conns.contains(key) && !close {
            self.on_readable(key, true);
        }
    }

    /// `GET /api/history/inbox:<user>?since=N&limit=L`: a page of a user's inbox from the
    /// store.
    fn api_history(
        &mut self,
        key: usize,
        req: &Request,
        arg: Option<&str>,
    ) -> Result<(), ApiError> {
        if !self.streams_on() {
            return Err(ApiError::bad("history needs a store"));
        }
        let name = arg
            .and_then(crate::http::request::percent_decode)
            .unwrap_or_default();
        let Some(user) = name.strip_prefix("inbox:") else {
            return Err(ApiError {
                status: 404,
                message: "no such stream (streams are named inbox:<user>)".into(),
            });
        };
        api::check_user("user", user)?;
        let num = |k: &str| -> Result<Option<u64>, ApiError> {
            match crate::http::request::query_param(req.query.as_deref(), k) {
                None => Ok(None),
                Some(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|_| ApiError::bad(format!("`{k}` must be a number"))),
            }
        };
        let since = num("since")?.unwrap_or(0);
        let limit = num("limit")?.unwrap_or(100).clamp(1, 1000) as usize;
        let sreq = StoreReq::History {
            user: Arc::from(user),
            from: since + 1,
            limit,
            conn: self.conn_id(key),
            id: None,
        };
        self.api_ask_store(key, req.connection_close, sreq)
    }

    /// The broker counted a user's connections or a channel's subscribers on every live node:
    /// answer (for a user, after the store's unread count).
    pub(super) fn api_counted(
        &mut self,
        kind: Counted,
        conn: crate::hub::ConnId,
        user: Arc<str>,
        connections: u64,
    ) {
        let Some(key) = self.waiting_http(conn) else {
            return;
        };
        if kind == Counted::Channels {
            let body = json(serde_json::json!({ "subscribers": connections }));
            return self.api_store_answer(key, Route::Channel, 200, &body);
        }
        if self.streams_on() {
            let close = self.conns[key].extra().is_some_and(|e| e.api_close);
            let req = StoreReq::Unread {
                user,
                conn,
                connections,
            };
            if self.api_ask_store(key, close, req).is_ok() {
                return;
            }
        }
        let body =
            json(serde_json::json!({ "online": connections > 0, "connections": connections }));
        self.api_store_answer(key, Route::User, 200, &body);
    }

    /// The store's answer to `GET /api/users/<id>`: the counts and the unread messages.
    pub(super) fn api_user_unread(&mut self, key: usize, connections: u64, unread: u64) {
        let body = json(serde_json::json!({
            "online": connections > 0, "connections": connections, "unread": unread,
        }));
        self.api_store_answer(key, Route::User, 200, &body);
    }

    /// The store's answer to a history request of the push API.
    pub(super) fn api_history_page(&mut self, key: usize, body: &[u8]) {
        self.api_store_answer(key, Route::History, 200, body);
    }

    /// The store's ack of an API qos-1 send or a stored publication.
    pub(super) fn api_stored(
        &mut self,
        key: usize,
        route: Route,
        offset: u64,
        epoch: &str,
        queued: Option<bool>,
    ) {
        let body = json(serde_json::json!({
            "stored": true, "offset": offset, "epoch": epoch,
            "queued": queued.unwrap_or(false), "duplicate": queued.is_none(),
        }));
        self.api_store_answer(key, route, 200, &body);
    }

    /// The store refused an API write: 503 with the protocol's error code and why.
    pub(super) fn api_refused(&mut self, key: usize, route: Route, code: ErrorCode, why: &str) {
        let body = api::error_body(&format!("{}: {why}", code.as_str()));
        self.api_store_answer(key, route, 503, &body);
    }

    /// Executes an API command on this shard's connections; returns its count.
    pub(super) fn exec_api(&mut self, cmd: &ApiCmd) -> u64 {
        match cmd {
            ApiCmd::Publish { channel, payload } => self.deliver_channel_local(channel, payload),
            ApiCmd::SendUser { user, payload } => self.deliver_user_local(user, payload, None),
            ApiCmd::Broadcast { payload } => {
                let keys: Vec<usize> = self
                    .conns
                    .iter()
                    .filter(|(_, c)| {
                        c.state.is_open()
                            && (c.flags.has(Flags::SSE) || c.flags.has(Flags::WEBSOCKET))
                    })
                    .map(|(k, _)| k)
                    .collect();
                keys.into_iter()
                    .map(|k| u64::from(self.deliver(k, payload)))
                    .sum()
            }
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

/// Compares secrets without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn secrets_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
