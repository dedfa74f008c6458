//! The connection lifecycle in virtual time: bytes in through an in-memory pipe, the clock
//! moved by hand, no sockets and no sleeping.

use super::{Router, Shared};
use crate::config::Config;
use crate::sim::SimSocket;
use crate::testkit::{self, ServerFrame};

const UNIX_BASE_MS: u64 = 1_800_000_000_000;

/// One shard, its clock, and helpers to act as its clients and its event loop.
pub(super) struct Harness {
    s: Router<SimSocket>,
    /// The store's queue, when the test plays the store: requests are posted each turn.
    store: Option<crate::store::StoreHandle>,
    now_ms: u64,
    pipes: Vec<(usize, SimSocket)>,
}

pub(super) fn config() -> Config {
    Config {
        ping_interval_ms: 1_000,
        idle_timeout_ms: 3_000,
        timer_slack_ms: 0,
        handshake_timeout_ms: 2_000,
        close_timeout_ms: 500,
        max_outbound_bytes: 4_096,
        sse_heartbeat_ms: 1_500,
        ..Config::default()
    }
}

impl Harness {
    pub(super) fn new(cfg: Config) -> Harness {
        Harness::with_store(cfg, None)
    }

    fn with_store(cfg: Config, store: Option<crate::store::StoreHandle>) -> Harness {
        let shared = Shared {
            store: store.clone(),
            ..Shared::standalone(cfg, 1)
        };
        Harness {
            s: Router::new(0, 1, shared, 0, UNIX_BASE_MS),
            store,
            now_ms: 0,
            pipes: Vec::new(),
        }
    }

    /// Accepts a connection whose outbound direction holds `capacity` bytes.
    pub(super) fn accept(&mut self, capacity: usize) -> (usize, SimSocket) {
        let pipe = SimSocket::new(capacity);
        let key = self.s.accept(pipe.clone(), true);
        self.pipes.push((key, pipe.clone()));
        (key, pipe)
    }

    /// Accepts a connection from `ip` (counted against `--max-connections-per-ip`).
    fn accept_from(&mut self, ip: &str) -> (usize, SimSocket) {
        let pipe = SimSocket::new(64 * 1024);
        let key = self.s.accept_ip(pipe.clone(), ip.parse().unwrap());
        self.pipes.push((key, pipe.clone()));
        self.turn();
        (key, pipe)
    }

    /// One event-loop turn at the current clock.
    pub(super) fn turn(&mut self) {
        self.s.set_clock(self.now_ms, UNIX_BASE_MS + self.now_ms);
        for (key, pipe) in &self.pipes {
            let (r, w) = {
                let mut p = pipe.0.borrow_mut();
                (
                    std::mem::take(&mut p.read_edge),
                    std::mem::take(&mut p.write_edge),
                )
            };
            if w {
                self.s.on_writable(*key);
            }
            if r {
                self.s.on_readable(*key, false);
            }
        }
        self.s.drain_read_backlog();
        self.s.on_timers();
        self.s.post_mail(|_, _| panic!("one shard mails nobody"));
        if let Some(store) = &self.store {
            self.s.post_requests(&mut store.poster());
        }
        self.s.flush();
        self.s.check_invariants();
    }

    /// Moves the clock by `ms` and runs a turn.
    fn advance(&mut self, ms: u64) {
        self.now_ms += ms;
        self.turn();
    }

    pub(super) fn send(&mut self, pipe: &SimSocket, bytes: &[u8]) {
        pipe.0.borrow_mut().client_write(bytes);
        self.turn();
    }

    fn live(&self, key: usize) -> bool {
        self.s.conns().conn(key).is_some()
    }

    /// An upgraded connection that read its welcome.
    pub(super) fn open(&mut self, path: &str, capacity: usize) -> (usize, SimSocket, Vec<u8>) {
        let (key, pipe) = self.accept(capacity);
        self.send(&pipe, testkit::upgrade_request("t", path).as_bytes());
        let mut buf = pipe.0.borrow_mut().client_read();
        let head = testkit::parse_response_head(&buf).unwrap().expect("101");
        assert_eq!(head.status, 101);
        buf.drain(..head.head_len);
        let f = testkit::take_frame(&mut buf).unwrap().expect("welcome");
        assert!(String::from_utf8_lossy(&f.payload).contains("\"welcome\""));
        (key, pipe, buf)
    }
}

fn frames(pipe: &SimSocket, buf: &mut Vec<u8>) -> Vec<ServerFrame> {
    buf.extend(pipe.0.borrow_mut().client_read());
    let mut out = Vec::new();
    while let Some(f) = testkit::take_frame(buf).unwrap() {
        out.push(f);
    }
    out
}

fn close_code(f: &ServerFrame) -> (u16, String) {
    assert_eq!(f.opcode, 0x8, "a close frame");
    (
        u16::from_be_bytes([f.payload[0], f.payload[1]]),
        String::from_utf8(f.payload[2..].to_vec()).unwrap(),
    )
}

#[test]
fn upgrade_request_in_pieces() {
    let mut h = Harness::new(config());
    let (key, pipe) = h.accept(64 * 1024);
    let req = testkit::upgrade_request("t", "/ws?user=alice");
    for (i, b) in req.as_bytes().iter().enumerate() {
        assert!(
            pipe.0.borrow().to_client.is_empty(),
            "answered early at {i}"
        );
        h.send(&pipe, &[*b]);
        h.now_ms += 1;
    }
    let out = pipe.0.borrow_mut().client_read();
    let head = testkit::parse_response_head(&out).unwrap().unwrap();
    assert_eq!(head.status, 101);
    assert_eq!(
        head.header("sec-websocket-accept"),
        Some(testkit::SAMPLE_ACCEPT)
    );
    let mut rest = out[head.head_len..].to_vec();
    let f = testkit::take_frame(&mut rest).unwrap().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
    assert_eq!(
        (v["op"].as_str(), v["user"].as_str()),
        (Some("welcome"), Some("alice"))
    );
    assert!(h.live(key));
}

#[test]
fn handshake_deadline_drops_a_silent_connection() {
    let mut h = Harness::new(config());
    let (key, pipe) = h.accept(1024);
    h.send(&pipe, b"GET /ws HT");
    h.advance(1_999);
    assert!(h.live(key));
    h.advance(1);
    assert!(!h.live(key), "dropped at the handshake deadline");
}

#[test]
fn ping_without_pong_closes_with_4000() {
    let mut h = Harness::new(config());
    let (key, pipe, mut buf) = h.open("/ws?user=bob", 64 * 1024);
    // Ping after 1 s of silence plus up to a quarter interval of jitter.
    h.advance(999);
    assert!(frames(&pipe, &mut buf).is_empty());
    h.advance(251);
    let f = frames(&pipe, &mut buf);
    assert_eq!(f.len(), 1);
    assert_eq!(f[0].opcode, 0x9, "a ping");
    // No second ping while one is unanswered; at 3 s of silence the close comes.
    h.advance(1_000);
    assert!(frames(&pipe, &mut buf).is_empty(), "one ping outstanding");
    h.advance(750);
    let f = frames(&pipe, &mut buf);
    assert_eq!(close_code(&f[0]), (4000, "heartbeat timeout".into()));
    // The peer never answers: the close deadline ends it.
    h.advance(499);
    assert!(h.live(key));
    h.advance(1);
    assert!(!h.live(key));
}

#[test]
fn answered_pings_keep_a_connection() {
    let mut h = Harness::new(config());
    let (key, pipe, mut buf) = h.open("/ws?user=bob", 64 * 1024);
    for _ in 0..20 {
        h.advance(500);
        for f in frames(&pipe, &mut buf) {
            assert_eq!(f.opcode, 0x9);
            h.send(&pipe, &testkit::client_frame(0xA, &f.payload, [1, 2, 3, 4]));
        }
    }
    assert!(h.live(key), "alive after 10 s of answered pings");
}

#[test]
fn slow_reader_is_closed_with_4001() {
    let mut h = Harness::new(config());
    let (slow, slow_pipe, mut buf) = h.open("/ws?user=slow", 300);
    let (_, fast, _) = h.open("/ws?user=fast", 1 << 20);
    h.send(
        &slow_pipe,
        &testkit::text_frame(r#"{"op":"sub","channel":"r","id":1}"#),
    );
    let pad = "x".repeat(200);
    for i in 0..40 {
        let m = format!(r#"{{"op":"pub","channel":"r","data":"{pad}{i}"}}"#);
        h.send(&fast, &testkit::text_frame(&m));
        if !h.live(slow) {
            break;
        }
    }
    // What the slow reader gets: well-formed frames, ending with 4001.
    let mut last = None;
    for _ in 0..100 {
        let got = frames(&slow_pipe, &mut buf);
        h.turn();
        if let Some(f) = got.into_iter().find(|f| f.opcode == 0x8) {
            last = Some(close_code(&f));
            break;
        }
    }
    assert_eq!(
        last,
        Some((4001, "slow consumer: outbound queue over limit".into()))
    );
}

#[test]
fn close_handshake_started_by_the_peer() {
    let mut h = Harness::new(config());
    let (key, pipe, mut buf) = h.open("/ws?user=carol", 64 * 1024);
    h.send(&pipe, &testkit::close_frame(1000, "bye"));
    let f = frames(&pipe, &mut buf);
    assert_eq!(
        close_code(&f[0]),
        (1000, "bye".into()),
        "code and reason echoed"
    );
    assert!(!h.live(key), "both close frames exchanged: finished");
    // Without a reason, the answer still carries one.
    let (key, pipe, mut buf) = h.open("/ws?user=dan", 64 * 1024);
    h.send(&pipe, &testkit::close_frame(1001, ""));
    let (code, reason) = close_code(&frames(&pipe, &mut buf)[0]);
    assert_eq!(code, 1001);
    assert!(!reason.is_empty());
    assert!(!h.live(key));
}

#[test]
fn an_invalid_close_frame_is_answered_and_the_connection_ends_at_once() {
    let mut h = Harness::new(config());
    let mut long = vec![0x03, 0xe8];
    long.extend(std::iter::repeat_n(b'r', 124));
    let bad: [(&[u8], u16); 5] = [
        (&[0x03], 1002),             // 1-byte payload
        (&[0x03, 0xe7], 1002),       // code 999
        (&[0x03, 0xed], 1002),       // code 1005: may not be sent
        (&[0x03, 0xe8, 0xff], 1007), // reason not UTF-8
        (&long, 1002),               // a control frame over 125 bytes
    ];
    for (payload, want) in bad {
        let (key, pipe, mut buf) = h.open("/ws?user=erin", 64 * 1024);
        h.send(&pipe, &testkit::client_frame(0x8, payload, [7, 7, 7, 7]));
        let f = frames(&pipe, &mut buf);
        assert_eq!(close_code(&f[0]).0, want, "{payload:?}");
        assert!(
            !h.live(key),
            "{payload:?}: finished without waiting for another close"
        );
    }
}

#[test]
fn close_handshake_started_by_the_server_with_and_without_an_answer() {
    let mut h = Harness::new(config());
    let (a, pa, mut ba) = h.open("/ws?user=a", 64 * 1024);
    let (b, pb, mut bb) = h.open("/ws?user=b", 64 * 1024);
    h.s.begin_shutdown();
    h.turn();
    assert_eq!(close_code(&frames(&pa, &mut ba)[0]).0, 1001);
    assert_eq!(close_code(&frames(&pb, &mut bb)[0]).0, 1001);
    // `a` answers and is finished at once; `b` stays silent until the close deadline.
    h.send(&pa, &testkit::close_frame(1001, ""));
    assert!(!h.live(a));
    assert!(h.live(b));
    h.advance(500);
    assert!(!h.live(b));
    assert!(h.s.shutdown_done());
}

#[test]
fn token_expiry_closes_with_4003() {
    use jsonwebtoken::{encode, EncodingKey, Header};
    let cfg = Config {
        jwt_secret: Some("k".into()),
        ..config()
    };
    let mut h = Harness::new(cfg);
    let exp = UNIX_BASE_MS / 1000 + 5;
    let claims = serde_json::json!({"sub": "dan", "exp": exp});
    let t = encode(&Header::default(), &claims, &EncodingKey::from_secret(b"k")).unwrap();
    let (key, pipe, mut buf) = h.open(&format!("/ws?token={t}"), 64 * 1024);
    // Answer pings so only the token can end it.
    let mut code = None;
    for _ in 0..12 {
        h.advance(500);
        for f in frames(&pipe, &mut buf) {
            match f.opcode {
                0x9 => h.send(&pipe, &testkit::client_frame(0xA, &f.payload, [1, 2, 3, 4])),
                0x8 => code = Some((close_code(&f), h.now_ms)),
                _ => {}
            }
        }
        if code.is_some() {
            break;
        }
    }
    let ((c, reason), at) = code.expect("closed");
    assert_eq!((c, reason.as_str()), (4003, "token expired"));
    assert_eq!(at, 5_000, "at the token's exp on the shard clock");
    assert!(h.live(key), "waiting for the peer's close");
}

#[test]
fn sse_sends_a_comment_heartbeat() {
    let mut h = Harness::new(config());
    let (key, pipe) = h.accept(64 * 1024);
    h.send(
        &pipe,
        b"GET /events?user=eve&channel=news HTTP/1.1\r\nHost: t\r\n\r\n",
    );
    let out = pipe.0.borrow_mut().client_read();
    let head = testkit::parse_response_head(&out).unwrap().unwrap();
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-type"), Some("text/event-stream"));
    h.advance(1_499);
    assert!(pipe.0.borrow_mut().client_read().is_empty());
    h.advance(1);
    assert_eq!(pipe.0.borrow_mut().client_read(), b": heartbeat\n\n");
    assert!(h.live(key));
}

#[test]
fn websocket_and_sse_share_one_payload() {
    let mut h = Harness::new(config());
    let (_, ws, mut wbuf) = h.open("/ws?user=w", 64 * 1024);
    h.send(
        &ws,
        &testkit::text_frame(r#"{"op":"sub","channel":"c","id":1}"#),
    );
    frames(&ws, &mut wbuf);
    let (_, sse) = h.accept(64 * 1024);
    h.send(&sse, b"GET /events?channel=c HTTP/1.1\r\nHost: t\r\n\r\n");
    sse.0.borrow_mut().client_read();
    h.send(
        &ws,
        &testkit::text_frame("{\"op\":\"pub\",\"channel\":\"c\",\"data\":{\"a\":\n1}}"),
    );
    let f = frames(&ws, &mut wbuf);
    let event = String::from_utf8(sse.0.borrow_mut().client_read()).unwrap();
    let json = std::str::from_utf8(&f[0].payload).unwrap();
    assert_eq!(event, format!("id: 1\ndata: {json}\n\n"));
    assert!(!json.contains('\n'));
}

#[test]
fn empty_messages_are_echoed_and_the_close_is_answered() {
    // Autobahn 1.1.1 / 9.7.1: empty text messages, then a close.
    let cfg = Config {
        echo: true,
        ..config()
    };
    let mut h = Harness::new(cfg);
    let (key, pipe) = h.accept(64 * 1024);
    h.send(&pipe, testkit::upgrade_request("t", "/").as_bytes());
    let mut buf = pipe.0.borrow_mut().client_read();
    let head = testkit::parse_response_head(&buf).unwrap().unwrap();
    buf.drain(..head.head_len);
    let mut batch = Vec::new();
    for _ in 0..1000 {
        batch.extend(testkit::client_frame(0x1, b"", [1, 2, 3, 4]));
    }
    h.send(&pipe, &batch);
    let got = frames(&pipe, &mut buf);
    assert_eq!(got.len(), 1000);
    assert!(got.iter().all(|f| f.opcode == 0x1 && f.payload.is_empty()));
    h.send(&pipe, &testkit::close_frame(1000, ""));
    let got = frames(&pipe, &mut buf);
    assert_eq!(close_code(&got[0]).0, 1000);
    assert!(!h.live(key));
}

/// A shard with a store whose requests `rx` receives, and bob's WebSocket upgrading with
/// `since=ab:0` (his `Open` is the first request).
fn bob_resumes_from_ab_0() -> (
    Harness,
    crate::queue::Rx<crate::store::StoreReq>,
    SimSocket,
    crate::hub::ConnId,
) {
    let (tx, rx) = crate::queue::unbounded();
    let mut h = Harness::with_store(config(), Some(crate::store::StoreHandle::new(tx)));
    let (key, pipe) = h.accept(1 << 20);
    h.send(
        &pipe,
        testkit::upgrade_request("t", "/ws?user=bob&since=ab:0").as_bytes(),
    );
    let conn = h.s.conns().conn_id(key);
    (h, rx, pipe, conn)
}

#[test]
fn resume_seam_replays_then_joins_live_without_gap_or_duplicate() {
    use crate::mail::ShardMsg;
    use crate::store::{Epoch, Opened, Page, Since, StoreMsg, StoreReq};
    use bytes::Bytes;
    let (mut h, rx, pipe, conn) = bob_resumes_from_ab_0();
    let Ok(StoreReq::Open { user, since, .. }) = rx.try_recv() else {
        panic!("the session asks the store first")
    };
    assert_eq!(&*user, "bob");
    assert_eq!(
        since,
        Some(Since::Position {
            epoch: Some(Epoch(0xab)),
            offset: 0
        })
    );
    let ev = |o: u64| Bytes::from(format!(r#"{{"op":"msg","n":{o},"offset":{o}}}"#));
    let live = |h: &mut Harness, o: u64| {
        h.s.on_mail(ShardMsg::Store(Box::new(StoreMsg::Deliver {
            user: "bob".into(),
            payload: ev(o),
            offset: o,
            exclude: None,
            ack: None,
        })));
        h.turn();
    };
    // Stored while the store prepares the answer: the replay has it.
    live(&mut h, 3);
    h.s.on_mail(ShardMsg::Store(Box::new(StoreMsg::Opened(Box::new(
        Opened {
            conn,
            epoch: Epoch(0xab),
            top: 3,
            resume: Some(Ok(())),
            page: Page {
                entries: vec![(1, ev(1)), (2, ev(2))],
                next: 3,
                done: false,
            },
        },
    )))));
    h.turn();
    let mut buf = pipe.0.borrow_mut().client_read();
    let head = testkit::parse_response_head(&buf).unwrap().unwrap();
    buf.drain(..head.head_len);
    let mut seen = Vec::new();
    let collect = |buf: &mut Vec<u8>, seen: &mut Vec<serde_json::Value>| {
        for f in frames(&pipe, buf) {
            seen.push(serde_json::from_slice(&f.payload).unwrap());
        }
    };
    collect(&mut buf, &mut seen);
    // The outbox drained: the next page is asked for from offset 3.
    h.turn();
    let Ok(StoreReq::Page { from, epoch, .. }) = rx.try_recv() else {
        panic!("the next page is asked for")
    };
    assert_eq!(
        (from, epoch),
        (3, Epoch(0xab)),
        "a position in the welcome's epoch"
    );
    // Live while replaying: skipped (the page will have it).
    live(&mut h, 4);
    h.s.on_mail(ShardMsg::Store(Box::new(StoreMsg::Page {
        conn,
        stream: crate::store::StreamRef::Inbox("bob".into()),
        gone: false,
        page: Page {
            entries: vec![(3, ev(3)), (4, ev(4))],
            next: 5,
            done: true,
        },
    })));
    h.turn();
    // Live again: a duplicate of 4 is skipped, 5 is delivered.
    live(&mut h, 4);
    live(&mut h, 5);
    collect(&mut buf, &mut seen);
    assert_eq!(seen[0]["op"], "welcome");
    assert_eq!(seen[0]["inbox"]["recovered"], true);
    let offsets: Vec<u64> = seen[1..]
        .iter()
        .map(|v| v["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
    assert!(rx.try_recv().is_err(), "no more pages once done");
}

#[test]
fn a_replay_whose_stream_lost_its_history_is_closed_1013_to_resume() {
    use crate::mail::ShardMsg;
    use crate::store::{Epoch, Opened, Page, StoreMsg, StoreReq, StreamRef};
    use bytes::Bytes;
    let (mut h, rx, pipe, conn) = bob_resumes_from_ab_0();
    assert!(matches!(rx.try_recv(), Ok(StoreReq::Open { .. })));
    let ev = |o: u64| Bytes::from(format!(r#"{{"op":"msg","n":{o},"offset":{o}}}"#));
    let opened = Opened {
        conn,
        epoch: Epoch(0xab),
        top: 3,
        resume: Some(Ok(())),
        page: Page {
            entries: vec![(1, ev(1))],
            next: 2,
            done: false,
        },
    };
    h.s.on_mail(ShardMsg::Store(Box::new(StoreMsg::Opened(Box::new(
        opened,
    )))));
    h.turn();
    h.turn();
    assert!(matches!(rx.try_recv(), Ok(StoreReq::Page { from: 2, .. })));
    // Meanwhile the store lost the stream (a Redis restarted empty): offsets 2 and 3 of the
    // welcome's epoch are gone, and the new epoch's 2 is another message.
    h.s.on_mail(ShardMsg::Store(Box::new(StoreMsg::Page {
        conn,
        stream: StreamRef::Inbox("bob".into()),
        gone: true,
        page: Page::default(),
    })));
    h.turn();
    let mut buf = pipe.0.borrow_mut().client_read();
    let head = testkit::parse_response_head(&buf).unwrap().unwrap();
    buf.drain(..head.head_len);
    let got = frames(&pipe, &mut buf);
    let ops: Vec<serde_json::Value> = got
        .iter()
        .filter(|f| f.opcode == 0x1)
        .map(|f| serde_json::from_slice(&f.payload).unwrap())
        .collect();
    assert_eq!(ops.len(), 2, "the welcome and offset 1: {ops:?}");
    assert_eq!(ops[1]["offset"], 1);
    let close = got.iter().find(|f| f.opcode == 0x8).expect("a close frame");
    let (code, reason) = close_code(close);
    assert_eq!(code, 1013, "{reason}");
    assert!(reason.contains("resume"), "{reason}");
}

#[test]
fn answers_to_senders_are_reliable_mail_and_copies_are_not() {
    use crate::broker::BrokerMsg;
    use crate::hub::{ConnId, ReplyTo};
    use crate::mail::ShardMsg;
    let reply = || ReplyTo {
        conn: ConnId {
            shard: 1,
            slot: 2,
            generation: 3,
        },
        id: "\"1\"".into(),
        to: "bob".into(),
    };
    let answers = [
        ShardMsg::DeliverUser {
            to: "bob".into(),
            payload: bytes::Bytes::from_static(b"{}"),
            exclude: None,
        },
        ShardMsg::Broker(Box::new(BrokerMsg::Unavailable { reply: reply() })),
        ShardMsg::Broker(Box::new(BrokerMsg::Busy { reply: reply() })),
    ];
    for m in &answers {
        assert!(super::postbox::is_reliable(m), "{m:?} must not be dropped");
    }
    let copy = ShardMsg::Broker(Box::new(BrokerMsg::Broadcast {
        payload: bytes::Bytes::from_static(b"{}"),
    }));
    assert!(
        !super::postbox::is_reliable(&copy),
        "qos-0 copies may be dropped (counted)"
    );
}

#[test]
fn a_flood_of_ops_is_refused_rate_limited_then_closed_with_1008() {
    // 10 messages/s, burst 5: five pings at once pass, the sixth is refused with its id.
    let cfg = Config {
        max_messages_per_sec: 10,
        message_burst: 5,
        ..config()
    };
    let mut h = Harness::new(cfg);
    let (key, pipe, mut buf) = h.open("/ws?user=flood", 1 << 20);
    let ping = |i: u32| testkit::text_frame(&format!(r#"{{"op":"ping","id":{i}}}"#));
    let mut burst = Vec::new();
    for i in 0..6 {
        burst.extend(ping(i));
    }
    h.send(&pipe, &burst);
    let texts: Vec<serde_json::Value> = frames(&pipe, &mut buf)
        .iter()
        .map(|f| serde_json::from_slice(&f.payload).unwrap())
        .collect();
    assert_eq!(texts.len(), 6);
    assert!(texts[..5].iter().all(|t| t["op"] == "pong"), "{texts:?}");
    assert_eq!(texts[5]["op"], "error");
    assert_eq!(texts[5]["code"], "rate_limited");
    assert_eq!(texts[5]["id"], 5);
    assert!(
        texts[5]["message"]
            .as_str()
            .unwrap()
            .contains("retry after 100 ms"),
        "{texts:?}"
    );
    // 100 ms later one more fits: the rate refills with time.
    h.advance(100);
    h.send(&pipe, &ping(6));
    let f = frames(&pipe, &mut buf);
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&f[0].payload).unwrap()["op"],
        "pong"
    );
    // Sending a whole burst more while limited ends the connection with 1008.
    let mut flood = Vec::new();
    for i in 0..6 {
        flood.extend(ping(10 + i));
    }
    h.send(&pipe, &flood);
    let f = frames(&pipe, &mut buf);
    let close = f.iter().find(|f| f.opcode == 0x8).expect("a close frame");
    assert_eq!(
        close_code(close),
        (1008, "message rate limit exceeded".into())
    );
    let refused = f.iter().filter(|f| f.opcode == 0x1).count();
    assert_eq!(
        refused, 4,
        "refused before the close: strikes 1..4, the fifth closes"
    );
    h.advance(1_000);
    assert!(!h.live(key));
}

/// The status line and headers of what the server wrote to `pipe`.
fn response_head(pipe: &SimSocket) -> String {
    let bytes = pipe.0.borrow_mut().client_read();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    text.split("\r\n\r\n").next().unwrap().to_owned()
}

/// The server answered `pipe` with `status` and said when to come back.
fn assert_refused_for_now(pipe: &SimSocket, status: u16) {
    let head = response_head(pipe);
    assert!(head.starts_with(&format!("HTTP/1.1 {status} ")), "{head}");
    assert!(head.contains("Retry-After: "), "{head}");
}

#[test]
fn a_handshake_storm_is_closed_1013_with_a_jittered_retry_after() {
    // Two handshakes per second per shard, a burst of one second: the third upgrade gets its
    // 101 and then 1013 with when to retry.
    let cfg = Config {
        max_handshakes_per_sec: 2,
        ..config()
    };
    let mut h = Harness::new(cfg);
    h.open("/ws?user=a", 1 << 16);
    h.open("/ws?user=b", 1 << 16);
    let (key, pipe) = h.accept(1 << 16);
    h.send(
        &pipe,
        testkit::upgrade_request("t", "/ws?user=c").as_bytes(),
    );
    let mut buf = pipe.0.borrow_mut().client_read();
    let head = testkit::parse_response_head(&buf).unwrap().unwrap();
    assert_eq!(head.status, 101);
    buf.drain(..head.head_len);
    let f = testkit::take_frame(&mut buf)
        .unwrap()
        .expect("a close frame");
    let (code, reason) = close_code(&f);
    assert_eq!(code, 1013);
    let ms: u64 = reason
        .split("retry_after_ms=")
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{reason}"));
    assert!(
        (500..=1500).contains(&ms),
        "wait for the rate, plus jitter: {reason}"
    );
    h.send(&pipe, &testkit::close_frame(1013, ""));
    assert!(!h.live(key));
    // SSE is a handshake too: 503 with Retry-After.
    let (_, sse) = h.accept(1 << 16);
    h.send(&sse, b"GET /events?user=d HTTP/1.1\r\nHost: t\r\n\r\n");
    assert_refused_for_now(&sse, 503);
    // Half a second later there is room again.
    h.advance(500);
    h.open("/ws?user=e", 1 << 16);
}

#[test]
fn over_the_half_open_handshake_cap_a_partial_request_gets_503() {
    let cfg = Config {
        max_pending_handshakes: 2,
        ..config()
    };
    let mut h = Harness::new(cfg);
    // Silent connections hold no buffer: any number of them waits for its request.
    let silent: Vec<_> = (0..5).map(|_| h.accept(1 << 16)).collect();
    let part = b"GET /ws?user=a HTTP/1.1\r\nHost: t\r\n";
    let (a, pa) = h.accept(1 << 16);
    h.send(&pa, part);
    let (b, pb) = h.accept(1 << 16);
    h.send(&pb, part);
    let (c, pc) = h.accept(1 << 16);
    h.send(&pc, part);
    assert_refused_for_now(&pc, 503);
    assert!(h.live(a) && h.live(b), "the first two keep their chance");
    for (key, pipe) in &silent {
        assert!(h.live(*key));
        assert_eq!(
            response_head(pipe),
            "",
            "a silent connection is not refused"
        );
    }
    // The silent ones still finish their handshakes.
    let (k0, p0) = &silent[0];
    h.send(p0, testkit::upgrade_request("t", "/ws?user=s").as_bytes());
    assert!(response_head(p0).starts_with("HTTP/1.1 101 "));
    assert!(h.live(*k0));
    // A finished request gives its place back.
    let rest = format!(
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n\r\n",
        testkit::SAMPLE_KEY
    );
    h.send(&pa, rest.as_bytes());
    assert!(response_head(&pa).starts_with("HTTP/1.1 101 "));
    let (_, pd) = h.accept(1 << 16);
    h.send(&pd, part);
    assert_eq!(response_head(&pd), "", "room again after a's upgrade");
    // So does a half-open one that meets its handshake deadline.
    h.advance(2_000);
    assert!(!h.live(b) && !h.live(c));
    let (_, pe) = h.accept(1 << 16);
    h.send(&pe, part);
    assert_eq!(response_head(&pe), "", "room again after b's deadline");
}

#[test]
fn connections_per_address_are_capped_429_and_freed_at_close() {
    let cfg = Config {
        max_connections_per_ip: 2,
        ..config()
    };
    let mut h = Harness::new(cfg);
    let (a, _) = h.accept_from("10.1.1.1");
    h.accept_from("10.1.1.1");
    let (_, third) = h.accept_from("10.1.1.1");
    assert_refused_for_now(&third, 429);
    let (_, other) = h.accept_from("10.1.1.2");
    assert_eq!(response_head(&other), "", "another address is not limited");
    for _ in 0..5 {
        let (_, lo) = h.accept_from("127.0.0.1");
        assert_eq!(response_head(&lo), "", "loopback is exempt by default");
    }
    // A close gives its place back.
    h.advance(2_000); // handshake deadline: every silent one is dropped
    assert!(!h.live(a));
    let (_, again) = h.accept_from("10.1.1.1");
    assert_eq!(response_head(&again), "");
}

#[test]
fn an_answer_queued_when_shutdown_begins_is_still_written() {
    // `POST /api/drain` queues its answer and signals the process in the same turn: the
    // shutdown must not drop the answer (CI once saw an empty reply).
    let mut h = Harness::new(config());
    let (key, pipe) = h.accept(1 << 16);
    pipe.0
        .borrow_mut()
        .client_write(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n");
    h.s.set_clock(h.now_ms, UNIX_BASE_MS + h.now_ms);
    h.s.on_readable(key, false);
    h.s.begin_shutdown();
    h.s.flush();
    let head = response_head(&pipe);
    assert!(head.starts_with("HTTP/1.1 200 "), "{head:?}");
    h.advance(1_000);
    assert!(!h.live(key), "closed once answered");
}

#[test]
fn a_pipelined_burst_whose_replies_pass_the_limit_waits_instead_of_closing() {
    // 400 pings in one write: 400 pongs are ~10 KiB, past the 4 KiB outbound limit within
    // one turn. A client that reads gets them all, in order, and stays open: its requests
    // wait unread while its replies are written.
    let mut h = Harness::new(config());
    let (key, pipe, mut buf) = h.open("/ws?user=pipeliner", 1024);
    let mut burst = Vec::new();
    for i in 0..400 {
        burst.extend(testkit::text_frame(&format!(
            r#"{{"op":"ping","data":{i}}}"#
        )));
    }
    h.send(&pipe, &burst);
    let mut ids = Vec::new();
    for _ in 0..1000 {
        for f in frames(&pipe, &mut buf) {
            assert_ne!(f.opcode, 0x8, "closed: {:?}", close_code(&f));
            let v: serde_json::Value = serde_json::from_slice(&f.payload).unwrap();
            assert_eq!(v["op"], "pong", "{v}");
            ids.push(v["data"].as_u64().unwrap_or_else(|| panic!("{v}")));
        }
        if ids.len() == 400 {
            break;
        }
        h.turn();
    }
    assert_eq!(ids, (0..400).collect::<Vec<u64>>());
    assert!(h.live(key));
}

#[test]
fn a_catch_up_that_gives_up_closes_the_connections_keeping_a_position_before_the_gap_passes() {
    use crate::broker::BrokerMsg;
    use crate::mail::ShardMsg;
    use crate::store::{Epoch, Opened, Page, StoreHandle, StoreMsg, StoreReq};
    use bytes::Bytes;
    let (tx, rx) = crate::queue::unbounded();
    let (broker, link) = crate::broker::model("n1", 1 << 16);
    let store = Some(StoreHandle::new(tx));
    let shared = Shared {
        store: store.clone(),
        broker: Some(broker.clone()),
        // Room for the held messages that go out at once.
        ..Shared::standalone(
            Config {
                max_outbound_bytes: 1 << 24,
                ..config()
            },
            1,
        )
    };
    let mut h = Harness {
        s: Router::new(0, 1, shared, 0, UNIX_BASE_MS),
        store,
        now_ms: 0,
        pipes: Vec::new(),
    };
    // bob resumes (a position) on one connection and has a plain one (none) beside it.
    let (resumed, pipe) = h.accept(1 << 20);
    h.send(
        &pipe,
        testkit::upgrade_request("t", "/ws?user=bob&since=ab:0").as_bytes(),
    );
    let (_, plain) = h.accept(1 << 20);
    h.send(
        &plain,
        testkit::upgrade_request("t", "/ws?user=bob").as_bytes(),
    );
    let ev = |o: u64| {
        Bytes::from(format!(
            r#"{{"op":"msg","data":{o},"offset":{o},"epoch":"ab"}}"#
        ))
    };
    // Play the broker (subscriptions ready) and the store (inbox positions) until both
    // are welcomed.
    let resumed = h.s.conns().conn_id(resumed);
    for _ in 0..4 {
        h.turn();
        h.s.post_broker(&mut |r| broker.publish(r), &mut |i| broker.interest(i));
        while let Some(c) = link.next_interest() {
            if let Some((_, token)) = c.ready {
                h.s.on_mail(ShardMsg::Broker(Box::new(BrokerMsg::Ready { token })));
            }
        }
        while let Ok(r) = rx.try_recv() {
            let StoreReq::Open { conn, since, .. } = r else {
                continue;
            };
            let page = if conn == resumed {
                Page {
                    entries: vec![(1, ev(1)), (2, ev(2))],
                    next: 3,
                    done: true,
                }
            } else {
                Page::default()
            };
            let o = Opened {
                conn,
                epoch: Epoch(0xab),
                top: 2,
                resume: since.map(|_| Ok(())),
                page,
            };
            h.s.on_mail(ShardMsg::Store(Box::new(StoreMsg::Opened(Box::new(o)))));
        }
    }
    h.turn();
    // Offset 3 never came (pub/sub lost it); 4 on comes live and waits behind a catch-up
    // until too many wait: the catch-up gives up.
    for o in 4..=10_005u64 {
        h.s.on_mail(ShardMsg::Broker(Box::new(BrokerMsg::Stored {
            user: "bob".into(),
            payload: ev(o),
            offset: o,
            exclude: None,
        })));
    }
    h.turn();
    let failed = &h.s.m().catch_ups_failed;
    assert_eq!(failed.load(std::sync::atomic::Ordering::Relaxed), 1);
    // The resumed connection got 1 and 2, then a close before the gap: it resumes from 2.
    let mut buf = pipe.0.borrow_mut().client_read();
    let head = testkit::parse_response_head(&buf).unwrap().unwrap();
    buf.drain(..head.head_len);
    let got = frames(&pipe, &mut buf);
    let offsets: Vec<u64> = got
        .iter()
        .filter(|f| f.opcode == 0x1)
        .filter_map(|f| serde_json::from_slice::<serde_json::Value>(&f.payload).ok())
        .filter_map(|v| v["offset"].as_u64())
        .collect();
    assert_eq!(
        offsets[..offsets.len().min(4)],
        [1, 2],
        "nothing past the gap"
    );
    let close = got.iter().find(|f| f.opcode == 0x8).expect("a close frame");
    assert_eq!(close_code(close).0, 1013);
    // The plain connection (no position to resume from) takes the live stream on.
    let mut buf = plain.0.borrow_mut().client_read();
    let head = testkit::parse_response_head(&buf).unwrap().unwrap();
    buf.drain(..head.head_len);
    let got = frames(&plain, &mut buf);
    assert!(got.iter().any(|f| f.opcode == 0x1
        && serde_json::from_slice::<serde_json::Value>(&f.payload).unwrap()["offset"] == 4));
}

#[test]
fn a_large_fan_out_written_as_it_goes_keeps_every_subscribers_frames_whole_and_in_order() {
    // Past the write-through size, frames go out as they are queued; a subscriber whose
    // socket is full (the last one: room for 5 bytes) keeps the rest queued and gets it in
    // order once it reads.
    let mut h = Harness::new(Config {
        max_outbound_bytes: 64 * 1024,
        ..config()
    });
    let mut subs = Vec::new();
    for i in 0..300 {
        let cap = if i == 299 { 256 } else { 64 * 1024 };
        let (_, pipe, mut buf) = h.open("/ws", cap);
        h.send(
            &pipe,
            &testkit::text_frame(r#"{"op":"sub","channel":"big","id":1}"#),
        );
        assert_eq!(frames(&pipe, &mut buf).len(), 1, "the sub's ack");
        subs.push((pipe, buf));
    }
    subs[299].0 .0.borrow_mut().capacity = 5;
    let (_, publisher, _) = h.open("/ws", 64 * 1024);
    let mut ops = Vec::new();
    for i in 0..3 {
        let op = format!(r#"{{"op":"pub","channel":"big","data":"m{i}"}}"#);
        ops.extend(testkit::text_frame(&op));
    }
    h.send(&publisher, &ops);
    let want: Vec<String> = (0..3).map(|i| format!("\"m{i}\"")).collect();
    for (n, (pipe, buf)) in subs.iter_mut().enumerate() {
        if n == 299 {
            pipe.0.borrow_mut().capacity = 64 * 1024;
            let mut p = pipe.0.borrow_mut();
            p.write_edge = true;
            drop(p);
            h.turn();
        }
        let got: Vec<String> = frames(pipe, buf)
            .iter()
            .map(|f| String::from_utf8(f.payload.clone()).unwrap())
            .collect();
        assert_eq!(got.len(), 3, "subscriber {n}: {got:?}");
        for (g, w) in got.iter().zip(&want) {
            assert!(g.contains(w.as_str()), "subscriber {n}: {got:?}");
        }
    }
}
