//! Deadlines of a shard: a hierarchical timer wheel driven by the shard's clock.

pub mod slack;
pub mod wheel;

pub use wheel::Wheel;
