//! The process's directory of named users: which shards hold a connection of each, and how
//! many. Each user's entry is written only by its home shard (on `Presence` mail, so a
//! welcome still follows the record), and read by any shard that routes a DM: the sender's
//! shard finds the holding shards itself and posts to them directly, one hop.
//!
//! Read-mostly and striped: each home owns [`STRIPES_PER_HOME`] read-write locks, picked by
//! the user's hash, so routers on different cores rarely touch the same lock word, and a
//! home's own entries (what it counts in Redis) are its stripes alone.

use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustc_hash::FxHashMap;
use std::collections::hash_map::Entry;

use super::Few;
use crate::ids::{home_of_hash, user_hash};

/// Locks per home shard.
pub const STRIPES_PER_HOME: usize = 4;

type Map = FxHashMap<Arc<str>, Few<(u16, u32)>>;

/// Users → (shard, connections there), for the whole process.
#[derive(Debug)]
pub struct Directory {
    homes: usize,
    stripes: Box<[RwLock<Map>]>,
}

/// Where a user's entry lives: its home shard and its stripe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    /// The shard that writes the entry.
    pub home: u16,
    stripe: usize,
}

impl Directory {
    /// An empty directory for `homes` home shards.
    pub fn new(homes: usize) -> Directory {
        let homes = homes.max(1);
        Directory {
            homes,
            stripes: (0..homes * STRIPES_PER_HOME)
                .map(|_| RwLock::new(Map::default()))
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
        Place { home, stripe }
    }

    fn read(&self, p: Place) -> RwLockReadGuard<'_, Map> {
        // A panic while holding the lock left a whole map behind: keep using it.
        self.stripes[p.stripe]
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self, p: Place) -> RwLockWriteGuard<'_, Map> {
        self.stripes[p.stripe]
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// At the user's home: one connection opened (`online`) or closed on shard `from`.
    /// `Some(true)` when it is the user's first connection in the process, `Some(false)` when
    /// its last closed (the node's interest).
    pub fn presence(&self, user: Arc<str>, from: u16, online: bool) -> Option<bool> {
        let p = self.place(&user);
        let mut map = self.write(p);
        if online {
            let shards = match map.entry(user) {
                Entry::Vacant(e) => {
                    e.insert(Few::One((from, 1)));
                    return Some(true);
                }
                Entry::Occupied(e) => e.into_mut(),
            };
            match shards.as_mut_slice().iter_mut().find(|(s, _)| *s == from) {
                Some((_, n)) => *n += 1,
                None => shards.push((from, 1)),
            }
            None
        } else if let Some(shards) = map.get_mut(&user) {
            if let Some(i) = shards.as_slice().iter().position(|(s, _)| *s == from) {
                let n = &mut shards.as_mut_slice()[i].1;
                *n -= 1;
                if *n == 0 {
                    shards.swap_remove(i);
                }
            }
            if shards.is_empty() {
                map.remove(&user);
                return Some(false);
            }
            None
        } else {
            None
        }
    }

    /// Appends the shards holding connections of `user` to `out`, leaving out shard `except`
    /// when the user's only connection there is the excluded one (the sender's copy to its
    /// own other devices). When the user has any connection in the process: its name, shared
    /// (mail to other shards carries it without a new allocation).
    pub fn locate_except(
        &self,
        user: &str,
        except: Option<u16>,
        out: &mut Vec<u16>,
    ) -> Option<Arc<str>> {
        let map = self.read(self.place(user));
        let (name, v) = map.get_key_value(user)?;
        out.extend(
            v.as_slice()
                .iter()
                .filter(|&&(s, n)| !(Some(s) == except && n == 1))
                .map(|(s, _)| *s),
        );
        Some(name.clone())
    }

    /// Appends the shards holding connections of `user` to `out`; its shared name when there
    /// are any.
    pub fn locate(&self, user: &str, out: &mut Vec<u16>) -> Option<Arc<str>> {
        self.locate_except(user, None, out)
    }

    /// Whether `user` has a connection in the process.
    pub fn is_online(&self, user: &str) -> bool {
        self.read(self.place(user)).contains_key(user)
    }

    /// The users whose home is `home`, each with its connections in the process (what that
    /// shard counts in Redis).
    pub fn home_counts(&self, home: u16) -> Vec<(Arc<str>, u64)> {
        let first = home as usize * STRIPES_PER_HOME;
        let mut out = Vec::new();
        for stripe in first..first + STRIPES_PER_HOME {
            let map = self.read(Place { home, stripe });
            out.extend(map.iter().map(|(u, shards)| {
                let n = shards.as_slice().iter().map(|&(_, n)| u64::from(n)).sum();
                (u.clone(), n)
            }));
        }
        out
    }

    /// Entries of home `home`.
    pub fn home_len(&self, home: u16) -> usize {
        let first = home as usize * STRIPES_PER_HOME;
        (first..first + STRIPES_PER_HOME)
            .map(|stripe| self.read(Place { home, stripe }).len())
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

    #[test]
    fn counts_per_shard_first_and_last() {
        let d = Directory::new(2);
        let bob: Arc<str> = "bob".into();
        let at = |d: &Directory| {
            let mut v = Vec::new();
            d.locate("bob", &mut v);
            v
        };
        assert_eq!(d.presence(bob.clone(), 3, true), Some(true), "first");
        assert_eq!(d.presence(bob.clone(), 3, true), None);
        assert_eq!(d.presence(bob.clone(), 1, true), None);
        assert_eq!(at(&d), vec![3, 1]);
        let home = d.place("bob").home;
        assert_eq!(d.home_counts(home), vec![(bob.clone(), 3)]);
        assert_eq!((d.home_len(home), d.home_len(1 - home)), (1, 0));
        d.presence(bob.clone(), 3, false);
        assert_eq!(at(&d), vec![3, 1], "one of two connections on shard 3 left");
        d.presence(bob.clone(), 3, false);
        assert_eq!(at(&d), vec![1]);
        let mut v = Vec::new();
        assert!(d.locate_except("bob", Some(1), &mut v).is_some());
        assert!(v.is_empty(), "the only connection on shard 1 is excluded");
        d.presence(bob.clone(), 1, true);
        d.locate_except("bob", Some(1), &mut v);
        assert_eq!(
            v,
            vec![1],
            "two on shard 1: the other one still gets the copy"
        );
        assert_eq!(d.presence(bob.clone(), 1, false), None);
        assert_eq!(d.presence(bob.clone(), 1, false), Some(false), "last");
        assert_eq!(d.presence(bob, 1, false), None);
        assert!(at(&d).is_empty() && !d.is_online("bob"));
    }
}
