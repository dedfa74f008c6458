//! Nodes that act as one, through Redis PUB/SUB (`--broker redis://…`).
//!
//! Two threads own the Redis connections, outside the shard loops:
//! - the **publisher** takes every request waiting, sends them as one pipeline (one `PUBLISH`
//!   per message, never one per recipient) and answers the senders that asked whether anyone
//!   received it (`PUBLISH` counts the nodes subscribed);
//! - the **subscriber** follows the node's interest: it subscribes to `sb:u:<user>` when the
//!   user's first connection on this node appears and to `sb:c:<channel>` when the first local
//!   subscriber does, unsubscribes after the last, and hands what arrives to the shards.
//!
//! A message carries the id of the node that published it; a node drops its own: local
//! recipients were served directly, never through Redis. Both threads reconnect with backoff
//! and the subscriber restores every subscription; meanwhile cross-node sends are answered
//! `unavailable`. The broker imports neither the hub nor the session layer: it answers through
//! a sink the server gives it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use tracing::{info, warn};

use crate::ids::{home_of, ApiTicket, ConnId, ReplyTo};
pub use crate::metrics::BrokerMetrics;

/// Publish requests waiting for the publisher thread, at most.
pub const BROKER_QUEUE: usize = 65_536;
/// Requests sent in one pipeline, at most.
const PIPELINE_MAX: usize = 1_024;
/// How long the subscriber waits for a message before it looks at interest changes.
const POLL: Duration = Duration::from_millis(2);
/// How long a SUBSCRIBE or UNSUBSCRIBE may take before the connection counts as lost.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Interest changes applied before the subscriber looks at messages again.
const BATCH_CHANGES: usize = 4_096;
/// Longest wait between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How long a thread keeps retrying a full shard mailbox.
const POST_PATIENCE: Duration = Duration::from_secs(10);

/// Why the broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The URL is not a Redis URL.
    #[error("invalid --broker URL {url}: {source}")]
    Url {
        /// URL (without password).
        url: String,
        /// Cause.
        source: redis::RedisError,
    },
    /// Redis did not answer.
    #[error("cannot reach the broker at {url}: {source}")]
    Connect {
        /// URL (without password).
        url: String,
        /// Cause.
        source: redis::RedisError,
    },
    /// A thread could not be spawned.
    #[error("cannot spawn the broker threads: {0}")]
    Spawn(std::io::Error),
}

/// To the publisher thread.
#[derive(Debug)]
pub enum BrokerReq {
    /// A DM for `user`'s connections on other nodes. With `reply`, the sender is answered
    /// from the number of nodes that received it (this node holds none of the user's
    /// connections then).
    User {
        /// Recipient.
        user: Arc<str>,
        /// The event as delivered.
        payload: Bytes,
        /// Whom to answer.
        reply: Option<ReplyTo>,
    },
    /// A publication for `channel`'s subscribers on other nodes.
    Channel {
        /// Channel.
        channel: Arc<str>,
        /// The event as delivered.
        payload: Bytes,
    },
    /// A broadcast to every connection of every other node (`POST /api/broadcast`).
    Broadcast {
        /// The event as delivered.
        payload: Bytes,
    },
    /// `POST /api/disconnect`: close `user`'s connections on the other nodes.
    Disconnect {
        /// The user.
        user: Arc<str>,
        /// Close code (4000-4999).
        code: u16,
        /// Close reason.
        reason: Arc<str>,
    },
    /// Shard `shard`'s counts as they are, replacing what Redis holds for it (after Redis was
    /// lost: the changes meanwhile were not counted).
    Resync {
        /// Users or channels.
        kind: Counted,
        /// The shard.
        shard: u16,
        /// Every name with its count.
        counts: Vec<(Arc<str>, u64)>,
        /// For channels: each channel's members (user, `""` for anonymous → subscriptions).
        members: Vec<(Arc<str>, Members)>,
    },
    /// A user's connection (or a channel's subscriber) on this node came (+1) or went (-1).
    Presence {
        /// The shard that counts it.
        shard: u16,
        /// Users or channels.
        kind: Counted,
        /// The user or channel.
        name: Arc<str>,
        /// For a channel: the subscriber's user (`""`: anonymous), counted in the channel's
        /// members too.
        member: Option<Arc<str>>,
        /// +1 or -1.
        delta: i64,
    },
    /// The `presence` op or `GET /api/channels/<name>/presence`: `channel`'s members on every
    /// other live node.
    Members {
        /// The channel.
        channel: Arc<str>,
        /// The waiting request (its shard and id there).
        ticket: ApiTicket,
    },
    /// `GET /api/users/<id>` or `/api/channels/<name>`: the count on every live node.
    Count {
        /// Users or channels.
        kind: Counted,
        /// The user or channel.
        name: Arc<str>,
        /// The waiting HTTP connection.
        conn: ConnId,
        /// The count on this node.
        local: u64,
    },
}

/// A channel's members: user (`""` for anonymous subscribers) → subscriptions.
pub type Members = Vec<(Arc<str>, u64)>;

/// What a node counts in Redis for cluster-wide answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counted {
    /// Connections per user.
    Users,
    /// Subscribers per channel.
    Channels,
}

impl Counted {
    /// The hash of a node's shard's counts of this kind (each shard owns its own, so that a
    /// rewrite after an outage and the shard's later changes apply in queue order).
    fn key(self, node: &str, shard: u16) -> String {
        match self {
            Counted::Users => format!("sb:n:{node}:{shard}:users"),
            Counted::Channels => format!("sb:n:{node}:{shard}:channels"),
        }
    }
}

/// To the subscriber thread: the node's interest changed.
#[derive(Debug)]
pub enum Interest {
    /// `user`'s first connection on this node opened (`true`) or its last closed. With
    /// `ready`, the shard is told once the subscription is active.
    User {
        /// User.
        user: Arc<str>,
        /// Opened or closed.
        on: bool,
        /// (shard, token) to answer with [`BrokerMsg::Ready`].
        ready: Option<(u16, u64)>,
    },
    /// A shard's first subscriber of `channel` (`true`) or its last left.
    Channel {
        /// Channel.
        channel: Arc<str>,
        /// Joined or left.
        on: bool,
        /// (shard, token) to answer with [`BrokerMsg::Ready`].
        ready: Option<(u16, u64)>,
    },
}

/// From the broker to a shard.
#[derive(Debug)]
pub enum BrokerMsg {
    /// To `user`'s home shard: a DM published by another node.
    User {
        /// Recipient.
        user: Arc<str>,
        /// The event.
        payload: Bytes,
    },
    /// To every shard: a publication of another node.
    Channel {
        /// Channel.
        channel: Arc<str>,
        /// The event.
        payload: Bytes,
    },
    /// To every shard: another node's broadcast to every connection.
    Broadcast {
        /// The event.
        payload: Bytes,
    },
    /// To `user`'s home shard: a message of the user's inbox, stored in Redis (by any
    /// node, this one included), in offset order.
    Stored {
        /// The inbox's user.
        user: Arc<str>,
        /// The event.
        payload: Bytes,
        /// Its offset.
        offset: u64,
        /// The sending connection, when it is on this node.
        exclude: Option<ConnId>,
    },
    /// To every shard: a publication stored in a channel's stream in Redis.
    ChannelStored {
        /// Channel.
        channel: Arc<str>,
        /// The event.
        payload: Bytes,
        /// Its offset.
        offset: u64,
    },
    /// To every shard: another node's `POST /api/disconnect` for `user`.
    Disconnect {
        /// The user.
        user: Arc<str>,
        /// Close code.
        code: u16,
        /// Close reason.
        reason: Arc<str>,
    },
    /// The answer to a DM that only other nodes could deliver.
    Routed {
        /// Whom.
        reply: ReplyTo,
        /// Whether any node received it.
        online: bool,
    },
    /// Redis is unreachable: the DM was not delivered anywhere else.
    Unavailable {
        /// Whom.
        reply: ReplyTo,
    },
    /// The broker's queue was full: the DM was not sent to other nodes.
    Busy {
        /// Whom.
        reply: ReplyTo,
    },
    /// The answer to [`BrokerReq::Count`].
    Counted {
        /// Users or channels.
        kind: Counted,
        /// The waiting HTTP connection.
        conn: ConnId,
        /// The user or channel.
        name: Arc<str>,
        /// The count on every live node, this one included.
        total: u64,
    },
    /// The answer to [`BrokerReq::Members`]: the members on the other live nodes (`None`:
    /// Redis could not be asked).
    Members {
        /// The waiting request.
        ticket: ApiTicket,
        /// User (`""`: anonymous) → subscriptions.
        members: Option<Members>,
    },
    /// The subscription asked for with `token` is active.
    Ready {
        /// The token of the [`Interest`].
        token: u64,
    },
}

/// Hands a message to shard `i`; gives it back when the mailbox is full.
pub type Sink = Box<dyn Fn(u16, BrokerMsg) -> Result<(), BrokerMsg> + Send + Sync>;

/// What shards hold to talk to the broker.
#[derive(Debug, Clone)]
pub struct BrokerHandle {
    publish: Sender<BrokerReq>,
    interest: Sender<Interest>,
    /// This node's id.
    pub node: Arc<str>,
    up: Arc<Up>,
}

/// Whether each Redis connection is up.
#[derive(Debug, Default)]
struct Up {
    publisher: AtomicBool,
    subscriber: AtomicBool,
    /// Bumped at every reconnect of the publisher.
    generation: std::sync::atomic::AtomicU64,
}

impl Up {
    fn both(&self) -> bool {
        self.publisher.load(Ordering::Relaxed) && self.subscriber.load(Ordering::Relaxed)
    }

    fn set(&self, which: &AtomicBool, v: bool, m: &BrokerMetrics) {
        which.store(v, Ordering::Relaxed);
        m.connected.store(u64::from(self.both()), Ordering::Relaxed);
    }
}

impl BrokerHandle {
    /// Queues a publication; gives it back when the queue is full.
    pub fn publish(&self, req: BrokerReq) -> Result<(), BrokerReq> {
        match self.publish.try_send(req) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(r)) | Err(TrySendError::Disconnected(r)) => Err(r),
        }
    }

    /// Reports an interest change (never dropped: subscriptions must follow it).
    pub fn interest(&self, i: Interest) {
        let _ = self.interest.send(i);
    }

    /// Whether Redis is reachable right now.
    pub fn is_up(&self) -> bool {
        self.up.both()
    }

    /// Changes at every reconnect to Redis: shards then rewrite their counts
    /// ([`BrokerReq::Resync`]).
    pub fn generation(&self) -> u64 {
        self.up.generation.load(Ordering::Relaxed)
    }
}

/// How often a node refreshes its liveness key.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Most shards a node may have (`--shards` is 1..=1024): a dead node's hashes are deleted
/// for every shard number.
const MAX_SHARDS: u16 = 1024;
/// How long a node's liveness key lives: a dead node's users vanish within this.
const NODE_TTL_MS: u64 = 5_000;
/// Drops a user's count on a node when it reaches 0.
const PRESENCE_SCRIPT: &str = "local v = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) \
if v <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end return v";
/// A channel's subscriber count (KEYS[1], field ARGV[1]) and its members (KEYS[2], field
/// ARGV[2], the user) move by ARGV[3] together: a member hash exists while its channel counts.
const MEMBER_SCRIPT: &str = "local v = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[3]) \
if v <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end \
local m = redis.call('HINCRBY', KEYS[2], ARGV[2], ARGV[3]) \
if m <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end return v";
/// Deletes the channel counts of a node's shards ARGV[2]..ARGV[3] (ARGV[1]: `sb:n:<node>:`)
/// and the member hash of every channel they count.
const CLEAR_CHANNELS_SCRIPT: &str = "for s = tonumber(ARGV[2]), tonumber(ARGV[3]) - 1 do \
local p = ARGV[1] .. s .. ':' local h = p .. 'channels' \
for _, c in ipairs(redis.call('HKEYS', h)) do redis.call('DEL', p .. 'm:' .. c) end \
redis.call('DEL', h) end return 0";

/// The hash of a channel's members counted by a node's shard.
fn members_key(node: &str, shard: u16, channel: &str) -> String {
    format!("sb:n:{node}:{shard}:m:{channel}")
}

/// Adds to `pipe` the deletion of the channel counts of a node's shards `from..to` and of
/// every member hash they list (no reply).
fn clear_channel_counts(pipe: &mut redis::Pipeline, node: &str, from: u16, to: u16) {
    pipe.cmd("EVAL")
        .arg(CLEAR_CHANNELS_SCRIPT)
        .arg(0)
        .arg(format!("sb:n:{node}:"))
        .arg(from)
        .arg(to)
        .ignore();
}

/// Adds to `pipe` HSETs of `key` to every (field, value), 1000 per command; no replies.
fn hset_all(pipe: &mut redis::Pipeline, key: &str, fields: &[(Arc<str>, u64)]) {
    for part in fields.chunks(1000) {
        let mut c = redis::cmd("HSET");
        c.arg(key);
        for (name, n) in part {
            c.arg(&**name).arg(*n);
        }
        pipe.add_command(c).ignore();
    }
}

/// Adds to `pipe` the deletion of a node's counts and members for shards `from..to`.
fn clear_counts(pipe: &mut redis::Pipeline, node: &str, from: u16, to: u16) {
    clear_channel_counts(pipe, node, from, to);
    let mut users = redis::cmd("DEL");
    for shard in from..to {
        users.arg(Counted::Users.key(node, shard));
    }
    pipe.add_command(users).ignore();
}

/// The key of a node's liveness.
fn node_key(node: &str) -> String {
    format!("sb:node:{node}")
}

/// The Redis channel every node always subscribes to (broadcasts).
pub const ALL: &str = "sb:all";

/// The Redis channel of a user's DMs.
pub fn user_channel(user: &str) -> String {
    format!("sb:u:{user}")
}

/// The Redis channel of a channel's publications.
pub fn channel_channel(channel: &str) -> String {
    format!("sb:c:{channel}")
}

/// (Redis channel, on, ready) of an interest change.
fn split(i: Interest) -> (String, bool, Option<(u16, u64)>) {
    match i {
        Interest::User { user, on, ready } => (user_channel(&user), on, ready),
        Interest::Channel { channel, on, ready } => (channel_channel(&channel), on, ready),
    }
}

/// `<node>\n<payload>`: who published, then the event as delivered.
fn envelope(node: &str, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(node.len() + 1 + payload.len());
    v.extend_from_slice(node.as_bytes());
    v.push(b'\n');
    v.extend_from_slice(payload);
    v
}

/// `!<node>\n<code> <reason>`: close a user's connections (`POST /api/disconnect`).
fn disconnect_envelope(node: &str, code: u16, reason: &str) -> Vec<u8> {
    format!("!{node}\n{code} {reason}").into_bytes()
}

/// Splits a disconnect envelope into (node, code, reason).
fn open_disconnect(b: &[u8]) -> Option<(&[u8], u16, &str)> {
    let (node, rest) = open_envelope(b.strip_prefix(b"!")?)?;
    let rest = std::str::from_utf8(rest).ok()?;
    let (code, reason) = rest.split_once(' ')?;
    Some((node, code.parse().ok()?, reason))
}

/// The envelope of a stored stream message, published by the Redis store's script
/// (`store::redis_streams`): `*<offset> <excluded conn|-> <node>`, a newline, then the event.
pub fn open_stored(b: &[u8]) -> Option<(u64, &str, &str, &[u8])> {
    let rest = b.strip_prefix(b"*")?;
    let nl = rest.iter().position(|&c| c == b'\n')?;
    let head = std::str::from_utf8(&rest[..nl]).ok()?;
    let mut parts = head.splitn(3, ' ');
    let offset = parts.next()?.parse().ok()?;
    let exclude = parts.next()?;
    let node = parts.next()?;
    Some((offset, exclude, node, &rest[nl + 1..]))
}

/// Splits an envelope into (node, payload).
fn open_envelope(b: &[u8]) -> Option<(&[u8], &[u8])> {
    let i = b.iter().position(|&c| c == b'\n')?;
    Some((&b[..i], &b[i + 1..]))
}

/// The URL as logged: without a password.
fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***{}", &url[..s + 3], &url[at..]),
        _ => url.to_owned(),
    }
}

/// A running broker: its threads and how to stop them.
pub struct Broker {
    /// How to reach the broker's Redis (the Redis store connects with it too).
    client: redis::Client,
    handle: BrokerHandle,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Counters.
    pub metrics: Arc<BrokerMetrics>,
}

impl Broker {
    /// Connects to Redis (both connections must answer, or start-up fails) and starts the
    /// publisher and subscriber threads.
    pub fn start(
        url: &str,
        password: Option<String>,
        node: Arc<str>,
        shards: usize,
        homes: usize,
        sink: Sink,
    ) -> Result<Broker, BrokerError> {
        let shown = redacted(url);
        let mut info: redis::ConnectionInfo = redis::IntoConnectionInfo::into_connection_info(url)
            .map_err(|source| BrokerError::Url {
                url: shown.clone(),
                source,
            })?;
        if let Some(p) = password {
            if info.redis_settings().password().is_none() {
                let settings = info.redis_settings().clone().set_password(p);
                info = info.set_redis_settings(settings);
            }
        }
        let client = redis::Client::open(info).map_err(|source| BrokerError::Url {
            url: shown.clone(),
            source,
        })?;
        let connect = |client: &redis::Client| -> redis::RedisResult<redis::Connection> {
            let mut c = client.get_connection_with_timeout(Duration::from_secs(2))?;
            redis::cmd("PING").query::<String>(&mut c)?;
            Ok(c)
        };
        let pub_con = connect(&client).map_err(|source| BrokerError::Connect {
            url: shown.clone(),
            source,
        })?;
        let sub_con = connect(&client).map_err(|source| BrokerError::Connect {
            url: shown.clone(),
            source,
        })?;
        let (ptx, prx) = crossbeam_channel::bounded(BROKER_QUEUE);
        let (itx, irx) = crossbeam_channel::unbounded();
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(BrokerMetrics::default());
        let up = Arc::new(Up::default());
        up.set(&up.publisher, true, &metrics);
        up.set(&up.subscriber, true, &metrics);
        let sink = Arc::new(sink);
        let mut publisher = Publisher {
            client: client.clone(),
            con: Some(pub_con),
            node: node.clone(),
            shards: shards as u16,
            sink: sink.clone(),
            metrics: metrics.clone(),
            up: up.clone(),
        };
        let mut subscriber = Subscriber {
            client: client.clone(),
            node: node.clone(),
            shards,
            homes,
            sink,
            metrics: metrics.clone(),
            up: up.clone(),
            stop: stop.clone(),
            // Every node takes broadcasts: subscribed from the start, for good.
            interest: HashMap::from([(ALL.to_owned(), 1)]),
            late_ready: Vec::new(),
        };
        let threads = vec![
            std::thread::Builder::new()
                .name("broker-pub".into())
                .spawn(move || publisher.run(prx))
                .map_err(BrokerError::Spawn)?,
            std::thread::Builder::new()
                .name("broker-sub".into())
                .spawn(move || subscriber.run(sub_con, irx))
                .map_err(BrokerError::Spawn)?,
        ];
        info!(broker = %shown, node = %node, "joined the cluster");
        Ok(Broker {
            client,
            handle: BrokerHandle {
                publish: ptx,
                interest: itx,
                node,
                up,
            },
            stop,
            threads,
            metrics,
        })
    }

    /// How to reach the broker's Redis.
    pub fn client(&self) -> redis::Client {
        self.client.clone()
    }

    /// What shards hold.
    pub fn handle(&self) -> BrokerHandle {
        self.handle.clone()
    }

    /// Stops both threads.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        drop(self.handle);
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Posts to a shard, retrying a full mailbox for a while (answers must not be lost).
fn post(sink: &Sink, shard: u16, mut msg: BrokerMsg) {
    let start = Instant::now();
    loop {
        match sink(shard, msg) {
            Ok(()) => return,
            Err(m) if start.elapsed() < POST_PATIENCE => {
                msg = m;
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(m) => {
                warn!(shard, msg = ?m, "shard mailbox full for 10 s: broker message dropped");
                return;
            }
        }
    }
}

struct Publisher {
    client: redis::Client,
    con: Option<redis::Connection>,
    node: Arc<str>,
    shards: u16,
    sink: Arc<Sink>,
    metrics: Arc<BrokerMetrics>,
    up: Arc<Up>,
}

impl Publisher {
    /// Announces this node alive (and, at start, forgets its old presence counts).
    fn heartbeat(&mut self, fresh: bool) {
        let Some(con) = self.con.as_mut() else { return };
        let mut pipe = redis::pipe();
        if fresh {
            clear_counts(&mut pipe, &self.node, 0, self.shards);
        }
        // The value is the node's shard count: readers sum its shards' hashes.
        pipe.cmd("SET")
            .arg(node_key(&self.node))
            .arg(self.shards)
            .arg("PX")
            .arg(NODE_TTL_MS)
            .ignore()
            .cmd("SADD")
            .arg("sb:nodes")
            .arg(&*self.node)
            .ignore();
        if let Err(e) = pipe.query::<()>(con) {
            warn!(error = %e, "broker: heartbeat failed");
            self.lost();
        }
    }

    /// Every other live node with its shard count (dead nodes are forgotten on the way).
    fn live_others(&mut self) -> redis::RedisResult<Vec<(String, u16)>> {
        let Some(con) = self.con.as_mut() else {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "not connected",
            )));
        };
        let nodes: Vec<String> = redis::cmd("SMEMBERS").arg("sb:nodes").query(con)?;
        let others: Vec<String> = nodes.into_iter().filter(|n| **n != *self.node).collect();
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for n in &others {
            pipe.cmd("GET").arg(node_key(n));
        }
        let shards: Vec<Option<u16>> = pipe.query(con)?;
        let mut dead = redis::pipe();
        let mut any_dead = false;
        let mut live = Vec::with_capacity(others.len());
        for (n, s) in others.into_iter().zip(shards) {
            match s {
                Some(s) => live.push((n, s)),
                None => {
                    any_dead = true;
                    // Its liveness key expired: forget it (every shard a node may have).
                    dead.cmd("SREM").arg("sb:nodes").arg(n.as_str()).ignore();
                    clear_counts(&mut dead, &n, 0, MAX_SHARDS);
                }
            }
        }
        if any_dead {
            dead.query::<()>(con)?;
        }
        Ok(live)
    }

    /// The count of `name` on every other live node.
    fn count_elsewhere(&mut self, kind: Counted, name: &str) -> redis::RedisResult<u64> {
        let others = self.live_others()?;
        let mut pipe = redis::pipe();
        for (n, s) in &others {
            for shard in 0..*s {
                pipe.cmd("HGET").arg(kind.key(n, shard)).arg(name);
            }
        }
        let Some(con) = self.con.as_mut().filter(|_| !others.is_empty()) else {
            return Ok(0);
        };
        let counts: Vec<Option<u64>> = pipe.query(con)?;
        Ok(counts.into_iter().flatten().sum())
    }

    /// The members of `channel` on every other live node (user → subscriptions).
    fn members_elsewhere(&mut self, channel: &str) -> redis::RedisResult<Members> {
        let others = self.live_others()?;
        let mut pipe = redis::pipe();
        for (n, s) in &others {
            for shard in 0..*s {
                pipe.cmd("HGETALL").arg(members_key(n, shard, channel));
            }
        }
        let Some(con) = self.con.as_mut().filter(|_| !others.is_empty()) else {
            return Ok(Vec::new());
        };
        let hashes: Vec<HashMap<String, u64>> = pipe.query(con)?;
        Ok(hashes
            .into_iter()
            .flatten()
            .map(|(u, n)| (Arc::from(u), n))
            .collect())
    }

    fn run(&mut self, rx: Receiver<BrokerReq>) {
        let mut batch = Vec::with_capacity(PIPELINE_MAX);
        let mut backoff = Duration::from_millis(50);
        self.heartbeat(true);
        let mut beat = Instant::now();
        loop {
            if beat.elapsed() >= HEARTBEAT {
                self.heartbeat(false);
                beat = Instant::now();
            }
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(r) => batch.push(r),
                Err(RecvTimeoutError::Timeout)
                    if self.con.is_some() && beat.elapsed() >= HEARTBEAT =>
                {
                    continue;
                }
                Err(RecvTimeoutError::Timeout) => {
                    // Idle: find out now whether the connection still works.
                    let alive = self
                        .con
                        .as_mut()
                        .map(|c| redis::cmd("PING").query::<String>(c).is_ok());
                    match alive {
                        None => self.reconnect(&mut backoff),
                        Some(false) => self.lost(),
                        Some(true) => {}
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return,
            }
            while batch.len() < PIPELINE_MAX {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            if self.con.is_none() {
                self.reconnect(&mut backoff);
            }
            let counts = match self.con.as_mut() {
                Some(con) => {
                    let mut pipe = redis::pipe();
                    for r in &batch {
                        let (channel, payload) = match r {
                            BrokerReq::User { user, payload, .. } => (user_channel(user), payload),
                            BrokerReq::Channel { channel, payload } => {
                                (channel_channel(channel), payload)
                            }
                            BrokerReq::Broadcast { payload } => (ALL.to_owned(), payload),
                            BrokerReq::Disconnect { user, code, reason } => {
                                pipe.cmd("PUBLISH")
                                    .arg(user_channel(user))
                                    .arg(disconnect_envelope(&self.node, *code, reason));
                                continue;
                            }
                            BrokerReq::Resync {
                                kind,
                                shard,
                                counts,
                                members,
                            } => {
                                let key = kind.key(&self.node, *shard);
                                // One reply for the request (the answers are matched by
                                // index): the deletions are ignored.
                                match kind {
                                    Counted::Users => {
                                        pipe.cmd("DEL").arg(&key).ignore();
                                    }
                                    Counted::Channels => {
                                        let next = *shard + 1;
                                        clear_channel_counts(&mut pipe, &self.node, *shard, next);
                                    }
                                }
                                hset_all(&mut pipe, &key, counts);
                                for (channel, users) in members {
                                    let mk = members_key(&self.node, *shard, channel);
                                    hset_all(&mut pipe, &mk, users);
                                }
                                pipe.cmd("PING");
                                continue;
                            }
                            BrokerReq::Presence {
                                shard,
                                kind,
                                name,
                                member: None,
                                delta,
                            } => {
                                pipe.cmd("EVAL")
                                    .arg(PRESENCE_SCRIPT)
                                    .arg(1)
                                    .arg(kind.key(&self.node, *shard))
                                    .arg(&**name)
                                    .arg(*delta);
                                continue;
                            }
                            BrokerReq::Presence {
                                shard,
                                kind,
                                name,
                                member: Some(user),
                                delta,
                            } => {
                                pipe.cmd("EVAL")
                                    .arg(MEMBER_SCRIPT)
                                    .arg(2)
                                    .arg(kind.key(&self.node, *shard))
                                    .arg(members_key(&self.node, *shard, name))
                                    .arg(&**name)
                                    .arg(&**user)
                                    .arg(*delta);
                                continue;
                            }
                            // Not in the pipeline: answered after it (one reply per command).
                            BrokerReq::Count { .. } | BrokerReq::Members { .. } => {
                                pipe.cmd("PING");
                                continue;
                            }
                        };
                        pipe.cmd("PUBLISH")
                            .arg(channel)
                            .arg(envelope(&self.node, payload));
                    }
                    match pipe.query::<Vec<redis::Value>>(con) {
                        Ok(v) => Some(
                            v.into_iter()
                                .map(|x| match x {
                                    redis::Value::Int(n) => n,
                                    _ => 0,
                                })
                                .collect::<Vec<i64>>(),
                        ),
                        Err(e) => {
                            warn!(error = %e, "broker: publishing failed; reconnecting");
                            self.lost();
                            None
                        }
                    }
                }
                None => None,
            };
            if counts.is_some() {
                let n = batch
                    .iter()
                    .filter(|r| {
                        matches!(
                            r,
                            BrokerReq::User { .. }
                                | BrokerReq::Channel { .. }
                                | BrokerReq::Broadcast { .. }
                        )
                    })
                    .count();
                self.metrics
                    .published
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            for (i, r) in std::mem::take(&mut batch).into_iter().enumerate() {
                if let BrokerReq::Members { channel, ticket } = r {
                    let members = match counts {
                        Some(_) => self.members_elsewhere(&channel).map_or_else(
                            |e| {
                                warn!(error = %e, "broker: listing a channel's members failed");
                                None
                            },
                            Some,
                        ),
                        None => None,
                    };
                    post(
                        &self.sink,
                        ticket.shard,
                        BrokerMsg::Members { ticket, members },
                    );
                    continue;
                }
                if let BrokerReq::Count {
                    kind,
                    name,
                    conn,
                    local,
                } = r
                {
                    let elsewhere = if counts.is_some() {
                        self.count_elsewhere(kind, &name).unwrap_or_else(|e| {
                            warn!(error = %e, "broker: counting a user's connections failed");
                            0
                        })
                    } else {
                        0
                    };
                    let msg = BrokerMsg::Counted {
                        kind,
                        conn,
                        name,
                        total: local + elsewhere,
                    };
                    post(&self.sink, conn.shard, msg);
                    continue;
                }
                let BrokerReq::User {
                    reply: Some(reply), ..
                } = r
                else {
                    continue;
                };
                let shard = reply.conn.shard;
                let msg = match &counts {
                    Some(c) => BrokerMsg::Routed {
                        reply,
                        online: c.get(i).is_some_and(|&n| n > 0),
                    },
                    None => BrokerMsg::Unavailable { reply },
                };
                post(&self.sink, shard, msg);
            }
        }
    }

    /// The connection failed: what was in the pipeline is answered `unavailable` (never
    /// retried: a message may have gone out before the failure), then one immediate attempt.
    fn lost(&mut self) {
        self.con = None;
        self.up.set(&self.up.publisher, false, &self.metrics);
        self.metrics.disconnects.fetch_add(1, Ordering::Relaxed);
        let mut backoff = Duration::ZERO;
        self.reconnect(&mut backoff);
    }

    /// One attempt after `backoff` (the caller's loop paces them): requests meanwhile are
    /// answered `unavailable`, never held.
    fn reconnect(&mut self, backoff: &mut Duration) {
        std::thread::sleep(*backoff);
        let attempt = self
            .client
            .get_connection_with_timeout(Duration::from_secs(1))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c).map(|_| c));
        match attempt {
            Ok(c) => {
                info!("broker: publisher reconnected");
                self.con = Some(c);
                self.up.set(&self.up.publisher, true, &self.metrics);
                // Changes while Redis was away were not counted: shards rewrite theirs.
                self.up.generation.fetch_add(1, Ordering::Relaxed);
                *backoff = Duration::from_millis(50);
            }
            Err(e) => {
                warn!(error = %e, "broker: Redis unreachable");
                *backoff = (*backoff * 2).clamp(Duration::from_millis(50), BACKOFF_MAX);
            }
        }
    }
}

struct Subscriber {
    client: redis::Client,
    node: Arc<str>,
    shards: usize,
    /// Shards that are users' homes (`home_of`'s modulus).
    homes: usize,
    sink: Arc<Sink>,
    metrics: Arc<BrokerMetrics>,
    up: Arc<Up>,
    stop: Arc<AtomicBool>,
    /// Redis channel → interested parties (1 per user; shards per channel).
    interest: HashMap<String, u32>,
    /// Subscriptions whose waiters are told once the connection is back and restored.
    late_ready: Vec<(u16, u64)>,
}

impl Subscriber {
    fn run(&mut self, mut con: redis::Connection, rx: Receiver<Interest>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let lost = self.serve(&mut con, &rx);
            if self.stop.load(Ordering::Relaxed) || !lost {
                return;
            }
            self.up.set(&self.up.subscriber, false, &self.metrics);
            self.metrics.disconnects.fetch_add(1, Ordering::Relaxed);
            loop {
                if self.stop.load(Ordering::Relaxed) {
                    return;
                }
                // Meanwhile interest is only noted (restored with the rest): nobody waits
                // for Redis to be welcomed or to subscribe.
                let deadline = Instant::now() + backoff;
                while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                    match rx.recv_timeout(left) {
                        Ok(i) => {
                            let (name, on, ready) = split(i);
                            self.note(name, on);
                            if let Some((shard, token)) = ready {
                                post(&self.sink, shard, BrokerMsg::Ready { token });
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                match self
                    .client
                    .get_connection_with_timeout(Duration::from_secs(1))
                {
                    Ok(c) => {
                        con = c;
                        backoff = Duration::from_millis(50);
                        info!(
                            subscriptions = self.interest.len(),
                            "broker: subscriber reconnected; restoring subscriptions"
                        );
                        break;
                    }
                    Err(e) => {
                        warn!(error = %e, "broker: Redis unreachable");
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                }
            }
        }
    }

    /// Serves one connection; true when it was lost (false: asked to stop).
    fn serve(&mut self, con: &mut redis::Connection, rx: &Receiver<Interest>) -> bool {
        let mut ps = con.as_pubsub();
        if ps.set_read_timeout(Some(COMMAND_TIMEOUT)).is_err() {
            return true;
        }
        let names: Vec<String> = self.interest.keys().cloned().collect();
        for n in &names {
            if ps.subscribe(n).is_err() {
                return true;
            }
        }
        if ps.set_read_timeout(Some(POLL)).is_err() {
            return true;
        }
        self.up.set(&self.up.subscriber, true, &self.metrics);
        self.metrics
            .subscriptions
            .store(self.interest.len() as u64, Ordering::Relaxed);
        // Those who waited through the outage are subscribed now.
        for (shard, token) in std::mem::take(&mut self.late_ready) {
            post(&self.sink, shard, BrokerMsg::Ready { token });
        }
        let mut changed: Vec<String> = Vec::new();
        let mut readies: Vec<(u16, u64)> = Vec::new();
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return false;
            }
            // Every change waiting, then the subscriptions they need. One channel per command:
            // redis-rs waits for one confirmation per command, so only then is "returned"
            // the same as "active" (a multi-channel SUBSCRIBE would return early).
            loop {
                let i = match rx.try_recv() {
                    Ok(i) => i,
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return false,
                };
                let (name, on, ready) = split(i);
                if self.note(name.clone(), on) {
                    changed.push(name);
                }
                readies.extend(ready);
                if changed.len() >= BATCH_CHANGES {
                    break;
                }
            }
            if !changed.is_empty() {
                changed.sort_unstable();
                changed.dedup();
                // What counts is the state after the batch (a user may come and go in it).
                let (subs, unsubs): (Vec<String>, Vec<String>) = changed
                    .drain(..)
                    .partition(|n| self.interest.contains_key(n));
                let mut ok = ps.set_read_timeout(Some(COMMAND_TIMEOUT)).is_ok();
                for n in &subs {
                    ok = ok && ps.subscribe(n).is_ok();
                }
                for n in &unsubs {
                    ok = ok && ps.unsubscribe(n).is_ok();
                }
                ok = ok && ps.set_read_timeout(Some(POLL)).is_ok();
                if !ok {
                    // Restored with the rest once reconnected; then they are told.
                    self.late_ready.append(&mut readies);
                    return true;
                }
                self.metrics
                    .subscriptions
                    .store(self.interest.len() as u64, Ordering::Relaxed);
            }
            for (shard, token) in readies.drain(..) {
                post(&self.sink, shard, BrokerMsg::Ready { token });
            }
            match ps.get_message() {
                Ok(m) => self.on_message(m.get_channel_name(), m.get_payload_bytes()),
                Err(e) if e.is_timeout() => {}
                Err(e) => {
                    warn!(error = %e, "broker: subscriber connection lost");
                    return true;
                }
            }
        }
    }

    /// Counts an interest change; true when the subscription must follow (first or last).
    fn note(&mut self, name: String, on: bool) -> bool {
        if on {
            let n = self.interest.entry(name).or_insert(0);
            *n += 1;
            *n == 1
        } else {
            match self.interest.get_mut(&name) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    self.interest.remove(&name);
                    true
                }
                None => false,
            }
        }
    }

    /// Posts a message made by `m` to every shard.
    fn to_every_shard(&self, m: impl Fn() -> BrokerMsg) {
        for s in 0..self.shards as u16 {
            post(&self.sink, s, m());
        }
    }

    fn on_message(&self, channel: &str, payload: &[u8]) {
        if let Some((offset, exclude, node, event)) = open_stored(payload) {
            // Stored messages come this way from every node, this one included: one path per
            // stream keeps its offsets in order.
            self.metrics.received.fetch_add(1, Ordering::Relaxed);
            let exclude = if node == &*self.node {
                exclude.parse().ok()
            } else {
                None
            };
            let payload = Bytes::copy_from_slice(event);
            if let Some(user) = channel.strip_prefix("sb:u:") {
                let user: Arc<str> = user.into();
                let home = home_of(&user, self.homes);
                let m = BrokerMsg::Stored {
                    user,
                    payload,
                    offset,
                    exclude,
                };
                post(&self.sink, home, m);
            } else if let Some(ch) = channel.strip_prefix("sb:c:") {
                let ch: Arc<str> = ch.into();
                self.to_every_shard(|| BrokerMsg::ChannelStored {
                    channel: ch.clone(),
                    payload: payload.clone(),
                    offset,
                });
            }
            return;
        }
        if let Some((node, code, reason)) = open_disconnect(payload) {
            if node != self.node.as_bytes() {
                if let Some(user) = channel.strip_prefix("sb:u:") {
                    let (user, reason): (Arc<str>, Arc<str>) = (user.into(), reason.into());
                    self.to_every_shard(|| BrokerMsg::Disconnect {
                        user: user.clone(),
                        code,
                        reason: reason.clone(),
                    });
                }
            }
            return;
        }
        let Some((node, event)) = open_envelope(payload) else {
            return;
        };
        if node == self.node.as_bytes() {
            self.metrics.own_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.metrics.received.fetch_add(1, Ordering::Relaxed);
        let event = Bytes::copy_from_slice(event);
        if let Some(user) = channel.strip_prefix("sb:u:") {
            let user: Arc<str> = user.into();
            let home = home_of(&user, self.homes);
            post(
                &self.sink,
                home,
                BrokerMsg::User {
                    user,
                    payload: event,
                },
            );
        } else if channel == ALL {
            self.to_every_shard(|| BrokerMsg::Broadcast {
                payload: event.clone(),
            });
        } else if let Some(ch) = channel.strip_prefix("sb:c:") {
            let ch: Arc<str> = ch.into();
            self.to_every_shard(|| BrokerMsg::Channel {
                channel: ch.clone(),
                payload: event.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_urls_hide_passwords() {
        let e = envelope("n1:8080", br#"{"op":"msg"}"#);
        assert_eq!(
            open_envelope(&e),
            Some((&b"n1:8080"[..], &br#"{"op":"msg"}"#[..]))
        );
        assert_eq!(open_envelope(b"no separator"), None);
        let b = b"*42 0.7.3 node-a:8080\n{\"op\":\"msg\"}";
        assert_eq!(
            open_stored(b),
            Some((42, "0.7.3", "node-a:8080", &b"{\"op\":\"msg\"}"[..]))
        );
        assert_eq!(open_stored(b"node\n{}"), None, "a plain envelope");
        assert_eq!(open_stored(b"*x - n\n{}"), None);
        let d = disconnect_envelope("n1", 4005, "go away now");
        assert_eq!(open_disconnect(&d), Some((&b"n1"[..], 4005, "go away now")));
        assert_eq!(
            open_disconnect(b"n1\n{}"),
            None,
            "a message is not a disconnect"
        );
        assert_eq!(
            redacted("redis://:secret@127.0.0.1:6379/0"),
            "redis://***@127.0.0.1:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
    }
}
