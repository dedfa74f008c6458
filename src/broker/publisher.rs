//! The publisher thread: every request waiting goes out as one pipeline per Redis master
//! (one publish per message, never one per recipient); senders that asked are answered from
//! the number of nodes that received it. It also keeps this node's liveness and presence
//! counts in Redis and answers cluster-wide counts.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::{Cmd, Value};
use tracing::{info, warn};

use super::cluster::{slot, Conns};
use super::sequence::Numbering;
use super::{
    channel_channel, disconnect_envelope, envelope, members_key, node_key, post, user_channel,
    BrokerMetrics, BrokerMsg, BrokerReq, Counted, Members, Sink, Up, ALL, HEARTBEAT, MAX_SHARDS,
    NODES, NODE_TTL_MS,
};

/// Requests sent in one round, at most.
const PIPELINE_MAX: usize = 1_024;

/// Drops a user's count on a node when it reaches 0.
const PRESENCE_SCRIPT: &str = "local v = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2]) \
if v <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end return v";
/// A channel's subscriber count (KEYS[1], field ARGV[1]) and its members (KEYS[2], field
/// ARGV[2], the user) move by ARGV[3] together: a member hash exists while its channel counts.
const MEMBER_SCRIPT: &str = "local v = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[3]) \
if v <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end \
local m = redis.call('HINCRBY', KEYS[2], ARGV[2], ARGV[3]) \
if m <= 0 then redis.call('HDEL', KEYS[2], ARGV[2]) end return v";
/// Deletes the channel counts of a node's shards ARGV[2]..ARGV[3] (ARGV[1]: `sb:n:{<node>}:`)
/// and the member hash of every channel they count. KEYS[1] is only there to route the
/// script to the node's slot: every key it touches carries the node's hash tag.
const CLEAR_CHANNELS_SCRIPT: &str = "for s = tonumber(ARGV[2]), tonumber(ARGV[3]) - 1 do \
local p = ARGV[1] .. s .. ':' local h = p .. 'channels' \
for _, c in ipairs(redis.call('HKEYS', h)) do redis.call('DEL', p .. 'm:' .. c) end \
redis.call('DEL', h) end return 0";

/// Commands, each with the slot that routes it.
type Batch = Vec<(u16, Cmd)>;

fn add(b: &mut Batch, key: &str, cmd: Cmd) -> usize {
    b.push((slot(key.as_bytes()), cmd));
    b.len() - 1
}

/// The key that routes everything about `node` (its hash tag).
fn node_tag(node: &str) -> String {
    format!("sb:n:{{{node}}}")
}

/// Adds the deletion of the channel counts of a node's shards `from..to` and of every
/// member hash they list.
fn clear_channel_counts(b: &mut Batch, node: &str, from: u16, to: u16) {
    let tag = node_tag(node);
    let mut c = redis::cmd("EVAL");
    c.arg(CLEAR_CHANNELS_SCRIPT)
        .arg(1)
        .arg(&tag)
        .arg(format!("{tag}:"))
        .arg(from)
        .arg(to);
    add(b, &tag, c);
}

/// Adds HSETs of `key` to every (field, value), 1000 per command.
fn hset_all(b: &mut Batch, key: &str, fields: &[(Arc<str>, u64)]) {
    for part in fields.chunks(1000) {
        let mut c = redis::cmd("HSET");
        c.arg(key);
        for (name, n) in part {
            c.arg(&**name).arg(*n);
        }
        add(b, key, c);
    }
}

/// Adds the deletion of a node's counts and members for shards `from..to`.
fn clear_counts(b: &mut Batch, node: &str, from: u16, to: u16) {
    clear_channel_counts(b, node, from, to);
    let mut users = redis::cmd("DEL");
    for shard in from..to {
        users.arg(Counted::Users.key(node, shard));
    }
    add(b, &node_tag(node), users);
}

pub(super) struct Publisher {
    pub(super) conns: Conns,
    pub(super) node: Arc<str>,
    pub(super) shards: u16,
    pub(super) sink: Arc<Sink>,
    pub(super) metrics: Arc<BrokerMetrics>,
    pub(super) up: Arc<Up>,
    /// Whether every master was reachable after the last round.
    pub(super) was_up: bool,
    /// The masters of the slot map at start (the indexes of [`Up`]).
    pub(super) masters: Vec<(String, u16)>,
    /// The numbers of this node's qos-0 copies per Redis channel.
    pub(super) numbering: Numbering,
}

impl Publisher {
    /// Notes whether every master is reachable now: a reconnect bumps the generation (shards
    /// rewrite their counts), a loss counts.
    fn settle(&mut self) {
        let now = self.conns.all_up();
        if now && !self.was_up {
            info!("broker: publisher reconnected");
            // Changes while Redis was away were not counted: shards rewrite theirs.
            self.up.generation.fetch_add(1, Ordering::Relaxed);
        }
        if !now && self.was_up {
            warn!("broker: publishing failed; reconnecting");
            self.metrics.disconnects.fetch_add(1, Ordering::Relaxed);
        }
        self.was_up = now;
        for (i, addr) in self.masters.iter().enumerate() {
            let v = self.conns.up_at(addr).unwrap_or(now);
            self.up.set(true, i, v, &self.metrics);
        }
    }

    /// Announces this node alive (and, at start, forgets its old presence counts).
    fn heartbeat(&mut self, fresh: bool) {
        let mut b = Batch::new();
        if fresh {
            clear_counts(&mut b, &self.node, 0, self.shards);
        }
        // The value is the node's shard count: readers sum its shards' hashes.
        let mut set = redis::cmd("SET");
        set.arg(node_key(&self.node))
            .arg(self.shards)
            .arg("PX")
            .arg(NODE_TTL_MS);
        add(&mut b, NODES, set);
        let mut sadd = redis::cmd("SADD");
        sadd.arg(NODES).arg(&*self.node);
        add(&mut b, NODES, sadd);
        if let Some(Err(e)) = self.conns.run(&b).into_iter().find(|a| a.is_err()) {
            warn!(error = %e, "broker: heartbeat failed");
        }
    }

    /// Every other live node with its shard count (dead nodes are forgotten on the way).
    fn live_others(&mut self) -> redis::RedisResult<Vec<(String, u16)>> {
        let mut members = redis::cmd("SMEMBERS");
        members.arg(NODES);
        let v = self.conns.run_one(slot(NODES.as_bytes()), members)?;
        let nodes: Vec<String> = redis::from_redis_value(v)?;
        let others: Vec<String> = nodes.into_iter().filter(|n| **n != *self.node).collect();
        if others.is_empty() {
            return Ok(Vec::new());
        }
        let mut b = Batch::new();
        for n in &others {
            let mut get = redis::cmd("GET");
            get.arg(node_key(n));
            add(&mut b, NODES, get);
        }
        let mut dead = Batch::new();
        let mut live = Vec::with_capacity(others.len());
        for (n, s) in others.into_iter().zip(self.conns.run(&b)) {
            match redis::from_redis_value::<Option<u16>>(s?)? {
                Some(s) => live.push((n, s)),
                None => {
                    // Its liveness key expired: forget it (every shard a node may have).
                    let mut srem = redis::cmd("SREM");
                    srem.arg(NODES).arg(n.as_str());
                    add(&mut dead, NODES, srem);
                    clear_counts(&mut dead, &n, 0, MAX_SHARDS);
                }
            }
        }
        for a in self.conns.run(&dead) {
            a?;
        }
        Ok(live)
    }

    /// The count of `name` on every other live node.
    fn count_elsewhere(&mut self, kind: Counted, name: &str) -> redis::RedisResult<u64> {
        let others = self.live_others()?;
        let mut b = Batch::new();
        for (n, s) in &others {
            for shard in 0..*s {
                let key = kind.key(n, shard);
                let mut c = redis::cmd("HGET");
                c.arg(&key).arg(name);
                add(&mut b, &key, c);
            }
        }
        let mut sum = 0;
        for a in self.conns.run(&b) {
            sum += redis::from_redis_value::<Option<u64>>(a?)?.unwrap_or(0);
        }
        Ok(sum)
    }

    /// The members of `channel` on every other live node (user → subscriptions).
    fn members_elsewhere(&mut self, channel: &str) -> redis::RedisResult<Members> {
        let others = self.live_others()?;
        let mut b = Batch::new();
        for (n, s) in &others {
            for shard in 0..*s {
                let key = members_key(n, shard, channel);
                let mut c = redis::cmd("HGETALL");
                c.arg(&key);
                add(&mut b, &key, c);
            }
        }
        let mut out = Vec::new();
        for a in self.conns.run(&b) {
            let h: HashMap<String, u64> = redis::from_redis_value(a?)?;
            out.extend(h.into_iter().map(|(u, n)| (Arc::from(u), n)));
        }
        Ok(out)
    }

    /// The commands of one request; the index of the one whose answer the sender waits for.
    fn commands(&mut self, r: &BrokerReq, b: &mut Batch) -> Option<usize> {
        let publish = self.conns.publish_cmd();
        let (channel, payload) = match r {
            BrokerReq::User { user, payload, .. } => (user_channel(user), payload),
            BrokerReq::Channel { channel, payload } => (channel_channel(channel), payload),
            BrokerReq::Broadcast { payload } => (ALL.to_owned(), payload),
            BrokerReq::Disconnect { user, code, reason } => {
                let ch = user_channel(user);
                let mut c = redis::cmd(publish);
                c.arg(&ch)
                    .arg(disconnect_envelope(&self.node, *code, reason));
                add(b, &ch, c);
                return None;
            }
            BrokerReq::Resync {
                kind,
                shard,
                counts,
                members,
            } => {
                let key = kind.key(&self.node, *shard);
                match kind {
                    Counted::Users => {
                        let mut del = redis::cmd("DEL");
                        del.arg(&key);
                        add(b, &key, del);
                    }
                    Counted::Channels => {
                        clear_channel_counts(b, &self.node, *shard, *shard + 1);
                    }
                }
                hset_all(b, &key, counts);
                for (channel, users) in members {
                    hset_all(b, &members_key(&self.node, *shard, channel), users);
                }
                return None;
            }
            BrokerReq::Presence {
                shard,
                kind,
                name,
                member,
                delta,
            } => {
                let key = kind.key(&self.node, *shard);
                let mut c = redis::cmd("EVAL");
                match member {
                    None => {
                        c.arg(PRESENCE_SCRIPT).arg(1).arg(&key).arg(&**name);
                    }
                    Some(user) => {
                        c.arg(MEMBER_SCRIPT)
                            .arg(2)
                            .arg(&key)
                            .arg(members_key(&self.node, *shard, name))
                            .arg(&**name)
                            .arg(&**user);
                    }
                }
                c.arg(*delta);
                add(b, &key, c);
                return None;
            }
            // Answered after the round, with queries of their own.
            BrokerReq::Count { .. } | BrokerReq::Members { .. } => return None,
        };
        let mut c = redis::cmd(publish);
        let number = self.numbering.next(&channel);
        c.arg(&channel).arg(envelope(&self.node, number, payload));
        Some(add(b, &channel, c))
    }

    pub(super) fn run(&mut self, rx: Receiver<BrokerReq>) {
        let mut batch = Vec::with_capacity(PIPELINE_MAX);
        self.heartbeat(true);
        self.settle();
        let mut beat = Instant::now();
        loop {
            if beat.elapsed() >= HEARTBEAT {
                self.heartbeat(false);
                self.settle();
                beat = Instant::now();
            }
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(r) => batch.push(r),
                Err(RecvTimeoutError::Timeout) => {
                    // Idle: find out now whether the connections still work (or work again).
                    if self.conns.all_up() {
                        self.conns.ping_all();
                    } else {
                        self.conns.connect_all();
                    }
                    self.settle();
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
            let mut b = Batch::new();
            let at: Vec<Option<usize>> = batch.iter().map(|r| self.commands(r, &mut b)).collect();
            let answers = self.conns.run(&b);
            self.settle();
            let published = at
                .iter()
                .filter_map(|i| i.map(|i| &answers[i]))
                .filter(|a| a.is_ok())
                .count();
            self.metrics
                .published
                .fetch_add(published as u64, Ordering::Relaxed);
            for (r, i) in std::mem::take(&mut batch).into_iter().zip(at) {
                self.answer(r, i.map(|i| &answers[i]));
            }
        }
    }

    /// Answers whoever waits for `r` (`answer`: its publish's).
    fn answer(&mut self, r: BrokerReq, answer: Option<&redis::RedisResult<Value>>) {
        match r {
            BrokerReq::Members { channel, ticket } => {
                let members = self.members_elsewhere(&channel).map_or_else(
                    |e| {
                        warn!(error = %e, "broker: listing a channel's members failed");
                        None
                    },
                    Some,
                );
                post(
                    &self.sink,
                    ticket.shard,
                    BrokerMsg::Members { ticket, members },
                );
            }
            BrokerReq::Count {
                kind,
                name,
                conn,
                local,
            } => {
                let elsewhere = self.count_elsewhere(kind, &name).unwrap_or_else(|e| {
                    warn!(error = %e, "broker: counting on other nodes failed");
                    0
                });
                let msg = BrokerMsg::Counted {
                    kind,
                    conn,
                    name,
                    total: local + elsewhere,
                };
                post(&self.sink, conn.shard, msg);
            }
            BrokerReq::User {
                reply: Some(reply), ..
            } => {
                let shard = reply.conn.shard;
                let msg = match answer {
                    Some(Ok(v)) => BrokerMsg::Routed {
                        reply,
                        online: matches!(v, Value::Int(n) if *n > 0),
                    },
                    // Never retried: a message may have gone out before the failure.
                    _ => BrokerMsg::Unavailable { reply },
                };
                post(&self.sink, shard, msg);
            }
            _ => {}
        }
    }
}
