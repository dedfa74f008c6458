//! A timerfd in the worker's poll: sends wake at their scheduled time to the microsecond.
//! epoll's own timeout has millisecond granularity (mio rounds a 50 µs wait up to 1 ms), so
//! without it a send due in 50 µs goes out up to a millisecond late, and open-loop latency,
//! measured from the scheduled time, counts that lateness as the server's.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

/// A non-blocking CLOCK_MONOTONIC timerfd.
#[derive(Debug)]
pub struct TimerFd {
    fd: OwnedFd,
    /// Nanoseconds (loadgen clock) it is armed for; 0: disarmed.
    armed_for: u64,
}

impl TimerFd {
    /// A disarmed timer, registered readable under `token`.
    pub fn new(registry: &Registry, token: Token) -> io::Result<TimerFd> {
        // SAFETY: timerfd_create takes no pointers; a negative result is an error.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        registry.register(&mut SourceFd(&fd.as_raw_fd()), token, Interest::READABLE)?;
        Ok(TimerFd { fd, armed_for: 0 })
    }

    /// Fires `in_ns` from now, for the deadline `at` (not re-armed for the same deadline).
    pub fn arm(&mut self, at: u64, in_ns: u64) -> io::Result<()> {
        if at == self.armed_for {
            return Ok(());
        }
        let in_ns = in_ns.max(1); // 0 would disarm
        let spec = libc::itimerspec {
            it_interval: libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            },
            it_value: libc::timespec {
                tv_sec: (in_ns / 1_000_000_000) as libc::time_t,
                tv_nsec: (in_ns % 1_000_000_000) as libc::c_long,
            },
        };
        // SAFETY: valid fd and itimerspec; the old value is not asked for.
        let r =
            unsafe { libc::timerfd_settime(self.fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r != 0 {
            return Err(io::Error::last_os_error());
        }
        self.armed_for = at;
        Ok(())
    }

    /// After it fired: reads the expiry count, so the next expiry is a new edge.
    pub fn clear(&mut self) {
        let mut buf = [0u8; 8];
        // SAFETY: reads at most 8 bytes into `buf`; EAGAIN (nothing to read) is fine.
        unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        self.armed_for = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn wakes_the_poll_well_under_a_millisecond() {
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(4);
        let mut t = TimerFd::new(poll.registry(), Token(7)).unwrap();
        // 200 µs: epoll's own timeout could not express it.
        let start = Instant::now();
        t.arm(1, 200_000).unwrap();
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        let waited = start.elapsed();
        assert!(events.iter().any(|e| e.token() == Token(7)));
        assert!(waited >= Duration::from_micros(200), "{waited:?}");
        // Not a timing assertion on a busy machine: it woke for the timer, not the 5 s
        // timeout.
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        t.clear();
        t.arm(2, 100_000).unwrap();
        poll.poll(&mut events, Some(Duration::from_secs(5)))
            .unwrap();
        assert!(
            events.iter().any(|e| e.token() == Token(7)),
            "fires again after clear"
        );
    }
}
