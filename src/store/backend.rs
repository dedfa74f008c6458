//! Where stream messages live: in memory (one process lifetime) or in a redb file (durable:
//! one fsync per committed batch). The store thread decides; a backend only persists and reads.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use super::streams::{Dedup, Epoch, StreamMeta};

/// One stored message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Its offset in its stream.
    pub offset: u64,
    /// When it was stored (unix ms).
    pub ts_ms: u64,
    /// The event as delivered (JSON, with `stream`, `offset`, `epoch`).
    pub payload: Bytes,
    /// How much of `payload` is the message itself; after it comes the trailer
    /// ([`crate::store::put_trailer`]), which a backend may rebuild instead of storing. The
    /// whole payload when it has no trailer. A DM's copies in two inboxes share this part.
    pub body: u32,
}

impl Entry {
    /// The part of the payload before its trailer.
    pub fn body(&self) -> &[u8] {
        &self.payload[..(self.body as usize).min(self.payload.len())]
    }

    /// Whether the payload ends with a trailer.
    pub fn has_trailer(&self) -> bool {
        (self.body as usize) < self.payload.len()
    }
}

/// What one commit writes: appended entries, trims, stream states, confirmed positions and
/// dedup entries — all or nothing.
#[derive(Debug, Default)]
pub struct Batch {
    /// (stream, entry).
    pub appends: Vec<(Arc<str>, Entry)>,
    /// (stream, old first, new first): entries in between are deleted.
    pub trims: Vec<(String, u64, u64)>,
    /// Stream states after this batch.
    pub metas: Vec<(Arc<str>, StreamMeta)>,
    /// Confirmed positions after this batch.
    pub confirms: Vec<(Arc<str>, u64)>,
    /// New dedup entries (user, request id, answer).
    pub dedups: Vec<(Arc<str>, Box<str>, Dedup)>,
    /// How many dedup entries expired (the backend drops its records of them).
    pub dedup_expired: usize,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.trims.is_empty()
            && self.metas.is_empty()
            && self.confirms.is_empty()
            && self.dedups.is_empty()
            && self.dedup_expired == 0
    }
}

/// A store as found when opened.
#[derive(Debug, Default)]
pub struct Loaded {
    /// The epoch (new for a new store).
    pub epoch: Option<Epoch>,
    /// Every stream's state.
    pub metas: Vec<(String, StreamMeta)>,
    /// Confirmed positions.
    pub confirmed: Vec<(Arc<str>, u64)>,
    /// Dedup entries.
    pub dedups: Vec<(Arc<str>, Arc<str>, Dedup)>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("store: cannot create the data directory {path}: {source}; create it writable by this user, or choose another --data-dir")]
    DataDir {
        /// Directory.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// The store file could not be opened: which file, why, and what to do.
    #[error("store: cannot open {path}: {reason}; {hint}")]
    Open {
        /// The redb file.
        path: String,
        /// What redb or the OS said.
        reason: String,
        /// The fix.
        hint: &'static str,
    },
    /// redb refused.
    #[error("store: {0}")]
    Redb(String),
    /// Redis (the cluster's store) refused or is unreachable.
    #[error("store (Redis): {0}")]
    Redis(String),
}

/// Persistence of streams.
pub trait Backend: Send {
    /// Reads what the store holds (at start-up).
    fn load(&mut self) -> Result<Loaded, StoreError>;
    /// Writes a batch atomically and durably (for a durable backend).
    fn commit(&mut self, batch: &Batch) -> Result<(), StoreError>;
    /// Entries of `stream` from offset `from` on, at most `max_items` and about `max_bytes`.
    fn read(
        &mut self,
        stream: &str,
        from: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError>;
    /// Payload bytes of `stream`'s stored entries `from..to` (what trimming them frees).
    fn bytes(&mut self, stream: &str, from: u64, to: u64) -> Result<u64, StoreError> {
        let n = to.saturating_sub(from) as usize;
        let entries = self.read(stream, from, n, usize::MAX)?;
        Ok(entries.iter().map(|e| e.payload.len() as u64).sum())
    }
    /// Whether a crash keeps what was committed.
    fn durable(&self) -> bool;
}

/// A fresh epoch: time and process mixed (a new store never reuses an old one's epoch).
pub fn new_epoch() -> Epoch {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let mut x = t ^ (u64::from(std::process::id()) << 40);
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    Epoch(x & 0xffff_ffff_ffff)
}

/// Streams for one process lifetime.
#[derive(Debug, Default)]
pub struct Memory {
    entries: BTreeMap<(String, u64), (u64, Bytes)>,
}

impl Backend for Memory {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        Ok(Loaded::default())
    }

    fn commit(&mut self, b: &Batch) -> Result<(), StoreError> {
        for (s, e) in &b.appends {
            self.entries
                .insert((s.to_string(), e.offset), (e.ts_ms, e.payload.clone()));
        }
        for (s, from, to) in &b.trims {
            for o in *from..*to {
                self.entries.remove(&(s.clone(), o));
            }
        }
        Ok(())
    }

    fn read(
        &mut self,
        stream: &str,
        from: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        for ((s, o), (ts, p)) in self.entries.range((stream.to_owned(), from)..) {
            if s != stream || out.len() >= max_items || (bytes > 0 && bytes + p.len() > max_bytes) {
                break;
            }
            bytes += p.len();
            out.push(Entry {
                offset: *o,
                ts_ms: *ts,
                payload: p.clone(),
                body: p.len() as u32,
            });
        }
        Ok(out)
    }

    fn durable(&self) -> bool {
        false
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn entry(offset: u64, p: &'static [u8]) -> Entry {
        Entry {
            offset,
            ts_ms: offset * 10,
            payload: Bytes::from_static(p),
            body: p.len() as u32,
        }
    }

    pub(crate) fn exercise(b: &mut dyn Backend) {
        let mut batch = Batch::default();
        for (o, p) in [(1, &b"a"[..]), (2, b"bb"), (3, b"ccc")] {
            batch.appends.push(("inbox:bob".into(), entry(o, p)));
        }
        batch.appends.push(("inbox:ann".into(), entry(1, b"x")));
        batch.metas.push((
            "inbox:bob".into(),
            StreamMeta {
                first: 1,
                next: 4,
                bytes: 6,
            },
        ));
        b.commit(&batch).unwrap();
        let got = b.read("inbox:bob", 2, 10, 1 << 20).unwrap();
        assert_eq!(got, vec![entry(2, b"bb"), entry(3, b"ccc")]);
        assert_eq!(b.read("inbox:bob", 1, 2, 1 << 20).unwrap().len(), 2);
        assert_eq!(b.read("inbox:bob", 1, 10, 2).unwrap().len(), 1, "byte cap");
        let mut trim = Batch::default();
        trim.trims.push(("inbox:bob".into(), 1, 3));
        b.commit(&trim).unwrap();
        assert_eq!(
            b.read("inbox:bob", 0, 10, 1 << 20).unwrap(),
            vec![entry(3, b"ccc")]
        );
        assert_eq!(b.read("inbox:ann", 0, 10, 1 << 20).unwrap().len(), 1);
    }

    #[test]
    fn memory_backend() {
        exercise(&mut Memory::default());
    }
}
