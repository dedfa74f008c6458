//! Inbox streams against the real binary: qos-1 sends to an offline user, resume with
//! `since`, the dedup window, confirmed positions, retention, and durability across kill -9
//! and a wiped store.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Sends a qos-1 DM and returns its ack.
fn send_qos1(ws: &mut Ws, to: &str, data: Value, id: &str) -> Value {
    send_json(ws, json!({"op":"send","to":to,"data":data,"id":id,"qos":1}));
    let ack = recv_json(ws);
    assert_eq!(
        (ack["op"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some(id)),
        "{ack}"
    );
    ack
}

fn connect_since(server: &Server, user: &str, since: &str) -> (Ws, Value) {
    let mut ws = connect_raw_ws(server, &format!("/ws?user={user}&since={since}"));
    let welcome = recv_json(&mut ws);
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    (ws, welcome)
}

fn data_dir(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("sb-streams-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn offline_user_gets_queued_messages_in_order_then_live() {
    let server = Server::start(&["--shards", "2"]);
    let (mut alice, welcome) = connect(&server, "alice");
    let epoch = welcome["inbox"]["epoch"].as_str().unwrap().to_owned();
    assert_eq!(welcome["inbox"]["offset"], 0);
    // bob has never connected: every send is accepted and waits.
    let mut acks = Vec::new();
    for i in 1..=5 {
        let ack = send_qos1(&mut alice, "bob", json!({"n": i}), &format!("m{i}"));
        assert_eq!(ack["queued"], true, "{ack}");
        assert_eq!(ack["epoch"], epoch.as_str());
        acks.push(ack["offset"].as_u64().unwrap());
    }
    assert_eq!(
        acks,
        vec![1, 2, 3, 4, 5],
        "offsets in alice's inbox grow by one"
    );
    let (mut bob, welcome) = connect_since(&server, "bob", &format!("{epoch}:0"));
    assert_eq!(welcome["inbox"]["offset"], 5, "{welcome}");
    assert_eq!(welcome["inbox"]["recovered"], true);
    for i in 1..=5u64 {
        let m = recv_json(&mut bob);
        assert_eq!(m["op"], "msg");
        assert_eq!(
            (
                m["data"]["n"].as_u64(),
                m["offset"].as_u64(),
                m["stream"].as_str()
            ),
            (Some(i), Some(i), Some("inbox")),
            "{m}"
        );
        assert_eq!(m["epoch"], epoch.as_str());
    }
    // Then live: the next one arrives once, not queued.
    let ack = send_qos1(&mut alice, "bob", json!({"n": 6}), "m6");
    assert_eq!(ack["queued"], false);
    let m = recv_json(&mut bob);
    assert_eq!(
        (m["data"]["n"].as_u64(), m["offset"].as_u64()),
        (Some(6), Some(6))
    );
    // qos 0 still works and is not stored.
    send_json(
        &mut alice,
        json!({"op":"send","to":"bob","data":"q0","id":"z"}),
    );
    assert_eq!(recv_json(&mut alice)["op"], "ack");
    let m = recv_json(&mut bob);
    assert_eq!(m["data"], "q0");
    assert!(m.get("offset").is_none(), "qos 0 is not streamed: {m}");
}

#[test]
fn a_retried_id_is_stored_once() {
    let server = Server::start(&[]);
    let (mut alice, _) = connect(&server, "alice");
    let (mut bob, _) = connect(&server, "bob");
    let a1 = send_qos1(&mut alice, "bob", json!("once"), "same");
    let a2 = send_qos1(&mut alice, "bob", json!("once"), "same");
    assert_eq!(a1["offset"], a2["offset"], "{a1} {a2}");
    assert_eq!(a2["duplicate"], true);
    let m = recv_json(&mut bob);
    assert_eq!(m["data"], "once");
    // A barrier: the next message is the next offset, so the retry stored nothing.
    send_qos1(&mut alice, "bob", json!("next"), "other");
    let m2 = recv_json(&mut bob);
    assert_eq!(m2["data"], "next");
    assert_eq!(
        m2["offset"].as_u64(),
        Some(m["offset"].as_u64().unwrap() + 1)
    );
}

#[test]
fn resume_from_the_confirmed_position() {
    let server = Server::start(&[]);
    let (mut alice, _) = connect(&server, "alice");
    for i in 1..=4 {
        send_qos1(&mut alice, "carol", json!(i), &format!("c{i}"));
    }
    {
        let (mut carol, w) = connect_since(&server, "carol", "confirmed");
        assert_eq!(w["inbox"]["recovered"], true);
        for i in 1..=4 {
            assert_eq!(recv_json(&mut carol)["data"], i);
        }
        // Shown up to 2.
        send_json(
            &mut carol,
            json!({"op":"ack","stream":"inbox","offset":2,"id":"k"}),
        );
        assert_eq!(recv_json(&mut carol)["op"], "ack");
    }
    let (status, text) = http(
        server.addr,
        "GET /api/users/carol HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        (v["unread"].as_u64(), v["online"].as_bool()),
        (Some(2), Some(false)),
        "{v}"
    );
    let (mut carol, _) = connect_since(&server, "carol", "confirmed");
    assert_eq!(recv_json(&mut carol)["data"], 3);
    assert_eq!(recv_json(&mut carol)["data"], 4);
    expect_silence(&mut carol, Duration::from_millis(200));
}

#[test]
fn trimmed_history_says_recovered_false() {
    let server = Server::start(&["--inbox-history", "3"]);
    let (mut alice, w) = connect(&server, "alice");
    let epoch = w["inbox"]["epoch"].as_str().unwrap().to_owned();
    for i in 1..=6 {
        send_qos1(&mut alice, "dan", json!(i), &format!("d{i}"));
    }
    let (mut dan, w) = connect_since(&server, "dan", &format!("{epoch}:1"));
    assert_eq!(w["inbox"]["recovered"], false, "{w}");
    assert_eq!(w["inbox"]["reason"], "trimmed");
    // What is left is still replayed: the newest three.
    for i in 4..=6 {
        assert_eq!(recv_json(&mut dan)["data"], i);
    }
    let (_, w) = connect_since(&server, "dan", "ffff:1");
    assert_eq!(w["inbox"]["reason"], "epoch_changed");
}

#[test]
fn bad_since_and_anonymous_qos1_are_refused() {
    let server = Server::start(&[]);
    let (status, _) = http(
        server.addr,
        &format!(
            "GET /ws?user=a&since=nope HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ),
    );
    assert_eq!(status, 400);
    let mut anon = connect_raw_ws(&server, "/ws");
    assert_eq!(recv_json(&mut anon)["op"], "welcome");
    send_json(
        &mut anon,
        json!({"op":"send","to":"bob","data":1,"id":1,"qos":1}),
    );
    let e = recv_json(&mut anon);
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("bad_request"))
    );
}

#[test]
fn acknowledged_messages_survive_kill_9_and_a_wiped_store_changes_the_epoch() {
    let dir = data_dir("kill9");
    let d = dir.to_str().unwrap().to_owned();
    let mut server = Server::start(&["--store", "redb", "--data-dir", &d]);
    let (mut alice, w) = connect(&server, "alice");
    let epoch = w["inbox"]["epoch"].as_str().unwrap().to_owned();
    for i in 1..=20 {
        send_qos1(&mut alice, "erin", json!(i), &format!("e{i}"));
    }
    // Every ack above came after its commit: kill -9 now loses none of them.
    server.signal_and_wait(libc::SIGKILL);
    let server = Server::start(&["--store", "redb", "--data-dir", &d]);
    let (mut erin, w) = connect_since(&server, "erin", &format!("{epoch}:0"));
    assert_eq!(
        w["inbox"]["epoch"],
        epoch.as_str(),
        "same store, same epoch"
    );
    assert_eq!(w["inbox"]["recovered"], true);
    expect_in_order(&mut erin, 1..=20, recv_json);
    // The dedup window survives too: a retry after the restart stores nothing.
    let (mut alice, _) = connect(&server, "alice");
    let again = send_qos1(&mut alice, "erin", json!(20), "e20");
    assert_eq!(again["duplicate"], true, "{again}");
    drop(server);
    std::fs::remove_dir_all(&dir).unwrap();
    let server = Server::start(&["--store", "redb", "--data-dir", &d]);
    let (_, w) = connect_since(&server, "erin", &format!("{epoch}:20"));
    assert_ne!(w["inbox"]["epoch"], epoch.as_str());
    assert_eq!(w["inbox"]["recovered"], false);
    assert_eq!(w["inbox"]["reason"], "epoch_changed");
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn resume_seam_has_no_gap_and_no_duplicate_while_messages_keep_coming() {
    let server = Server::start(&["--shards", "2"]);
    let (mut alice, w) = connect(&server, "alice");
    let epoch = w["inbox"]["epoch"].as_str().unwrap().to_owned();
    const N: u64 = 300;
    for i in 1..=50 {
        send_qos1(&mut alice, "fred", json!(i), &format!("f{i}"));
    }
    // alice keeps sending from another thread while fred connects and resumes from 0.
    let addr = server.addr;
    let sender = std::thread::spawn(move || {
        let stream = std::net::TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(DEADLINE)).unwrap();
        let (mut a, _) = tungstenite::client(format!("ws://{addr}/ws?user=alice"), stream).unwrap();
        recv_json(&mut a);
        for i in 51..=N {
            send_json(
                &mut a,
                json!({"op":"send","to":"fred","data":i,"id":format!("f{i}"),"qos":1}),
            );
        }
        for _ in 51..=N {
            assert_eq!(recv_json(&mut a)["op"], "ack");
        }
    });
    let (mut fred, w) = connect_since(&server, "fred", &format!("{epoch}:0"));
    assert_eq!(w["inbox"]["recovered"], true);
    for want in 1..=N {
        let m = recv_json(&mut fred);
        assert_eq!(
            (m["data"].as_u64(), m["offset"].as_u64()),
            (Some(want), Some(want)),
            "message {want}: {m}"
        );
    }
    sender.join().unwrap();
    expect_silence(&mut fred, Duration::from_millis(200));
}

fn api_post(server: &Server, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = post(server.addr, path, body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[test]
fn push_api_qos1_stores_before_answering() {
    let server = Server::start(&["--shards", "2"]);
    let body = r#"{"to":"gus","data":{"bill":1},"from":"billing","qos":1,"id":"inv-1"}"#;
    let (status, a1) = api_post(&server, "/api/send", body);
    assert_eq!(status, 200, "{a1}");
    assert_eq!(
        (a1["stored"].as_bool(), a1["queued"].as_bool()),
        (Some(true), Some(true))
    );
    let (_, a2) = api_post(&server, "/api/send", body);
    assert_eq!(a2["offset"], a1["offset"], "a retried id is stored once");
    assert_eq!(a2["duplicate"], true);
    let (mut gus, w) = connect_since(&server, "gus", "confirmed");
    assert_eq!(w["inbox"]["offset"], 1);
    let m = recv_json(&mut gus);
    assert_eq!(
        (m["from"].as_str(), m["offset"].as_u64()),
        (Some("billing"), Some(1))
    );
    assert_eq!(m["data"]["bill"], 1);
    let (status, e) = api_post(&server, "/api/send", r#"{"to":"gus","data":1,"qos":2}"#);
    assert_eq!(status, 400, "{e}");
}

#[test]
fn history_pages_through_an_inbox() {
    let server = Server::start(&[]);
    let (mut alice, _) = connect(&server, "alice");
    for i in 1..=5 {
        send_qos1(&mut alice, "hal", json!(i), &format!("h{i}"));
    }
    // The op, on alice's own inbox (her sent messages are in it too).
    send_json(
        &mut alice,
        json!({"op":"history","stream":"inbox","since":1,"limit":2,"id":"p1"}),
    );
    let h = recv_json(&mut alice);
    assert_eq!(
        (h["op"].as_str(), h["id"].as_str()),
        (Some("history"), Some("p1")),
        "{h}"
    );
    let offsets: Vec<u64> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["offset"].as_u64().unwrap())
        .collect();
    assert_eq!(offsets, vec![2, 3]);
    assert_eq!((h["next"].as_u64(), h["top"].as_u64()), (Some(4), Some(5)));
    // The push API, on hal's inbox.
    let (status, text) = http(
        server.addr,
        "GET /api/history/inbox:hal?since=3 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{text}");
    let v: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["stream"], "inbox:hal");
    let data: Vec<u64> = v["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["data"].as_u64().unwrap())
        .collect();
    assert_eq!(data, vec![4, 5]);
    let (status, _) = http(
        server.addr,
        "GET /api/history/room1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 404);
}

/// Reads SSE blocks (separated by a blank line) from a raw stream: (event, id, data).
fn sse_blocks(
    r: &mut std::io::BufReader<std::net::TcpStream>,
    n: usize,
) -> Vec<(String, String, String)> {
    use std::io::BufRead;
    let mut out = Vec::new();
    let (mut ev, mut id, mut data) = (String::new(), String::new(), String::new());
    while out.len() < n {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended");
        let line = line.trim_end_matches('\n');
        if line.is_empty() {
            if !data.is_empty() {
                out.push((
                    std::mem::take(&mut ev),
                    std::mem::take(&mut id),
                    std::mem::take(&mut data),
                ));
            }
            continue;
        }
        if let Some(v) = line.strip_prefix("event: ") {
            ev = v.into();
        } else if let Some(v) = line.strip_prefix("id: ") {
            id = v.into();
        } else if let Some(v) = line.strip_prefix("data: ") {
            data = v.into();
        }
    }
    out
}

fn sse_open(
    server: &Server,
    query: &str,
    last_event_id: Option<&str>,
) -> std::io::BufReader<std::net::TcpStream> {
    use std::io::{BufRead, Write};
    let mut s = std::net::TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let extra = last_event_id.map_or(String::new(), |l| format!("Last-Event-ID: {l}\r\n"));
    write!(s, "GET /events?{query} HTTP/1.1\r\nHost: t\r\n{extra}\r\n").unwrap();
    let mut r = std::io::BufReader::new(s);
    let mut status = String::new();
    r.read_line(&mut status).unwrap();
    assert!(status.contains(" 200 "), "{status}");
    loop {
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        if l == "\r\n" {
            break;
        }
    }
    r
}

#[test]
fn event_streams_resume_from_last_event_id() {
    let server = Server::start(&["--shards", "2"]);
    let (mut alice, w) = connect(&server, "alice");
    let epoch = w["inbox"]["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3 {
        send_qos1(&mut alice, "ivy", json!(i), &format!("i{i}"));
    }
    let mut r = sse_open(&server, "user=ivy&since=confirmed", None);
    let blocks = sse_blocks(&mut r, 4);
    assert_eq!(blocks[0].0, "resume");
    let resume: Value = serde_json::from_str(&blocks[0].2).unwrap();
    assert_eq!(resume["recovered"], true);
    for (i, (_, id, data)) in blocks[1..].iter().enumerate() {
        let n = i as u64 + 1;
        assert_eq!(id, &format!("{epoch}:{n}"), "the id is the inbox position");
        let m: Value = serde_json::from_str(data).unwrap();
        assert_eq!(m["offset"].as_u64(), Some(n));
    }
    drop(r);
    // The browser reconnects with the last id it saw: only what came after.
    send_qos1(&mut alice, "ivy", json!(4), "i4");
    let mut r = sse_open(
        &server,
        "user=ivy&since=confirmed",
        Some(&format!("{epoch}:2")),
    );
    let blocks = sse_blocks(&mut r, 3);
    assert_eq!(blocks[0].0, "resume");
    let data: Vec<u64> = blocks[1..]
        .iter()
        .map(|b| {
            serde_json::from_str::<Value>(&b.2).unwrap()["data"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(data, vec![3, 4]);
    // Live after the replay, with the next id.
    send_qos1(&mut alice, "ivy", json!(5), "i5");
    let b = sse_blocks(&mut r, 1);
    assert_eq!(b[0].1, format!("{epoch}:5"));
}

/// Reads raw lines up to the first blank line (one SSE block, even one without data).
fn sse_raw_block(r: &mut std::io::BufReader<std::net::TcpStream>) -> Vec<String> {
    use std::io::BufRead;
    let mut lines = Vec::new();
    loop {
        let mut line = String::new();
        assert!(r.read_line(&mut line).unwrap() > 0, "stream ended");
        let line = line.trim_end_matches('\n');
        if line.is_empty() {
            if !lines.is_empty() {
                return lines;
            }
            continue;
        }
        lines.push(line.to_owned());
    }
}

#[test]
fn a_plain_event_stream_carries_positions_from_the_start_and_resumes_from_them() {
    let server = Server::start(&["--shards", "2"]);
    let (mut alice, w) = connect(&server, "alice");
    let epoch = w["inbox"]["epoch"].as_str().unwrap().to_owned();
    for i in 1..=2 {
        send_qos1(&mut alice, "kim", json!(i), &format!("k{i}"));
    }
    // No `since`, no Last-Event-ID: live from the top, but the position is its id at once.
    let mut r = sse_open(&server, "user=kim", None);
    assert_eq!(sse_raw_block(&mut r), vec!["retry: 2000".to_owned()]);
    assert_eq!(sse_raw_block(&mut r), vec![format!("id: {epoch}:2")]);
    send_qos1(&mut alice, "kim", json!(3), "k3");
    let b = sse_blocks(&mut r, 1);
    assert_eq!(b[0].1, format!("{epoch}:3"), "{b:?}");
    drop(r);
    for i in 4..=5 {
        send_qos1(&mut alice, "kim", json!(i), &format!("k{i}"));
    }
    // The browser comes back with the last id it saw: nothing missed, nothing twice.
    let mut r = sse_open(&server, "user=kim", Some(&b[0].1));
    let blocks = sse_blocks(&mut r, 3);
    assert_eq!(blocks[0].0, "resume");
    let got: Vec<(String, u64)> = blocks[1..]
        .iter()
        .map(|b| {
            let v: Value = serde_json::from_str(&b.2).unwrap();
            (b.1.clone(), v["data"].as_u64().unwrap())
        })
        .collect();
    assert_eq!(
        got,
        vec![(format!("{epoch}:4"), 4), (format!("{epoch}:5"), 5)]
    );
}

#[test]
fn channels_with_history_store_publications_and_resume_subscribers() {
    let cfg = std::env::temp_dir().join(format!("sb-channels-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[[channels]]\npattern = \"room*\"\nhistory = 5\nttl = \"24h\"\n",
    )
    .unwrap();
    let server = Server::start(&["--shards", "2", "--config", cfg.to_str().unwrap()]);
    let (mut alice, _) = connect(&server, "alice");
    let (mut carol, _) = connect(&server, "carol");
    send_json(&mut carol, json!({"op":"sub","channel":"room1","id":"s"}));
    assert_eq!(recv_json(&mut carol)["op"], "ack");
    let epoch = publish_stored(&mut alice, &mut carol, "room1", 3);
    // dave had offset 1: he gets 2 and 3, then live.
    let (mut dave, _) = connect(&server, "dave");
    send_json(
        &mut dave,
        json!({"op":"sub","channel":"room1","since":{"epoch":epoch,"offset":1},"id":"d"}),
    );
    let ack = recv_json(&mut dave);
    assert_eq!(
        (ack["id"].as_str(), ack["recovered"].as_bool()),
        (Some("d"), Some(true)),
        "{ack}"
    );
    assert_eq!(ack["offset"], 3);
    assert_eq!(recv_json(&mut dave)["offset"], 2);
    assert_eq!(recv_json(&mut dave)["offset"], 3);
    // An empty epoch is no epoch, as the inbox's `since=:2`: the offset in the current one.
    let (mut frank, _) = connect(&server, "frank");
    send_json(
        &mut frank,
        json!({"op":"sub","channel":"room1","since":{"epoch":"","offset":2},"id":"f"}),
    );
    let ack = recv_json(&mut frank);
    assert_eq!(
        (ack["id"].as_str(), ack["op"].as_str()),
        (Some("f"), Some("ack")),
        "{ack}"
    );
    assert_eq!(recv_json(&mut frank)["offset"], 3);
    send_json(
        &mut alice,
        json!({"op":"pub","channel":"room1","data":4,"id":"p4"}),
    );
    assert_eq!(recv_json(&mut alice)["offset"], 4);
    assert_eq!(recv_json(&mut dave)["offset"], 4);
    assert_eq!(recv_json(&mut carol)["offset"], 4);
    // A retried id is stored once.
    send_json(
        &mut alice,
        json!({"op":"pub","channel":"room1","data":4,"id":"p4"}),
    );
    let again = recv_json(&mut alice);
    assert_eq!(
        (again["offset"].as_u64(), again["duplicate"].as_bool()),
        (Some(4), Some(true))
    );
    // The push API stores too; retention keeps 5.
    for i in 5..=8 {
        let (status, v) = api_post(
            &server,
            "/api/publish",
            &format!(r#"{{"channel":"room1","data":{i}}}"#),
        );
        assert_eq!((status, v["stored"].as_bool()), (200, Some(true)), "{v}");
        assert_eq!(v["offset"], i);
    }
    let (mut erin, _) = connect(&server, "erin");
    send_json(
        &mut erin,
        json!({"op":"sub","channel":"room1","since":{"epoch":epoch,"offset":0},"id":"e"}),
    );
    let ack = recv_json(&mut erin);
    assert_eq!(
        (ack["recovered"].as_bool(), ack["reason"].as_str()),
        (Some(false), Some("trimmed"))
    );
    let first = recv_json(&mut erin);
    assert_eq!(first["offset"], 4, "the oldest kept of 8 with history 5");
    // A channel without a rule keeps no history.
    send_json(
        &mut erin,
        json!({"op":"sub","channel":"lobby","since":{"offset":0},"id":"l"}),
    );
    loop {
        let v = recv_json(&mut erin);
        if v["id"] == "l" {
            assert_eq!(v["code"], "bad_request", "{v}");
            break;
        }
    }
    let _ = std::fs::remove_file(&cfg);
}

#[test]
fn over_the_size_budget_sends_and_publications_are_refused_store_full() {
    let cfg = std::env::temp_dir().join(format!("sb-full-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[[channels]]\npattern = \"room*\"\nhistory = 100\n").unwrap();
    let server = Server::start(&[
        "--shards",
        "2",
        "--store-max-bytes",
        "1000",
        "--config",
        cfg.to_str().unwrap(),
    ]);
    let (mut alice, _) = connect(&server, "alice");
    // Each stored copy counts: the budget takes a few DMs, then refuses, never silently.
    let mut stored = 0;
    let refusal = loop {
        assert!(stored < 50, "1000 bytes never filled");
        let id = format!("m{stored}");
        send_json(
            &mut alice,
            json!({"op":"send","to":"bob","data":"x".repeat(40),"id":id,"qos":1}),
        );
        let a = recv_json(&mut alice);
        if a["op"] == "ack" {
            stored += 1;
            continue;
        }
        break a;
    };
    assert!(stored >= 1, "something fits in 1000 bytes: {refusal}");
    assert_eq!(
        (refusal["op"].as_str(), refusal["code"].as_str()),
        (Some("error"), Some("store_full")),
        "{refusal}"
    );
    // Bob gets exactly what was acked.
    let (mut bob, w) = connect_since(&server, "bob", ":0");
    assert_eq!(w["inbox"]["offset"], stored, "{w}");
    for i in 1..=stored {
        assert_eq!(recv_json(&mut bob)["offset"], i);
    }
    // Bigger than what the last refused DM needed (two copies), so it cannot fit either.
    let big = "y".repeat(400);
    let (status, e) = api_post(
        &server,
        "/api/send",
        &format!(r#"{{"to":"bob","data":"{big}","from":"ops","qos":1,"id":"a1"}}"#),
    );
    assert_eq!(status, 503, "{e}");
    assert!(e.to_string().contains("store_full"), "{e}");
    let (status, e) = api_post(
        &server,
        "/api/publish",
        &format!(r#"{{"channel":"room1","data":"{big}","qos":1,"id":"p1"}}"#),
    );
    assert_eq!(status, 503, "{e}");
    assert!(e.to_string().contains("store_full"), "{e}");
    let (_, metrics) = http(
        server.addr,
        "GET /metrics HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    for route in ["send", "publish"] {
        let line = format!("switchboard_api_requests_total{{route=\"{route}\",status=\"503\"}} 1");
        assert!(metrics.contains(&line), "{line} missing");
    }
    let _ = std::fs::remove_file(&cfg);
}

#[test]
fn a_confirmation_sends_receipts_to_the_senders_also_when_they_were_away() {
    let server = Server::start(&["--shards", "2"]);
    let (mut alice, welcome) = connect(&server, "alice");
    let epoch = welcome["inbox"]["epoch"].as_str().unwrap().to_owned();
    let (mut bob, _) = connect_since(&server, "bob", "confirmed");
    send_qos1(&mut alice, "bob", json!(1), "r1");
    send_qos1(&mut alice, "bob", json!(2), "r2");
    // The stored DM carries the sender's id, so a receipt can name it.
    let m1 = recv_json(&mut bob);
    let m2 = recv_json(&mut bob);
    assert_eq!(
        (m1["id"].as_str(), m2["id"].as_str()),
        (Some("r1"), Some("r2"))
    );
    confirm_inbox(&mut bob, &m2["offset"], "c1");
    let r = recv_json(&mut alice);
    assert_eq!(
        (r["op"].as_str(), r["from"].as_str(), r["to"].as_str()),
        (Some("receipt"), Some("bob"), Some("alice")),
        "{r}"
    );
    assert_eq!(r["ids"], json!(["r1", "r2"]));
    assert_eq!(r["upto"], m2["offset"]);
    assert_eq!(
        (r["stream"].as_str(), r["epoch"].as_str()),
        (Some("inbox"), Some(epoch.as_str()))
    );
    let seen = r["offset"].as_u64().unwrap();
    // Confirming the same offset again moves nothing and sends nothing.
    confirm_inbox(&mut bob, &m2["offset"], "c2");
    // alice leaves; bob confirms her next message while she is away.
    send_qos1(&mut alice, "bob", json!(3), "r3");
    drop(alice);
    let m3 = recv_json(&mut bob);
    assert_eq!(m3["id"], "r3");
    confirm_inbox(&mut bob, &m3["offset"], "c3");
    server.wait_for("the second receipt", |s| {
        s.metric("switchboard_store_receipts_total") == 2
    });
    // Back with her position: her own copy of r3, then the receipt for it.
    let (mut alice, welcome) = connect_since(&server, "alice", &format!("{epoch}:{seen}"));
    assert_eq!(welcome["inbox"]["recovered"], true, "{welcome}");
    let own = recv_json(&mut alice);
    assert_eq!(
        (own["op"].as_str(), own["id"].as_str()),
        (Some("msg"), Some("r3")),
        "{own}"
    );
    let r = recv_json(&mut alice);
    assert_eq!(
        (r["op"].as_str(), r["ids"].clone()),
        (Some("receipt"), json!(["r3"])),
        "{r}"
    );
    assert_eq!(server.metric("switchboard_store_receipts_total"), 2);
}
