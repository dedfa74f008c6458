//! Users message each other through the real binary: DMs, devices, channels, ping, errors.

mod common;

use common::*;
use serde_json::json;

#[test]
fn two_users_dm_each_other_both_ways() {
    let server = Server::start(&["--shards", "2", "--fd-table", "shared"]);
    let (mut alice, w) = connect(&server, "alice");
    assert_eq!(w["user"], "alice");
    assert_eq!(w["ping_interval_ms"], 25000);
    assert!(w["conn"].is_string());
    let (mut bob, _) = connect(&server, "bob");

    send_json(
        &mut alice,
        json!({"op":"send","to":"bob","data":{"text":"hi bob"},"id":"c1"}),
    );
    assert_eq!(recv_json(&mut alice), json!({"op":"ack","id":"c1"}));
    let m = recv_json(&mut bob);
    assert_eq!(
        (m["op"].as_str(), m["from"].as_str(), m["to"].as_str()),
        (Some("msg"), Some("alice"), Some("bob"))
    );
    assert_eq!(m["data"], json!({"text":"hi bob"}));
    assert!(m["ts"].as_u64().unwrap() > 1_600_000_000_000);

    send_json(
        &mut bob,
        json!({"op":"send","to":"alice","data":"hello alice","id":7}),
    );
    assert_eq!(recv_json(&mut bob), json!({"op":"ack","id":7}));
    let m = recv_json(&mut alice);
    assert_eq!(
        (m["from"].as_str(), m["data"].as_str()),
        (Some("bob"), Some("hello alice"))
    );
}

#[test]
fn every_device_of_both_users_sees_the_conversation() {
    let server = Server::start(&["--shards", "2"]);
    let (mut alice1, _) = connect(&server, "alice");
    let (mut alice2, _) = connect(&server, "alice");
    let (mut bob1, _) = connect(&server, "bob");
    let (mut bob2, _) = connect(&server, "bob");

    send_json(
        &mut alice1,
        json!({"op":"send","to":"bob","data":1,"id":"x"}),
    );
    assert_eq!(recv_json(&mut alice1)["op"], "ack");
    for ws in [&mut bob1, &mut bob2, &mut alice2] {
        let m = recv_json(ws);
        assert_eq!(
            (m["from"].as_str(), m["to"].as_str(), m["data"].as_i64()),
            (Some("alice"), Some("bob"), Some(1))
        );
    }
    // The sending connection gets no copy: a ping round-trip proves nothing else is queued.
    send_json(&mut alice1, json!({"op":"ping","data":"barrier"}));
    assert_eq!(
        recv_json(&mut alice1),
        json!({"op":"pong","data":"barrier"})
    );
}

#[test]
fn channel_publish_reaches_subscribers_on_every_shard_and_nobody_else() {
    let server = Server::start(&["--shards", "2"]);
    let mut subs: Vec<Ws> = Vec::new();
    let mut shards_seen = std::collections::HashSet::new();
    for i in 0..50 {
        let (mut ws, w) = connect(&server, &format!("sub{i}"));
        shards_seen.insert(
            w["conn"]
                .as_str()
                .unwrap()
                .split('.')
                .next()
                .unwrap()
                .to_string(),
        );
        send_json(&mut ws, json!({"op":"sub","channel":"room1","id":i}));
        assert_eq!(recv_json(&mut ws), json!({"op":"ack","id":i}));
        subs.push(ws);
    }
    assert_eq!(shards_seen.len(), 2, "subscribers landed on both shards");
    let mut outsiders: Vec<Ws> = (0..5)
        .map(|i| connect(&server, &format!("out{i}")).0)
        .collect();
    // A subscriber that leaves gets nothing.
    let mut leaver = subs.pop().unwrap();
    send_json(
        &mut leaver,
        json!({"op":"unsub","channel":"room1","id":"u"}),
    );
    assert_eq!(recv_json(&mut leaver)["op"], "ack");

    let (mut publisher, _) = connect(&server, "pub");
    send_json(
        &mut publisher,
        json!({"op":"pub","channel":"room1","data":{"n":1},"id":"p1"}),
    );
    assert_eq!(recv_json(&mut publisher), json!({"op":"ack","id":"p1"}));
    for ws in subs.iter_mut() {
        let m = recv_json(ws);
        assert_eq!(
            (
                m["channel"].as_str(),
                m["from"].as_str(),
                m["data"]["n"].as_i64()
            ),
            (Some("room1"), Some("pub"), Some(1))
        );
    }
    // Absence is checked after a second publication to another channel everyone is in, so the
    // first one had every chance to arrive first.
    for ws in outsiders.iter_mut().chain(std::iter::once(&mut leaver)) {
        send_json(ws, json!({"op":"sub","channel":"all","id":"a"}));
        assert_eq!(recv_json(ws)["op"], "ack");
    }
    send_json(
        &mut publisher,
        json!({"op":"pub","channel":"all","data":"marker"}),
    );
    for ws in outsiders.iter_mut().chain(std::iter::once(&mut leaver)) {
        let m = recv_json(ws);
        assert_eq!(m["data"], "marker", "non-subscriber received {m}");
    }
}

#[test]
fn publisher_receives_its_own_publication_when_subscribed() {
    let server = Server::start(&["--shards", "1"]);
    let (mut a, _) = connect(&server, "a");
    send_json(&mut a, json!({"op":"sub","channel":"c","id":1}));
    assert_eq!(recv_json(&mut a)["op"], "ack");
    send_json(&mut a, json!({"op":"pub","channel":"c","data":true}));
    let m = recv_json(&mut a);
    assert_eq!(
        (m["op"].as_str(), m["data"].as_bool()),
        (Some("msg"), Some(true))
    );
}

#[test]
fn ping_op_is_answered_with_the_same_data() {
    let server = Server::start(&[]);
    let (mut a, _) = connect(&server, "a");
    let data = json!({"nested":[1,"two",{"three":3.5}],"s":"é\"\\"});
    send_json(&mut a, json!({"op":"ping","data":data.clone()}));
    assert_eq!(recv_json(&mut a), json!({"op":"pong","data":data}));
}

#[test]
fn request_errors_keep_the_connection_open() {
    let server = Server::start(&["--shards", "2"]);
    let (mut a, _) = connect(&server, "a");
    send_json(
        &mut a,
        json!({"op":"send","to":"nobody","data":1,"id":"c1"}),
    );
    let e = recv_json(&mut a);
    assert_eq!(
        (e["op"].as_str(), e["id"].as_str(), e["code"].as_str()),
        (Some("error"), Some("c1"), Some("user_offline"))
    );
    assert!(e["message"].as_str().unwrap().contains("nobody"));

    a.send(tungstenite::Message::text("{not json")).unwrap();
    let e = recv_json(&mut a);
    assert_eq!(e["code"], "bad_request");
    assert!(e.get("id").is_none());

    send_json(&mut a, json!({"op":"teleport","id":"c2"}));
    assert_eq!((recv_json(&mut a)["code"].as_str()), Some("bad_request"));
    send_json(&mut a, json!({"op":"send","data":1,"id":"c3"}));
    let e = recv_json(&mut a);
    assert_eq!(
        (e["code"].as_str(), e["id"].as_str()),
        (Some("bad_request"), Some("c3"))
    );
    assert!(e["message"].as_str().unwrap().contains("to"));
    send_json(
        &mut a,
        json!({"op":"sub","channel":"no spaces allowed","id":"c4"}),
    );
    assert_eq!(recv_json(&mut a)["code"], "bad_channel");
    send_json(&mut a, json!({"op":"pub","channel":"","data":1,"id":"c5"}));
    assert_eq!(recv_json(&mut a)["code"], "bad_channel");
    // Still open and working.
    send_json(&mut a, json!({"op":"ping","data":"alive"}));
    assert_eq!(recv_json(&mut a)["data"], "alive");
}

#[test]
fn user_goes_offline_when_last_device_leaves() {
    let server = Server::start(&["--shards", "2"]);
    let (mut a, _) = connect(&server, "a");
    let (mut b, _) = connect(&server, "b");
    send_json(&mut a, json!({"op":"send","to":"b","data":1,"id":1}));
    assert_eq!(recv_json(&mut a)["op"], "ack");
    assert_eq!(recv_json(&mut b)["op"], "msg");
    b.close(None).unwrap();
    // Drain until the server closes; then b is gone everywhere.
    while b.read().is_ok() {}
    server.wait_for("b to go offline", |_| {
        send_json(&mut a, json!({"op":"send","to":"b","data":2,"id":2}));
        recv_json(&mut a)["op"] == "error"
    });
}
