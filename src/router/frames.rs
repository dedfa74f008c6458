//! Bytes in: the read loop, then HTTP or WebSocket frames according to the connection's
//! state; frame validation (RFC 6455), message reassembly, and the close handshake.
//! Transitions follow `docs/lifecycle.md`.

use std::borrow::Cow;
use std::io;

use bytes::Bytes;
use tracing::debug;

use super::ops::Incoming;
use super::Router;
use crate::conn::buffers::{Fragment, Inbound};
use crate::conn::{ConnState, Flags, Transport};
use crate::metrics::ShardMetrics;
use crate::ws::close::{self as code};
use crate::ws::frame::{self, Control, Data, FrameHeader, OpCode};
use crate::ws::utf8;

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
            return self.defer_read(key);
        }
        if self.conns[key].input_waits() {
            return; // resumed once its outbox is written (`flush_conn`)
        }
        self.uncount_half_open(key);
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
                self.defer_read(key);
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
        let parked = self.pool.park(inb);
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

    /// Reading `key` continues from the read backlog on a later call (once).
    pub(super) fn defer_read(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if !c.flags.has(Flags::READ_BACKLOG) {
            c.flags.set(Flags::READ_BACKLOG);
            self.read_backlog.push((key, c.generation));
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
            if c.flags.has(Flags::SSE) {
                inb.start = inb.end; // an event stream has nothing to say
                return;
            }
            match c.state {
                ConnState::Http(_) => {
                    if !self.process_http(key, inb) {
                        return;
                    }
                }
                ConnState::Open(_) | ConnState::Closing => return self.process_frames(key, inb),
                ConnState::Draining => unreachable!("handled above"),
            }
        }
    }

    /// Parses and handles every complete frame in `inb`.
    pub(super) fn process_frames(&mut self, key: usize, inb: &mut Inbound) {
        loop {
            let Some(c) = self.conns.get(key) else {
                return;
            };
            if c.flags.has(Flags::DISCARD_INPUT) {
                inb.start = inb.end;
                return;
            }
            if c.state.is_open()
                && c.outbox
                    .as_ref()
                    .is_some_and(|o| o.bytes > self.cfg.max_outbound_bytes / 2)
            {
                // Its replies pile up faster than it reads them: its requests wait (TCP
                // pushes back) until they are written.
                self.conns[key].extra_mut().input_waits = true;
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
                inb.skip = total;
                if h.opcode == OpCode::Control(Control::Close) {
                    // A malformed close is still the peer's close.
                    self.reject_close(key, close_code, reason);
                    continue;
                }
                // Skip the offending frame and keep parsing for the peer's close frame.
                self.fail(key, close_code, reason);
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
            c.touch(now);
            c.flags.clear(Flags::PING_OUTSTANDING);
            self.on_frame(key, &h, s, e, inb);
        }
    }

    /// Rejects frames that break RFC 6455 or our limits before their payload is read.
    pub(super) fn check_header(
        &self,
        key: usize,
        h: &FrameHeader,
        frag: Option<&Fragment>,
    ) -> Result<(), (u16, &'static str)> {
        let p = code::PROTOCOL_ERROR;
        if h.rsv != 0 {
            // permessage-deflate: RSV1 marks a compressed message, on its first frame only.
            let first_data = matches!(h.opcode, OpCode::Data(Data::Text | Data::Binary));
            if !self.conns[key].flags.has(Flags::DEFLATE) {
                return Err((p, "reserved bits set without a negotiated extension"));
            }
            if h.rsv != 0b100 || !first_data {
                return Err((
                    p,
                    "reserved bits set (only RSV1, on a message's first frame)",
                ));
            }
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

    pub(super) fn on_frame(
        &mut self,
        key: usize,
        h: &FrameHeader,
        s: usize,
        e: usize,
        inb: &mut Inbound,
    ) {
        let state = self.conns[key].state;
        match h.opcode {
            OpCode::Control(Control::Ping) => {
                if state.is_open() {
                    let pong = frame::encode(OpCode::Control(Control::Pong), &inb.buf[s..e]);
                    self.push_raw(key, pong);
                }
            }
            OpCode::Control(Control::Pong) => {}
            OpCode::Control(Control::Close) => self.on_close_frame(key, &inb.buf[s..e]),
            OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
                unreachable!("rejected by check_header")
            }
            OpCode::Data(_) if !state.is_open() => {} // closing: data is discarded
            OpCode::Data(d @ (Data::Text | Data::Binary)) => {
                let text = d == Data::Text;
                let compressed = h.rsv != 0;
                if h.fin && compressed {
                    if let Some(data) = self.inflate_message(key, &inb.buf[s..e]) {
                        self.on_complete(key, text, &data);
                    }
                } else if h.fin {
                    // The one UTF-8 check of an unfragmented message.
                    self.on_complete(key, text, &inb.buf[s..e]);
                } else {
                    let mut f = Fragment {
                        text,
                        data: inb.buf[s..e].to_vec(),
                        utf8_valid: 0,
                        compressed,
                    };
                    if text && !compressed && !advance_utf8(&mut f) {
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
                if f.text && !f.compressed && !advance_utf8(f) {
                    return self.fail(
                        key,
                        code::INVALID_PAYLOAD,
                        "text message is not valid UTF-8",
                    );
                }
                if h.fin {
                    let f = inb.frag.take().expect("checked above");
                    if f.compressed {
                        if let Some(data) = self.inflate_message(key, &f.data) {
                            self.on_complete(key, f.text, &data);
                        }
                        return;
                    }
                    if f.text && f.utf8_valid != f.data.len() {
                        return self.fail(
                            key,
                            code::INVALID_PAYLOAD,
                            "text message ends inside a UTF-8 character",
                        );
                    }
                    self.on_complete(key, f.text, &f.data);
                }
            }
        }
    }

    /// A whole message: text is checked for UTF-8 here (once; SIMD), then handled.
    fn on_complete(&mut self, key: usize, text: bool, data: &[u8]) {
        if !text {
            return self.on_message(key, Incoming::Binary(data));
        }
        match simdutf8::basic::from_utf8(data) {
            Ok(t) => self.on_message(key, Incoming::Text(t)),
            Err(_) => self.fail(
                key,
                code::INVALID_PAYLOAD,
                "text message is not valid UTF-8",
            ),
        }
    }

    /// A compressed message inflated (bounded by `--max-message-bytes`: a deflate bomb
    /// gets 1009); `None` when the connection fails.
    fn inflate_message(&mut self, key: usize, data: &[u8]) -> Option<Vec<u8>> {
        use crate::ws::deflate::{self, InflateError};
        let max = self.cfg.max_message_bytes;
        let c = &mut self.conns[key];
        let inflated = if c.extra().is_some_and(|e| e.deflate_takeover) {
            let d = c.extra_mut().inflater.get_or_insert_with(deflate::inflater);
            deflate::inflate(d, data, max)
        } else {
            let d = self.inflater.get_or_insert_with(deflate::inflater);
            d.reset(false);
            deflate::inflate(d, data, max)
        };
        match inflated {
            // Checked for UTF-8 by `on_complete`.
            Ok(m) => Some(m),
            Err(InflateError::TooBig) => {
                self.fail(
                    key,
                    code::TOO_BIG,
                    "message over --max-message-bytes once inflated",
                );
                None
            }
            Err(InflateError::Corrupt) => {
                self.fail(key, code::INVALID_PAYLOAD, "invalid compressed data");
                None
            }
        }
    }

    pub(super) fn on_close_frame(&mut self, key: usize, payload: &[u8]) {
        let (close_code, reply) = match payload.len() {
            0 => (
                code::NO_STATUS,
                frame::encode(OpCode::Control(Control::Close), &[]),
            ),
            1 => {
                return self.reject_close(
                    key,
                    code::PROTOCOL_ERROR,
                    "close frame with a 1-byte payload",
                )
            }
            _ => {
                let c = u16::from_be_bytes([payload[0], payload[1]]);
                if !code::is_valid_received(c) {
                    return self.reject_close(key, code::PROTOCOL_ERROR, "invalid close code");
                }
                let Ok(reason) = std::str::from_utf8(&payload[2..]) else {
                    return self.reject_close(
                        key,
                        code::INVALID_PAYLOAD,
                        "close reason is not valid UTF-8",
                    );
                };
                // The answer echoes the peer's code and reason (ours when it gave none).
                let reason = if reason.is_empty() {
                    "closed by the client"
                } else {
                    reason
                };
                (c, frame::encode_close(c, reason))
            }
        };
        let c = &mut self.conns[key];
        c.flags.set(Flags::CLOSE_RECEIVED | Flags::DISCARD_INPUT);
        if c.flags.has(Flags::CLOSE_SENT) {
            // The peer answered our close: the handshake is complete.
            self.mark_dirty(key);
            return;
        }
        c.set_close(close_code, "closed by peer".into());
        self.begin_closing(key, reply);
    }

    /// An invalid close frame is still the peer's close: answered with `close_code`, it
    /// completes the closing handshake, and the TCP connection closes once the answer is
    /// written (RFC 6455 §5.5.1, §7.1.1) rather than after a close frame that never comes.
    fn reject_close(&mut self, key: usize, close_code: u16, reason: &'static str) {
        self.fail(key, close_code, reason);
        if let Some(c) = self.conns.get_mut(key) {
            c.flags.set(Flags::CLOSE_RECEIVED | Flags::DISCARD_INPUT);
            self.mark_dirty(key);
        }
    }

    /// A protocol violation: close with `close_code`. A second violation while closing
    /// stops parsing input altogether.
    pub(super) fn fail(&mut self, key: usize, close_code: u16, reason: &'static str) {
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
        reason: Cow<'static, str>,
    ) {
        let c = &mut self.conns[key];
        if c.flags.has(Flags::CLOSE_SENT) {
            return;
        }
        if c.flags.has(Flags::SSE) {
            // An event stream has no close frame: end it after what is queued.
            c.flags.set(Flags::CLOSE_SENT);
            c.set_close(close_code, reason);
            self.unregister(key);
            return self.drain_after_response(key);
        }
        let f = frame::encode_close(close_code, &reason);
        c.set_close(close_code, reason);
        self.begin_closing(key, f);
    }

    pub(super) fn begin_closing(&mut self, key: usize, close_frame: Bytes) {
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
                self.drain_after_response(key)
            }
            ConnState::Draining if self.conns[key].queued_bytes() > 0 => {}
            ConnState::Http(_) | ConnState::Draining => self.finish(key),
        }
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
