//! Bytes in: the read loop, then HTTP or WebSocket frames according to the connection's
//! state; frame validation (RFC 6455), message reassembly, and the close handshake.
//! Transitions follow `docs/lifecycle.md`.

use std::io;

use tracing::debug;

use super::ops::Incoming;
use super::Router;
use crate::conn::buffers::Inbound;
use crate::conn::{ws, Protocol};
use crate::conn::{ConnState, Flags, Transport};
use crate::metrics::ShardMetrics;
use crate::ws::close::{self as code};
use crate::ws::frame::{self, Control, OpCode};

/// Reads per connection per turn before other connections get a turn.
const READS_PER_TURN: usize = 16;

impl<T: Transport> Router<T> {
    /// The pipe of `key` has bytes or an EOF: read until `WouldBlock` (or the per-turn cap)
    /// and act on what arrived. `drain`: insist on `WouldBlock` or EOF even after a short
    /// read (with edge-triggered readiness a short read means the socket is empty, unless the
    /// peer's FIN or an error came with the event).
    pub fn on_readable(&mut self, key: usize, drain: bool) {
        if !self.conns.contains(key) {
            return; // spurious event for a finished connection
        }
        if self.has_retries() {
            // Mail waits for room in another shard's mailbox: read no more requests (TCP
            // pushes back on the clients) until it is posted; picked up again from the
            // backlog, every millisecond while the mail waits.
            return self.conns.defer_read(key);
        }
        if self.conns[key].input_waits() {
            return; // resumed once its outbox is written (`flush_conn`)
        }
        self.uncount_half_open(key);
        let held = self.conns[key].inbound.take();
        let mut inb = self.conns.pool.prepare(held);
        let mut eof = false;
        let mut failed: Option<io::Error> = None;
        let mut reads = 0;
        if inb.start < inb.end {
            // Bytes held back while waiting for the welcome.
            self.process(key, &mut inb);
        }
        loop {
            if reads == READS_PER_TURN {
                self.conns.defer_read(key);
                break;
            }
            if inb.end == inb.buf.len() {
                if self.conns[key].state.holds_input() {
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
            match self.conns[key].io.read(&mut inb.buf[end..]) {
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
        let parked = self.conns.pool.park(inb);
        self.conns[key].inbound = parked;
        self.count_half_open(key);
        if !self.conns.contains(key) {
            return; // refused and closed by the half-open cap
        }
        if let Some(e) = failed {
            debug!(shard = self.index, conn = key, error = %e, "read failed");
            self.finish(key);
        } else if eof {
            self.on_eof(key);
        }
    }

    pub(super) fn on_eof(&mut self, key: usize) {
        let c = &mut self.conns[key];
        match c.state {
            // The peer went away without a close frame: 1006 in the log.
            ConnState::Open(_) => {
                c.set_close(
                    code::ABNORMAL,
                    "connection dropped without a close frame".into(),
                );
                self.finish(key);
            }
            ConnState::Http(_) | ConnState::Draining => self.finish(key),
            ConnState::Closing => {
                if !c.flags.has(Flags::CLOSE_RECEIVED) && c.close_code() == 0 {
                    c.extra_mut().close_code = code::ABNORMAL;
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
    pub(super) fn process(&mut self, key: usize, inb: &mut Inbound) {
        loop {
            let Some(c) = self.conns.get(key) else {
                return;
            };
            if c.flags.has(Flags::DISCARD_INPUT) || c.state == ConnState::Draining {
                inb.start = inb.end;
                return;
            }
            if c.state.holds_input() {
                return;
            }
            // The machine of the connection's protocol reads its bytes.
            match (c.protocol(), c.state) {
                (Protocol::Sse, _) => {
                    inb.start = inb.end; // an event stream has nothing to say
                    return;
                }
                (_, ConnState::Http(_)) => {
                    if !self.process_http(key, inb) {
                        return;
                    }
                }
                (_, ConnState::Open(_) | ConnState::Closing) => {
                    return self.process_frames(key, inb)
                }
                (_, ConnState::Draining) => unreachable!("handled above"),
            }
        }
    }

    /// Acts on every event of the WebSocket machine ([`crate::conn::ws`]) in `inb`.
    pub(super) fn process_frames(&mut self, key: usize, inb: &mut Inbound) {
        let limits = ws::Limits {
            max_message_bytes: self.cfg.max_message_bytes,
            binary: self.cfg.echo,
        };
        loop {
            let Some(ev) = self.conns.ws_event(key, inb, &limits) else {
                return;
            };
            match ev {
                ws::Event::Text(t) => self.on_message(key, Incoming::Text(&t)),
                ws::Event::Binary(b) => self.on_message(key, Incoming::Binary(&b)),
                ws::Event::Ping(payload) => {
                    let pong = frame::encode(OpCode::Control(Control::Pong), payload);
                    self.conns.push_raw(key, pong);
                }
                ws::Event::Close { code, reply } => {
                    self.conns[key].set_close(code, "closed by peer".into());
                    self.begin_closing(key, reply);
                }
                // The handshake is complete once our close frame is written.
                ws::Event::CloseAnswered => self.conns.mark_dirty(key),
                ws::Event::Violation {
                    code,
                    reason,
                    peer_closed,
                } => {
                    self.fail(key, code, reason);
                    if peer_closed && self.conns.contains(key) {
                        self.conns.mark_dirty(key);
                    }
                }
            }
        }
    }

    /// The drain's turn of an open connection: 1001 with when to come back. A cluster node's
    /// clients go to another node at once (spread over a second); a lone server's come back
    /// after the drain (`left_ms`), spread over its length, when the next process is up.
    pub(super) fn drain_conn(&mut self, key: usize, left_ms: u64, len_ms: u64) {
        if !self.conns[key].state.is_open() {
            return self.shutdown_conn(key);
        }
        let (what, wait) = if self.broker.is_some() {
            (
                "node shutting down; reconnect to another node",
                self.retry_jitter_ms(key, 0, 1000),
            )
        } else {
            let span = len_ms.max(1000);
            (
                "server shutting down",
                self.retry_jitter_ms(key, left_ms, span),
            )
        };
        let reason = super::admission::retry_reason(what, wait);
        self.start_close_with(key, code::GOING_AWAY, reason.into());
    }

    /// During shutdown: 1001 for open connections; answers already queued are written; the
    /// rest are dropped.
    pub(super) fn shutdown_conn(&mut self, key: usize) {
        match self.conns[key].state {
            ConnState::Open(_) if self.broker.is_some() => self.start_close(
                key,
                code::GOING_AWAY,
                "node shutting down; reconnect to another node",
            ),
            ConnState::Open(_) => self.start_close(key, code::GOING_AWAY, "server shutting down"),
            ConnState::Closing => {}
            // An answer already queued (`POST /api/drain`'s own, say) is still written, then
            // the connection closes as any answered one does.
            ConnState::Http(_) if self.conns[key].queued_bytes() > 0 => {
                self.conns.drain_after_response(key)
            }
            ConnState::Draining if self.conns[key].queued_bytes() > 0 => {}
            ConnState::Http(_) | ConnState::Draining => self.finish(key),
        }
    }
}
