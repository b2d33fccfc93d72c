//! The volume engine's snapshots as a [`BlockSource`]: reads go through
//! [`Snapshot::read_at`] (diff area first, then the volume), and the
//! changed-block list comes from [`Volume::changed_blocks`], i.e. from the
//! diff area — never from a rescan (seed 002).

use super::manifest::{SnapshotRef, SourceIdentity};
use super::source::{BlockSource, ChangedSince};
use crate::error::{Error, Result};
use crate::volume::{Snapshot, SnapshotId, SnapshotInfo, SnapshotState, Volume};

/// One snapshot of a volume, ready to back up.
pub struct VolumeSnapshotSource {
    volume: Volume,
    snapshot: Snapshot,
    info: SnapshotInfo,
    identity: SourceIdentity,
}

impl std::fmt::Debug for VolumeSnapshotSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeSnapshotSource")
            .field("volume", &self.identity.name)
            .field("snapshot", &self.info.id)
            .finish()
    }
}

impl VolumeSnapshotSource {
    /// Snapshot `id` of `volume`, or with `None` the newest sealed one.
    pub fn new(volume: &Volume, id: Option<SnapshotId>) -> Result<VolumeSnapshotSource> {
        let name = volume.path().display().to_string();
        let snapshots = volume.snapshots()?;
        let info = match id {
            Some(id) => snapshots.into_iter().find(|s| s.id == id).ok_or_else(|| Error::SnapshotNotBackupable {
                snapshot: id,
                source_name: name.clone(),
                reason: "there is no such snapshot in the volume's catalog".into(),
            })?,
            None => snapshots
                .into_iter()
                .filter(|s| matches!(s.state, SnapshotState::Sealed))
                .max_by_key(|s| s.id)
                .ok_or_else(|| Error::SnapshotNotBackupable {
                    snapshot: 0,
                    source_name: name.clone(),
                    reason: "the volume has no complete (sealed) snapshot; take one with `freezeframe snapshot create`".into(),
                })?,
        };
        let snapshot = volume.snapshot(info.id)?;
        // The canonical path names the volume the same way for every run on this node.
        let volume_id = volume
            .path()
            .canonicalize()
            .unwrap_or_else(|_| volume.path().to_path_buf())
            .display()
            .to_string();
        Ok(VolumeSnapshotSource {
            volume: volume.clone(),
            snapshot,
            info,
            identity: SourceIdentity { volume_id, name },
        })
    }

    /// The catalog entry of the snapshot being backed up.
    pub fn info(&self) -> &SnapshotInfo {
        &self.info
    }
}

impl BlockSource for VolumeSnapshotSource {
    fn identity(&self) -> SourceIdentity {
        self.identity.clone()
    }
    fn snapshot(&self) -> SnapshotRef {
        SnapshotRef {
            id: self.info.id,
            created_ms: self.info.created_ms,
        }
    }
    fn block_size(&self) -> u32 {
        self.snapshot.block_size()
    }
    fn size(&self) -> u64 {
        self.snapshot.size()
    }
    fn check_complete(&self) -> Result<()> {
        let reason = match self.snapshot.state()? {
            SnapshotState::Sealed => return Ok(()),
            SnapshotState::Open => "it is still open (the snapshot protocol or post-snapshot processing has not finished)".to_string(),
            SnapshotState::Invalid { reason } => format!("it is invalid: {reason}"),
        };
        Err(Error::SnapshotNotBackupable {
            snapshot: self.info.id,
            source_name: self.identity.name.clone(),
            reason,
        })
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let mut done = 0;
        while done < buf.len() {
            let n = self
                .snapshot
                .read_at(&mut buf[done..], offset + done as u64)
                .map_err(|e| Error::SourceRead {
                    snapshot: self.info.id,
                    block: (offset + done as u64) / u64::from(self.block_size().max(1)),
                    source_name: self.identity.name.clone(),
                    detail: e.to_string(),
                })?;
            if n == 0 {
                return Err(Error::SourceRead {
                    snapshot: self.info.id,
                    block: (offset + done as u64) / u64::from(self.block_size().max(1)),
                    source_name: self.identity.name.clone(),
                    detail: "the snapshot ended early".into(),
                });
            }
            done += n;
        }
        Ok(())
    }
    fn changed_since(&self, earlier: &SnapshotRef) -> Result<ChangedSince> {
        let catalog = self.volume.snapshots()?;
        match catalog.iter().find(|s| s.id == earlier.id) {
            None => {
                return Ok(ChangedSince::Unknown {
                    reason: format!("snapshot {} of the last backup is no longer in the volume's catalog", earlier.id),
                })
            }
            Some(s) if s.created_ms != earlier.created_ms => {
                return Ok(ChangedSince::Unknown {
                    reason: format!(
                        "snapshot {} in the catalog was created at {} ms, not at {} ms like the one backed up (the volume was recreated)",
                        earlier.id, s.created_ms, earlier.created_ms
                    ),
                })
            }
            Some(_) => {}
        }
        if earlier.id == self.info.id {
            return Ok(ChangedSince::Blocks(Vec::new()));
        }
        Ok(ChangedSince::Blocks(
            self.volume.changed_blocks(earlier.id, Some(self.info.id))?,
        ))
    }
}
