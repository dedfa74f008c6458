//! Every kind of bad input gets its HTTP status or close code, and never takes the server down.

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;

fn get(server: &Server, path: &str, headers: &str) -> (u16, String) {
    http(
        server.addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\n{headers}\r\n"),
    )
}

#[test]
fn http_routes_and_refusals() {
    let server = Server::start(&[]);
    assert_eq!(
        get(&server, "/healthz", "Connection: close\r\n"),
        (200, "ok\n".into())
    );
    assert_eq!(get(&server, "/nope", "").0, 404);
    let (status, body) = get(&server, "/ws", "");
    assert_eq!(status, 426, "{body}");
    // Missing key, bad key, bad version, bad user.
    let up = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";
    assert_eq!(get(&server, "/ws", up).0, 400);
    assert_eq!(
        get(&server, "/ws", &format!("{up}Sec-WebSocket-Key: short\r\n")).0,
        400
    );
    let v12 = format!("Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 12\r\nSec-WebSocket-Key: {KEY}\r\n");
    assert_eq!(get(&server, "/ws", &v12).0, 426);
    let ok = format!("{up}Sec-WebSocket-Key: {KEY}\r\n");
    assert_eq!(get(&server, "/ws?user=bad%20name", &ok).0, 400);
    assert_eq!(
        get(&server, &format!("/ws?user={}", "a".repeat(129)), &ok).0,
        400
    );
    assert_eq!(get(&server, "/ws?user=", &ok).0, 400);
    // Malformed request line and a header section over 8 KiB.
    assert_eq!(http(server.addr, "BLAH\x01 / HTTP/1.1\r\n\r\n").0, 400);
    assert_eq!(http(server.addr, "GET / HTTP/7.0\r\n\r\n").0, 400);
    let big = format!("X-Big: {}\r\n", "a".repeat(9000));
    assert_eq!(get(&server, "/healthz", &big).0, 431);
    // Still serving.
    assert_eq!(get(&server, "/healthz", "Connection: close\r\n").0, 200);
}

#[test]
fn request_in_pieces_and_pipelined_frames_after_upgrade() {
    let server = Server::start(&[]);
    let mut raw = Raw::connect(server.addr);
    let req = Raw::upgrade_request("/ws?user=slowpoke");
    // The request arrives a few bytes at a time.
    for chunk in req.as_bytes().chunks(7) {
        raw.s.write_all(chunk).unwrap();
        raw.s.flush().unwrap();
        std::thread::sleep(Duration::from_millis(2));
    }
    let head = raw.read_head();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(raw.read_json()["op"], "welcome");

    // Upgrade request and a frame in the same write: the frame is not lost.
    let mut raw = Raw::connect(server.addr);
    let mut bytes = Raw::upgrade_request("/ws?user=eager").into_bytes();
    let payload = br#"{"op":"ping","data":"pipelined"}"#;
    switchboard::testkit::put_frame(&mut bytes, 0x81, payload, Some([0, 0, 0, 0]));
    raw.s.write_all(&bytes).unwrap();
    assert!(raw.read_head().starts_with("HTTP/1.1 101"));
    assert_eq!(raw.read_json()["op"], "welcome");
    let pong = raw.read_json();
    assert_eq!(
        (pong["op"].as_str(), pong["data"].as_str()),
        (Some("pong"), Some("pipelined"))
    );

    // Keep-alive: two requests on one connection, sent together.
    let mut raw = Raw::connect(server.addr);
    raw.s
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\nGET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .unwrap();
    assert!(raw.read_head().starts_with("HTTP/1.1 200"));
    let text = raw.read_rest();
    assert!(text.contains("HTTP/1.1 200"), "second response: {text}");
}

fn close_code_for(server: &Server, send: impl FnOnce(&mut Raw)) -> (u16, String) {
    let mut raw = Raw::upgrade(server.addr, "/ws?user=bad");
    assert_eq!(raw.read_json()["op"], "welcome");
    send(&mut raw);
    let (code, reason) = raw.read_close();
    // Answer like a real client; the server then ends the TCP connection.
    raw.send_frame(0x88, &code.to_be_bytes(), true);
    raw.expect_eof();
    (code, reason)
}

#[test]
fn protocol_errors_close_with_1002() {
    let server = Server::start(&[]);
    type Send = Box<dyn FnOnce(&mut Raw)>;
    let cases: Vec<(&str, Send)> = vec![
        (
            "unmasked",
            Box::new(|r: &mut Raw| r.send_frame(0x81, b"{}", false)),
        ),
        (
            "reserved bits",
            Box::new(|r: &mut Raw| r.send_frame(0x81 | 0x40, b"{}", true)),
        ),
        (
            "reserved opcode",
            Box::new(|r: &mut Raw| r.send_frame(0x83, b"", true)),
        ),
        (
            "reserved control opcode",
            Box::new(|r: &mut Raw| r.send_frame(0x8B, b"", true)),
        ),
        (
            "fragmented ping",
            Box::new(|r: &mut Raw| r.send_frame(0x09, b"x", true)),
        ),
        (
            "orphan continuation",
            Box::new(|r: &mut Raw| r.send_frame(0x80, b"x", true)),
        ),
        (
            "long ping",
            Box::new(|r: &mut Raw| r.send_frame(0x89, &[0u8; 126], true)),
        ),
        (
            "bad close code",
            Box::new(|r: &mut Raw| r.send_frame(0x88, &999u16.to_be_bytes(), true)),
        ),
    ];
    for (name, send) in cases {
        let (code, reason) = close_code_for(&server, send);
        assert_eq!(code, 1002, "{name}: {reason}");
        assert!(!reason.is_empty(), "{name} carries a reason");
    }
}

#[test]
fn binary_invalid_utf8_and_oversize() {
    let server = Server::start(&["--max-message-bytes", "1024"]);
    assert_eq!(
        close_code_for(&server, |r| r.send_frame(0x82, b"\x00\x01", true)).0,
        1003
    );
    assert_eq!(
        close_code_for(&server, |r| r.send_frame(0x81, b"{\"a\":\"\xff\"}", true)).0,
        1007
    );
    // Invalid UTF-8 split across fragments fails too.
    assert_eq!(
        close_code_for(&server, |r| {
            r.send_frame(0x01, b"ok \xce", true);
            r.send_frame(0x80, b"\xff", true);
        })
        .0,
        1007
    );
    assert_eq!(
        close_code_for(&server, |r| r.send_frame(0x81, &[b' '; 1025], true)).0,
        1009
    );
    // Over the limit in fragments.
    assert_eq!(
        close_code_for(&server, |r| {
            r.send_frame(0x01, &[b' '; 600], true);
            r.send_frame(0x80, &[b' '; 600], true);
        })
        .0,
        1009
    );
    // A message of exactly the limit is fine.
    let mut raw = Raw::upgrade(server.addr, "/ws?user=ok");
    raw.read_json();
    let mut msg = br#"{"op":"ping","data":""#.to_vec();
    msg.resize(1024 - 2, b'x');
    msg.extend_from_slice(b"\"}");
    raw.send_frame(0x81, &msg, true);
    assert_eq!(raw.read_json()["op"], "pong");
}

#[test]
fn fragmented_message_and_interleaved_ping_are_handled() {
    let server = Server::start(&[]);
    let mut raw = Raw::upgrade(server.addr, "/ws?user=frag");
    raw.read_json();
    raw.send_frame(0x01, br#"{"op":"ping","#, true);
    raw.send_frame(0x89, b"hb", true);
    raw.send_frame(0x80, br#""data":"joined"}"#, true);
    let (op, p) = raw.read_frame().unwrap();
    assert_eq!(
        (op, p.as_slice()),
        (0xA, &b"hb"[..]),
        "pong frame echoes ping payload"
    );
    assert_eq!(raw.read_json()["data"], "joined");
}

#[test]
fn client_close_is_answered_with_the_same_code() {
    let server = Server::start(&[]);
    let mut raw = Raw::upgrade(server.addr, "/ws?user=c");
    raw.read_json();
    let mut p = 4321u16.to_be_bytes().to_vec();
    p.extend_from_slice(b"bye");
    raw.send_frame(0x88, &p, true);
    assert_eq!(raw.read_close().0, 4321);
    raw.expect_eof();
}

#[test]
fn over_max_connections_gets_1013_after_upgrade() {
    let server = Server::start(&["--max-connections", "2"]);
    let (_a, _) = connect(&server, "a");
    let (_b, _) = connect(&server, "b");
    let mut raw = Raw::upgrade(server.addr, "/ws?user=c");
    let (code, reason) = raw.read_close();
    assert_eq!(code, 1013, "{reason}");
    raw.send_frame(0x88, &code.to_be_bytes(), true);
    raw.expect_eof();
    assert_eq!(
        server.metric("switchboard_handshake_failures_total{reason=\"over_capacity\"}"),
        1
    );
}

#[test]
fn half_sent_request_is_dropped_after_the_handshake_timeout() {
    let server = Server::start(&["--handshake-timeout-ms", "300"]);
    let mut raw = Raw::connect(server.addr);
    raw.s
        .write_all(b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgr")
        .unwrap();
    let start = std::time::Instant::now();
    assert!(
        raw.read_frame().is_none(),
        "connection dropped without a response"
    );
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_millis(250),
        "not before the deadline ({waited:?})"
    );
    assert_eq!(
        server.metric("switchboard_handshake_failures_total{reason=\"timeout\"}"),
        1
    );
}

#[test]
fn one_address_over_max_connections_per_ip_gets_429_with_retry_after() {
    // Loopback is exempt by default (loadgen); --limit-loopback lets this test count it.
    let server = Server::start(&["--max-connections-per-ip", "3", "--limit-loopback"]);
    let (_a, _) = connect(&server, "a");
    let (_b, _) = connect(&server, "b");
    let (mut c, _) = connect(&server, "c");
    let (status, body) = http(
        server.addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 429, "{body}");
    assert!(
        body.contains("too many connections from your address"),
        "{body}"
    );
    // A close gives the place back (once the server has seen it).
    c.close(None).unwrap();
    while c.read().is_ok() {}
    let mut metrics = None;
    for _ in 0..100 {
        let (status, body) = http(
            server.addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        if status == 200 {
            metrics = Some(body);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let metrics = metrics.expect("a place freed by a close is taken again");
    let refused: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("switchboard_handshake_failures_total{reason=\"per_ip\"} "))
        .and_then(|v| v.trim().parse().ok())
        .expect("the per_ip series");
    assert!(refused >= 1, "{metrics}");
}

/// Reads until `s` has a whole response head, or the peer closes or `DEADLINE` passes.
fn read_head(s: &mut std::net::TcpStream) -> Option<(u16, String)> {
    use std::io::Read;
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Ok(Some(_)) = switchboard::testkit::parse_response_head(&out) {
            return Some(parse_response(&out));
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return None,
            Ok(n) => out.extend_from_slice(&buf[..n]),
        }
    }
}

#[test]
fn partial_requests_over_the_half_open_cap_get_503_and_silent_connections_do_not() {
    let server = Server::start(&["--shards", "1", "--max-pending-handshakes", "3"]);
    let silent: Vec<_> = (0..20)
        .map(|_| std::net::TcpStream::connect(server.addr).unwrap())
        .collect();
    let head = "GET /ws?user=slow HTTP/1.1\r\nHost: t\r\n";
    let mut partial: Vec<_> = (0..4)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(server.addr).unwrap();
            s.write_all(head.as_bytes()).unwrap();
            s
        })
        .collect();
    // Exactly one of the four passes the cap: find it by its answer.
    server.wait_for("a 503 for the fourth half-open request", |s| {
        s.metric("switchboard_handshake_failures_total{reason=\"pending_handshakes\"}") == 1
    });
    let answered = |s: &mut std::net::TcpStream| {
        s.set_nonblocking(true).unwrap();
        let yes = s.peek(&mut [0u8; 1]).is_ok();
        s.set_nonblocking(false).unwrap();
        yes
    };
    let start = std::time::Instant::now();
    let refused = loop {
        if let Some(i) = partial.iter_mut().position(answered) {
            break i;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no half-open request was answered"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let mut r = partial.remove(refused);
    let (status, body) = read_head(&mut r).expect("a response");
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("too many handshakes in progress"), "{body}");
    let rest = format!(
        "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    // The other three, and every silent one, still get their upgrade.
    for s in partial.iter_mut() {
        s.write_all(rest.as_bytes()).unwrap();
        assert_eq!(read_head(s).map(|h| h.0), Some(101));
    }
    for mut s in silent {
        s.write_all(format!("{head}{rest}").as_bytes()).unwrap();
        assert_eq!(read_head(&mut s).map(|h| h.0), Some(101));
    }
}
