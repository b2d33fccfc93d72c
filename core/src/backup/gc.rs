//! Forgetting backups and collecting the garbage they leave.
//!
//! gc keeps every blob some remaining manifest references and drops the
//! rest: a pack nobody uses is deleted; a pack partly used is rewritten
//! (its live blobs, re-verified, copied into new packs) and then deleted.
//! The order keeps the repository consistent if gc is killed: new packs and
//! their indexes are durable before an old index is removed, and an old
//! index is removed before its pack. gc refuses to run when any manifest is
//! unreadable, since it could not know what that backup needs.

use std::collections::HashSet;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;

use serde::Serialize;

use super::fsutil::{io_err, list_files, sync_dir};
use super::hash::{BlockHash, DigestBuild};
use super::index::MasterIndex;
use super::pack::PackWriter;
use super::repo::{Repository, WriterLock};
use crate::error::{Error, Result};

/// What gc did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct GcReport {
    pub forgotten: Option<String>,
    pub packs_deleted: u64,
    pub packs_rewritten: u64,
    pub packs_written: u64,
    pub bytes_freed: u64,
    pub temps_removed: u64,
    pub orphan_packs_removed: u64,
}

impl Repository {
    /// Deletes backup `id` (or unique prefix), then collects garbage.
    pub fn forget(&self, id: &str) -> Result<GcReport> {
        let lock = self.lock_writer()?;
        let id = self.resolve_id(id)?;
        let path = self.manifest_path(&id);
        fs::remove_file(&path).map_err(io_err("remove", &path))?;
        sync_dir(&self.root.join("backups"))?;
        let mut report = self.gc_locked(&lock)?;
        report.forgotten = Some(id);
        Ok(report)
    }

    /// Removes data no backup references, and debris of interrupted writers.
    pub fn gc(&self) -> Result<GcReport> {
        let lock = self.lock_writer()?;
        self.gc_locked(&lock)
    }

    fn gc_locked(&self, lock: &WriterLock) -> Result<GcReport> {
        let mut report = GcReport {
            temps_removed: self.remove_temps(lock)?,
            ..Default::default()
        };
        let (manifests, unreadable) = self.manifests()?;
        if let Some((path, why)) = unreadable.first() {
            return Err(Error::RepoCorrupt {
                path: path.clone(),
                detail: format!("{why}; gc will not run while a backup's manifest is unreadable (remove it with `backup forget` if it is beyond repair)"),
            });
        }
        let mut live: HashSet<BlockHash, DigestBuild> = HashSet::default();
        for m in &manifests {
            live.extend(m.blocks.iter().flatten().copied());
        }
        drop(manifests);

        let index = MasterIndex::load(&self.root)?;
        let packs_dir = self.root.join("packs");
        let index_dir = self.root.join("index");

        // Packs with no index at all were never committed: remove them.
        let indexed: HashSet<&str> = index.packs.iter().map(|p| p.id.as_str()).collect();
        let broken: HashSet<String> = index
            .problems
            .iter()
            .filter_map(|p| {
                p.path
                    .file_name()
                    .map(|n| n.to_string_lossy().trim_end_matches(".idx").to_string())
            })
            .collect();
        for name in list_files(&packs_dir, ".pack")? {
            let id = name.trim_end_matches(".pack");
            if !indexed.contains(id) && !broken.contains(id) {
                let p = packs_dir.join(&name);
                report.bytes_freed += fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
                fs::remove_file(&p).map_err(io_err("remove unreferenced pack", &p))?;
                report.orphan_packs_removed += 1;
            }
        }

        let mut writer = PackWriter::new(&self.root, self.config.pack_size);
        let mut retire: Vec<usize> = Vec::new();
        for (pi, pack) in index.packs.iter().enumerate() {
            // A blob is live here only if it is referenced and this is the copy the map chose.
            let keep: Vec<_> = pack
                .entries
                .iter()
                .filter(|e| {
                    live.contains(&e.hash)
                        && index
                            .get(&e.hash)
                            .is_some_and(|l| l.pack as usize == pi && l.offset == e.offset)
                })
                .copied()
                .collect();
            if keep.len() == pack.entries.len() {
                continue;
            }
            if !keep.is_empty() {
                let file = File::open(&pack.path).map_err(io_err("open", &pack.path))?;
                for e in &keep {
                    let mut data = vec![0u8; e.len as usize];
                    file.read_exact_at(&mut data, e.offset)
                        .map_err(io_err("read", &pack.path))?;
                    if BlockHash::of(&data) != e.hash {
                        return Err(Error::RepoCorrupt {
                            path: pack.path.clone(),
                            detail: format!(
                                "blob {} at offset {} is corrupt; gc stopped before rewriting this pack (run `backup verify --read-data`)",
                                e.hash, e.offset
                            ),
                        });
                    }
                    writer.add(&data, &[(e.hash, 0, data.len())])?;
                }
                report.packs_rewritten += 1;
            } else {
                report.packs_deleted += 1;
            }
            retire.push(pi);
        }
        // New packs and indexes are durable (sealed) before any old one goes.
        let written = writer.finish()?;
        report.packs_written = written.len() as u64;
        for pi in retire {
            let pack = &index.packs[pi];
            // A rewrite can reproduce a pack byte for byte (gc rerun after a
            // crash between writing the copy and deleting the original): the
            // pack just written under that id is live and must stay.
            if written.contains(&pack.id) {
                continue;
            }
            fs::remove_file(&pack.index_path).map_err(io_err("remove index", &pack.index_path))?;
            sync_dir(&index_dir)?;
            fs::remove_file(&pack.path).map_err(io_err("remove pack", &pack.path))?;
            report.bytes_freed += pack.size;
        }
        sync_dir(&packs_dir)?;
        Ok(report)
    }
}
