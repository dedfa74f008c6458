//! switchboard: a sharded mio WebSocket messaging and push server.
//!
//! Architecture (see `docs/architecture.md`): one [`shard`] per core runs a mio event loop that
//! drives its [`session`] layer — the sans-I/O state of its connections, its [`timer`] wheel
//! and its part of the [`hub`]; shards talk over bounded mailboxes. [`server`] wires them up.
pub mod auth;
pub mod broker;
pub mod config;
pub mod conn;
pub mod http;
pub mod hub;
pub mod ids;
pub mod mail;
pub mod metrics;
pub mod protocol;
pub mod queue;
pub mod router;
pub mod server;
pub mod shard;
#[cfg(feature = "sim")]
pub mod sim;
pub mod store;
#[cfg(feature = "testkit")]
pub mod testkit;
pub mod timer;
pub mod tls;
pub mod ws;
