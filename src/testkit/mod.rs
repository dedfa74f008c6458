//! The client side of the wire, in one place: masked client frames, the upgrade request, and
//! HTTP response heads and server frames as a client parses them. Used by the end-to-end
//! tests, the benches, the simulation, the fuzz targets and loadgen (no I/O here).

use crate::ws::frame;

/// The RFC 6455 sample key; its accept value is [`SAMPLE_ACCEPT`].
pub const SAMPLE_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// `Sec-WebSocket-Accept` for [`SAMPLE_KEY`].
pub const SAMPLE_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// Appends one client frame: `first_byte` is FIN | RSV | opcode as sent; the payload is
/// masked with `mask` unless it is `None` (a protocol error from a client).
pub fn put_frame(out: &mut Vec<u8>, first_byte: u8, payload: &[u8], mask: Option<[u8; 4]>) {
    out.push(first_byte);
    let m = if mask.is_some() { 0x80 } else { 0 };
    match payload.len() {
        n @ 0..=125 => out.push(m | n as u8),
        n @ 126..=65535 => {
            out.push(m | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(m | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let start = match mask {
        Some(k) => {
            out.extend_from_slice(&k);
            out.len()
        }
        None => out.len(),
    };
    out.extend_from_slice(payload);
    if let Some(k) = mask {
        frame::apply_mask(&mut out[start..], k, 0);
    }
}

/// One final, masked client frame of `opcode` (0x1 text, 0x2 binary, 0x8 close, 0x9 ping…).
pub fn client_frame(opcode: u8, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
    let mut v = Vec::with_capacity(payload.len() + frame::MAX_HEADER_LEN);
    put_frame(&mut v, 0x80 | opcode, payload, Some(mask));
    v
}

/// A masked text frame (fixed mask).
pub fn text_frame(text: &str) -> Vec<u8> {
    client_frame(0x1, text.as_bytes(), [0x12, 0x34, 0x56, 0x78])
}

/// A masked close frame with `code` and `reason`.
pub fn close_frame(code: u16, reason: &str) -> Vec<u8> {
    let mut p = code.to_be_bytes().to_vec();
    p.extend_from_slice(reason.as_bytes());
    client_frame(0x8, &p, [9, 8, 7, 6])
}

/// A WebSocket upgrade request for `path_and_query` with [`SAMPLE_KEY`].
pub fn upgrade_request(host: &str, path_and_query: &str) -> String {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {SAMPLE_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

/// A parsed HTTP response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// Status code.
    pub status: u16,
    /// Headers in order (names as sent).
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, blank line included.
    pub head_len: usize,
}

impl ResponseHead {
    /// The first header called `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// `Content-Length`, if present and numeric.
    pub fn content_length(&self) -> Option<usize> {
        self.header("content-length")?.trim().parse().ok()
    }
}

/// Why a response head could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed HTTP response head: {0}")]
pub struct ResponseError(pub String);

/// Parses the response head at the start of `buf`; `Ok(None)` when more bytes are needed.
pub fn parse_response_head(buf: &[u8]) -> Result<Option<ResponseHead>, ResponseError> {
    let mut headers = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(buf) {
        Ok(httparse::Status::Partial) => Ok(None),
        Ok(httparse::Status::Complete(n)) => Ok(Some(ResponseHead {
            status: r.code.unwrap_or(0),
            headers: r
                .headers
                .iter()
                .map(|h| {
                    (
                        h.name.to_owned(),
                        String::from_utf8_lossy(h.value).into_owned(),
                    )
                })
                .collect(),
            head_len: n,
        })),
        Err(e) => Err(ResponseError(e.to_string())),
    }
}

/// A frame as a client receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    /// FIN bit.
    pub fin: bool,
    /// Opcode byte (0x1 text, 0x8 close…).
    pub opcode: u8,
    /// Whether the frame was masked (a server must never mask).
    pub masked: bool,
    /// RSV1..3 as the low three bits (RSV1 = 0b100: a permessage-deflate message).
    pub rsv: u8,
    /// Payload (unmasked).
    pub payload: Vec<u8>,
}

/// Takes one complete frame off the front of `buf`; `Ok(None)` when more bytes are needed.
pub fn take_frame(buf: &mut Vec<u8>) -> Result<Option<ServerFrame>, frame::FrameError> {
    let Some((h, hl)) = frame::parse_header(buf)? else {
        return Ok(None);
    };
    let total = hl + h.payload_len as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let mut payload = buf[hl..total].to_vec();
    if let Some(m) = h.mask {
        frame::apply_mask(&mut payload, m, 0);
    }
    buf.drain(..total);
    Ok(Some(ServerFrame {
        fin: h.fin,
        opcode: u8::from(h.opcode),
        masked: h.mask.is_some(),
        rsv: h.rsv,
        payload,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_through_the_server_parser() {
        for len in [0usize, 5, 125, 126, 65535, 65536] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let mut f = client_frame(0x2, &payload, [1, 2, 3, 4]);
            let got = take_frame(&mut f).unwrap().unwrap();
            assert!(got.fin && got.masked && got.opcode == 0x2);
            assert_eq!(got.payload, payload);
            assert!(f.is_empty());
        }
    }

    #[test]
    fn response_heads() {
        let r = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nContent-Length: 0\r\n\r\nxx";
        for cut in 0..r.len() - 2 {
            assert_eq!(parse_response_head(&r[..cut]), Ok(None), "cut {cut}");
        }
        let h = parse_response_head(r).unwrap().unwrap();
        assert_eq!((h.status, h.head_len), (101, r.len() - 2));
        assert_eq!(h.header("UPGRADE"), Some("websocket"));
        assert_eq!(h.content_length(), Some(0));
        assert!(parse_response_head(b"NOPE\r\n\r\n").is_err());
    }
}
