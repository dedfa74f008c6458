//! A pub/sub connection spoken directly in RESP2 over a socket we own.
//!
//! The subscriber polls for messages with a short read timeout. redis-rs's `Connection`
//! counts a timed-out read as a lost reply and skips the next value it reads, and its
//! `PubSub` drops `smessage`s (sharded pub/sub) in RESP2; a subscriber needs neither, so it
//! keeps its own buffer: a timeout leaves a half-read reply in the buffer, never skipped.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use redis::{ConnectionAddr, ConnectionInfo, Value};

/// Errors of a RESP connection.
#[derive(Debug, thiserror::Error)]
pub enum RespError {
    /// The socket failed or closed.
    #[error("Redis connection: {0}")]
    Io(#[from] std::io::Error),
    /// Redis answered an error.
    #[error("Redis: {0}")]
    Server(String),
    /// Bytes that are not RESP.
    #[error("Redis sent bytes that are not RESP")]
    Protocol,
}

impl RespError {
    /// Whether the server answered `MOVED` (the slot lives on another master).
    pub fn is_moved(&self) -> bool {
        matches!(self, RespError::Server(e) if e.starts_with("MOVED"))
    }
}

/// One RESP2 connection.
pub struct Resp {
    sock: TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` already parsed.
    start: usize,
}

/// A reply: a value, or the error Redis answered.
type Reply = Result<Value, String>;

/// A reply parsed from the front of `b`, with the bytes it took; `None` while incomplete.
fn parse(b: &[u8]) -> Result<Option<(Reply, usize)>, RespError> {
    let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let line = std::str::from_utf8(&b[1..nl]).map_err(|_| RespError::Protocol)?;
    let after = nl + 2;
    let int = || line.parse::<i64>().map_err(|_| RespError::Protocol);
    let (v, used) = match b.first() {
        Some(b'+') => (Value::SimpleString(line.to_owned()), after),
        Some(b'-') => return Ok(Some((Err(line.to_owned()), after))),
        Some(b':') => (Value::Int(int()?), after),
        Some(b'$') => {
            let n = int()?;
            if n < 0 {
                return Ok(Some((Ok(Value::Nil), after)));
            }
            let end = after + n as usize;
            if b.len() < end + 2 {
                return Ok(None);
            }
            (Value::BulkString(b[after..end].to_vec()), end + 2)
        }
        Some(b'*') => {
            let n = int()?;
            let mut items = Vec::with_capacity(n.max(0) as usize);
            let mut at = after;
            for _ in 0..n.max(0) {
                match parse(&b[at..])? {
                    Some((Ok(v), used)) => {
                        items.push(v);
                        at += used;
                    }
                    Some((Err(_), _)) => return Err(RespError::Protocol),
                    None => return Ok(None),
                }
            }
            (Value::Array(items), at)
        }
        _ => return Err(RespError::Protocol),
    };
    Ok(Some((Ok(v), used)))
}

impl Resp {
    /// Connects to `info` (TCP), authenticating with its user and password.
    pub fn connect(info: &ConnectionInfo, timeout: Duration) -> Result<Resp, RespError> {
        let (host, port) = match info.addr() {
            ConnectionAddr::Tcp(h, p) => (h.clone(), *p),
            _ => {
                return Err(RespError::Io(std::io::Error::other(
                    "the broker's subscriber speaks plain TCP only",
                )))
            }
        };
        let addr = (host.as_str(), port)
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| std::io::Error::other("no address"))?;
        let sock = TcpStream::connect_timeout(&addr, timeout)?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(timeout))?;
        sock.set_write_timeout(Some(timeout))?;
        let mut r = Resp {
            sock,
            buf: Vec::with_capacity(16 * 1024),
            start: 0,
        };
        let s = info.redis_settings();
        if let Some(p) = s.password() {
            match s.username() {
                Some(u) => r.send(&[b"AUTH", u.as_bytes(), p.as_bytes()])?,
                None => r.send(&[b"AUTH", p.as_bytes()])?,
            }
            r.read()?
                .ok_or_else(|| std::io::Error::other("no answer to AUTH"))?;
        }
        Ok(r)
    }

    /// Sends one command.
    pub fn send(&mut self, args: &[&[u8]]) -> Result<(), RespError> {
        let mut out = Vec::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
        out.extend_from_slice(format!("*{}\r\n", args.len()).as_bytes());
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        self.sock.write_all(&out)?;
        Ok(())
    }

    /// Sets how long [`Resp::read`] waits for a value.
    pub fn set_read_timeout(&self, t: Duration) -> Result<(), RespError> {
        Ok(self.sock.set_read_timeout(Some(t))?)
    }

    /// The next value, or `None` if none is complete within the read timeout (what was read
    /// of it stays buffered); an error Redis answered is [`RespError::Server`].
    pub fn read(&mut self) -> Result<Option<Value>, RespError> {
        loop {
            if let Some((v, used)) = parse(&self.buf[self.start..])? {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return v.map(Some).map_err(RespError::Server);
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.sock.read(&mut chunk) {
                Ok(0) => {
                    return Err(RespError::Io(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "Redis closed the connection",
                    )))
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(None)
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_parse_whole_or_wait_for_more() {
        let m = b"*3\r\n$8\r\nsmessage\r\n$3\r\nch1\r\n$2\r\nhi\r\n";
        let (v, used) = parse(m).unwrap().unwrap();
        assert_eq!(used, m.len());
        assert_eq!(
            v.unwrap(),
            Value::Array(vec![
                Value::BulkString(b"smessage".to_vec()),
                Value::BulkString(b"ch1".to_vec()),
                Value::BulkString(b"hi".to_vec()),
            ])
        );
        for cut in 1..m.len() {
            assert!(parse(&m[..cut]).unwrap().is_none(), "cut at {cut}");
        }
        assert_eq!(parse(b":12\r\n").unwrap().unwrap().0, Ok(Value::Int(12)));
        let (e, used) = parse(b"-MOVED 1 127.0.0.1:7000\r\n:1\r\n")
            .unwrap()
            .unwrap();
        assert!(RespError::Server(e.unwrap_err()).is_moved());
        assert_eq!(used, 25, "an error is consumed like any reply");
        assert!(matches!(parse(b"?x\r\n"), Err(RespError::Protocol)));
    }
}
