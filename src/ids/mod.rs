//! Names that cross layers: a connection anywhere in the process, whom to answer, and a
//! user's home shard. A leaf module: it imports nothing of the crate.

use std::hash::BuildHasher;
use std::sync::Arc;

use rustc_hash::FxBuildHasher;

/// A connection anywhere in the process; slab keys are reused, so the generation tells
/// reuses apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// Shard index.
    pub shard: u16,
    /// Slab key in that shard.
    pub slot: u32,
    /// Generation of the slot.
    pub generation: u32,
}

impl std::fmt::Display for ConnId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.shard, self.slot, self.generation)
    }
}

impl std::str::FromStr for ConnId {
    type Err = ();
    /// Parses what `Display` wrote (`shard.slot.generation`).
    fn from_str(s: &str) -> Result<ConnId, ()> {
        let mut p = s.split('.');
        let mut next = || p.next().ok_or(());
        let shard = next()?.parse().map_err(|_| ())?;
        let slot = next()?.parse().map_err(|_| ())?;
        let generation = next()?.parse().map_err(|_| ())?;
        Ok(ConnId {
            shard,
            slot,
            generation,
        })
    }
}

/// Who asked for a routed `send`, and the request id to acknowledge.
#[derive(Debug)]
pub struct ReplyTo {
    /// The requesting connection.
    pub conn: ConnId,
    /// Raw JSON of the request's `id`.
    pub id: Box<str>,
    /// The recipient, for the error message.
    pub to: Arc<str>,
}

/// Home shard of a user id.
pub fn home_of(user: &str, shards: usize) -> u16 {
    home_of_hash(user_hash(user), shards)
}

/// The hash a user id is placed by (its home shard, its directory stripe).
pub fn user_hash(user: &str) -> u64 {
    FxBuildHasher.hash_one(user)
}

/// Home shard of a user id's [`user_hash`].
pub fn home_of_hash(v: u64, shards: usize) -> u16 {
    // Mix the high bits in: FxHash's low bits are weak for short keys.
    ((v ^ (v >> 29) ^ (v >> 47)) % shards as u64) as u16
}

/// An API request (or a `presence` op) waiting for every shard's and node's answer.
#[derive(Debug, Clone, Copy)]
pub struct ApiTicket {
    /// Shard holding the waiting connection.
    pub shard: u16,
    /// Its pending-request id there.
    pub id: u32,
}
