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
//! durable with one fdatasync, and only then recorded in `gen`. A write torn
//! by a crash fails the envelope checksum and the other slot, one generation
//! older and never the one being written, is used: exactly the catalog as it
//! was before the unacknowledged change (its generation is still the one
//! `gen` records). Load takes the valid slot with the highest generation and
//! **refuses** it when it is older than `gen`: then an acknowledged catalog
//! was damaged, and falling back would silently reopen sealed snapshots and
//! forget newer ones (`freezeframe volume check --repair` lets the operator
//! accept the loss explicitly).

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

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
    /// Volume-wide cap on the diff area's bytes on disk; reaching it costs the
    /// oldest snapshot, never the live write. Absent in catalogs written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diff_max: Option<u64>,
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

/// What one slot holds, for `load` and `volume check`.
pub(crate) fn load_slots(state_dir: &Path) -> [(PathBuf, Result<Catalog>); 2] {
    SLOTS.map(|s| {
        let p = state_dir.join(s);
        let r = load_slot(&p);
        (p, r)
    })
}

/// The generation recorded in the `gen` file (0 when it is missing or short).
pub(crate) fn recorded_gen(state_dir: &Path) -> Result<u64> {
    let path = state_dir.join("gen");
    match File::open(&path) {
        Ok(f) => read_gen(&f, &path),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(0),
        Err(e) => Err(Error::io("open", &path, e)),
    }
}

fn is_missing(e: &Error) -> bool {
    matches!(e, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::NotFound)
}

/// Loads the newest valid catalog slot. Refuses (never rolls back silently)
/// when that slot is older than the generation `gen` records: the newer
/// catalog was acknowledged and is damaged, and using the older one would
/// reopen sealed snapshots and forget newer ones. `volume check --repair`
/// is the operator's way to accept the older slot.
pub(crate) fn load(state_dir: &Path) -> Result<Catalog> {
    let [(pa, a), (pb, b)] = load_slots(state_dir);
    let (cat, other) = match (a, b) {
        (Ok(a), Ok(b)) => {
            if b.generation > a.generation {
                (b, None)
            } else {
                (a, None)
            }
        }
        (Ok(c), Err(e)) => (c, Some((pb, e))),
        (Err(e), Ok(c)) => (c, Some((pa, e))),
        (Err(e), Err(_)) => return Err(e),
    };
    let recorded = recorded_gen(state_dir)?;
    if cat.generation < recorded {
        let detail = match &other {
            Some((p, e)) => format!(
                "slot {} is unusable ({e})",
                p.file_name().map(|n| n.to_string_lossy()).unwrap_or_default()
            ),
            None => "both slots are intact but older than the recorded generation (a slot was replaced by an old copy)".to_string(),
        };
        return Err(Error::CatalogRolledBack {
            state_dir: state_dir.to_path_buf(),
            found: cat.generation,
            recorded,
            detail,
        });
    }
    if let Some((p, e)) = other {
        // A slot not written yet (a new volume) is normal; so is one torn by a
        // crash during a catalog change (the other slot is then the recorded one).
        if !is_missing(&e) {
            tracing::info!(
                "catalog generation {} in use; slot {} holds an unacknowledged change torn by a crash: {e}",
                cat.generation,
                p.display()
            );
        }
    }
    Ok(cat)
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
