//! Read and write buffers that a connection borrows from its shard's pool only while a
//! frame or request is in flight, so idle connections hold none.

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};

use crate::ws::frame::{self, OpCode};

/// Size of a pooled read buffer: one read syscall fills at most this much.
pub const READ_CHUNK: usize = 64 * 1024;
/// Leftover bytes up to this size are kept in a small buffer instead of a pooled one.
pub const SMALL_LEFTOVER: usize = 512;
/// Pooled buffers kept per shard; beyond that they are freed.
const POOL_MAX: usize = 256;

/// Bytes read from the socket and not yet consumed, plus a message being reassembled.
#[derive(Debug, Default)]
pub struct Inbound {
    /// Initialized storage; bytes `start..end` are unconsumed.
    pub buf: Vec<u8>,
    /// First unconsumed byte.
    pub start: usize,
    /// End of read data.
    pub end: usize,
    /// A fragmented message being reassembled.
    pub frag: Option<Fragment>,
    /// Bytes still to skip unread (the rest of a rejected or ignored frame).
    pub skip: u64,
}

impl Inbound {
    /// Unconsumed bytes.
    pub fn pending(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Whether nothing is held.
    pub fn is_idle(&self) -> bool {
        self.start == self.end && self.frag.is_none() && self.skip == 0
    }

    /// Moves unconsumed bytes to the front.
    pub fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// Makes room for at least `total` bytes from `start` (a frame of known size).
    pub fn reserve_total(&mut self, total: usize) {
        self.compact();
        if self.buf.len() < total {
            self.buf.resize(total, 0);
        }
    }
}

/// A fragmented data message being reassembled.
#[derive(Debug, Default)]
pub struct Fragment {
    /// Text (true) or binary.
    pub text: bool,
    /// Payload so far.
    pub data: Vec<u8>,
    /// Bytes of `data` known to be complete UTF-8.
    pub utf8_valid: usize,
    /// permessage-deflate: `data` is compressed (checked once inflated).
    pub compressed: bool,
}

/// Most bytes an inline chunk holds: a WebSocket header (10) or an SSE `id: N\ndata: ` prefix.
pub const INLINE_MAX: usize = 38;

/// One piece of output: a small per-recipient part (a frame header, an SSE prefix) kept
/// inline, or bytes shared with other recipients (a payload serialized once).
#[derive(Debug, Clone)]
pub enum Piece {
    /// Bytes `start..end` of `buf`.
    Inline {
        /// Storage.
        buf: [u8; INLINE_MAX],
        /// First unwritten byte.
        start: u8,
        /// End of data.
        end: u8,
    },
    /// A shared buffer (advanced as it is written).
    Shared(Bytes),
}

impl Piece {
    /// A copy of `b` (at most [`INLINE_MAX`] bytes) kept inline.
    pub fn inline(b: &[u8]) -> Piece {
        debug_assert!(b.len() <= INLINE_MAX);
        let mut buf = [0u8; INLINE_MAX];
        buf[..b.len()].copy_from_slice(b);
        Piece::Inline {
            buf,
            start: 0,
            end: b.len() as u8,
        }
    }

    /// The unwritten bytes.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Piece::Inline { buf, start, end } => &buf[*start as usize..*end as usize],
            Piece::Shared(b) => b,
        }
    }

    /// Unwritten length.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// Whether nothing is left.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn advance(&mut self, n: usize) {
        match self {
            Piece::Inline { start, .. } => *start += n as u8,
            Piece::Shared(b) => b.advance(n),
        }
    }
}

/// A piece plus whether it starts a unit (a frame, an event, a response): units are never
/// cut in the middle when unsent output is dropped.
#[derive(Debug, Clone)]
pub struct Chunk {
    /// The bytes.
    pub piece: Piece,
    /// First piece of its unit.
    pub first: bool,
}

/// Largest unit copied into an outbox's own buffer ([`Outbox::push_copied`]).
pub const SMALL_UNIT_MAX: usize = 1024;
/// An outbox keeps an own buffer up to this capacity when it goes back to the pool.
const SMALL_KEEP: usize = 64 * 1024;

/// Output waiting for the socket. Payloads are shared (`Bytes`) with the other recipients of
/// a fan-out; headers are per connection.
#[derive(Debug, Default)]
pub struct Outbox {
    /// The connection's own contiguous buffer: small units for it alone are appended here.
    /// While they are the last thing queued they stay unsealed and go out as one slice, many
    /// units to one iovec; a shared piece queued after them seals them into a `Bytes` first.
    /// Once written the space is reused in place, so a steady stream allocates nothing.
    pub small: BytesMut,
    /// Pieces in order; the head may be partly written.
    pub queue: VecDeque<Chunk>,
    /// Bytes queued.
    pub bytes: usize,
    /// The head piece is partly written (its unit must be finished before anything else).
    pub head_partial: bool,
}

impl Outbox {
    /// Appends a whole unit held in one buffer (a response, a control frame).
    pub fn push(&mut self, unit: Bytes) {
        self.push_piece(Piece::Shared(unit), true);
    }

    /// Appends a unit of this connection's own (`head` + `payload`, at most
    /// [`SMALL_UNIT_MAX`]) copied into its buffer, after the queue.
    pub fn push_copied(&mut self, head: &[u8], payload: &[u8]) {
        let n = head.len() + payload.len();
        if n == 0 {
            return;
        }
        if self.small.capacity() - self.small.len() < n {
            // Reclaims the buffer in place when no sealed slice holds it any more.
            self.small.reserve(n.max(1024));
        }
        self.small.extend_from_slice(head);
        self.small.extend_from_slice(payload);
        self.bytes += n;
    }

    /// One WebSocket frame of `payload` (a unit of at most [`SMALL_UNIT_MAX`]), its header
    /// written straight into the buffer (no copy of it through the stack, no call to copy
    /// two bytes).
    #[inline]
    pub fn push_frame(&mut self, opcode: OpCode, payload: &[u8]) {
        let len = payload.len();
        let head_len = frame::header_len(len);
        let n = head_len + len;
        // Room for the longest header too: it is written whole, as two fixed-size stores.
        if self.small.capacity() - self.small.len() < n + frame::MAX_HEADER_LEN {
            self.small.reserve((n + frame::MAX_HEADER_LEN).max(1024));
        }
        let head = frame::server_header(opcode, len);
        let spare = self.small.spare_capacity_mut();
        // SAFETY: `spare` holds at least `n + MAX_HEADER_LEN` bytes (reserved above); the
        // header's first `head_len` bytes and then `len` payload bytes are written before
        // `set_len` counts them.
        unsafe {
            let dst = spare.as_mut_ptr().cast::<u8>();
            std::ptr::copy_nonoverlapping(head.as_ptr(), dst, frame::MAX_HEADER_LEN);
            std::ptr::copy_nonoverlapping(payload.as_ptr(), dst.add(head_len), len);
            self.small.set_len(self.small.len() + n);
        }
        self.bytes += n;
    }

    /// The unsealed units (written after every queued piece).
    pub fn tail(&self) -> &[u8] {
        &self.small
    }

    /// Seals the unsealed units into one queued piece (something else goes after them).
    fn seal(&mut self) {
        if !self.small.is_empty() {
            let units = self.small.split().freeze();
            // A partly written tail is the head of the stream (the queue is empty): it then
            // starts mid-unit.
            let first = !(self.queue.is_empty() && self.head_partial);
            self.queue.push_back(Chunk {
                piece: Piece::Shared(units),
                first,
            });
        }
    }

    /// Appends one piece; `first` when it starts a new unit. Empty pieces (the payload of
    /// an empty message) are not queued: a queue never holds a piece with nothing to write.
    pub fn push_piece(&mut self, piece: Piece, first: bool) {
        if piece.is_empty() {
            return;
        }
        self.seal();
        self.bytes += piece.len();
        self.queue.push_back(Chunk { piece, first });
    }

    /// Drops `n` written bytes from the front.
    pub fn consume(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some(head) = self.queue.front_mut() else {
                assert!(n <= self.small.len(), "consumed more than queued");
                self.small.advance(n);
                self.head_partial = !self.small.is_empty();
                return;
            };
            let len = head.piece.len();
            if n >= len {
                n -= len;
                self.queue.pop_front();
                self.head_partial = false;
            } else {
                head.piece.advance(n);
                self.head_partial = true;
                n = 0;
            }
        }
    }

    /// Drops every unit not yet started (slow-consumer policy); the unit being written is
    /// kept whole so the stream stays well framed. Unsealed units count as one: kept whole
    /// when writing has begun in them, else dropped.
    pub fn truncate_unstarted(&mut self) {
        if !self.small.is_empty() {
            if self.queue.is_empty() && self.head_partial {
                return;
            }
            self.bytes -= self.small.len();
            self.small.clear();
        }
        let started = self.head_partial || self.queue.front().is_some_and(|c| !c.first);
        let mut keep = 0;
        if started {
            keep = 1;
            while keep < self.queue.len() && !self.queue[keep].first {
                keep += 1;
            }
        }
        while self.queue.len() > keep {
            if let Some(c) = self.queue.pop_back() {
                self.bytes -= c.piece.len();
            }
        }
    }

    /// Checks the byte count against the queue (debug builds and tests).
    pub fn check_invariants(&self) {
        let sum: usize = self.queue.iter().map(|c| c.piece.len()).sum::<usize>() + self.small.len();
        assert_eq!(sum, self.bytes, "outbox byte count");
        assert!(
            self.queue.iter().all(|c| !c.piece.is_empty()),
            "an empty piece in the outbox"
        );
    }
}

/// A shard's pool of read buffers and outboxes. Boxed so handing one to a connection moves
/// a pointer, and an idle connection's `Option<Box<_>>` costs 8 bytes.
#[allow(clippy::vec_box)]
#[derive(Debug, Default)]
pub struct BufPool {
    inbound: Vec<Box<Inbound>>,
    outboxes: Vec<Box<Outbox>>,
}

impl BufPool {
    /// A read state with a full-size buffer.
    pub fn inbound(&mut self) -> Box<Inbound> {
        self.inbound.pop().unwrap_or_else(|| {
            Box::new(Inbound {
                buf: vec![0; READ_CHUNK],
                ..Inbound::default()
            })
        })
    }

    /// Returns a read state; only idle, standard-size ones are kept.
    pub fn put_inbound(&mut self, mut b: Box<Inbound>) {
        if self.inbound.len() < POOL_MAX && b.buf.len() == READ_CHUNK {
            b.start = 0;
            b.end = 0;
            b.skip = 0;
            b.frag = None;
            self.inbound.push(b);
        }
    }

    /// Readies a held read state for reading: small leftovers move into a full-size buffer.
    pub fn prepare(&mut self, held: Option<Box<Inbound>>) -> Box<Inbound> {
        match held {
            None => self.inbound(),
            Some(mut h) if h.buf.len() < READ_CHUNK => {
                let mut full = self.inbound();
                let n = h.end - h.start;
                full.buf[..n].copy_from_slice(&h.buf[h.start..h.end]);
                full.end = n;
                full.frag = h.frag.take();
                full.skip = h.skip;
                full
            }
            Some(h) => h,
        }
    }

    /// Parks a read state on its connection after a read: `None` when nothing is held
    /// (the buffer goes back to the pool), a small copy when only a few bytes are left.
    pub fn park(&mut self, mut b: Box<Inbound>) -> Option<Box<Inbound>> {
        if b.is_idle() {
            self.put_inbound(b);
            return None;
        }
        let n = b.end - b.start;
        if n <= SMALL_LEFTOVER && b.buf.len() >= READ_CHUNK {
            let small = Box::new(Inbound {
                buf: b.buf[b.start..b.end].to_vec(),
                start: 0,
                end: n,
                frag: b.frag.take(),
                skip: b.skip,
            });
            self.put_inbound(b);
            return Some(small);
        }
        b.compact();
        Some(b)
    }

    /// An empty outbox.
    pub fn outbox(&mut self) -> Box<Outbox> {
        self.outboxes.pop().unwrap_or_default()
    }

    /// Returns a drained outbox.
    pub fn put_outbox(&mut self, mut o: Box<Outbox>) {
        if self.outboxes.len() < POOL_MAX && o.queue.capacity() <= 64 {
            o.queue.clear();
            o.bytes = 0;
            o.head_partial = false;
            if o.small.capacity() > SMALL_KEEP {
                o.small = BytesMut::new();
            }
            o.small.clear();
            self.outboxes.push(o);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_frame_writes_what_frame_encode_does_at_every_header_size() {
        let mut o = Outbox::default();
        let mut want = Vec::new();
        for len in [0, 1, 31, 125, 126, 1000, 65535, 65536] {
            let payload = vec![b'p'; len];
            o.push_frame(OpCode::Data(frame::Data::Text), &payload);
            want.extend_from_slice(&frame::encode(OpCode::Data(frame::Data::Text), &payload));
        }
        assert_eq!((o.tail(), o.bytes), (&want[..], want.len()));
    }

    #[test]
    fn own_units_go_out_as_one_slice_and_seal_before_a_shared_piece() {
        let mut o = Outbox::default();
        o.push_copied(b"\x81\x02", b"ab");
        o.push_copied(b"\x81\x01", b"c");
        assert_eq!(
            (o.queue.len(), o.tail(), o.bytes),
            (0, &b"\x81\x02ab\x81\x01c"[..], 7)
        );
        o.consume(3);
        assert!(o.head_partial);
        // Writing began in the unsealed units: the slow-consumer cut keeps them whole.
        o.truncate_unstarted();
        assert_eq!(o.tail(), b"b\x81\x01c");
        // A shared piece after them seals them first, in order.
        o.push(Bytes::from_static(b"zz"));
        assert_eq!(o.queue.len(), 2);
        assert_eq!(o.queue[0].piece.as_slice(), b"b\x81\x01c");
        assert!(!o.queue[0].first, "it starts mid-unit");
        o.check_invariants();
        o.consume(6);
        assert_eq!((o.bytes, o.queue.len(), o.tail()), (0, 0, &b""[..]));
        // Unstarted unsealed units are dropped by the cut.
        o.push(Bytes::from_static(b"head"));
        o.consume(1);
        o.push_copied(b"\x81\x01", b"x");
        o.truncate_unstarted();
        assert_eq!((o.bytes, o.tail()), (3, &b""[..]));
        o.check_invariants();
    }

    #[test]
    fn outbox_consume_and_truncate() {
        let mut o = Outbox::default();
        o.push(Bytes::from_static(b"hello"));
        o.push(Bytes::from_static(b"world"));
        o.push(Bytes::from_static(b"!"));
        o.consume(7);
        assert_eq!((o.bytes, o.head_partial), (4, true));
        assert_eq!(o.queue[0].piece.as_slice(), b"rld");
        o.truncate_unstarted();
        assert_eq!((o.bytes, o.queue.len()), (3, 1));
        o.consume(3);
        assert!(o.queue.is_empty() && !o.head_partial);
        o.check_invariants();
    }

    #[test]
    fn truncation_keeps_a_started_unit_whole() {
        let mut o = Outbox::default();
        o.push_piece(Piece::inline(&[0x81, 3]), true);
        o.push_piece(Piece::Shared(Bytes::from_static(b"abc")), false);
        o.push_piece(Piece::inline(&[0x81, 2]), true);
        o.push_piece(Piece::Shared(Bytes::from_static(b"de")), false);
        // The header is written, the payload not yet: the payload must stay.
        o.consume(2);
        assert!(!o.head_partial);
        o.truncate_unstarted();
        assert_eq!(o.queue.len(), 1);
        assert_eq!(o.queue[0].piece.as_slice(), b"abc");
        o.check_invariants();
        // Nothing started: everything goes.
        let mut o = Outbox::default();
        o.push_piece(Piece::inline(b"h"), true);
        o.push_piece(Piece::Shared(Bytes::from_static(b"p")), false);
        o.truncate_unstarted();
        assert!(o.queue.is_empty() && o.bytes == 0);
        // An empty payload (an empty message) queues only its header.
        o.push_piece(Piece::inline(&[0x81, 0]), true);
        o.push_piece(Piece::Shared(Bytes::new()), false);
        assert_eq!((o.queue.len(), o.bytes), (1, 2));
        o.consume(2);
        assert!(o.queue.is_empty());
        o.check_invariants();
    }

    #[test]
    fn park_keeps_small_leftovers_small() {
        let mut pool = BufPool::default();
        let mut b = pool.inbound();
        b.buf[..3].copy_from_slice(b"abc");
        b.end = 3;
        b.start = 1;
        let parked = pool.park(b).unwrap();
        assert_eq!(parked.pending(), b"bc");
        assert!(parked.buf.len() < READ_CHUNK);
        let again = pool.prepare(Some(parked));
        assert_eq!(again.pending(), b"bc");
        assert_eq!(again.buf.len(), READ_CHUNK);
        let idle = pool.inbound();
        assert!(pool.park(idle).is_none());
    }
}
