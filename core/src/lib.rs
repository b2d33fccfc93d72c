//! # freezeframe-core
//!
//! The engine of freezeframe. Nothing in this crate opens a socket, mounts a
//! filesystem or reads a clock on its own behalf: the protocol machines take
//! time as an argument and return instructions; the volume engine does file
//! I/O on the shared volume and its state directory only.
//!
//! # Layout
//! - [`error`]: the crate's one error type.
//! - [`backup`]: the deduplicating backup repository (express-full backups).
//! - [`format`]: the checksummed, versioned, size-limited envelope of every state file.
//! - [`units`]: sizes and durations as people write them (`64KiB`, `1GiB`, `10s`).
//! - [`volume`]: the copy-on-write shared volume engine: catalog, diff area, locks.
//! - [`protocol`]: the snapshot protocol as deterministic state machines.
//! - [`perms`]: private state whatever the umask: directories 0700, files 0600, repaired on open.
//! - [`manifest`]: the per-snapshot record (`manifests/<id>.json`) and image hashing.
//! - [`replica`]: replicas of a volume's snapshots on a secondary host, sent as changed blocks.
//! - [`seal_hash`]: the image hash recorded at seal time and `snapshot verify` comparing with it.
//! - [`vfs`]: the tree a node mounts (live volume, snapshots, manifests), FUSE-free.

pub mod backup;
pub mod error;
pub mod format;
#[doc(hidden)]
pub mod fuzzing;
pub mod manifest;
pub mod membership;
pub mod perms;
pub mod protocol;
pub mod replica;
pub mod seal_hash;
pub mod units;
pub mod vfs;
pub mod volume;

pub use error::{Error, Result};
