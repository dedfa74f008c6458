//! Admission control: what keeps a storm or an abuser from taking a shard down. Per shard, a
//! handshake rate (GCRA, like the per-connection message rate in `ops.rs`) and a cap on
//! connections that have not finished their HTTP exchange (slowloris); per process, a table
//! of connections per source address. Every refusal says when to come back, with jitter, so
//! refused clients do not return as one wave (`docs/operations.md`).

use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU32, Ordering};

/// Buckets of the per-address table (a hash of the address picks one; 256 KiB). A
/// connection keeps `bucket + 1` in a `u16` (0: not counted).
const IP_BUCKETS: usize = (1 << 16) - 1;

/// The address already has `--max-connections-per-ip` connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AtLimit;

/// Connections per source address, process-wide: a table of counters indexed by a keyed hash
/// of the address. Two addresses may share a bucket (and a limit) — with 65,536 buckets,
/// rarely — but a connection only stores its 2-byte bucket, not its address.
pub struct IpTable {
    counts: Box<[AtomicU32]>,
    hasher: std::collections::hash_map::RandomState,
    limit: u32,
    /// Loopback peers are counted too (off by default: loadgen and local proxies).
    loopback: bool,
}

impl std::fmt::Debug for IpTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpTable")
            .field("limit", &self.limit)
            .finish()
    }
}

impl IpTable {
    /// A table allowing `limit` connections per address (0: no limit).
    pub fn new(limit: u32, loopback: bool) -> IpTable {
        IpTable {
            counts: (0..IP_BUCKETS).map(|_| AtomicU32::new(0)).collect(),
            hasher: Default::default(),
            limit,
            loopback,
        }
    }

    /// Counts a connection from `ip`: `Ok(Some(bucket))` to give back at close, `Ok(None)`
    /// when it is not counted, `Err` when the address is at its limit.
    pub fn admit(&self, ip: IpAddr) -> Result<Option<u16>, AtLimit> {
        if self.limit == 0 || (ip.is_loopback() && !self.loopback) {
            return Ok(None);
        }
        let b = (self.hasher.hash_one(ip) as usize % IP_BUCKETS) as u16;
        let c = &self.counts[b as usize];
        let mut n = c.load(Ordering::Relaxed);
        loop {
            if n >= self.limit {
                return Err(AtLimit);
            }
            match c.compare_exchange_weak(n, n + 1, Ordering::AcqRel, Ordering::Relaxed) {
                Ok(_) => return Ok(Some(b)),
                Err(now) => n = now,
            }
        }
    }

    /// A counted connection closed.
    pub fn release(&self, bucket: u16) {
        self.counts[bucket as usize].fetch_sub(1, Ordering::AcqRel);
    }
}

/// One shard's handshake gate.
#[derive(Debug, Default)]
pub struct HandshakeGate {
    /// GCRA: the theoretical arrival time (µs, shard clock) of the next handshake.
    tat_us: u64,
    /// Refusals in the current and the previous second, to spread retries over the time the
    /// refused demand needs.
    window_start_ms: u64,
    refused_now: u32,
    refused_before: u32,
}

impl HandshakeGate {
    /// Admits one handshake at `now_ms` under `rate` per second with a burst of one second's
    /// worth; otherwise the milliseconds to wait (jittered by `salt`) before retrying.
    pub fn admit(&mut self, now_ms: u64, rate: u32, salt: u64) -> Result<(), u64> {
        if rate == 0 {
            return Ok(());
        }
        let now_us = now_ms * 1000;
        let interval_us = 1_000_000 / rate as u64;
        let tolerance_us = 1_000_000;
        let tat = self.tat_us.max(now_us);
        if tat + interval_us <= now_us + tolerance_us {
            self.tat_us = tat + interval_us;
            return Ok(());
        }
        if now_ms >= self.window_start_ms + 1000 {
            let gap = now_ms - self.window_start_ms;
            self.refused_before = if gap < 2000 { self.refused_now } else { 0 };
            self.refused_now = 0;
            self.window_start_ms = now_ms;
        }
        self.refused_now += 1;
        let wait_ms = (tat + interval_us - now_us - tolerance_us).div_ceil(1000);
        let span = spread_span_ms(self.refused_now.max(self.refused_before), rate);
        Err(wait_ms + mix(salt) % span)
    }
}

/// The time `refused` handshakes take at `rate` per second (at least one second, at most a
/// minute): the span refused clients' retries are spread over.
pub fn spread_span_ms(refused: u32, rate: u32) -> u64 {
    (refused as u64 * 1000 / rate.max(1) as u64).clamp(1000, 60_000)
}

/// A 64-bit mixer (splitmix64's finaliser): jitter without a random number generator, the
/// same for the same inputs (the simulation replays).
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The close reason (1013, 1001) or `Retry-After` carrier for a client to wait `ms`.
pub fn retry_reason(what: &str, ms: u64) -> String {
    format!("{what}; retry_after_ms={ms}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_admits_a_burst_then_the_rate_and_spreads_the_refused() {
        let mut g = HandshakeGate::default();
        // 100/s with a burst of one second: 100 at once, then one per 10 ms.
        for i in 0..100 {
            assert!(g.admit(0, 100, i).is_ok(), "{i}");
        }
        let waits: Vec<u64> = (0..50).map(|i| g.admit(0, 100, i).unwrap_err()).collect();
        assert!(waits.iter().all(|&w| (10..=1010).contains(&w)), "{waits:?}");
        let distinct: std::collections::BTreeSet<_> = waits.iter().collect();
        assert!(distinct.len() > 40, "jittered: {waits:?}");
        assert!(g.admit(10, 100, 0).is_ok());
        assert!(g.admit(10, 100, 0).is_err());
        assert_eq!(g.admit(0, 0, 0), Ok(()), "rate 0: no limit");
    }

    #[test]
    fn the_ip_table_counts_per_address_and_exempts_loopback() {
        let t = IpTable::new(2, false);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        let ba = t.admit(a).unwrap().unwrap();
        t.admit(a).unwrap().unwrap();
        assert_eq!(t.admit(a), Err(AtLimit));
        assert!(t.admit(b).is_ok());
        t.release(ba);
        assert!(t.admit(a).is_ok(), "a close frees a place");
        let lo: IpAddr = "127.0.0.1".parse().unwrap();
        for _ in 0..10 {
            assert_eq!(t.admit(lo), Ok(None));
        }
        let strict = IpTable::new(1, true);
        strict.admit(lo).unwrap();
        assert_eq!(strict.admit(lo), Err(AtLimit));
    }
}
