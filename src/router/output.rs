//! Bytes out: events framed for the connection's transport (a WebSocket header or SSE
//! framing around a payload shared by every recipient), the outbound limit and its
//! slow-consumer close, and the end-of-turn flush with the transitions that wait for it.

use bytes::Bytes;
use tracing::debug;

use super::Router;
use crate::conn::buffers::{Outbox, Piece, INLINE_MAX, SMALL_UNIT_MAX};
use crate::conn::Protocol;
use crate::conn::{flush, ConnState, Flags, Flushed, Transport};
use crate::metrics::ShardMetrics;
use crate::ws::close::{self as code};
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

impl<T: Transport> Router<T> {
    /// Queues a reply (ack, error, pong) to the requesting connection.
    pub(super) fn deliver_reply(&mut self, key: usize, payload: Bytes) {
        self.deliver(key, &payload);
    }

    /// Queues an event (a JSON payload, shared with every other recipient) for an open
    /// connection, framed for its transport, enforcing `--max-outbound-bytes`. True when
    /// queued.
    pub(super) fn deliver(&mut self, key: usize, payload: &Bytes) -> bool {
        self.deliver_data(key, Data::Text, Out::Shared(payload.clone()))
    }

    /// [`deliver`](Self::deliver) for any data opcode (echo mode answers binary too).
    /// A WebSocket gets a frame header then the payload; an event stream gets
    /// `id: N\ndata: ` + payload + a blank line (event payloads never hold a newline).
    pub(super) fn deliver_data(&mut self, key: usize, opcode: Data, payload: Out<'_>) -> bool {
        let Some(c) = self.conns.get_mut(key) else {
            return false;
        };
        if !c.state.is_welcomed() {
            // Not open, or not welcomed yet: the client must see `welcome` (an event stream,
            // its response head) first, and a connection is reachable from then on (a DM for
            // another device of the user may pass by).
            return false;
        }
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
        let c = &mut self.conns[key];
        let mut head = [0u8; INLINE_MAX];
        let (head_len, trailer) = Protocol::event_head(c, opcode, bytes, &mut head);
        if compressed {
            head[0] |= 0x40; // RSV1
        }
        let unit = head_len + bytes.len() + trailer.len();
        // One unit larger than the limit still goes to an otherwise empty queue.
        let max = self.cfg.max_outbound_bytes;
        let c = &mut self.conns[key];
        if c.queued_bytes() > 0 && c.queued_bytes() + unit > max {
            // Units queued this turn may just not be flushed yet: try the socket first.
            if c.flags.has(Flags::WRITABLE) {
                self.write_now(key);
            }
            let c = &mut self.conns[key];
            if !c.state.is_open() {
                return false;
            }
            if c.queued_bytes() > 0 && c.queued_bytes() + unit > max {
                self.slow_consumer(key);
                return false;
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
        true
    }

    /// Queues one framed unit: head, shared payload, trailer (an SSE event's blank line).
    fn queue_framed(&mut self, key: usize, head: &[u8], payload: Bytes, trailer: &'static [u8]) {
        let out = self.outbox(key);
        out.push_piece(Piece::inline(head), true);
        out.push_piece(Piece::Shared(payload), false);
        if !trailer.is_empty() {
            out.push_piece(Piece::Shared(Bytes::from_static(trailer)), false);
        }
        self.mark_dirty(key);
    }

    pub(super) fn slow_consumer(&mut self, key: usize) {
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

    /// The connection's outbox, borrowed from the pool when it has none.
    pub(super) fn outbox(&mut self, key: usize) -> &mut Outbox {
        let c = &mut self.conns[key];
        c.outbox.get_or_insert_with(|| self.pool.outbox())
    }

    /// Queues an event without limits (the welcome, answers to ops, replayed pages, which
    /// ask for more only once flushed): a text frame on a WebSocket, an SSE event on a stream.
    pub(super) fn push_event(&mut self, key: usize, payload: Bytes) {
        let mut head = [0u8; INLINE_MAX];
        let c = &mut self.conns[key];
        let (hl, trailer) = Protocol::event_head(c, Data::Text, &payload, &mut head);
        self.queue_framed(key, &head[..hl], payload, trailer);
    }

    /// Queues bytes without limits (responses, control frames) and marks the connection dirty.
    pub(super) fn push_raw(&mut self, key: usize, bytes: Bytes) {
        self.outbox(key).push(bytes);
        self.mark_dirty(key);
    }

    pub(super) fn mark_dirty(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if !c.flags.has(Flags::DIRTY) {
            c.flags.set(Flags::DIRTY);
            self.dirty.push((key, c.generation));
        }
    }

    /// Writes queued output now (no close handling; used to relieve a burst).
    pub(super) fn write_now(&mut self, key: usize) {
        let c = &mut self.conns[key];
        let Some(out) = c.outbox.as_mut() else {
            return;
        };
        match flush(&mut c.io, out) {
            Ok((done, n)) => {
                if done == Flushed::Blocked {
                    c.flags.clear(Flags::WRITABLE);
                }
                ShardMetrics::add(&self.metrics[self.index as usize].bytes_out, n as u64);
            }
            Err(_) => c.flags.clear(Flags::WRITABLE),
        }
    }

    /// Writes queued output now and gives a drained outbox back to the pool; errors and the
    /// transitions that wait for a flush are left to the end-of-turn flush (the connection
    /// stays in the dirty list).
    pub(super) fn write_early(&mut self, key: usize) {
        self.write_now(key);
        let c = &mut self.conns[key];
        if c.outbox.as_ref().is_some_and(|o| o.bytes == 0) {
            let out = c.outbox.take().expect("checked above");
            self.pool.put_outbox(out);
        }
    }

    /// End-of-turn flush of one connection, and the transitions that wait for a flush.
    pub(super) fn flush_conn(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if let Some(out) = c.outbox.as_mut() {
            match flush(&mut c.io, out) {
                Ok((Flushed::All, n)) => {
                    ShardMetrics::add(&self.metrics[self.index as usize].bytes_out, n as u64);
                    let out = c.outbox.take().expect("checked above");
                    self.pool.put_outbox(out);
                    if c.page_wanted() {
                        self.request_page(key);
                    }
                    let c = &mut self.conns[key];
                    if c.input_waits() {
                        // Its replies are out: read and parse its requests again.
                        c.extra_mut().input_waits = false;
                        self.defer_read(key);
                    }
                }
                Ok((Flushed::Blocked, n)) => {
                    ShardMetrics::add(&self.metrics[self.index as usize].bytes_out, n as u64);
                    c.flags.clear(Flags::WRITABLE);
                    return;
                }
                Err(e) => {
                    debug!(shard = self.index, conn = key, error = %e, "write failed");
                    if c.close_code() == 0 && !c.state.is_http() && c.state != ConnState::Draining {
                        c.set_close(code::ABNORMAL, "write failed".into());
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
                c.io.shutdown_write();
            }
            _ => {}
        }
    }
}
