//! HTTP/1.1 on a connection: one request at a time (pipelined requests wait their turn),
//! routed to the WebSocket upgrade, an event stream, the push API or a built-in page.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::admission;
use super::{admit, Core, Router};
use crate::auth::Identity;
use crate::conn::buffers::Inbound;
use crate::conn::cursor::Cursor;
use crate::conn::{ConnState, Flags, Transport};
use crate::http::{self, response, HttpError, Method, Request};
use crate::metrics::{HandshakeFailure, ShardMetrics};
use crate::store::Since;
use crate::ws::close::{self as code};
use crate::ws::handshake;

impl<T: Transport> Router<T> {
    /// Handles one HTTP request if complete; true when another round of processing is due.
    pub(super) fn process_http(&mut self, key: usize, inb: &mut Inbound) -> bool {
        let req = match http::request::parse(inb.pending()) {
            Ok(None) => return false,
            Ok(Some(r)) => r,
            Err(HttpError::Malformed(why)) => {
                self.conns
                    .http_fail(key, 400, why, HandshakeFailure::Malformed);
                return false;
            }
            Err(HttpError::HeadTooLarge) => {
                self.conns.http_fail(
                    key,
                    431,
                    "request header section too large",
                    HandshakeFailure::HeadTooLarge,
                );
                return false;
            }
        };
        // The push API answers JSON, even before its route is looked at.
        let api = req.path.starts_with("/api/");
        if req.transfer_encoding {
            self.conns.body_fail(
                key,
                api,
                411,
                "chunked bodies are not supported; send Content-Length",
            );
            return false;
        }
        let body_len = req.content_length.unwrap_or(0);
        if body_len > self.cfg.max_message_bytes {
            self.conns
                .body_fail(key, api, 413, "request body over --max-message-bytes");
            return false;
        }
        let total = req.head_len + body_len;
        if inb.end - inb.start < total {
            inb.reserve_total(total);
            return false;
        }
        let body = inb.buf[inb.start + req.head_len..inb.start + total].to_vec();
        inb.start += total;
        self.route_http(key, &req, &body);
        true
    }

    /// Counts `key` against `--max-pending-handshakes` when it holds part of an HTTP request,
    /// or of its TLS handshake (what a slowloris does to pin a read buffer); over the cap it
    /// is refused 503. A silent connection holds no buffer and is not counted:
    /// `--max-connections` and the handshake deadline bound those, and a burst of clients
    /// that connect before they write is not refused.
    pub(super) fn count_half_open(&mut self, key: usize) {
        let cap = self.cfg.max_pending_handshakes;
        let core: &mut Core<T> = self;
        let c = &mut core.conns[key];
        // The state first: an open connection's reads never ask its pipe.
        if !c.state.is_http() || c.flags.has(Flags::SSE) {
            return;
        }
        if c.inbound.is_none() && !c.io.holds_input() {
            return;
        }
        if cap == 0 || core.half_open < cap {
            c.flags.set(Flags::HALF_OPEN);
            core.half_open += 1;
            return;
        }
        if !c.io.can_answer() {
            // A TLS handshake under way: no answer can reach the peer, and finishing the
            // handshake is the work the cap saves. Closed.
            self.m().count_handshake_failure(HandshakeFailure::Pending);
            return self.finish(key);
        }
        let span = admission::spread_span_ms(self.half_open, 1000);
        let wait = self.retry_jitter_ms(key, 1000, span);
        self.conns.http_refuse(
            key,
            503,
            "too many handshakes in progress",
            HandshakeFailure::Pending,
            wait,
        );
    }

    /// Takes `key` out of the half-open count while it reads (counted again after).
    pub(super) fn uncount_half_open(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if c.flags.has(Flags::HALF_OPEN) {
            c.flags.clear(Flags::HALF_OPEN);
            self.half_open -= 1;
        }
    }

    pub(super) fn route_http(&mut self, key: usize, req: &Request, body: &[u8]) {
        let is_upgrade = req.upgrade_websocket || req.connection_upgrade;
        if (self.cfg.echo && is_upgrade) || req.path == "/ws" {
            return self.upgrade(key, req);
        }
        if req.path == "/events" {
            return self.open_sse(key, req);
        }
        if req.path.starts_with("/api/") {
            return self.route_api(key, req, body);
        }
        let get = matches!(req.method, Some(Method::Get) | Some(Method::Head));
        match req.path.as_str() {
            "/healthz" if get => {
                self.conns
                    .http_ok(key, req, "text/plain; charset=utf-8", b"ok\n".to_vec())
            }
            "/metrics" if get => {
                let body = self.metrics_text().into_bytes();
                self.conns
                    .http_ok(key, req, "text/plain; version=0.0.4", body)
            }
            "/" if get => {
                let body = http::assets::INDEX_HTML.as_bytes().to_vec();
                self.conns
                    .http_ok(key, req, "text/html; charset=utf-8", body)
            }
            "/client.js" if get => {
                let body = http::assets::CLIENT_JS.as_bytes().to_vec();
                self.conns
                    .http_ok(key, req, "text/javascript; charset=utf-8", body)
            }
            "/favicon.ico" if get => {
                let resp = response::simple(204, "image/x-icon", b"", "", req.connection_close);
                self.conns.http_respond(key, resp, req.connection_close)
            }
            "/healthz" | "/metrics" | "/" | "/client.js" => {
                self.conns
                    .http_fail(key, 405, "method not allowed", HandshakeFailure::Method)
            }
            _ => self
                .conns
                .http_respond(key, response::error(404, "not found"), true),
        }
    }

    pub(super) fn upgrade(&mut self, key: usize, req: &Request) {
        let accept = match handshake::accept(&upgrade_request(req)) {
            Ok(a) => a,
            Err(e) => {
                let why = match e {
                    handshake::HandshakeError::Method => HandshakeFailure::Method,
                    handshake::HandshakeError::NotUpgrade => HandshakeFailure::NotUpgrade,
                    handshake::HandshakeError::Version => HandshakeFailure::Version,
                    handshake::HandshakeError::Key => HandshakeFailure::BadKey,
                };
                return self.conns.http_fail(key, e.status(), &e.to_string(), why);
            }
        };
        if !self.origin_allowed(req) {
            return self
                .conns
                .http_fail(key, 403, "origin not allowed", HandshakeFailure::Origin);
        }
        let Some(identity) = self.identify(key, req) else {
            return; // answered
        };
        let Ok(since) = self.since_param(key, req) else {
            return; // answered 400
        };
        if since.is_some() && !(matches!(identity, Identity::User(..)) && self.streams_on()) {
            return self.conns.http_fail(
                key,
                400,
                "since needs a named user and a store",
                HandshakeFailure::Malformed,
            );
        }
        if let Some(since) = since {
            self.conns[key].extra_mut().cursor = Some(Box::new(Cursor::resuming(since)));
        }
        let deflate = req
            .ws_extensions
            .as_deref()
            .filter(|_| self.cfg.deflate)
            .and_then(crate::ws::deflate::negotiate);
        let ext = deflate.map(|a| a.response());
        self.conns.push_raw(
            key,
            response::switching_protocols_with(&accept, ext.as_deref()),
        );
        if let Some(a) = deflate {
            let c = &mut self.conns[key];
            c.flags.set(Flags::DEFLATE);
            let e = c.extra_mut();
            e.deflate_takeover = !a.client_no_context_takeover;
            e.deflate_bits = a.server_window_bits;
        }
        let user: Option<Arc<str>> = match identity {
            Identity::User(u, grant) => {
                if let Some(g) = grant {
                    self.conns[key].extra_mut().grant = Some(g);
                }
                Some(u.into())
            }
            Identity::Anonymous => None,
        };
        let now = self.conns.now_ms;
        let c = &mut self.conns[key];
        c.state = ConnState::UPGRADED;
        c.last_seen_ms = now as u32;
        c.flags.set(Flags::COUNTED | Flags::WEBSOCKET);
        c.user = user;
        let m = &self.metrics[self.index as usize];
        m.open_http.fetch_sub(1, Ordering::Relaxed);
        ShardMetrics::add(&m.open_ws, 1);
        if let Err(busy) = self.admit_handshake(key) {
            self.m().count_handshake_failure(busy.why);
            let reason = admission::retry_reason(busy.message, busy.wait_ms);
            self.start_close_with(key, code::TRY_AGAIN_LATER, reason.into());
            return;
        }
        if !self.cfg.echo {
            self.register(key, true);
        }
        let deadline = self.conns.next_heartbeat_check(key);
        self.conns.arm(key, deadline);
        // The 101 (and an anonymous connection's welcome) go out now rather than at the end
        // of the turn: in a connect storm one turn upgrades thousands, and each would hold
        // an outbox until then.
        self.conns.write_early(key);
    }
}

/// A WebSocket or SSE handshake refused for now, and when to come back.
pub(super) struct Busy {
    pub why: HandshakeFailure,
    pub message: &'static str,
    pub wait_ms: u64,
}

impl<T: Transport> Router<T> {
    /// Admits connection `key` (already flagged `COUNTED`) as a WebSocket or SSE stream:
    /// under `--max-connections` and the shard's `--max-handshakes-per-sec`.
    pub(super) fn admit_handshake(&mut self, key: usize) -> Result<(), Busy> {
        if !admit(&self.open_total, self.cfg.max_connections) {
            return Err(Busy {
                why: HandshakeFailure::OverCapacity,
                message: "server at capacity, try again later",
                wait_ms: self.retry_jitter_ms(key, 1000, 9000),
            });
        }
        let (rate, salt) = (self.cfg.max_handshakes_per_sec, self.salt(key));
        self.gate
            .admit(self.conns.now_ms, rate, salt)
            .map_err(|wait_ms| Busy {
                why: HandshakeFailure::RateLimited,
                message: "server busy, try again later",
                wait_ms,
            })
    }

    /// Who request `req` is (its `?user=` or token, checked against the clock); a refused
    /// identity is answered (`None`).
    pub(super) fn identify(&mut self, key: usize, req: &Request) -> Option<Identity> {
        match self.auth.resolve(req, self.conns.now_unix_ms / 1000) {
            Ok(i) => Some(i),
            Err(e) => {
                let why = HandshakeFailure::BadUser;
                self.conns.http_fail(key, e.status(), &e.to_string(), why);
                None
            }
        }
    }

    /// The `since` query parameter of `/ws` and `/events`; a malformed one is answered 400
    /// (`Err`).
    pub(super) fn since_param(&mut self, key: usize, req: &Request) -> Result<Option<Since>, ()> {
        let since = crate::conn::cursor::since_in_query(req.query.as_deref());
        if since.is_err() {
            let why = HandshakeFailure::Malformed;
            self.conns
                .http_fail(key, 400, crate::protocol::SINCE_FORMAT, why);
        }
        since.map_err(drop)
    }
}

/// The parts of a request the WebSocket handshake checks.
fn upgrade_request(req: &Request) -> handshake::UpgradeRequest<'_> {
    handshake::UpgradeRequest {
        is_get: req.method == Some(Method::Get),
        upgrade_websocket: req.upgrade_websocket,
        connection_upgrade: req.connection_upgrade,
        version: req.ws_version.as_deref(),
        key: req.ws_key.as_deref(),
    }
}
