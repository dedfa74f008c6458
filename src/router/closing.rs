//! How a connection ends: the close handshake started by either side (a violation, a
//! slow consumer, an API disconnect, shutdown), the close deadline, and the teardown that
//! drops it from the slab, the routes and the counts.

use std::borrow::Cow;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use tracing::info;

use super::Core;
use crate::conn::{ConnState, Flags, Transport};
use crate::metrics::ShardMetrics;
use crate::ws::close::{self as code};
use crate::ws::frame;

impl<T: Transport> Core<T> {
    /// A protocol violation: close with `close_code`. A second violation while closing
    /// stops parsing input altogether.
    pub(super) fn fail(&mut self, key: usize, close_code: u16, reason: &'static str) {
        let c = &mut self.conns[key];
        if c.flags.has(Flags::CLOSE_SENT) {
            c.flags.set(Flags::DISCARD_INPUT);
            return;
        }
        self.start_close(key, close_code, reason);
    }

    /// Server-initiated close: queue our close frame, stop deliveries, wait for the peer.
    pub(super) fn start_close(&mut self, key: usize, close_code: u16, reason: &'static str) {
        self.start_close_with(key, close_code, reason.into());
    }

    /// [`start_close`](Self::start_close) with a reason built at run time.
    pub(super) fn start_close_with(
        &mut self,
        key: usize,
        close_code: u16,
        reason: Cow<'static, str>,
    ) {
        let c = &mut self.conns[key];
        if c.flags.has(Flags::CLOSE_SENT) {
            return;
        }
        if c.flags.has(Flags::SSE) {
            // An event stream has no close frame: end it after what is queued.
            c.flags.set(Flags::CLOSE_SENT);
            c.set_close(close_code, reason);
            self.unregister(key);
            return self.conns.drain_after_response(key);
        }
        let f = frame::encode_close(close_code, &reason);
        c.set_close(close_code, reason);
        self.begin_closing(key, f);
    }

    pub(super) fn begin_closing(&mut self, key: usize, close_frame: Bytes) {
        let c = &mut self.conns[key];
        c.flags.set(Flags::CLOSE_SENT);
        c.state = ConnState::Closing;
        self.conns.push_raw(key, close_frame);
        self.unregister(key);
        let mut deadline = self.conns.now_ms + self.cfg.close_timeout_ms;
        if let Some(d) = self.shutdown_deadline_ms {
            deadline = deadline.min(d);
        }
        self.conns.arm(key, deadline);
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

    /// Removes a connection: logs and counts its close, releases everything it held.
    pub(super) fn finish(&mut self, key: usize) {
        self.unregister(key);
        self.release_ip(key);
        let mut c = self.conns.remove_conn(key);
        c.io.before_close();
        let age_ms = c.age_ms(self.conns.now_ms);
        let (close_code, reason) = c
            .take_extra()
            .map(|e| (e.close_code, e.close_reason))
            .unwrap_or_default();
        let m = &self.metrics[self.index as usize];
        if c.flags.has(Flags::COUNTED) {
            self.open_total.fetch_sub(1, Ordering::AcqRel);
        }
        let was_ws = c.flags.has(Flags::WEBSOCKET);
        if c.flags.has(Flags::SSE) {
            m.open_sse.fetch_sub(1, Ordering::Relaxed);
            info!(
                target: "switchboard::close",
                shard = self.index,
                conn = %format_args!("{}.{}.{}", self.index, key, c.generation),
                user = c.user.as_deref().unwrap_or("(anonymous)"),
                transport = "sse",
                reason = %reason,
                duration_ms = age_ms,
                "closed"
            );
        } else if was_ws {
            m.open_ws.fetch_sub(1, Ordering::Relaxed);
            let close_code = if close_code == 0 {
                code::ABNORMAL
            } else {
                close_code
            };
            m.count_close(close_code);
            info!(
                target: "switchboard::close",
                shard = self.index,
                conn = %format_args!("{}.{}.{}", self.index, key, c.generation),
                user = c.user.as_deref().unwrap_or("(anonymous)"),
                code = close_code,
                reason = %reason,
                duration_ms = age_ms,
                "closed"
            );
        } else {
            m.open_http.fetch_sub(1, Ordering::Relaxed);
        }
        if c.flags.has(Flags::HALF_OPEN) {
            self.half_open -= 1;
        }
        // Dropping the stream closes the fd, which also removes it from epoll.
    }
}
