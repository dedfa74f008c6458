//! Every scenario against a real switchboard server (in-process, loopback, free port) at small
//! scale, plus `echo` against a third-party echo server (python `websockets`).

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value;
use switchboard::config::{FdTableMode, Options};
use switchboard::server::Server;

struct Running(Option<Server>);

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.0.take() {
            s.shutdown();
            s.join();
        }
    }
}

fn server(extra: &[&str]) -> (Running, String) {
    let mut args = vec![
        "switchboard",
        "--listen",
        "127.0.0.1:0",
        "--shards",
        "2",
        "--shutdown-grace-ms",
        "1000",
    ];
    if !extra.contains(&"--store") {
        args.extend(["--store", "memory"]);
    }
    args.extend_from_slice(extra);
    let mut cfg = <Options as clap::Parser>::parse_from(args).load().unwrap();
    cfg.fd_table = FdTableMode::Shared;
    let s = Server::start(cfg).unwrap();
    let url = format!("ws://{}/ws", s.local_addrs[0]);
    (Running(Some(s)), url)
}

fn out_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("loadgen-test-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn loadgen(args: &[&str], out: &Path) -> Value {
    let run = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(args)
        .arg("--out")
        .arg(out)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .output()
        .expect("run loadgen");
    assert!(
        run.status.success(),
        "loadgen {args:?} failed: {}\n{}",
        run.status,
        String::from_utf8_lossy(&run.stdout)
    );
    let text = std::fs::read_to_string(out.join("summary.json")).expect("summary.json");
    serde_json::from_str(&text).expect("summary.json is JSON")
}

/// Each `.hgrm` parses, has percentiles and values that never decrease, and ends at 100 %.
fn check_hgrm(out: &Path, name: &str, count: u64) {
    let text = std::fs::read_to_string(out.join(format!("{name}.hgrm"))).unwrap();
    let rows = loadgen::report::parse_hgrm(&text).unwrap();
    assert!(!rows.is_empty(), "{name}.hgrm has rows");
    assert!(
        rows.windows(2)
            .all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1),
        "{name}.hgrm monotonic"
    );
    assert_eq!(rows.last().unwrap().1, 1.0);
    assert!(
        text.contains(&format!("Total count    = {count:12}")),
        "{name}.hgrm count {count}"
    );
}

fn check_common(s: &Value, out: &Path, n: u64) {
    assert_eq!(s["connections"]["established"], n);
    assert_eq!(s["connections"]["failed"], 0);
    assert_eq!(
        s["unexpected_closes"]["total"], 0,
        "{}",
        s["unexpected_closes"]
    );
    for key in ["connect_rate_per_s", "peak_open"] {
        assert!(s["connections"][key].as_f64().unwrap() > 0.0, "{key}");
    }
    let closed_loop = s["scenario"] == "flood";
    assert_eq!(s["open_loop"], !closed_loop);
    assert!(s["histograms"]["connect"]["p99"].as_u64().unwrap() > 0);
    check_hgrm(out, "connect", n);
    assert!(std::fs::read_to_string(out.join("latency.svg"))
        .unwrap()
        .contains("<polyline"));
    assert!(std::fs::read_to_string(out.join("intervals.hlog"))
        .unwrap()
        .contains("#[StartTime:"));
}

#[test]
fn connect_holds_every_connection() {
    let (_srv, url) = server(&[]);
    let out = out_dir("connect");
    let pid = std::process::id().to_string();
    let s = loadgen(
        &[
            "connect",
            "--url",
            &url,
            "--connections",
            "200",
            "--duration",
            "2s",
            "--server-pid",
            &pid,
        ],
        &out,
    );
    check_common(&s, &out, 200);
    assert_eq!(s["connections"]["peak_open"], 200);
    assert!(s["server"]["rss_peak_bytes"].as_u64().unwrap() > 0);
    assert!(s["open_per_second"]
        .as_array()
        .unwrap()
        .iter()
        .any(|v| v == 200));
}

#[test]
fn dm_has_no_loss_and_no_duplicates() {
    let (_srv, url) = server(&[]);
    let out = out_dir("dm");
    let s = loadgen(
        &[
            "dm",
            "--url",
            &url,
            "--connections",
            "200",
            "--rate",
            "2000",
            "--duration",
            "2s",
        ],
        &out,
    );
    check_common(&s, &out, 200);
    let m = &s["messages"];
    let sent = m["sent"].as_u64().unwrap();
    assert!(sent >= 3000, "sent {sent}");
    assert_eq!(m["received"], sent);
    assert_eq!(
        (
            m["missing"].as_u64(),
            m["duplicates"].as_u64(),
            m["gaps"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(m["op_errors"], 0);
    check_hgrm(&out, "dm_latency", sent);
    assert!(s["histograms"]["dm_latency"]["p50"].as_u64().unwrap() > 0);
}

#[test]
fn dm_qos1_is_acknowledged_and_complete() {
    let (_srv, url) = server(&[]);
    let out = out_dir("dm-qos1");
    let s = loadgen(
        &[
            "dm",
            "--url",
            &url,
            "--connections",
            "200",
            "--rate",
            "2000",
            "--duration",
            "2s",
            "--qos",
            "1",
        ],
        &out,
    );
    check_common(&s, &out, 200);
    let m = &s["messages"];
    let sent = m["sent"].as_u64().unwrap();
    assert!(sent >= 3000, "sent {sent}");
    assert_eq!(m["received"], sent);
    assert_eq!(m["acked"], sent, "every qos-1 DM acknowledged");
    assert_eq!(
        (
            m["missing"].as_u64(),
            m["duplicates"].as_u64(),
            m["gaps"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
    assert_eq!(m["op_errors"], 0);
    check_hgrm(&out, "ack_latency", sent);
}

#[test]
fn dm_resume_loses_nothing_across_periodic_drops() {
    let (_srv, url) = server(&[]);
    let out = out_dir("dm-resume");
    let s = loadgen(
        &[
            "dm",
            "--url",
            &url,
            "--connections",
            "200",
            "--rate",
            "1000",
            "--duration",
            "3s",
            "--qos",
            "1",
            "--resume-every",
            "1s",
            "--drop-percent",
            "20",
        ],
        &out,
    );
    let m = &s["messages"];
    let sent = m["sent"].as_u64().unwrap();
    assert!(sent >= 1500, "sent {sent}");
    assert_eq!(
        m["received"], sent,
        "every message reaches its receiver, through the drops"
    );
    assert_eq!(
        (m["gaps"].as_u64(), m["duplicates"].as_u64()),
        (Some(0), Some(0))
    );
    let dropped = s["connections"]["dropped_on_purpose"].as_u64().unwrap();
    assert!(dropped >= 40, "dropped {dropped}");
    assert_eq!(
        s["histograms"]["resume_recovery"]["count"], dropped,
        "every drop recovered"
    );
}

#[test]
fn fanout_qos1_on_channels_with_history_is_complete_and_in_order() {
    let cfg = std::env::temp_dir().join(format!("loadgen-channels-{}.toml", std::process::id()));
    std::fs::write(&cfg, "[[channels]]\npattern = \"lg-*\"\nhistory = 100000\n").unwrap();
    let (_srv, url) = server(&["--config", cfg.to_str().unwrap()]);
    let out = out_dir("fanout-qos1");
    let s = loadgen(
        &[
            "fanout",
            "--url",
            &url,
            "--connections",
            "200",
            "--channels",
            "4",
            "--publishers",
            "2",
            "--rate",
            "200",
            "--duration",
            "2s",
            "--qos",
            "1",
        ],
        &out,
    );
    check_common(&s, &out, 202);
    let m = &s["messages"];
    let sent = m["sent"].as_u64().unwrap();
    assert_eq!(m["received"], sent * 50);
    assert_eq!(m["acked"], sent, "every stored publication acknowledged");
    assert_eq!(
        (m["gaps"].as_u64(), m["duplicates"].as_u64()),
        (Some(0), Some(0))
    );
    check_hgrm(&out, "ack_latency", sent);
    let _ = std::fs::remove_file(&cfg);
}

#[test]
fn fanout_delivers_every_publication_to_every_subscriber() {
    let (_srv, url) = server(&[]);
    let out = out_dir("fanout");
    let s = loadgen(
        &[
            "fanout",
            "--url",
            &url,
            "--connections",
            "200",
            "--channels",
            "4",
            "--publishers",
            "2",
            "--rate",
            "200",
            "--duration",
            "2s",
        ],
        &out,
    );
    check_common(&s, &out, 202);
    let m = &s["messages"];
    let sent = m["sent"].as_u64().unwrap();
    // Every publication reaches the 50 subscribers of its channel.
    assert_eq!(m["expected"].as_u64().unwrap(), sent * 50);
    assert_eq!(m["received"], m["expected"]);
    assert_eq!(m["missing"], 0);
    check_hgrm(&out, "fanout_latency", sent * 50);
}

#[test]
fn storm_drops_and_recovers() {
    let (_srv, url) = server(&[]);
    let out = out_dir("storm");
    let s = loadgen(
        &[
            "storm",
            "--url",
            &url,
            "--connections",
            "200",
            "--drop-percent",
            "30",
            "--duration",
            "3s",
        ],
        &out,
    );
    let c = &s["connections"];
    let dropped = c["dropped_on_purpose"].as_u64().unwrap();
    assert!(dropped > 20 && dropped < 120, "dropped {dropped}");
    assert_eq!(
        c["established"].as_u64().unwrap(),
        200 + dropped,
        "every dropped connection came back"
    );
    assert!(c["storm_recovery_seconds"].as_f64().unwrap() > 0.0);
    assert_eq!(s["unexpected_closes"]["total"], 0);
}

#[test]
fn echo_measures_a_third_party_server() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/echo_server.py");
    let mut child = Command::new("python3")
        .arg(script)
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let port: u16 = line
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("echo server did not start (pip install websockets): {line:?}"));
    let url = format!("ws://127.0.0.1:{port}/");
    let out = out_dir("echo");
    let s = loadgen(
        &[
            "echo",
            "--url",
            &url,
            "--connections",
            "50",
            "--rate",
            "500",
            "--duration",
            "2s",
        ],
        &out,
    );
    let _ = child.kill();
    let _ = child.wait();
    check_common(&s, &out, 50);
    let m = &s["messages"];
    assert!(m["sent"].as_u64().unwrap() >= 900);
    assert_eq!(m["received"], m["sent"]);
    check_hgrm(&out, "echo_rtt", m["sent"].as_u64().unwrap());
}

#[test]
fn refused_connections_are_reported_with_the_fix() {
    // A port nobody listens on: bind, learn it, close.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let out = out_dir("refused");
    let status = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "connect",
            "--url",
            &format!("ws://127.0.0.1:{port}/ws"),
            "--connections",
            "5",
            "--duration",
            "1s",
            "--connect-timeout",
            "5s",
        ])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        !status.status.success(),
        "nothing established → non-zero exit"
    );
    let stdout = String::from_utf8_lossy(&status.stdout);
    assert!(
        stdout.contains("ECONNREFUSED") && stdout.contains("start the server"),
        "{stdout}"
    );
}

#[test]
fn refused_dms_are_counted_by_code_and_a_run_with_missing_messages_fails() {
    // A store of 2 KB: the first qos-1 DMs are stored, the rest refused `store_full`.
    let (_s, url) = server(&["--store-max-bytes", "2000"]);
    let out = out_dir("refused-dms");
    let run = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args(["dm", "--url", &url, "--connections", "2", "--rate", "40"])
        .args(["--duration", "1s", "--qos", "1"])
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert_eq!(run.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("refused by the server: store_full"),
        "{stdout}"
    );
    assert!(stdout.contains("FAILED:"), "{stdout}");
    let text = std::fs::read_to_string(out.join("summary.json")).unwrap();
    let s: Value = serde_json::from_str(&text).unwrap();
    let refused = s["messages"]["op_errors_by_code"]["store_full"]
        .as_u64()
        .unwrap();
    assert!(refused > 0, "{s}");
    assert_eq!(s["messages"]["op_errors"].as_u64(), Some(refused));
    // Exactly the refused ones are missing: every stored one arrived.
    assert_eq!(s["messages"]["missing"].as_u64(), Some(refused), "{s}");
}

#[path = "../../tests/common/redis.rs"]
mod redis;

#[test]
fn dm_across_three_nodes_loses_nothing() {
    let redis = redis::Redis::start();
    dm_across_three_nodes(&redis.url(), &[], "dm-cluster");
}

#[test]
fn dm_across_three_nodes_on_a_redis_cluster_loses_nothing_at_qos_1() {
    let cluster = redis::RedisCluster::start(3);
    let before = cluster.calls("evalsha");
    dm_across_three_nodes(&cluster.url(), &["--store", "redis"], "dm-rcluster");
    // Stored in the cluster's streams (two scripts per DM: one per inbox), never published
    // cluster-wide.
    assert!(
        cluster.calls("evalsha") > before + 8000,
        "{}",
        cluster.calls("evalsha")
    );
    assert_eq!(cluster.calls("publish"), 0);
}

/// `loadgen dm` over three nodes sharing `broker`: every DM arrives once, in order.
fn dm_across_three_nodes(broker: &str, extra: &[&str], name: &str) {
    let qos1 = extra.contains(&"redis");
    let nodes: Vec<(Running, String)> = ["n1", "n2", "n3"]
        .iter()
        .map(|id| {
            let mut args = vec!["--broker", broker, "--node-id", id];
            args.extend_from_slice(extra);
            server(&args)
        })
        .collect();
    let out = out_dir(name);
    let mut args = vec!["dm"];
    if qos1 {
        args.extend(["--qos", "1"]);
    }
    for (_, url) in &nodes {
        args.extend(["--url", url.as_str()]);
    }
    args.extend(["--connections", "600", "--rate", "3000", "--duration", "2s"]);
    let s = loadgen(&args, &out);
    let m = &s["messages"];
    let sent = m["sent"].as_u64().unwrap();
    assert!(sent >= 4000, "sent {sent}");
    assert_eq!(m["received"], sent, "every DM crossed its node");
    assert_eq!(
        (
            m["gaps"].as_u64(),
            m["duplicates"].as_u64(),
            m["op_errors"].as_u64()
        ),
        (Some(0), Some(0), Some(0))
    );
}

#[test]
fn flood_keeps_a_window_in_flight_and_reports_cpu_per_message() {
    let (_srv, url) = server(&["--echo"]);
    let out = out_dir("flood");
    let pid = std::process::id().to_string();
    let s = loadgen(
        &[
            "flood",
            "--url",
            &url,
            "--connections",
            "20",
            "--window",
            "16",
            "--duration",
            "1s",
            // The server runs in this test process: its CPU is ours.
            "--server-pid",
            &pid,
        ],
        &out,
    );
    check_common(&s, &out, 20);
    let m = &s["messages"];
    let sent = m["sent"].as_u64().unwrap();
    // The window alone is 20 × 16; each echo is answered by another message.
    assert!(sent > 20 * 16 * 4, "closed loop kept going: sent {sent}");
    assert_eq!(m["received"], sent, "every message echoed");
    assert_eq!(m["missing"], 0);
    let f = &s["flood"];
    assert_eq!(
        (f["window"].as_u64(), f["size"].as_u64()),
        (Some(16), Some(32))
    );
    assert!(f["echoed_per_s"].as_f64().unwrap() > 0.0, "{f}");
    assert!(
        f["server_cpu_ns_per_message"].as_f64().unwrap() > 0.0,
        "{f}"
    );
}

/// A self-signed certificate for localhost and 127.0.0.1 in `dir`: (cert, key) files.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[test]
fn dm_over_wss_verifies_the_server_and_loses_nothing() {
    let certs = out_dir("wss-certs");
    let (cert, key) = self_signed(&certs);
    let (_srv, url) = server(&[
        "--tls-cert",
        cert.to_str().unwrap(),
        "--tls-key",
        key.to_str().unwrap(),
    ]);
    let url = url.replace("ws://127.0.0.1", "wss://localhost");
    let out = out_dir("wss");
    let s = loadgen(
        &[
            "dm",
            "--url",
            &url,
            "--ca-file",
            cert.to_str().unwrap(),
            "--connections",
            "100",
            "--rate",
            "1000",
            "--duration",
            "2s",
        ],
        &out,
    );
    check_common(&s, &out, 100);
    let m = &s["messages"];
    let sent = m["sent"].as_u64().unwrap();
    assert!(sent >= 1500, "sent {sent}");
    assert_eq!(m["received"], sent);
    assert_eq!(m["missing"], 0);
    // Trusting another certificate, the server is not trusted: every connect fails and
    // the report says why.
    let (other, _) = self_signed(&certs.join("other"));
    let run = Command::new(env!("CARGO_BIN_EXE_loadgen"))
        .args([
            "connect",
            "--url",
            &url,
            "--connections",
            "5",
            "--duration",
            "1s",
        ])
        .args(["--ca-file", other.to_str().unwrap()])
        .arg("--out")
        .arg(out_dir("wss-untrusted"))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&run.stdout);
    assert!(!run.status.success(), "{text}");
    assert!(text.contains("0 established of 5"), "{text}");
    assert!(text.contains("TLS: invalid peer certificate"), "{text}");
}

#[test]
fn fanout_with_deflate_inflates_every_compressed_publication() {
    let (srv, url) = server(&["--deflate"]);
    let out = out_dir("fanout-deflate");
    let s = loadgen(
        &[
            "fanout",
            "--url",
            &url,
            "--connections",
            "100",
            "--channels",
            "1",
            "--publishers",
            "1",
            "--rate",
            "50",
            "--size",
            "2048",
            "--deflate",
            "--duration",
            "2s",
        ],
        &out,
    );
    let m = &s["messages"];
    let sent = m["sent"].as_u64().unwrap();
    assert!(sent >= 50, "sent {sent}");
    assert_eq!(m["received"], m["expected"]);
    assert_eq!(m["missing"], 0);
    // Compressed on the wire: well under 100 × 2 KiB per publication.
    let server = srv.0.as_ref().unwrap();
    let out_bytes: u64 = server
        .metrics
        .iter()
        .map(|m| m.bytes_out.load(std::sync::atomic::Ordering::Relaxed))
        .sum();
    assert!(
        out_bytes < sent * 100 * 2048 * 7 / 10,
        "{out_bytes} bytes out for {sent} publications to 100"
    );
}

/// `dm --qos 1 --audit` through a node's shutdown: its users move to the other node and
/// resume; every acknowledged message arrives once and is found stored once.
#[test]
fn audit_follows_users_to_the_other_node_and_finds_every_acked_message() {
    let redis = redis::Redis::start();
    let url = redis.url();
    let (mut a, url_a) = server(&["--broker", &url, "--node-id", "a", "--store", "redis"]);
    let (_b, url_b) = server(&["--broker", &url, "--node-id", "b", "--store", "redis"]);
    let targets = [&url_a, &url_b]
        .iter()
        .map(|u| loadgen::plan::parse_url(u).unwrap())
        .collect();
    let audit = loadgen::audit::Audit {
        targets,
        users: 20,
        rate: 400.0,
        duration: std::time::Duration::from_secs(3),
        drain: std::time::Duration::from_secs(20),
        prefix: "au".into(),
    };
    let run = std::thread::spawn(move || loadgen::audit::run(audit));
    // A third of the way in, node a goes away (its users are told 1001 and move to b).
    std::thread::sleep(std::time::Duration::from_secs(1));
    if let Some(s) = a.0.take() {
        s.shutdown();
        s.join();
    }
    let r = run.join().unwrap();
    assert!(r.acked >= 600, "{r:?}");
    assert_eq!(r.acked, r.sent, "{r:?}");
    assert!(r.reconnects >= 10, "node a's users moved: {r:?}");
    assert!(r.clean(), "nothing acknowledged lost or doubled: {r:?}");
}
