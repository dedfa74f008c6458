//! The WebSocket JSON session of one connection, sans I/O: bytes and `now` in, [`Event`]s
//! out ([`next_event`]); its heartbeat schedule ([`heartbeat_check_ms`]). The router acts on
//! the events (routes messages, queues answers, arms deadlines); this module never sees
//! another connection, a clock or a socket.

mod read;

use std::borrow::Cow;

use bytes::Bytes;

pub use read::next_event;

use super::buffers::INLINE_MAX;
use super::{Conn, Flags};
use crate::ws::frame::{self, Data, OpCode};

/// What the connection's configuration allows it.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `--max-message-bytes`: a message (once reassembled and inflated) over it gets 1009.
    pub max_message_bytes: usize,
    /// Binary messages are taken (echo mode); otherwise 1003.
    pub binary: bool,
}

/// What the peer's bytes amount to, one at a time.
#[derive(Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// A whole text message, valid UTF-8. Borrowed from the read buffer when it came in
    /// one uncompressed frame (no copy), owned when reassembled or inflated.
    Text(Cow<'a, str>),
    /// A whole binary message (echo mode; refused with 1003 otherwise).
    Binary(Cow<'a, [u8]>),
    /// A ping while open: answer with a pong that carries this payload.
    Ping(&'a [u8]),
    /// The peer closes first: record `code`, queue `reply` (our close frame, which echoes
    /// its code and reason) and wait for it to be written.
    Close {
        /// The peer's close code (1005 when it gave none).
        code: u16,
        /// Our answering close frame.
        reply: Bytes,
    },
    /// The peer answered our close frame: the handshake is complete once ours is written.
    CloseAnswered,
    /// The peer broke the protocol or a limit: close with `code`. `peer_closed`: the
    /// offending frame was its close frame, so no other close frame will come (the
    /// connection ends once our answer is written).
    Violation {
        /// Close code to send.
        code: u16,
        /// Close reason to send and log.
        reason: &'static str,
        /// The offending frame was the peer's close.
        peer_closed: bool,
    },
}

/// Writes the header of a data frame of `payload` into `head`; returns its length.
#[inline]
pub fn frame_head(opcode: Data, payload: &[u8], head: &mut [u8; INLINE_MAX]) -> usize {
    let mut w = &mut head[..];
    frame::put_header(&mut w, OpCode::Data(opcode), payload.len());
    frame::header_len(payload.len())
}

/// An empty ping frame (FIN, opcode 0x9, no payload): two fixed bytes, no allocation.
pub const PING: [u8; 2] = [0x89, 0x00];

/// When an open connection should next be looked at (shard clock, ms): its ping time, or
/// its idle deadline once a ping is outstanding. `jitter_ms` spreads the pings of a burst
/// of connections that opened together.
pub fn heartbeat_check_ms<T>(
    c: &Conn<T>,
    now_ms: u64,
    ping_interval_ms: u64,
    idle_timeout_ms: u64,
    jitter_ms: u64,
) -> u64 {
    let last_seen = now_ms - c.silent_ms(now_ms);
    let idle_at = last_seen + idle_timeout_ms;
    if c.flags.has(Flags::PING_OUTSTANDING) {
        idle_at.min(now_ms + ping_interval_ms)
    } else {
        idle_at.min(last_seen + ping_interval_ms + jitter_ms)
    }
}

/// A fixed per-connection offset in [0, interval/4), from its slab key and generation.
pub fn jitter_ms(key: usize, generation: u32, ping_interval_ms: u64) -> u64 {
    let mut x = (key as u64) << 32 | generation as u64;
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x % (ping_interval_ms / 4 + 1)
}

#[cfg(test)]
mod tests;
