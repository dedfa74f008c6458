//! Filling shards in order. When the server runs more shards than cores only to get more fd
//! tables (`RLIMIT_NOFILE` caps each table), new connections go to the first `width` shards
//! that still have room, not to all of them: a classic BPF program attached to each
//! SO_REUSEPORT group picks the listener. The shards beyond stay empty until they are needed,
//! so they cost no wake-ups (a publish skips a shard with no subscriptions) and no CPU.
//!
//! The program is `A = random; A %= n; return eligible[A]`; it is rebuilt and attached again
//! (under a lock, by the shard whose fill crossed a mark) when a shard fills up or drains.
//! A listener's index in its group is the order it was bound ([`super::listener::bind_all`]
//! binds shard 0 first), and no listener leaves a group before shutdown, so shard `i` is index
//! `i`. An index past the group's end makes the kernel fall back to its hash: never a lost
//! connection.

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;

/// `SO_ATTACH_REUSEPORT_CBPF` (asm-generic; the libc crate defines it for Android only).
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;

/// Which shards take new connections, and when that changes.
#[derive(Debug)]
pub struct Steering {
    /// How many shards take new connections at a time (the cores).
    width: usize,
    /// A shard at or over this many open sockets stops taking new ones...
    high: usize,
    /// ...until it drops to this many.
    low: usize,
    full: Box<[AtomicBool]>,
    /// Serialises rebuilding and attaching the program.
    lock: Mutex<()>,
}

impl Steering {
    /// `shards` shards of `capacity` sockets each, `width` of them filling at a time.
    pub fn new(shards: usize, width: usize, capacity: usize) -> Steering {
        // Connections already in a full shard's accept queue when the program changes still
        // land there: the margin keeps room for them.
        let margin = (capacity / 16).max(8).min(capacity / 2);
        Steering {
            width: width.clamp(1, shards.max(1)),
            high: capacity - margin,
            low: capacity.saturating_sub(3 * margin),
            full: (0..shards).map(|_| AtomicBool::new(false)).collect(),
            lock: Mutex::new(()),
        }
    }

    /// Open sockets (with those queued) at which a shard stops taking new connections.
    pub fn high(&self) -> usize {
        self.high
    }

    /// The shards that take new connections: the first `width` that are not full (all of
    /// them when every shard is full: the kernel's accept queues then hold the surplus).
    pub fn eligible(&self) -> Vec<u32> {
        let open: Vec<u32> = (0..self.full.len())
            .filter(|&i| !self.full[i].load(Relaxed))
            .take(self.width)
            .map(|i| i as u32)
            .collect();
        if open.is_empty() {
            (0..self.full.len() as u32).collect()
        } else {
            open
        }
    }

    /// Shard `shard` has `open` sockets: when that crosses a mark, the program is rebuilt and
    /// attached through `listeners` (this shard's, one per address: each is its own group).
    /// Returns the new eligible shards when they changed.
    pub fn update(
        &self,
        shard: usize,
        open: usize,
        listeners: &[RawFd],
    ) -> io::Result<Option<Vec<u32>>> {
        let was_full = self.full[shard].load(Relaxed);
        let full = if was_full {
            open > self.low
        } else {
            open >= self.high
        };
        if full == was_full {
            return Ok(None);
        }
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.full[shard].store(full, Relaxed);
        let eligible = self.eligible();
        for &fd in listeners {
            attach(fd, &eligible)?;
        }
        Ok(Some(eligible))
    }
}

/// Attaches to `fd`'s SO_REUSEPORT group a program that picks uniformly among the listeners
/// at the indices `eligible` (non-empty).
pub fn attach(fd: RawFd, eligible: &[u32]) -> io::Result<()> {
    let mut code = program(eligible);
    let prog = libc::sock_fprog {
        len: code.len() as u16,
        filter: code.as_mut_ptr(),
    };
    // SAFETY: `prog` points at `code`, alive for the call; the kernel copies the program.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&prog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn insn(code: u32, jt: u8, jf: u8, k: u32) -> libc::sock_filter {
    libc::sock_filter {
        code: code as u16,
        jt,
        jf,
        k,
    }
}

/// `A = random % n`, then a chain of `if A == i return eligible[i]`.
fn program(eligible: &[u32]) -> Vec<libc::sock_filter> {
    assert!(
        !eligible.is_empty() && eligible.len() < 1024,
        "1..1024 listeners"
    );
    let n = eligible.len() as u32;
    let random = (libc::SKF_AD_OFF + libc::SKF_AD_RANDOM) as u32;
    let mut p = vec![
        insn(libc::BPF_LD | libc::BPF_W | libc::BPF_ABS, 0, 0, random),
        insn(libc::BPF_ALU | libc::BPF_MOD | libc::BPF_K, 0, 0, n),
    ];
    let (last, rest) = eligible.split_last().expect("non-empty");
    for (i, &index) in rest.iter().enumerate() {
        // Equal: fall through to the return; otherwise skip it.
        p.push(insn(
            libc::BPF_JMP | libc::BPF_JEQ | libc::BPF_K,
            0,
            1,
            i as u32,
        ));
        p.push(insn(libc::BPF_RET | libc::BPF_K, 0, 0, index));
    }
    p.push(insn(libc::BPF_RET | libc::BPF_K, 0, 0, *last));
    p
}

/// Connections waiting in a listener's accept queue (`tcpi_unacked` of a listening socket).
pub fn accept_queue_len(fd: RawFd) -> usize {
    // SAFETY: tcp_info is plain data; getsockopt writes at most `len` bytes into it.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` and `len` are valid for writes of the sizes given.
    let r = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if r == 0 {
        info.tcpi_unacked as usize
    } else {
        0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpStream;
    use std::os::fd::AsRawFd;

    #[test]
    fn the_program_sends_every_connection_to_the_eligible_listeners() {
        let addr = "127.0.0.1:0".parse().unwrap();
        let (bound, mut per_shard) = super::super::listener::bind_all(&[addr], 4, 128).unwrap();
        let listeners: Vec<std::net::TcpListener> =
            per_shard.iter_mut().map(|l| l.pop().unwrap()).collect();
        attach(listeners[0].as_raw_fd(), &[1, 3]).unwrap();
        let clients: Vec<TcpStream> = (0..40)
            .map(|_| TcpStream::connect(bound[0]).unwrap())
            .collect();
        // Bounded wait for every connection to reach an accept queue.
        let mut accepted = [0usize; 4];
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while accepted.iter().sum::<usize>() < clients.len() && std::time::Instant::now() < end {
            for (i, l) in listeners.iter().enumerate() {
                accepted[i] += std::iter::from_fn(|| l.accept().ok()).count();
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(accepted[0] + accepted[2], 0, "not eligible: {accepted:?}");
        assert_eq!(accepted[1] + accepted[3], clients.len(), "{accepted:?}");
        assert!(
            accepted[1] > 0 && accepted[3] > 0,
            "both eligible ones used: {accepted:?}"
        );
    }

    #[test]
    fn the_accept_queue_length_is_read_from_the_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert_eq!(accept_queue_len(l.as_raw_fd()), 0);
        let a = l.local_addr().unwrap();
        let _c: Vec<TcpStream> = (0..3).map(|_| TcpStream::connect(a).unwrap()).collect();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while accept_queue_len(l.as_raw_fd()) < 3 && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert_eq!(accept_queue_len(l.as_raw_fd()), 3);
        l.accept().unwrap();
        assert_eq!(accept_queue_len(l.as_raw_fd()), 2);
    }

    #[test]
    fn a_full_shard_hands_new_connections_to_the_next_one() {
        let s = Steering::new(4, 2, 1000);
        assert_eq!(s.eligible(), vec![0, 1]);
        assert_eq!(s.update(0, s.high, &[]).unwrap(), Some(vec![1, 2]));
        assert_eq!(s.eligible(), vec![1, 2]);
        // Hysteresis: a few closes do not reopen it.
        assert_eq!(s.update(0, s.high - 1, &[]).unwrap(), None);
        assert_eq!(s.eligible(), vec![1, 2]);
        s.update(0, s.low, &[]).unwrap();
        assert_eq!(s.eligible(), vec![0, 1]);
        for i in 0..4 {
            s.update(i, 1000, &[]).unwrap();
        }
        assert_eq!(
            s.eligible(),
            vec![0, 1, 2, 3],
            "all full: the hash spreads them"
        );
    }
}
