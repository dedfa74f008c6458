//! Several nodes sharing one real `redis-server`: DMs and channel publications cross nodes,
//! only interested nodes receive, and Redis failures are answered, never silent.

mod common;

use std::time::Duration;

use common::redis::Redis;
use common::*;
use serde_json::{json, Value};

fn node(redis: &Redis, id: &str) -> Server {
    Server::start(&["--shards", "2", "--broker", &redis.url(), "--node-id", id])
}

fn send(ws: &mut Ws, to: &str, data: Value, id: &str) -> Value {
    send_json(ws, json!({"op":"send","to":to,"data":data,"id":id}));
    recv_json(ws)
}

#[test]
fn dms_cross_nodes_both_ways_and_reach_every_device() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis, "a"), node(&redis, "b"), node(&redis, "c"));
    let (mut alice_a, _) = connect(&a, "alice");
    let (mut alice_c, _) = connect(&c, "alice");
    let (mut bob, _) = connect(&b, "bob");
    let ack = send(&mut alice_a, "bob", json!("hi bob"), "1");
    assert_eq!(
        (ack["op"].as_str(), ack["id"].as_str()),
        (Some("ack"), Some("1")),
        "{ack}"
    );
    let m = recv_json(&mut bob);
    assert_eq!(
        (m["from"].as_str(), m["data"].as_str()),
        (Some("alice"), Some("hi bob")),
        "{m}"
    );
    // alice's other device, on a third node, sees her side of the conversation.
    let copy = recv_json(&mut alice_c);
    assert_eq!(
        (copy["to"].as_str(), copy["data"].as_str()),
        (Some("bob"), Some("hi bob"))
    );
    let ack = send(&mut bob, "alice", json!("hi alice"), "2");
    assert_eq!(ack["op"], "ack", "{ack}");
    for ws in [&mut alice_a, &mut alice_c] {
        let m = recv_json(ws);
        assert_eq!(
            (m["from"].as_str(), m["data"].as_str()),
            (Some("bob"), Some("hi alice"))
        );
    }
    // Nobody has carol anywhere in the cluster.
    let e = send(&mut bob, "carol", json!(1), "3");
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("user_offline")),
        "{e}"
    );
    // Order per sender holds across nodes.
    for i in 0..50 {
        send_json(&mut alice_a, json!({"op":"send","to":"bob","data":i}));
    }
    for i in 0..50 {
        assert_eq!(recv_json(&mut bob)["data"], i);
        assert_eq!(
            recv_json(&mut alice_c)["data"],
            i,
            "the copy on alice's other node"
        );
    }
    // The push API on node c reaches bob on node b and a channel's subscribers elsewhere.
    let body = r#"{"to":"bob","data":"from the backend"}"#;
    let (status, _) = post(c.addr, "/api/send", body);
    assert_eq!(status, 200);
    assert_eq!(recv_json(&mut bob)["data"], "from the backend");
    let body = r#"{"data":"to everyone"}"#;
    let (status, _) = post(a.addr, "/api/broadcast", body);
    assert_eq!(status, 200);
    for ws in [&mut bob, &mut alice_a, &mut alice_c] {
        assert_eq!(recv_json(ws)["data"], "to everyone");
    }
    assert!(a.metric("switchboard_broker_published_total") >= 52);
    assert!(b.metric("switchboard_broker_received_total") >= 51);
}

#[test]
fn a_publication_reaches_subscribers_on_every_node_and_no_one_else() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis, "a"), node(&redis, "b"), node(&redis, "c"));
    let mut subs = Vec::new();
    for (n, user) in [(&b, "bea"), (&c, "cid"), (&a, "ann")] {
        let (mut ws, _) = connect(n, user);
        send_json(&mut ws, json!({"op":"sub","channel":"room","id":"s"}));
        let ack = recv_json(&mut ws);
        assert_eq!(ack["op"], "ack", "{ack}");
        subs.push(ws);
    }
    let (mut dan, _) = connect(&c, "dan");
    let (mut pubr, _) = connect(&a, "pat");
    send_json(
        &mut pubr,
        json!({"op":"pub","channel":"room","data":"hello","id":"p"}),
    );
    assert_eq!(recv_json(&mut pubr)["op"], "ack");
    for ws in &mut subs {
        let m = recv_json(ws);
        assert_eq!(
            (m["channel"].as_str(), m["data"].as_str()),
            (Some("room"), Some("hello")),
            "{m}"
        );
    }
    // cid on node c got it: dan, on the same node and not subscribed, got nothing.
    expect_silence(&mut dan, Duration::from_millis(300));
    // Node b has no subscriber of "other": it does not even receive it from Redis.
    let before = b.metric("switchboard_broker_received_total");
    send_json(
        &mut pubr,
        json!({"op":"pub","channel":"other","data":"x","id":"q"}),
    );
    assert_eq!(recv_json(&mut pubr)["op"], "ack");
    send_json(
        &mut pubr,
        json!({"op":"pub","channel":"room","data":"after","id":"r"}),
    );
    assert_eq!(recv_json(&mut pubr)["op"], "ack");
    assert_eq!(recv_json(&mut subs[0])["data"], "after");
    assert_eq!(
        b.metric("switchboard_broker_received_total"),
        before + 1,
        "only the room message reached node b"
    );
    // The last subscriber leaving unsubscribes the node.
    send_json(
        &mut subs[0],
        json!({"op":"unsub","channel":"room","id":"u"}),
    );
    assert_eq!(recv_json(&mut subs[0])["op"], "ack");
    // Left: bea's own DMs and the broadcast channel every node keeps.
    b.wait_for("node b's room subscription to go", |s| {
        s.metric("switchboard_broker_subscriptions") == 2
    });
}

#[test]
fn redis_unreachable_at_start_is_a_clear_error_and_exit_1() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--listen", "127.0.0.1:0", "--store", "memory"])
        .args(["--broker", &format!("redis://127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the broker at redis://127.0.0.1:"),
        "{err}"
    );
}

#[test]
fn redis_lost_mid_run_is_answered_unavailable_and_recovers_when_back() {
    let mut redis = Redis::start();
    let port = redis.port;
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    let (mut alice, _) = connect(&a, "alice");
    let (mut amy, _) = connect(&a, "amy");
    let (mut bob, _) = connect(&b, "bob");
    assert_eq!(send(&mut alice, "bob", json!(1), "1")["op"], "ack");
    assert_eq!(recv_json(&mut bob)["data"], 1);
    redis.stop();
    a.wait_for("node a to see Redis gone", |s| {
        s.metric("switchboard_broker_connected") == 0
    });
    // Local delivery goes on; a DM only another node could deliver is refused, not lost.
    assert_eq!(send(&mut alice, "amy", json!("local"), "2")["op"], "ack");
    assert_eq!(recv_json(&mut amy)["data"], "local");
    let e = send(&mut alice, "bob", json!(2), "3");
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{e}"
    );
    let _redis = Redis::start_on(port);
    for n in [&a, &b] {
        n.wait_for("the broker to reconnect", |s| {
            s.metric("switchboard_broker_connected") == 1
        });
        // sb:all and at least one user's channel.
        n.wait_for("subscriptions to be restored", |s| {
            s.metric("switchboard_broker_subscriptions") >= 2
        });
    }
    // The subscriber restored bob's subscription: the next DM crosses again.
    let start = std::time::Instant::now();
    loop {
        let r = send(&mut alice, "bob", json!(4), "4");
        if r["op"] == "ack" {
            break;
        }
        // The publisher reconnects on its next request: `unavailable` until then.
        assert_eq!(r["code"], "unavailable", "{r}");
        assert!(start.elapsed() < DEADLINE, "never recovered");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(recv_json(&mut bob)["data"], 4);
    assert!(a.metric("switchboard_broker_disconnects_total") >= 1);
}

#[test]
fn sigterm_on_a_node_tells_its_clients_to_reconnect_elsewhere() {
    let redis = Redis::start();
    let (mut a, b) = (node(&redis, "a"), node(&redis, "b"));
    let (mut ws, _) = connect(&a, "alice");
    let (mut bob, _) = connect(&b, "bob");
    let status = a.signal_and_wait(libc::SIGTERM);
    assert!(status.success(), "{status:?}");
    match ws.read() {
        Ok(tungstenite::Message::Close(Some(f))) => {
            assert_eq!(u16::from(f.code), 1001);
            assert!(
                f.reason.contains("reconnect to another node"),
                "{}",
                f.reason
            );
        }
        other => panic!("expected a close frame, got {other:?}"),
    }
    // The other node carries on; alice reconnects there and is reachable.
    let (mut alice, _) = connect(&b, "alice");
    assert_eq!(
        send(&mut bob, "alice", json!("still here"), "1")["op"],
        "ack"
    );
    assert_eq!(recv_json(&mut alice)["data"], "still here");
}

fn user_on(server: &Server, user: &str) -> Value {
    get_json(server, &format!("/api/users/{user}"))
}

#[test]
fn any_node_counts_users_and_subscribers_on_every_node_and_a_dead_node_drops_out() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis, "a"), node(&redis, "b"), node(&redis, "c"));
    let alice_a = connect(&a, "alice");
    let _alice_b1 = connect(&b, "alice");
    let _alice_b2 = connect(&b, "alice");
    // Each node writes its counts to Redis as connections come and go (asynchronously).
    c.wait_for("alice's three connections", |s| {
        user_on(s, "alice")["connections"] == 3
    });
    assert_eq!(user_on(&c, "alice")["online"], true);
    assert_eq!(user_on(&c, "nobody")["online"], false);
    // Channel subscribers are counted across nodes the same way.
    let mut subs = Vec::new();
    for n in [&a, &b, &b] {
        let (mut ws, _) = connect(n, "sub");
        send_json(&mut ws, json!({"op":"sub","channel":"room","id":"s"}));
        assert_eq!(recv_json(&mut ws)["op"], "ack");
        subs.push(ws);
    }
    let room = |s: &Server| -> Value {
        let (status, body) = http(
            s.addr,
            "GET /api/channels/room HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    c.wait_for("three subscribers of room", |s| room(s)["subscribers"] == 3);
    // Node b dies without a word: its two connections vanish within two heartbeats.
    let mut b = b;
    let _ = b.child.kill();
    let _ = b.child.wait();
    c.wait_for("node b's connections to drop out", |s| {
        user_on(s, "alice")["connections"] == 1
    });
    assert_eq!(
        room(&c)["subscribers"],
        1,
        "node b's two subscribers went with it"
    );
    drop(alice_a);
    c.wait_for("alice to go offline", |s| {
        user_on(s, "alice")["online"] == false
    });
}

#[test]
fn api_disconnect_on_one_node_closes_the_user_on_every_node() {
    let redis = Redis::start();
    let (a, b, c) = (node(&redis, "a"), node(&redis, "b"), node(&redis, "c"));
    let (mut on_b, _) = connect(&b, "mallory");
    let (mut on_c, _) = connect(&c, "mallory");
    let (mut bystander, _) = connect(&b, "bob");
    let body = r#"{"user":"mallory","code":4002,"reason":"kicked"}"#;
    let (status, answer) = post(a.addr, "/api/disconnect", body);
    // The count is this node's (none here); the other nodes close theirs.
    assert_eq!(status, 200, "{answer}");
    for ws in [&mut on_b, &mut on_c] {
        match ws.read() {
            Ok(tungstenite::Message::Close(Some(f))) => {
                assert_eq!((u16::from(f.code), f.reason.as_str()), (4002, "kicked"));
            }
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
    // Others stay.
    send_json(&mut bystander, json!({"op":"ping","id":"p"}));
    assert_eq!(recv_json(&mut bystander)["op"], "pong");
}

#[test]
fn a_second_connection_is_welcomed_only_once_the_users_subscription_is_active() {
    let redis = Redis::start();
    let a = node(&redis, "a");
    // Redis holds every command for 5 s: the SUBSCRIBE for alice cannot complete before
    // (the margin covers a slow, loaded machine: the check below takes 0.3 s).
    let paused = redis.command("CLIENT PAUSE 5000 ALL").unwrap_or_default();
    assert!(paused.starts_with("+OK"), "{paused}");
    let mut first = connect_raw_ws(&a, "/ws?user=alice");
    let mut second = connect_raw_ws(&a, "/ws?user=alice");
    // Welcomed before it, the second could miss a DM published meanwhile by another node.
    expect_silence(&mut second, Duration::from_millis(300));
    assert_eq!(recv_json(&mut first)["op"], "welcome");
    assert_eq!(recv_json(&mut second)["op"], "welcome");
}

#[test]
fn counts_in_redis_are_rewritten_after_redis_comes_back_empty() {
    let mut redis = Redis::start();
    let port = redis.port;
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    let (first, _) = connect(&a, "alice");
    let (_second, _) = connect(&a, "alice");
    let (mut carol, _) = connect(&a, "carol");
    send_json(&mut carol, json!({"op":"sub","channel":"room","id":"s"}));
    assert_eq!(recv_json(&mut carol)["op"], "ack");
    b.wait_for("alice's two connections", |s| {
        user_on(s, "alice")["connections"] == 2
    });
    // Redis dies and comes back empty; meanwhile one of alice's connections went away.
    redis.stop();
    a.wait_for("node a to see Redis gone", |s| {
        s.metric("switchboard_broker_connected") == 0
    });
    drop(first);
    let _redis = Redis::start_on(port);
    // Node a rewrites its counts from what its shards hold: alice 1, room 1.
    b.wait_for("alice's count rewritten", |s| {
        user_on(s, "alice")["connections"] == 1
    });
    let (status, body) = http(
        b.addr,
        "GET /api/channels/room HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["subscribers"],
        1,
        "{body}"
    );
}

/// Nodes whose `chat*` channels tell joins and leaves.
fn node_jl(redis: &Redis, id: &str) -> Server {
    let cfg = std::env::temp_dir().join(format!("sb-cluster-jl-{}.toml", std::process::id()));
    std::fs::write(
        &cfg,
        "[[channels]]\npattern = \"chat*\"\njoin_leave = true\n",
    )
    .unwrap();
    let url = redis.url();
    Server::start(&[
        "--shards",
        "2",
        "--broker",
        &url,
        "--node-id",
        id,
        "--config",
        cfg.to_str().unwrap(),
    ])
}

fn presence_on(server: &Server, channel: &str) -> Value {
    let (status, body) = http(
        server.addr,
        &format!(
            "GET /api/channels/{channel}/presence HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        ),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn presence_lists_members_on_every_node_joins_cross_nodes_and_a_dead_node_drops_out() {
    let redis = Redis::start();
    let (a, b, c) = (
        node_jl(&redis, "a"),
        node_jl(&redis, "b"),
        node_jl(&redis, "c"),
    );
    let (mut alice, _) = connect(&a, "alice");
    send_json(
        &mut alice,
        json!({"op":"sub","channel":"chat","join_leave":true,"id":"s"}),
    );
    assert_eq!(recv_json(&mut alice)["op"], "ack");
    // Joins on other nodes reach alice through Redis.
    let mut on_b = Vec::new();
    for user in ["bob", "bob", "carol"] {
        let (mut ws, _) = connect(&b, user);
        send_json(&mut ws, json!({"op":"sub","channel":"chat","id":"s"}));
        assert_eq!(recv_json(&mut ws)["op"], "ack");
        let j = recv_json(&mut alice);
        assert_eq!(
            (j["op"].as_str(), j["user"].as_str()),
            (Some("join"), Some(user)),
            "{j}"
        );
        on_b.push(ws);
    }
    let (mut dave, _) = connect(&c, "dave");
    send_json(&mut dave, json!({"op":"sub","channel":"chat","id":"s"}));
    assert_eq!(recv_json(&mut dave)["op"], "ack");
    assert_eq!(recv_json(&mut alice)["user"], "dave");
    // Any node lists the members of every node (counts reach Redis asynchronously).
    let everyone = json!([
        {"user":"alice","connections":1},
        {"user":"bob","connections":2},
        {"user":"carol","connections":1},
        {"user":"dave","connections":1},
    ]);
    c.wait_for("five members on three nodes", |s| {
        presence_on(s, "chat")["members"] == everyone
    });
    send_json(
        &mut dave,
        json!({"op":"presence","channel":"chat","id":"p"}),
    );
    let p = recv_json(&mut dave);
    assert_eq!(
        (&p["members"], &p["subscribers"], &p["complete"]),
        (&everyone, &json!(5), &json!(true)),
        "{p}"
    );
    // A leave on node c reaches alice on node a.
    send_json(&mut dave, json!({"op":"unsub","channel":"chat","id":"u"}));
    assert_eq!(recv_json(&mut dave)["op"], "ack");
    let l = recv_json(&mut alice);
    assert_eq!(
        (l["op"].as_str(), l["user"].as_str()),
        (Some("leave"), Some("dave")),
        "{l}"
    );
    // Node b dies without a word: its members vanish within two heartbeats.
    let mut b = b;
    let _ = b.child.kill();
    let _ = b.child.wait();
    a.wait_for("node b's members to drop out", |s| {
        presence_on(s, "chat")["members"] == json!([{"user":"alice","connections":1}])
    });
}

#[test]
fn presence_in_redis_is_rewritten_after_redis_comes_back_empty() {
    let mut redis = Redis::start();
    let port = redis.port;
    let (a, b) = (node_jl(&redis, "a"), node_jl(&redis, "b"));
    let mut subs = Vec::new();
    for user in ["ann", "ann", "ben"] {
        let (mut ws, _) = connect(&a, user);
        send_json(&mut ws, json!({"op":"sub","channel":"chat","id":"s"}));
        assert_eq!(recv_json(&mut ws)["op"], "ack");
        subs.push(ws);
    }
    b.wait_for("three members", |s| {
        presence_on(s, "chat")["subscribers"] == 3
    });
    redis.stop();
    a.wait_for("node a to see Redis gone", |s| {
        s.metric("switchboard_broker_connected") == 0
    });
    // Meanwhile on node a: one of ann's connections leaves; b answers what it can.
    drop(subs.remove(0));
    let p = presence_on(&b, "chat");
    assert_eq!(p["complete"], false, "{p}");
    let _redis = Redis::start_on(port);
    b.wait_for("node a's members rewritten", |s| {
        presence_on(s, "chat")["members"]
            == json!([{"user":"ann","connections":1},{"user":"ben","connections":1}])
    });
}
