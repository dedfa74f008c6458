//! A shard's connection: a plain TCP socket or TLS over one. One enum (not a trait object)
//! so the plain path stays a direct call.

use std::io::{self, IoSlice, Read, Write};

use mio::net::TcpStream;

use crate::session::Transport;
use crate::tls::TlsStream;

/// A connection's socket as the shard owns it.
pub enum Stream {
    /// `ws://`, `http://`.
    Plain(TcpStream),
    /// `wss://`, `https://`. Boxed: rustls's state is large, and plain connections should
    /// not pay for it in the slab.
    Tls(Box<TlsStream<TcpStream>>),
}

impl Transport for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => Read::read(s, buf),
            Stream::Tls(t) => t.read_plain(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => Write::write_vectored(s, bufs),
            Stream::Tls(t) => t.write_plain(bufs),
        }
    }

    fn shutdown_write(&mut self) {
        let s = match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => {
                t.close_notify();
                t.get_mut()
            }
        };
        let _ = s.shutdown(std::net::Shutdown::Write);
    }

    fn before_close(&mut self) {
        if let Stream::Tls(t) = self {
            t.close_notify();
        }
    }

    fn can_answer(&self) -> bool {
        match self {
            Stream::Plain(_) => true,
            Stream::Tls(t) => t.is_established(),
        }
    }

    fn holds_input(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.holds_input(),
        }
    }

    fn flush_pending(&mut self) {
        if let Stream::Tls(t) = self {
            let _ = t.flush_tls();
        }
    }
}
