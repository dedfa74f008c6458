//! One connection's whole state: its byte pipe (behind [`Transport`]), lifecycle state,
//! liveness, identity, the buffers it borrows from the shard's pool while data is in flight,
//! and the rarely used rest in one boxed [`Extra`] (see `docs/lifecycle.md`).

use std::borrow::Cow;
use std::io::{self, IoSlice};
use std::sync::Arc;

pub mod buffers;
pub mod cursor;
pub mod sse;
pub mod ws;

use crate::auth::Grant;
use buffers::{Inbound, Outbox};

/// The byte pipe of one connection, as the session layer sees it. The shard implements it on
/// `mio::net::TcpStream`; the simulation and the fuzzer on in-memory pipes. Calls never block:
/// a pipe with nothing to give or no room answers `WouldBlock`.
pub trait Transport {
    /// Reads into `buf`; `Ok(0)` is end of stream.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;
    /// Writes from `bufs` in order; returns how many bytes were taken.
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize>;
    /// Shuts the write side (FIN) after the last response of a draining connection.
    fn shutdown_write(&mut self);
    /// The socket is writable again: bytes the pipe holds below the session (TLS records
    /// of a handshake, say) go out now.
    fn flush_pending(&mut self) {}
    /// The connection is about to be dropped: a last word below the session (TLS
    /// close_notify), best effort.
    fn before_close(&mut self) {}
    /// The connection is about to be dropped with output it could not write (a peer that
    /// stopped reading): cut it with a TCP reset, which tells the peer at once and frees the
    /// kernel's send buffer, instead of a FIN queued behind data nobody will read.
    fn reset(&mut self) {}
    /// Bytes the pipe holds that the session has not seen yet (part of a TLS record, or a
    /// TLS handshake in progress): they count as a half-open request.
    fn holds_input(&self) -> bool {
        false
    }
    /// Whether an HTTP answer written now reaches the peer (not during a TLS handshake).
    fn can_answer(&self) -> bool {
        true
    }
}

/// Lifecycle of a connection, with what it waits for when it waits (`docs/lifecycle.md`).
/// Transitions are made by the router only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Reading HTTP/1.1 requests; the handshake deadline is armed.
    Http(HttpWait),
    /// WebSocket or event stream open; heartbeat deadlines are armed.
    Open(Welcome),
    /// A close frame was sent or received; waiting for the other side's close frame, the
    /// flush of ours, or the close deadline.
    Closing,
    /// An HTTP response that ends the connection was sent; after the flush the write side is
    /// shut and input is discarded until EOF or the close deadline, so the peer reads it.
    Draining,
}

/// What an HTTP connection waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpWait {
    /// Nothing: requests are read as they come.
    Reading,
    /// An API request waits for its answer from other shards, other nodes or the store;
    /// requests pipelined behind it stay unread (responses go out in order).
    Answer,
}

/// Where an open connection stands with its welcome (an event stream's: its response head).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Welcome {
    /// Sent: the connection receives deliveries and its input is read.
    Sent,
    /// The user's home shard (in a cluster, the broker too) records the connection first,
    /// so a client that has its welcome is reachable by every DM sent after it.
    Registration,
    /// The store places the inbox first (the position the welcome carries, the first replay
    /// page).
    Inbox,
}

impl ConnState {
    /// A connection that has just been accepted.
    pub const NEW: ConnState = ConnState::Http(HttpWait::Reading);
    /// A connection that has just upgraded (its registration decides whether it waits).
    pub const UPGRADED: ConnState = ConnState::Open(Welcome::Sent);

    /// Reading or answering HTTP requests.
    pub fn is_http(self) -> bool {
        matches!(self, ConnState::Http(_))
    }

    /// WebSocket or event stream open, welcomed or not.
    pub fn is_open(self) -> bool {
        matches!(self, ConnState::Open(_))
    }

    /// Open and welcomed: deliveries reach it.
    pub fn is_welcomed(self) -> bool {
        self == ConnState::Open(Welcome::Sent)
    }

    /// Input stays unparsed until an answer comes (a registration, the store, other
    /// shards): bytes that arrive meanwhile are held in the inbound buffer.
    pub fn holds_input(self) -> bool {
        matches!(
            self,
            ConnState::Http(HttpWait::Answer)
                | ConnState::Open(Welcome::Registration | Welcome::Inbox)
        )
    }
}

/// Which machine reads a connection's bytes and frames what it is sent: the seam a third
/// transport (MQTT) plugs into, with a module of its own beside [`ws`] and [`sse`], without
/// the router learning its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// HTTP/1.1 requests (the push API, metrics, an upgrade or an event stream to come).
    Http,
    /// The WebSocket JSON session ([`ws`]).
    WebSocket,
    /// A Server-Sent Events stream ([`sse`]).
    Sse,
}

impl Protocol {
    /// Writes the head of an event of `payload` into `head` (a WebSocket text or binary
    /// frame header; an SSE `id: ..\ndata: ` prefix); returns its length and the bytes that
    /// follow the payload.
    #[inline]
    pub fn event_head<T>(
        c: &mut Conn<T>,
        opcode: crate::ws::frame::Data,
        payload: &[u8],
        head: &mut [u8; buffers::INLINE_MAX],
    ) -> (usize, &'static [u8]) {
        match c.protocol() {
            Protocol::Sse => (sse::event_head(c, payload, head), sse::TRAILER),
            Protocol::WebSocket | Protocol::Http => (ws::frame_head(opcode, payload, head), b""),
        }
    }
}

/// Per-connection flags, packed in two bytes (rarer marks live in [`Extra`]).
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
    /// A Server-Sent Events stream (open, receives events, sends nothing).
    pub const SSE: u16 = 1 << 12;
    /// Registered in the hub (user and channels).
    pub const REGISTERED: u16 = 1 << 7;
    /// Input is discarded unparsed (after a protocol error).
    pub const DISCARD_INPUT: u16 = 1 << 8;
    /// Our write side is shut (FIN sent).
    pub const FIN_SENT: u16 = 1 << 9;
    /// The peer connects from a loopback address (the push API's default access rule).
    pub const LOOPBACK: u16 = 1 << 13;
    /// permessage-deflate was agreed: messages may arrive and leave compressed.
    pub const DEFLATE: u16 = 1 << 14;
    /// Counted against the shard's half-open handshakes (part of a request is held).
    pub const HALF_OPEN: u16 = 1 << 15;

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

/// Beside a connection that subscribed to a channel or needs [`Extra`]: boxed so an idle
/// connection pays 8 bytes for it, and small (32 bytes) so a subscriber pays little more
/// than its list of channels.
#[derive(Debug, Default)]
pub struct Side {
    /// Channels subscribed to.
    channels: Vec<Arc<str>>,
    /// The rest, rarer still.
    extra: Option<Box<Extra>>,
}

/// What few connections need: the token's grant, permessage-deflate, the SSE event id,
/// stream cursors, the reason of a close in progress.
#[derive(Debug, Default)]
pub struct Extra {
    /// Subscribed channels whose `join`/`leave` events the connection asked for.
    pub join_leave: Vec<Arc<str>>,
    /// What the connection's signed token grants (expiry, private channels).
    pub grant: Option<Box<Grant>>,
    /// Last SSE event id sent.
    pub sse_id: u64,
    /// Channels a named event stream joins once its response head goes out (after its
    /// registration): nothing may reach its socket before that head.
    pub sse_channels: Vec<Arc<str>>,
    /// Why the connection closes, for the close log line.
    pub close_reason: Cow<'static, str>,
    /// Close code sent or received, for the close log line (0: none yet).
    pub close_code: u16,
    /// Messages refused in a row by the rate limit.
    pub rate_strikes: u16,
    /// Place in the inbox stream of a resuming connection.
    pub cursor: Option<Box<cursor::Cursor>>,
    /// Places in the streams of channels subscribed with `since`.
    pub channel_cursors: Vec<(Arc<str>, cursor::Cursor)>,
    /// A replaying connection wants its next page once its outbox drained.
    pub page_wanted: bool,
    /// Its own replies passed half of `--max-outbound-bytes` within a turn: its requests
    /// wait, unread, until its outbox is written (instead of closing a client that reads,
    /// only not as fast as it pipelines).
    pub input_waits: bool,
    /// The HTTP request waiting for the store asked for `Connection: close`.
    pub api_close: bool,
    /// permessage-deflate: the client keeps its compression context between messages (its
    /// own inflater).
    pub deflate_takeover: bool,
    /// permessage-deflate: our window (bits) for this client.
    pub deflate_bits: u8,
    /// permessage-deflate with client context takeover: the client's stream so far.
    pub inflater: Option<Box<flate2::Decompress>>,
}

/// One connection. Kept small: an idle open WebSocket holds no buffers.
#[derive(Debug)]
pub struct Conn<T> {
    /// The byte pipe (a socket in this shard's fd table only).
    pub io: T,
    /// Distinguishes reuses of the same slab slot.
    pub generation: u32,
    /// Lifecycle state.
    pub state: ConnState,
    /// Flags.
    pub flags: Flags,
    /// Shard clock (ms, wrapping u32) of the last inbound frame: a liveness reset is this
    /// field write. Compare with `wrapping_sub`; silences never approach 49 days.
    pub last_seen_ms: u32,
    /// Identified user once upgraded; `None` for anonymous connections (not in the hub).
    pub user: Option<Arc<str>>,
    /// Shard clock (ms, wrapping u32) when accepted: for the close log's duration.
    pub opened_ms: u32,
    /// The message rate limit (GCRA): how far (µs) the connection is ahead of its allowed
    /// rate. Each message adds one interval; it drains as time passes ([`Conn::touch`]).
    pub rate_debt_us: u32,
    /// Read state while bytes of an unfinished frame or request are held.
    pub inbound: Option<Box<Inbound>>,
    /// Frames waiting for the socket.
    pub outbox: Option<Box<Outbox>>,
    /// Subscriptions, and the rest in [`Extra`] (boxed: most connections have none).
    pub side: Option<Box<Side>>,
}

impl<T> Conn<T> {
    /// A freshly accepted connection.
    pub fn new(io: T, generation: u32, now_ms: u64) -> Self {
        Conn {
            io,
            generation,
            state: ConnState::NEW,
            flags: Flags::default(),
            last_seen_ms: now_ms as u32,
            user: None,
            opened_ms: now_ms as u32,
            rate_debt_us: 0,
            inbound: None,
            outbox: None,
            side: None,
        }
    }

    /// A frame arrived at `now_ms`: the liveness reset, and the rate limit's debt drains by
    /// the time since the previous frame.
    #[inline]
    pub fn touch(&mut self, now_ms: u64) {
        let elapsed_us = self.silent_ms(now_ms).saturating_mul(1000);
        self.rate_debt_us = (self.rate_debt_us as u64).saturating_sub(elapsed_us) as u32;
        self.last_seen_ms = now_ms as u32;
    }

    /// Milliseconds the connection has been open.
    pub fn age_ms(&self, now_ms: u64) -> u64 {
        (now_ms as u32).wrapping_sub(self.opened_ms) as u64
    }

    /// Milliseconds since the last inbound frame.
    pub fn silent_ms(&self, now_ms: u64) -> u64 {
        (now_ms as u32).wrapping_sub(self.last_seen_ms) as u64
    }

    /// Channels subscribed to.
    pub fn channel_list(&self) -> &[Arc<str>] {
        self.side.as_deref().map_or(&[], |s| s.channels.as_slice())
    }

    /// Channels subscribed to, to change (the side state is created on first use).
    pub fn channels_mut(&mut self) -> &mut Vec<Arc<str>> {
        &mut self.side.get_or_insert_with(Default::default).channels
    }

    /// Takes the list of channels (the connection leaves them all).
    pub fn take_channels(&mut self) -> Vec<Arc<str>> {
        self.side
            .as_deref_mut()
            .map(|s| std::mem::take(&mut s.channels))
            .unwrap_or_default()
    }

    /// The rarely used state, if the connection has any.
    pub fn extra(&self) -> Option<&Extra> {
        self.side.as_deref()?.extra.as_deref()
    }

    /// [`extra`](Self::extra), to change (creates nothing).
    pub fn extra_if_mut(&mut self) -> Option<&mut Extra> {
        self.side.as_deref_mut()?.extra.as_deref_mut()
    }

    /// The rarely used state, created on first use.
    pub fn extra_mut(&mut self) -> &mut Extra {
        self.side
            .get_or_insert_with(Default::default)
            .extra
            .get_or_insert_with(Default::default)
    }

    /// Takes the rarely used state out of a connection that is gone (its close reason).
    pub fn take_extra(&mut self) -> Option<Box<Extra>> {
        self.side.as_deref_mut()?.extra.take()
    }

    /// Close code sent or received (0: none yet).
    pub fn close_code(&self) -> u16 {
        self.extra().map_or(0, |e| e.close_code)
    }

    /// Records why the connection closes, for the close log line.
    pub fn set_close(&mut self, code: u16, reason: Cow<'static, str>) {
        let e = self.extra_mut();
        e.close_code = code;
        e.close_reason = reason;
    }

    /// Input waits until the outbox is written.
    pub fn input_waits(&self) -> bool {
        self.extra().is_some_and(|e| e.input_waits)
    }

    /// A replay page is wanted once the outbox drains.
    pub fn page_wanted(&self) -> bool {
        self.extra().is_some_and(|e| e.page_wanted)
    }

    /// Sets or clears [`Extra::page_wanted`] (clearing allocates nothing).
    pub fn set_page_wanted(&mut self, on: bool) {
        if on {
            self.extra_mut().page_wanted = true;
        } else if let Some(e) = self.extra_if_mut() {
            e.page_wanted = false;
        }
    }

    /// Takes [`Extra::api_close`].
    pub fn take_api_close(&mut self) -> bool {
        self.extra_if_mut()
            .is_some_and(|e| std::mem::take(&mut e.api_close))
    }

    /// The token's grant, if the connection has one.
    pub fn grant(&self) -> Option<&Grant> {
        self.extra().and_then(|e| e.grant.as_deref())
    }

    /// Which machine reads and frames its bytes.
    #[inline]
    pub fn protocol(&self) -> Protocol {
        if self.flags.has(Flags::SSE) {
            Protocol::Sse
        } else if self.flags.has(Flags::WEBSOCKET) {
            Protocol::WebSocket
        } else {
            Protocol::Http
        }
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

/// Writes as much of `out` as the pipe takes, with vectored writes.
pub fn flush<W: Transport + ?Sized>(
    stream: &mut W,
    out: &mut Outbox,
) -> io::Result<(Flushed, usize)> {
    let mut written = 0usize;
    while out.bytes > 0 {
        let mut slices: [IoSlice<'_>; MAX_IOVECS] = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for c in out.queue.iter().take(MAX_IOVECS) {
            slices[n] = IoSlice::new(c.piece.as_slice());
            n += 1;
        }
        // The unsealed units, all in one slice, after the queue.
        if n < MAX_IOVECS && !out.tail().is_empty() {
            slices[n] = IoSlice::new(out.tail());
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
    /// Idle connections cost their slab entry: keep it small (see docs/capacity.md). The
    /// server's pipe is `shard::Stream`: 4 bytes, TLS state beside the slab.
    #[test]
    fn conn_stays_small() {
        let size = std::mem::size_of::<super::Conn<crate::shard::Stream>>();
        assert!(size <= 64, "Conn is {size} bytes");
    }

    /// A subscriber's side state is its list of channels and one pointer: 32 bytes, the
    /// allocator's 32-byte class (the rest, [`super::Extra`], is a second box).
    #[test]
    fn a_subscriber_side_is_32_bytes() {
        assert_eq!(std::mem::size_of::<super::Side>(), 32);
    }
}
