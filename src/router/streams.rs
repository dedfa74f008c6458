//! Streams on a connection: qos-1 sends handed to the store, stored inbox messages delivered
//! in offset order, acknowledgements, the welcome's inbox position, and resume — a replay
//! paged from the store, joined to the live stream with no gap and no duplicate at the seam.
//!
//! The seam: a resuming connection keeps the next offset it expects. While pages are being
//! replayed, live inbox messages are skipped (a later page has them: each page is read after
//! everything committed before it); afterwards a live message below the expected offset is a
//! duplicate and is skipped, the rest are delivered and move the expected offset.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;

use super::requests::OnPost;
use super::Core;
use crate::conn::{ConnState, Flags, Transport, Welcome};
use crate::hub::{ConnId, ReplyTo};
use crate::mail::ShardMsg;
use crate::metrics::ShardMetrics;
use crate::protocol::{self, ErrorCode, InboxInfo, Target};
use crate::store::{
    ChannelOpened, Epoch, Opened, Page, Refusal, Retention, Since, StoreMsg, StoreReq, StreamRef,
};

use crate::conn::cursor::Cursor;

/// The layer between connections and the store (see the module docs): above
/// [`Core`], below the push API.
pub struct Streams<T: Transport> {
    pub(super) core: Core<T>,
    /// A store is configured (the driver holds its handle).
    pub(super) store_on: bool,
    /// Store requests of this turn, for the driver to post
    /// ([`Streams::post_requests`]).
    pub(super) store_out: Vec<(StoreReq, OnPost)>,
}

layer_over!(Streams => Core, core);

/// The cursor of `stream` on a connection, if it resumes that stream.
fn cursor_mut<'a, T>(
    c: &'a mut crate::conn::Conn<T>,
    stream: &StreamRef,
) -> Option<&'a mut Cursor> {
    let e = c.extra_if_mut()?;
    match stream {
        StreamRef::Inbox(_) => e.cursor.as_deref_mut(),
        StreamRef::Channel(ch) => e
            .channel_cursors
            .iter_mut()
            .find(|(c, _)| c == ch)
            .map(|(_, cur)| cur),
    }
}

impl<T: Transport> Streams<T> {
    /// Whether named connections get inbox streams (a store is configured, not echo mode).
    pub(super) fn streams_on(&self) -> bool {
        self.store_on && !self.cfg.echo
    }

    /// A named event stream: ask the store for its inbox position (and, resuming from
    /// `Last-Event-ID` or `since`, the first replay page).
    pub(super) fn open_sse_stream(&mut self, key: usize) {
        let c = &self.conns[key];
        let (Some(user), Some(cursor)) =
            (c.user.clone(), c.extra().and_then(|e| e.cursor.as_ref()))
        else {
            return;
        };
        let since = cursor.since;
        let conn = self.conns.conn_id(key);
        self.ask_store(StoreReq::Open { user, conn, since }, OnPost::Open { conn });
    }

    /// The welcome is due: with streams, ask the store for the inbox position (and the first
    /// replay page) first; input stays held until it answers.
    pub(super) fn open_or_welcome(&mut self, key: usize) {
        if self.conns[key].flags.has(Flags::SSE) {
            self.conns.push_sse_headers(key);
            let channels = self.conns[key]
                .extra_if_mut()
                .map(|e| std::mem::take(&mut e.sse_channels))
                .unwrap_or_default();
            for ch in channels {
                self.subscribe(key, ch);
            }
            return self.open_sse_stream(key);
        }
        let c = &self.conns[key];
        let Some(user) = c.user.clone() else {
            return self.welcome(key);
        };
        if !self.streams_on() {
            return self.welcome(key);
        }
        let since = c
            .extra()
            .and_then(|e| e.cursor.as_ref())
            .and_then(|c| c.since);
        let conn = self.conns.conn_id(key);
        self.conns[key].state = ConnState::Open(Welcome::Inbox);
        self.ask_store(StoreReq::Open { user, conn, since }, OnPost::Open { conn });
    }

    /// A store message for this shard.
    pub(super) fn on_store(&mut self, m: StoreMsg) {
        match m {
            StoreMsg::Deliver {
                user,
                payload,
                offset,
                exclude,
                ack,
            } => self.route_stored(user, payload, offset, exclude, ack),
            StoreMsg::Ack {
                reply,
                channel,
                offset,
                epoch,
                queued,
            } => {
                if let Some(key) = self.conns.waiting_http(reply.conn) {
                    let route = if channel.is_some() {
                        crate::http::api::Route::Publish
                    } else {
                        crate::http::api::Route::Send
                    };
                    return self.api_stored(key, route, offset, &epoch.to_string(), queued);
                }
                let Some(key) = self.conns.live_open(reply.conn) else {
                    return;
                };
                let stream = channel
                    .map_or_else(|| "inbox".to_owned(), |c| crate::store::channel_stream(&c));
                let f =
                    protocol::stream_ack_in(&stream, &reply.id, offset, &epoch.to_string(), queued);
                self.deliver(key, &f);
            }
            StoreMsg::Refused {
                reply,
                why,
                publish,
            } => {
                let (code, why) = match why {
                    Refusal::Full => (
                        ErrorCode::StoreFull,
                        "the store is over its size budget; message not stored",
                    ),
                    Refusal::Failed => (
                        ErrorCode::Overloaded,
                        "the store could not commit; message not stored, retry",
                    ),
                    Refusal::Unavailable => (
                        ErrorCode::Unavailable,
                        "the store (Redis) is unreachable; message not stored, retry",
                    ),
                };
                if let Some(key) = self.conns.waiting_http(reply.conn) {
                    let route = if publish {
                        crate::http::api::Route::Publish
                    } else {
                        crate::http::api::Route::Send
                    };
                    return self.api_refused(key, route, code, why);
                }
                let Some(key) = self.conns.live_open(reply.conn) else {
                    return;
                };
                let f = protocol::error(Some(&reply.id), code, why);
                self.deliver(key, &f);
            }
            StoreMsg::Opened(o) => self.on_opened(*o),
            StoreMsg::Unread {
                conn,
                connections,
                unread,
            } => {
                if let Some(key) = self.conns.waiting_http(conn) {
                    self.api_user_unread(key, connections, unread);
                }
            }
            StoreMsg::History(h) => {
                let epoch = h.epoch.to_string();
                let span = (h.first, h.top, h.next);
                if let Some(key) = self.conns.waiting_http(h.conn) {
                    let name = format!("inbox:{}", h.user);
                    let body = protocol::history(None, &name, &epoch, span, &h.entries);
                    return self.api_history_page(key, &body);
                }
                if let Some(key) = self.conns.live_open(h.conn) {
                    let op = Some(h.id.as_deref());
                    let f = protocol::history(op, "inbox", &epoch, span, &h.entries);
                    self.conns.push_event(key, f);
                }
            }
            StoreMsg::CaughtUp {
                stream,
                epoch,
                shared,
                page,
                excludes,
            } => self.on_caught_up(stream, epoch, shared, page, &excludes),
            StoreMsg::Page {
                conn,
                stream,
                gone,
                page,
            } => {
                let Some(key) = self.conns.live_open(conn) else {
                    return;
                };
                if gone {
                    // The store lost the stream while this connection replayed it: what the
                    // welcome promised is gone. It resumes, and is told so then.
                    let why = "the stream moved to another epoch while it was replayed; resume";
                    return self.close_to_resume(key, why);
                }
                self.replay(key, &stream, page);
            }
            StoreMsg::ChannelDeliver {
                channel,
                payload,
                offset,
            } => self.deliver_channel_stored(&channel, &payload, offset),
            StoreMsg::ChannelOpened(o) => self.on_channel_opened(*o),
        }
    }

    /// At the user's home shard: a stored message goes to every shard holding the user (one
    /// path per stream keeps offsets in order), then the sender learns whether it waits.
    pub(super) fn route_stored(
        &mut self,
        user: Arc<str>,
        payload: Bytes,
        offset: u64,
        exclude: Option<ConnId>,
        ack: Option<(ReplyTo, u64, crate::store::Epoch)>,
    ) {
        debug_assert_eq!(self.directory.place(&user).home, self.index);
        let mut shards = std::mem::take(&mut self.scratch_shards);
        shards.clear();
        self.directory.locate(&user, &mut shards);
        for &s in &shards {
            if s == self.index {
                self.deliver_stream_local(&user, &payload, offset, exclude);
            } else {
                self.mail.send(
                    s,
                    ShardMsg::DeliverStream {
                        user: user.clone(),
                        payload: payload.clone(),
                        offset,
                        exclude,
                    },
                );
            }
        }
        self.scratch_shards = shards;
        if let Some((reply, ack_offset, epoch)) = ack {
            let queued = !self.directory.is_online(&user);
            let shard = reply.conn.shard;
            let msg = StoreMsg::Ack {
                reply,
                channel: None,
                offset: ack_offset,
                epoch,
                queued: Some(queued),
            };
            if shard == self.index {
                self.on_store(msg);
            } else {
                self.mail.send(shard, ShardMsg::Store(Box::new(msg)));
            }
        }
    }

    /// A stored inbox message for the local connections of `user`, in offset order per
    /// connection (see the module docs for the seam).
    pub(super) fn deliver_stream_local(
        &mut self,
        user: &str,
        payload: &Bytes,
        offset: u64,
        exclude: Option<ConnId>,
    ) {
        if self.tracks_heads() {
            let kind = super::catchup::Kind::Inbox;
            if let super::catchup::Verdict::Skip =
                self.check_head(kind, user, payload, offset, exclude)
            {
                return;
            }
        }
        self.deliver_stream_conns(user, payload, offset, exclude);
    }

    /// Delivers a stored inbox message to the local connections of `user` (each resuming
    /// one takes it only if it is new to it).
    pub(super) fn deliver_stream_conns(
        &mut self,
        user: &str,
        payload: &Bytes,
        offset: u64,
        exclude: Option<ConnId>,
    ) {
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        self.local_conns_of(user, exclude, &mut slots);
        for &slot in &slots {
            let key = slot as usize;
            let c = &mut self.conns[key];
            if let Some(cur) = c.extra_if_mut().and_then(|e| e.cursor.as_mut()) {
                if !cur.take_live(offset) {
                    continue;
                }
            }
            self.deliver(key, payload);
        }
        self.scratch_slots = slots;
    }

    /// The store answered an opening connection: welcome with the inbox position, replay.
    fn on_opened(&mut self, o: Opened) {
        let Some(key) = self.conns.live_open(o.conn) else {
            return;
        };
        let epoch = o.epoch.to_string();
        let name = self.user_name(key);
        let id = o.conn.to_string();
        let reason = match o.resume {
            Some(Err(r)) => Some(Err(r.as_str())),
            Some(Ok(())) => Some(Ok(())),
            None => None,
        };
        let info = InboxInfo {
            epoch: &epoch,
            offset: o.top,
            resume: reason,
        };
        if let Some(user) = self.conns[key].user.clone() {
            self.note_head(&user, o.epoch, o.top);
        }
        let c = &mut self.conns[key];
        let sse = c.flags.has(Flags::SSE);
        c.state = ConnState::Open(Welcome::Sent);
        // A named event stream opened without a position starts at the inbox's top, if the
        // store could say where that is (else: live from now on, counted ids).
        let at_top = sse && o.resume.is_none();
        let placed = o.epoch != crate::store::Epoch(0);
        if let Some(e) = c.extra_if_mut() {
            if at_top && !placed {
                e.cursor = None;
            }
            if let Some(cur) = e.cursor.as_mut() {
                cur.since = None;
                cur.replaying = true;
                cur.epoch = Some(o.epoch);
                cur.next = o.page.entries.first().map_or(o.page.next, |e| e.0);
            }
        }
        let stream = StreamRef::Inbox(name.clone());
        if at_top {
            if placed {
                // The position becomes the browser's last event id at once; nothing to
                // replay, unless live messages came meanwhile.
                self.conns
                    .push_raw(key, protocol::sse_position(&epoch, o.top));
                let top = Page {
                    entries: Vec::new(),
                    next: o.top + 1,
                    done: true,
                };
                self.replay(key, &stream, top);
            }
        } else {
            if sse {
                // An event stream has no welcome: a named `resume` event says how it went.
                self.conns.push_raw(key, protocol::resume_event(info));
            } else {
                let welcome = protocol::welcome_inbox(&name, &id, self.cfg.ping_interval_ms, info);
                self.conns.push_event(key, welcome);
            }
            if o.resume.is_some() {
                self.replay(key, &stream, o.page);
            }
        }
        if !sse {
            // Requests that arrived meanwhile are processed after the welcome, from the
            // read backlog this turn.
            self.conns.defer_read(key);
        }
    }

    /// Delivers a replay page of `stream` and asks for the next one, or ends the replay.
    fn replay(&mut self, key: usize, stream: &StreamRef, page: Page) {
        for (offset, payload) in &page.entries {
            let Some(cur) = cursor_mut(&mut self.conns[key], stream) else {
                return;
            };
            if !cur.take(*offset) {
                continue;
            }
            // Replayed messages bypass the slow-consumer check: the next page is asked for
            // only after this one is flushed, so the queue holds at most a page per stream.
            self.conns.push_event(key, payload.clone());
            ShardMetrics::add(&self.m().messages_out, 1);
        }
        let c = &mut self.conns[key];
        let Some(cur) = cursor_mut(c, stream) else {
            return;
        };
        cur.next = cur.next.max(page.next);
        // `next` 0: the store could not read (Redis unreachable); the replay ends here.
        if page.done && (cur.next >= cur.skipped || page.next == 0) {
            cur.replaying = false;
            return;
        }
        cur.wants_page = true;
        c.set_page_wanted(true);
        if c.outbox.is_none() {
            self.request_page(key);
        }
    }

    /// Asks the store for the next page of every stream of `key` that wants one (called
    /// when its outbox drained).
    pub(super) fn request_page(&mut self, key: usize) {
        let conn = self.conns.conn_id(key);
        let c = &mut self.conns[key];
        c.set_page_wanted(false);
        let user = c.user.clone();
        let Some(e) = c.extra_if_mut() else {
            return;
        };
        let mut wanted: Vec<(StreamRef, &Cursor)> = Vec::new();
        if let (Some(u), Some(cur)) = (user, e.cursor.as_mut()) {
            if std::mem::take(&mut cur.wants_page) {
                wanted.push((StreamRef::Inbox(u), cur));
            }
        }
        for (ch, cur) in e.channel_cursors.iter_mut() {
            if std::mem::take(&mut cur.wants_page) {
                wanted.push((StreamRef::Channel(ch.clone()), cur));
            }
        }
        let wanted: Vec<_> = wanted
            .into_iter()
            .map(|(s, cur)| (s, cur.epoch.unwrap_or(Epoch(0)), cur.next))
            .collect();
        for (stream, epoch, from) in wanted {
            let on = OnPost::Page {
                conn,
                stream: stream.clone(),
            };
            let req = StoreReq::Page {
                stream,
                conn,
                epoch,
                from,
            };
            self.ask_store(req, on);
        }
    }

    /// A page of `stream` could not be asked for: asked again after the next flush.
    pub(super) fn want_page_again(&mut self, key: usize, stream: &StreamRef) {
        let c = &mut self.conns[key];
        if let Some(cur) = cursor_mut(c, stream) {
            cur.wants_page = true;
        }
        c.set_page_wanted(true);
    }

    /// `sub` with `since` on a channel with history: subscribed at once (live messages are
    /// held back by the cursor), replayed from the store, acknowledged with the outcome.
    pub(super) fn sub_since(
        &mut self,
        key: usize,
        id: Option<&str>,
        channel: Arc<str>,
        since: Since,
    ) {
        if !self.streams_on() || self.cfg.stream_rule(&channel).is_none() {
            let f = protocol::error(
                id,
                ErrorCode::BadRequest,
                "this channel keeps no history (no [[channels]] rule matches it)",
            );
            return self.deliver_reply(key, f);
        }
        let conn = self.conns.conn_id(key);
        {
            let e = self.conns[key].extra_mut();
            e.channel_cursors.retain(|(c, _)| *c != channel);
            e.channel_cursors
                .push((channel.clone(), Cursor::resuming(since)));
        }
        if !self.conns[key].channel_list().contains(&channel) {
            if let Some(token) = self.subscribe(key, channel.clone()) {
                let wait =
                    super::waits::ReadyWait::SubSince(conn, id.map(Into::into), channel, since);
                self.waits.add(token, wait);
                return;
            }
        }
        self.open_channel(key, id, channel, since);
    }

    /// Asks the store for `channel`'s position and first page after `since`.
    pub(super) fn open_channel(
        &mut self,
        key: usize,
        id: Option<&str>,
        channel: Arc<str>,
        since: Since,
    ) {
        let conn = self.conns.conn_id(key);
        let req = StoreReq::OpenChannel {
            channel: channel.clone(),
            conn,
            since,
            id: id.map(Into::into),
        };
        let id = id.map(Into::into);
        self.ask_store(req, OnPost::Channel { conn, channel, id });
    }

    /// The store answered `sub` with `since`.
    fn on_channel_opened(&mut self, o: ChannelOpened) {
        let Some(key) = self.conns.live_open(o.conn) else {
            return;
        };
        let stream = StreamRef::Channel(o.channel.clone());
        let Some(cur) = cursor_mut(&mut self.conns[key], &stream) else {
            return; // unsubscribed meanwhile
        };
        cur.since = None;
        cur.replaying = true;
        cur.epoch = Some(o.epoch);
        cur.next = o.page.entries.first().map_or(o.page.next, |e| e.0);
        if let Some(id) = o.id.as_deref() {
            let name = crate::store::channel_stream(&o.channel);
            let f = protocol::sub_ack(
                id,
                &name,
                &o.epoch.to_string(),
                o.top,
                o.resume.map_err(|r| r.as_str()),
            );
            self.conns.push_event(key, f);
        }
        self.replay(key, &stream, o.page);
    }

    /// A stored publication for the local subscribers of `channel`, in offset order for
    /// those resuming it.
    pub(super) fn deliver_channel_stored(&mut self, channel: &str, payload: &Bytes, offset: u64) {
        if self.tracks_heads() && self.hub.subscriber_count(channel) > 0 {
            let kind = super::catchup::Kind::Channel;
            if let super::catchup::Verdict::Skip =
                self.check_head(kind, channel, payload, offset, None)
            {
                return;
            }
        }
        self.deliver_channel_conns(channel, payload, offset);
    }

    /// Delivers a stored publication to the local subscribers of `channel` (each resuming
    /// one takes it only if it is new to it).
    pub(super) fn deliver_channel_conns(&mut self, channel: &str, payload: &Bytes, offset: u64) {
        let mut slots = std::mem::take(&mut self.scratch_slots);
        slots.clear();
        slots.extend(self.hub.subscribers(channel));
        for &slot in &slots {
            let key = slot as usize;
            let c = &mut self.conns[key];
            if let Some(e) = c.extra_if_mut() {
                if let Some((_, cur)) = e.channel_cursors.iter_mut().find(|(c, _)| &**c == channel)
                {
                    if !cur.take_live(offset) {
                        continue;
                    }
                }
            }
            self.deliver(key, payload);
        }
        self.scratch_slots = slots;
    }

    /// `pub` to a channel with history: stored first, delivered by every shard, acked with
    /// its offset.
    pub(super) fn publish_stored(
        &mut self,
        key: usize,
        id: Option<&str>,
        channel: &str,
        data: &RawValue,
    ) {
        let rule = self.cfg.stream_rule(channel).expect("caller checked");
        let retention = Retention {
            max_count: rule.history,
            ttl_ms: rule.ttl_ms,
        };
        let from = self.user_name(key);
        let prefix = protocol::msg_prefix(
            &from,
            Target::Channel(channel),
            data,
            self.conns.now_unix_ms,
        );
        let me = self.conns.conn_id(key);
        let channel: Arc<str> = Arc::from(channel);
        let reply = id.map(|id| ReplyTo {
            conn: me,
            id: id.into(),
            to: channel.clone(),
        });
        let req = StoreReq::Publish {
            channel,
            retention,
            prefix,
            id: id.map(Into::into),
            publisher: from,
            reply,
        };
        self.ask_store(req, OnPost::not_stored(me, id));
    }

    /// `send` with `"qos":1`: the store keeps it in both inboxes, then it is delivered and
    /// acknowledged.
    pub(super) fn send_stored(&mut self, key: usize, id: Option<&str>, to: &str, data: &RawValue) {
        let Some(from) = self.conns[key].user.clone() else {
            let f = protocol::error(
                id,
                ErrorCode::BadRequest,
                "qos 1 needs a named user: anonymous connections have no inbox",
            );
            return self.deliver_reply(key, f);
        };
        if !self.streams_on() {
            let f = protocol::error(id, ErrorCode::BadRequest, "qos 1 needs a store");
            return self.deliver_reply(key, f);
        }
        let prefix = protocol::stored_dm_prefix(&from, to, data, self.conns.now_unix_ms, id);
        let to: Arc<str> = Arc::from(to);
        let me = self.conns.conn_id(key);
        let reply = id.map(|id| ReplyTo {
            conn: me,
            id: id.into(),
            to: to.clone(),
        });
        let req = StoreReq::SendDm {
            from,
            to,
            prefix,
            id: id.map(Into::into),
            reply,
            sender: Some(me),
            sender_copy: true,
        };
        self.ask_store(req, OnPost::not_stored(me, id));
    }

    /// `{"op":"history","stream":"inbox","since":N,"limit":L}`: a page of the user's inbox.
    pub(super) fn history(
        &mut self,
        key: usize,
        id: Option<&str>,
        stream: &str,
        since: u64,
        limit: u64,
    ) {
        let user = self.conns[key].user.clone();
        let (Some(user), true, true) = (user, stream == "inbox", self.streams_on()) else {
            let f = protocol::error(
                id,
                ErrorCode::BadRequest,
                "history is kept for a named user's \"inbox\" stream",
            );
            return self.deliver_reply(key, f);
        };
        let conn = self.conns.conn_id(key);
        let req = StoreReq::History {
            user,
            from: since + 1,
            limit: limit as usize,
            conn,
            id: id.map(Into::into),
        };
        let on = OnPost::Op {
            conn,
            id: id.map(Into::into),
            why: "server busy; try again",
            dropped: false,
            ack: false,
        };
        self.ask_store(req, on);
    }

    /// `{"op":"ack","stream":"inbox","offset":N}`: the client has shown its inbox up to N.
    pub(super) fn confirm(&mut self, key: usize, id: Option<&str>, stream: &str, offset: u64) {
        let user = self.conns[key].user.clone();
        let (Some(user), true, true) = (user, stream == "inbox", self.streams_on()) else {
            let f = protocol::error(
                id,
                ErrorCode::BadRequest,
                "only a named user's \"inbox\" stream can be confirmed",
            );
            return self.deliver_reply(key, f);
        };
        // Acked once the store has it.
        let on = OnPost::Op {
            conn: self.conns.conn_id(key),
            id: id.map(Into::into),
            why: "server busy; not confirmed",
            dropped: false,
            ack: true,
        };
        self.ask_store(StoreReq::Confirm { user, offset }, on);
    }
}
