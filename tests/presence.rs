//! Channel presence on one node: the `presence` op and `GET /api/channels/<name>/presence` list
//! a channel's members across shards, and `join`/`leave` events reach the subscribers that
//! asked for them, on channels whose rule tells them.

mod common;

use common::*;
use serde_json::{json, Value};

/// Two shards; `chat*` channels tell joins and leaves, `lobby` does not.
fn server() -> Server {
    let cfg = std::env::temp_dir().join(format!("sb-presence-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[[channels]]\npattern = \"chat*\"\njoin_leave = true\n",
    )
    .unwrap();
    Server::start(&["--shards", "2", "--config", cfg.to_str().unwrap()])
}

fn sub(ws: &mut Ws, channel: &str, join_leave: bool) {
    send_json(
        ws,
        json!({"op":"sub","channel":channel,"join_leave":join_leave,"id":"s"}),
    );
    let ack = recv_json(ws);
    assert_eq!(
        (ack["op"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some("s")),
        "{ack}"
    );
}

fn presence_api(server: &Server, path: &str) -> (u16, Value) {
    let (status, body) = http(
        server.addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    );
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[test]
fn join_and_leave_reach_those_who_asked_and_presence_lists_every_shard() {
    let s = server();
    let (mut alice, _) = connect(&s, "alice");
    sub(&mut alice, "chat1", true);
    // Enough connections that both shards hold some.
    let mut bobs = Vec::new();
    for _ in 0..3 {
        let (mut bob, welcome) = connect(&s, "bob");
        sub(&mut bob, "chat1", false);
        let j = recv_json(&mut alice);
        assert_eq!(
            (j["op"].as_str(), j["channel"].as_str(), j["user"].as_str()),
            (Some("join"), Some("chat1"), Some("bob")),
            "{j}"
        );
        assert_eq!(j["conn"], welcome["conn"], "{j}");
        bobs.push(bob);
    }
    let mut anon = connect_raw_ws(&s, "/ws");
    assert_eq!(recv_json(&mut anon)["op"], "welcome");
    sub(&mut anon, "chat1", false);
    assert_eq!(recv_json(&mut alice)["op"], "join");

    // A subscriber that did not ask gets no join: a publication from the same connection
    // that joined comes after where the join would be, and is the first thing it sees.
    let (mut carol, _) = connect(&s, "carol");
    sub(&mut carol, "chat1", true);
    assert_eq!(recv_json(&mut alice)["user"], "carol");
    send_json(
        &mut carol,
        json!({"op":"pub","channel":"chat1","data":"hi"}),
    );
    for bob in &mut bobs {
        let m = recv_json(bob);
        assert_eq!(
            (m["op"].as_str(), m["data"].as_str()),
            (Some("msg"), Some("hi")),
            "{m}"
        );
    }
    assert_eq!(recv_json(&mut alice)["op"], "msg");
    assert_eq!(
        recv_json(&mut carol)["data"],
        "hi",
        "the publisher is subscribed too"
    );

    // Members across both shards: the op and the route agree.
    send_json(
        &mut carol,
        json!({"op":"presence","channel":"chat1","id":7}),
    );
    let p = recv_json(&mut carol);
    assert_eq!(
        (p["op"].as_str(), p["id"].as_u64()),
        (Some("presence"), Some(7)),
        "{p}"
    );
    let want = json!([
        {"user":"alice","connections":1},
        {"user":"bob","connections":3},
        {"user":"carol","connections":1},
    ]);
    assert_eq!(p["members"], want, "{p}");
    assert_eq!(
        (p["subscribers"].as_u64(), p["anonymous"].as_u64()),
        (Some(6), Some(1))
    );
    assert_eq!(p["complete"], true);
    let (status, body) = presence_api(&s, "/api/channels/chat1/presence");
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        (&body["members"], &body["subscribers"], &body["channel"]),
        (&want, &json!(6), &json!("chat1")),
        "{body}"
    );

    // Leaving: an unsub and a closed connection are both told, with who left.
    send_json(
        &mut bobs[0],
        json!({"op":"unsub","channel":"chat1","id":"u"}),
    );
    assert_eq!(recv_json(&mut bobs[0])["op"], "ack");
    let l = recv_json(&mut alice);
    assert_eq!(
        (l["op"].as_str(), l["user"].as_str()),
        (Some("leave"), Some("bob")),
        "{l}"
    );
    drop(carol);
    let l = recv_json(&mut alice);
    assert_eq!(
        (l["op"].as_str(), l["user"].as_str()),
        (Some("leave"), Some("carol")),
        "{l}"
    );
    s.wait_for("carol gone from presence", |s| {
        presence_api(s, "/api/channels/chat1/presence").1["members"]
            == json!([{"user":"alice","connections":1},{"user":"bob","connections":2}])
    });

    // A `sub` again without `join_leave` turns the events off.
    sub(&mut alice, "chat1", false);
    let (mut dave, _) = connect(&s, "dave");
    sub(&mut dave, "chat1", false);
    send_json(
        &mut dave,
        json!({"op":"pub","channel":"chat1","data":"barrier"}),
    );
    assert_eq!(recv_json(&mut alice)["data"], "barrier");
}

#[test]
fn channels_without_the_rule_tell_no_joins_and_presence_checks_its_input() {
    let s = server();
    let (mut alice, _) = connect(&s, "alice");
    sub(&mut alice, "lobby", true);
    let (mut bob, _) = connect(&s, "bob");
    sub(&mut bob, "lobby", false);
    send_json(
        &mut bob,
        json!({"op":"pub","channel":"lobby","data":"first"}),
    );
    assert_eq!(recv_json(&mut alice)["data"], "first", "no join before it");
    // Presence works on any channel (the rule only gates the events).
    send_json(&mut alice, json!({"op":"presence","channel":"lobby"}));
    let p = recv_json(&mut alice);
    assert_eq!(p["subscribers"], 2, "{p}");
    send_json(
        &mut alice,
        json!({"op":"presence","channel":"nobody-here","id":"e"}),
    );
    let p = recv_json(&mut alice);
    assert_eq!(
        (p["subscribers"].as_u64(), p["members"].clone()),
        (Some(0), json!([]))
    );
    // Bad input: a clear error, the connection stays.
    send_json(
        &mut alice,
        json!({"op":"presence","channel":"no spaces","id":"b"}),
    );
    let e = recv_json(&mut alice);
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("bad_channel"), Some("b")),
        "{e}"
    );
    send_json(&mut alice, json!({"op":"presence","id":"m"}));
    assert_eq!(recv_json(&mut alice)["code"], "bad_request");
    let (status, _) = presence_api(&s, "/api/channels/no%20spaces/presence");
    assert_eq!(status, 400);
    let (status, body) = http(
        s.addr,
        "POST /api/channels/lobby/presence HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: 0\r\n\r\n",
    );
    assert_eq!(status, 405, "{body}");
    send_json(&mut alice, json!({"op":"ping","id":"still"}));
    assert_eq!(recv_json(&mut alice)["op"], "pong");
}
