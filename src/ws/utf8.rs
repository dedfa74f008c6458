//! Incremental UTF-8 validation for text messages that arrive in fragments.

/// Result of validating a prefix of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Utf8Check {
    /// Valid so far; `valid_up_to` bytes are complete characters.
    Partial { valid_up_to: usize },
    /// Definitely invalid: fail the connection with 1007 now (fail fast, RFC 6455 §8.1).
    Invalid,
}

/// Validates `buf[from..]`, where `buf[..from]` is known valid. A character cut at the end
/// of `buf` is not an error while more fragments may follow.
pub fn check(buf: &[u8], from: usize) -> Utf8Check {
    match std::str::from_utf8(&buf[from..]) {
        Ok(_) => Utf8Check::Partial {
            valid_up_to: buf.len(),
        },
        Err(e) => match e.error_len() {
            Some(_) => Utf8Check::Invalid,
            None => Utf8Check::Partial {
                valid_up_to: from + e.valid_up_to(),
            },
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_character_is_partial_then_complete() {
        let s = "aé€😀".as_bytes();
        for cut in 0..=s.len() {
            let r = check(&s[..cut], 0);
            assert!(matches!(r, Utf8Check::Partial { .. }), "cut {cut}");
        }
        assert_eq!(
            check(s, 0),
            Utf8Check::Partial {
                valid_up_to: s.len()
            }
        );
    }

    #[test]
    fn invalid_byte_fails_fast() {
        assert_eq!(check(b"ab\xffcd", 0), Utf8Check::Invalid);
        assert_eq!(
            check(
                b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xed\xa0\x80",
                0
            ),
            Utf8Check::Invalid
        );
    }
}
