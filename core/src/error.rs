//! The one error type of freezeframe-core.
//!
//! Every variant's message names what failed and where (file, block,
//! snapshot), so an operator can act on it without reading the code. Other
//! parts of the crate add their variants here.

use std::path::PathBuf;

use crate::format::FormatProblem;

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in freezeframe-core.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call on a file failed.
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A state file failed to decode (wrong magic, version, truncation, checksum, payload).
    #[error("state file {} is unusable: {problem}", file.display())]
    Format {
        file: PathBuf,
        problem: FormatProblem,
    },
    /// A size such as `64KiB` could not be parsed or is out of range.
    #[error("invalid size {input:?}: {why}")]
    InvalidSize { input: String, why: String },
    /// A duration such as `10s` could not be parsed.
    #[error("invalid duration {input:?}: {why}")]
    InvalidDuration { input: String, why: String },
    /// The volume has no state directory recorded with it.
    #[error("no freezeframe state found for volume {} (looked for {}); create it with `freezeframe volume create`", volume.display(), looked.display())]
    NoState { volume: PathBuf, looked: PathBuf },
    /// `create` found state already recorded for the volume.
    #[error("volume {} already has freezeframe state at {}", volume.display(), state.display())]
    StateExists { volume: PathBuf, state: PathBuf },
    /// The volume file is shorter than its catalog says: truncated or the wrong file.
    #[error("volume file {} is {actual} bytes but its catalog says {recorded}", path.display())]
    VolumeTooShort {
        path: PathBuf,
        actual: u64,
        recorded: u64,
    },
    /// A block device volume needs an explicit state directory on shared storage.
    #[error("volume {} is a block device: give --state DIR on the shared storage", path.display())]
    StateDirRequired { path: PathBuf },
    /// An I/O request reaches past the end of the volume.
    #[error("{what} of {len} bytes at offset {offset} is beyond the end of volume {} ({size} bytes)", path.display())]
    OutOfRange {
        what: &'static str,
        path: PathBuf,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// The volume geometry given to `create` is unusable.
    #[error("cannot create volume {}: {why}", path.display())]
    BadGeometry { path: PathBuf, why: String },
    /// No snapshot with this id exists (deleted, never created, or aborted).
    #[error("snapshot {id} of volume {} does not exist", volume.display())]
    SnapshotNotFound { volume: PathBuf, id: u64 },
    /// The snapshot id was never handed out by `reserve_snapshot_id`, or is already used.
    #[error("snapshot id {id} of volume {} cannot be created: {why}", volume.display())]
    SnapshotIdUnusable {
        volume: PathBuf,
        id: u64,
        why: String,
    },
    /// A post-snapshot write reached a sealed snapshot.
    #[error("snapshot {id} is sealed (read-only)")]
    SnapshotSealed { id: u64 },
    /// The snapshot was invalidated (diff area full or damaged); its data cannot be served.
    #[error("snapshot {id} is invalid: {reason}; its data cannot be read")]
    SnapshotInvalid { id: u64, reason: String },
    /// A post-snapshot write would take the snapshot past its diff-area limit.
    #[error(
        "snapshot {id}: diff area full (limit {limit} bytes); the post-snapshot write was refused"
    )]
    DiffAreaFull { id: u64, limit: u64 },
    /// The newest intact catalog slot is older than the generation `gen` records.
    #[error("the catalog in {} is damaged: {detail}; the newest intact slot holds generation {found} but the gen file records {recorded}, so loading it would silently roll back acknowledged snapshot changes. Run `freezeframe volume check VOLUME` to see what is damaged and `freezeframe volume check VOLUME --repair` to accept the loss", state_dir.display())]
    CatalogRolledBack {
        state_dir: PathBuf,
        found: u64,
        recorded: u64,
        detail: String,
    },
    /// A diff-area block does not match the checksum its map record holds.
    #[error("snapshot {id}: block {block} in diff area {} (slot {slot}) fails its checksum", file.display())]
    DiffChecksum {
        id: u64,
        block: u64,
        slot: u64,
        file: PathBuf,
    },

    // --- snapshot manifests (core::manifest) ---
    /// A manifest file or the manifests directory could not be read or written.
    #[error("snapshot manifest {path}: {source}")]
    ManifestIo {
        path: PathBuf,
        source: std::io::Error,
    },
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
    VfsSnapshotInvalid {
        path: String,
        id: u64,
        reason: String,
    },
    /// The operation makes no sense for this kind of entry (read on a directory, …).
    #[error("{path}: {what}")]
    VfsWrongKind { path: String, what: &'static str },
    /// The engine failed underneath a path of the mounted tree.
    #[error("{path}: {source}")]
    VfsEngine { path: String, source: Box<Error> },

    /// An I/O call on a backup repository file failed.
    #[error("backup repository: cannot {action} {path}: {source}")]
    RepoIo {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },

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
    BlockCorrupt {
        backup: String,
        block: u64,
        hash: String,
        pack: PathBuf,
        detail: String,
    },

    /// A manifest refers to a block whose hash no index knows.
    #[error(
        "backup {backup}: block {block} (blake3 {hash}) is not in any pack of the repository index"
    )]
    BlockMissing {
        backup: String,
        block: u64,
        hash: String,
    },

    /// No backup with this id (or id prefix) in the repository.
    #[error("no backup {id} in repository {repo}{hint}")]
    BackupNotFound {
        id: String,
        repo: PathBuf,
        hint: String,
    },

    /// The snapshot is open (not yet complete) or invalid: backing it up would store a wrong image.
    #[error("snapshot {snapshot} of {source_name} cannot be backed up: {reason}")]
    SnapshotNotBackupable {
        snapshot: u64,
        source_name: String,
        reason: String,
    },

    /// Reading the snapshot being backed up failed.
    #[error("reading block {block} of snapshot {snapshot} of {source_name} failed: {detail}")]
    SourceRead {
        snapshot: u64,
        block: u64,
        source_name: String,
        detail: String,
    },

    /// `snapshot verify`: the image no longer hashes to what was recorded at seal time.
    #[error("snapshot {snapshot} does not match the hash recorded at seal time: recorded {recorded}, now {actual}{}{note}", match first_block { Some(b) => format!("; first differing block: {b} (bytes {}..{})", b * u64::from(*block_size), (b + 1) * u64::from(*block_size)), None => String::new() })]
    SnapshotMismatch {
        snapshot: u64,
        recorded: String,
        actual: String,
        first_block: Option<u64>,
        block_size: u32,
        note: String,
    },
    /// The per-block hashes recorded at seal time are missing or damaged.
    #[error("per-block seal hashes {} are unusable: {why}", file.display())]
    SealHashCorrupt { file: PathBuf, why: String },
    /// The restore target cannot take the image.
    #[error("cannot restore to {path}: {reason}")]
    RestoreTarget { path: PathBuf, reason: String },
    // --- replicas on a secondary host (core::replica) ---
    /// A name that cannot be used as given (it would leave its folder, say).
    #[error("{what} {name:?} is not usable here")]
    BadName { what: &'static str, name: String },
    /// A small state record (an attachment) cannot be decoded.
    #[error("{} is damaged: {why}", file.display())]
    Corrupt { file: PathBuf, why: String },
    /// This node is fenced off the volume: its live writes fail.
    #[error("node {node} is fenced off the volume and may not write: {why} (freezeframe node unfence {node} lets it rejoin)")]
    Fenced { node: String, why: String },
    /// A replica file is damaged or truncated: its record, journal or data disagree.
    #[error("replica file {} is unusable: {why}", file.display())]
    ReplicaCorrupt { file: PathBuf, why: String },
    /// A received block does not match the hash that travelled with it.
    #[error("replica of volume {volume}, snapshot {snapshot}: block {block} fails its blake3 check (sent {sent}, data hashes to {got})")]
    ReplicaBlockHash {
        volume: String,
        snapshot: u64,
        block: u64,
        sent: String,
        got: String,
    },
    /// The whole image built on the secondary does not hash to what the sender computed.
    #[error("replica of volume {volume}, snapshot {snapshot}: image blake3 is {got}, the sender computed {expected}; the snapshot stays incomplete")]
    ReplicaImageHash {
        volume: String,
        snapshot: u64,
        expected: String,
        got: String,
    },
    /// The secondary holds no (complete) replica of this volume or snapshot.
    #[error("replica store {}: {what} not found", dir.display())]
    ReplicaNotFound { dir: PathBuf, what: String },
    /// A transfer request that cannot be honoured (geometry mismatch, missing base, busy, bad block number).
    #[error("replica of volume {volume}, snapshot {snapshot}: {why}")]
    ReplicaRefused {
        volume: String,
        snapshot: u64,
        why: String,
    },
}

impl Error {
    /// Wraps an `io::Error` with the operation and the file it concerned.
    pub fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.into(),
            source,
        }
    }
}
