//! Restoring a backup to an image file or a block device, bit-exact.
//!
//! Blobs are read pack by pack in offset order with large coalesced reads,
//! each one hashed and compared with its key before it is written (pwrite)
//! to every block position that holds it. On a fresh (new or truncated)
//! file the all-zero blocks are skipped and stay holes; on a block device
//! they are written as zeros.
//!
//! A freezeframe volume is refused as a plain target; `restore_through_engine`
//! restores it through the volume engine instead, writing only the blocks that
//! differ, so every snapshot keeps its content.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::time::Instant;

use serde::Serialize;

use super::hash::BlockHash;
use super::index::MasterIndex;
use super::manifest::Manifest;
use super::repo::Repository;
use super::Progress;
use crate::error::{Error, Result};
use crate::volume::Volume;

/// Largest single read from a pack.
const READ_BYTES: u64 = 8 << 20;

/// What a restore did.
#[derive(Debug, Clone, Serialize)]
pub struct RestoreReport {
    pub backup_id: String,
    pub image_size: u64,
    pub blocks_written: u64,
    pub blocks_zero: u64,
    pub bytes_read: u64,
    pub duration_ms: u64,
}

impl Repository {
    /// Restores backup `id` (or unique prefix) to `to`, a new or existing image file
    /// or a block device. A freezeframe volume (a file or device with state) is
    /// refused: writing it around the engine would change every snapshot that shares
    /// a block with it; [`Repository::restore_through_engine`] is the way to restore it.
    pub fn restore(&self, id: &str, to: &Path, progress: &dyn Progress) -> Result<RestoreReport> {
        if let Some(state) = Volume::recorded_state(to) {
            return Err(Error::RestoreTarget {
                path: to.to_path_buf(),
                reason: format!(
                    "it is a freezeframe volume (state at {}): a restore written around the \
                     engine would silently change every snapshot that shares a block with it. \
                     Restore through the engine with --through-engine (only blocks that differ \
                     are written, each copied to the snapshots first, so every snapshot keeps \
                     its content), or restore to another file",
                    state.display()
                ),
            });
        }
        let started = Instant::now();
        let manifest = self.manifest(id)?;
        let (target, fresh) = open_target(to, manifest.header.image_size)?;
        let m = &manifest;
        let bs = u64::from(m.header.block_size);
        progress.start("restore", m.header.image_size);
        let write_err = |source: std::io::Error| Error::RestoreTarget {
            path: to.to_path_buf(),
            reason: format!("write failed: {source}"),
        };
        let bytes_read = self.each_stored_block(m, to, &mut |block, data| {
            target.write_all_at(data, block * bs).map_err(write_err)?;
            progress.advance(data.len() as u64);
            Ok(())
        })?;
        let zeros = vec![0u8; (READ_BYTES as usize).max(bs as usize)];
        let blocks_zero = each_zero_run(m, &mut |off, bytes| {
            if !fresh {
                let end = off + bytes;
                let mut off = off;
                while off < end {
                    let n = (end - off).min(zeros.len() as u64) as usize;
                    target.write_all_at(&zeros[..n], off).map_err(write_err)?;
                    off += n as u64;
                }
            }
            progress.advance(bytes);
            Ok(())
        })?;
        target.sync_all().map_err(|e| Error::RestoreTarget {
            path: to.to_path_buf(),
            reason: format!("fsync failed: {e}"),
        })?;
        progress.finish();
        Ok(RestoreReport {
            backup_id: m.header.id.clone(),
            image_size: m.header.image_size,
            blocks_written: m.blocks.len() as u64 - blocks_zero,
            blocks_zero,
            bytes_read,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Restores backup `id` onto a freezeframe volume **through its engine**: each
    /// block of the backup is compared with the live volume and only the blocks that
    /// differ are written, with [`Volume::write_at`] — so the original of every
    /// overwritten block is first copied to every snapshot that lacks it, and every
    /// snapshot keeps its content. `blocks_written` counts the blocks that differed.
    pub fn restore_through_engine(
        &self,
        id: &str,
        volume: &Volume,
        progress: &dyn Progress,
    ) -> Result<RestoreReport> {
        let started = Instant::now();
        let manifest = self.manifest(id)?;
        let m = &manifest;
        let to = volume.path().to_path_buf();
        if m.header.image_size != volume.size() {
            return Err(Error::RestoreTarget {
                path: to,
                reason: format!(
                    "the volume is {} bytes, backup {} holds an image of {}",
                    volume.size(),
                    m.header.id,
                    m.header.image_size
                ),
            });
        }
        let bs = u64::from(m.header.block_size);
        progress.start("restore", m.header.image_size);
        let mut current = vec![0u8; bs as usize];
        let mut written = 0u64;
        let mut put = |block: u64, data: &[u8]| -> Result<()> {
            let cur = &mut current[..data.len()];
            volume.read_at(cur, block * bs)?;
            if cur != data {
                volume.write_at(data, block * bs)?;
                written += 1;
            }
            progress.advance(data.len() as u64);
            Ok(())
        };
        let bytes_read = self.each_stored_block(m, &to, &mut put)?;
        let zeros = vec![0u8; bs as usize];
        let blocks_zero = each_zero_run(m, &mut |off, bytes| {
            let end = off + bytes;
            let mut off = off;
            while off < end {
                let n = (end - off).min(bs) as usize;
                put(off / bs, &zeros[..n])?;
                off += n as u64;
            }
            Ok(())
        })?;
        volume.flush()?;
        progress.finish();
        Ok(RestoreReport {
            backup_id: m.header.id.clone(),
            image_size: m.header.image_size,
            blocks_written: written,
            blocks_zero,
            bytes_read,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Reads every stored (non-zero) block of `m` pack by pack, checks its hash, and
    /// hands it to `put(block, data)` for every position that holds it. Returns the
    /// bytes read from packs. `to` only names the target in errors.
    fn each_stored_block(
        &self,
        m: &Manifest,
        to: &Path,
        put: &mut dyn FnMut(u64, &[u8]) -> Result<()>,
    ) -> Result<u64> {
        let index = MasterIndex::load(&self.root)?;
        let backup = m.header.id.clone();

        // Every stored block as (pack, offset, len, block index), sorted so
        // each pack is read front to back and repeated blobs are read once.
        let mut plan: Vec<(u32, u64, u32, u64)> = Vec::new();
        for (i, b) in m.blocks.iter().enumerate() {
            if let Some(hash) = b {
                let loc = index.get(hash).ok_or_else(|| Error::BlockMissing {
                    backup: backup.clone(),
                    block: i as u64,
                    hash: hash.to_hex(),
                })?;
                plan.push((loc.pack, loc.offset, loc.len, i as u64));
            }
        }
        plan.sort_unstable();

        let mut bytes_read = 0u64;
        let mut buf: Vec<u8> = Vec::new();
        let mut open_pack: Option<(u32, File)> = None;
        let mut i = 0;
        while i < plan.len() {
            // Coalesce blobs that sit back to back in the same pack.
            let (pack, start, _, _) = plan[i];
            let mut end = start;
            let mut j = i;
            while j < plan.len()
                && plan[j].0 == pack
                && plan[j].1 <= end
                && end - start < READ_BYTES
            {
                end = end.max(plan[j].1 + u64::from(plan[j].2));
                j += 1;
            }
            let pack_path = index.packs[pack as usize].path.clone();
            if open_pack.as_ref().map(|p| p.0) != Some(pack) {
                let f = File::open(&pack_path).map_err(|e| Error::BlockCorrupt {
                    backup: backup.clone(),
                    block: plan[i].3,
                    hash: hash_of(m, plan[i].3).to_hex(),
                    pack: pack_path.clone(),
                    detail: format!("cannot open the pack: {e}"),
                })?;
                open_pack = Some((pack, f));
            }
            let Some((_, file)) = open_pack.as_ref() else {
                unreachable!("pack opened above")
            };
            buf.resize((end - start) as usize, 0);
            file.read_exact_at(&mut buf, start)
                .map_err(|e| Error::BlockCorrupt {
                    backup: backup.clone(),
                    block: plan[i].3,
                    hash: hash_of(m, plan[i].3).to_hex(),
                    pack: pack_path.clone(),
                    detail: format!("cannot read {} bytes at offset {start}: {e}", end - start),
                })?;
            bytes_read += end - start;
            let mut last_checked: Option<(u64, u32)> = None;
            for &(_, off, len, block) in &plan[i..j] {
                let data = &buf[(off - start) as usize..(off - start) as usize + len as usize];
                if last_checked != Some((off, len)) {
                    let want = hash_of(m, block);
                    let got = BlockHash::of(data);
                    if got != want {
                        return Err(Error::BlockCorrupt {
                            backup,
                            block,
                            hash: want.to_hex(),
                            pack: pack_path,
                            detail: format!("data at offset {off} ({len} bytes) hashes to {got}; the image at {} is incomplete", to.display()),
                        });
                    }
                    last_checked = Some((off, len));
                }
                if u64::from(len) != m.block_len(block) {
                    return Err(Error::BlockCorrupt {
                        backup,
                        block,
                        hash: hash_of(m, block).to_hex(),
                        pack: pack_path,
                        detail: format!(
                            "stored blob is {len} bytes, the block is {}",
                            m.block_len(block)
                        ),
                    });
                }
                put(block, data)?;
            }
            i = j;
        }

        Ok(bytes_read)
    }
}

/// Calls `zero(offset, bytes)` for every run of all-zero blocks of `m`; returns the
/// number of zero blocks.
fn each_zero_run(m: &Manifest, zero: &mut dyn FnMut(u64, u64) -> Result<()>) -> Result<u64> {
    let bs = u64::from(m.header.block_size);
    let mut blocks_zero = 0u64;
    let mut b = 0u64;
    while b < m.blocks.len() as u64 {
        if m.blocks[b as usize].is_some() {
            b += 1;
            continue;
        }
        let run_start = b;
        while b < m.blocks.len() as u64 && m.blocks[b as usize].is_none() {
            b += 1;
        }
        blocks_zero += b - run_start;
        let bytes = (b * bs).min(m.header.image_size) - run_start * bs;
        zero(run_start * bs, bytes)?;
    }
    Ok(blocks_zero)
}

fn hash_of(m: &Manifest, block: u64) -> BlockHash {
    m.blocks[block as usize].unwrap_or(BlockHash([0; 32]))
}

/// Opens the restore target: (file, fresh). A fresh file reads as zeros
/// everywhere, so zero blocks need not be written.
fn open_target(to: &Path, image_size: u64) -> Result<(File, bool)> {
    let target_err = |reason: String| Error::RestoreTarget {
        path: to.to_path_buf(),
        reason,
    };
    match std::fs::metadata(to) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(to)
                .map_err(|e| target_err(format!("cannot create it: {e}")))?;
            f.set_len(image_size)
                .map_err(|e| target_err(format!("cannot size it to {image_size} bytes: {e}")))?;
            Ok((f, true))
        }
        Err(e) => Err(target_err(e.to_string())),
        Ok(meta) if meta.file_type().is_block_device() => {
            let f = OpenOptions::new()
                .write(true)
                .open(to)
                .map_err(|e| target_err(format!("cannot open the device: {e}")))?;
            let dev_size = device_size(&f)
                .map_err(|e| target_err(format!("cannot read the device size: {e}")))?;
            if dev_size < image_size {
                return Err(target_err(format!(
                    "the device holds {dev_size} bytes, the image needs {image_size}"
                )));
            }
            Ok((f, false))
        }
        Ok(meta) if meta.is_file() => {
            let f = OpenOptions::new()
                .write(true)
                .open(to)
                .map_err(|e| target_err(format!("cannot open it: {e}")))?;
            // Truncating first makes the file fresh: all holes, so zero blocks are skipped.
            f.set_len(0)
                .map_err(|e| target_err(format!("cannot truncate it: {e}")))?;
            f.set_len(image_size)
                .map_err(|e| target_err(format!("cannot size it to {image_size} bytes: {e}")))?;
            Ok((f, true))
        }
        Ok(_) => Err(target_err(
            "it is neither a regular file nor a block device".into(),
        )),
    }
}

fn device_size(f: &File) -> std::io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    let mut f = f;
    let size = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(size)
}
