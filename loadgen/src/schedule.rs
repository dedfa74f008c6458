//! Open-loop send schedules: every sender has fixed send times, and latency is measured from
//! the *scheduled* time, so a stalled server cannot hide its stalls by slowing the senders
//! (coordinated-omission correction, as wrk2 does).

/// The fixed send times of one sender: `start + phase + k × interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    first_ns: u64,
    interval_ns: u64,
    next: u64,
}

impl Schedule {
    /// A schedule for sender `index` of `senders` sharing `total_rate` messages per second,
    /// starting at `start_ns`; senders are phase-shifted evenly across one interval.
    pub fn new(start_ns: u64, total_rate: f64, index: usize, senders: usize) -> Schedule {
        let senders = senders.max(1) as f64;
        let interval_ns = ((senders / total_rate.max(1e-9)) * 1e9).max(1.0) as u64;
        let phase = (interval_ns as f64 * (index as f64 / senders)) as u64;
        Schedule {
            first_ns: start_ns + phase % interval_ns.max(1),
            interval_ns,
            next: 0,
        }
    }

    /// Scheduled time of the next send.
    pub fn next_time(&self) -> u64 {
        self.first_ns + self.next * self.interval_ns
    }

    /// Interval between sends.
    pub fn interval_ns(&self) -> u64 {
        self.interval_ns
    }

    /// If the next send is due at `now_ns`, consumes it and returns its scheduled time.
    pub fn take_due(&mut self, now_ns: u64) -> Option<u64> {
        let t = self.next_time();
        (t <= now_ns).then(|| {
            self.next += 1;
            t
        })
    }

    /// Sends scheduled before `end_ns`.
    /// Skips every send due before `now_ns` (a sender that was away does not catch up).
    pub fn skip_to(&mut self, now_ns: u64) {
        self.next = self.next.max(self.count_before(now_ns));
    }

    pub fn count_before(&self, end_ns: u64) -> u64 {
        if end_ns <= self.first_ns {
            0
        } else {
            (end_ns - self.first_ns).div_ceil(self.interval_ns)
        }
    }
}

/// Latency of a message scheduled at `scheduled_ns` and received at `now_ns`, in µs (≥ 1).
pub fn latency_us(scheduled_ns: u64, now_ns: u64) -> u64 {
    (now_ns.saturating_sub(scheduled_ns) / 1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_is_shared_and_phased() {
        // 4 senders at 1000 msg/s in all: each sends every 4 ms, offset by 1 ms.
        let s: Vec<Schedule> = (0..4).map(|i| Schedule::new(0, 1000.0, i, 4)).collect();
        assert!(s.iter().all(|x| x.interval_ns() == 4_000_000));
        let firsts: Vec<u64> = s.iter().map(|x| x.next_time()).collect();
        assert_eq!(firsts, vec![0, 1_000_000, 2_000_000, 3_000_000]);
        let total: u64 = s.iter().map(|x| x.count_before(1_000_000_000)).sum();
        assert_eq!(total, 1000);
    }

    #[test]
    fn late_sender_keeps_the_schedule() {
        let mut s = Schedule::new(0, 10.0, 0, 1); // every 100 ms
                                                  // The loop wakes late, at 350 ms: four sends are due, each with its own scheduled time.
        let due: Vec<u64> = std::iter::from_fn(|| s.take_due(350_000_000)).collect();
        assert_eq!(due, vec![0, 100_000_000, 200_000_000, 300_000_000]);
        assert_eq!(s.take_due(350_000_000), None);
        // Latency counts from the scheduled time, not from when the send happened.
        assert_eq!(latency_us(due[0], 351_000_000), 351_000);
    }
}
