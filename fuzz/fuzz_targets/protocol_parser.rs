//! The protocol request parser: never panics, and every event built from a parsed request is
//! valid JSON on one line (so SSE can carry it as one `data:` line).
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchboard::protocol::{self, Op, Target};

fn check(p: &[u8]) {
    assert!(!p.contains(&b'\n') && !p.contains(&b'\r'), "event on one line");
    // Valid JSON grammar (`data` is passed through byte for byte: a number beyond f64 is
    // JSON, JavaScript reads it as Infinity).
    serde_json::from_slice::<serde::de::IgnoredAny>(p).expect("event is JSON");
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match protocol::parse(text) {
        Ok(p) => {
            if let Some(id) = p.id {
                check(&protocol::ack(id.get()));
            }
            match p.op {
                Op::Send { to, data, .. } => {
                    check(&protocol::msg("f", Target::User(&to), data, 1));
                    let mut p = protocol::msg_prefix("f", Target::User(&to), data, 1).to_vec();
                    p.extend_from_slice(br#","stream":"inbox","offset":1,"epoch":"e"}"#);
                    check(&p);
                }
                Op::Pub { channel, data } => {
                    check(&protocol::msg("f", Target::Channel(&channel), data, 1))
                }
                Op::Ping { data } => check(&protocol::pong(data)),
                Op::Sub { channel, .. } | Op::Unsub { channel } => {
                    assert!(protocol::valid_channel(&channel));
                    check(&protocol::join_leave(true, &channel, "u", "0.1.2"));
                    assert!(protocol::is_join_leave(&protocol::join_leave(
                        false, &channel, "u", "0.1.2"
                    )));
                }
                Op::Presence { channel } => {
                    assert!(protocol::valid_channel(&channel));
                    let id = p.id.map(|r| r.get());
                    let tally = [(std::sync::Arc::from("u"), 2), (std::sync::Arc::from(""), 1)];
                    check(&protocol::presence(id, &channel, &tally, true));
                }
                Op::Confirm { .. } => {}
                Op::History { stream, .. } => {
                    let id = p.id.map(|r| r.get());
                    let entries = [(1, bytes::Bytes::from_static(br#"{"op":"msg"}"#))];
                    check(&protocol::history(Some(id), &stream, "e", (1, 1, 2), &entries));
                }
            }
        }
        Err(e) => check(&protocol::error(e.id.map(|r| r.get()), e.code, &e.message)),
    }
});
