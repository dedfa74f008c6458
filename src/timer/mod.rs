//! Deadlines of a shard: a hierarchical timer wheel driven by the shard's clock.

pub mod wheel;

pub use wheel::Wheel;
