//! Where stream messages live: in memory (one process lifetime) or in a redb file (durable:
//! one fsync per committed batch). The store thread decides; a backend only persists and reads.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, ReadableTable, TableDefinition};

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
}

/// What one commit writes: appended entries, trims, stream states, confirmed positions and
/// dedup entries — all or nothing.
#[derive(Debug, Default)]
pub struct Batch {
    /// (stream, entry).
    pub appends: Vec<(String, Entry)>,
    /// (stream, old first, new first): entries in between are deleted.
    pub trims: Vec<(String, u64, u64)>,
    /// Stream states after this batch.
    pub metas: Vec<(String, StreamMeta)>,
    /// Confirmed positions after this batch.
    pub confirms: Vec<(Arc<str>, u64)>,
    /// New dedup entries.
    pub dedups: Vec<(Arc<str>, Box<str>, Dedup)>,
    /// Expired dedup entries.
    pub dedup_expired: Vec<(Arc<str>, Box<str>)>,
}

impl Batch {
    /// Whether there is nothing to write.
    pub fn is_empty(&self) -> bool {
        self.appends.is_empty()
            && self.trims.is_empty()
            && self.metas.is_empty()
            && self.confirms.is_empty()
            && self.dedups.is_empty()
            && self.dedup_expired.is_empty()
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
    pub dedups: Vec<(Arc<str>, Box<str>, Dedup)>,
}

/// Why the store failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data directory could not be created.
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        /// Directory.
        path: String,
        /// Cause.
        source: std::io::Error,
    },
    /// redb refused.
    #[error("store: {0}")]
    Redb(String),
}

fn redb_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Redb(e.to_string())
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
                .insert((s.clone(), e.offset), (e.ts_ms, e.payload.clone()));
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
            });
        }
        Ok(out)
    }

    fn durable(&self) -> bool {
        false
    }
}

const ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("entries");
const META: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("meta");
const CONFIRMED: TableDefinition<&str, u64> = TableDefinition::new("confirmed");
const DEDUP: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("dedup");
const INFO: TableDefinition<&str, u64> = TableDefinition::new("info");

/// Streams in a redb file (`<data-dir>/streams.redb`); each commit is one fsync.
pub struct Redb {
    db: Database,
}

impl Redb {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Redb, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let db = Database::create(dir.join("streams.redb")).map_err(redb_err)?;
        Ok(Redb { db })
    }
}

impl Backend for Redb {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        let mut out = Loaded::default();
        {
            let mut info = tx.open_table(INFO).map_err(redb_err)?;
            let found = info.get("epoch").map_err(redb_err)?.map(|v| v.value());
            let epoch = match found {
                Some(v) => Epoch(v),
                None => {
                    let e = new_epoch();
                    info.insert("epoch", e.0).map_err(redb_err)?;
                    e
                }
            };
            out.epoch = Some(epoch);
            let meta = tx.open_table(META).map_err(redb_err)?;
            for r in meta.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                let (first, next, bytes) = v.value();
                out.metas
                    .push((k.value().to_owned(), StreamMeta { first, next, bytes }));
            }
            let conf = tx.open_table(CONFIRMED).map_err(redb_err)?;
            for r in conf.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                out.confirmed.push((k.value().into(), v.value()));
            }
            let dedup = tx.open_table(DEDUP).map_err(redb_err)?;
            for r in dedup.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                let (u, id) = k.value();
                let (offset, expires_ms) = v.value();
                out.dedups
                    .push((u.into(), id.into(), Dedup { offset, expires_ms }));
            }
            tx.open_table(ENTRIES).map_err(redb_err)?;
        }
        tx.commit().map_err(redb_err)?;
        Ok(out)
    }

    fn commit(&mut self, b: &Batch) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        {
            let mut entries = tx.open_table(ENTRIES).map_err(redb_err)?;
            let mut value = Vec::new();
            for (s, e) in &b.appends {
                value.clear();
                value.extend_from_slice(&e.ts_ms.to_le_bytes());
                value.extend_from_slice(&e.payload);
                entries
                    .insert((s.as_str(), e.offset), value.as_slice())
                    .map_err(redb_err)?;
            }
            for (s, from, to) in &b.trims {
                for o in *from..*to {
                    entries.remove((s.as_str(), o)).map_err(redb_err)?;
                }
            }
            let mut meta = tx.open_table(META).map_err(redb_err)?;
            for (s, m) in &b.metas {
                meta.insert(s.as_str(), (m.first, m.next, m.bytes))
                    .map_err(redb_err)?;
            }
            let mut conf = tx.open_table(CONFIRMED).map_err(redb_err)?;
            for (u, o) in &b.confirms {
                conf.insert(&**u, *o).map_err(redb_err)?;
            }
            let mut dedup = tx.open_table(DEDUP).map_err(redb_err)?;
            for (u, id, d) in &b.dedups {
                dedup
                    .insert((&**u, &**id), (d.offset, d.expires_ms))
                    .map_err(redb_err)?;
            }
            for (u, id) in &b.dedup_expired {
                dedup.remove((&**u, &**id)).map_err(redb_err)?;
            }
        }
        tx.commit().map_err(redb_err)
    }

    fn read(
        &mut self,
        stream: &str,
        from: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let tx = self.db.begin_read().map_err(redb_err)?;
        let t = tx.open_table(ENTRIES).map_err(redb_err)?;
        let mut out = Vec::new();
        let mut bytes = 0;
        for r in t
            .range((stream, from)..=(stream, u64::MAX))
            .map_err(redb_err)?
        {
            let (k, v) = r.map_err(redb_err)?;
            let v = v.value();
            if out.len() >= max_items || (bytes > 0 && bytes + v.len() > max_bytes) || v.len() < 8 {
                break;
            }
            bytes += v.len();
            let mut ts = [0u8; 8];
            ts.copy_from_slice(&v[..8]);
            out.push(Entry {
                offset: k.value().1,
                ts_ms: u64::from_le_bytes(ts),
                payload: Bytes::copy_from_slice(&v[8..]),
            });
        }
        Ok(out)
    }

    fn durable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(offset: u64, p: &'static [u8]) -> Entry {
        Entry {
            offset,
            ts_ms: offset * 10,
            payload: Bytes::from_static(p),
        }
    }

    fn exercise(b: &mut dyn Backend) {
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

    #[test]
    fn redb_backend_persists_across_opens() {
        let dir = std::env::temp_dir().join(format!("sb-redb-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let epoch = {
            let mut r = Redb::open(&dir).unwrap();
            let l = r.load().unwrap();
            exercise(&mut r);
            l.epoch.unwrap()
        };
        let mut r = Redb::open(&dir).unwrap();
        let l = r.load().unwrap();
        assert_eq!(l.epoch, Some(epoch), "same store, same epoch");
        assert_eq!(l.metas.len(), 1);
        assert_eq!(
            r.read("inbox:bob", 0, 10, 1 << 20).unwrap(),
            vec![entry(3, b"ccc")]
        );
        drop(r);
        std::fs::remove_dir_all(&dir).unwrap();
        let mut r = Redb::open(&dir).unwrap();
        assert_ne!(
            r.load().unwrap().epoch,
            Some(epoch),
            "a wiped store has a new epoch"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
