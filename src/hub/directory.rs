//! The process's directory of named users: each user's connections, as (shard, slot,
//! generation). Each user's entry is written only by its home shard (on `Presence` mail, so
//! a welcome still follows the record), and read by every shard: the sender's shard of a DM
//! finds the holding shards itself and posts to them directly (one hop), and a holding shard
//! finds its own connections of the user here too (there is no second, per-shard map).
//!
//! Read-mostly and striped: each home owns [`STRIPES_PER_HOME`] read-write locks, picked by
//! the user's hash, so routers on different cores rarely touch the same lock word, and a
//! home's own entries (what it counts in Redis) are its stripes alone.
//!
//! Compact, because a million users each have an entry: a stripe keeps its entries (name
//! and connections, 32 bytes) in a slab, and its hash index holds only 4-byte slab keys, so
//! the index's spare room (a hash table is 44–88 % full) costs 5 bytes a slot, not 33.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use hashbrown::HashTable;
use slab::Slab;

use crate::ids::{home_of_hash, user_hash, ConnId};

/// Locks per home shard.
pub const STRIPES_PER_HOME: usize = 4;

/// One user's connections in the process: one inline (most users), more on the heap. The
/// `Vec` is boxed so the enum is 16 bytes (a thin pointer beside one `ConnId`), not 24.
#[derive(Debug)]
#[allow(clippy::box_collection)]
enum Conns {
    One(ConnId),
    Many(Box<Vec<ConnId>>),
}

impl Conns {
    fn as_slice(&self) -> &[ConnId] {
        match self {
            Conns::One(c) => std::slice::from_ref(c),
            Conns::Many(v) => v,
        }
    }

    fn push(&mut self, c: ConnId) {
        match self {
            Conns::One(a) => *self = Conns::Many(Box::new(vec![*a, c])),
            Conns::Many(v) => v.push(c),
        }
    }

    /// Removes `c`; true when no connection is left.
    fn remove(&mut self, c: ConnId) -> bool {
        match self {
            Conns::One(a) => *a == c,
            Conns::Many(v) => {
                if let Some(i) = v.iter().position(|x| *x == c) {
                    v.swap_remove(i);
                }
                match v.as_slice() {
                    [] => true,
                    [one] => {
                        *self = Conns::One(*one);
                        false
                    }
                    _ => false,
                }
            }
        }
    }
}

#[derive(Debug)]
struct Entry {
    name: Arc<str>,
    conns: Conns,
}

/// One lock's share of the directory.
#[derive(Debug, Default)]
struct Stripe {
    /// Slab keys of `entries`, by the user's [`table_hash`].
    index: HashTable<u32>,
    entries: Slab<Entry>,
}

impl Stripe {
    fn find(&self, hash: u64, user: &str) -> Option<&Entry> {
        let entries = &self.entries;
        let &i = self
            .index
            .find(hash, |&i| &*entries[i as usize].name == user)?;
        Some(&entries[i as usize])
    }
}

/// The index's hash of a user, from [`user_hash`] (which also picks the home and the
/// stripe, so its bits are mixed again: the index's buckets and tags would otherwise see
/// the same few values within a stripe).
fn table_hash(v: u64) -> u64 {
    // The finalizer of MurmurHash3.
    let mut x = v ^ (v >> 33);
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// Users → their connections, for the whole process.
#[derive(Debug)]
pub struct Directory {
    homes: usize,
    stripes: Box<[RwLock<Stripe>]>,
}

/// Where a user's entry lives: its home shard, its stripe, its hash there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The shard that writes the entry.
    pub home: u16,
    stripe: usize,
    hash: u64,
}

impl Directory {
    /// An empty directory for `homes` home shards.
    pub fn new(homes: usize) -> Directory {
        Self::with_room(homes, 0)
    }

    /// An empty directory for `homes` home shards with room for `users` before any stripe
    /// grows (half again each stripe's share: users do not spread evenly). Address space
    /// costs nothing until used, while a table that grows by doubling copies itself, and the
    /// old copies stay resident a while: the server makes room for `--max-connections`.
    pub fn with_room(homes: usize, users: usize) -> Directory {
        let homes = homes.max(1);
        let stripes = homes * STRIPES_PER_HOME;
        let each = users.div_ceil(stripes) * 3 / 2;
        Directory {
            homes,
            stripes: (0..stripes)
                .map(|_| {
                    RwLock::new(Stripe {
                        index: HashTable::with_capacity(each),
                        entries: Slab::with_capacity(each),
                    })
                })
                .collect(),
        }
    }

    /// Home shards (the modulus of [`place`](Self::place)).
    pub fn homes(&self) -> usize {
        self.homes
    }

    /// The user's home shard and stripe, from one hash.
    pub fn place(&self, user: &str) -> Place {
        let v = user_hash(user);
        let home = home_of_hash(v, self.homes);
        let stripe = home as usize * STRIPES_PER_HOME + ((v >> 57) as usize % STRIPES_PER_HOME);
        Place {
            home,
            stripe,
            hash: table_hash(v),
        }
    }

    fn read(&self, stripe: usize) -> RwLockReadGuard<'_, Stripe> {
        // A panic while holding the lock left a whole stripe behind: keep using it.
        self.stripes[stripe]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, stripe: usize) -> RwLockWriteGuard<'_, Stripe> {
        self.stripes[stripe]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// At the user's home: connection `conn` opened (`online`) or closed. `Some(true)` when
    /// it is the user's first connection in the process, `Some(false)` when its last closed
    /// (the node's interest).
    pub fn presence(&self, user: Arc<str>, conn: ConnId, online: bool) -> Option<bool> {
        let p = self.place(&user);
        let mut stripe = self.write(p.stripe);
        let Stripe { index, entries } = &mut *stripe;
        let found = index
            .find(p.hash, |&i| entries[i as usize].name == user)
            .copied();
        match (found, online) {
            (Some(i), true) => {
                let conns = &mut entries[i as usize].conns;
                if !conns.as_slice().contains(&conn) {
                    conns.push(conn);
                }
                None
            }
            (Some(i), false) => {
                if !entries[i as usize].conns.remove(conn) {
                    return None;
                }
                if let Ok(e) = index.find_entry(p.hash, |&j| j == i) {
                    e.remove();
                }
                entries.remove(i as usize);
                Some(false)
            }
            (None, true) => {
                let i = entries.insert(Entry {
                    name: user,
                    conns: Conns::One(conn),
                });
                let i = u32::try_from(i).expect("under 2^32 users a stripe");
                index.insert_unique(p.hash, i, |&j| {
                    table_hash(user_hash(&entries[j as usize].name))
                });
                Some(true)
            }
            (None, false) => None,
        }
    }

    /// Appends the shards holding connections of `user` to `out` (each once), leaving out
    /// connection `except` (a sender's copy to its own other devices: a shard whose only
    /// connection of the user is the sender gets no mail). A shard that delivers to its own
    /// connections itself passes itself as `here`: those go to `local` instead, in the same
    /// read of the entry. When the user has any connection in the process: its name, shared
    /// (mail to other shards carries it without a new allocation).
    pub fn route(
        &self,
        user: &str,
        except: Option<ConnId>,
        here: Option<u16>,
        out: &mut Vec<u16>,
        mut local: impl FnMut(ConnId),
    ) -> Option<Arc<str>> {
        let p = self.place(user);
        let stripe = self.read(p.stripe);
        let e = stripe.find(p.hash, user)?;
        for &c in e.conns.as_slice() {
            if Some(c) == except {
                continue;
            }
            if Some(c.shard) == here {
                local(c);
            } else if !out.contains(&c.shard) {
                out.push(c.shard);
            }
        }
        Some(e.name.clone())
    }

    /// Appends the shards holding connections of `user` to `out`; its shared name when there
    /// are any.
    pub fn locate(&self, user: &str, out: &mut Vec<u16>) -> Option<Arc<str>> {
        self.route(user, None, None, out, |_| {})
    }

    /// Calls `f` with each connection of `user` on `shard` (the holding shard checks each
    /// is still the live one: the entry lags a close by one mail to the home).
    pub fn each_on(&self, user: &str, shard: u16, mut f: impl FnMut(ConnId)) {
        let p = self.place(user);
        let stripe = self.read(p.stripe);
        if let Some(e) = stripe.find(p.hash, user) {
            for c in e.conns.as_slice() {
                if c.shard == shard {
                    f(*c);
                }
            }
        }
    }

    /// Whether `user` has a connection in the process.
    pub fn is_online(&self, user: &str) -> bool {
        let p = self.place(user);
        self.read(p.stripe).find(p.hash, user).is_some()
    }

    /// The users whose home is `home`, each with its connections in the process (what that
    /// shard counts in Redis).
    pub fn home_counts(&self, home: u16) -> Vec<(Arc<str>, u64)> {
        let first = home as usize * STRIPES_PER_HOME;
        let mut out = Vec::new();
        for stripe in first..first + STRIPES_PER_HOME {
            let s = self.read(stripe);
            out.extend(
                s.entries
                    .iter()
                    .map(|(_, e)| (e.name.clone(), e.conns.as_slice().len() as u64)),
            );
        }
        out
    }

    /// Entries of home `home`.
    pub fn home_len(&self, home: u16) -> usize {
        let first = home as usize * STRIPES_PER_HOME;
        (first..first + STRIPES_PER_HOME)
            .map(|stripe| self.read(stripe).entries.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::home_of;

    #[test]
    fn places_users_at_the_home_the_rest_of_the_process_computes() {
        for homes in [1, 2, 3, 64] {
            let d = Directory::new(homes);
            for i in 0..2000 {
                let u = format!("user{i}");
                let p = d.place(&u);
                assert_eq!(p.home, home_of(&u, homes), "{u} with {homes} homes");
                assert_eq!(p.stripe / STRIPES_PER_HOME, p.home as usize);
            }
        }
    }

    fn id(shard: u16, slot: u32) -> ConnId {
        ConnId {
            shard,
            slot,
            generation: 1,
        }
    }

    #[test]
    fn connections_first_and_last() {
        let d = Directory::new(2);
        let bob: Arc<str> = "bob".into();
        let at = |d: &Directory| {
            let mut v = Vec::new();
            d.locate("bob", &mut v);
            v.sort();
            v
        };
        assert_eq!(d.presence(bob.clone(), id(3, 7), true), Some(true), "first");
        assert_eq!(d.presence(bob.clone(), id(3, 8), true), None);
        assert_eq!(d.presence(bob.clone(), id(3, 8), true), None, "twice: once");
        assert_eq!(d.presence(bob.clone(), id(1, 7), true), None);
        assert_eq!(at(&d), vec![1, 3], "each shard once");
        let mut on3 = Vec::new();
        d.each_on("bob", 3, |c| on3.push(c));
        assert_eq!(on3, vec![id(3, 7), id(3, 8)]);
        let home = d.place("bob").home;
        assert_eq!(d.home_counts(home), vec![(bob.clone(), 3)]);
        assert_eq!((d.home_len(home), d.home_len(1 - home)), (1, 0));
        d.presence(bob.clone(), id(3, 7), false);
        assert_eq!(at(&d), vec![1, 3], "one of two connections on shard 3 left");
        assert_eq!(d.presence(bob.clone(), id(3, 99), false), None, "not there");
        d.presence(bob.clone(), id(3, 8), false);
        assert_eq!(at(&d), vec![1]);
        let mut v = Vec::new();
        assert!(d
            .route("bob", Some(id(1, 7)), None, &mut v, |_| {})
            .is_some());
        assert!(v.is_empty(), "the only connection on shard 1 is excluded");
        d.presence(bob.clone(), id(1, 9), true);
        d.route("bob", Some(id(1, 7)), None, &mut v, |_| {});
        assert_eq!(
            v,
            vec![1],
            "another connection on shard 1 still gets the copy"
        );
        assert_eq!(d.presence(bob.clone(), id(1, 7), false), None);
        assert_eq!(
            d.presence(bob.clone(), id(1, 9), false),
            Some(false),
            "last"
        );
        assert_eq!(d.presence(bob, id(1, 9), false), None);
        assert!(at(&d).is_empty() && !d.is_online("bob"));
        assert_eq!(d.home_len(home), 0);
    }

    /// Many users in few stripes: every one found under its own name with its own
    /// connection, after the index grew many times and half of them left.
    #[test]
    fn many_users_each_found_under_its_name() {
        let d = Directory::new(1);
        let n = 20_000u32;
        for i in 0..n {
            let u: Arc<str> = format!("u{i}").into();
            assert_eq!(d.presence(u, id(0, i), true), Some(true));
        }
        for i in (0..n).step_by(2) {
            let u: Arc<str> = format!("u{i}").into();
            assert_eq!(d.presence(u, id(0, i), false), Some(false));
        }
        assert_eq!(d.home_len(0), n as usize / 2);
        for i in 0..n {
            let mut on = Vec::new();
            d.each_on(&format!("u{i}"), 0, |c| on.push(c));
            let want = if i % 2 == 1 { vec![id(0, i)] } else { vec![] };
            assert_eq!(on, want, "u{i}");
        }
    }

    /// An entry is a name and one inline connection: 32 bytes in its slab.
    #[test]
    fn an_entry_is_32_bytes() {
        #[allow(dead_code)]
        enum SlabEntry<T> {
            Vacant(usize),
            Occupied(T),
        }
        assert_eq!(std::mem::size_of::<SlabEntry<Entry>>(), 32);
    }
}
