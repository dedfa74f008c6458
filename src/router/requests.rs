//! Store requests as outputs: the router queues them during a turn with what to do once
//! each is posted or refused ([`OnPost`]); the driver hands them to the store at the end of
//! the turn ([`Router::post_requests`]), as it posts mail. The router never sends from
//! inside, so the simulation drives the store, and refuses it, like any other peer.

use std::sync::Arc;

use tracing::warn;

use super::Streams;
use crate::conn::{ConnState, Transport, Welcome};
use crate::http::api::Route;
use crate::hub::ConnId;
use crate::metrics::ShardMetrics;
use crate::protocol::{self, ErrorCode};
use crate::store::{StoreReq, StreamRef};
use crate::ws::close as code;

/// Hands a store request to the store's queue; gives it back when the queue is full. (The
/// request goes back whole, as the channel gives it: boxing it would cost an allocation per
/// request for a refusal that is rare.)
#[allow(clippy::result_large_err)]
pub type PostStore<'a> = dyn FnMut(StoreReq) -> Result<(), StoreReq> + 'a;

/// What the router does once a store request is posted (handed to the store's queue) or
/// refused (the queue is full or the store stopped): never a silent loss.
#[derive(Debug)]
pub(super) enum OnPost {
    /// An op of connection `conn` with request id `id`: refused, it gets `overloaded` with
    /// `why` (a message not stored is counted dropped when `dropped`); posted, it is acked
    /// now when `ack` (a confirm: the store answers nothing).
    Op {
        /// The connection.
        conn: ConnId,
        /// The op's id (raw JSON).
        id: Option<Box<str>>,
        /// The error's message.
        why: &'static str,
        /// Counted in `switchboard_dropped_total` when refused.
        dropped: bool,
        /// Acked once posted.
        ack: bool,
    },
    /// An HTTP API request waits for the store's answer: refused, 503 (a user's count is
    /// answered without its unread count instead).
    Api {
        /// The waiting connection.
        conn: ConnId,
        /// Its route.
        route: Route,
        /// A user's open connections, counted already (`GET /api/users/<id>`).
        connections: u64,
    },
    /// A connection's inbox position before its welcome (an event stream's first ids):
    /// refused, it is closed with 1013 (try again later).
    Open {
        /// The connection.
        conn: ConnId,
    },
    /// The next replay page of `stream`: refused, asked again after the next flush.
    Page {
        /// The connection.
        conn: ConnId,
        /// The stream.
        stream: StreamRef,
    },
    /// `sub` with `since`: refused, subscribed without history, `overloaded`.
    Channel {
        /// The connection.
        conn: ConnId,
        /// The channel.
        channel: Arc<str>,
        /// The `sub`'s id (raw JSON).
        id: Option<Box<str>>,
    },
    /// A catch-up on a stream this shard follows: refused, given up (counted, logged; a
    /// resume fills the gap).
    CatchUp {
        /// The stream.
        stream: StreamRef,
    },
}

impl OnPost {
    /// A message of connection `conn` to store: refused, it is not stored (counted) and the
    /// sender is told.
    pub(super) fn not_stored(conn: ConnId, id: Option<&str>) -> OnPost {
        OnPost::Op {
            conn,
            id: id.map(Into::into),
            why: "server busy; message not stored",
            dropped: true,
            ack: false,
        }
    }
}

impl<T: Transport> Streams<T> {
    /// Queues `req` for the store, with what to do once it is posted or refused.
    pub(super) fn ask_store(&mut self, req: StoreReq, on: OnPost) {
        debug_assert!(self.streams_on() || matches!(on, OnPost::CatchUp { .. }));
        self.store_out.push((req, on));
    }

    /// Whether store requests wait for the driver.
    pub fn has_requests(&self) -> bool {
        !self.store_out.is_empty()
    }

    /// Whether a stream followed here is being caught up (or waits to be asked again).
    pub fn catching_up(&self) -> bool {
        self.heads.catching_up()
    }

    /// Hands this turn's store requests to `post` in order (call after [`Self::post_mail`],
    /// before [`Self::flush`]: a refusal queues an answer). `post` gives a request back when
    /// the store's queue is full: the client is told ([`OnPost`]).
    pub fn post_requests(&mut self, post: &mut PostStore<'_>) {
        let mut out = std::mem::take(&mut self.store_out);
        for (req, on) in out.drain(..) {
            let posted = post(req).is_ok();
            self.store_posted(on, posted);
        }
        // Answers queue no request: the emptied list keeps its capacity.
        debug_assert!(self.store_out.is_empty());
        self.store_out = out;
    }

    /// Acts on a request posted (`true`) or refused.
    fn store_posted(&mut self, on: OnPost, posted: bool) {
        match on {
            OnPost::Op { conn, id, ack, .. } if posted => {
                if let (true, Some(key)) = (ack, self.conns.live_open(conn)) {
                    self.ack(key, id.as_deref());
                }
            }
            OnPost::Op {
                conn,
                id,
                why,
                dropped,
                ..
            } => {
                if dropped {
                    ShardMetrics::add(&self.m().dropped, 1);
                }
                if let Some(key) = self.conns.live_open(conn) {
                    let f = protocol::error(id.as_deref(), ErrorCode::Overloaded, why);
                    self.deliver_reply(key, f);
                }
            }
            _ if posted => {}
            OnPost::Api {
                conn,
                route,
                connections,
            } => {
                let Some(key) = self.conns.waiting_http(conn) else {
                    return;
                };
                if route == Route::User {
                    // The count without the unread messages.
                    let count = serde_json::json!({
                        "online": connections > 0,
                        "connections": connections,
                    });
                    let body = serde_json::to_vec(&count).unwrap_or_default();
                    return self.api_store_answer(key, route, 200, &body);
                }
                let body = crate::http::api::error_body("server busy; try again");
                self.api_store_answer(key, route, 503, &body);
            }
            OnPost::Open { conn } => self.open_refused(conn),
            OnPost::Page { conn, stream } => {
                if let Some(key) = self.conns.live_open(conn) {
                    self.want_page_again(key, &stream);
                }
            }
            OnPost::Channel { conn, channel, id } => {
                let Some(key) = self.conns.live_open(conn) else {
                    return;
                };
                self.conns[key]
                    .extra_mut()
                    .channel_cursors
                    .retain(|(c, _)| *c != channel);
                let why = "server busy; subscribed without history";
                let f = protocol::error(id.as_deref(), ErrorCode::Overloaded, why);
                self.deliver_reply(key, f);
            }
            OnPost::CatchUp { stream } => self.catch_up_refused(stream),
        }
    }

    /// The store could not place a connection's inbox (its position, a resume): the
    /// connection is closed with 1013 and reconnects (an event stream by itself, with its
    /// `Last-Event-ID`). Welcomed without a position instead, a resume would end unseen, and
    /// the live messages held back meanwhile would be lost to it.
    fn open_refused(&mut self, conn: ConnId) {
        let Some(key) = self.conns.live_open(conn) else {
            return;
        };
        let c = &self.conns[key];
        let placing = c.protocol() == crate::conn::Protocol::Sse
            || c.state == ConnState::Open(Welcome::Inbox);
        if !placing {
            return;
        }
        warn!(
            shard = self.index,
            "store queue full: connection closed before its welcome (1013)"
        );
        let wait = self.retry_jitter_ms(key, 500, 1500);
        let reason = super::admission::retry_reason("server busy, try again later", wait);
        self.start_close_with(key, code::TRY_AGAIN_LATER, reason.into());
    }
}
