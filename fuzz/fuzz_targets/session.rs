//! A whole session fed arbitrary bytes in arbitrary pieces, with the clock moving: the
//! session never panics and its invariants hold after every turn.
//!
//! Input: byte 0 picks a preamble (none, a WebSocket upgrade with or without
//! permessage-deflate, an event stream, an API call) so the fuzzer reaches frames quickly;
//! then chunks of `[len, clock step, bytes…]`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchboard::config::Config;
use switchboard::router::{Router, Shared};
use switchboard::sim::SimSocket;
use switchboard::testkit;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, mut rest)) = data.split_first() else {
        return;
    };
    let cfg = Config {
        ping_interval_ms: 1_000,
        idle_timeout_ms: 3_000,
        timer_slack_ms: 0,
        handshake_timeout_ms: 2_000,
        close_timeout_ms: 500,
        max_message_bytes: 4_096,
        max_outbound_bytes: 2_048,
        echo: mode & 0x80 != 0,
        // permessage-deflate offered when the upgrade asks (bit 2): compressed frames too.
        deflate: true,
        deflate_min_bytes: 16,
        ..Config::default()
    };
    let shared = Shared::standalone(cfg, 1);
    let mut s: Router<SimSocket> = Router::new(0, 1, shared, 0, 1_800_000_000_000);
    let pipe = SimSocket::new(if mode & 0x40 != 0 { 256 } else { 1 << 20 });
    let key = s.accept(pipe.clone(), true);
    let preamble = match mode & 3 {
        1 if mode & 4 != 0 => testkit::upgrade_request("f", "/ws?user=fuzz").replace(
            "\r\n\r\n",
            "\r\nSec-WebSocket-Extensions: permessage-deflate\r\n\r\n",
        ),
        1 => testkit::upgrade_request("f", "/ws?user=fuzz"),
        2 => "GET /events?channel=a HTTP/1.1\r\nHost: f\r\n\r\n".to_owned(),
        3 => "POST /api/publish HTTP/1.1\r\nContent-Length: 36\r\n\r\n{\"channel\":\"a\",\"data\":\"x\",\"from\":\"\"}".to_owned(),
        _ => String::new(),
    };
    pipe.0.borrow_mut().client_write(preamble.as_bytes());
    let mut now = 0u64;
    let turn = |s: &mut Router<SimSocket>, now: u64| {
        s.set_clock(now, 1_800_000_000_000 + now);
        let (r, w) = {
            let mut p = pipe.0.borrow_mut();
            (std::mem::take(&mut p.read_edge), std::mem::take(&mut p.write_edge))
        };
        if w {
            s.on_writable(key);
        }
        if r {
            s.on_readable(key, false);
        }
        s.drain_read_backlog();
        s.on_timers();
        s.post_mail(|_, _| panic!("one shard mails nobody"));
        s.flush();
        s.check_invariants();
        if mode & 0x20 == 0 {
            pipe.0.borrow_mut().client_read();
        }
    };
    turn(&mut s, now);
    while rest.len() >= 2 {
        let len = rest[0] as usize;
        now += u64::from(rest[1]) * 16;
        let n = len.min(rest.len() - 2);
        pipe.0.borrow_mut().client_write(&rest[2..2 + n]);
        rest = &rest[2 + n..];
        turn(&mut s, now);
    }
    pipe.0.borrow_mut().client_shutdown();
    turn(&mut s, now + 10_000);
    turn(&mut s, now + 20_000);
    assert!(s.conns().is_empty(), "the connection ends after EOF and the deadlines");
});
