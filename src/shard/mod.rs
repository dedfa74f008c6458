//! The per-core event loop: one `mio::Poll`, its listeners, a slab of connections, a timer
//! wheel and a mailbox. Only this loop reads the clock, once per turn.
//!
//! One turn: poll (timeout from the wheel) → accept, read and parse → drain the mailbox →
//! expire timers → flush every connection that has output, once (`writev`).

mod api;
pub mod fdtable;
pub mod listener;
pub mod mailbox;
mod session;

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token};
use slab::Slab;
use tracing::{error, info, warn};

use crate::config::Config;
use crate::conn::{BufPool, Conn};
use crate::hub::{ConnId, Hub, ShardMsg};
use crate::metrics::ShardMetrics;
use crate::timer::{TimerKey, Wheel};
pub use mailbox::{mailbox, Inbox, Mailbox};

/// Token of the shard's waker (mailbox posts).
pub const WAKER: Token = Token(usize::MAX - 1);
/// Tokens of listeners count down from here.
const LISTENER_BASE: usize = usize::MAX - 2;
/// Connections accepted per listener per turn before other work gets a turn.
const ACCEPTS_PER_TURN: usize = 512;
/// Mailbox messages handled per turn.
const MAILBOX_PER_TURN: usize = 8192;
/// Timer expiries handled per turn.
const TIMERS_PER_TURN: usize = 8192;
/// Longest poll timeout: the loop wakes at least this often.
const MAX_POLL_MS: u64 = 1000;
/// Accepting pauses this long after EMFILE/ENFILE (the backlog keeps the connections).
const ACCEPT_PAUSE_MS: u64 = 100;
/// Events fetched per poll.
const EVENTS_CAPACITY: usize = 1024;

fn listener_token(i: usize) -> Token {
    Token(LISTENER_BASE - i)
}

/// Everything a shard thread needs, created on the main thread before any shard unshares its
/// fd table (so the epoll fd, the waker eventfd and the listeners exist in every table).
pub struct ShardSetup {
    /// Index of this shard.
    pub index: usize,
    /// The shard's poll (its epoll fd).
    pub poll: Poll,
    /// The shard's inbox.
    pub inbox: Inbox,
    /// Every shard's mailbox, by index.
    pub peers: Arc<[Mailbox]>,
    /// This shard's listeners (SO_REUSEPORT siblings of the other shards').
    pub listeners: Vec<std::net::TcpListener>,
    /// Counters of every shard, by index.
    pub metrics: Arc<[ShardMetrics]>,
    /// Configuration.
    pub config: Arc<Config>,
    /// Open WebSocket connections in the process, against `--max-connections`.
    pub open_total: Arc<AtomicUsize>,
    /// Give this shard its own fd table before it accepts anything.
    pub private_fd_table: bool,
    /// Every shard waits here after unsharing, so no accepted fd leaks into another table.
    pub barrier: Arc<Barrier>,
    /// Token verification.
    pub auth: Arc<crate::auth::Auth>,
}

/// A running shard.
pub struct Shard {
    index: u16,
    poll: Poll,
    inbox: Inbox,
    peers: Arc<[Mailbox]>,
    listeners: Vec<TcpListener>,
    metrics: Arc<[ShardMetrics]>,
    cfg: Arc<Config>,
    open_total: Arc<AtomicUsize>,
    conns: Slab<Conn>,
    wheel: Wheel<u32>,
    /// Why each closing connection closes (kept out of `Conn` to keep it small).
    close_reasons: rustc_hash::FxHashMap<u32, std::borrow::Cow<'static, str>>,
    auth: Arc<crate::auth::Auth>,
    /// What each token-authenticated connection's token grants (expiry, private channels).
    grants: rustc_hash::FxHashMap<u32, Box<crate::auth::Grant>>,
    /// Last event id of each SSE stream.
    sse_ids: rustc_hash::FxHashMap<u32, u64>,
    /// API requests waiting for other shards.
    pending_api: Slab<api::PendingApi>,
    /// Presence messages waiting for room in a full mailbox, per target shard.
    retry: Vec<std::collections::VecDeque<ShardMsg>>,
    hub: Hub,
    pool: BufPool,
    /// Connections with output to flush this turn.
    dirty: Vec<(usize, u32)>,
    /// Connections whose read was capped with data left in the socket.
    read_backlog: Vec<(usize, u32)>,
    expired: Vec<u32>,
    scratch_slots: Vec<u32>,
    scratch_shards: Vec<u16>,
    epoch: Instant,
    /// Shard clock, ms since `epoch`; set once per turn.
    now_ms: u64,
    /// Wall clock (unix ms) for message timestamps; set once per turn.
    now_unix_ms: u64,
    next_generation: u32,
    accept_pending: bool,
    accept_paused_until_ms: u64,
    last_emfile_warn_ms: Option<u64>,
    mailbox_pending: bool,
    shutdown_deadline_ms: Option<u64>,
}

impl Shard {
    /// Runs a shard to completion on the current thread (returns after shutdown).
    pub fn run(setup: ShardSetup) -> io::Result<()> {
        if setup.private_fd_table {
            if let Err(e) = fdtable::unshare_files() {
                setup.barrier.wait();
                return Err(e);
            }
        }
        setup.barrier.wait();
        let mut shard = Shard::new(setup)?;
        shard.event_loop()
    }

    fn new(setup: ShardSetup) -> io::Result<Shard> {
        let mut listeners = Vec::new();
        for (i, l) in setup.listeners.into_iter().enumerate() {
            let mut l = TcpListener::from_std(l);
            setup
                .poll
                .registry()
                .register(&mut l, listener_token(i), Interest::READABLE)?;
            listeners.push(l);
        }
        let n_peers = setup.peers.len();
        Ok(Shard {
            index: setup.index as u16,
            poll: setup.poll,
            inbox: setup.inbox,
            peers: setup.peers,
            listeners,
            metrics: setup.metrics,
            cfg: setup.config,
            open_total: setup.open_total,
            conns: Slab::with_capacity(1024),
            wheel: Wheel::new(0),
            close_reasons: Default::default(),
            auth: setup.auth,
            grants: Default::default(),
            sse_ids: Default::default(),
            pending_api: Slab::new(),
            retry: (0..n_peers).map(|_| Default::default()).collect(),
            hub: Hub::default(),
            pool: BufPool::default(),
            dirty: Vec::new(),
            read_backlog: Vec::new(),
            expired: Vec::new(),
            scratch_slots: Vec::new(),
            scratch_shards: Vec::new(),
            epoch: Instant::now(),
            now_ms: 0,
            now_unix_ms: unix_ms(),
            next_generation: 0,
            accept_pending: false,
            accept_paused_until_ms: 0,
            last_emfile_warn_ms: None,
            mailbox_pending: false,
            shutdown_deadline_ms: None,
        })
    }

    fn m(&self) -> &ShardMetrics {
        &self.metrics[self.index as usize]
    }

    fn tick_clock(&mut self) {
        self.now_ms = self.epoch.elapsed().as_millis() as u64;
        self.now_unix_ms = unix_ms();
    }

    fn poll_timeout(&self) -> Duration {
        if self.retries_pending() {
            return Duration::from_millis(1);
        }
        if !self.read_backlog.is_empty()
            || self.mailbox_pending
            || (self.accept_pending && !self.accept_paused())
        {
            return Duration::ZERO;
        }
        let mut until = self.now_ms + MAX_POLL_MS;
        if let Some(t) = self.wheel.next_expiration() {
            until = until.min(t);
        }
        if self.accept_pending {
            until = until.min(self.accept_paused_until_ms);
        }
        if let Some(d) = self.shutdown_deadline_ms {
            until = until.min(d);
        }
        Duration::from_millis(until.saturating_sub(self.now_ms))
    }

    fn accept_paused(&self) -> bool {
        self.now_ms < self.accept_paused_until_ms
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(EVENTS_CAPACITY);
        loop {
            let timeout = self.poll_timeout();
            if let Err(e) = self.poll.poll(&mut events, Some(timeout)) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                error!(shard = self.index, error = %e, "poll failed; shard stops");
                return Err(e);
            }
            self.tick_clock();
            for ev in events.iter() {
                match ev.token() {
                    WAKER => self.mailbox_pending = true,
                    Token(t) if t > LISTENER_BASE - self.listeners.len() && t <= LISTENER_BASE => {
                        self.accept_pending = true;
                    }
                    Token(key) => self.on_conn_event(key, ev),
                }
            }
            if self.accept_pending && !self.accept_paused() && self.shutdown_deadline_ms.is_none() {
                self.accept_all();
            }
            self.drain_mailbox();
            self.flush_retries();
            self.drain_read_backlog();
            self.expire_timers();
            self.flush_dirty();
            let m = &self.metrics[self.index as usize];
            ShardMetrics::set(&m.wheel_entries, self.wheel.len() as u64);
            if let Some(deadline) = self.shutdown_deadline_ms {
                if self.conns.is_empty() || self.now_ms >= deadline {
                    let left: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
                    if !left.is_empty() {
                        warn!(
                            shard = self.index,
                            connections = left.len(),
                            "shutdown grace over; dropping the rest"
                        );
                    }
                    for k in left {
                        self.finish(k);
                    }
                    info!(shard = self.index, "shard stopped");
                    return Ok(());
                }
            }
        }
    }

    fn accept_all(&mut self) {
        self.accept_pending = false;
        for li in 0..self.listeners.len() {
            for n in 0.. {
                if n == ACCEPTS_PER_TURN {
                    self.accept_pending = true;
                    break;
                }
                match self.listeners[li].accept() {
                    Ok((stream, _)) => self.on_accept(stream),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if is_fd_exhaustion(&e) => {
                        self.accept_pending = true;
                        self.accept_paused_until_ms = self.now_ms + ACCEPT_PAUSE_MS;
                        let quiet = self
                            .last_emfile_warn_ms
                            .is_some_and(|t| self.now_ms < t + 1000);
                        if !quiet {
                            self.last_emfile_warn_ms = Some(self.now_ms);
                            warn!(
                                shard = self.index,
                                open = self.conns.len(),
                                error = %e,
                                "out of file descriptors: accepting paused; raise RLIMIT_NOFILE (tuning/limits.d) or use --fd-table per-shard with more --shards"
                            );
                        }
                        return;
                    }
                    // ECONNABORTED and friends: that connection is gone, keep accepting.
                    Err(_) => {}
                }
            }
        }
    }

    fn on_accept(&mut self, mut stream: mio::net::TcpStream) {
        let _ = stream.set_nodelay(true);
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!(shard = self.index, error = %e, "cannot register an accepted socket");
            return;
        }
        self.next_generation = self.next_generation.wrapping_add(1);
        entry.insert(Conn::new(stream, self.next_generation, self.now_ms));
        let deadline = self.now_ms + self.cfg.handshake_timeout_ms;
        self.arm(key, deadline);
        let m = self.m();
        ShardMetrics::add(&m.accepted, 1);
        ShardMetrics::add(&m.open_http, 1);
    }

    fn drain_mailbox(&mut self) {
        self.inbox.rearm();
        self.mailbox_pending = false;
        for _ in 0..MAILBOX_PER_TURN {
            let Some(msg) = self.inbox.try_recv() else {
                return;
            };
            self.on_shard_msg(msg);
        }
        self.mailbox_pending = true;
    }

    fn drain_read_backlog(&mut self) {
        if self.read_backlog.is_empty() {
            return;
        }
        let list = std::mem::take(&mut self.read_backlog);
        for (key, generation) in list {
            if let Some(c) = self.conns.get_mut(key) {
                if c.generation == generation {
                    c.flags.clear(crate::conn::Flags::READ_BACKLOG);
                    self.on_readable(key);
                }
            }
        }
    }

    fn expire_timers(&mut self) {
        let mut expired = std::mem::take(&mut self.expired);
        expired.clear();
        self.wheel.poll(self.now_ms, &mut expired, TIMERS_PER_TURN);
        for &key in &expired {
            let key = key as usize;
            if let Some(c) = self.conns.get_mut(key) {
                c.timer = TimerKey::NONE;
                self.on_timer(key);
            }
        }
        self.expired = expired;
    }

    fn flush_dirty(&mut self) {
        let mut list = std::mem::take(&mut self.dirty);
        for &(key, generation) in &list {
            if let Some(c) = self.conns.get_mut(key) {
                if c.generation == generation {
                    c.flags.clear(crate::conn::Flags::DIRTY);
                    self.flush_conn(key);
                }
            }
        }
        list.clear();
        // Flushing never queues more output, but keep anything that did.
        list.append(&mut self.dirty);
        self.dirty = list;
    }

    /// (Re)arms the connection's single wheel entry.
    fn arm(&mut self, key: usize, deadline_ms: u64) {
        let c = &mut self.conns[key];
        self.wheel.cancel(c.timer);
        c.timer = self.wheel.insert(deadline_ms, key as u32);
    }

    fn conn_id(&self, key: usize) -> ConnId {
        ConnId {
            shard: self.index,
            slot: key as u32,
            generation: self.conns[key].generation,
        }
    }

    /// Posts a message that must not be lost (presence): when the mailbox is full it waits
    /// in a per-target queue retried every turn, keeping order per target.
    fn post_reliable(&mut self, shard: u16, msg: ShardMsg) {
        let q = &mut self.retry[shard as usize];
        if !q.is_empty() {
            q.push_back(msg);
            return;
        }
        if let Err(msg) = self.peers[shard as usize].post(msg) {
            self.retry[shard as usize].push_back(msg);
        }
    }

    fn flush_retries(&mut self) {
        for target in 0..self.retry.len() {
            while let Some(msg) = self.retry[target].pop_front() {
                if let Err(msg) = self.peers[target].post(msg) {
                    self.retry[target].push_front(msg);
                    break;
                }
            }
        }
    }

    fn retries_pending(&self) -> bool {
        self.retry.iter().any(|q| !q.is_empty())
    }

    /// Posts to a shard; counts a drop when its mailbox is full.
    fn post(&self, shard: u16, msg: ShardMsg) -> bool {
        match self.peers[shard as usize].post(msg) {
            Ok(()) => true,
            Err(_) => {
                ShardMetrics::add(&self.m().dropped, 1);
                false
            }
        }
    }

    fn begin_shutdown(&mut self) {
        if self.shutdown_deadline_ms.is_some() {
            return;
        }
        let grace = self.cfg.shutdown_grace_ms;
        // Leave a margin so the process exits within the grace period.
        self.shutdown_deadline_ms = Some(self.now_ms + grace.saturating_sub(grace / 10));
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(l);
        }
        self.listeners.clear();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        info!(
            shard = self.index,
            connections = keys.len(),
            "shutting down"
        );
        for key in keys {
            self.shutdown_conn(key);
        }
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// Increments the process-wide open count; false when over `max`.
fn admit(open_total: &AtomicUsize, max: usize) -> bool {
    open_total.fetch_add(1, Ordering::AcqRel) < max
}
