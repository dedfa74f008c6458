//! What a shard does with one connection: read until `WouldBlock`, parse HTTP then frames,
//! act on protocol ops, queue output for the end-of-turn flush, run its deadlines, and close
//! it with the right code. Transitions follow `docs/lifecycle.md`.

use std::io::{self, Read};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use mio::event::Event;
use tracing::{debug, info};

use super::{admit, Shard};
use crate::auth::{self, Identity};
use crate::conn::{self, ConnState, Flags, Flushed, Fragment, Inbound};
use crate::http::{self, response, HttpError, Method, Request};
use crate::hub::{home_of, ReplyTo, ShardMsg};
use crate::metrics::{self, HandshakeFailure, ShardMetrics};
use crate::protocol::{self, ErrorCode, Op, Target};
use crate::ws::close::{self as code};
use crate::ws::frame::{self, Control, Data, FrameHeader, OpCode};
use crate::ws::{handshake, utf8};

/// Reads per connection per turn before other connections get a turn.
const READS_PER_TURN: usize = 16;
/// Most channels one connection may join.
pub const MAX_CHANNELS_PER_CONN: usize = 1024;
/// Why a `private:` channel was refused (WebSocket `forbidden` error, SSE 403).
pub const FORBIDDEN_CHANNEL: &str = "this channel needs a token that grants it";

impl Shard {
    pub(super) fn on_conn_event(&mut self, key: usize, ev: &Event) {
        let Some(c) = self.conns.get_mut(key) else {
            return; // spurious event for a finished connection
        };
        if ev.is_writable() {
            c.flags.set(Flags::WRITABLE);
            if c.outbox.is_some() {
                self.mark_dirty(key);
            }
        }
        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
            // A short read means the socket is empty: with edge-triggered epoll any later data
            // raises a new event, so the extra read that would return WouldBlock is skipped —
            // unless the peer's FIN (or an error) came with this event and must still be seen.
            let drain = ev.is_read_closed() || ev.is_error();
            self.read_conn(key, drain);
        }
    }

    /// Reads until `WouldBlock` (or the per-turn cap) and processes what arrived.
    pub(super) fn on_readable(&mut self, key: usize) {
        self.read_conn(key, true);
    }

    /// Reads and processes; `drain`: insist on `WouldBlock` or EOF even after a short read.
    fn read_conn(&mut self, key: usize, drain: bool) {
        let held = self.conns[key].inbound.take();
        let mut inb = self.pool.prepare(held);
        let mut eof = false;
        let mut failed: Option<io::Error> = None;
        let mut reads = 0;
        if inb.start < inb.end {
            // Bytes held back while waiting for the welcome.
            self.process(key, &mut inb);
        }
        loop {
            if reads == READS_PER_TURN {
                let c = &mut self.conns[key];
                if !c.flags.has(Flags::READ_BACKLOG) {
                    c.flags.set(Flags::READ_BACKLOG);
                    self.read_backlog.push((key, c.generation));
                }
                break;
            }
            if inb.end == inb.buf.len() {
                if self.conns[key].flags.has(Flags::HOLD_INPUT) {
                    break; // resumed by on_registered
                }
                // process() leaves room unless a partial frame fills the buffer exactly.
                inb.compact();
                if inb.end == inb.buf.len() {
                    let len = inb.buf.len();
                    inb.buf.resize(len * 2, 0);
                }
            }
            let end = inb.end;
            match self.conns[key].stream.read(&mut inb.buf[end..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    reads += 1;
                    let short = end + n < inb.buf.len();
                    inb.end += n;
                    ShardMetrics::add(&self.m().bytes_in, n as u64);
                    self.process(key, &mut inb);
                    if short && !drain {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        let parked = self.pool.park(inb);
        self.conns[key].inbound = parked;
        if let Some(e) = failed {
            debug!(shard = self.index, conn = key, error = %e, "read failed");
            self.finish(key);
        } else if eof {
            self.on_eof(key);
        }
    }

    fn on_eof(&mut self, key: usize) {
        let c = &mut self.conns[key];
        match c.state {
            // The peer went away without a close frame: 1006 in the log.
            ConnState::Open => {
                c.close_code = code::ABNORMAL;
                self.close_reasons.insert(
                    key as u32,
                    "connection dropped without a close frame".into(),
                );
                self.finish(key);
            }
            ConnState::Http | ConnState::Draining => self.finish(key),
            ConnState::Closing => {
                if !c.flags.has(Flags::CLOSE_RECEIVED) && c.close_code == 0 {
                    c.close_code = code::ABNORMAL;
                }
                // Let queued output (our close frame) go out first if the socket takes it.
                self.flush_conn(key);
                if self.conns.contains(key) {
                    self.finish(key);
                }
            }
        }
    }

    /// Consumes what `inb` holds according to the connection's state.
    fn process(&mut self, key: usize, inb: &mut Inbound) {
        loop {
            let Some(c) = self.conns.get(key) else {
                return;
            };
            if c.flags.has(Flags::DISCARD_INPUT) || c.state == ConnState::Draining {
                inb.start = inb.end;
                return;
            }
            if c.flags.has(Flags::HOLD_INPUT) {
                return;
            }
            if c.flags.has(Flags::SSE) {
                inb.start = inb.end; // an event stream has nothing to say
                return;
            }
            match c.state {
                ConnState::Http => {
                    if !self.process_http(key, inb) {
                        return;
                    }
                }
                ConnState::Open | ConnState::Closing => return self.process_frames(key, inb),
                ConnState::Draining => unreachable!("handled above"),
            }
        }
    }

    /// Handles one HTTP request if complete; true when another round of processing is due.
    fn process_http(&mut self, key: usize, inb: &mut Inbound) -> bool {
        let req = match http::request::parse(inb.pending()) {
            Ok(None) => return false,
            Ok(Some(r)) => r,
            Err(HttpError::Malformed(why)) => {
                self.http_fail(key, 400, why, HandshakeFailure::Malformed);
                return false;
            }
            Err(HttpError::HeadTooLarge) => {
                self.http_fail(
                    key,
                    431,
                    "request header section too large",
                    HandshakeFailure::HeadTooLarge,
                );
                return false;
            }
        };
        if req.transfer_encoding {
            self.http_fail(
                key,
                411,
                "chunked bodies are not supported; send Content-Length",
                HandshakeFailure::Body,
            );
            return false;
        }
        let body_len = req.content_length.unwrap_or(0);
        if body_len > self.cfg.max_message_bytes {
            self.http_fail(
                key,
                413,
                "request body over --max-message-bytes",
                HandshakeFailure::Body,
            );
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

    fn route_http(&mut self, key: usize, req: &Request, body: &[u8]) {
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
                self.http_ok(key, req, "text/plain; charset=utf-8", b"ok\n".to_vec())
            }
            "/metrics" if get => {
                let body = metrics::render(&self.metrics).into_bytes();
                self.http_ok(key, req, "text/plain; version=0.0.4", body)
            }
            "/" if get => {
                let body = http::assets::INDEX_HTML.as_bytes().to_vec();
                self.http_ok(key, req, "text/html; charset=utf-8", body)
            }
            "/client.js" if get => {
                let body = http::assets::CLIENT_JS.as_bytes().to_vec();
                self.http_ok(key, req, "text/javascript; charset=utf-8", body)
            }
            "/favicon.ico" if get => {
                let resp = response::simple(204, "image/x-icon", b"", "", req.connection_close);
                self.http_respond(key, resp, req.connection_close)
            }
            "/healthz" | "/metrics" | "/" | "/client.js" => {
                self.http_fail(key, 405, "method not allowed", HandshakeFailure::Method)
            }
            _ => self.http_respond(key, response::error(404, "not found"), true),
        }
    }

    fn http_ok(&mut self, key: usize, req: &Request, content_type: &str, body: Vec<u8>) {
        let body = if req.method == Some(Method::Head) {
            Vec::new()
        } else {
            body
        };
        let close = req.connection_close;
        let resp = response::simple(200, content_type, &body, "", close);
        self.http_respond(key, resp, close);
    }

    /// Queues a response; the connection stays for the next request unless `close`.
    pub(super) fn http_respond(&mut self, key: usize, resp: Bytes, close: bool) {
        self.push_raw(key, resp);
        if close {
            self.drain_after_response(key);
        } else {
            let deadline = self.now_ms + self.cfg.handshake_timeout_ms;
            self.arm(key, deadline);
        }
    }

    /// Answers an error, then closes once the peer has read it.
    pub(super) fn http_fail(
        &mut self,
        key: usize,
        status: u16,
        message: &str,
        why: HandshakeFailure,
    ) {
        debug!(
            shard = self.index,
            conn = key,
            status,
            reason = message,
            "request refused"
        );
        self.m().count_handshake_failure(why);
        self.push_raw(key, response::error(status, message));
        self.drain_after_response(key);
    }

    pub(super) fn drain_after_response(&mut self, key: usize) {
        self.conns[key].state = ConnState::Draining;
        let deadline = self.now_ms + self.cfg.close_timeout_ms;
        self.arm(key, deadline);
    }

    fn upgrade(&mut self, key: usize, req: &Request) {
        let accept = match handshake::accept(req) {
            Ok(a) => a,
            Err(e) => {
                let why = match e {
                    handshake::HandshakeError::Method => HandshakeFailure::Method,
                    handshake::HandshakeError::NotUpgrade => HandshakeFailure::NotUpgrade,
                    handshake::HandshakeError::Version => HandshakeFailure::Version,
                    handshake::HandshakeError::Key => HandshakeFailure::BadKey,
                };
                return self.http_fail(key, e.status(), &e.to_string(), why);
            }
        };
        if !self.origin_allowed(req) {
            return self.http_fail(key, 403, "origin not allowed", HandshakeFailure::Origin);
        }
        let identity = match self.auth.resolve(req) {
            Ok(i) => i,
            Err(e) => {
                return self.http_fail(key, e.status(), &e.to_string(), HandshakeFailure::BadUser)
            }
        };
        self.push_raw(key, response::switching_protocols(&accept));
        let user: Option<Arc<str>> = match identity {
            Identity::User(u, grant) => {
                if let Some(g) = grant {
                    self.grants.insert(key as u32, g);
                }
                Some(u.into())
            }
            Identity::Anonymous => None,
        };
        let now = self.now_ms;
        let c = &mut self.conns[key];
        c.state = ConnState::Open;
        c.last_seen_ms = now as u32;
        c.flags.set(Flags::COUNTED | Flags::WEBSOCKET);
        c.user = user;
        let m = &self.metrics[self.index as usize];
        m.open_http.fetch_sub(1, Ordering::Relaxed);
        ShardMetrics::add(&m.open_ws, 1);
        if !admit(&self.open_total, self.cfg.max_connections) {
            m.count_handshake_failure(HandshakeFailure::OverCapacity);
            self.start_close(
                key,
                code::TRY_AGAIN_LATER,
                "server at capacity, try again later",
            );
            return;
        }
        if !self.cfg.echo {
            self.register(key, true);
        }
        let deadline = self.next_heartbeat_check(key);
        self.arm(key, deadline);
    }

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
        self.hub.add_user(&user, key as u32);
        let home = home_of(&user, self.peers.len());
        if home == self.index {
            self.hub.presence(user, self.index, true);
            if welcome {
                self.welcome(key);
            }
        } else {
            let from = self.index;
            let ack = welcome.then_some(me);
            if welcome {
                self.conns[key].flags.set(Flags::HOLD_INPUT);
            }
            self.post_reliable(
                home,
                ShardMsg::Presence {
                    user,
                    from,
                    online: true,
                    ack,
                },
            );
        }
    }

    /// Queues the welcome event.
    fn welcome(&mut self, key: usize) {
        let name = self.user_name(key);
        let id = self.conn_id(key);
        let welcome = protocol::welcome(&name, &id.to_string(), self.cfg.ping_interval_ms);
        self.push_raw(key, welcome);
    }

    /// The home shard recorded a connection: it may now be welcomed.
    fn on_registered(&mut self, conn: crate::hub::ConnId) {
        let key = conn.slot as usize;
        let alive = self
            .conns
            .get(key)
            .is_some_and(|c| c.generation == conn.generation && c.state == ConnState::Open);
        if alive {
            self.conns[key].flags.clear(Flags::HOLD_INPUT);
            self.welcome(key);
            // Requests that arrived meanwhile are processed now, after the welcome.
            self.on_readable(key);
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

    fn presence_offline(&mut self, user: Arc<str>) {
        let home = home_of(&user, self.peers.len());
        if home == self.index {
            self.hub.presence(user, self.index, false);
        } else {
            let from = self.index;
            self.post_reliable(
                home,
                ShardMsg::Presence {
                    user,
                    from,
                    online: false,
                    ack: None,
                },
            );
        }
    }

    /// Removes the connection from the hub: no more deliveries reach it.
    fn unregister(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if !c.flags.has(Flags::REGISTERED) {
            return;
        }
        c.flags.clear(Flags::REGISTERED);
        let channels = c.channels.take();
        let user = c.user.clone();
        for ch in channels.iter().flat_map(|v| v.iter()) {
            self.hub.unsubscribe(ch, key as u32);
        }
        if let Some(user) = user {
            self.hub.remove_user(&user, key as u32);
            self.presence_offline(user);
        }
    }

    /// Parses and handles every complete frame in `inb`.
    fn process_frames(&mut self, key: usize, inb: &mut Inbound) {
        loop {
            let Some(c) = self.conns.get(key) else {
                return;
            };
            if c.flags.has(Flags::DISCARD_INPUT) {
                inb.start = inb.end;
                return;
            }
            if inb.skip > 0 {
                let n = inb.skip.min((inb.end - inb.start) as u64);
                inb.start += n as usize;
                inb.skip -= n;
                if inb.skip > 0 {
                    return;
                }
                continue;
            }
            let (h, hl) = match frame::parse_header(inb.pending()) {
                Ok(Some(x)) => x,
                Ok(None) => {
                    if inb.buf.len() - inb.start < frame::MAX_HEADER_LEN {
                        inb.compact();
                    }
                    return;
                }
                Err(e) => {
                    // The frame boundary is lost: nothing after this can be parsed.
                    self.fail(key, code::PROTOCOL_ERROR, frame_error_reason(e));
                    self.conns[key].flags.set(Flags::DISCARD_INPUT);
                    continue;
                }
            };
            let total = hl as u64 + h.payload_len;
            if let Err((close_code, reason)) = self.check_header(key, &h, inb.frag.as_ref()) {
                // Skip the offending frame and keep parsing for the peer's close frame.
                self.fail(key, close_code, reason);
                inb.skip = total;
                continue;
            }
            if self.conns[key].state == ConnState::Closing && matches!(h.opcode, OpCode::Data(_)) {
                inb.skip = total; // data after a close is discarded unread
                continue;
            }
            let total = total as usize;
            if inb.end - inb.start < total {
                inb.reserve_total(total);
                return;
            }
            let (s, e) = (inb.start + hl, inb.start + total);
            inb.start += total;
            if let Some(mask) = h.mask {
                frame::apply_mask(&mut inb.buf[s..e], mask, 0);
            }
            let now = self.now_ms;
            let c = &mut self.conns[key];
            c.last_seen_ms = now as u32;
            c.flags.clear(Flags::PING_OUTSTANDING);
            self.on_frame(key, &h, s, e, inb);
        }
    }

    /// Rejects frames that break RFC 6455 or our limits before their payload is read.
    fn check_header(
        &self,
        key: usize,
        h: &FrameHeader,
        frag: Option<&Fragment>,
    ) -> Result<(), (u16, &'static str)> {
        let p = code::PROTOCOL_ERROR;
        if h.rsv != 0 {
            return Err((p, "reserved bits set without a negotiated extension"));
        }
        if h.mask.is_none() {
            return Err((p, "client frames must be masked"));
        }
        match h.opcode {
            OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
                return Err((p, "reserved opcode"))
            }
            OpCode::Control(_) => {
                if !h.fin {
                    return Err((p, "fragmented control frame"));
                }
                if h.payload_len > frame::MAX_CONTROL_PAYLOAD as u64 {
                    return Err((p, "control frame payload over 125 bytes"));
                }
            }
            OpCode::Data(d) => {
                if self.conns[key].state == ConnState::Closing {
                    return Ok(()); // discarded anyway; only sizes matter
                }
                match (d, frag) {
                    (Data::Continue, None) => {
                        return Err((p, "continuation frame without a message to continue"))
                    }
                    (Data::Text | Data::Binary, Some(_)) => {
                        return Err((p, "new data frame before the fragmented message finished"))
                    }
                    (Data::Binary, None) if !self.cfg.echo => {
                        return Err((
                            code::UNSUPPORTED_DATA,
                            "binary messages are not supported; send JSON text",
                        ))
                    }
                    _ => {}
                }
                let so_far = frag.map_or(0, |f| f.data.len()) as u64;
                if h.payload_len + so_far > self.cfg.max_message_bytes as u64 {
                    return Err((code::TOO_BIG, "message over --max-message-bytes"));
                }
            }
        }
        Ok(())
    }

    fn on_frame(&mut self, key: usize, h: &FrameHeader, s: usize, e: usize, inb: &mut Inbound) {
        let state = self.conns[key].state;
        match h.opcode {
            OpCode::Control(Control::Ping) => {
                if state == ConnState::Open {
                    let pong = frame::encode(OpCode::Control(Control::Pong), &inb.buf[s..e]);
                    self.push_raw(key, pong);
                }
            }
            OpCode::Control(Control::Pong) => {}
            OpCode::Control(Control::Close) => self.on_close_frame(key, &inb.buf[s..e]),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                unreachable!("rejected by check_header")
            }
            OpCode::Data(_) if state != ConnState::Open => {} // closing: data is discarded
            OpCode::Data(d @ (Data::Text | Data::Binary)) => {
                let text = d == Data::Text;
                if h.fin {
                    if text && std::str::from_utf8(&inb.buf[s..e]).is_err() {
                        return self.fail(
                            key,
                            code::INVALID_PAYLOAD,
                            "text message is not valid UTF-8",
                        );
                    }
                    self.on_message(key, text, &inb.buf[s..e]);
                } else {
                    let mut f = Fragment {
                        text,
                        data: inb.buf[s..e].to_vec(),
                        utf8_valid: 0,
                    };
                    if text && !advance_utf8(&mut f) {
                        return self.fail(
                            key,
                            code::INVALID_PAYLOAD,
                            "text message is not valid UTF-8",
                        );
                    }
                    inb.frag = Some(f);
                }
            }
            OpCode::Data(Data::Continue) => {
                let Some(f) = inb.frag.as_mut() else {
                    unreachable!("rejected by check_header")
                };
                f.data.extend_from_slice(&inb.buf[s..e]);
                if f.text && !advance_utf8(f) {
                    return self.fail(
                        key,
                        code::INVALID_PAYLOAD,
                        "text message is not valid UTF-8",
                    );
                }
                if h.fin {
                    let f = inb.frag.take().expect("checked above");
                    if f.text && f.utf8_valid != f.data.len() {
                        return self.fail(
                            key,
                            code::INVALID_PAYLOAD,
                            "text message ends inside a UTF-8 character",
                        );
                    }
                    self.on_message(key, f.text, &f.data);
                }
            }
        }
    }

    fn on_close_frame(&mut self, key: usize, payload: &[u8]) {
        let (close_code, reply) = match payload.len() {
            0 => (
                code::NO_STATUS,
                frame::encode(OpCode::Control(Control::Close), &[]),
            ),
            1 => {
                return self.fail(
                    key,
                    code::PROTOCOL_ERROR,
                    "close frame with a 1-byte payload",
                )
            }
            _ => {
                let c = u16::from_be_bytes([payload[0], payload[1]]);
                if !code::is_valid_received(c) {
                    return self.fail(key, code::PROTOCOL_ERROR, "invalid close code");
                }
                if std::str::from_utf8(&payload[2..]).is_err() {
                    return self.fail(
                        key,
                        code::INVALID_PAYLOAD,
                        "close reason is not valid UTF-8",
                    );
                }
                (c, frame::encode_close(c, ""))
            }
        };
        let c = &mut self.conns[key];
        c.flags.set(Flags::CLOSE_RECEIVED | Flags::DISCARD_INPUT);
        if c.flags.has(Flags::CLOSE_SENT) {
            // The peer answered our close: the handshake is complete.
            self.mark_dirty(key);
            return;
        }
        c.close_code = close_code;
        self.close_reasons
            .insert(key as u32, "closed by peer".into());
        self.begin_closing(key, reply);
    }

    /// A protocol violation: close with `close_code`. A second violation while closing
    /// stops parsing input altogether.
    fn fail(&mut self, key: usize, close_code: u16, reason: &'static str) {
        let c = &mut self.conns[key];
        if c.flags.has(Flags::CLOSE_SENT) {
            c.flags.set(Flags::DISCARD_INPUT);
            return;
        }
        self.start_close(key, close_code, reason);
    }

    /// Server-initiated close: queue our close frame, stop deliveries, wait for the peer.
    pub(super) fn start_close(&mut self, key: usize, close_code: u16, reason: &'static str) {
        self.start_close_with(key, close_code, reason.into());
    }

    /// [`start_close`](Self::start_close) with a reason built at run time.
    pub(super) fn start_close_with(
        &mut self,
        key: usize,
        close_code: u16,
        reason: std::borrow::Cow<'static, str>,
    ) {
        let c = &mut self.conns[key];
        if c.flags.has(Flags::CLOSE_SENT) {
            return;
        }
        c.close_code = close_code;
        if c.flags.has(Flags::SSE) {
            // An event stream has no close frame: end it after what is queued.
            c.flags.set(Flags::CLOSE_SENT);
            self.close_reasons.insert(key as u32, reason);
            self.unregister(key);
            return self.drain_after_response(key);
        }
        let f = frame::encode_close(close_code, &reason);
        self.close_reasons.insert(key as u32, reason);
        self.begin_closing(key, f);
    }

    fn begin_closing(&mut self, key: usize, close_frame: Bytes) {
        let c = &mut self.conns[key];
        c.flags.set(Flags::CLOSE_SENT);
        c.state = ConnState::Closing;
        self.push_raw(key, close_frame);
        self.unregister(key);
        let mut deadline = self.now_ms + self.cfg.close_timeout_ms;
        if let Some(d) = self.shutdown_deadline_ms {
            deadline = deadline.min(d);
        }
        self.arm(key, deadline);
    }

    /// During shutdown: 1001 for open connections, drop the rest.
    pub(super) fn shutdown_conn(&mut self, key: usize) {
        match self.conns[key].state {
            ConnState::Open => self.start_close(key, code::GOING_AWAY, "server shutting down"),
            ConnState::Closing => {}
            ConnState::Http | ConnState::Draining => self.finish(key),
        }
    }

    fn on_message(&mut self, key: usize, text: bool, payload: &[u8]) {
        ShardMetrics::add(&self.m().messages_in, 1);
        if self.cfg.echo {
            let opcode = OpCode::Data(if text { Data::Text } else { Data::Binary });
            let f = frame::encode(opcode, payload);
            return self.deliver_reply(key, f);
        }
        // Validated as UTF-8 by the caller.
        let Ok(text) = std::str::from_utf8(payload) else {
            return self.fail(
                key,
                code::INVALID_PAYLOAD,
                "text message is not valid UTF-8",
            );
        };
        let parsed = match protocol::parse(text) {
            Ok(p) => p,
            Err(e) => {
                let f = protocol::error(e.id.map(|r| r.get()), e.code, &e.message);
                return self.deliver_reply(key, f);
            }
        };
        let id = parsed.id.map(|r| r.get());
        match parsed.op {
            Op::Ping { data } => {
                let f = protocol::pong(data);
                self.deliver(key, f);
            }
            Op::Sub { channel } => {
                if !self.channel_allowed(key, &channel) {
                    let f = protocol::error(id, ErrorCode::Forbidden, FORBIDDEN_CHANNEL);
                    return self.deliver_reply(key, f);
                }
                let c = &self.conns[key];
                if c.channel_list().iter().any(|x| **x == *channel) {
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
                self.subscribe(key, Arc::from(channel.as_ref()));
                self.ack(key, id);
            }
            Op::Unsub { channel } => {
                self.hub.unsubscribe(&channel, key as u32);
                if let Some(v) = self.conns[key].channels.as_mut() {
                    v.retain(|x| **x != *channel);
                }
                self.ack(key, id);
            }
            Op::Pub { channel, data } => {
                if !self.channel_allowed(key, &channel) {
                    let f = protocol::error(id, ErrorCode::Forbidden, FORBIDDEN_CHANNEL);
                    return self.deliver_reply(key, f);
                }
                let from = self.user_name(key);
                let f = protocol::msg(&from, Target::Channel(&channel), data, self.now_unix_ms);
                let name: Arc<str> = Arc::from(channel.as_ref());
                self.publish(name, f);
                self.ack(key, id);
            }
            Op::Send { to, data } => {
                let from = self.user_name(key);
                let f = protocol::msg(&from, Target::User(&to), data, self.now_unix_ms);
                let to: Arc<str> = Arc::from(to.as_ref());
                let me = self.conn_id(key);
                let reply = id.map(|id| ReplyTo {
                    conn: me,
                    id: id.into(),
                    to: to.clone(),
                });
                if to == from {
                    self.route_user(to, f, Some(me), reply);
                } else if self.conns[key].user.is_some() {
                    self.route_user(to, f.clone(), None, reply);
                    // The sender's other devices see the conversation too.
                    self.route_user(from, f, Some(me), None);
                } else {
                    // Anonymous connections have no other devices.
                    self.route_user(to, f, None, reply);
                }
            }
        }
    }

    /// Whether the connection's token (if any) grants `channel` (see [`auth::channel_allowed`]).
    pub(super) fn channel_allowed(&self, key: usize, channel: &str) -> bool {
        auth::channel_allowed(self.grants.get(&(key as u32)).map(|g| &**g), channel)
    }

    /// Adds a local subscription (the caller checked the name, permission and limit),
    /// sharing the hub's key for the name when the channel already has local subscribers.
    pub(super) fn subscribe(&mut self, key: usize, channel: Arc<str>) {
        let name = self.hub.channel_key(&channel).unwrap_or(channel);
        self.hub.subscribe(&name, key as u32);
        self.conns[key]
            .channels
            .get_or_insert_with(Default::default)
            .push(name);
    }

    fn ack(&mut self, key: usize, id: Option<&str>) {
        if let Some(id) = id {
            let f = protocol::ack(id);
            self.deliver(key, f);
        }
    }

    /// Fans a channel frame out to every shard's subscribers.
    pub(super) fn publish(&mut self, channel: Arc<str>, f: Bytes) {
        for s in 0..self.peers.len() as u16 {
            if s != self.index {
                self.post(
                    s,
                    ShardMsg::DeliverChannel {
                        channel: channel.clone(),
                        frame: f.clone(),
                    },
                );
            }
        }
        self.deliver_channel_local(&channel, &f);
    }

    fn route_user(
        &mut self,
        to: Arc<str>,
        f: Bytes,
        exclude: Option<crate::hub::ConnId>,
        reply: Option<ReplyTo>,
    ) {
        let home = home_of(&to, self.peers.len());
        if home == self.index {
            return self.on_route_user(to, f, exclude, reply);
        }
        if let Err(ShardMsg::RouteUser {
            reply: Some(reply), ..
        }) = self.peers[home as usize].post(ShardMsg::RouteUser {
            to,
            frame: f,
            exclude,
            reply,
        }) {
            ShardMetrics::add(&self.m().dropped, 1);
            self.reply_local(reply, None);
        }
    }

    /// At the home shard of `to`: forward to the shards that hold it, report to the sender.
    fn on_route_user(
        &mut self,
        to: Arc<str>,
        f: Bytes,
        exclude: Option<crate::hub::ConnId>,
        reply: Option<ReplyTo>,
    ) {
        let mut shards = std::mem::take(&mut self.scratch_shards);
        shards.clear();
        // Skip a shard whose only connection of the user is the excluded sender: no trip for
        // nothing when a user without other devices sends.
        self.hub
            .locate_except(&to, exclude.map(|x| x.shard), &mut shards);
        for &s in &shards {
            if s == self.index {
                self.deliver_user_local(&to, &f, exclude);
            } else {
                self.post(
                    s,
                    ShardMsg::DeliverUser {
                        to: to.clone(),
                        frame: f.clone(),
                        exclude,
                    },
                );
            }
        }
        let online = self.hub.is_online(&to);
        self.scratch_shards = shards;
        if let Some(reply) = reply {
            if reply.conn.shard == self.index {
                self.reply_local(reply, Some(online));
            } else {
                let shard = reply.conn.shard;
                self.post(shard, ShardMsg::Routed { reply, online });
            }
        }
    }

    /// Answers a routed `send`: ack, `user_offline`, or `overloaded` (`online` = None).
    fn reply_local(&mut self, reply: ReplyTo, online: Option<bool>) {
        let key = reply.conn.slot as usize;
        let alive = self
            .conns
            .get(key)
            .is_some_and(|c| c.generation == reply.conn.generation && c.state == ConnState::Open);
        if !alive {
            return;
        }
        let f = match online {
            Some(true) => protocol::ack(&reply.id),
            Some(false) => protocol::error(
                Some(&reply.id),
                ErrorCode::UserOffline,
                &format!("user {} has no open connection", reply.to),
            ),
            None => protocol::error(
                Some(&reply.id),
                ErrorCode::Overloaded,
                "server busy; message not delivered",
            ),
        };
        self.deliver(key, f);
    }

    pub(super) fn deliver_user_local(
        &mut self,
        to: &str,
        f: &Bytes,
        exclude: Option<crate::hub::ConnId>,
    ) -> u64 {
        let mut n = 0;
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        slots.extend_from_slice(self.hub.user_slots(to));
        for &slot in &slots {
            let key = slot as usize;
            if let Some(x) = exclude {
                if x.shard == self.index
                    && x.slot == slot
                    && self.conns[key].generation == x.generation
                {
                    continue;
                }
            }
            n += u64::from(self.deliver(key, f.clone()));
        }
        self.scratch_slots = slots;
        n
    }

    pub(super) fn deliver_channel_local(&mut self, channel: &str, f: &Bytes) -> u64 {
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        slots.extend(self.hub.subscribers(channel));
        let mut n = 0;
        for &slot in &slots {
            n += u64::from(self.deliver(slot as usize, f.clone()));
        }
        self.scratch_slots = slots;
        n
    }

    pub(super) fn on_shard_msg(&mut self, msg: ShardMsg) {
        match msg {
            ShardMsg::Presence {
                user,
                from,
                online,
                ack,
            } => {
                self.hub.presence(user, from, online);
                if let Some(conn) = ack {
                    self.post_reliable(from, ShardMsg::Registered { conn });
                }
            }
            ShardMsg::Registered { conn } => self.on_registered(conn),
            ShardMsg::RouteUser {
                to,
                frame,
                exclude,
                reply,
            } => self.on_route_user(to, frame, exclude, reply),
            ShardMsg::DeliverUser { to, frame, exclude } => {
                self.deliver_user_local(&to, &frame, exclude);
            }
            ShardMsg::DeliverChannel { channel, frame } => {
                self.deliver_channel_local(&channel, &frame);
            }
            ShardMsg::Routed { reply, online } => self.reply_local(reply, Some(online)),
            ShardMsg::Api { ticket, cmd } => self.on_api(ticket, &cmd),
            ShardMsg::ApiDone { id, count } => self.on_api_done(id, count),
            ShardMsg::Shutdown => self.begin_shutdown(),
        }
    }

    /// Queues a message frame for an open connection, enforcing `--max-outbound-bytes`.
    /// Queues a reply (ack, error, pong) to the requesting connection.
    fn deliver_reply(&mut self, key: usize, f: Bytes) {
        self.deliver(key, f);
    }

    /// Queues a message frame for an open connection, enforcing `--max-outbound-bytes`;
    /// event streams get it as an SSE event. True when queued.
    pub(super) fn deliver(&mut self, key: usize, f: Bytes) -> bool {
        let Some(c) = self.conns.get_mut(key) else {
            return false;
        };
        if c.state != ConnState::Open {
            return false;
        }
        if c.flags.has(Flags::WEBSOCKET) && c.flags.has(Flags::HOLD_INPUT) {
            // Not welcomed yet: the client must see `welcome` first, and a connection is
            // reachable from its welcome on (a DM for another device of the user may pass by).
            return false;
        }
        let f = if c.flags.has(Flags::SSE) {
            let id = self.sse_ids.entry(key as u32).or_insert(0);
            *id += 1;
            super::api::sse_event(*id, &f)
        } else {
            f
        };
        let c = &mut self.conns[key];
        // One frame larger than the limit still goes to an otherwise empty queue.
        let max = self.cfg.max_outbound_bytes;
        if c.queued_bytes() > 0 && c.queued_bytes() + f.len() > max {
            // Frames queued this turn may just not be flushed yet: try the socket first.
            if c.flags.has(Flags::WRITABLE) {
                self.write_now(key);
            }
            let c = &mut self.conns[key];
            if c.state != ConnState::Open {
                return false;
            }
            if c.queued_bytes() > 0 && c.queued_bytes() + f.len() > max {
                self.slow_consumer(key);
                return false;
            }
        }
        ShardMetrics::add(&self.m().messages_out, 1);
        self.push_raw(key, f);
        true
    }

    fn slow_consumer(&mut self, key: usize) {
        ShardMetrics::add(&self.m().slow_consumers, 1);
        if let Some(o) = self.conns[key].outbox.as_mut() {
            o.truncate_unstarted();
        }
        self.start_close(
            key,
            code::SLOW_CONSUMER,
            "slow consumer: outbound queue over limit",
        );
    }

    /// Queues bytes without limits (responses, control frames) and marks the connection dirty.
    pub(super) fn push_raw(&mut self, key: usize, bytes: Bytes) {
        let c = &mut self.conns[key];
        if c.outbox.is_none() {
            c.outbox = Some(self.pool.outbox());
        }
        c.outbox.as_mut().expect("just set").push(bytes);
        self.mark_dirty(key);
    }

    fn mark_dirty(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if !c.flags.has(Flags::DIRTY) {
            c.flags.set(Flags::DIRTY);
            self.dirty.push((key, c.generation));
        }
    }

    /// Writes queued output now (no close handling; used to relieve a burst).
    fn write_now(&mut self, key: usize) {
        let c = &mut self.conns[key];
        let Some(out) = c.outbox.as_mut() else {
            return;
        };
        match conn::flush(&mut c.stream, out) {
            Ok((done, n)) => {
                if done == Flushed::Blocked {
                    c.flags.clear(Flags::WRITABLE);
                }
                ShardMetrics::add(&self.metrics[self.index as usize].bytes_out, n as u64);
            }
            Err(_) => c.flags.clear(Flags::WRITABLE),
        }
    }

    /// End-of-turn flush of one connection, and the transitions that wait for a flush.
    pub(super) fn flush_conn(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if let Some(out) = c.outbox.as_mut() {
            match conn::flush(&mut c.stream, out) {
                Ok((Flushed::All, n)) => {
                    ShardMetrics::add(&self.metrics[self.index as usize].bytes_out, n as u64);
                    let out = c.outbox.take().expect("checked above");
                    self.pool.put_outbox(out);
                }
                Ok((Flushed::Blocked, n)) => {
                    ShardMetrics::add(&self.metrics[self.index as usize].bytes_out, n as u64);
                    c.flags.clear(Flags::WRITABLE);
                    return;
                }
                Err(e) => {
                    debug!(shard = self.index, conn = key, error = %e, "write failed");
                    if c.close_code == 0
                        && c.state != ConnState::Http
                        && c.state != ConnState::Draining
                    {
                        c.close_code = code::ABNORMAL;
                        self.close_reasons.insert(key as u32, "write failed".into());
                    }
                    return self.finish(key);
                }
            }
        }
        let c = &mut self.conns[key];
        match c.state {
            ConnState::Closing
                if c.flags.has(Flags::CLOSE_SENT) && c.flags.has(Flags::CLOSE_RECEIVED) =>
            {
                self.finish(key)
            }
            ConnState::Draining if !c.flags.has(Flags::FIN_SENT) => {
                c.flags.set(Flags::FIN_SENT);
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
            _ => {}
        }
    }

    /// When an open connection should next be looked at: its ping time or its idle deadline.
    pub(super) fn next_heartbeat_check(&self, key: usize) -> u64 {
        let exp = self.token_deadline_ms(key).unwrap_or(u64::MAX);
        let c = &self.conns[key];
        if c.flags.has(Flags::SSE) {
            return exp.min(self.now_ms + self.cfg.sse_heartbeat_ms);
        }
        exp.min(self.ws_heartbeat_check(key))
    }

    /// Shard-clock deadline of the connection's token, if it has one.
    fn token_deadline_ms(&self, key: usize) -> Option<u64> {
        let g = self.grants.get(&(key as u32))?;
        let left_ms = (g.exp * 1000).saturating_sub(self.now_unix_ms);
        Some(self.now_ms + left_ms)
    }

    fn token_expired(&self, key: usize) -> bool {
        self.grants
            .get(&(key as u32))
            .is_some_and(|g| g.exp * 1000 <= self.now_unix_ms)
    }

    fn ws_heartbeat_check(&self, key: usize) -> u64 {
        let c = &self.conns[key];
        let last_seen = self.now_ms - c.silent_ms(self.now_ms);
        let idle_at = last_seen + self.cfg.idle_timeout_ms;
        if c.flags.has(Flags::PING_OUTSTANDING) {
            idle_at.min(self.now_ms + self.cfg.ping_interval_ms)
        } else {
            idle_at.min(last_seen + self.cfg.ping_interval_ms + self.jitter_ms(key))
        }
    }

    /// A fixed per-connection offset in [0, interval/4) so pings of a burst spread out.
    fn jitter_ms(&self, key: usize) -> u64 {
        let c = &self.conns[key];
        let mut x = (key as u64) << 32 | c.generation as u64;
        x ^= x >> 33;
        x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
        x ^= x >> 33;
        x % (self.cfg.ping_interval_ms / 4 + 1)
    }

    pub(super) fn on_timer(&mut self, key: usize) {
        let now = self.now_ms;
        let c = &mut self.conns[key];
        match c.state {
            ConnState::Http => {
                self.m().count_handshake_failure(HandshakeFailure::Timeout);
                debug!(
                    shard = self.index,
                    conn = key,
                    "handshake timeout; dropping"
                );
                self.finish(key);
            }
            ConnState::Draining | ConnState::Closing => self.finish(key),
            ConnState::Open => {
                if self.token_expired(key) {
                    return self.start_close(key, code::TOKEN_EXPIRED, "token expired");
                }
                let c = &self.conns[key];
                if c.flags.has(Flags::SSE) {
                    self.push_raw(key, Bytes::from_static(b": heartbeat\n\n"));
                    let next = self.next_heartbeat_check(key);
                    return self.arm(key, next.max(now + 1));
                }
                let silent = c.silent_ms(now);
                if silent >= self.cfg.idle_timeout_ms {
                    return self.start_close(key, code::HEARTBEAT_TIMEOUT, "heartbeat timeout");
                }
                let ping_after = self.cfg.ping_interval_ms + self.jitter_ms(key);
                let c = &mut self.conns[key];
                if !c.flags.has(Flags::PING_OUTSTANDING) && silent >= ping_after {
                    c.flags.set(Flags::PING_OUTSTANDING);
                    self.push_raw(key, frame::encode(OpCode::Control(Control::Ping), b""));
                }
                let next = self.next_heartbeat_check(key);
                self.arm(key, next.max(now + 1));
            }
        }
    }

    /// Removes a connection: logs and counts its close, releases everything it held.
    pub(super) fn finish(&mut self, key: usize) {
        self.unregister(key);
        let c = self.conns.remove(key);
        self.wheel.cancel(c.timer);
        let reason = self.close_reasons.remove(&(key as u32)).unwrap_or_default();
        self.grants.remove(&(key as u32));
        self.sse_ids.remove(&(key as u32));
        let m = &self.metrics[self.index as usize];
        if c.flags.has(Flags::COUNTED) {
            self.open_total.fetch_sub(1, Ordering::AcqRel);
        }
        let was_ws = c.flags.has(Flags::WEBSOCKET);
        if c.flags.has(Flags::SSE) {
            m.open_sse.fetch_sub(1, Ordering::Relaxed);
            info!(
                target: "switchboard::close",
                shard = self.index,
                conn = %format_args!("{}.{}.{}", self.index, key, c.generation),
                user = c.user.as_deref().unwrap_or("(anonymous)"),
                transport = "sse",
                reason = %reason,
                duration_ms = self.now_ms.saturating_sub(c.opened_ms),
                "closed"
            );
        } else if was_ws {
            m.open_ws.fetch_sub(1, Ordering::Relaxed);
            let close_code = if c.close_code == 0 {
                code::ABNORMAL
            } else {
                c.close_code
            };
            m.count_close(close_code);
            info!(
                target: "switchboard::close",
                shard = self.index,
                conn = %format_args!("{}.{}.{}", self.index, key, c.generation),
                user = c.user.as_deref().unwrap_or("(anonymous)"),
                code = close_code,
                reason = %reason,
                duration_ms = self.now_ms.saturating_sub(c.opened_ms),
                "closed"
            );
        } else {
            m.open_http.fetch_sub(1, Ordering::Relaxed);
        }
        if let Some(o) = c.outbox {
            self.pool.put_outbox(o);
        }
        if let Some(i) = c.inbound {
            self.pool.put_inbound(i);
        }
        // Dropping the stream closes the fd, which also removes it from epoll.
    }
}

fn advance_utf8(f: &mut Fragment) -> bool {
    match utf8::check(&f.data, f.utf8_valid) {
        utf8::Utf8Check::Partial { valid_up_to } => {
            f.utf8_valid = valid_up_to;
            true
        }
        utf8::Utf8Check::Invalid => false,
    }
}

fn frame_error_reason(e: frame::FrameError) -> &'static str {
    match e {
        frame::FrameError::LengthMsb => "invalid payload length",
    }
}
