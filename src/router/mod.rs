//! The sans-I/O session layer: every connection of one shard as plain data, driven by events.
//!
//! [`Router`] owns a shard's connections (a slab of [`Conn`]), its timer wheel, its part of
//! the hub, its buffer pool and the API requests in flight. The driver (`shard/` in the
//! server, `sim/` in the simulation, the fuzz targets) feeds it events and carries out what it
//! asks for:
//!
//! | input | call |
//! |---|---|
//! | the clock moved (once per turn) | [`Router::set_clock`] |
//! | a connection was accepted | [`Router::accept`] |
//! | its pipe has bytes (or EOF) | [`Router::on_readable`] |
//! | its pipe has room | [`Router::on_writable`] |
//! | mail from another shard | [`Router::on_mail`] |
//! | deadlines are due | [`Router::on_timers`] |
//! | shut down | [`Router::begin_shutdown`] |
//!
//! and it answers with: output flushed once per connection per turn ([`Router::flush`],
//! one `writev` each), mail for other shards ([`Router::post_mail`]), the next deadline
//! ([`Router::next_deadline`]) and connections finished (dropped from the slab, which drops
//! their pipe). It never reads a clock, never blocks, and touches a connection's bytes only
//! through [`Transport`].

/// `$outer` sits on `$inner` (its field `$field`): the layer above reaches every method
/// and field of the one below, and nothing below reaches up.
macro_rules! layer_over {
    ($outer:ident => $inner:ident, $field:ident) => {
        impl<T: Transport> std::ops::Deref for $outer<T> {
            type Target = $inner<T>;
            fn deref(&self) -> &$inner<T> {
                &self.$field
            }
        }

        impl<T: Transport> std::ops::DerefMut for $outer<T> {
            fn deref_mut(&mut self) -> &mut $inner<T> {
                &mut self.$field
            }
        }
    };
}

pub mod admission;
mod api;
mod catchup;
mod closing;
mod cluster;
mod core;
pub use self::core::Core;
mod dispatch;
mod events;
mod frames;
mod heartbeat;
mod http;
mod ops;
mod output;
mod postbox;
mod requests;
pub use requests::PostStore;
mod routes;
mod streams;
pub use streams::Streams;
mod table;
pub use table::Table;
mod waits;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use slab::Slab;
use tracing::debug;

pub use crate::conn::buffers::{BufPool, Chunk, Fragment, Inbound, Outbox, Piece};
pub use crate::conn::{
    flush, Conn, ConnState, Extra, Flags, Flushed, HttpWait, Transport, Welcome,
};

use crate::broker::{BrokerHandle, BrokerMetrics};
use crate::config::Config;
use crate::hub::{Directory, Hub};
use crate::mail::ShardMsg;
use crate::metrics::{HandshakeFailure, ShardMetrics, StoreMetrics};
use crate::store::StoreHandle;
use crate::ws::close::{self as code};

pub use api::{Api, PendingApi};
pub use ops::{FORBIDDEN_CHANNEL, MAX_CHANNELS_PER_CONN};

/// Mailbox messages handled per turn.
pub const MAILBOX_PER_TURN: usize = 8192;
/// Timer expiries handled per turn.
pub const TIMERS_PER_TURN: usize = 8192;

/// What every shard's sessions share: configuration, identity, counters.
#[derive(Clone)]
pub struct Shared {
    /// Configuration.
    pub config: Arc<Config>,
    /// Token verification.
    pub auth: Arc<crate::auth::Auth>,
    /// Counters of every shard, by index.
    pub metrics: Arc<[ShardMetrics]>,
    /// Open WebSocket and SSE connections in the process, against `--max-connections`.
    pub open_total: Arc<AtomicUsize>,
    /// Channels with local subscribers, by shard: a publish skips the shards at 0 (shards
    /// added only for their fd tables sit empty).
    pub subscribed: Arc<[AtomicUsize]>,
    /// Connections per source address, process-wide.
    pub ip_table: Arc<admission::IpTable>,
    /// Which shards hold each named user (DMs route through it in one hop).
    pub directory: Arc<Directory>,
    /// Starts the process's staged shutdown (`POST /api/drain`); none without a process.
    pub on_drain: Option<OnDrain>,
    /// The store thread, when streams are on.
    pub store: Option<StoreHandle>,
    /// The store's counters (for `/metrics`).
    pub store_metrics: Arc<StoreMetrics>,
    /// The cluster's broker, with `--broker`.
    pub broker: Option<BrokerHandle>,
    /// The broker's counters (for `/metrics`).
    pub broker_metrics: Option<Arc<BrokerMetrics>>,
    /// This node's id (shown in `/api/stats` and `/metrics`).
    pub node: Arc<str>,
}

impl Shared {
    /// Everything for `shards` shards without a server around them (the simulation, tests,
    /// benches, fuzzing): fresh counters, no store. Panics on a token key that does not parse.
    pub fn standalone(config: Config, shards: usize) -> Shared {
        let homes = config.homes().min(shards);
        let auth = crate::auth::Auth::from_config(&config).expect("a valid token configuration");
        let ip_table = Arc::new(admission::IpTable::new(
            config.max_connections_per_ip,
            config.limit_loopback,
        ));
        Shared {
            config: Arc::new(config),
            auth: Arc::new(auth),
            metrics: (0..shards).map(|_| ShardMetrics::default()).collect(),
            open_total: Arc::new(AtomicUsize::new(0)),
            subscribed: (0..shards).map(|_| AtomicUsize::new(0)).collect(),
            directory: Arc::new(Directory::new(homes)),
            ip_table,
            on_drain: None,
            store: None,
            store_metrics: Default::default(),
            broker: None,
            broker_metrics: None,
            node: "standalone".into(),
        }
    }
}

/// One shard's connections and everything that routes between them (see the module docs):
/// the top of four layers, each a type that owns its state and reaches only the layers
/// below it (through `Deref`), never above:
///
/// | layer | owns | does |
/// |---|---|---|
/// | [`Router`] | handshake gate, tokens, the shutdown drain | reads input (HTTP, frames, ops, mail, broker messages, timers) and dispatches it |
/// | [`Api`] | API requests in flight | the push API: authorize, gather counts from every shard and node |
/// | [`Streams`] | store requests of the turn | qos 1, inbox positions, resume pages, catch-ups |
/// | [`Core`] | the table, hub, directory, mail, broker outputs, stream heads | registers, routes, delivers, answers and closes |
///
/// A lower layer that must hand work back up (a connection's input resumes after the store
/// answered) does so through the table's read backlog, which the driver drains each turn.
pub struct Router<T: Transport> {
    api: Api<T>,
    auth: Arc<crate::auth::Auth>,
    gate: admission::HandshakeGate,
    /// Reused buffer a DM event is written into (copied from it to local recipients).
    scratch_event: bytes::BytesMut,
    /// The broker's reconnect generation this shard's counts in Redis were written for.
    broker_generation: u64,
    /// The staged close of open connections at shutdown.
    drain: Option<Drain>,
}

layer_over!(Router => Api, api);

/// Open connections still to close at shutdown, closed evenly over `len_ms`.
#[derive(Debug)]
struct Drain {
    start_ms: u64,
    len_ms: u64,
    /// `(key, generation)`, in the order they are closed.
    queue: Vec<(usize, u32)>,
    closed: usize,
}

impl Drain {
    /// Shard clock at which the `n`-th close is due.
    fn due_ms(&self, n: usize) -> u64 {
        let total = self.queue.len().max(1) as u64;
        self.start_ms + self.len_ms * n as u64 / total
    }
}

/// What `POST /api/drain` calls: the server's SIGTERM path.
pub type OnDrain = Arc<dyn Fn() + Send + Sync>;

/// Drain time per open connection when `--drain-ms` is not given: 2 s per 100,000.
const DRAIN_US_PER_CONN: u64 = 20;

impl<T: Transport> Router<T> {
    /// Router of shard `index` of `shards`, with the clock at `now_ms` / `now_unix_ms`.
    pub fn new(index: u16, shards: u16, shared: Shared, now_ms: u64, now_unix_ms: u64) -> Self {
        let room = Self::room(&shared.config, shards);
        let conns = table::Table::new(
            index,
            shared.config.clone(),
            shared.metrics.clone(),
            room,
            now_ms,
            now_unix_ms,
        );
        let core = Core {
            index,
            shards,
            directory: shared.directory,
            cfg: shared.config,
            metrics: shared.metrics,
            open_total: shared.open_total,
            subscribed: shared.subscribed,
            ip_table: shared.ip_table,
            ip_buckets: Vec::with_capacity(room),
            half_open: 0,
            scratch_reply: bytes::BytesMut::new(),
            broker_out: Vec::new(),
            interest_out: Vec::new(),
            broker: shared.broker,
            waits: Default::default(),
            conns,
            hub: Hub::default(),
            mail: postbox::Postbox::new(index, shards),
            scratch_slots: Vec::new(),
            scratch_shards: Vec::new(),
            heads: Default::default(),
            shutdown_deadline_ms: None,
        };
        let streams = Streams {
            core,
            store_on: shared.store.is_some(),
            store_out: Vec::new(),
        };
        let api = Api {
            streams,
            pending_api: Slab::new(),
            on_drain: shared.on_drain,
            store_metrics: shared.store_metrics,
            broker_metrics: shared.broker_metrics,
            node: shared.node,
        };
        Router {
            api,
            auth: shared.auth,
            gate: Default::default(),
            scratch_event: bytes::BytesMut::new(),
            broker_generation: 0,
            drain: None,
        }
    }

    /// Connections a shard makes room for up front: half again its share of
    /// `--max-connections` (connections do not spread evenly), at most 65,536. Reserved
    /// address space costs no memory until used, while a slab that grows by doubling copies
    /// itself, and the old copy stays resident a while: at 15k connections a shard, 40 bytes
    /// a connection.
    fn room(cfg: &Config, shards: u16) -> usize {
        (cfg.max_connections / shards.max(1) as usize * 3 / 2).clamp(1024, 1 << 16)
    }

    /// Call once per turn, before any other input: the shard clock (ms, monotonic) and the
    /// wall clock (unix ms) that message timestamps and token expiry use.
    pub fn set_clock(&mut self, now_ms: u64, now_unix_ms: u64) {
        debug_assert!(
            now_ms >= self.conns.now_ms,
            "the shard clock never goes back"
        );
        self.conns.now_ms = now_ms.max(self.conns.now_ms);
        self.conns.now_unix_ms = now_unix_ms;
    }

    /// Takes a new connection; `loopback` when the peer address is a loopback address.
    /// Returns its slab key. The handshake deadline is armed.
    pub fn accept(&mut self, io: T, loopback: bool) -> usize {
        let key = self.conns.insert_new(io);
        if loopback {
            self.conns[key].flags.set(Flags::LOOPBACK);
        }
        let m = self.m();
        ShardMetrics::add(&m.accepted, 1);
        ShardMetrics::add(&m.open_http, 1);
        key
    }

    /// Counts a connection the driver accepted only to answer it 503 (its fd table is full):
    /// accepted, and refused `over_capacity`.
    pub fn count_refused_at_accept(&self) {
        let m = self.m();
        ShardMetrics::add(&m.accepted, 1);
        m.count_handshake_failure(HandshakeFailure::OverCapacity);
    }

    /// [`Self::accept`] from the peer address `ip`, counted against
    /// `--max-connections-per-ip` (over it: 429 at once).
    pub fn accept_ip(&mut self, io: T, ip: std::net::IpAddr) -> usize {
        let key = self.accept(io, ip.is_loopback());
        if !self.conns[key].state.is_http() {
            return key; // refused already
        }
        match self.ip_table.admit(ip) {
            Ok(None) => {}
            Ok(Some(b)) => {
                if self.ip_buckets.len() <= key {
                    self.ip_buckets.resize(key + 1, 0);
                }
                self.ip_buckets[key] = b + 1;
            }
            Err(admission::AtLimit) => {
                let wait = self.retry_jitter_ms(key, 5000, 10_000);
                self.conns.http_refuse(
                    key,
                    429,
                    "too many connections from your address",
                    HandshakeFailure::PerIp,
                    wait,
                );
            }
        }
        key
    }

    /// The pipe of connection `key`, if it exists.
    pub fn io_mut(&mut self, key: usize) -> Option<&mut T> {
        self.conns.get_mut(key).map(|c| &mut c.io)
    }

    /// The shard's connections (read-only: for the driver, checks and stats).
    pub fn conns(&self) -> &Table<T> {
        &self.conns
    }

    /// The hub (read-only, for checks and stats).
    pub fn hub(&self) -> &Hub {
        &self.hub
    }

    /// The process's directory of named users.
    pub fn directory(&self) -> &Directory {
        &self.directory
    }

    /// The socket of `key` has room again (edge-triggered): flush what waits at the end of
    /// the turn.
    pub fn on_writable(&mut self, key: usize) {
        let Some(c) = self.conns.get_mut(key) else {
            return; // spurious event for a finished connection
        };
        c.flags.set(Flags::WRITABLE);
        c.io.flush_pending();
        if c.outbox.is_some() {
            self.conns.mark_dirty(key);
        }
    }

    /// Whether mail waits for room in a full mailbox (retry in about a millisecond).
    pub fn has_retries(&self) -> bool {
        self.mail.has_retries()
    }

    /// The earliest deadline: the wheel's next expiry or the end of the shutdown grace.
    pub fn next_deadline(&self) -> Option<u64> {
        let w = self.conns.wheel.next_expiration();
        let drain = self
            .drain
            .as_ref()
            .filter(|d| d.closed < d.queue.len())
            .map(|d| d.due_ms(d.closed + 1));
        [w, self.shutdown_deadline_ms, drain, self.heads.next_retry()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Reads capped in an earlier call continue.
    pub fn drain_read_backlog(&mut self) {
        if self.conns.read_backlog.is_empty() {
            return;
        }
        let list = std::mem::take(&mut self.conns.read_backlog);
        for (key, generation) in list {
            if let Some(c) = self.conns.get_mut(key) {
                if c.generation == generation {
                    c.flags.clear(Flags::READ_BACKLOG);
                    self.on_readable(key, true);
                }
            }
        }
    }

    /// Fires every deadline due at the current clock (at most [`TIMERS_PER_TURN`]).
    pub fn on_timers(&mut self) {
        self.resync_counts();
        self.drain_step();
        self.retry_due_catch_ups();
        let mut expired = std::mem::take(&mut self.conns.expired);
        expired.clear();
        let now = self.conns.now_ms;
        self.conns.wheel.poll(now, &mut expired, TIMERS_PER_TURN);
        for &key in &expired {
            let key = key as usize;
            if self.conns.contains(key) {
                self.on_timer(key);
            }
        }
        self.conns.expired = expired;
        ShardMetrics::set(&self.m().wheel_entries, self.conns.wheel.len() as u64);
    }

    /// Flushes every connection with output, once (one `writev` each), and makes the
    /// transitions that wait for a flush.
    pub fn flush(&mut self) {
        self.conns.publish_counts();
        let mut list = std::mem::take(&mut self.conns.dirty);
        for &(key, generation) in &list {
            if let Some(c) = self.conns.get_mut(key) {
                if c.generation == generation {
                    c.flags.clear(Flags::DIRTY);
                    self.flush_conn(key);
                }
            }
        }
        list.clear();
        // Flushing never queues more output, but keep anything that did.
        list.append(&mut self.conns.dirty);
        self.conns.dirty = list;
    }

    /// End-of-turn flush of one connection, and the transitions that wait for a flush.
    pub(super) fn flush_conn(&mut self, key: usize) {
        match self.conns.flush_out(key) {
            Ok(Flushed::All) => {
                if self.conns[key].page_wanted() {
                    self.request_page(key);
                }
                let c = &mut self.conns[key];
                if c.input_waits() {
                    // Its replies are out: read and parse its requests again.
                    c.extra_mut().input_waits = false;
                    self.conns.defer_read(key);
                }
            }
            Ok(Flushed::Blocked) => return,
            Err(e) => {
                debug!(shard = self.index, conn = key, error = %e, "write failed");
                let c = &mut self.conns[key];
                if c.close_code() == 0 && !c.state.is_http() && c.state != ConnState::Draining {
                    c.set_close(code::ABNORMAL, "write failed".into());
                }
                return self.finish(key);
            }
        }
        let c = &mut self.conns[key];
        match c.state {
            ConnState::Closing
                if c.flags.has(Flags::CLOSE_SENT) && c.flags.has(Flags::CLOSE_RECEIVED) =>
            {
                self.finish(key)
            }
            ConnState::Draining if !c.flags.has(Flags::FIN_SENT) => {
                c.flags.set(Flags::FIN_SENT);
                c.io.shutdown_write();
            }
            _ => {}
        }
    }

    /// Hands this turn's mail to `post` in order. `post` gives a message back when the
    /// target's mailbox is full: mail that must not be lost (presence, API, copies of
    /// accepted messages) waits and is retried on the next call, in order; anything else is
    /// dropped and counted.
    pub fn post_mail(&mut self, post: impl FnMut(u16, ShardMsg) -> Result<(), ShardMsg>) {
        let dropped = self.mail.post(post);
        if dropped > 0 {
            ShardMetrics::add(&self.m().dropped, dropped);
        }
    }

    /// Stops the shard: every open connection gets 1001, connections still in HTTP are
    /// dropped, and [`shutdown_done`](Self::shutdown_done) turns true when all are finished
    /// or the grace period (`--shutdown-grace-ms` minus 10 %) is over.
    pub fn begin_shutdown(&mut self) {
        if self.shutdown_deadline_ms.is_some() {
            return;
        }
        let grace = self.cfg.shutdown_grace_ms;
        self.shutdown_deadline_ms = Some(self.conns.now_ms + grace.saturating_sub(grace / 10));
        // Every shard computes the same length from the process's count; the closes must
        // leave the close handshakes time within the grace.
        let open = self.open_total.load(Ordering::Relaxed) as u64;
        let room = grace.saturating_sub(grace / 10 + self.cfg.close_timeout_ms);
        let len_ms = self
            .cfg
            .drain_ms
            .unwrap_or(open * DRAIN_US_PER_CONN / 1000)
            .min(room);
        let mut queue = Vec::new();
        for key in self.conns.keys() {
            match self.conns[key].state {
                ConnState::Open(_) => queue.push((key, self.conns[key].generation)),
                _ => self.shutdown_conn(key),
            }
        }
        debug!(
            shard = self.index,
            connections = queue.len(),
            drain_ms = len_ms,
            "shutting down: closing connections with 1001, spread over the drain"
        );
        self.drain = Some(Drain {
            start_ms: self.conns.now_ms,
            len_ms,
            queue,
            closed: 0,
        });
        self.drain_step();
    }

    /// Closes the connections whose turn in the drain has come.
    fn drain_step(&mut self) {
        let Some(mut d) = self.drain.take() else {
            return;
        };
        while d.closed < d.queue.len() && d.due_ms(d.closed + 1) <= self.conns.now_ms {
            let (key, generation) = d.queue[d.closed];
            d.closed += 1;
            if self
                .conns
                .get(key)
                .is_some_and(|c| c.generation == generation)
            {
                let end = d.start_ms + d.len_ms;
                self.drain_conn(key, end.saturating_sub(self.conns.now_ms), d.len_ms);
            }
        }
        self.drain = Some(d);
    }

    /// Whether shutdown was asked for.
    pub fn shutting_down(&self) -> bool {
        self.shutdown_deadline_ms.is_some()
    }

    /// During shutdown: true once every connection is finished or the grace is over (then
    /// the rest are dropped).
    pub fn shutdown_done(&mut self) -> bool {
        let Some(deadline) = self.shutdown_deadline_ms else {
            return false;
        };
        if self.conns.is_empty() {
            return true;
        }
        if self.conns.now_ms < deadline {
            return false;
        }
        let left = self.conns.keys();
        tracing::warn!(
            shard = self.index,
            connections = left.len(),
            "shutdown grace over; dropping the rest"
        );
        for k in left {
            self.finish(k);
        }
        true
    }

    /// Checks the invariants that tie the slab, the wheel, the hub and the buffers together.
    /// Panics on a violation (tests and the simulation call it after every step).
    pub fn check_invariants(&self) {
        self.conns.wheel.check_invariants();
        let mut timers = 0;
        for (key, c) in self.conns.iter() {
            assert!(
                self.conns.wheel.is_armed(key as u32),
                "connection {key} ({:?}) has no deadline",
                c.state
            );
            timers += 1;
            if let Some(o) = &c.outbox {
                o.check_invariants();
                // One unit may pass the limit when the queue was empty; the rest never does.
                let max = self.cfg.max_outbound_bytes;
                let biggest = o.queue.iter().map(|c| c.piece.len()).max().unwrap_or(0);
                // Unsealed units count as one piece here: each was at most SMALL_UNIT_MAX.
                let biggest = biggest.max(crate::conn::buffers::SMALL_UNIT_MAX);
                // A replay page per resumed stream bypasses the limit (the next page is
                // asked for once it is written).
                let streams = c.extra().map_or(0, |e| {
                    usize::from(e.cursor.is_some()) + e.channel_cursors.len()
                });
                let pages = streams * (crate::store::PAGE_BYTES + biggest);
                assert!(
                    o.bytes <= max + biggest + crate::conn::buffers::INLINE_MAX + 2 * 1024 + pages,
                    "connection {key}'s outbox holds {} bytes (limit {max})",
                    o.bytes
                );
            }
            // Welcomed (registered, no longer held) means the home shard recorded it.
            let welcomed = c.flags.has(Flags::REGISTERED) && !c.state.holds_input();
            if let (Some(u), true) = (&c.user, welcomed) {
                let me = self.conns.conn_id(key);
                let mut listed = false;
                self.directory
                    .each_on(u, self.index, |id| listed |= id == me);
                assert!(listed, "connection {key} of {u} is not in the directory");
            }
            for ch in c.channel_list() {
                assert!(
                    self.hub.subscribers(ch).any(|s| s == key as u32),
                    "connection {key} thinks it is in {ch}"
                );
            }
        }
        assert_eq!(
            timers,
            self.conns.wheel.len(),
            "wheel entries without a connection"
        );
        let half_open = self
            .conns
            .iter()
            .filter(|(_, c)| c.flags.has(Flags::HALF_OPEN))
            .count();
        assert_eq!(
            half_open, self.half_open as usize,
            "half-open handshake count"
        );
        for s in self.hub.all_slots() {
            let c = self.conns.get(s as usize);
            assert!(
                c.is_some_and(|c| c.flags.has(Flags::REGISTERED)),
                "hub lists slot {s} which is not a registered connection"
            );
        }
    }
}

/// Increments the process-wide open count; false when over `max`.
fn admit(open_total: &AtomicUsize, max: usize) -> bool {
    open_total.fetch_add(1, Ordering::AcqRel) < max
}

#[cfg(test)]
mod allocs;
#[cfg(test)]
mod tests;
