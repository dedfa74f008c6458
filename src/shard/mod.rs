//! The per-core event loop, the thin driver of the session layer: one `mio::Poll`, its
//! listeners, the sockets, the clock and the mailbox. Only this loop touches sockets or reads
//! the clock (once per turn); what to do with bytes, mail and deadlines is decided by
//! [`Router`].
//!
//! One turn: poll (timeout from the wheel) → accept, read and feed the sessions → drain the
//! mailbox → expire timers → post this turn's mail → flush every connection that has output,
//! once (`writev`).

pub mod fdtable;
pub mod listener;
pub mod mailbox;
pub mod steer;
pub mod stream;

use std::io::{self, Write};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mio::net::{TcpListener, TcpStream};
use mio::{Events, Interest, Poll, Token};
use tracing::{debug, error, info, warn};

use crate::config::Config;
use crate::metrics::ShardMetrics;
use crate::router::{Router, Shared, MAILBOX_PER_TURN};
pub use mailbox::{mailbox, Inbox, Mailbox};
pub use stream::Stream;

use crate::timer::slack;

/// Token of the shard's waker (mailbox posts).
pub const WAKER: Token = Token(usize::MAX - 1);
/// Tokens of listeners count down from here.
const LISTENER_BASE: usize = usize::MAX - 2;
/// Connections accepted per listener per turn before other work gets a turn.
const ACCEPTS_PER_TURN: usize = 512;
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
    /// TLS of each listener, by index (`None`: plain).
    pub tls: Vec<Option<Arc<crate::tls::Acceptor>>>,
    /// Counters of every shard, by index.
    pub metrics: Arc<[ShardMetrics]>,
    /// Configuration.
    pub config: Arc<Config>,
    /// Open WebSocket connections in the process, against `--max-connections`.
    pub open_total: Arc<AtomicUsize>,
    /// Channels with local subscribers, by shard.
    pub subscribed: Arc<[AtomicUsize]>,
    /// Connections per source address, process-wide.
    pub ip_table: Arc<crate::router::admission::IpTable>,
    /// Which shards hold each named user.
    pub directory: Arc<crate::hub::Directory>,
    /// Which shards take new connections, when shards were added for their fd tables.
    pub steering: Option<Arc<steer::Steering>>,
    /// Give this shard its own fd table before it accepts anything.
    pub private_fd_table: bool,
    /// Every shard waits here after unsharing, so no accepted fd leaks into another table.
    pub barrier: Arc<Barrier>,
    /// Token verification.
    pub auth: Arc<crate::auth::Auth>,
    /// The store thread, when streams are on.
    pub store: Option<crate::store::StoreHandle>,
    /// The store's counters.
    pub store_metrics: Arc<crate::metrics::StoreMetrics>,
    /// The cluster's broker, with `--broker`.
    pub broker: Option<crate::broker::BrokerHandle>,
    /// The broker's counters.
    pub broker_metrics: Option<Arc<crate::broker::BrokerMetrics>>,
    /// This node's id.
    pub node: Arc<str>,
}

/// A running shard.
pub struct Shard {
    index: u16,
    poll: Poll,
    inbox: Inbox,
    peers: Arc<[Mailbox]>,
    listeners: Vec<TcpListener>,
    /// TLS of each listener, by index.
    tls: Vec<Option<Arc<crate::tls::Acceptor>>>,
    sessions: Router<Stream>,
    /// The store thread's queue, when streams are on: the router's requests are posted to
    /// it at the end of each turn.
    store: Option<crate::store::StoreHandle>,
    /// The cluster's broker, with `--broker`: the router's publications and interest
    /// changes are posted to it at the end of each turn.
    broker: Option<crate::broker::BrokerHandle>,
    epoch: Instant,
    now_ms: u64,
    accept_pending: bool,
    accept_paused_until_ms: u64,
    last_emfile_warn_ms: Option<u64>,
    mailbox_pending: bool,
    steering: Option<Arc<steer::Steering>>,
    /// The listeners' fds, for the steering program (empty once shutdown stopped listening).
    listener_fds: Vec<std::os::fd::RawFd>,
    /// `--backlog`: how many connections an accept queue can hold.
    backlog: usize,
    /// A descriptor held in reserve: closed to accept (and refuse) one connection when the
    /// table is full.
    spare_fd: Option<std::fs::File>,
    /// `--timer-slack-ms`: the grid on which this shard wakes for deadlines, and its offset
    /// on it (shards spread over the step so they do not all wake together).
    slack_step: u64,
    slack_phase: u64,
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
        let listener_fds = {
            use std::os::fd::AsRawFd;
            listeners
                .iter()
                .map(|l: &TcpListener| l.as_raw_fd())
                .collect()
        };
        let shards = setup.peers.len() as u16;
        let backlog = setup.config.backlog as usize;
        let slack_step = setup.config.timer_slack_ms;
        let slack_phase = slack_step * setup.index as u64 / u64::from(shards.max(1));
        let shared = Shared {
            config: setup.config,
            auth: setup.auth,
            metrics: setup.metrics,
            open_total: setup.open_total,
            subscribed: setup.subscribed,
            ip_table: setup.ip_table,
            directory: setup.directory,
            on_drain: Some(Arc::new(|| {
                // The same path as SIGTERM: the main thread's signal loop shuts down.
                // SAFETY: kill has no memory-safety preconditions.
                unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
            })),
            store: setup.store.clone(),
            store_metrics: setup.store_metrics,
            broker: setup.broker.clone(),
            broker_metrics: setup.broker_metrics,
            node: setup.node,
        };
        let index = setup.index as u16;
        Ok(Shard {
            index,
            poll: setup.poll,
            inbox: setup.inbox,
            peers: setup.peers,
            listeners,
            tls: setup.tls,
            sessions: Router::new(index, shards, shared, 0, unix_ms()),
            store: setup.store,
            broker: setup.broker,
            epoch: Instant::now(),
            now_ms: 0,
            accept_pending: false,
            accept_paused_until_ms: 0,
            last_emfile_warn_ms: None,
            mailbox_pending: false,
            steering: setup.steering,
            listener_fds,
            backlog,
            spare_fd: std::fs::File::open("/dev/null").ok(),
            slack_step,
            slack_phase,
        })
    }

    fn tick_clock(&mut self) {
        self.now_ms = self.epoch.elapsed().as_millis() as u64;
        self.sessions.set_clock(self.now_ms, unix_ms());
    }

    fn poll_timeout(&self) -> Duration {
        if self.sessions.has_retries() {
            return Duration::from_millis(1);
        }
        if self.sessions.conns().has_backlog()
            || self.mailbox_pending
            || (self.accept_pending && !self.accept_paused())
        {
            return Duration::ZERO;
        }
        let mut until = self.now_ms + MAX_POLL_MS;
        if let Some(t) = self.sessions.next_deadline() {
            let t = slack::wake_at(t, self.now_ms, self.slack_step, self.slack_phase);
            until = until.min(t);
        }
        if self.accept_pending {
            until = until.min(self.accept_paused_until_ms);
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
                    Token(key) => {
                        if ev.is_writable() {
                            self.sessions.on_writable(key);
                        }
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            // A short read means the socket is empty: with edge-triggered
                            // epoll later data raises a new event, so the read that would
                            // return WouldBlock is skipped — unless the peer's FIN (or an
                            // error) came with this event and must still be seen.
                            let drain = ev.is_read_closed() || ev.is_error();
                            self.sessions.on_readable(key, drain);
                        }
                    }
                }
            }
            if self.accept_pending && !self.accept_paused() && !self.sessions.shutting_down() {
                self.accept_all();
            }
            self.drain_mailbox();
            self.sessions.drain_read_backlog();
            self.sessions.on_timers();
            let peers = &self.peers;
            self.sessions
                .post_mail(|to, msg| peers[to as usize].post(msg));
            if let Some(store) = &self.store {
                self.sessions.post_requests(&mut store.poster());
            }
            if let Some(b) = &self.broker {
                self.sessions
                    .post_broker(&mut |req| b.publish(req), &mut |i| b.interest(i));
            }
            self.sessions.flush();
            self.steer();
            if self.sessions.shutting_down() {
                self.stop_listening();
                if self.sessions.shutdown_done() {
                    debug!(shard = self.index, "shard stopped");
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
                    Ok((stream, peer)) => {
                        self.on_accept(stream, peer.ip(), li);
                        // At once, not at the end of the turn: every accept this turn
                        // would otherwise still land here.
                        self.steer();
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) if is_fd_exhaustion(&e) && self.refuse_one(li) => {}
                    Err(e) if is_fd_exhaustion(&e) => {
                        self.accept_pending = true;
                        self.accept_paused_until_ms = self.now_ms + ACCEPT_PAUSE_MS;
                        self.warn_out_of_fds(&format!(
                            "out of file descriptors ({e}): accepting paused"
                        ));
                        return;
                    }
                    // ECONNABORTED and friends: that connection is gone, keep accepting.
                    Err(_) => {}
                }
            }
        }
    }

    /// Out of descriptors with connections queued: the spare descriptor makes room to accept
    /// one and answer it 503 with `Retry-After` (it would otherwise wait in the queue until
    /// its handshake timed out). False when there is no spare (the shard pauses accepting).
    fn refuse_one(&mut self, li: usize) -> bool {
        if self.spare_fd.take().is_none() {
            return false;
        }
        let refused = match self.listeners[li].accept() {
            Ok((mut stream, _)) => {
                let full = "server full (out of file descriptors)";
                // On a TLS listener there is no handshake to answer through: just close.
                if self.tls[li].is_none() {
                    let _ = stream.write(&crate::http::response::retry_later(503, full, 1));
                }
                self.sessions.count_refused_at_accept();
                true
            }
            Err(_) => false,
        };
        self.spare_fd = std::fs::File::open("/dev/null").ok();
        if refused {
            self.warn_out_of_fds("out of file descriptors: refusing queued connections with 503");
        }
        refused
    }

    fn warn_out_of_fds(&mut self, what: &str) {
        let quiet = self
            .last_emfile_warn_ms
            .is_some_and(|t| self.now_ms < t + 1000);
        if !quiet {
            self.last_emfile_warn_ms = Some(self.now_ms);
            warn!(
                shard = self.index,
                open = self.sessions.conns().len(),
                "{what}; raise RLIMIT_NOFILE (tuning/limits.d) or leave --shards and --fd-table on their defaults"
            );
        }
    }

    fn on_accept(&mut self, mut stream: TcpStream, ip: std::net::IpAddr, li: usize) {
        let _ = stream.set_nodelay(true);
        let key = self.sessions.conns().next_key();
        if let Err(e) = self.poll.registry().register(
            &mut stream,
            Token(key),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            warn!(shard = self.index, error = %e, "cannot register an accepted socket");
            return;
        }
        let stream = match &self.tls[li] {
            None => Stream::plain(stream),
            Some(acceptor) => match Stream::tls(stream, acceptor.config()) {
                Ok(s) => s,
                Err(e) => {
                    warn!(shard = self.index, error = %e, "cannot start a TLS session");
                    return;
                }
            },
        };
        let got = self.sessions.accept_ip(stream, ip);
        debug_assert_eq!(got, key, "the slab key is the token");
    }

    /// Tells the steering how full this shard is (it changes the program at a mark).
    fn steer(&mut self) {
        let Some(s) = &self.steering else { return };
        // What waits in the accept queue lands here whatever the program says next: count
        // it (one getsockopt per accept, only near the mark).
        let mut open = self.sessions.conns().len();
        if open + self.backlog >= s.high() {
            open += self
                .listener_fds
                .iter()
                .map(|&fd| steer::accept_queue_len(fd))
                .sum::<usize>();
        }
        match s.update(self.index as usize, open, &self.listener_fds) {
            Ok(None) => {}
            Ok(Some(eligible)) => info!(
                shard = self.index,
                open, "new connections now go to shards {eligible:?}"
            ),
            Err(e) => {
                warn!(shard = self.index, error = %e, "cannot change which shards take new connections")
            }
        }
    }

    fn drain_mailbox(&mut self) {
        self.inbox.rearm();
        self.mailbox_pending = false;
        // Counted in messages: a batch weighs what it carries.
        let mut handled = 0;
        while handled < MAILBOX_PER_TURN {
            let Some(msg) = self.inbox.try_recv() else {
                return;
            };
            handled += msg.weight();
            self.sessions.on_mail(msg);
        }
        self.mailbox_pending = true;
    }

    fn stop_listening(&mut self) {
        for l in &mut self.listeners {
            let _ = self.poll.registry().deregister(l);
        }
        self.listeners.clear();
        self.listener_fds.clear();
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
