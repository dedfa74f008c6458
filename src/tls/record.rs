//! The TLS record layer after the handshake, ours: rustls does the handshake, then hands over
//! the traffic keys (`dangerous_extract_secrets`, as for kernel TLS) and is dropped. What an
//! established connection keeps is two keys, two IVs and two sequence numbers (about 110
//! bytes) instead of rustls's state and buffers (about 8 KiB). The AEAD key schedule is
//! expanded per read or write call, not kept.
//!
//! Records: TLS 1.3 (RFC 8446 §5.2: inner content type, AAD = record header) and TLS 1.2
//! AEAD (RFC 5288 AES-GCM with an explicit nonce, RFC 7905 ChaCha20-Poly1305).

use std::ops::Range;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::{ConnectionTrafficSecrets, ExtractedSecrets};

/// Largest plaintext in one record.
pub const MAX_PLAIN: usize = 16_384;
/// Largest ciphertext body a peer may send (RFC 8446 §5.2: plaintext + 256).
const MAX_BODY: usize = MAX_PLAIN + 256;
/// Record header: type, version, length.
pub const HEADER: usize = 5;
/// AEAD tag.
const TAG: usize = 16;
/// TLS 1.2 AES-GCM explicit nonce.
const EXPLICIT: usize = 8;

/// Content types.
pub const ALERT: u8 = 21;
/// Handshake messages (after the handshake: KeyUpdate, NewSessionTicket).
pub const HANDSHAKE: u8 = 22;
/// Application data.
pub const DATA: u8 = 23;

/// Why a record was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    /// A record longer than TLS allows.
    #[error("record too long ({0} bytes)")]
    TooLong(usize),
    /// The tag did not verify (corrupt, forged or out of sequence).
    #[error("record failed to decrypt")]
    Decrypt,
    /// A TLS 1.3 record whose padding holds no content type.
    #[error("record without content type")]
    NoType,
    /// Bytes that are not a TLS record (a plaintext HTTP request on a TLS port, say).
    #[error("not a TLS record")]
    NotTls,
    /// A cipher this layer does not implement.
    #[error("unsupported cipher for the record layer")]
    Cipher,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Alg {
    Aes128Gcm,
    Aes256Gcm,
    Chacha,
}

/// One direction's keys.
#[derive(Clone)]
struct Keys {
    alg: Alg,
    key: [u8; 32],
    iv: [u8; 12],
    seq: u64,
}

impl Keys {
    fn new((seq, secrets): (u64, ConnectionTrafficSecrets)) -> Result<Keys, RecordError> {
        let (alg, key, iv) = match secrets {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (Alg::Aes128Gcm, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (Alg::Aes256Gcm, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => (Alg::Chacha, key, iv),
            _ => return Err(RecordError::Cipher),
        };
        let mut k = [0u8; 32];
        let key = key.as_ref();
        k[..key.len()].copy_from_slice(key);
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| RecordError::Cipher)?;
        Ok(Keys {
            alg,
            key: k,
            iv,
            seq,
        })
    }

    /// The key schedule for one call's records.
    fn expand(&self) -> LessSafeKey {
        let (alg, len) = match self.alg {
            Alg::Aes128Gcm => (&aead::AES_128_GCM, 16),
            Alg::Aes256Gcm => (&aead::AES_256_GCM, 32),
            Alg::Chacha => (&aead::CHACHA20_POLY1305, 32),
        };
        LessSafeKey::new(UnboundKey::new(alg, &self.key[..len]).expect("key length"))
    }

    /// `iv XOR seq` (the seq as a 96-bit big-endian number).
    fn nonce(&self) -> [u8; 12] {
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(self.seq.to_be_bytes()) {
            *b ^= s;
        }
        n
    }

    /// TLS 1.2's AAD: seq, type, version, plaintext length.
    fn aad12(&self, typ: u8, len: usize) -> [u8; 13] {
        let mut a = [0u8; 13];
        a[..8].copy_from_slice(&self.seq.to_be_bytes());
        a[8] = typ;
        a[9..11].copy_from_slice(&[3, 3]);
        a[11..].copy_from_slice(&(len as u16).to_be_bytes());
        a
    }
}

/// Both directions of an established connection.
pub struct RecordLayer {
    tls13: bool,
    tx: Keys,
    rx: Keys,
}

/// A direction's expanded key, for the records of one call.
pub struct Sealer<'a> {
    keys: &'a mut Keys,
    tls13: bool,
    key: LessSafeKey,
}

/// The receiving direction's expanded key, for the records of one call.
pub struct Opener<'a> {
    keys: &'a mut Keys,
    tls13: bool,
    key: LessSafeKey,
}

impl RecordLayer {
    /// Takes over from rustls.
    pub fn new(tls13: bool, secrets: ExtractedSecrets) -> Result<RecordLayer, RecordError> {
        Ok(RecordLayer {
            tls13,
            tx: Keys::new(secrets.tx)?,
            rx: Keys::new(secrets.rx)?,
        })
    }

    /// Expands the sending key.
    pub fn sealer(&mut self) -> Sealer<'_> {
        let key = self.tx.expand();
        Sealer {
            keys: &mut self.tx,
            tls13: self.tls13,
            key,
        }
    }

    /// Expands the receiving key.
    pub fn opener(&mut self) -> Opener<'_> {
        let key = self.rx.expand();
        Opener {
            keys: &mut self.rx,
            tls13: self.tls13,
            key,
        }
    }
}

impl Sealer<'_> {
    /// Where the plaintext of a record starting at `at` goes.
    pub fn body_offset(&self) -> usize {
        if !self.tls13 && self.keys.alg != Alg::Chacha {
            HEADER + EXPLICIT
        } else {
            HEADER
        }
    }

    /// Turns `buf[at..]` into one record of `typ`: `buf[at + body_offset()..]` holds the
    /// plaintext (at most [`MAX_PLAIN`]); header, nonce, content type and tag are written
    /// around it.
    pub fn seal(&mut self, typ: u8, buf: &mut Vec<u8>, at: usize) {
        let body = at + self.body_offset();
        let plain = buf.len() - body;
        debug_assert!(plain <= MAX_PLAIN);
        let nonce = self.keys.nonce();
        // TLS 1.3 authenticates the record header; TLS 1.2 its own 13 bytes (RFC 5246).
        let mut aad = [0u8; 13];
        let aad_len = if self.tls13 {
            buf.push(typ);
            let len = plain + 1 + TAG;
            let header = [DATA, 3, 3, (len >> 8) as u8, len as u8];
            buf[at..at + HEADER].copy_from_slice(&header);
            aad[..HEADER].copy_from_slice(&header);
            HEADER
        } else {
            aad = self.keys.aad12(typ, plain);
            let explicit = body - at - HEADER;
            let len = explicit + plain + TAG;
            buf[at..at + HEADER].copy_from_slice(&[typ, 3, 3, (len >> 8) as u8, len as u8]);
            buf[at + HEADER..body].copy_from_slice(&nonce[4..4 + explicit]);
            aad.len()
        };
        let tag = self
            .key
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(&aad[..aad_len]),
                &mut buf[body..],
            )
            .expect("seal");
        buf.extend_from_slice(tag.as_ref());
        self.keys.seq += 1;
    }
}

/// Length of the complete record at the start of `buf`, if it is all there.
pub fn complete(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    // Content types 20..=23 (and 24, heartbeat), version 3.x: anything else is not TLS.
    if buf.first().is_some_and(|t| !(20..=24).contains(t)) || buf.get(1).is_some_and(|&v| v != 3) {
        return Err(RecordError::NotTls);
    }
    if buf.len() < HEADER {
        return Ok(None);
    }
    let len = u16::from_be_bytes([buf[3], buf[4]]) as usize;
    if len > MAX_BODY {
        return Err(RecordError::TooLong(len));
    }
    Ok((buf.len() >= HEADER + len).then_some(HEADER + len))
}

impl Opener<'_> {
    /// Decrypts the record `rec` (header included) in place: its content type and where
    /// the plaintext lies in `rec`.
    pub fn open(&mut self, rec: &mut [u8]) -> Result<(u8, Range<usize>), RecordError> {
        let outer = rec[0];
        let (header, body) = rec.split_at_mut(HEADER);
        if body.len() < TAG {
            return Err(RecordError::Decrypt);
        }
        let opened = if self.tls13 {
            let aad: [u8; HEADER] = header.try_into().expect("header");
            let nonce = Nonce::assume_unique_for_key(self.keys.nonce());
            let plain = self
                .key
                .open_in_place(nonce, Aad::from(aad), body)
                .map_err(|_| RecordError::Decrypt)?;
            // Padding zeros, then the real content type.
            let end = plain
                .iter()
                .rposition(|&b| b != 0)
                .ok_or(RecordError::NoType)?;
            (plain[end], HEADER..HEADER + end)
        } else if self.keys.alg == Alg::Chacha {
            let aad = self.keys.aad12(outer, body.len() - TAG);
            let nonce = Nonce::assume_unique_for_key(self.keys.nonce());
            let plain = self
                .key
                .open_in_place(nonce, Aad::from(aad), body)
                .map_err(|_| RecordError::Decrypt)?;
            (outer, HEADER..HEADER + plain.len())
        } else {
            if body.len() < EXPLICIT + TAG {
                return Err(RecordError::Decrypt);
            }
            let mut nonce = [0u8; 12];
            nonce[..4].copy_from_slice(&self.keys.iv[..4]);
            nonce[4..].copy_from_slice(&body[..EXPLICIT]);
            let aad = self.keys.aad12(outer, body.len() - EXPLICIT - TAG);
            let plain = self
                .key
                .open_within(
                    Nonce::assume_unique_for_key(nonce),
                    Aad::from(aad),
                    body,
                    EXPLICIT..,
                )
                .map_err(|_| RecordError::Decrypt)?;
            (outer, HEADER..HEADER + plain.len())
        };
        if opened.1.len() > MAX_PLAIN {
            return Err(RecordError::TooLong(opened.1.len()));
        }
        self.keys.seq += 1;
        Ok(opened)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(alg: Alg, tls13: bool) -> (RecordLayer, RecordLayer) {
        let k = |seed: u8| Keys {
            alg,
            key: [seed; 32],
            iv: [seed.wrapping_mul(3); 12],
            seq: 7,
        };
        let a = RecordLayer {
            tls13,
            tx: k(1),
            rx: k(2),
        };
        let b = RecordLayer {
            tls13,
            tx: k(2),
            rx: k(1),
        };
        (a, b)
    }

    #[test]
    fn records_round_trip_for_every_cipher_and_version_and_tampering_fails() {
        for alg in [Alg::Aes128Gcm, Alg::Aes256Gcm, Alg::Chacha] {
            for tls13 in [true, false] {
                let (mut a, mut b) = pair(alg, tls13);
                let mut wire = Vec::new();
                for (i, msg) in [&b"hello"[..], &[7u8; MAX_PLAIN][..], b""]
                    .iter()
                    .enumerate()
                {
                    let mut s = a.sealer();
                    let at = wire.len();
                    wire.resize(at + s.body_offset(), 0);
                    wire.extend_from_slice(msg);
                    s.seal(if i == 2 { ALERT } else { DATA }, &mut wire, at);
                }
                let mut o = b.opener();
                let mut at = 0;
                for (i, msg) in [&b"hello"[..], &[7u8; MAX_PLAIN][..], b""]
                    .iter()
                    .enumerate()
                {
                    let n = complete(&wire[at..]).unwrap().unwrap();
                    let (typ, r) = o.open(&mut wire[at..at + n]).unwrap();
                    assert_eq!(typ, if i == 2 { ALERT } else { DATA }, "{alg:?} {tls13}");
                    assert_eq!(&wire[at + r.start..at + r.end], *msg, "{alg:?} {tls13}");
                    at += n;
                }
                // A flipped bit, or a replayed record (wrong sequence), does not open.
                let (mut a, mut b) = pair(alg, tls13);
                let mut one = Vec::new();
                let mut s = a.sealer();
                one.resize(s.body_offset(), 0);
                one.extend_from_slice(b"x");
                s.seal(DATA, &mut one, 0);
                let mut bad = one.clone();
                let last = bad.len() - 1;
                bad[last] ^= 1;
                assert_eq!(b.opener().open(&mut bad), Err(RecordError::Decrypt));
                let mut good = one.clone();
                assert!(b.opener().open(&mut good).is_ok());
                assert_eq!(b.opener().open(&mut one), Err(RecordError::Decrypt));
            }
        }
    }

    #[test]
    fn incomplete_and_oversized_records_are_told_apart() {
        assert_eq!(complete(&[23, 3, 3, 0]), Ok(None));
        assert_eq!(complete(b"GET / HTTP/1.1"), Err(RecordError::NotTls));
        assert_eq!(complete(&[22, 1]), Err(RecordError::NotTls));
        assert_eq!(complete(&[23, 3, 3, 0, 2, 9]), Ok(None));
        assert_eq!(complete(&[23, 3, 3, 0, 2, 9, 9, 9]), Ok(Some(7)));
        assert_eq!(
            complete(&[23, 3, 3, 0xff, 0xff]),
            Err(RecordError::TooLong(0xffff))
        );
    }
}
