//! Hierarchical timer wheel in the shape of tokio's: 6 levels × 64 slots of 1 ms ticks, an
//! `occupied` bitmap per level, entries in a `Slab` linked by index (no unsafe lists).
//!
//! The wheel never reads a clock: callers pass `now` (in ticks) to [`Wheel::poll`], so tests
//! replay time without sleeping. Insert and cancel are O(1); an expiring higher-level slot
//! cascades its entries to lower levels.

use std::num::NonZeroU8;

use slab::Slab;

/// Slots per level (a power of two: the level index is computed from bit positions).
const SLOTS: usize = 64;
const SLOT_BITS: u32 = 6;
/// Levels: 64^6 ms ≈ 2.2 years of range; later deadlines are clamped to the last slot.
const LEVELS: usize = 6;
/// Largest representable distance from `elapsed`.
const MAX_DURATION: u64 = (1 << (SLOT_BITS * LEVELS as u32)) - 1;
const NIL: u32 = u32::MAX;

/// Handle to a scheduled entry; pass it to [`Wheel::cancel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerKey(u32);

impl TimerKey {
    /// No entry (a connection between deadlines). Cancelling it is a no-op.
    pub const NONE: TimerKey = TimerKey(NIL);

    /// Whether this refers to an entry.
    pub fn is_some(self) -> bool {
        self != Self::NONE
    }
}

#[derive(Debug)]
struct Entry<T> {
    deadline: u64,
    value: T,
    prev: u32,
    next: u32,
    /// Level + 1; `LEVELS + 1` marks an entry in the `due` list (deadline already passed at
    /// insert). Never zero: the slab's vacant entries use that niche, so an entry costs 24
    /// bytes instead of 32 (one per connection).
    level1: NonZeroU8,
    slot: u8,
}

impl<T> Entry<T> {
    fn level(&self) -> usize {
        self.level1.get() as usize - 1
    }

    fn set_level(&mut self, level: usize) {
        self.level1 = NonZeroU8::new(level as u8 + 1).expect("level + 1 > 0");
    }
}

#[derive(Debug, Clone, Copy)]
struct Level {
    occupied: u64,
    heads: [u32; SLOTS],
}

impl Level {
    const EMPTY: Level = Level {
        occupied: 0,
        heads: [NIL; SLOTS],
    };
}

/// A hierarchical timing wheel holding values of type `T` (usually a slab key).
#[derive(Debug)]
pub struct Wheel<T> {
    entries: Slab<Entry<T>>,
    levels: [Level; LEVELS],
    /// Entries whose deadline had passed when inserted; fire on the next poll.
    due_head: u32,
    /// Tick up to which the wheel has been processed.
    elapsed: u64,
}

impl<T: Copy> Default for Wheel<T> {
    fn default() -> Self {
        Self::new(0)
    }
}

impl<T: Copy> Wheel<T> {
    /// A wheel whose time starts at `now` ticks.
    pub fn new(now: u64) -> Self {
        Self::with_capacity(now, 0)
    }

    /// A wheel with room for `n` entries before its slab grows (a shard sizes it for the
    /// connections its fd table holds: growing by doubling copies the slab, and the old
    /// copy stays resident for a while).
    pub fn with_capacity(now: u64, n: usize) -> Self {
        Wheel {
            entries: Slab::with_capacity(n),
            levels: [Level::EMPTY; LEVELS],
            due_head: NIL,
            elapsed: now,
        }
    }

    /// Number of scheduled entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when nothing is scheduled.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Tick the wheel has been advanced to.
    pub fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// Schedules `value` to fire at tick `deadline`. A deadline in the past fires on the next poll.
    pub fn insert(&mut self, deadline: u64, value: T) -> TimerKey {
        let key = self.entries.insert(Entry {
            deadline,
            value,
            prev: NIL,
            next: NIL,
            level1: NonZeroU8::MIN,
            slot: 0,
        });
        assert!(key < NIL as usize, "timer wheel full");
        self.file(key as u32);
        TimerKey(key as u32)
    }

    /// Removes a scheduled entry and returns its value; `None` if it already fired.
    pub fn cancel(&mut self, key: TimerKey) -> Option<T> {
        if key == TimerKey::NONE || !self.entries.contains(key.0 as usize) {
            return None;
        }
        self.unlink(key.0);
        Some(self.entries.remove(key.0 as usize).value)
    }

    /// Value of an entry still scheduled.
    pub fn get(&self, key: TimerKey) -> Option<&T> {
        if key == TimerKey::NONE {
            return None;
        }
        self.entries.get(key.0 as usize).map(|e| &e.value)
    }

    /// Deadline of an entry still scheduled.
    pub fn deadline(&self, key: TimerKey) -> Option<u64> {
        self.entries.get(key.0 as usize).map(|e| e.deadline)
    }

    /// The earliest tick at which [`poll`](Self::poll) may return something, if any.
    /// (A cascade may return nothing at that tick; the caller simply asks again.)
    pub fn next_expiration(&self) -> Option<u64> {
        if self.due_head != NIL {
            return Some(self.elapsed);
        }
        (0..LEVELS).find_map(|l| self.level_next(l).map(|(_, deadline)| deadline))
    }

    /// Advances to `now` and appends every expired `(key, value)` to `out`, in deadline order
    /// per slot. Returns how many were appended. At most `max` are appended per call; call
    /// again (with the same `now`) when the return equals `max`.
    pub fn poll(&mut self, now: u64, out: &mut Vec<T>, max: usize) -> usize {
        let start = out.len();
        loop {
            while self.due_head != NIL {
                if out.len() - start >= max {
                    return out.len() - start;
                }
                let idx = self.due_head;
                self.unlink(idx);
                out.push(self.entries.remove(idx as usize).value);
            }
            let Some((level, slot, deadline)) = self.next_slot() else {
                break;
            };
            if deadline > now {
                break;
            }
            self.elapsed = deadline;
            // Take the whole slot list and re-file each entry: those due now land in the due
            // list, the rest cascade to a lower level.
            let mut idx = self.levels[level].heads[slot];
            self.levels[level].heads[slot] = NIL;
            self.levels[level].occupied &= !(1u64 << slot);
            while idx != NIL {
                let next = self.entries[idx as usize].next;
                self.file(idx);
                idx = next;
            }
        }
        if self.elapsed < now {
            self.elapsed = now;
        }
        out.len() - start
    }

    /// Checks the linkage invariants (debug builds and tests).
    pub fn check_invariants(&self) {
        let mut seen = 0usize;
        for (l, level) in self.levels.iter().enumerate() {
            for s in 0..SLOTS {
                let head = level.heads[s];
                assert_eq!(
                    head != NIL,
                    level.occupied & (1 << s) != 0,
                    "bitmap l{l} s{s}"
                );
                let mut prev = NIL;
                let mut idx = head;
                while idx != NIL {
                    let e = &self.entries[idx as usize];
                    assert_eq!((e.level(), e.slot as usize), (l, s));
                    assert_eq!(e.prev, prev);
                    prev = idx;
                    idx = e.next;
                    seen += 1;
                }
            }
        }
        let mut idx = self.due_head;
        while idx != NIL {
            seen += 1;
            idx = self.entries[idx as usize].next;
        }
        assert_eq!(
            seen,
            self.entries.len(),
            "every entry is linked exactly once"
        );
    }

    fn level_for(elapsed: u64, when: u64) -> usize {
        let masked = (elapsed ^ when) | (SLOTS as u64 - 1);
        let masked = masked.min(MAX_DURATION);
        let significant = 63 - masked.leading_zeros();
        (significant / SLOT_BITS) as usize
    }

    fn slot_for(when: u64, level: usize) -> usize {
        ((when >> (level as u32 * SLOT_BITS)) & (SLOTS as u64 - 1)) as usize
    }

    /// Links entry `idx` into the list its deadline belongs to.
    fn file(&mut self, idx: u32) {
        let elapsed = self.elapsed;
        let e = &mut self.entries[idx as usize];
        if e.deadline <= elapsed {
            e.set_level(LEVELS);
            e.prev = NIL;
            e.next = self.due_head;
            let old = self.due_head;
            self.due_head = idx;
            if old != NIL {
                self.entries[old as usize].prev = idx;
            }
            return;
        }
        let when = e.deadline.min(elapsed + MAX_DURATION);
        let level = Self::level_for(elapsed, when);
        let slot = Self::slot_for(when, level);
        e.set_level(level);
        e.slot = slot as u8;
        e.prev = NIL;
        let old = self.levels[level].heads[slot];
        e.next = old;
        if old != NIL {
            self.entries[old as usize].prev = idx;
        }
        self.levels[level].heads[slot] = idx;
        self.levels[level].occupied |= 1u64 << slot;
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next, level, slot) = {
            let e = &self.entries[idx as usize];
            (e.prev, e.next, e.level(), e.slot as usize)
        };
        if prev != NIL {
            self.entries[prev as usize].next = next;
        } else if level == LEVELS {
            self.due_head = next;
        } else {
            self.levels[level].heads[slot] = next;
            if next == NIL {
                self.levels[level].occupied &= !(1u64 << slot);
            }
        }
        if next != NIL {
            self.entries[next as usize].prev = prev;
        }
    }

    fn next_slot(&self) -> Option<(usize, usize, u64)> {
        (0..LEVELS).find_map(|l| self.level_next(l).map(|(s, d)| (l, s, d)))
    }

    /// Next occupied slot of `level` at or after `elapsed`, and the tick it starts at.
    fn level_next(&self, level: usize) -> Option<(usize, u64)> {
        let occupied = self.levels[level].occupied;
        if occupied == 0 {
            return None;
        }
        let slot_range = 1u64 << (level as u32 * SLOT_BITS);
        let level_range = slot_range << SLOT_BITS;
        let now_slot = (self.elapsed / slot_range) as u32;
        let zeros = occupied.rotate_right(now_slot).trailing_zeros();
        let slot = (zeros as u64 + now_slot as u64) % SLOTS as u64;
        let level_start = self.elapsed & !(level_range - 1);
        let mut deadline = level_start + slot * slot_range;
        if deadline <= self.elapsed {
            // Only the top level wraps around: its slots act as a ring beyond MAX_DURATION.
            debug_assert_eq!(level, LEVELS - 1);
            deadline += level_range;
        }
        Some((slot as usize, deadline))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain(w: &mut Wheel<u64>, now: u64) -> Vec<u64> {
        let mut out = Vec::new();
        while w.poll(now, &mut out, 1024) == 1024 {}
        w.check_invariants();
        out
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = Wheel::new(0);
        w.insert(10, 10);
        assert!(drain(&mut w, 9).is_empty());
        assert_eq!(drain(&mut w, 10), vec![10]);
        assert!(w.is_empty());
    }

    #[test]
    fn past_deadline_fires_on_next_poll() {
        let mut w = Wheel::new(100);
        w.insert(50, 1);
        assert_eq!(w.next_expiration(), Some(100));
        assert_eq!(drain(&mut w, 100), vec![1]);
    }

    #[test]
    fn cancel_removes_entry() {
        let mut w = Wheel::new(0);
        let a = w.insert(5, 1);
        let _b = w.insert(5, 2);
        assert_eq!(w.cancel(a), Some(1));
        assert_eq!(w.cancel(a), None);
        w.check_invariants();
        assert_eq!(drain(&mut w, 5), vec![2]);
    }

    #[test]
    fn cascades_across_levels() {
        let mut w = Wheel::new(0);
        let deadlines = [
            63u64, 64, 65, 4095, 4096, 4097, 262_143, 262_144, 300_000, 20_000_000,
        ];
        for &d in &deadlines {
            w.insert(d, d);
        }
        w.check_invariants();
        for &d in &deadlines {
            assert!(
                drain(&mut w, d - 1).iter().all(|&v| v < d),
                "nothing at or after {d} early"
            );
            assert_eq!(drain(&mut w, d), vec![d], "deadline {d}");
        }
        assert!(w.is_empty());
    }

    #[test]
    fn next_expiration_is_never_late() {
        let mut w = Wheel::new(7);
        w.insert(5000, 1);
        let mut now = 7;
        // Follow next_expiration like the shard loop does: never overshoot the deadline.
        for _ in 0..100 {
            let next = w.next_expiration().expect("scheduled");
            assert!(next <= 5000);
            now = next;
            if !drain(&mut w, now).is_empty() {
                break;
            }
        }
        assert_eq!(now, 5000);
    }

    #[test]
    fn ordering_with_random_deadlines() {
        // Seeded LCG: deterministic, no external crates.
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut rnd = || {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            seed >> 33
        };
        let mut w = Wheel::new(0);
        let mut expected = Vec::new();
        let mut keys = Vec::new();
        for i in 0..20_000u64 {
            let d = rnd() % 5_000_000;
            keys.push((w.insert(d, d), d, i));
        }
        // Cancel every third.
        for (k, d, i) in &keys {
            if i % 3 == 0 {
                assert_eq!(w.cancel(*k), Some(*d));
            } else {
                expected.push(*d);
            }
        }
        expected.sort_unstable();
        let mut fired = Vec::new();
        let mut now = 0;
        while !w.is_empty() {
            now = w.next_expiration().unwrap();
            let batch = drain(&mut w, now);
            assert!(batch.iter().all(|&d| d <= now), "nothing fires early");
            fired.extend(batch);
        }
        assert!(now <= 5_000_000);
        let mut sorted = fired.clone();
        sorted.sort_unstable();
        assert_eq!(fired, sorted, "fired in deadline order");
        assert_eq!(fired, expected);
    }

    #[test]
    fn one_million_entries() {
        let mut w = Wheel::new(0);
        for i in 0..1_000_000u64 {
            w.insert(25_000 + (i % 25_000), i);
        }
        assert_eq!(w.len(), 1_000_000);
        assert!(drain(&mut w, 24_999).is_empty());
        let first = drain(&mut w, 25_000);
        assert_eq!(first.len(), 40);
        let rest = drain(&mut w, 60_000);
        assert_eq!(rest.len(), 1_000_000 - 40);
        assert!(w.is_empty());
    }

    #[test]
    fn far_future_is_clamped_not_lost() {
        let mut w = Wheel::new(0);
        w.insert(u64::MAX / 2, 9);
        assert!(drain(&mut w, 1_000_000).is_empty());
        assert_eq!(w.len(), 1);
    }

    #[test]
    fn poll_respects_max() {
        let mut w = Wheel::new(0);
        for i in 0..10 {
            w.insert(3, i);
        }
        let mut out = Vec::new();
        assert_eq!(w.poll(3, &mut out, 4), 4);
        assert_eq!(w.poll(3, &mut out, 4), 4);
        assert_eq!(w.poll(3, &mut out, 4), 2);
        assert_eq!(out.len(), 10);
        w.check_invariants();
    }

    /// A connection's entry (value `u32`, its slab key) stays 24 bytes in the slab: the
    /// level's niche holds the slab's vacant tag (`SlabEntry` mirrors `slab::Entry`).
    #[test]
    fn a_connection_entry_is_24_bytes_in_the_slab() {
        #[allow(dead_code)]
        enum SlabEntry<T> {
            Vacant(usize),
            Occupied(T),
        }
        assert_eq!(std::mem::size_of::<SlabEntry<Entry<u32>>>(), 24);
    }
}
