//! The value types a key can hold. Each keeps the iteration order Redis shows for it.

pub mod hash;
pub mod stream;
pub mod zset;

pub use hash::Hash;
pub use stream::{Stream, StreamId};
pub use zset::ZSet;
