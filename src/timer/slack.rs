//! Timer slack: a shard wakes for its deadlines on a coarse grid rather than every
//! millisecond one falls due. None of a shard's deadlines needs millisecond precision (pings,
//! idle and handshake timeouts, close deadlines, token expiry, shutdown pacing), and at a
//! million connections a shard has a deadline every couple of milliseconds: waking for each
//! costs a context switch apiece and spreads the heartbeat's writes (and the peers' wake-ups)
//! thin. On a grid, every deadline due within one step is handled in one turn. Like the
//! kernel's `timer_slack_ns`, for the same reason.

/// When to wake for `deadline`: the first grid point at or after it, where the grid is every
/// `step` ms offset by `phase` (shards use different phases, so they do not all wake at
/// once). A deadline already due (`<= now`) is not delayed; `step` 0 or 1 means no slack.
pub fn wake_at(deadline: u64, now: u64, step: u64, phase: u64) -> u64 {
    if step <= 1 || deadline <= now {
        return deadline;
    }
    let phase = phase % step;
    // A deadline before the first grid point wakes at that point.
    phase + deadline.saturating_sub(phase).div_ceil(step) * step
}

#[cfg(test)]
mod tests {
    use super::wake_at;

    #[test]
    fn a_deadline_wakes_at_the_next_grid_point_never_before() {
        assert_eq!(wake_at(101, 0, 16, 0), 112);
        assert_eq!(wake_at(112, 0, 16, 0), 112);
        assert_eq!(wake_at(113, 0, 16, 0), 128);
        assert_eq!(wake_at(113, 0, 16, 5), 117);
        assert_eq!(wake_at(3, 0, 16, 5), 5);
        for d in 1..500 {
            let w = wake_at(d, 0, 16, 7);
            assert!(w >= d && w < d + 16, "{d} -> {w}");
            assert_eq!(w % 16, 7);
        }
    }

    #[test]
    fn a_due_deadline_and_no_slack_are_not_moved() {
        assert_eq!(wake_at(100, 100, 16, 3), 100);
        assert_eq!(wake_at(90, 100, 16, 3), 90);
        assert_eq!(wake_at(101, 100, 0, 3), 101);
        assert_eq!(wake_at(101, 100, 1, 3), 101);
    }
}
