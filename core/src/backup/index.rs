//! Index files (`index/<pack id>.idx`): for one pack, which blocks it holds
//! and where. Loaded together they form the repository's map from blake3
//! hash to (pack, offset, length), which is how backups deduplicate.
//!
//! Payload inside the [envelope](super::envelope) (magic "FFBKINDX", v1):
//!
//! ```text
//! pack_size u64 LE | n u32 LE | n × (blake3 32 | offset u64 LE | len u32 LE)
//! ```
//!
//! An index is written only after its pack is durable, so every index names
//! a complete pack. Loading still checks that the pack file exists with the
//! recorded size: an index whose pack is gone or damaged is left out of the
//! map (and reported), so no new backup ever deduplicates against it.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use super::envelope::{self, Reader};
use super::fsutil::{list_files, read_limited, write_atomic};
use super::hash::{BlockHash, DigestBuild};
use super::pack::{MAX_BLOB, PACK_HEADER};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"FFBKINDX";
const VERSION: u32 = 1;
const MAX_INDEX_FILE: u64 = 16 << 20;

/// One blob of a pack.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct IndexEntry {
    pub hash: BlockHash,
    pub offset: u64,
    pub len: u32,
}

/// Where a blob lives.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Location {
    /// Position in [`MasterIndex::packs`].
    pub pack: u32,
    pub offset: u64,
    pub len: u32,
}

/// A pack known through its index file.
#[derive(Debug, Clone)]
pub(crate) struct PackRef {
    pub id: String,
    pub path: PathBuf,
    pub index_path: PathBuf,
    pub size: u64,
    pub entries: Vec<IndexEntry>,
}

/// An index file that could not be used, and why.
#[derive(Debug, Clone)]
pub(crate) struct IndexProblem {
    pub path: PathBuf,
    pub message: String,
}

/// Every usable index file of a repository, merged.
#[derive(Debug, Default)]
pub(crate) struct MasterIndex {
    pub packs: Vec<PackRef>,
    pub map: HashMap<BlockHash, Location, DigestBuild>,
    pub problems: Vec<IndexProblem>,
}

impl MasterIndex {
    /// Loads `repo/index/*.idx`.
    pub(crate) fn load(repo: &Path) -> Result<MasterIndex> {
        let index_dir = repo.join("index");
        let packs_dir = repo.join("packs");
        let mut mi = MasterIndex::default();
        for name in list_files(&index_dir, ".idx")? {
            let index_path = index_dir.join(&name);
            let id = name.trim_end_matches(".idx").to_string();
            let path = packs_dir.join(format!("{id}.pack"));
            let (size, entries) = match read_index_file(&index_path) {
                Ok(v) => v,
                Err(e) => {
                    mi.problems.push(IndexProblem {
                        path: index_path,
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            match fs::metadata(&path) {
                Ok(m) if m.len() == size => {}
                Ok(m) => {
                    mi.problems.push(IndexProblem {
                        path: index_path,
                        message: format!(
                            "pack {} is {} bytes but its index says {size}",
                            path.display(),
                            m.len()
                        ),
                    });
                    continue;
                }
                Err(e) => {
                    mi.problems.push(IndexProblem {
                        path: index_path,
                        message: format!(
                            "pack {} named by this index is unreadable: {e}",
                            path.display()
                        ),
                    });
                    continue;
                }
            }
            mi.add_pack(PackRef {
                id,
                path,
                index_path,
                size,
                entries,
            });
        }
        Ok(mi)
    }

    /// Adds a pack (loaded or just written) to the map.
    pub(crate) fn add_pack(&mut self, pack: PackRef) {
        let n = self.packs.len() as u32;
        for e in &pack.entries {
            self.map.entry(e.hash).or_insert(Location {
                pack: n,
                offset: e.offset,
                len: e.len,
            });
        }
        self.packs.push(pack);
    }

    pub(crate) fn get(&self, hash: &BlockHash) -> Option<Location> {
        self.map.get(hash).copied()
    }
}

/// Writes `index/<id>.idx` atomically and durably.
pub(crate) fn write_index_file(
    index_dir: &Path,
    id: &str,
    pack_size: u64,
    entries: &[IndexEntry],
) -> Result<()> {
    let mut payload = Vec::with_capacity(12 + entries.len() * 44);
    payload.extend_from_slice(&pack_size.to_le_bytes());
    payload.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    for e in entries {
        payload.extend_from_slice(&e.hash.0);
        payload.extend_from_slice(&e.offset.to_le_bytes());
        payload.extend_from_slice(&e.len.to_le_bytes());
    }
    write_atomic(
        &index_dir.join(format!("{id}.idx")),
        &envelope::seal(MAGIC, VERSION, &payload),
    )
}

/// Reads and checks one index file: (pack size, entries).
pub(crate) fn read_index_file(path: &Path) -> Result<(u64, Vec<IndexEntry>)> {
    let bytes = read_limited(path, MAX_INDEX_FILE)?;
    decode_index(path, &bytes)
}

/// Decodes an index file's bytes (read from `path`, which errors name).
pub(crate) fn decode_index(path: &Path, bytes: &[u8]) -> Result<(u64, Vec<IndexEntry>)> {
    let payload = envelope::open(path, MAGIC, VERSION, bytes)?;
    let corrupt = |detail: String| Error::RepoCorrupt {
        path: path.to_path_buf(),
        detail,
    };
    let mut r = Reader::new(payload);
    let (Some(pack_size), Some(n)) = (r.u64(), r.u32()) else {
        return Err(corrupt("index header is cut short".into()));
    };
    if r.remaining() != n as usize * 44 {
        return Err(corrupt(format!(
            "index claims {n} entries but holds {} bytes of them",
            r.remaining()
        )));
    }
    let mut entries = Vec::with_capacity(n as usize);
    for i in 0..n {
        let (Some(hash), Some(offset), Some(len)) = (r.hash(), r.u64(), r.u32()) else {
            return Err(corrupt(format!("index entry {i} is cut short")));
        };
        if offset < PACK_HEADER
            || offset.saturating_add(u64::from(len)) > pack_size
            || len > MAX_BLOB
        {
            return Err(corrupt(format!(
                "index entry {i} points outside its pack ({offset}+{len} of {pack_size})"
            )));
        }
        entries.push(IndexEntry {
            hash: BlockHash(hash),
            offset,
            len,
        });
    }
    Ok((pack_size, entries))
}
