//! WebSocket wire format: frame codec, handshake, close codes and UTF-8 checks.

pub mod close;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod utf8;
