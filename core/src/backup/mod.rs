//! The deduplicating backup repository and express-full backups
//! (seeds 002 and 004).
//!
//! A repository is a directory of pack files holding block data keyed by
//! blake3, index files saying which pack holds which hash, and one manifest
//! per backup listing the hash of every block of the image. Identical blocks
//! — across snapshots of a volume and across volumes — are stored once;
//! all-zero blocks are not stored at all.
//!
//! The first backup of a volume reads every block of the snapshot. Later
//! ones read only the blocks the volume engine lists as changed since the
//! last backed-up snapshot (from the diff area, never a rescan) and take
//! every other block's hash from the previous manifest, so each manifest
//! still restores the whole image by itself.
//!
//! # Layout
//! - [`repo`]: the directory, its config, the writer lock, backup lookup.
//! - [`source`]: [`BlockSource`], what a backup reads; [`ImageFileSource`].
//! - [`volume_source`]: [`VolumeSnapshotSource`], a snapshot of the volume engine.
//! - [`run`]: making a backup (full or express-full).
//! - [`restore`], [`verify`], [`gc`]: reading back, checking, forgetting.
//! - `pack`, `index`, `manifest`, `envelope`: the on-disk formats
//!   (drawn in `docs/formats-backup.md`, the repository section of `docs/formats.md`).
//!
//! # Crash safety
//! A backup writes pack files (fsync, rename, fsync dir), then their index
//! files (same), and only then its manifest (same). Killed at any instant
//! it leaves at worst temporaries and complete-but-unreferenced packs,
//! which the next writer or gc removes; no manifest ever names data that
//! is not durable.
//!
//! # Integrity
//! Every block read back is hashed and compared with its key. A mismatch is
//! an error naming the backup, the block index and the pack file.

pub(crate) mod envelope;
mod fsutil;
pub mod gc;
pub mod hash;
pub(crate) mod index;
pub mod manifest;
pub(crate) mod pack;
pub mod repo;
pub mod restore;
pub mod run;
pub mod source;
pub mod verify;
pub mod volume_source;

pub use gc::GcReport;
pub use hash::BlockHash;
pub use manifest::{
    BackupKind, BackupStats, Manifest, ManifestHeader, SnapshotRef, SourceIdentity,
};
pub use repo::{Listing, RepoConfig, Repository, DEFAULT_PACK_SIZE};
pub use restore::RestoreReport;
pub use source::{BlockSource, ChangedSince, ImageFileSource};
pub use verify::{VerifyProblem, VerifyReport};
pub use volume_source::VolumeSnapshotSource;

/// Told how far a long operation has come (the CLI draws a bar from it).
pub trait Progress: Sync {
    /// A phase begins; `total` is in bytes.
    fn start(&self, phase: &str, total: u64);
    /// `bytes` more are done.
    fn advance(&self, bytes: u64);
    /// The phase is over.
    fn finish(&self) {}
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
}
