//! A WebSocket connection's input (RFC 6455): frames parsed and checked, messages
//! reassembled, inflated and checked for UTF-8, control frames answered, the peer's close
//! frame read. Pure: the read buffer, the connection and `now` in; [`Event`]s out.

use std::borrow::Cow;
use std::ops::Range;

use flate2::Decompress;

use super::{Event, Limits};
use crate::conn::buffers::{Fragment, Inbound};
use crate::conn::{Conn, ConnState, Flags};
use crate::ws::close::{self as code};
use crate::ws::frame::{self, Control, Data, FrameHeader, OpCode};
use crate::ws::utf8;

/// The next event in `inb` for connection `c` (open or closing), or `None` when more bytes
/// are needed or input is discarded. Every complete frame counts as a sign of life
/// ([`Conn::touch`] at `now_ms`, no ping outstanding). `inflater` is the shard's, for
/// clients that keep no compression context.
#[inline]
pub fn next_event<'a, T>(
    c: &mut Conn<T>,
    inb: &'a mut Inbound,
    limits: &Limits,
    inflater: &mut Option<Box<Decompress>>,
    now_ms: u64,
) -> Option<Event<'a>> {
    read_event::<T, true>(c, inb, limits, inflater, now_ms)
}

/// [`next_event`], with the short path for small messages (`SHORT`) or without it: the
/// tests hold both to the same events.
#[inline(always)]
pub(super) fn read_event<'a, T, const SHORT: bool>(
    c: &mut Conn<T>,
    inb: &'a mut Inbound,
    limits: &Limits,
    inflater: &mut Option<Box<Decompress>>,
    now_ms: u64,
) -> Option<Event<'a>> {
    // Found first, borrowed after: a borrow returned from inside the loop would hold the
    // buffer for every later iteration too.
    let short = if SHORT {
        small_message(c, inb, limits, now_ms)
    } else {
        None
    };
    let found = match short {
        Some((Found::Message { text: true, at }, true)) => {
            // SAFETY: ASCII is UTF-8 (`unmask_ascii` looked at every byte).
            let t = unsafe { std::str::from_utf8_unchecked(&inb.buf[at]) };
            return Some(Event::Text(Cow::Borrowed(t)));
        }
        Some((f, _)) => f,
        None => next_found(c, inb, limits, inflater, now_ms)?,
    };
    // Text is checked for UTF-8 here, once (SIMD for the common unfragmented message).
    if let Found::Message { text: true, at } = &found {
        if let Some(t) = utf8(&inb.buf[at.clone()]) {
            return Some(Event::Text(Cow::Borrowed(t)));
        }
    }
    let text = match found {
        Found::Message { text: false, at } => {
            return Some(Event::Binary(Cow::Borrowed(&inb.buf[at])))
        }
        Found::Owned { text: false, data } => return Some(Event::Binary(Cow::Owned(data))),
        Found::Ping(at) => return Some(Event::Ping(&inb.buf[at])),
        Found::Event(ev) => return Some(ev),
        Found::Message { text: true, at } => utf8(&inb.buf[at]).map(Cow::Borrowed).ok_or(()),
        Found::Owned { text: true, data } => String::from_utf8(data).map(Cow::Owned).map_err(drop),
    };
    match text {
        Ok(t) => Some(Event::Text(t)),
        Err(()) => match violation(c, code::INVALID_PAYLOAD, NOT_UTF8, false)? {
            Found::Event(ev) => Some(ev),
            _ => unreachable!("a violation borrows nothing"),
        },
    }
}

/// `b` as text if it is UTF-8. A short message is most often ASCII, which a word-at-a-time
/// check answers before the validator's per-byte state machine (SIMD needs 64 bytes, below
/// which simdutf8 runs the standard library's check).
#[inline(always)]
fn utf8(b: &[u8]) -> Option<&str> {
    if b.len() < 64 && b.is_ascii() {
        // SAFETY: ASCII is UTF-8.
        return Some(unsafe { std::str::from_utf8_unchecked(b) });
    }
    simdutf8::basic::from_utf8(b).ok()
}

/// The common frame, taken without the general parse: a whole, unfragmented, uncompressed,
/// masked text (or, when taken, binary) message under 126 bytes, on an open connection with
/// no fragment or skip pending. Anything else (or too few bytes) is left to [`next_found`],
/// which would accept this frame the same way: `check_header` passes it, `on_frame` returns
/// it as one [`Found::Message`]. With it, whether the payload is all ASCII (found while
/// unmasking it).
#[inline(always)]
fn small_message<T>(
    c: &mut Conn<T>,
    inb: &mut Inbound,
    limits: &Limits,
    now_ms: u64,
) -> Option<(Found, bool)> {
    const TEXT: u8 = 0x81; // FIN, no RSV bit, opcode 1
    const BINARY: u8 = 0x82;
    if inb.skip != 0 || inb.frag.is_some() || c.flags.has(Flags::DISCARD_INPUT) {
        return None;
    }
    let p = inb.pending();
    let (&b0, &b1) = (p.first()?, p.get(1)?);
    let len = (b1 & 0x7f) as usize;
    let kind_ok = b0 == TEXT || (b0 == BINARY && limits.binary);
    if !kind_ok || b1 & 0x80 == 0 || len >= 126 || len > limits.max_message_bytes {
        return None;
    }
    if p.len() < 6 + len || !c.state.is_open() {
        return None;
    }
    let mask = [p[2], p[3], p[4], p[5]];
    let s = inb.start + 6;
    let e = s + len;
    inb.start = e;
    let ascii = frame::unmask_ascii(&mut inb.buf[s..e], mask);
    c.touch(now_ms);
    c.flags.clear(Flags::PING_OUTSTANDING);
    let found = Found::Message {
        text: b0 == TEXT,
        at: s..e,
    };
    Some((found, ascii))
}

/// What [`next_event`] found, by position in the read buffer.
enum Found {
    /// A message at `inb.buf[at]`.
    Message { text: bool, at: Range<usize> },
    /// A message reassembled or inflated.
    Owned { text: bool, data: Vec<u8> },
    /// A ping with its payload at `inb.buf[at]`.
    Ping(Range<usize>),
    /// An event that borrows nothing.
    Event(Event<'static>),
}

#[inline]
fn next_found<T>(
    c: &mut Conn<T>,
    inb: &mut Inbound,
    limits: &Limits,
    inflater: &mut Option<Box<Decompress>>,
    now_ms: u64,
) -> Option<Found> {
    loop {
        if c.flags.has(Flags::DISCARD_INPUT) {
            inb.start = inb.end;
            return None;
        }
        if inb.skip > 0 {
            let n = inb.skip.min((inb.end - inb.start) as u64);
            inb.start += n as usize;
            inb.skip -= n;
            if inb.skip > 0 {
                return None;
            }
            continue;
        }
        let (h, hl) = match frame::parse_header(inb.pending()) {
            Ok(Some(x)) => x,
            Ok(None) => {
                if inb.buf.len() - inb.start < frame::MAX_HEADER_LEN {
                    inb.compact();
                }
                return None;
            }
            Err(e) => {
                // The frame boundary is lost: nothing after this can be parsed.
                let ev = violation(c, code::PROTOCOL_ERROR, frame_error_reason(e), false);
                c.flags.set(Flags::DISCARD_INPUT);
                match ev {
                    Some(ev) => return Some(ev),
                    None => continue,
                }
            }
        };
        let total = hl as u64 + h.payload_len;
        if let Err((close_code, reason)) = check_header(c, limits, &h, inb.frag.as_ref()) {
            inb.skip = total;
            // A malformed close is still the peer's close; after any other offending frame
            // parsing goes on, for the peer's close frame.
            let peer_closed = h.opcode == OpCode::Control(Control::Close);
            match violation(c, close_code, reason, peer_closed) {
                Some(ev) => return Some(ev),
                None => continue,
            }
        }
        if c.state == ConnState::Closing && matches!(h.opcode, OpCode::Data(_)) {
            inb.skip = total; // data after a close is discarded unread
            continue;
        }
        let total = total as usize;
        if inb.end - inb.start < total {
            inb.reserve_total(total);
            return None;
        }
        let (s, e) = (inb.start + hl, inb.start + total);
        inb.start += total;
        if let Some(mask) = h.mask {
            frame::apply_mask(&mut inb.buf[s..e], mask, 0);
        }
        c.touch(now_ms);
        c.flags.clear(Flags::PING_OUTSTANDING);
        if let Some(ev) = on_frame(c, &h, s, e, inb, limits, inflater) {
            return Some(ev);
        }
    }
}

/// A protocol violation: the event that makes the router close with `close_code`, or none
/// when our close frame is out already (then input is discarded). `peer_closed`: the
/// offending frame was the peer's close, which completes the closing handshake once our
/// answer is written (RFC 6455 §5.5.1, §7.1.1).
#[cold]
fn violation<T>(
    c: &mut Conn<T>,
    close_code: u16,
    reason: &'static str,
    peer_closed: bool,
) -> Option<Found> {
    if peer_closed {
        c.flags.set(Flags::CLOSE_RECEIVED | Flags::DISCARD_INPUT);
    }
    if c.flags.has(Flags::CLOSE_SENT) && !peer_closed {
        c.flags.set(Flags::DISCARD_INPUT);
        return None;
    }
    Some(Found::Event(Event::Violation {
        code: close_code,
        reason,
        peer_closed,
    }))
}

/// Rejects frames that break RFC 6455 or our limits before their payload is read.
#[inline]
fn check_header<T>(
    c: &Conn<T>,
    limits: &Limits,
    h: &FrameHeader,
    frag: Option<&Fragment>,
) -> Result<(), (u16, &'static str)> {
    let p = code::PROTOCOL_ERROR;
    if h.rsv != 0 {
        // permessage-deflate: RSV1 marks a compressed message, on its first frame only.
        let first_data = matches!(h.opcode, OpCode::Data(Data::Text | Data::Binary));
        if !c.flags.has(Flags::DEFLATE) {
            return Err((p, "reserved bits set without a negotiated extension"));
        }
        if h.rsv != 0b100 || !first_data {
            return Err((
                p,
                "reserved bits set (only RSV1, on a message's first frame)",
            ));
        }
    }
    if h.mask.is_none() {
        return Err((p, "client frames must be masked"));
    }
    match h.opcode {
        OpCode::Data(Data::Reserved(_)) | OpCode::Control(Control::Reserved(_)) => {
            return Err((p, "reserved opcode"))
        }
        OpCode::Control(_) => {
            if !h.fin {
                return Err((p, "fragmented control frame"));
            }
            if h.payload_len > frame::MAX_CONTROL_PAYLOAD as u64 {
                return Err((p, "control frame payload over 125 bytes"));
            }
        }
        OpCode::Data(d) => {
            if c.state == ConnState::Closing {
                return Ok(()); // discarded anyway; only sizes matter
            }
            match (d, frag) {
                (Data::Continue, None) => {
                    return Err((p, "continuation frame without a message to continue"))
                }
                (Data::Text | Data::Binary, Some(_)) => {
                    return Err((p, "new data frame before the fragmented message finished"))
                }
                (Data::Binary, None) if !limits.binary => {
                    return Err((
                        code::UNSUPPORTED_DATA,
                        "binary messages are not supported; send JSON text",
                    ))
                }
                _ => {}
            }
            let so_far = frag.map_or(0, |f| f.data.len()) as u64;
            if h.payload_len + so_far > limits.max_message_bytes as u64 {
                return Err((code::TOO_BIG, "message over --max-message-bytes"));
            }
        }
    }
    Ok(())
}

/// A whole frame, payload at `inb.buf[s..e]` (unmasked).
#[inline]
fn on_frame<T>(
    c: &mut Conn<T>,
    h: &FrameHeader,
    s: usize,
    e: usize,
    inb: &mut Inbound,
    limits: &Limits,
    inflater: &mut Option<Box<Decompress>>,
) -> Option<Found> {
    let open = c.state.is_open();
    match h.opcode {
        OpCode::Control(Control::Ping) if open => Some(Found::Ping(s..e)),
        OpCode::Control(Control::Ping) | OpCode::Control(Control::Pong) => None,
        OpCode::Control(Control::Close) => on_close_frame(c, &inb.buf[s..e]),
        OpCode::Control(Control::Reserved(_)) | OpCode::Data(Data::Reserved(_)) => {
            unreachable!("rejected by check_header")
        }
        OpCode::Data(_) if !open => None, // closing: data is discarded
        OpCode::Data(d @ (Data::Text | Data::Binary)) => {
            let text = d == Data::Text;
            let compressed = h.rsv != 0;
            if h.fin && compressed {
                let data = inflate(c, &inb.buf[s..e], limits, inflater);
                return complete(c, text, data);
            }
            if h.fin {
                // The common case: one frame, borrowed from the read buffer.
                return Some(Found::Message { text, at: s..e });
            }
            let mut f = Fragment {
                text,
                data: inb.buf[s..e].to_vec(),
                utf8_valid: 0,
                compressed,
            };
            if text && !compressed && !advance_utf8(&mut f) {
                return violation(c, code::INVALID_PAYLOAD, NOT_UTF8, false);
            }
            inb.frag = Some(f);
            None
        }
        OpCode::Data(Data::Continue) => {
            let Some(f) = inb.frag.as_mut() else {
                unreachable!("rejected by check_header")
            };
            f.data.extend_from_slice(&inb.buf[s..e]);
            if f.text && !f.compressed && !advance_utf8(f) {
                return violation(c, code::INVALID_PAYLOAD, NOT_UTF8, false);
            }
            if !h.fin {
                return None;
            }
            let f = inb.frag.take().expect("checked above");
            if f.compressed {
                let data = inflate(c, &f.data, limits, inflater);
                return complete(c, f.text, data);
            }
            if f.text && f.utf8_valid != f.data.len() {
                let why = "text message ends inside a UTF-8 character";
                return violation(c, code::INVALID_PAYLOAD, why, false);
            }
            complete(c, f.text, Ok(f.data))
        }
    }
}

const NOT_UTF8: &str = "text message is not valid UTF-8";

/// A message reassembled or inflated (or why it failed); text is checked for UTF-8 by
/// [`next_event`].
fn complete<T>(
    c: &mut Conn<T>,
    text: bool,
    data: Result<Vec<u8>, (u16, &'static str)>,
) -> Option<Found> {
    match data {
        Ok(data) => Some(Found::Owned { text, data }),
        Err((close_code, reason)) => violation(c, close_code, reason, false),
    }
}

/// A compressed message inflated, bounded by `--max-message-bytes` (a deflate bomb gets
/// 1009).
fn inflate<T>(
    c: &mut Conn<T>,
    data: &[u8],
    limits: &Limits,
    shared: &mut Option<Box<Decompress>>,
) -> Result<Vec<u8>, (u16, &'static str)> {
    use crate::ws::deflate::{self, InflateError};
    let max = limits.max_message_bytes;
    let inflated = if c.extra().is_some_and(|e| e.deflate_takeover) {
        let d = c.extra_mut().inflater.get_or_insert_with(deflate::inflater);
        deflate::inflate(d, data, max)
    } else {
        let d = shared.get_or_insert_with(deflate::inflater);
        d.reset(false);
        deflate::inflate(d, data, max)
    };
    inflated.map_err(|e| match e {
        InflateError::TooBig => (
            code::TOO_BIG,
            "message over --max-message-bytes once inflated",
        ),
        InflateError::Corrupt => (code::INVALID_PAYLOAD, "invalid compressed data"),
    })
}

/// The peer's close frame: checked, and the answer that echoes its code and reason.
fn on_close_frame<T>(c: &mut Conn<T>, payload: &[u8]) -> Option<Found> {
    let (close_code, reply) = match payload.len() {
        0 => (
            code::NO_STATUS,
            frame::encode(OpCode::Control(Control::Close), &[]),
        ),
        1 => {
            let why = "close frame with a 1-byte payload";
            return violation(c, code::PROTOCOL_ERROR, why, true);
        }
        _ => {
            let n = u16::from_be_bytes([payload[0], payload[1]]);
            if !code::is_valid_received(n) {
                return violation(c, code::PROTOCOL_ERROR, "invalid close code", true);
            }
            let Ok(reason) = std::str::from_utf8(&payload[2..]) else {
                let why = "close reason is not valid UTF-8";
                return violation(c, code::INVALID_PAYLOAD, why, true);
            };
            // Ours when the peer gave none.
            let reason = if reason.is_empty() {
                "closed by the client"
            } else {
                reason
            };
            (n, frame::encode_close(n, reason))
        }
    };
    c.flags.set(Flags::CLOSE_RECEIVED | Flags::DISCARD_INPUT);
    if c.flags.has(Flags::CLOSE_SENT) {
        return Some(Found::Event(Event::CloseAnswered));
    }
    Some(Found::Event(Event::Close {
        code: close_code,
        reply,
    }))
}

fn advance_utf8(f: &mut Fragment) -> bool {
    match utf8::check(&f.data, f.utf8_valid) {
        utf8::Utf8Check::Partial { valid_up_to } => {
            f.utf8_valid = valid_up_to;
            true
        }
        utf8::Utf8Check::Invalid => false,
    }
}

fn frame_error_reason(e: frame::FrameError) -> &'static str {
    match e {
        frame::FrameError::LengthMsb => "invalid payload length",
    }
}
