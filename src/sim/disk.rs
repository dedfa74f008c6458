//! The simulation's disk: a store backend whose contents outlive the store that wrote them,
//! so the simulation can crash the process and open the store again on the same "files" —
//! or on none ([`SimDisk::wipe`]), as after a lost volume. It keeps what a durable backend
//! keeps (entries, stream states, confirmed positions, dedup entries, the epoch) and commits
//! a batch all or nothing, like redb.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::store::backend::{Backend, Batch, Entry, Loaded, Memory, StoreError};
use crate::store::streams::Dedup;
use crate::store::{Epoch, StreamMeta};

#[derive(Debug, Default)]
struct Files {
    epoch: Option<Epoch>,
    /// The entries (kept as the memory backend keeps them).
    entries: Memory,
    metas: BTreeMap<String, StreamMeta>,
    confirmed: BTreeMap<Arc<str>, u64>,
    dedups: BTreeMap<(Arc<str>, Arc<str>), Dedup>,
    /// Commits written, for the simulation's counts.
    commits: u64,
    /// The epoch a store that finds no files takes.
    next_epoch: u64,
}

/// A handle on the simulated files (cheap to clone; every clone sees the same files).
#[derive(Debug, Clone)]
pub struct SimDisk {
    files: Arc<Mutex<Files>>,
}

impl SimDisk {
    /// Empty files; a store opened on them takes epoch `first_epoch`.
    pub fn new(first_epoch: u64) -> SimDisk {
        let disk = SimDisk {
            files: Arc::default(),
        };
        disk.wipe(first_epoch);
        disk
    }

    fn files(&self) -> MutexGuard<'_, Files> {
        self.files.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The files are gone: the next store opened here starts empty, in epoch `epoch` (the
    /// simulation draws it, so a run replays exactly).
    pub fn wipe(&self, epoch: u64) {
        *self.files() = Files {
            next_epoch: epoch,
            ..Files::default()
        };
    }

    /// Commits written since the files were created.
    pub fn commits(&self) -> u64 {
        self.files().commits
    }

    /// A backend on these files for a store to own.
    pub fn backend(&self) -> Box<dyn Backend> {
        Box::new(DiskBackend(self.clone()))
    }
}

/// What a store owns: the files, seen through [`Backend`].
struct DiskBackend(SimDisk);

impl Backend for DiskBackend {
    fn load(&mut self) -> Result<Loaded, StoreError> {
        let mut f = self.0.files();
        let fresh = Epoch(f.next_epoch & 0xffff_ffff_ffff);
        let epoch = *f.epoch.get_or_insert(fresh);
        Ok(Loaded {
            epoch: Some(epoch),
            metas: f.metas.iter().map(|(s, m)| (s.clone(), *m)).collect(),
            confirmed: f.confirmed.iter().map(|(u, o)| (u.clone(), *o)).collect(),
            dedups: f
                .dedups
                .iter()
                .map(|((u, i), d)| (u.clone(), i.clone(), *d))
                .collect(),
        })
    }

    fn commit(&mut self, b: &Batch) -> Result<(), StoreError> {
        let mut f = self.0.files();
        f.entries.commit(b)?;
        for (s, m) in &b.metas {
            f.metas.insert(s.to_string(), *m);
        }
        for (u, o) in &b.confirms {
            f.confirmed.insert(u.clone(), *o);
        }
        for (u, id, d) in &b.dedups {
            f.dedups.insert((u.clone(), Arc::from(&**id)), *d);
        }
        f.commits += 1;
        Ok(())
    }

    fn read(
        &mut self,
        stream: &str,
        from: u64,
        max_items: usize,
        max_bytes: usize,
    ) -> Result<Vec<Entry>, StoreError> {
        self.0
            .files()
            .entries
            .read(stream, from, max_items, max_bytes)
    }

    fn durable(&self) -> bool {
        true
    }
}
