//! What a backup reads: a complete snapshot of one volume, block by block,
//! and the list of blocks changed since an earlier snapshot of the same
//! volume.
//!
//! The store depends only on [`BlockSource`], so it can be tested with
//! in-memory sources and used with the volume engine's snapshots (the
//! adapter lives beside the engine contract) or a plain image file.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::manifest::{SnapshotRef, SourceIdentity};
use crate::error::{Error, Result};

/// Blocks changed between an earlier snapshot and this one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangedSince {
    /// Indices of every block whose content may differ (a superset is fine).
    Blocks(Vec<u64>),
    /// The source cannot tell (the earlier snapshot is gone, or it keeps no
    /// changed-block list): the backup reads every block.
    Unknown { reason: String },
}

/// A complete, read-only snapshot of a volume, as the backup store sees it.
pub trait BlockSource: Sync {
    /// Which volume this is; backups with the same `volume_id` chain into incrementals.
    fn identity(&self) -> SourceIdentity;
    /// Which snapshot of that volume.
    fn snapshot(&self) -> SnapshotRef;
    /// Block size in bytes (the unit of change tracking and deduplication).
    fn block_size(&self) -> u32;
    /// Image size in bytes.
    fn size(&self) -> u64;
    /// `Err(Error::SnapshotNotBackupable)` when the snapshot is still open or invalid.
    fn check_complete(&self) -> Result<()>;
    /// Fills `buf` from `offset` (block-aligned; `buf` ends at or before the image end).
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()>;
    /// Blocks changed since `earlier`, from the source's own bookkeeping (never a rescan).
    fn changed_since(&self, earlier: &SnapshotRef) -> Result<ChangedSince>;
}

/// A plain image file taken as one complete snapshot. It keeps no
/// changed-block list, so every backup of it reads every block (identical
/// blocks are still stored once).
#[derive(Debug)]
pub struct ImageFileSource {
    path: PathBuf,
    file: File,
    size: u64,
    block_size: u32,
    snapshot: SnapshotRef,
}

impl ImageFileSource {
    /// Opens `path`; `snapshot` labels this state of the file in the manifest.
    pub fn open(path: &Path, block_size: u32, snapshot: SnapshotRef) -> Result<ImageFileSource> {
        let io = |action: &'static str| {
            let path = path.to_path_buf();
            move |source| Error::RepoIo {
                action,
                path,
                source,
            }
        };
        let file = File::open(path).map_err(io("open image"))?;
        let size = file.metadata().map_err(io("stat image"))?.len();
        let path = path.canonicalize().map_err(io("resolve image path"))?;
        Ok(ImageFileSource {
            path,
            file,
            size,
            block_size,
            snapshot,
        })
    }
}

impl BlockSource for ImageFileSource {
    fn identity(&self) -> SourceIdentity {
        SourceIdentity {
            volume_id: self.path.display().to_string(),
            name: self.path.display().to_string(),
        }
    }
    fn snapshot(&self) -> SnapshotRef {
        self.snapshot
    }
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn check_complete(&self) -> Result<()> {
        Ok(())
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| Error::SourceRead {
                snapshot: self.snapshot.id,
                block: offset / u64::from(self.block_size.max(1)),
                source_name: self.path.display().to_string(),
                detail: e.to_string(),
            })
    }
    fn changed_since(&self, _earlier: &SnapshotRef) -> Result<ChangedSince> {
        Ok(ChangedSince::Unknown {
            reason: "a plain image file keeps no changed-block list".into(),
        })
    }
}
