//! Deadlines: the handshake and close deadlines, heartbeats (ping after silence, 4000 when
//! idle too long), SSE comment heartbeats, token expiry (4003); and the end of a
//! connection, logged and counted.

use bytes::Bytes;
use tracing::debug;

use super::Router;
use crate::conn::{sse, ws, ConnState, Flags, Transport, Welcome};
use crate::metrics::{HandshakeFailure, ShardMetrics};
use crate::ws::close::{self as code};

impl<T: Transport> Router<T> {
    pub(super) fn on_timer(&mut self, key: usize) {
        let now = self.conns.now_ms;
        let c = &mut self.conns[key];
        match c.state {
            ConnState::Http(_) => {
                self.m().count_handshake_failure(HandshakeFailure::Timeout);
                debug!(
                    shard = self.index,
                    conn = key,
                    "handshake timeout; dropping"
                );
                self.finish(key);
            }
            ConnState::Closing if c.queued_bytes() > 0 => {
                // Our close frame is still queued behind what the peer never read: no
                // room for it came within the close deadline. Cut with a reset.
                ShardMetrics::add(&self.m().closes_reset, 1);
                debug!(
                    shard = self.index,
                    conn = key,
                    "close frame unwritten at the close deadline; connection reset"
                );
                self.conns[key].io.reset();
                self.finish(key)
            }
            ConnState::Draining | ConnState::Closing => self.finish(key),
            ConnState::Open(_) => {
                if self.conns.token_expired(key) {
                    return self.start_close(key, code::TOKEN_EXPIRED, "token expired");
                }
                let c = &self.conns[key];
                if c.flags.has(Flags::SSE) {
                    // Its response head goes out once it is registered (with a broker, once
                    // the subscription is active): nothing before it.
                    if c.state != ConnState::Open(Welcome::Registration) {
                        self.conns.push_raw(key, Bytes::from_static(sse::HEARTBEAT));
                    }
                    let next = self.conns.next_heartbeat_check(key);
                    return self.conns.arm(key, next.max(now + 1));
                }
                let silent = c.silent_ms(now);
                if silent >= self.cfg.idle_timeout_ms {
                    return self.start_close(key, code::HEARTBEAT_TIMEOUT, "heartbeat timeout");
                }
                let ping_after = self.cfg.ping_interval_ms + self.conns.jitter_ms(key);
                let c = &mut self.conns[key];
                if !c.flags.has(Flags::PING_OUTSTANDING) && silent >= ping_after {
                    c.flags.set(Flags::PING_OUTSTANDING);
                    // An empty ping is two fixed bytes (no allocation), written now: a
                    // million connections ping 40k a second, and a turn that held an outbox
                    // for each of its pings until its end left them resident.
                    self.conns.push_raw(key, Bytes::from_static(&ws::PING));
                    self.conns.write_early(key);
                }
                let next = self.conns.next_heartbeat_check(key);
                self.conns.arm(key, next.max(now + 1));
            }
        }
    }
}
