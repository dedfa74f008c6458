//! The server side of the RFC 6455 opening handshake, kept apart from the socket.

/// What the handshake looks at in an upgrade request (the HTTP layer fills it in).
#[derive(Debug, Clone, Copy, Default)]
pub struct UpgradeRequest<'a> {
    /// The method is GET.
    pub is_get: bool,
    /// `Upgrade` holds `websocket`.
    pub upgrade_websocket: bool,
    /// `Connection` holds `upgrade`.
    pub connection_upgrade: bool,
    /// `Sec-WebSocket-Version`.
    pub version: Option<&'a str>,
    /// `Sec-WebSocket-Key`.
    pub key: Option<&'a str>,
}

/// Why an upgrade request was refused, with the HTTP status to answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// Not GET (405).
    #[error("WebSocket upgrade needs GET")]
    Method,
    /// No `Upgrade: websocket` / `Connection: upgrade` (426).
    #[error("this endpoint needs a WebSocket upgrade")]
    NotUpgrade,
    /// `Sec-WebSocket-Version` is not 13 (426 with the supported version).
    #[error("unsupported Sec-WebSocket-Version (13 is supported)")]
    Version,
    /// `Sec-WebSocket-Key` missing or not 16 base64-encoded bytes (400).
    #[error("missing or invalid Sec-WebSocket-Key")]
    Key,
}

impl HandshakeError {
    /// HTTP status to answer with.
    pub fn status(&self) -> u16 {
        match self {
            HandshakeError::Method => 405,
            HandshakeError::NotUpgrade | HandshakeError::Version => 426,
            HandshakeError::Key => 400,
        }
    }

    /// Short label for metrics and logs.
    pub fn label(&self) -> &'static str {
        match self {
            HandshakeError::Method => "method",
            HandshakeError::NotUpgrade => "not_upgrade",
            HandshakeError::Version => "version",
            HandshakeError::Key => "bad_key",
        }
    }
}

/// Checks an upgrade request and returns the `Sec-WebSocket-Accept` value.
pub fn accept(req: &UpgradeRequest<'_>) -> Result<String, HandshakeError> {
    if !req.is_get {
        return Err(HandshakeError::Method);
    }
    if !req.upgrade_websocket || !req.connection_upgrade {
        return Err(HandshakeError::NotUpgrade);
    }
    if req.version != Some("13") {
        return Err(HandshakeError::Version);
    }
    let key = req.key.ok_or(HandshakeError::Key)?;
    if !is_valid_key(key) {
        return Err(HandshakeError::Key);
    }
    Ok(tungstenite::handshake::derive_accept_key(key.as_bytes()))
}

/// A key is 24 base64 characters that decode to 16 bytes (RFC 6455 §4.1).
fn is_valid_key(key: &str) -> bool {
    let b = key.as_bytes();
    b.len() == 24
        && b[22..] == *b"=="
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
        && {
            // The last data character carries 2 significant bits: its low 4 bits must be 0.
            const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
            B64.iter()
                .position(|&c| c == b[21])
                .is_some_and(|v| v & 0x0f == 0)
        }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A GET request with the headers in `extra` ("Name: value" lines).
    fn req(extra: &str) -> UpgradeRequest<'_> {
        let mut r = UpgradeRequest {
            is_get: true,
            ..UpgradeRequest::default()
        };
        for line in extra.split("\r\n").filter(|l| !l.is_empty()) {
            let (name, value) = line.split_once(": ").unwrap();
            match name {
                "Upgrade" => r.upgrade_websocket = value.eq_ignore_ascii_case("websocket"),
                "Connection" => r.connection_upgrade = value.eq_ignore_ascii_case("upgrade"),
                "Sec-WebSocket-Version" => r.version = Some(value),
                "Sec-WebSocket-Key" => r.key = Some(value),
                _ => {}
            }
        }
        r
    }

    const OK: &str = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n";

    #[test]
    fn rfc_sample_key() {
        let head = format!("{OK}Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n");
        let r = req(&head);
        assert_eq!(accept(&r).unwrap(), "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
    }

    #[test]
    fn refusals() {
        assert_eq!(accept(&req("")), Err(HandshakeError::NotUpgrade));
        assert_eq!(accept(&req(OK)), Err(HandshakeError::Key));
        let bad = format!("{OK}Sec-WebSocket-Key: not-a-key\r\n");
        assert_eq!(accept(&req(&bad)), Err(HandshakeError::Key));
        let v8 = "Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n";
        assert_eq!(accept(&req(v8)), Err(HandshakeError::Version));
        assert_eq!(HandshakeError::Version.status(), 426);
    }
}
