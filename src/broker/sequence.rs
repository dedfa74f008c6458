//! Numbering of qos-0 copies between nodes, so that a receiving node can count the copies
//! that never reached it. Redis pub/sub keeps nothing for a subscriber that is away (a
//! dropped connection, a partition): stored messages are caught up from their streams, but
//! qos-0 copies are gone, and without a number nobody would know how many.
//!
//! Each publishing node numbers its copies per Redis channel (1, 2, 3…) within a *run*; a
//! receiver remembers, per channel it follows and per publishing node, the last number it
//! saw, and counts the numbers it skipped when the next copy arrives. Copies missed at the
//! tail of a channel (nothing published after them) are not seen, so the count is a lower
//! bound. Both sides are bounded: the publisher starts a new run when its map is full
//! (receivers restart from the first number of a new run without counting), and a receiver
//! forgets a channel when it stops following it.

use std::collections::HashMap;

/// Channels a publisher numbers before it starts a new run.
const NUMBERED_MAX: usize = 262_144;

/// A publisher's numbers: Redis channel → last number given.
#[derive(Debug)]
pub struct Numbering {
    run: u64,
    last: HashMap<Box<str>, u64>,
}

impl Numbering {
    /// Starts a run that no earlier process of this node used (the clock and the pid).
    pub fn new() -> Numbering {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        Numbering::starting_at(nanos ^ (u64::from(std::process::id()) << 32))
    }

    fn starting_at(run: u64) -> Numbering {
        Numbering {
            run,
            last: HashMap::new(),
        }
    }

    /// The (run, number) of the next copy published on `channel`.
    pub fn next(&mut self, channel: &str) -> (u64, u64) {
        if let Some(n) = self.last.get_mut(channel) {
            *n += 1;
            return (self.run, *n);
        }
        if self.last.len() >= NUMBERED_MAX {
            // Receivers see a new run and start over: nothing counted as missed.
            self.last.clear();
            self.run = self.run.wrapping_add(1);
        }
        self.last.insert(channel.into(), 1);
        (self.run, 1)
    }
}

impl Default for Numbering {
    fn default() -> Numbering {
        Numbering::new()
    }
}

/// Where one publishing node stands on a channel, as a receiver saw it.
#[derive(Debug)]
struct Seen {
    node: Box<[u8]>,
    run: u64,
    last: u64,
}

/// A receiver's view: Redis channel → each publishing node's last (run, number).
#[derive(Debug, Default)]
pub struct Gaps {
    channels: HashMap<Box<str>, Vec<Seen>>,
}

impl Gaps {
    /// Notes copy (`run`, `n`) of `node` on `channel`; returns how many of its copies were
    /// skipped since the last one seen (0 for the first of a run, or one out of order).
    pub fn arrived(&mut self, channel: &str, node: &[u8], run: u64, n: u64) -> u64 {
        let seen = match self.channels.get_mut(channel) {
            Some(s) => s,
            None => self.channels.entry(channel.into()).or_default(),
        };
        match seen.iter_mut().find(|s| *s.node == *node) {
            Some(s) if s.run == run => {
                let skipped = n.saturating_sub(s.last.saturating_add(1));
                s.last = s.last.max(n);
                skipped
            }
            Some(s) => {
                s.run = run;
                s.last = n;
                0
            }
            None => {
                seen.push(Seen {
                    node: node.into(),
                    run,
                    last: n,
                });
                0
            }
        }
    }

    /// Forgets `channel` (the node no longer follows it: what is published meanwhile is not
    /// meant for it).
    pub fn forget(&mut self, channel: &str) {
        self.channels.remove(channel);
    }

    /// Channels remembered.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.channels.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_count_up_per_channel_and_a_full_map_starts_a_new_run() {
        let mut n = Numbering::starting_at(7);
        assert_eq!(n.next("a"), (7, 1));
        assert_eq!(n.next("a"), (7, 2));
        assert_eq!(n.next("b"), (7, 1));
        for i in 0..NUMBERED_MAX {
            n.next(&format!("c{i}"));
        }
        // The map was full: a new run, every channel from 1 again.
        assert_eq!(n.next("a").0, 8);
        assert_eq!(n.next("a"), (8, 2));
    }

    #[test]
    fn skipped_numbers_count_per_node_and_new_runs_or_forgotten_channels_do_not() {
        let mut g = Gaps::default();
        assert_eq!(
            g.arrived("x", b"a", 1, 5),
            0,
            "first seen: nothing to compare"
        );
        assert_eq!(g.arrived("x", b"a", 1, 6), 0);
        assert_eq!(g.arrived("x", b"a", 1, 10), 3, "7, 8 and 9 never came");
        assert_eq!(
            g.arrived("x", b"b", 4, 1),
            0,
            "another node, its own numbers"
        );
        assert_eq!(g.arrived("x", b"b", 4, 3), 1);
        assert_eq!(
            g.arrived("x", b"a", 1, 9),
            0,
            "late: not a gap, not counted twice"
        );
        assert_eq!(g.arrived("x", b"a", 1, 11), 0);
        assert_eq!(
            g.arrived("x", b"a", 2, 1),
            0,
            "the publisher restarted its run"
        );
        assert_eq!(g.arrived("y", b"a", 2, 40), 0, "channels are apart");
        g.forget("x");
        assert_eq!(g.len(), 1);
        assert_eq!(g.arrived("x", b"a", 2, 9), 0, "followed again: starts over");
    }
}
