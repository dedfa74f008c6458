//! A connection's place in one of its streams (its inbox, a channel with history): the next
//! offset it expects, and whether a replay is still joining the live stream. The seam rule
//! lives here, apart from the sessions that use it: while pages are replayed, live messages
//! are held back (a later page has them); afterwards one below the expected offset is a
//! duplicate.

use crate::store::Since;

/// The `since` query parameter of `/ws` and `/events` (`<epoch>:<offset>` or `confirmed`):
/// none without one, [`BadSince`] when it does not parse.
pub fn since_in_query(query: Option<&str>) -> Result<Option<Since>, BadSince> {
    match crate::http::request::query_param(query, "since") {
        None => Ok(None),
        Some(q) => Since::parse(&q).map(Some).ok_or(BadSince),
    }
}

/// A `since` that does not parse (answered 400 with [`crate::protocol::SINCE_FORMAT`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadSince;

/// A connection's place in its inbox stream (boxed in `Extra`: only resuming connections).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cursor {
    /// Asked for at connect, until the store answers.
    pub since: Option<Since>,
    /// The next offset this connection expects (0: not tracking — a connection that did not
    /// resume gets every live message).
    pub next: u64,
    /// Pages are still being replayed.
    pub replaying: bool,
    /// The store's epoch, once it answered (event streams use it in their event ids).
    pub epoch: Option<crate::store::Epoch>,
    /// The next page is to be asked for once the outbox drained.
    pub wants_page: bool,
    /// One past the newest live message skipped while replaying: the replay goes on until
    /// it passed it. (A page read before that message was stored, answered after it
    /// arrived live — as with streams in Redis, where the two come by different threads —
    /// would otherwise end the replay short of it.)
    pub skipped: u64,
}

impl Cursor {
    /// A live message at `offset`: true when it is to be delivered (then it is the
    /// position); false while replaying (a later page has it) or when already delivered.
    pub fn take_live(&mut self, offset: u64) -> bool {
        if self.replaying || self.since.is_some() {
            self.skipped = self.skipped.max(offset + 1);
            return false;
        }
        self.take(offset)
    }

    /// A message at `offset` from a page or live: true when it is new (then it is the
    /// position), false for a duplicate.
    pub fn take(&mut self, offset: u64) -> bool {
        if offset < self.next {
            return false;
        }
        self.next = offset + 1;
        true
    }

    /// The stream moved to `epoch` while this connection followed it (Redis lost it, or a
    /// replica that lacked its last writes took over); the two share offsets up to
    /// `shared` (0: none, its offsets started again). The position goes back to the first
    /// offset it cannot vouch for, so the new epoch's messages from there are taken (a
    /// catch-up delivers them) and event ids carry the new epoch. False when the
    /// connection is replaying or waits for its welcome: what it was promised may be gone,
    /// so it is closed to resume (its welcome then says whether its position held).
    pub fn moved(&mut self, epoch: crate::store::Epoch, shared: u64) -> bool {
        if self.epoch == Some(epoch) {
            return true; // it opened in the new epoch
        }
        if self.replaying || self.since.is_some() {
            return false;
        }
        self.epoch = Some(epoch);
        if self.next > 0 {
            self.next = self.next.min(shared + 1);
        }
        true
    }

    /// A cursor for a named event stream opened without a position: it starts at the
    /// inbox's top once the store says where that is (live inbox messages meanwhile are held
    /// back, as for a resume), so its event ids are positions from the first event on and a
    /// plain `EventSource` resumes by itself.
    pub fn at_top() -> Cursor {
        Cursor {
            since: None,
            next: 0,
            replaying: true,
            epoch: None,
            wants_page: false,
            skipped: 0,
        }
    }

    /// A cursor waiting for the store's answer to a resume from `since`.
    pub fn resuming(since: Since) -> Cursor {
        Cursor {
            since: Some(since),
            next: 0,
            replaying: true,
            epoch: None,
            wants_page: false,
            skipped: 0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Epoch;

    fn following(epoch: u64, next: u64) -> Cursor {
        Cursor {
            epoch: Some(Epoch(epoch)),
            next,
            replaying: false,
            ..Cursor::default()
        }
    }

    #[test]
    fn a_stream_that_lost_its_history_is_taken_from_the_new_first_offset() {
        let mut c = following(0xa, 8);
        assert!(!c.take_live(3), "below the position: a duplicate");
        assert!(c.moved(Epoch(0xb), 0));
        assert_eq!((c.epoch, c.next), (Some(Epoch(0xb)), 1));
        assert!(c.take_live(1) && c.take_live(2));
    }

    #[test]
    fn a_continued_epoch_keeps_what_both_hold_and_goes_back_past_it() {
        // Redis went back to offset 5; the connection had 7: offsets 6 and 7 of the new
        // epoch may be other messages, so it takes them.
        let mut c = following(0xa, 8);
        assert!(c.moved(Epoch(0xb), 5));
        assert_eq!((c.epoch, c.next), (Some(Epoch(0xb)), 6));
        // Sharing more than it had: its position holds.
        let mut c = following(0xa, 4);
        assert!(c.moved(Epoch(0xb), 9));
        assert_eq!(c.next, 4);
    }

    #[test]
    fn a_replay_or_a_resume_in_flight_cannot_move_and_one_opened_in_the_new_epoch_is_there() {
        let mut c = following(0xa, 8);
        c.replaying = true;
        assert!(
            !c.moved(Epoch(0xb), 0),
            "a replay of a lost history: resume"
        );
        assert!(c.moved(Epoch(0xa), 0), "already in it");
        let mut c = Cursor::resuming(Since::Confirmed);
        assert!(!c.moved(Epoch(0xb), 3));
        let mut c = Cursor::at_top();
        assert!(!c.moved(Epoch(0xb), 3));
    }
}
