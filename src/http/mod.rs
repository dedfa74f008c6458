//! HTTP/1.1 on the WebSocket port: request parsing, responses and routing decisions.

pub mod api;
pub mod assets;
pub mod request;
pub mod response;

pub use request::{HttpError, Method, Request};
