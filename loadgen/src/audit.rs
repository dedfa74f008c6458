//! `dm --qos 1 --audit`: the client of a fault campaign. Each user (a thread with one
//! blocking WebSocket, users paired `2k` ↔ `2k+1`) sends qos-1 DMs to its peer at its share
//! of `--rate`, each with an id of its own (`<user>-<seq>`), and behaves as a careful client
//! does through faults:
//! - a send answered `unavailable`, or not answered before the connection went, is sent
//!   again with the same id (the server's dedup window stores it once); any other error is
//!   `refused` (the sender was told why: not a loss);
//! - it takes its inbox from the start (`since=:0`), and after any close or failed connect
//!   it reconnects, moving to the next `--url`, and resumes with `since=<epoch>:<offset>` of
//!   the last message it took;
//! - what it receives is deduplicated by (epoch, offset), as a client's offset dedup does;
//!   the same message (same sender sequence) taken twice after that is a `duplicate`.
//!
//! After `--duration` it stops sending and waits (at most `--drain`) until every
//! acknowledged message has reached its recipient. Then `acked_lost` counts acknowledged
//! messages their recipient never received, and the audit reads every inbox through
//! `GET /api/history/inbox:<user>` and counts acknowledged messages not stored
//! (`audit_missing`) and messages stored twice (`audit_duplicates`). `longest_unavailable_ms`
//! is the longest time any user went from a failure (an `unavailable` answer or a lost
//! connection) to its next acknowledgement (or to the end, if none came). Every loop ends by
//! itself: the run's deadline and the drain bound them.

use std::collections::{BTreeMap, BTreeSet};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tungstenite::{Message, WebSocket};

use crate::plan::Target;

/// How long a read waits before the user looks at its sends again.
const READ_SLICE: Duration = Duration::from_millis(20);
/// Wait before a send answered `unavailable` goes again.
const RETRY_AFTER: Duration = Duration::from_millis(100);
/// A send with no answer on a live connection goes again after this long.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait between two connection attempts.
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// Most users (threads) an audit runs.
pub const MAX_USERS: usize = 2_000;

/// What to run.
#[derive(Debug, Clone)]
pub struct Audit {
    /// Servers, in the order a user moves through them.
    pub targets: Vec<Target>,
    /// Users (an even number: pairs).
    pub users: usize,
    /// DMs per second, all users together.
    pub rate: f64,
    /// How long users send.
    pub duration: Duration,
    /// Longest wait, after sending stops, for every acked message to arrive.
    pub drain: Duration,
    /// User name prefix.
    pub prefix: String,
}

/// The outcome.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    /// Distinct messages sent (retries not counted).
    pub sent: u64,
    /// Sends again of a message (same id).
    pub retries: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Sends answered with an error other than `unavailable`.
    pub refused: u64,
    /// `unavailable` answers.
    pub unavailable: u64,
    /// Acknowledged messages their recipient never received (even after resuming).
    pub acked_lost: u64,
    /// Messages received twice after offset dedup.
    pub duplicates: u64,
    /// Messages received again at an offset already taken (dropped, as offset dedup does).
    pub redelivered: u64,
    /// Connections opened again after a close or a failed connect.
    pub reconnects: u64,
    /// Resumes answered `recovered:false` with `epoch_changed` (an announced loss).
    pub epoch_changes: u64,
    /// Longest stretch from a failure to the next acknowledgement of one user (ms).
    pub longest_unavailable_ms: u64,
    /// Acknowledged messages the audit did not find stored.
    pub audit_missing: u64,
    /// Messages the audit found stored twice.
    pub audit_duplicates: u64,
    /// Whether every inbox could be read for the audit.
    pub audit_complete: bool,
}

impl Report {
    /// Whether nothing was lost or doubled.
    pub fn clean(&self) -> bool {
        self.acked_lost == 0
            && self.duplicates == 0
            && self.audit_missing == 0
            && self.audit_duplicates == 0
            && self.audit_complete
    }
}

/// Counters the users share.
#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    retries: AtomicU64,
    acked: AtomicU64,
    refused: AtomicU64,
    unavailable: AtomicU64,
    duplicates: AtomicU64,
    redelivered: AtomicU64,
    reconnects: AtomicU64,
    epoch_changes: AtomicU64,
    longest_unavailable_ms: AtomicU64,
}

struct Shared {
    audit: Audit,
    counters: Counters,
    /// Per user: the sequences of its messages that were acknowledged.
    acked: Vec<Mutex<BTreeSet<u64>>>,
    /// Per user: the sequences of its peer's messages it received.
    received: Vec<Mutex<BTreeSet<u64>>>,
    /// Per user: whether it has no send waiting for an answer.
    settled: Vec<AtomicBool>,
    sending: AtomicBool,
    stop: AtomicBool,
}

fn user(prefix: &str, i: usize) -> String {
    format!("{prefix}{i}")
}

/// Runs the audit; the report once every user stopped.
pub fn run(audit: Audit) -> Report {
    let n = audit.users;
    let shared = Arc::new(Shared {
        counters: Counters::default(),
        acked: (0..n).map(|_| Mutex::default()).collect(),
        received: (0..n).map(|_| Mutex::default()).collect(),
        settled: (0..n).map(|_| AtomicBool::new(true)).collect(),
        sending: AtomicBool::new(true),
        stop: AtomicBool::new(false),
        audit,
    });
    let threads: Vec<_> = (0..n)
        .map(|i| {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("audit-{i}"))
                .spawn(move || User::new(i, &s).run(&s))
                .expect("spawn an audit user")
        })
        .collect();
    std::thread::sleep(shared.audit.duration);
    shared.sending.store(false, Relaxed);
    let drain_end = Instant::now() + shared.audit.drain;
    while Instant::now() < drain_end && !all_arrived(&shared) {
        std::thread::sleep(Duration::from_millis(50));
    }
    shared.stop.store(true, Relaxed);
    for t in threads {
        let _ = t.join();
    }
    report(&shared)
}

/// Every send answered, and every acknowledged message received.
fn all_arrived(s: &Shared) -> bool {
    s.settled.iter().all(|b| b.load(Relaxed)) && lost(s) == 0
}

/// Acknowledged messages not received by their recipient.
fn lost(s: &Shared) -> u64 {
    (0..s.audit.users)
        .map(|u| {
            let acked = s.acked[u].lock().unwrap();
            let got = s.received[u ^ 1].lock().unwrap();
            acked.difference(&got).count() as u64
        })
        .sum()
}

fn report(s: &Shared) -> Report {
    let c = &s.counters;
    let mut r = Report {
        sent: c.sent.load(Relaxed),
        retries: c.retries.load(Relaxed),
        acked: c.acked.load(Relaxed),
        refused: c.refused.load(Relaxed),
        unavailable: c.unavailable.load(Relaxed),
        acked_lost: lost(s),
        duplicates: c.duplicates.load(Relaxed),
        redelivered: c.redelivered.load(Relaxed),
        reconnects: c.reconnects.load(Relaxed),
        epoch_changes: c.epoch_changes.load(Relaxed),
        longest_unavailable_ms: c.longest_unavailable_ms.load(Relaxed),
        audit_complete: true,
        ..Report::default()
    };
    for u in 0..s.audit.users {
        let peer = user(&s.audit.prefix, u ^ 1);
        let Some(stored) = stored_from(&s.audit.targets, &peer, &user(&s.audit.prefix, u)) else {
            r.audit_complete = false;
            continue;
        };
        let acked = s.acked[u].lock().unwrap();
        let mut seen = BTreeSet::new();
        for seq in stored {
            if !seen.insert(seq) {
                r.audit_duplicates += 1;
            }
        }
        r.audit_missing += acked.difference(&seen).count() as u64;
    }
    r
}

/// The sequences of `from`'s messages stored in `inbox_user`'s inbox, read page by page from
/// the first server that answers.
fn stored_from(targets: &[Target], inbox_user: &str, from: &str) -> Option<Vec<u64>> {
    'servers: for t in targets {
        let mut out = Vec::new();
        let mut since = 0u64;
        // Bounded: at most this many pages of 1000.
        for _ in 0..1000 {
            let path = format!("/api/history/inbox:{inbox_user}?since={since}&limit=1000");
            let Some(body) = crate::http::get(t, &path, Duration::from_secs(5)) else {
                continue 'servers;
            };
            let Ok(v) = serde_json::from_str::<Value>(&body) else {
                continue 'servers;
            };
            let msgs = v["messages"].as_array().cloned().unwrap_or_default();
            if msgs.is_empty() {
                return Some(out);
            }
            for m in &msgs {
                if m["from"] == from {
                    if let Some(seq) = m["data"]["s"].as_u64() {
                        out.push(seq);
                    }
                }
            }
            let next = v["next"].as_u64().unwrap_or(0);
            if next <= since + 1 {
                return Some(out);
            }
            since = next - 1;
        }
        return Some(out);
    }
    None
}

/// A send waiting for its answer.
struct Pending {
    /// When it may go (again).
    resend_at: Instant,
    /// Whether it went out once already.
    sent: bool,
}

/// One user's side: its connection, inbox position and sends in flight.
struct User {
    index: usize,
    name: String,
    peer: String,
    /// Which target next.
    target: usize,
    /// (epoch, offset) of the last inbox message taken.
    position: Option<(String, u64)>,
    next_seq: u64,
    /// Sequence → when it may be sent again.
    pending: BTreeMap<u64, Pending>,
    /// Since when this user has been failing (unanswered by a failure), if it is.
    failing_since: Option<Instant>,
    period: Duration,
    next_send: Instant,
}

impl User {
    fn new(index: usize, s: &Shared) -> User {
        let a = &s.audit;
        let per_user = (a.rate / a.users as f64).max(0.001);
        let period = Duration::from_secs_f64(1.0 / per_user);
        // Spread the users' first sends over one period.
        let offset = period.mul_f64(index as f64 / a.users as f64);
        User {
            index,
            name: user(&a.prefix, index),
            peer: user(&a.prefix, index ^ 1),
            target: index % a.targets.len(),
            position: None,
            next_seq: 0,
            pending: BTreeMap::new(),
            failing_since: None,
            period,
            next_send: Instant::now() + offset,
        }
    }

    fn run(&mut self, s: &Shared) {
        let mut backoff = Duration::from_millis(50);
        while !s.stop.load(Relaxed) {
            match self.connect(s) {
                Some(mut ws) => {
                    backoff = Duration::from_millis(50);
                    self.serve(&mut ws, s);
                    let _ = ws.close(None);
                }
                None => {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
            if s.stop.load(Relaxed) {
                break;
            }
            // Any close or failed connect: note the failure, try the next server.
            self.failing_since.get_or_insert_with(Instant::now);
            s.counters.reconnects.fetch_add(1, Relaxed);
            self.target = (self.target + 1) % s.audit.targets.len();
        }
        // A failure never followed by an acknowledgement lasts until the end.
        if let Some(t) = self.failing_since {
            s.counters
                .longest_unavailable_ms
                .fetch_max(t.elapsed().as_millis() as u64, Relaxed);
        }
    }

    /// Opens a connection (resuming from the last position), reads the welcome.
    fn connect(&mut self, s: &Shared) -> Option<WebSocket<TcpStream>> {
        let t = &s.audit.targets[self.target];
        // The first connection takes the inbox from its start (messages may be waiting).
        let since = match &self.position {
            Some((e, o)) => format!("&since={e}:{o}"),
            None => "&since=:0".to_owned(),
        };
        let url = format!("ws://{}{}?user={}{since}", t.host, t.path, self.name);
        let tcp = TcpStream::connect_timeout(&t.addr, Duration::from_secs(1)).ok()?;
        tcp.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        let (mut ws, _) = tungstenite::client(url.as_str(), tcp).ok()?;
        let welcome = read_json(&mut ws)?;
        if welcome["op"] != "welcome" {
            return None;
        }
        let inbox = &welcome["inbox"];
        if inbox["recovered"] == false && inbox["reason"] == "epoch_changed" {
            s.counters.epoch_changes.fetch_add(1, Relaxed);
        }
        if inbox["recovered"] == false && inbox["reason"] == "unavailable" {
            return None; // the store cannot tell now: resume again later
        }
        // A position that no longer holds: the welcome's.
        if inbox["recovered"] == false {
            if let (Some(e), Some(o)) = (inbox["epoch"].as_str(), inbox["offset"].as_u64()) {
                self.position = Some((e.to_owned(), o));
            }
        }
        ws.get_mut().set_read_timeout(Some(READ_SLICE)).ok()?;
        // What was in flight goes again, in order, with the same ids.
        let now = Instant::now();
        for p in self.pending.values_mut() {
            p.resend_at = now;
        }
        Some(ws)
    }

    /// Sends, resends and reads until the connection fails or the run stops.
    fn serve(&mut self, ws: &mut WebSocket<TcpStream>, s: &Shared) {
        while !s.stop.load(Relaxed) {
            let now = Instant::now();
            if s.sending.load(Relaxed) && now >= self.next_send {
                let seq = self.next_seq;
                self.next_seq += 1;
                self.next_send += self.period;
                let p = Pending {
                    resend_at: now,
                    sent: false,
                };
                self.pending.insert(seq, p);
                s.counters.sent.fetch_add(1, Relaxed);
            }
            let due: Vec<u64> = self
                .pending
                .iter()
                .filter(|(_, p)| p.resend_at <= now)
                .map(|(&q, _)| q)
                .collect();
            for seq in due {
                if !self.send(ws, seq) {
                    return;
                }
                let p = self.pending.get_mut(&seq).expect("pending");
                if p.sent {
                    s.counters.retries.fetch_add(1, Relaxed);
                }
                p.sent = true;
                p.resend_at = now + ANSWER_TIMEOUT;
            }
            s.settled[self.index].store(self.pending.is_empty(), Relaxed);
            match ws.read() {
                Ok(Message::Text(t)) => {
                    if let Ok(v) = serde_json::from_str::<Value>(t.as_str()) {
                        self.take(&v, s);
                    }
                }
                Ok(Message::Close(_)) => return,
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => return,
            }
        }
    }

    fn send(&mut self, ws: &mut WebSocket<TcpStream>, seq: u64) -> bool {
        let m = serde_json::json!({
            "op": "send", "to": self.peer, "qos": 1,
            "id": format!("{}-{seq}", self.name), "data": {"s": seq},
        });
        ws.send(Message::text(m.to_string())).is_ok()
    }

    /// Takes one message from the server.
    fn take(&mut self, v: &Value, s: &Shared) {
        let seq_of_id = |v: &Value| {
            v["id"]
                .as_str()
                .and_then(|i| i.rsplit_once('-'))
                .and_then(|(_, q)| q.parse::<u64>().ok())
        };
        match v["op"].as_str() {
            Some("ack") => {
                let Some(seq) = seq_of_id(v) else { return };
                if self.pending.remove(&seq).is_none() {
                    return; // the answer to a resend of an acked message
                }
                s.acked[self.index].lock().unwrap().insert(seq);
                s.counters.acked.fetch_add(1, Relaxed);
                if let Some(t) = self.failing_since.take() {
                    s.counters
                        .longest_unavailable_ms
                        .fetch_max(t.elapsed().as_millis() as u64, Relaxed);
                }
            }
            Some("error") => {
                let Some(seq) = seq_of_id(v) else { return };
                if v["code"] == "unavailable" {
                    s.counters.unavailable.fetch_add(1, Relaxed);
                    self.failing_since.get_or_insert_with(Instant::now);
                    if let Some(p) = self.pending.get_mut(&seq) {
                        p.resend_at = Instant::now() + RETRY_AFTER;
                    }
                } else if self.pending.remove(&seq).is_some() {
                    s.counters.refused.fetch_add(1, Relaxed);
                }
            }
            Some("msg") => self.received(v, s),
            _ => {}
        }
    }

    /// An inbox message: offset dedup, then counted if it is the peer's.
    fn received(&mut self, v: &Value, s: &Shared) {
        let (Some(e), Some(o)) = (v["epoch"].as_str(), v["offset"].as_u64()) else {
            return;
        };
        if let Some((pe, po)) = &self.position {
            if pe == e && o <= *po {
                s.counters.redelivered.fetch_add(1, Relaxed);
                return;
            }
        }
        self.position = Some((e.to_owned(), o));
        if v["from"] != self.peer.as_str() {
            return; // this user's own sends, copied to its inbox
        }
        let Some(seq) = v["data"]["s"].as_u64() else {
            return;
        };
        if !s.received[self.index].lock().unwrap().insert(seq) {
            s.counters.duplicates.fetch_add(1, Relaxed);
        }
    }
}

/// The next text message as JSON (the welcome), within the connection's read timeout.
fn read_json(ws: &mut WebSocket<TcpStream>) -> Option<Value> {
    loop {
        match ws.read().ok()? {
            Message::Text(t) => return serde_json::from_str(t.as_str()).ok(),
            Message::Close(_) => return None,
            _ => {}
        }
    }
}
