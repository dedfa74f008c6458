//! The Server-Sent Events stream of one connection, sans I/O: what its request asks for
//! ([`Request`]: channels, where to resume), its response head, each event framed with the
//! id that resumes it ([`event_head`]), its comment heartbeat. It says nothing back: input
//! is discarded; "closing" one is writing what is queued, then FIN.
//!
//! Event ids: a named stream with a store keeps an inbox cursor from the start, so every id
//! is an inbox position (`<epoch>:<offset>`, what `Last-Event-ID` brings back on reconnect);
//! an anonymous stream (or one without a store) counts its events.

use std::io::Write;
use std::sync::Arc;

use super::buffers::INLINE_MAX;
use super::cursor::Cursor;
use super::Conn;
use crate::auth::{self, Grant};
use crate::http::request::query_params;
use crate::protocol;
use crate::store::Since;

/// The response head, and how long the browser waits before it reconnects.
pub const HEAD: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\nConnection: keep-alive\r\nX-Accel-Buffering: no\r\n\r\nretry: 2000\n\n";

/// A comment line: keeps proxies and the browser from timing the stream out.
pub const HEARTBEAT: &[u8] = b": heartbeat\n\n";

/// What ends every event (its payload holds no newline).
pub const TRAILER: &[u8] = b"\n\n";

use crate::protocol::MAX_CHANNELS_PER_CONN;

/// What a `GET /events` request asks for, checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    /// Channels to join, each once, in the order asked.
    pub channels: Vec<Arc<str>>,
    /// Where to resume the user's inbox: `Last-Event-ID` (what the browser brings back on
    /// its own) wins over `?since=`.
    pub since: Option<Since>,
}

/// Why a `GET /events` request is refused: status and message.
#[derive(Debug, PartialEq, Eq)]
pub struct Refused {
    /// HTTP status.
    pub status: u16,
    /// The message (a JSON error body).
    pub message: &'static str,
}

impl Request {
    /// Reads the query (`channel=a&channel=b&since=…`) and `Last-Event-ID`, against what
    /// `grant` allows.
    pub fn parse(
        query: Option<&str>,
        last_event_id: Option<&str>,
        grant: Option<&Grant>,
    ) -> Result<Request, Refused> {
        let refuse = |status, message| Err(Refused { status, message });
        let since = match last_event_id.and_then(Since::parse) {
            Some(s @ Since::Position { .. }) => Some(s),
            _ => match super::cursor::since_in_query(query) {
                Ok(s) => s,
                Err(super::cursor::BadSince) => return refuse(400, protocol::SINCE_FORMAT),
            },
        };
        let mut channels: Vec<Arc<str>> = Vec::new();
        for c in query_params(query, "channel") {
            if !protocol::valid_channel(&c) {
                return refuse(400, "invalid channel name");
            }
            if !auth::channel_allowed(grant, &c) {
                return refuse(403, protocol::FORBIDDEN_CHANNEL);
            }
            if channels.len() >= MAX_CHANNELS_PER_CONN {
                return refuse(400, "too many channels");
            }
            if !channels.iter().any(|x| **x == *c) {
                channels.push(c.into());
            }
        }
        Ok(Request { channels, since })
    }

    /// The inbox cursor of a named stream with a store: its event ids are inbox positions
    /// from the first event, resumed or not.
    pub fn cursor(&self) -> Cursor {
        self.since.map_or_else(Cursor::at_top, Cursor::resuming)
    }
}

/// Writes the `id: ..\ndata: ` prefix of an event into `head`; returns its length. The
/// payload follows, then [`TRAILER`].
pub fn event_head<T>(c: &mut Conn<T>, payload: &[u8], head: &mut [u8; INLINE_MAX]) -> usize {
    debug_assert!(!payload.contains(&b'\n'), "event payloads hold no newline");
    let e = c.extra_mut();
    e.sse_id += 1;
    let mut w = &mut head[..];
    match e.cursor.as_deref() {
        Some(&Cursor {
            epoch: Some(epoch),
            next,
            ..
        }) => {
            let _ = write!(w, "id: {epoch}:{}\ndata: ", next.saturating_sub(1));
        }
        // The store has not said where the inbox stands yet: a resuming stream's id is
        // the position it resumes from; one opened at the top has none to give, and an
        // event without an id leaves the browser's last one as it was.
        Some(&Cursor {
            since:
                Some(Since::Position {
                    epoch: Some(epoch),
                    offset,
                }),
            ..
        }) => {
            let _ = write!(w, "id: {epoch}:{offset}\ndata: ");
        }
        Some(_) => {
            let _ = write!(w, "data: ");
        }
        None => {
            let _ = write!(w, "id: {}\ndata: ", e.sse_id);
        }
    }
    INLINE_MAX - w.len()
}

#[cfg(test)]
mod tests;
