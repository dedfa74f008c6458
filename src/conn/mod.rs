//! A connection as the shard's slab holds it: socket, lifecycle state, liveness and the
//! buffers it borrows from the shard's pool while a frame is in flight (see `docs/lifecycle.md`).

pub mod buffers;

use std::io::{self, IoSlice, Write};
use std::sync::Arc;

use mio::net::TcpStream;

use crate::timer::TimerKey;
pub use buffers::{BufPool, Fragment, Inbound, Outbox};

/// Lifecycle of a connection. Transitions are made by the shard's session code only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Reading HTTP/1.1 requests; the handshake deadline is armed.
    Http,
    /// WebSocket open; heartbeat deadlines are armed.
    Open,
    /// A close frame was sent or received; waiting for the other side's close frame, the
    /// flush of ours, or the close deadline.
    Closing,
    /// An HTTP response that ends the connection was sent; after the flush the write side is
    /// shut and input is discarded until EOF or the close deadline, so the peer reads it.
    Draining,
}

/// Per-connection flags, packed in one byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flags(u16);

impl Flags {
    /// The socket accepted our last write completely (edge-triggered readiness we track).
    pub const WRITABLE: u16 = 1;
    /// Listed in the shard's dirty list for the end-of-turn flush.
    pub const DIRTY: u16 = 1 << 1;
    /// A ping was sent and nothing has arrived since.
    pub const PING_OUTSTANDING: u16 = 1 << 2;
    /// Our close frame is queued or sent.
    pub const CLOSE_SENT: u16 = 1 << 3;
    /// The peer's close frame arrived.
    pub const CLOSE_RECEIVED: u16 = 1 << 4;
    /// Listed in the shard's read backlog (read cap hit with data left in the socket).
    pub const READ_BACKLOG: u16 = 1 << 5;
    /// Counted against `--max-connections`.
    pub const COUNTED: u16 = 1 << 6;
    /// Upgraded to WebSocket (counted and logged as such when it ends).
    pub const WEBSOCKET: u16 = 1 << 10;
    /// Input stays unparsed: waiting for the home shard to record the user (welcome), or for
    /// the shards to answer an API request.
    pub const HOLD_INPUT: u16 = 1 << 11;
    /// A Server-Sent Events stream (open, receives events, sends nothing).
    pub const SSE: u16 = 1 << 12;
    /// Registered in the hub (user and channels).
    pub const REGISTERED: u16 = 1 << 7;
    /// Input is discarded unparsed (after a protocol error).
    pub const DISCARD_INPUT: u16 = 1 << 8;
    /// Our write side is shut (FIN sent).
    pub const FIN_SENT: u16 = 1 << 9;

    /// Whether `f` is set.
    #[inline]
    pub fn has(self, f: u16) -> bool {
        self.0 & f != 0
    }
    /// Sets `f`.
    #[inline]
    pub fn set(&mut self, f: u16) {
        self.0 |= f;
    }
    /// Clears `f`.
    #[inline]
    pub fn clear(&mut self, f: u16) {
        self.0 &= !f;
    }
}

/// One connection. Kept small: an idle open WebSocket holds no buffers.
#[derive(Debug)]
pub struct Conn {
    /// The socket (in this shard's fd table only).
    pub stream: TcpStream,
    /// Distinguishes reuses of the same slab slot.
    pub generation: u32,
    /// Lifecycle state.
    pub state: ConnState,
    /// Flags.
    pub flags: Flags,
    /// Close code sent or received, for the close log line (the reason lives in the shard's
    /// side table while the connection closes).
    pub close_code: u16,
    /// The one wheel entry this connection holds ([`TimerKey::NONE`] when none).
    pub timer: TimerKey,
    /// Shard clock (ms, wrapping u32) of the last inbound frame: a liveness reset is this
    /// field write. Compare with `wrapping_sub`; silences never approach 49 days.
    pub last_seen_ms: u32,
    /// Identified user once upgraded; `None` for anonymous connections (not in the hub).
    pub user: Option<Arc<str>>,
    /// Shard clock (ms) when accepted.
    pub opened_ms: u64,
    /// Read state while bytes of an unfinished frame or request are held.
    pub inbound: Option<Box<Inbound>>,
    /// Frames waiting for the socket.
    pub outbox: Option<Box<Outbox>>,
    /// Channels this connection is subscribed to (boxed: most connections have none).
    pub channels: Option<Box<Vec<Arc<str>>>>,
}

impl Conn {
    /// A freshly accepted connection.
    pub fn new(stream: TcpStream, generation: u32, now_ms: u64) -> Self {
        Conn {
            stream,
            generation,
            state: ConnState::Http,
            flags: Flags::default(),
            close_code: 0,
            timer: TimerKey::NONE,
            last_seen_ms: now_ms as u32,
            user: None,
            opened_ms: now_ms,
            inbound: None,
            outbox: None,
            channels: None,
        }
    }

    /// Milliseconds since the last inbound frame.
    pub fn silent_ms(&self, now_ms: u64) -> u64 {
        (now_ms as u32).wrapping_sub(self.last_seen_ms) as u64
    }

    /// Channels subscribed to.
    pub fn channel_list(&self) -> &[Arc<str>] {
        self.channels.as_deref().map_or(&[], |v| v.as_slice())
    }

    /// Bytes queued for this connection.
    pub fn queued_bytes(&self) -> usize {
        self.outbox.as_ref().map_or(0, |o| o.bytes)
    }
}

/// What a flush achieved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flushed {
    /// Everything queued is in the kernel.
    All,
    /// The socket would block; wait for a writable event.
    Blocked,
}

/// Most buffers handed to one `writev`.
const MAX_IOVECS: usize = 64;

/// Writes as much of `out` as the socket takes, with vectored writes.
pub fn flush<W: Write>(stream: &mut W, out: &mut Outbox) -> io::Result<(Flushed, usize)> {
    let mut written = 0usize;
    while !out.queue.is_empty() {
        let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for b in out.queue.iter().take(MAX_IOVECS) {
            slices[n] = IoSlice::new(b);
            n += 1;
        }
        match stream.write_vectored(&slices[..n]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(k) => {
                written += k;
                out.consume(k);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                return Ok((Flushed::Blocked, written))
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((Flushed::All, written))
}

#[cfg(test)]
mod size_tests {
    /// Idle connections cost their slab entry: keep it small (see docs/capacity.md).
    #[test]
    fn conn_stays_small() {
        // mio's stream carries an 8-byte selector id in debug builds only (plus padding).
        let limit = if cfg!(debug_assertions) { 88 } else { 72 };
        let size = std::mem::size_of::<super::Conn>();
        assert!(size <= limit, "Conn is {size} bytes");
    }
}
