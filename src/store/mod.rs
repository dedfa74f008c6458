//! Streams that survive: every named user's inbox (qos-1 DMs to or from them), with offsets,
//! an epoch, retention, a dedup window and confirmed positions.
//!
//! One store thread owns the streams. Shards send it requests over a bounded channel
//! ([`StoreHandle`]); it takes every request waiting, applies them, commits them in one batch
//! (one fsync for a durable backend: group commit), and only then answers through the shard
//! mailboxes — so nobody ever sees a message that a crash then erases. A message for a user
//! goes to the user's home shard, which forwards it to the shards holding the user's
//! connections: one path per stream, so offsets arrive in order.

pub mod backend;
pub mod lineage;
pub mod receipts;
pub mod redb_log;
pub mod redis_streams;
pub mod streams;

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::queue::{self, RecvTimeoutError, TrySendError};
use bytes::{BufMut, Bytes, BytesMut};
use tracing::{debug, error, info, warn};

pub use backend::{Backend, Batch, Entry, Memory, StoreError};
pub use redb_log::Redb;
pub use streams::{DedupKey, Epoch, Retention, StreamMeta, Streams, Unrecoverable};

use crate::ids::{home_of, ConnId, ReplyTo};
use crate::metrics::StoreMetrics;

/// Requests waiting for the store thread, at most.
pub const STORE_QUEUE: usize = 65_536;
/// Requests applied in one commit, at most.
const BATCH_MAX: usize = 4_096;
/// How long the store keeps retrying a full mailbox.
const POST_PATIENCE: Duration = Duration::from_secs(10);
/// Messages of one replay page (the default of [`StoreConfig::page_items`]).
pub const PAGE_ITEMS: usize = 256;
/// Bytes of one replay page, about (a page holds at least one message).
pub const PAGE_BYTES: usize = 256 * 1024;

/// The inbox stream of `user`.
pub fn inbox_stream(user: &str) -> String {
    format!("inbox:{user}")
}

/// The stream of a channel with history.
pub fn channel_stream(channel: &str) -> String {
    format!("channel:{channel}")
}

/// A stream's name in its events: `inbox` for every inbox (each reader sees their own),
/// the full name for a channel's.
pub fn wire_name(stream: &str) -> &str {
    if stream.starts_with("inbox:") {
        "inbox"
    } else {
        stream
    }
}

/// Which stream: a user's inbox or a channel's.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum StreamRef {
    /// `inbox:<user>`.
    Inbox(Arc<str>),
    /// `channel:<name>`.
    Channel(Arc<str>),
}

impl StreamRef {
    /// The stream's name in the store and the API.
    pub fn name(&self) -> String {
        match self {
            StreamRef::Inbox(u) => inbox_stream(u),
            StreamRef::Channel(c) => channel_stream(c),
        }
    }
}

/// Where a resuming connection says it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Since {
    /// The last offset it has, in `epoch` (none: any epoch).
    Position {
        /// Epoch of the position.
        epoch: Option<Epoch>,
        /// Last offset received.
        offset: u64,
    },
    /// The user's confirmed position.
    Confirmed,
}

impl Since {
    /// Parses `?since=<epoch>:<offset>` or `?since=confirmed`.
    pub fn parse(s: &str) -> Option<Since> {
        if s == "confirmed" {
            return Some(Since::Confirmed);
        }
        let (e, o) = s.split_once(':')?;
        Some(Since::Position {
            epoch: if e.is_empty() { None } else { e.parse().ok() },
            offset: o.parse().ok()?,
        })
    }
}

/// Where a catch-up (`StoreReq::CatchUp`) reads from: `from` when the stream is still in the
/// epoch the shard knows; in an epoch that continues it (`continues`: Redis went back in time
/// and the stream moved on, sharing offsets up to `shared` with the old epoch), `from` or the
/// first offset past the shared ones, whichever is lower (what the shard had past them was
/// lost, and the new epoch's offsets there are new messages); else the first offset of the
/// stream's current epoch.
pub(crate) fn catch_up_from(
    known: Epoch,
    current: Epoch,
    from: u64,
    continues: Option<(Epoch, u64)>,
) -> u64 {
    match continues {
        _ if known == current => from,
        Some((e, shared)) if e == known => from.min(shared.saturating_add(1)),
        _ => 1,
    }
}

/// Work for the store thread.
#[derive(Debug)]
pub enum StoreReq {
    /// A qos-1 DM: store it in the recipient's inbox and the sender's, deliver, acknowledge.
    SendDm {
        /// Sender (a named user).
        from: Arc<str>,
        /// Recipient.
        to: Arc<str>,
        /// The event without its closing brace: `{"op":"msg",…,"ts":N`.
        prefix: Bytes,
        /// Client id (raw JSON) for the dedup window, if given.
        id: Option<Box<str>>,
        /// Whom to acknowledge.
        reply: Option<ReplyTo>,
        /// The sending connection (its own copy is not delivered to it).
        sender: Option<ConnId>,
        /// Also store it in the sender's inbox (a user's send; not a backend's push).
        sender_copy: bool,
    },
    /// A named connection opened (after its home shard recorded it): the inbox position for
    /// its welcome, and the first replay page when it resumes.
    Open {
        /// The user.
        user: Arc<str>,
        /// The connection.
        conn: ConnId,
        /// Resume from here.
        since: Option<Since>,
    },
    /// The next replay page of `stream` from offset `from`, a position in `epoch`.
    Page {
        /// The stream.
        stream: StreamRef,
        /// The connection.
        conn: ConnId,
        /// The epoch the replay reads (the welcome's).
        epoch: Epoch,
        /// First offset to read.
        from: u64,
    },
    /// A publication to a channel with history: store it, then every shard delivers it.
    Publish {
        /// The channel.
        channel: Arc<str>,
        /// Its retention (from the channel rule).
        retention: Retention,
        /// The event without its closing brace.
        prefix: Bytes,
        /// Client id (raw JSON) for the dedup window.
        id: Option<Box<str>>,
        /// Whose ids the dedup window keys on (the publisher).
        publisher: Arc<str>,
        /// Whom to acknowledge.
        reply: Option<ReplyTo>,
    },
    /// `sub` with `since` on a channel with history: the position and the first page.
    OpenChannel {
        /// The channel.
        channel: Arc<str>,
        /// The connection.
        conn: ConnId,
        /// Resume from here.
        since: Since,
        /// The `sub` request's id (raw JSON).
        id: Option<Box<str>>,
    },
    /// A page of a stream's history for a client (`history` op) or the push API.
    History {
        /// The user whose inbox it is.
        user: Arc<str>,
        /// First offset wanted.
        from: u64,
        /// Most messages.
        limit: usize,
        /// Who asked.
        conn: ConnId,
        /// The request's id (raw JSON), for a WebSocket answer.
        id: Option<Box<str>>,
    },
    /// `GET /api/users/<id>`: how many messages of the inbox are past the confirmed position.
    Unread {
        /// The user.
        user: Arc<str>,
        /// The waiting HTTP connection.
        conn: ConnId,
        /// Open connections counted by the shards (passed through).
        connections: u64,
    },
    /// A client confirmed its inbox up to `offset`.
    Confirm {
        /// The user.
        user: Arc<str>,
        /// Confirmed offset.
        offset: u64,
    },
    /// A shard missed part of a stream (an offset skipped, or the broker subscription was
    /// restored): the entries from `from` in `epoch`, or from the first of the current epoch
    /// when the stream moved to another (a Redis that lost it).
    CatchUp {
        /// The inbox or channel.
        stream: StreamRef,
        /// The shard that asks.
        shard: u16,
        /// The epoch the shard knows.
        epoch: Epoch,
        /// First offset wanted in that epoch.
        from: u64,
    },
    /// Stop after committing what is queued.
    Shutdown,
}

/// What the store tells a shard (through its mailbox).
#[derive(Debug)]
pub enum StoreMsg {
    /// To the home shard of `user`: a stored message of the user's inbox. Deliver it to the
    /// user's connections (but `exclude`) and, with `ack`, acknowledge the sender: `queued`
    /// when nobody of the user is online.
    Deliver {
        /// The inbox's user.
        user: Arc<str>,
        /// The event.
        payload: Bytes,
        /// Its offset.
        offset: u64,
        /// The sending connection.
        exclude: Option<ConnId>,
        /// Whom to acknowledge, with the offset and epoch the ack carries.
        ack: Option<(ReplyTo, u64, Epoch)>,
    },
    /// To the sender's shard: a qos-1 send (or a publication) is stored.
    Ack {
        /// Whom.
        reply: ReplyTo,
        /// The channel of a stored publication (`None`: the sender's inbox).
        channel: Option<Arc<str>>,
        /// Offset in the sender's inbox.
        offset: u64,
        /// The store's epoch.
        epoch: Epoch,
        /// Whether the recipient had no connection; `None` for a retry answered from the
        /// dedup window.
        queued: Option<bool>,
    },
    /// To the sender's shard: not stored, and why.
    Refused {
        /// Whom.
        reply: ReplyTo,
        /// Why.
        why: Refusal,
        /// A channel publication (else a DM).
        publish: bool,
    },
    /// To a connection's shard: its inbox position and first replay page.
    Opened(Box<Opened>),
    /// To a connection's shard: a history page it asked for.
    History(Box<History>),
    /// To an HTTP connection's shard: the unread count of a user.
    Unread {
        /// The waiting connection.
        conn: ConnId,
        /// Open connections (as asked).
        connections: u64,
        /// Messages after the confirmed position.
        unread: u64,
    },
    /// To a shard that asked to catch up on a stream: a page of it, in `epoch` (the stream's
    /// current one; `next` 0: the store could not read).
    CaughtUp {
        /// The inbox or channel.
        stream: StreamRef,
        /// The stream's epoch.
        epoch: Epoch,
        /// When `epoch` is not the one asked for: the last offset the two share (0: none,
        /// the stream's history was lost and its offsets started again).
        shared: u64,
        /// Entries from where the shard asked (or from the epoch's first).
        page: Page,
        /// Entries sent by a connection of this node: not delivered to it (as live).
        excludes: Vec<(u64, ConnId)>,
    },
    /// To a connection's shard: the next replay page.
    Page {
        /// The connection.
        conn: ConnId,
        /// Of which stream.
        stream: StreamRef,
        /// The stream is in an epoch that does not hold the replay's position (its history
        /// was lost): the page is empty and the connection is to resume.
        gone: bool,
        /// The page.
        page: Page,
    },
    /// To every shard: a stored publication for the local subscribers of `channel`.
    ChannelDeliver {
        /// The channel.
        channel: Arc<str>,
        /// The event.
        payload: Bytes,
        /// Its offset in the channel's stream.
        offset: u64,
    },
    /// To a connection's shard: the answer to `sub` with `since`.
    ChannelOpened(Box<ChannelOpened>),
}

/// Why a message was not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The store is over `--store-max-bytes` (`store_full`).
    Full,
    /// The commit failed; a retry may succeed (`overloaded`).
    Failed,
    /// The store (Redis) is unreachable (`unavailable`).
    Unavailable,
}

/// Posts store messages (in order) to shard `i`; gives them back when that mailbox is full.
pub type Sink = Box<dyn Fn(u16, Vec<StoreMsg>) -> Result<(), Vec<StoreMsg>> + Send>;

/// What the store answers a connection that opened.
#[derive(Debug)]
pub struct Opened {
    /// The connection.
    pub conn: ConnId,
    /// The store's epoch.
    pub epoch: Epoch,
    /// The inbox's newest offset.
    pub top: u64,
    /// For a resume: whether everything after the position is replayed, and why not.
    pub resume: Option<Result<(), Unrecoverable>>,
    /// The first replay page (empty when nothing to replay).
    pub page: Page,
}

/// The store's answer to `sub` with `since`.
#[derive(Debug)]
pub struct ChannelOpened {
    /// The connection.
    pub conn: ConnId,
    /// The channel.
    pub channel: Arc<str>,
    /// The `sub` request's id.
    pub id: Option<Box<str>>,
    /// The store's epoch.
    pub epoch: Epoch,
    /// The channel stream's newest offset.
    pub top: u64,
    /// Whether everything after the position is replayed.
    pub resume: Result<(), Unrecoverable>,
    /// The first page.
    pub page: Page,
}

/// A page of a stream's history.
#[derive(Debug)]
pub struct History {
    /// Who asked.
    pub conn: ConnId,
    /// The request's id (raw JSON).
    pub id: Option<Box<str>>,
    /// The user whose inbox it is.
    pub user: Arc<str>,
    /// The store's epoch.
    pub epoch: Epoch,
    /// Oldest retained offset.
    pub first: u64,
    /// Newest offset.
    pub top: u64,
    /// Events in offset order.
    pub entries: Vec<(u64, Bytes)>,
    /// The offset to ask for next.
    pub next: u64,
}

/// Part of a replay.
#[derive(Debug, Default)]
pub struct Page {
    /// Events in offset order.
    pub entries: Vec<(u64, Bytes)>,
    /// The offset to ask for next.
    pub next: u64,
    /// The page reached the top of the stream (at the time it was read).
    pub done: bool,
}

/// The store's queue is full (or the store stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the store is busy")]
pub struct StoreBusy;

/// The shards' side of the store: a bounded queue to the store thread.
#[derive(Debug, Clone)]
pub struct StoreHandle {
    tx: queue::Tx<StoreReq>,
}

impl StoreHandle {
    /// A handle on a queue someone else drains (the store thread, or a test acting as it).
    pub fn new(tx: queue::Tx<StoreReq>) -> StoreHandle {
        StoreHandle { tx }
    }

    /// Queues a request; fails when the queue is full or the store stopped (the caller
    /// refuses the client's request with `overloaded`: never a silent loss).
    pub fn request(&self, req: StoreReq) -> Result<(), StoreBusy> {
        self.try_request(req).map_err(|_| StoreBusy)
    }

    /// [`request`](Self::request), giving the request back when it is refused (what a
    /// shard's `post_requests` takes).
    // The request goes back whole, as the channel gives it: boxing it would cost an
    // allocation per request for a refusal that is rare.
    #[allow(clippy::result_large_err)]
    pub fn try_request(&self, req: StoreReq) -> Result<(), StoreReq> {
        self.tx.try_send(req).map_err(|e| match e {
            TrySendError::Full(r) | TrySendError::Disconnected(r) => r,
        })
    }

    /// [`try_request`](Self::try_request) as the poster a shard's `post_requests` takes.
    #[allow(clippy::result_large_err)]
    pub fn poster(&self) -> impl FnMut(StoreReq) -> Result<(), StoreReq> + '_ {
        |req| self.try_request(req)
    }
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Inbox retention.
    pub inbox: Retention,
    /// Dedup window (ms).
    pub dedup_window_ms: u64,
    /// Total payload bytes kept before qos-1 sends are refused.
    pub max_bytes: u64,
    /// Shards that are users' homes ([`crate::config::Config::homes`]).
    pub homes: usize,
    /// Streams in Redis: replicas a stored message must reach before its ack (0: none).
    pub min_replicas: u32,
    /// How long an ack waits for them (ms).
    pub min_replicas_timeout_ms: u64,
    /// Messages of one replay page, at most ([`PAGE_ITEMS`]; the simulation takes fewer,
    /// so replays span pages).
    pub page_items: usize,
}

/// A running store thread.
pub struct Store {
    handle: StoreHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Store {
    /// Opens `backend` and starts the store thread, which answers `shards` shards through
    /// `sink`.
    pub fn start(
        backend: Box<dyn Backend>,
        cfg: StoreConfig,
        shards: usize,
        sink: Sink,
        metrics: Arc<StoreMetrics>,
    ) -> Result<Store, StoreError> {
        let mut worker = Worker::open(backend, cfg, shards, sink, metrics, unix_ms())?;
        let (tx, rx) = queue::bounded(STORE_QUEUE);
        let thread = std::thread::Builder::new()
            .name("store".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| StoreError::Redb(format!("cannot spawn the store thread: {e}")))?;
        Ok(Store {
            handle: StoreHandle { tx },
            thread: Some(thread),
        })
    }

    /// The handle shards use.
    pub fn handle(&self) -> StoreHandle {
        self.handle.clone()
    }

    /// Commits what is queued and stops the thread.
    pub fn stop(mut self) {
        let _ = self.handle.tx.send(StoreReq::Shutdown);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The bookkeeping of a store as loaded (a new epoch for a store that has none).
fn streams_from(loaded: backend::Loaded, now_ms: u64) -> Streams {
    let mut streams = Streams::new(loaded.epoch.unwrap_or_else(backend::new_epoch));
    for (s, m) in loaded.metas {
        streams.restore(s, m);
    }
    for (u, o) in loaded.confirmed {
        streams.restore_confirmed(u, o);
    }
    for (u, id, d) in loaded.dedups {
        streams.restore_dedup(&u, &id, d, now_ms);
    }
    streams
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Bytes of a trailer besides the stream name, at most.
const TRAILER_MAX: usize = 64;

/// Completes a stream event after its prefix: `,"stream":"<wire>","offset":N,"epoch":"<hex>"}`
/// (without `fmt`: this runs for every stored message).
pub fn put_trailer(out: &mut impl BufMut, wire: &str, offset: u64, epoch: Epoch) {
    out.put_slice(b",\"stream\":\"");
    out.put_slice(wire.as_bytes());
    out.put_slice(b"\",\"offset\":");
    out.put_slice(itoa::Buffer::new().format(offset).as_bytes());
    out.put_slice(b",\"epoch\":\"");
    let mut hex = [0u8; 16];
    let mut n = 0;
    let mut v = epoch.0;
    loop {
        hex[15 - n] = b"0123456789abcdef"[(v & 15) as usize];
        n += 1;
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    out.put_slice(&hex[16 - n..]);
    out.put_slice(b"\"}");
}

struct Worker {
    backend: Box<dyn Backend>,
    streams: Streams,
    cfg: StoreConfig,
    shards: usize,
    sink: Sink,
    metrics: Arc<StoreMetrics>,
    /// Answers of this batch, posted after the commit.
    out: Vec<(u16, StoreMsg)>,
    /// Where each stream's state is in the current batch's `metas`.
    meta_index: foldhash::HashMap<Arc<str>, usize>,
    /// Where a stream name is composed before it is looked up.
    name_buf: String,
    /// Retention of channel streams (inboxes use the configured one).
    retention: foldhash::HashMap<String, Retention>,
}

/// A store driven in the caller's thread: the store thread's worker, handed each batch by
/// the caller at the time it says (the simulation, which delays commits and crashes the
/// store at will).
pub struct InlineStore {
    worker: Worker,
}

impl InlineStore {
    /// Opens `backend` (what it holds is loaded, as at start-up); answers go to `sink`.
    pub fn open(
        backend: Box<dyn Backend>,
        cfg: StoreConfig,
        shards: usize,
        sink: Sink,
        now_ms: u64,
    ) -> Result<InlineStore, StoreError> {
        let metrics = Arc::new(StoreMetrics::default());
        let worker = Worker::open(backend, cfg, shards, sink, metrics, now_ms)?;
        Ok(InlineStore { worker })
    }

    /// Applies `reqs` as one batch at `now_ms`: one commit, then the answers.
    pub fn apply(&mut self, reqs: &mut Vec<StoreReq>, now_ms: u64) {
        self.worker.apply_at(reqs, now_ms);
    }

    /// The store's epoch.
    pub fn epoch(&self) -> Epoch {
        self.worker.streams.epoch
    }

    /// Every retained entry of `stream` (offset, payload), for audits.
    pub fn entries(&mut self, stream: &str) -> Vec<(u64, Bytes)> {
        let m = self.worker.streams.meta(stream);
        let n = m.next.saturating_sub(m.first) as usize;
        match self.worker.backend.read(stream, m.first, n, usize::MAX) {
            Ok(v) => v.into_iter().map(|e| (e.offset, e.payload)).collect(),
            Err(_) => Vec::new(),
        }
    }
}

impl Worker {
    /// Loads `backend` into a worker.
    fn open(
        mut backend: Box<dyn Backend>,
        cfg: StoreConfig,
        shards: usize,
        sink: Sink,
        metrics: Arc<StoreMetrics>,
        now_ms: u64,
    ) -> Result<Worker, StoreError> {
        let streams = streams_from(backend.load()?, now_ms);
        info!(
            epoch = %streams.epoch,
            durable = backend.durable(),
            streams = streams.streams().count(),
            bytes = streams.total_bytes,
            "store open"
        );
        StoreMetrics::set(&metrics.bytes, streams.total_bytes);
        StoreMetrics::set(&metrics.streams, streams.streams().count() as u64);
        Ok(Worker {
            backend,
            streams,
            cfg,
            shards,
            sink,
            metrics,
            out: Vec::new(),
            meta_index: Default::default(),
            name_buf: String::new(),
            retention: Default::default(),
        })
    }

    fn run(&mut self, rx: queue::Rx<StoreReq>) {
        let mut reqs = Vec::with_capacity(BATCH_MAX);
        loop {
            match next_batch(&rx, &mut reqs) {
                Waited::Closed => return,
                Waited::Idle => self.housekeeping(),
                Waited::Batch => {
                    if self.apply_at(&mut reqs, unix_ms()) {
                        debug!("store stopped");
                        return;
                    }
                }
            }
        }
    }

    /// Applies a batch at `now`: writes first (one commit), then reads, then every answer.
    fn apply_at(&mut self, reqs: &mut Vec<StoreReq>, now: u64) -> bool {
        self.meta_index.clear();
        let mut batch = Batch::default();
        let mut reads = Vec::new();
        let mut stop = false;
        let n = reqs.len();
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
                } => self.send_dm(
                    &mut batch,
                    now,
                    (from, to, sender_copy),
                    prefix,
                    id,
                    reply,
                    sender,
                ),
                StoreReq::Publish {
                    channel,
                    retention,
                    prefix,
                    id,
                    publisher,
                    reply,
                } => self.publish(
                    &mut batch,
                    now,
                    channel,
                    retention,
                    prefix,
                    (id, publisher),
                    reply,
                ),
                StoreReq::Confirm { user, offset } => {
                    let stream = inbox_stream(&user);
                    let before = self.streams.confirmed(&user);
                    if self.streams.confirm(&user, &stream, offset) {
                        let o = self.streams.confirmed(&user);
                        self.receipts(&mut batch, now, &user, &stream, (before, o));
                        batch.confirms.push((user, o));
                    }
                }
                StoreReq::Shutdown => stop = true,
                read => reads.push(read),
            }
        }
        if !batch.is_empty() {
            let t = Instant::now();
            if let Err(e) = self.backend.commit(&batch) {
                error!(error = %e, "store commit failed; the batch is refused");
                self.refuse_batch(now);
                self.post_all();
                return stop;
            }
            let us = t.elapsed().as_micros() as u64;
            self.metrics
                .commit(us, batch.appends.len() as u64, n as u64);
            StoreMetrics::set(&self.metrics.bytes, self.streams.total_bytes);
            StoreMetrics::set(&self.metrics.streams, self.streams.streams().count() as u64);
        }
        for r in reads {
            self.read(r);
        }
        self.post_all();
        stop
    }

    /// A commit failed: nothing of the batch was stored. The bookkeeping goes back to what the
    /// file holds, nothing is delivered, and every sender of the batch is told (so a retry
    /// with the same id is stored, not answered from a dedup entry that was never written).
    fn refuse_batch(&mut self, now: u64) {
        if self.backend.durable() {
            match self.backend.load() {
                Ok(loaded) => self.streams = streams_from(loaded, now),
                Err(e) => error!(error = %e, "store: cannot reload after a failed commit"),
            }
        }
        let out = std::mem::take(&mut self.out);
        for (shard, msg) in out {
            match msg {
                StoreMsg::Deliver {
                    ack: Some((reply, _, _)),
                    ..
                } => {
                    let shard = reply.conn.shard;
                    let msg = StoreMsg::Refused {
                        reply,
                        why: Refusal::Failed,
                        publish: false,
                    };
                    self.out.push((shard, msg));
                }
                StoreMsg::Ack {
                    reply,
                    channel,
                    queued: Some(_),
                    ..
                } => {
                    let msg = StoreMsg::Refused {
                        reply,
                        why: Refusal::Failed,
                        publish: channel.is_some(),
                    };
                    self.out.push((shard, msg));
                }
                StoreMsg::Deliver { .. } | StoreMsg::ChannelDeliver { .. } => {}
                // Answers about earlier commits (dedup hits) and refusals stand.
                other => self.out.push((shard, other)),
            }
        }
    }

    /// `user` confirmed its inbox from `confirmed.0` (exclusive) to `confirmed.1`: the senders
    /// of the messages in between get receipts, stored in their inboxes in this batch.
    fn receipts(
        &mut self,
        batch: &mut Batch,
        now: u64,
        user: &Arc<str>,
        stream: &str,
        (before, upto): (u64, u64),
    ) {
        let from = (before + 1).max(self.streams.meta(stream).first);
        if from > upto {
            return;
        }
        let n = ((upto - from + 1) as usize).min(receipts::MAX_SCAN);
        let entries = match self.backend.read(stream, from, n, usize::MAX) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, user = %user, "store: no receipts for a confirmation");
                return;
            }
        };
        let payloads = entries
            .iter()
            .filter(|e| e.offset <= upto)
            .map(|e| &e.payload[..]);
        for (sender, prefix) in receipts::receipts(user, payloads, upto, now) {
            StoreMetrics::add(&self.metrics.receipts, 1);
            self.send_dm(
                batch,
                now,
                (user.clone(), sender, false),
                prefix,
                None,
                None,
                None,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn send_dm(
        &mut self,
        batch: &mut Batch,
        now: u64,
        (from, to, sender_copy): (Arc<str>, Arc<str>, bool),
        prefix: Bytes,
        id: Option<Box<str>>,
        reply: Option<ReplyTo>,
        sender: Option<ConnId>,
    ) {
        let epoch = self.streams.epoch;
        let copies = if from == to || !sender_copy { 1 } else { 2 };
        let need = (prefix.len() as u64 + 64) * copies;
        let key = id.as_deref().map(|i| self.streams.dedup_key(&from, i));
        let Ok(reply) = self.check_write(key, need, now, reply, None) else {
            return;
        };
        let to_stream = self.stream_name("inbox:", &to);
        let (to_offset, to_payload) = self.append(batch, &to_stream, &prefix, now);
        let mut ack_offset = to_offset;
        if from != to && sender_copy {
            let from_stream = self.stream_name("inbox:", &from);
            let (from_offset, from_payload) = self.append(batch, &from_stream, &prefix, now);
            ack_offset = from_offset;
            let home = home_of(&from, self.cfg.homes);
            self.out.push((
                home,
                StoreMsg::Deliver {
                    user: from.clone(),
                    payload: from_payload,
                    offset: from_offset,
                    exclude: sender,
                    ack: None,
                },
            ));
        }
        if let (Some(id), Some(key)) = (id, key) {
            self.remember(batch, (from.clone(), id, key), ack_offset, now);
        }
        let self_dm = from == to;
        let home = home_of(&to, self.cfg.homes);
        self.out.push((
            home,
            StoreMsg::Deliver {
                user: to,
                payload: to_payload,
                offset: to_offset,
                exclude: if self_dm { sender } else { None },
                ack: reply.map(|r| (r, ack_offset, epoch)),
            },
        ));
    }

    /// Before a write: a retried id within the dedup window is answered with the first
    /// offset, and a write over `--store-max-bytes` is refused; either way `Err` (answered).
    /// Otherwise the reply comes back for the ack.
    fn check_write(
        &mut self,
        key: Option<DedupKey>,
        need: u64,
        now: u64,
        reply: Option<ReplyTo>,
        channel: Option<Arc<str>>,
    ) -> Result<Option<ReplyTo>, ()> {
        let epoch = self.streams.epoch;
        if let Some(d) = key.and_then(|k| self.streams.dedup_hit(k, now)) {
            StoreMetrics::add(&self.metrics.dedup_hits, 1);
            if let Some(reply) = reply {
                let shard = reply.conn.shard;
                let msg = StoreMsg::Ack {
                    reply,
                    channel,
                    offset: d.offset,
                    epoch,
                    queued: None,
                };
                self.out.push((shard, msg));
            }
            return Err(());
        }
        if self.streams.total_bytes + need > self.cfg.max_bytes {
            StoreMetrics::add(&self.metrics.refused, 1);
            if let Some(reply) = reply {
                let shard = reply.conn.shard;
                self.out.push((
                    shard,
                    StoreMsg::Refused {
                        reply,
                        why: Refusal::Full,
                        publish: channel.is_some(),
                    },
                ));
            }
            return Err(());
        }
        Ok(reply)
    }

    /// Remembers the first answer to request `id` (with its `key`) of `who` for the dedup
    /// window.
    fn remember(
        &mut self,
        batch: &mut Batch,
        (who, id, key): (Arc<str>, Box<str>, DedupKey),
        offset: u64,
        now: u64,
    ) {
        let expires_ms = now + self.cfg.dedup_window_ms;
        self.streams.remember(key, offset, expires_ms);
        batch
            .dedups
            .push((who, id, streams::Dedup { offset, expires_ms }));
    }

    /// A publication to a channel with history: stored, then to every shard, then acked.
    #[allow(clippy::too_many_arguments)]
    fn publish(
        &mut self,
        batch: &mut Batch,
        now: u64,
        channel: Arc<str>,
        retention: Retention,
        prefix: Bytes,
        (id, publisher): (Option<Box<str>>, Arc<str>),
        reply: Option<ReplyTo>,
    ) {
        let epoch = self.streams.epoch;
        let stream = self.stream_name("channel:", &channel);
        // Dedup keys are per publisher and channel.
        let dedup_id = id.map(|i| format!("{stream}/{i}").into_boxed_str());
        let key = dedup_id
            .as_deref()
            .map(|i| self.streams.dedup_key(&publisher, i));
        let need = prefix.len() as u64 + 64;
        let Ok(reply) = self.check_write(key, need, now, reply, Some(channel.clone())) else {
            return;
        };
        if self.retention.get(&*stream) != Some(&retention) {
            self.retention.insert(stream.to_string(), retention);
        }
        let (offset, payload) = self.append_in(batch, &stream, retention, &prefix, now);
        if let (Some(id), Some(key)) = (dedup_id, key) {
            self.remember(batch, (publisher, id, key), offset, now);
        }
        for shard in 0..self.shards as u16 {
            self.out.push((
                shard,
                StoreMsg::ChannelDeliver {
                    channel: channel.clone(),
                    payload: payload.clone(),
                    offset,
                },
            ));
        }
        if let Some(reply) = reply {
            let shard = reply.conn.shard;
            self.out.push((
                shard,
                StoreMsg::Ack {
                    reply,
                    channel: Some(channel),
                    offset,
                    epoch,
                    queued: Some(false),
                },
            ));
        }
    }

    /// The shared name of stream `kind` + `name` (`inbox:` or `channel:`); allocates only for
    /// a new stream.
    fn stream_name(&mut self, kind: &str, name: &str) -> Arc<str> {
        self.name_buf.clear();
        self.name_buf.push_str(kind);
        self.name_buf.push_str(name);
        self.streams.intern(&self.name_buf)
    }

    /// Appends one event to an inbox: assigns the offset, completes the payload, applies
    /// count retention.
    fn append(
        &mut self,
        batch: &mut Batch,
        stream: &Arc<str>,
        prefix: &[u8],
        now: u64,
    ) -> (u64, Bytes) {
        let retention = self.cfg.inbox;
        self.append_in(batch, stream, retention, prefix, now)
    }

    /// Appends one event to `stream` with `retention`.
    fn append_in(
        &mut self,
        batch: &mut Batch,
        stream: &Arc<str>,
        retention: Retention,
        prefix: &[u8],
        now: u64,
    ) -> (u64, Bytes) {
        let wire = wire_name(stream);
        let epoch = self.streams.epoch;
        let (offset, payload, meta) = self.streams.append_built(stream, |offset| {
            let mut p = BytesMut::with_capacity(prefix.len() + TRAILER_MAX + wire.len());
            p.put_slice(prefix);
            put_trailer(&mut p, wire, offset, epoch);
            p.freeze()
        });
        batch.appends.push((
            stream.clone(),
            Entry {
                offset,
                ts_ms: now,
                payload: payload.clone(),
                body: prefix.len() as u32,
            },
        ));
        StoreMetrics::add(&self.metrics.appends, 1);
        let meta = match meta.over_count(retention.max_count) {
            Some(first) => {
                self.trim(batch, stream, first);
                self.streams.meta(stream)
            }
            None => meta,
        };
        self.record_meta(batch, stream, meta);
        (offset, payload)
    }

    /// Drops `stream`'s entries before `first` (counting their bytes, including entries of
    /// this uncommitted batch).
    fn trim(&mut self, batch: &mut Batch, stream: &str, first: u64) {
        let m = self.streams.meta(stream);
        if first <= m.first {
            return;
        }
        let mut bytes = self.backend.bytes(stream, m.first, first).unwrap_or(0);
        bytes += batch
            .appends
            .iter()
            .filter(|(s, e)| **s == *stream && e.offset >= m.first && e.offset < first)
            .map(|(_, e)| e.payload.len() as u64)
            .sum::<u64>();
        batch
            .appends
            .retain(|(s, e)| !(**s == *stream && e.offset < first));
        batch.trims.push((stream.to_owned(), m.first, first));
        self.streams.trim(stream, first, bytes);
    }

    /// Notes `stream`'s new state in the batch (once per stream per batch: an index keeps
    /// this O(1) in a batch of thousands of streams).
    fn record_meta(&mut self, batch: &mut Batch, stream: &Arc<str>, m: StreamMeta) {
        match self.meta_index.get(&**stream) {
            Some(&i) => batch.metas[i].1 = m,
            None => {
                self.meta_index.insert(stream.clone(), batch.metas.len());
                batch.metas.push((stream.clone(), m));
            }
        }
    }

    /// Age retention and dedup expiry, when the store is idle.
    fn housekeeping(&mut self) {
        let now = unix_ms();
        self.meta_index.clear();
        let mut batch = Batch {
            dedup_expired: self.streams.expire_dedup(now),
            ..Batch::default()
        };
        let streams: Vec<(Arc<str>, StreamMeta)> = self
            .streams
            .streams()
            .map(|(s, m)| (s.clone(), *m))
            .collect();
        for (s, m) in streams {
            if m.first >= m.next {
                continue;
            }
            let ttl = self
                .retention
                .get(&*s)
                .map_or(self.cfg.inbox.ttl_ms, |r| r.ttl_ms);
            // The oldest entry first: most streams have nothing to expire.
            match self.backend.read(&s, m.first, 1, usize::MAX) {
                Ok(oldest) if oldest.first().is_some_and(|e| e.ts_ms + ttl <= now) => {}
                _ => continue,
            }
            let Ok(old) = self.backend.read(&s, m.first, PAGE_ITEMS, usize::MAX) else {
                continue;
            };
            let keep_from = old
                .iter()
                .find(|e| e.ts_ms + ttl > now)
                .map_or(m.first + old.len() as u64, |e| e.offset);
            if keep_from > m.first {
                self.trim(&mut batch, &s, keep_from);
                let m = self.streams.meta(&s);
                self.record_meta(&mut batch, &s, m);
            }
        }
        if !batch.is_empty() {
            if let Err(e) = self.backend.commit(&batch) {
                warn!(error = %e, "store housekeeping commit failed");
            }
            StoreMetrics::set(&self.metrics.bytes, self.streams.total_bytes);
        }
    }

    fn read(&mut self, r: StoreReq) {
        match r {
            StoreReq::Open { user, conn, since } => {
                let stream = inbox_stream(&user);
                let m = self.streams.meta(&stream);
                let epoch = self.streams.epoch;
                let (resume, page) = match since {
                    None => (None, Page::default()),
                    Some(since) => {
                        let confirmed = self.streams.confirmed(&user);
                        let (resume, page) = self.resume(&stream, since, confirmed);
                        (Some(resume), page)
                    }
                };
                self.out.push((
                    conn.shard,
                    StoreMsg::Opened(Box::new(Opened {
                        conn,
                        epoch,
                        top: m.top(),
                        resume,
                        page,
                    })),
                ));
            }
            StoreReq::History {
                user,
                from,
                limit,
                conn,
                id,
            } => {
                let stream = inbox_stream(&user);
                let m = self.streams.meta(&stream);
                let from = from.max(m.first);
                let entries = if from >= m.next {
                    Vec::new()
                } else {
                    self.backend
                        .read(&stream, from, limit, PAGE_BYTES)
                        .unwrap_or_default()
                };
                let next = entries.last().map_or(from.min(m.next), |e| e.offset + 1);
                self.out.push((
                    conn.shard,
                    StoreMsg::History(Box::new(History {
                        conn,
                        id,
                        user,
                        epoch: self.streams.epoch,
                        first: m.first,
                        top: m.top(),
                        entries: entries.into_iter().map(|e| (e.offset, e.payload)).collect(),
                        next,
                    })),
                ));
            }
            StoreReq::Unread {
                user,
                conn,
                connections,
            } => {
                let m = self.streams.meta(&inbox_stream(&user));
                let confirmed = self.streams.confirmed(&user).max(m.first.saturating_sub(1));
                let unread = m.top().saturating_sub(confirmed);
                self.out.push((
                    conn.shard,
                    StoreMsg::Unread {
                        conn,
                        connections,
                        unread,
                    },
                ));
            }
            StoreReq::Page {
                stream,
                conn,
                epoch,
                from,
            } => {
                // Restarted without its files (a cluster's shared store, as the simulation
                // plays it): the replay's position does not hold.
                let gone = epoch != Epoch(0) && epoch != self.streams.epoch;
                let page = if gone {
                    Page::default()
                } else {
                    self.page(&stream.name(), from)
                };
                let msg = StoreMsg::Page {
                    conn,
                    stream,
                    gone,
                    page,
                };
                self.out.push((conn.shard, msg));
            }
            StoreReq::CatchUp {
                stream,
                shard,
                epoch,
                from,
            } => {
                let now = self.streams.epoch;
                let page = self.page(&stream.name(), catch_up_from(epoch, now, from, None));
                let msg = StoreMsg::CaughtUp {
                    stream,
                    epoch: now,
                    shared: 0,
                    page,
                    excludes: Vec::new(),
                };
                self.out.push((shard, msg));
            }
            StoreReq::OpenChannel {
                channel,
                conn,
                since,
                id,
            } => {
                let stream = channel_stream(&channel);
                let m = self.streams.meta(&stream);
                // Channels keep no confirmed position: `confirmed` means from now on.
                let (resume, page) = self.resume(&stream, since, m.top());
                self.out.push((
                    conn.shard,
                    StoreMsg::ChannelOpened(Box::new(ChannelOpened {
                        conn,
                        channel,
                        id,
                        epoch: self.streams.epoch,
                        top: m.top(),
                        resume,
                        page,
                    })),
                ));
            }
            _ => {}
        }
    }

    /// Where a resume of `stream` from `since` starts (`confirmed` standing for the
    /// confirmed offset), counted as recovered or not, and its first page.
    fn resume(
        &mut self,
        stream: &str,
        since: Since,
        confirmed: u64,
    ) -> (Result<(), Unrecoverable>, Page) {
        let meta = self.streams.meta(stream);
        let plan = plan_resume(&meta, self.streams.epoch, since, confirmed, &self.metrics);
        (plan.lost.map_or(Ok(()), Err), self.page(stream, plan.from))
    }

    fn page(&mut self, stream: &str, from: u64) -> Page {
        let meta = self.streams.meta(stream);
        let page_items = self.cfg.page_items.max(1);
        let backend = &mut self.backend;
        let page = read_page(&meta, from, &self.metrics, |from| {
            let entries = match backend.read(stream, from, page_items, PAGE_BYTES) {
                Ok(e) => e,
                Err(e) => {
                    error!(error = %e, stream, "store read failed");
                    Vec::new()
                }
            };
            Ok::<_, std::convert::Infallible>(
                entries.into_iter().map(|e| (e.offset, e.payload)).collect(),
            )
        });
        match page {
            Ok(p) => p,
            Err(never) => match never {},
        }
    }

    fn post_all(&mut self) {
        post_each(&self.sink, &mut self.out);
    }
}

/// What waiting for the store's queue gave.
enum Waited {
    /// Requests are in the batch.
    Batch,
    /// Nothing for a second (time for housekeeping).
    Idle,
    /// Every handle is gone.
    Closed,
}

/// Waits up to a second for a request, then takes everything waiting (up to [`BATCH_MAX`]):
/// one batch, one commit (shared by the redb/memory and Redis store threads).
fn next_batch(rx: &queue::Rx<StoreReq>, reqs: &mut Vec<StoreReq>) -> Waited {
    match rx.recv_timeout(Duration::from_secs(1)) {
        Ok(r) => reqs.push(r),
        Err(RecvTimeoutError::Timeout) => return Waited::Idle,
        Err(RecvTimeoutError::Disconnected) => return Waited::Closed,
    }
    while reqs.len() < BATCH_MAX {
        match rx.try_recv() {
            Ok(r) => reqs.push(r),
            Err(_) => break,
        }
    }
    Waited::Batch
}

/// Where a resume from `since` starts in a stream at `meta` (`confirmed` standing for the
/// confirmed offset) in a store of epoch `current`; counted as recovered or not.
fn plan_resume(
    meta: &StreamMeta,
    current: Epoch,
    since: Since,
    confirmed: u64,
    metrics: &StoreMetrics,
) -> streams::ResumePlan {
    let (epoch, offset) = match since {
        Since::Position { epoch, offset } => (epoch, offset),
        Since::Confirmed => (None, confirmed),
    };
    let plan = meta.plan_resume(current, epoch, offset);
    let counter = if plan.lost.is_none() {
        &metrics.recoveries_ok
    } else {
        &metrics.recoveries_failed
    };
    StoreMetrics::add(counter, 1);
    plan
}

/// A replay page of a stream at `meta` from offset `from`, its entries read by `read` (from
/// the first retained offset on; not called when there is nothing to replay).
fn read_page<E>(
    meta: &StreamMeta,
    from: u64,
    metrics: &StoreMetrics,
    read: impl FnOnce(u64) -> Result<Vec<(u64, Bytes)>, E>,
) -> Result<Page, E> {
    let from = from.max(meta.first);
    if from >= meta.next {
        return Ok(Page {
            entries: Vec::new(),
            next: meta.next,
            done: true,
        });
    }
    StoreMetrics::add(&metrics.replays, 1);
    let entries = read(from)?;
    let next = entries.last().map_or(meta.next, |e| e.0 + 1);
    Ok(Page {
        done: next >= meta.next,
        next,
        entries,
    })
}

/// Posts every answer, one batch per shard in order; a full mailbox is retried (the store
/// may wait, a shard never), for at most [`POST_PATIENCE`] per batch (then the shard is gone
/// or stuck).
fn post_each(sink: &Sink, out: &mut Vec<(u16, StoreMsg)>) {
    let mut per: Vec<Vec<StoreMsg>> = Vec::new();
    for (shard, msg) in out.drain(..) {
        let i = shard as usize;
        if per.len() <= i {
            per.resize_with(i + 1, Vec::new);
        }
        per[i].push(msg);
    }
    for (shard, mut msgs) in per.into_iter().enumerate() {
        if msgs.is_empty() {
            continue;
        }
        let mut wait_us = 50;
        let started = Instant::now();
        loop {
            match sink(shard as u16, msgs) {
                Ok(()) => break,
                Err(m) if started.elapsed() < POST_PATIENCE => {
                    msgs = m;
                    std::thread::sleep(Duration::from_micros(wait_us));
                    wait_us = (wait_us * 2).min(10_000);
                }
                Err(m) => {
                    error!(shard, messages = m.len(), first = ?m.first(), "store: a shard's mailbox stayed full; answers dropped");
                    break;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Mutex;

    #[test]
    fn a_catch_up_goes_on_in_a_continuing_epoch_only_up_to_the_offsets_both_share() {
        let (old, new, other) = (Epoch(1), Epoch(2), Epoch(3));
        assert_eq!(catch_up_from(old, old, 7, None), 7, "same epoch");
        assert_eq!(
            catch_up_from(old, new, 7, None),
            1,
            "unrelated: from the start"
        );
        assert_eq!(catch_up_from(old, new, 7, Some((other, 9))), 1);
        // The new epoch holds the old one's 1..=9: the shard had 1..=6, goes on at 7.
        assert_eq!(catch_up_from(old, new, 7, Some((old, 9))), 7);
        // The shard had 1..=11 but only 1..=4 survived: 5.. of the new epoch are new.
        assert_eq!(catch_up_from(old, new, 12, Some((old, 4))), 5);
        assert_eq!(catch_up_from(old, new, 12, Some((old, u64::MAX))), 12);
    }

    #[test]
    fn the_trailer_matches_the_formatted_event() {
        for (offset, epoch) in [
            (1, 0),
            (9, 0xa),
            (1234567890, 0xffff_ffff_ffff),
            (u64::MAX, 1),
        ] {
            let mut out = Vec::new();
            put_trailer(&mut out, "room:1", offset, Epoch(epoch));
            let want = format!(
                ",\"stream\":\"room:1\",\"offset\":{offset},\"epoch\":\"{}\"}}",
                Epoch(epoch)
            );
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    /// Memory that can be told to fail its commits, and says it is durable (so a failure
    /// reloads what it committed).
    #[derive(Default)]
    struct Flaky {
        mem: Memory,
        metas: Vec<(String, StreamMeta)>,
        fail: Arc<AtomicBool>,
    }

    impl Backend for Flaky {
        fn load(&mut self) -> Result<backend::Loaded, StoreError> {
            Ok(backend::Loaded {
                epoch: Some(Epoch(7)),
                metas: self.metas.clone(),
                ..Default::default()
            })
        }
        fn commit(&mut self, b: &Batch) -> Result<(), StoreError> {
            if self.fail.load(Ordering::SeqCst) {
                return Err(StoreError::Redb("disk on fire".into()));
            }
            for (s, m) in &b.metas {
                self.metas.retain(|(x, _)| **x != **s);
                self.metas.push((s.to_string(), *m));
            }
            self.mem.commit(b)
        }
        fn read(&mut self, s: &str, f: u64, n: usize, b: usize) -> Result<Vec<Entry>, StoreError> {
            self.mem.read(s, f, n, b)
        }
        fn durable(&self) -> bool {
            true
        }
    }

    fn send(store: &StoreHandle, id: &str) {
        let conn = ConnId {
            shard: 0,
            slot: 1,
            generation: 1,
        };
        store
            .request(StoreReq::SendDm {
                from: "ann".into(),
                to: "bob".into(),
                prefix: Bytes::from_static(br#"{"op":"msg""#),
                id: Some(id.into()),
                reply: Some(ReplyTo {
                    conn,
                    id: id.into(),
                    to: "bob".into(),
                }),
                sender: Some(conn),
                sender_copy: true,
            })
            .unwrap();
    }

    #[test]
    fn answers_go_as_one_batch_per_shard_in_order_and_a_full_mailbox_is_retried() {
        let unread = |slot: u32| StoreMsg::Unread {
            conn: ConnId {
                shard: 0,
                slot,
                generation: 0,
            },
            connections: 0,
            unread: 0,
        };
        let slots = |m: &[StoreMsg]| -> Vec<u32> {
            m.iter()
                .map(|m| match m {
                    StoreMsg::Unread { conn, .. } => conn.slot,
                    other => panic!("unexpected {other:?}"),
                })
                .collect()
        };
        type Posts = Vec<(u16, Vec<u32>)>;
        let posts: Arc<Mutex<Posts>> = Default::default();
        let refusals = Arc::new(Mutex::new(2)); // shard 2's mailbox is full twice
        let (p, r) = (posts.clone(), refusals.clone());
        let sink: Sink = Box::new(move |shard, m| {
            let mut r = r.lock().unwrap();
            if shard == 2 && *r > 0 {
                *r -= 1;
                return Err(m);
            }
            p.lock().unwrap().push((shard, slots(&m)));
            Ok(())
        });
        let mut out: Vec<(u16, StoreMsg)> = [(2, 1), (0, 2), (2, 3), (0, 4), (2, 5)]
            .into_iter()
            .map(|(shard, slot)| (shard, unread(slot)))
            .collect();
        post_each(&sink, &mut out);
        assert!(out.is_empty());
        assert_eq!(*refusals.lock().unwrap(), 0, "the full mailbox was retried");
        assert_eq!(
            *posts.lock().unwrap(),
            vec![(0, vec![2, 4]), (2, vec![1, 3, 5])],
            "one post per shard, each shard's answers in order"
        );
    }

    #[test]
    fn a_failed_commit_stores_nothing_and_tells_the_sender() {
        let fail = Arc::new(AtomicBool::new(true));
        let seen: Arc<Mutex<Vec<StoreMsg>>> = Default::default();
        let sink_seen = seen.clone();
        let sink: Sink = Box::new(move |_, m| {
            sink_seen.lock().unwrap().extend(m);
            Ok(())
        });
        let cfg = StoreConfig {
            inbox: Retention {
                max_count: 100,
                ttl_ms: 1 << 40,
            },
            dedup_window_ms: 60_000,
            max_bytes: 1 << 30,
            homes: 1,
            min_replicas: 0,
            min_replicas_timeout_ms: 1_000,
            page_items: PAGE_ITEMS,
        };
        let backend = Flaky {
            fail: fail.clone(),
            ..Flaky::default()
        };
        let store = Store::start(Box::new(backend), cfg, 1, sink, Default::default()).unwrap();
        let wait = |n: usize| {
            let start = Instant::now();
            while seen.lock().unwrap().len() < n {
                assert!(start.elapsed() < Duration::from_secs(10), "no answer");
                std::thread::sleep(Duration::from_millis(1));
            }
        };
        send(&store.handle(), "m1");
        wait(1);
        assert!(
            matches!(
                seen.lock().unwrap()[0],
                StoreMsg::Refused {
                    why: Refusal::Failed,
                    ..
                }
            ),
            "refused, not silently dropped: {:?}",
            seen.lock().unwrap()[0]
        );
        // The retry is stored (no dedup entry survived the failed commit), at offset 1.
        fail.store(false, Ordering::SeqCst);
        send(&store.handle(), "m1");
        wait(3);
        let offsets: Vec<u64> = seen.lock().unwrap()[1..]
            .iter()
            .map(|m| match m {
                StoreMsg::Deliver { offset, .. } => *offset,
                other => panic!("expected deliveries, got {other:?}"),
            })
            .collect();
        assert_eq!(
            offsets,
            vec![1, 1],
            "both inboxes start at 1: nothing was half-stored"
        );
        store.stop();
    }
}
