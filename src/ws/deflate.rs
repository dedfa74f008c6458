//! permessage-deflate (RFC 7692): the offer we accept, and deflate/inflate of whole messages.
//!
//! The server never keeps compression context between messages (it always answers
//! `server_no_context_takeover`). So a message fanned out to many connections is compressed
//! once, and one compressor per shard and window size serves every connection. A client that
//! agrees to `client_no_context_takeover` is inflated with the shard's one inflater. A client
//! that keeps its context (browsers do) needs its own inflater, which lives as long as the
//! connection.

use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

/// What was agreed with one client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The client compresses each message on its own: one shared inflater will do.
    pub client_no_context_takeover: bool,
    /// Our LZ77 window (9..=15): what the client asked with `server_max_window_bits`.
    pub server_window_bits: u8,
    /// The client asked for `server_max_window_bits` (then the answer repeats it).
    pub server_window_asked: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the 101.
    pub fn response(&self) -> String {
        let mut s = String::from("permessage-deflate; server_no_context_takeover");
        if self.client_no_context_takeover {
            s.push_str("; client_no_context_takeover");
        }
        if self.server_window_asked {
            s.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_window_bits
            ));
        }
        s
    }
}

/// The first acceptable permessage-deflate offer in a `Sec-WebSocket-Extensions` value
/// (every occurrence of the header joined with `, `; RFC 7692 §5, §7.1): an offer with an
/// unknown, repeated or invalid parameter is skipped, and so is `server_max_window_bits=8`
/// (zlib's raw deflate has no 256-byte window).
pub fn negotiate(extensions: &str) -> Option<Agreed> {
    extensions.split(',').find_map(parse_offer)
}

fn parse_offer(offer: &str) -> Option<Agreed> {
    let mut parts = offer.split(';').map(str::trim);
    if !parts.next()?.eq_ignore_ascii_case("permessage-deflate") {
        return None;
    }
    let mut a = Agreed {
        client_no_context_takeover: false,
        server_window_bits: 15,
        server_window_asked: false,
    };
    let (mut snct, mut cmwb) = (false, false);
    for p in parts {
        let (name, value) = match p.split_once('=') {
            Some((n, v)) => (n.trim(), Some(v.trim().trim_matches('"'))),
            None => (p, None),
        };
        let bits = |v: Option<&str>| -> Option<u8> {
            v?.parse::<u8>().ok().filter(|b| (8..=15).contains(b))
        };
        match name.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" if value.is_none() && !snct => snct = true,
            "client_no_context_takeover" if value.is_none() && !a.client_no_context_takeover => {
                a.client_no_context_takeover = true
            }
            "server_max_window_bits" if !a.server_window_asked => {
                a.server_window_bits = bits(value)?;
                a.server_window_asked = true;
            }
            "client_max_window_bits" if !cmwb => {
                // Ours to cap, not to follow: the inflater takes any window up to 15.
                if value.is_some() {
                    bits(value)?;
                }
                cmwb = true;
            }
            _ => return None,
        }
    }
    (a.server_window_bits >= 9).then_some(a)
}

/// Why a compressed message could not be inflated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates to more than the limit (a deflate bomb, or just too big).
    #[error("message over --max-message-bytes once inflated")]
    TooBig,
    /// Not a valid deflate stream.
    #[error("invalid compressed data")]
    Corrupt,
}

/// An inflater for raw deflate with any window.
pub fn inflater() -> Box<Decompress> {
    Box::new(Decompress::new_with_window_bits(false, 15))
}

/// Inflates one message (`data` as sent, without the `00 00 ff ff` tail RFC 7692 §7.2.2
/// removes), stopping at `max` bytes of output. `d` keeps its context (the caller resets it
/// for a client without context takeover).
pub fn inflate(d: &mut Decompress, data: &[u8], max: usize) -> Result<Vec<u8>, InflateError> {
    const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];
    let mut out = Vec::with_capacity((data.len() * 4).clamp(64, max.max(64)));
    for input in [data, &TAIL[..]] {
        let mut pos = 0;
        loop {
            if out.len() == out.capacity() {
                if out.len() >= max {
                    return Err(InflateError::TooBig);
                }
                out.reserve(out.len().clamp(1024, max - out.len()));
            }
            let (before_in, before_out) = (d.total_in(), d.total_out());
            let st = d
                .decompress_vec(&input[pos..], &mut out, FlushDecompress::Sync)
                .map_err(|_| InflateError::Corrupt)?;
            let consumed = (d.total_in() - before_in) as usize;
            pos += consumed;
            if out.len() > max {
                return Err(InflateError::TooBig);
            }
            if st == Status::StreamEnd {
                // A final block (BFINAL): the message is complete; a next one starts over.
                d.reset(false);
                return Ok(out);
            }
            let room = out.len() < out.capacity();
            if pos == input.len() && room {
                break;
            }
            if consumed == 0 && d.total_out() == before_out && room {
                return Err(InflateError::Corrupt); // no progress with room to spare
            }
        }
    }
    Ok(out)
}

/// A shard's compressors, one per window size, reset per message, and the last message
/// compressed (a fan-out compresses once).
#[derive(Default)]
pub struct Deflater {
    by_bits: [Option<Box<Compress>>; 7],
    /// The last payload (held, so its address cannot be reused by another while cached),
    /// its window, whether it was compressed whatever the gain, and what it compressed to.
    last: Option<(Bytes, u8, bool, Option<Bytes>)>,
}

impl Deflater {
    /// `payload` compressed for a `bits` window, or `None` when that does not make it
    /// smaller (then it goes out as it is) unless `always`.
    pub fn compress(&mut self, payload: &Bytes, bits: u8, always: bool) -> Option<Bytes> {
        if let Some((p, b, a, out)) = &self.last {
            let same = p.as_ptr() == payload.as_ptr() && p.len() == payload.len();
            if same && (*b, *a) == (bits, always) {
                return out.clone();
            }
        }
        let asked = bits;
        let bits = bits.clamp(9, 15);
        let c = self.by_bits[(bits - 9) as usize].get_or_insert_with(|| {
            Box::new(Compress::new_with_window_bits(
                Compression::fast(),
                false,
                bits,
            ))
        });
        c.reset();
        let mut out = Vec::with_capacity(payload.len() / 2 + 64);
        let mut pos = 0;
        let ok = loop {
            if out.len() == out.capacity() {
                out.reserve(out.capacity().max(64));
            }
            let before = c.total_in();
            if c.compress_vec(&payload[pos..], &mut out, FlushCompress::Sync)
                .is_err()
            {
                break false;
            }
            pos += (c.total_in() - before) as usize;
            if pos == payload.len() && out.len() < out.capacity() {
                break true;
            }
        };
        // A sync flush ends in 00 00 ff ff, which the receiver adds back (RFC 7692 §7.2.1).
        let smaller = always || out.len() - 4 < payload.len();
        let out = (ok && out.ends_with(&[0, 0, 0xff, 0xff]) && smaller).then(|| {
            out.truncate(out.len() - 4);
            Bytes::from(out)
        });
        self.last = Some((payload.clone(), asked, always, out.clone()));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offers_are_parsed_as_rfc_7692_says() {
        let a = negotiate("permessage-deflate; client_max_window_bits").unwrap();
        assert_eq!(
            a.response(),
            "permessage-deflate; server_no_context_takeover",
            "a browser's offer"
        );
        assert!(!a.client_no_context_takeover);
        let a = negotiate(
            "permessage-deflate; client_no_context_takeover; server_max_window_bits=\"10\"",
        )
        .unwrap();
        assert_eq!(
            a.response(),
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
        );
        assert_eq!(a.server_window_bits, 10);
        // Bad offers are skipped for the next one.
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=8",
            "permessage-deflate; client_max_window_bits=7",
            "permessage-deflate; x=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_no_context_takeover=1",
            "x-webkit-deflate-frame",
        ] {
            assert_eq!(negotiate(bad), None, "{bad}");
            let next = format!("{bad}, permessage-deflate");
            assert!(negotiate(&next).is_some(), "{bad}");
        }
        assert_eq!(negotiate("foo, bar; baz"), None);
    }

    #[test]
    fn messages_round_trip_and_a_bomb_stops_at_the_limit() {
        let mut d = Deflater::default();
        let text = Bytes::from("{\"op\":\"msg\",\"data\":\"hello hello hello hello\"}".repeat(50));
        for bits in [9, 12, 15] {
            let z = d.compress(&text, bits, false).expect("smaller");
            assert!(z.len() < text.len() / 5, "{} of {}", z.len(), text.len());
            let again = d.compress(&text, bits, false).unwrap();
            assert_eq!(
                again.as_ptr(),
                z.as_ptr(),
                "the fan-out shares one compression"
            );
            let mut i = inflater();
            assert_eq!(inflate(&mut i, &z, 1 << 20).unwrap(), &text[..]);
        }
        // Context takeover on the client's side: the second message refers to the first.
        let mut c = Compress::new_with_window_bits(Compression::default(), false, 15);
        let mut i = inflater();
        for _ in 0..3 {
            let mut z = Vec::with_capacity(4096);
            c.compress_vec(&text, &mut z, FlushCompress::Sync).unwrap();
            z.truncate(z.len() - 4);
            assert_eq!(inflate(&mut i, &z, 1 << 20).unwrap(), &text[..]);
        }
        // 10 MB of zeros compress 50-fold and more; inflating stops at the limit.
        let zeros = Bytes::from(vec![0u8; 10 << 20]);
        let z = d.compress(&zeros, 15, false).unwrap();
        assert!(z.len() < 200_000, "{}", z.len());
        assert_eq!(
            inflate(&mut inflater(), &z, 65_536),
            Err(InflateError::TooBig)
        );
        assert_eq!(
            inflate(&mut inflater(), &[0xff, 0xff, 0xff, 0x00], 65_536),
            Err(InflateError::Corrupt)
        );
        // Empty and incompressible payloads go out as they are.
        assert_eq!(d.compress(&Bytes::from_static(b"ab"), 15, false), None);
        let always = d.compress(&Bytes::from_static(b"ab"), 15, true).unwrap();
        assert_eq!(inflate(&mut inflater(), &always, 10).unwrap(), b"ab");
        assert_eq!(inflate(&mut inflater(), &[0x00], 10).unwrap(), b"");
    }
}
