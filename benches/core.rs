//! Hot-path benches: timer wheel, HTTP upgrade parsing, frame decode/encode, a flush over a
//! mock socket that returns `WouldBlock`, and the real session code (`Router` over an
//! in-memory pipe): echo, protocol ops, DMs and a channel fan-out to 10k subscribers, flush
//! included.

use std::hint::black_box;
use std::io;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use switchboard::config::Config;
use switchboard::http::request;
use switchboard::protocol;
use switchboard::router::{flush, Outbox, Router, Shared, Transport};
use switchboard::testkit;
use switchboard::timer::Wheel;
use switchboard::ws::frame;

fn wheel(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer_wheel");
    g.throughput(Throughput::Elements(1_000_000));
    g.sample_size(10);
    g.bench_function("insert_1m", |b| {
        b.iter(|| {
            let mut w = Wheel::new(0);
            for i in 0..1_000_000u32 {
                w.arm(i, 25_000 + (i as u64 * 37) % 35_000);
            }
            black_box(w.len())
        })
    });
    g.bench_function("insert_and_expire_1m", |b| {
        b.iter_batched(
            || {
                let mut w = Wheel::new(0);
                for i in 0..1_000_000u32 {
                    w.arm(i, 25_000 + (i as u64 * 37) % 35_000);
                }
                w
            },
            |mut w| {
                let mut out = Vec::with_capacity(1 << 16);
                let mut fired = 0;
                while let Some(t) = w.next_expiration() {
                    out.clear();
                    fired += w.poll(t, &mut out, 1 << 16);
                }
                black_box(fired)
            },
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

const UPGRADE: &[u8] = b"GET /ws?user=alice HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\nOrigin: http://127.0.0.1:8080\r\nUser-Agent: bench\r\n\r\n";

fn http(c: &mut Criterion) {
    let mut g = c.benchmark_group("http");
    g.throughput(Throughput::Bytes(UPGRADE.len() as u64));
    g.bench_function("parse_upgrade", |b| {
        b.iter(|| {
            let r = request::parse(black_box(UPGRADE)).unwrap().unwrap();
            let u = switchboard::ws::handshake::UpgradeRequest {
                is_get: true,
                upgrade_websocket: r.upgrade_websocket,
                connection_upgrade: r.connection_upgrade,
                version: r.ws_version.as_deref(),
                key: r.ws_key.as_deref(),
            };
            black_box(switchboard::ws::handshake::accept(&u).unwrap())
        })
    });
    g.finish();
}

/// A socket that takes `room` bytes per call, then says `WouldBlock` on every other call.
struct MockSocket {
    room: usize,
    calls: usize,
    taken: usize,
}

impl Transport for MockSocket {
    fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn shutdown_write(&mut self) {}
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        self.calls += 1;
        if self.calls.is_multiple_of(2) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let n = total.min(self.room);
        self.taken += n;
        Ok(n)
    }
}

fn client_frames(n: usize, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for _ in 0..n {
        switchboard::testkit::put_frame(&mut v, 0x81, payload, Some([1, 2, 3, 4]));
    }
    v
}

fn frames(c: &mut Criterion) {
    let payload = br#"{"op":"send","to":"bob","data":{"text":"hello there"},"id":"c1"}"#;
    let batch = client_frames(1000, payload);
    let mut g = c.benchmark_group("frames");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode_unmask_1000_small", |b| {
        b.iter_batched_ref(
            || batch.clone(),
            |buf| {
                let mut pos = 0;
                let mut n = 0;
                while let Ok(Some((h, hl))) = frame::parse_header(&buf[pos..]) {
                    let s = pos + hl;
                    let e = s + h.payload_len as usize;
                    frame::apply_mask(&mut buf[s..e], h.mask.unwrap(), 0);
                    n += buf[s] as usize;
                    pos = e;
                }
                black_box(n)
            },
            BatchSize::SmallInput,
        )
    });
    let data =
        serde_json::value::RawValue::from_string(r#"{"text":"hello there"}"#.into()).unwrap();
    g.bench_function("encode_msg_1000", |b| {
        b.iter(|| {
            let mut total = 0;
            for i in 0..1000u64 {
                total += protocol::msg("alice", protocol::Target::User("bob"), &data, i).len();
            }
            black_box(total)
        })
    });
    g.bench_function("queue_and_flush_1000_over_wouldblock_socket", |b| {
        let f = protocol::msg("alice", protocol::Target::User("bob"), &data, 1);
        b.iter(|| {
            let mut out = Outbox::default();
            for _ in 0..1000 {
                out.push(f.clone());
            }
            let mut sock = MockSocket {
                room: 16 * 1024,
                calls: 0,
                taken: 0,
            };
            while !out.queue.is_empty() {
                let _ = flush(&mut sock, &mut out).unwrap();
            }
            black_box(sock.taken)
        })
    });
    g.finish();
}

/// A pipe for benches: reads hand out what was queued, writes are counted and dropped.
#[derive(Default)]
struct BenchPipe {
    input: Vec<u8>,
    pos: usize,
    written: u64,
}

impl Transport for BenchPipe {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos == self.input.len() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.input.len() - self.pos);
        buf[..n].copy_from_slice(&self.input[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
    fn write_vectored(&mut self, bufs: &[io::IoSlice<'_>]) -> io::Result<usize> {
        let n: usize = bufs.iter().map(|b| b.len()).sum();
        self.written += n as u64;
        Ok(n)
    }
    fn shutdown_write(&mut self) {}
}

fn sessions(echo: bool) -> Router<BenchPipe> {
    let cfg = Config {
        echo,
        max_outbound_bytes: 64 << 20,
        ..Config::default()
    };
    let shared = Shared::standalone(cfg, 1);
    Router::new(0, 1, shared, 0, 1_800_000_000_000)
}

/// Feeds `bytes` to connection `key` and runs the rest of a turn (timers, flush).
fn feed(s: &mut Router<BenchPipe>, key: usize, bytes: &[u8]) {
    let p = s.io_mut(key).unwrap();
    p.input.clear();
    p.input.extend_from_slice(bytes);
    p.pos = 0;
    s.on_readable(key, false);
    s.on_timers();
    s.flush();
}

/// An upgraded connection of `user` (or anonymous), welcome flushed.
fn open(s: &mut Router<BenchPipe>, user: Option<&str>) -> usize {
    let key = s.accept(BenchPipe::default(), true);
    let path = user.map_or("/ws".to_owned(), |u| format!("/ws?user={u}"));
    feed(s, key, testkit::upgrade_request("b", &path).as_bytes());
    key
}

/// The real session code: read, frame, dispatch, answer, frame, flush.
fn session(c: &mut Criterion) {
    let mut g = c.benchmark_group("session");
    g.throughput(Throughput::Elements(1000));
    let payload = br#"{"op":"send","to":"bob","data":{"text":"hello there"},"id":"c1"}"#;
    let batch = client_frames(1000, payload);
    g.bench_function("echo_1000_small_frames", |b| {
        let mut s = sessions(true);
        let key = open(&mut s, None);
        b.iter(|| feed(&mut s, key, black_box(&batch)))
    });
    let pings = client_frames(1000, br#"{"op":"ping","data":{"t":1}}"#);
    g.bench_function("ping_op_1000", |b| {
        let mut s = sessions(false);
        let key = open(&mut s, Some("alice"));
        b.iter(|| feed(&mut s, key, black_box(&pings)))
    });
    let dms = client_frames(1000, payload);
    g.bench_function("dm_1000_to_a_local_user", |b| {
        let mut s = sessions(false);
        let key = open(&mut s, Some("alice"));
        open(&mut s, Some("bob"));
        b.iter(|| feed(&mut s, key, black_box(&dms)))
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let subscribers = 10_000usize;
    let mut s = sessions(false);
    let sub = client_frames(1, br#"{"op":"sub","channel":"room"}"#);
    for _ in 0..subscribers {
        let k = open(&mut s, None);
        feed(&mut s, k, &sub);
    }
    let publisher = open(&mut s, Some("alice"));
    let publish = client_frames(1, br#"{"op":"pub","channel":"room","data":"hello room"}"#);
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(subscribers as u64));
    g.bench_function("publish_to_10k_local_subscribers_and_flush", |b| {
        b.iter(|| feed(&mut s, publisher, black_box(&publish)))
    });
    g.finish();
}

criterion_group!(benches, wheel, http, frames, session, fanout);
criterion_main!(benches);
