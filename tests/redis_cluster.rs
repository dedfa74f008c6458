//! Nodes on a real Redis Cluster (three `redis-server` masters started here): sharded pub/sub
//! (`SPUBLISH`/`SSUBSCRIBE`, never the cluster-wide `PUBLISH`), streams whose keys spread over
//! the masters, cluster-wide counts, and a master lost then back.

mod common;

use std::time::{Duration, Instant};

use common::redis::RedisCluster;
use common::*;
use serde_json::{json, Value};
use switchboard::broker::cluster::{slot, Conns, SlotMap};
use switchboard::broker::sentinel::Seed;

fn node(cluster: &RedisCluster, id: &str, more: &[&str]) -> Server {
    let url = cluster.url();
    let mut args = vec!["--shards", "2", "--broker", &url, "--node-id", id];
    args.extend_from_slice(more);
    Server::start(&args)
}

fn send(ws: &mut Ws, to: &str, data: Value, id: &str, qos: u8) -> Value {
    send_json(
        ws,
        json!({"op":"send","to":to,"data":data,"id":id,"qos":qos}),
    );
    recv_json(ws)
}

/// Which of `n` evenly split masters holds `user`'s DMs and inbox.
fn master_of(user: &str, n: usize) -> usize {
    let s = usize::from(slot(format!("sb:u:{{{user}}}").as_bytes()));
    (s / (16_384 / n)).min(n - 1)
}

/// A user name whose slot is on master `m` of `n`.
fn user_on_master(prefix: &str, m: usize, n: usize) -> String {
    (0..)
        .map(|i| format!("{prefix}{i}"))
        .find(|u| master_of(u, n) == m)
        .unwrap()
}

#[test]
fn dms_and_publications_cross_nodes_on_sharded_pubsub_only() {
    let cluster = RedisCluster::start(3);
    let (a, b, c) = (
        node(&cluster, "a", &["--store", "memory"]),
        node(&cluster, "b", &["--store", "memory"]),
        node(&cluster, "c", &["--store", "memory"]),
    );
    // Users on each master, so every master carries some of the traffic.
    let users: Vec<String> = (0..3).map(|m| user_on_master("u", m, 3)).collect();
    let (mut u0_a, _) = connect(&a, &users[0]);
    let (mut u0_c, _) = connect(&c, &users[0]);
    let (mut u1_b, _) = connect(&b, &users[1]);
    let (mut u2_c, _) = connect(&c, &users[2]);
    let ack = send(&mut u0_a, &users[1], json!("hi"), "1", 0);
    assert_eq!(ack["op"], "ack", "{ack}");
    let m = recv_json(&mut u1_b);
    assert_eq!(
        (m["from"].as_str(), m["data"].as_str()),
        (Some(users[0].as_str()), Some("hi")),
        "{m}"
    );
    // The sender's other device, on another node, sees the DM too.
    let copy = recv_json(&mut u0_c);
    assert_eq!(copy["to"], users[1].as_str(), "{copy}");
    // Back the other way, and to a third master's user.
    assert_eq!(send(&mut u1_b, &users[0], json!("yo"), "2", 0)["op"], "ack");
    for ws in [&mut u0_a, &mut u0_c] {
        assert_eq!(recv_json(ws)["data"], "yo");
    }
    assert_eq!(
        send(&mut u1_b, &users[2], json!("three"), "3", 0)["op"],
        "ack"
    );
    assert_eq!(recv_json(&mut u2_c)["data"], "three");
    // A publication on node a reaches subscribers on b and c, not a bystander.
    let mut subs = Vec::new();
    for (n, u) in [(&b, "bea"), (&c, "cid")] {
        let (mut ws, _) = connect(n, u);
        send_json(&mut ws, json!({"op":"sub","channel":"room","id":"s"}));
        assert_eq!(recv_json(&mut ws)["op"], "ack");
        subs.push(ws);
    }
    let (mut dan, _) = connect(&c, "dan");
    send_json(
        &mut u0_a,
        json!({"op":"pub","channel":"room","data":"hello","id":"p"}),
    );
    assert_eq!(recv_json(&mut u0_a)["op"], "ack");
    for ws in &mut subs {
        assert_eq!(recv_json(ws)["data"], "hello");
    }
    expect_silence(&mut dan, Duration::from_millis(300));
    // The push API on c reaches a user on a.
    let body = format!(r#"{{"to":"{}","data":"from the api"}}"#, users[0]);
    let (status, answer) = post(c.addr, "/api/send", &body);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(recv_json(&mut u0_a)["data"], "from the api");
    // Counts across nodes, from the per-node hashes in the cluster.
    b.wait_for("u0's two connections", |s| {
        get_json(s, &format!("/api/users/{}", users[0]))["connections"] == 2
    });
    a.wait_for("two subscribers of room", |s| {
        get_json(s, "/api/channels/room")["subscribers"] == 2
    });
    // Only sharded pub/sub went through Redis.
    assert!(
        cluster.calls("spublish") >= 6,
        "spublish {}",
        cluster.calls("spublish")
    );
    assert!(cluster.calls("ssubscribe") >= 4);
    assert_eq!(
        (cluster.calls("publish"), cluster.calls("subscribe")),
        (0, 0),
        "no cluster-wide PUBLISH or SUBSCRIBE"
    );
    let busy = cluster
        .masters
        .iter()
        .filter(|m| m.calls("spublish") > 0)
        .count();
    assert!(busy >= 2, "publishes spread over the masters: {busy}");
}

#[test]
fn streams_spread_over_the_masters_and_resume_on_another_node() {
    let cluster = RedisCluster::start(3);
    let cfg = std::env::temp_dir().join(format!("sb-rcluster-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[[channels]]\npattern = \"news*\"\nhistory = 5\n").unwrap();
    let cfg = cfg.to_str().unwrap().to_owned();
    let args = ["--store", "redis", "--config", &cfg];
    let (a, b) = (node(&cluster, "a", &args), node(&cluster, "b", &args));
    // Sender and recipient on different masters: a DM is one script per inbox.
    let alice = user_on_master("alice", 0, 3);
    let bob = user_on_master("bob", 1, 3);
    let (mut al, welcome) = connect(&a, &alice);
    let alice_epoch = welcome["inbox"]["epoch"].as_str().unwrap().to_owned();
    for i in 1..=3u64 {
        let ack = send(&mut al, &bob, json!({"n": i}), &format!("m{i}"), 1);
        assert_eq!(
            (
                ack["op"].as_str(),
                ack["queued"].as_bool(),
                ack["offset"].as_u64()
            ),
            (Some("ack"), Some(true), Some(i)),
            "bob is offline; the offset is alice's copy's: {ack}"
        );
        assert_eq!(ack["epoch"], alice_epoch.as_str());
    }
    // A retry of an id is answered from both inboxes' dedup entries: nothing new.
    let again = send(&mut al, &bob, json!({"n": 2}), "m2", 1);
    assert_eq!(
        (
            again["op"].as_str(),
            again["offset"].as_u64(),
            again["queued"].as_bool()
        ),
        (Some("ack"), Some(2), None),
        "{again}"
    );
    // bob resumes on node b from the start: three messages, offsets 1..=3, his epoch.
    let mut bw = connect_raw_ws(&b, &format!("/ws?user={bob}&since=:0"));
    let welcome = recv_json(&mut bw);
    assert_eq!(
        (
            welcome["inbox"]["offset"].as_u64(),
            welcome["inbox"]["recovered"].as_bool()
        ),
        (Some(3), Some(true)),
        "{welcome}"
    );
    for i in 1..=3u64 {
        let m = recv_json(&mut bw);
        assert_eq!(
            (m["data"]["n"].as_u64(), m["offset"].as_u64()),
            (Some(i), Some(i)),
            "{m}"
        );
        assert_eq!(m["epoch"], welcome["inbox"]["epoch"]);
    }
    // Live now, across nodes, with the next offset.
    let ack = send(&mut al, &bob, json!({"n": 4}), "m4", 1);
    assert_eq!(ack["queued"], false, "{ack}");
    assert_eq!(recv_json(&mut bw)["offset"], 4);
    // Channel history lives in the cluster too.
    let (mut sub, _) = connect(&b, "sub");
    send_json(&mut sub, json!({"op":"sub","channel":"news","id":"s"}));
    assert_eq!(recv_json(&mut sub)["op"], "ack");
    let (mut pubr, _) = connect(&a, "pubr");
    publish_stored(&mut pubr, &mut sub, "news", 2);
    // Two inboxes on two masters, and every write a script: never a cross-slot error.
    assert!(cluster.masters[0].dbsize() > 0 && cluster.masters[1].dbsize() > 0);
    assert_eq!(cluster.calls("publish"), 0);
}

#[test]
fn a_lost_master_fails_only_its_slots_and_recovers_when_back() {
    let mut cluster = RedisCluster::start(3);
    let (a, b) = (
        node(&cluster, "a", &["--store", "memory"]),
        node(&cluster, "b", &["--store", "memory"]),
    );
    // The victim's slots are on master 2, the survivor's on master 1.
    let victim = user_on_master("v", 2, 3);
    let survivor = user_on_master("s", 1, 3);
    let sender = user_on_master("x", 0, 3);
    let (mut x, _) = connect(&a, &sender);
    let (mut v, _) = connect(&b, &victim);
    let (mut s, _) = connect(&b, &survivor);
    assert_eq!(send(&mut x, &victim, json!(1), "1", 0)["op"], "ack");
    assert_eq!(recv_json(&mut v)["data"], 1);
    cluster.masters[2].stop();
    // A DM through the dead master is refused, never acked and dropped.
    let e = send(&mut x, &victim, json!(2), "2", 0);
    assert_eq!(
        (e["op"].as_str(), e["code"].as_str()),
        (Some("error"), Some("unavailable")),
        "{e}"
    );
    // The other masters' slots carry on.
    assert_eq!(send(&mut x, &survivor, json!(3), "3", 0)["op"], "ack");
    assert_eq!(recv_json(&mut s)["data"], 3);
    // The master comes back (its slots, no data): node b resubscribes, DMs flow again.
    cluster.masters[2].restart_cluster_node();
    cluster.wait_ok();
    let start = Instant::now();
    loop {
        let r = send(&mut x, &victim, json!(4), "4", 0);
        if r["op"] == "ack" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "never recovered: {r}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Everything acked arrived (a retry may have been acked while b was resubscribing: the
    // first 4 that b delivers is the proof).
    assert_eq!(recv_json(&mut v)["data"], 4);
}

#[test]
fn commands_follow_moved_to_the_master_of_their_slot() {
    let cluster = RedisCluster::start(3);
    let seed = Seed::parse(&cluster.url()).unwrap();
    // A map gone stale: every slot on the first master.
    let map = SlotMap::stale("127.0.0.1".into(), cluster.masters[0].port);
    let mut conns = Conns::new(seed, map, Duration::from_secs(2), Vec::new(), "test");
    let keys: Vec<String> = (0..3)
        .map(|m| format!("k{{{}}}", user_on_master("u", m, 3)))
        .collect();
    let cmds: Vec<(u16, ::redis::Cmd)> = keys
        .iter()
        .map(|k| {
            let mut c = ::redis::cmd("SET");
            c.arg(k).arg("v");
            (slot(k.as_bytes()), c)
        })
        .collect();
    for a in conns.run(&cmds) {
        assert_eq!(a.unwrap(), ::redis::Value::Okay);
    }
    // Each key landed on its own master, and the map is right now: no MOVED the second time.
    for m in &cluster.masters {
        assert_eq!(m.dbsize(), 1, "master {}", m.port);
    }
    let moved = |c: &RedisCluster| c.masters.iter().map(|m| m.errors("MOVED")).sum::<u64>();
    let before = moved(&cluster);
    assert!(
        before >= 2,
        "two of three went to the wrong master first: {before}"
    );
    for a in conns.run(&cmds) {
        a.unwrap();
    }
    assert_eq!(moved(&cluster), before);
}
