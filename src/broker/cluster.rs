//! One Redis or a Redis Cluster behind the same calls.
//!
//! A Redis Cluster spreads keys (and shard channels: `SPUBLISH`/`SSUBSCRIBE`) over its
//! masters by hash slot. [`Conns`] holds one connection per master and runs a batch of
//! commands as one pipeline per master, answers back in the caller's order; a `MOVED`
//! answer (the slot lives elsewhere now: nothing ran) refreshes the slot map and runs that
//! command again where it belongs. With one plain Redis everything goes to its one
//! connection. Every key switchboard writes carries a hash tag (`{user}`, `{channel}`,
//! `{node}`) so that what one script touches lives in one slot.

use std::time::{Duration, Instant};

use redis::{Cmd, Connection, ConnectionAddr, ConnectionInfo, RedisResult, Value};
use tracing::{info, warn};

use super::sentinel::{is_master, Seed};

/// Hash slots of a Redis Cluster.
pub const SLOTS: usize = 16_384;
/// First wait before a master is tried again, doubled up to [`BACKOFF_MAX`].
const BACKOFF_MIN: Duration = Duration::from_millis(50);
/// How long opening a connection to a master may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Longest wait between attempts to reach a master.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often a cluster's slot map is asked for again while a master is unreachable (its
/// replica may have taken its slots over).
const REFRESH_EVERY: Duration = Duration::from_millis(250);

/// CRC16/XMODEM, the cluster's key hash.
fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key or shard channel: of its hash tag (the text between the first `{` and
/// the next `}`) when that is not empty, else of the whole name.
pub fn slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&c| c == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&c| c == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS as u16
}

/// The slot of `prefix{name}` (a key or channel tagged with a name) without building it.
pub fn tagged_slot(prefix: &str, name: &str) -> u16 {
    match name.find('}') {
        // `{}…`: an empty tag, the whole key counts.
        Some(0) => slot(format!("{prefix}{{{name}}}").as_bytes()),
        None if name.is_empty() => slot(format!("{prefix}{{}}").as_bytes()),
        Some(end) => crc16(&name.as_bytes()[..end]) % SLOTS as u16,
        None => crc16(name.as_bytes()) % SLOTS as u16,
    }
}

/// Which master holds each slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotMap {
    /// Masters as (host, port).
    pub masters: Vec<(String, u16)>,
    /// Slot → index in `masters`.
    owner: Vec<u16>,
    /// Whether this is a Redis Cluster (sharded commands) or one Redis.
    pub cluster: bool,
}

impl SlotMap {
    /// One plain Redis: every slot is its.
    pub fn single(host: String, port: u16) -> SlotMap {
        SlotMap {
            masters: vec![(host, port)],
            owner: vec![0; SLOTS],
            cluster: false,
        }
    }

    /// A Redis Cluster map that puts every slot on one master: wrong until the first `MOVED`
    /// refreshes it (how a map goes stale when slots move; tests start from it).
    pub fn stale(host: String, port: u16) -> SlotMap {
        SlotMap {
            cluster: true,
            ..SlotMap::single(host, port)
        }
    }

    /// The master that holds `slot`.
    pub fn owner(&self, slot: u16) -> usize {
        usize::from(self.owner[usize::from(slot) % SLOTS])
    }

    /// The master that holds `name`'s slot.
    pub fn owner_of(&self, name: &str) -> usize {
        self.owner(slot(name.as_bytes()))
    }

    /// Parses a `CLUSTER SLOTS` answer (an empty host means the host asked: `seed`).
    fn from_slots(v: Value, seed: &str) -> RedisResult<SlotMap> {
        let bad = || redis::RedisError::from((redis::ErrorKind::Parse, "bad CLUSTER SLOTS"));
        let Value::Array(ranges) = v else {
            return Err(bad());
        };
        let mut map = SlotMap {
            masters: Vec::new(),
            owner: vec![0; SLOTS],
            cluster: true,
        };
        let mut covered = 0usize;
        for r in ranges {
            let Value::Array(r) = r else {
                return Err(bad());
            };
            let (Some(Value::Int(from)), Some(Value::Int(to)), Some(Value::Array(m))) =
                (r.first(), r.get(1), r.get(2))
            else {
                return Err(bad());
            };
            let host = match m.first() {
                Some(Value::BulkString(h)) => String::from_utf8_lossy(h).into_owned(),
                Some(Value::SimpleString(h)) => h.clone(),
                _ => return Err(bad()),
            };
            let host = if host.is_empty() || host == "?" {
                seed.to_owned()
            } else {
                host
            };
            let Some(Value::Int(port)) = m.get(1) else {
                return Err(bad());
            };
            let addr = (host, *port as u16);
            let i = match map.masters.iter().position(|a| *a == addr) {
                Some(i) => i,
                None => {
                    map.masters.push(addr);
                    map.masters.len() - 1
                }
            };
            let (from, to) = (*from as usize, (*to as usize).min(SLOTS - 1));
            for s in from..=to {
                map.owner[s] = i as u16;
            }
            covered += to + 1 - from.min(to + 1);
        }
        if map.masters.is_empty() || covered < SLOTS {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Client,
                "the Redis Cluster does not cover every slot",
            )));
        }
        Ok(map)
    }
}

/// Whether the Redis behind `con` is a cluster member; if so, its slot map.
pub fn discover(con: &mut Connection, seed: &ConnectionInfo) -> RedisResult<SlotMap> {
    let (host, port) = tcp_addr(seed);
    let info: String = redis::cmd("INFO").arg("cluster").query(con)?;
    if !info.contains("cluster_enabled:1") {
        return Ok(SlotMap::single(host, port));
    }
    let v: Value = redis::cmd("CLUSTER").arg("SLOTS").query(con)?;
    SlotMap::from_slots(v, &host)
}

/// The (host, port) of a TCP address (others: as given, port 0).
fn tcp_addr(info: &ConnectionInfo) -> (String, u16) {
    match info.addr() {
        ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
        ConnectionAddr::TcpTls { host, port, .. } => (host.clone(), *port),
        other => (other.to_string(), 0),
    }
}

/// How to reach master `i` of `map`: the seed's settings (password…) at its address (a
/// cluster has only database 0); one Redis where the URL or the sentinels say.
pub fn master_info(seed: &Seed, map: &SlotMap, i: usize) -> RedisResult<ConnectionInfo> {
    if !map.cluster {
        return seed.master();
    }
    let (host, port) = map.masters[i].clone();
    let info = seed.settings();
    let settings = info.redis_settings().clone().set_db(0);
    Ok(info
        .clone()
        .set_addr(ConnectionAddr::Tcp(host, port))
        .set_redis_settings(settings))
}

/// Connects to `info` within `timeout`, with read and write timeouts set.
pub fn connect(info: &ConnectionInfo, timeout: Duration) -> RedisResult<Connection> {
    connect_with(info, timeout, timeout)
}

/// Connects within `open`; reads and writes then time out after `io`.
fn connect_with(info: &ConnectionInfo, open: Duration, io: Duration) -> RedisResult<Connection> {
    let c = redis::Client::open(info.clone())?.get_connection_with_timeout(open)?;
    c.set_read_timeout(Some(io))?;
    c.set_write_timeout(Some(io))?;
    Ok(c)
}

/// A master's connection, or when to try again.
struct Link {
    con: Option<Connection>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

/// One connection per master, opened on demand, each with its own backoff.
pub struct Conns {
    seed: Seed,
    map: SlotMap,
    links: Vec<Link>,
    timeout: Duration,
    /// Loaded on every connection as it opens (`EVALSHA` needs them there).
    scripts: Vec<redis::Script>,
    /// Who logs (the thread's role).
    role: &'static str,
    /// In a cluster, since a master's connection failed: when the slot map is to be asked
    /// for next (every [`REFRESH_EVERY`] until the map changes or every master answers).
    refresh_due: Option<Instant>,
    /// `WAIT` after the writes of [`run_durable`](Self::run_durable): replicas, timeout.
    wait: Option<(u32, Duration)>,
}

/// The answer of a write that too few replicas acknowledged in time.
pub fn too_few_replicas() -> redis::RedisError {
    redis::RedisError::from((
        redis::ErrorKind::Io,
        "fewer replicas than --broker-min-replicas acknowledged the write in time",
    ))
}

/// An error without a server answer.
fn io_error(what: &'static str) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, what))
}

impl Conns {
    /// For `map`'s masters, reached with `seed`'s settings. Nothing connects yet.
    pub fn new(
        seed: Seed,
        map: SlotMap,
        timeout: Duration,
        scripts: Vec<redis::Script>,
        role: &'static str,
    ) -> Conns {
        let links = map.masters.iter().map(|_| Link::new()).collect();
        Conns {
            seed,
            map,
            links,
            timeout,
            scripts,
            role,
            refresh_due: None,
            wait: None,
        }
    }

    /// Makes [`run_durable`](Self::run_durable) wait until `replicas` replicas have the
    /// writes (at most `timeout`); 0: no wait.
    pub fn set_min_replicas(&mut self, replicas: u32, timeout: Duration) {
        self.wait = (replicas > 0).then_some((replicas, timeout));
    }

    /// Whether this is a Redis Cluster (sharded pub/sub).
    pub fn cluster(&self) -> bool {
        self.map.cluster
    }

    /// `PUBLISH`, or `SPUBLISH` in a cluster.
    pub fn publish_cmd(&self) -> &'static str {
        if self.map.cluster {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }

    /// Whether the connection to the master at `addr` is open (`None`: not a master now).
    pub fn up_at(&self, addr: &(String, u16)) -> Option<bool> {
        let i = self.map.masters.iter().position(|a| a == addr)?;
        Some(self.links[i].con.is_some())
    }

    /// Whether every master's connection is open.
    pub fn all_up(&self) -> bool {
        self.links.iter().all(|l| l.con.is_some())
    }

    /// Master `i`'s connection (opened now unless it is backing off).
    fn con(&mut self, i: usize) -> RedisResult<&mut Connection> {
        let link = &mut self.links[i];
        if link.con.is_none() {
            if link.retry_at.is_some_and(|t| Instant::now() < t) {
                return Err(io_error("Redis unreachable; retrying"));
            }
            let sentinel = self.seed.is_sentinel();
            // Connecting fails fast (a dead host must not hold the thread for the I/O timeout).
            let attempt = master_info(&self.seed, &self.map, i).and_then(|info| {
                let mut c = connect_with(&info, CONNECT_TIMEOUT, self.timeout)?;
                if sentinel && !is_master(&mut c)? {
                    let e = (
                        redis::ErrorKind::Io,
                        "not a master (yet)",
                        info.addr().to_string(),
                    );
                    return Err(redis::RedisError::from(e));
                }
                for s in &self.scripts {
                    s.load(&mut c)?;
                }
                Ok((c, info))
            });
            match attempt {
                Ok((c, info)) => {
                    if link.retry_at.take().is_some() {
                        info!(role = self.role, master = %info.addr(), "Redis reachable again");
                    }
                    link.backoff = BACKOFF_MIN;
                    link.con = Some(c);
                }
                Err(e) => {
                    if link.retry_at.is_none() {
                        let master = format!("{:?}", self.map.masters.get(i));
                        warn!(role = self.role, %master, error = %e, "Redis unreachable");
                    }
                    link.retry_at = Some(Instant::now() + link.backoff);
                    link.backoff = (link.backoff * 2).min(BACKOFF_MAX);
                    self.mark_stale();
                    return Err(e);
                }
            }
        }
        Ok(self.links[i].con.as_mut().expect("connected"))
    }

    /// Opens every master's connection that is closed (respecting backoff); true when all are
    /// open.
    pub fn connect_all(&mut self) -> bool {
        let mut all = true;
        for i in 0..self.links.len() {
            all &= self.con(i).is_ok();
        }
        all
    }

    /// Closes master `i`'s connection after a failure (the next use reconnects, after backoff).
    fn drop_link(&mut self, i: usize, e: &redis::RedisError) {
        let link = &mut self.links[i];
        if link.con.take().is_some() {
            warn!(role = self.role, error = %e, "Redis connection lost");
            link.retry_at = Some(Instant::now() + link.backoff);
        }
        self.mark_stale();
    }

    /// A master is unreachable: in a cluster its replica may take its slots over, so the
    /// slot map is asked for again (now, unless a refresh is already due).
    fn mark_stale(&mut self) {
        if self.map.cluster && self.refresh_due.is_none() {
            self.refresh_due = Some(Instant::now());
        }
    }

    /// Asks for the slot map again when a refresh is due, then every [`REFRESH_EVERY`]
    /// until the map changed or every master answers.
    fn refresh_if_stale(&mut self) {
        let Some(due) = self.refresh_due else { return };
        if Instant::now() < due {
            return;
        }
        self.refresh_due = Some(Instant::now() + REFRESH_EVERY);
        if self.refresh() || self.all_up() {
            self.refresh_due = None;
        }
    }

    /// Pings every open connection; a failed one is closed. True when all answered.
    pub fn ping_all(&mut self) -> bool {
        let mut ok = true;
        for i in 0..self.links.len() {
            let Some(c) = self.links[i].con.as_mut() else {
                ok = false;
                continue;
            };
            if let Err(e) = redis::cmd("PING").query::<String>(c) {
                self.drop_link(i, &e);
                ok = false;
            }
        }
        ok
    }

    /// Runs `cmds` (each with the slot of the key or channel that routes it) as one pipeline
    /// per master; the answers in the same order. A connection that fails answers all its
    /// commands with the error and is closed; a `MOVED` command runs again once where the
    /// refreshed slot map puts it.
    pub fn run(&mut self, cmds: &[(u16, Cmd)]) -> Vec<RedisResult<Value>> {
        self.run_with(cmds, None).0
    }

    /// [`run`](Self::run) for writes that must reach `--broker-min-replicas` replicas: each
    /// master's pipeline ends with `WAIT`; the second vector says which commands fewer
    /// replicas than asked acknowledged in time (they ran on the master, and their answers
    /// are kept: a retry must be idempotent, as the store's deduplicated scripts are).
    pub fn run_durable(&mut self, cmds: &[(u16, Cmd)]) -> (Vec<RedisResult<Value>>, Vec<bool>) {
        self.run_with(cmds, self.wait)
    }

    fn run_with(
        &mut self,
        cmds: &[(u16, Cmd)],
        wait: Option<(u32, Duration)>,
    ) -> (Vec<RedisResult<Value>>, Vec<bool>) {
        let mut short = vec![false; cmds.len()];
        self.refresh_if_stale();
        let wait_cmd = wait.map(|(n, t)| {
            let mut w = redis::cmd("WAIT");
            w.arg(n).arg(t.as_millis() as u64);
            w.get_packed_command()
        });
        let mut out: Vec<Option<RedisResult<Value>>> = vec![None; cmds.len()];
        let mut todo: Vec<usize> = (0..cmds.len()).collect();
        for attempt in 0..2 {
            let mut by_master: Vec<Vec<usize>> = vec![Vec::new(); self.links.len()];
            for &i in &todo {
                by_master[self.map.owner(cmds[i].0)].push(i);
            }
            // Every master's pipeline goes out first, then the answers are read: the round
            // trips overlap.
            let mut sent: Vec<(usize, Vec<usize>)> = Vec::with_capacity(by_master.len());
            for (m, idx) in by_master.into_iter().enumerate() {
                if idx.is_empty() {
                    continue;
                }
                let mut packed = Vec::new();
                for &i in &idx {
                    packed.extend_from_slice(&cmds[i].1.get_packed_command());
                }
                if let Some(w) = &wait_cmd {
                    packed.extend_from_slice(w);
                }
                let written = self.con(m).and_then(|c| c.send_packed_command(&packed));
                match written {
                    Ok(()) => sent.push((m, idx)),
                    Err(e) => self.fail(m, &idx, e, &mut out),
                }
            }
            let mut moved = Vec::new();
            for (m, idx) in sent {
                let mut read_all = true;
                for (k, &i) in idx.iter().enumerate() {
                    let Some(c) = self.links[m].con.as_mut() else {
                        read_all = false;
                        break;
                    };
                    let a: RedisResult<Value> = match c.recv_response() {
                        Ok(Value::ServerError(e)) => Err(e.into()),
                        Ok(v) => Ok(v),
                        Err(e) => {
                            self.fail(m, &idx[k..], e, &mut out);
                            read_all = false;
                            break;
                        }
                    };
                    let is_moved = matches!(&a, Err(e) if e.redirect_node().is_some());
                    if is_moved && attempt == 0 && self.map.cluster {
                        moved.push(i);
                    } else {
                        out[i] = Some(a);
                    }
                }
                if let (Some((n, _)), true) = (wait, read_all) {
                    self.check_wait(m, n, &idx, &mut short);
                }
            }
            if moved.is_empty() {
                break;
            }
            self.refresh();
            todo = moved;
        }
        let out = out
            .into_iter()
            .map(|a| a.unwrap_or_else(|| Err(io_error("not sent"))))
            .collect();
        (out, short)
    }

    /// Reads master `m`'s `WAIT` answer: fewer than `n` replicas (or no answer) marks its
    /// commands in `idx` short.
    fn check_wait(&mut self, m: usize, n: u32, idx: &[usize], short: &mut [bool]) {
        let Some(c) = self.links[m].con.as_mut() else {
            return;
        };
        let acked = match c.recv_response() {
            Ok(Value::Int(k)) => k,
            Ok(_) => 0,
            Err(e) => {
                self.drop_link(m, &e);
                0
            }
        };
        if acked >= i64::from(n) {
            return;
        }
        for &i in idx {
            short[i] = true;
        }
    }

    /// Answers `idx` with `e` and closes master `m`'s link: the replies on it are out of step
    /// now (what it had been sent may or may not have run: never sent again).
    fn fail(
        &mut self,
        m: usize,
        idx: &[usize],
        e: redis::RedisError,
        out: &mut [Option<RedisResult<Value>>],
    ) {
        self.drop_link(m, &e);
        for &i in idx {
            out[i] = Some(Err(e.clone()));
        }
    }

    /// Runs one command where `slot` lives.
    pub fn run_one(&mut self, slot: u16, cmd: Cmd) -> RedisResult<Value> {
        self.run(&[(slot, cmd)]).pop().expect("one answer")
    }

    /// Asks any reachable master for the slot map (those connected first); keeps the
    /// connections whose address stays. True when the map changed.
    pub fn refresh(&mut self) -> bool {
        let mut fresh = None;
        let mut order: Vec<usize> = (0..self.links.len()).collect();
        order.sort_by_key(|&i| self.links[i].con.is_none());
        for i in order {
            let Ok(c) = self.con(i) else { continue };
            match redis::cmd("CLUSTER").arg("SLOTS").query::<Value>(c) {
                Ok(v) => {
                    let host = self.map.masters[i].0.clone();
                    match SlotMap::from_slots(v, &host) {
                        Ok(m) => {
                            fresh = Some(m);
                            break;
                        }
                        Err(e) => warn!(error = %e, "Redis Cluster: bad slot map"),
                    }
                }
                Err(e) => warn!(error = %e, "Redis Cluster: CLUSTER SLOTS failed"),
            }
        }
        let Some(map) = fresh else { return false };
        if map == self.map {
            return false;
        }
        info!(
            role = self.role,
            masters = map.masters.len(),
            "Redis Cluster: slot map changed"
        );
        let mut old: Vec<((String, u16), Link)> = self
            .map
            .masters
            .drain(..)
            .zip(self.links.drain(..))
            .collect();
        self.links = map
            .masters
            .iter()
            .map(|a| match old.iter().position(|(o, _)| o == a) {
                Some(p) => old.swap_remove(p).1,
                None => Link::new(),
            })
            .collect();
        self.map = map;
        true
    }
}

impl Link {
    fn new() -> Link {
        Link {
            con: None,
            retry_at: None,
            backoff: BACKOFF_MIN,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_match_redis_cluster_keyslot() {
        // Values from `CLUSTER KEYSLOT` on redis-server 7.0.15.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"{user1000}.following"), 3443);
        assert_eq!(slot(b"bob"), 8955);
        assert_eq!(slot(b"sb:u:{bob}"), 8955, "the hash tag decides");
        assert_eq!(slot(b"sb:{}x"), 15106, "an empty tag does not count");
        assert_eq!(slot(b"sb:x:inbox:{bob}"), slot(b"sb:u:{bob}"));
        for name in ["bob", "a}b", "}x", "", "{y}"] {
            assert_eq!(
                tagged_slot("sb:u:", name),
                slot(format!("sb:u:{{{name}}}").as_bytes()),
                "{name}"
            );
        }
    }

    #[test]
    fn a_slot_map_parses_and_must_cover_every_slot() {
        let int = Value::Int;
        let master = |p: i64| {
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                int(p),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |a: i64, b: i64, p: i64| Value::Array(vec![int(a), int(b), master(p)]);
        let v = Value::Array(vec![range(0, 8000, 7001), range(8001, 16383, 7002)]);
        let map = SlotMap::from_slots(v, "seed").unwrap();
        assert_eq!(map.masters.len(), 2);
        assert_eq!(map.owner(0), 0);
        assert_eq!(map.owner(8001), 1);
        assert_eq!(map.masters[map.owner_of("sb:u:{bob}")].1, 7002);
        let partial = Value::Array(vec![range(0, 8000, 7001)]);
        assert!(SlotMap::from_slots(partial, "seed").is_err());
    }
}
