//! HTTP responses, written whole into one buffer.

use bytes::Bytes;

/// Reason phrase for the statuses switchboard sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        411 => "Length Required",
        413 => "Content Too Large",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A complete response with a body; `close` adds `Connection: close`.
pub fn simple(
    status: u16,
    content_type: &str,
    body: &[u8],
    extra_headers: &str,
    close: bool,
) -> Bytes {
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra_headers}{}\r\n",
        reason(status),
        body.len(),
        if close { "Connection: close\r\n" } else { "" },
    );
    let mut out = Vec::with_capacity(head.len() + body.len());
    out.extend_from_slice(head.as_bytes());
    out.extend_from_slice(body);
    out.into()
}

/// A plain-text error response that closes the connection.
pub fn error(status: u16, message: &str) -> Bytes {
    let body = format!("{message}\n");
    let extra = if status == 426 {
        "Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
    } else {
        ""
    };
    simple(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        extra,
        true,
    )
}

/// A refusal for now that closes the connection: `status` (429, 503) with `Retry-After`
/// (seconds) and a plain-text body saying the same.
pub fn retry_later(status: u16, message: &str, retry_after_s: u64) -> Bytes {
    let body = format!("{message}; retry after {retry_after_s} s\n");
    let extra = format!("Retry-After: {retry_after_s}\r\n");
    simple(
        status,
        "text/plain; charset=utf-8",
        body.as_bytes(),
        &extra,
        true,
    )
}

/// The 101 answer to a WebSocket upgrade.
pub fn switching_protocols(accept_key: &str) -> Bytes {
    switching_protocols_with(accept_key, None)
}

/// The 101 with the extensions agreed (`Sec-WebSocket-Extensions`), if any.
pub fn switching_protocols_with(accept_key: &str, extensions: Option<&str>) -> Bytes {
    let ext = extensions
        .map(|e| format!("Sec-WebSocket-Extensions: {e}\r\n"))
        .unwrap_or_default();
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept_key}\r\n{ext}\r\n"
    )
    .into_bytes()
    .into()
}
