//! A pausable TCP proxy on loopback, for partitions without iptables: `partition()` cuts
//! every connection through it and swallows new ones (accepted, then silent: the caller's
//! timeouts run, as across a real partition); `heal()` drops the swallowed ones and forwards
//! again. Threads per connection; every loop ends when the proxy is dropped. The tests use
//! it, and `scripts/chaos.sh` through loadgen's `faultproxy` binary, which includes this file.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Proxy {
    pub port: u16,
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    stop: AtomicBool,
    partitioned: AtomicBool,
    /// Both ends of every forwarded connection, and the swallowed ones.
    open: Mutex<Vec<TcpStream>>,
}

impl Shared {
    fn cut_all(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

impl Proxy {
    /// Forwards a free `127.0.0.1:<port>` to `127.0.0.1:<upstream>`.
    pub fn start(upstream: u16) -> Proxy {
        Self::start_on(0, upstream)
    }

    /// Forwards `127.0.0.1:<port>` (0: a free one) to `127.0.0.1:<upstream>`.
    pub fn start_on(port: u16, upstream: u16) -> Proxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let shared = Arc::new(Shared::default());
        let s = shared.clone();
        std::thread::spawn(move || {
            while !s.stop.load(Ordering::Relaxed) {
                let client = match listener.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                let _ = client.set_nonblocking(false);
                if s.partitioned.load(Ordering::Relaxed) {
                    s.open.lock().unwrap().push(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue;
                };
                let _ = server.set_nodelay(true);
                let _ = client.set_nodelay(true);
                {
                    let mut open = s.open.lock().unwrap();
                    open.push(client.try_clone().unwrap());
                    open.push(server.try_clone().unwrap());
                }
                pump(client.try_clone().unwrap(), server.try_clone().unwrap());
                pump(server, client);
            }
            s.cut_all();
        });
        Proxy { port, shared }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Cuts every connection and swallows new ones until [`heal`](Self::heal).
    pub fn partition(&self) {
        self.shared.partitioned.store(true, Ordering::Relaxed);
        self.shared.cut_all();
    }

    /// Drops the swallowed connections and forwards new ones again.
    pub fn heal(&self) {
        self.shared.cut_all();
        self.shared.partitioned.store(false, Ordering::Relaxed);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.cut_all();
    }
}

/// Copies `from` to `to` until either side closes.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Both);
        let _ = from.shutdown(Shutdown::Both);
    });
}
