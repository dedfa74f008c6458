//! The push API: a request is authorized and executed by every shard (each answers a
//! count, [`gather`]) and answered by the shard that holds the HTTP connection
//! ([`answers`]); the other nodes answer through the broker, the store through its thread.

mod answers;
mod gather;

use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::Streams;
use crate::broker::BrokerMetrics;
use crate::conn::{Flags, Transport};
use crate::http::api::{self, ApiError, Route};
use crate::http::{Method, Request};
use crate::hub::ReplyTo;
use crate::mail::ApiCmd;
use crate::metrics::ShardMetrics;
use crate::metrics::StoreMetrics;
use crate::protocol::{self, Target};
use crate::store::StoreReq;
use slab::Slab;

use answers::json;
pub use gather::PendingApi;

/// The push API's layer (see the module docs): above [`Streams`], below the
/// [`Router`](super::Router) that reads the requests.
pub struct Api<T: Transport> {
    pub(in crate::router) streams: Streams<T>,
    /// API requests waiting for other shards.
    pub(in crate::router) pending_api: Slab<PendingApi>,
    /// What `POST /api/drain` calls.
    pub(in crate::router) on_drain: Option<super::OnDrain>,
    pub(in crate::router) store_metrics: Arc<StoreMetrics>,
    pub(in crate::router) broker_metrics: Option<Arc<BrokerMetrics>>,
    /// This node's id (shown in `/api/stats` and `/metrics`).
    pub(in crate::router) node: Arc<str>,
}

layer_over!(Api => Streams, streams);

impl<T: Transport> Api<T> {
    /// Browser requests (those with `Origin`) must come from an allowed origin, if any are set.
    pub(in crate::router) fn origin_allowed(&self, req: &Request) -> bool {
        match (&req.origin, self.cfg.allowed_origins.is_empty()) {
            (_, true) | (None, _) => true,
            (Some(o), false) => self.cfg.allowed_origins.iter().any(|a| a == o),
        }
    }

    /// Routes `/api/...`: authorization, method, body, then the command on every shard.
    pub(in crate::router) fn route_api(&mut self, key: usize, req: &Request, body: &[u8]) {
        let (route, arg, method) = Route::of(&req.path);
        let result = self.api_request(key, req, body, route, arg, method);
        if let Err(e) = result {
            self.api_answer(
                key,
                route,
                e.status,
                &api::error_body(&e.message),
                req.connection_close,
            );
        }
    }

    pub(in crate::router) fn api_request(
        &mut self,
        key: usize,
        req: &Request,
        body: &[u8],
        route: Route,
        arg: Option<&str>,
        method: &str,
    ) -> Result<(), ApiError> {
        self.api_authorize(key, req)?;
        if route == Route::Unknown {
            return Err(ApiError {
                status: 404,
                message: "no such API route".into(),
            });
        }
        let method_ok = match req.method {
            Some(Method::Get) => method == "GET",
            Some(Method::Post) => method == "POST",
            _ => false,
        };
        if !method_ok {
            return Err(ApiError {
                status: 405,
                message: format!("use {method} for this route"),
            });
        }
        let ts = self.conns.now_unix_ms;
        let cmd = match route {
            Route::Drain => {
                let Some(drain) = self.on_drain.clone() else {
                    return Err(ApiError {
                        status: 503,
                        message: "no process to drain here".into(),
                    });
                };
                drain();
                let body = br#"{"draining":true}"#;
                self.api_answer(key, route, 200, body, req.connection_close);
                return Ok(());
            }
            Route::Publish => {
                let p: api::Publish = api::parse_body(body)?;
                api::check_channel(&p.channel)?;
                let from = api::check_from(p.from.as_deref())?;
                match p.qos {
                    None | Some(0) | Some(1) => {}
                    Some(_) => return Err(ApiError::bad("`qos` must be 0 or 1")),
                }
                if let (true, Some(rule)) = (self.streams_on(), self.cfg.stream_rule(&p.channel)) {
                    // A channel with history is always stored; the answer waits for the commit.
                    let retention = crate::store::Retention {
                        max_count: rule.history,
                        ttl_ms: rule.ttl_ms,
                    };
                    let prefix =
                        protocol::msg_prefix(from, Target::Channel(&p.channel), p.data, ts);
                    let channel: Arc<str> = Arc::from(p.channel.as_str());
                    let sreq = StoreReq::Publish {
                        channel: channel.clone(),
                        retention,
                        prefix,
                        id: p.id.as_deref().map(|i| format!("api:{i}").into()),
                        publisher: Arc::from(from),
                        reply: Some(ReplyTo {
                            conn: self.conns.conn_id(key),
                            id: "null".into(),
                            to: channel,
                        }),
                    };
                    self.api_ask_store(key, req.connection_close, sreq, Route::Publish, 0);
                    return Ok(());
                }
                let payload = protocol::msg(from, Target::Channel(&p.channel), p.data, ts);
                ApiCmd::Publish {
                    channel: p.channel.into(),
                    payload,
                }
            }
            Route::Send => {
                let p: api::Send = api::parse_body(body)?;
                api::check_user("to", &p.to)?;
                let from = api::check_from(p.from.as_deref())?;
                match p.qos {
                    None | Some(0) => {}
                    Some(1) => return self.api_send_stored(key, req, from, &p),
                    Some(_) => return Err(ApiError::bad("`qos` must be 0 or 1")),
                }
                let payload = protocol::msg(from, Target::User(&p.to), p.data, ts);
                ApiCmd::SendUser {
                    user: p.to.into(),
                    payload,
                }
            }
            Route::Broadcast => {
                let p: api::Broadcast = api::parse_body(body)?;
                let from = api::check_from(p.from.as_deref())?;
                let payload = protocol::msg(from, Target::Broadcast, p.data, ts);
                ApiCmd::Broadcast { payload }
            }
            Route::Disconnect => {
                let p: api::Disconnect = api::parse_body(body)?;
                api::check_user("user", &p.user)?;
                if !(4000..=4999).contains(&p.code) {
                    return Err(ApiError::bad("`code` must be 4000-4999"));
                }
                let reason = p
                    .reason
                    .unwrap_or_else(|| "disconnected by the server".into());
                if reason.len() > 123 {
                    return Err(ApiError::bad("`reason` must be at most 123 bytes"));
                }
                ApiCmd::Disconnect {
                    user: p.user.into(),
                    code: p.code,
                    reason: reason.into(),
                }
            }
            Route::User => {
                let id = arg
                    .and_then(crate::http::request::percent_decode)
                    .unwrap_or_default();
                api::check_user("user", &id)?;
                ApiCmd::CountUser { user: id.into() }
            }
            Route::Channel | Route::Presence => {
                let name = arg
                    .and_then(crate::http::request::percent_decode)
                    .unwrap_or_default();
                api::check_channel(&name)?;
                let channel = name.into();
                if route == Route::Channel {
                    ApiCmd::CountChannel { channel }
                } else {
                    ApiCmd::Members { channel }
                }
            }
            Route::Stats => {
                let body = self.stats_json();
                self.api_answer(key, route, 200, &body, req.connection_close);
                return Ok(());
            }
            Route::History => return self.api_history(key, req, arg),
            Route::Unknown => unreachable!("answered above"),
        };
        self.start_api(key, route, cmd, req.connection_close);
        Ok(())
    }

    /// `Authorization: Bearer <api key>`; without a configured key, loopback peers only.
    pub(in crate::router) fn api_authorize(
        &self,
        key: usize,
        req: &Request,
    ) -> Result<(), ApiError> {
        match &self.cfg.api_key {
            Some(k) => {
                let given = req
                    .authorization
                    .as_deref()
                    .and_then(|a| a.strip_prefix("Bearer "))
                    .map(str::trim);
                if given.is_some_and(|g| constant_time_eq(g.as_bytes(), k.as_bytes())) {
                    Ok(())
                } else {
                    Err(ApiError {
                        status: 401,
                        message: "missing or wrong API key (Authorization: Bearer <key>)".into(),
                    })
                }
            }
            None => {
                let loopback = self.conns[key].flags.has(Flags::LOOPBACK);
                if loopback {
                    Ok(())
                } else {
                    Err(ApiError {
                        status: 403,
                        message: "no --api-key is set: the API answers loopback peers only".into(),
                    })
                }
            }
        }
    }

    /// The Prometheus text of `/metrics`: the shards', the store's (with one) and the node's.
    pub(in crate::router) fn metrics_text(&self) -> String {
        let mut text = crate::metrics::render(&self.metrics);
        if self.store_on {
            crate::metrics::render_store(&mut text, &self.store_metrics);
        }
        crate::metrics::render_node(&mut text, &self.node, self.broker_metrics.as_deref());
        text
    }

    /// `GET /api/stats`: a summary, and under `metrics` every series of `/metrics`.
    pub(in crate::router) fn stats_json(&self) -> Vec<u8> {
        let sum = |f: &dyn Fn(&ShardMetrics) -> u64| -> u64 { self.metrics.iter().map(f).sum() };
        let r = Ordering::Relaxed;
        json(serde_json::json!({
            "metrics": crate::metrics::text_to_json(&self.metrics_text()),
            "node": &*self.node,
            "cluster": self.broker.is_some(),
            "shards": self.metrics.len(),
            "connections": {
                "ws": sum(&|m| m.open_ws.load(r)),
                "sse": sum(&|m| m.open_sse.load(r)),
                "http": sum(&|m| m.open_http.load(r)),
            },
            "accepted": sum(&|m| m.accepted.load(r)),
            "messages_in": sum(&|m| m.messages_in.load(r)),
            "messages_out": sum(&|m| m.messages_out.load(r)),
            "bytes_in": sum(&|m| m.bytes_in.load(r)),
            "bytes_out": sum(&|m| m.bytes_out.load(r)),
            "dropped": sum(&|m| m.dropped.load(r)),
            "slow_consumer_closes": sum(&|m| m.slow_consumers.load(r)),
            "close_resets": sum(&|m| m.closes_reset.load(r)),
            "timer_wheel_entries": sum(&|m| m.wheel_entries.load(r)),
        }))
    }
}

/// Compares secrets without an early exit.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(in crate::router) fn secrets_compare() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }
}
