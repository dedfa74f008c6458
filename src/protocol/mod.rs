//! Wire protocol v1: the JSON envelope of client requests and server events (`docs/protocol.md`).
//!
//! Requests are parsed borrowing from the message payload; `data` and `id` stay raw JSON so
//! they are copied into the outgoing event without a second parse. Events are serialized once
//! into a shared JSON payload; the transport adds the WebSocket header or the SSE framing, so
//! every recipient shares the same bytes. An event payload never holds a raw newline
//! (newlines between JSON tokens become spaces), so it fits in one SSE `data:` line.

use std::borrow::Cow;
use std::io::Write;
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use serde::Deserialize;
use serde_json::value::RawValue;

/// An event payload being written.
struct Builder {
    buf: BytesMut,
}

impl Builder {
    fn new(capacity: usize) -> Self {
        Builder {
            buf: BytesMut::with_capacity(capacity),
        }
    }

    fn payload(&mut self) -> &mut BytesMut {
        &mut self.buf
    }

    fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

/// Longest user id or channel name.
pub const MAX_NAME_LEN: usize = 128;

/// A user id is 1–128 characters of `[A-Za-z0-9_.@-]`.
pub fn valid_user(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_NAME_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'@' | b'-'))
}

/// Most channels one connection may join.
pub const MAX_CHANNELS_PER_CONN: usize = 1024;
/// Why a `private:` channel was refused (WebSocket `forbidden` error, SSE 403).
pub const FORBIDDEN_CHANNEL: &str = "this channel needs a token that grants it";

/// Why a `since` (a query parameter) was refused.
pub const SINCE_FORMAT: &str = "since must be <epoch>:<offset> or confirmed";

/// A channel name is 1–128 characters of `[A-Za-z0-9_.:@/-]`.
pub fn valid_channel(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'@' | b'/' | b'-')
        })
}

/// A client request, borrowing from the payload it was parsed from.
#[derive(Debug)]
pub enum Op<'a> {
    /// Direct message to every connection of `to`; `qos` 1 stores it first (both inboxes).
    Send {
        to: Cow<'a, str>,
        data: &'a RawValue,
        qos: u8,
    },
    /// Join a channel; with `since`, replay its stream after that position first; with
    /// `join_leave`, also get `join`/`leave` events (channels whose rule tells them).
    Sub {
        channel: Cow<'a, str>,
        since: Option<StreamPos>,
        join_leave: bool,
    },
    /// The members of a channel (across the cluster).
    Presence { channel: Cow<'a, str> },
    /// Leave a channel.
    Unsub { channel: Cow<'a, str> },
    /// Publish to every subscriber of a channel.
    Pub {
        channel: Cow<'a, str>,
        data: &'a RawValue,
    },
    /// Application-level ping; answered with `pong` carrying the same data.
    Ping { data: &'a RawValue },
    /// The client has shown its `stream` up to `offset` (moves its confirmed position).
    Confirm { stream: Cow<'a, str>, offset: u64 },
    /// A page of `stream`'s history after offset `since`, at most `limit` messages.
    History {
        stream: Cow<'a, str>,
        since: u64,
        limit: u64,
    },
}

/// A position in a stream as a client gives it: `{"epoch":"..","offset":N}` (epoch optional).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct StreamPos {
    /// The epoch the offset belongs to.
    #[serde(default)]
    pub epoch: Option<String>,
    /// The last offset the client has.
    pub offset: u64,
}

/// A parsed request: the op and the client's correlation id, if any.
#[derive(Debug)]
pub struct Parsed<'a> {
    /// What to do.
    pub op: Op<'a>,
    /// Raw JSON of `"id"`, echoed in `ack` / `error`.
    pub id: Option<&'a RawValue>,
}

/// Error codes of `{"op":"error"}` events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// Malformed JSON, unknown op, missing or mistyped field.
    BadRequest,
    /// Invalid channel name.
    BadChannel,
    /// `send` to a user with no open connection.
    UserOffline,
    /// The server could not route the request right now (a shard mailbox was full).
    Overloaded,
    /// The token does not allow the channel.
    Forbidden,
    /// The store is over its size budget: a qos-1 message was not stored.
    StoreFull,
    /// The cluster's broker (Redis) is unreachable: a message for other nodes was not sent.
    Unavailable,
    /// Over `--max-messages-per-sec` (and its burst): the op was dropped, not done.
    RateLimited,
}

impl ErrorCode {
    /// The snake_case code on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadRequest => "bad_request",
            ErrorCode::BadChannel => "bad_channel",
            ErrorCode::UserOffline => "user_offline",
            ErrorCode::Overloaded => "overloaded",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::StoreFull => "store_full",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::RateLimited => "rate_limited",
        }
    }
}

/// A request that could not be accepted; the connection stays open.
#[derive(Debug)]
pub struct RequestError<'a> {
    /// The request's `id`, when it could be read.
    pub id: Option<&'a RawValue>,
    /// Error code.
    pub code: ErrorCode,
    /// Human-readable explanation.
    pub message: Cow<'static, str>,
}

#[derive(Deserialize)]
struct Envelope<'a> {
    #[serde(borrow, default, deserialize_with = "borrowed")]
    op: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    to: Option<Cow<'a, str>>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    channel: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(borrow, default)]
    id: Option<&'a RawValue>,
    #[serde(default)]
    qos: Option<u64>,
    #[serde(borrow, default, deserialize_with = "borrowed")]
    stream: Option<Cow<'a, str>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(borrow, default)]
    since: Option<&'a RawValue>,
    #[serde(default)]
    limit: Option<u64>,
    #[serde(default)]
    join_leave: Option<bool>,
}

/// An optional string that borrows from the message unless it has escapes: serde borrows a
/// `Cow` only as a field of its own, not inside an `Option` (each would be a heap copy).
fn borrowed<'de: 'a, 'a, D>(d: D) -> Result<Option<Cow<'a, str>>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    struct Text<'b>(#[serde(borrow)] Cow<'b, str>);
    Ok(Option::<Text<'a>>::deserialize(d)?.map(|t| t.0))
}

const NULL_JSON: &str = "null";

fn null() -> &'static RawValue {
    // A static `null` used when `data` is absent or JSON null.
    static NULL: std::sync::OnceLock<Box<RawValue>> = std::sync::OnceLock::new();
    NULL.get_or_init(|| RawValue::from_string(NULL_JSON.to_owned()).expect("null is JSON"))
}

/// Parses one text message into a request.
pub fn parse<'a>(text: &'a str) -> Result<Parsed<'a>, RequestError<'a>> {
    let env: Envelope<'a> = serde_json::from_str(text).map_err(|e| RequestError {
        id: None,
        code: ErrorCode::BadRequest,
        message: format!("malformed JSON: {e}").into(),
    })?;
    let id = env.id;
    let bad = |code, message: &'static str| RequestError {
        id,
        code,
        message: message.into(),
    };
    if let Some(raw) = id {
        let s = raw.get();
        let number = s.starts_with(|c: char| c == '-' || c.is_ascii_digit());
        // A number every JSON reader can hold (a correlation id must compare exactly); an
        // unusable id is not echoed back.
        if !(s.starts_with('"') || number && s.parse::<f64>().is_ok_and(f64::is_finite)) {
            return Err(RequestError {
                id: None,
                code: ErrorCode::BadRequest,
                message: "`id` must be a string or a finite number".into(),
            });
        }
    }
    let op = env
        .op
        .ok_or_else(|| bad(ErrorCode::BadRequest, "missing field `op`"))?;
    let data: &'a RawValue = env.data.unwrap_or_else(|| null());
    let qos = match env.qos {
        None | Some(0) => 0,
        Some(1) => 1,
        Some(_) => return Err(bad(ErrorCode::BadRequest, "`qos` must be 0 or 1")),
    };
    let op = match op.as_ref() {
        "send" => {
            let to = env
                .to
                .ok_or_else(|| bad(ErrorCode::BadRequest, "missing field `to`"))?;
            if !valid_user(&to) {
                return Err(bad(
                    ErrorCode::BadRequest,
                    "`to` must be 1-128 characters of [A-Za-z0-9_.@-]",
                ));
            }
            Op::Send { to, data, qos }
        }
        "sub" => Op::Sub {
            channel: channel_of(env.channel, id)?,
            since: match env.since {
                None => None,
                Some(raw) => Some(serde_json::from_str::<StreamPos>(raw.get()).map_err(|_| {
                    bad(
                        ErrorCode::BadRequest,
                        "`since` must be {\"epoch\":\"..\",\"offset\":N}",
                    )
                })?),
            },
            join_leave: env.join_leave.unwrap_or(false),
        },
        "presence" => Op::Presence {
            channel: channel_of(env.channel, id)?,
        },
        "unsub" => Op::Unsub {
            channel: channel_of(env.channel, id)?,
        },
        "pub" => Op::Pub {
            channel: channel_of(env.channel, id)?,
            data,
        },
        "ping" => Op::Ping { data },
        "ack" => Op::Confirm {
            stream: env
                .stream
                .ok_or_else(|| bad(ErrorCode::BadRequest, "missing field `stream`"))?,
            offset: env
                .offset
                .ok_or_else(|| bad(ErrorCode::BadRequest, "missing or invalid `offset`"))?,
        },
        "history" => Op::History {
            stream: env
                .stream
                .ok_or_else(|| bad(ErrorCode::BadRequest, "missing field `stream`"))?,
            since: match env.since {
                None => 0,
                Some(raw) => raw
                    .get()
                    .parse()
                    .map_err(|_| bad(ErrorCode::BadRequest, "`since` must be an offset"))?,
            },
            limit: env.limit.unwrap_or(100).clamp(1, 1000),
        },
        _ => return Err(bad(ErrorCode::BadRequest, "unknown op")),
    };
    Ok(Parsed { op, id })
}

fn channel_of<'a>(
    channel: Option<Cow<'a, str>>,
    id: Option<&'a RawValue>,
) -> Result<Cow<'a, str>, RequestError<'a>> {
    let bad = |code, message: &'static str| RequestError {
        id,
        code,
        message: message.into(),
    };
    let c = channel.ok_or_else(|| bad(ErrorCode::BadRequest, "missing field `channel`"))?;
    if !valid_channel(&c) {
        return Err(bad(
            ErrorCode::BadChannel,
            "channel must be 1-128 characters of [A-Za-z0-9_.:@/-]",
        ));
    }
    Ok(c)
}

fn put_str(b: &mut Builder, s: &str) {
    // Serializing a &str into a growable buffer cannot fail.
    let _ = serde_json::to_writer(b.payload().writer(), s);
}

fn put(b: &mut Builder, raw: &[u8]) {
    b.payload().put_slice(raw);
}

/// Raw JSON from a client: a raw CR or LF can only be whitespace between tokens (inside a
/// string it would be invalid JSON), so it becomes a space and the event stays one line.
fn put_json(b: &mut Builder, raw: &[u8]) {
    if !raw.iter().any(|&c| c == b'\n' || c == b'\r') {
        return put(b, raw);
    }
    let out = b.payload();
    out.reserve(raw.len());
    for &c in raw {
        out.put_u8(if c == b'\n' || c == b'\r' { b' ' } else { c });
    }
}

fn put_u64(b: &mut Builder, v: u64) {
    let _ = write!(b.payload().writer(), "{v}");
}

/// `{"op":"welcome","user":..,"conn":..,"ping_interval_ms":..}`
pub fn welcome(user: &str, conn: &str, ping_interval_ms: u64) -> Bytes {
    let mut b = welcome_head(user, conn, ping_interval_ms);
    put(&mut b, b"}");
    b.finish()
}

/// A welcome without its closing brace.
fn welcome_head(user: &str, conn: &str, ping_interval_ms: u64) -> Builder {
    let mut b = Builder::new(128 + user.len());
    put(&mut b, br#"{"op":"welcome","user":"#);
    put_str(&mut b, user);
    put(&mut b, br#","conn":"#);
    put_str(&mut b, conn);
    put(&mut b, br#","ping_interval_ms":"#);
    put_u64(&mut b, ping_interval_ms);
    b
}

/// `"epoch":..,"offset":N` and, for a resume, `,"recovered":bool[,"reason":..]`.
fn put_position(b: &mut Builder, epoch: &str, offset: u64, resume: Option<Result<(), &str>>) {
    put(b, br#""epoch":"#);
    put_str(b, epoch);
    put(b, br#","offset":"#);
    put_u64(b, offset);
    match resume {
        None => {}
        Some(Ok(())) => put(b, br#","recovered":true"#),
        Some(Err(reason)) => {
            put(b, br#","recovered":false,"reason":"#);
            put_str(b, reason);
        }
    }
}

/// Where a `msg` was addressed.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A direct message to a user.
    User(&'a str),
    /// A channel publication.
    Channel(&'a str),
    /// A broadcast to every connection (push API): neither `to` nor `channel`.
    Broadcast,
}

/// `{"op":"msg","from":..,"to"|"channel":..,"data":..,"ts":..}`
pub fn msg(from: &str, target: Target<'_>, data: &RawValue, ts_ms: u64) -> Bytes {
    let mut b = msg_builder(from, target, data, ts_ms);
    put(&mut b, b"}");
    b.finish()
}

/// [`msg`] written into `out` (cleared first), a buffer the caller reuses: a DM delivered
/// on this shard is copied from it into each recipient's outbox, with no allocation.
pub fn msg_into(out: &mut BytesMut, from: &str, target: Target<'_>, data: &RawValue, ts_ms: u64) {
    out.clear();
    let mut b = Builder {
        buf: std::mem::take(out),
    };
    put_msg(&mut b, from, target, data, ts_ms);
    put(&mut b, b"}");
    *out = b.buf;
}

/// A `msg` event without its closing brace, for the store to complete with `stream`,
/// `offset` and `epoch`.
pub fn msg_prefix(from: &str, target: Target<'_>, data: &RawValue, ts_ms: u64) -> Bytes {
    msg_builder(from, target, data, ts_ms).finish()
}

/// A stored DM (qos 1): a `msg` event that also carries the sender's `id` (raw JSON), so the
/// sender's other connections can match it and the recipient's confirmation can name it in
/// a [`receipt_prefix`]. Everything but the closing brace.
pub fn stored_dm_prefix(
    from: &str,
    to: &str,
    data: &RawValue,
    ts_ms: u64,
    id: Option<&str>,
) -> Bytes {
    let mut b = msg_builder(from, Target::User(to), data, ts_ms);
    if let Some(id) = id {
        put(&mut b, br#","id":"#);
        put_json(&mut b, id.as_bytes());
    }
    b.finish()
}

/// A delivery receipt for the sender `to` of messages `ids` (raw JSON ids) that `from`
/// confirmed up to `upto` in `from`'s inbox: `{"op":"receipt","from":..,"to":..,
/// "ids":[..],"upto":N,"ts":N` (stored in the sender's inbox, which adds its position and
/// the closing brace).
pub fn receipt_prefix(from: &str, to: &str, ids: &[&RawValue], upto: u64, ts_ms: u64) -> Bytes {
    let mut b = Builder::new(64 + from.len() + to.len() + ids.len() * 16);
    put(&mut b, br#"{"op":"receipt","from":"#);
    put_str(&mut b, from);
    put(&mut b, br#","to":"#);
    put_str(&mut b, to);
    put(&mut b, br#","ids":["#);
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            put(&mut b, b",");
        }
        put_json(&mut b, id.get().as_bytes());
    }
    put(&mut b, br#"],"upto":"#);
    put_u64(&mut b, upto);
    put(&mut b, br#","ts":"#);
    put_u64(&mut b, ts_ms);
    b.finish()
}

fn msg_builder(from: &str, target: Target<'_>, data: &RawValue, ts_ms: u64) -> Builder {
    let mut b = Builder::new(64 + from.len() + data.get().len());
    put_msg(&mut b, from, target, data, ts_ms);
    b
}

/// Everything of a `msg` event but its closing brace.
fn put_msg(b: &mut Builder, from: &str, target: Target<'_>, data: &RawValue, ts_ms: u64) {
    let data = data.get();
    put(b, br#"{"op":"msg","from":"#);
    put_str(b, from);
    match target {
        Target::User(to) => {
            put(b, br#","to":"#);
            put_str(b, to);
        }
        Target::Channel(c) => {
            put(b, br#","channel":"#);
            put_str(b, c);
        }
        Target::Broadcast => {}
    }
    put(b, br#","data":"#);
    put_json(b, data.as_bytes());
    put(b, br#","ts":"#);
    put_u64(b, ts_ms);
}

/// `{"op":"join"|"leave","channel":..,"user":..,"conn":..}`: a connection of `user`
/// subscribed to (or left) `channel`.
pub fn join_leave(join: bool, channel: &str, user: &str, conn: &str) -> Bytes {
    let mut b = Builder::new(48 + channel.len() + user.len() + conn.len());
    put(
        &mut b,
        if join {
            JOIN_HEAD.as_bytes()
        } else {
            LEAVE_HEAD.as_bytes()
        },
    );
    put_str(&mut b, channel);
    put(&mut b, br#","user":"#);
    put_str(&mut b, user);
    put(&mut b, br#","conn":"#);
    put_str(&mut b, conn);
    put(&mut b, b"}");
    b.finish()
}

const JOIN_HEAD: &str = r#"{"op":"join","channel":"#;
const LEAVE_HEAD: &str = r#"{"op":"leave","channel":"#;

/// Whether an event is a `join`/`leave` (only subscribers who asked for them get it).
pub fn is_join_leave(payload: &[u8]) -> bool {
    payload.starts_with(JOIN_HEAD.as_bytes()) || payload.starts_with(LEAVE_HEAD.as_bytes())
}

/// `{"channel":..,"subscribers":n,"anonymous":a,"members":[{"user":..,"connections":n},..],
/// "complete":bool}`: who is subscribed to `channel`, from a tally of user → subscriptions
/// (`""`: anonymous ones; sorted by user); `complete` is false when other nodes could not be
/// asked (Redis unreachable). The body of `GET /api/channels/<name>/presence`.
pub fn presence_json(
    channel: &str,
    tally: &[(Arc<str>, u64)],
    complete: bool,
) -> serde_json::Value {
    let mut anonymous = 0;
    let mut members = Vec::with_capacity(tally.len());
    for (user, n) in tally {
        if user.is_empty() {
            anonymous += n;
        } else {
            members.push(serde_json::json!({ "user": &**user, "connections": n }));
        }
    }
    let subscribers: u64 = tally.iter().map(|(_, n)| n).sum();
    serde_json::json!({
        "channel": channel,
        "subscribers": subscribers,
        "anonymous": anonymous,
        "members": members,
        "complete": complete,
    })
}

/// `{"op":"presence","id":..,` then [`presence_json`]'s fields: the answer to the `presence`
/// op (`id` is the raw JSON of the request's id).
pub fn presence(
    id: Option<&str>,
    channel: &str,
    tally: &[(Arc<str>, u64)],
    complete: bool,
) -> Bytes {
    let mut v = presence_json(channel, tally, complete);
    v["op"] = "presence".into();
    if let Some(id) = id.and_then(|i| serde_json::from_str::<serde_json::Value>(i).ok()) {
        v["id"] = id;
    }
    Bytes::from(serde_json::to_vec(&v).unwrap_or_default())
}

/// `{"op":"ack","id":..}`
/// `id` is the raw JSON of the request's id.
pub fn ack(id: &str) -> Bytes {
    let mut b = Builder::new(24 + id.len());
    put(&mut b, br#"{"op":"ack","id":"#);
    put_json(&mut b, id.as_bytes());
    put(&mut b, b"}");
    b.finish()
}

/// [`ack`] written into `out` (a reused buffer: nothing allocated once it is large enough).
pub fn ack_into(out: &mut BytesMut, id: &str) {
    let mut b = Builder {
        buf: std::mem::take(out),
    };
    put(&mut b, br#"{"op":"ack","id":"#);
    put_json(&mut b, id.as_bytes());
    put(&mut b, b"}");
    *out = b.buf;
}

/// `{"op":"error","id":..,"code":..,"message":..}` (`id` omitted when unknown).
/// `id` is the raw JSON of the request's id.
pub fn error(id: Option<&str>, code: ErrorCode, message: &str) -> Bytes {
    let mut b = Builder::new(64 + message.len());
    put(&mut b, br#"{"op":"error","#);
    if let Some(id) = id {
        put(&mut b, br#""id":"#);
        put_json(&mut b, id.as_bytes());
        put(&mut b, b",");
    }
    put(&mut b, br#""code":"#);
    put_str(&mut b, code.as_str());
    put(&mut b, br#","message":"#);
    put_str(&mut b, message);
    put(&mut b, b"}");
    b.finish()
}

/// `{"op":"ack","id":..,"stream":"inbox","offset":N,"epoch":"E","queued":bool}` for a stored
/// message; a retry answered from the dedup window has `"duplicate":true` instead of `queued`.
pub fn stream_ack(id: &str, offset: u64, epoch: &str, queued: Option<bool>) -> Bytes {
    stream_ack_in("inbox", id, offset, epoch, queued)
}

/// [`stream_ack`] for any stream (`channel:<name>` for a stored publication).
pub fn stream_ack_in(
    stream: &str,
    id: &str,
    offset: u64,
    epoch: &str,
    queued: Option<bool>,
) -> Bytes {
    let mut b = Builder::new(96 + id.len() + stream.len());
    put(&mut b, br#"{"op":"ack","id":"#);
    put_json(&mut b, id.as_bytes());
    put(&mut b, br#","stream":"#);
    put_str(&mut b, stream);
    put(&mut b, br#","offset":"#);
    put_u64(&mut b, offset);
    put(&mut b, br#","epoch":"#);
    put_str(&mut b, epoch);
    match queued {
        Some(q) => put(
            &mut b,
            if q {
                br#","queued":true}"#
            } else {
                br#","queued":false}"#
            },
        ),
        None => put(&mut b, br#","duplicate":true}"#),
    }
    b.finish()
}

/// A history page: `{"op":"history","id":..,"stream":"inbox","epoch":..,"first":..,"top":..,
/// "next":..,"messages":[..]}` (`op`/`id` only for a WebSocket answer, `stream` as named).
pub fn history(
    op_id: Option<Option<&str>>,
    stream: &str,
    epoch: &str,
    (first, top, next): (u64, u64, u64),
    messages: &[(u64, Bytes)],
) -> Bytes {
    let bytes: usize = messages.iter().map(|(_, m)| m.len() + 1).sum();
    let mut b = Builder::new(128 + bytes);
    put(&mut b, b"{");
    if let Some(id) = op_id {
        put(&mut b, br#""op":"history","#);
        if let Some(id) = id {
            put(&mut b, br#""id":"#);
            put_json(&mut b, id.as_bytes());
            put(&mut b, b",");
        }
    }
    put(&mut b, br#""stream":"#);
    put_str(&mut b, stream);
    put(&mut b, br#","epoch":"#);
    put_str(&mut b, epoch);
    put(&mut b, br#","first":"#);
    put_u64(&mut b, first);
    put(&mut b, br#","top":"#);
    put_u64(&mut b, top);
    put(&mut b, br#","next":"#);
    put_u64(&mut b, next);
    put(&mut b, br#","messages":["#);
    for (i, (_, m)) in messages.iter().enumerate() {
        if i > 0 {
            put(&mut b, b",");
        }
        put(&mut b, m);
    }
    put(&mut b, b"]}");
    b.finish()
}

/// Where the welcome says a user's inbox stands, and how a resume went.
#[derive(Debug, Clone, Copy)]
pub struct InboxInfo<'a> {
    /// The store's epoch.
    pub epoch: &'a str,
    /// The inbox's newest offset.
    pub offset: u64,
    /// For a resume: `Ok` when everything after the position follows, else the reason.
    pub resume: Option<Result<(), &'a str>>,
}

/// `{"op":"welcome",..,"inbox":{"epoch":..,"offset":N[,"recovered":bool[,"reason":..]]}}`
pub fn welcome_inbox(user: &str, conn: &str, ping_interval_ms: u64, inbox: InboxInfo<'_>) -> Bytes {
    let mut b = welcome_head(user, conn, ping_interval_ms);
    put(&mut b, br#","inbox":{"#);
    put_position(&mut b, inbox.epoch, inbox.offset, inbox.resume);
    put(&mut b, b"}}");
    b.finish()
}

/// An SSE `resume` event: `event: resume\ndata: {"epoch":..,"offset":N,"recovered":..}\n\n`.
pub fn resume_event(inbox: InboxInfo<'_>) -> Bytes {
    let mut b = Builder::new(128);
    put(&mut b, b"event: resume\ndata: {");
    let resume = inbox.resume.unwrap_or(Ok(()));
    put_position(&mut b, inbox.epoch, inbox.offset, Some(resume));
    put(&mut b, b"}\n\n");
    b.finish()
}

/// An SSE block with only an `id:` (the inbox position `<epoch>:<offset>`): the browser's
/// `EventSource` takes it as its last event id without firing an event, so a stream that
/// has not had a message yet still resumes from where it opened.
pub fn sse_position(epoch: &str, offset: u64) -> Bytes {
    Bytes::from(format!("id: {epoch}:{offset}\n\n"))
}

/// The answer to `sub` with `since`: `{"op":"ack","id":..,"stream":"channel:<c>","epoch":..,
/// "offset":TOP,"recovered":bool[,"reason":..]}`.
pub fn sub_ack(id: &str, stream: &str, epoch: &str, top: u64, resume: Result<(), &str>) -> Bytes {
    let mut b = Builder::new(128 + stream.len());
    put(&mut b, br#"{"op":"ack","id":"#);
    put_json(&mut b, id.as_bytes());
    put(&mut b, br#","stream":"#);
    put_str(&mut b, stream);
    put(&mut b, b",");
    put_position(&mut b, epoch, top, Some(resume));
    put(&mut b, b"}");
    b.finish()
}

/// `{"op":"pong","data":..}`
pub fn pong(data: &RawValue) -> Bytes {
    let mut b = Builder::new(24 + data.get().len());
    put(&mut b, br#"{"op":"pong","data":"#);
    put_json(&mut b, data.get().as_bytes());
    put(&mut b, b"}");
    b.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(p: &Bytes) -> serde_json::Value {
        serde_json::from_slice(p).unwrap()
    }

    #[test]
    fn events_are_one_line() {
        let data = RawValue::from_string("{\"a\":\r\n [1,\n2]}".into()).unwrap();
        let p = msg("a", Target::Channel("r"), &data, 1);
        assert!(!p.contains(&b'\n') && !p.contains(&b'\r'));
        assert_eq!(payload(&p)["data"], serde_json::json!({"a": [1, 2]}));
        assert!(!pong(&data).contains(&b'\n'));
    }

    #[test]
    fn names_borrow_from_the_message_unless_escaped() {
        let p = parse(r#"{"op":"send","to":"bob","data":1}"#).unwrap();
        assert!(matches!(
            p.op,
            Op::Send {
                to: Cow::Borrowed("bob"),
                ..
            }
        ));
        let p = parse(r#"{"op":"send","to":"b\u006fb","data":1}"#).unwrap();
        assert!(matches!(p.op, Op::Send { to: Cow::Owned(ref t), .. } if t == "bob"));
        let p = parse(r#"{"op":"s\u0065nd","to":"bob","data":1}"#).unwrap();
        assert!(matches!(p.op, Op::Send { .. }), "an escaped op still reads");
    }

    #[test]
    fn parses_every_op() {
        let p = parse(r#"{"op":"send","to":"bob","data":{"t":"hi"},"id":"c1"}"#).unwrap();
        assert!(
            matches!(p.op, Op::Send { ref to, data, qos: 0 } if to == "bob" && data.get() == r#"{"t":"hi"}"#)
        );
        assert_eq!(p.id.unwrap().get(), r#""c1""#);
        let p = parse(r#"{"op":"send","to":"bob","data":1,"qos":1}"#).unwrap();
        assert!(matches!(p.op, Op::Send { qos: 1, .. }));
        assert!(parse(r#"{"op":"send","to":"bob","data":1,"qos":2}"#).is_err());
        let p = parse(r#"{"op":"ack","stream":"inbox","offset":7}"#).unwrap();
        assert!(matches!(p.op, Op::Confirm { ref stream, offset: 7 } if stream == "inbox"));
        assert!(parse(r#"{"op":"ack","stream":"inbox"}"#).is_err());
        assert!(matches!(
            parse(r#"{"op":"sub","channel":"room1"}"#).unwrap().op,
            Op::Sub { since: None, .. }
        ));
        let p = parse(r#"{"op":"sub","channel":"room1","since":{"epoch":"ab","offset":3}}"#);
        assert!(matches!(
            p.unwrap().op,
            Op::Sub {
                since: Some(StreamPos { offset: 3, .. }),
                ..
            }
        ));
        assert!(parse(r#"{"op":"sub","channel":"r","since":3}"#).is_err());
        assert!(matches!(
            parse(r#"{"op":"sub","channel":"r","join_leave":true}"#)
                .unwrap()
                .op,
            Op::Sub {
                join_leave: true,
                ..
            }
        ));
        assert!(parse(r#"{"op":"sub","channel":"r","join_leave":1}"#).is_err());
        assert!(matches!(
            parse(r#"{"op":"presence","channel":"r"}"#).unwrap().op,
            Op::Presence { ref channel } if channel == "r"
        ));
        assert!(parse(r#"{"op":"presence"}"#).is_err());
        assert!(matches!(
            parse(r#"{"op":"history","stream":"inbox","since":4}"#)
                .unwrap()
                .op,
            Op::History { since: 4, .. }
        ));
        assert!(matches!(
            parse(r#"{"op":"unsub","channel":"a:b/c"}"#).unwrap().op,
            Op::Unsub { .. }
        ));
        let p = parse(r#"{"op":"pub","channel":"r","data":[1,2],"id":7}"#).unwrap();
        assert!(matches!(p.op, Op::Pub { data, .. } if data.get() == "[1,2]"));
        assert!(
            matches!(parse(r#"{"op":"ping"}"#).unwrap().op, Op::Ping { data } if data.get() == "null")
        );
    }

    #[test]
    fn errors_keep_the_id() {
        let e = parse(r#"{"op":"dance","id":"x"}"#).unwrap_err();
        assert_eq!(
            (e.code, e.id.unwrap().get()),
            (ErrorCode::BadRequest, r#""x""#)
        );
        let e = parse(r#"{"op":"send","id":"y","data":1}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        assert!(e.message.contains("`to`"));
        let e = parse(r#"{"op":"sub","channel":"bad channel!","id":1}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadChannel);
        let e = parse(r#"{"op":"send","to":"no spaces","data":1}"#).unwrap_err();
        assert_eq!(e.code, ErrorCode::BadRequest);
        let e = parse("{not json").unwrap_err();
        assert!(e.code == ErrorCode::BadRequest && e.id.is_none());
        let e = parse(r#"{"id":"z"}"#).unwrap_err();
        assert!(e.message.contains("`op`"));
        assert_eq!(
            parse(r#"{"op":"ping","id":{"a":1}}"#).unwrap_err().code,
            ErrorCode::BadRequest
        );
        // Found by the protocol_parser fuzz target: an id out of every reader's range was
        // echoed back in the error, which serde_json (and others) cannot read.
        let huge = format!(r#"{{"id":62e8{}}}"#, "6".repeat(60));
        let e = parse(&huge).unwrap_err();
        assert!(e.id.is_none(), "an unusable id is not echoed");
        let event = error(e.id.map(|r| r.get()), e.code, &e.message);
        serde_json::from_slice::<serde_json::Value>(&event).unwrap();
        assert!(parse(r#"{"op":"ping","id":-1.5e3}"#).is_ok());
    }

    #[test]
    fn names() {
        assert!(valid_user("alice.b@x-y_z"));
        assert!(!valid_user(""));
        assert!(!valid_user(&"a".repeat(129)));
        assert!(valid_user(&"a".repeat(128)));
        assert!(!valid_user("al ice"));
        assert!(!valid_user("a/b"));
        assert!(valid_channel("room:1/a@b"));
        assert!(!valid_channel("room 1"));
    }

    #[test]
    fn events_are_valid_json_frames() {
        let data = RawValue::from_string(r#"{"x":"é\"q"}"#.into()).unwrap();
        let v = payload(&msg("al\"ice", Target::User("bob"), &data, 42));
        assert_eq!(
            v,
            serde_json::json!({"op":"msg","from":"al\"ice","to":"bob","data":{"x":"é\"q"},"ts":42})
        );
        let v = payload(&msg("a", Target::Channel("r"), &data, 1));
        assert_eq!(v["channel"], "r");
        let v = payload(&welcome("alice", "0.1.2", 25000));
        assert_eq!(
            v,
            serde_json::json!({"op":"welcome","user":"alice","conn":"0.1.2","ping_interval_ms":25000})
        );
        let id = RawValue::from_string("\"c1\"".into()).unwrap();
        assert_eq!(
            payload(&ack(id.get())),
            serde_json::json!({"op":"ack","id":"c1"})
        );
        let v = payload(&error(
            Some(id.get()),
            ErrorCode::UserOffline,
            "bob is offline",
        ));
        assert_eq!(
            v,
            serde_json::json!({"op":"error","id":"c1","code":"user_offline","message":"bob is offline"})
        );
        let v = payload(&error(None, ErrorCode::BadRequest, "x"));
        assert!(v.get("id").is_none());
        assert_eq!(payload(&pong(&data))["data"]["x"], "é\"q");
        let mut p = msg_prefix("a", Target::User("b"), &data, 3).to_vec();
        p.extend_from_slice(br#","stream":"inbox","offset":4,"epoch":"e"}"#);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(
            (v["to"].as_str(), v["offset"].as_u64()),
            (Some("b"), Some(4))
        );
        let v = payload(&stream_ack(id.get(), 9, "ab", Some(true)));
        assert_eq!(
            v,
            serde_json::json!({"op":"ack","id":"c1","stream":"inbox","offset":9,"epoch":"ab","queued":true})
        );
        assert_eq!(payload(&stream_ack("1", 9, "ab", None))["duplicate"], true);
        let info = InboxInfo {
            epoch: "ab",
            offset: 5,
            resume: Some(Err("trimmed")),
        };
        let v = payload(&welcome_inbox("u", "0.1.1", 10, info));
        assert_eq!(
            v["inbox"],
            serde_json::json!({"epoch":"ab","offset":5,"recovered":false,"reason":"trimmed"})
        );
    }
}
