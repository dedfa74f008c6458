//! wss:// and https:// against the real binary: certificates from a test CA made here,
//! clients that verify them (rustls + tungstenite, and python `websockets`), a plaintext
//! client on the TLS port, and certificate reload on SIGHUP.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use common::*;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};

/// A test CA in a temp directory, and leaf certificates it signs.
struct Pki {
    dir: PathBuf,
    ca: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new(name: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("sb-tls-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "switchboard test CA");
        let cert = params.self_signed(&key).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, cert.pem()).unwrap();
        Pki {
            dir,
            ca,
            issuer: Issuer::new(params, key),
        }
    }

    /// A leaf for localhost and 127.0.0.1 named `name` (ECDSA P-256): its cert and key
    /// files, and its DER.
    fn leaf(&self, name: &str, expired: bool) -> (PathBuf, PathBuf, Vec<u8>) {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()]).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        let (c, k) = (
            self.dir.join(format!("{name}.pem")),
            self.dir.join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k, cert.der().to_vec())
    }

    /// The test CA as a trust store.
    fn roots(&self) -> rustls::RootCertStore {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        roots
    }

    fn client(&self) -> Arc<rustls::ClientConfig> {
        let roots = self.roots();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        Arc::new(
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(roots)
                .with_no_client_auth(),
        )
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn tls_server(cert: &Path, key: &Path, extra: &[&str]) -> Server {
    let mut args = vec![
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let server = Server::start(&args);
    assert!(server.banner.contains(", tls)"), "{}", server.banner);
    server
}

type TlsSock = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;
type Wss = tungstenite::WebSocket<TlsSock>;

fn tls_connect(server: &Server, cfg: &Arc<rustls::ClientConfig>) -> TlsSock {
    let tcp = TcpStream::connect(server.addr).unwrap();
    tcp.set_read_timeout(Some(DEADLINE)).unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg.clone(), name).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// A wss:// connection, its welcome, and the certificate the server showed.
fn wss(server: &Server, cfg: &Arc<rustls::ClientConfig>, user: &str) -> (Wss, Value, Vec<u8>) {
    let sock = tls_connect(server, cfg);
    let url = format!("wss://localhost:{}/ws?user={user}", server.addr.port());
    let (mut ws, resp) = tungstenite::client::client(url, sock).expect("wss handshake");
    assert_eq!(resp.status(), 101);
    let welcome = match ws.read().unwrap() {
        tungstenite::Message::Text(t) => serde_json::from_str(&t).unwrap(),
        m => panic!("expected the welcome, got {m:?}"),
    };
    let peer = ws.get_ref().conn.peer_certificates().unwrap()[0].to_vec();
    (ws, welcome, peer)
}

fn send(ws: &mut Wss, v: Value) {
    ws.send(tungstenite::Message::text(v.to_string())).unwrap();
}

fn recv(ws: &mut Wss) -> Value {
    loop {
        match ws.read().unwrap() {
            tungstenite::Message::Text(t) => return serde_json::from_str(&t).unwrap(),
            tungstenite::Message::Ping(_) | tungstenite::Message::Pong(_) => {}
            m => panic!("unexpected {m:?}"),
        }
    }
}

/// An https:// request with `Connection: close`; the whole answer (the server ends with
/// close_notify, so a clean end is required).
fn https(server: &Server, cfg: &Arc<rustls::ClientConfig>, request: &str) -> (u16, String) {
    let mut s = tls_connect(server, cfg);
    s.write_all(request.as_bytes()).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("the answer ends with close_notify");
    parse_response(&out)
}

#[test]
fn two_users_chat_over_wss_and_the_api_answers_over_https() {
    let pki = Pki::new("chat");
    let (cert, key, der) = pki.leaf("server", false);
    let server = tls_server(&cert, &key, &["--shards", "2"]);
    let cfg = pki.client();
    let (mut alice, welcome, shown) = wss(&server, &cfg, "alice");
    assert_eq!(welcome["op"], "welcome");
    assert_eq!(shown, der, "the configured certificate");
    let (mut bob, _, _) = wss(&server, &cfg, "bob");
    assert_eq!(
        bob.get_ref().conn.handshake_kind(),
        Some(rustls::HandshakeKind::Resumed),
        "a session ticket from alice's handshake resumes bob's (same client config)"
    );
    // Large enough to take many TLS records each way.
    let big = "é".repeat(20_000);
    send(
        &mut alice,
        json!({"op":"send","to":"bob","data":big,"id":"1"}),
    );
    let got = recv(&mut bob);
    assert_eq!(
        (got["op"].as_str(), got["from"].as_str()),
        (Some("msg"), Some("alice"))
    );
    assert_eq!(got["data"].as_str(), Some(big.as_str()));
    assert_eq!(recv(&mut alice)["op"], "ack");
    for i in 0..50 {
        send(&mut bob, json!({"op":"send","to":"alice","data":i}));
    }
    for i in 0..50 {
        assert_eq!(recv(&mut alice)["data"], i, "in order");
    }
    let (status, body) = https(
        &server,
        &cfg,
        "GET /api/users/alice HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(status, 200, "{body}");
    let v: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["connections"], 1, "{v}");
    // A close handshake over TLS ends with the server's close frame.
    alice.close(None).unwrap();
    loop {
        match alice.read() {
            Ok(_) => {}
            Err(tungstenite::Error::ConnectionClosed) => break,
            Err(e) => panic!("unclean end: {e}"),
        }
    }
}

#[test]
fn a_plaintext_client_on_the_tls_port_gets_an_alert_and_a_clean_close() {
    let pki = Pki::new("plain");
    let (cert, key, _) = pki.leaf("server", false);
    let server = tls_server(&cert, &key, &[]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    s.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .expect("closed with a FIN, not reset or left open");
    assert_eq!(out.first(), Some(&0x15), "a TLS alert record: {out:?}");
    // The server is fine: a TLS client still gets in.
    let (_ws, welcome, _) = wss(&server, &pki.client(), "after");
    assert_eq!(welcome["op"], "welcome");
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_and_keeps_open_ones() {
    let pki = Pki::new("reload");
    let (cert, key, first) = pki.leaf("first", false);
    let server = tls_server(&cert, &key, &[]);
    let cfg = pki.client();
    let (mut old, _, shown) = wss(&server, &cfg, "old");
    assert_eq!(shown, first);
    // A file that does not parse: the old certificate stays.
    std::fs::write(&cert, "not a certificate").unwrap();
    // SAFETY: kill with our child's pid.
    unsafe { libc::kill(server.child_id() as i32, libc::SIGHUP) };
    let (cert2, key2, second) = pki.leaf("second", false);
    std::fs::copy(&cert2, &cert).unwrap();
    std::fs::copy(&key2, &key).unwrap();
    // The failed reload may still be on its way: send SIGHUP until a new connection shows
    // the second certificate (bounded).
    let start = Instant::now();
    loop {
        // SAFETY: as above.
        unsafe { libc::kill(server.child_id() as i32, libc::SIGHUP) };
        let (_ws, _, shown) = wss(&server, &cfg, "new");
        if shown == second {
            break;
        }
        assert_eq!(shown, first, "until the reload, the old certificate");
        assert!(
            start.elapsed() < DEADLINE,
            "the new certificate never showed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    // The connection made before the reload goes on.
    send(&mut old, json!({"op":"ping","id":"p"}));
    assert_eq!(recv(&mut old)["op"], "pong");
}

#[test]
fn python_websockets_over_wss_verifies_the_certificate() {
    let pki = Pki::new("python");
    let (cert, key, _) = pki.leaf("server", false);
    let (old_cert, old_key, _) = pki.leaf("expired", true);
    let server = tls_server(&cert, &key, &[]);
    let expired = tls_server(&old_cert, &old_key, &[]);
    let script = r#"
import asyncio, json, ssl, sys
import websockets
ca, port, expired_port = sys.argv[1], sys.argv[2], sys.argv[3]
ctx = ssl.create_default_context(cafile=ca)
async def main():
    async with websockets.connect(f"wss://localhost:{port}/ws?user=py", ssl=ctx) as ws:
        print(json.loads(await ws.recv())["op"], flush=True)
        await ws.send(json.dumps({"op": "ping", "id": "1"}))
        print(json.loads(await ws.recv())["op"], flush=True)
    for url, name in ((f"wss://127.0.0.1:{port}/ws", "wrong.example"),
                      (f"wss://localhost:{expired_port}/ws", None)):
        try:
            async with websockets.connect(url, ssl=ctx, server_hostname=name) as ws:
                print("accepted", flush=True)
        except ssl.SSLCertVerificationError as e:
            print("rejected:", e.verify_message, flush=True)
asyncio.run(main())
"#;
    let out = std::process::Command::new("python3")
        .args([
            "-c",
            script,
            pki.ca.to_str().unwrap(),
            &server.addr.port().to_string(),
            &expired.addr.port().to_string(),
        ])
        .output()
        .expect("python3");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines.len(), 4, "{stdout}");
    assert_eq!(&lines[..2], ["welcome", "pong"], "pip install websockets");
    assert!(
        lines[2].starts_with("rejected:") && lines[2].contains("mismatch"),
        "{stdout}"
    );
    assert!(
        lines[3].starts_with("rejected:") && lines[3].contains("expired"),
        "{stdout}"
    );
}

#[test]
fn every_cipher_suite_of_tls_1_2_and_1_3_carries_large_messages_both_ways() {
    use rustls::crypto::ring::cipher_suite as cs;
    let pki = Pki::new("suites");
    let (cert, key, _) = pki.leaf("server", false);
    let server = tls_server(&cert, &key, &[]);
    let (mut bob, _, _) = wss(&server, &pki.client(), "bob");
    let suites = [
        (cs::TLS13_AES_128_GCM_SHA256, &rustls::version::TLS13),
        (cs::TLS13_AES_256_GCM_SHA384, &rustls::version::TLS13),
        (cs::TLS13_CHACHA20_POLY1305_SHA256, &rustls::version::TLS13),
        (
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            &rustls::version::TLS12,
        ),
        (
            cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
            &rustls::version::TLS12,
        ),
        (
            cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
            &rustls::version::TLS12,
        ),
    ];
    let roots = pki.roots();
    for (i, (suite, version)) in suites.into_iter().enumerate() {
        let provider = rustls::crypto::CryptoProvider {
            cipher_suites: vec![suite],
            ..rustls::crypto::ring::default_provider()
        };
        let cfg = Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(provider))
                .with_protocol_versions(&[version])
                .unwrap()
                .with_root_certificates(roots.clone())
                .with_no_client_auth(),
        );
        let user = format!("a{i}");
        let (mut a, _, _) = wss(&server, &cfg, &user);
        assert_eq!(
            a.get_ref().conn.negotiated_cipher_suite(),
            Some(suite),
            "{suite:?}"
        );
        // 60 KB of text: several records each way.
        let big: String = (0..60_000)
            .map(|k| (b'a' + (k % 26) as u8) as char)
            .collect();
        send(&mut a, json!({"op":"send","to":"bob","data":big}));
        assert_eq!(
            recv(&mut bob)["data"].as_str(),
            Some(big.as_str()),
            "{suite:?}"
        );
        send(&mut bob, json!({"op":"send","to":user,"data":big}));
        assert_eq!(
            recv(&mut a)["data"].as_str(),
            Some(big.as_str()),
            "{suite:?}"
        );
    }
}

#[test]
fn server_sent_events_stream_over_https() {
    let pki = Pki::new("sse");
    let (cert, key, _) = pki.leaf("server", false);
    let server = tls_server(&cert, &key, &[]);
    let cfg = pki.client();
    let mut sse = tls_connect(&server, &cfg);
    sse.write_all(b"GET /events?user=carol&channel=news HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    // The stream's head first (the subscription is in place once it is sent).
    while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = sse.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
    assert!(
        seen.starts_with(b"HTTP/1.1 200 "),
        "{}",
        String::from_utf8_lossy(&seen)
    );
    let body = r#"{"channel":"news","data":"over https"}"#;
    let (status, answer) = https(
        &server,
        &cfg,
        &format!(
            "POST /api/publish HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ),
    );
    assert_eq!(status, 200, "{answer}");
    while !String::from_utf8_lossy(&seen).contains("over https") {
        let n = sse.read(&mut buf).unwrap();
        assert!(n > 0, "stream ended: {}", String::from_utf8_lossy(&seen));
        seen.extend_from_slice(&buf[..n]);
    }
}

#[test]
fn stalled_tls_handshakes_count_against_the_half_open_cap() {
    let pki = Pki::new("slowloris");
    let (cert, key, _) = pki.leaf("server", false);
    let server = tls_server(
        &cert,
        &key,
        &[
            "--shards",
            "1",
            "--max-pending-handshakes",
            "2",
            "--handshake-timeout-ms",
            "60000",
        ],
    );
    // The first bytes of a ClientHello record, and then nothing.
    let stall = |n: usize| -> Vec<TcpStream> {
        (0..n)
            .map(|_| {
                let mut s = TcpStream::connect(server.addr).unwrap();
                s.set_read_timeout(Some(DEADLINE)).unwrap();
                s.write_all(&[22, 3, 1, 0x02]).unwrap();
                s
            })
            .collect()
    };
    let mut held = stall(3);
    // One of the three passes the cap: it is closed at once, not at the 60 s deadline.
    let start = Instant::now();
    let closed = loop {
        let gone = held.iter().position(|s| {
            s.set_nonblocking(true).unwrap();
            let r = s.peek(&mut [0u8; 1]);
            s.set_nonblocking(false).unwrap();
            matches!(r, Ok(0)) || matches!(&r, Err(e) if e.kind() != std::io::ErrorKind::WouldBlock)
        });
        if let Some(i) = gone {
            break i;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "no stalled handshake was refused"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    };
    held.remove(closed);
    let cfg = pki.client();
    // Once the stalled ones are gone, TLS clients get in again.
    drop(held);
    let start = Instant::now();
    loop {
        let sock = tls_connect(&server, &cfg);
        let url = format!("wss://localhost:{}/ws?user=late", server.addr.port());
        if tungstenite::client::client(url, sock).is_ok() {
            break;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no room after the stalled ones left"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
