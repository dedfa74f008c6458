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
