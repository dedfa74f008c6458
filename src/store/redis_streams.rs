//! Streams in Redis (`--store redis`, the default with `--broker`): every node of a cluster
//! stores and reads the same streams, so a stream has one order cluster-wide and a client
//! resumes on whichever node it reconnects to.
//!
//! Storing a message is one Lua script, atomic in Redis: the dedup check, the next offset
//! (`INCR sb:o:<stream>`), `XADD sb:x:<stream>` with the offset as entry id and count
//! retention (`MAXLEN`), age retention of the oldest entries, the dedup entry, and the
//! publish of the finished event to the stream's Redis channel (`sb:u:{<user>}`,
//! `sb:c:{<channel>}`). Every node subscribed there — this one included — delivers it from
//! the subscriber threads, so deliveries of one stream leave Redis in offset order on one
//! path. The store thread pipelines a batch's scripts in one round trip per master and
//! acknowledges each sender once Redis answered; Redis unreachable → `unavailable`, never an
//! ack.
//!
//! Every key of a stream carries its name as hash tag (`sb:x:inbox:{bob}`), like its Redis
//! channel, so one script touches one slot of a Redis Cluster. A DM goes to two inboxes
//! (the recipient's and the sender's copy): one script on one Redis, one script per inbox in
//! a cluster, each atomic and deduplicated on its own, the sender acked once both are stored.
//!
//! Each stream has its epoch (`sb:e:<stream>`): a Redis (or a cluster master) that lost the
//! stream gives it a new one, so clients learn their positions no longer hold; one that may
//! have lost its last writes (another master than the one that wrote it, without
//! `--broker-min-replicas`: [`FENCE_SCRIPT`]) moves it to a new epoch that continues the old
//! one up to what it holds. What Redis keeps across its own restarts is up to its
//! persistence settings (AOF with `appendfsync always` for the durability of the embedded
//! store).

use std::sync::Arc;
use std::time::Instant;

use crate::queue;
use bytes::Bytes;
use redis::Value;
use tracing::{debug, error, info, warn};

use super::backend::new_epoch;
use super::lineage::Lineage;
use super::streams::{Epoch, Retention, StreamMeta, Unrecoverable};
use super::{
    channel_stream, inbox_stream, next_batch, plan_resume, put_trailer, read_page, unix_ms,
    wire_name, ChannelOpened, History, Opened, Page, Refusal, Since, Sink, Store, StoreConfig,
    StoreError, StoreHandle, StoreMsg, StoreReq, Waited, BATCH_MAX, STORE_QUEUE,
};
use crate::ids::ConnId;
use crate::metrics::StoreMetrics;

/// Lua the stream scripts share (put in front of each with `concat!`): the keys beside a
/// stream's epoch key, the master's replication id, and a stream's epoch, fenced by the
/// master that last wrote it when `rid` is given ([`FENCE_SCRIPT`] says why): another master
/// moves the stream to `candidate`, recording in `sb:p:` the epoch it continues and the last
/// offset both hold. Answers the epoch and, when it moved, the one it left.
macro_rules! epoch_lua {
    () => {
        r#"
local function aside(k, prefix)
  return (string.gsub(k, '^sb:e:', prefix, 1))
end
local function master_replid()
  return string.match(redis.call('INFO', 'replication'), 'master_replid:(%x+)')
end
local function fenced_epoch(k, rid, candidate)
  local e = redis.call('GET', k)
  if not e then
    redis.call('SET', k, candidate)
    if rid then redis.call('SET', aside(k, 'sb:h:'), rid) end
    return candidate, nil
  end
  if not rid then return e, nil end
  local hk = aside(k, 'sb:h:')
  local h = redis.call('GET', hk)
  if h == rid then return e, nil end
  redis.call('SET', hk, rid)
  if not h then return e, nil end
  local top = redis.call('GET', aside(k, 'sb:o:')) or '0'
  redis.call('SET', aside(k, 'sb:p:'), e .. ' ' .. top)
  redis.call('SET', k, candidate)
  return candidate, e
end
"#
    };
}

/// Stores one message in one or more streams and publishes it (the envelope is the
/// broker's: [`crate::broker::open_stored`]). KEYS: per stream (epoch, offset counter, log),
/// then the dedup key if any. ARGV: body, ts, max count, ttl ms, dedup window ms, epoch
/// candidate, node, publish command (`PUBLISH` or `SPUBLISH`), defer (`1`: return the
/// publishes instead of making them), fence (`1`: fence streams by the master that wrote
/// them, as [`FENCE_SCRIPT`] does), then per stream (wire name, Redis channel, excluded
/// connection or "-", the epoch and highest offset this node knows of it, see
/// [`super::lineage`]). Answers `{"ok", offset in the last stream, its epoch, receivers of
/// the first publish, {offset, epoch per stream}, {channel, message per publish deferred}}`
/// or `{"dup", the first answer's offset in the last stream, epoch, 0, {the first answer's
/// offset and epoch per stream}, {its publishes, rebuilt from the log, when deferred}}`. An
/// entry's `x` field names its sending connection (`<node> <conn>`), which a catch-up does
/// not deliver it to, as the live path does not.
///
/// A counter at or below an offset this node knows was handed out under the same epoch
/// means Redis went back in time: the stream takes the candidate as its new epoch before
/// the offset is reused, and its counter moves past every offset this node saw (offsets
/// stay unique across the two epochs; a connection that had the old top takes the new
/// epoch's next message with no gap). `sb:p:<stream>` then names the epoch it continues
/// and the last offset both hold (`<epoch> <offset>`), so a live connection's catch-up, and
/// a resume, go on from where they stood instead of replaying.
///
/// A duplicate refreshes its dedup entry, a write that replicates: a `WAIT` after it then
/// covers the write it repeats. Publishes are deferred with `--broker-min-replicas`, so that
/// nobody receives a message before replicas have it (its sender may still be told
/// `unavailable`); a retry's duplicate then publishes what the first attempt did not (a
/// recipient that had it takes the same offset again, which offset dedup drops).
const STORE_SCRIPT: &str = concat!(
    epoch_lua!(),
    r#"
local n = (#ARGV - 10) / 5
local defer = ARGV[9] == '1'
local pubs = {}
local rid = ARGV[10] == '1' and master_replid() or nil
local function epoch_of(k)
  return fenced_epoch(k, rid, ARGV[6])
end
local function envelope(o, a, body, epoch)
  local ev = body .. ',"stream":"' .. ARGV[a + 1] .. '","offset":' .. o .. ',"epoch":"' .. epoch .. '"}'
  return '*' .. o .. ' ' .. ARGV[a + 3] .. ' ' .. ARGV[7] .. '\n' .. ev
end
local dedup = KEYS[3 * n + 1]
if dedup then
  local d = redis.call('GET', dedup)
  if d then
    redis.call('PEXPIRE', dedup, ARGV[5])
    local s, last, seen = 0, 0, {}
    for o in string.gmatch(d, '%d+') do
      s = s + 1
      last = tonumber(o)
      if s <= n then
        local epoch = epoch_of(KEYS[3 * s - 2])
        seen[#seen + 1] = last
        seen[#seen + 1] = epoch
        local e = defer and redis.call('XRANGE', KEYS[3 * s], o .. '-0', o .. '-0') or {}
        if #e == 1 then
          local f, a = e[1][2], 10 + 5 * (s - 1)
          for i = 1, #f, 2 do
            if f[i] == 'p' then
              pubs[#pubs + 1] = ARGV[a + 2]
              pubs[#pubs + 1] = envelope(o, a, f[i + 1], epoch)
            end
          end
        end
      end
    end
    return {'dup', last, epoch_of(KEYS[3 * n - 2]), 0, seen, pubs}
  end
end
local ts = tonumber(ARGV[2])
local ttl = tonumber(ARGV[4])
local last, first_n, epoch = 0, 0, ''
local seen, offsets = {}, {}
for s = 1, n do
  local key = KEYS[3 * s]
  local a = 10 + 5 * (s - 1)
  local prev
  epoch, prev = epoch_of(KEYS[3 * s - 2])
  local o = redis.call('INCR', KEYS[3 * s - 1])
  local known = tonumber(ARGV[a + 5])
  if o <= known and (epoch == ARGV[a + 4] or prev == ARGV[a + 4]) then
    if epoch == ARGV[a + 4] then
      epoch = ARGV[6]
      redis.call('SET', KEYS[3 * s - 2], epoch)
      redis.call('SET', aside(KEYS[3 * s - 2], 'sb:p:'), ARGV[a + 4] .. ' ' .. (o - 1))
    end
    o = known + 1
    redis.call('SET', KEYS[3 * s - 1], o)
  end
  if ARGV[a + 3] == '-' then
    redis.call('XADD', key, 'MAXLEN', ARGV[3], o .. '-0', 'p', ARGV[1], 't', ARGV[2])
  else
    redis.call('XADD', key, 'MAXLEN', ARGV[3], o .. '-0', 'p', ARGV[1], 't', ARGV[2], 'x', ARGV[7] .. ' ' .. ARGV[a + 3])
  end
  if ttl > 0 then
    for _ = 1, 8 do
      local h = redis.call('XRANGE', key, '-', '+', 'COUNT', 1)
      if #h == 0 or tonumber(h[1][2][4]) >= ts - ttl then break end
      redis.call('XDEL', key, h[1][1])
    end
  end
  local m = envelope(o, a, ARGV[1], epoch)
  if defer then
    pubs[#pubs + 1] = ARGV[a + 2]
    pubs[#pubs + 1] = m
  else
    local r = redis.call(ARGV[8], ARGV[a + 2], m)
    if s == 1 then first_n = r end
  end
  last = o
  seen[#seen + 1] = o
  seen[#seen + 1] = epoch
  offsets[#offsets + 1] = o
end
if dedup then redis.call('SET', dedup, table.concat(offsets, ' '), 'PX', ARGV[5]) end
return {'ok', last, epoch, first_n, seen, pubs}
"#
);

/// Raises a stream's replicated position (`sb:w:<stream>`, KEYS[1]) to ARGV[1] if higher:
/// with `--broker-min-replicas`, reads stop there, so nobody reads a write that a failover
/// can erase (the replication stream is ordered: an offset replicas acknowledged implies
/// every earlier write of the stream).
const REPLICATED_SCRIPT: &str = r#"
local c = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > c then redis.call('SET', KEYS[1], ARGV[1]) end
return 0
"#;

/// Moves a stream whose history went back under its epoch to a new one (a resume must not
/// be told its position holds), its counter past what this node saw (as [`STORE_SCRIPT`]
/// does). KEYS: epoch, offset counter. ARGV: the epoch and highest offset this node knows,
/// the new epoch. Answers the epoch now.
const BUMP_SCRIPT: &str = concat!(
    epoch_lua!(),
    r#"
local e = redis.call('GET', KEYS[1])
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
if e == ARGV[1] and top < tonumber(ARGV[2]) then
  redis.call('SET', KEYS[1], ARGV[3])
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('SET', aside(KEYS[1], 'sb:p:'), ARGV[1] .. ' ' .. top)
  return ARGV[3]
end
return e
"#
);

/// A stream's epoch as a read finds it, fenced (without `--broker-min-replicas`): the
/// master that last wrote the stream is named in `sb:h:<stream>` (its replication id). Any
/// other master now (a promoted replica, a restart) may lack the last writes, and no node
/// may know it: the stream moves to a new epoch whose `sb:p:<stream>` says which offsets it
/// shares with the old one (`<old epoch> <top>`), so resumes and catch-ups up to there go
/// on, and a position past it is told its history went. [`STORE_SCRIPT`] fences the same
/// way before it writes. Like a [`BUMP_SCRIPT`], the counter moves past what this node saw
/// of the old epoch. KEYS: epoch, offset counter. ARGV: the new epoch (also a new stream's),
/// the epoch and highest offset this node knows. Answers the epoch.
const FENCE_SCRIPT: &str = concat!(
    epoch_lua!(),
    r#"
local e, prev = fenced_epoch(KEYS[1], master_replid(), ARGV[1])
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
if prev == ARGV[2] and top < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[2], ARGV[3])
end
return e
"#
);

/// Moves a user's confirmed position forward (never back, never past the top). KEYS:
/// the confirmed position, the inbox's offset counter. ARGV: offset. Answers `{before,
/// after}` (equal when it did not move): the range the senders get receipts for.
const CONFIRM_SCRIPT: &str = r#"
local top = tonumber(redis.call('GET', KEYS[2]) or '0')
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
local o = math.min(tonumber(ARGV[1]), top)
if o > cur then
  redis.call('SET', KEYS[1], o)
  return {cur, o}
end
return {cur, cur}
"#;

/// A stream's name with its hash tag: `inbox:{bob}`, `channel:{room}`.
fn tagged(stream: &str) -> String {
    match stream.split_once(':') {
        Some((kind, name)) => format!("{kind}:{{{name}}}"),
        None => format!("{{{stream}}}"),
    }
}

/// The keys of a stream: its epoch, its offset counter, its log.
fn stream_keys(stream: &str) -> [String; 3] {
    let t = tagged(stream);
    [
        format!("sb:e:{t}"),
        format!("sb:o:{t}"),
        format!("sb:x:{t}"),
    ]
}

/// The epoch a stream's current one continues, set when Redis went back in time (the
/// scripts derive it from the epoch key: `sb:e:` → `sb:p:`).
fn continues_key(stream: &str) -> String {
    format!("sb:p:{}", tagged(stream))
}

/// How far a stream's writes are known to be on `--broker-min-replicas` replicas.
fn replicated_key(stream: &str) -> String {
    format!("sb:w:{}", tagged(stream))
}

/// A user's confirmed inbox position.
fn confirmed_key(user: &str) -> String {
    format!("sb:k:{}", tagged(&inbox_stream(user)))
}

/// The cluster slot of a stream's keys.
fn stream_slot(stream: &str) -> u16 {
    crate::broker::cluster::slot(tagged(stream).as_bytes())
}

/// Starts the store thread on the broker's Redis (every master must answer now).
pub fn start(
    broker: &crate::broker::Broker,
    node: Arc<str>,
    cfg: StoreConfig,
    sink: Sink,
    metrics: Arc<StoreMetrics>,
) -> Result<Store, StoreError> {
    let store = redis::Script::new(STORE_SCRIPT);
    let confirm = redis::Script::new(CONFIRM_SCRIPT);
    let bump = redis::Script::new(BUMP_SCRIPT);
    let replicated = redis::Script::new(REPLICATED_SCRIPT);
    let fence = redis::Script::new(FENCE_SCRIPT);
    let scripts = vec![
        store.clone(),
        confirm.clone(),
        bump.clone(),
        replicated.clone(),
        fence.clone(),
    ];
    let mut conns = broker.conns(scripts, "store");
    conns.set_min_replicas(
        cfg.min_replicas,
        std::time::Duration::from_millis(cfg.min_replicas_timeout_ms),
    );
    if !conns.connect_all() {
        return Err(StoreError::Redis("cannot reach Redis".into()));
    }
    info!(cluster = conns.cluster(), "store open: streams in Redis");
    let mut w = Worker {
        conns,
        node,
        cfg,
        sink,
        metrics,
        out: Vec::new(),
        store,
        confirm,
        bump,
        replicated,
        fence,
        lineage: Lineage::default(),
    };
    let (tx, rx) = queue::bounded(STORE_QUEUE);
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
    /// A DM: one script, or (in a cluster) two, the recipient's and the sender's copy,
    /// into `streams` (in the order of the answers' offsets).
    Send {
        reply: Option<crate::ids::ReplyTo>,
        scripts: usize,
        streams: Vec<String>,
    },
    Publish {
        reply: Option<crate::ids::ReplyTo>,
        channel: Arc<str>,
        stream: String,
    },
    Confirm(Arc<str>),
}

impl Pending {
    /// The streams a store request writes, in the order of its answer's offsets.
    fn streams(&self) -> &[String] {
        match self {
            Pending::Send { streams, .. } => streams,
            Pending::Publish { stream, .. } => std::slice::from_ref(stream),
            Pending::Confirm(_) => &[],
        }
    }
}

/// A stream as Redis holds it.
struct Head {
    epoch: Epoch,
    meta: StreamMeta,
}

/// A stream a script stores into: (name, wire name, Redis channel, excluded connection).
type Target<'a> = (&'a str, &'a str, String, String);

struct Worker {
    conns: crate::broker::cluster::Conns,
    node: Arc<str>,
    cfg: StoreConfig,
    sink: Sink,
    metrics: Arc<StoreMetrics>,
    out: Vec<(u16, StoreMsg)>,
    store: redis::Script,
    confirm: redis::Script,
    bump: redis::Script,
    replicated: redis::Script,
    fence: redis::Script,
    /// The highest offset seen of each stream, under its epoch.
    lineage: Lineage,
}

/// A store script's answer.
struct Stored {
    dup: bool,
    /// Offset and epoch in the last stream (a duplicate: the first answer's offset).
    offset: u64,
    epoch: String,
    /// Receivers of the first publish (of the deferred one, once made).
    receivers: Option<u64>,
    /// Offset and epoch in each stream stored (for a duplicate, of the first answer).
    seen: Vec<(u64, String)>,
    /// Publishes deferred until replicas have the write: (Redis channel, message).
    pubs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Parses a store script's answer.
fn stored(v: Value) -> redis::RedisResult<Stored> {
    let bad = || redis::RedisError::from((redis::ErrorKind::Parse, "bad store answer"));
    let Value::Array(items) = v else {
        return Err(bad());
    };
    let [kind, offset, epoch, receivers, seen, pubs] =
        <[Value; 6]>::try_from(items).map_err(|_| bad())?;
    let kind: String = redis::from_redis_value(kind)?;
    let seen: Vec<Value> = redis::from_redis_value(seen)?;
    let pubs: Vec<Vec<u8>> = redis::from_redis_value(pubs)?;
    if !seen.len().is_multiple_of(2) || !pubs.len().is_multiple_of(2) {
        return Err(bad());
    }
    let mut pairs = Vec::with_capacity(seen.len() / 2);
    let mut it = seen.into_iter();
    while let (Some(o), Some(e)) = (it.next(), it.next()) {
        pairs.push((redis::from_redis_value(o)?, redis::from_redis_value(e)?));
    }
    let mut pubs = pubs.into_iter();
    let pubs = std::iter::from_fn(|| Some((pubs.next()?, pubs.next()?))).collect();
    Ok(Stored {
        dup: kind == "dup",
        offset: redis::from_redis_value(offset)?,
        epoch: redis::from_redis_value(epoch)?,
        receivers: redis::from_redis_value(receivers)?,
        seen: pairs,
        pubs,
    })
}

/// A DM stored as one script per inbox, as one answer: the recipient's as to `dup` and
/// receivers, the sender's copy's as to offset and epoch (the sender's own inbox), an error
/// if either failed (a retry with the same id then stores only what is missing).
fn joined(
    rcpt: redis::RedisResult<Stored>,
    copy: redis::RedisResult<Stored>,
) -> redis::RedisResult<Stored> {
    let (mut r, mut c) = (rcpt?, copy?);
    c.dup = r.dup;
    c.receivers = r.receivers;
    r.seen.append(&mut c.seen);
    c.seen = r.seen;
    // The recipient's publish first: its receivers say whether the DM is `queued`.
    r.pubs.append(&mut c.pubs);
    c.pubs = r.pubs;
    Ok(c)
}

impl Worker {
    fn run(&mut self, rx: queue::Rx<StoreReq>) {
        let mut reqs = Vec::with_capacity(BATCH_MAX);
        loop {
            match next_batch(&rx, &mut reqs) {
                Waited::Closed => return,
                // Retention is applied by the scripts as messages are stored.
                Waited::Idle => {}
                Waited::Batch => {
                    if self.apply(&mut reqs) {
                        debug!("store stopped");
                        return;
                    }
                }
            }
        }
    }

    /// `EVALSHA` of [`STORE_SCRIPT`] for `streams`, routed by the first one's slot.
    fn store_cmd(
        &self,
        streams: &[Target<'_>],
        dedup: Option<String>,
        body: &[u8],
        (now, retention): (u64, Retention),
        epoch_candidate: &str,
    ) -> (u16, redis::Cmd) {
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.store.get_hash())
            .arg(streams.len() * 3 + usize::from(dedup.is_some()));
        for (stream, ..) in streams {
            for k in stream_keys(stream) {
                c.arg(k);
            }
        }
        if let Some(d) = dedup {
            c.arg(d);
        }
        c.arg(body)
            .arg(now)
            .arg(retention.max_count.max(1))
            .arg(retention.ttl_ms)
            .arg(self.cfg.dedup_window_ms.max(1))
            .arg(epoch_candidate)
            .arg(&*self.node)
            .arg(self.conns.publish_cmd())
            .arg(if self.cfg.min_replicas > 0 { "1" } else { "0" })
            .arg(if self.fenced() { "1" } else { "0" });
        for (stream, wire, chan, exclude) in streams {
            let (epoch, top) = self.lineage.known(stream);
            c.arg(*wire).arg(chan).arg(exclude).arg(epoch).arg(top);
        }
        (stream_slot(streams[0].0), c)
    }

    /// Writes first (one pipeline per master), then reads, then every answer; true on
    /// shutdown.
    fn apply(&mut self, reqs: &mut Vec<StoreReq>) -> bool {
        let now = unix_ms();
        let mut cmds = Vec::new();
        let mut pending = Vec::new();
        let mut reads = Vec::new();
        let mut stop = false;
        let n = reqs.len();
        let epoch_candidate = new_epoch().to_string();
        let split = self.conns.cluster();
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
                    let sender = sender.map_or_else(|| "-".to_owned(), |c| c.to_string());
                    let (to_inbox, from_inbox) = (inbox_stream(&to), inbox_stream(&from));
                    let excluded = if from == to {
                        sender.clone()
                    } else {
                        "-".to_owned()
                    };
                    let rcpt = (
                        to_inbox.as_str(),
                        "inbox",
                        crate::broker::user_channel(&to),
                        excluded,
                    );
                    let copy = (from != to && sender_copy).then(|| {
                        (
                            from_inbox.as_str(),
                            "inbox",
                            crate::broker::user_channel(&from),
                            sender,
                        )
                    });
                    // Keyed in the inbox's slot: (inbox, sender, id).
                    let dedup = |inbox: &str| {
                        id.as_ref()
                            .map(|i| format!("sb:d:{}:{from}:{i}", tagged(inbox)))
                    };
                    let when = (now, self.cfg.inbox);
                    let ec = epoch_candidate.as_str();
                    let mut streams = vec![to_inbox.clone()];
                    if copy.is_some() {
                        streams.push(from_inbox.clone());
                    }
                    let scripts = match copy {
                        Some(copy) if split => {
                            cmds.push(self.store_cmd(&[rcpt], dedup(&to_inbox), &prefix, when, ec));
                            cmds.push(self.store_cmd(
                                &[copy],
                                dedup(&from_inbox),
                                &prefix,
                                when,
                                ec,
                            ));
                            2
                        }
                        Some(copy) => {
                            let streams = [rcpt, copy];
                            cmds.push(self.store_cmd(
                                &streams,
                                dedup(&to_inbox),
                                &prefix,
                                when,
                                ec,
                            ));
                            1
                        }
                        None => {
                            cmds.push(self.store_cmd(&[rcpt], dedup(&to_inbox), &prefix, when, ec));
                            1
                        }
                    };
                    pending.push(Pending::Send {
                        reply,
                        scripts,
                        streams,
                    });
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
                    let dedup = id.map(|i| format!("sb:d:{}:{publisher}/{i}", tagged(&stream)));
                    let streams = [(
                        stream.as_str(),
                        wire_name(&stream),
                        crate::broker::channel_channel(&channel),
                        "-".to_owned(),
                    )];
                    let when = (now, retention);
                    cmds.push(self.store_cmd(&streams, dedup, &prefix, when, &epoch_candidate));
                    let stream = stream.clone();
                    pending.push(Pending::Publish {
                        reply,
                        channel,
                        stream,
                    });
                }
                StoreReq::Confirm { user, offset } => {
                    let stream = inbox_stream(&user);
                    let mut inv = redis::cmd("EVALSHA");
                    inv.arg(self.confirm.get_hash())
                        .arg(2)
                        .arg(confirmed_key(&user))
                        .arg(&stream_keys(&stream)[1])
                        .arg(offset);
                    cmds.push((stream_slot(&stream), inv));
                    pending.push(Pending::Confirm(user));
                }
                StoreReq::Shutdown => stop = true,
                read => reads.push(read),
            }
        }
        if !pending.is_empty() {
            let t = Instant::now();
            let (answers, short) = self.conns.run_durable(&cmds);
            let us = t.elapsed().as_micros() as u64;
            self.metrics.commit(us, pending.len() as u64, n as u64);
            let short_writes = short.iter().filter(|&&s| s).count() as u64;
            StoreMetrics::add(&self.metrics.replicas_short, short_writes);
            // An answer, and whether too few replicas acknowledged it: it comes with its
            // value (the offsets it handed out count) and its sender is told `unavailable`.
            let mut answers = answers.into_iter().zip(short);
            let mut next = || {
                answers.next().unwrap_or_else(|| {
                    let e = redis::RedisError::from((redis::ErrorKind::Io, "no answer"));
                    (Err(e), false)
                })
            };
            let mut confirmed = Vec::new();
            let mut answered = Vec::with_capacity(pending.len());
            for p in pending {
                let (a, short) = match p {
                    Pending::Send { scripts: 2, .. } => {
                        let (rcpt, s1) = next();
                        let (copy, s2) = next();
                        (
                            joined(rcpt.and_then(stored), copy.and_then(stored)),
                            s1 || s2,
                        )
                    }
                    Pending::Confirm(_) => {
                        if let Some(c) = self.confirmed_range(p, next().0) {
                            confirmed.push(c);
                        }
                        continue;
                    }
                    _ => {
                        let (a, short) = next();
                        (a.and_then(stored), short)
                    }
                };
                answered.push((p, a, short));
            }
            // Deferred publishes go out once replicas have the writes (none of a short one).
            let replicated = answered
                .iter_mut()
                .filter(|(_, _, short)| !short)
                .filter_map(|(p, a, _)| Some((p.streams(), a.as_mut().ok()?)));
            self.publish_deferred(replicated);
            for (p, a, short) in answered {
                self.answer(p, a, short);
            }
            self.receipts(confirmed, now, &epoch_candidate);
        }
        for r in reads {
            self.read(r);
        }
        self.post_all();
        stop
    }

    /// Receipts for the confirmations that moved (user, before, after): read each newly
    /// confirmed range, store a receipt in each sender's inbox (published like a DM).
    fn receipts(&mut self, confirmed: Vec<(Arc<str>, u64, u64)>, now: u64, ec: &str) {
        let mut cmds = Vec::new();
        let mut receipt_streams = Vec::new();
        for (user, before, upto) in confirmed {
            let stream = inbox_stream(&user);
            let n = ((upto - before) as usize).min(super::receipts::MAX_SCAN);
            let entries = match self.range(&stream, Epoch(0), before + 1, n) {
                Ok(e) => e,
                Err(e) => {
                    warn!(error = %e, user = %user, "store: no receipts for a confirmation");
                    continue;
                }
            };
            let payloads = entries.iter().filter(|e| e.0 <= upto).map(|e| &e.1[..]);
            for (sender, prefix) in super::receipts::receipts(&user, payloads, upto, now) {
                let inbox = inbox_stream(&sender);
                let streams = [(
                    inbox.as_str(),
                    "inbox",
                    crate::broker::user_channel(&sender),
                    "-".to_owned(),
                )];
                cmds.push(self.store_cmd(&streams, None, &prefix, (now, self.cfg.inbox), ec));
                receipt_streams.push(inbox.clone());
            }
        }
        if cmds.is_empty() {
            return;
        }
        let mut done = Vec::with_capacity(cmds.len());
        for (a, stream) in self.conns.run(&cmds).into_iter().zip(receipt_streams) {
            match a.and_then(stored) {
                Ok(s) => {
                    self.saw_stored(std::slice::from_ref(&stream), &s);
                    StoreMetrics::add(&self.metrics.receipts, 1);
                    done.push((stream, s));
                }
                Err(e) => warn!(error = %e, "store: a receipt was not stored"),
            }
        }
        self.publish_deferred(
            done.iter_mut()
                .map(|(stream, s)| (std::slice::from_ref(&*stream), s)),
        );
    }

    /// With `--broker-min-replicas`, once replicas have the writes: raises each stream's
    /// replicated position, then makes the publishes the scripts deferred, one pipeline per
    /// master; each message's receivers come from its first publish. A publish that fails
    /// is logged: the message is stored, and connected recipients catch up on it at the next
    /// message of its stream (a gap), resuming ones on resume.
    fn publish_deferred<'a, 'b>(
        &mut self,
        stored: impl Iterator<Item = (&'b [String], &'a mut Stored)>,
    ) {
        if self.cfg.min_replicas == 0 {
            return;
        }
        let mut cmds = Vec::new();
        let mut firsts = Vec::new();
        for (streams, s) in stored {
            for (stream, (o, _)) in streams.iter().zip(&s.seen) {
                let mut c = redis::cmd("EVALSHA");
                c.arg(self.replicated.get_hash())
                    .arg(1)
                    .arg(replicated_key(stream))
                    .arg(*o);
                cmds.push((stream_slot(stream), c));
            }
            if s.pubs.is_empty() {
                continue;
            }
            firsts.push((cmds.len(), &mut s.receivers));
            for (chan, msg) in &s.pubs {
                let mut c = redis::cmd(self.conns.publish_cmd());
                c.arg(chan).arg(msg);
                cmds.push((crate::broker::cluster::slot(chan), c));
            }
        }
        if cmds.is_empty() {
            return;
        }
        let answers = self.conns.run(&cmds);
        for (i, receivers) in firsts {
            if let Ok(Value::Int(n)) = answers[i] {
                *receivers = Some(n as u64);
            }
        }
        for e in answers.iter().filter_map(|a| a.as_ref().err()) {
            warn!(error = %e, "store: a stored message's replicated position or publish failed (recipients catch up)");
        }
    }

    /// The range a confirmation moved (user, before, after), for its receipts.
    fn confirmed_range(
        &mut self,
        p: Pending,
        a: redis::RedisResult<Value>,
    ) -> Option<(Arc<str>, u64, u64)> {
        let Pending::Confirm(user) = p else {
            return None;
        };
        match a.and_then(|v| redis::from_redis_value::<(u64, u64)>(v).map_err(Into::into)) {
            Ok((before, after)) if after > before => Some((user, before, after)),
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "store: a confirmed position was not stored");
                None
            }
        }
    }

    /// Notes the offsets a store script handed out in `streams`.
    fn saw_stored(&mut self, streams: &[String], s: &Stored) {
        for (stream, (o, e)) in streams.iter().zip(&s.seen) {
            if self.lineage.saw(stream, e, *o) {
                warn!(%stream, epoch = %e, "store: a stream this node knew is in a new epoch (Redis lost its history)");
                StoreMetrics::add(&self.metrics.epoch_changes, 1);
            }
        }
    }

    /// Answers the sender of a stored (or refused) message; `short`: too few replicas had
    /// it in time (stored on the master, answered `unavailable`).
    fn answer(&mut self, p: Pending, a: redis::RedisResult<Stored>, short: bool) {
        let (reply, channel) = match p {
            Pending::Send { reply, streams, .. } => {
                if let Ok(s) = &a {
                    self.saw_stored(&streams, s);
                }
                (reply, None)
            }
            Pending::Publish {
                reply,
                channel,
                stream,
            } => {
                if let Ok(s) = &a {
                    self.saw_stored(&[stream], s);
                }
                (reply, Some(channel))
            }
            Pending::Confirm(_) => return,
        };
        let a = match a {
            Ok(_) if short => Err(crate::broker::cluster::too_few_replicas()),
            a => a,
        };
        let Some(reply) = reply else {
            if let Err(e) = a {
                warn!(error = %e, "store: a message without a reply was not stored");
            }
            return;
        };
        let shard = reply.conn.shard;
        let publish = channel.is_some();
        let msg = match a {
            Ok(s) => {
                let epoch = s.epoch.parse().unwrap_or(Epoch(0));
                if s.dup {
                    StoreMetrics::add(&self.metrics.dedup_hits, 1);
                } else {
                    StoreMetrics::add(&self.metrics.appends, 1);
                }
                StoreMsg::Ack {
                    reply,
                    offset: s.offset,
                    epoch,
                    queued: match (s.dup, &channel) {
                        (true, _) => None,
                        (false, Some(_)) => Some(false),
                        (false, None) => Some(s.receivers == Some(0)),
                    },
                    channel,
                }
            }
            Err(e) => {
                StoreMetrics::add(&self.metrics.refused, 1);
                let why = if e.to_string().contains("OOM") {
                    Refusal::Full
                } else {
                    if !(e.is_io_error() || e.is_timeout() || e.is_connection_dropped()) {
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

    /// Where `stream` stands in Redis (its epoch set now if it has none: the first message
    /// stored will carry the same).
    fn head(&mut self, stream: &str) -> redis::RedisResult<Head> {
        let [ek, ok, xk] = stream_keys(stream);
        let slot = stream_slot(stream);
        let set = if self.fenced() {
            let mut c = redis::cmd("EVALSHA");
            let (known, top) = self.lineage.known(stream);
            c.arg(self.fence.get_hash())
                .arg(2)
                .arg(&ek)
                .arg(&ok)
                .arg(new_epoch().to_string())
                .arg(known)
                .arg(top);
            c
        } else {
            let mut c = redis::cmd("SET");
            c.arg(&ek).arg(new_epoch().to_string()).arg("NX");
            c
        };
        let mut get = redis::cmd("GET");
        get.arg(&ek);
        let mut top = redis::cmd("GET");
        top.arg(&ok);
        let mut first = redis::cmd("XRANGE");
        first.arg(&xk).arg("-").arg("+").arg("COUNT").arg(1);
        let mut cmds = vec![(slot, set), (slot, get), (slot, top), (slot, first)];
        if self.cfg.min_replicas > 0 {
            let mut w = redis::cmd("GET");
            w.arg(replicated_key(stream));
            cmds.push((slot, w));
        }
        let mut a = self.conns.run(&cmds).into_iter();
        let mut next = || a.next().unwrap_or(Ok(Value::Nil));
        next()?;
        let epoch: Option<String> = redis::from_redis_value(next()?)?;
        let top: Option<u64> = redis::from_redis_value(next()?)?;
        let first = next()?;
        // With --broker-min-replicas, what readers may see ends where replicas have it.
        let replicated: Option<u64> = redis::from_redis_value(next()?)?;
        let top = top.unwrap_or(0);
        let first = entries(first).first().map_or(top + 1, |e| e.0);
        let mut epoch = epoch.unwrap_or_default();
        let mut top = top;
        if let Some(known) = self.lineage.behind(stream, &epoch, top) {
            let (now, bumped) = self.bump(stream, &epoch, known)?;
            epoch = now;
            if bumped {
                top = known;
            }
        }
        if top > 0 && self.lineage.saw(stream, &epoch, top) {
            StoreMetrics::add(&self.metrics.epoch_changes, 1);
        }
        if self.cfg.min_replicas > 0 {
            top = top.min(replicated.unwrap_or(0));
        }
        Ok(Head {
            epoch: epoch.parse().unwrap_or(Epoch(0)),
            meta: StreamMeta {
                first: first.max(1),
                next: top + 1,
                bytes: 0,
            },
        })
    }

    /// The epoch `stream`'s current one continues when Redis went back, and the last offset
    /// they share (`u64::MAX` for a value written before it was kept: the counter then
    /// moved past everything handed out).
    fn continues(&mut self, stream: &str) -> redis::RedisResult<Option<(Epoch, u64)>> {
        let mut c = redis::cmd("GET");
        c.arg(continues_key(stream));
        let v: Option<String> =
            redis::from_redis_value(self.conns.run_one(stream_slot(stream), c)?)?;
        Ok(v.and_then(|v| {
            let (e, shared) = v.split_once(' ').unwrap_or((&v, ""));
            Some((e.parse().ok()?, shared.parse().unwrap_or(u64::MAX)))
        }))
    }

    /// Whether streams are fenced by the master that wrote them ([`FENCE_SCRIPT`]): without
    /// `--broker-min-replicas`, any failover or restart may have lost writes.
    fn fenced(&self) -> bool {
        self.cfg.min_replicas == 0
    }

    /// Moves `stream` to a new epoch: Redis holds less of it than this node saw handed out
    /// under `epoch` (up to `known`). The epoch now.
    fn bump(
        &mut self,
        stream: &str,
        epoch: &str,
        known: u64,
    ) -> redis::RedisResult<(String, bool)> {
        let [ek, ok, _] = stream_keys(stream);
        let fresh = new_epoch().to_string();
        let mut c = redis::cmd("EVALSHA");
        c.arg(self.bump.get_hash())
            .arg(2)
            .arg(ek)
            .arg(ok)
            .arg(epoch)
            .arg(known)
            .arg(&fresh);
        let now: String = redis::from_redis_value(self.conns.run_one(stream_slot(stream), c)?)?;
        let bumped = now == fresh;
        if bumped {
            warn!(%stream, old = %epoch, new = %now, known, "store: the stream's history went back in Redis (writes lost); it moves to a new epoch");
        }
        Ok((now, bumped))
    }

    /// Up to `limit` events of `stream` from offset `from` on.
    fn range(
        &mut self,
        stream: &str,
        epoch: Epoch,
        from: u64,
        limit: usize,
    ) -> redis::RedisResult<Vec<(u64, Bytes)>> {
        Ok(self
            .range_with_senders(stream, epoch, from, limit)?
            .into_iter()
            .map(|(o, p, _)| (o, p))
            .collect())
    }

    /// [`range`](Self::range), with each entry's sending connection (`x`), if stored.
    fn range_with_senders(
        &mut self,
        stream: &str,
        epoch: Epoch,
        from: u64,
        limit: usize,
    ) -> redis::RedisResult<Vec<(u64, Bytes, Option<String>)>> {
        let mut c = redis::cmd("XRANGE");
        c.arg(&stream_keys(stream)[2])
            .arg(format!("{from}-0"))
            .arg("+")
            .arg("COUNT")
            .arg(limit);
        let v = self.conns.run_one(stream_slot(stream), c)?;
        let wire = wire_name(stream);
        Ok(entries(v)
            .into_iter()
            .map(|(o, body, sender)| {
                let mut p = body;
                put_trailer(&mut p, wire, o, epoch);
                (o, Bytes::from(p), sender)
            })
            .collect())
    }

    /// A page of `stream` from `from` for a catch-up: also the sending connections on this
    /// node, which the live path skipped.
    fn catch_up_page(
        &mut self,
        stream: &str,
        head: &Head,
        from: u64,
    ) -> redis::RedisResult<(Page, Vec<(u64, ConnId)>)> {
        let metrics = self.metrics.clone();
        let mut excludes = Vec::new();
        let node = self.node.clone();
        let page = read_page(&head.meta, from, &metrics, |from| {
            let entries = self.range_with_senders(stream, head.epoch, from, self.cfg.page_items)?;
            Ok::<_, redis::RedisError>(
                entries
                    .into_iter()
                    .map(|(o, p, sender)| {
                        let here = sender.as_deref().and_then(|x| x.split_once(' '));
                        if let Some((_, conn)) = here.filter(|(n, _)| *n == &*node) {
                            if let Ok(c) = conn.parse() {
                                excludes.push((o, c));
                            }
                        }
                        (o, p)
                    })
                    .collect(),
            )
        })?;
        Ok((page, excludes))
    }

    /// A page of `stream` from `from`, read against `head`.
    fn page(&mut self, stream: &str, head: &Head, from: u64) -> redis::RedisResult<Page> {
        let metrics = self.metrics.clone();
        read_page(&head.meta, from, &metrics, |from| {
            self.range(stream, head.epoch, from, self.cfg.page_items)
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
        let since = self.carried(stream, head, since)?;
        let plan = plan_resume(&head.meta, head.epoch, since, confirmed, &self.metrics);
        let page = self.page(stream, head, plan.from)?;
        Ok((plan.lost.map_or(Ok(()), Err), page))
    }

    /// A resume position in the epoch the stream's current one continues, carried over when
    /// the two share it (up to the shared offset both hold the same messages).
    fn carried(&mut self, stream: &str, head: &Head, since: Since) -> redis::RedisResult<Since> {
        let Since::Position {
            epoch: Some(e),
            offset,
        } = since
        else {
            return Ok(since);
        };
        if e == head.epoch {
            return Ok(since);
        }
        Ok(match self.continues(stream)? {
            Some((old, shared)) if old == e && offset <= shared => Since::Position {
                epoch: Some(head.epoch),
                offset,
            },
            _ => since,
        })
    }

    fn confirmed(&mut self, user: &str) -> redis::RedisResult<u64> {
        let mut c = redis::cmd("GET");
        c.arg(confirmed_key(user));
        let v = self.conns.run_one(stream_slot(&inbox_stream(user)), c)?;
        Ok(redis::from_redis_value::<Option<u64>>(v)?.unwrap_or(0))
    }

    /// Answers a read; Redis unreachable → an answer that says so (never a silent drop).
    fn read(&mut self, r: StoreReq) {
        match self.answer_read(&r) {
            Ok(Some(answer)) => self.out.push(answer),
            Ok(None) => {}
            Err(e) => {
                warn!(error = %e, "store: a read failed; answered unavailable");
                self.unavailable(r);
            }
        }
    }

    /// The answer to a read request, and the shard it goes to.
    fn answer_read(&mut self, r: &StoreReq) -> redis::RedisResult<Option<(u16, StoreMsg)>> {
        Ok(Some(match r {
            StoreReq::Open { user, conn, since } => {
                let stream = inbox_stream(user);
                if let Some(Since::Position {
                    epoch: Some(e),
                    offset,
                }) = since
                {
                    // The owner was handed `offset` under `e`: if Redis holds less now, its
                    // history went back.
                    self.lineage.saw(&stream, &e.to_string(), *offset);
                }
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
            StoreReq::CatchUp {
                stream: which,
                shard,
                epoch,
                from,
            } => {
                let stream = which.name();
                if *epoch != Epoch(0) && *from > 1 {
                    // The shard delivered up to `from - 1`: if Redis holds less now, its
                    // history went back.
                    self.lineage.saw(&stream, &epoch.to_string(), from - 1);
                }
                let head = self.head(&stream)?;
                let continues = if head.epoch == *epoch {
                    None
                } else {
                    self.continues(&stream)?
                };
                let from = super::catch_up_from(*epoch, head.epoch, *from, continues);
                let (page, excludes) = self.catch_up_page(&stream, &head, from)?;
                let shared = match continues {
                    Some((e, shared)) if e == *epoch => shared,
                    _ => 0,
                };
                let msg = StoreMsg::CaughtUp {
                    stream: which.clone(),
                    epoch: head.epoch,
                    shared,
                    page,
                    excludes,
                };
                (*shard, msg)
            }
            StoreReq::Page {
                stream,
                conn,
                epoch,
                from,
            } => {
                let name = stream.name();
                let head = self.head(&name)?;
                // The replay's position, carried into the stream's epoch if that continues
                // the welcome's up to it; otherwise its history went (Redis lost it).
                let at = Since::Position {
                    epoch: Some(*epoch),
                    offset: from.saturating_sub(1),
                };
                let gone = *epoch != Epoch(0)
                    && !matches!(self.carried(&name, &head, at)?,
                        Since::Position { epoch: Some(e), .. } if e == head.epoch);
                let page = if gone {
                    Page::default()
                } else {
                    self.page(&name, &head, *from)?
                };
                let msg = StoreMsg::Page {
                    conn: *conn,
                    stream: stream.clone(),
                    gone,
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
                    gone: false,
                    page: done,
                },
            ),
            StoreReq::CatchUp {
                stream,
                shard,
                epoch,
                ..
            } => (
                shard,
                StoreMsg::CaughtUp {
                    stream,
                    epoch,
                    shared: 0,
                    page: done,
                    excludes: Vec::new(),
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

/// `(offset, body, sender)` of each entry of an `XRANGE` answer (ids `<offset>-0`, field `p`;
/// the sending connection from field `x`, if stored).
fn entries(v: Value) -> Vec<(u64, Vec<u8>, Option<String>)> {
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
        let sender = fields.chunks(2).find_map(|kv| match kv {
            [Value::BulkString(k), Value::BulkString(v)] if k == b"x" => {
                String::from_utf8(v.clone()).ok()
            }
            _ => None,
        });
        if let Some(body) = body {
            out.push((offset, body, sender));
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
                Value::Array(vec![
                    bulk("t"),
                    bulk("6"),
                    bulk("p"),
                    bulk("x"),
                    bulk("x"),
                    bulk("node-a 0.3.1"),
                ]),
            ]),
        ]);
        assert_eq!(
            entries(v),
            vec![
                (7, b"{\"a\":1".to_vec(), None),
                (9, b"x".to_vec(), Some("node-a 0.3.1".to_owned()))
            ],
            "an entry without a body is skipped; the sender comes from field x"
        );
        assert!(entries(Value::Nil).is_empty());
    }
}
