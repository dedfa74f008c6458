//! The WebSocket machine alone: bytes in, events out, no router.

use std::borrow::Cow;

use super::{heartbeat_check_ms, next_event, Event, Limits};
use crate::conn::buffers::Inbound;
use crate::conn::{Conn, ConnState, Flags};
use crate::ws::close as code;

const LIMITS: Limits = Limits {
    max_message_bytes: 1024,
    binary: false,
};

/// A client frame: masked, `fin`, opcode, payload (under 64 KiB).
fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x37, 0xfa, 0x21, 0x3d];
    let mut f = vec![u8::from(fin) << 7 | opcode];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&mask);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    f
}

fn inbound(bytes: &[u8]) -> Inbound {
    let mut buf = bytes.to_vec();
    buf.resize(bytes.len() + 64, 0);
    Inbound {
        buf,
        start: 0,
        end: bytes.len(),
        frag: None,
        skip: 0,
    }
}

fn open_conn() -> Conn<()> {
    let mut c = Conn::new((), 1, 0);
    c.state = ConnState::UPGRADED;
    c
}

/// Every event of `bytes`, as owned values, with `f` applied between them (the router's
/// part: what it does to the connection after an event).
fn events(c: &mut Conn<()>, inb: &mut Inbound, now_ms: u64) -> Vec<Event<'static>> {
    read_all(c, inb, now_ms, true)
}

/// [`events`], through the short path for small messages (`short`) or the general parse.
fn read_all(c: &mut Conn<()>, inb: &mut Inbound, now_ms: u64, short: bool) -> Vec<Event<'static>> {
    let mut out = Vec::new();
    let mut inflater = None;
    loop {
        let ev = if short {
            next_event(c, inb, &LIMITS, &mut inflater, now_ms)
        } else {
            super::read::read_event::<_, false>(c, inb, &LIMITS, &mut inflater, now_ms)
        };
        let Some(ev) = ev else { break };
        out.push(match ev {
            Event::Text(t) => Event::Text(Cow::Owned(t.into_owned())),
            Event::Binary(b) => Event::Binary(Cow::Owned(b.into_owned())),
            Event::Ping(p) => Event::Ping(p.to_vec().leak()),
            Event::Close { code, reply } => Event::Close { code, reply },
            Event::CloseAnswered => Event::CloseAnswered,
            v @ Event::Violation { .. } => {
                // The router's answer to a violation: our close frame goes out.
                c.flags.set(Flags::CLOSE_SENT);
                c.state = ConnState::Closing;
                match v {
                    Event::Violation {
                        code,
                        reason,
                        peer_closed,
                    } => Event::Violation {
                        code,
                        reason,
                        peer_closed,
                    },
                    _ => unreachable!(),
                }
            }
        });
    }
    out
}

fn message(text: &str) -> Event<'static> {
    Event::Text(Cow::Owned(text.to_owned()))
}

#[test]
fn an_unfragmented_text_message_is_borrowed_from_the_read_buffer_and_is_a_sign_of_life() {
    let mut c = open_conn();
    c.flags.set(Flags::PING_OUTSTANDING);
    let mut inb = inbound(&frame(true, 1, br#"{"op":"ping"}"#));
    let mut inflater = None;
    let ev = next_event(&mut c, &mut inb, &LIMITS, &mut inflater, 500);
    assert!(matches!(
        ev,
        Some(Event::Text(Cow::Borrowed(t))) if t == r#"{"op":"ping"}"#
    ));
    assert_eq!(c.silent_ms(500), 0);
    assert!(!c.flags.has(Flags::PING_OUTSTANDING));
    assert!(next_event(&mut c, &mut inb, &LIMITS, &mut inflater, 500).is_none());
}

#[test]
fn a_fragmented_message_is_reassembled_across_reads_even_inside_a_utf8_character() {
    let mut c = open_conn();
    let text = "héllo";
    let b = text.as_bytes();
    // The split falls inside "é" (two bytes).
    let mut bytes = frame(false, 1, &b[..2]);
    bytes.extend(frame(true, 0, &b[2..]));
    let (first, rest) = bytes.split_at(5);
    let mut inb = inbound(first);
    assert!(events(&mut c, &mut inb, 0).is_empty(), "half a frame: wait");
    inb.buf[inb.end..inb.end + rest.len()].copy_from_slice(rest);
    inb.end += rest.len();
    assert_eq!(events(&mut c, &mut inb, 0), vec![message(text)]);
}

#[test]
fn protocol_errors_become_violations_and_parsing_goes_on_for_the_peers_close() {
    let cases: &[(Vec<u8>, u16)] = &[
        (frame(true, 1, &[0xff, 0xfe]), code::INVALID_PAYLOAD),
        (frame(true, 2, b"bin"), code::UNSUPPORTED_DATA),
        (frame(true, 1, &[b'x'; 1025]), code::TOO_BIG),
        (frame(false, 9, b""), code::PROTOCOL_ERROR),
        (frame(true, 0, b"x"), code::PROTOCOL_ERROR),
        (frame(true, 3, b""), code::PROTOCOL_ERROR),
        (
            {
                let mut f = frame(true, 1, b"x");
                f[1] &= 0x7f; // unmasked
                f.truncate(2);
                f.push(b'x');
                f
            },
            code::PROTOCOL_ERROR,
        ),
    ];
    for (bad, want) in cases {
        let mut c = open_conn();
        let mut bytes = bad.clone();
        bytes.extend(frame(true, 1, b"after")); // discarded: closing
        bytes.extend(frame(true, 8, &1000u16.to_be_bytes()));
        let mut inb = inbound(&bytes);
        let got = events(&mut c, &mut inb, 0);
        assert!(
            matches!(got[0], Event::Violation { code, peer_closed: false, .. } if code == *want),
            "{got:?}, wanted {want}"
        );
        assert_eq!(got[1..], [Event::CloseAnswered], "{want}");
        assert!(c.flags.has(Flags::CLOSE_RECEIVED | Flags::DISCARD_INPUT));
    }
}

#[test]
fn the_peers_close_is_answered_with_its_code_and_a_bad_one_is_a_violation_that_ends_it() {
    let mut c = open_conn();
    let mut payload = 4321u16.to_be_bytes().to_vec();
    payload.extend_from_slice(b"bye");
    let mut inb = inbound(&frame(true, 8, &payload));
    match events(&mut c, &mut inb, 0).as_slice() {
        [Event::Close { code: 4321, reply }] => assert_eq!(&reply[2..4], &4321u16.to_be_bytes()),
        other => panic!("{other:?}"),
    }
    for bad in [
        vec![3],
        999u16.to_be_bytes().to_vec(),
        vec![0x03, 0xe8, 0xff],
    ] {
        let mut c = open_conn();
        let mut inb = inbound(&frame(true, 8, &bad));
        let got = events(&mut c, &mut inb, 0);
        assert!(
            matches!(
                got[..],
                [Event::Violation {
                    peer_closed: true,
                    ..
                }]
            ),
            "{bad:?}: {got:?}"
        );
        assert!(c.flags.has(Flags::CLOSE_RECEIVED | Flags::DISCARD_INPUT));
    }
}

#[test]
fn pings_are_answered_only_while_open() {
    let mut c = open_conn();
    let mut bytes = frame(true, 9, b"p1");
    bytes.extend(frame(true, 10, b"pong"));
    let mut inb = inbound(&bytes);
    assert_eq!(events(&mut c, &mut inb, 0), vec![Event::Ping(b"p1")]);
    c.state = ConnState::Closing;
    let mut inb = inbound(&frame(true, 9, b"p2"));
    assert!(events(&mut c, &mut inb, 0).is_empty());
}

#[test]
fn the_heartbeat_pings_after_silence_then_waits_for_the_idle_deadline() {
    let mut c = open_conn();
    c.touch(1_000);
    assert_eq!(heartbeat_check_ms(&c, 1_000, 25_000, 60_000, 7), 26_007);
    c.flags.set(Flags::PING_OUTSTANDING);
    assert_eq!(heartbeat_check_ms(&c, 30_000, 25_000, 60_000, 7), 55_000);
    assert_eq!(heartbeat_check_ms(&c, 50_000, 25_000, 60_000, 7), 61_000);
}

#[test]
fn the_ping_is_an_empty_ping_frame() {
    use crate::ws::frame::{self, Control, OpCode};
    let encoded = frame::encode(OpCode::Control(Control::Ping), b"");
    assert_eq!(&super::PING[..], &encoded[..]);
}

#[test]
fn small_messages_read_as_the_general_parse_reads_them() {
    // Under 126 bytes, unfragmented, uncompressed: the short path. Each case goes through
    // both paths, fed whole, a frame per read and a byte per read, and all six must give
    // the same events.
    let cases: Vec<Vec<Vec<u8>>> = vec![
        vec![frame(true, 1, b"hi"), frame(true, 1, br#"{"op":"ping"}"#)],
        vec![frame(true, 1, &[b'x'; 125])],
        vec![frame(true, 1, &[b'y'; 126])],
        vec![frame(true, 1, b"")],
        // Invalid UTF-8 in a small text message: 1007.
        vec![frame(true, 1, b"\xff\xfe"), frame(true, 8, b"")],
        // Binary while not taken: 1003.
        vec![frame(true, 2, b"bin"), frame(true, 8, b"")],
        // A small FIN text frame while a fragmented message is open: 1002.
        vec![
            frame(false, 1, b"par"),
            frame(true, 1, b"new"),
            frame(true, 8, b""),
        ],
        // Unmasked: 1002.
        vec![vec![0x81, 0x02, b'h', b'i'], frame(true, 8, b"")],
        // A message after the peer's close is not read.
        vec![frame(true, 8, b""), frame(true, 1, b"late")],
        // A message after a frame error is not read.
        vec![vec![0x81, 0xff, 0, 0], frame(true, 1, b"lost")],
    ];
    for frames in cases {
        let bytes = frames.concat();
        let reads: [Vec<Vec<u8>>; 3] = [
            vec![bytes.clone()],
            frames.clone(),
            bytes.iter().map(|&b| vec![b]).collect(),
        ];
        let mut seen = Vec::new();
        for short in [true, false] {
            for pieces in &reads {
                let mut c = open_conn();
                let mut inb = Inbound {
                    buf: vec![0; bytes.len() + 64],
                    start: 0,
                    end: 0,
                    frag: None,
                    skip: 0,
                };
                let mut got = Vec::new();
                for piece in pieces {
                    let end = inb.end;
                    inb.buf[end..end + piece.len()].copy_from_slice(piece);
                    inb.end += piece.len();
                    got.extend(read_all(&mut c, &mut inb, 5, short));
                }
                seen.push(got);
            }
        }
        assert!(!seen[0].is_empty());
        for s in &seen[1..] {
            assert_eq!(&seen[0], s, "{frames:?}");
        }
    }
}
