//! Bytes out: events framed for the connection's transport (a WebSocket header or SSE
//! framing around a payload shared by every recipient), the outbound limit and its
//! slow-consumer close, and the end-of-turn flush with the transitions that wait for it.

use bytes::Bytes;
use tracing::debug;

use super::table::{Delivery, Out};
use super::Router;
use crate::conn::{ConnState, Flags, Flushed, Transport};
use crate::metrics::ShardMetrics;
use crate::ws::close::{self as code};
use crate::ws::frame::Data;

impl<T: Transport> Router<T> {
    /// Queues a reply (ack, error, pong) to the requesting connection.
    pub(super) fn deliver_reply(&mut self, key: usize, payload: Bytes) {
        self.deliver(key, &payload);
    }

    /// Queues an event (a JSON payload, shared with every other recipient) for an open
    /// connection, framed for its transport, enforcing `--max-outbound-bytes`. True when
    /// queued.
    pub(super) fn deliver(&mut self, key: usize, payload: &Bytes) -> bool {
        self.deliver_data(key, Data::Text, Out::Shared(payload.clone()))
    }

    /// [`deliver`](Self::deliver) for any data opcode (echo mode answers binary too).
    /// A WebSocket gets a frame header then the payload; an event stream gets
    /// `id: N\ndata: ` + payload + a blank line (event payloads never hold a newline).
    pub(super) fn deliver_data(&mut self, key: usize, opcode: Data, payload: Out<'_>) -> bool {
        match self.conns.deliver_data(key, opcode, payload) {
            Delivery::Queued => true,
            Delivery::NotOpen => false,
            Delivery::OverLimit => {
                self.slow_consumer(key);
                false
            }
        }
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

    /// End-of-turn flush of one connection, and the transitions that wait for a flush.
    pub(super) fn flush_conn(&mut self, key: usize) {
        match self.conns.flush_out(key) {
            Ok(Flushed::All) => {
                if self.conns[key].page_wanted() {
                    self.request_page(key);
                }
                let c = &mut self.conns[key];
                if c.input_waits() {
                    // Its replies are out: read and parse its requests again.
                    c.extra_mut().input_waits = false;
                    self.conns.defer_read(key);
                }
            }
            Ok(Flushed::Blocked) => return,
            Err(e) => {
                debug!(shard = self.index, conn = key, error = %e, "write failed");
                let c = &mut self.conns[key];
                if c.close_code() == 0 && !c.state.is_http() && c.state != ConnState::Draining {
                    c.set_close(code::ABNORMAL, "write failed".into());
                }
                return self.finish(key);
            }
        }
        let c = &mut self.conns[key];
        match c.state {
            ConnState::Closing
                if c.flags.has(Flags::CLOSE_SENT) && c.flags.has(Flags::CLOSE_RECEIVED) =>
            {
                self.finish(key)
            }
            ConnState::Draining if !c.flags.has(Flags::FIN_SENT) => {
                c.flags.set(Flags::FIN_SENT);
                c.io.shutdown_write();
            }
            _ => {}
        }
    }
}
