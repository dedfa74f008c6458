//! Streams in a redb file (`<data-dir>/streams.redb`), laid out as a log of chunks.
//!
//! A commit appends its records (stored messages, dedup entries) to the open chunk of up to
//! 64 KiB, stored under its chunk number: one B-tree insert at the right edge per commit
//! instead of one per record, and never a random page (keyed by stream, the first layout
//! wrote about five random 4 KiB pages per DM). A message stored in several streams (a DM in
//! both inboxes) is one record with several positions, and its trailer (stream, offset,
//! epoch) is rebuilt when read. Each stream's offsets map to record locations in memory
//! (16 bytes per retained message), rebuilt by one scan when the file is opened; the scan
//! orders each stream's positions, since compaction moves old records after newer ones.
//!
//! A chunk is deleted once none of its records is live (trimmed, expired). A chunk mostly
//! dead is compacted: its live records move into the chunk being written, so the file stays
//! within a small factor of what is retained. Deletions are written many at once, with the
//! trimmed streams' `(first, next)`; a crash before that finds trimmed records again at
//! start-up and applies retention again, which is harmless.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use redb::{Database, ReadableTable, Table, TableDefinition, TableHandle};
use rustc_hash::{FxHashMap, FxHashSet};

use super::backend::{new_epoch, Backend, Batch, Entry, Loaded, StoreError};
use super::streams::{Dedup, Epoch, StreamMeta};
use super::{put_trailer, unix_ms, wire_name};

/// chunk number → chunk (see [`ChunkWriter`]).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// stream id → stream name (written when a stream first stores a message).
const NAMES: TableDefinition<u64, &str> = TableDefinition::new("names");
/// stream id → (first, next) of a trimmed stream.
const TRIMMED: TableDefinition<u64, (u64, u64)> = TableDefinition::new("trimmed");
const CONFIRMED: TableDefinition<&str, u64> = TableDefinition::new("confirmed");
const INFO: TableDefinition<&str, u64> = TableDefinition::new("info");

/// The first layout (one B-tree entry per (stream, offset)); converted when opened.
const V1_ENTRIES: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("entries");
const V1_META: TableDefinition<&str, (u64, u64, u64)> = TableDefinition::new("meta");
const V1_DEDUP: TableDefinition<(&str, &str), (u64, u64)> = TableDefinition::new("dedup");

/// A chunk holds at most this many bytes (a replay reads one chunk per message it returns).
/// redb gives a value a page of the next power of two, with its leaf header: a chunk just
/// under 64 KiB takes 64 KiB on disk, one just over it would take 128 KiB.
const CHUNK_BYTES: usize = 64 * 1024 - 256;
/// redb's page cache (its default is 1 GiB: every written page stays cached, the process
/// grows by hundreds of MiB and evictions churn the allocator). Replays read the recent
/// tail, which fits here; older chunks are read from the OS page cache.
const CACHE_BYTES: usize = 64 << 20;
/// Records in one chunk, at most (a location keeps 16 bits for the index).
const CHUNK_RECORDS: usize = u16::MAX as usize;
/// Dead chunks that wait before they are deleted in one go.
const DEAD_FLUSH: usize = 64;
/// Trimmed streams whose new start waits to be written, at most.
const TRIMMED_FLUSH: usize = 4_096;
/// Chunks inspected for compaction per commit.
const INSPECT_PER_COMMIT: usize = 2;

const KIND_ENTRY: u8 = 1;
const KIND_DEDUP: u8 = 2;
const KIND_SHARED: u8 = 3;
const SHARED_HEAD: usize = 11;
/// Positions in one shared record, at most.
const SHARED_MAX: usize = u8::MAX as usize;
const ENTRY_HEAD: usize = 25;
const DEDUP_HEAD: usize = 21;

fn redb_err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Redb(e.to_string())
}

/// Whether two appends are copies of one message (stored once).
fn same_message(a: &Entry, b: &Entry) -> bool {
    a.ts_ms == b.ts_ms && a.has_trailer() && b.has_trailer() && a.body() == b.body()
}

/// Where a record is: chunk number and index in the chunk.
fn loc(chunk: u64, idx: usize) -> u64 {
    (chunk << 16) | idx as u64
}

fn chunk_of(loc: u64) -> u64 {
    loc >> 16
}

/// One log record, decoded.
#[derive(Debug, PartialEq, Eq)]
enum Record<'a> {
    /// A message of stream `id`.
    Entry {
        id: u64,
        offset: u64,
        ts_ms: u64,
        payload: &'a [u8],
    },
    /// One message stored in one or more streams (a DM in both inboxes): `positions` holds
    /// `(stream id, offset)` pairs of 16 bytes; the payload is `body`, followed by the
    /// trailer of each position when `trailer` (rebuilt when read, not stored).
    Shared {
        ts_ms: u64,
        trailer: bool,
        positions: &'a [u8],
        body: &'a [u8],
    },
    /// A dedup entry: `user`'s request `key` was answered with `offset`.
    Dedup {
        expires_ms: u64,
        offset: u64,
        user: &'a str,
        key: &'a str,
    },
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

impl<'a> Record<'a> {
    fn encode_entry(out: &mut Vec<u8>, id: u64, e: &Entry) {
        out.push(KIND_ENTRY);
        out.extend_from_slice(&id.to_le_bytes());
        out.extend_from_slice(&e.offset.to_le_bytes());
        out.extend_from_slice(&e.ts_ms.to_le_bytes());
        out.extend_from_slice(&e.payload);
    }

    fn encode_shared(out: &mut Vec<u8>, ts_ms: u64, trailer: bool, at: &[(u64, u64)], body: &[u8]) {
        out.push(KIND_SHARED);
        out.extend_from_slice(&ts_ms.to_le_bytes());
        out.push(u8::from(trailer));
        out.push(at.len() as u8);
        for (id, offset) in at {
            out.extend_from_slice(&id.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
        }
        out.extend_from_slice(body);
    }

    /// The `(stream id, offset)` positions of a message record (none for a dedup entry).
    fn positions(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        let (one, many): (Option<(u64, u64)>, &'a [u8]) = match *self {
            Record::Entry { id, offset, .. } => (Some((id, offset)), &[]),
            Record::Shared { positions, .. } => (None, positions),
            Record::Dedup { .. } => (None, &[]),
        };
        one.into_iter().chain(
            many.chunks_exact(16)
                .filter_map(|p| Some((u64_at(p, 0)?, u64_at(p, 8)?))),
        )
    }

    /// The payload of this message as position `offset` of `stream` (store epoch `epoch`).
    fn payload(&self, stream: &str, offset: u64, epoch: Epoch) -> Option<Bytes> {
        match *self {
            Record::Entry { payload, .. } => Some(Bytes::copy_from_slice(payload)),
            Record::Shared { trailer, body, .. } => {
                let mut out = Vec::with_capacity(body.len() + 64 + stream.len());
                out.extend_from_slice(body);
                if trailer {
                    put_trailer(&mut out, wire_name(stream), offset, epoch);
                }
                Some(out.into())
            }
            Record::Dedup { .. } => None,
        }
    }

    fn ts_ms(&self) -> u64 {
        match *self {
            Record::Entry { ts_ms, .. } | Record::Shared { ts_ms, .. } => ts_ms,
            Record::Dedup { .. } => 0,
        }
    }

    fn encode_dedup(out: &mut Vec<u8>, user: &str, key: &str, d: &Dedup) {
        out.push(KIND_DEDUP);
        out.extend_from_slice(&d.expires_ms.to_le_bytes());
        out.extend_from_slice(&d.offset.to_le_bytes());
        out.extend_from_slice(&(user.len() as u32).to_le_bytes());
        out.extend_from_slice(user.as_bytes());
        out.extend_from_slice(key.as_bytes());
    }

    fn decode(b: &'a [u8]) -> Option<Record<'a>> {
        match *b.first()? {
            KIND_ENTRY => Some(Record::Entry {
                id: u64_at(b, 1)?,
                offset: u64_at(b, 9)?,
                ts_ms: u64_at(b, 17)?,
                payload: b.get(ENTRY_HEAD..)?,
            }),
            KIND_SHARED => {
                let n = usize::from(*b.get(10)?);
                let end = SHARED_HEAD + 16 * n;
                Some(Record::Shared {
                    ts_ms: u64_at(b, 1)?,
                    trailer: *b.get(9)? != 0,
                    positions: b.get(SHARED_HEAD..end)?,
                    body: b.get(end..)?,
                })
            }
            KIND_DEDUP => {
                let n = u32_at(b, 17)? as usize;
                let user = std::str::from_utf8(b.get(DEDUP_HEAD..DEDUP_HEAD + n)?).ok()?;
                let key = std::str::from_utf8(b.get(DEDUP_HEAD + n..)?).ok()?;
                Some(Record::Dedup {
                    expires_ms: u64_at(b, 1)?,
                    offset: u64_at(b, 9)?,
                    user,
                    key,
                })
            }
            _ => None,
        }
    }
}

/// A chunk being written: `[n: u32][end of record i: u32; n][records]`.
#[derive(Debug, Default)]
struct ChunkWriter {
    ends: Vec<u32>,
    body: Vec<u8>,
    out: Vec<u8>,
}

impl ChunkWriter {
    fn len(&self) -> usize {
        self.ends.len()
    }

    /// Whether a record of `size` bytes fits (an empty chunk takes any record).
    fn fits(&self, size: usize) -> bool {
        let n = self.ends.len();
        n == 0 || (n < CHUNK_RECORDS && 4 + 4 * (n + 1) + self.body.len() + size <= CHUNK_BYTES)
    }

    /// Adds a record written by `f`; returns its index.
    fn push(&mut self, f: impl FnOnce(&mut Vec<u8>)) -> usize {
        f(&mut self.body);
        self.ends.push(self.body.len() as u32);
        self.ends.len() - 1
    }

    /// The chunk as stored; it stays open for more records.
    fn encode(&mut self) -> &[u8] {
        self.out.clear();
        self.out
            .extend_from_slice(&(self.ends.len() as u32).to_le_bytes());
        for e in &self.ends {
            self.out.extend_from_slice(&e.to_le_bytes());
        }
        self.out.extend_from_slice(&self.body);
        &self.out
    }

    /// Starts the next chunk.
    fn clear(&mut self) {
        self.ends.clear();
        self.body.clear();
    }
}

/// The records of a stored chunk.
fn chunk_records(c: &[u8]) -> impl Iterator<Item = &[u8]> {
    let n = u32_at(c, 0).unwrap_or(0) as usize;
    let base = 4 + 4 * n;
    let mut start = 0usize;
    (0..n).map_while(move |i| {
        let end = u32_at(c, 4 + 4 * i)? as usize;
        let r = c.get(base + start..base + end)?;
        start = end;
        Some(r)
    })
}

/// Record `idx` of a stored chunk.
fn chunk_record(c: &[u8], idx: usize) -> Option<&[u8]> {
    let n = u32_at(c, 0)? as usize;
    if idx >= n {
        return None;
    }
    let base = 4 + 4 * n;
    let start = if idx == 0 {
        0
    } else {
        u32_at(c, 4 + 4 * (idx - 1))? as usize
    };
    let end = u32_at(c, 4 + 4 * idx)? as usize;
    c.get(base + start..base + end)
}

/// One retained message: where its record is and its payload size.
#[derive(Debug, Clone, Copy)]
struct Slot {
    loc: u64,
    len: u32,
}

/// Where one stream's retained messages are: `slots[i]` holds offset `first + i`.
#[derive(Debug, Default)]
struct Indexed {
    first: u64,
    slots: VecDeque<Slot>,
    /// `next` as last written to TRIMMED (a stream trimmed empty keeps its offsets going).
    trimmed_next: u64,
    /// Payload bytes (counted when loading).
    bytes: u64,
}

impl Indexed {
    fn next(&self) -> u64 {
        (self.first + self.slots.len() as u64).max(self.trimmed_next)
    }

    /// The slot of `offset`, if retained.
    fn slot_mut(&mut self, offset: u64) -> Option<&mut Slot> {
        let i = offset.checked_sub(self.first)?;
        self.slots.get_mut(i as usize)
    }
}

/// Live and total records of a chunk.
#[derive(Debug, Default, Clone, Copy)]
struct ChunkInfo {
    live: u32,
    total: u32,
}

/// Streams in a redb file; each commit is one fsync.
pub struct Redb {
    db: Database,
    ids: FxHashMap<String, u64>,
    names: FxHashMap<u64, String>,
    streams: FxHashMap<u64, Indexed>,
    chunks: FxHashMap<u64, ChunkInfo>,
    /// Sealed chunks, in the order they are inspected for compaction.
    ring: VecDeque<u64>,
    /// The chunk being written.
    current: u64,
    writer: ChunkWriter,
    next_id: u64,
    /// Dedup records in the order they expire (the window is one length for all).
    dedups: VecDeque<(u64, u64)>,
    /// Chunks with no live record, deleted at the next flush.
    dead: Vec<u64>,
    /// Streams trimmed since the last flush.
    trimmed: FxHashSet<u64>,
    /// The store's epoch (trailers are rebuilt with it).
    epoch: Epoch,
    /// Positions of the record being written or moved.
    positions: Vec<(u64, u64)>,
    /// A chunk smaller than this stays open after a commit (tests lower it).
    keep_open: usize,
}

/// Why the store file cannot be opened, with the path and the fix.
fn open_err(file: &Path, e: redb::DatabaseError) -> StoreError {
    let (reason, hint) = match &e {
        redb::DatabaseError::DatabaseAlreadyOpen => (
            "another process holds it open".to_owned(),
            "stop the other switchboard that uses this --data-dir, or give this one its own \
             (--data-dir DIR), or run it with --store memory",
        ),
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() == std::io::ErrorKind::PermissionDenied =>
        {
            (
                io.to_string(),
                "make the directory and file writable by this user, or choose another --data-dir",
            )
        }
        _ => (
            e.to_string(),
            "check the disk and the file, or choose another --data-dir",
        ),
    };
    StoreError::Open {
        path: file.display().to_string(),
        reason,
        hint,
    }
}

impl Redb {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Redb, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::DataDir {
            path: dir.display().to_string(),
            source,
        })?;
        let file = dir.join("streams.redb");
        let db = redb::Builder::new()
            .set_cache_size(CACHE_BYTES)
            .create(&file)
            .map_err(|e| open_err(&file, e))?;
        Ok(Redb {
            db,
            ids: FxHashMap::default(),
            names: FxHashMap::default(),
            streams: FxHashMap::default(),
            chunks: FxHashMap::default(),
            ring: VecDeque::new(),
            current: 1,
            writer: ChunkWriter::default(),
            next_id: 1,
            dedups: VecDeque::new(),
            dead: Vec::new(),
            trimmed: FxHashSet::default(),
            epoch: Epoch(0),
            positions: Vec::new(),
            keep_open: CHUNK_BYTES,
        })
    }

    /// Every commit seals its chunk (tests that need chunk boundaries).
    #[cfg(test)]
    fn sealing_every_commit(mut self) -> Redb {
        self.keep_open = 0;
        self
    }

    /// Chunks stored (live or waiting to be deleted).
    pub fn chunks(&self) -> usize {
        self.chunks.len()
    }

    /// Dead chunks not deleted yet.
    pub fn dead(&self) -> usize {
        self.dead.len()
    }

    fn id_of(&mut self, stream: &str, names: &mut Table<u64, &str>) -> Result<u64, StoreError> {
        if let Some(&id) = self.ids.get(stream) {
            return Ok(id);
        }
        let id = self.next_id;
        self.next_id += 1;
        names.insert(id, stream).map_err(redb_err)?;
        self.ids.insert(stream.to_owned(), id);
        self.names.insert(id, stream.to_owned());
        self.streams.insert(id, Indexed::default());
        Ok(id)
    }

    /// Adds a record of `size` bytes holding `refs` live references (positions, or one dedup
    /// entry) to the chunk being written (sealing it first when full); its location.
    fn place(
        &mut self,
        log: &mut Table<u64, &[u8]>,
        size: usize,
        refs: u32,
        f: impl FnOnce(&mut Vec<u8>),
    ) -> Result<u64, StoreError> {
        if !self.writer.fits(size) {
            self.seal(log)?;
        }
        let idx = self.writer.push(f);
        let info = self.chunks.entry(self.current).or_default();
        info.live += refs;
        info.total += refs;
        Ok(loc(self.current, idx))
    }

    /// Writes the chunk being written, if it has records.
    fn seal(&mut self, log: &mut Table<u64, &[u8]>) -> Result<(), StoreError> {
        if self.writer.len() == 0 {
            return Ok(());
        }
        log.insert(self.current, self.writer.encode())
            .map_err(redb_err)?;
        self.writer.clear();
        if self.chunks.get(&self.current).is_some_and(|c| c.live > 0) {
            self.ring.push_back(self.current);
        } else {
            self.dead.push(self.current);
        }
        self.current += 1;
        Ok(())
    }

    /// Ends a commit: the chunk being written is stored and stays open (the next commit
    /// writes it again, grown, until it is full). Sealed per commit, a trickle of small
    /// commits left a trail of small chunks, each in a page of the next power of two: at
    /// 10k DMs/s the file took 1.9x what it held.
    fn write_open(&mut self, log: &mut Table<u64, &[u8]>) -> Result<(), StoreError> {
        if self.writer.len() == 0 {
            return Ok(());
        }
        if self.writer.body.len() >= self.keep_open {
            return self.seal(log);
        }
        log.insert(self.current, self.writer.encode())
            .map_err(redb_err)?;
        Ok(())
    }

    /// A record is no longer live.
    fn release(&mut self, at: u64) {
        let c = chunk_of(at);
        if let Some(info) = self.chunks.get_mut(&c) {
            info.live = info.live.saturating_sub(1);
            // The open chunk is judged when it is sealed.
            if info.live == 0 && c != self.current {
                self.dead.push(c);
            }
        }
    }

    /// Adds the newest message of stream `id`.
    fn index(&mut self, id: u64, offset: u64, slot: Slot) {
        let ix = self.streams.entry(id).or_default();
        let mut gap = Vec::new();
        if ix.slots.is_empty() {
            ix.first = offset;
        } else if ix.first + ix.slots.len() as u64 != offset {
            // Not expected (offsets have no gaps); keep the index exact anyway.
            gap.extend(ix.slots.drain(..).map(|s| s.loc));
            ix.first = offset;
        }
        ix.slots.push_back(slot);
        for at in gap {
            self.release(at);
        }
    }

    /// Drops `stream id`'s slots before `to`.
    fn trim_to(&mut self, id: u64, to: u64) {
        let Some(ix) = self.streams.get_mut(&id) else {
            return;
        };
        let mut freed = Vec::new();
        while ix.first < to {
            match ix.slots.pop_front() {
                Some(s) => freed.push(s.loc),
                None => {
                    ix.first = to;
                    break;
                }
            }
            ix.first += 1;
        }
        for at in freed {
            self.release(at);
        }
        self.trimmed.insert(id);
    }

    /// The live references of the record at `at` move to `to`; how many there were. The
    /// live positions of a message are left in `self.positions`.
    fn relocate(&mut self, record: &Record<'_>, at: u64, to: u64, now: u64) -> u32 {
        match *record {
            Record::Entry { .. } | Record::Shared { .. } => {
                self.positions.clear();
                for (id, offset) in record.positions() {
                    let Some(slot) = self.streams.get_mut(&id).and_then(|ix| ix.slot_mut(offset))
                    else {
                        continue;
                    };
                    if slot.loc == at {
                        slot.loc = to;
                        self.positions.push((id, offset));
                    }
                }
                self.positions.len() as u32
            }
            Record::Dedup { expires_ms, .. } => {
                if expires_ms <= now {
                    return 0;
                }
                let from = self.dedups.partition_point(|&(e, _)| e < expires_ms);
                let found = (from..self.dedups.len())
                    .chain(0..from)
                    .find(|&i| self.dedups[i].1 == at);
                match found {
                    Some(i) => {
                        self.dedups[i].1 = to;
                        1
                    }
                    None => 0,
                }
            }
        }
    }

    /// Looks at a few sealed chunks: a mostly dead one has its live records moved into the
    /// chunk being written (then it is dead itself); others go to the back of the ring.
    fn compact(&mut self, log: &mut Table<u64, &[u8]>, now: u64) -> Result<(), StoreError> {
        for _ in 0..INSPECT_PER_COMMIT {
            let Some(c) = self.ring.pop_front() else {
                return Ok(());
            };
            let Some(info) = self.chunks.get(&c).copied() else {
                continue;
            };
            if info.live == 0 {
                continue;
            }
            if info.live * 4 > info.total {
                self.ring.push_back(c);
                continue;
            }
            let stored = match log.get(c).map_err(redb_err)? {
                Some(v) => v.value().to_vec(),
                None => continue,
            };
            for (idx, raw) in chunk_records(&stored).enumerate() {
                let Some(record) = Record::decode(raw) else {
                    continue;
                };
                let at = loc(c, idx);
                if !self.writer.fits(raw.len()) {
                    self.seal(log)?;
                }
                let to = loc(self.current, self.writer.len());
                let refs = self.relocate(&record, at, to, now);
                if refs == 0 {
                    continue;
                }
                match record {
                    // Some copies are gone: only the live positions move (a position left
                    // behind would read as a gap in its stream when the file is opened).
                    Record::Shared {
                        ts_ms,
                        trailer,
                        positions,
                        body,
                    } if positions.len() != 16 * self.positions.len() => {
                        let live = std::mem::take(&mut self.positions);
                        let size = SHARED_HEAD + 16 * live.len() + body.len();
                        self.place(log, size, refs, |out| {
                            Record::encode_shared(out, ts_ms, trailer, &live, body)
                        })?;
                        self.positions = live;
                    }
                    _ => {
                        self.place(log, raw.len(), refs, |out| out.extend_from_slice(raw))?;
                    }
                }
                for _ in 0..refs {
                    self.release(at);
                }
            }
        }
        Ok(())
    }

    /// Deletes dead chunks and writes the trimmed streams' starts.
    fn flush(&mut self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let mut log = tx.open_table(LOG).map_err(redb_err)?;
        self.dead.sort_unstable();
        self.dead.dedup();
        for c in self.dead.drain(..) {
            if self.chunks.get(&c).is_some_and(|i| i.live == 0) {
                log.remove(c).map_err(redb_err)?;
                self.chunks.remove(&c);
            }
        }
        let mut trimmed = tx.open_table(TRIMMED).map_err(redb_err)?;
        for id in self.trimmed.drain() {
            if let Some(ix) = self.streams.get_mut(&id) {
                ix.trimmed_next = ix.next();
                trimmed
                    .insert(id, (ix.first, ix.trimmed_next))
                    .map_err(redb_err)?;
            }
        }
        Ok(())
    }

    fn commit_inner(&mut self, b: &Batch) -> Result<(), StoreError> {
        let tx = self.db.begin_write().map_err(redb_err)?;
        let now = unix_ms();
        {
            let mut log = tx.open_table(LOG).map_err(redb_err)?;
            let mut names = tx.open_table(NAMES).map_err(redb_err)?;
            // Trims first: entries of this batch are already past them.
            for (s, _, to) in &b.trims {
                if let Some(&id) = self.ids.get(s.as_str()) {
                    self.trim_to(id, *to);
                }
            }
            // Consecutive appends of one message (a DM's two inbox copies) share a record.
            let mut i = 0;
            while i < b.appends.len() {
                let e = &b.appends[i].1;
                let mut j = i + 1;
                while j < b.appends.len() && j - i < SHARED_MAX && same_message(e, &b.appends[j].1)
                {
                    j += 1;
                }
                let mut positions = std::mem::take(&mut self.positions);
                positions.clear();
                for (s, e) in &b.appends[i..j] {
                    positions.push((self.id_of(s, &mut names)?, e.offset));
                }
                let body = e.body();
                let size = SHARED_HEAD + 16 * positions.len() + body.len();
                let refs = positions.len() as u32;
                let at = self.place(&mut log, size, refs, |out| {
                    Record::encode_shared(out, e.ts_ms, e.has_trailer(), &positions, body)
                })?;
                for (&(id, offset), (_, e)) in positions.iter().zip(&b.appends[i..j]) {
                    let slot = Slot {
                        loc: at,
                        len: e.payload.len() as u32,
                    };
                    self.index(id, offset, slot);
                }
                self.positions = positions;
                i = j;
            }
            for (u, key, d) in &b.dedups {
                let size = DEDUP_HEAD + u.len() + key.len();
                let at = self.place(&mut log, size, 1, |out| {
                    Record::encode_dedup(out, u, key, d)
                })?;
                self.dedups.push_back((d.expires_ms, at));
            }
            while self.dedups.front().is_some_and(|&(exp, _)| exp <= now) {
                if let Some((_, at)) = self.dedups.pop_front() {
                    self.release(at);
                }
            }
            if !b.confirms.is_empty() {
                let mut conf = tx.open_table(CONFIRMED).map_err(redb_err)?;
                for (u, o) in &b.confirms {
                    conf.insert(&**u, *o).map_err(redb_err)?;
                }
            }
            self.compact(&mut log, now)?;
            self.write_open(&mut log)?;
        }
        // Idle (nothing appended) or enough piled up: delete the dead chunks.
        let idle = b.appends.is_empty() && !(self.dead.is_empty() && self.trimmed.is_empty());
        if idle || self.dead.len() >= DEAD_FLUSH || self.trimmed.len() >= TRIMMED_FLUSH {
            self.flush(&tx)?;
        }
        tx.commit().map_err(redb_err)
    }

    /// Converts a file of the first layout (one entry per (stream, offset)) into the log.
    fn migrate_v1(&mut self, tx: &redb::WriteTransaction) -> Result<(), StoreError> {
        let has_v1 = tx
            .list_tables()
            .map_err(redb_err)?
            .any(|t| t.name() == V1_ENTRIES.name());
        if !has_v1 {
            return Ok(());
        }
        let mut log = tx.open_table(LOG).map_err(redb_err)?;
        let mut names = tx.open_table(NAMES).map_err(redb_err)?;
        let mut trimmed = tx.open_table(TRIMMED).map_err(redb_err)?;
        let mut chunk = log
            .last()
            .map_err(redb_err)?
            .map_or(1, |(k, _)| k.value() + 1);
        let mut ids: FxHashMap<String, u64> = FxHashMap::default();
        let mut next_id = 1;
        let mut w = ChunkWriter::default();
        let mut put = |w: &mut ChunkWriter, log: &mut Table<u64, &[u8]>| {
            let r = log.insert(chunk, w.encode()).map(|_| ());
            w.clear();
            chunk += 1;
            r.map_err(redb_err)
        };
        {
            let meta = tx.open_table(V1_META).map_err(redb_err)?;
            for r in meta.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                let (first, next, _) = v.value();
                let id = next_id;
                next_id += 1;
                names.insert(id, k.value()).map_err(redb_err)?;
                trimmed.insert(id, (first, next)).map_err(redb_err)?;
                ids.insert(k.value().to_owned(), id);
            }
            let entries = tx.open_table(V1_ENTRIES).map_err(redb_err)?;
            for r in entries.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                let (stream, offset) = k.value();
                let v = v.value();
                let Some(ts_ms) = u64_at(v, 0) else { continue };
                let id = match ids.get(stream) {
                    Some(&id) => id,
                    None => {
                        let id = next_id;
                        next_id += 1;
                        names.insert(id, stream).map_err(redb_err)?;
                        ids.insert(stream.to_owned(), id);
                        id
                    }
                };
                let payload = Bytes::copy_from_slice(&v[8..]);
                let e = Entry {
                    offset,
                    ts_ms,
                    body: payload.len() as u32,
                    payload,
                };
                if !w.fits(ENTRY_HEAD + e.payload.len()) {
                    put(&mut w, &mut log)?;
                }
                w.push(|out| Record::encode_entry(out, id, &e));
            }
            let dedup = tx.open_table(V1_DEDUP).map_err(redb_err)?;
            for r in dedup.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                let (user, key) = k.value();
                let (offset, expires_ms) = v.value();
                let d = Dedup { offset, expires_ms };
                if !w.fits(DEDUP_HEAD + user.len() + key.len()) {
                    put(&mut w, &mut log)?;
                }
                w.push(|out| Record::encode_dedup(out, user, key, &d));
            }
            if w.len() > 0 {
                put(&mut w, &mut log)?;
            }
        }
        tx.delete_table(V1_ENTRIES).map_err(redb_err)?;
        tx.delete_table(V1_META).map_err(redb_err)?;
        tx.delete_table(V1_DEDUP).map_err(redb_err)?;
        Ok(())
    }

    /// Rebuilds the in-memory index from the file.
    fn load_inner(&mut self) -> Result<Loaded, StoreError> {
        self.ids.clear();
        self.names.clear();
        self.streams.clear();
        self.chunks.clear();
        self.ring.clear();
        self.writer = ChunkWriter::default();
        self.dedups.clear();
        self.dead.clear();
        self.trimmed.clear();
        let now = unix_ms();
        let tx = self.db.begin_write().map_err(redb_err)?;
        self.migrate_v1(&tx)?;
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
            self.epoch = epoch;
            let names = tx.open_table(NAMES).map_err(redb_err)?;
            for r in names.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                let (id, name) = (k.value(), v.value().to_owned());
                self.next_id = self.next_id.max(id + 1);
                self.ids.insert(name.clone(), id);
                self.names.insert(id, name);
                self.streams.insert(id, Indexed::default());
            }
            let trimmed = tx.open_table(TRIMMED).map_err(redb_err)?;
            for r in trimmed.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                let (first, next) = v.value();
                if let Some(ix) = self.streams.get_mut(&k.value()) {
                    ix.first = first;
                    ix.trimmed_next = next;
                }
            }
            let log = tx.open_table(LOG).map_err(redb_err)?;
            self.current = log
                .last()
                .map_err(redb_err)?
                .map_or(1, |(k, _)| k.value() + 1);
            // Every stored position, by stream; put in order below (a compacted record
            // sits after newer ones, and a crash between a compaction and the deletion of
            // its old chunk leaves two copies).
            let mut found: FxHashMap<u64, Vec<(u64, Slot)>> = FxHashMap::default();
            let mut trailer = Vec::new();
            for r in log.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                let c = k.value();
                let mut info = ChunkInfo::default();
                for (idx, raw) in chunk_records(v.value()).enumerate() {
                    let at = loc(c, idx);
                    let Some(record) = Record::decode(raw) else {
                        continue;
                    };
                    match record {
                        Record::Entry { .. } | Record::Shared { .. } => {
                            let (base, has_trailer) = match record {
                                Record::Entry { payload, .. } => (payload.len(), false),
                                Record::Shared { body, trailer, .. } => (body.len(), trailer),
                                Record::Dedup { .. } => (0, false),
                            };
                            for (id, offset) in record.positions() {
                                info.total += 1;
                                let Some(name) = self.names.get(&id) else {
                                    continue;
                                };
                                let mut len = base;
                                if has_trailer {
                                    trailer.clear();
                                    put_trailer(&mut trailer, wire_name(name), offset, epoch);
                                    len += trailer.len();
                                }
                                let slot = Slot {
                                    loc: at,
                                    len: len as u32,
                                };
                                found.entry(id).or_default().push((offset, slot));
                                info.live += 1;
                            }
                        }
                        Record::Dedup {
                            expires_ms,
                            offset,
                            user,
                            key,
                        } => {
                            info.total += 1;
                            if expires_ms > now {
                                out.dedups.push((
                                    user.into(),
                                    key.into(),
                                    Dedup { offset, expires_ms },
                                ));
                                self.dedups.push_back((expires_ms, at));
                                info.live += 1;
                            }
                        }
                    }
                }
                self.chunks.insert(c, info);
                if info.live == 0 {
                    self.dead.push(c);
                } else {
                    self.ring.push_back(c);
                }
            }
            let mut freed = Vec::new();
            for (id, mut at) in found {
                let Some(ix) = self.streams.get_mut(&id) else {
                    freed.extend(at.iter().map(|(_, s)| s.loc));
                    continue;
                };
                // Newest copy of an offset last, then one per offset.
                at.sort_unstable_by_key(|(o, s)| (*o, s.loc));
                let mut kept: Vec<(u64, Slot)> = Vec::with_capacity(at.len());
                for (o, slot) in at {
                    if kept.last().is_some_and(|(k, _)| *k == o) {
                        if let Some((_, old)) = kept.pop() {
                            freed.push(old.loc);
                        }
                    }
                    kept.push((o, slot));
                }
                // Kept: offsets from the trimmed start on, and of those the run without a gap
                // that ends at the newest (a gap means what came before was trimmed in a
                // batch whose trim was not written yet).
                let lo = kept.partition_point(|(o, _)| *o < ix.first);
                let mut start = kept.len().saturating_sub(1).max(lo);
                while start > lo && kept[start - 1].0 + 1 == kept[start].0 {
                    start -= 1;
                }
                if start > 0 {
                    self.trimmed.insert(id);
                }
                freed.extend(kept[..start].iter().map(|(_, s)| s.loc));
                if let Some(&(o, _)) = kept.get(start) {
                    ix.first = o;
                }
                ix.slots = kept[start..].iter().map(|(_, s)| *s).collect();
                ix.bytes = ix.slots.iter().map(|s| u64::from(s.len)).sum();
            }
            for at in freed {
                self.release(at);
            }
            for (id, ix) in &self.streams {
                let Some(name) = self.names.get(id) else {
                    continue;
                };
                let next = ix.next();
                let first = if ix.slots.is_empty() { next } else { ix.first };
                out.metas.push((
                    name.clone(),
                    StreamMeta {
                        first: first.max(1),
                        next: next.max(1),
                        bytes: ix.bytes,
                    },
                ));
            }
            let conf = tx.open_table(CONFIRMED).map_err(redb_err)?;
            for r in conf.iter().map_err(redb_err)? {
                let (k, v) = r.map_err(redb_err)?;
                out.confirmed.push((Arc::from(k.value()), v.value()));
            }
        }
        // What the scan found dead goes now, with the trimmed streams' new starts.
        if !self.dead.is_empty() || !self.trimmed.is_empty() {
            self.flush(&tx)?;
        }
        tx.commit().map_err(redb_err)?;
        Ok(out)
    }
}

impl Backend for Redb {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        self.load_inner()
    }

    fn commit(&mut self, b: &Batch) -> Result<(), StoreError> {
        let r = self.commit_inner(b);
        if r.is_err() {
            // The index may be ahead of the file: read it back.
            let _ = self.load_inner();
        }
        r
    }

    fn read(
        &mut self,
        stream: &str,
        from: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        let mut out = Vec::new();
        let Some(ix) = self.ids.get(stream).and_then(|id| self.streams.get(id)) else {
            return Ok(out);
        };
        let start = from.max(ix.first);
        let skip = (start - ix.first) as usize;
        if skip >= ix.slots.len() {
            return Ok(out);
        }
        let tx = self.db.begin_read().map_err(redb_err)?;
        let t = tx.open_table(LOG).map_err(redb_err)?;
        let mut bytes = 0;
        let mut chunk: Option<(u64, redb::AccessGuard<'_, &[u8]>)> = None;
        for (offset, slot) in (start..).zip(ix.slots.iter().skip(skip)) {
            let len = slot.len as usize;
            if out.len() >= max_items || (bytes > 0 && bytes + len > max_bytes) {
                break;
            }
            let c = chunk_of(slot.loc);
            if chunk.as_ref().is_none_or(|(n, _)| *n != c) {
                let Some(v) = t.get(c).map_err(redb_err)? else {
                    break;
                };
                chunk = Some((c, v));
            }
            let Some((_, v)) = &chunk else { break };
            let Some(record) =
                chunk_record(v.value(), (slot.loc & 0xffff) as usize).and_then(Record::decode)
            else {
                break;
            };
            let body = match record {
                Record::Shared { body, .. } => body.len(),
                _ => len,
            };
            let Some(payload) = record.payload(stream, offset, self.epoch) else {
                break;
            };
            bytes += len;
            out.push(Entry {
                offset,
                ts_ms: record.ts_ms(),
                payload,
                body: body as u32,
            });
        }
        Ok(out)
    }

    fn bytes(&mut self, stream: &str, from: u64, to: u64) -> Result<u64, StoreError> {
        let Some(ix) = self.ids.get(stream).and_then(|id| self.streams.get(id)) else {
            return Ok(0);
        };
        let from = from.max(ix.first);
        let to = to.min(ix.first + ix.slots.len() as u64);
        Ok((from..to)
            .filter_map(|o| ix.slots.get((o - ix.first) as usize))
            .map(|s| u64::from(s.len))
            .sum())
    }

    fn durable(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::backend::tests::{entry, exercise};

    struct TempDir(std::path::PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let p = std::env::temp_dir().join(format!("sb-redb-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&p);
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn meta_of(l: &Loaded, s: &str) -> Option<StreamMeta> {
        l.metas.iter().find(|(n, _)| n == s).map(|(_, m)| *m)
    }

    fn appends(stream: &str, offsets: &[u64]) -> Batch {
        let mut b = Batch::default();
        for &o in offsets {
            b.appends.push((stream.into(), entry(o, b"pp")));
        }
        b
    }

    #[test]
    fn persists_across_opens_and_a_wiped_store_has_a_new_epoch() {
        let dir = TempDir::new("persist");
        let epoch = {
            let mut r = Redb::open(&dir.0).unwrap();
            let l = r.load().unwrap();
            exercise(&mut r);
            l.epoch.unwrap()
        };
        let mut r = Redb::open(&dir.0).unwrap();
        let l = r.load().unwrap();
        assert_eq!(l.epoch, Some(epoch), "same store, same epoch");
        assert_eq!(
            meta_of(&l, "inbox:bob"),
            Some(StreamMeta {
                first: 3,
                next: 4,
                bytes: 3
            })
        );
        assert_eq!(
            r.read("inbox:bob", 0, 10, 1 << 20).unwrap(),
            vec![entry(3, b"ccc")]
        );
        drop(r);
        std::fs::remove_dir_all(&dir.0).unwrap();
        let mut r = Redb::open(&dir.0).unwrap();
        assert_ne!(
            r.load().unwrap().epoch,
            Some(epoch),
            "a wiped store has a new epoch"
        );
    }

    #[test]
    fn trimmed_records_are_deleted_in_batches_and_a_crash_before_that_loses_nothing_kept() {
        let dir = TempDir::new("garbage");
        {
            let mut r = Redb::open(&dir.0).unwrap().sealing_every_commit();
            r.load().unwrap();
            r.commit(&appends("s", &[1, 2, 3])).unwrap();
            // Offset 5 was trimmed before it was stored (retention within one batch).
            let mut b = appends("s", &[4, 6]);
            b.trims.push(("s".into(), 1, 3));
            b.trims.push(("s".into(), 3, 6));
            b.appends.retain(|(_, e)| e.offset != 4);
            r.commit(&b).unwrap();
            assert_eq!(r.dead(), 1, "deleted later, not in a commit that appends");
            assert_eq!(r.read("s", 0, 10, 1 << 20).unwrap(), vec![entry(6, b"pp")]);
            // Dropped here as by a crash: the trim was never written.
        }
        let mut r = Redb::open(&dir.0).unwrap();
        let l = r.load().unwrap();
        assert_eq!(
            meta_of(&l, "s"),
            Some(StreamMeta {
                first: 6,
                next: 7,
                bytes: 2
            }),
            "the gap at 4..6 shows the trim"
        );
        assert_eq!(r.read("s", 1, 10, 1 << 20).unwrap(), vec![entry(6, b"pp")]);
        // An idle commit deletes everything trimmed; a stream trimmed empty keeps its next.
        let mut b = Batch::default();
        b.trims.push(("s".into(), 6, 7));
        r.commit(&b).unwrap();
        assert_eq!((r.dead(), r.chunks()), (0, 0));
        drop(r);
        let mut r = Redb::open(&dir.0).unwrap();
        let l = r.load().unwrap();
        assert_eq!(
            meta_of(&l, "s"),
            Some(StreamMeta {
                first: 7,
                next: 7,
                bytes: 0
            })
        );
        assert!(r.read("s", 0, 10, 1 << 20).unwrap().is_empty());
        r.commit(&appends("s", &[7])).unwrap();
        assert_eq!(r.read("s", 0, 10, 1 << 20).unwrap(), vec![entry(7, b"pp")]);
    }

    #[test]
    fn dedup_entries_survive_a_restart_until_they_expire() {
        let dir = TempDir::new("dedup");
        let now = unix_ms();
        {
            let mut r = Redb::open(&dir.0).unwrap();
            r.load().unwrap();
            let mut b = appends("inbox:ann", &[1]);
            let live = Dedup {
                offset: 1,
                expires_ms: now + 600_000,
            };
            let dead = Dedup {
                offset: 1,
                expires_ms: now.saturating_sub(1),
            };
            b.dedups.push(("ann".into(), "m1".into(), live));
            b.dedups.push(("ann".into(), "old".into(), dead));
            r.commit(&b).unwrap();
        }
        let mut r = Redb::open(&dir.0).unwrap();
        let l = r.load().unwrap();
        assert_eq!(l.dedups.len(), 1);
        assert_eq!(&*l.dedups[0].0, "ann");
        assert_eq!(&*l.dedups[0].1, "m1");
        assert_eq!(l.dedups[0].2.offset, 1);
        assert_eq!((r.chunks(), r.dead()), (1, 0));
    }

    #[test]
    fn a_mostly_dead_chunk_is_compacted_and_its_live_records_stay_readable() {
        let dir = TempDir::new("compact");
        {
            let mut r = Redb::open(&dir.0).unwrap().sealing_every_commit();
            r.load().unwrap();
            let mut b = appends("a", &[1, 2, 3, 4, 5, 6, 7, 8]);
            b.appends.push(("b".into(), entry(1, b"bb")));
            r.commit(&b).unwrap();
            let mut b = appends("c", &[1]);
            b.trims.push(("a".into(), 1, 9));
            r.commit(&b).unwrap();
            assert_eq!(r.dead(), 1, "b:1 moved out of the first chunk");
            assert_eq!(r.read("b", 1, 10, 1 << 20).unwrap(), vec![entry(1, b"bb")]);
            assert_eq!(r.bytes("b", 1, 2).unwrap(), 2);
            r.commit(&Batch::default()).unwrap();
            assert_eq!((r.chunks(), r.dead()), (1, 0));
        }
        let mut r = Redb::open(&dir.0).unwrap();
        let l = r.load().unwrap();
        assert_eq!(r.read("b", 1, 10, 1 << 20).unwrap(), vec![entry(1, b"bb")]);
        assert_eq!(r.read("c", 1, 10, 1 << 20).unwrap(), vec![entry(1, b"pp")]);
        assert!(r.read("a", 1, 10, 1 << 20).unwrap().is_empty());
        assert_eq!(meta_of(&l, "a").map(|m| (m.first, m.next)), Some((9, 9)));
    }

    /// A DM as the store thread appends it: one body, each copy with its own trailer.
    fn dm(b: &mut Batch, body: &str, to: (&str, u64), from: (&str, u64), epoch: Epoch) {
        for (stream, offset) in [to, from] {
            let mut p = body.as_bytes().to_vec();
            put_trailer(&mut p, wire_name(stream), offset, epoch);
            b.appends.push((
                stream.into(),
                Entry {
                    offset,
                    ts_ms: 5,
                    payload: p.into(),
                    body: body.len() as u32,
                },
            ));
        }
    }

    fn payload(stream: &str, body: &str, offset: u64, epoch: Epoch) -> Bytes {
        let mut p = body.as_bytes().to_vec();
        put_trailer(&mut p, wire_name(stream), offset, epoch);
        p.into()
    }

    #[test]
    fn a_dm_is_stored_once_for_both_inboxes_and_reads_back_with_each_trailer() {
        let dir = TempDir::new("shared");
        let body = r#"{"op":"msg","from":"ann","data":"hello there"#;
        let epoch = {
            let mut r = Redb::open(&dir.0).unwrap();
            let epoch = r.load().unwrap().epoch.unwrap();
            let mut b = Batch::default();
            dm(&mut b, body, ("inbox:bob", 1), ("inbox:ann", 1), epoch);
            dm(&mut b, body, ("inbox:bob", 2), ("inbox:ann", 2), epoch);
            r.commit(&b).unwrap();
            let stored = {
                let tx = r.db.begin_read().unwrap();
                let log = tx.open_table(LOG).unwrap();
                let (_, v) = log.last().unwrap().unwrap();
                let records: Vec<Vec<u8>> = chunk_records(v.value()).map(<[u8]>::to_vec).collect();
                records
            };
            assert_eq!(stored.len(), 1, "four copies of one body in one record");
            assert_eq!(
                stored[0].len(),
                SHARED_HEAD + 4 * 16 + body.len(),
                "the body is stored once and no trailer is stored"
            );
            epoch
        };
        let mut r = Redb::open(&dir.0).unwrap();
        let l = r.load().unwrap();
        for (stream, n) in [("inbox:bob", 2), ("inbox:ann", 2)] {
            let got = r.read(stream, 1, 10, 1 << 20).unwrap();
            let want: Vec<Bytes> = (1..=n).map(|o| payload(stream, body, o, epoch)).collect();
            assert_eq!(
                got.iter().map(|e| e.payload.clone()).collect::<Vec<_>>(),
                want
            );
            let m = meta_of(&l, stream).unwrap();
            assert_eq!((m.first, m.next), (1, 3));
            assert_eq!(m.bytes, want.iter().map(|p| p.len() as u64).sum::<u64>());
        }
    }

    #[test]
    fn compaction_moves_only_live_copies_and_a_reopen_keeps_every_stream_whole() {
        let dir = TempDir::new("compact-shared");
        let body = r#"{"op":"msg","from":"ann","data":"x"#;
        let epoch;
        {
            let mut r = Redb::open(&dir.0).unwrap().sealing_every_commit();
            epoch = r.load().unwrap().epoch.unwrap();
            // Chunk 1: ann→bob (bob:1, ann:1) and filler in stream f.
            let mut b = appends("f", &[1, 2, 3, 4, 5, 6, 7, 8]);
            dm(&mut b, body, ("inbox:bob", 1), ("inbox:ann", 1), epoch);
            r.commit(&b).unwrap();
            // Chunk 2: newer messages of bob and ann.
            let mut b = Batch::default();
            dm(&mut b, body, ("inbox:bob", 2), ("inbox:ann", 2), epoch);
            r.commit(&b).unwrap();
            // f and ann's first copy go: chunk 1 is mostly dead, bob:1 moves to chunk 3, after
            // bob:2. The old chunk is not deleted yet (a crash now leaves both copies).
            let mut b = appends("g", &[1]);
            b.trims.push(("f".into(), 1, 9));
            b.trims.push(("inbox:ann".into(), 1, 2));
            r.commit(&b).unwrap();
            assert_eq!(r.dead(), 1, "the first chunk is dead, not yet deleted");
            assert_eq!(
                r.read("inbox:bob", 1, 10, 1 << 20).unwrap().len(),
                2,
                "bob:1 read from its new place"
            );
        }
        let mut r = Redb::open(&dir.0).unwrap();
        let l = r.load().unwrap();
        let bob: Vec<Bytes> = r
            .read("inbox:bob", 1, 10, 1 << 20)
            .unwrap()
            .into_iter()
            .map(|e| e.payload)
            .collect();
        assert_eq!(
            bob,
            vec![
                payload("inbox:bob", body, 1, epoch),
                payload("inbox:bob", body, 2, epoch)
            ]
        );
        let m = meta_of(&l, "inbox:bob").unwrap();
        assert_eq!((m.first, m.next), (1, 3));
        // ann's trim was not written before the "crash": her first copy is found again (the
        // module's rule: retention applies again), whole and in order.
        let ann = r.read("inbox:ann", 1, 10, 1 << 20).unwrap();
        assert_eq!(ann.iter().map(|e| e.offset).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(
            meta_of(&l, "inbox:ann").map(|m| (m.first, m.next)),
            Some((1, 3))
        );
    }

    #[test]
    fn small_commits_share_one_open_chunk_and_all_survive_a_reopen() {
        let dir = TempDir::new("open-chunk");
        {
            let mut r = Redb::open(&dir.0).unwrap();
            r.load().unwrap();
            for o in 1..=50 {
                r.commit(&appends("s", &[o])).unwrap();
            }
            assert_eq!(r.chunks(), 1, "50 small commits rewrite one open chunk");
            assert_eq!(r.read("s", 1, 100, 1 << 20).unwrap().len(), 50);
        }
        let mut r = Redb::open(&dir.0).unwrap();
        let l = r.load().unwrap();
        assert_eq!(meta_of(&l, "s").map(|m| (m.first, m.next)), Some((1, 51)));
        assert_eq!(r.read("s", 1, 100, 1 << 20).unwrap().len(), 50);
        r.commit(&appends("s", &[51])).unwrap();
        assert_eq!(r.chunks(), 2, "a reopened store writes a new chunk");
        assert_eq!(r.read("s", 1, 100, 1 << 20).unwrap().len(), 51);
    }

    #[test]
    fn records_past_a_chunk_fill_several_chunks() {
        let dir = TempDir::new("seal");
        let mut r = Redb::open(&dir.0).unwrap();
        r.load().unwrap();
        let big = Bytes::from(vec![b'x'; 20_000]);
        let mut b = Batch::default();
        for o in 1..=10 {
            let e = Entry {
                offset: o,
                ts_ms: 1,
                payload: big.clone(),
                body: big.len() as u32,
            };
            b.appends.push(("s".into(), e));
        }
        r.commit(&b).unwrap();
        assert!(r.chunks() >= 3, "{} chunks", r.chunks());
        let got = r.read("s", 1, 100, usize::MAX).unwrap();
        assert_eq!(
            got.iter().map(|e| e.offset).collect::<Vec<_>>(),
            (1..=10).collect::<Vec<_>>()
        );
        assert!(got.iter().all(|e| e.payload == big));
        assert_eq!(r.read("s", 1, 100, 50_000).unwrap().len(), 2, "byte cap");
    }

    #[test]
    fn a_file_of_the_first_layout_is_converted() {
        let dir = TempDir::new("v1");
        std::fs::create_dir_all(&dir.0).unwrap();
        {
            let db = Database::create(dir.0.join("streams.redb")).unwrap();
            let tx = db.begin_write().unwrap();
            {
                let mut e = tx.open_table(V1_ENTRIES).unwrap();
                for o in [4u64, 5] {
                    let mut v = (o * 10).to_le_bytes().to_vec();
                    v.extend_from_slice(b"pp");
                    e.insert(("inbox:bob", o), v.as_slice()).unwrap();
                }
                let mut m = tx.open_table(V1_META).unwrap();
                m.insert("inbox:bob", (4, 6, 4)).unwrap();
                m.insert("inbox:eve", (9, 9, 0)).unwrap();
                let mut d = tx.open_table(V1_DEDUP).unwrap();
                d.insert(("bob", "m1"), (5, unix_ms() + 600_000)).unwrap();
                let mut i = tx.open_table(INFO).unwrap();
                i.insert("epoch", 77).unwrap();
            }
            tx.commit().unwrap();
        }
        let mut r = Redb::open(&dir.0).unwrap();
        let l = r.load().unwrap();
        assert_eq!(
            l.epoch,
            Some(Epoch(77)),
            "the epoch is kept: positions stay valid"
        );
        assert_eq!(
            meta_of(&l, "inbox:bob"),
            Some(StreamMeta {
                first: 4,
                next: 6,
                bytes: 4
            })
        );
        assert_eq!(
            meta_of(&l, "inbox:eve"),
            Some(StreamMeta {
                first: 9,
                next: 9,
                bytes: 0
            })
        );
        assert_eq!(l.dedups.len(), 1);
        assert_eq!(
            r.read("inbox:bob", 0, 10, 1 << 20).unwrap(),
            vec![entry(4, b"pp"), entry(5, b"pp")]
        );
        drop(r);
        let mut r = Redb::open(&dir.0).unwrap();
        assert_eq!(r.load().unwrap().metas.len(), 2, "converted once");
    }
}
