//! The bookkeeping of streams, as plain data: offsets, retention, the dedup window and
//! confirmed positions. The store thread owns one [`Streams`]; a backend persists what it
//! decides. Time is passed in.

use std::collections::VecDeque;

/// Stream names, user ids and request ids come from clients: a seeded fast hash (foldhash)
/// is quick on the store's hot path and not open to crafted collisions.
type HashMap<K, V> = foldhash::HashMap<K, V>;
use std::sync::Arc;

/// A store's epoch: a new value whenever history was lost (a new or wiped store). Shown as
/// lowercase hex on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:x}", self.0)
    }
}

impl std::str::FromStr for Epoch {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        u64::from_str_radix(s, 16).map(Epoch)
    }
}

/// Where one stream stands: offsets `first..next` are retained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamMeta {
    /// Oldest retained offset (offsets start at 1).
    pub first: u64,
    /// The offset the next message gets.
    pub next: u64,
    /// Payload bytes retained.
    pub bytes: u64,
}

impl Default for StreamMeta {
    fn default() -> Self {
        StreamMeta::new()
    }
}

impl StreamMeta {
    /// A stream with nothing yet.
    pub fn new() -> StreamMeta {
        StreamMeta {
            first: 1,
            next: 1,
            bytes: 0,
        }
    }

    /// The newest offset (0 when empty).
    pub fn top(&self) -> u64 {
        self.next - 1
    }

    /// Count retention: the new first offset when more than `max_count` are kept.
    pub fn over_count(&self, max_count: u64) -> Option<u64> {
        (self.next - self.first > max_count).then(|| self.next - max_count)
    }

    /// Where a resume of this stream from `epoch:offset` (the last offset the client has)
    /// starts, in a store whose epoch is `current`.
    pub fn plan_resume(&self, current: Epoch, epoch: Option<Epoch>, offset: u64) -> ResumePlan {
        let m = self;
        if epoch.is_some_and(|e| e != current) {
            // The old history is gone: replay nothing, the client refetches.
            return ResumePlan {
                from: m.next,
                lost: Some(Unrecoverable::Epoch),
            };
        }
        if offset > m.top() {
            return ResumePlan {
                from: m.next,
                lost: Some(Unrecoverable::Ahead),
            };
        }
        if offset + 1 < m.first {
            return ResumePlan {
                from: m.first,
                lost: Some(Unrecoverable::Trimmed),
            };
        }
        ResumePlan {
            from: offset + 1,
            lost: None,
        }
    }
}

/// How much of a stream is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Most messages kept.
    pub max_count: u64,
    /// Oldest age kept (ms).
    pub ttl_ms: u64,
}

/// Why a resume could not give everything after the asked position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unrecoverable {
    /// The epoch differs: the history the position refers to is gone.
    Epoch,
    /// Retention trimmed messages after the position.
    Trimmed,
    /// The position is past the stream's top.
    Ahead,
    /// The store (Redis) could not be reached: the position is unknown; resume later.
    Unavailable,
}

impl Unrecoverable {
    /// The reason on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Unrecoverable::Epoch => "epoch_changed",
            Unrecoverable::Trimmed => "trimmed",
            Unrecoverable::Ahead => "offset_ahead",
            Unrecoverable::Unavailable => "unavailable",
        }
    }
}

/// Where a replay starts, and whether it recovers everything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResumePlan {
    /// First offset to replay (`next` when nothing is to be replayed).
    pub from: u64,
    /// `None`: everything after the position is replayed.
    pub lost: Option<Unrecoverable>,
}

/// A remembered acknowledged request, for retries with the same client id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dedup {
    /// The offset the first request got (in the sender's stream).
    pub offset: u64,
    /// When the entry expires (ms).
    pub expires_ms: u64,
}

/// A request (user, client id) as a 128-bit keyed SipHash: distinct requests collide with
/// odds of about 2⁻¹²⁸ per pair, and the key is random per process, so ids cannot be
/// crafted to collide. Nothing stores it: it is rebuilt from the records at load.
pub type DedupKey = u128;

/// The random key of [`DedupKey`]s.
#[derive(Debug, Clone, Copy)]
struct DedupKeys(u64, u64);

impl DedupKeys {
    /// Keys from the OS's randomness (std's `RandomState` is seeded from it).
    fn random() -> DedupKeys {
        use std::hash::BuildHasher;
        let r = std::collections::hash_map::RandomState::new();
        DedupKeys(r.hash_one(1u8), r.hash_one(2u8))
    }

    fn of(&self, user: &str, id: &str) -> DedupKey {
        use siphasher::sip128::{Hasher128, SipHasher13};
        use std::hash::Hasher;
        let mut h = SipHasher13::new_with_keys(self.0, self.1);
        h.write(user.as_bytes());
        // 0xff never occurs in UTF-8: ("a", "bc") and ("ab", "c") differ.
        h.write_u8(0xff);
        h.write(id.as_bytes());
        h.finish128().as_u128()
    }
}

/// Every stream's bookkeeping.
#[derive(Debug)]
pub struct Streams {
    /// The store's epoch.
    pub epoch: Epoch,
    meta: HashMap<Arc<str>, StreamMeta>,
    confirmed: HashMap<Arc<str>, u64>,
    /// [`DedupKey`] of (user, request id) → first answer. A flat table of 16-byte keys: one
    /// probe per send and no string kept (the ids live in the backend's records).
    dedup: HashMap<DedupKey, Dedup>,
    dedup_order: VecDeque<(u64, DedupKey)>,
    dedup_keys: DedupKeys,
    /// Payload bytes retained in all streams.
    pub total_bytes: u64,
}

impl Streams {
    /// Bookkeeping for a store with `epoch`.
    pub fn new(epoch: Epoch) -> Streams {
        Streams {
            epoch,
            meta: HashMap::default(),
            confirmed: HashMap::default(),
            dedup: HashMap::default(),
            dedup_order: VecDeque::new(),
            dedup_keys: DedupKeys::random(),
            total_bytes: 0,
        }
    }

    /// Restores a stream's state (loading a store).
    pub fn restore(&mut self, stream: String, meta: StreamMeta) {
        self.total_bytes += meta.bytes;
        self.meta.insert(stream.into(), meta);
    }

    /// The shared name of `stream` (allocated once, when the stream first appears).
    pub fn intern(&mut self, stream: &str) -> Arc<str> {
        if let Some((k, _)) = self.meta.get_key_value(stream) {
            return k.clone();
        }
        let k: Arc<str> = stream.into();
        self.meta.insert(k.clone(), StreamMeta::new());
        k
    }

    /// Restores a confirmed position.
    pub fn restore_confirmed(&mut self, user: Arc<str>, offset: u64) {
        self.confirmed.insert(user, offset);
    }

    /// Restores a dedup entry unless it expired by `now_ms`.
    pub fn restore_dedup(&mut self, user: &str, id: &str, d: Dedup, now_ms: u64) {
        if d.expires_ms > now_ms {
            let key = self.dedup_key(user, id);
            self.remember(key, d.offset, d.expires_ms);
        }
    }

    /// The state of `stream` (a fresh one when it never had a message).
    pub fn meta(&self, stream: &str) -> StreamMeta {
        self.meta
            .get(stream)
            .copied()
            .unwrap_or_else(StreamMeta::new)
    }

    /// Every stream.
    pub fn streams(&self) -> impl Iterator<Item = (&Arc<str>, &StreamMeta)> {
        self.meta.iter()
    }

    /// Assigns the next offset of `stream` to a message of `bytes` payload bytes.
    pub fn append(&mut self, stream: &str, bytes: u64) -> u64 {
        let m = match self.meta.get_mut(stream) {
            Some(m) => m,
            None => self.meta.entry(stream.into()).or_default(),
        };
        let offset = m.next;
        m.next += 1;
        m.bytes += bytes;
        self.total_bytes += bytes;
        offset
    }

    /// Appends one message to `stream` with one lookup: `build` makes its payload from the
    /// offset it gets. The offset, the payload and the stream's state after it.
    pub fn append_built<P: AsRef<[u8]>>(
        &mut self,
        stream: &str,
        build: impl FnOnce(u64) -> P,
    ) -> (u64, P, StreamMeta) {
        let m = match self.meta.get_mut(stream) {
            Some(m) => m,
            None => self.meta.entry(stream.into()).or_default(),
        };
        let offset = m.next;
        let payload = build(offset);
        let bytes = payload.as_ref().len() as u64;
        m.next += 1;
        m.bytes += bytes;
        let after = *m;
        self.total_bytes += bytes;
        (offset, payload, after)
    }

    /// Applies count retention: the new first offset when older messages must go.
    pub fn over_count(&self, stream: &str, max_count: u64) -> Option<u64> {
        self.meta.get(stream)?.over_count(max_count)
    }

    /// Records that `stream` now starts at `first`, having dropped `bytes` payload bytes.
    pub fn trim(&mut self, stream: &str, first: u64, bytes: u64) {
        if let Some(m) = self.meta.get_mut(stream) {
            debug_assert!(first >= m.first && first <= m.next);
            m.first = first.clamp(m.first, m.next);
            m.bytes = m.bytes.saturating_sub(bytes);
            self.total_bytes = self.total_bytes.saturating_sub(bytes);
        }
    }

    /// Where a resume from `epoch:offset` starts (the last offset the client has).
    pub fn plan_resume(&self, stream: &str, epoch: Option<Epoch>, offset: u64) -> ResumePlan {
        self.meta(stream).plan_resume(self.epoch, epoch, offset)
    }

    /// A user's confirmed inbox position (0 when never confirmed).
    pub fn confirmed(&self, user: &str) -> u64 {
        self.confirmed.get(user).copied().unwrap_or(0)
    }

    /// Moves a confirmed position forward (never back, never past the top); true when it
    /// moved.
    pub fn confirm(&mut self, user: &Arc<str>, stream: &str, offset: u64) -> bool {
        let offset = offset.min(self.meta(stream).top());
        let cur = self.confirmed.entry(user.clone()).or_insert(0);
        if offset > *cur {
            *cur = offset;
            true
        } else {
            false
        }
    }

    /// The dedup key of request `id` of `user`.
    pub fn dedup_key(&self, user: &str, id: &str) -> DedupKey {
        self.dedup_keys.of(user, id)
    }

    /// The first answer to request `key` still within the window, if any.
    pub fn dedup_hit(&self, key: DedupKey, now_ms: u64) -> Option<Dedup> {
        self.dedup
            .get(&key)
            .copied()
            .filter(|d| d.expires_ms > now_ms)
    }

    /// Remembers the answer to request `key` until `expires_ms`.
    pub fn remember(&mut self, key: DedupKey, offset: u64, expires_ms: u64) {
        self.dedup_order.push_back((expires_ms, key));
        self.dedup.insert(key, Dedup { offset, expires_ms });
    }

    /// Forgets dedup entries that expired by `now_ms`; returns how many (the backend drops
    /// its records of them at its next commit).
    pub fn expire_dedup(&mut self, now_ms: u64) -> usize {
        let mut n = 0;
        while let Some(&(exp, key)) = self.dedup_order.front() {
            if exp > now_ms {
                break;
            }
            self.dedup_order.pop_front();
            // A later `remember` of the same id moved its expiry: that entry stays.
            if self.dedup.get(&key).is_some_and(|d| d.expires_ms == exp) {
                self.dedup.remove(&key);
                n += 1;
            }
        }
        n
    }

    /// Entries in the dedup window.
    pub fn dedup_len(&self) -> usize {
        self.dedup.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_grow_by_one_without_gaps() {
        let mut s = Streams::new(Epoch(7));
        assert_eq!(s.meta("inbox:bob").top(), 0);
        for want in 1..=5 {
            assert_eq!(s.append("inbox:bob", 10), want);
        }
        assert_eq!(s.append("inbox:ann", 3), 1, "streams count separately");
        assert_eq!(
            s.meta("inbox:bob"),
            StreamMeta {
                first: 1,
                next: 6,
                bytes: 50
            }
        );
        assert_eq!(s.total_bytes, 53);
    }

    #[test]
    fn retention_by_count_moves_first() {
        let mut s = Streams::new(Epoch(1));
        for _ in 0..10 {
            s.append("c", 1);
        }
        assert_eq!(s.over_count("c", 20), None);
        assert_eq!(s.over_count("c", 4), Some(7));
        s.trim("c", 7, 6);
        assert_eq!(s.meta("c").first, 7);
        assert_eq!(s.meta("c").bytes, 4);
        assert_eq!(s.total_bytes, 4);
    }

    #[test]
    fn resume_plans() {
        let mut s = Streams::new(Epoch(0xab));
        for _ in 0..10 {
            s.append("i", 1);
        }
        let ok = |from| ResumePlan { from, lost: None };
        assert_eq!(s.plan_resume("i", Some(Epoch(0xab)), 4), ok(5));
        assert_eq!(s.plan_resume("i", None, 0), ok(1));
        assert_eq!(
            s.plan_resume("i", Some(Epoch(0xab)), 10),
            ok(11),
            "up to date"
        );
        assert_eq!(
            s.plan_resume("i", Some(Epoch(0xcd)), 4).lost,
            Some(Unrecoverable::Epoch)
        );
        assert_eq!(
            s.plan_resume("i", None, 11).lost,
            Some(Unrecoverable::Ahead)
        );
        s.trim("i", 6, 5);
        assert_eq!(
            s.plan_resume("i", None, 3),
            ResumePlan {
                from: 6,
                lost: Some(Unrecoverable::Trimmed)
            }
        );
        assert_eq!(
            s.plan_resume("i", None, 5),
            ok(6),
            "nothing after 5 was trimmed"
        );
    }

    #[test]
    fn dedup_window() {
        let mut s = Streams::new(Epoch(1));
        let bob_c1 = s.dedup_key("bob", "c1");
        s.remember(bob_c1, 42, 1_000);
        assert_eq!(s.dedup_hit(bob_c1, 999).map(|d| d.offset), Some(42));
        assert_eq!(s.dedup_hit(s.dedup_key("ann", "c1"), 999), None, "per user");
        assert_eq!(
            s.dedup_hit(s.dedup_key("bo", "bc1"), 999),
            None,
            "user/id seam"
        );
        assert_eq!(s.dedup_hit(bob_c1, 1_000), None, "expired");
        // A retry remembered later moves the expiry: the first expiry leaves it.
        s.remember(bob_c1, 42, 2_000);
        assert_eq!(s.expire_dedup(999), 0);
        assert_eq!(s.expire_dedup(1_000), 0, "moved to 2000");
        assert_eq!(s.dedup_len(), 1);
        assert_eq!(s.expire_dedup(2_000), 1);
        assert_eq!(s.dedup_len(), 0);
    }

    #[test]
    fn confirmed_positions_only_move_forward() {
        let mut s = Streams::new(Epoch(1));
        let bob: Arc<str> = "bob".into();
        for _ in 0..5 {
            s.append("inbox:bob", 1);
        }
        assert!(s.confirm(&bob, "inbox:bob", 3));
        assert!(!s.confirm(&bob, "inbox:bob", 2));
        assert!(s.confirm(&bob, "inbox:bob", 99));
        assert_eq!(s.confirmed("bob"), 5, "never past the top");
    }

    #[test]
    fn epochs_print_and_parse() {
        let e = Epoch(0x1f2e);
        assert_eq!(e.to_string(), "1f2e");
        assert_eq!("1f2e".parse::<Epoch>().unwrap(), e);
    }
}
