//! Catching up on streams in a cluster. Stored messages reach a node through Redis pub/sub,
//! which drops what is published while a subscription is down (a dropped connection, a
//! Redis restart, a partition). So each shard keeps, per stream its connections follow (a
//! user's inbox while the user has a connection here, a channel with history while it has
//! a subscriber here), the position it delivered up to (`StreamHead`). A live message that
//! is not the next one, or a subscription restored after a loss, makes the shard read the
//! missed range from the stream and deliver it in order; live messages that come meanwhile
//! wait behind it, and offsets already delivered are not delivered again, so the seam has no
//! gap and no duplicate. A stream that moved to another epoch is caught up from the new
//! epoch's first offset (a Redis that lost it), or from where the shard stood when the new
//! epoch continues the old one (a Redis that went back in time: see `store::lineage`). A
//! catch-up the store cannot serve (Redis failing over, or its queue full) is asked again for
//! about a minute; when it gives up, the connections that keep a position (resumed ones,
//! event streams) are closed with 1013 to resume from before the gap, and the held messages
//! past what its pages delivered go out to the others.

use std::sync::Arc;

use bytes::Bytes;
use rustc_hash::FxHashMap;
use tracing::warn;

use super::requests::OnPost;
use super::Core;
use super::Streams;
use crate::conn::cursor::Cursor;
use crate::conn::Transport;
use crate::ids::ConnId;
use crate::metrics::ShardMetrics;
use crate::store::{Epoch, Page, StoreReq, StreamRef};

/// First wait before a catch-up the store could not serve is asked again (doubled each
/// time up to [`RETRY_MAX_MS`]): Redis may be failing over.
const RETRY_FIRST_MS: u64 = 100;
/// Longest wait between two tries of a catch-up.
const RETRY_MAX_MS: u64 = 2_000;
/// Tries of one catch-up before it gives up (about a minute of waits).
const RETRIES_MAX: u8 = 34;
/// Live messages held behind one catch-up, at most (then it gives up: they go out).
const HELD_MAX: usize = 10_000;

/// Where a shard stands in one stream.
#[derive(Debug)]
pub(super) struct StreamHead {
    epoch: Epoch,
    /// The epoch the stream left, if it moved while followed here: a live message of it
    /// that comes late is stale (a catch-up through the new epoch covers what it shares).
    left: Option<Epoch>,
    /// The newest offset delivered to the stream's connections here.
    last: u64,
    /// Catching up: the live messages that came meanwhile, delivered after.
    held: Option<Vec<Held>>,
    /// Tries of the current catch-up that the store could not serve.
    failures: u8,
}

impl StreamHead {
    fn at(epoch: Epoch, last: u64) -> StreamHead {
        StreamHead {
            epoch,
            left: None,
            last,
            held: None,
            failures: 0,
        }
    }
}

/// Which kind of stream a head follows (each kind has its own map, keyed by name, so that a
/// live message finds its head without building a key).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    /// A user's inbox, followed while the user has a connection on this shard.
    Inbox,
    /// A channel with history, followed while it has a subscriber on this shard.
    Channel,
}

impl Kind {
    fn stream(self, name: Arc<str>) -> StreamRef {
        match self {
            Kind::Inbox => StreamRef::Inbox(name),
            Kind::Channel => StreamRef::Channel(name),
        }
    }

    fn of(stream: StreamRef) -> (Kind, Arc<str>) {
        match stream {
            StreamRef::Inbox(n) => (Kind::Inbox, n),
            StreamRef::Channel(n) => (Kind::Channel, n),
        }
    }
}

/// The heads of a shard: inboxes and channels.
#[derive(Debug, Default)]
pub(super) struct Heads {
    inboxes: FxHashMap<Arc<str>, StreamHead>,
    channels: FxHashMap<Arc<str>, StreamHead>,
    /// Catch-ups waiting to be asked again: (due, stream), in the order they failed.
    retries: Vec<(u64, Kind, Arc<str>)>,
}

impl Heads {
    fn map(&mut self, kind: Kind) -> &mut FxHashMap<Arc<str>, StreamHead> {
        match kind {
            Kind::Inbox => &mut self.inboxes,
            Kind::Channel => &mut self.channels,
        }
    }

    /// When the first catch-up waiting to be asked again is due.
    pub(super) fn next_retry(&self) -> Option<u64> {
        self.retries.iter().map(|r| r.0).min()
    }

    /// Whether any stream is being caught up or waits to be.
    pub(super) fn catching_up(&self) -> bool {
        !self.retries.is_empty()
            || self
                .inboxes
                .values()
                .chain(self.channels.values())
                .any(|h| h.held.is_some())
    }
}

/// A live message held during a catch-up.
#[derive(Debug)]
struct Held {
    payload: Bytes,
    offset: u64,
    exclude: Option<ConnId>,
}

/// The epoch a stored event ends with (`…,"epoch":"<hex>"}`).
pub(super) fn event_epoch(payload: &[u8]) -> Option<Epoch> {
    let tail = payload.strip_suffix(b"\"}")?;
    let start = tail.iter().rposition(|&b| b == b'"')? + 1;
    if !tail[..start - 1].ends_with(b"\"epoch\":") {
        return None;
    }
    std::str::from_utf8(&tail[start..]).ok()?.parse().ok()
}

/// What to do with a live stream message.
pub(super) enum Verdict {
    /// The next one: deliver it.
    Deliver,
    /// Already delivered, or held until a catch-up ends.
    Skip,
}

impl<T: Transport> Streams<T> {
    /// Whether this shard keeps stream positions: with a broker (pub/sub can drop messages)
    /// and a store to catch up from.
    pub(super) fn tracks_heads(&self) -> bool {
        self.broker.is_some() && self.streams_on()
    }

    /// A connection of `user` opened at inbox position (`epoch`, `top`): where this shard
    /// stands, unless it already follows the inbox.
    pub(super) fn note_head(&mut self, user: &Arc<str>, epoch: Epoch, top: u64) {
        if !self.tracks_heads() || epoch == Epoch(0) {
            return; // the store could not tell (Redis unreachable): the next message will
        }
        self.heads
            .inboxes
            .entry(user.clone())
            .or_insert(StreamHead::at(epoch, top));
    }

    /// A live message of a followed stream: deliver it, skip it, or hold it and catch up
    /// first. A channel's head starts at the first message the shard receives with a
    /// subscriber here (its subscribers take live messages from their `sub` on, or resume
    /// with `since` through their own cursor).
    pub(super) fn check_head(
        &mut self,
        kind: Kind,
        name: &str,
        payload: &Bytes,
        offset: u64,
        exclude: Option<ConnId>,
    ) -> Verdict {
        let map = self.heads.map(kind);
        let Some(h) = map.get_mut(name) else {
            if kind == Kind::Channel {
                if let Some(epoch) = event_epoch(payload) {
                    map.insert(name.into(), StreamHead::at(epoch, offset));
                }
            }
            return Verdict::Deliver;
        };
        let held = || Held {
            payload: payload.clone(),
            offset,
            exclude,
        };
        if let Some(waiting) = h.held.as_mut() {
            waiting.push(held());
            if waiting.len() > HELD_MAX {
                self.give_up_catch_up(kind, name, "too many live messages held behind it");
            }
            return Verdict::Skip;
        }
        let Some(epoch) = event_epoch(payload) else {
            return Verdict::Deliver;
        };
        if h.left == Some(epoch) {
            return Verdict::Skip;
        }
        if epoch == h.epoch {
            if offset <= h.last {
                return Verdict::Skip;
            }
            if offset == h.last + 1 {
                h.last = offset;
                return Verdict::Deliver;
            }
        } else if offset == 1 {
            // The stream's first message in a new epoch: Redis lost it, its offsets start
            // again (the connections here take them from the first).
            h.left = Some(h.epoch);
            h.epoch = epoch;
            h.last = offset;
            self.cursors_moved(kind, name, epoch, 0);
            return Verdict::Deliver;
        }
        // A gap: what came between was published while this node could not hear it. Or
        // another epoch, which may continue this one (Redis went back in time) or not:
        // the store's answer says which.
        h.held = Some(vec![held()]);
        let (epoch, from) = (h.epoch, h.last + 1);
        let name = map.get_key_value(name).expect("followed").0.clone();
        ShardMetrics::add(&self.m().catch_ups, 1);
        self.catch_up(kind, name, epoch, from);
        Verdict::Skip
    }

    /// Delivers a stream message to the connections that follow it here.
    fn deliver_followed(
        &mut self,
        kind: Kind,
        name: &str,
        payload: &Bytes,
        offset: u64,
        exclude: Option<ConnId>,
    ) {
        match kind {
            Kind::Inbox => self.deliver_stream_conns(name, payload, offset, exclude),
            Kind::Channel => self.deliver_channel_conns(name, payload, offset),
        }
    }

    /// Asks the store for a stream from `from` in `epoch`.
    fn catch_up(&mut self, kind: Kind, name: Arc<str>, epoch: Epoch, from: u64) {
        let stream = kind.stream(name);
        let req = StoreReq::CatchUp {
            stream: stream.clone(),
            shard: self.index,
            epoch,
            from,
        };
        self.ask_store(req, OnPost::CatchUp { stream });
    }

    /// The store's queue was full: the catch-up is asked again later.
    pub(super) fn catch_up_refused(&mut self, stream: StreamRef) {
        // As a read the store could not serve: a full queue passes.
        let (kind, name) = Kind::of(stream);
        self.retry_catch_up(kind, name);
    }

    /// The missed range cannot be read now: what was held goes out, the gap is counted and
    /// logged (clients that resume with `since` still get it from the stream).
    fn give_up_catch_up(&mut self, kind: Kind, name: &str, why: &str) {
        ShardMetrics::add(&self.m().catch_ups_failed, 1);
        warn!(
            shard = self.index,
            stream = name,
            ?kind,
            why,
            "catch-up failed; a resume will fill the gap"
        );
        let Some(h) = self.heads.map(kind).get_mut(name) else {
            return;
        };
        let held = h.held.take().unwrap_or_default();
        // What was missed cannot go out in order: connections that keep a position are
        // closed before the held messages pass it, so they resume from before the gap (from
        // the store, once it reads again); the others take the live stream on.
        let why = "missed messages could not be read from the store; resume";
        self.close_cursors_unless(kind, name, why, |_| false);
        for x in held {
            let Some(h) = self.heads.map(kind).get_mut(name) else {
                return; // those closed were the last to follow it here
            };
            let epoch = event_epoch(&x.payload);
            if epoch.is_some() && epoch == h.left {
                continue; // stale: of the epoch the stream left
            }
            if epoch.is_none_or(|e| e == h.epoch) && x.offset <= h.last {
                // A page of this catch-up delivered it already.
                continue;
            }
            h.last = x.offset;
            let moved = epoch.filter(|e| *e != h.epoch);
            if let Some(e) = moved {
                // Whether it continues the old one is unknown: every position is moved
                // to its first offset, a duplicate rather than a loss.
                h.left = Some(h.epoch);
                h.epoch = e;
                self.cursors_moved(kind, name, e, 0);
            }
            self.deliver_followed(kind, name, &x.payload, x.offset, x.exclude);
        }
    }

    /// The store's answer to a catch-up: deliver what was missed, ask for more, or deliver
    /// what was held meanwhile.
    pub(super) fn on_caught_up(
        &mut self,
        stream: StreamRef,
        epoch: Epoch,
        shared: u64,
        page: Page,
        excludes: &[(u64, ConnId)],
    ) {
        let (kind, name) = Kind::of(stream);
        let Some(h) = self.heads.map(kind).get_mut(&name) else {
            return;
        };
        if page.next == 0 {
            return self.retry_catch_up(kind, name);
        }
        h.failures = 0;
        if epoch != h.epoch {
            // The page starts past what the two epochs share: everything on it is new to
            // this shard (an offset the old epoch had may have been handed out again).
            h.left = Some(h.epoch);
            h.epoch = epoch;
            h.last = 0;
            self.cursors_moved(kind, &name, epoch, shared);
        }
        let mut filled = 0;
        for (offset, payload) in &page.entries {
            let h = self.heads.map(kind).get_mut(&name).expect("still followed");
            if *offset <= h.last {
                continue;
            }
            h.last = *offset;
            filled += 1;
            // The sending connection does not get its own message (as on the live path).
            let exclude = excludes.iter().find(|e| e.0 == *offset).map(|e| e.1);
            self.deliver_followed(kind, &name, payload, *offset, exclude);
        }
        ShardMetrics::add(&self.m().caught_up_messages, filled);
        if !page.done {
            return self.catch_up(kind, name, epoch, page.next);
        }
        let held = self
            .heads
            .map(kind)
            .get_mut(&name)
            .and_then(|h| h.held.take())
            .unwrap_or_default();
        for x in held {
            if let Verdict::Deliver = self.check_head(kind, &name, &x.payload, x.offset, x.exclude)
            {
                self.deliver_followed(kind, &name, &x.payload, x.offset, x.exclude);
            }
        }
    }

    /// A followed stream moved to `epoch`, sharing offsets up to `shared` with the one
    /// this shard knew: the positions of the connections that follow it here move along
    /// ([`Cursor::moved`]); one that replays or waits for its welcome is closed to resume.
    fn cursors_moved(&mut self, kind: Kind, name: &str, epoch: Epoch, shared: u64) {
        let why = "the stream moved to another epoch while it was replayed; resume";
        self.close_cursors_unless(kind, name, why, |c| c.moved(epoch, shared));
    }

    /// Every connection here that follows `name` with a position and for which `keep` says
    /// false is closed with 1013 and resumes from its position (its welcome says whether it
    /// held).
    fn close_cursors_unless(
        &mut self,
        kind: Kind,
        name: &str,
        why: &'static str,
        mut keep: impl FnMut(&mut Cursor) -> bool,
    ) {
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        match kind {
            Kind::Inbox => self.local_conns_of(name, None, &mut slots),
            Kind::Channel => slots.extend(self.hub.subscribers(name)),
        }
        for &slot in &slots {
            let key = slot as usize;
            let Some(e) = self.conns[key].extra_if_mut() else {
                continue;
            };
            let cur = match kind {
                Kind::Inbox => e.cursor.as_deref_mut(),
                Kind::Channel => e
                    .channel_cursors
                    .iter_mut()
                    .find(|(c, _)| &**c == name)
                    .map(|(_, c)| c),
            };
            if cur.is_some_and(|c| !keep(c)) {
                self.close_to_resume(key, why);
            }
        }
        self.scratch_slots = slots;
    }

    /// A connection whose position may not hold (`why`) is closed with 1013, resumes, and
    /// its welcome then says whether its position held.
    pub(super) fn close_to_resume(&mut self, key: usize, why: &'static str) {
        ShardMetrics::add(&self.m().closed_to_resume, 1);
        self.start_close_with(key, crate::ws::close::TRY_AGAIN_LATER, why.into());
    }

    /// The store could not read the missed range (Redis unreachable, failing over): ask
    /// again later, holding live messages meanwhile, up to [`RETRIES_MAX`] tries.
    fn retry_catch_up(&mut self, kind: Kind, name: Arc<str>) {
        let Some(h) = self.heads.map(kind).get_mut(&name) else {
            return;
        };
        h.failures += 1;
        if h.failures > RETRIES_MAX {
            h.failures = 0;
            return self.give_up_catch_up(kind, &name, "the store could not read");
        }
        let wait = (RETRY_FIRST_MS << (h.failures - 1).min(5)).min(RETRY_MAX_MS);
        let due = self.conns.now_ms + wait;
        self.heads.retries.push((due, kind, name));
    }

    /// Asks again every catch-up that is due.
    pub(super) fn retry_due_catch_ups(&mut self) {
        if self.heads.retries.is_empty() {
            return;
        }
        let now = self.conns.now_ms;
        let mut due = Vec::new();
        self.heads.retries.retain(|(t, kind, name)| {
            let ripe = *t <= now;
            if ripe {
                due.push((*kind, name.clone()));
            }
            !ripe
        });
        for (kind, name) in due {
            let Some(h) = self.heads.map(kind).get(&name) else {
                continue; // nobody here follows it any more
            };
            let (epoch, from) = (h.epoch, h.last + 1);
            self.catch_up(kind, name, epoch, from);
        }
    }

    /// A broker subscription was restored after a loss: every stream followed here catches
    /// up from where it stood.
    pub(super) fn on_resubscribed(&mut self) {
        let mut idle: Vec<(Kind, Arc<str>, Epoch, u64)> = Vec::new();
        for kind in [Kind::Inbox, Kind::Channel] {
            idle.extend(
                self.heads
                    .map(kind)
                    .iter_mut()
                    .filter(|(_, h)| h.held.is_none())
                    .map(|(n, h)| {
                        h.held = Some(Vec::new());
                        (kind, n.clone(), h.epoch, h.last + 1)
                    }),
            );
        }
        ShardMetrics::add(&self.m().catch_ups, idle.len() as u64);
        for (kind, name, epoch, from) in idle {
            self.catch_up(kind, name, epoch, from);
        }
    }
}

impl<T: Transport> Core<T> {
    /// The last connection of `user` here is gone: the shard stops following the inbox.
    pub(super) fn forget_head(&mut self, user: &str) {
        if self.heads.inboxes.is_empty() {
            return;
        }
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        self.local_conns_of(user, None, &mut slots);
        if slots.is_empty() {
            self.heads.inboxes.remove(user);
        }
        self.scratch_slots = slots;
    }

    /// The last subscriber of `channel` here left: the shard stops following its stream.
    pub(super) fn forget_channel_head(&mut self, channel: &str) {
        self.heads.channels.remove(channel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_epoch_is_read_from_the_end_of_a_stored_event() {
        let e: Epoch = "1c9f0a2b3d4e".parse().unwrap();
        let ev = br#"{"op":"msg","from":"a","to":"b","data":{"epoch":"x"},"ts":1,"stream":"inbox","offset":7,"epoch":"1c9f0a2b3d4e"}"#;
        assert_eq!(event_epoch(ev), Some(e));
        assert_eq!(event_epoch(br#"{"op":"msg","data":"1c9f"}"#), None);
        assert_eq!(event_epoch(b""), None);
    }
}
