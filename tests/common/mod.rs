//! Shared helpers for end-to-end tests: start the real binary on a free loopback port, and
//! talk to it with a real WebSocket client (tungstenite) or byte by byte (raw frames).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use switchboard::testkit;
use tungstenite::{Message, WebSocket};

pub mod proxy;
pub mod redis;

/// How long any single wait in a test may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(15);

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    pub banner: String,
}

impl Server {
    pub fn start(args: &[&str]) -> Server {
        Self::start_with(args, None)
    }

    /// Starts the server with `RLIMIT_NOFILE` lowered to `nofile` in the child only.
    /// Shards running, from the banner (`shards=N`).
    pub fn shards(&self) -> usize {
        self.banner
            .split("shards=")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .and_then(|n| n.parse().ok())
            .expect("shards= in the banner")
    }

    pub fn start_with(args: &[&str], nofile: Option<u64>) -> Server {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchboard"));
        cmd.args(["--listen", "127.0.0.1:0"]).args(args);
        if !args
            .iter()
            .any(|a| *a == "--store" || a.starts_with("--store=") || a.starts_with("--data-dir"))
        {
            // Streams in memory unless a test asks for a data directory of its own.
            cmd.args(["--store", "memory"]);
        }
        cmd.stdout(Stdio::piped());
        if std::env::var_os("SB_TEST_LOG").is_some() {
            cmd.stderr(Stdio::inherit());
        } else {
            cmd.stderr(Stdio::null());
        }
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt;
            // SAFETY: setrlimit is async-signal-safe; runs in the child before exec.
            unsafe {
                cmd.pre_exec(move || {
                    let r = libc::rlimit {
                        rlim_cur: n,
                        rlim_max: n,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = cmd.spawn().expect("spawn switchboard");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(stdout);
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            let _ = tx.send(line);
            // Keep draining so the child never blocks on stdout.
            let mut sink = String::new();
            while r.read_line(&mut sink).map(|n| n > 0).unwrap_or(false) {
                sink.clear();
            }
        });
        let banner = rx
            .recv_timeout(DEADLINE)
            .expect("server printed its listen address");
        let addr = banner
            .split_whitespace()
            .nth(3)
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in banner {banner:?}"));
        Server {
            child,
            addr,
            banner,
        }
    }

    /// The server's pid.
    pub fn child_id(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("ws://{}{}", self.addr, path_and_query)
    }

    /// Sends a signal and waits for the exit status (bounded by `DEADLINE`).
    pub fn signal_and_wait(&mut self, sig: i32) -> std::process::ExitStatus {
        // SAFETY: kill with a valid pid of our child.
        unsafe { libc::kill(self.child.id() as i32, sig) };
        let start = Instant::now();
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(start.elapsed() < DEADLINE, "server did not exit");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn metrics(&self) -> String {
        let (status, body) = http(
            self.addr,
            "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        );
        assert_eq!(status, 200);
        body
    }

    /// Value of one metric line (exact name with labels).
    pub fn metric(&self, name: &str) -> u64 {
        let text = self.metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {name} missing"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Polls `f` until it holds or the deadline passes (a condition, not a sleep).
    pub fn wait_for(&self, what: &str, mut f: impl FnMut(&Server) -> bool) {
        let start = Instant::now();
        while !f(self) {
            assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub type Ws = WebSocket<TcpStream>;

/// A real WebSocket client; returns it with the welcome already read.
pub fn connect(server: &Server, user: &str) -> (Ws, Value) {
    let mut ws = connect_raw_ws(server, &format!("/ws?user={user}"));
    let welcome = recv_json(&mut ws);
    assert_eq!(welcome["op"], "welcome", "{welcome}");
    (ws, welcome)
}

pub fn connect_raw_ws(server: &Server, path: &str) -> Ws {
    let stream = TcpStream::connect(server.addr).unwrap();
    stream.set_read_timeout(Some(DEADLINE)).unwrap();
    let (ws, resp) = tungstenite::client(server.url(path), stream).expect("handshake");
    assert_eq!(resp.status(), 101);
    ws
}

pub fn send_json(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).unwrap();
}

/// Confirms `ws`'s inbox up to `offset` (`{"op":"ack","stream":"inbox",..}` with `id`) and
/// checks the answer is the `ack` for it.
pub fn confirm_inbox(ws: &mut Ws, offset: &Value, id: &str) {
    send_json(
        ws,
        serde_json::json!({"op":"ack","stream":"inbox","offset":offset,"id":id}),
    );
    let a = recv_json(ws);
    assert_eq!(
        (a["op"].as_str(), a["id"].as_str()),
        (Some("ack"), Some(id)),
        "{a}"
    );
}

/// Next text message as JSON (pings are answered by tungstenite itself).
pub fn recv_json(ws: &mut Ws) -> Value {
    loop {
        match ws.read().expect("read") {
            Message::Text(t) => return serde_json::from_str(t.as_str()).expect("JSON"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

/// Reads the messages at offsets `range` (each carrying its offset as `data`) once and in
/// order; `next` reads the next message.
pub fn expect_in_order(
    ws: &mut Ws,
    range: std::ops::RangeInclusive<u64>,
    next: impl Fn(&mut Ws) -> Value,
) {
    for i in range {
        let m = next(ws);
        assert_eq!(
            (m["offset"].as_u64(), m["data"].as_u64()),
            (Some(i), Some(i)),
            "{m}"
        );
    }
}

/// `publisher` publishes data 1..=n to `channel` (a channel with history, fresh) with ids
/// p1..pn: each is acked with offsets 1..=n in stream `channel:<channel>` and reaches
/// `subscriber` with the same offset, in order. Returns the stream's epoch.
pub fn publish_stored(publisher: &mut Ws, subscriber: &mut Ws, channel: &str, n: u64) -> String {
    let stream = format!("channel:{channel}");
    let mut epoch = String::new();
    for i in 1..=n {
        send_json(
            publisher,
            serde_json::json!({"op":"pub","channel":channel,"data":i,"id":format!("p{i}")}),
        );
        let ack = recv_json(publisher);
        assert_eq!(
            (ack["stream"].as_str(), ack["offset"].as_u64()),
            (Some(stream.as_str()), Some(i)),
            "{ack}"
        );
        epoch = ack["epoch"].as_str().unwrap().to_owned();
        let m = recv_json(subscriber);
        assert_eq!(
            (m["data"].as_u64(), m["offset"].as_u64()),
            (Some(i), Some(i)),
            "{m}"
        );
        assert_eq!(m["stream"], stream);
    }
    epoch
}

/// Expects no message within `wait` (used only where absence is the point, after a
/// barrier message proves everything sent earlier has been delivered).
pub fn expect_silence(ws: &mut Ws, wait: Duration) {
    ws.get_mut().set_read_timeout(Some(wait)).unwrap();
    match ws.read() {
        Err(tungstenite::Error::Io(e))
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) => {}
        Ok(Message::Ping(_)) => {}
        other => panic!("expected nothing, got {other:?}"),
    }
    ws.get_mut().set_read_timeout(Some(DEADLINE)).unwrap();
}

/// `GET path` answered 200 with JSON: the JSON.
pub fn get_json(server: &Server, path: &str) -> Value {
    let (status, body) = http(
        server.addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `POST path` with a body, over a fresh connection: (status, body).
pub fn post(addr: SocketAddr, path: &str, body: &str) -> (u16, String) {
    http(
        addr,
        &format!(
            "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    )
}

/// One HTTP request over a fresh connection, read to EOF: (status, body).
pub fn http(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(raw.as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    parse_response(&out)
}

pub fn parse_response(out: &[u8]) -> (u16, String) {
    let head = testkit::parse_response_head(out)
        .unwrap_or_else(|e| panic!("{e} in {:?}", String::from_utf8_lossy(out)))
        .unwrap_or_else(|| panic!("no complete head in {:?}", String::from_utf8_lossy(out)));
    let body = String::from_utf8_lossy(&out[head.head_len..]).to_string();
    (head.status, body)
}

/// A byte-level WebSocket client for sending what real clients never would.
pub struct Raw {
    pub s: TcpStream,
    buf: Vec<u8>,
}

pub const KEY: &str = testkit::SAMPLE_KEY;

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(DEADLINE)).unwrap();
        Raw { s, buf: Vec::new() }
    }

    pub fn upgrade_request(path: &str) -> String {
        testkit::upgrade_request("t", path)
    }

    /// Upgrades and reads the 101 head (and the welcome, in protocol mode, stays buffered).
    pub fn upgrade(addr: SocketAddr, path: &str) -> Raw {
        let mut r = Raw::connect(addr);
        r.s.write_all(Self::upgrade_request(path).as_bytes())
            .unwrap();
        let head = r.read_head();
        assert!(head.starts_with("HTTP/1.1 101"), "{head}");
        assert!(head.contains(testkit::SAMPLE_ACCEPT), "{head}");
        r
    }

    pub fn read_head(&mut self) -> String {
        loop {
            if let Some(h) = testkit::parse_response_head(&self.buf).expect("a response head") {
                let head: Vec<u8> = self.buf.drain(..h.head_len).collect();
                return String::from_utf8(head).unwrap();
            }
            assert!(self.fill(), "EOF before the response head");
        }
    }

    fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 65536];
        match self.s.read(&mut tmp) {
            Ok(0) => false,
            Ok(n) => {
                self.buf.extend_from_slice(&tmp[..n]);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => false,
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Writes one frame; `mask` false sends it unmasked (a protocol error from a client).
    pub fn send_frame(&mut self, first_byte: u8, payload: &[u8], mask: bool) {
        let mut f = Vec::new();
        testkit::put_frame(
            &mut f,
            first_byte,
            payload,
            mask.then_some([0x12, 0x34, 0x56, 0x78]),
        );
        self.s.write_all(&f).unwrap();
    }

    pub fn send_text(&mut self, text: &str) {
        self.send_frame(0x81, text.as_bytes(), true);
    }

    /// Next frame whole (with its RSV bits); `None` at EOF.
    pub fn read_server_frame(&mut self) -> Option<testkit::ServerFrame> {
        loop {
            if let Some(f) = testkit::take_frame(&mut self.buf).expect("a valid server frame") {
                assert!(!f.masked, "server frames are never masked");
                return Some(f);
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// Next frame: (opcode, payload); `None` at EOF.
    pub fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(f) = testkit::take_frame(&mut self.buf).expect("a valid server frame") {
                assert!(!f.masked, "server frames are never masked");
                return Some((f.opcode, f.payload));
            }
            if !self.fill() {
                return None;
            }
        }
    }

    /// Next text frame as JSON, skipping pings (which are not answered).
    pub fn read_json(&mut self) -> Value {
        loop {
            let (op, p) = self.read_frame().expect("frame before EOF");
            if op == 0x1 {
                return serde_json::from_slice(&p).unwrap();
            }
            assert_eq!(op, 0x9, "unexpected opcode {op}");
        }
    }

    /// Reads until the server's close frame; returns its code (and reason).
    pub fn read_close(&mut self) -> (u16, String) {
        loop {
            match self.read_frame() {
                Some((0x8, p)) => {
                    assert!(p.len() >= 2, "close frame without a code");
                    return (
                        u16::from_be_bytes([p[0], p[1]]),
                        String::from_utf8(p[2..].to_vec()).unwrap(),
                    );
                }
                Some(_) => continue,
                None => panic!("EOF without a close frame"),
            }
        }
    }

    /// Reads until the connection ends: the opcodes of the whole frames read, and whether
    /// it ended with a reset (ECONNRESET) rather than a clean EOF.
    pub fn read_until_cut(&mut self) -> (Vec<u8>, bool) {
        let mut opcodes = Vec::new();
        let mut tmp = [0u8; 65536];
        loop {
            while let Ok(Some(f)) = testkit::take_frame(&mut self.buf) {
                opcodes.push(f.opcode);
            }
            match self.s.read(&mut tmp) {
                Ok(0) => return (opcodes, false),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    return (opcodes, true)
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Everything until EOF, including what is buffered.
    pub fn read_rest(&mut self) -> String {
        while self.fill() {}
        String::from_utf8_lossy(&std::mem::take(&mut self.buf)).to_string()
    }

    /// After a close frame: the server ends the TCP connection.
    pub fn expect_eof(&mut self) {
        while self.read_frame().is_some() {}
    }
}
