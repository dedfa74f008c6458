//! A TLS connection as the session layer's byte pipe, non-blocking, with the edge-triggered
//! contract the shard relies on (a read shorter than the buffer means the socket said
//! `WouldBlock`). rustls runs the handshake; then [`RecordLayer`] takes over and rustls is
//! dropped, so an idle established connection holds its keys and no buffer: read and write
//! buffers come from a per-thread pool only while bytes are in flight.

// `Box<Vec<u8>>` on purpose: an idle connection holds a thin `Option<Box<_>>` (8 bytes) where a
// `Vec` would take 24.
#![allow(clippy::vec_box, clippy::box_collection)]

use std::cell::RefCell;
use std::io::{self, IoSlice, Read, Write};
use std::sync::Arc;

use rustls::pki_types::ServerName;
use rustls::{ClientConfig, ClientConnection, ServerConfig, ServerConnection};

use super::record::{self, RecordLayer};

/// Size of a pooled read buffer: a few records (a record is at most 16 KiB plus overhead),
/// and positions in it fit a u16.
const BUF: usize = 63 * 1024;
/// Pooled buffers kept per thread.
const POOL_MAX: usize = 64;
/// Plaintext encrypted per write call at most (the rest waits for the next call).
const WRITE_MAX: usize = 64 * 1024;

thread_local! {
    /// Read buffers (no zeroing per use).
    static IN_POOL: RefCell<Vec<Box<[u8; BUF]>>> = const { RefCell::new(Vec::new()) };
    /// Write buffers, empty with their capacity.
    static OUT_POOL: RefCell<Vec<Box<Vec<u8>>>> = const { RefCell::new(Vec::new()) };
}

fn take_in() -> Box<[u8; BUF]> {
    IN_POOL.with(|p| p.borrow_mut().pop()).unwrap_or_else(|| {
        vec![0u8; BUF]
            .into_boxed_slice()
            .try_into()
            .expect("BUF bytes")
    })
}

fn put_in(b: Option<Box<[u8; BUF]>>) {
    if let Some(b) = b {
        IN_POOL.with(|p| {
            let mut p = p.borrow_mut();
            if p.len() < POOL_MAX {
                p.push(b);
            }
        });
    }
}

/// A read buffer while one is held: a thin pointer (8 bytes) when none is, where a `Vec`
/// would take 24 in every connection.
#[derive(Default)]
struct InBuf(Option<Box<[u8; BUF]>>);

impl std::ops::Deref for InBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |b| &b[..])
    }
}

impl std::ops::DerefMut for InBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.0.as_deref_mut().map_or(&mut [], |b| &mut b[..])
    }
}

fn take_out() -> Box<Vec<u8>> {
    OUT_POOL
        .with(|p| p.borrow_mut().pop())
        .unwrap_or_else(|| Box::new(Vec::with_capacity(WRITE_MAX + 1024)))
}

fn put_out(mut b: Box<Vec<u8>>) {
    if b.capacity() > 2 * (WRITE_MAX + 1024) {
        return;
    }
    b.clear();
    OUT_POOL.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() < POOL_MAX {
            p.push(b);
        }
    });
}

/// Ciphertext waiting for the socket, while there is some: a thin pointer when not.
#[derive(Default)]
struct OutBuf(Option<Box<Vec<u8>>>);

impl OutBuf {
    /// The buffer, taken from the pool if none is held.
    fn get(&mut self) -> &mut Vec<u8> {
        self.0.get_or_insert_with(take_out)
    }

    fn bytes(&self) -> &[u8] {
        self.0.as_deref().map_or(&[], |v| &v[..])
    }

    /// Back to the pool.
    fn release(&mut self) {
        if let Some(b) = self.0.take() {
            put_out(b);
        }
    }
}

/// The handshake, run by rustls.
enum Handshake {
    Server(ServerConnection),
    Client(ClientConnection),
}

impl std::ops::Deref for Handshake {
    type Target = rustls::CommonState;
    fn deref(&self) -> &rustls::CommonState {
        match self {
            Handshake::Server(c) => c,
            Handshake::Client(c) => c,
        }
    }
}

impl Handshake {
    fn read_tls(&mut self, rd: &mut dyn Read) -> io::Result<usize> {
        match self {
            Handshake::Server(c) => c.read_tls(rd),
            Handshake::Client(c) => c.read_tls(rd),
        }
    }
    fn write_tls(&mut self, wr: &mut dyn Write) -> io::Result<usize> {
        match self {
            Handshake::Server(c) => c.write_tls(wr),
            Handshake::Client(c) => c.write_tls(wr),
        }
    }
    fn process_new_packets(&mut self) -> Result<rustls::IoState, rustls::Error> {
        match self {
            Handshake::Server(c) => c.process_new_packets(),
            Handshake::Client(c) => c.process_new_packets(),
        }
    }
    fn reader(&mut self) -> rustls::Reader<'_> {
        match self {
            Handshake::Server(c) => c.reader(),
            Handshake::Client(c) => c.reader(),
        }
    }
    fn writer(&mut self) -> rustls::Writer<'_> {
        match self {
            Handshake::Server(c) => c.writer(),
            Handshake::Client(c) => c.writer(),
        }
    }
    fn send_close_notify(&mut self) {
        match self {
            Handshake::Server(c) => c.send_close_notify(),
            Handshake::Client(c) => c.send_close_notify(),
        }
    }
    fn extract(self) -> Result<rustls::ExtractedSecrets, rustls::Error> {
        match self {
            Handshake::Server(c) => c.dangerous_extract_secrets(),
            Handshake::Client(c) => c.dangerous_extract_secrets(),
        }
    }
}

enum State {
    Handshake(Box<Handshake>),
    Traffic(RecordLayer),
    /// Failed or closed: nothing more is read or written.
    Done,
}

/// A TLS stream over a non-blocking socket `S`: the server's connections, and loadgen's
/// `wss://` clients.
pub struct TlsStream<S> {
    sock: S,
    state: State,
    client: bool,
    /// Ciphertext read and not yet opened (`next..end`), and opened plaintext not yet given
    /// (`plain`); empty (no allocation) when nothing is in flight.
    ibuf: InBuf,
    plain: (u16, u16),
    next: u16,
    end: u16,
    /// Ciphertext not yet written (`out_at..`); empty when the socket took everything.
    out: OutBuf,
    out_at: u32,
    eof: bool,
    /// The peer has sent something (a handshake in progress holds rustls's state).
    heard: bool,
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl<S: Read + Write> TlsStream<S> {
    /// Starts the server side of a handshake on `sock` with `config` (which must allow
    /// secret extraction: [`super::server_config`] does).
    pub fn new(sock: S, config: Arc<ServerConfig>) -> Result<TlsStream<S>, rustls::Error> {
        let hs = Handshake::Server(ServerConnection::new(config)?);
        Ok(Self::over(sock, hs, false))
    }

    /// Starts the client side of a handshake with `name` on `sock` (`config` must allow
    /// secret extraction): its first flight goes out with the first write or
    /// [`Self::flush_tls`].
    pub fn client(
        sock: S,
        config: Arc<ClientConfig>,
        name: ServerName<'static>,
    ) -> Result<TlsStream<S>, rustls::Error> {
        let hs = Handshake::Client(ClientConnection::new(config, name)?);
        Ok(Self::over(sock, hs, true))
    }

    fn over(sock: S, hs: Handshake, client: bool) -> TlsStream<S> {
        TlsStream {
            sock,
            state: State::Handshake(Box::new(hs)),
            client,
            ibuf: InBuf::default(),
            plain: (0, 0),
            next: 0,
            end: 0,
            out: OutBuf::default(),
            out_at: 0,
            eof: false,
            heard: false,
        }
    }

    /// Whether bytes from the peer are held below the session: part of a record, opened
    /// plaintext, or a handshake under way (rustls's ~8 KiB of state).
    pub fn holds_input(&self) -> bool {
        !self.ibuf.is_empty() || (self.heard && matches!(self.state, State::Handshake(_)))
    }

    /// The socket underneath.
    pub fn get_ref(&self) -> &S {
        &self.sock
    }

    /// The socket underneath.
    pub fn get_mut(&mut self) -> &mut S {
        &mut self.sock
    }

    /// Whether the handshake is over (the record layer is ours).
    pub fn is_established(&self) -> bool {
        matches!(self.state, State::Traffic(_))
    }

    /// Writes ciphertext waiting for the socket until it is all out or the socket is full
    /// (`WouldBlock`: the socket's next writable edge continues).
    pub fn flush_tls(&mut self) -> io::Result<()> {
        if let State::Handshake(hs) = &mut self.state {
            if hs.wants_write() {
                let out = self.out.get();
                while hs.wants_write() {
                    hs.write_tls(out)?;
                }
            }
        }
        while (self.out_at as usize) < self.out.bytes().len() {
            match self.sock.write(&self.out.bytes()[self.out_at as usize..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_at += n as u32,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out_at = 0;
        self.out.release();
        Ok(())
    }

    /// [`Self::flush_tls`], where a full socket is not an error.
    fn flush_soft(&mut self) -> io::Result<()> {
        match self.flush_tls() {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            r => r,
        }
    }

    /// Reads plaintext. Returns less than `buf` holds only when the socket is drained
    /// (`WouldBlock`) or ended, so edge-triggered readiness stays correct.
    pub fn read_plain(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut off = 0;
        let r = self.read_into(buf, &mut off);
        if self.plain.0 == self.plain.1 && self.next == self.end && !self.ibuf.is_empty() {
            // Nothing in flight: the buffer goes back to the pool.
            self.next = 0;
            self.end = 0;
            self.plain = (0, 0);
            put_in(self.ibuf.0.take());
        }
        match r {
            Ok(()) => Ok(off),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && off > 0 => Ok(off),
            Err(e) => Err(e),
        }
    }

    /// Fills `buf[*off..]`; `Ok` when it is full or the stream ended.
    fn read_into(&mut self, buf: &mut [u8], off: &mut usize) -> io::Result<()> {
        loop {
            // Plaintext already opened.
            let (a, b) = (self.plain.0 as usize, self.plain.1 as usize);
            if a < b {
                let n = (b - a).min(buf.len() - *off);
                buf[*off..*off + n].copy_from_slice(&self.ibuf[a..a + n]);
                *off += n;
                self.plain.0 += n as u16;
            }
            if *off == buf.len() {
                return Ok(());
            }
            // The next complete record.
            let (next, end) = (self.next as usize, self.end as usize);
            let complete = match record::complete(&self.ibuf[next..end]) {
                Ok(c) => c,
                // Not TLS at all: during the handshake rustls says so to the peer (an alert).
                Err(e) => return Err(self.refuse(next, end, e)),
            };
            if let Some(len) = complete {
                self.next += len as u16;
                self.on_record(next, len, buf, off)?;
                continue;
            }
            if self.eof || matches!(self.state, State::Done) {
                return Ok(());
            }
            // More from the socket.
            if self.ibuf.is_empty() {
                self.ibuf.0 = Some(take_in());
            }
            if self.end as usize == self.ibuf.len() {
                self.ibuf.copy_within(next..end, 0);
                self.end -= self.next;
                self.next = 0;
                self.plain = (0, 0);
            }
            let end = self.end as usize;
            match self.sock.read(&mut self.ibuf[end..]) {
                Ok(0) => self.eof = true,
                Ok(n) => {
                    self.end += n as u16;
                    self.heard = true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Handles the record at `ibuf[at..at + len]`.
    fn on_record(
        &mut self,
        at: usize,
        len: usize,
        buf: &mut [u8],
        off: &mut usize,
    ) -> io::Result<()> {
        match &mut self.state {
            State::Handshake(hs) => {
                // One record at a time, so rustls never holds bytes past the handshake.
                let mut rec = &self.ibuf[at..at + len];
                while !rec.is_empty() {
                    if hs.read_tls(&mut rec)? == 0 {
                        break; // after close_notify rustls reads nothing more
                    }
                }
                let processed = hs.process_new_packets();
                if processed.is_ok() {
                    while *off < buf.len() {
                        match hs.reader().read(&mut buf[*off..]) {
                            Ok(n) if n > 0 => *off += n,
                            _ => break,
                        }
                    }
                }
                if let Err(e) = processed {
                    // rustls queued an alert saying why: send it before the end.
                    let _ = self.flush_tls();
                    self.state = State::Done;
                    return Err(invalid(e));
                }
                self.flush_soft()?;
                self.take_over()
            }
            State::Traffic(layer) => {
                let (typ, r) = layer
                    .opener()
                    .open(&mut self.ibuf[at..at + len])
                    .map_err(invalid)?;
                match typ {
                    record::DATA => {
                        self.plain = ((at + r.start) as u16, (at + r.end) as u16);
                        Ok(())
                    }
                    record::ALERT => {
                        // close_notify (or a fatal alert): the peer's data ends here.
                        let level_fatal = self.ibuf.get(at + r.start) == Some(&2);
                        self.eof = true;
                        if level_fatal {
                            return Err(invalid("the peer sent a fatal TLS alert"));
                        }
                        Ok(())
                    }
                    // A client ignores session tickets; a server cannot follow a KeyUpdate
                    // (the traffic secret is not kept): the connection ends.
                    record::HANDSHAKE if self.client => Ok(()),
                    _ => {
                        self.state = State::Done;
                        Err(invalid(
                            "unexpected TLS record after the handshake (KeyUpdate is not supported)",
                        ))
                    }
                }
            }
            State::Done => Err(invalid("the TLS session ended")),
        }
    }

    /// Bytes `ibuf[next..end]` are not TLS: rustls, still in the handshake, answers them
    /// with its alert; then the connection fails.
    fn refuse(&mut self, next: usize, end: usize, e: record::RecordError) -> io::Error {
        if let State::Handshake(hs) = &mut self.state {
            let mut rest = &self.ibuf[next..end];
            let _ = hs.read_tls(&mut rest);
            let _ = hs.process_new_packets();
            let _ = self.flush_tls();
        }
        self.state = State::Done;
        invalid(e)
    }

    /// Once rustls has finished the handshake and holds nothing more, its keys move to the
    /// record layer and rustls is dropped.
    fn take_over(&mut self) -> io::Result<()> {
        let State::Handshake(hs) = &mut self.state else {
            return Ok(());
        };
        if hs.is_handshaking() || hs.wants_write() {
            return Ok(());
        }
        // Plaintext rustls still holds (the caller's buffer was full) is read first.
        let unread = hs
            .process_new_packets()
            .map_or(1, |s| s.plaintext_bytes_to_read());
        if unread > 0 {
            return Ok(());
        }
        let tls13 = hs.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3);
        let State::Handshake(hs) = std::mem::replace(&mut self.state, State::Done) else {
            unreachable!()
        };
        let secrets = hs.extract().map_err(invalid)?;
        self.state = State::Traffic(RecordLayer::new(tls13, secrets).map_err(invalid)?);
        Ok(())
    }

    /// Encrypts what it can of `bufs` and writes it out. `WouldBlock` when earlier
    /// ciphertext still waits for the socket (nothing of `bufs` is taken then).
    pub fn write_plain(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.flush_tls()?;
        let n = match &mut self.state {
            State::Handshake(hs) => {
                // A client's first request waits in rustls until the handshake is done.
                let n = hs.writer().write_vectored(bufs)?;
                self.flush_soft()?;
                n
            }
            State::Traffic(layer) => {
                let mut out = take_out();
                let mut s = layer.sealer();
                let mut n = 0;
                let mut slices = bufs.iter().map(|b| &b[..]).filter(|b| !b.is_empty());
                let mut cur: &[u8] = slices.next().unwrap_or(&[]);
                while !cur.is_empty() && n < WRITE_MAX {
                    let at = out.len();
                    out.resize(at + s.body_offset(), 0);
                    let mut room = record::MAX_PLAIN.min(WRITE_MAX - n);
                    while room > 0 && !cur.is_empty() {
                        let k = cur.len().min(room);
                        out.extend_from_slice(&cur[..k]);
                        cur = &cur[k..];
                        room -= k;
                        n += k;
                        if cur.is_empty() {
                            cur = slices.next().unwrap_or(&[]);
                        }
                    }
                    s.seal(record::DATA, &mut out, at);
                }
                self.out.0 = Some(out);
                self.out_at = 0;
                self.flush_soft()?;
                n
            }
            State::Done => return Err(io::ErrorKind::BrokenPipe.into()),
        };
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Sends close_notify and what is pending (best effort: the connection is ending).
    pub fn close_notify(&mut self) {
        match &mut self.state {
            State::Handshake(hs) if !hs.is_handshaking() => hs.send_close_notify(),
            State::Handshake(_) => {} // an alert, if the handshake failed, is queued already
            State::Traffic(layer) => {
                let out = self.out.get();
                let mut s = layer.sealer();
                let at = out.len();
                out.resize(at + s.body_offset(), 0);
                out.extend_from_slice(&[1, 0]); // warning, close_notify
                s.seal(record::ALERT, out, at);
                self.state = State::Done;
            }
            State::Done => {}
        }
        let _ = self.flush_tls();
    }
}

impl<S> Drop for TlsStream<S> {
    fn drop(&mut self) {
        put_in(self.ibuf.0.take());
        self.out.release();
    }
}
