//! Error type of freezeframe-core.
//!
//! One enum for the whole crate. Every variant names the file, block,
//! snapshot or backup it is about, so the message alone tells an operator
//! what failed and where.

use std::path::PathBuf;

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong in freezeframe-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O call on a backup repository file failed.
    #[error("backup repository: cannot {action} {path}: {source}")]
    RepoIo { action: &'static str, path: PathBuf, source: std::io::Error },

    /// The directory holds no backup repository (no readable config).
    #[error("no backup repository at {path} (create one with `freezeframe backup init {path}`)")]
    RepoNotFound { path: PathBuf },

    /// `init` was asked to create a repository where one (or other data) already is.
    #[error("cannot create a backup repository at {path}: {reason}")]
    RepoExists { path: PathBuf, reason: String },

    /// Another writer (backup run or forget) holds the repository lock.
    #[error("backup repository {path} is locked by another writer (a backup run or forget in progress); try again when it has finished")]
    RepoLocked { path: PathBuf },

    /// A repository file (config, index, manifest, pack header or trailer) fails its checks.
    #[error("backup repository file {path} is corrupt: {detail}")]
    RepoCorrupt { path: PathBuf, detail: String },

    /// A block's data read from a pack does not match its blake3 hash (or cannot be read).
    #[error("backup {backup}: block {block} (blake3 {hash}) in pack {pack} is corrupt: {detail}")]
    BlockCorrupt { backup: String, block: u64, hash: String, pack: PathBuf, detail: String },

    /// A manifest refers to a block whose hash no index knows.
    #[error("backup {backup}: block {block} (blake3 {hash}) is not in any pack of the repository index")]
    BlockMissing { backup: String, block: u64, hash: String },

    /// No backup with this id (or id prefix) in the repository.
    #[error("no backup {id} in repository {repo}{hint}")]
    BackupNotFound { id: String, repo: PathBuf, hint: String },

    /// The snapshot is open (not yet complete) or invalid: backing it up would store a wrong image.
    #[error("snapshot {snapshot} of {source_name} cannot be backed up: {reason}")]
    SnapshotNotBackupable { snapshot: u64, source_name: String, reason: String },

    /// Reading the snapshot being backed up failed.
    #[error("reading block {block} of snapshot {snapshot} of {source_name} failed: {detail}")]
    SourceRead { snapshot: u64, block: u64, source_name: String, detail: String },

    /// The restore target cannot take the image.
    #[error("cannot restore to {path}: {reason}")]
    RestoreTarget { path: PathBuf, reason: String },
}
