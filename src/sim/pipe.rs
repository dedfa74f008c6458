//! An in-memory connection: what a client wrote and the server has not read, what the server
//! wrote and the client has not read (bounded, like a socket's send buffer), FINs, and the
//! edge-triggered readiness a real socket would raise.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::rc::Rc;

use crate::router::Transport;

/// Both directions of one connection.
#[derive(Debug, Default)]
pub struct PipeState {
    /// Client → server bytes the server has not read.
    pub to_server: VecDeque<u8>,
    /// The client shut its write side (the server reads EOF after the bytes).
    pub client_fin: bool,
    /// Server → client bytes the client has not read.
    pub to_client: Vec<u8>,
    /// Capacity of the server → client direction (the socket buffers, in all).
    pub capacity: usize,
    /// The server shut its write side.
    pub server_fin: bool,
    /// New input or a FIN since the server last heard of it (EPOLLIN edge).
    pub read_edge: bool,
    /// Room appeared after the server was told `WouldBlock` (EPOLLOUT edge).
    pub write_edge: bool,
    /// The server was told `WouldBlock` on a write.
    pub write_blocked: bool,
    /// Total bytes the server wrote.
    pub written_total: u64,
    /// The server cut the connection with a reset: what the client had not read is gone.
    pub reset: bool,
}

impl PipeState {
    /// Client side: appends bytes for the server and raises the read edge.
    pub fn client_write(&mut self, b: &[u8]) {
        self.to_server.extend(b.iter().copied());
        self.read_edge = true;
    }

    /// Client side: shuts the client's write side.
    pub fn client_shutdown(&mut self) {
        self.client_fin = true;
        self.read_edge = true;
    }

    /// Client side: takes what the server wrote; raises the write edge if the server was
    /// blocked.
    pub fn client_read(&mut self) -> Vec<u8> {
        // A copy: the server's side keeps its capacity (its writes allocate nothing).
        let out = self.to_client.clone();
        self.to_client.clear();
        if !out.is_empty() && self.write_blocked {
            self.write_blocked = false;
            self.write_edge = true;
        }
        out
    }
}

/// The server's end of a pipe (shared with the client's end in the harness).
#[derive(Debug, Clone, Default)]
pub struct SimSocket(pub Rc<RefCell<PipeState>>);

impl SimSocket {
    /// A pipe whose server → client direction holds `capacity` bytes.
    pub fn new(capacity: usize) -> SimSocket {
        SimSocket(Rc::new(RefCell::new(PipeState {
            capacity,
            ..PipeState::default()
        })))
    }
}

impl Transport for SimSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut p = self.0.borrow_mut();
        if p.to_server.is_empty() {
            return if p.client_fin {
                Ok(0)
            } else {
                Err(io::ErrorKind::WouldBlock.into())
            };
        }
        let n = buf.len().min(p.to_server.len());
        for (i, b) in p.to_server.drain(..n).enumerate() {
            buf[i] = b;
        }
        Ok(n)
    }

    fn reset(&mut self) {
        let mut p = self.0.borrow_mut();
        p.reset = true;
        p.to_client.clear();
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        // The session never asks to write nothing (a real socket would answer 0, which the
        // session must read as an error): that would be a bug in its outbox.
        assert!(
            bufs.iter().any(|b| !b.is_empty()),
            "the session wrote zero bytes"
        );
        let mut p = self.0.borrow_mut();
        if p.server_fin {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let room = p.capacity.saturating_sub(p.to_client.len());
        if room == 0 {
            p.write_blocked = true;
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let mut n = 0;
        for b in bufs {
            let take = b.len().min(room - n);
            p.to_client.extend_from_slice(&b[..take]);
            n += take;
            if n == room {
                break;
            }
        }
        p.written_total += n as u64;
        Ok(n)
    }

    fn shutdown_write(&mut self) {
        self.0.borrow_mut().server_fin = true;
    }
}
