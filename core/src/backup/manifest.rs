//! Backup manifests (`backups/<id>.backup`): everything needed to restore
//! one complete image, by itself.
//!
//! Each manifest lists the hash of **every** block of the image, not just
//! the blocks that changed: an incremental backup copies the unchanged
//! hashes from the previous manifest (consolidation, seed 004), so deleting
//! any older backup never breaks a newer one.
//!
//! Payload inside the [envelope](super::envelope) (magic "FFBKMANI", v1):
//!
//! ```text
//! json_len u32 LE | header JSON (id, times, source, snapshot, sizes, kind, stats)
//! n_unique u32 LE | n_unique × blake3 (32)          distinct non-zero block hashes
//! ops: varints until the end                         the block list, in order
//!   (count << 1) | 1                 -> `count` all-zero blocks (not stored)
//!   (count << 1) | 0, count × ref    -> `count` blocks, each a varint index
//!                                       into the distinct-hash table
//! ```
//!
//! Decoding is bounded: the file size is capped, every count is checked
//! against the block count implied by `image_size / block_size`, and every
//! reference against the table.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::envelope::{self, put_varint, Reader};
use super::hash::{BlockHash, DigestBuild};
use crate::error::{Error, Result};

const MAGIC: &[u8; 8] = b"FFBKMANI";
const VERSION: u32 = 1;
/// Upper bound on a manifest file: 16 TiB of 64 KiB blocks with no repeats.
pub(crate) const MAX_MANIFEST_FILE: u64 = 16 << 30;
const MAX_HEADER_JSON: u32 = 1 << 20;

/// Which volume a backup came from. Backups of the same volume chain into
/// incrementals; blocks are shared across all volumes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceIdentity {
    /// Stable identity of the volume (the canonical path of its image or device).
    pub volume_id: String,
    /// What to call it in messages.
    pub name: String,
}

/// The snapshot a backup was taken from. `created_ms` guards against a
/// volume recreated under the same identity reusing snapshot ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotRef {
    pub id: u64,
    pub created_ms: u64,
}

/// How a backup was made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BackupKind {
    /// Every block of the snapshot was read.
    Full {
        /// Why this was not incremental, when an earlier backup of the volume existed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reason: Option<String>,
    },
    /// Only the changed blocks were read; the rest came from `parent`.
    Incremental {
        parent: String,
        parent_snapshot: u64,
    },
}

/// Figures of one backup run.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupStats {
    /// Blocks in the image.
    pub blocks_total: u64,
    /// Blocks read from the snapshot.
    pub blocks_read: u64,
    pub bytes_read: u64,
    /// Blocks whose data was not yet in the repository and was stored.
    pub blocks_stored: u64,
    /// Bytes of block data added to packs.
    pub bytes_stored: u64,
    /// All-zero blocks in the image (never stored).
    pub blocks_zero: u64,
    pub packs_written: u64,
    pub duration_ms: u64,
}

/// The JSON part of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestHeader {
    pub id: String,
    pub created_ms: u64,
    pub source: SourceIdentity,
    pub snapshot: SnapshotRef,
    pub block_size: u32,
    pub image_size: u64,
    #[serde(flatten)]
    pub kind: BackupKind,
    pub stats: BackupStats,
}

/// One backup: its header and the hash of every block (`None` = all zeros).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub header: ManifestHeader,
    pub blocks: Vec<Option<BlockHash>>,
}

/// Number of blocks of an image.
pub(crate) fn block_count(image_size: u64, block_size: u32) -> u64 {
    image_size.div_ceil(u64::from(block_size.max(1)))
}

impl Manifest {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(&self.header).unwrap_or_default();
        let mut payload = Vec::with_capacity(json.len() + 8 + self.blocks.len() * 36);
        payload.extend_from_slice(&(json.len() as u32).to_le_bytes());
        payload.extend_from_slice(&json);

        let mut table: HashMap<BlockHash, u32, DigestBuild> = HashMap::default();
        let mut order: Vec<BlockHash> = Vec::new();
        for h in self.blocks.iter().flatten() {
            table.entry(*h).or_insert_with(|| {
                order.push(*h);
                (order.len() - 1) as u32
            });
        }
        payload.extend_from_slice(&(order.len() as u32).to_le_bytes());
        for h in &order {
            payload.extend_from_slice(&h.0);
        }
        let mut i = 0;
        while i < self.blocks.len() {
            let zero = self.blocks[i].is_none();
            let mut j = i;
            while j < self.blocks.len() && self.blocks[j].is_none() == zero {
                j += 1;
            }
            put_varint(&mut payload, (((j - i) as u64) << 1) | u64::from(zero));
            if !zero {
                for h in self.blocks[i..j].iter().flatten() {
                    put_varint(&mut payload, u64::from(table[h]));
                }
            }
            i = j;
        }
        envelope::seal(MAGIC, VERSION, &payload)
    }

    pub(crate) fn decode(path: &Path, bytes: &[u8]) -> Result<Manifest> {
        let payload = envelope::open(path, MAGIC, VERSION, bytes)?;
        let corrupt = |detail: String| Error::RepoCorrupt {
            path: path.to_path_buf(),
            detail,
        };
        let mut r = Reader::new(payload);
        let json_len = r
            .u32()
            .ok_or_else(|| corrupt("manifest header is cut short".into()))?;
        if json_len > MAX_HEADER_JSON {
            return Err(corrupt(format!("manifest header claims {json_len} bytes")));
        }
        let json = r
            .take(json_len as usize)
            .ok_or_else(|| corrupt("manifest header is cut short".into()))?;
        let header: ManifestHeader = serde_json::from_slice(json)
            .map_err(|e| corrupt(format!("manifest header is not valid: {e}")))?;
        if header.block_size == 0 || header.block_size > super::pack::MAX_BLOB {
            return Err(corrupt(format!(
                "block size {} is out of range",
                header.block_size
            )));
        }
        let n_blocks = block_count(header.image_size, header.block_size);
        let n_unique =
            r.u32()
                .ok_or_else(|| corrupt("hash table is cut short".into()))? as usize;
        if (n_unique as u64) > n_blocks || n_unique.saturating_mul(32) > r.remaining() {
            return Err(corrupt(format!(
                "hash table claims {n_unique} hashes for {n_blocks} blocks"
            )));
        }
        let mut table = Vec::with_capacity(n_unique);
        for _ in 0..n_unique {
            table.push(BlockHash(
                r.hash()
                    .ok_or_else(|| corrupt("hash table is cut short".into()))?,
            ));
        }
        let mut blocks: Vec<Option<BlockHash>> = Vec::with_capacity(n_blocks.min(1 << 28) as usize);
        while r.remaining() > 0 {
            let op = r.varint().ok_or_else(|| {
                corrupt(format!("block list is damaged at block {}", blocks.len()))
            })?;
            let count = op >> 1;
            if count == 0 || count > n_blocks - blocks.len() as u64 {
                return Err(corrupt(format!(
                    "block list run of {count} at block {} overruns {n_blocks} blocks",
                    blocks.len()
                )));
            }
            if op & 1 == 1 {
                blocks.resize(blocks.len() + count as usize, None);
            } else {
                for _ in 0..count {
                    let k = r.varint().ok_or_else(|| {
                        corrupt(format!("block list is cut short at block {}", blocks.len()))
                    })?;
                    let h = table.get(k as usize).ok_or_else(|| {
                        corrupt(format!(
                            "block {} refers to hash #{k} but the table has {n_unique}",
                            blocks.len()
                        ))
                    })?;
                    blocks.push(Some(*h));
                }
            }
        }
        if blocks.len() as u64 != n_blocks {
            return Err(corrupt(format!(
                "block list has {} blocks, the image needs {n_blocks}",
                blocks.len()
            )));
        }
        Ok(Manifest { header, blocks })
    }

    /// Length in bytes of block `i` (the last block may be short).
    pub fn block_len(&self, i: u64) -> u64 {
        let bs = u64::from(self.header.block_size);
        (self.header.image_size - i * bs).min(bs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(blocks: Vec<Option<BlockHash>>, image_size: u64) -> Manifest {
        Manifest {
            header: ManifestHeader {
                id: "abc".into(),
                created_ms: 1,
                source: SourceIdentity {
                    volume_id: "/v".into(),
                    name: "v".into(),
                },
                snapshot: SnapshotRef {
                    id: 3,
                    created_ms: 2,
                },
                block_size: 4096,
                image_size,
                kind: BackupKind::Incremental {
                    parent: "p".into(),
                    parent_snapshot: 2,
                },
                stats: BackupStats::default(),
            },
            blocks,
        }
    }

    #[test]
    fn zero_runs_and_repeated_hashes_round_trip() {
        let a = Some(BlockHash::of(b"a"));
        let b = Some(BlockHash::of(b"b"));
        let m = sample(vec![None, None, a, b, a, None, a], 4096 * 6 + 100);
        let bytes = m.encode();
        assert_eq!(
            Manifest::decode(Path::new("m"), &bytes).expect("decodes"),
            m
        );
        assert_eq!(m.block_len(6), 100);
    }

    #[test]
    fn a_block_list_not_matching_the_image_size_is_refused() {
        let m = sample(vec![None; 3], 4096 * 4);
        let err = Manifest::decode(Path::new("m"), &m.encode())
            .expect_err("3 blocks for a 4-block image");
        assert!(err.to_string().contains("needs 4"), "{err}");
    }
}
