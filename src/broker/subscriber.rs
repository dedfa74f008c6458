//! The subscriber threads, one per Redis master: each follows the node's interest in the
//! channels whose slot that master holds (`SUBSCRIBE` on one Redis, `SSUBSCRIBE` in a
//! cluster), restores them after a reconnect, and hands what arrives to the shards.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError};
use redis::{ConnectionInfo, Value};
use tracing::{info, warn};

use super::cluster::{connect, discover, master_info, SlotMap};
use super::resp::{Resp, RespError};
use super::sentinel::Seed;
use super::sequence::Gaps;
use super::{
    channel_of, open_disconnect, open_numbered, open_stored, post, user_of, BrokerMetrics,
    BrokerMsg, Change, Sink, Up, ALL,
};
use crate::ids::home_of;

/// How long the subscriber waits for a message before it looks at interest changes.
const POLL: Duration = Duration::from_millis(2);
/// How long a SUBSCRIBE or UNSUBSCRIBE may take before the connection counts as lost.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// Interest changes applied before the subscriber looks at messages again.
const BATCH_CHANGES: usize = 4_096;
/// Longest wait between reconnect attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// What a pub/sub connection delivers.
enum Push {
    /// A message on a channel.
    Message(String, Vec<u8>),
    /// A (un)subscribe confirmation, or Redis dropping a shard channel whose slot moved.
    Confirm(String, String),
}

/// Reads a pub/sub reply (RESP2 arrays, or RESP3 pushes).
fn push_of(v: Value) -> Option<Push> {
    let items = match v {
        Value::Array(items) => items,
        Value::Push { kind, data } => {
            let mut items = vec![Value::BulkString(kind.to_string().into_bytes())];
            items.extend(data);
            items
        }
        _ => return None,
    };
    let mut it = items.into_iter();
    let text = |v: Option<Value>| match v {
        Some(Value::BulkString(b)) => String::from_utf8(b).ok(),
        Some(Value::SimpleString(s)) => Some(s),
        _ => None,
    };
    let kind = text(it.next())?;
    let channel = text(it.next())?;
    match kind.as_str() {
        "message" | "smessage" => match it.next()? {
            Value::BulkString(p) => Some(Push::Message(channel, p)),
            _ => None,
        },
        _ => Some(Push::Confirm(kind, channel)),
    }
}

/// A connection in pub/sub mode: commands wait for their own confirmation, keeping the
/// messages that arrive meanwhile.
struct Feed<'a> {
    con: &'a mut Resp,
    waiting: VecDeque<(String, Vec<u8>)>,
    sharded: bool,
}

impl Feed<'_> {
    /// `SUBSCRIBE`/`UNSUBSCRIBE` (sharded in a cluster) of one channel, returned once Redis
    /// confirmed it (so "returned" means "active").
    fn command(&mut self, on: bool, channel: &str) -> Result<(), RespError> {
        let verb = match (on, self.sharded) {
            (true, false) => "subscribe",
            (false, false) => "unsubscribe",
            (true, true) => "ssubscribe",
            (false, true) => "sunsubscribe",
        };
        self.con.send(&[verb.as_bytes(), channel.as_bytes()])?;
        loop {
            let Some(v) = self.con.read()? else {
                return Err(RespError::Io(std::io::ErrorKind::TimedOut.into()));
            };
            match push_of(v) {
                Some(Push::Message(c, p)) => self.waiting.push_back((c, p)),
                Some(Push::Confirm(k, c)) if k == verb && c == channel => return Ok(()),
                _ => {}
            }
        }
    }

    /// The next message, if one comes within the read timeout (`Ok(None)`); an unasked
    /// `sunsubscribe` (its slot moved) comes as `Err` with the channel.
    fn next(&mut self) -> Result<Option<(String, Vec<u8>)>, Lost> {
        if let Some(m) = self.waiting.pop_front() {
            return Ok(Some(m));
        }
        match self.con.read() {
            Ok(Some(v)) => match push_of(v) {
                Some(Push::Message(c, p)) => Ok(Some((c, p))),
                Some(Push::Confirm(k, c)) if k == "sunsubscribe" => Err(Lost::Moved(c)),
                _ => Ok(None),
            },
            Ok(None) => Ok(None),
            Err(e) => Err(Lost::Error(e)),
        }
    }

    fn set_read_timeout(&self, t: Duration) -> bool {
        self.con.set_read_timeout(t).is_ok()
    }
}

/// Subscribes (`on`) or unsubscribes `channel`; false when the connection failed. A slot that
/// moved to another master (`MOVED`) is logged and skipped: see [`Lost::Moved`].
fn follow(feed: &mut Feed<'_>, on: bool, channel: &str) -> bool {
    match feed.command(on, channel) {
        Ok(()) => true,
        Err(e) if e.is_moved() => {
            warn!(%channel, error = %e, "broker: this shard channel's slot is on another master");
            true
        }
        Err(_) => false,
    }
}

/// Why a feed stopped.
enum Lost {
    Error(RespError),
    /// Redis dropped a shard channel: its slot moved to another master.
    Moved(String),
}

pub(super) struct Subscriber {
    /// How to reach Redis (any master's settings).
    pub(super) seed: Seed,
    /// The slot map at start; this thread serves master `index`'s slots.
    pub(super) map: Arc<SlotMap>,
    pub(super) index: usize,
    pub(super) node: Arc<str>,
    pub(super) shards: usize,
    /// Shards that are users' homes (`home_of`'s modulus).
    pub(super) homes: usize,
    pub(super) sink: Arc<Sink>,
    pub(super) metrics: Arc<BrokerMetrics>,
    pub(super) up: Arc<Up>,
    pub(super) stop: Arc<AtomicBool>,
    /// Redis channel → interested parties (1 per user; shards per channel).
    pub(super) interest: HashMap<String, u32>,
    /// Subscriptions whose waiters are told once the connection is back and restored.
    pub(super) late_ready: Vec<(u16, u64)>,
    /// Subscriptions this thread counts in the metrics.
    pub(super) counted: u64,
    /// Whether this thread's connection is down (counted in `Up`).
    pub(super) down: bool,
    /// The last number seen per followed channel and publishing node.
    pub(super) gaps: Gaps,
}

impl Subscriber {
    /// Where this thread's slots live now: the master of the map at start (one Redis: where
    /// the URL or the sentinels say), or after a failover whichever master a reachable node
    /// says holds them.
    fn locate(&self) -> redis::RedisResult<ConnectionInfo> {
        let at_start = master_info(&self.seed, &self.map, self.index);
        if !self.map.cluster {
            return at_start;
        }
        let Some(mine) =
            (0..super::cluster::SLOTS as u16).find(|&s| self.map.owner(s) == self.index)
        else {
            return at_start;
        };
        for i in 0..self.map.masters.len() {
            let Ok(info) = master_info(&self.seed, &self.map, i) else {
                continue;
            };
            let Ok(mut c) = connect(&info, Duration::from_secs(1)) else {
                continue;
            };
            if let Ok(now) = discover(&mut c, &info) {
                return master_info(&self.seed, &now, now.owner(mine));
            }
        }
        at_start
    }

    fn set_down(&mut self, down: bool) {
        if down != self.down {
            self.down = down;
            self.up.set(false, self.index, !down, &self.metrics);
        }
    }

    fn count_subscriptions(&mut self) {
        let n = self.interest.len() as u64;
        if n >= self.counted {
            self.metrics
                .subscriptions
                .fetch_add(n - self.counted, Ordering::Relaxed);
        } else {
            self.metrics
                .subscriptions
                .fetch_sub(self.counted - n, Ordering::Relaxed);
        }
        self.counted = n;
    }

    pub(super) fn run(&mut self, mut con: Resp, rx: Receiver<Change>) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let lost = self.serve(&mut con, &rx);
            if self.stop.load(Ordering::Relaxed) || !lost {
                return;
            }
            self.set_down(true);
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
                        Ok(c) => {
                            self.note(c.name, c.on);
                            if let Some((shard, token)) = c.ready {
                                post(&self.sink, shard, BrokerMsg::Ready { token });
                            }
                        }
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
                let located = self
                    .locate()
                    .map_err(|e| RespError::Io(std::io::Error::other(e.to_string())));
                match located.and_then(|info| Resp::connect(&info, Duration::from_secs(1))) {
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
    fn serve(&mut self, con: &mut Resp, rx: &Receiver<Change>) -> bool {
        let mut feed = Feed {
            con,
            waiting: VecDeque::new(),
            sharded: self.map.cluster,
        };
        if !feed.set_read_timeout(COMMAND_TIMEOUT) {
            return true;
        }
        let names: Vec<String> = self.interest.keys().cloned().collect();
        for n in &names {
            if !follow(&mut feed, true, n) {
                return true;
            }
        }
        if !feed.set_read_timeout(POLL) {
            return true;
        }
        let was_down = self.down;
        self.set_down(false);
        self.count_subscriptions();
        if was_down {
            // Stored messages published while the subscription was down never came.
            self.to_every_shard(|| BrokerMsg::Resubscribed);
        }
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
            // Every change waiting, then the subscriptions they need, one channel per
            // command, each confirmed before the next.
            loop {
                let c = match rx.try_recv() {
                    Ok(c) => c,
                    Err(crossbeam_channel::TryRecvError::Empty) => break,
                    Err(crossbeam_channel::TryRecvError::Disconnected) => return false,
                };
                if self.note(c.name.clone(), c.on) {
                    changed.push(c.name);
                }
                readies.extend(c.ready);
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
                let mut ok = feed.set_read_timeout(COMMAND_TIMEOUT);
                for n in &subs {
                    ok = ok && follow(&mut feed, true, n);
                }
                for n in &unsubs {
                    ok = ok && follow(&mut feed, false, n);
                }
                ok = ok && feed.set_read_timeout(POLL);
                if !ok {
                    // Restored with the rest once reconnected; then they are told.
                    self.late_ready.append(&mut readies);
                    return true;
                }
                self.count_subscriptions();
            }
            for (shard, token) in readies.drain(..) {
                post(&self.sink, shard, BrokerMsg::Ready { token });
            }
            match feed.next() {
                Ok(Some((channel, payload))) => self.on_message(&channel, &payload),
                Ok(None) => {}
                Err(Lost::Moved(channel)) => {
                    // Subscriptions follow a failover (the same slots on a new master), not
                    // a slot moved between masters while running: restart the nodes after
                    // resharding (docs/cluster.md).
                    self.metrics.disconnects.fetch_add(1, Ordering::Relaxed);
                    warn!(%channel, "broker: Redis moved a shard channel's slot to another master; its messages no longer reach this node until it restarts");
                }
                Err(Lost::Error(e)) => {
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
                    self.gaps.forget(&name);
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

    fn on_message(&mut self, channel: &str, payload: &[u8]) {
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
            if let Some(user) = user_of(channel) {
                let user: Arc<str> = user.into();
                let home = home_of(&user, self.homes);
                let m = BrokerMsg::Stored {
                    user,
                    payload,
                    offset,
                    exclude,
                };
                post(&self.sink, home, m);
            } else if let Some(ch) = channel_of(channel) {
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
                if let Some(user) = user_of(channel) {
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
        let Some((node, number, event)) = open_numbered(payload) else {
            return;
        };
        if node == self.node.as_bytes() {
            self.metrics.own_dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.metrics.received.fetch_add(1, Ordering::Relaxed);
        if let Some((run, n)) = number {
            let missed = self.gaps.arrived(channel, node, run, n);
            if missed > 0 {
                self.metrics.missed.fetch_add(missed, Ordering::Relaxed);
            }
        }
        let event = Bytes::copy_from_slice(event);
        if let Some(user) = user_of(channel) {
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
        } else if let Some(ch) = channel_of(channel) {
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

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    #[test]
    fn pubsub_replies_read_as_messages_and_confirmations() {
        let m = push_of(Value::Array(vec![
            bulk("smessage"),
            bulk("sb:u:{bob}"),
            bulk("x"),
        ]));
        assert!(matches!(m, Some(Push::Message(c, p)) if c == "sb:u:{bob}" && p == b"x"));
        let m = push_of(Value::Array(vec![
            bulk("message"),
            bulk("sb:all"),
            bulk("y"),
        ]));
        assert!(matches!(m, Some(Push::Message(c, _)) if c == "sb:all"));
        let c = push_of(Value::Array(vec![
            bulk("ssubscribe"),
            bulk("sb:c:{room}"),
            Value::Int(1),
        ]));
        assert!(matches!(c, Some(Push::Confirm(k, c)) if k == "ssubscribe" && c == "sb:c:{room}"));
        assert!(push_of(Value::Int(3)).is_none());
    }
}
