//! A plain HTTP/1.1 GET for what loadgen reads besides WebSocket: a server's `/metrics`,
//! inbox history for `--audit`.

use std::io::{Read, Write};
use std::time::Duration;

use crate::plan::Target;

/// The body of `GET <path>` on `t`'s server (plain TCP only), if it answered 200 in time.
pub fn get(t: &Target, path: &str, timeout: Duration) -> Option<String> {
    if t.tls {
        return None;
    }
    let mut s = std::net::TcpStream::connect_timeout(&t.addr, timeout).ok()?;
    s.set_read_timeout(Some(timeout)).ok()?;
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
        t.host
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_owned())
}
