//! Streams in Redis (`--store redis`): nodes share one order per stream, a client resumes on
//! another node without loss, and a Redis outage is answered `unavailable`, never acked.

mod common;

use std::time::{Duration, Instant};

use common::redis::Redis;
use common::*;
use serde_json::{json, Value};

fn node(redis: &Redis, id: &str) -> Server {
    node_with(redis, id, &[])
}

fn node_with(redis: &Redis, id: &str, more: &[&str]) -> Server {
    let url = redis.url();
    let mut args = vec!["--shards", "2", "--broker", &url, "--node-id", id];
    args.extend_from_slice(&["--store", "redis"]);
    args.extend_from_slice(more);
    Server::start(&args)
}

fn send_qos1(ws: &mut Ws, to: &str, data: Value, id: &str) -> Value {
    send_json(ws, json!({"op":"send","to":to,"data":data,"id":id,"qos":1}));
    recv_json(ws)
}

fn connect_since(server: &Server, user: &str, since: &str) -> (Ws, Value) {
    let mut ws = connect_raw_ws(server, &format!("/ws?user={user}&since={since}"));
    let welcome = recv_json(&mut ws);
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    (ws, welcome)
}

#[test]
fn a_stream_has_one_order_in_redis_and_a_client_resumes_on_another_node() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    let (mut alice, welcome) = connect(&a, "alice");
    let epoch = welcome["inbox"]["epoch"].as_str().unwrap().to_owned();
    // bob is offline everywhere: qos-1 sends wait in his inbox, in Redis.
    for i in 1..=3u64 {
        let ack = send_qos1(&mut alice, "bob", json!({"n": i}), &format!("m{i}"));
        assert_eq!(
            (ack["op"].as_str(), ack["queued"].as_bool()),
            (Some("ack"), Some(true)),
            "{ack}"
        );
        assert_eq!(ack["offset"], i, "alice's inbox offset: {ack}");
        assert_eq!(ack["epoch"], epoch.as_str());
    }
    // A retry with the same id is answered from the dedup window: same offset, nothing new.
    let again = send_qos1(&mut alice, "bob", json!({"n": 2}), "m2");
    assert_eq!(
        (again["op"].as_str(), again["offset"].as_u64()),
        (Some("ack"), Some(2))
    );
    // bob connects to the other node and resumes from the start of his inbox (he has never
    // seen its epoch: each stream has its own).
    let (mut bob, welcome) = connect_since(&b, "bob", ":0");
    assert_eq!(welcome["inbox"]["offset"], 3, "{welcome}");
    assert_eq!(welcome["inbox"]["recovered"], true, "{welcome}");
    let bob_epoch = welcome["inbox"]["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3u64 {
        let m = recv_json(&mut bob);
        assert_eq!(
            (m["data"]["n"].as_u64(), m["offset"].as_u64()),
            (Some(i), Some(i)),
            "{m}"
        );
        assert_eq!(
            (m["stream"].as_str(), m["epoch"].as_str()),
            (Some("inbox"), Some(bob_epoch.as_str()))
        );
    }
    // Live across nodes, once, with the next offset; the sender's copy reaches alice's other
    // device on node b.
    let (mut alice_b, _) = connect(&b, "alice");
    let ack = send_qos1(&mut alice, "bob", json!({"n": 4}), "m4");
    assert_eq!(ack["queued"], false, "bob is online on node b: {ack}");
    let m = recv_json(&mut bob);
    assert_eq!(
        (m["data"]["n"].as_u64(), m["offset"].as_u64()),
        (Some(4), Some(4)),
        "{m}"
    );
    let copy = recv_json(&mut alice_b);
    assert_eq!(
        (copy["to"].as_str(), copy["offset"].as_u64()),
        (Some("bob"), Some(4)),
        "{copy}"
    );

    // bob answers; alice reads the first, then node a dies with kill -9.
    for i in 1..=2u64 {
        let ack = send_qos1(&mut bob, "alice", json!({"r": i}), &format!("r{i}"));
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    let seen = loop {
        let m = recv_json(&mut alice);
        if m["from"] == "bob" {
            break m["offset"].as_u64().unwrap();
        }
    };
    drop(a);
    // alice reconnects to node b from what she saw: the rest, nothing twice.
    let (mut alice2, welcome) = connect_since(&b, "alice", &format!("{epoch}:{seen}"));
    assert_eq!(welcome["inbox"]["recovered"], true, "{welcome}");
    let m = recv_json(&mut alice2);
    assert_eq!(
        (m["data"]["r"].as_u64(), m["offset"].as_u64()),
        (Some(2), Some(seen + 1)),
        "{m}"
    );
    // Live again after the replay: no gap, no duplicate at the seam.
    let ack = send_qos1(&mut bob, "alice", json!({"r": 3}), "r3");
    assert_eq!(ack["op"], "ack", "{ack}");
    let m = recv_json(&mut alice2);
    assert_eq!(
        (m["data"]["r"].as_u64(), m["offset"].as_u64()),
        (Some(3), Some(seen + 2)),
        "{m}"
    );
}

#[test]
fn redis_lost_answers_qos1_unavailable_and_nothing_unacked_is_delivered() {
    let mut redis = Redis::start();
    let port = redis.port;
    let a = node(&redis, "a");
    let (mut alice, _) = connect(&a, "alice");
    let (mut bob, _) = connect(&a, "bob");
    let ack = send_qos1(&mut alice, "bob", json!(1), "1");
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(recv_json(&mut bob)["data"], 1);
    redis.stop();
    let e = send_qos1(&mut alice, "bob", json!(2), "2");
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{e}"
    );
    let _redis = Redis::start_on(port);
    let start = Instant::now();
    let ack = loop {
        let r = send_qos1(&mut alice, "bob", json!(3), "3");
        if r["op"] == "ack" {
            break r;
        }
        assert_eq!(r["code"], "unavailable", "{r}");
        assert!(start.elapsed() < Duration::from_secs(20), "never recovered");
        std::thread::sleep(Duration::from_millis(100));
    };
    // Redis came back empty (no persistence in this test): a new epoch, offsets from 1.
    assert_eq!(ack["offset"], 1, "{ack}");
    // Once subscriptions are restored, bob gets it; the refused message never arrives.
    let m = recv_json(&mut bob);
    assert_eq!(m["data"], 3, "{m}");
}

#[test]
fn channel_history_lives_in_redis_and_subscribers_on_any_node_resume() {
    let redis = Redis::start();
    let cfg = std::env::temp_dir().join(format!("sb-cluster-ch-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[[channels]]\npattern = \"room*\"\nhistory = 5\n").unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let start = |id: &str| node_with(&redis, id, &["--config", &cfg]);
    let (a, b) = (start("a"), start("b"));
    let (mut alice, _) = connect(&a, "alice");
    let (mut carol, _) = connect(&b, "carol");
    send_json(&mut carol, json!({"op":"sub","channel":"room1","id":"s"}));
    assert_eq!(recv_json(&mut carol)["op"], "ack");
    let epoch = publish_stored(&mut alice, &mut carol, "room1", 3);
    send_json(
        &mut alice,
        json!({"op":"pub","channel":"room1","data":2,"id":"p2"}),
    );
    assert_eq!(
        recv_json(&mut alice)["offset"],
        2,
        "a retried id is stored once"
    );
    // dave, on node a, had offset 1: 2 and 3 from Redis, then live from node b.
    let (mut dave, _) = connect(&a, "dave");
    send_json(
        &mut dave,
        json!({"op":"sub","channel":"room1","since":{"epoch":epoch,"offset":1},"id":"d"}),
    );
    let ack = recv_json(&mut dave);
    assert_eq!(
        (ack["recovered"].as_bool(), ack["offset"].as_u64()),
        (Some(true), Some(3)),
        "{ack}"
    );
    for i in 2..=3u64 {
        assert_eq!(recv_json(&mut dave)["offset"], i);
    }
    send_json(
        &mut carol,
        json!({"op":"pub","channel":"room1","data":4,"id":"c4"}),
    );
    // carol subscribes too: her copy and her ack come in either order.
    let (x, y) = (recv_json(&mut carol), recv_json(&mut carol));
    let (ack, m) = if x["op"] == "ack" { (x, y) } else { (y, x) };
    assert_eq!(ack["op"], "ack", "{ack}");
    assert_eq!(
        (m["data"].as_u64(), m["offset"].as_u64()),
        (Some(4), Some(4)),
        "{m}"
    );
    let m = recv_json(&mut dave);
    assert_eq!(
        (m["data"].as_u64(), m["offset"].as_u64()),
        (Some(4), Some(4)),
        "{m}"
    );
}

#[test]
fn acked_messages_survive_a_redis_crash_when_redis_fsyncs_its_log() {
    let port = common::redis::free_port();
    let mut redis = Redis::start_durable(port);
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    let (mut alice, welcome) = connect(&a, "alice");
    let epoch = welcome["inbox"]["epoch"].as_str().unwrap().to_owned();
    for i in 1..=5u64 {
        let ack = send_qos1(&mut alice, "bob", json!(i), &format!("m{i}"));
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    // Redis dies with SIGKILL: what it acknowledged is in its fsynced log.
    redis.stop();
    let e = send_qos1(&mut alice, "bob", json!("lost?"), "x");
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{e}"
    );
    let _back = Redis::start_durable(port);
    // bob connects to the other node once it reaches Redis again: the five acked messages,
    // in order, in the epoch they were stored in; the refused one never appears; alice's
    // inbox keeps its epoch too.
    let start = Instant::now();
    let (mut bob, welcome) = loop {
        let (ws, w) = connect_since(&b, "bob", ":0");
        if w["inbox"]["recovered"] == true {
            break (ws, w);
        }
        assert_eq!(w["inbox"]["reason"], "unavailable", "{w}");
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "Redis never came back"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(welcome["inbox"]["offset"], 5, "{welcome}");
    for i in 1..=5u64 {
        let m = recv_json(&mut bob);
        assert_eq!(
            (m["data"].as_u64(), m["offset"].as_u64()),
            (Some(i), Some(i)),
            "{m}"
        );
        assert_eq!(m["epoch"], welcome["inbox"]["epoch"], "{m}");
    }
    // Redis restarted under a new replication id: without --broker-min-replicas nothing
    // proves it kept every write, so the streams move to new epochs that continue the old
    // ones up to what Redis holds (docs/cluster.md): offsets go on, and every position the
    // clients had still resumes.
    let ack = send_qos1(&mut alice, "bob", json!(6), "m6");
    assert_eq!(ack["op"], "ack", "{ack}");
    let m = recv_json(&mut bob);
    assert_eq!(
        (m["data"].as_u64(), m["offset"].as_u64()),
        (Some(6), Some(6)),
        "{m}"
    );
    let bob_epoch = welcome["inbox"]["epoch"].as_str().unwrap();
    let (mut bob2, w) = connect_since(&a, "bob", &format!("{bob_epoch}:5"));
    assert_eq!(w["inbox"]["recovered"], true, "{w}");
    assert_eq!(recv_json(&mut bob2)["data"], 6);
    let (_, w) = connect_since(&b, "alice", &format!("{epoch}:0"));
    assert_eq!(
        w["inbox"]["recovered"], true,
        "alice's old position holds: {w}"
    );
}

#[test]
fn receipts_cross_nodes_and_wait_in_the_inbox_of_a_sender_who_is_away() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    let (mut alice, welcome) = connect(&a, "alice");
    let epoch = welcome["inbox"]["epoch"].as_str().unwrap().to_owned();
    let (mut bob, _) = connect_since(&b, "bob", "confirmed");
    for id in ["x1", "x2"] {
        let ack = send_qos1(&mut alice, "bob", json!(id), id);
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    let _ = recv_json(&mut bob);
    let m2 = recv_json(&mut bob);
    assert_eq!(m2["id"], "x2", "{m2}");
    // bob (node b) confirms; alice (node a) gets the receipt through Redis.
    confirm_inbox(&mut bob, &m2["offset"], "c1");
    let r = recv_json(&mut alice);
    assert_eq!(
        (r["op"].as_str(), r["from"].as_str(), r["ids"].clone()),
        (Some("receipt"), Some("bob"), json!(["x1", "x2"])),
        "{r}"
    );
    let seen = r["offset"].as_u64().unwrap();
    // alice goes away; bob confirms her next message; she comes back on node b.
    let ack = send_qos1(&mut alice, "bob", json!("x3"), "x3");
    assert_eq!(ack["op"], "ack", "{ack}");
    drop(alice);
    let m3 = recv_json(&mut bob);
    confirm_inbox(&mut bob, &m3["offset"], "c2");
    b.wait_for("the receipt stored", |s| {
        s.metric("switchboard_store_receipts_total") == 2
    });
    let (mut alice, welcome) = connect_since(&b, "alice", &format!("{epoch}:{seen}"));
    assert_eq!(welcome["inbox"]["recovered"], true, "{welcome}");
    let r = loop {
        let v = recv_json(&mut alice);
        if v["op"] == "receipt" {
            break v;
        }
        assert_eq!(v["id"], "x3", "only her own copy comes first: {v}");
    };
    assert_eq!(r["ids"], json!(["x3"]), "{r}");
}

#[test]
fn a_dropped_pubsub_connection_loses_no_acked_message_a_catch_up_fills_the_gap() {
    let redis = Redis::start();
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    // bob follows his inbox live on node a (no resume); alice sends from node b.
    let (mut bob, _) = connect(&a, "bob");
    let (mut alice, _) = connect(&b, "alice");
    let mut send = |i: u64| {
        let ack = send_qos1(&mut alice, "bob", json!(i), &format!("m{i}"));
        assert_eq!(ack["op"], "ack", "{ack}");
    };
    for i in 1..=5 {
        send(i);
    }
    for i in 1..=5u64 {
        assert_eq!(recv_json(&mut bob)["offset"], i);
    }
    // Every pub/sub connection is cut; alice goes on at once, so some of her messages are
    // published before node a has subscribed again (how many depends on timing; all of
    // them must arrive either way, once, in order).
    redis.kill_subscribers();
    for i in 6..=40 {
        send(i);
    }
    expect_in_order(&mut bob, 6..=40, recv_json);
    // Node a heard its subscription was restored and caught up on bob's inbox.
    a.wait_for("a catch-up", |s| {
        s.metric("switchboard_inbox_catch_ups_total") >= 1
    });
    assert_eq!(a.metric("switchboard_inbox_catch_ups_failed_total"), 0);
    eprintln!(
        "messages node a delivered by catch-ups: {}",
        a.metric("switchboard_inbox_caught_up_messages_total")
    );
    // Nothing more (no duplicate): the next message is the next offset.
    send(41);
    assert_eq!(recv_json(&mut bob)["offset"], 41);
}

#[test]
fn a_dropped_pubsub_connection_loses_no_stored_publication_a_catch_up_fills_the_gap() {
    let redis = Redis::start();
    let cfg = std::env::temp_dir().join(format!("sb-cluster-chc-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[[channels]]\npattern = \"room*\"\nhistory = 100\n").unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let start = |id: &str| node_with(&redis, id, &["--config", &cfg]);
    let (a, b) = (start("a"), start("b"));
    // carol subscribes on node a without `since` (live from her `sub` on); alice publishes
    // from node b.
    let (mut carol, _) = connect(&a, "carol");
    send_json(&mut carol, json!({"op":"sub","channel":"room1","id":"s"}));
    assert_eq!(recv_json(&mut carol)["op"], "ack");
    let (mut alice, _) = connect(&b, "alice");
    let mut publish = |i: u64| {
        send_json(
            &mut alice,
            json!({"op":"pub","channel":"room1","data":i,"id":format!("p{i}")}),
        );
        let ack = recv_json(&mut alice);
        assert_eq!(
            (ack["op"].as_str(), ack["offset"].as_u64()),
            (Some("ack"), Some(i)),
            "{ack}"
        );
    };
    for i in 1..=3 {
        publish(i);
    }
    for i in 1..=3u64 {
        assert_eq!(recv_json(&mut carol)["offset"], i);
    }
    // Every subscriber connection is cut while alice goes on: some publications are made
    // before node a has subscribed again; all must reach carol, once, in order.
    redis.kill_subscribers();
    for i in 4..=40 {
        publish(i);
    }
    expect_in_order(&mut carol, 4..=40, recv_json);
    a.wait_for("a catch-up", |s| {
        s.metric("switchboard_inbox_catch_ups_total") >= 1
    });
    publish(41);
    assert_eq!(
        recv_json(&mut carol)["offset"],
        41,
        "nothing twice at the seam"
    );
}

#[test]
fn connections_that_stay_through_a_redis_restarted_empty_take_the_new_epoch_from_its_first_offset()
{
    let mut redis = Redis::start();
    let port = redis.port;
    let (a, b) = (node(&redis, "a"), node(&redis, "b"));
    // bob resumes on node a (so he has a position: the one the new epoch's offsets pass
    // below); alice sends from node b.
    let (mut bob, welcome) = connect_since(&a, "bob", "confirmed");
    assert_eq!(welcome["inbox"]["recovered"], true, "{welcome}");
    let (mut alice, _) = connect(&b, "alice");
    for i in 1..=3u64 {
        let ack = send_qos1(&mut alice, "bob", json!(i), &format!("m{i}"));
        assert_eq!(ack["op"], "ack", "{ack}");
    }
    let mut old = Value::Null;
    for i in 1..=3u64 {
        let m = recv_json(&mut bob);
        assert_eq!(
            (m["offset"].as_u64(), m["data"].as_u64()),
            (Some(i), Some(i))
        );
        old = m["epoch"].clone();
    }
    // Redis dies and comes back empty on its port: bob's inbox starts again, offset 1 in a
    // new epoch, while bob stays connected.
    redis.stop();
    let _redis = Redis::start_on(port);
    let start = Instant::now();
    let mut acked = 4;
    while acked <= 6 {
        let ack = send_qos1(&mut alice, "bob", json!(acked), &format!("n{acked}"));
        if ack["op"] == "ack" {
            acked += 1;
            continue;
        }
        assert_eq!(ack["code"], "unavailable", "{ack}");
        assert!(start.elapsed() < Duration::from_secs(60), "{ack}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Every one reaches bob, in the new epoch from its first offset (before, his position
    // 3 dropped offsets 1..3 of the new epoch as if he had them).
    for (i, data) in (4..=6u64).enumerate() {
        let m = loop {
            let v = recv_json(&mut bob);
            if v["op"] == "msg" {
                break v;
            }
        };
        assert_eq!(m["data"], data, "{m}");
        assert_eq!(m["offset"], i as u64 + 1, "{m}");
        assert_ne!(m["epoch"], old, "a new epoch: {m}");
    }
}
