//! Deterministic simulation: several shards' [`Router`], their hubs, wheels and bounded
//! mailboxes, and the clients, all in one thread with a seeded scheduler and a virtual clock —
//! no sockets, no threads, no sleeping. Clients connect (named or anonymous), send DMs, join,
//! leave and publish to channels, write their bytes split at random points, read slowly or not
//! at all, leave pings unanswered, vanish without a close frame; shard mail is delayed at
//! random. After every step the invariants are checked (see [`World::check`]); at the end
//! every client leaves and every slab, hub table, wheel and mailbox must be empty.
//!
//! A fifth of the clients are event streams (`GET /events`, named or anonymous, on two
//! channels): they only read, end by dropping the connection, and come back with
//! `Last-Event-ID`; a named stream's event ids must be its inbox position. Some connections
//! are backends calling the push API once (`POST /api/send`, qos 1 with a store, and
//! `/api/publish`): answered 200 (or 503 when the store's queue is full), their DMs and
//! publications checked like any other, their qos-1 sends audited like a client's.
//!
//! Worlds with a store ([`World::with_store`]) run the real store worker inline on simulated
//! files ([`SimDisk`]): clients also send qos-1 DMs, commits come late and in random batches,
//! answers wait for room in the mailboxes, devices that left come back resuming with `since`,
//! and the process crashes now and then and restarts on its files — or, rarely, without them.
//! Checked on top: every inbox message a connection gets is past the last one (per epoch); a
//! resume the welcome called recovered replays every offset up to its top once, in order,
//! before anything newer; a resume from a store whose files were lost says `epoch_changed`;
//! and at the end every acknowledged qos-1 send is in its recipient's inbox exactly once.
//!
//! Cluster worlds ([`World::cluster`]) split the shards between nodes over a model broker
//! (`cluster.rs`) whose connections drop and come back, half of them with one store for every
//! node (the streams in Redis, which restarts now and then with or without its files while
//! the nodes stay): checked on top, every open client is welcomed, and at the end
//! no node follows anything. Every world settles before its drain; then every client open
//! since its welcome must hold every inbox offset after it (no gap).
//!
//! [`run`] plays one seed; a failure names the seed and the step, and replaying the seed
//! replays the run exactly.

mod cluster;
pub mod disk;
pub mod pipe;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};

use serde_json::Value;

use crate::config::Config;
use crate::hub::ConnId;
use crate::mail::ShardMsg;
use crate::router::{Router, Shared};
use crate::store::{InlineStore, Retention, StoreConfig, StoreHandle, StoreMsg, StoreReq};
use crate::testkit;
pub use disk::SimDisk;
pub use pipe::{PipeState, SimSocket};

/// A small, fast, seedable generator (SplitMix64): the whole run follows from the seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// True with probability `pct` %.
    pub fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

/// Users the simulated clients are named from (few, so users have several devices).
const NAMES: [&str; 6] = ["ann", "bob", "cy", "dee", "eve", "fay"];
/// Channels the simulated clients use.
const CHANNELS: [&str; 3] = ["room1", "room2", "lobby"];
/// Clients alive at once, at most.
const MAX_CLIENTS: usize = 24;
/// Capacity of each simulated mailbox (small, so full mailboxes happen).
const MAILBOX_CAPACITY: usize = 48;
/// Wall clock at virtual time 0 (unix ms).
const UNIX_BASE_MS: u64 = 1_800_000_000_000;
/// Requests the simulated store queue holds (small, so a full queue happens).
const STORE_QUEUE: usize = 64;
/// Store requests refused as if its queue were full (percent).
const STORE_REFUSE_PCT: u64 = 2;

/// The id of client `client`'s request `n` (unique in the run).
fn request_id(client: usize, n: u64) -> u64 {
    client as u64 * 1_000_000 + n
}

/// The request number of `id` if it is one of `client`'s.
fn request_seq(client: usize, id: u64) -> Option<u64> {
    (id / 1_000_000 == client as u64).then_some(id % 1_000_000)
}

/// The configuration the simulation runs: short deadlines and small limits so heartbeats,
/// timeouts and slow consumers happen within a few thousand steps.
pub fn sim_config(shards: usize) -> Config {
    Config {
        shards,
        ping_interval_ms: 1_000,
        idle_timeout_ms: 3_000,
        timer_slack_ms: 0,
        handshake_timeout_ms: 2_000,
        close_timeout_ms: 500,
        max_outbound_bytes: 4_096,
        mailbox_capacity: MAILBOX_CAPACITY,
        shutdown_grace_ms: 2_000,
        ..Config::default()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Upgrade request sent, no 101 yet.
    Handshake,
    /// 101 received.
    Open,
    /// The client sent its close frame (or answered the server's).
    Closing,
    /// The client dropped the connection without a close frame.
    Aborted,
}

/// A simulated client: its end of the pipe and what it has seen.
struct Client {
    shard: usize,
    conn: ConnId,
    pipe: SimSocket,
    user: Option<&'static str>,
    /// An event stream (`GET /events`): it only reads; it resumes with `Last-Event-ID`.
    sse: bool,
    /// The id of the last SSE block (what a browser sends back as `Last-Event-ID`).
    last_event_id: Option<String>,
    /// A push-API call (one request, `Connection: close`): for a qos-1 send, its recipient.
    api: Option<Option<&'static str>>,
    phase: Phase,
    /// Bytes written but not yet handed to the pipe (handed over in random pieces).
    unsent: VecDeque<u8>,
    rbuf: Vec<u8>,
    answers_pings: bool,
    /// A slow reader reads only rarely.
    slow: bool,
    next_seq: u64,
    /// Highest DM sequence seen per sending client, qos 0 and qos 1 apart (a qos-1 copy
    /// waits for its commit, so it may come after a later qos-0 one).
    dm_seen: BTreeMap<(usize, bool), u64>,
    /// Highest channel sequence seen per (sending client, channel).
    pub_seen: BTreeMap<(usize, &'static str), u64>,
    ever_subscribed: BTreeSet<&'static str>,
    pending_ids: BTreeSet<u64>,
    /// Request ids answered `ack`.
    acked: BTreeSet<u64>,
    /// qos-1 sends not answered yet: request id → recipient.
    qos1: BTreeMap<u64, &'static str>,
    /// The last inbox offset this connection was given, with its epoch.
    inbox_at: Option<(String, u64)>,
    /// The inbox position it resumes from (`since`), if it does.
    since: Option<(String, u64)>,
    /// A replay the welcome promised: (epoch, next offset due, the welcome's top). Every
    /// offset up to the top must come once, in order, before anything after it.
    replay: Option<(String, u64, u64)>,
    /// DMs received, as (sending client, sequence).
    dms: BTreeSet<(usize, u64)>,
    /// Its inbox from the welcome on: (epoch, the welcome's top), and every offset after it
    /// it got or sent itself (acked: its own copy is not delivered to it).
    inbox_from: Option<(String, u64)>,
    inbox_seen: BTreeSet<u64>,
    welcomed: bool,
    close_code: Option<u16>,
    /// Its resume's epoch was lost while it was connected: its welcome may have been
    /// answered before (then rightly recovered).
    since_wiped_meanwhile: bool,
}

/// Counts of one run.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    /// Steps played.
    pub steps: u64,
    /// Connections opened.
    pub connections: u64,
    /// DMs received by clients.
    pub dms_received: u64,
    /// Channel messages received.
    pub pubs_received: u64,
    /// Close frames received from the server, by kind: heartbeat (4000), slow consumer (4001).
    pub heartbeat_closes: u64,
    /// Slow-consumer closes.
    pub slow_consumer_closes: u64,
    /// Mail posts refused by a full mailbox.
    pub mailbox_full: u64,
    /// qos-1 sends acknowledged (with a store).
    pub qos1_acked: u64,
    /// Store batches committed.
    pub store_batches: u64,
    /// Resumes the welcome said recovered.
    pub resumed: u64,
    /// Messages replayed to resumed connections (each checked in order, once).
    pub replayed: u64,
    /// Process crashes (with a store: restarts on the same files, or on none).
    pub crashes: u64,
    /// Events received by event streams (SSE).
    pub sse_events: u64,
    /// Push-API calls answered 200.
    pub api_calls: u64,
    /// Store requests refused (the queue full, or a refusal injected).
    pub store_refused: u64,
    /// Messages the model broker carried to another node's shards (cluster worlds).
    pub broker_carried: u64,
    /// Copies the model broker lost (a dropped subscription) or never sent (the publisher
    /// down).
    pub broker_lost: u64,
    /// Broker connections dropped or restored.
    pub broker_faults: u64,
    /// DMs for other nodes the model broker answered `unavailable`.
    pub broker_unavailable: u64,
    /// Restarts of a cluster's shared store (its Redis), the nodes staying up.
    pub store_restarts: u64,
    /// Of which without its files (a cluster's store that lost its streams).
    pub store_wiped: u64,
}

impl std::ops::AddAssign for Stats {
    /// Sums the counts of several runs.
    fn add_assign(&mut self, o: Stats) {
        self.steps += o.steps;
        self.connections += o.connections;
        self.dms_received += o.dms_received;
        self.pubs_received += o.pubs_received;
        self.heartbeat_closes += o.heartbeat_closes;
        self.slow_consumer_closes += o.slow_consumer_closes;
        self.mailbox_full += o.mailbox_full;
        self.store_refused += o.store_refused;
        self.qos1_acked += o.qos1_acked;
        self.store_batches += o.store_batches;
        self.resumed += o.resumed;
        self.replayed += o.replayed;
        self.crashes += o.crashes;
        self.sse_events += o.sse_events;
        self.api_calls += o.api_calls;
        self.broker_carried += o.broker_carried;
        self.broker_lost += o.broker_lost;
        self.broker_faults += o.broker_faults;
        self.broker_unavailable += o.broker_unavailable;
        self.store_restarts += o.store_restarts;
        self.store_wiped += o.store_wiped;
    }
}

/// The simulated process: shards, mailboxes, clients, clock.
pub struct World {
    rng: Rng,
    /// Store requests refused as if the queue were full (percent; scenario tests: none).
    store_refuse_pct: u64,
    now_ms: u64,
    shards: Vec<Router<SimSocket>>,
    mailboxes: Vec<VecDeque<ShardMsg>>,
    clients: BTreeMap<usize, Client>,
    next_client: usize,
    /// The store, in worlds that have one.
    store: Option<SimStore>,
    /// Every acknowledged qos-1 send: (sending client, request id, recipient).
    acked_qos1: Vec<(usize, u64, &'static str, String)>,
    /// Inbox positions of devices that left, per user (a few each): where they resume.
    left_at: BTreeMap<&'static str, Vec<(String, u64)>>,
    /// Epochs of stores whose files were lost: a resume from one must not recover.
    wiped: BTreeSet<String>,
    /// A restart of a cluster's store waiting for nothing to be in flight (with its files?).
    restart_due: Option<bool>,
    /// Counts.
    pub stats: Stats,
    step: u64,
    /// Nodes the shards are split between (more than one: over a model broker).
    nodes: usize,
    /// The model broker of a world of several nodes.
    broker: Option<cluster::ModelBroker>,
}

/// What the store posted, by shard, in order, until the mailboxes take it.
type Answers = Arc<Mutex<VecDeque<(u16, Vec<StoreMsg>)>>>;

/// The simulated store: the real store worker driven inline on simulated files, its request
/// queue, and its answers until the mailboxes take them.
struct SimStore {
    disk: SimDisk,
    store: InlineStore,
    /// The shards' side of the queue (their requests are posted through it).
    handle: StoreHandle,
    rx: crate::queue::Rx<StoreReq>,
    /// What the store posted, in order, not yet in a mailbox.
    answers: Answers,
}

/// The real store worker on `disk` (it loads what the files hold), answering into `answers`.
fn open_store(disk: &SimDisk, answers: &Answers, shards: usize, now_unix: u64) -> InlineStore {
    let sink_answers = answers.clone();
    let sink: crate::store::Sink = Box::new(move |shard, msgs| {
        sink_answers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push_back((shard, msgs));
        Ok(())
    });
    let cfg = sim_store_config(shards);
    InlineStore::open(disk.backend(), cfg, shards, sink, now_unix)
        .expect("the simulated store opens")
}

/// The store settings of the simulation (small retention, so trimming happens).
fn sim_store_config(shards: usize) -> StoreConfig {
    StoreConfig {
        inbox: Retention {
            max_count: 1_000,
            ttl_ms: u64::MAX / 4,
        },
        dedup_window_ms: 60_000,
        max_bytes: 64 << 20,
        homes: shards,
        min_replicas: 0,
        min_replicas_timeout_ms: 0,
        page_items: 3,
    }
}

impl World {
    /// A world of `shards` shards seeded with `seed`, without a store.
    pub fn new(seed: u64, shards: usize) -> World {
        Self::build(seed, shards, false)
    }

    /// A world of `shards` shards with a store (qos-1 sends, inboxes, resumes).
    pub fn with_store(seed: u64, shards: usize) -> World {
        Self::build(seed, shards, true)
    }

    /// A cluster: `nodes` nodes of `shards_per_node` shards each, over a model broker that
    /// drops subscriptions and connections now and then (see `cluster.rs`); `with_store`: one
    /// store for every node, standing for the streams in Redis (stored events reach the
    /// nodes through the model, and are lost with a dropped subscription: the shards catch
    /// up from the store).
    pub fn cluster(seed: u64, nodes: usize, shards_per_node: usize, with_store: bool) -> World {
        let mut w = Self::empty(seed, nodes);
        let disk = with_store.then(|| SimDisk::new(w.rng.next_u64()));
        w.boot(nodes * shards_per_node, disk);
        w
    }

    fn build(seed: u64, shards: usize, with_store: bool) -> World {
        let mut w = Self::empty(seed, 1);
        let disk = with_store.then(|| SimDisk::new(w.rng.next_u64()));
        w.boot(shards, disk);
        w
    }

    fn empty(seed: u64, nodes: usize) -> World {
        World {
            rng: Rng::new(seed),
            now_ms: 0,
            shards: Vec::new(),
            mailboxes: Vec::new(),
            clients: BTreeMap::new(),
            next_client: 0,
            store: None,
            acked_qos1: Vec::new(),
            left_at: BTreeMap::new(),
            wiped: BTreeSet::new(),
            restart_due: None,
            stats: Stats::default(),
            step: 0,
            store_refuse_pct: 0,
            nodes,
            broker: None,
        }
    }

    /// Starts the process: `shards` fresh shards and mailboxes and, on `disk`, the store
    /// (which loads what the files hold).
    fn boot(&mut self, shards: usize, disk: Option<SimDisk>) {
        let spn = shards / self.nodes;
        let mut nodes: Vec<Shared> = (0..self.nodes)
            .map(|_| Shared::standalone(sim_config(spn), spn))
            .collect();
        if self.nodes > 1 {
            let mb = cluster::ModelBroker::new(self.nodes, spn, |n| nodes[n].directory.clone());
            for (n, shared) in nodes.iter_mut().enumerate() {
                shared.broker = Some(mb.nodes[n].handle.clone());
                shared.node = format!("node{n}").into();
            }
            self.broker = Some(mb);
        }
        let now_unix = UNIX_BASE_MS + self.now_ms;
        self.store = disk.map(|disk| {
            let (tx, rx) = crate::queue::bounded(STORE_QUEUE);
            let handle = StoreHandle::new(tx);
            for shared in &mut nodes {
                shared.store = Some(handle.clone());
            }
            let answers = Answers::default();
            let store = open_store(&disk, &answers, shards, now_unix);
            SimStore {
                disk,
                store,
                handle,
                rx,
                answers,
            }
        });
        self.shards = (0..shards)
            .map(|i| {
                Router::new(
                    (i % spn) as u16,
                    spn as u16,
                    nodes[i / spn].clone(),
                    self.now_ms,
                    now_unix,
                )
            })
            .collect();
        self.mailboxes = (0..shards).map(|_| VecDeque::new()).collect();
    }

    /// The process is killed and started again: every connection and all mail is gone, and
    /// so is every store request not yet committed; the store then opens its files again —
    /// or, with `keep_files` false, finds none (a new epoch: what it had acknowledged is
    /// lost, and resumes from the old epoch must say so). Clients remember where they were.
    pub fn crash(&mut self, keep_files: bool) {
        let shards = self.shards.len();
        for c in self.clients.values_mut() {
            c.phase = Phase::Aborted;
            c.pipe.0.borrow_mut().client_shutdown();
        }
        self.shards.clear();
        self.reap();
        self.clients.clear();
        let disk = self.store.take().map(|st| {
            if !keep_files {
                self.wiped.insert(st.store.epoch().to_string());
                st.disk.wipe(self.rng.next_u64());
                // Acknowledged, then lost with the files: announced by the new epoch.
                self.acked_qos1.clear();
            }
            st.disk
        });
        self.stats.crashes += 1;
        self.boot(shards, disk);
    }

    /// A cluster's shared store restarts on its files (`keep_files`) or on none, while
    /// nothing is in flight; the nodes and their connections stay. Without the
    /// files what it acknowledged is gone, announced by the new epoch: connections that stay
    /// take the new epoch's messages from its first offset on.
    /// False when something was in flight (it restarts at the first step nothing is).
    fn restart_store(&mut self, keep_files: bool) -> bool {
        // Nothing in flight: an answer the store gave before losing its files would reach
        // its client after (not played).
        let in_flight = !self.store_idle()
            || !self.mailboxes.iter().all(|q| q.is_empty())
            || self.broker.as_ref().is_some_and(|b| !b.idle());
        if in_flight {
            self.restart_due = Some(keep_files);
            return false;
        }
        self.restart_due = None;
        let shards = self.shards.len();
        let now_unix = UNIX_BASE_MS + self.now_ms;
        let next_epoch = self.rng.next_u64();
        let Some(st) = self.store.as_mut() else {
            return true;
        };
        let old = st.store.epoch().to_string();
        if !keep_files {
            self.wiped.insert(old.clone());
            st.disk.wipe(next_epoch);
            self.acked_qos1.clear();
        }
        st.store = open_store(&st.disk, &st.answers, shards, now_unix);
        self.stats.store_restarts += 1;
        if keep_files {
            return true;
        }
        self.stats.store_wiped += 1;
        // A client that stays open (one replaying is closed to resume) is owed the new
        // epoch's inbox from its first offset: the gap check at the settle holds it to that.
        let new = st.store.epoch().to_string();
        for c in self.clients.values_mut() {
            if c.since.as_ref().is_some_and(|(e, _)| *e == old) {
                c.since_wiped_meanwhile = true;
            }
            if c.inbox_from.as_ref().is_some_and(|(e, _)| *e == old) {
                c.inbox_from = Some((new.clone(), 0));
                c.inbox_seen.clear();
            }
        }
        true
    }

    fn fail(&self, what: String) -> ! {
        panic!("step {}: {what}", self.step)
    }

    /// One random step, then the invariant checks.
    pub fn step(&mut self) {
        self.step += 1;
        self.stats.steps += 1;
        if let Some(keep) = self.restart_due {
            self.restart_store(keep);
        }
        if self.broker.is_some() && self.rng.chance(20) {
            // Now and then a node's connection to Redis drops, or comes back.
            if self.rng.chance(6) {
                if let Some(b) = self.broker.as_mut() {
                    b.fault(&mut self.rng);
                }
            }
            self.broker_turn();
        }
        match self.rng.below(100) {
            0..=5 => self.connect(),
            6..=30 => {
                for _ in 0..1 + self.rng.below(6) {
                    self.client_op();
                }
            }
            31..=47 => self.transmit(),
            48..=62 => self.client_reads(None),
            63..=79 => {
                let s = self.rng.below(self.shards.len() as u64) as usize;
                self.turn(s);
            }
            80..=84 => self.advance(),
            85..=87 => self.leave(),
            88..=93 if self.store.is_some() => {
                // Rarely, the process dies (and, more rarely, its files with it).
                if self.nodes > 1 && self.rng.chance(15) {
                    // A cluster's Redis restarts with what it persisted, or without it (a
                    // failover to a replica that lost the streams): the nodes stay up.
                    let keep = !self.rng.chance(30);
                    self.restart_store(keep);
                } else if self.nodes == 1 && self.rng.chance(1) && self.rng.chance(20) {
                    let keep = !self.rng.chance(30);
                    self.crash(keep);
                } else {
                    self.store_turn();
                }
            }
            _ => {
                for s in 0..self.shards.len() {
                    self.turn(s);
                }
            }
        }
        self.check();
    }

    fn connect(&mut self) {
        if self.clients.len() >= MAX_CLIENTS {
            return;
        }
        let s = self.rng.below(self.shards.len() as u64) as usize;
        if self.rng.chance(15) {
            return self.api_call(s);
        }
        let user = if self.rng.chance(75) {
            Some(NAMES[self.rng.below(NAMES.len() as u64) as usize])
        } else {
            None
        };
        let capacity = if self.rng.chance(20) { 512 } else { 64 * 1024 };
        let answers_pings = !self.rng.chance(10);
        let slow = self.rng.chance(15);
        // A device of the user that left comes back and resumes where it was.
        let resume = self.rng.chance(60);
        let since = match user {
            Some(u) if resume => self
                .left_at
                .get_mut(u)
                .and_then(|v| (!v.is_empty()).then(|| v.remove(0))),
            _ => None,
        };
        let sse = self.rng.chance(20);
        self.connect_as(s, user, since, capacity, (answers_pings, slow), sse);
    }

    /// A backend calls the push API on shard `s`: a DM (qos 1 with a store, sometimes) or a
    /// publication, one request with `Connection: close`.
    fn api_call(&mut self, s: usize) {
        let to = NAMES[self.rng.below(NAMES.len() as u64) as usize];
        let channel = CHANNELS[self.rng.below(CHANNELS.len() as u64) as usize];
        let kind = self.rng.below(3);
        let qos1 = self.store.is_some() && self.rng.chance(60);
        let id = self.connect_as(s, None, None, 64 * 1024, (true, false), false);
        let data = serde_json::json!({"c": id, "n": 1});
        let (path, body, recipient) = match kind {
            0 if qos1 => {
                let rid = request_id(id, 1);
                let b =
                    serde_json::json!({"to": to, "data": data, "qos": 1, "id": rid.to_string()});
                ("/api/send", b, Some(to))
            }
            0 | 1 => (
                "/api/send",
                serde_json::json!({"to": to, "data": data}),
                None,
            ),
            _ => (
                "/api/publish",
                serde_json::json!({"channel": channel, "data": data}),
                None,
            ),
        };
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: sim\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let c = self.clients.get_mut(&id).expect("just connected");
        c.api = Some(recipient);
        c.unsent = req.into_bytes().into();
    }

    /// A push-API call's answer: 200 (a qos-1 send's says where it was stored), or 503 when
    /// the store's queue is full; nothing else.
    fn parse_api(&mut self, id: usize) {
        let c = self.clients.get_mut(&id).expect("listed");
        if c.phase != Phase::Handshake {
            return;
        }
        let h = match testkit::parse_response_head(&c.rbuf) {
            Ok(None) => return,
            Ok(Some(h)) => h,
            Err(e) => self.fail(format!("client {id}: API answer: {e}")),
        };
        let len: usize = h
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if c.rbuf.len() < h.head_len + len {
            return;
        }
        let body: Value =
            serde_json::from_slice(&c.rbuf[h.head_len..h.head_len + len]).unwrap_or_default();
        c.rbuf.drain(..h.head_len + len);
        c.phase = Phase::Closing;
        match h.status {
            200 => {
                self.stats.api_calls += 1;
                if let Some(Some(to)) = c.api {
                    if body["stored"] != true || body["offset"].as_u64().is_none() {
                        self.fail(format!("client {id}: a qos-1 API send answered {body}"));
                    }
                    let epoch = body["epoch"].as_str().unwrap_or_default().to_owned();
                    self.acked_qos1.push((id, 1, to, epoch));
                    self.stats.qos1_acked += 1;
                }
            }
            503 if body["error"].is_string() => {}
            st => self.fail(format!("client {id}: API answered {st}: {body}")),
        }
    }

    /// A client of `user` connects to shard `s` as a WebSocket or (`sse`) an event stream,
    /// resuming the user's inbox from `since` if given (its request queued to send).
    fn connect_as(
        &mut self,
        s: usize,
        user: Option<&'static str>,
        since: Option<(String, u64)>,
        capacity: usize,
        (answers_pings, slow): (bool, bool),
        sse: bool,
    ) -> usize {
        let pipe = SimSocket::new(capacity);
        let sh = &mut self.shards[s];
        sh.set_clock(self.now_ms, UNIX_BASE_MS + self.now_ms);
        let key = sh.accept(pipe.clone(), true);
        let conn = sh.conns().conn_id(key);
        let path = match (user, &since) {
            (Some(u), Some((e, o))) => format!("/ws?user={u}&since={e}:{o}"),
            (Some(u), None) => format!("/ws?user={u}"),
            (None, _) => "/ws".to_owned(),
        };
        let id = self.next_client;
        self.next_client += 1;
        self.stats.connections += 1;
        let req = if sse {
            // A browser's EventSource: the channels in the query, the position in
            // `Last-Event-ID`.
            let who = user.map_or(String::new(), |u| format!("user={u}&"));
            let resume = since.as_ref().map_or(String::new(), |(e, o)| {
                format!("Last-Event-ID: {e}:{o}\r\n")
            });
            format!(
                "GET /events?{who}channel={}&channel={} HTTP/1.1\r\nHost: sim\r\n{resume}\r\n",
                CHANNELS[0], CHANNELS[2]
            )
        } else {
            testkit::upgrade_request("sim", &path)
        };
        self.clients.insert(
            id,
            Client {
                shard: s,
                conn,
                pipe,
                user,
                sse,
                last_event_id: None,
                api: None,
                phase: Phase::Handshake,
                unsent: req.into_bytes().into(),
                rbuf: Vec::new(),
                answers_pings,
                slow,
                next_seq: 0,
                dm_seen: BTreeMap::new(),
                pub_seen: BTreeMap::new(),
                ever_subscribed: if sse {
                    [CHANNELS[0], CHANNELS[2]].into_iter().collect()
                } else {
                    BTreeSet::new()
                },
                pending_ids: BTreeSet::new(),
                acked: BTreeSet::new(),
                qos1: BTreeMap::new(),
                inbox_at: since.clone(),
                inbox_from: None,
                inbox_seen: BTreeSet::new(),
                since,
                replay: None,
                dms: BTreeSet::new(),
                welcomed: false,
                close_code: None,
                since_wiped_meanwhile: false,
            },
        );
        id
    }

    fn pick_client(&mut self) -> Option<usize> {
        if self.clients.is_empty() {
            return None;
        }
        let i = self.rng.below(self.clients.len() as u64) as usize;
        self.clients.keys().nth(i).copied()
    }

    /// A protocol op from a random open client (bytes are queued; `transmit` sends them).
    fn client_op(&mut self) {
        let Some(id) = self.pick_client() else {
            return;
        };
        let r = self.rng.below(100);
        let target = NAMES[self.rng.below(NAMES.len() as u64) as usize];
        let channel = CHANNELS[self.rng.below(CHANNELS.len() as u64) as usize];
        let pad_len = self.rng.below(600) as usize;
        let qos1 = self.store.is_some() && self.rng.chance(50);
        let c = self.clients.get_mut(&id).expect("picked");
        if c.phase != Phase::Open || !c.welcomed || c.sse || c.api.is_some() {
            return;
        }
        c.next_seq += 1;
        let n = c.next_seq;
        // Request ids are unique in the run (a qos-1 id is its sender's idempotency key, per
        // user: two devices of one user reusing an id would be one message twice).
        let rid = request_id(id, n);
        let msg = match r {
            0..=44 if qos1 => {
                c.pending_ids.insert(n);
                c.qos1.insert(n, target);
                serde_json::json!({"op":"send","to":target,"data":{"c":id,"n":n},"id":rid,"qos":1})
            }
            0..=44 => {
                c.pending_ids.insert(n);
                serde_json::json!({"op":"send","to":target,"data":{"c":id,"n":n},"id":rid})
            }
            45..=59 => {
                c.ever_subscribed.insert(channel);
                serde_json::json!({"op":"sub","channel":channel,"id":rid})
            }
            60..=69 => serde_json::json!({"op":"unsub","channel":channel,"id":rid}),
            70..=89 => {
                let pad = "x".repeat(pad_len);
                serde_json::json!({"op":"pub","channel":channel,"data":{"c":id,"n":n,"pad":pad}})
            }
            90..=94 => serde_json::json!({"op":"ping","data":n}),
            _ => serde_json::json!({"op":"nonsense","id":rid}),
        };
        c.unsent
            .extend(testkit::text_frame(&msg.to_string()).iter().copied());
    }

    /// Clients hand a random prefix of their unsent bytes to the pipe (each with a coin
    /// toss), so requests arrive split at random points.
    fn transmit(&mut self) {
        let ids: Vec<usize> = self.clients.keys().copied().collect();
        for id in ids {
            let go = self.rng.chance(50);
            let piece = 1 + self.rng.below(300) as usize;
            let c = self.clients.get_mut(&id).expect("listed");
            if !go || c.unsent.is_empty() || c.phase == Phase::Aborted {
                continue;
            }
            let n = piece.min(c.unsent.len());
            let bytes: Vec<u8> = c.unsent.drain(..n).collect();
            c.pipe.0.borrow_mut().client_write(&bytes);
        }
    }

    /// Clients read what the server wrote (`only`: one client; else every client that is not
    /// slow, and slow ones rarely) and react: answer pings and close frames, check messages.
    fn client_reads(&mut self, only: Option<usize>) {
        let ids: Vec<usize> = match only {
            Some(i) => vec![i],
            None => self.clients.keys().copied().collect(),
        };
        for id in ids {
            let slow_skip = self.rng.chance(90);
            let c = self.clients.get_mut(&id).expect("listed");
            if only.is_none() && c.slow && slow_skip {
                continue;
            }
            if c.phase == Phase::Aborted {
                continue;
            }
            let got = c.pipe.0.borrow_mut().client_read();
            c.rbuf.extend_from_slice(&got);
            self.parse_client(id);
        }
    }

    fn parse_client(&mut self, id: usize) {
        if self.clients[&id].sse {
            return self.parse_sse(id);
        }
        if self.clients[&id].api.is_some() {
            return self.parse_api(id);
        }
        loop {
            let c = self.clients.get_mut(&id).expect("listed");
            if c.phase == Phase::Handshake {
                let Some(h) = self.response_head(id) else {
                    return;
                };
                if h.status != 101 {
                    self.fail(format!("client {id} upgrade refused: {}", h.status));
                }
                self.clients.get_mut(&id).expect("listed").phase = Phase::Open;
                continue;
            }
            let f = match testkit::take_frame(&mut c.rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => return,
                Err(e) => self.fail(format!("client {id}: bad server frame: {e}")),
            };
            if f.masked || !f.fin {
                self.fail(format!("client {id}: server frame masked or fragmented"));
            }
            match f.opcode {
                0x9 => {
                    if c.answers_pings && c.phase == Phase::Open {
                        c.unsent
                            .extend(testkit::client_frame(0xA, &f.payload, [1, 2, 3, 4]));
                    }
                }
                0x8 => {
                    let code = u16::from_be_bytes([f.payload[0], f.payload[1]]);
                    c.close_code = Some(code);
                    match code {
                        4000 => self.stats.heartbeat_closes += 1,
                        4001 => self.stats.slow_consumer_closes += 1,
                        _ => {}
                    }
                    if c.phase == Phase::Open {
                        c.phase = Phase::Closing;
                        c.unsent.extend(testkit::close_frame(code, ""));
                    }
                    c.pending_ids.clear();
                    c.qos1.clear();
                }
                0x1 => {
                    let v: Value = match serde_json::from_slice(&f.payload) {
                        Ok(v) => v,
                        Err(e) => self.fail(format!("client {id}: event is not JSON: {e}")),
                    };
                    self.on_event(id, v);
                }
                op => self.fail(format!("client {id}: unexpected opcode {op}")),
            }
        }
    }

    /// The HTTP response head client `id` has read, taken off its buffer (`None`: not whole
    /// yet); a malformed one fails the run, showing what came instead.
    fn response_head(&mut self, id: usize) -> Option<testkit::ResponseHead> {
        let c = self.clients.get_mut(&id).expect("listed");
        match testkit::parse_response_head(&c.rbuf) {
            Ok(None) => None,
            Ok(Some(h)) => {
                c.rbuf.drain(..h.head_len);
                Some(h)
            }
            Err(e) => {
                let head = String::from_utf8_lossy(&c.rbuf[..c.rbuf.len().min(200)]).into_owned();
                self.fail(format!("client {id}: {e}: {head:?}"))
            }
        }
    }

    /// An event stream's bytes: its response head, then blocks (`id:`, `event:`, `data:`,
    /// comments) each ended by a blank line.
    fn parse_sse(&mut self, id: usize) {
        loop {
            let c = self.clients.get_mut(&id).expect("listed");
            if c.phase == Phase::Handshake {
                let Some(h) = self.response_head(id) else {
                    return;
                };
                let c = self.clients.get_mut(&id).expect("listed");
                if h.status != 200 {
                    // Refused (e.g. over a limit): the server closes it.
                    c.rbuf.clear();
                    c.phase = Phase::Aborted;
                    c.pipe.0.borrow_mut().client_shutdown();
                    return;
                }
                c.phase = Phase::Open;
                // An event stream has no welcome: the head is its start.
                c.welcomed = true;
                continue;
            }
            let Some(end) = c.rbuf.windows(2).position(|w| w == b"\n\n") else {
                return;
            };
            let block: Vec<u8> = c.rbuf.drain(..end + 2).collect();
            let text = match std::str::from_utf8(&block) {
                Ok(t) => t.to_owned(),
                Err(e) => self.fail(format!("client {id}: SSE block not UTF-8: {e}")),
            };
            let (mut event, mut data, mut block_id) = (None, None, None);
            if std::env::var("SIM_DEBUG").is_ok_and(|v| v == id.to_string()) {
                eprintln!("step {} client {id}: {text:?}", self.step);
            }
            for line in text.lines() {
                if let Some(v) = line.strip_prefix("id: ") {
                    block_id = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("event: ") {
                    event = Some(v.to_owned());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(v.to_owned());
                } else if !(line.is_empty() || line.starts_with(':') || line.starts_with("retry: "))
                {
                    self.fail(format!("client {id}: unknown SSE line {line:?}"));
                }
            }
            let c = self.clients.get_mut(&id).expect("listed");
            if let Some(b) = &block_id {
                c.last_event_id = Some(b.clone());
            }
            let json = |d: &str| -> Value {
                serde_json::from_str(d)
                    .unwrap_or_else(|e| panic!("client {id}: SSE data is not JSON: {e}"))
            };
            match (event.as_deref(), data) {
                (Some("resume"), Some(d)) => self.on_inbox_opened(id, &json(&d)),
                (Some(other), _) => self.fail(format!("client {id}: unknown SSE event {other}")),
                (None, Some(d)) => {
                    self.stats.sse_events += 1;
                    self.on_event(id, json(&d));
                    self.check_sse_id(id);
                }
                (None, None) => {
                    // An id-only block: where a stream opened at the top stands.
                    let c = self.clients.get_mut(&id).expect("listed");
                    if let Some((e, o)) = block_id.as_deref().and_then(|b| b.split_once(':')) {
                        if c.inbox_at.is_none() {
                            c.inbox_at = Some((e.to_owned(), o.parse().unwrap_or(0)));
                        }
                    }
                }
            }
        }
    }

    /// A named event stream's ids are its inbox position once it is known.
    fn check_sse_id(&mut self, id: usize) {
        let c = &self.clients[&id];
        if self.store.is_none() || c.user.is_none() {
            return;
        }
        if let (Some((e, o)), Some(last)) = (&c.inbox_at, &c.last_event_id) {
            // The store lost the inbox's epoch and the stream moved to the new one before
            // any inbox event of it came: its id names the new epoch's start.
            let moved = last
                .split_once(':')
                .filter(|(le, lo)| *lo == "0" && le != e && self.wiped.contains(e))
                .map(|(le, _)| le.to_owned());
            if let Some(le) = moved {
                let c = self.clients.get_mut(&id).expect("listed");
                c.inbox_at = Some((le, 0));
                return;
            }
            if *last != format!("{e}:{o}") {
                self.fail(format!("client {id}: event id {last}, position {e}:{o}"));
            }
        }
    }

    /// What a resuming connection is told about its inbox (the welcome's `inbox`, or an
    /// event stream's `resume` event): a recovered resume promises a replay up to its top.
    fn on_inbox_opened(&mut self, id: usize, inbox: &Value) {
        let step = self.step;
        let c = self.clients.get_mut(&id).expect("listed");
        let fail = |what: String| -> ! { panic!("step {step}: client {id}: {what}") };
        let (Some((_, from)), Some(e), Some(top)) = (
            c.since.as_ref(),
            inbox["epoch"].as_str(),
            inbox["offset"].as_u64(),
        ) else {
            return;
        };
        let since_epoch = c.since.as_ref().map(|(e, _)| e.as_str());
        let gone = since_epoch.is_some_and(|e| self.wiped.contains(e)) && !c.since_wiped_meanwhile;
        if gone && inbox["reason"] != "epoch_changed" {
            fail(format!(
                "resumed from a store whose files were lost: {inbox}"
            ));
        }
        match inbox["recovered"].as_bool() {
            Some(true) => {
                self.stats.resumed += 1;
                c.replay = (top > *from).then(|| (e.to_owned(), from + 1, top));
                c.inbox_at = Some((e.to_owned(), *from));
            }
            Some(false) if inbox["reason"].is_string() => c.inbox_at = None,
            _ => fail(format!("a resume without its outcome: {inbox}")),
        }
    }

    fn on_event(&mut self, id: usize, v: Value) {
        let step = self.step;
        let c = self.clients.get_mut(&id).expect("listed");
        let fail = |what: String| -> ! { panic!("step {step}: client {id}: {what}") };
        let op = v["op"].as_str().unwrap_or("");
        if !c.welcomed && op != "welcome" {
            fail(format!("{op} before the welcome"));
        }
        match op {
            "welcome" => {
                if c.welcomed {
                    fail("two welcomes".into());
                }
                c.welcomed = true;
                if let Some(u) = c.user {
                    if v["user"] != u {
                        fail(format!("welcomed as {}", v["user"]));
                    }
                }
                if let (Some(e), Some(top)) =
                    (v["inbox"]["epoch"].as_str(), v["inbox"]["offset"].as_u64())
                {
                    let from = match (&c.since, v["inbox"]["recovered"].as_bool()) {
                        (Some((_, since)), Some(true)) => *since,
                        _ => top,
                    };
                    c.inbox_from = Some((e.to_owned(), from));
                }
                self.on_inbox_opened(id, &v["inbox"]);
            }
            "msg" => {
                let sender = v["data"]["c"].as_u64().unwrap_or(u64::MAX) as usize;
                let n = v["data"]["n"].as_u64().unwrap_or(0);
                if let Some(to) = v["to"].as_str() {
                    let from = v["from"].as_str().unwrap_or("");
                    let mine = c.user.is_some_and(|u| u == to || u == from);
                    if !mine {
                        fail(format!(
                            "DM from {from} to {to} reached a connection of {:?}",
                            c.user
                        ));
                    }
                    let stored = v["offset"].as_u64();
                    if let (Some(o), Some(e)) = (stored, v["epoch"].as_str()) {
                        // A promised replay: every offset up to the top, once, in order.
                        if let Some((re, next, top)) = c.replay.as_mut() {
                            if re == e && o <= *top {
                                if o != *next {
                                    fail(format!("replay gave offset {o}, {next} was due"));
                                }
                                *next += 1;
                                self.stats.replayed += 1;
                            } else {
                                fail(format!("offset {o} before the replay reached {next}"));
                            }
                            if *next > *top {
                                c.replay = None;
                            }
                        }
                        // The user's inbox, in offset order, each offset once.
                        if let Some((pe, po)) = &c.inbox_at {
                            if pe == e && o <= *po {
                                fail(format!("inbox offset {o} after {po}"));
                            }
                        }
                        c.inbox_at = Some((e.to_owned(), o));
                        if c.inbox_from.as_ref().is_some_and(|(fe, _)| fe == e) {
                            c.inbox_seen.insert(o);
                        }
                    }
                    let last = c.dm_seen.entry((sender, stored.is_some())).or_insert(0);
                    if n <= *last {
                        fail(format!(
                            "DM {n} from client {sender} after {last}: order broken"
                        ));
                    }
                    *last = n;
                    c.dms.insert((sender, n));
                    self.stats.dms_received += 1;
                } else if let Some(ch) = v["channel"].as_str() {
                    let Some(&ch) = CHANNELS.iter().find(|&&x| x == ch) else {
                        fail(format!("message for unknown channel {ch}"));
                    };
                    if !c.ever_subscribed.contains(ch) {
                        fail(format!("message for {ch}, never subscribed"));
                    }
                    let last = c.pub_seen.entry((sender, ch)).or_insert(0);
                    if n <= *last {
                        fail(format!("{ch} message {n} from {sender} after {last}"));
                    }
                    *last = n;
                    self.stats.pubs_received += 1;
                } else {
                    fail(format!("msg without target: {v}"));
                }
            }
            "ack" | "error" => {
                if let Some(n) = v["id"].as_u64().and_then(|r| request_seq(id, r)) {
                    // Errors and acks answer requests; a `send` gets exactly one.
                    c.pending_ids.remove(&n);
                    let qos1 = c.qos1.remove(&n);
                    if op == "ack" {
                        c.acked.insert(n);
                        if let Some(to) = qos1 {
                            if v["offset"].as_u64().is_none() {
                                fail(format!("a qos-1 ack without its offset: {v}"));
                            }
                            let epoch = v["epoch"].as_str().unwrap_or_default().to_owned();
                            self.acked_qos1.push((id, n, to, epoch));
                            self.stats.qos1_acked += 1;
                            // Its own copy, in its inbox, is not delivered to it.
                            if let (Some(o), Some(e)) = (v["offset"].as_u64(), v["epoch"].as_str())
                            {
                                if c.inbox_from.as_ref().is_some_and(|(fe, _)| fe == e) {
                                    c.inbox_seen.insert(o);
                                }
                            }
                        }
                    }
                }
            }
            "pong" => {}
            _ => fail(format!("unknown event {v}")),
        }
    }

    /// One turn of shard `s`, as its event loop would run it.
    // Refused store requests go back whole (see `router::PostStore`).
    #[allow(clippy::result_large_err)]
    fn turn(&mut self, s: usize) {
        let now = self.now_ms;
        let mail_n = 1 + self.rng.below(MAILBOX_CAPACITY as u64) as usize;
        let sh = &mut self.shards[s];
        sh.set_clock(now, UNIX_BASE_MS + now);
        for c in self.clients.values() {
            if c.shard != s || !sh.conns().is_live(c.conn) {
                continue;
            }
            let (readable, writable, closed) = {
                let mut p = c.pipe.0.borrow_mut();
                let r = std::mem::take(&mut p.read_edge);
                let w = std::mem::take(&mut p.write_edge);
                (r, w, p.client_fin)
            };
            if writable {
                sh.on_writable(c.conn.slot as usize);
            }
            if readable {
                // As the shard does with epoll's read-closed: after the peer's FIN, read on
                // past a short read, to the end.
                sh.on_readable(c.conn.slot as usize, closed);
            }
        }
        for _ in 0..mail_n {
            let Some(m) = self.mailboxes[s].pop_front() else {
                break;
            };
            sh.on_mail(m);
        }
        sh.drain_read_backlog();
        sh.on_timers();
        let mailboxes = &mut self.mailboxes;
        let full = &mut self.stats.mailbox_full;
        let spn = mailboxes.len() / self.nodes;
        let base = s / spn * spn;
        sh.post_mail(|to, msg| {
            let q = &mut mailboxes[base + to as usize];
            if q.len() >= MAILBOX_CAPACITY {
                *full += 1;
                Err(msg)
            } else {
                q.push_back(msg);
                Ok(())
            }
        });
        if let Some(st) = &self.store {
            // A store whose queue is full now and then: every request's refusal path runs.
            let (rng, refused) = (&mut self.rng, &mut self.stats.store_refused);
            let refuse_pct = self.store_refuse_pct;
            let broker = self.broker.as_ref();
            let node = s / spn;
            sh.post_requests(&mut |mut req| {
                if refuse_pct > 0 && rng.chance(refuse_pct) {
                    *refused += 1;
                    return Err(req);
                }
                // A cluster's shared store names shards by their place in the world.
                if let Some(b) = broker {
                    b.store_request(node, &mut req, false);
                }
                st.handle.try_request(req).map_err(|mut req| {
                    if let Some(b) = broker {
                        b.store_request(node, &mut req, true);
                    }
                    req
                })
            });
        }
        if let Some(b) = &self.broker {
            let h = &b.nodes[s / spn].handle;
            sh.post_broker(&mut |req| h.publish(req), &mut |i| h.interest(i));
        }
        sh.flush();
    }

    /// One round of the drain: clients finish writing and read everything (answering close
    /// frames), every shard turns, the store and the broker take their turns; checks.
    fn round_no_clock(&mut self) {
        let ids: Vec<usize> = self.clients.keys().copied().collect();
        for id in &ids {
            let c = self.clients.get_mut(id).expect("listed");
            if c.phase != Phase::Aborted && !c.unsent.is_empty() {
                let bytes: Vec<u8> = c.unsent.drain(..).collect();
                c.pipe.0.borrow_mut().client_write(&bytes);
            }
        }
        for id in ids {
            self.client_reads(Some(id));
        }
        for s in 0..self.shards.len() {
            self.turn(s);
        }
        self.store_turn();
        self.broker_turn();
        self.check();
    }

    /// [`Self::round_no_clock`], then 50 ms pass.
    fn round(&mut self) {
        self.round_no_clock();
        self.now_ms += 50;
    }

    /// No new requests: clients write what they have and read, shards, the store and the
    /// broker run until everything sent is through (catch-ups included), at most 200 rounds;
    /// then every client still open must have every inbox offset after its welcome.
    fn settle(&mut self) {
        // At least 3 s of virtual time: work that waits on a timer (a request asked again)
        // leaves every queue empty meanwhile.
        for round in 0..200 {
            self.round();
            let quiet = self.mailboxes.iter().all(|q| q.is_empty())
                && self
                    .shards
                    .iter()
                    .all(|s| !s.has_retries() && !s.has_requests() && !s.catching_up())
                && self.store_idle()
                && self.broker.as_ref().is_none_or(|b| b.idle());
            if quiet && round >= 60 {
                break;
            }
        }
        let step = self.step;
        let Some(st) = self.store.as_mut() else {
            return;
        };
        let epoch = st.store.epoch().to_string();
        let mut inboxes: BTreeMap<&'static str, Vec<u64>> = BTreeMap::new();
        for (id, c) in &self.clients {
            let open = c.phase == Phase::Open && c.close_code.is_none() && c.welcomed;
            let (Some(user), Some((e, from))) = (c.user, c.inbox_from.as_ref()) else {
                continue;
            };
            if !open || c.sse || c.api.is_some() || *e != epoch || c.replay.is_some() {
                continue;
            }
            let offsets = inboxes.entry(user).or_insert_with(|| {
                let stream = crate::store::inbox_stream(user);
                st.store
                    .entries(&stream)
                    .into_iter()
                    .map(|(o, _)| o)
                    .collect()
            });
            if let Some(o) = offsets
                .iter()
                .find(|&&o| o > *from && !c.inbox_seen.contains(&o))
            {
                panic!(
                    "step {step}: client {id} ({user}), open since its welcome at {from}, never got inbox offset {o}"
                );
            }
        }
    }

    /// The broker's threads of every node take what the shards posted, and what they carry
    /// goes to the mailboxes (as far as they have room).
    fn broker_turn(&mut self) {
        let Some(b) = self.broker.as_mut() else {
            return;
        };
        for n in 0..self.nodes {
            b.turn(n);
        }
        b.deliver(&mut self.mailboxes, MAILBOX_CAPACITY);
    }

    /// The store takes some of its queued requests as one batch (commits come late, in
    /// random sizes), then hands its answers on.
    fn store_turn(&mut self) {
        let n = 1 + self.rng.below(16) as usize;
        let now = UNIX_BASE_MS + self.now_ms;
        let Some(st) = self.store.as_mut() else {
            return;
        };
        let mut reqs: Vec<StoreReq> = st.rx.try_iter().take(n).collect();
        if !reqs.is_empty() {
            st.store.apply(&mut reqs, now);
            self.stats.store_batches += 1;
        }
        self.post_store_answers();
    }

    /// The store's answers go to the shard mailboxes in order; a full mailbox holds up the
    /// rest until it has room (the store thread waits for it too: nothing is dropped).
    fn post_store_answers(&mut self) {
        let Some(st) = self.store.as_ref() else {
            return;
        };
        let mut q = st.answers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = self.broker.as_mut() {
            // A cluster's: answers to their shards, stored events through the broker.
            for (g, msgs) in std::mem::take(&mut *q) {
                for (to, m) in b.store_answers(g as usize, msgs) {
                    b.store_out.push_back((to, m));
                }
            }
            b.deliver(&mut self.mailboxes, MAILBOX_CAPACITY);
            return;
        }
        while let Some((shard, _)) = q.front() {
            let mailbox = &mut self.mailboxes[*shard as usize];
            if mailbox.len() >= MAILBOX_CAPACITY {
                self.stats.mailbox_full += 1;
                return;
            }
            let (_, msgs) = q.pop_front().expect("looked at");
            mailbox.push_back(ShardMsg::StoreBatch(msgs));
        }
    }

    /// Whether the store has nothing queued and nothing to hand on.
    fn store_idle(&self) -> bool {
        self.store.as_ref().is_none_or(|st| {
            st.rx.is_empty()
                && st
                    .answers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .is_empty()
        })
    }

    /// Every acknowledged qos-1 send is in its recipient's inbox, exactly once.
    fn audit_store(&mut self) {
        let Some(st) = self.store.as_mut() else {
            return;
        };
        let mut inboxes: BTreeMap<&'static str, BTreeMap<(usize, u64), usize>> = BTreeMap::new();
        let now = st.store.epoch().to_string();
        for (client, n, to, epoch) in &self.acked_qos1 {
            // Acked in an epoch whose store lost its files: announced by the new epoch.
            if *epoch != now && self.wiped.contains(epoch) {
                continue;
            }
            let (client, n, to) = (*client, *n, *to);
            let found = inboxes.entry(to).or_insert_with(|| {
                let mut m = BTreeMap::new();
                for (_, p) in st.store.entries(&crate::store::inbox_stream(to)) {
                    let v: Value = serde_json::from_slice(&p).unwrap_or_default();
                    let (Some(c), Some(n)) = (v["data"]["c"].as_u64(), v["data"]["n"].as_u64())
                    else {
                        continue;
                    };
                    if v["to"] == to {
                        *m.entry((c as usize, n)).or_insert(0) += 1;
                    }
                }
                m
            });
            let copies = found.get(&(client, n)).copied().unwrap_or(0);
            if copies != 1 {
                for (o, p) in st.store.entries(&crate::store::inbox_stream(to)) {
                    eprintln!("{to} {o}: {}", String::from_utf8_lossy(&p));
                }
            }
            assert_eq!(
                copies, 1,
                "qos-1 send {n} of client {client} to {to} was acked and is stored {copies} times"
            );
        }
    }

    /// The clock moves by a random amount (mostly short, sometimes past every heartbeat).
    fn advance(&mut self) {
        let d = match self.rng.below(10) {
            0..=5 => 1 + self.rng.below(20),
            6..=8 => 50 + self.rng.below(250),
            _ => 1_000 + self.rng.below(2_500),
        };
        self.now_ms += d;
    }

    /// A random client leaves: a close frame, or the TCP connection just drops.
    fn leave(&mut self) {
        let Some(id) = self.pick_client() else {
            return;
        };
        let abort = self.rng.chance(40);
        let c = self.clients.get_mut(&id).expect("picked");
        // An event stream ends the only way a browser ends one: the TCP connection goes.
        let abort = abort || c.sse || c.api.is_some();
        match c.phase {
            Phase::Open if !abort => {
                c.phase = Phase::Closing;
                c.unsent.extend(testkit::close_frame(1000, "bye"));
            }
            Phase::Aborted => {}
            _ => {
                c.phase = Phase::Aborted;
                c.unsent.clear();
                c.pipe.0.borrow_mut().client_shutdown();
            }
        }
    }

    /// Forgets clients whose server side is finished and whose bytes are all read.
    fn reap(&mut self) {
        let shards = &self.shards;
        let left_at = &mut self.left_at;
        self.clients.retain(|_, c| {
            let live = shards
                .get(c.shard)
                .is_some_and(|s| s.conns().is_live(c.conn));
            let keep = live || !c.pipe.0.borrow().to_client.is_empty() && c.phase != Phase::Aborted;
            if !keep {
                if let (Some(u), Some(at)) = (c.user, c.inbox_at.take()) {
                    let v = left_at.entry(u).or_default();
                    v.push(at);
                    if v.len() > 4 {
                        v.remove(0);
                    }
                }
            }
            keep
        });
    }

    /// Invariants after every step.
    pub fn check(&mut self) {
        for sh in &self.shards {
            sh.check_invariants();
        }
        for q in &self.mailboxes {
            assert!(q.len() <= MAILBOX_CAPACITY, "a mailbox passed its bound");
        }
        // Every client the server still holds has exactly one connection in its shard.
        for (id, c) in &self.clients {
            let sh = &self.shards[c.shard];
            if sh.conns().is_live(c.conn) {
                assert!(
                    sh.conns().has_deadline(c.conn.slot as usize),
                    "client {id}'s connection has no deadline"
                );
            }
        }
        self.reap();
    }

    /// Everyone leaves; the clock runs until every shard is empty. Then every table must be.
    pub fn drain(&mut self) {
        if let Some(b) = self.broker.as_mut() {
            b.heal();
        }
        self.settle();
        for round in 0..2_000 {
            if round == 21 {
                // Every client still open was checked (below); half of them leave with a
                // close frame, the rest drop later.
                let ids: Vec<usize> = self.clients.keys().copied().collect();
                for id in ids {
                    let c = self.clients.get_mut(&id).expect("listed");
                    if c.phase == Phase::Open && !c.sse && c.api.is_none() && self.rng.chance(50) {
                        c.phase = Phase::Closing;
                        c.unsent.extend(testkit::close_frame(1000, "bye"));
                    }
                }
            }
            // Clients finish writing, read everything, answer close frames.
            self.round_no_clock();
            if round == 20 {
                // The server had time to answer everything, the store to commit: a client
                // still open has an answer to every send (acked, or refused with why).
                for (id, c) in &self.clients {
                    let open = c.phase == Phase::Open && c.close_code.is_none();
                    if open && c.unsent.is_empty() && !c.pending_ids.is_empty() {
                        self.fail(format!(
                            "client {id}: sends {:?} never answered",
                            c.pending_ids
                        ));
                    }
                    // And it was welcomed: its registration (with a broker, its
                    // subscription) did not wait forever.
                    if open && !c.sse && c.api.is_none() && !c.welcomed {
                        self.fail(format!("client {id}: open, never welcomed"));
                    }
                }
            }
            if round > 10 && round % 10 == 0 {
                // Whoever is still open drops (heartbeats would close them anyway).
                for c in self.clients.values_mut() {
                    if c.phase != Phase::Aborted {
                        c.phase = Phase::Aborted;
                        c.pipe.0.borrow_mut().client_shutdown();
                    }
                }
            }
            self.now_ms += 50;
            let empty = self.shards.iter().all(|s| s.conns().is_empty())
                && self.mailboxes.iter().all(|q| q.is_empty())
                && self
                    .shards
                    .iter()
                    .all(|s| !s.has_retries() && !s.has_requests())
                && self.store_idle()
                && self.broker.as_ref().is_none_or(|b| b.idle());
            if empty {
                self.audit_store();
                if let Some(b) = &self.broker {
                    b.check_end();
                }
                let spn = self.shards.len() / self.nodes;
                for (i, sh) in self.shards.iter().enumerate() {
                    let hub = sh.hub();
                    assert_eq!(hub.local_channels(), 0, "shard {i}: channels left");
                    let home = sh.directory().home_len((i % spn) as u16);
                    assert_eq!(home, 0, "shard {i}: directory not empty");
                    assert_eq!(sh.conns().wheel_len(), 0, "shard {i}: wheel not empty");
                }
                return;
            }
        }
        for sh in &self.shards {
            for k in sh.conns().keys() {
                let c = sh.conns().conn(k).expect("listed");
                let id = sh.conns().conn_id(k);
                let client = self
                    .clients
                    .iter()
                    .find(|(_, cl)| cl.conn == id)
                    .map(|(i, cl)| {
                        let p = cl.pipe.0.borrow();
                        (
                            *i,
                            cl.phase,
                            cl.sse,
                            cl.shard,
                            p.read_edge,
                            p.client_fin,
                            p.to_server.len(),
                        )
                    });
                eprintln!(
                    "left: key {k} state {:?} flags {:?} user {:?} outbox {:?} deadline {} waits {} client {client:?}",
                    c.state,
                    c.flags,
                    c.user,
                    c.outbox.as_ref().map(|o| o.bytes),
                    sh.conns().has_deadline(k),
                    c.input_waits()
                );
            }
        }
        let left: Vec<usize> = self.shards.iter().map(|s| s.conns().len()).collect();
        self.fail(format!(
            "connections did not drain: {left:?} per shard, mail {:?}",
            self.mailboxes.iter().map(|q| q.len()).collect::<Vec<_>>()
        ));
    }
}

/// Plays seed `seed` for `steps` steps on `shards` shards, then drains. Panics (naming the
/// step) when an invariant breaks.
pub fn run(seed: u64, shards: usize, steps: u64) -> Stats {
    // Every other seed has a store: qos-1 sends, inboxes and their audit; every fourth is
    // a cluster of two nodes over the model broker, half of those with a shared store.
    let mut w = match seed % 4 {
        1 | 3 => World::with_store(seed, shards),
        2 => World::cluster(seed, 2, shards.div_ceil(2), seed % 8 == 6),
        _ => World::new(seed, shards),
    };
    w.store_refuse_pct = STORE_REFUSE_PCT;
    for _ in 0..steps {
        w.step();
    }
    w.drain();
    if let Some(b) = &w.broker {
        w.stats.broker_carried = b.carried;
        w.stats.broker_lost = b.lost;
        w.stats.broker_faults = b.faults;
        w.stats.broker_unavailable = b.unavailable;
    }
    w.stats
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every client hands over all it has, every shard turns, every client reads.
    fn pump(w: &mut World) {
        let ids: Vec<usize> = w.clients.keys().copied().collect();
        for id in &ids {
            let c = w.clients.get_mut(id).expect("listed");
            let bytes: Vec<u8> = c.unsent.drain(..).collect();
            c.pipe.0.borrow_mut().client_write(&bytes);
        }
        for s in 0..w.shards.len() {
            w.turn(s);
        }
        for id in ids {
            w.client_reads(Some(id));
        }
        w.check();
    }

    /// [`pump`] with the store taking every request too.
    fn pump_all(w: &mut World) {
        pump(w);
        while w.store.as_ref().is_some_and(|st| !st.rx.is_empty()) {
            w.store_turn();
        }
        w.post_store_answers();
    }

    /// ann sends bob `n` qos-1 DMs (bob is away); every one is acked.
    fn send_to_away_bob(w: &mut World, from: u64, to: u64) -> usize {
        let ann = w.connect_as(0, Some("ann"), None, 1 << 20, (true, false), false);
        for _ in 0..20 {
            pump_all(w);
        }
        assert!(w.clients[&ann].welcomed);
        for n in from..=to {
            let c = w.clients.get_mut(&ann).expect("ann");
            let m = serde_json::json!({"op":"send","to":"bob","data":{"c":ann,"n":n},"id":request_id(ann, n),"qos":1});
            c.unsent
                .extend(testkit::text_frame(&m.to_string()).iter().copied());
            c.pending_ids.insert(n);
            c.qos1.insert(n, "bob");
        }
        for _ in 0..40 {
            pump_all(w);
        }
        let acked = &w.clients[&ann].acked;
        assert!((from..=to).all(|n| acked.contains(&n)), "{acked:?}");
        ann
    }

    /// bob connects resuming from `since`; his welcome.
    fn bob_resumes(w: &mut World, since: (String, u64)) -> usize {
        let bob = w.connect_as(1, Some("bob"), Some(since), 1 << 20, (true, false), false);
        for _ in 0..40 {
            pump_all(w);
        }
        assert!(w.clients[&bob].welcomed);
        bob
    }

    #[test]
    fn a_crash_keeps_what_was_acked_and_lost_files_are_announced() {
        let mut w = World::with_store(11, 2);
        send_to_away_bob(&mut w, 1, 3);
        let epoch = w.store.as_ref().expect("store").store.epoch().to_string();
        // Killed and started again on the same files: bob gets all three, in order.
        w.crash(true);
        let bob = bob_resumes(&mut w, (epoch.clone(), 0));
        let got: Vec<u64> = w.clients[&bob].dms.iter().map(|&(_, n)| n).collect();
        assert_eq!(got, vec![1, 2, 3]);
        assert_eq!(w.clients[&bob].inbox_at, Some((epoch.clone(), 3)));
        w.audit_store();
        // Killed again, the files lost: a resume from the old epoch is told, not replayed.
        send_to_away_bob(&mut w, 4, 5);
        w.crash(false);
        assert_ne!(
            w.store.as_ref().expect("store").store.epoch().to_string(),
            epoch
        );
        let bob = bob_resumes(&mut w, (epoch, 3));
        assert!(w.clients[&bob].dms.is_empty());
        assert_eq!(w.stats.resumed, 1, "only the first resume recovered");
        w.drain();
    }

    #[test]
    fn a_full_mailbox_never_loses_an_acked_dm() {
        let mut w = World::new(7, 2);
        // ann and bob on different shards: a DM goes from ann's shard straight to bob's, and
        // those copies meet a full mailbox while bob's shard does not turn.
        let (from, to) = (0, 1);
        let alice = w.connect_as(from, Some("ann"), None, 1 << 20, (true, false), false);
        let bob = w.connect_as(to, Some("bob"), None, 1 << 20, (true, false), false);
        for _ in 0..50 {
            pump(&mut w);
        }
        assert!(w.clients[&alice].welcomed && w.clients[&bob].welcomed);
        // Bursts small enough for the connection's outbound limit; the sender's shard reads
        // each and turns alone for a while, so its mail to the holder piles up against the
        // bound.
        let (bursts, per_burst) = (15u64, 30u64);
        let sends = bursts * per_burst;
        for b in 0..bursts {
            let c = w.clients.get_mut(&alice).expect("alice");
            for n in b * per_burst + 1..=(b + 1) * per_burst {
                let m = serde_json::json!({"op":"send","to":"bob","data":{"c":alice,"n":n},"id":request_id(alice, n)});
                c.unsent
                    .extend(testkit::text_frame(&m.to_string()).iter().copied());
                c.pending_ids.insert(n);
            }
            let bytes: Vec<u8> = c.unsent.drain(..).collect();
            c.pipe.0.borrow_mut().client_write(&bytes);
            for _ in 0..3 {
                w.turn(from);
                w.client_reads(None);
            }
            if b % 3 == 2 {
                w.turn(to);
            }
        }
        for _ in 0..500 {
            pump(&mut w);
        }
        assert!(w.stats.mailbox_full > 0, "the scenario must fill a mailbox");
        assert_eq!(
            (w.clients[&alice].close_code, w.clients[&bob].close_code),
            (None, None),
            "both stay connected"
        );
        let acked = &w.clients[&alice].acked;
        let got: BTreeSet<u64> = w.clients[&bob]
            .dms
            .iter()
            .filter(|(c, _)| *c == alice)
            .map(|&(_, n)| n)
            .collect();
        let lost: Vec<u64> = acked.difference(&got).copied().collect();
        assert!(!acked.is_empty(), "some DMs must be acked");
        assert!(lost.is_empty(), "acked but never delivered: {lost:?}");
        assert!(
            w.clients[&alice].pending_ids.is_empty(),
            "every one of {sends} sends answered"
        );
    }
}
