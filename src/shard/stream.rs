//! A shard's connection: a plain TCP socket or TLS over one, in 4 bytes (the slab entry of
//! every idle connection pays for this field). The socket's fd carries the kind in its sign;
//! a TLS connection's state lives beside the slab, in this thread's table indexed by the fd
//! (fds are small and unique in the shard's fd table, and only the shard's thread touches
//! them; a server without TLS listeners never grows the table).

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::mem::ManuallyDrop;
use std::os::fd::{FromRawFd, IntoRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use crate::router::Transport;
use crate::tls::TlsStream;

/// A TLS connection's socket as rustls's reader and writer: the fd, not owned (the
/// [`Stream`] closes it).
pub struct Fd(RawFd);

/// The socket behind `fd` for one call, without taking ownership.
fn sock(fd: RawFd) -> ManuallyDrop<std::net::TcpStream> {
    // SAFETY: `fd` is an open socket owned by a live `Stream`; ManuallyDrop never closes it.
    ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) })
}

impl Read for Fd {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        (&*sock(self.0)).read(buf)
    }
}

impl Write for Fd {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        (&*sock(self.0)).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

thread_local! {
    /// TLS state of this shard's TLS connections, indexed by fd (8 bytes per slot).
    static TLS: RefCell<Vec<Option<Box<TlsStream<Fd>>>>> = const { RefCell::new(Vec::new()) };
}

/// A connection's socket as the shard owns it: `fd` for plain (`ws://`, `http://`), `!fd`
/// for TLS (`wss://`, `https://`).
pub struct Stream(RawFd);

impl Stream {
    /// A plain connection.
    pub fn plain(s: mio::net::TcpStream) -> Stream {
        Stream(s.into_raw_fd())
    }

    /// A TLS connection (the server side of its handshake starts).
    pub fn tls(
        s: mio::net::TcpStream,
        config: Arc<rustls::ServerConfig>,
    ) -> Result<Stream, rustls::Error> {
        let fd = s.into_raw_fd();
        let stream = Stream(!fd); // closes the fd if the handshake cannot start
        let t = TlsStream::new(Fd(fd), config)?;
        TLS.with(|m| {
            let mut m = m.borrow_mut();
            let i = fd as usize;
            if m.len() <= i {
                m.resize_with(i + 1, || None);
            }
            m[i] = Some(Box::new(t));
        });
        Ok(stream)
    }

    fn fd(&self) -> RawFd {
        if self.0 >= 0 {
            self.0
        } else {
            !self.0
        }
    }

    /// Runs `f` on the TLS state (`None` for a plain connection).
    fn with_tls<R>(&self, f: impl FnOnce(&mut TlsStream<Fd>) -> R) -> Option<R> {
        if self.0 >= 0 {
            return None;
        }
        let fd = !self.0 as usize;
        TLS.try_with(|m| m.borrow_mut().get_mut(fd)?.as_deref_mut().map(f))
            .ok()
            .flatten()
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        let fd = self.fd();
        if self.0 < 0 {
            let t = TLS
                .try_with(|m| m.borrow_mut().get_mut(fd as usize).and_then(Option::take))
                .ok()
                .flatten();
            drop(t); // its buffers go back to the pool
        }
        // SAFETY: the fd is ours and closed once (this also removes it from epoll).
        unsafe { libc::close(fd) };
    }
}

impl Transport for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.with_tls(|t| t.read_plain(buf)) {
            Some(r) => r,
            None if self.0 >= 0 => (&*sock(self.0)).read(buf),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.with_tls(|t| t.write_plain(bufs)) {
            Some(r) => r,
            None if self.0 >= 0 => (&*sock(self.0)).write_vectored(bufs),
            None => Err(io::ErrorKind::NotConnected.into()),
        }
    }

    fn shutdown_write(&mut self) {
        self.with_tls(|t| t.close_notify());
        let _ = sock(self.fd()).shutdown(std::net::Shutdown::Write);
    }

    fn before_close(&mut self) {
        self.with_tls(|t| t.close_notify());
    }

    fn reset(&mut self) {
        // SO_LINGER 0: close() sends RST and drops the unsent bytes.
        let _ = socket2::SockRef::from(&*sock(self.fd())).set_linger(Some(Duration::ZERO));
    }

    fn can_answer(&self) -> bool {
        self.with_tls(|t| t.is_established()).unwrap_or(true)
    }

    fn holds_input(&self) -> bool {
        self.with_tls(|t| t.holds_input()).unwrap_or(false)
    }

    fn flush_pending(&mut self) {
        self.with_tls(|t| {
            let _ = t.flush_tls();
        });
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_stream_is_four_bytes() {
        assert_eq!(std::mem::size_of::<super::Stream>(), 4);
    }
}
