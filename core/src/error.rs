//! Error type of freezeframe-core.

use std::path::PathBuf;

/// The one error type of freezeframe-core. Each message names the file, snapshot or
/// path it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // --- snapshot manifests (core::manifest) ---
    /// A manifest file or the manifests directory could not be read or written.
    #[error("snapshot manifest {path}: {source}")]
    ManifestIo { path: PathBuf, source: std::io::Error },
    /// A manifest file exists but is not a valid manifest.
    #[error("snapshot manifest {path} is corrupt: {reason}")]
    ManifestCorrupt { path: PathBuf, reason: String },

    // --- the mounted tree (core::vfs) ---
    /// No such entry in the mounted tree (or the snapshot was deleted).
    #[error("{path}: no such file or directory")]
    VfsNotFound { path: String },
    /// A write to something that is read-only: a sealed snapshot, a manifest, a directory.
    #[error("{path}: read-only ({why})")]
    VfsReadOnly { path: String, why: String },
    /// The snapshot behind the path is invalid (diff area overflow): its data is gone.
    #[error("{path}: snapshot {id} is invalid: {reason}")]
    VfsSnapshotInvalid { path: String, id: u64, reason: String },
    /// The operation makes no sense for this kind of entry (read on a directory, …).
    #[error("{path}: {what}")]
    VfsWrongKind { path: String, what: &'static str },
    /// The engine failed underneath a path of the mounted tree.
    #[error("{path}: {source}")]
    VfsEngine { path: String, source: Box<Error> },
}

/// Result with the crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
