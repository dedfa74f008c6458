//! The HTTP push API: routes, request bodies and JSON answers (no I/O; the shard executes).

use serde::Deserialize;
use serde_json::value::RawValue;

use crate::protocol::{valid_channel, valid_user};

/// Routes of the API, also the `route` label of its metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Route {
    /// POST /api/publish
    Publish,
    /// POST /api/send
    Send,
    /// POST /api/broadcast
    Broadcast,
    /// POST /api/disconnect
    Disconnect,
    /// GET /api/users/<id>
    User,
    /// GET /api/channels/<name>
    Channel,
    /// GET /api/stats
    Stats,
    /// GET /api/history/<stream>
    History,
    /// GET /api/channels/<name>/presence
    Presence,
    /// POST /api/drain
    Drain,
    /// Anything else under /api/
    Unknown,
}

impl Route {
    /// All routes, in index order.
    pub const ALL: [Route; 11] = [
        Route::Publish,
        Route::Send,
        Route::Broadcast,
        Route::Disconnect,
        Route::User,
        Route::Channel,
        Route::Stats,
        Route::History,
        Route::Presence,
        Route::Drain,
        Route::Unknown,
    ];

    /// Label value.
    pub fn label(self) -> &'static str {
        match self {
            Route::Publish => "publish",
            Route::Send => "send",
            Route::Broadcast => "broadcast",
            Route::Disconnect => "disconnect",
            Route::User => "users",
            Route::Channel => "channels",
            Route::Stats => "stats",
            Route::History => "history",
            Route::Presence => "presence",
            Route::Drain => "drain",
            Route::Unknown => "unknown",
        }
    }

    /// The route of a path under `/api/`, with its path argument, and the method it takes.
    pub fn of(path: &str) -> (Route, Option<&str>, &'static str) {
        match path {
            "/api/publish" => (Route::Publish, None, "POST"),
            "/api/send" => (Route::Send, None, "POST"),
            "/api/broadcast" => (Route::Broadcast, None, "POST"),
            "/api/disconnect" => (Route::Disconnect, None, "POST"),
            "/api/stats" => (Route::Stats, None, "GET"),
            "/api/drain" => (Route::Drain, None, "POST"),
            p => {
                if let Some(id) = p.strip_prefix("/api/users/") {
                    (Route::User, Some(id), "GET")
                } else if let Some(name) = p.strip_prefix("/api/channels/") {
                    // A channel named `x/presence` is asked for as `x%2Fpresence`.
                    match name.strip_suffix("/presence") {
                        Some(name) => (Route::Presence, Some(name), "GET"),
                        None => (Route::Channel, Some(name), "GET"),
                    }
                } else if let Some(name) = p.strip_prefix("/api/history/") {
                    (Route::History, Some(name), "GET")
                } else {
                    (Route::Unknown, None, "")
                }
            }
        }
    }
}

/// HTTP statuses the API answers, also the `status` label of its metrics.
pub const STATUSES: [u16; 8] = [200, 400, 401, 403, 404, 405, 413, 503];

/// Index of a status in [`STATUSES`] (unknown ones count as 503's slot).
pub fn status_index(status: u16) -> usize {
    STATUSES
        .iter()
        .position(|&s| s == status)
        .unwrap_or(STATUSES.len() - 1)
}

/// `POST /api/publish`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish<'a> {
    /// Channel.
    pub channel: String,
    /// Any JSON.
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// Sender shown to recipients [default: "server"].
    #[serde(default)]
    pub from: Option<String>,
    /// Accepted for symmetry with `send`: a channel with history is always stored (qos 1),
    /// others never are.
    #[serde(default)]
    pub qos: Option<u8>,
    /// Request id for the dedup window (channels with history).
    #[serde(default)]
    pub id: Option<String>,
}

/// `POST /api/send`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Send<'a> {
    /// Recipient user.
    pub to: String,
    /// Any JSON.
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// Sender shown to recipients [default: "server"].
    #[serde(default)]
    pub from: Option<String>,
    /// 1: stored in the recipient's inbox before it is delivered [default: 0].
    #[serde(default)]
    pub qos: Option<u8>,
    /// Request id for the dedup window (qos 1).
    #[serde(default)]
    pub id: Option<String>,
}

/// `POST /api/broadcast`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Broadcast<'a> {
    /// Any JSON.
    #[serde(borrow)]
    pub data: &'a RawValue,
    /// Sender shown to recipients [default: "server"].
    #[serde(default)]
    pub from: Option<String>,
}

/// `POST /api/disconnect`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disconnect {
    /// User whose connections close.
    pub user: String,
    /// Close code, 4000–4999.
    pub code: u16,
    /// Close reason [default: "disconnected by the server"].
    #[serde(default)]
    pub reason: Option<String>,
}

/// A request the API refused, with its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status.
    pub status: u16,
    /// Message for the `error` field.
    pub message: String,
}

impl ApiError {
    /// A 400.
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError {
            status: 400,
            message: message.into(),
        }
    }
}

/// Parses a JSON body into `T`, naming the missing or bad field.
pub fn parse_body<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    if body.is_empty() {
        return Err(ApiError::bad("request body required (JSON)"));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::bad(format!("invalid JSON body: {e}")))
}

/// Checks a sender name (`from`).
pub fn check_from(from: Option<&str>) -> Result<&str, ApiError> {
    match from {
        None => Ok("server"),
        Some(f) if valid_user(f) => Ok(f),
        Some(_) => Err(ApiError::bad(
            "`from` must be 1-128 characters of [A-Za-z0-9_.@-]",
        )),
    }
}

/// Checks a user id field.
pub fn check_user(field: &str, id: &str) -> Result<(), ApiError> {
    if valid_user(id) {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "`{field}` must be 1-128 characters of [A-Za-z0-9_.@-]"
        )))
    }
}

/// Checks a channel name.
pub fn check_channel(name: &str) -> Result<(), ApiError> {
    if valid_channel(name) {
        Ok(())
    } else {
        Err(ApiError::bad(
            "`channel` must be 1-128 characters of [A-Za-z0-9_.:@/-]",
        ))
    }
}

/// `{"error": message}`
pub fn error_body(message: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({ "error": message })).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(Route::of("/api/publish").0, Route::Publish);
        assert_eq!(
            Route::of("/api/users/bob"),
            (Route::User, Some("bob"), "GET")
        );
        assert_eq!(
            Route::of("/api/channels/a:b"),
            (Route::Channel, Some("a:b"), "GET")
        );
        assert_eq!(
            Route::of("/api/channels/a/b/presence"),
            (Route::Presence, Some("a/b"), "GET")
        );
        assert_eq!(
            Route::of("/api/channels/x%2Fpresence"),
            (Route::Channel, Some("x%2Fpresence"), "GET")
        );
        assert_eq!(Route::of("/api/nope").0, Route::Unknown);
    }

    #[test]
    fn bodies_name_the_missing_field() {
        let e = parse_body::<Publish>(br#"{"data":1}"#).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(
            e.message.contains("missing field `channel`"),
            "{}",
            e.message
        );
        let e = parse_body::<Send>(br#"{"to":"bob"}"#).unwrap_err();
        assert!(e.message.contains("`data`"), "{}", e.message);
        let e = parse_body::<Publish>(b"{nope").unwrap_err();
        assert!(e.message.contains("invalid JSON"));
        assert!(parse_body::<Publish>(b"").is_err());
        let p = parse_body::<Publish>(br#"{"channel":"news","data":{"a":[1]}}"#).unwrap();
        assert_eq!(p.data.get(), r#"{"a":[1]}"#);
        let d =
            parse_body::<Disconnect>(br#"{"user":"bob","code":4002,"reason":"kicked"}"#).unwrap();
        assert_eq!((d.code, d.reason.as_deref()), (4002, Some("kicked")));
        assert_eq!(check_from(None), Ok("server"));
        assert!(check_from(Some("no spaces")).is_err());
        assert_eq!(status_index(413), 6);
    }
}
