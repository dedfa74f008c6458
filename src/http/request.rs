//! HTTP/1.1 request head parsing with httparse, tolerant of requests that arrive in pieces.
//!
//! Only the headers switchboard acts on are kept; the request borrows nothing once parsed,
//! so the read buffer can be reused straight away.

/// Largest accepted header section; beyond it the answer is 431.
pub const MAX_HEAD_BYTES: usize = 8 * 1024;
/// Most headers accepted in one request; more is answered with 431 too.
pub const MAX_HEADERS: usize = 64;

/// HTTP methods switchboard routes on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// GET
    Get,
    /// HEAD
    Head,
    /// POST
    Post,
    /// Anything else (answered 405 where a route exists).
    Other,
}

/// The parts of a request head switchboard uses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// Method.
    pub method: Option<Method>,
    /// Path without the query.
    pub path: String,
    /// Raw query string (after `?`), if any.
    pub query: Option<String>,
    /// HTTP/1.x minor version.
    pub minor_version: u8,
    /// `Upgrade` contains the `websocket` token.
    pub upgrade_websocket: bool,
    /// `Connection` contains the `upgrade` token.
    pub connection_upgrade: bool,
    /// `Connection` contains `close`.
    pub connection_close: bool,
    /// `Sec-WebSocket-Key`.
    pub ws_key: Option<String>,
    /// `Sec-WebSocket-Version`.
    pub ws_version: Option<String>,
    /// `Sec-WebSocket-Extensions`, every occurrence joined with `, `.
    pub ws_extensions: Option<String>,
    /// `Origin`.
    pub origin: Option<String>,
    /// `Authorization`.
    pub authorization: Option<String>,
    /// `Last-Event-ID`.
    pub last_event_id: Option<String>,
    /// `Content-Length`.
    pub content_length: Option<usize>,
    /// `Transfer-Encoding` was present (chunked bodies are refused with 411).
    pub transfer_encoding: bool,
    /// Size of the head in bytes, including the blank line.
    pub head_len: usize,
}

/// Why a request head was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// Not parseable as HTTP/1.x (answer 400, then close).
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// The head is over [`MAX_HEAD_BYTES`] or has too many headers (answer 431).
    #[error("request header section too large")]
    HeadTooLarge,
}

fn has_token(value: &[u8], token: &str) -> bool {
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Parses the head at the start of `buf`. `Ok(None)` means more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => return Err(HttpError::HeadTooLarge),
        Err(httparse::Error::Version) => return Err(HttpError::Malformed("bad HTTP version")),
        Err(httparse::Error::Token) => return Err(HttpError::Malformed("bad method or token")),
        Err(httparse::Error::HeaderName) => return Err(HttpError::Malformed("bad header name")),
        Err(httparse::Error::HeaderValue) => return Err(HttpError::Malformed("bad header value")),
        Err(_) => return Err(HttpError::Malformed("bad request line")),
    };
    let head_len = match status {
        httparse::Status::Partial => {
            if buf.len() > MAX_HEAD_BYTES {
                return Err(HttpError::HeadTooLarge);
            }
            return Ok(None);
        }
        httparse::Status::Complete(n) => n,
    };
    if head_len > MAX_HEAD_BYTES {
        return Err(HttpError::HeadTooLarge);
    }
    let target = req.path.ok_or(HttpError::Malformed("no request target"))?;
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q.to_owned())),
        None => (target, None),
    };
    if !path.starts_with('/') {
        return Err(HttpError::Malformed("request target must start with /"));
    }
    let mut out = Request {
        method: Some(match req.method {
            Some("GET") => Method::Get,
            Some("HEAD") => Method::Head,
            Some("POST") => Method::Post,
            _ => Method::Other,
        }),
        path: path.to_owned(),
        query,
        minor_version: req.version.unwrap_or(1),
        head_len,
        ..Request::default()
    };
    let text = |v: &[u8]| String::from_utf8_lossy(v).trim().to_owned();
    for h in req.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("upgrade") {
            out.upgrade_websocket |= has_token(h.value, "websocket");
        } else if name.eq_ignore_ascii_case("connection") {
            out.connection_upgrade |= has_token(h.value, "upgrade");
            out.connection_close |= has_token(h.value, "close");
        } else if name.eq_ignore_ascii_case("sec-websocket-key") {
            out.ws_key = Some(text(h.value));
        } else if name.eq_ignore_ascii_case("sec-websocket-version") {
            out.ws_version = Some(text(h.value));
        } else if name.eq_ignore_ascii_case("sec-websocket-extensions") {
            let v = text(h.value);
            out.ws_extensions = Some(match out.ws_extensions.take() {
                Some(prev) => format!("{prev}, {v}"),
                None => v,
            });
        } else if name.eq_ignore_ascii_case("origin") {
            out.origin = Some(text(h.value));
        } else if name.eq_ignore_ascii_case("authorization") {
            out.authorization = Some(text(h.value));
        } else if name.eq_ignore_ascii_case("last-event-id") {
            out.last_event_id = Some(text(h.value));
        } else if name.eq_ignore_ascii_case("content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or(HttpError::Malformed("bad Content-Length"))?;
            if out.content_length.is_some_and(|old| old != n) {
                return Err(HttpError::Malformed("conflicting Content-Length"));
            }
            out.content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            out.transfer_encoding = true;
        }
    }
    if out.minor_version == 0 {
        out.connection_close = true;
    }
    Ok(Some(out))
}

/// Value of the first `key` in a query string (percent-decoding `%XX` and `+`).
pub fn query_param(query: Option<&str>, key: &str) -> Option<String> {
    query_params(query, key).next()
}

/// Every value of `key` in a query string, in order.
pub fn query_params<'a>(query: Option<&'a str>, key: &'a str) -> impl Iterator<Item = String> + 'a {
    query
        .unwrap_or("")
        .split('&')
        .filter_map(move |pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k).as_deref() == Some(key)).then(|| percent_decode(v))
        })
        .flatten()
}

/// Decodes `%XX` escapes and `+`; `None` when the result is not UTF-8 or an escape is bad.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = b.get(i + 1..i + 3)?;
                let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
                out.push(v);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const UPGRADE: &[u8] = b"GET /ws?user=alice&x=1 HTTP/1.1\r\nHost: x\r\nUpgrade: WebSocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

    #[test]
    fn parses_upgrade_in_every_split() {
        for cut in 0..UPGRADE.len() {
            assert_eq!(parse(&UPGRADE[..cut]), Ok(None), "cut at {cut}");
        }
        let r = parse(UPGRADE).unwrap().unwrap();
        assert_eq!(r.method, Some(Method::Get));
        assert_eq!(r.path, "/ws");
        assert!(r.upgrade_websocket && r.connection_upgrade && !r.connection_close);
        assert_eq!(r.ws_key.as_deref(), Some("dGhlIHNhbXBsZSBub25jZQ=="));
        assert_eq!(r.ws_version.as_deref(), Some("13"));
        assert_eq!(r.head_len, UPGRADE.len());
        assert_eq!(
            query_param(r.query.as_deref(), "user").as_deref(),
            Some("alice")
        );
    }

    #[test]
    fn pipelined_bytes_are_not_part_of_the_head() {
        let mut v = UPGRADE.to_vec();
        v.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        let r = parse(&v).unwrap().unwrap();
        assert_eq!(r.head_len, UPGRADE.len());
    }

    #[test]
    fn malformed_and_oversize() {
        assert!(matches!(
            parse(b"GARBAGE\x01 / HTTP/1.1\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET / HTTP/9.9\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"GET ws HTTP/1.1\r\n\r\n"),
            Err(HttpError::Malformed(_))
        ));
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.extend(std::iter::repeat_n(b'a', MAX_HEAD_BYTES));
        assert_eq!(parse(&big), Err(HttpError::HeadTooLarge));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..(MAX_HEADERS + 1) {
            many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert_eq!(parse(&many), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn content_length_rules() {
        let r = parse(b"POST /api HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello")
            .unwrap()
            .unwrap();
        assert_eq!(r.content_length, Some(5));
        assert!(parse(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n").is_err());
        assert!(
            parse(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").is_err()
        );
    }

    #[test]
    fn query_decoding() {
        assert_eq!(percent_decode("a%40b+c").as_deref(), Some("a@b c"));
        assert_eq!(percent_decode("%zz"), None);
        let q = Some("channel=a&channel=b%2Fc&user=");
        assert_eq!(
            query_params(q, "channel").collect::<Vec<_>>(),
            vec!["a", "b/c"]
        );
        assert_eq!(query_param(q, "user").as_deref(), Some(""));
        assert_eq!(query_param(q, "none"), None);
    }
}
