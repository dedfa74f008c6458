//! Long-connection health: heartbeats and expiry, slow consumers, shutdown, fd tables.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

#[test]
fn silent_client_is_pinged_then_closed_with_4000() {
    let server = Server::start(&["--ping-interval-ms", "200", "--idle-timeout-ms", "700"]);
    let mut raw = Raw::upgrade(server.addr, "/ws?user=mute");
    assert_eq!(raw.read_json()["op"], "welcome");
    let start = Instant::now();
    // A ping arrives (and is not answered), then exactly one: no ping while one is unanswered.
    let mut pings = 0;
    let (code, reason) = loop {
        match raw.read_frame().expect("frame") {
            (0x9, _) => pings += 1,
            (0x8, p) => {
                break (
                    u16::from_be_bytes([p[0], p[1]]),
                    String::from_utf8_lossy(&p[2..]).to_string(),
                )
            }
            (op, _) => panic!("unexpected opcode {op}"),
        }
    };
    assert_eq!((code, reason.as_str()), (4000, "heartbeat timeout"));
    assert_eq!(pings, 1, "one unanswered ping, not a pile");
    assert!(
        start.elapsed() >= Duration::from_millis(600),
        "not closed before the idle timeout"
    );
    raw.send_frame(0x88, &code.to_be_bytes(), true);
    raw.expect_eof();
    server.wait_for("the close to be counted", |s| {
        s.metric("switchboard_closes_total{code=\"4000\"}") == 1
    });
}

#[test]
fn client_that_answers_pings_stays_open() {
    let server = Server::start(&["--ping-interval-ms", "150", "--idle-timeout-ms", "1000"]);
    let mut raw = Raw::upgrade(server.addr, "/ws?user=lively");
    raw.read_json();
    // Answer eight pings: that spans over the idle timeout, and a busy machine has a
    // second to get each answer in.
    for _ in 0..8 {
        let (op, p) = raw.read_frame().expect("ping");
        assert_eq!(op, 0x9);
        raw.send_frame(0x8A, &p, true);
    }
    raw.send_text(r#"{"op":"ping","data":"still here"}"#);
    assert_eq!(raw.read_json()["data"], "still here");
}

/// A slow subscriber beside a fast one on one shard: publishes 50 kB messages to `firehose`
/// until the server gives up on `slow` (at most 400, 20 MB: far beyond kernel buffers plus
/// the 64 KiB queue limit), checking the fast one keeps receiving in order. Returns `slow`,
/// which has read nothing since its subscription.
fn overrun_a_slow_subscriber(server: &Server) -> Raw {
    let mut slow = Raw::upgrade(server.addr, "/ws?user=slow");
    slow.read_json();
    slow.send_text(r#"{"op":"sub","channel":"firehose","id":1}"#);
    assert_eq!(slow.read_json()["op"], "ack");
    let (mut fast, _) = connect(server, "fast");
    send_json(&mut fast, json!({"op":"sub","channel":"firehose","id":1}));
    assert_eq!(recv_json(&mut fast)["op"], "ack");
    let (mut publisher, _) = connect(server, "pub");
    let blob = "x".repeat(50_000);
    for i in 0..400 {
        send_json(
            &mut publisher,
            json!({"op":"pub","channel":"firehose","data":{"i":i,"blob":blob}}),
        );
        let m = recv_json(&mut fast);
        assert_eq!(
            m["data"]["i"], i,
            "fast subscriber keeps receiving in order"
        );
        // Once the fast subscriber has message i, the slow one's copy was queued or refused.
        if i % 20 == 19 && server.metric("switchboard_slow_consumer_closes_total") == 1 {
            return slow;
        }
    }
    server.wait_for("a slow-consumer close", |s| {
        s.metric("switchboard_slow_consumer_closes_total") == 1
    });
    slow
}

/// One shard with a 64 KiB outbound queue limit and the close timeout given.
fn slow_consumer_server(close_timeout_ms: &str) -> Server {
    Server::start(&[
        "--shards",
        "1",
        "--max-outbound-bytes",
        "65536",
        "--max-message-bytes",
        "65536",
        "--close-timeout-ms",
        close_timeout_ms,
    ])
}

// What a client that stops reading is promised: when its queue passes
// --max-outbound-bytes the server stops sending it messages and queues a 4001 close frame
// behind the frame in flight. If the client reads within --close-timeout-ms, it gets that
// frame (the next test); if it has not made room by then, the TCP connection is reset
// (the one after), counted in switchboard_close_resets_total. Either way the close is
// counted as 4001. Each test sets the close timeout far from the other case, so neither
// depends on how fast this machine runs.

#[test]
fn slow_reader_that_reads_within_the_close_timeout_gets_4001() {
    let server = slow_consumer_server("120000");
    let mut slow = overrun_a_slow_subscriber(&server);
    // The slow client finally reads: after whatever the kernel held, the close says 4001.
    let (code, reason) = slow.read_close();
    assert_eq!(code, 4001, "{reason}");
    slow.send_frame(0x88, &code.to_be_bytes(), true);
    slow.expect_eof();
    server.wait_for("the close to be counted", |s| {
        s.metric("switchboard_closes_total{code=\"4001\"}") == 1
    });
    assert_eq!(server.metric("switchboard_close_resets_total"), 0);
}

#[test]
fn client_that_never_reads_is_reset_at_the_close_deadline() {
    let server = slow_consumer_server("200");
    let mut slow = overrun_a_slow_subscriber(&server);
    // It has read nothing, so its close frame cannot have been written: a reset, counted.
    server.wait_for("the reset", |s| {
        s.metric("switchboard_close_resets_total") == 1
    });
    assert_eq!(server.metric("switchboard_closes_total{code=\"4001\"}"), 1);
    // The client reads what the kernel still held, then the reset; never a close frame.
    let (opcodes, reset) = slow.read_until_cut();
    assert!(reset, "a TCP reset, not a clean end");
    assert!(!opcodes.contains(&0x8), "no close frame: {opcodes:?}");
}

#[test]
fn sigterm_drains_everyone_with_1001_over_the_drain_and_exits_zero() {
    let mut server = Server::start(&[
        "--shards",
        "2",
        "--shutdown-grace-ms",
        "5000",
        "--drain-ms",
        "1000",
    ]);
    let mut clients: Vec<Raw> = (0..20)
        .map(|i| {
            let mut r = Raw::upgrade(server.addr, &format!("/ws?user=u{i}"));
            r.read_json();
            r
        })
        .collect();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGTERM) };
    let signalled = std::time::Instant::now();
    let mut waits = std::collections::BTreeSet::new();
    let mut last = Duration::ZERO;
    for c in clients.iter_mut() {
        let (code, reason) = c.read_close();
        last = last.max(signalled.elapsed());
        assert_eq!(code, 1001, "{reason}");
        let wait: u64 = reason
            .strip_prefix("server shutting down; retry_after_ms=")
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{reason}"));
        assert!(wait < 2000, "within the drain left plus its length: {wait}");
        waits.insert(wait);
        c.send_frame(0x88, &1001u16.to_be_bytes(), true);
    }
    // Spread over --drain-ms: the last close cannot come before its turn.
    assert!(
        last >= Duration::from_millis(900),
        "last close after {last:?}"
    );
    assert!(waits.len() >= 15, "jittered retry-afters: {waits:?}");
    let status = server.signal_and_wait(0);
    assert_eq!(status.code(), Some(0));
}

fn hold(server: &Server, n: usize) -> Vec<Raw> {
    hold_from(server, 0, n)
}

/// `n` WebSockets of users `h<start>`, `h<start + 1>`…
fn hold_from(server: &Server, start: usize, n: usize) -> Vec<Raw> {
    (start..start + n)
        .map(|i| {
            let mut r = Raw::upgrade(server.addr, &format!("/ws?user=h{i}"));
            assert_eq!(r.read_json()["op"], "welcome");
            r
        })
        .collect()
}

#[test]
fn per_shard_fd_tables_hold_more_than_one_table_allows() {
    // RLIMIT_NOFILE 256 in the server; 4 private tables hold 4 × ~250.
    let server = Server::start_with(&["--shards", "4", "--fd-table", "per-shard"], Some(256));
    assert!(
        server.banner.contains("fd-table=per-shard"),
        "{}",
        server.banner
    );
    let mut conns = hold(&server, 600);
    // 600 WebSockets plus this metrics request.
    assert_eq!(server.metric("switchboard_accepted_total"), 600 + 1);
    // Every one of them is alive.
    for c in conns.iter_mut().step_by(50) {
        c.send_text(r#"{"op":"ping","data":1}"#);
        assert_eq!(c.read_json()["op"], "pong");
    }
}

#[test]
fn post_api_drain_drains_like_sigterm_and_exits_zero() {
    let mut server = Server::start(&["--drain-ms", "300"]);
    let mut clients = hold(&server, 6);
    let (status, body) = http(
        server.addr,
        "POST /api/drain HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    );
    assert_eq!((status, body.trim()), (200, r#"{"draining":true}"#));
    for c in clients.iter_mut() {
        let (code, reason) = c.read_close();
        assert_eq!(code, 1001, "{reason}");
        assert!(reason.contains("retry_after_ms="), "{reason}");
        c.send_frame(0x88, &1001u16.to_be_bytes(), true);
    }
    // Signal 0 only waits: the drain ends the process by itself.
    let status = server.signal_and_wait(0);
    assert_eq!(status.code(), Some(0));
}

#[test]
fn default_shards_grow_to_hold_max_connections_and_fill_in_order() {
    // RLIMIT_NOFILE 256 in the server: one table holds ~210 sockets, so 1000 connections need
    // five private tables. With the shard count left to its default, the server adds
    // shards for them; new connections go to the first (cores) shards until those fill.
    let server = Server::start_with(&["--max-connections", "1000"], Some(256));
    let banner = &server.banner;
    assert!(banner.contains("fd-table=per-shard"), "{banner}");
    assert!(banner.contains("capacity=1000"), "{banner}");
    let shards = server.shards();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(shards * (256 - 32 - 3 * shards) >= 1000, "{banner}");
    let open = |s: usize| {
        server.metric(&format!(
            "switchboard_connections_open{{shard=\"{s}\",transport=\"ws\"}}"
        ))
    };
    let mut conns = hold(&server, 150);
    if shards > cores {
        // 150 fit in the first shards: the added ones stay empty.
        let late: u64 = (cores..shards).map(open).sum();
        assert_eq!(
            late, 0,
            "connections in the added shards before the first filled"
        );
    }
    conns.extend(hold_from(&server, 150, 850));
    let total: u64 = (0..shards).map(open).sum();
    assert_eq!(total, 1000);
    for c in conns.iter_mut().step_by(50) {
        c.send_text(r#"{"op":"ping","data":1}"#);
        assert_eq!(c.read_json()["op"], "pong");
    }
    // Routing reaches every shard: subscribers spread over the first and the added shards
    // get a publish (shards without subscriptions are skipped), and DMs go both ways
    // (homes are the first shards only).
    for (i, c) in conns.iter_mut().enumerate().step_by(100) {
        c.send_text(&format!(r#"{{"op":"sub","channel":"room","id":{i}}}"#));
        let m = c.read_json();
        assert_eq!(m["op"], "ack", "{m}");
    }
    conns[1].send_text(r#"{"op":"pub","channel":"room","data":"hi all"}"#);
    for c in conns.iter_mut().step_by(100) {
        let m = c.read_json();
        assert_eq!(
            (m["channel"].as_str(), m["data"].as_str()),
            (Some("room"), Some("hi all")),
            "{m}"
        );
    }
    for (from, to) in [(0, 999), (999, 0), (500, 150)] {
        conns[from].send_text(&format!(
            r#"{{"op":"send","to":"h{to}","data":{from},"id":1}}"#
        ));
        assert_eq!(conns[from].read_json()["op"], "ack");
        let m = conns[to].read_json();
        assert_eq!(
            (m["from"].as_str(), m["data"].as_u64()),
            (Some(&*format!("h{from}")), Some(from as u64)),
            "{m}"
        );
    }
}

#[test]
fn auto_mode_picks_per_shard_when_the_limit_is_low() {
    let server = Server::start_with(&["--shards", "2", "--max-connections", "1000"], Some(256));
    assert!(
        server.banner.contains("fd-table=per-shard"),
        "{}",
        server.banner
    );
    let server = Server::start_with(&["--shards", "2", "--max-connections", "100"], Some(256));
    assert!(
        server.banner.contains("fd-table=shared"),
        "{}",
        server.banner
    );
    let _held = hold(&server, 100);
}

#[test]
fn shared_fd_table_serves_and_recycles_descriptors() {
    // One table of 256 for everything: 200 fit, and closed ones free their descriptors.
    let server = Server::start_with(&["--shards", "2", "--fd-table", "shared"], Some(256));
    assert!(
        server.banner.contains("fd-table=shared"),
        "{}",
        server.banner
    );
    let held = hold(&server, 200);
    let open: u64 = (0..2)
        .map(|s| {
            server.metric(&format!(
                "switchboard_connections_open{{shard=\"{s}\",transport=\"ws\"}}"
            ))
        })
        .sum();
    assert_eq!(open, 200);
    drop(held);
    server.wait_for("connections to close", |s| {
        (0..2)
            .map(|sh| {
                s.metric(&format!(
                    "switchboard_connections_open{{shard=\"{sh}\",transport=\"ws\"}}"
                ))
            })
            .sum::<u64>()
            == 0
    });
    let _again = hold(&server, 200);
}

#[test]
fn a_second_server_on_a_served_address_refuses_to_start_and_the_first_keeps_serving() {
    let first = Server::start(&["--shards", "2"]);
    let port = first.addr.port();
    // The same address, and the wildcard that overlaps it: both refused, exit 1.
    for listen in [format!("127.0.0.1:{port}"), format!("0.0.0.0:{port}")] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["--listen", &listen, "--store", "memory"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{listen}: {err}");
        assert!(err.contains("another process is already serving"), "{err}");
    }
    // Every new client still reaches the first server (none went to a second one).
    for _ in 0..8 {
        let (mut ws, welcome) = connect(&first, "alice");
        send_json(&mut ws, json!({"op":"ping","id":1}));
        assert_eq!(recv_json(&mut ws)["op"], "pong", "{welcome}");
    }
}

#[test]
fn a_second_server_on_the_same_data_dir_says_which_file_and_what_to_do() {
    let dir = std::env::temp_dir().join(format!("sb-lock-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let d = dir.to_str().unwrap();
    let _first = Server::start(&["--shards", "1", "--data-dir", d]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--listen", "127.0.0.1:0", "--shards", "1", "--data-dir", d])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let file = dir.join("streams.redb");
    assert!(
        err.contains(&*file.to_string_lossy()),
        "names the file: {err}"
    );
    assert!(err.contains("another process holds it open"), "{err}");
    assert!(
        err.contains("--data-dir") && err.contains("--store memory"),
        "the fix: {err}"
    );
    // A data dir that cannot be created (a file is in the way) names it too.
    let blocked = dir.join("a-file");
    std::fs::write(&blocked, "x").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--listen", "127.0.0.1:0", "--shards", "1"])
        .args(["--data-dir", blocked.join("data").to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("cannot create the data directory"), "{err}");
    assert!(
        err.contains("a-file/data") && err.contains("--data-dir"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_config_file_is_one_clear_error_said_once_and_exit_1() {
    let cfg = std::env::temp_dir().join(format!("sb-bad-{}.toml", std::process::id()));
    std::fs::write(&cfg, "bogus = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["--config", cfg.to_str().unwrap()])
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.matches("unknown field `bogus`").count(), 1, "{err}");
    assert!(err.contains("invalid config file"), "{err}");
}

#[test]
fn a_full_fd_table_answers_queued_connections_503_and_recovers() {
    // One table of 64 descriptors: silent connections fill it; the ones past it are accepted
    // through the spare descriptor only to hear 503, instead of waiting out their handshake.
    let server = Server::start_with(&["--shards", "1", "--fd-table", "shared"], Some(64));
    let mut conns: Vec<_> = (0..100)
        .map(|_| std::net::TcpStream::connect(server.addr).unwrap())
        .collect();
    // (Even /metrics would be refused now: read the answers on the sockets.)
    let refused = conns
        .iter_mut()
        .rev()
        .take(30)
        .map(|s| {
            use std::io::Read;
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out);
            String::from_utf8_lossy(&out).into_owned()
        })
        .filter(|r| {
            r.starts_with("HTTP/1.1 503 ")
                && r.contains("Retry-After: 1\r\n")
                && r.contains("server full (out of file descriptors)")
        })
        .count();
    assert_eq!(refused, 30, "the last 30 were each answered 503");
    // Closing the held ones frees the table: the server serves again.
    drop(conns);
    let start = Instant::now();
    loop {
        let (status, _) = http(
            server.addr,
            "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if status == 200 {
            break;
        }
        assert!(start.elapsed() < DEADLINE, "the server did not recover");
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(server.metric("switchboard_handshake_failures_total{reason=\"over_capacity\"}") >= 30);
}
