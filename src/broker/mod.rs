//! Nodes that act as one, through Redis PUB/SUB (`--broker redis://…`), on one Redis or a
//! Redis Cluster (found at start: sharded `SPUBLISH`/`SSUBSCRIBE` then).
//!
//! Threads own the Redis connections, outside the shard loops:
//! - the **publisher** ([`publisher`]) takes every request waiting, sends them as one
//!   pipeline per master (one publish per message, never one per recipient) and answers the
//!   senders that asked whether anyone received it (a publish counts the nodes subscribed);
//! - one **subscriber** per master ([`subscriber`]) follows the node's interest in the
//!   channels of that master's slots: `sb:u:{<user>}` while the user has a connection on this
//!   node, `sb:c:{<channel>}` while the channel has a local subscriber, and hands what arrives
//!   to the shards.
//!
//! A message carries the id of the node that published it; a node drops its own: local
//! recipients were served directly, never through Redis. The threads reconnect with backoff
//! and the subscribers restore every subscription; meanwhile cross-node sends are answered
//! `unavailable`. The broker imports neither the hub nor the session layer: it answers through
//! a sink the server gives it.

pub mod cluster;
mod publisher;
mod resp;
pub mod sentinel;
mod sequence;
mod subscriber;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Sender, TrySendError};
use tracing::{info, warn};

use crate::ids::{ApiTicket, ConnId, ReplyTo};
pub use crate::metrics::BrokerMetrics;
use cluster::{Conns, SlotMap};
use sentinel::Seed;

/// Publish requests waiting for the publisher thread, at most.
pub const BROKER_QUEUE: usize = 65_536;
/// How long a thread keeps retrying a full shard mailbox.
const POST_PATIENCE: Duration = Duration::from_secs(10);
/// How long a Redis command of the publisher may take before its connection counts as lost.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);

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
            Counted::Users => format!("sb:n:{{{node}}}:{shard}:users"),
            Counted::Channels => format!("sb:n:{{{node}}}:{shard}:channels"),
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
    /// To every shard: a subscriber connection was lost and its subscriptions are active
    /// again; what was published meanwhile never came. Shards catch up on the inboxes
    /// their connections follow.
    Resubscribed,
}

/// Hands a message to shard `i`; gives it back when the mailbox is full.
pub type Sink = Box<dyn Fn(u16, BrokerMsg) -> Result<(), BrokerMsg> + Send + Sync>;

/// What shards hold to talk to the broker.
#[derive(Debug, Clone)]
pub struct BrokerHandle {
    publish: Sender<BrokerReq>,
    /// To the subscriber of each master.
    interest: Arc<[Sender<Change>]>,
    /// Which subscriber follows which channel.
    map: Arc<SlotMap>,
    /// This node's id.
    pub node: Arc<str>,
    up: Arc<Up>,
}

/// Whether each Redis connection is up, per master of the slot map at start.
#[derive(Debug)]
struct Up {
    /// The publisher's connection to each master.
    publisher: Vec<AtomicBool>,
    /// Each master's subscriber.
    subscriber: Vec<AtomicBool>,
    /// Bumped at every reconnect of the publisher.
    generation: std::sync::atomic::AtomicU64,
}

impl Up {
    fn new(masters: usize) -> Up {
        let up = || (0..masters).map(|_| AtomicBool::new(true)).collect();
        Up {
            publisher: up(),
            subscriber: up(),
            generation: Default::default(),
        }
    }

    /// Whether every connection is up.
    fn all(&self) -> bool {
        (0..self.publisher.len()).all(|i| self.master(i))
    }

    /// Whether master `i` can be published to and heard from.
    fn master(&self, i: usize) -> bool {
        self.publisher[i].load(Ordering::Relaxed) && self.subscriber[i].load(Ordering::Relaxed)
    }

    /// Sets the publisher's (`publisher`) or the subscriber's state for master `i`.
    fn set(&self, publisher: bool, i: usize, v: bool, m: &BrokerMetrics) {
        let which = if publisher {
            &self.publisher
        } else {
            &self.subscriber
        };
        which[i].store(v, Ordering::Relaxed);
        m.connected.store(u64::from(self.all()), Ordering::Relaxed);
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
        let c = Change::of(i);
        let _ = self.interest[self.map.owner_of(&c.name)].send(c);
    }

    /// Whether Redis (every master of a cluster) is reachable right now.
    pub fn is_up(&self) -> bool {
        self.up.all()
    }

    /// Whether the master that carries `user`'s DMs is reachable (in a cluster the others
    /// may be down).
    pub fn reachable_user(&self, user: &str) -> bool {
        self.single()
            .unwrap_or_else(|| self.reachable_at(cluster::tagged_slot("sb:u:", user)))
    }

    /// Whether the master that carries `req` is reachable.
    pub fn reachable(&self, req: &BrokerReq) -> bool {
        if let Some(up) = self.single() {
            return up;
        }
        let slot = match req {
            BrokerReq::User { user, .. } | BrokerReq::Disconnect { user, .. } => {
                cluster::tagged_slot("sb:u:", user)
            }
            BrokerReq::Channel { channel, .. } => cluster::tagged_slot("sb:c:", channel),
            BrokerReq::Broadcast { .. } => cluster::slot(ALL.as_bytes()),
            BrokerReq::Presence { .. } | BrokerReq::Resync { .. } => {
                cluster::tagged_slot("sb:n:", &self.node)
            }
            BrokerReq::Count { .. } | BrokerReq::Members { .. } => return self.is_up(),
        };
        self.reachable_at(slot)
    }

    fn reachable_at(&self, slot: u16) -> bool {
        self.up.master(self.map.owner(slot))
    }

    /// One Redis: the only master (no slot to compute per message).
    fn single(&self) -> Option<bool> {
        (!self.map.cluster).then(|| self.up.master(0))
    }

    /// Changes at every reconnect to Redis: shards then rewrite their counts
    /// ([`BrokerReq::Resync`]).
    pub fn generation(&self) -> u64 {
        self.up.generation.load(Ordering::Relaxed)
    }
}

/// A broker without threads or Redis, for the simulation (`sim/cluster.rs`): the handle
/// the shards hold is the real one; what they post is read from the [`ModelLink`], which
/// also says whether "Redis" is reachable.
#[cfg(any(test, feature = "sim"))]
pub fn model(node: &str, queue: usize) -> (BrokerHandle, ModelLink) {
    let (publish, publish_rx) = crossbeam_channel::bounded(queue);
    let (interest, interest_rx) = crossbeam_channel::unbounded();
    let up = Arc::new(Up::new(1));
    let handle = BrokerHandle {
        publish,
        interest: vec![interest].into(),
        map: Arc::new(SlotMap::single("model".into(), 0)),
        node: node.into(),
        up: up.clone(),
    };
    let link = ModelLink {
        publish: publish_rx,
        interest: interest_rx,
        up,
    };
    (handle, link)
}

/// The far end of a [`model`] broker's handle.
#[cfg(any(test, feature = "sim"))]
#[derive(Debug)]
pub struct ModelLink {
    publish: crossbeam_channel::Receiver<BrokerReq>,
    interest: crossbeam_channel::Receiver<Change>,
    up: Arc<Up>,
}

#[cfg(any(test, feature = "sim"))]
impl ModelLink {
    /// The next publication a shard queued.
    pub fn next_request(&self) -> Option<BrokerReq> {
        self.publish.try_recv().ok()
    }

    /// The next interest change, as the subscriber takes it: the Redis channel
    /// ([`user_channel`], [`channel_channel`]), on or off, and who waits for it.
    pub fn next_interest(&self) -> Option<Change> {
        self.interest.try_recv().ok()
    }

    /// The publisher's connection went down or came back (a reconnect bumps the
    /// generation, as the publisher thread does).
    pub fn set_publisher(&self, up: bool) {
        if up && !self.up.publisher[0].load(Ordering::Relaxed) {
            self.up.generation.fetch_add(1, Ordering::Relaxed);
        }
        self.up.publisher[0].store(up, Ordering::Relaxed);
    }

    /// The subscriber's connection went down or came back.
    pub fn set_subscriber(&self, up: bool) {
        self.up.subscriber[0].store(up, Ordering::Relaxed);
    }
}

/// How often a node refreshes its liveness key.
pub const HEARTBEAT: Duration = Duration::from_secs(2);
/// Most shards a node may have (`--shards` is 1..=1024): a dead node's hashes are deleted
/// for every shard number.
const MAX_SHARDS: u16 = 1024;
/// How long a node's liveness key lives: a dead node's users vanish within this.
const NODE_TTL_MS: u64 = 5_000;
/// The hash of a channel's members counted by a node's shard.
fn members_key(node: &str, shard: u16, channel: &str) -> String {
    format!("sb:n:{{{node}}}:{shard}:m:{channel}")
}

/// The key of a node's liveness.
fn node_key(node: &str) -> String {
    format!("sb:{{nodes}}:{node}")
}

/// The set of nodes that announced themselves (its hash tag keeps every liveness key in
/// its slot).
const NODES: &str = "sb:{nodes}";

/// The Redis channel every node always subscribes to (broadcasts).
pub const ALL: &str = "sb:all";

/// The Redis channel of a user's DMs (hash tag: the user, as the keys of their inbox).
pub fn user_channel(user: &str) -> String {
    format!("sb:u:{{{user}}}")
}

/// The Redis channel of a channel's publications (hash tag: the channel).
pub fn channel_channel(channel: &str) -> String {
    format!("sb:c:{{{channel}}}")
}

/// The user of a [`user_channel`].
fn user_of(redis_channel: &str) -> Option<&str> {
    redis_channel.strip_prefix("sb:u:{")?.strip_suffix('}')
}

/// The channel of a [`channel_channel`].
fn channel_of(redis_channel: &str) -> Option<&str> {
    redis_channel.strip_prefix("sb:c:{")?.strip_suffix('}')
}

/// An interest change as a subscriber thread takes it.
#[derive(Debug)]
pub struct Change {
    /// The Redis channel.
    pub name: String,
    /// Interest came (or went).
    pub on: bool,
    /// (shard, token) to answer with [`BrokerMsg::Ready`].
    pub ready: Option<(u16, u64)>,
}

impl Change {
    fn of(i: Interest) -> Change {
        let (name, on, ready) = match i {
            Interest::User { user, on, ready } => (user_channel(&user), on, ready),
            Interest::Channel { channel, on, ready } => (channel_channel(&channel), on, ready),
        };
        Change { name, on, ready }
    }
}

/// `#<run>:<number> <node>\n<payload>`: the copy's number on its Redis channel
/// ([`sequence`]: receivers count the numbers they never saw), who published, then the
/// event as delivered.
fn envelope(node: &str, (run, n): (u64, u64), payload: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut v = Vec::with_capacity(node.len() + 44 + payload.len());
    let _ = writeln!(v, "#{run}:{n} {node}");
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

/// A copy as it arrived: (node, (run, number) if numbered, payload).
type Numbered<'a> = (&'a [u8], Option<(u64, u64)>, &'a [u8]);

/// Splits a numbered envelope into (node, (run, number), payload); an envelope of a node
/// that does not number its copies (an older version) has no number.
fn open_numbered(b: &[u8]) -> Option<Numbered<'_>> {
    let (head, payload) = open_envelope(b)?;
    let Some(rest) = head.strip_prefix(b"#") else {
        return Some((head, None, payload));
    };
    let sp = rest.iter().position(|&c| c == b' ')?;
    let number = std::str::from_utf8(&rest[..sp]).ok()?;
    let (run, n) = number.split_once(':')?;
    Some((
        &rest[sp + 1..],
        Some((run.parse().ok()?, n.parse().ok()?)),
        payload,
    ))
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
    seed: Seed,
    /// Its masters at start.
    map: Arc<SlotMap>,
    handle: BrokerHandle,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    /// Counters.
    pub metrics: Arc<BrokerMetrics>,
}

impl Broker {
    /// Connects to Redis (every master must answer, or start-up fails), finds out whether it
    /// is a cluster, and starts the publisher and one subscriber per master.
    pub fn start(
        url: &str,
        password: Option<String>,
        node: Arc<str>,
        shards: usize,
        homes: usize,
        sink: Sink,
    ) -> Result<Broker, BrokerError> {
        let shown = redacted(url);
        let mut seed = Seed::parse(url).map_err(|source| BrokerError::Url {
            url: shown.clone(),
            source,
        })?;
        if let Some(p) = password {
            seed = seed.with_password(p);
        }
        let unreachable = |source| BrokerError::Connect {
            url: shown.clone(),
            source,
        };
        let timeout = Duration::from_secs(2);
        let map = {
            let first = seed.master().map_err(unreachable)?;
            let mut c = cluster::connect(&first, timeout).map_err(unreachable)?;
            cluster::discover(&mut c, &first).map_err(unreachable)?
        };
        let mut sub_cons = Vec::with_capacity(map.masters.len());
        for i in 0..map.masters.len() {
            let info = cluster::master_info(&seed, &map, i).map_err(unreachable)?;
            let c = resp::Resp::connect(&info, timeout).map_err(|e| {
                unreachable(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "subscriber connection",
                    e.to_string(),
                )))
            })?;
            sub_cons.push(c);
        }
        let mut conns = Conns::new(
            seed.clone(),
            map.clone(),
            PUBLISH_TIMEOUT,
            Vec::new(),
            "broker",
        );
        if !conns.connect_all() {
            let e = redis::RedisError::from((redis::ErrorKind::Io, "a master did not answer"));
            return Err(unreachable(e));
        }
        let map = Arc::new(map);
        let stop = Arc::new(AtomicBool::new(false));
        let metrics = Arc::new(BrokerMetrics::default());
        let up = Arc::new(Up::new(map.masters.len()));
        metrics.connected.store(1, Ordering::Relaxed);
        let sink = Arc::new(sink);
        let mut publisher = publisher::Publisher {
            conns,
            node: node.clone(),
            shards: shards as u16,
            sink: sink.clone(),
            metrics: metrics.clone(),
            up: up.clone(),
            was_up: true,
            masters: map.masters.clone(),
            numbering: sequence::Numbering::new(),
        };
        let (ptx, prx) = crossbeam_channel::bounded(BROKER_QUEUE);
        let mut threads = vec![std::thread::Builder::new()
            .name("broker-pub".into())
            .spawn(move || publisher.run(prx))
            .map_err(BrokerError::Spawn)?];
        let mut senders = Vec::with_capacity(sub_cons.len());
        let all_at = map.owner_of(ALL);
        for (index, con) in sub_cons.into_iter().enumerate() {
            let (itx, irx) = crossbeam_channel::unbounded();
            senders.push(itx);
            let mut interest = HashMap::new();
            if index == all_at {
                // Every node takes broadcasts: subscribed from the start, for good.
                interest.insert(ALL.to_owned(), 1);
            }
            let mut subscriber = subscriber::Subscriber {
                seed: seed.clone(),
                map: map.clone(),
                index,
                node: node.clone(),
                shards,
                homes,
                sink: sink.clone(),
                metrics: metrics.clone(),
                up: up.clone(),
                stop: stop.clone(),
                interest,
                late_ready: Vec::new(),
                counted: 0,
                down: false,
                gaps: sequence::Gaps::default(),
            };
            threads.push(
                std::thread::Builder::new()
                    .name(format!("broker-sub-{index}"))
                    .spawn(move || subscriber.run(con, irx))
                    .map_err(BrokerError::Spawn)?,
            );
        }
        if map.cluster {
            info!(broker = %shown, node = %node, masters = map.masters.len(), "joined the cluster on a Redis Cluster (sharded pub/sub)");
        } else {
            info!(broker = %shown, node = %node, "joined the cluster");
        }
        Ok(Broker {
            seed,
            map: map.clone(),
            handle: BrokerHandle {
                publish: ptx,
                interest: senders.into(),
                map,
                node,
                up,
            },
            stop,
            threads,
            metrics,
        })
    }

    /// Connections to the broker's Redis (every master), loading `scripts` on each.
    pub fn conns(&self, scripts: Vec<redis::Script>, role: &'static str) -> Conns {
        Conns::new(
            self.seed.clone(),
            (*self.map).clone(),
            PUBLISH_TIMEOUT,
            scripts,
            role,
        )
    }

    /// What shards hold.
    pub fn handle(&self) -> BrokerHandle {
        self.handle.clone()
    }

    /// Stops every thread.
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_urls_hide_passwords() {
        let e = envelope("n1:8080 x", (u64::MAX, 3), br#"{"op":"msg"}"#);
        assert_eq!(
            open_numbered(&e),
            Some((
                &b"n1:8080 x"[..],
                Some((u64::MAX, 3)),
                &br#"{"op":"msg"}"#[..]
            ))
        );
        assert_eq!(
            open_numbered(b"old-node\n{}"),
            Some((&b"old-node"[..], None, &b"{}"[..])),
            "an older node's envelope"
        );
        assert_eq!(open_numbered(b"#1:x n\n{}"), None);
        assert_eq!(open_numbered(b"no separator"), None);
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
