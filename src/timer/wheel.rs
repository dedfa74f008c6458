//! Hierarchical timer wheel in the shape of tokio's: 6 levels × 64 slots of 1 ms ticks, an
//! `occupied` bitmap per level, entries linked by index (no unsafe lists).
//!
//! The wheel is keyed: entry `k` belongs to the caller's key `k` (a shard's connection slot,
//! each of which holds exactly one deadline), so an entry stores no value and the caller
//! stores no handle. An entry is 16 bytes: the deadline with its level and slot packed in
//! the top bits, and two links. Keys are dense (slab slots): entries live in a `Vec` indexed
//! by key, and an unarmed entry is all zero in its level bits.
//!
//! The wheel never reads a clock: callers pass `now` (in ticks) to [`Wheel::poll`], so tests
//! replay time without sleeping. Arm and cancel are O(1); an expiring higher-level slot
//! cascades its entries to lower levels.

/// Slots per level (a power of two: the level index is computed from bit positions).
const SLOTS: usize = 64;
const SLOT_BITS: u32 = 6;
/// Levels: 64^6 ms ≈ 2.2 years of range; later deadlines are clamped to the last slot.
const LEVELS: usize = 6;
/// Largest representable distance from `elapsed`.
const MAX_DURATION: u64 = (1 << (SLOT_BITS * LEVELS as u32)) - 1;
const NIL: u32 = u32::MAX;

/// Deadlines are kept in the low 48 bits (8,900 years of 1 ms ticks); later ones are clamped.
const DEADLINE_BITS: u32 = 48;
const DEADLINE_MAX: u64 = (1 << DEADLINE_BITS) - 1;
/// Bits 48..54: the slot. Bits 54..57: the level + 1 (0: not armed; `LEVELS + 1`: the due
/// list, for deadlines already passed when filed).
const SLOT_SHIFT: u32 = DEADLINE_BITS;
const LEVEL_SHIFT: u32 = SLOT_SHIFT + SLOT_BITS;
const DUE: usize = LEVELS + 1;

#[derive(Debug, Clone, Copy, Default)]
struct Entry {
    /// Deadline, slot and level + 1, packed (see `SLOT_SHIFT`, `LEVEL_SHIFT`).
    meta: u64,
    prev: u32,
    next: u32,
}

impl Entry {
    fn deadline(&self) -> u64 {
        self.meta & DEADLINE_MAX
    }

    /// Level + 1: 0 when not armed, [`DUE`] in the due list.
    fn level1(&self) -> usize {
        (self.meta >> LEVEL_SHIFT) as usize
    }

    fn slot(&self) -> usize {
        ((self.meta >> SLOT_SHIFT) & (SLOTS as u64 - 1)) as usize
    }

    fn armed(&self) -> bool {
        self.level1() != 0
    }

    fn set_place(&mut self, level1: usize, slot: usize) {
        self.meta = self.deadline() | (slot as u64) << SLOT_SHIFT | (level1 as u64) << LEVEL_SHIFT;
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

/// A hierarchical timing wheel of keyed deadlines: at most one per key.
#[derive(Debug)]
pub struct Wheel {
    entries: Vec<Entry>,
    /// Armed entries.
    len: usize,
    levels: [Level; LEVELS],
    /// Entries whose deadline had passed when filed; fire on the next poll.
    due_head: u32,
    /// Tick up to which the wheel has been processed.
    elapsed: u64,
}

impl Default for Wheel {
    fn default() -> Self {
        Self::new(0)
    }
}

impl Wheel {
    /// A wheel whose time starts at `now` ticks.
    pub fn new(now: u64) -> Self {
        Self::with_capacity(now, 0)
    }

    /// A wheel with room for keys below `n` before its table grows (a shard sizes it for the
    /// connections its fd table holds: growing by doubling copies the table, and the old
    /// copy stays resident for a while).
    pub fn with_capacity(now: u64, n: usize) -> Self {
        Wheel {
            entries: Vec::with_capacity(n),
            len: 0,
            levels: [Level::EMPTY; LEVELS],
            due_head: NIL,
            elapsed: now,
        }
    }

    /// Number of armed keys.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when nothing is armed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Tick the wheel has been advanced to.
    pub fn elapsed(&self) -> u64 {
        self.elapsed
    }

    /// Arms `key` to fire at tick `deadline`, replacing its deadline if it had one. A
    /// deadline in the past fires on the next poll.
    pub fn arm(&mut self, key: u32, deadline: u64) {
        assert!(key != NIL, "timer wheel key out of range");
        let idx = key as usize;
        if idx >= self.entries.len() {
            self.entries.resize(idx + 1, Entry::default());
        }
        if self.entries[idx].armed() {
            self.unlink(key);
        } else {
            self.len += 1;
        }
        // `file` records the level and slot.
        self.entries[idx].meta = deadline.min(DEADLINE_MAX);
        self.file(key);
    }

    /// Disarms `key`; false if it had no deadline (never armed, cancelled, or fired).
    pub fn cancel(&mut self, key: u32) -> bool {
        if !self.is_armed(key) {
            return false;
        }
        self.disarm(key);
        true
    }

    /// Whether `key` has a deadline.
    pub fn is_armed(&self, key: u32) -> bool {
        self.entries.get(key as usize).is_some_and(Entry::armed)
    }

    /// Deadline of an armed key.
    pub fn deadline(&self, key: u32) -> Option<u64> {
        self.entries
            .get(key as usize)
            .filter(|e| e.armed())
            .map(Entry::deadline)
    }

    /// The earliest tick at which [`poll`](Self::poll) may return something, if any.
    /// (A cascade may return nothing at that tick; the caller simply asks again.)
    pub fn next_expiration(&self) -> Option<u64> {
        if self.due_head != NIL {
            return Some(self.elapsed);
        }
        (0..LEVELS).find_map(|l| self.level_next(l).map(|(_, deadline)| deadline))
    }

    /// Advances to `now` and appends every expired key to `out` (disarmed), in deadline
    /// order per slot. Returns how many were appended. At most `max` are appended per call;
    /// call again (with the same `now`) when the return equals `max`.
    pub fn poll(&mut self, now: u64, out: &mut Vec<u32>, max: usize) -> usize {
        let start = out.len();
        loop {
            while self.due_head != NIL {
                if out.len() - start >= max {
                    return out.len() - start;
                }
                let idx = self.due_head;
                self.disarm(idx);
                out.push(idx);
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
                    assert_eq!((e.level1(), e.slot()), (l + 1, s));
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
        assert_eq!(seen, self.len, "every armed entry is linked exactly once");
        assert_eq!(
            self.entries.iter().filter(|e| e.armed()).count(),
            self.len,
            "armed entries are counted"
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
        if e.deadline() <= elapsed {
            e.set_place(DUE, 0);
            e.prev = NIL;
            e.next = self.due_head;
            let old = self.due_head;
            self.due_head = idx;
            if old != NIL {
                self.entries[old as usize].prev = idx;
            }
            return;
        }
        let when = e.deadline().min(elapsed + MAX_DURATION);
        let level = Self::level_for(elapsed, when);
        let slot = Self::slot_for(when, level);
        e.set_place(level + 1, slot);
        e.prev = NIL;
        let old = self.levels[level].heads[slot];
        e.next = old;
        if old != NIL {
            self.entries[old as usize].prev = idx;
        }
        self.levels[level].heads[slot] = idx;
        self.levels[level].occupied |= 1u64 << slot;
    }

    /// Unlinks armed entry `idx` and marks it unarmed.
    fn disarm(&mut self, idx: u32) {
        self.unlink(idx);
        self.entries[idx as usize].meta = 0;
        self.len -= 1;
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next, level1, slot) = {
            let e = &self.entries[idx as usize];
            (e.prev, e.next, e.level1(), e.slot())
        };
        if prev != NIL {
            self.entries[prev as usize].next = next;
        } else if level1 == DUE {
            self.due_head = next;
        } else {
            let level = level1 - 1;
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

    fn drain(w: &mut Wheel, now: u64) -> Vec<u32> {
        let mut out = Vec::new();
        while w.poll(now, &mut out, 1024) == 1024 {}
        w.check_invariants();
        out
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = Wheel::new(0);
        w.arm(10, 10);
        assert!(drain(&mut w, 9).is_empty());
        assert_eq!(drain(&mut w, 10), vec![10]);
        assert!(w.is_empty());
        assert!(!w.is_armed(10), "a fired key is disarmed");
    }

    #[test]
    fn past_deadline_fires_on_next_poll() {
        let mut w = Wheel::new(100);
        w.arm(1, 50);
        assert_eq!(w.next_expiration(), Some(100));
        assert_eq!(drain(&mut w, 100), vec![1]);
    }

    #[test]
    fn cancel_removes_entry() {
        let mut w = Wheel::new(0);
        w.arm(1, 5);
        w.arm(2, 5);
        assert!(w.cancel(1));
        assert!(!w.cancel(1));
        assert!(!w.cancel(7), "a key never armed");
        w.check_invariants();
        assert_eq!(drain(&mut w, 5), vec![2]);
    }

    #[test]
    fn arming_again_replaces_the_deadline() {
        let mut w = Wheel::new(0);
        w.arm(3, 5);
        w.arm(4, 5);
        w.arm(3, 5_000);
        assert_eq!(w.len(), 2);
        assert_eq!(w.deadline(3), Some(5_000));
        w.check_invariants();
        assert_eq!(drain(&mut w, 4_999), vec![4]);
        w.arm(4, 10);
        assert_eq!(drain(&mut w, 5_000), vec![4, 3]);
        assert_eq!(w.deadline(3), None);
    }

    #[test]
    fn cascades_across_levels() {
        let mut w = Wheel::new(0);
        let deadlines = [
            63u64, 64, 65, 4095, 4096, 4097, 262_143, 262_144, 300_000, 20_000_000,
        ];
        for (k, &d) in deadlines.iter().enumerate() {
            w.arm(k as u32, d);
        }
        w.check_invariants();
        for (k, &d) in deadlines.iter().enumerate() {
            assert!(
                drain(&mut w, d - 1).iter().all(|&v| v < k as u32),
                "nothing at or after {d} early"
            );
            assert_eq!(drain(&mut w, d), vec![k as u32], "deadline {d}");
        }
        assert!(w.is_empty());
    }

    #[test]
    fn next_expiration_is_never_late() {
        let mut w = Wheel::new(7);
        w.arm(1, 5000);
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
        let mut deadlines = Vec::new();
        for k in 0..20_000u32 {
            let d = rnd() % 5_000_000;
            w.arm(k, d);
            deadlines.push(d);
        }
        // Cancel every third.
        let mut expected = Vec::new();
        for (k, &d) in deadlines.iter().enumerate() {
            if k % 3 == 0 {
                assert!(w.cancel(k as u32));
            } else {
                expected.push(d);
            }
        }
        expected.sort_unstable();
        let mut fired = Vec::new();
        let mut now = 0;
        while !w.is_empty() {
            now = w.next_expiration().unwrap();
            let batch = drain(&mut w, now);
            assert!(
                batch.iter().all(|&k| deadlines[k as usize] <= now),
                "nothing fires early"
            );
            fired.extend(batch.iter().map(|&k| deadlines[k as usize]));
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
        for i in 0..1_000_000u32 {
            w.arm(i, 25_000 + (i as u64 % 25_000));
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
        w.arm(9, u64::MAX / 2);
        assert!(drain(&mut w, 1_000_000).is_empty());
        assert_eq!(w.len(), 1);
        assert_eq!(w.deadline(9), Some(DEADLINE_MAX));
    }

    #[test]
    fn poll_respects_max() {
        let mut w = Wheel::new(0);
        for i in 0..10 {
            w.arm(i, 3);
        }
        let mut out = Vec::new();
        assert_eq!(w.poll(3, &mut out, 4), 4);
        assert_eq!(w.poll(3, &mut out, 4), 4);
        assert_eq!(w.poll(3, &mut out, 4), 2);
        assert_eq!(out.len(), 10);
        w.check_invariants();
    }

    /// A connection's deadline costs 16 bytes (one per connection at 1M): the deadline,
    /// level and slot in one word, and two links.
    #[test]
    fn an_entry_is_16_bytes() {
        assert_eq!(std::mem::size_of::<Entry>(), 16);
    }
}
