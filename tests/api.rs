//! The push API, Server-Sent Events, signed identity, origin checks and metrics, end to end.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{SystemTime, UNIX_EPOCH};

use common::*;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};
use switchboard::testkit;

fn request(server: &Server, method: &str, path: &str, headers: &str, body: &str) -> (u16, String) {
    http(
        server.addr,
        &format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n{headers}\r\n{body}",
            body.len()
        ),
    )
}

fn api(server: &Server, method: &str, path: &str, body: &str) -> (u16, Value) {
    let (status, text) = request(server, method, path, "", body);
    (
        status,
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON body: {text:?}")),
    )
}

/// A raw SSE reader: status line, headers, then events.
struct Sse {
    r: BufReader<TcpStream>,
}

impl Sse {
    fn open(server: &Server, query: &str, headers: &str) -> Result<Sse, u16> {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        write!(
            s,
            "GET /events?{query} HTTP/1.1\r\nHost: t\r\nAccept: text/event-stream\r\n{headers}\r\n"
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut head = String::new();
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            head.push_str(&line);
            if line == "\r\n" || line.is_empty() {
                break;
            }
        }
        let parsed = testkit::parse_response_head(head.as_bytes())
            .unwrap()
            .expect("a complete response head");
        let code = parsed.status;
        let ctype = parsed.header("content-type").unwrap_or("").to_owned();
        if code != 200 {
            return Err(code);
        }
        assert!(ctype.contains("text/event-stream"), "{ctype}");
        Ok(Sse { r })
    }

    /// Reads up to the id-only block a named stream gets once its inbox position is known;
    /// that position.
    fn position(&mut self) -> String {
        let mut id = None;
        loop {
            let mut line = String::new();
            assert!(self.r.read_line(&mut line).unwrap() > 0, "stream ended");
            let line = line.trim_end_matches('\n');
            if let Some(v) = line.strip_prefix("id: ") {
                id = Some(v.to_owned());
            } else if line.is_empty() {
                if let Some(id) = id.take() {
                    return id;
                }
            } else {
                id = None;
            }
        }
    }

    /// Next event: (id, data as JSON); comments and retry lines are skipped.
    fn event(&mut self) -> (String, Value) {
        let (mut id, mut data) = (String::new(), String::new());
        loop {
            let mut line = String::new();
            assert!(self.r.read_line(&mut line).unwrap() > 0, "stream ended");
            let line = line.trim_end_matches('\n');
            if line.is_empty() {
                if !data.is_empty() {
                    return (id, serde_json::from_str(&data).unwrap());
                }
            } else if let Some(v) = line.strip_prefix("id: ") {
                id = v.to_owned();
            } else if let Some(v) = line.strip_prefix("data: ") {
                if !data.is_empty() {
                    data.push('\n');
                }
                data.push_str(v);
            }
        }
    }
}

#[test]
fn publish_reaches_websocket_and_sse_subscribers() {
    let server = Server::start(&["--shards", "2"]);
    let (mut ws, _) = connect(&server, "wsuser");
    send_json(&mut ws, json!({"op":"sub","channel":"news","id":1}));
    assert_eq!(recv_json(&mut ws)["op"], "ack");
    let mut sse = Sse::open(&server, "user=sseuser&channel=news&channel=other", "").unwrap();
    server.wait_for("the SSE subscriber to register", |s| {
        api(s, "GET", "/api/channels/news", "").1["subscribers"] == 2
    });
    // Where sseuser's inbox stands (empty: offset 0), once the store said.
    let position = sse.position();
    assert!(position.ends_with(":0"), "{position}");

    let (status, body) = api(
        &server,
        "POST",
        "/api/publish",
        r#"{"channel":"news","data":{"headline":"hi"}}"#,
    );
    assert_eq!((status, body), (200, json!({"delivered": 2})));
    let m = recv_json(&mut ws);
    assert_eq!(
        (m["from"].as_str(), m["channel"].as_str()),
        (Some("server"), Some("news"))
    );
    let (id1, e) = sse.event();
    assert_eq!(e["data"]["headline"], "hi");
    assert_eq!(e["channel"], "news");

    let (_, body) = api(
        &server,
        "POST",
        "/api/publish",
        r#"{"channel":"other","data":[1,2],"from":"cms"}"#,
    );
    assert_eq!(body, json!({"delivered": 1}));
    let (id2, e) = sse.event();
    // A named stream's ids are its inbox position: publications leave it where it was.
    assert_eq!((&id1, &id2), (&position, &position));
    assert_eq!(
        (e["from"].as_str(), &e["data"]),
        (Some("cms"), &json!([1, 2]))
    );
}

#[test]
fn api_send_reaches_every_connection_and_broadcast_reaches_all() {
    let server = Server::start(&["--shards", "2"]);
    let mut bobs: Vec<Ws> = (0..2).map(|_| connect(&server, "bob").0).collect();
    let mut sse = Sse::open(&server, "user=bob", "").unwrap();
    let (mut carol, _) = connect(&server, "carol");
    server.wait_for("bob's three connections", |s| {
        api(s, "GET", "/api/users/bob", "").1["connections"] == 3
    });
    assert_eq!(
        api(&server, "GET", "/api/users/bob", "").1,
        json!({"online": true, "connections": 3, "unread": 0})
    );
    assert_eq!(
        api(&server, "GET", "/api/users/nobody", "").1,
        json!({"online": false, "connections": 0, "unread": 0})
    );

    let (status, body) = api(
        &server,
        "POST",
        "/api/send",
        r#"{"to":"bob","data":"invoice ready","from":"billing"}"#,
    );
    assert_eq!((status, body), (200, json!({"delivered": 3})));
    for ws in bobs.iter_mut() {
        let m = recv_json(ws);
        assert_eq!(
            (m["from"].as_str(), m["to"].as_str(), m["data"].as_str()),
            (Some("billing"), Some("bob"), Some("invoice ready"))
        );
    }
    assert_eq!(sse.event().1["data"], "invoice ready");
    assert_eq!(
        api(&server, "POST", "/api/send", r#"{"to":"nobody","data":1}"#).1,
        json!({"delivered": 0})
    );

    let (_, body) = api(
        &server,
        "POST",
        "/api/broadcast",
        r#"{"data":{"maintenance":true}}"#,
    );
    assert_eq!(body, json!({"delivered": 4}));
    let m = recv_json(&mut carol);
    assert_eq!(
        (m["op"].as_str(), m["data"]["maintenance"].as_bool()),
        (Some("msg"), Some(true))
    );
    assert!(m.get("to").is_none() && m.get("channel").is_none());
    assert_eq!(sse.event().1["data"]["maintenance"], true);
}

/// A named event stream answers its response head only once the user's home shard
/// recorded it (like a WebSocket's welcome), so a push sent right after the head reaches it,
/// on whichever shard it landed.
#[test]
fn a_named_event_stream_is_reachable_as_soon_as_its_head_arrives() {
    let server = Server::start(&["--shards", "4"]);
    for i in 0..24 {
        let user = format!("streamer{i}");
        let mut sse = Sse::open(&server, &format!("user={user}"), "").unwrap();
        let (status, body) = api(
            &server,
            "POST",
            "/api/send",
            &format!(r#"{{"to":"{user}","data":{i}}}"#),
        );
        assert_eq!((status, body), (200, json!({"delivered": 1})), "{user}");
        assert_eq!(sse.event().1["data"], i, "{user}");
    }
}

#[test]
fn api_disconnect_closes_with_the_given_code() {
    let server = Server::start(&["--shards", "2"]);
    let mut a = Raw::upgrade(server.addr, "/ws?user=mallory");
    a.read_json();
    let mut b = Raw::upgrade(server.addr, "/ws?user=mallory");
    b.read_json();
    let (status, body) = api(
        &server,
        "POST",
        "/api/disconnect",
        r#"{"user":"mallory","code":4002,"reason":"kicked"}"#,
    );
    assert_eq!((status, body), (200, json!({"disconnected": 2})));
    for r in [&mut a, &mut b] {
        assert_eq!(r.read_close(), (4002, "kicked".to_string()));
        r.send_frame(0x88, &4002u16.to_be_bytes(), true);
        r.expect_eof();
    }
    let (status, body) = api(
        &server,
        "POST",
        "/api/disconnect",
        r#"{"user":"mallory","code":1000}"#,
    );
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("4000-4999"));
}

#[test]
fn api_bad_input() {
    let server = Server::start(&["--max-message-bytes", "1024"]);
    let (s, b) = api(&server, "POST", "/api/publish", "{nope");
    assert_eq!(s, 400);
    assert!(b["error"].as_str().unwrap().contains("invalid JSON"));
    let (s, b) = api(&server, "POST", "/api/publish", r#"{"data":1}"#);
    assert_eq!(s, 400);
    assert!(b["error"].as_str().unwrap().contains("`channel`"), "{b}");
    let (s, b) = api(&server, "POST", "/api/send", r#"{"to":"bob"}"#);
    assert_eq!(s, 400);
    assert!(b["error"].as_str().unwrap().contains("`data`"), "{b}");
    assert_eq!(
        api(
            &server,
            "POST",
            "/api/publish",
            r#"{"channel":"bad name","data":1}"#
        )
        .0,
        400
    );
    assert_eq!(api(&server, "GET", "/api/publish", "").0, 405);
    assert_eq!(api(&server, "POST", "/api/users/bob", "").0, 405);
    assert_eq!(api(&server, "GET", "/api/nothing", "").0, 404);
    assert_eq!(api(&server, "GET", "/api/users/bad%20id", "").0, 400);
    let big = format!(r#"{{"channel":"c","data":"{}"}}"#, "x".repeat(2000));
    // Refused before the route is read, and still JSON like every API answer.
    let (s, b) = api(&server, "POST", "/api/publish", &big);
    assert_eq!(s, 413);
    assert!(
        b["error"].as_str().unwrap().contains("--max-message-bytes"),
        "{b}"
    );
    let (s, stats) = api(&server, "GET", "/api/stats", "");
    assert_eq!(s, 200);
    assert!(stats["accepted"].as_u64().unwrap() >= 9);
    assert_eq!(stats["shards"], server.shards());
    // Every series of /metrics is in /api/stats under `metrics`, with its labels.
    let (s, text) = request(&server, "GET", "/metrics", "", "");
    assert_eq!(s, 200);
    let m = &stats["metrics"];
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let series = line.rsplit_once(' ').unwrap().0;
        let found = match series.split_once('{') {
            None => m[series].is_number(),
            Some((name, labels)) => m[name].as_array().is_some_and(|rows| {
                rows.iter().any(|r| {
                    labels.trim_end_matches('}').split("\",").all(|p| {
                        let (k, v) = p.split_once("=\"").unwrap();
                        r[k] == v.trim_end_matches('"')
                    })
                })
            }),
        };
        assert!(found, "{series} of /metrics missing from /api/stats");
    }
    let bad_400 = m["switchboard_api_requests_total"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "users" && r["status"] == "400")
        .unwrap()["value"]
        .as_u64();
    assert_eq!(bad_400, Some(1), "the bad user id above");
}

#[test]
fn api_keep_alive_answers_pipelined_requests_in_order() {
    let server = Server::start(&["--shards", "2"]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let body = r#"{"channel":"c","data":1}"#;
    let one = format!(
        "POST /api/publish HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let last = "GET /api/channels/c HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    s.write_all(format!("{one}{one}{last}").as_bytes()).unwrap();
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut s, &mut text);
    assert_eq!(text.matches("HTTP/1.1 200 OK").count(), 3, "{text}");
    let delivered = text.find(r#"{"delivered":0}"#).unwrap();
    let subs = text.find(r#"{"subscribers":0}"#).unwrap();
    assert!(delivered < subs);
}

#[test]
fn api_key_is_required_when_configured() {
    let server = Server::start(&["--api-key", "k3y"]);
    let body = r#"{"channel":"c","data":1}"#;
    assert_eq!(request(&server, "POST", "/api/publish", "", body).0, 401);
    assert_eq!(
        request(
            &server,
            "POST",
            "/api/publish",
            "Authorization: Bearer wrong\r\n",
            body
        )
        .0,
        401
    );
    assert_eq!(
        request(
            &server,
            "POST",
            "/api/publish",
            "Authorization: Bearer k3y\r\n",
            body
        )
        .0,
        200
    );
    assert_eq!(
        request(
            &server,
            "GET",
            "/api/stats",
            "Authorization: Bearer k3y\r\n",
            ""
        )
        .0,
        200
    );
}

fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn token(secret: &str, claims: Value) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// Status of an upgrade request (only the response head is read).
fn upgrade_status(server: &Server, path: &str, headers: &str) -> u16 {
    let mut raw = Raw::connect(server.addr);
    write!(
        raw.s,
        "GET {path} HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n{headers}\r\n"
    )
    .unwrap();
    parse_response(raw.read_head().as_bytes()).0
}

#[test]
fn signed_tokens_decide_identity_and_private_channels() {
    let server = Server::start(&["--jwt-secret", "s3cret", "--shards", "2"]);
    let good = token(
        "s3cret",
        json!({"sub":"alice","exp": now_s() + 300, "channels":["private:team-*"]}),
    );
    let mut ws = connect_raw_ws(&server, &format!("/ws?token={good}"));
    let w = recv_json(&mut ws);
    assert_eq!(
        (w["op"].as_str(), w["user"].as_str()),
        (Some("welcome"), Some("alice"))
    );
    send_json(
        &mut ws,
        json!({"op":"sub","channel":"private:team-red","id":1}),
    );
    assert_eq!(recv_json(&mut ws), json!({"op":"ack","id":1}));
    send_json(
        &mut ws,
        json!({"op":"sub","channel":"private:finance","id":2}),
    );
    let e = recv_json(&mut ws);
    assert_eq!(
        (e["code"].as_str(), e["id"].as_i64()),
        (Some("forbidden"), Some(2))
    );
    send_json(
        &mut ws,
        json!({"op":"pub","channel":"private:finance","data":1,"id":3}),
    );
    assert_eq!(recv_json(&mut ws)["code"], "forbidden");

    let forged = token(
        "not-the-secret",
        json!({"sub":"alice","exp": now_s() + 300}),
    );
    let expired = token("s3cret", json!({"sub":"alice","exp": now_s() - 10}));
    assert_eq!(
        upgrade_status(&server, &format!("/ws?token={forged}"), ""),
        401
    );
    assert_eq!(
        upgrade_status(&server, &format!("/ws?token={expired}"), ""),
        401
    );
    assert_eq!(upgrade_status(&server, "/ws", ""), 401);
    assert_eq!(
        upgrade_status(&server, "/ws?user=alice", ""),
        401,
        "claimed identities are refused"
    );
    assert_eq!(
        upgrade_status(&server, "/ws", &format!("Authorization: Bearer {good}\r\n")),
        101
    );
    assert!(Sse::open(&server, "channel=x", "").is_err_and(|c| c == 401));
    assert!(Sse::open(
        &server,
        &format!("token={good}&channel=private:finance"),
        ""
    )
    .is_err_and(|c| c == 403));
    assert!(Sse::open(
        &server,
        &format!("token={good}&channel=private:team-blue"),
        ""
    )
    .is_ok());
}

#[test]
fn open_connection_is_closed_with_4003_when_its_token_expires() {
    let server = Server::start(&["--jwt-secret", "s3cret"]);
    let t = token("s3cret", json!({"sub":"brief","exp": now_s() + 2}));
    let mut raw = Raw::upgrade(server.addr, &format!("/ws?token={t}"));
    assert_eq!(raw.read_json()["user"], "brief");
    let (code, reason) = raw.read_close();
    assert_eq!((code, reason.as_str()), (4003, "token expired"));
}

#[test]
fn foreign_origins_are_refused() {
    let server = Server::start(&["--allowed-origin", "https://app.example"]);
    let path = "/ws?user=o";
    assert_eq!(
        upgrade_status(&server, path, "Origin: https://evil.example\r\n"),
        403
    );
    assert_eq!(
        upgrade_status(&server, path, "Origin: https://app.example\r\n"),
        101
    );
    assert_eq!(
        upgrade_status(&server, path, ""),
        101,
        "non-browser clients send no Origin"
    );
    assert!(
        Sse::open(&server, "channel=a", "Origin: https://evil.example\r\n")
            .is_err_and(|c| c == 403)
    );
    assert!(Sse::open(&server, "channel=a", "Origin: https://app.example\r\n").is_ok());
}

#[test]
fn metrics_parse_and_move_with_traffic() {
    let server = Server::start(&["--shards", "2"]);
    let parse = |text: &str| -> std::collections::HashMap<String, f64> {
        let mut m = std::collections::HashMap::new();
        for line in text.lines() {
            if line.starts_with('#') || line.is_empty() {
                assert!(
                    line.is_empty() || line.starts_with("# HELP ") || line.starts_with("# TYPE "),
                    "{line}"
                );
                continue;
            }
            let (name, value) = line
                .rsplit_once(' ')
                .unwrap_or_else(|| panic!("bad line {line:?}"));
            assert!(name.starts_with("switchboard_"), "{name}");
            m.insert(
                name.to_string(),
                value
                    .parse()
                    .unwrap_or_else(|_| panic!("bad value in {line:?}")),
            );
        }
        m
    };
    let before = parse(&server.metrics());
    let (mut a, _) = connect(&server, "m1");
    let (mut b, _) = connect(&server, "m2");
    send_json(&mut a, json!({"op":"send","to":"m2","data":"x","id":1}));
    recv_json(&mut a);
    recv_json(&mut b);
    api(
        &server,
        "POST",
        "/api/publish",
        r#"{"channel":"c","data":1}"#,
    );
    let after = parse(&server.metrics());
    let d = |k: &str| after.get(k).copied().unwrap_or(0.0) - before.get(k).copied().unwrap_or(0.0);
    assert!(d("switchboard_accepted_total") >= 3.0);
    assert!(d("switchboard_messages_in_total") >= 1.0);
    assert!(d("switchboard_messages_out_total") >= 2.0);
    assert!(d("switchboard_bytes_in_total") > 0.0 && d("switchboard_bytes_out_total") > 0.0);
    assert_eq!(
        d("switchboard_api_requests_total{route=\"publish\",status=\"200\"}"),
        1.0
    );
    let open: f64 = (0..2)
        .map(|s| after[&format!("switchboard_connections_open{{shard=\"{s}\",transport=\"ws\"}}")])
        .sum();
    assert_eq!(open, 2.0);
}

#[test]
fn third_party_sse_client_receives_events() {
    let server = Server::start(&[]);
    let script = r#"
import sys, json, httpx
url = sys.argv[1]
with httpx.stream("GET", url, timeout=15) as r:
    assert r.headers["content-type"].startswith("text/event-stream"), r.headers
    print("open", flush=True)
    data = []
    for line in r.iter_lines():
        if line.startswith("data: "):
            data.append(line[6:])
        elif line == "" and data:
            print(json.loads("\n".join(data))["data"], flush=True)
            break
"#;
    let mut child = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            &format!("http://{}/events?user=py&channel=py", server.addr),
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "open", "httpx connected (pip install httpx)");
    server.wait_for("the python subscriber", |s| {
        api(s, "GET", "/api/channels/py", "").1["subscribers"] == 1
    });
    api(
        &server,
        "POST",
        "/api/publish",
        r#"{"channel":"py","data":"from rust"}"#,
    );
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "from rust");
    let status = child.wait().unwrap();
    assert!(status.success());
}
