//! permessage-deflate (RFC 7692) against the real binary: negotiation, compressed messages
//! both ways, one compression shared by a fan-out, a deflate bomb, and RSV bits misused.

mod common;

use std::io::Write;

use common::*;
use flate2::{Compress, Compression, FlushCompress};
use serde_json::{json, Value};
use switchboard::ws::deflate;

/// Upgrades with `Sec-WebSocket-Extensions: offer`; returns the connection and the 101 head.
fn upgrade_offering(server: &Server, path: &str, offer: &str) -> (Raw, String) {
    let mut r = Raw::connect(server.addr);
    let req = Raw::upgrade_request(path).replace(
        "\r\n\r\n",
        &format!("\r\nSec-WebSocket-Extensions: {offer}\r\n\r\n"),
    );
    r.s.write_all(req.as_bytes()).unwrap();
    let head = r.read_head();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    (r, head)
}

/// `data` compressed as one message (sync flush, the 00 00 ff ff tail removed).
fn compress(c: &mut Compress, data: &[u8]) -> Vec<u8> {
    let start = c.total_in();
    let mut out = Vec::with_capacity(data.len() / 2 + 64);
    loop {
        let pos = (c.total_in() - start) as usize;
        c.compress_vec(&data[pos..], &mut out, FlushCompress::Sync)
            .unwrap();
        if (c.total_in() - start) as usize == data.len() && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity().max(64));
    }
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn fresh() -> Compress {
    Compress::new_with_window_bits(Compression::default(), false, 15)
}

/// The next text message as JSON, inflated when RSV1 says so; and whether it was.
fn read_message(r: &mut Raw) -> (Value, bool) {
    loop {
        let f = r.read_server_frame().expect("a frame");
        if f.opcode == 0x9 {
            continue;
        }
        assert_eq!(f.opcode, 0x1, "a text frame");
        assert!(f.fin);
        let compressed = f.rsv == 0b100;
        let data = if compressed {
            deflate::inflate(&mut deflate::inflater(), &f.payload, 1 << 24).unwrap()
        } else {
            f.payload
        };
        return (serde_json::from_slice(&data).unwrap(), compressed);
    }
}

#[test]
fn negotiated_messages_go_compressed_both_ways_and_small_ones_plain() {
    let server = Server::start(&["--deflate", "--shards", "2"]);
    let offer = "permessage-deflate; client_no_context_takeover; client_max_window_bits";
    let (mut alice, head) = upgrade_offering(&server, "/ws?user=alice", offer);
    assert!(
        head.contains(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover; client_no_context_takeover\r\n"
        ),
        "{head}"
    );
    // A browser's offer keeps the client's context: answered without client_no_context_takeover.
    let (mut bob, head) = upgrade_offering(
        &server,
        "/ws?user=bob",
        "permessage-deflate; client_max_window_bits",
    );
    assert!(
        head.contains(
            "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover\r\n"
        ),
        "{head}"
    );
    assert_eq!(read_message(&mut alice).0["op"], "welcome");
    assert_eq!(read_message(&mut bob).0["op"], "welcome");
    // Bob compresses with context takeover: three messages, each referring to the last.
    let big = "the same words again and again ".repeat(200);
    let mut ctx = fresh();
    for i in 0..3 {
        let m = json!({"op":"send","to":"alice","data":format!("{big}{i}"),"id":i}).to_string();
        let z = compress(&mut ctx, m.as_bytes());
        assert!(z.len() < m.len() / 5);
        bob.send_frame(0xC1, &z, true); // FIN + RSV1 + text
        let (got, compressed) = read_message(&mut alice);
        assert!(compressed, "a large message goes out compressed");
        assert_eq!(got["data"].as_str(), Some(format!("{big}{i}").as_str()));
        let (ack, small_compressed) = read_message(&mut bob);
        assert_eq!(ack["op"], "ack");
        assert!(!small_compressed, "an ack is under --deflate-min-bytes");
    }
    // Alice's side, without context takeover: each message compressed on its own.
    let m = json!({"op":"send","to":"bob","data":big,"id":"a"}).to_string();
    alice.send_frame(0xC1, &compress(&mut fresh(), m.as_bytes()), true);
    assert_eq!(
        read_message(&mut bob).0["data"].as_str(),
        Some(big.as_str())
    );
    // A client that did not offer it gets no extension, and plain frames.
    let mut plain = Raw::upgrade(server.addr, "/ws?user=carol");
    let f = plain.read_server_frame().unwrap();
    assert_eq!(f.rsv, 0);
}

#[test]
fn a_fan_out_shares_one_compression_and_bytes_on_the_wire_shrink() {
    let server = Server::start(&["--deflate", "--shards", "1"]);
    let offer = "permessage-deflate";
    let mut subs: Vec<Raw> = (0..20)
        .map(|i| {
            let (mut r, _) = upgrade_offering(&server, &format!("/ws?user=s{i}"), offer);
            read_message(&mut r);
            r.send_text(r#"{"op":"sub","channel":"news","id":"s"}"#);
            assert_eq!(read_message(&mut r).0["op"], "ack");
            r
        })
        .collect();
    let out_before = server.metric("switchboard_bytes_out_total");
    let data = "{\"headline\":\"compressible news\",\"body\":\"lorem ipsum \"}".repeat(100);
    let body = json!({"channel":"news","data":data}).to_string();
    let (status, answer) = post(server.addr, "/api/publish", &body);
    assert_eq!(status, 200, "{answer}");
    for s in subs.iter_mut() {
        let (m, compressed) = read_message(s);
        assert!(compressed);
        assert_eq!(m["data"].as_str(), Some(data.as_str()));
    }
    let sent = server.metric("switchboard_bytes_out_total") - out_before;
    assert!(
        (sent as usize) < 20 * data.len() / 4,
        "{sent} bytes out for 20 × {} bytes of payload",
        data.len()
    );
}

#[test]
fn a_deflate_bomb_is_closed_1009_and_misused_rsv_bits_1002() {
    let server = Server::start(&["--deflate", "--max-message-bytes", "65536"]);
    let (mut r, _) = upgrade_offering(&server, "/ws?user=bomb", "permessage-deflate");
    read_message(&mut r);
    // 10 MB of spaces inflate from ~10 KB: stopped at 64 KiB.
    let bomb = compress(&mut fresh(), &vec![b' '; 10 << 20]);
    assert!(bomb.len() < 65_536);
    r.send_frame(0xC1, &bomb, true);
    let (code, reason) = r.read_close();
    assert_eq!(code, 1009, "{reason}");
    assert!(reason.contains("once inflated"), "{reason}");

    // RSV1 on a continuation frame, or RSV2, is a protocol error even when negotiated.
    let (mut r, _) = upgrade_offering(&server, "/ws?user=rsv", "permessage-deflate");
    read_message(&mut r);
    r.send_frame(0x01, b"{\"op\":", true);
    r.send_frame(0xC0, b"\"ping\"}", true);
    assert_eq!(r.read_close().0, 1002);
    let (mut r, _) = upgrade_offering(&server, "/ws?user=rsv2", "permessage-deflate");
    read_message(&mut r);
    r.send_frame(0xA1, b"{}", true);
    assert_eq!(r.read_close().0, 1002);
    // Garbage marked compressed: 1007.
    let (mut r, _) = upgrade_offering(&server, "/ws?user=junk", "permessage-deflate");
    read_message(&mut r);
    r.send_frame(0xC1, &[0xff, 0xff, 0xff, 0xff], true);
    assert_eq!(r.read_close().0, 1007);
    // Without --deflate, an offer is ignored and RSV1 is a protocol error.
    let plain = Server::start(&[]);
    let (mut r, head) = upgrade_offering(&plain, "/ws?user=p", "permessage-deflate");
    assert!(!head.contains("Sec-WebSocket-Extensions"), "{head}");
    read_message(&mut r);
    r.send_frame(0xC1, &compress(&mut fresh(), b"{\"op\":\"ping\"}"), true);
    assert_eq!(r.read_close().0, 1002);
}
