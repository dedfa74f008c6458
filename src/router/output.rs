//! Bytes out: events framed for the connection's transport (a WebSocket header or SSE
//! framing around a payload shared by every recipient), the outbound limit and its
//! slow-consumer close, and the end-of-turn flush with the transitions that wait for it.

use bytes::Bytes;

use super::table::{Delivery, Out};
use super::Core;
use crate::conn::Transport;
use crate::ws::frame::Data;

impl<T: Transport> Core<T> {
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
    #[inline]
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
}
