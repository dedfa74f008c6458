//! One load-generating thread: its own fd table and mio loop, a slab of client connections,
//! paced connects, open-loop sends, and histograms handed to the main thread every second.

use std::collections::{BinaryHeap, VecDeque};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering::Relaxed, Ordering::Release};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use std::{cmp::Reverse, collections::BTreeMap};

use crossbeam_channel::Sender;
use hdrhistogram::Histogram;
use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};
use serde::Deserialize;
use slab::Slab;
use socket2::{Domain, Protocol, Socket, Type};
use switchboard::testkit;
use switchboard::ws::frame::{self, Control, Data, OpCode};

use crate::plan::{Scenario, Target};
use crate::report::new_histogram;
use crate::schedule::{latency_us, Schedule};

/// The handshake key every connection sends (the server's cost is the same for any key).
const ACCEPT: &str = testkit::SAMPLE_ACCEPT;
/// A connection that has not completed its upgrade by then counts as failed.
const HANDSHAKE_TIMEOUT_NS: u64 = 15_000_000_000;
/// Sends per turn, so receiving is never starved.
const SENDS_PER_TURN: usize = 20_000;
/// Write-combined flood: bytes of frames per write, and writes per connection per call.
const FLOOD_BLOCK_BYTES: usize = 16 * 1024;
const FLOOD_BLOCKS_PER_TURN: usize = 8;
/// How long the ramp-down waits for close handshakes.
const CLOSE_WAIT_NS: u64 = 30_000_000_000;

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds on the process-wide monotonic clock (comparable across threads).
pub fn now_ns() -> u64 {
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

/// Phases, set by the main thread.
pub mod phase {
    /// Connecting and subscribing.
    pub const CONNECT: u8 = 0;
    /// Sending (or holding).
    pub const RUN: u8 = 1;
    /// Sends stopped; waiting for the last deliveries.
    pub const DRAIN: u8 = 2;
    /// Closing every connection with 1000.
    pub const CLOSE: u8 = 3;
}

/// Error kinds, each with the fix printed in the report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum ErrKind {
    /// EADDRNOTAVAIL.
    AddrNotAvail,
    /// EMFILE / ENFILE.
    TooManyFiles,
    /// ECONNREFUSED.
    Refused,
    /// A status other than 101.
    Rejected,
    /// Upgrade did not complete in time.
    Timeout,
    /// Refused for now with when to retry (1013 after the upgrade, 429 or 503 with
    /// `Retry-After`): admission control.
    Busy,
    /// Anything else.
    Other,
}

impl ErrKind {
    /// All kinds.
    pub const ALL: [ErrKind; 7] = [
        ErrKind::AddrNotAvail,
        ErrKind::TooManyFiles,
        ErrKind::Refused,
        ErrKind::Rejected,
        ErrKind::Timeout,
        ErrKind::Busy,
        ErrKind::Other,
    ];

    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            ErrKind::AddrNotAvail => "EADDRNOTAVAIL",
            ErrKind::TooManyFiles => "EMFILE",
            ErrKind::Refused => "ECONNREFUSED",
            ErrKind::Rejected => "handshake_rejected",
            ErrKind::Timeout => "handshake_timeout",
            ErrKind::Busy => "server_busy",
            ErrKind::Other => "other",
        }
    }

    /// What to do about it.
    pub fn fix(self) -> &'static str {
        match self {
            ErrKind::AddrNotAvail => "out of local ports for a (source, destination) pair: add --source-ips (e.g. 127.0.0.2-127.0.0.101) or widen net.ipv4.ip_local_port_range",
            ErrKind::TooManyFiles => "out of file descriptors: use more --threads (each has its own fd table) or raise RLIMIT_NOFILE",
            ErrKind::Refused => "nothing listens on the target: start the server or check --url",
            ErrKind::Rejected => "the server refused the upgrade: see the status code; check the URL path and query",
            ErrKind::Timeout => "TCP connected but no 101 within 15 s: the server is not taking these connections; most often its fd limit (its log says \"out of file descriptors: accepting paused\"; /metrics switchboard_connections_open stops growing): leave its --shards and --fd-table on their defaults (it then adds shards for fd tables) or raise its RLIMIT_NOFILE; else a full listen backlog or a saturated host (then lower --connect-rate)",
            ErrKind::Busy => "the server's admission control refused for now and said when to retry (1013 retry_after_ms, or 429/503 Retry-After); loadgen retried after that wait, as the browser client does (up to 12 attempts). Expected in a storm; otherwise raise the server's --max-handshakes-per-sec, --max-pending-handshakes or --max-connections-per-ip, or lower --connect-rate",
            ErrKind::Other => "see the first error message",
        }
    }

    fn of(e: &io::Error) -> ErrKind {
        match e.raw_os_error() {
            Some(libc::EADDRNOTAVAIL) => ErrKind::AddrNotAvail,
            Some(libc::EMFILE) | Some(libc::ENFILE) => ErrKind::TooManyFiles,
            Some(libc::ECONNREFUSED) => ErrKind::Refused,
            _ => ErrKind::Other,
        }
    }
}

/// Counters of one worker, read by the main thread.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// The phase this worker last began a turn in (the main thread knows from it that no
    /// send of an earlier phase is still to be counted).
    pub seen_phase: AtomicU8,
    /// Open connections (upgraded).
    pub open: AtomicU64,
    /// Connections between connect() and 101.
    pub connecting: AtomicU64,
    /// Upgrades completed, in total.
    pub established: AtomicU64,
    /// Connections ready for the run (welcome or subscription ack received).
    pub ready: AtomicU64,
    /// Connections of this worker that will not be opened (failed for good).
    pub failed: AtomicU64,
    /// Errors by kind.
    pub errors: [AtomicU64; ErrKind::ALL.len()],
    /// Messages sent.
    pub sent: AtomicU64,
    /// Messages received (deliveries).
    pub received: AtomicU64,
    /// Deliveries expected from the messages sent (fanout) or sends (others).
    pub expected: AtomicU64,
    /// connect: when the first and the last message a held connection received arrived
    /// ([`now_ns`]; 0: none), so a broadcast sent to them can be timed.
    pub first_message_ns: AtomicU64,
    pub last_message_ns: AtomicU64,
    /// Sequence gaps seen (dm).
    pub gaps: AtomicU64,
    /// Duplicates seen (dm).
    pub duplicates: AtomicU64,
    /// qos-1 acks received.
    pub acked: AtomicU64,
    /// Stored messages received again after a resume (dropped by offset, not counted).
    pub redelivered: AtomicU64,
    /// qos-1 sends sent again after a drop because they were not acknowledged.
    pub resent: AtomicU64,
    /// `error` ops received.
    pub op_errors: AtomicU64,
    /// `error` ops received, by code ([`OP_ERROR_CODES`]; the last slot: any other code).
    pub op_error_codes: [AtomicU64; OP_ERROR_CODES.len() + 1],
    /// Closes the loadgen did not ask for, by code (1006 = dropped without a close frame).
    pub unexpected_closes: Mutex<BTreeMap<u16, u64>>,
    /// First error message seen, for the report.
    pub first_error: Mutex<Option<String>>,
    /// Connections dropped on purpose (storm).
    pub dropped: AtomicU64,
    /// Clock (ns) of the latest completed upgrade.
    pub last_established_ns: AtomicU64,
}

/// The poll token of the send timer (never a slab key).
const TIMER: usize = usize::MAX - 1;

/// The error codes of the protocol (`docs/protocol.md`), counted one by one.
pub const OP_ERROR_CODES: [&str; 8] = [
    "bad_request",
    "bad_channel",
    "user_offline",
    "overloaded",
    "forbidden",
    "store_full",
    "unavailable",
    "rate_limited",
];

/// State shared by the main thread and every worker.
#[derive(Debug)]
pub struct Shared {
    /// Current phase.
    pub phase: AtomicU8,
    /// Clock (ns) when the run phase started.
    pub run_start_ns: AtomicU64,
    /// Set once to drop connections (storm).
    pub storm: AtomicBool,
    /// Per-worker counters.
    pub stats: Vec<WorkerStats>,
}

/// What every worker needs to know about the run.
#[derive(Debug, Clone)]
pub struct Job {
    /// Scenario.
    pub scenario: Scenario,
    /// Targets.
    pub targets: Vec<Target>,
    /// Source addresses (None: the kernel's choice).
    pub sources: Option<Vec<IpAddr>>,
    /// Connections (subscribers for fanout).
    pub connections: usize,
    /// Extra publisher connections (fanout).
    pub publishers: usize,
    /// Channels (fanout).
    pub channels: usize,
    /// Worker threads.
    pub threads: usize,
    /// Connects per second in total.
    pub connect_rate: f64,
    /// Handshakes in flight in total.
    pub max_inflight: usize,
    /// Messages per second in total.
    pub rate: f64,
    /// Text payload size (echo).
    pub size: usize,
    /// Share of connections to drop (storm).
    pub drop_percent: u32,
    /// User id prefix (dm, fanout).
    pub user_prefix: String,
    /// Run workers under SCHED_BATCH so a delivery does not preempt the server that wrote it.
    pub sched_batch: bool,
    /// DM quality of service: 1 = stored and acknowledged (`"qos":1` with an `id`).
    pub qos: u8,
    /// dm with qos 1: every this many ns drop `drop_percent` % of the connections abruptly;
    /// they reconnect with `since=<epoch>:<offset>` and resume (0: never).
    pub resume_every_ns: u64,
    /// Messages in flight per connection (flood).
    pub window: usize,
    /// flood without a window: send buffers kept full ([`Worker::flood_fill`]).
    pub write_combined: bool,
    /// How wss:// targets are verified (`None`: every target is ws://).
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Offer permessage-deflate and inflate what arrives compressed.
    pub deflate: bool,
    /// Busy-poll this long before a scheduled send instead of sleeping (timer wake-ups
    /// here land tens of µs late).
    pub spin_ns: u64,
}

impl Job {
    fn total(&self) -> usize {
        self.connections
            + if self.scenario == Scenario::Fanout {
                self.publishers
            } else {
                0
            }
    }

    /// Whether a connection is ready at its 101 (dm and fanout ones are ready at their
    /// welcome, or subscription ack).
    fn ready_at_101(&self) -> bool {
        matches!(
            self.scenario,
            Scenario::Connect | Scenario::Echo | Scenario::Storm | Scenario::Flood
        )
    }

    fn senders(&self) -> usize {
        match self.scenario {
            Scenario::Echo => self.connections,
            Scenario::Dm => self.connections / 2 * 2,
            Scenario::Fanout => self.publishers,
            Scenario::Connect | Scenario::Storm | Scenario::Tcp | Scenario::Flood => 0,
        }
    }

    fn path(&self, id: usize) -> String {
        let t = &self.targets[id % self.targets.len()];
        match self.scenario {
            Scenario::Dm | Scenario::Fanout => {
                let sep = if t.path.contains('?') { '&' } else { '?' };
                format!("{}{sep}user={}{id}", t.path, self.user_prefix)
            }
            _ => t.path.clone(),
        }
    }

    fn subscribers_of(&self, channel: usize) -> u64 {
        let (s, k) = (self.connections, self.channels.max(1));
        (s / k + usize::from(channel < s % k)) as u64
    }
}

/// What a worker returns when it ends.
#[derive(Debug)]
pub struct WorkerResult {
    /// TCP connect → 101, µs.
    pub connect: Histogram<u64>,
    /// Scenario latency, µs.
    pub latency: Histogram<u64>,
    /// Scheduled send → ack (qos 1), µs.
    pub ack: Histogram<u64>,
    /// Abrupt drop → open again (dm --resume-every), µs.
    pub recovery: Histogram<u64>,
    /// Actual − scheduled send time, µs: loadgen's own lateness.
    pub lateness: Histogram<u64>,
}

/// A latency interval histogram sent to the main thread once a second.
pub struct Interval {
    /// Latency recorded during the interval.
    pub latency: Histogram<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    Connecting,
    Handshake,
    Open,
    Closing,
}

/// A connection's socket: plain, or TLS over it (`wss://`).
enum Stream {
    Plain(TcpStream),
    Tls(Box<switchboard::tls::TlsStream<TcpStream>>),
}

impl Stream {
    fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => t.get_ref(),
        }
    }

    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(t) => t.read_plain(buf),
        }
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(t) => t.write_plain(&[io::IoSlice::new(buf)]),
        }
    }

    /// TLS records waiting for the socket (the handshake's) go out.
    fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(t) => match t.flush_tls() {
                Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
                _ => Ok(()),
            },
        }
    }
}

/// A connection id's qos-1 sends awaiting their ack: (id, frame payload), oldest first.
type Unacked = VecDeque<(u64, Box<[u8]>)>;

struct Conn {
    stream: Stream,
    id: u32,
    st: St,
    attempt: u8,
    t0_ns: u64,
    rbuf: Vec<u8>,
    wbuf: Vec<u8>,
    recv_next: u32,
    send_seq: u32,
}

#[derive(Deserialize)]
struct Incoming<'a> {
    #[serde(borrow)]
    op: &'a str,
    #[serde(default)]
    data: Option<Payload>,
    /// qos-1 acks carry the scheduled send time as their id.
    #[serde(default)]
    id: Option<u64>,
    /// Offset in the stream of a stored message (qos-1 fanout on a channel with history).
    #[serde(default)]
    offset: Option<u64>,
    /// Epoch of a stored message.
    #[serde(borrow, default)]
    epoch: Option<&'a str>,
    /// Recipient of a DM.
    #[serde(borrow, default)]
    to: Option<&'a str>,
    /// Code of an `error`.
    #[serde(borrow, default)]
    code: Option<&'a str>,
    /// The inbox position in a `welcome`.
    #[serde(borrow, default)]
    inbox: Option<InboxPos<'a>>,
}

#[derive(Deserialize)]
struct InboxPos<'a> {
    #[serde(borrow)]
    epoch: &'a str,
    offset: u64,
}

#[derive(Deserialize)]
struct Payload {
    t: u64,
    s: u32,
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// One worker thread.
pub struct Worker {
    index: usize,
    job: Arc<Job>,
    shared: Arc<Shared>,
    poll: Poll,
    conns: Slab<Conn>,
    /// Ids this worker still has to open, in order.
    to_open: VecDeque<u32>,
    /// Reconnects waiting for their backoff (storm).
    reconnects: BinaryHeap<Reverse<(u64, u32, u8)>>,
    /// Inbox position per connection id (dm with `--resume-every`).
    positions: std::collections::HashMap<u32, (String, u64)>,
    /// Next expected and next sent sequence per connection id, kept across reconnects
    /// (dm with `--resume-every`).
    recv_next_by_id: std::collections::HashMap<u32, (u32, u32)>,
    /// qos-1 sends not acknowledged yet, per connection id, with their frames (dm with
    /// `--resume-every`): a drop can discard a send the server never read, so, like any
    /// at-least-once client, the sender sends these again (same `id`: the server's dedup
    /// window stores a retry of a stored one only once) when it is back.
    unacked: std::collections::HashMap<u32, Unacked>,
    /// When the next periodic drop is due (dm with `--resume-every`).
    next_drop_ns: u64,
    /// Sends due, by scheduled time: (time, slab key).
    sends: BinaryHeap<Reverse<(u64, usize)>>,
    schedules: Vec<Schedule>,
    handshake_deadlines: VecDeque<(u64, usize, u32)>,
    opened: u64,
    started_ns: u64,
    connect_hist: Histogram<u64>,
    latency_hist: Histogram<u64>,
    ack_hist: Histogram<u64>,
    recovery_hist: Histogram<u64>,
    lateness_hist: Histogram<u64>,
    /// Wakes the poll for the next scheduled send.
    timer: crate::timer::TimerFd,
    /// When each dropped connection id was dropped (dm --resume-every).
    dropped_at: std::collections::HashMap<u32, u64>,
    interval_hist: Histogram<u64>,
    intervals: Sender<Interval>,
    rng: Rng,
    scratch: Vec<u8>,
    /// permessage-deflate: the server keeps no context, so one inflater, reset per message.
    inflater: Option<Box<flate2::Decompress>>,
    sending_started: bool,
    stormed: bool,
    /// The text every flood message carries (`--size` bytes).
    flood_payload: Vec<u8>,
    /// Write-combined flood: masked frames of `flood_payload`, about 16 KiB, written whole.
    flood_block: Vec<u8>,
    flood_block_frames: u64,
    closing_since: Option<u64>,
}

impl Worker {
    /// Runs worker `index` to the end of the run. Call on its own thread.
    pub fn run(
        index: usize,
        job: Arc<Job>,
        shared: Arc<Shared>,
        intervals: Sender<Interval>,
    ) -> io::Result<WorkerResult> {
        // A private fd table: this thread's sockets count against its own RLIMIT_NOFILE.
        // SAFETY: unshare has no memory-safety preconditions.
        if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
            return Err(io::Error::last_os_error());
        }
        if job.sched_batch {
            // A woken batch thread waits for the tick instead of preempting the (co-located)
            // server at every write it receives; failing to set it only costs accuracy.
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: sched_setscheduler on the calling thread (pid 0) with a valid param.
            unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        }
        // Timers of this thread fire on time: the default 50 µs slack would make every send
        // up to 50 µs late.
        // SAFETY: PR_SET_TIMERSLACK takes an integer; it only affects this thread.
        unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
        let poll = Poll::new()?;
        let timer = crate::timer::TimerFd::new(poll.registry(), Token(TIMER))?;
        let total = job.total();
        let to_open: VecDeque<u32> = (index..total)
            .step_by(job.threads)
            .map(|i| i as u32)
            .collect();
        let flood_payload = vec![b'x'; job.size];
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (index as u64 + 1));
        let (mut flood_block, mut flood_block_frames) = (Vec::new(), 0);
        while job.write_combined && flood_block.len() < FLOOD_BLOCK_BYTES {
            let mask = (rng.next() as u32).to_ne_bytes();
            testkit::put_frame(&mut flood_block, 0x81, &flood_payload, Some(mask));
            flood_block_frames += 1;
        }
        let mut w = Worker {
            index,
            job,
            shared,
            poll,
            conns: Slab::with_capacity(to_open.len()),
            to_open,
            reconnects: BinaryHeap::new(),
            positions: Default::default(),
            recv_next_by_id: Default::default(),
            unacked: Default::default(),
            next_drop_ns: 0,
            sends: BinaryHeap::new(),
            schedules: Vec::new(),
            handshake_deadlines: VecDeque::new(),
            opened: 0,
            started_ns: now_ns(),
            connect_hist: new_histogram(),
            latency_hist: new_histogram(),
            ack_hist: new_histogram(),
            recovery_hist: new_histogram(),
            lateness_hist: new_histogram(),
            timer,
            dropped_at: Default::default(),
            interval_hist: new_histogram(),
            intervals,
            rng,
            scratch: vec![0; 64 * 1024],
            inflater: None,
            sending_started: false,
            stormed: false,
            flood_payload,
            flood_block,
            flood_block_frames,
            closing_since: None,
        };
        w.event_loop()?;
        Ok(WorkerResult {
            connect: w.connect_hist,
            latency: w.latency_hist,
            ack: w.ack_hist,
            recovery: w.recovery_hist,
            lateness: w.lateness_hist,
        })
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.index]
    }

    fn event_loop(&mut self) -> io::Result<()> {
        let mut events = Events::with_capacity(1024);
        let mut last_interval = now_ns();
        loop {
            let now = now_ns();
            let phase = self.shared.phase.load(Relaxed);
            // Everything counted in earlier turns is visible to whoever reads this.
            self.stats().seen_phase.store(phase, Release);
            if phase < phase::CLOSE {
                self.open_paced(now);
                self.expire_handshakes(now);
            }
            if phase == phase::RUN {
                self.start_sending();
                self.send_due(now);
                if self.job.scenario == Scenario::Storm
                    && !self.stormed
                    && self.shared.storm.load(Relaxed)
                {
                    self.storm(now);
                }
                if self.job.resume_every_ns > 0 {
                    if self.next_drop_ns == 0 {
                        self.next_drop_ns = now + self.job.resume_every_ns;
                    } else if now >= self.next_drop_ns {
                        self.next_drop_ns = now + self.job.resume_every_ns;
                        self.storm(now);
                    }
                }
            }
            if phase == phase::CLOSE && self.closing_since.is_none() {
                self.close_all(now);
            }
            if let Some(since) = self.closing_since {
                if self.conns.is_empty() || now > since + CLOSE_WAIT_NS {
                    return Ok(());
                }
            }
            // Wake for the next scheduled send exactly; poll often while connecting.
            let mut timeout = Duration::from_millis(20);
            let mut spinning = false;
            if !self.to_open.is_empty() || !self.reconnects.is_empty() {
                timeout = Duration::from_micros(500);
            }
            if phase == phase::RUN {
                if let Some(&Reverse((t, _))) = self.sends.peek() {
                    let wait = t.saturating_sub(now_ns());
                    if wait <= self.job.spin_ns {
                        // The last stretch: poll without sleeping (a wake-up would be late).
                        spinning = wait > 0;
                        timeout = Duration::ZERO;
                    } else if wait < timeout.as_nanos() as u64 {
                        // The timerfd wakes the poll `spin_ns` before `t`.
                        self.timer.arm(t, wait - self.job.spin_ns)?;
                    }
                }
            }
            self.poll.poll(&mut events, Some(timeout)).or_else(|e| {
                if e.kind() == io::ErrorKind::Interrupted {
                    Ok(())
                } else {
                    Err(e)
                }
            })?;
            if spinning && events.is_empty() {
                // Nothing to read while waiting for a send: let a co-located server's
                // thread that shares this core run meanwhile.
                std::thread::yield_now();
            }
            if phase == phase::RUN {
                // Sends due now go out before this turn's reads are handled.
                self.send_due(now_ns());
            }
            for ev in events.iter() {
                let key = ev.token().0;
                if key == TIMER {
                    self.timer.clear();
                    continue;
                }
                if !self.conns.contains(key) {
                    continue;
                }
                if ev.is_writable() {
                    self.on_writable(key);
                }
                if self.conns.contains(key)
                    && (ev.is_readable() || ev.is_read_closed() || ev.is_error())
                {
                    // After a short read the socket is empty; edge-triggered epoll reports
                    // later data again, so only a FIN or error needs reading to the end.
                    self.on_readable(key, ev.is_read_closed() || ev.is_error());
                }
                if self.job.write_combined {
                    self.flood_fill(key);
                }
            }
            let now = now_ns();
            if now >= last_interval + 1_000_000_000 {
                last_interval = now;
                let h = std::mem::replace(&mut self.interval_hist, new_histogram());
                let _ = self.intervals.try_send(Interval { latency: h });
            }
        }
    }

    fn open_paced(&mut self, now: u64) {
        let per_thread_rate = self.job.connect_rate / self.job.threads as f64;
        let allowed = ((now - self.started_ns) as f64 / 1e9 * per_thread_rate) as u64 + 1;
        let max_inflight = (self.job.max_inflight / self.job.threads).max(1) as u64;
        while self.opened < allowed && self.stats().connecting.load(Relaxed) < max_inflight {
            let Some(id) = self.to_open.pop_front() else {
                break;
            };
            self.opened += 1;
            self.open(id, 0, now);
        }
        while let Some(Reverse((t, id, attempt))) = self.reconnects.peek().copied() {
            if t > now || self.stats().connecting.load(Relaxed) >= max_inflight {
                break;
            }
            self.reconnects.pop();
            self.open(id, attempt, now);
        }
    }

    fn open(&mut self, id: u32, attempt: u8, now: u64) {
        let job = self.job.clone();
        let (t, s) = crate::plan::assign(
            id as usize,
            job.targets.len(),
            job.sources.as_ref().map_or(1, |v| v.len()),
        );
        let target = &job.targets[t];
        let source = job.sources.as_ref().map(|v| v[s]);
        match connect(target.addr, source) {
            Ok(mut stream) => {
                let entry = self.conns.vacant_entry();
                let key = entry.key();
                if let Err(e) = self.poll.registry().register(
                    &mut stream,
                    Token(key),
                    Interest::READABLE | Interest::WRITABLE,
                ) {
                    return self.fail(id, attempt, ErrKind::of(&e), &e.to_string(), now);
                }
                let stream = match (&job.tls, target.tls) {
                    (Some(cfg), true) => {
                        let name =
                            rustls::pki_types::ServerName::try_from(target.server_name.clone())
                                .map_err(|e| e.to_string())
                                .and_then(|n| {
                                    switchboard::tls::TlsStream::client(stream, cfg.clone(), n)
                                        .map_err(|e| e.to_string())
                                });
                        match name {
                            Ok(t) => Stream::Tls(Box::new(t)),
                            Err(e) => return self.fail(id, attempt, ErrKind::Other, &e, now),
                        }
                    }
                    _ => Stream::Plain(stream),
                };
                entry.insert(Conn {
                    stream,
                    id,
                    st: St::Connecting,
                    attempt,
                    t0_ns: now,
                    rbuf: Vec::new(),
                    wbuf: Vec::new(),
                    recv_next: 0,
                    send_seq: 0,
                });
                self.stats().connecting.fetch_add(1, Relaxed);
                self.handshake_deadlines
                    .push_back((now + HANDSHAKE_TIMEOUT_NS, key, id));
            }
            Err(e) => self.fail(
                id,
                attempt,
                ErrKind::of(&e),
                &format!("connect to {}: {e}", target.addr),
                now,
            ),
        }
    }

    /// Counts a failed attempt; storm reconnects retry with backoff, others give up.
    fn fail(&mut self, id: u32, attempt: u8, kind: ErrKind, msg: &str, now: u64) {
        self.fail_after(id, attempt, kind, msg, now, 0);
    }

    /// [`Self::fail`], waiting at least `server_wait_ns` (a `Retry-After` or a close
    /// reason's `retry_after_ms`) before the retry, as the browser client does.
    fn fail_after(
        &mut self,
        id: u32,
        attempt: u8,
        kind: ErrKind,
        msg: &str,
        now: u64,
        server_wait_ns: u64,
    ) {
        let st = self.stats();
        st.errors[kind as usize].fetch_add(1, Relaxed);
        {
            let mut first = st.first_error.lock().unwrap();
            if first.is_none() {
                *first = Some(msg.to_string());
            }
        }
        // The server said when to come back: every scenario does (a real client would).
        let retries = self.job.scenario == Scenario::Storm && self.stormed
            || self.job.resume_every_ns > 0
            || server_wait_ns > 0;
        if retries && attempt < 12 {
            let delay = self.backoff_ns(attempt + 1).max(server_wait_ns);
            self.reconnects
                .push(Reverse((now + delay, id, attempt + 1)));
        } else {
            st.failed.fetch_add(1, Relaxed);
        }
    }

    /// Exponential backoff with full jitter: uniform in [0, backoff_ceiling_ns(attempt)).
    fn backoff_ns(&mut self, attempt: u8) -> u64 {
        self.rng.next() % backoff_ceiling_ns(attempt)
    }

    fn expire_handshakes(&mut self, now: u64) {
        while let Some(&(deadline, key, id)) = self.handshake_deadlines.front() {
            if deadline > now {
                break;
            }
            self.handshake_deadlines.pop_front();
            let pending = self
                .conns
                .get(key)
                .is_some_and(|c| c.id == id && matches!(c.st, St::Connecting | St::Handshake));
            if pending {
                let attempt = self.conns[key].attempt;
                self.drop_conn(key);
                self.fail(
                    id,
                    attempt,
                    ErrKind::Timeout,
                    "upgrade not completed in 15 s",
                    now,
                );
            }
        }
    }

    fn drop_conn(&mut self, key: usize) {
        let c = self.conns.remove(key);
        // Only a connection that opened took over the id's sequences (`resume_sending`): a
        // refused or failed attempt must not overwrite them with its fresh zeros.
        if self.job.resume_every_ns > 0 && matches!(c.st, St::Open | St::Closing) {
            self.recv_next_by_id.insert(c.id, (c.recv_next, c.send_seq));
        }
        let st = &self.shared.stats[self.index];
        match c.st {
            St::Connecting | St::Handshake => {
                st.connecting.fetch_sub(1, Relaxed);
            }
            St::Open | St::Closing => {
                st.open.fetch_sub(1, Relaxed);
            }
        }
    }

    fn on_writable(&mut self, key: usize) {
        let c = &mut self.conns[key];
        if c.st != St::Connecting && c.stream.flush_pending().is_err() {
            return self.lost(key, 1006);
        }
        if c.st == St::Connecting {
            match c.stream.tcp().take_error() {
                Ok(None) => {}
                Ok(Some(e)) | Err(e) => {
                    let (id, attempt) = (c.id, c.attempt);
                    self.drop_conn(key);
                    return self.fail(
                        id,
                        attempt,
                        ErrKind::of(&e),
                        &format!("connect: {e}"),
                        now_ns(),
                    );
                }
            }
            if let Err(e) = c.stream.tcp().peer_addr() {
                if e.kind() == io::ErrorKind::NotConnected {
                    return; // not yet
                }
            }
            if self.job.scenario == Scenario::Tcp {
                // Baseline: the connection counts as established when TCP says so.
                return self.mark_open(key, true);
            }
            c.st = St::Handshake;
            let mut path = self.job.path(c.id as usize);
            if let (true, Some((e, o))) = (self.job.resume_every_ns > 0, self.positions.get(&c.id))
            {
                // Resume from the last stored message seen. The first connection starts
                // live at the inbox's top (its welcome says where): an inbox kept from an
                // earlier run on the same server is not this run's to replay.
                path.push_str(&format!("&since={e}:{o}"));
            }
            let host = &self.job.targets[c.id as usize % self.job.targets.len()].host;
            let mut req = testkit::upgrade_request(host, &path);
            if self.job.deflate {
                req.truncate(req.len() - 2);
                req.push_str(
                    "Sec-WebSocket-Extensions: permessage-deflate; client_no_context_takeover\r\n\r\n",
                );
            }
            c.wbuf.extend_from_slice(req.as_bytes());
        }
        self.flush(key);
    }

    /// The connection is established (TCP for the baseline, 101 otherwise): counts it and
    /// records its connect time; `ready` when the scenario needs nothing more from it.
    fn mark_open(&mut self, key: usize, ready: bool) {
        let c = &mut self.conns[key];
        c.st = St::Open;
        let now = now_ns();
        self.connect_hist
            .saturating_record(latency_us(c.t0_ns, now));
        let st = &self.shared.stats[self.index];
        st.connecting.fetch_sub(1, Relaxed);
        st.open.fetch_add(1, Relaxed);
        st.established.fetch_add(1, Relaxed);
        st.last_established_ns.fetch_max(now, Relaxed);
        if ready {
            st.ready.fetch_add(1, Relaxed);
        }
        self.resume_sending(key, now);
    }

    /// A sender that reconnected after a periodic drop picks up its schedule from now (what
    /// fell due while it was away is not sent: it was offline); a receiver picks up the
    /// sequence it expects.
    fn resume_sending(&mut self, key: usize, now: u64) {
        if self.job.resume_every_ns == 0 {
            return;
        }
        let cid = self.conns[key].id;
        if let Some(t) = self.dropped_at.remove(&cid) {
            self.recovery_hist.saturating_record(latency_us(t, now));
        }
        if let Some(&(recv, sent)) = self.recv_next_by_id.get(&cid) {
            let c = &mut self.conns[key];
            c.recv_next = recv;
            c.send_seq = sent;
        }
        // Unacknowledged sends go again first, before anything new and in their order; they
        // stay listed until acked.
        if let Some(retry) = self.unacked.remove(&cid) {
            for (_, frame) in &retry {
                self.queue_frame(key, 0x1, frame);
            }
            if !retry.is_empty() {
                self.stats().resent.fetch_add(retry.len() as u64, Relaxed);
                self.flush(key);
            }
            self.unacked.insert(cid, retry);
        }
        if !self.sending_started {
            return;
        }
        let id = self.conns[key].id as usize;
        let senders = self.job.senders();
        if self.job.scenario != Scenario::Dm || id >= senders {
            return;
        }
        let start = self.shared.run_start_ns.load(Relaxed);
        let mut s = Schedule::new(start, self.job.rate, id, senders);
        s.skip_to(now);
        self.sends.push(Reverse((s.next_time(), key)));
        if self.schedules.len() <= key {
            self.schedules.resize(key + 1, s);
        }
        self.schedules[key] = s;
    }

    fn flush(&mut self, key: usize) {
        let c = &mut self.conns[key];
        while !c.wbuf.is_empty() {
            match c.stream.write(&c.wbuf) {
                Ok(n) => {
                    c.wbuf.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    return self.lost(key, 1006);
                }
            }
        }
        c.wbuf = Vec::new();
    }

    fn queue_frame(&mut self, key: usize, opcode: u8, payload: &[u8]) {
        let mask = (self.rng.next() as u32).to_ne_bytes();
        let c = &mut self.conns[key];
        testkit::put_frame(&mut c.wbuf, 0x80 | opcode, payload, Some(mask));
    }

    fn on_readable(&mut self, key: usize, drain: bool) {
        loop {
            let c = &mut self.conns[key];
            match c.stream.read(&mut self.scratch) {
                Ok(0) => return self.on_eof(key),
                Ok(n) => {
                    c.rbuf.extend_from_slice(&self.scratch[..n]);
                    self.process(key);
                    if !self.conns.contains(key) {
                        return;
                    }
                    if n < self.scratch.len() && !drain {
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::InvalidData && c.st != St::Open => {
                    // TLS refused (a certificate, say): say why instead of "closed".
                    let (id, attempt) = (c.id, c.attempt);
                    self.drop_conn(key);
                    let msg = format!("TLS: {e} (--ca-file, or --insecure for test certificates)");
                    return self.fail(id, attempt, ErrKind::Other, &msg, now_ns());
                }
                Err(_) => return self.on_eof(key),
            }
        }
        let c = &mut self.conns[key];
        if c.rbuf.is_empty() {
            c.rbuf = Vec::new();
        }
        if !c.wbuf.is_empty() {
            self.flush(key);
        }
    }

    fn on_eof(&mut self, key: usize) {
        let c = &self.conns[key];
        if self.job.scenario == Scenario::Tcp && c.st == St::Open {
            return self.lost(key, 1006);
        }
        match c.st {
            St::Closing => self.drop_conn(key),
            St::Open => self.lost(key, 1006),
            St::Connecting | St::Handshake => {
                let (id, attempt) = (c.id, c.attempt);
                self.drop_conn(key);
                self.fail(
                    id,
                    attempt,
                    ErrKind::Other,
                    "connection closed during the upgrade",
                    now_ns(),
                );
            }
        }
    }

    /// Counts a close the loadgen did not ask for (1006: no close frame).
    fn count_unexpected(&self, code: u16) {
        *self
            .stats()
            .unexpected_closes
            .lock()
            .unwrap()
            .entry(code)
            .or_insert(0) += 1;
    }

    /// The server ended a connection we did not close: count the code.
    fn lost(&mut self, key: usize, code: u16) {
        let c = &self.conns[key];
        if c.st == St::Closing {
            return self.drop_conn(key);
        }
        self.count_unexpected(code);
        self.drop_conn(key);
    }

    fn process(&mut self, key: usize) {
        if self.job.scenario == Scenario::Tcp {
            self.conns[key].rbuf.clear();
            return;
        }
        if self.conns[key].st == St::Handshake {
            let c = &mut self.conns[key];
            let (status, accepted, head_len, retry_after_s) =
                match testkit::parse_response_head(&c.rbuf) {
                    Ok(None) => return,
                    Ok(Some(h)) => (
                        h.status,
                        h.header("sec-websocket-accept") == Some(ACCEPT),
                        h.head_len,
                        h.header("retry-after")
                            .and_then(|v| v.trim().parse::<u64>().ok()),
                    ),
                    Err(_) => (0, false, c.rbuf.len(), None),
                };
            let first_line = String::from_utf8_lossy(&c.rbuf[..head_len])
                .lines()
                .next()
                .unwrap_or("")
                .to_owned();
            c.rbuf.drain(..head_len);
            if status != 101 || !accepted {
                let (id, attempt) = (c.id, c.attempt);
                self.drop_conn(key);
                let msg = format!("handshake rejected with status {status}: {first_line}");
                let wait_ns = retry_after_s.map_or(0, |s| s * 1_000_000_000);
                let kind = if wait_ns > 0 {
                    ErrKind::Busy
                } else {
                    ErrKind::Rejected
                };
                return self.fail_after(id, attempt, kind, &msg, now_ns(), wait_ns);
            }
            let ready = self.job.ready_at_101();
            self.mark_open(key, ready);
        }
        loop {
            // Handling a frame may have dropped the connection (a failed write).
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            let Ok(Some((h, hl))) = frame::parse_header(&c.rbuf) else {
                return;
            };
            let total = hl + h.payload_len as usize;
            if c.rbuf.len() < total {
                return;
            }
            let mut payload: Vec<u8> = c.rbuf[hl..total].to_vec();
            c.rbuf.drain(..total);
            if h.rsv & 0b100 != 0 {
                // permessage-deflate (single-frame messages: the server does not fragment).
                let d = self
                    .inflater
                    .get_or_insert_with(switchboard::ws::deflate::inflater);
                d.reset(false);
                match switchboard::ws::deflate::inflate(d, &payload, 64 << 20) {
                    Ok(p) => payload = p,
                    Err(_) => return self.lost(key, 1007),
                }
            }
            match h.opcode {
                OpCode::Control(Control::Ping) => {
                    self.queue_frame(key, 0xA, &payload);
                }
                OpCode::Control(Control::Close) => {
                    let code = if payload.len() >= 2 {
                        u16::from_be_bytes([payload[0], payload[1]])
                    } else {
                        1005
                    };
                    let busy = code == 1013 && self.conns[key].st != St::Closing;
                    // Taken first: the flush below drops the connection if the peer is gone.
                    let (id, attempt) = (self.conns[key].id, self.conns[key].attempt);
                    if self.conns[key].st != St::Closing {
                        self.count_unexpected(code);
                        self.queue_frame(key, 0x8, &code.to_be_bytes());
                        self.flush(key);
                    }
                    if self.conns.contains(key) {
                        self.drop_conn(key);
                    }
                    let reason = String::from_utf8_lossy(payload.get(2..).unwrap_or(&[]));
                    let wait_ms: Option<u64> = reason
                        .split("retry_after_ms=")
                        .nth(1)
                        .and_then(|v| v.parse().ok());
                    if let (true, Some(ms)) = (busy, wait_ms) {
                        // A busy server's refusal after the upgrade: not an established
                        // connection after all; retry when it says.
                        let st = &self.shared.stats[self.index];
                        st.established.fetch_sub(1, Relaxed);
                        if self.job.ready_at_101() {
                            st.ready.fetch_sub(1, Relaxed);
                        }
                        let msg = format!("closed 1013: {reason}");
                        let wait_ns = ms.max(1) * 1_000_000;
                        self.fail_after(id, attempt, ErrKind::Busy, &msg, now_ns(), wait_ns);
                    }
                    return;
                }
                OpCode::Data(Data::Text) | OpCode::Data(Data::Binary) => {
                    self.on_message(key, &payload)
                }
                _ => {}
            }
        }
    }

    fn on_message(&mut self, key: usize, payload: &[u8]) {
        let now = now_ns();
        match self.job.scenario {
            Scenario::Connect if self.shared.phase.load(Relaxed) >= phase::RUN => {
                // A held connection takes what the server sends it once all are open (a
                // broadcast; not a welcome): counted and timed.
                let st = self.stats();
                st.received.fetch_add(1, Relaxed);
                let _ = st
                    .first_message_ns
                    .compare_exchange(0, now, Relaxed, Relaxed);
                st.last_message_ns.fetch_max(now, Relaxed);
            }
            Scenario::Connect | Scenario::Storm | Scenario::Tcp => {}
            Scenario::Flood => {
                self.stats().received.fetch_add(1, Relaxed);
                if !self.job.write_combined && self.shared.phase.load(Relaxed) == phase::RUN {
                    self.flood_one(key);
                }
            }
            Scenario::Echo => {
                if let Some(t) = parse_echo(payload) {
                    self.record(latency_us(t, now));
                    self.stats().received.fetch_add(1, Relaxed);
                }
            }
            Scenario::Dm | Scenario::Fanout => {
                let Ok(m) = serde_json::from_slice::<Incoming>(payload) else {
                    return;
                };
                match m.op {
                    "welcome" => {
                        if let (true, Some(pos)) = (self.job.resume_every_ns > 0, &m.inbox) {
                            let id = self.conns[key].id;
                            self.positions
                                .entry(id)
                                .or_insert_with(|| (pos.epoch.to_owned(), pos.offset));
                        }
                        let c = &self.conns[key];
                        if self.job.scenario == Scenario::Fanout
                            && (c.id as usize) < self.job.connections
                        {
                            let sub = format!(
                                r#"{{"op":"sub","channel":"lg-{}","id":1}}"#,
                                c.id as usize % self.job.channels.max(1)
                            );
                            self.queue_frame(key, 0x1, sub.as_bytes());
                        } else {
                            self.stats().ready.fetch_add(1, Relaxed);
                        }
                    }
                    "ack" if self.job.scenario == Scenario::Fanout && m.id == Some(1) => {
                        self.stats().ready.fetch_add(1, Relaxed);
                    }
                    "ack" => {
                        if let Some(t) = m.id {
                            if self.tracks_acks() {
                                let cid = self.conns[key].id;
                                let Some(q) = self.unacked.get_mut(&cid) else {
                                    return;
                                };
                                let Some(i) = q.iter().position(|(id, _)| *id == t) else {
                                    return; // the ack of a retry of an acked send
                                };
                                q.remove(i);
                            }
                            self.ack_hist.saturating_record(latency_us(t, now));
                            self.stats().acked.fetch_add(1, Relaxed);
                        }
                    }
                    "error" => {
                        self.stats().op_errors.fetch_add(1, Relaxed);
                        let code = m.code.unwrap_or("");
                        let slot = OP_ERROR_CODES
                            .iter()
                            .position(|c| *c == code)
                            .unwrap_or(OP_ERROR_CODES.len());
                        self.stats().op_error_codes[slot].fetch_add(1, Relaxed);
                    }
                    "msg" => {
                        if self.job.resume_every_ns > 0 {
                            if let (Some(e), Some(o)) = (m.epoch, m.offset) {
                                let id = self.conns[key].id;
                                let seen = self
                                    .positions
                                    .get(&id)
                                    .is_some_and(|(pe, po)| pe == e && o <= *po);
                                if seen {
                                    self.stats().redelivered.fetch_add(1, Relaxed);
                                    return;
                                }
                                self.positions.insert(id, (e.to_owned(), o));
                            }
                            // A resumed inbox holds our own sends too: not ours to count.
                            let me = format!("{}{}", self.job.user_prefix, self.conns[key].id);
                            if m.to.is_some_and(|t| t != me) {
                                return;
                            }
                        }
                        let Some(d) = m.data else { return };
                        self.record(latency_us(d.t, now));
                        self.stats().received.fetch_add(1, Relaxed);
                        if let (Scenario::Fanout, 1, Some(o)) =
                            (self.job.scenario, self.job.qos, m.offset)
                        {
                            // One channel per subscriber: offsets must grow by one.
                            let c = &mut self.conns[key];
                            let next = c.recv_next as u64;
                            if next == 0 || o == next {
                                c.recv_next = (o + 1) as u32;
                            } else if o > next {
                                self.shared.stats[self.index]
                                    .gaps
                                    .fetch_add(o - next, Relaxed);
                                c.recv_next = (o + 1) as u32;
                            } else {
                                self.shared.stats[self.index]
                                    .duplicates
                                    .fetch_add(1, Relaxed);
                            }
                        }
                        if self.job.scenario == Scenario::Dm {
                            let c = &mut self.conns[key];
                            if d.s == c.recv_next {
                                c.recv_next += 1;
                            } else if d.s > c.recv_next {
                                self.shared.stats[self.index]
                                    .gaps
                                    .fetch_add((d.s - c.recv_next) as u64, Relaxed);
                                c.recv_next = d.s + 1;
                            } else {
                                self.shared.stats[self.index]
                                    .duplicates
                                    .fetch_add(1, Relaxed);
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    fn record(&mut self, us: u64) {
        self.latency_hist.saturating_record(us);
        self.interval_hist.saturating_record(us);
    }

    fn start_sending(&mut self) {
        if self.sending_started {
            return;
        }
        self.sending_started = true;
        if self.job.scenario == Scenario::Flood {
            let keys: Vec<usize> = self
                .conns
                .iter()
                .filter(|(_, c)| c.st == St::Open)
                .map(|(k, _)| k)
                .collect();
            for key in keys {
                if self.job.write_combined {
                    self.flood_fill(key);
                    continue;
                }
                for _ in 0..self.job.window {
                    self.flood_one(key);
                }
                self.flush(key);
            }
            return;
        }
        let senders = self.job.senders();
        if senders == 0 {
            return;
        }
        let start = self.shared.run_start_ns.load(Relaxed);
        let keys: Vec<(usize, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.st == St::Open)
            .map(|(k, c)| (k, c.id))
            .collect();
        for (key, id) in keys {
            let sender_index = match self.job.scenario {
                Scenario::Echo => id as usize,
                Scenario::Dm if (id as usize) < senders => id as usize,
                Scenario::Fanout if id as usize >= self.job.connections => {
                    id as usize - self.job.connections
                }
                _ => continue,
            };
            let s = Schedule::new(start, self.job.rate, sender_index, senders);
            self.sends.push(Reverse((s.next_time(), key)));
            if self.schedules.len() <= key {
                self.schedules.resize(key + 1, s);
            }
            self.schedules[key] = s;
        }
    }

    /// Write-combined flood: writes whole blocks of frames while the socket takes them (at
    /// most [`FLOOD_BLOCKS_PER_TURN`] a call, so one connection does not hold the turn; the
    /// next echo read or writable edge calls again). A block the socket took in part is
    /// finished from `wbuf` first.
    fn flood_fill(&mut self, key: usize) {
        if !self.job.write_combined
            || self.shared.phase.load(Relaxed) != phase::RUN
            || self.conns.get(key).is_none_or(|c| c.st != St::Open)
        {
            return;
        }
        self.flush(key);
        let per_block = self.flood_block_frames;
        for _ in 0..FLOOD_BLOCKS_PER_TURN {
            let Some(c) = self.conns.get_mut(key) else {
                return;
            };
            if !c.wbuf.is_empty() {
                return;
            }
            match c.stream.write(&self.flood_block) {
                Ok(n) => {
                    if n < self.flood_block.len() {
                        c.wbuf.extend_from_slice(&self.flood_block[n..]);
                    }
                    let st = self.stats();
                    st.sent.fetch_add(per_block, Relaxed);
                    st.expected.fetch_add(per_block, Relaxed);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.lost(key, 1006),
            }
        }
    }

    /// Queues one flood message (written with the others of this turn by `flush`).
    fn flood_one(&mut self, key: usize) {
        let payload = std::mem::take(&mut self.flood_payload);
        self.queue_frame(key, 0x1, &payload);
        self.flood_payload = payload;
        let st = self.stats();
        st.sent.fetch_add(1, Relaxed);
        st.expected.fetch_add(1, Relaxed);
    }

    /// Whether qos-1 sends are kept until acknowledged (and sent again after a drop).
    fn tracks_acks(&self) -> bool {
        self.job.scenario == Scenario::Dm && self.job.qos == 1 && self.job.resume_every_ns > 0
    }

    fn send_due(&mut self, now: u64) {
        for _ in 0..SENDS_PER_TURN {
            let Some(&Reverse((t, key))) = self.sends.peek() else {
                return;
            };
            if t > now {
                return;
            }
            self.sends.pop();
            let Some(c) = self.conns.get(key) else {
                continue;
            };
            if c.st != St::Open {
                continue;
            }
            let Some(scheduled) = self.schedules[key].take_due(now) else {
                continue;
            };
            // Lateness is taken as the send starts: the write itself (on loopback it runs
            // the receiver's softirq inline) is part of the round trip, not of the timer.
            self.lateness_hist
                .saturating_record(latency_us(scheduled, now_ns()));
            self.send_one(key, scheduled);
            if self.conns.contains(key) {
                let next = self.schedules[key].next_time();
                self.sends.push(Reverse((next, key)));
            }
        }
    }

    fn send_one(&mut self, key: usize, scheduled: u64) {
        let c = &mut self.conns[key];
        let seq = c.send_seq;
        c.send_seq += 1;
        let id = c.id as usize;
        let job = self.job.clone();
        let msg = match job.scenario {
            Scenario::Echo => {
                let mut s = format!("t={scheduled};s={seq};");
                while s.len() < job.size {
                    s.push('x');
                }
                s
            }
            Scenario::Dm if job.qos == 1 => format!(
                r#"{{"op":"send","to":"{}{}","data":{{"t":{scheduled},"s":{seq}}},"qos":1,"id":{scheduled}}}"#,
                job.user_prefix,
                id ^ 1
            ),
            // Every op carries an id: refusals (`user_offline`, `overloaded`) come back and
            // are counted by code.
            Scenario::Dm => format!(
                r#"{{"op":"send","to":"{}{}","data":{{"t":{scheduled},"s":{seq}}},"id":{scheduled}}}"#,
                job.user_prefix,
                id ^ 1
            ),
            Scenario::Fanout => {
                let p = id - job.connections;
                let channel = (p + seq as usize * job.publishers) % job.channels.max(1);
                self.stats()
                    .expected
                    .fetch_add(job.subscribers_of(channel), Relaxed);
                let m = format!(
                    r#"{{"op":"pub","channel":"lg-{channel}","data":{{"t":{scheduled},"s":{seq}}},"id":{scheduled}}}"#
                );
                if job.size > m.len() + 8 {
                    // Padding in the data (what subscribers get) that compresses like chat
                    // text, not like a run of one byte.
                    let pad = text_padding(&mut self.rng, job.size - m.len() - 8);
                    format!(
                        r#"{{"op":"pub","channel":"lg-{channel}","data":{{"t":{scheduled},"s":{seq},"p":"{pad}"}},"id":{scheduled}}}"#
                    )
                } else {
                    m
                }
            }
            Scenario::Connect | Scenario::Storm | Scenario::Tcp | Scenario::Flood => return,
        };
        if job.scenario != Scenario::Fanout {
            self.stats().expected.fetch_add(1, Relaxed);
        }
        if self.tracks_acks() {
            let cid = self.conns[key].id;
            let frame: Box<[u8]> = msg.as_bytes().into();
            self.unacked
                .entry(cid)
                .or_default()
                .push_back((scheduled, frame));
        }
        self.stats().sent.fetch_add(1, Relaxed);
        self.queue_frame(key, 0x1, msg.as_bytes());
        self.flush(key);
    }

    fn storm(&mut self, now: u64) {
        self.stormed = true;
        let pct = self.job.drop_percent as u64;
        let victims: Vec<(usize, u32)> = self
            .conns
            .iter()
            .filter(|(_, c)| c.st == St::Open && (c.id as u64 * 2_654_435_761 % 100) < pct)
            .map(|(k, c)| (k, c.id))
            .collect();
        for (key, id) in victims {
            // Abrupt: no close frame, like a client losing its network.
            let _ = socket2::SockRef::from(self.conns[key].stream.tcp())
                .set_linger(Some(Duration::ZERO));
            self.drop_conn(key);
            self.stats().dropped.fetch_add(1, Relaxed);
            if self.job.resume_every_ns > 0 {
                self.dropped_at.insert(id, now);
            }
            let delay = self.backoff_ns(0);
            self.reconnects.push(Reverse((now + delay, id, 0)));
        }
    }

    fn close_all(&mut self, now: u64) {
        self.closing_since = Some(now);
        self.reconnects.clear();
        self.to_open.clear();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            match self.conns[key].st {
                St::Open if self.job.scenario == Scenario::Tcp => self.drop_conn(key),
                St::Open => {
                    self.queue_frame(key, 0x8, &1000u16.to_be_bytes());
                    self.conns[key].st = St::Closing;
                    self.flush(key);
                }
                St::Connecting | St::Handshake => self.drop_conn(key),
                St::Closing => {}
            }
        }
    }
}

/// Reconnect backoff ceiling: 100 ms × 2^attempt, capped at 5 s.
pub fn backoff_ceiling_ns(attempt: u8) -> u64 {
    const BASE_NS: u64 = 100_000_000;
    const CAP_NS: u64 = 5_000_000_000;
    CAP_NS.min(BASE_NS << attempt.min(16))
}

fn parse_echo(p: &[u8]) -> Option<u64> {
    let s = std::str::from_utf8(p).ok()?;
    let t = s.strip_prefix("t=")?;
    t[..t.find(';')?].parse().ok()
}

/// `len` bytes of words drawn from a small vocabulary: JSON-safe text that compresses about
/// as chat messages do.
fn text_padding(rng: &mut Rng, len: usize) -> String {
    const WORDS: [&str; 32] = [
        "the", "message", "channel", "hello", "meeting", "tomorrow", "see", "you", "at", "noon",
        "thanks", "for", "update", "please", "review", "this", "document", "before", "friday",
        "deploy", "server", "latency", "is", "fine", "now", "and", "then", "we", "ship", "it",
        "ok", "great",
    ];
    let mut s = String::with_capacity(len + 16);
    while s.len() < len {
        s.push_str(WORDS[(rng.next() % 32) as usize]);
        s.push(' ');
        if rng.next().is_multiple_of(8) {
            s.push_str(&(rng.next() % 1000).to_string());
            s.push(' ');
        }
    }
    s.truncate(len);
    s
}

/// Non-blocking connect, bound to `source` first (with IP_BIND_ADDRESS_NO_PORT so the port is
/// chosen at connect time per destination, not reserved per source).
fn connect(addr: SocketAddr, source: Option<IpAddr>) -> io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_nonblocking(true)?;
    socket.set_tcp_nodelay(true)?;
    if let Some(ip) = source {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a valid fd and a c_int option value.
        unsafe {
            libc::setsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                &one as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
        socket.bind(&SocketAddr::new(ip, 0).into())?;
    }
    match socket.connect(&addr.into()) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e),
    }
    Ok(TcpStream::from_std(socket.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echo_payload_round_trip() {
        assert_eq!(parse_echo(b"t=12345;s=7;xxxx"), Some(12345));
        assert_eq!(parse_echo(b"garbage"), None);
    }

    #[test]
    fn subscribers_per_channel_add_up() {
        let job = Job {
            scenario: Scenario::Fanout,
            targets: vec![],
            sources: None,
            connections: 10,
            publishers: 1,
            channels: 3,
            threads: 1,
            connect_rate: 1.0,
            max_inflight: 1,
            rate: 1.0,
            size: 1,
            drop_percent: 0,
            user_prefix: "u".into(),
            sched_batch: false,
            qos: 0,
            resume_every_ns: 0,
            window: 1,
            write_combined: false,
            tls: None,
            deflate: false,
            spin_ns: 50_000,
        };
        assert_eq!((0..3).map(|c| job.subscribers_of(c)).sum::<u64>(), 10);
        assert_eq!(job.subscribers_of(0), 4);
    }

    #[test]
    fn backoff_grows_to_the_cap_with_jitter() {
        assert_eq!(backoff_ceiling_ns(0), 100_000_000);
        assert_eq!(backoff_ceiling_ns(3), 800_000_000);
        assert_eq!(backoff_ceiling_ns(6), 5_000_000_000);
        assert_eq!(backoff_ceiling_ns(60), 5_000_000_000);
        let mut rng = Rng(42);
        let draws: Vec<u64> = (0..200)
            .map(|_| rng.next() % backoff_ceiling_ns(6))
            .collect();
        assert!(draws.iter().all(|&d| d < 5_000_000_000));
        assert!(
            draws.iter().any(|&d| d < 1_000_000_000) && draws.iter().any(|&d| d > 4_000_000_000),
            "spread"
        );
    }
}
