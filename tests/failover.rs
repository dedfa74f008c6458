//! Redis faults that lose or move history under a running cluster: a node partitioned from
//! Redis while another node goes on storing (its connected recipients caught up after), a
//! master that comes back with an older copy of the data (streams move to a new epoch; no
//! offset is reused), a Sentinel failover with `--broker-min-replicas` (no acknowledged
//! message lost), and a Redis Cluster master killed (its replica takes over; the nodes follow
//! without a restart).

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::proxy::Proxy;
use common::redis::{free_port, Redis, RedisCluster, Sentinel};
use common::*;
use serde_json::{json, Value};

/// How long a fault may keep a message unavailable in these tests (far above the failover
/// times measured here: the tests must pass on a busy machine).
const RECOVERY: Duration = Duration::from_secs(60);

fn node(url: &str, id: &str, more: &[&str]) -> Server {
    let mut args = vec!["--shards", "2", "--broker", url, "--node-id", id];
    args.extend_from_slice(&["--store", "redis"]);
    args.extend_from_slice(more);
    Server::start(&args)
}

fn send_qos1(ws: &mut Ws, to: &str, data: Value, id: &str) -> Value {
    send_json(ws, json!({"op":"send","to":to,"data":data,"id":id,"qos":1}));
    loop {
        let v = recv_json(ws);
        // Live copies and receipts of the sender's own inbox may come first.
        if v["op"] == "ack" || v["op"] == "error" {
            return v;
        }
    }
}

/// Sends until acked, retrying with the same id while the answer is `unavailable`; how
/// long it was unavailable.
fn send_until_acked(ws: &mut Ws, to: &str, data: Value, id: &str) -> (Value, Duration) {
    let start = Instant::now();
    loop {
        let a = send_qos1(ws, to, data.clone(), id);
        if a["op"] == "ack" {
            return (a, start.elapsed());
        }
        assert_eq!(a["code"], "unavailable", "{a}");
        assert!(start.elapsed() < RECOVERY, "still unavailable: {a}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The next inbox message on `ws` (skipping what is not a message).
fn next_msg(ws: &mut Ws) -> Value {
    loop {
        let v = recv_json(ws);
        if v["op"] == "msg" {
            return v;
        }
    }
}

#[test]
fn a_redis_that_went_back_in_time_moves_streams_to_a_new_epoch_and_reuses_no_offset() {
    let mut a = Redis::start();
    let pa = a.port;
    let copy = Redis::start_replica_of(free_port(), pa);
    let n = node(&a.url(), "a", &[]);
    let (mut alice, _) = connect(&n, "alice");
    let (mut bob, _) = connect(&n, "bob");
    let mut seen = BTreeMap::new();
    for i in 1..=3u64 {
        assert_eq!(
            send_qos1(&mut alice, "bob", json!(i), &format!("m{i}"))["op"],
            "ack"
        );
        let m = next_msg(&mut bob);
        assert_eq!(m["offset"], i, "{m}");
        seen.insert((m["epoch"].to_string(), i), m["data"].clone());
    }
    let epoch = next_epoch(&seen);
    // The copy has offsets 1..3, then stops following: it is the older history.
    assert!(a
        .command("WAIT 1 5000")
        .is_some_and(|r| r.starts_with(":1")));
    copy.promote();
    for i in 4..=6u64 {
        assert_eq!(
            send_qos1(&mut alice, "bob", json!(i), &format!("m{i}"))["op"],
            "ack"
        );
        let m = next_msg(&mut bob);
        assert_eq!(
            (m["offset"].as_u64(), m["epoch"].to_string()),
            (Some(i), epoch.clone())
        );
        seen.insert((m["epoch"].to_string(), i), m["data"].clone());
    }
    // Redis dies and comes back on its port with the older copy (offsets 1..3 of the same
    // epoch): what a failover to a lagging replica, or a restart from an old file, does.
    a.stop();
    let back = Redis::start_replica_of(pa, copy.port);
    back.promote();
    // The next message must not take offset 4 of the old epoch again.
    let (ack, _) = send_until_acked(&mut alice, "bob", json!(7), "m7");
    assert_ne!(
        ack["epoch"].to_string(),
        epoch,
        "alice's inbox moved on too: {ack}"
    );
    let m = next_msg(&mut bob);
    assert_eq!(m["data"], 7, "{m}");
    assert_ne!(m["epoch"].to_string(), epoch, "a new epoch: {m}");
    assert_eq!(m["offset"], 7, "past every offset handed out: {m}");
    let key = (m["epoch"].to_string(), 7);
    assert!(
        seen.insert(key, m["data"].clone()).is_none(),
        "an (epoch, offset) reused"
    );
    // A client that resumes from the lost range is told its history is gone.
    let since = format!("{}:6", epoch.trim_matches('"'));
    let mut bob2 = connect_raw_ws(&n, &format!("/ws?user=bob&since={since}"));
    assert_history_gone(&recv_json(&mut bob2));
    assert!(n.metric("switchboard_store_epoch_changes_total") >= 1);
    drop(a);
}

/// A welcome that says the resumed position's history is gone (`epoch_changed`).
fn assert_history_gone(w: &Value) {
    assert_eq!(
        (
            w["inbox"]["recovered"].as_bool(),
            w["inbox"]["reason"].as_str()
        ),
        (Some(false), Some("epoch_changed")),
        "{w}"
    );
}

/// The one epoch of what was seen.
fn next_epoch(seen: &BTreeMap<(String, u64), Value>) -> String {
    let epochs: std::collections::BTreeSet<&String> = seen.keys().map(|k| &k.0).collect();
    assert_eq!(epochs.len(), 1, "{epochs:?}");
    epochs.into_iter().next().unwrap().clone()
}

#[test]
fn a_sentinel_failover_with_min_replicas_loses_no_acknowledged_message() {
    let master = Redis::start();
    let r1 = Redis::start_replica_of(free_port(), master.port);
    let r2 = Redis::start_replica_of(free_port(), master.port);
    let sentinel = Sentinel::start(master.port, "sbm");
    sentinel.wait_replicas(2);
    let url = sentinel.url();
    let more = ["--broker-min-replicas", "1"];
    let (a, b) = (node(&url, "a", &more), node(&url, "b", &more));
    let (mut alice, _) = connect(&a, "alice");
    let (mut bob, _) = connect(&b, "bob");
    let mut master = Some(master);
    let mut acked = Vec::new();
    let mut longest = Duration::ZERO;
    for i in 0..60u64 {
        if i == 20 {
            // The master dies; the sentinel promotes a replica and points the other at it.
            master.take().unwrap().stop();
        }
        let (ack, waited) = send_until_acked(&mut alice, "bob", json!(i), &format!("m{i}"));
        longest = longest.max(waited);
        acked.push((i, ack));
    }
    let now = sentinel.master_port();
    assert!(
        now == Some(r1.port) || now == Some(r2.port),
        "a replica was promoted: {now:?}"
    );
    // bob, connected on the other node all along, got every acked message once, in order;
    // then a resume from the start finds them all in the new master.
    let mut got = Vec::new();
    while got.len() < acked.len() {
        let m = next_msg(&mut bob);
        let d = m["data"].as_u64().unwrap();
        if got.last().is_some_and(|&l| d <= l) {
            continue; // a retry's copy under offset dedup would be dropped the same way
        }
        got.push(d);
    }
    assert_eq!(got, (0..60).collect::<Vec<_>>());
    let mut bob2 = connect_raw_ws(&a, "/ws?user=bob&since=:0");
    let w = recv_json(&mut bob2);
    assert_eq!(w["inbox"]["recovered"], true, "{w}");
    let mut stored = Vec::new();
    for _ in 0..60 {
        stored.push(next_msg(&mut bob2)["data"].as_u64().unwrap());
    }
    assert_eq!(
        stored,
        (0..60).collect::<Vec<_>>(),
        "every acked message, once"
    );
    eprintln!("longest unavailable through the sentinel failover: {longest:?}");
    let short = a.metric("switchboard_store_replicas_short_total");
    eprintln!("writes answered unavailable for want of a replica: {short}");
}

#[test]
fn min_replicas_unreached_answers_unavailable_delivers_nothing_and_a_retry_stores_once() {
    let master = Redis::start();
    let replica = Redis::start_replica_of(free_port(), master.port);
    let more = [
        "--broker-min-replicas",
        "1",
        "--broker-min-replicas-timeout-ms",
        "200",
    ];
    let n = node(&master.url(), "a", &more);
    let (mut alice, _) = connect(&n, "alice");
    let (mut bob_live, _) = connect(&n, "bob");
    assert_eq!(send_qos1(&mut alice, "bob", json!(1), "m1")["op"], "ack");
    assert_eq!(next_msg(&mut bob_live)["offset"], 1);
    // The replica stops following: the master's writes reach no replica.
    replica.promote();
    let a = send_qos1(&mut alice, "bob", json!(2), "m2");
    assert_eq!(
        (a["op"].as_str(), a["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{a}"
    );
    assert!(n.metric("switchboard_store_replicas_short_total") >= 1);
    // Nobody received it: the publish waits for the replicas (it would have gone out before
    // the WAIT began, so it would be here by now).
    expect_silence(&mut bob_live, Duration::from_millis(300));
    // Nor does a catch-up read it: reads stop where replicas have the stream (bob's node
    // loses its subscription and catches up on his inbox).
    master.kill_subscribers();
    n.wait_for("a catch-up", |s| {
        s.metric("switchboard_inbox_catch_ups_total") >= 1
    });
    expect_silence(&mut bob_live, Duration::from_millis(500));
    // It follows again; the retry with the same id is acked with the offset it got.
    let r = replica.command(&format!("REPLICAOF 127.0.0.1 {}", master.port));
    assert!(r.is_some_and(|r| r.starts_with("+OK")));
    replica.wait_linked();
    let (ack, _) = send_until_acked(&mut alice, "bob", json!(2), "m2");
    assert_eq!(ack["offset"], 2, "{ack}");
    let m = next_msg(&mut bob_live);
    assert_eq!(
        (m["offset"].as_u64(), m["data"].as_u64()),
        (Some(2), Some(2)),
        "{m}"
    );
    let mut bob = connect_raw_ws(&n, "/ws?user=bob&since=:0");
    assert_eq!(recv_json(&mut bob)["inbox"]["offset"], 2, "stored once");
    let data: Vec<Value> = (0..2).map(|_| next_msg(&mut bob)["data"].clone()).collect();
    assert_eq!(data, vec![json!(1), json!(2)]);
}

#[test]
fn a_cluster_master_killed_its_replica_takes_over_and_the_nodes_follow() {
    let mut cluster = RedisCluster::start_with_replicas(3);
    let url = cluster.url();
    // The first master's URL is the seed: kill another one.
    let victim = 1;
    let user = (0..)
        .map(|i| format!("v{i}"))
        .find(|u| {
            let s = switchboard::broker::cluster::slot(format!("sb:u:{{{u}}}").as_bytes());
            usize::from(s) / (16_384 / 3) == victim
        })
        .unwrap();
    let (a, b) = (node(&url, "a", &[]), node(&url, "b", &[]));
    let (mut alice, _) = connect(&a, "alice");
    let (mut rcpt, _) = connect(&b, &user);
    let mut acked = Vec::new();
    let mut longest = Duration::ZERO;
    for i in 0..30u64 {
        if i == 10 {
            cluster.masters[victim].stop();
        }
        let (ack, waited) = send_until_acked(&mut alice, &user, json!(i), &format!("m{i}"));
        longest = longest.max(waited);
        acked.push(ack);
    }
    // The dead master stayed dead: its replica serves the slots now.
    assert!(
        cluster.replicas[victim].is_master(),
        "the replica was promoted"
    );
    let mut got = Vec::new();
    while got.len() < 30 {
        let d = next_msg(&mut rcpt)["data"].as_u64().unwrap();
        if got.last().is_some_and(|&l| d <= l) {
            continue;
        }
        got.push(d);
    }
    assert_eq!(got, (0..30).collect::<Vec<_>>());
    eprintln!("longest unavailable through the cluster failover: {longest:?}");
}

#[test]
fn a_node_partitioned_from_redis_catches_its_recipients_up_once_healed() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    // Node a reaches Redis through the proxy, node b directly.
    let a = node(&proxy.url(), "a", &[]);
    let b = node(&redis.url(), "b", &[]);
    let (mut bob, _) = connect(&a, "bob");
    let (mut alice, _) = connect(&b, "alice");
    for i in 1..=5u64 {
        assert_eq!(
            send_qos1(&mut alice, "bob", json!(i), &format!("m{i}"))["op"],
            "ack"
        );
        assert_eq!(next_msg(&mut bob)["offset"], i);
    }
    // Node a loses Redis: its connections are cut, new ones hang. alice, on node b, goes on.
    proxy.partition();
    for i in 6..=30u64 {
        assert_eq!(
            send_qos1(&mut alice, "bob", json!(i), &format!("m{i}"))["op"],
            "ack"
        );
    }
    // The partition lasts (the fault under test, not a wait for a result).
    std::thread::sleep(Duration::from_secs(2));
    proxy.heal();
    // bob, connected to node a all along, gets every acked message once, in order.
    expect_in_order(&mut bob, 6..=30, next_msg);
    a.wait_for("a catch-up", |s| {
        s.metric("switchboard_inbox_caught_up_messages_total") >= 25
    });
    assert_eq!(send_qos1(&mut alice, "bob", json!(31), "m31")["op"], "ack");
    assert_eq!(
        next_msg(&mut bob)["offset"],
        31,
        "nothing twice at the seam"
    );
}

#[test]
fn qos0_copies_a_partitioned_node_never_received_are_counted_on_that_node() {
    let redis = Redis::start();
    let proxy = Proxy::start(redis.port);
    let a = node(&proxy.url(), "a", &[]);
    let b = node(&redis.url(), "b", &[]);
    let (mut sub, _) = connect(&a, "sam");
    send_json(&mut sub, json!({"op":"sub","channel":"news","id":"s"}));
    assert_eq!(recv_json(&mut sub)["op"], "ack");
    let (mut pubr, _) = connect(&b, "pat");
    let publish = |ws: &mut Ws, i: u64| {
        send_json(
            ws,
            json!({"op":"pub","channel":"news","data":i,"id":format!("p{i}")}),
        );
        assert_eq!(recv_json(ws)["op"], "ack");
    };
    publish(&mut pubr, 0);
    assert_eq!(recv_json(&mut sub)["data"], 0);
    assert_eq!(a.metric("switchboard_broker_missed_total"), 0);
    // Node a loses Redis; node b publishes 5 qos-0 copies that cannot reach it.
    proxy.partition();
    a.wait_for("node a to see Redis gone", |s| {
        s.metric("switchboard_broker_connected") == 0
    });
    for i in 1..=5 {
        publish(&mut pubr, i);
    }
    proxy.heal();
    a.wait_for("node a's subscriptions to be restored", |s| {
        s.metric("switchboard_broker_connected") == 1
    });
    publish(&mut pubr, 6);
    // The copies published meanwhile are gone (qos 0), and node a says how many.
    assert_eq!(recv_json(&mut sub)["data"], 6);
    assert_eq!(a.metric("switchboard_broker_missed_total"), 5);
    assert_eq!(b.metric("switchboard_broker_missed_total"), 0);
}

/// Without `--broker-min-replicas`, a node that never saw the lost offsets (here: one started
/// after the failover, its memory of the streams empty) must not reuse them: streams are
/// fenced by the master that wrote them, so the promoted replica's first write moves the
/// stream to a new epoch; a resume up to the offsets both epochs share goes on, one past
/// them is told its history went.
#[test]
fn after_a_failover_a_node_that_saw_nothing_lost_reuses_no_offset_either() {
    let mut a = Redis::start();
    let pa = a.port;
    let copy = Redis::start_replica_of(free_port(), pa);
    let n = node(&a.url(), "a", &[]);
    let (mut alice, _) = connect(&n, "alice");
    let (mut bob, _) = connect(&n, "bob");
    let mut seen = BTreeMap::new();
    let send = |alice: &mut Ws, bob: &mut Ws, seen: &mut BTreeMap<_, _>, i: u64| {
        let ack = send_qos1(alice, "bob", json!(i), &format!("m{i}"));
        assert_eq!(ack["op"], "ack", "{ack}");
        let m = next_msg(bob);
        assert_eq!(m["offset"], i, "{m}");
        seen.insert((m["epoch"].to_string(), i), m["data"].clone());
    };
    for i in 1..=3u64 {
        send(&mut alice, &mut bob, &mut seen, i);
    }
    let epoch = next_epoch(&seen);
    assert!(a
        .command("WAIT 1 5000")
        .is_some_and(|r| r.starts_with(":1")));
    // The copy stops following at offset 3; 4..6 exist only on the master.
    copy.promote();
    for i in 4..=6u64 {
        send(&mut alice, &mut bob, &mut seen, i);
    }
    // The master dies; the copy takes over on its port. Node a is gone too, and node b,
    // which never saw any of it, is the first to write.
    drop(alice);
    drop(bob);
    drop(n);
    a.stop();
    let back = Redis::start_replica_of(pa, copy.port);
    back.promote();
    let b = node(&a.url(), "b", &[]);
    let (mut carol, _) = connect(&b, "carol");
    let (ack, _) = send_until_acked(&mut carol, "bob", json!(7), "c7");
    assert_eq!(ack["op"], "ack", "{ack}");
    // bob resumes from offset 3 (held by both epochs): recovered, and the new message is
    // the one after it, in the new epoch.
    let since3 = format!("{}:3", epoch.trim_matches('"'));
    let mut bob = connect_raw_ws(&b, &format!("/ws?user=bob&since={since3}"));
    let w = recv_json(&mut bob);
    assert_eq!(w["inbox"]["recovered"], true, "{w}");
    let m = next_msg(&mut bob);
    assert_eq!(m["data"], 7, "{m}");
    assert_ne!(m["epoch"].to_string(), epoch, "a new epoch: {m}");
    assert!(
        seen.insert(
            (m["epoch"].to_string(), m["offset"].as_u64().unwrap()),
            json!(7)
        )
        .is_none(),
        "an (epoch, offset) reused: {m}"
    );
    // From offset 6 (lost): told so.
    let since6 = format!("{}:6", epoch.trim_matches('"'));
    let mut bob6 = connect_raw_ws(&b, &format!("/ws?user=bob&since={since6}"));
    assert_history_gone(&recv_json(&mut bob6));
    drop(a);
}
