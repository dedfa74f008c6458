//! Deterministic simulation: several shards' [`Sessions`], their hubs, wheels and bounded
//! mailboxes, and the clients, all in one thread with a seeded scheduler and a virtual clock —
//! no sockets, no threads, no sleeping. Clients connect (named or anonymous), send DMs, join,
//! leave and publish to channels, write their bytes split at random points, read slowly or not
//! at all, leave pings unanswered, vanish without a close frame; shard mail is delayed at
//! random. After every step the invariants are checked (see [`World::check`]); at the end
//! every client leaves and every slab, hub table, wheel and mailbox must be empty.
//!
//! [`run`] plays one seed; a failure names the seed and the step, and replaying the seed
//! replays the run exactly.

pub mod pipe;

use std::collections::{BTreeMap, BTreeSet, VecDeque};

use serde_json::Value;

use crate::config::Config;
use crate::hub::ConnId;
use crate::mail::ShardMsg;
use crate::session::{Sessions, Shared};
use crate::testkit;
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
    phase: Phase,
    /// Bytes written but not yet handed to the pipe (handed over in random pieces).
    unsent: VecDeque<u8>,
    rbuf: Vec<u8>,
    answers_pings: bool,
    /// A slow reader reads only rarely.
    slow: bool,
    next_seq: u64,
    /// Highest DM sequence seen per sending client.
    dm_seen: BTreeMap<usize, u64>,
    /// Highest channel sequence seen per (sending client, channel).
    pub_seen: BTreeMap<(usize, &'static str), u64>,
    ever_subscribed: BTreeSet<&'static str>,
    pending_ids: BTreeSet<u64>,
    /// Request ids answered `ack`.
    acked: BTreeSet<u64>,
    /// DMs received, as (sending client, sequence).
    dms: BTreeSet<(usize, u64)>,
    welcomed: bool,
    close_code: Option<u16>,
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
}

/// The simulated process: shards, mailboxes, clients, clock.
pub struct World {
    rng: Rng,
    now_ms: u64,
    shards: Vec<Sessions<SimSocket>>,
    mailboxes: Vec<VecDeque<ShardMsg>>,
    clients: BTreeMap<usize, Client>,
    next_client: usize,
    /// Counts.
    pub stats: Stats,
    step: u64,
}

impl World {
    /// A world of `shards` shards seeded with `seed`.
    pub fn new(seed: u64, shards: usize) -> World {
        let shared = Shared::standalone(sim_config(shards), shards);
        World {
            rng: Rng::new(seed),
            now_ms: 0,
            shards: (0..shards)
                .map(|i| Sessions::new(i as u16, shards as u16, shared.clone(), 0, UNIX_BASE_MS))
                .collect(),
            mailboxes: (0..shards).map(|_| VecDeque::new()).collect(),
            clients: BTreeMap::new(),
            next_client: 0,
            stats: Stats::default(),
            step: 0,
        }
    }

    fn fail(&self, what: String) -> ! {
        panic!("step {}: {what}", self.step)
    }

    /// One random step, then the invariant checks.
    pub fn step(&mut self) {
        self.step += 1;
        self.stats.steps += 1;
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
        let user = if self.rng.chance(75) {
            Some(NAMES[self.rng.below(NAMES.len() as u64) as usize])
        } else {
            None
        };
        let capacity = if self.rng.chance(20) { 512 } else { 64 * 1024 };
        let answers_pings = !self.rng.chance(10);
        let slow = self.rng.chance(15);
        self.connect_on(s, user, capacity, answers_pings, slow);
    }

    /// A client of `user` connects to shard `s` (its upgrade request queued to send).
    fn connect_on(
        &mut self,
        s: usize,
        user: Option<&'static str>,
        capacity: usize,
        answers_pings: bool,
        slow: bool,
    ) -> usize {
        let pipe = SimSocket::new(capacity);
        let sh = &mut self.shards[s];
        sh.set_clock(self.now_ms, UNIX_BASE_MS + self.now_ms);
        let key = sh.accept(pipe.clone(), true);
        let conn = sh.conn_id(key);
        let path = match user {
            Some(u) => format!("/ws?user={u}"),
            None => "/ws".to_owned(),
        };
        let id = self.next_client;
        self.next_client += 1;
        self.stats.connections += 1;
        let req = testkit::upgrade_request("sim", &path);
        self.clients.insert(
            id,
            Client {
                shard: s,
                conn,
                pipe,
                user,
                phase: Phase::Handshake,
                unsent: req.into_bytes().into(),
                rbuf: Vec::new(),
                answers_pings,
                slow,
                next_seq: 0,
                dm_seen: BTreeMap::new(),
                pub_seen: BTreeMap::new(),
                ever_subscribed: BTreeSet::new(),
                pending_ids: BTreeSet::new(),
                acked: BTreeSet::new(),
                dms: BTreeSet::new(),
                welcomed: false,
                close_code: None,
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
        let c = self.clients.get_mut(&id).expect("picked");
        if c.phase != Phase::Open || !c.welcomed {
            return;
        }
        c.next_seq += 1;
        let n = c.next_seq;
        let msg = match r {
            0..=44 => {
                c.pending_ids.insert(n);
                serde_json::json!({"op":"send","to":target,"data":{"c":id,"n":n},"id":n})
            }
            45..=59 => {
                c.ever_subscribed.insert(channel);
                serde_json::json!({"op":"sub","channel":channel,"id":n})
            }
            60..=69 => serde_json::json!({"op":"unsub","channel":channel,"id":n}),
            70..=89 => {
                let pad = "x".repeat(pad_len);
                serde_json::json!({"op":"pub","channel":channel,"data":{"c":id,"n":n,"pad":pad}})
            }
            90..=94 => serde_json::json!({"op":"ping","data":n}),
            _ => serde_json::json!({"op":"nonsense","id":n}),
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
        loop {
            let c = self.clients.get_mut(&id).expect("listed");
            if c.phase == Phase::Handshake {
                match testkit::parse_response_head(&c.rbuf) {
                    Ok(None) => return,
                    Ok(Some(h)) => {
                        if h.status != 101 {
                            let step = self.step;
                            panic!("step {step}: client {id} upgrade refused: {}", h.status);
                        }
                        c.rbuf.drain(..h.head_len);
                        c.phase = Phase::Open;
                        continue;
                    }
                    Err(e) => self.fail(format!("client {id}: {e}")),
                }
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
                    let last = c.dm_seen.entry(sender).or_insert(0);
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
                if let Some(n) = v["id"].as_u64() {
                    // Errors and acks answer requests; a `send` gets exactly one.
                    c.pending_ids.remove(&n);
                    if op == "ack" {
                        c.acked.insert(n);
                    }
                }
            }
            "pong" => {}
            _ => fail(format!("unknown event {v}")),
        }
    }

    /// One turn of shard `s`, as its event loop would run it.
    fn turn(&mut self, s: usize) {
        let now = self.now_ms;
        let mail_n = 1 + self.rng.below(MAILBOX_CAPACITY as u64) as usize;
        let sh = &mut self.shards[s];
        sh.set_clock(now, UNIX_BASE_MS + now);
        for c in self.clients.values() {
            if c.shard != s || !sh.is_live(c.conn) {
                continue;
            }
            let (readable, writable) = {
                let mut p = c.pipe.0.borrow_mut();
                let r = std::mem::take(&mut p.read_edge);
                let w = std::mem::take(&mut p.write_edge);
                (r, w)
            };
            if writable {
                sh.on_writable(c.conn.slot as usize);
            }
            if readable {
                sh.on_readable(c.conn.slot as usize, false);
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
        sh.post_mail(|to, msg| {
            let q = &mut mailboxes[to as usize];
            if q.len() >= MAILBOX_CAPACITY {
                *full += 1;
                Err(msg)
            } else {
                q.push_back(msg);
                Ok(())
            }
        });
        sh.flush();
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
        self.clients.retain(|_, c| {
            let live = shards[c.shard].is_live(c.conn);
            live || !c.pipe.0.borrow().to_client.is_empty() && c.phase != Phase::Aborted
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
            if sh.is_live(c.conn) {
                assert!(
                    sh.has_deadline(c.conn.slot as usize),
                    "client {id}'s connection has no deadline"
                );
            }
        }
        self.reap();
    }

    /// Everyone leaves; the clock runs until every shard is empty. Then every table must be.
    pub fn drain(&mut self) {
        let ids: Vec<usize> = self.clients.keys().copied().collect();
        for id in ids {
            let c = self.clients.get_mut(&id).expect("listed");
            if c.phase == Phase::Open && self.rng.chance(50) {
                c.phase = Phase::Closing;
                c.unsent.extend(testkit::close_frame(1000, "bye"));
            }
        }
        for round in 0..2_000 {
            // Clients finish writing, read everything, answer close frames.
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
            self.check();
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
            let empty = self.shards.iter().all(|s| s.is_empty())
                && self.mailboxes.iter().all(|q| q.is_empty())
                && self.shards.iter().all(|s| !s.has_retries());
            if empty {
                for (i, sh) in self.shards.iter().enumerate() {
                    let hub = sh.hub();
                    assert_eq!(hub.local_channels(), 0, "shard {i}: channels left");
                    let home = sh.directory().home_len(i as u16);
                    assert_eq!(home, 0, "shard {i}: directory not empty");
                    assert_eq!(sh.wheel_len(), 0, "shard {i}: wheel not empty");
                }
                return;
            }
        }
        let left: Vec<usize> = self.shards.iter().map(|s| s.len()).collect();
        self.fail(format!(
            "connections did not drain: {left:?} per shard, mail {:?}",
            self.mailboxes.iter().map(|q| q.len()).collect::<Vec<_>>()
        ));
    }
}

/// Plays seed `seed` for `steps` steps on `shards` shards, then drains. Panics (naming the
/// step) when an invariant breaks.
pub fn run(seed: u64, shards: usize, steps: u64) -> Stats {
    let mut w = World::new(seed, shards);
    for _ in 0..steps {
        w.step();
    }
    w.drain();
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

    #[test]
    fn a_full_mailbox_never_loses_an_acked_dm() {
        let mut w = World::new(7, 2);
        // ann and bob on different shards: a DM goes from ann's shard straight to bob's, and
        // those copies meet a full mailbox while bob's shard does not turn.
        let (from, to) = (0, 1);
        let alice = w.connect_on(from, Some("ann"), 1 << 20, true, false);
        let bob = w.connect_on(to, Some("bob"), 1 << 20, true, false);
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
                let m = serde_json::json!({"op":"send","to":"bob","data":{"c":alice,"n":n},"id":n});
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
