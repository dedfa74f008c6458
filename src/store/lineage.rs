//! What this node has seen of each Redis stream's history: the highest offset it stored or
//! read under the stream's epoch. Redis can go back in time under the same epoch (a failover
//! to a replica that had not received the last writes, a master restarted from an older
//! file); a node that sees a stream's counter at or below an offset it already handed out
//! knows that offsets would be reused for different messages, and moves the stream to a new
//! epoch before it stores anything (the store script's check) or answers a resume (the
//! bump script): every position from the lost range then resumes with `epoch_changed`.
//!
//! Bounded: past [`LINEAGE_MAX`] streams the oldest half is forgotten (a forgotten stream is
//! protected again from its next store on).

use rustc_hash::FxHashMap;

/// Streams remembered, at most.
pub const LINEAGE_MAX: usize = 200_000;

/// Per stream: (epoch as Redis holds it, highest offset seen under it, when last seen).
#[derive(Debug, Default)]
pub struct Lineage {
    seen: FxHashMap<String, (String, u64, u64)>,
    /// A counter that orders what was seen (for forgetting the oldest).
    tick: u64,
}

impl Lineage {
    /// Notes that `stream` holds `offset` under `epoch` (a higher offset of the same epoch,
    /// or any offset of another epoch, replaces what was known). True when the stream was
    /// known under another epoch (its history was lost).
    pub fn saw(&mut self, stream: &str, epoch: &str, offset: u64) -> bool {
        self.tick += 1;
        let tick = self.tick;
        match self.seen.get_mut(stream) {
            Some(e) => {
                if e.0 != epoch {
                    *e = (epoch.to_owned(), offset, tick);
                    return true;
                }
                e.1 = e.1.max(offset);
                e.2 = tick;
            }
            None => {
                if self.seen.len() >= LINEAGE_MAX {
                    self.forget_oldest_half();
                }
                self.seen
                    .insert(stream.to_owned(), (epoch.to_owned(), offset, tick));
            }
        }
        false
    }

    /// What the store script gets: the epoch and highest offset known (`"-"`, 0: nothing).
    pub fn known(&self, stream: &str) -> (&str, u64) {
        self.seen
            .get(stream)
            .map_or(("-", 0), |(e, o, _)| (e.as_str(), *o))
    }

    /// Whether Redis holding `stream` at `top` under `epoch` went back in time.
    pub fn behind(&self, stream: &str, epoch: &str, top: u64) -> Option<u64> {
        let (e, o) = self.known(stream);
        (e == epoch && o > top).then_some(o)
    }

    fn forget_oldest_half(&mut self) {
        let mut ticks: Vec<u64> = self.seen.values().map(|v| v.2).collect();
        let mid = ticks.len() / 2;
        let (_, cut, _) = ticks.select_nth_unstable(mid);
        let cut = *cut;
        self.seen.retain(|_, v| v.2 > cut);
    }

    /// Streams remembered.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_going_back_under_one_epoch_is_seen_and_a_new_epoch_resets() {
        let mut l = Lineage::default();
        assert_eq!(l.known("inbox:bob"), ("-", 0));
        l.saw("inbox:bob", "e1", 5);
        l.saw("inbox:bob", "e1", 3);
        assert_eq!(l.known("inbox:bob"), ("e1", 5), "never lowered");
        assert_eq!(l.behind("inbox:bob", "e1", 2), Some(5));
        assert_eq!(l.behind("inbox:bob", "e1", 5), None);
        assert_eq!(l.behind("inbox:bob", "e2", 0), None, "another epoch");
        assert!(l.saw("inbox:bob", "e2", 1), "a new epoch");
        assert_eq!(l.known("inbox:bob"), ("e2", 1));
    }

    #[test]
    fn bounded_forgets_the_oldest() {
        let mut l = Lineage::default();
        for i in 0..LINEAGE_MAX {
            l.saw(&format!("s{i}"), "e", 1);
        }
        l.saw("s0", "e", 2);
        l.saw("new", "e", 1);
        assert!(l.len() <= LINEAGE_MAX / 2 + 2, "{}", l.len());
        assert_eq!(l.known("s0"), ("e", 2), "recently seen is kept");
        assert_eq!(l.known("s1"), ("-", 0), "oldest forgotten");
        assert_eq!(l.known("new"), ("e", 1));
    }
}
