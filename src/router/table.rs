//! The shard's connections and their bytes: the slab, the timer wheel, the buffer pool, the
//! connections to flush at the end of the turn and the reads left for later, the shard
//! clock. Everything here is about one connection at a time; who is connected to whom
//! (the hub, the directory, mail) is the router's.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;

use bytes::Bytes;
use slab::Slab;
use tracing::debug;

use crate::config::Config;
use crate::conn::buffers::{BufPool, Outbox, Piece, INLINE_MAX, SMALL_UNIT_MAX};
use crate::conn::{flush, ws, Conn, ConnState, Flags, Flushed, Protocol, Transport};
use crate::http::{self, response, Method, Request};
use crate::hub::ConnId;
use crate::metrics::{HandshakeFailure, ShardMetrics};
use crate::timer::Wheel;
use crate::ws::frame::Data;

/// What a delivery carries.
pub(super) enum Out<'a> {
    /// A payload shared with the other recipients (a fan-out serializes it once).
    Shared(Bytes),
    /// Bytes for this connection alone (an echo): a small unit is copied into its outbox's
    /// own buffer, no allocation of its own.
    Own(&'a [u8]),
}

impl Out<'_> {
    /// Another handle on the same bytes (a shared payload's count goes up by one).
    pub(super) fn share(&self) -> Out<'_> {
        match self {
            Out::Shared(b) => Out::Shared(b.clone()),
            Out::Own(s) => Out::Own(s),
        }
    }

    fn bytes(&self) -> &[u8] {
        match self {
            Out::Shared(b) => b,
            Out::Own(s) => s,
        }
    }
}

/// What became of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Delivery {
    /// Queued.
    Queued,
    /// Not queued: the connection is gone, not open or not welcomed yet.
    NotOpen,
    /// Not queued: it would pass `--max-outbound-bytes` (the router closes it, 4001).
    OverLimit,
}

/// A shard's connections, by slab key (the key is the connection's token and wheel entry).
pub struct Table<T> {
    slab: Slab<Conn<T>>,
    /// One deadline per connection.
    pub(super) wheel: Wheel,
    /// Read buffers and outboxes lent while data is in flight.
    pub(super) pool: BufPool,
    /// Connections with output to flush this turn.
    pub(super) dirty: Vec<(usize, u32)>,
    /// Connections whose read was capped with data left in the pipe.
    pub(super) read_backlog: Vec<(usize, u32)>,
    /// Wheel entries due this turn (reused).
    pub(super) expired: Vec<u32>,
    /// Shard clock, ms; set once per turn by the driver.
    pub(super) now_ms: u64,
    /// Wall clock (unix ms) for message timestamps and token expiry; set with `now_ms`.
    pub(super) now_unix_ms: u64,
    next_generation: u32,
    /// Messages in and out this turn, published to the shared counters once per turn (an
    /// atomic add per message costs more than the rest of an echo's work in user space).
    pub(super) turn_in: u64,
    pub(super) turn_out: u64,
    /// permessage-deflate: the shard's compressors (no context is kept between messages).
    pub(super) deflater: crate::ws::deflate::Deflater,
    /// permessage-deflate: the inflater of clients without context takeover, reset per
    /// message.
    pub(super) inflater: Option<Box<flate2::Decompress>>,
    shard: u16,
    metrics: Arc<[ShardMetrics]>,
    cfg: Arc<Config>,
}

impl<T> Deref for Table<T> {
    type Target = Slab<Conn<T>>;
    fn deref(&self) -> &Slab<Conn<T>> {
        &self.slab
    }
}

impl<T> DerefMut for Table<T> {
    fn deref_mut(&mut self) -> &mut Slab<Conn<T>> {
        &mut self.slab
    }
}

impl<T: Transport> Table<T> {
    /// The slab key the next [`Router::accept`](super::Router::accept) will use (register the socket under it).
    pub fn next_key(&self) -> usize {
        self.slab.vacant_key()
    }

    /// The connection at `key`, if any.
    pub fn conn(&self, key: usize) -> Option<&Conn<T>> {
        self.slab.get(key)
    }

    /// Whether connection `key` has its deadline armed (every live connection has one).
    pub fn has_deadline(&self, key: usize) -> bool {
        self.slab.contains(key) && self.wheel.is_armed(key as u32)
    }

    /// The id of a live connection.
    pub fn conn_id(&self, key: usize) -> ConnId {
        ConnId {
            shard: self.shard,
            slot: key as u32,
            generation: self.slab[key].generation,
        }
    }

    /// Whether `id` names a live connection of this shard.
    pub fn is_live(&self, id: ConnId) -> bool {
        id.shard == self.shard
            && self
                .slab
                .get(id.slot as usize)
                .is_some_and(|c| c.generation == id.generation)
    }

    /// Connections in the slab.
    pub fn len(&self) -> usize {
        self.slab.len()
    }

    /// Whether no connection is left.
    pub fn is_empty(&self) -> bool {
        self.slab.is_empty()
    }

    /// Keys of every connection.
    pub fn keys(&self) -> Vec<usize> {
        self.slab.iter().map(|(k, _)| k).collect()
    }

    /// Entries in the timer wheel.
    pub fn wheel_len(&self) -> usize {
        self.wheel.len()
    }

    /// Whether work is left that should not wait for the next event: capped reads, mail to
    /// retry.
    pub fn has_backlog(&self) -> bool {
        !self.read_backlog.is_empty()
    }

    /// An empty table with room for `room` connections, the clock at `now_ms`.
    pub(super) fn new(
        shard: u16,
        cfg: Arc<Config>,
        metrics: Arc<[ShardMetrics]>,
        room: usize,
        now_ms: u64,
        now_unix_ms: u64,
    ) -> Self {
        Table {
            slab: Slab::with_capacity(room),
            wheel: Wheel::with_capacity(now_ms, room),
            pool: BufPool::default(),
            dirty: Vec::new(),
            read_backlog: Vec::new(),
            expired: Vec::new(),
            now_ms,
            now_unix_ms,
            next_generation: 0,
            turn_in: 0,
            turn_out: 0,
            deflater: Default::default(),
            inflater: None,
            shard,
            metrics,
            cfg,
        }
    }

    fn m(&self) -> &ShardMetrics {
        &self.metrics[self.shard as usize]
    }

    /// Takes a new connection with its handshake deadline armed; returns its key.
    pub(super) fn insert_new(&mut self, io: T) -> usize {
        self.next_generation = self.next_generation.wrapping_add(1);
        let c = Conn::new(io, self.next_generation, self.now_ms);
        let key = self.slab.insert(c);
        let deadline = self.now_ms + self.cfg.handshake_timeout_ms;
        self.arm(key, deadline);
        key
    }

    /// (Re)arms the connection's single wheel entry.
    pub(super) fn arm(&mut self, key: usize, deadline_ms: u64) {
        debug_assert!(self.slab.contains(key));
        self.wheel.arm(key as u32, deadline_ms);
    }

    /// The connection's outbox, borrowed from the pool when it has none.
    pub(super) fn outbox(&mut self, key: usize) -> &mut Outbox {
        let c = &mut self.slab[key];
        c.outbox.get_or_insert_with(|| self.pool.outbox())
    }

    /// Queues bytes without limits (responses, control frames) and marks the connection dirty.
    pub(super) fn push_raw(&mut self, key: usize, bytes: Bytes) {
        self.outbox(key).push(bytes);
        self.mark_dirty(key);
    }

    /// Lists the connection for the end-of-turn flush (once).
    pub(super) fn mark_dirty(&mut self, key: usize) {
        let c = &mut self.slab[key];
        if !c.flags.has(Flags::DIRTY) {
            c.flags.set(Flags::DIRTY);
            self.dirty.push((key, c.generation));
        }
    }

    /// Reading `key` continues from the read backlog on a later call (once).
    pub(super) fn defer_read(&mut self, key: usize) {
        let c = &mut self.slab[key];
        if !c.flags.has(Flags::READ_BACKLOG) {
            c.flags.set(Flags::READ_BACKLOG);
            self.read_backlog.push((key, c.generation));
        }
    }

    /// Writes what connection `key` has queued, as far as the socket takes it, and counts
    /// the bytes (`Blocked`: wait for a writable event; no outbox: `All`).
    fn write_out(&mut self, key: usize) -> std::io::Result<Flushed> {
        let c = &mut self.slab[key];
        let Some(out) = c.outbox.as_mut() else {
            return Ok(Flushed::All);
        };
        let (done, n) = flush(&mut c.io, out)?;
        ShardMetrics::add(&self.metrics[self.shard as usize].bytes_out, n as u64);
        if done == Flushed::Blocked {
            c.flags.clear(Flags::WRITABLE);
        }
        Ok(done)
    }

    /// Gives connection `key`'s outbox back to the pool once it is written.
    fn give_back_drained(&mut self, key: usize) {
        let c = &mut self.slab[key];
        if c.outbox.as_ref().is_some_and(|o| o.bytes == 0) {
            let out = c.outbox.take().expect("checked above");
            self.pool.put_outbox(out);
        }
    }

    /// Writes queued output now (no close handling; used to relieve a burst).
    pub(super) fn write_now(&mut self, key: usize) {
        if self.write_out(key).is_err() {
            self.slab[key].flags.clear(Flags::WRITABLE);
        }
    }

    /// End-of-turn write of connection `key`'s outbox: all of it (the outbox goes back to
    /// the pool; also when there was none), or as much as the socket took (`Blocked`: wait
    /// for a writable event).
    pub(super) fn flush_out(&mut self, key: usize) -> std::io::Result<Flushed> {
        let done = self.write_out(key)?;
        if done == Flushed::All {
            self.give_back_drained(key);
        }
        Ok(done)
    }

    /// Writes queued output now and gives a drained outbox back to the pool; errors and the
    /// transitions that wait for a flush are left to the end-of-turn flush (the connection
    /// stays in the dirty list).
    pub(super) fn write_early(&mut self, key: usize) {
        self.write_now(key);
        self.give_back_drained(key);
    }

    /// Adds this turn's message counts to the shared counters.
    pub(super) fn publish_counts(&mut self) {
        let (n_in, n_out) = (
            std::mem::take(&mut self.turn_in),
            std::mem::take(&mut self.turn_out),
        );
        if n_in > 0 {
            ShardMetrics::add(&self.m().messages_in, n_in);
        }
        if n_out > 0 {
            ShardMetrics::add(&self.m().messages_out, n_out);
        }
    }

    /// The next event of WebSocket connection `key` in `inb` ([`ws::next_event`]); none
    /// when the connection is gone, needs more bytes, or must wait: its replies pile up
    /// faster than it reads them, so its requests wait (TCP pushes back) until they are
    /// written.
    #[inline]
    pub(super) fn ws_event<'a>(
        &mut self,
        key: usize,
        inb: &'a mut crate::conn::buffers::Inbound,
        limits: &ws::Limits,
    ) -> Option<ws::Event<'a>> {
        let c = self.slab.get_mut(key)?;
        let queued = c.outbox.as_ref().map_or(0, |o| o.bytes);
        if queued > self.cfg.max_outbound_bytes / 2 && c.state.is_open() {
            c.extra_mut().input_waits = true;
            return None;
        }
        ws::next_event(c, inb, limits, &mut self.inflater, self.now_ms)
    }

    // Deadlines of open connections.

    /// When an open connection should next be looked at: its ping time or its idle deadline.
    pub(super) fn next_heartbeat_check(&self, key: usize) -> u64 {
        let exp = self.token_deadline_ms(key).unwrap_or(u64::MAX);
        let c = &self.slab[key];
        if c.flags.has(Flags::SSE) {
            return exp.min(self.now_ms + self.cfg.sse_heartbeat_ms);
        }
        exp.min(self.ws_heartbeat_check(key))
    }

    /// Shard-clock deadline of the connection's token, if it has one.
    pub(super) fn token_deadline_ms(&self, key: usize) -> Option<u64> {
        let g = self.slab[key].grant()?;
        let left_ms = (g.exp * 1000).saturating_sub(self.now_unix_ms);
        Some(self.now_ms + left_ms)
    }

    pub(super) fn token_expired(&self, key: usize) -> bool {
        self.slab[key]
            .grant()
            .is_some_and(|g| g.exp * 1000 <= self.now_unix_ms)
    }

    pub(super) fn ws_heartbeat_check(&self, key: usize) -> u64 {
        let (ping, idle) = (self.cfg.ping_interval_ms, self.cfg.idle_timeout_ms);
        ws::heartbeat_check_ms(
            &self.slab[key],
            self.now_ms,
            ping,
            idle,
            self.jitter_ms(key),
        )
    }

    /// A fixed per-connection offset so pings of a burst spread out.
    pub(super) fn jitter_ms(&self, key: usize) -> u64 {
        ws::jitter_ms(key, self.slab[key].generation, self.cfg.ping_interval_ms)
    }

    /// Queues a data message for connection `key` under its outbound limit. The common unit
    /// is taken here, inline in the caller; everything else in [`Self::deliver_framed`], out
    /// of line, so the common case does not pay for its frame (its header buffer, the
    /// compressor).
    #[inline]
    pub(super) fn deliver_data(&mut self, key: usize, opcode: Data, payload: Out<'_>) -> Delivery {
        let Some(c) = self.slab.get_mut(key) else {
            return Delivery::NotOpen;
        };
        if !c.state.is_welcomed() {
            // Not open, or not welcomed yet: the client must see `welcome` (an event stream,
            // its response head) first, and a connection is reachable from then on (a DM for
            // another device of the user may pass by).
            return Delivery::NotOpen;
        }
        // The common case first (an echo, a reply, a small DM or fan-out to a WebSocket): one
        // frame copied into the outbox's own buffer, under the limit, nothing to compress (a
        // small shared payload too: copying it costs less than queueing a piece of it and
        // writing two).
        let own = match &payload {
            Out::Own(s) => Some(*s),
            Out::Shared(b) if b.len() < SMALL_UNIT_MAX => Some(&b[..]),
            Out::Shared(_) => None,
        };
        if let Some(s) = own {
            let head_len = crate::ws::frame::header_len(s.len());
            let unit = head_len + s.len();
            let queued = c.queued_bytes();
            if !c.flags.has(Flags::DEFLATE | Flags::SSE)
                && unit <= SMALL_UNIT_MAX
                && (queued == 0 || queued + unit <= self.cfg.max_outbound_bytes)
            {
                self.turn_out += 1;
                let pool = &mut self.pool;
                c.outbox
                    .get_or_insert_with(|| pool.outbox())
                    .push_frame(crate::ws::frame::OpCode::Data(opcode), s);
                if !c.flags.has(Flags::DIRTY) {
                    c.flags.set(Flags::DIRTY);
                    self.dirty.push((key, c.generation));
                }
                return Delivery::Queued;
            }
        }
        self.deliver_framed(key, opcode, payload)
    }

    /// [`Self::deliver_data`] for a welcomed connection, beyond the common unit: compressed,
    /// shared, an event-stream event, large, or at the limit.
    #[inline(never)]
    fn deliver_framed(&mut self, key: usize, opcode: Data, payload: Out<'_>) -> Delivery {
        let c = &mut self.slab[key];
        // permessage-deflate: compressed once per message, whoever it goes to.
        let deflate =
            c.flags.has(Flags::DEFLATE) && payload.bytes().len() >= self.cfg.deflate_min_bytes;
        // The compressor takes shared payloads (it remembers the last one for a fan-out).
        let payload = match payload {
            Out::Own(s) if deflate => Out::Shared(Bytes::copy_from_slice(s)),
            p => p,
        };
        let zipped = match &payload {
            Out::Shared(b) if deflate => {
                let bits = c.extra().map_or(15, |e| e.deflate_bits);
                // --deflate-min-bytes 0: every message, even one that does not get smaller.
                let always = self.cfg.deflate_min_bytes == 0;
                self.deflater.compress(b, bits, always)
            }
            _ => None,
        };
        let compressed = zipped.is_some();
        let payload = match zipped {
            Some(z) => Out::Shared(z),
            None => payload,
        };
        let bytes = payload.bytes();
        let c = &mut self.slab[key];
        let mut head = [0u8; INLINE_MAX];
        let (head_len, trailer) = Protocol::event_head(c, opcode, bytes, &mut head);
        if compressed {
            head[0] |= 0x40; // RSV1
        }
        let unit = head_len + bytes.len() + trailer.len();
        // One unit larger than the limit still goes to an otherwise empty queue.
        let max = self.cfg.max_outbound_bytes;
        let c = &mut self.slab[key];
        if c.queued_bytes() > 0 && c.queued_bytes() + unit > max {
            // Units queued this turn may just not be flushed yet: try the socket first.
            if c.flags.has(Flags::WRITABLE) {
                self.write_now(key);
            }
            let c = &mut self.slab[key];
            if !c.state.is_open() {
                return Delivery::NotOpen;
            }
            if c.queued_bytes() > 0 && c.queued_bytes() + unit > max {
                return Delivery::OverLimit;
            }
        }
        self.turn_out += 1;
        match payload {
            Out::Own(s) if trailer.is_empty() && unit <= SMALL_UNIT_MAX => {
                self.outbox(key).push_copied(&head[..head_len], s);
                self.mark_dirty(key);
            }
            Out::Own(s) => {
                self.queue_framed(key, &head[..head_len], Bytes::copy_from_slice(s), trailer)
            }
            Out::Shared(b) => self.queue_framed(key, &head[..head_len], b, trailer),
        }
        Delivery::Queued
    }

    /// Queues one framed unit: head, shared payload, trailer (an SSE event's blank line).
    pub(super) fn queue_framed(
        &mut self,
        key: usize,
        head: &[u8],
        payload: Bytes,
        trailer: &'static [u8],
    ) {
        let out = self.outbox(key);
        out.push_piece(Piece::inline(head), true);
        out.push_piece(Piece::Shared(payload), false);
        if !trailer.is_empty() {
            out.push_piece(Piece::Shared(Bytes::from_static(trailer)), false);
        }
        self.mark_dirty(key);
    }

    /// Queues an event without limits (the welcome, answers to ops, replayed pages, which
    /// ask for more only once flushed): a text frame on a WebSocket, an SSE event on a stream.
    pub(super) fn push_event(&mut self, key: usize, payload: Bytes) {
        let mut head = [0u8; INLINE_MAX];
        let c = &mut self.slab[key];
        let (hl, trailer) = Protocol::event_head(c, Data::Text, &payload, &mut head);
        self.queue_framed(key, &head[..hl], payload, trailer);
    }

    // HTTP answers.

    pub(super) fn http_ok(&mut self, key: usize, req: &Request, content_type: &str, body: Vec<u8>) {
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
        self.refuse(key, status, message, why, response::error(status, message));
    }

    /// Refuses a request for its body (411, 413): JSON like every API answer on `/api/`,
    /// plain text elsewhere; the connection closes once the answer is read.
    pub(super) fn body_fail(&mut self, key: usize, api: bool, status: u16, message: &str) {
        if !api {
            return self.http_fail(key, status, message, HandshakeFailure::Body);
        }
        let body = http::api::error_body(message);
        let resp = response::simple(status, "application/json", &body, "", true);
        self.refuse(key, status, message, HandshakeFailure::Body, resp);
    }

    /// Refuses for now: `status` with `Retry-After` (seconds, rounded up from `wait_ms`),
    /// then closes once the peer has read it.
    pub(super) fn http_refuse(
        &mut self,
        key: usize,
        status: u16,
        message: &str,
        why: HandshakeFailure,
        wait_ms: u64,
    ) {
        let resp = response::retry_later(status, message, wait_ms.div_ceil(1000));
        self.refuse(key, status, message, why, resp);
    }

    /// Counts a refused request, queues its answer `resp` and closes once it is read.
    pub(super) fn refuse(
        &mut self,
        key: usize,
        status: u16,
        message: &str,
        why: HandshakeFailure,
        resp: Bytes,
    ) {
        debug!(
            shard = self.shard,
            conn = key,
            status,
            reason = message,
            "request refused"
        );
        self.m().count_handshake_failure(why);
        self.push_raw(key, resp);
        self.drain_after_response(key);
    }

    pub(super) fn drain_after_response(&mut self, key: usize) {
        self.slab[key].state = ConnState::Draining;
        let deadline = self.now_ms + self.cfg.close_timeout_ms;
        self.arm(key, deadline);
    }

    /// Removes connection `key`, cancels its deadline and gives its buffers back.
    pub(super) fn remove_conn(&mut self, key: usize) -> Conn<T> {
        let mut c = self.slab.remove(key);
        self.wheel.cancel(key as u32);
        if let Some(o) = c.outbox.take() {
            self.pool.put_outbox(o);
        }
        if let Some(i) = c.inbound.take() {
            self.pool.put_inbound(i);
        }
        c
    }

    /// The key of `conn` if it is a live open connection here.
    pub(super) fn live_open(&self, conn: ConnId) -> Option<usize> {
        let key = conn.slot as usize;
        self.get(key)
            .is_some_and(|c| c.generation == conn.generation && c.state.is_open())
            .then_some(key)
    }

    /// The key of `conn` if it is an HTTP connection waiting for the store (a qos-1 API send).
    pub(super) fn waiting_http(&self, conn: ConnId) -> Option<usize> {
        let key = conn.slot as usize;
        self.get(key)
            .is_some_and(|c| {
                c.generation == conn.generation
                    && c.state == ConnState::Http(crate::conn::HttpWait::Answer)
            })
            .then_some(key)
    }

    /// Whether deliveries reach connection `id` of this shard, found in the directory: it is
    /// the same generation and still registered (a closing one is unregistered before the
    /// directory, one mail away at the home shard, drops it).
    pub(super) fn delivers_to(&self, id: ConnId) -> bool {
        self.get(id.slot as usize)
            .is_some_and(|c| c.generation == id.generation && c.flags.has(Flags::REGISTERED))
    }

    /// Turns the connection's `join`/`leave` events of `channel` on (`sub` with
    /// `"join_leave":true`) or off (a `sub` without it).
    pub(super) fn want_join_leave(&mut self, key: usize, channel: &str, on: bool) {
        let has = self[key]
            .extra()
            .is_some_and(|e| e.join_leave.iter().any(|c| **c == *channel));
        if on && !has {
            self[key].extra_mut().join_leave.push(channel.into());
        } else if !on && has {
            let e = self[key].extra_mut();
            e.join_leave.retain(|c| **c != *channel);
        }
    }

    /// The response head of an event stream.
    pub(super) fn push_sse_headers(&mut self, key: usize) {
        self.push_raw(key, Bytes::from_static(crate::conn::sse::HEAD));
    }

    /// Whether the connection's token (if any) grants `channel` (see [`crate::auth::channel_allowed`]).
    pub(super) fn channel_allowed(&self, key: usize, channel: &str) -> bool {
        crate::auth::channel_allowed(self[key].grant(), channel)
    }
}
