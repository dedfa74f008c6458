//! `GET /events`: an event stream opened on an HTTP connection (its request read by the
//! SSE machine, [`crate::conn::sse`]), registered like a WebSocket, living in the same slab,
//! hub and wheel.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Core;
use super::Router;
use crate::auth::Identity;
use crate::conn::{sse, ConnState, Flags, Transport};
use crate::http::{Method, Request};
use crate::metrics::{HandshakeFailure, ShardMetrics};

impl<T: Transport> Router<T> {
    /// `GET /events?channel=a&channel=b`: an event stream of the user's DMs and the channels.
    pub(super) fn open_sse(&mut self, key: usize, req: &Request) {
        if !matches!(req.method, Some(Method::Get)) {
            return self
                .conns
                .http_fail(key, 405, "method not allowed", HandshakeFailure::Method);
        }
        if !self.origin_allowed(req) {
            return self
                .conns
                .http_fail(key, 403, "origin not allowed", HandshakeFailure::Origin);
        }
        let Some(identity) = self.identify(key, req) else {
            return; // answered
        };
        let (user, grant) = match identity {
            Identity::User(u, g) => (Some(Arc::<str>::from(u)), g),
            Identity::Anonymous => (None, None),
        };
        let query = req.query.as_deref();
        let stream =
            match sse::Request::parse(query, req.last_event_id.as_deref(), grant.as_deref()) {
                Ok(s) => s,
                Err(r) => {
                    let why = match r.status {
                        403 => HandshakeFailure::Forbidden,
                        _ => HandshakeFailure::Malformed,
                    };
                    return self.conns.http_fail(key, r.status, r.message, why);
                }
            };
        let streams_on = self.streams_on();
        self.conns[key].flags.set(Flags::COUNTED);
        if let Err(busy) = self.admit_handshake(key) {
            return self
                .conns
                .http_refuse(key, 503, busy.message, busy.why, busy.wait_ms);
        }
        let core: &mut Core<T> = self;
        let Core {
            metrics,
            index,
            conns,
            ..
        } = core;
        let m = &metrics[*index as usize];
        let c = &mut conns[key];
        m.open_http.fetch_sub(1, Ordering::Relaxed);
        ShardMetrics::add(&m.open_sse, 1);
        c.state = ConnState::UPGRADED;
        c.flags.set(Flags::SSE);
        c.user = user;
        if let Some(g) = grant {
            c.extra_mut().grant = Some(g);
        }
        if c.user.is_some() && streams_on {
            c.extra_mut().cursor = Some(Box::new(stream.cursor()));
        }
        let channels = stream.channels;
        if c.user.is_some() {
            // A named stream opens (its headers go out) once the user's home shard recorded
            // it, like a WebSocket's welcome: whatever is sent to the user after that reaches
            // it, and a resuming one asks the store only then, so nothing stored in between
            // is missed. Its channels are joined then too: no event may precede the head.
            c.extra_mut().sse_channels = channels;
            self.register(key, true);
        } else {
            self.conns.push_sse_headers(key);
            self.register(key, false);
            for ch in channels {
                self.subscribe(key, ch);
            }
        }
        let deadline = self.conns.next_heartbeat_check(key);
        self.conns.arm(key, deadline);
    }
}
