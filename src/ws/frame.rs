//! RFC 6455 frame header parsing and frame encoding on tungstenite's `OpCode` types.
//!
//! Parsing works on a borrowed byte slice and never allocates: the connection hands in what
//! it has read and gets back either a header (with its length) or "need more bytes".
//! Encoding writes server frames (never masked) so one encoded frame can be shared by every
//! recipient of a fan-out.

use bytes::{BufMut, Bytes, BytesMut};
pub use tungstenite::protocol::frame::coding::{CloseCode, Control, Data, OpCode};

/// Largest header: 2 bytes + 8 bytes extended length + 4 bytes mask.
pub const MAX_HEADER_LEN: usize = 14;
/// Control frames carry at most 125 payload bytes (RFC 6455 §5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A parsed frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// FIN bit: last fragment of a message.
    pub fin: bool,
    /// RSV1..3 as the low three bits.
    pub rsv: u8,
    /// Opcode (reserved values are reported, not rejected, here).
    pub opcode: OpCode,
    /// Masking key, present on every client frame.
    pub mask: Option<[u8; 4]>,
    /// Payload length in bytes.
    pub payload_len: u64,
}

/// Why a header could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The 64-bit length had its most significant bit set (RFC 6455 §5.2).
    #[error("payload length has the most significant bit set")]
    LengthMsb,
}

/// Parses a frame header from the start of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed, else the header and the header length.
#[inline]
pub fn parse_header(buf: &[u8]) -> Result<Option<(FrameHeader, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let b0 = buf[0];
    let b1 = buf[1];
    let masked = b1 & 0x80 != 0;
    let len7 = b1 & 0x7f;
    let (payload_len, mut pos) = match len7 {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as u64, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len >> 63 != 0 {
                return Err(FrameError::LengthMsb);
            }
            (len, 10)
        }
        n => (n as u64, 2),
    };
    let mask = if masked {
        if buf.len() < pos + 4 {
            return Ok(None);
        }
        let m = [buf[pos], buf[pos + 1], buf[pos + 2], buf[pos + 3]];
        pos += 4;
        Some(m)
    } else {
        None
    };
    Ok(Some((
        FrameHeader {
            fin: b0 & 0x80 != 0,
            rsv: (b0 >> 4) & 0x07,
            opcode: OpCode::from(b0 & 0x0f),
            mask,
            payload_len,
        },
        pos,
    )))
}

/// XORs `buf` with the masking key, `offset` bytes into the payload.
#[inline]
pub fn apply_mask(buf: &mut [u8], mask: [u8; 4], offset: usize) {
    let mut m = [0u8; 4];
    for (i, b) in m.iter_mut().enumerate() {
        *b = mask[(offset + i) % 4];
    }
    let word = u32::from_ne_bytes(m);
    let mut chunks = buf.chunks_exact_mut(4);
    for c in &mut chunks {
        let v = u32::from_ne_bytes([c[0], c[1], c[2], c[3]]) ^ word;
        c.copy_from_slice(&v.to_ne_bytes());
    }
    for (i, b) in chunks.into_remainder().iter_mut().enumerate() {
        *b ^= m[i];
    }
}

/// [`apply_mask`] for a whole payload, eight bytes at a time, and whether the result is all
/// ASCII: the check rides on the words just written (reading them back after narrower
/// stores would stall on store forwarding).
#[inline(always)]
pub fn unmask_ascii(buf: &mut [u8], mask: [u8; 4]) -> bool {
    let [a, b, c, d] = mask;
    let word = u64::from_ne_bytes([a, b, c, d, a, b, c, d]);
    let mut seen = 0u64;
    let mut chunks = buf.chunks_exact_mut(8);
    for w in &mut chunks {
        let v = u64::from_ne_bytes(w.try_into().expect("8 bytes")) ^ word;
        w.copy_from_slice(&v.to_ne_bytes());
        seen |= v;
    }
    let mut last = 0u8;
    for (i, x) in chunks.into_remainder().iter_mut().enumerate() {
        *x ^= mask[i % 4];
        last |= *x;
    }
    (seen & 0x8080_8080_8080_8080) == 0 && last & 0x80 == 0
}

/// Length of the header a server frame with `payload_len` bytes needs.
#[inline(always)]
pub fn header_len(payload_len: usize) -> usize {
    match payload_len {
        0..=125 => 2,
        126..=65535 => 4,
        _ => 10,
    }
}

/// Writes an unmasked header for a final frame of `opcode` with `payload_len` bytes.
#[inline]
pub fn put_header(out: &mut impl BufMut, opcode: OpCode, payload_len: usize) {
    out.put_u8(0x80 | u8::from(opcode));
    match payload_len {
        0..=125 => out.put_u8(payload_len as u8),
        126..=65535 => {
            out.put_u8(126);
            out.put_u16(payload_len as u16);
        }
        _ => {
            out.put_u8(127);
            out.put_u64(payload_len as u64);
        }
    }
}

/// An unmasked header for a final frame of `opcode` with `payload_len` bytes, padded to
/// [`MAX_HEADER_LEN`]; its first [`header_len`] bytes are the header.
#[inline(always)]
pub fn server_header(opcode: OpCode, payload_len: usize) -> [u8; MAX_HEADER_LEN] {
    let mut h = [0u8; MAX_HEADER_LEN];
    h[0] = 0x80 | u8::from(opcode);
    match payload_len {
        0..=125 => h[1] = payload_len as u8,
        126..=65535 => {
            h[1] = 126;
            h[2..4].copy_from_slice(&(payload_len as u16).to_be_bytes());
        }
        _ => {
            h[1] = 127;
            h[2..10].copy_from_slice(&(payload_len as u64).to_be_bytes());
        }
    }
    h
}

/// Encodes one complete server frame.
pub fn encode(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(header_len(payload.len()) + payload.len());
    put_header(&mut out, opcode, payload.len());
    out.put_slice(payload);
    out.freeze()
}

/// Encodes a close frame with `code` and a reason cut to fit a control frame.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let mut cut = reason.len().min(MAX_CONTROL_PAYLOAD - 2);
    while !reason.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    payload[..2].copy_from_slice(&code.to_be_bytes());
    payload[2..2 + cut].copy_from_slice(&reason.as_bytes()[..cut]);
    encode(OpCode::Control(Control::Close), &payload[..2 + cut])
}

#[cfg(test)]
mod tests {
    #[test]
    fn unmask_ascii_unmasks_as_apply_mask_does_and_sees_any_high_bit() {
        let mask = [0x37, 0xfa, 0x21, 0x3d];
        for len in 0usize..40 {
            for high in [None, Some(0), Some(len / 2), Some(len.saturating_sub(1))] {
                let mut plain: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
                if let (Some(h), true) = (high, len > 0) {
                    plain[h] = 0xc3;
                }
                let mut masked = plain.clone();
                super::apply_mask(&mut masked, mask, 0);
                let ascii = super::unmask_ascii(&mut masked, mask);
                assert_eq!(masked, plain, "len {len}");
                assert_eq!(ascii, plain.is_ascii(), "len {len} high {high:?}");
            }
        }
    }

    use super::*;

    fn client_frame(opcode: u8, fin: bool, payload: &[u8], mask: [u8; 4]) -> Vec<u8> {
        let mut v = Vec::new();
        let first = (if fin { 0x80 } else { 0 }) | opcode;
        crate::testkit::put_frame(&mut v, first, payload, Some(mask));
        v
    }

    #[test]
    fn parses_in_pieces() {
        for len in [0usize, 5, 125, 126, 300, 65535, 65536, 70000] {
            let payload: Vec<u8> = (0..len).map(|i| i as u8).collect();
            let bytes = client_frame(0x1, true, &payload, [1, 2, 3, 4]);
            let expected_hl = header_len(len) + 4;
            for cut in 0..expected_hl {
                assert_eq!(parse_header(&bytes[..cut]), Ok(None), "len {len} cut {cut}");
            }
            let (h, hl) = parse_header(&bytes).unwrap().unwrap();
            assert_eq!(hl, expected_hl);
            assert!(h.fin);
            assert_eq!(h.opcode, OpCode::Data(Data::Text));
            assert_eq!(h.payload_len, len as u64);
            let mut body = bytes[hl..].to_vec();
            apply_mask(&mut body, h.mask.unwrap(), 0);
            assert_eq!(body, payload);
        }
    }

    #[test]
    fn unmask_with_offset_matches_whole() {
        let data: Vec<u8> = (0..103u8).collect();
        let mask = [9, 8, 7, 6];
        let mut whole = data.clone();
        apply_mask(&mut whole, mask, 0);
        let mut pieces = data.clone();
        let (a, b) = pieces.split_at_mut(37);
        apply_mask(a, mask, 0);
        apply_mask(b, mask, 37);
        assert_eq!(whole, pieces);
    }

    #[test]
    fn reports_reserved_bits_and_opcodes() {
        let (h, _) = parse_header(&[0xF3, 0x80, 0, 0, 0, 0]).unwrap().unwrap();
        assert_eq!(h.rsv, 0b111);
        assert_eq!(h.opcode, OpCode::Data(Data::Reserved(3)));
        let (h, _) = parse_header(&[0x0B, 0x00]).unwrap().unwrap();
        assert!(!h.fin);
        assert!(h.mask.is_none());
        assert_eq!(h.opcode, OpCode::Control(Control::Reserved(0xB)));
    }

    #[test]
    fn rejects_length_msb() {
        let mut b = vec![0x82, 0xFF];
        b.extend_from_slice(&(1u64 << 63).to_be_bytes());
        assert_eq!(parse_header(&b), Err(FrameError::LengthMsb));
    }

    #[test]
    fn encodes_every_length_class() {
        for len in [0usize, 125, 126, 65535, 65536] {
            let payload = vec![b'x'; len];
            let f = encode(OpCode::Data(Data::Text), &payload);
            let (h, hl) = parse_header(&f).unwrap().unwrap();
            assert_eq!((h.payload_len as usize, hl), (len, header_len(len)));
            assert!(h.mask.is_none() && h.fin);
            assert_eq!(&f[hl..], &payload[..]);
        }
    }

    #[test]
    fn close_reason_is_cut_on_char_boundary() {
        let reason = "é".repeat(100);
        let f = encode_close(4000, &reason);
        let (h, hl) = parse_header(&f).unwrap().unwrap();
        assert!(h.payload_len as usize <= MAX_CONTROL_PAYLOAD);
        assert_eq!(&f[hl..hl + 2], &4000u16.to_be_bytes());
        assert!(std::str::from_utf8(&f[hl + 2..]).is_ok());
    }
}
