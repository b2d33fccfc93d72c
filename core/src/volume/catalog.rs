//! The catalog: the volume's identity and its list of snapshots, shared by
//! every process (and node) that writes the volume.
//!
//! It is one JSON payload in a [`crate::format`] envelope (magic `FFCATALG`),
//! changed only under the catalog lock. Every change increments `generation`
//! and then writes it to the 8-byte `gen` file, which every live write preads
//! to notice, cheaply, that another process changed the snapshot set.
//!
//! *Deviation from "write temp, fsync, rename, fsync dir", on purpose:* that
//! costs three device flushes (file, directory, and the new inode), about
//! 12 ms on the shared storage we measured (every flush costs ~4 ms there), and
//! snapshot create must stay under 5 ms. The catalog is instead kept in two
//! slot files, `catalog.a` and `catalog.b` (the double-buffered superblock
//! technique): generation *g* is written in place into slot `g % 2` and made
//! durable with one fdatasync. A write torn by a crash fails the envelope
//! checksum and the other slot, one generation older and never the one being
//! written, is used: exactly the catalog as it was before the unacknowledged
//! change. Load takes the valid slot with the highest generation.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, Kind};

use super::locks::Locks;
use super::{SnapshotId, SnapshotState};

/// Envelope kind of the `catalog` file.
pub(crate) const CATALOG_KIND: Kind = Kind {
    magic: *b"FFCATALG",
    version: 1,
};

/// The persisted catalog (the on-disk `…State` form; never a live object).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct Catalog {
    /// Random identity, repeated in every map header so a map from another volume is refused.
    pub uuid: String,
    /// Volume size in bytes; the volume file must be at least this long.
    pub size: u64,
    pub block_size: u32,
    /// Incremented on every change; mirrored in the `gen` file.
    pub generation: u64,
    /// The next id `reserve_snapshot_id` hands out; ids are never reused.
    pub next_id: SnapshotId,
    /// The highest id ever created, so a reserved id cannot be created twice (even after delete).
    pub last_created: SnapshotId,
    pub snapshots: Vec<SnapshotRecord>,
    /// Nodes fenced off the volume (DESIGN.md §9): their live writes fail.
    /// In the catalog so that every live write, which syncs the catalog under
    /// the shared gate, sees a fence before the next snapshot can be created.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub fenced: std::collections::BTreeMap<String, super::Fence>,
}

/// One snapshot as the catalog records it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SnapshotRecord {
    pub id: SnapshotId,
    pub created_ms: u64,
    pub state: SnapshotState,
    pub diff_limit: Option<u64>,
}

impl Catalog {
    pub(crate) fn get(&self, id: SnapshotId) -> Option<&SnapshotRecord> {
        self.snapshots.iter().find(|s| s.id == id)
    }
    pub(crate) fn get_mut(&mut self, id: SnapshotId) -> Option<&mut SnapshotRecord> {
        self.snapshots.iter_mut().find(|s| s.id == id)
    }
}

/// The two slot files of the catalog.
pub(crate) const SLOTS: [&str; 2] = ["catalog.a", "catalog.b"];

fn load_slot(path: &Path) -> Result<Catalog> {
    let bytes = format::read_file(path)?;
    let (cat, _): (Catalog, usize) = format::decode_json(CATALOG_KIND, &bytes, path)?;
    Ok(cat)
}

/// Loads the newest valid catalog slot; if neither is valid, the error of the
/// slot that should hold the newest (or the first) names the damage.
pub(crate) fn load(state_dir: &Path) -> Result<Catalog> {
    let a = load_slot(&state_dir.join(SLOTS[0]));
    let b = load_slot(&state_dir.join(SLOTS[1]));
    match (a, b) {
        (Ok(a), Ok(b)) => Ok(if b.generation > a.generation { b } else { a }),
        (Ok(c), Err(e)) | (Err(e), Ok(c)) => {
            // A slot not written yet (a new volume) is normal; a damaged one is
            // normal after a crash during a catalog change, worth a line otherwise.
            let missing = matches!(&e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound);
            if !missing {
                tracing::warn!(
                    "using catalog generation {} because the other slot is unusable: {e}",
                    c.generation
                );
            }
            Ok(c)
        }
        (Err(e), Err(_)) => Err(e),
    }
}

/// Writes `cat` into its slot (`generation % 2`) in place, durable on return.
pub(crate) fn store(state_dir: &Path, cat: &Catalog) -> Result<()> {
    let path = state_dir.join(SLOTS[(cat.generation % 2) as usize]);
    let bytes = format::encode_json(CATALOG_KIND, cat);
    let f = crate::perms::private_file_options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| Error::io("open", &path, e))?;
    f.write_all_at(&bytes, 0)
        .map_err(|e| Error::io("write", &path, e))?;
    f.set_len(bytes.len() as u64)
        .map_err(|e| Error::io("truncate", &path, e))?;
    f.sync_data().map_err(|e| Error::io("fdatasync", &path, e))
}

/// Reads the generation counter (0 if the file is short: then the catalog is reloaded).
pub(crate) fn read_gen(gen: &File, path: &Path) -> Result<u64> {
    let mut b = [0u8; 8];
    match gen.read_exact_at(&mut b, 0) {
        Ok(()) => Ok(u64::from_le_bytes(b)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(0),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

pub(crate) fn write_gen(gen: &File, path: &Path, value: u64) -> Result<()> {
    gen.write_all_at(&value.to_le_bytes(), 0)
        .map_err(|e| Error::io("write", path, e))
}

/// The dirty mark (byte 8 of `gen`): set by the first live write of each
/// process after each catalog change, cleared by snapshot create after it has
/// flushed the volume. Set means "some write may not be on disk yet".
pub(crate) fn read_dirty(gen: &File, path: &Path) -> Result<bool> {
    let mut b = [0u8; 1];
    match gen.read_exact_at(&mut b, 8) {
        Ok(()) => Ok(b[0] != 0),
        // Missing byte: be safe and flush.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(true),
        Err(e) => Err(Error::io("read", path, e)),
    }
}

pub(crate) fn write_dirty(gen: &File, path: &Path, dirty: bool) -> Result<()> {
    gen.write_all_at(&[dirty as u8], 8)
        .map_err(|e| Error::io("write", path, e))
}

/// Changes the catalog under the catalog lock: load fresh, apply `f`, store, bump `gen`.
/// Nothing is written when `f` fails.
pub(crate) fn update<T>(
    state_dir: &Path,
    locks: &Locks,
    gen: &File,
    f: impl FnOnce(&mut Catalog) -> Result<T>,
) -> Result<(T, Catalog)> {
    let _lock = locks.catalog()?;
    let mut cat = load(state_dir)?;
    let out = f(&mut cat)?;
    // Strictly above what `gen` ever said: after a torn write the file can be
    // ahead of the newest valid slot, and a reused value would hide this change.
    cat.generation = cat.generation.max(read_gen(gen, &state_dir.join("gen"))?) + 1;
    store(state_dir, &cat)?;
    write_gen(gen, &state_dir.join("gen"), cat.generation)?;
    Ok((out, cat))
}
