//! Hot-path benches: timer wheel, HTTP upgrade parsing, frame decode/encode over a mock socket
//! that returns `WouldBlock`, and channel fan-out inside one shard.

use std::hint::black_box;
use std::io;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use switchboard::http::request;
use switchboard::hub::Hub;
use switchboard::protocol;
use switchboard::session::{flush, Outbox, Transport};
use switchboard::timer::Wheel;
use switchboard::ws::frame;

fn wheel(c: &mut Criterion) {
    let mut g = c.benchmark_group("timer_wheel");
    g.throughput(Throughput::Elements(1_000_000));
    g.sample_size(10);
    g.bench_function("insert_1m", |b| {
        b.iter(|| {
            let mut w: Wheel<u32> = Wheel::new(0);
            for i in 0..1_000_000u32 {
                w.insert(25_000 + (i as u64 * 37) % 35_000, i);
            }
            black_box(w.len())
        })
    });
    g.bench_function("insert_and_expire_1m", |b| {
        b.iter_batched(
            || {
                let mut w: Wheel<u32> = Wheel::new(0);
                for i in 0..1_000_000u32 {
                    w.insert(25_000 + (i as u64 * 37) % 35_000, i);
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

fn fanout(c: &mut Criterion) {
    let subscribers = 10_000u32;
    let mut hub = Hub::default();
    let room: Arc<str> = "room".into();
    for s in 0..subscribers {
        hub.subscribe(&room, s);
    }
    let data = serde_json::value::RawValue::from_string(r#""hello room""#.into()).unwrap();
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(subscribers as u64));
    g.bench_function("publish_to_10k_local_subscribers", |b| {
        let mut outboxes: Vec<Outbox> = (0..subscribers).map(|_| Outbox::default()).collect();
        b.iter(|| {
            // Serialize once, share the bytes with every subscriber's queue.
            let f: Bytes = protocol::msg("alice", protocol::Target::Channel("room"), &data, 1);
            for s in hub.subscribers("room") {
                outboxes[s as usize].push(f.clone());
            }
            for o in outboxes.iter_mut() {
                o.queue.clear();
                o.bytes = 0;
            }
        })
    });
    g.finish();
}

criterion_group!(benches, wheel, http, frames, fanout);
criterion_main!(benches);
