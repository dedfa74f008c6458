//! Streams in Redis (`--store redis`, the default with `--broker`): every node of a cluster
//! stores and reads the same streams, so a stream has one order cluster-wide and a client
//! resumes on whichever node it reconnects to.
//!
//! Storing a message is one Lua script, atomic in Redis: the dedup check, the next offset
//! (`INCR sb:o:<stream>`), `XADD sb:x:<stream>` with the offset as entry id and count
//! retention (`MAXLEN`), age retention of the oldest entries, the dedup entry, and the
//! `PUBLISH` of the finished event to the stream's Redis channel (`sb:u:<user>`,
//! `sb:c:<channel>`). Every node subscribed there — this one included — delivers it from the
//! subscriber thread, so deliveries of one stream leave Redis in offset order on one path.
//! The store thread pipelines a batch's scripts in one round trip and acknowledges each
//! sender once Redis answered; Redis unreachable → `unavailable`, never an ack.
//!
//! The epoch lives in `sb:epoch` (set once): a Redis that lost its data gets a new one, so
//! clients learn their positions no longer hold. What Redis keeps across its own restarts is
//! up to its persistence settings (AOF with `appendfsync always` for the durability of the
//! embedded store).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::Receiver;
use redis::Value;
use tracing::{error, info, warn};

use super::backend::new_epoch;
use super::streams::{Epoch, Retention, StreamMeta, Unrecoverable};
use super::{
    channel_stream, inbox_stream, next_batch, plan_resume, put_trailer, read_page, unix_ms,
    wire_name, ChannelOpened, History, Opened, Page, Refusal, Since, Sink, Store, StoreConfig,
    StoreError, StoreHandle, StoreMsg, StoreReq, Waited, BATCH_MAX, PAGE_ITEMS, STORE_QUEUE,
};
use crate::metrics::StoreMetrics;

/// Stores one message in one or two streams and publishes it (the envelope is the broker's:
/// [`crate::broker::open_stored`]). KEYS: dedup key or "". ARGV:
/// body, ts, max count, ttl ms, dedup window ms, epoch candidate, node, then per stream
/// (stream, wire name, Redis channel, excluded connection or "-"). Answers
/// `{"ok", offset of the last stream, epoch, receivers of the first publish}` or
/// `{"dup", first offset, epoch}`.
const STORE_SCRIPT: &str = r#"
local epoch = redis.call('GET', 'sb:epoch')
if not epoch then
  redis.call('SET', 'sb:epoch', ARGV[6], 'NX')
  epoch = redis.call('GET', 'sb:epoch')
end
if KEYS[1] ~= '' then
  local d = redis.call('GET', KEYS[1])
  if d then return {'dup', tonumber(d), epoch, 0} end
end
local ts = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
local last, first_n = 0, 0
local i = 8
while ARGV[i] do
  local stream, wire, chan, exclude = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local key = 'sb:x:' .. stream
  local o = redis.call('INCR', 'sb:o:' .. stream)
  redis.call('XADD', key, 'MAXLEN', ARGV[3], o .. '-0', 'p', ARGV[1], 't', ARGV[2])
  if ttl > 0 then
    for _ = 1, 8 do
      local h = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
      if #h == 0 or tonumber(h[1][2][4]) >= ts - ttl then break end
      redis.call('XDEL', key, h[1][1])
    end
  end
  local ev = ARGV[1] .. ',"stream":"' .. wire .. '","offset":' .. o .. ',"epoch":"' .. epoch .. '"}'
  local n = redis.call('PUBLISH', chan, '*' .. o .. ' ' .. exclude .. ' ' .. ARGV[7] .. '\n' .. ev)
  if i == 8 then first_n = n end
  last = o
  i = i + 4
end
if KEYS[1] ~= '' then redis.call('SET', KEYS[1], last, 'PX', ARGV[5]) end
return {'ok', last, epoch, first_n}
"#;

/// Moves a user's confirmed position forward (never back, never past the top). KEYS:
/// confirmed hash, the inbox's offset counter. ARGV: user, offset.
const CONFIRM_SCRIPT: &str = r#"
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
local cur = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
local o = math.min(tonumber(ARGV[2]), top)
if o > cur then redis.call('HSET', KEYS[1], ARGV[1], o) end
return 0
"#;

/// Confirmed inbox positions, by user.
const CONFIRMED: &str = "sb:confirmed";
/// How long a Redis command may take before the connection counts as lost.
const TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait before connecting again after a failure.
const RETRY: Duration = Duration::from_millis(500);

/// Starts the store thread on `client`'s Redis (which must answer now).
pub fn start(
    client: redis::Client,
    node: Arc<str>,
    cfg: StoreConfig,
    sink: Sink,
    metrics: Arc<StoreMetrics>,
) -> Result<Store, StoreError> {
    let mut w = Worker {
        client,
        con: None,
        retry_at: None,
        node,
        cfg,
        sink,
        metrics,
        out: Vec::new(),
        store: redis::Script::new(STORE_SCRIPT),
        confirm: redis::Script::new(CONFIRM_SCRIPT),
    };
    w.connect()
        .map_err(|e| StoreError::Redis(format!("cannot reach Redis: {e}")))?;
    let epoch = w.epoch().map_err(|e| StoreError::Redis(e.to_string()))?;
    info!(epoch = %epoch, "store open: streams in Redis");
    let (tx, rx) = crossbeam_channel::bounded(STORE_QUEUE);
    let thread = std::thread::Builder::new()
        .name("store".into())
        .spawn(move || w.run(rx))
        .map_err(|e| StoreError::Redis(format!("cannot spawn the store thread: {e}")))?;
    Ok(Store {
        handle: StoreHandle::new(tx),
        thread: Some(thread),
    })
}

/// What an answer of a pipelined script is for.
enum Pending {
    Send {
        reply: Option<crate::ids::ReplyTo>,
    },
    Publish {
        reply: Option<crate::ids::ReplyTo>,
        channel: Arc<str>,
    },
    Confirm,
}

/// A stream as Redis holds it.
struct Head {
    epoch: Epoch,
    meta: StreamMeta,
}

struct Worker {
    client: redis::Client,
    con: Option<redis::Connection>,
    retry_at: Option<Instant>,
    node: Arc<str>,
    cfg: StoreConfig,
    sink: Sink,
    metrics: Arc<StoreMetrics>,
    out: Vec<(u16, StoreMsg)>,
    store: redis::Script,
    confirm: redis::Script,
}

impl Worker {
    fn run(&mut self, rx: Receiver<StoreReq>) {
        let mut reqs = Vec::with_capacity(BATCH_MAX);
        loop {
            match next_batch(&rx, &mut reqs) {
                Waited::Closed => return,
                // Retention is applied by the scripts as messages are stored.
                Waited::Idle => {}
                Waited::Batch => {
                    if self.apply(&mut reqs) {
                        info!("store stopped");
                        return;
                    }
                }
            }
        }
    }

    /// Connects (scripts loaded) unless connected; fails fast while backing off.
    fn connect(&mut self) -> redis::RedisResult<&mut redis::Connection> {
        if self.con.is_none() {
            if self.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "Redis unreachable; retrying",
                )));
            }
            let attempt = (|| {
                let mut c = self.client.get_connection_with_timeout(TIMEOUT)?;
                c.set_read_timeout(Some(TIMEOUT))?;
                c.set_write_timeout(Some(TIMEOUT))?;
                self.store.load(&mut c)?;
                self.confirm.load(&mut c)?;
                Ok::<_, redis::RedisError>(c)
            })();
            match attempt {
                Ok(c) => {
                    if self.retry_at.take().is_some() {
                        info!("store: Redis reachable again");
                    }
                    self.con = Some(c);
                }
                Err(e) => {
                    if self.retry_at.is_none() {
                        warn!(error = %e, "store: Redis unreachable; qos-1 sends answer unavailable");
                    }
                    self.retry_at = Some(Instant::now() + RETRY);
                    return Err(e);
                }
            }
        }
        Ok(self.con.as_mut().expect("connected"))
    }

    /// A command failed on the connection: drop it (the next request reconnects).
    fn lost(&mut self, e: &redis::RedisError) {
        if self.con.take().is_some() {
            warn!(error = %e, "store: Redis connection lost");
            // Not moved while already waiting: requests keep coming, the retry must too.
            self.retry_at = Some(Instant::now() + RETRY);
        }
    }

    /// The cluster's epoch (set now if Redis has none).
    fn epoch(&mut self) -> redis::RedisResult<Epoch> {
        let candidate = new_epoch().to_string();
        let c = self.connect()?;
        let (e,): (String,) = redis::pipe()
            .cmd("SET")
            .arg("sb:epoch")
            .arg(candidate)
            .arg("NX")
            .ignore()
            .cmd("GET")
            .arg("sb:epoch")
            .query(c)?;
        e.parse()
            .map_err(|_| redis::RedisError::from((redis::ErrorKind::Parse, "sb:epoch is not hex")))
    }

    /// Writes first (one pipeline), then reads, then every answer; true on shutdown.
    fn apply(&mut self, reqs: &mut Vec<StoreReq>) -> bool {
        let now = unix_ms();
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        let mut pending = Vec::new();
        let mut reads = Vec::new();
        let mut stop = false;
        let n = reqs.len();
        let epoch_candidate = new_epoch().to_string();
        for r in reqs.drain(..) {
            match r {
                StoreReq::SendDm {
                    from,
                    to,
                    prefix,
                    id,
                    reply,
                    sender,
                    sender_copy,
                } => {
                    let dedup = id.map(|i| format!("sb:d:{from}:{i}"));
                    let mut inv = self.store_cmd(dedup.as_deref(), &prefix, now, self.cfg.inbox);
                    inv.arg(&epoch_candidate).arg(&*self.node);
                    inv.arg(inbox_stream(&to))
                        .arg("inbox")
                        .arg(crate::broker::user_channel(&to))
                        .arg(if from == to {
                            sender.map_or_else(|| "-".to_owned(), |c| c.to_string())
                        } else {
                            "-".to_owned()
                        });
                    if from != to && sender_copy {
                        inv.arg(inbox_stream(&from))
                            .arg("inbox")
                            .arg(crate::broker::user_channel(&from))
                            .arg(sender.map_or_else(|| "-".to_owned(), |c| c.to_string()));
                    }
                    pipe.add_command(inv);
                    pending.push(Pending::Send { reply });
                }
                StoreReq::Publish {
                    channel,
                    retention,
                    prefix,
                    id,
                    publisher,
                    reply,
                } => {
                    let stream = channel_stream(&channel);
                    let dedup = id.map(|i| format!("sb:d:{publisher}:{stream}/{i}"));
                    let mut inv = self.store_cmd(dedup.as_deref(), &prefix, now, retention);
                    inv.arg(&epoch_candidate).arg(&*self.node);
                    inv.arg(&stream)
                        .arg(wire_name(&stream))
                        .arg(crate::broker::channel_channel(&channel))
                        .arg("-");
                    pipe.add_command(inv);
                    pending.push(Pending::Publish { reply, channel });
                }
                StoreReq::Confirm { user, offset } => {
                    let mut inv = redis::cmd("EVALSHA");
                    inv.arg(self.confirm.get_hash())
                        .arg(2)
                        .arg(CONFIRMED)
                        .arg(format!("sb:o:{}", inbox_stream(&user)))
                        .arg(&*user)
                        .arg(offset);
                    pipe.add_command(inv);
                    pending.push(Pending::Confirm);
                }
                StoreReq::Shutdown => stop = true,
                read => reads.push(read),
            }
        }
        if !pending.is_empty() {
            let t = Instant::now();
            let answers = match self.connect() {
                Ok(c) => pipe.query::<Vec<redis::RedisResult<Value>>>(c),
                Err(e) => Err(e),
            };
            match answers {
                Ok(answers) => {
                    let us = t.elapsed().as_micros() as u64;
                    self.metrics.commit(us, pending.len() as u64, n as u64);
                    for (p, a) in pending.into_iter().zip(answers) {
                        self.answer(p, a);
                    }
                }
                Err(e) => {
                    self.lost(&e);
                    for p in pending {
                        self.answer(p, Err(e.clone()));
                    }
                }
            }
        }
        for r in reads {
            self.read(r);
        }
        self.post_all();
        stop
    }

    /// `EVALSHA` of [`STORE_SCRIPT`] up to its per-stream arguments (the epoch candidate
    /// and the node come next).
    fn store_cmd(
        &self,
        dedup: Option<&str>,
        body: &[u8],
        now: u64,
        retention: Retention,
    ) -> redis::Cmd {
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.store.get_hash())
            .arg(1)
            .arg(dedup.unwrap_or(""))
            .arg(body)
            .arg(now)
            .arg(retention.max_count.max(1))
            .arg(retention.ttl_ms)
            .arg(self.cfg.dedup_window_ms.max(1));
        c
    }

    /// Answers the sender of a stored (or refused) message.
    fn answer(&mut self, p: Pending, a: redis::RedisResult<Value>) {
        let (reply, channel) = match p {
            Pending::Send { reply } => (reply, None),
            Pending::Publish { reply, channel } => (reply, Some(channel)),
            Pending::Confirm => {
                if let Err(e) = a {
                    warn!(error = %e, "store: a confirmed position was not stored");
                }
                return;
            }
        };
        let parsed = a.and_then(|v| {
            redis::from_redis_value::<(String, u64, String, Option<u64>)>(v).map_err(Into::into)
        });
        let Some(reply) = reply else {
            if let Err(e) = parsed {
                warn!(error = %e, "store: a message without a reply was not stored");
            }
            return;
        };
        let shard = reply.conn.shard;
        let publish = channel.is_some();
        let msg = match parsed {
            Ok((kind, offset, epoch, receivers)) => {
                let epoch = epoch.parse().unwrap_or(Epoch(0));
                let dup = kind == "dup";
                if dup {
                    StoreMetrics::add(&self.metrics.dedup_hits, 1);
                } else {
                    StoreMetrics::add(&self.metrics.appends, 1);
                }
                StoreMsg::Ack {
                    reply,
                    offset,
                    epoch,
                    queued: match (dup, &channel) {
                        (true, _) => None,
                        (false, Some(_)) => Some(false),
                        (false, None) => Some(receivers == Some(0)),
                    },
                    channel,
                }
            }
            Err(e) => {
                StoreMetrics::add(&self.metrics.refused, 1);
                let why = if e.to_string().contains("OOM") {
                    Refusal::Full
                } else {
                    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                        self.lost(&e);
                    } else {
                        error!(error = %e, "store: Redis refused a message");
                    }
                    Refusal::Unavailable
                };
                StoreMsg::Refused {
                    reply,
                    why,
                    publish,
                }
            }
        };
        self.out.push((shard, msg));
    }

    /// Where `stream` stands in Redis.
    fn head(&mut self, stream: &str) -> redis::RedisResult<Head> {
        let c = self.connect()?;
        let (epoch, top, first): (Option<String>, Option<u64>, Value) = redis::pipe()
            .cmd("GET")
            .arg("sb:epoch")
            .cmd("GET")
            .arg(format!("sb:o:{stream}"))
            .cmd("XRANGE")
            .arg(format!("sb:x:{stream}"))
            .arg("-")
            .arg("+")
            .arg("COUNT")
            .arg(1)
            .query(c)?;
        let top = top.unwrap_or(0);
        let first = entries(first).first().map_or(top + 1, |e| e.0);
        Ok(Head {
            epoch: epoch.and_then(|e| e.parse().ok()).unwrap_or(Epoch(0)),
            meta: StreamMeta {
                first: first.max(1),
                next: top + 1,
                bytes: 0,
            },
        })
    }

    /// Up to `limit` events of `stream` from offset `from` on.
    fn range(
        &mut self,
        stream: &str,
        epoch: Epoch,
        from: u64,
        limit: usize,
    ) -> redis::RedisResult<Vec<(u64, Bytes)>> {
        let c = self.connect()?;
        let v: Value = redis::cmd("XRANGE")
            .arg(format!("sb:x:{stream}"))
            .arg(format!("{from}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(limit)
            .query(c)?;
        let wire = wire_name(stream);
        Ok(entries(v)
            .into_iter()
            .map(|(o, body)| {
                let mut p = body;
                put_trailer(&mut p, wire, o, epoch);
                (o, Bytes::from(p))
            })
            .collect())
    }

    /// A page of `stream` from `from`, read against `head`.
    fn page(&mut self, stream: &str, head: &Head, from: u64) -> redis::RedisResult<Page> {
        let metrics = self.metrics.clone();
        read_page(&head.meta, from, &metrics, |from| {
            self.range(stream, head.epoch, from, PAGE_ITEMS)
        })
    }

    /// Where a resume from `since` starts, and its first page.
    fn resume(
        &mut self,
        stream: &str,
        head: &Head,
        since: Since,
        confirmed: u64,
    ) -> redis::RedisResult<(Result<(), Unrecoverable>, Page)> {
        let plan = plan_resume(&head.meta, head.epoch, since, confirmed, &self.metrics);
        let page = self.page(stream, head, plan.from)?;
        Ok((plan.lost.map_or(Ok(()), Err), page))
    }

    fn confirmed(&mut self, user: &str) -> redis::RedisResult<u64> {
        let c = self.connect()?;
        let v: Option<u64> = redis::cmd("HGET").arg(CONFIRMED).arg(user).query(c)?;
        Ok(v.unwrap_or(0))
    }

    /// Answers a read; Redis unreachable → an answer that says so (never a silent drop).
    fn read(&mut self, r: StoreReq) {
        match self.answer_read(&r) {
            Ok(Some(answer)) => self.out.push(answer),
            Ok(None) => {}
            Err(e) => {
                self.lost(&e);
                self.unavailable(r);
            }
        }
    }

    /// The answer to a read request, and the shard it goes to.
    fn answer_read(&mut self, r: &StoreReq) -> redis::RedisResult<Option<(u16, StoreMsg)>> {
        Ok(Some(match r {
            StoreReq::Open { user, conn, since } => {
                let stream = inbox_stream(user);
                let head = self.head(&stream)?;
                let (resume, page) = match *since {
                    None => (None, Page::default()),
                    Some(s) => {
                        let confirmed = match s {
                            Since::Confirmed => self.confirmed(user)?,
                            Since::Position { .. } => 0,
                        };
                        let (resume, page) = self.resume(&stream, &head, s, confirmed)?;
                        (Some(resume), page)
                    }
                };
                let o = Opened {
                    conn: *conn,
                    epoch: head.epoch,
                    top: head.meta.top(),
                    resume,
                    page,
                };
                (conn.shard, StoreMsg::Opened(Box::new(o)))
            }
            StoreReq::Page { stream, conn, from } => {
                let name = stream.name();
                let head = self.head(&name)?;
                let page = self.page(&name, &head, *from)?;
                let msg = StoreMsg::Page {
                    conn: *conn,
                    stream: stream.clone(),
                    page,
                };
                (conn.shard, msg)
            }
            StoreReq::History {
                user,
                from,
                limit,
                conn,
                id,
            } => {
                let stream = inbox_stream(user);
                let head = self.head(&stream)?;
                let from = (*from).max(head.meta.first);
                let entries = if from >= head.meta.next {
                    Vec::new()
                } else {
                    self.range(&stream, head.epoch, from, *limit)?
                };
                let next = entries.last().map_or(from.min(head.meta.next), |e| e.0 + 1);
                let h = History {
                    conn: *conn,
                    id: id.clone(),
                    user: user.clone(),
                    epoch: head.epoch,
                    first: head.meta.first,
                    top: head.meta.top(),
                    entries,
                    next,
                };
                (conn.shard, StoreMsg::History(Box::new(h)))
            }
            StoreReq::Unread {
                user,
                conn,
                connections,
            } => {
                let head = self.head(&inbox_stream(user))?;
                let confirmed = self.confirmed(user)?.max(head.meta.first.saturating_sub(1));
                let msg = StoreMsg::Unread {
                    conn: *conn,
                    connections: *connections,
                    unread: head.meta.top().saturating_sub(confirmed),
                };
                (conn.shard, msg)
            }
            StoreReq::OpenChannel {
                channel,
                conn,
                since,
                id,
            } => {
                let stream = channel_stream(channel);
                let head = self.head(&stream)?;
                let top = head.meta.top();
                // Channels keep no confirmed position: `confirmed` means from now on.
                let (resume, page) = self.resume(&stream, &head, *since, top)?;
                let o = ChannelOpened {
                    conn: *conn,
                    channel: channel.clone(),
                    id: id.clone(),
                    epoch: head.epoch,
                    top,
                    resume,
                    page,
                };
                (conn.shard, StoreMsg::ChannelOpened(Box::new(o)))
            }
            _ => return Ok(None),
        }))
    }

    /// The answer to a read Redis could not serve: the connection is told its position is
    /// unknown (`unavailable`), a waiting HTTP request gets an empty answer.
    fn unavailable(&mut self, r: StoreReq) {
        let lost = Err(Unrecoverable::Unavailable);
        let done = Page {
            entries: Vec::new(),
            next: 0,
            done: true,
        };
        let msg = match r {
            StoreReq::Open { conn, since, .. } => (
                conn.shard,
                StoreMsg::Opened(Box::new(Opened {
                    conn,
                    epoch: Epoch(0),
                    top: 0,
                    resume: since.map(|_| lost),
                    page: done,
                })),
            ),
            StoreReq::Page { stream, conn, .. } => (
                conn.shard,
                StoreMsg::Page {
                    conn,
                    stream,
                    page: done,
                },
            ),
            StoreReq::History { user, conn, id, .. } => (
                conn.shard,
                StoreMsg::History(Box::new(History {
                    conn,
                    id,
                    user,
                    epoch: Epoch(0),
                    first: 0,
                    top: 0,
                    entries: Vec::new(),
                    next: 0,
                })),
            ),
            StoreReq::Unread {
                conn, connections, ..
            } => (
                conn.shard,
                StoreMsg::Unread {
                    conn,
                    connections,
                    unread: 0,
                },
            ),
            StoreReq::OpenChannel {
                channel, conn, id, ..
            } => (
                conn.shard,
                StoreMsg::ChannelOpened(Box::new(ChannelOpened {
                    conn,
                    channel,
                    id,
                    epoch: Epoch(0),
                    top: 0,
                    resume: lost,
                    page: done,
                })),
            ),
            _ => return,
        };
        self.out.push(msg);
    }

    fn post_all(&mut self) {
        super::post_each(&self.sink, &mut self.out);
    }
}

/// `(offset, body)` of each entry of an `XRANGE` answer (ids `<offset>-0`, field `p`).
fn entries(v: Value) -> Vec<(u64, Vec<u8>)> {
    let Value::Array(items) = v else {
        return Vec::new();
    };
    let mut out = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(mut pair) = item else {
            continue;
        };
        if pair.len() != 2 {
            continue;
        }
        let fields = pair.pop();
        let id = pair.pop();
        let offset = match id {
            Some(Value::BulkString(b)) => std::str::from_utf8(&b)
                .ok()
                .and_then(|s| s.split('-').next())
                .and_then(|s| s.parse().ok()),
            Some(Value::SimpleString(s)) => s.split('-').next().and_then(|s| s.parse().ok()),
            _ => None,
        };
        let Some(offset) = offset else { continue };
        let Some(Value::Array(fields)) = fields else {
            continue;
        };
        let body = fields.chunks(2).find_map(|kv| match kv {
            [Value::BulkString(k), Value::BulkString(v)] if k == b"p" => Some(v.clone()),
            _ => None,
        });
        if let Some(body) = body {
            out.push((offset, body));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn xrange_answers_parse_into_offsets_and_bodies() {
        let v = Value::Array(vec![
            Value::Array(vec![
                bulk("7-0"),
                Value::Array(vec![bulk("p"), bulk("{\"a\":1"), bulk("t"), bulk("5")]),
            ]),
            Value::Array(vec![bulk("8-0"), Value::Array(vec![bulk("t"), bulk("6")])]),
            Value::Array(vec![
                bulk("9-0"),
                Value::Array(vec![bulk("t"), bulk("6"), bulk("p"), bulk("x")]),
            ]),
        ]);
        assert_eq!(
            entries(v),
            vec![(7, b"{\"a\":1".to_vec()), (9, b"x".to_vec())],
            "an entry without a body is skipped"
        );
        assert!(entries(Value::Nil).is_empty());
    }
}
