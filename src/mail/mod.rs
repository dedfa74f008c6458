//! Mail between shards: what one shard's sessions post to another's bounded mailbox
//! (`shard::mailbox`) — deliveries routed through the hub, API commands every shard runs, and
//! the store's and broker's answers passed on to the shard that waits for them. Plain data:
//! no I/O, no shard or session types.

use std::sync::Arc;

use bytes::Bytes;

use crate::broker::BrokerMsg;
use crate::ids::{ApiTicket, ConnId};
use crate::store::StoreMsg;

/// Messages between shards (bounded mailboxes; see `shard::mailbox`).
#[derive(Debug)]
pub enum ShardMsg {
    /// To the home shard of `user`: its connection `conn` opened (`online`) or closed. With
    /// `welcome`, the home answers [`ShardMsg::Registered`] so the connection can be
    /// welcomed. Never dropped (posted with retry).
    Presence {
        user: Arc<str>,
        conn: ConnId,
        online: bool,
        welcome: bool,
    },
    /// The home shard recorded connection `conn`.
    Registered { conn: ConnId },
    /// To a shard holding connections of `to`: deliver locally.
    DeliverUser {
        to: Arc<str>,
        payload: Bytes,
        exclude: Option<ConnId>,
    },
    /// Deliver to local subscribers of `channel`.
    DeliverChannel { channel: Arc<str>, payload: Bytes },
    /// Execute an API command on local connections and answer [`ShardMsg::ApiDone`].
    Api { ticket: ApiTicket, cmd: Arc<ApiCmd> },
    /// A shard's count for API request `id` of this shard (and, for
    /// [`ApiCmd::Members`], its members: user → subscriptions, `""` for anonymous ones).
    ApiDone {
        id: u32,
        count: u64,
        members: Vec<(Arc<str>, u64)>,
    },
    /// From a home shard passing on a stored message's ack.
    Store(Box<StoreMsg>),
    /// From the store thread: its answers of one commit for this shard, in order (one
    /// mailbox entry and at most one wake per commit).
    StoreBatch(Vec<StoreMsg>),
    /// To a shard holding connections of `user`: a stored message of the user's inbox.
    DeliverStream {
        user: Arc<str>,
        payload: Bytes,
        offset: u64,
        exclude: Option<ConnId>,
    },
    /// Stop accepting, close every connection with 1001, exit within the grace period.
    Shutdown,
    /// From the broker: another node's message, or an answer about one of ours.
    Broker(Box<BrokerMsg>),
}

impl ShardMsg {
    /// How many messages this is (a batch counts what it carries): what a shard's turn counts.
    pub fn weight(&self) -> usize {
        match self {
            ShardMsg::StoreBatch(v) => v.len(),
            _ => 1,
        }
    }
}

/// What an API request asks every shard to do; each answers with a count.
#[derive(Debug)]
pub enum ApiCmd {
    /// Deliver to local subscribers of `channel` (WebSocket and SSE).
    Publish { channel: Arc<str>, payload: Bytes },
    /// Deliver to every local connection of `user`.
    SendUser { user: Arc<str>, payload: Bytes },
    /// Deliver to every open local connection.
    Broadcast { payload: Bytes },
    /// Close every local connection of `user` with `code`.
    Disconnect {
        user: Arc<str>,
        code: u16,
        reason: Arc<str>,
    },
    /// Count local connections of `user`.
    CountUser { user: Arc<str> },
    /// Count local subscribers of `channel`.
    CountChannel { channel: Arc<str> },
    /// List local subscribers of `channel` by user (the `presence` op and route).
    Members { channel: Arc<str> },
}
