//! The browser client and the chat page, embedded in the binary (sources live in `web/`).

/// `GET /`: the two-person chat page.
pub const INDEX_HTML: &str = include_str!("../../web/index.html");
/// `GET /client.js`: the browser client (an ES module that also sets `window.Switchboard`).
pub const CLIENT_JS: &str = include_str!("../../web/client.js");
