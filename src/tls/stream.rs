//! A TLS connection as the session layer's byte pipe: rustls between the socket and the
//! session, non-blocking, with the edge-triggered contract the shard relies on (a read
//! shorter than the buffer means the socket said `WouldBlock`).

use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};

/// Ciphertext rustls may hold for the socket beyond what the session's outbox holds: the
/// session's own limits apply to plaintext; this only bounds what one write encrypts ahead.
const SENDABLE_TLS_LIMIT: usize = 64 * 1024;

/// A TLS stream over a non-blocking socket `S`: the server's connections, and loadgen's
/// `wss://` clients.
pub struct TlsStream<S> {
    sock: S,
    tls: Connection,
    /// The socket reached end of stream (or the peer's close_notify arrived).
    eof: bool,
}

impl<S: Read + Write> TlsStream<S> {
    /// Starts the server side of a handshake on `sock` with `config`.
    pub fn new(sock: S, config: Arc<ServerConfig>) -> Result<TlsStream<S>, rustls::Error> {
        Ok(Self::over(sock, ServerConnection::new(config)?.into()))
    }

    /// Starts the client side of a handshake with `name` on `sock`: its first flight goes out
    /// with the first write (or [`Self::flush_tls`]).
    pub fn client(
        sock: S,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<TlsStream<S>, rustls::Error> {
        Ok(Self::over(
            sock,
            ClientConnection::new(config, name)?.into(),
        ))
    }

    fn over(sock: S, mut tls: Connection) -> TlsStream<S> {
        tls.set_buffer_limit(Some(SENDABLE_TLS_LIMIT));
        TlsStream {
            sock,
            tls,
            eof: false,
        }
    }

    /// The socket underneath.
    pub fn get_ref(&self) -> &S {
        &self.sock
    }

    /// The socket underneath.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.sock
    }

    /// The rustls connection (handshake state, negotiated protocol).
    pub fn tls(&self) -> &Connection {
        &self.tls
    }

    /// Writes ciphertext rustls holds until it is all out or the socket is full
    /// (`WouldBlock`: the socket's next writable edge continues).
    pub fn flush_tls(&mut self) -> io::Result<()> {
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Moves decrypted bytes into `buf[*off..]`; true at the end of the peer's data.
    fn take_plaintext(&mut self, buf: &mut [u8], off: &mut usize) -> io::Result<bool> {
        if *off == buf.len() {
            return Ok(false);
        }
        match self.tls.reader().read(&mut buf[*off..]) {
            Ok(0) => Ok(true), // close_notify
            Ok(n) => {
                *off += n;
                Ok(false)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
            // The socket ended without close_notify: an end all the same (as for TCP).
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Reads plaintext. Returns less than `buf` holds only when the socket is drained
    /// (`WouldBlock`) or ended, so edge-triggered readiness stays correct.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut off = 0;
        loop {
            if self.take_plaintext(buf, &mut off)? || self.eof {
                self.eof = true;
                return Ok(off);
            }
            if off == buf.len() {
                return Ok(off);
            }
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => self.eof = true,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && off > 0 => return Ok(off),
                Err(e) => return Err(e),
            }
            if let Err(e) = self.tls.process_new_packets() {
                // rustls queued an alert saying why: send it before the connection ends.
                let _ = self.flush_tls();
                return Err(io::Error::new(io::ErrorKind::InvalidData, e));
            }
            // Handshake messages (and key updates) answer at once; a full socket waits for
            // its writable edge.
            match self.flush_tls() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Encrypts what it can of `bufs` and writes it out. `WouldBlock` when earlier
    /// ciphertext still waits for the socket (nothing of `bufs` is taken then).
    pub fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.flush_tls()?;
        let n = self.tls.writer().write_vectored(bufs)?;
        match self.flush_tls() {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if n == 0 => return Err(e),
            Err(_) => {} // the next call reports it
        }
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Sends close_notify and what is pending (best effort: the connection is ending).
    pub fn close_notify(&mut self) {
        if self.tls.is_handshaking() {
            let _ = self.flush_tls(); // an alert, if the handshake failed
            return;
        }
        self.tls.send_close_notify();
        let _ = self.flush_tls();
    }
}
