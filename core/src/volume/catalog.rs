//! The catalog: the volume's identity and its list of snapshots, shared by
//! every process (and node) that writes the volume.
//!
//! It is one JSON payload in a [`crate::format`] envelope (magic `FFCATALG`),
//! changed only under the catalog lock and replaced atomically (temp file,
//! fsync, rename, fsync directory). Every change increments `generation` and
//! then writes it to the 8-byte `gen` file, which every live write preads to
//! notice, cheaply, that another process changed the snapshot set.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::format::{self, Kind};

use super::locks::Locks;
use super::{SnapshotId, SnapshotState};

/// Envelope kind of the `catalog` file.
pub(crate) const CATALOG_KIND: Kind = Kind { magic: *b"FFCATALG", version: 1 };

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

pub(crate) fn load(state_dir: &Path) -> Result<Catalog> {
    let path = state_dir.join("catalog");
    let bytes = format::read_file(&path)?;
    let (cat, _): (Catalog, usize) = format::decode_json(CATALOG_KIND, &bytes, &path)?;
    Ok(cat)
}

pub(crate) fn store(state_dir: &Path, cat: &Catalog) -> Result<()> {
    format::write_file_atomic(&state_dir.join("catalog"), &format::encode_json(CATALOG_KIND, cat))
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
    gen.write_all_at(&value.to_le_bytes(), 0).map_err(|e| Error::io("write", path, e))
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
    cat.generation += 1;
    store(state_dir, &cat)?;
    write_gen(gen, &state_dir.join("gen"), cat.generation)?;
    Ok((out, cat))
}
