//! switchboard: a sharded mio WebSocket messaging and push server.
pub mod timer;
