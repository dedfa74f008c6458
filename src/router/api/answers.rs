//! Answers to API requests: JSON bodies, the ones that wait for the store or the other
//! nodes, and reading what was pipelined behind them once answered.

use std::sync::Arc;

use tracing::debug;

use super::Api;
use crate::broker::Counted;
use crate::conn::{ConnState, HttpWait, Transport};
use crate::http::api::{self, ApiError, Route};
use crate::http::{response, Request};
use crate::hub::ReplyTo;
use crate::metrics::ShardMetrics;
use crate::protocol::{self, ErrorCode, Target};
use crate::router::requests::OnPost;
use crate::router::Core;
use crate::store::StoreReq;

/// A JSON body.
pub(super) fn json(v: serde_json::Value) -> Vec<u8> {
    serde_json::to_vec(&v).unwrap_or_default()
}

impl<T: Transport> Core<T> {
    pub(in crate::router) fn api_answer(
        &mut self,
        key: usize,
        route: Route,
        status: u16,
        body: &[u8],
        close: bool,
    ) {
        ShardMetrics::add(
            &self.metrics[self.index as usize].api_requests[route as usize]
                [api::status_index(status)],
            1,
        );
        if status != 200 {
            debug!(
                shard = self.index,
                conn = key,
                status,
                route = route.label(),
                "API request refused"
            );
        }
        let resp = response::simple(status, "application/json", body, "", close);
        self.conns.http_respond(key, resp, close);
    }

    /// Hands an API request to the store; the HTTP answer waits for the store's (later
    /// pipelined requests wait too).
    /// Later requests of HTTP connection `key` wait unread until its API request is answered
    /// (responses stay in order).
    pub(in crate::router) fn wait_answer(&mut self, key: usize) {
        let c = &mut self.conns[key];
        debug_assert!(c.state.is_http(), "only HTTP requests wait for an answer");
        c.state = ConnState::Http(HttpWait::Answer);
    }

    /// Answers an API request that waited for the store, then reads what was pipelined.
    pub(in crate::router) fn api_store_answer(
        &mut self,
        key: usize,
        route: Route,
        status: u16,
        body: &[u8],
    ) {
        let c = &mut self.conns[key];
        c.state = ConnState::Http(HttpWait::Reading);
        let close = c.take_api_close();
        self.api_answer(key, route, status, body, close);
        if self.conns.contains(key) && !close {
            // Pipelined requests: read on from the backlog, this turn.
            self.conns.defer_read(key);
        }
    }

    /// The store's answer to `GET /api/users/<id>`: the counts and the unread messages.
    pub(in crate::router) fn api_user_unread(&mut self, key: usize, connections: u64, unread: u64) {
        let body = json(serde_json::json!({
            "online": connections > 0, "connections": connections, "unread": unread,
        }));
        self.api_store_answer(key, Route::User, 200, &body);
    }

    /// The store's answer to a history request of the push API.
    pub(in crate::router) fn api_history_page(&mut self, key: usize, body: &[u8]) {
        self.api_store_answer(key, Route::History, 200, body);
    }

    /// The store's ack of an API qos-1 send or a stored publication.
    pub(in crate::router) fn api_stored(
        &mut self,
        key: usize,
        route: Route,
        offset: u64,
        epoch: &str,
        queued: Option<bool>,
    ) {
        let body = json(serde_json::json!({
            "stored": true, "offset": offset, "epoch": epoch,
            "queued": queued.unwrap_or(false), "duplicate": queued.is_none(),
        }));
        self.api_store_answer(key, route, 200, &body);
    }

    /// The store refused an API write: 503 with the protocol's error code and why.
    pub(in crate::router) fn api_refused(
        &mut self,
        key: usize,
        route: Route,
        code: ErrorCode,
        why: &str,
    ) {
        let body = api::error_body(&format!("{}: {why}", code.as_str()));
        self.api_store_answer(key, route, 503, &body);
    }
}

impl<T: Transport> Api<T> {
    /// `POST /api/send` with `"qos":1`: stored in the recipient's inbox, then delivered; the
    /// answer waits for the commit (`{"stored":true,"offset":N,"epoch":..,"queued":bool}`).
    pub(in crate::router) fn api_send_stored(
        &mut self,
        key: usize,
        req: &Request,
        from: &str,
        p: &api::Send<'_>,
    ) -> Result<(), ApiError> {
        if !self.streams_on() {
            return Err(ApiError::bad("qos 1 needs a store"));
        }
        let prefix =
            protocol::msg_prefix(from, Target::User(&p.to), p.data, self.conns.now_unix_ms);
        let to: Arc<str> = Arc::from(p.to.as_str());
        let reply = ReplyTo {
            conn: self.conns.conn_id(key),
            id: "null".into(),
            to: to.clone(),
        };
        let sreq = StoreReq::SendDm {
            from: Arc::from(from),
            to,
            prefix,
            id: p.id.as_deref().map(|i| format!("api:{i}").into()),
            reply: Some(reply),
            sender: None,
            sender_copy: false,
        };
        self.api_ask_store(key, req.connection_close, sreq, Route::Send, 0);
        Ok(())
    }

    /// `connections`: a user's open connections, answered if the store cannot add the
    /// unread count.
    pub(in crate::router) fn api_ask_store(
        &mut self,
        key: usize,
        close: bool,
        sreq: StoreReq,
        route: Route,
        connections: u64,
    ) {
        self.wait_answer(key);
        if close {
            self.conns[key].extra_mut().api_close = true;
        }
        let conn = self.conns.conn_id(key);
        let on = OnPost::Api {
            conn,
            route,
            connections,
        };
        self.ask_store(sreq, on);
    }

    /// `GET /api/history/inbox:<user>?since=N&limit=L`: a page of a user's inbox from the
    /// store.
    pub(in crate::router) fn api_history(
        &mut self,
        key: usize,
        req: &Request,
        arg: Option<&str>,
    ) -> Result<(), ApiError> {
        if !self.streams_on() {
            return Err(ApiError::bad("history needs a store"));
        }
        let name = arg
            .and_then(crate::http::request::percent_decode)
            .unwrap_or_default();
        let Some(user) = name.strip_prefix("inbox:") else {
            return Err(ApiError {
                status: 404,
                message: "no such stream (streams are named inbox:<user>)".into(),
            });
        };
        api::check_user("user", user)?;
        let num = |k: &str| -> Result<Option<u64>, ApiError> {
            match crate::http::request::query_param(req.query.as_deref(), k) {
                None => Ok(None),
                Some(v) => v
                    .parse()
                    .map(Some)
                    .map_err(|_| ApiError::bad(format!("`{k}` must be a number"))),
            }
        };
        let since = num("since")?.unwrap_or(0);
        let limit = num("limit")?.unwrap_or(100).clamp(1, 1000) as usize;
        let sreq = StoreReq::History {
            user: Arc::from(user),
            from: since + 1,
            limit,
            conn: self.conns.conn_id(key),
            id: None,
        };
        self.api_ask_store(key, req.connection_close, sreq, Route::History, 0);
        Ok(())
    }

    /// The broker counted a user's connections or a channel's subscribers on every live node:
    /// answer (for a user, after the store's unread count).
    pub(in crate::router) fn api_counted(
        &mut self,
        kind: Counted,
        conn: crate::hub::ConnId,
        user: Arc<str>,
        connections: u64,
    ) {
        let Some(key) = self.conns.waiting_http(conn) else {
            return;
        };
        if kind == Counted::Channels {
            let body = json(serde_json::json!({ "subscribers": connections }));
            return self.api_store_answer(key, Route::Channel, 200, &body);
        }
        if self.streams_on() {
            let close = self.conns[key].extra().is_some_and(|e| e.api_close);
            let req = StoreReq::Unread {
                user,
                conn,
                connections,
            };
            return self.api_ask_store(key, close, req, Route::User, connections);
        }
        let body =
            json(serde_json::json!({ "online": connections > 0, "connections": connections }));
        self.api_store_answer(key, Route::User, 200, &body);
    }
}
