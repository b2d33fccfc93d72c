//! The sender side of a push: which snapshot, which base, which blocks, and the
//! image hash — computed from the snapshot, hashing only what changed.
//!
//! **Base.** The newest snapshot the secondary holds complete that still exists
//! (and is readable) in the primary's catalog, older than the target. Then the
//! blocks to send are `changed_blocks(base, target)` — the diff areas, no scan
//! (seed 004); without a base, every block.
//!
//! **Image hash.** The whole-image blake3 is the tree of the blocks' chaining
//! values (see the module above). After a push the sender keeps the target's
//! chaining values in `<state dir>/replica-cvs/<id>.cvs`; the next incremental
//! push takes the unchanged blocks' values from its base's file (those blocks
//! are, by the engine's changed-block contract, the same data) and hashes only
//! the blocks it reads to send. Without that file it reads and hashes the whole
//! image, on two threads.
//!
//! ```text
//! <id>.cvs:  "FFRCVS01" | snapshot u64 LE | blocks u64 LE | block_size u32 LE | 0 u32
//!            | blocks x 32-byte chaining value | blake3 of everything before (32 bytes)
//! ```

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use super::store::ReplicaSnapshotInfo;
use super::wire::{BlockHeader, Plan, PROTOCOL_VERSION};
use super::{block_cvs_parallel, hex, image_root, BlockCv};
use crate::error::{Error, Result};
use crate::volume::{Snapshot, SnapshotId, SnapshotInfo, SnapshotState, Volume};

const CVS_MAGIC: &[u8; 8] = b"FFRCVS01";
const CVS_HEADER: usize = 32;
/// Threads that hash blocks on the sender.
pub const HASH_THREADS: usize = 2;

/// Picks the snapshot to push: `want`, or the newest sealed one. Refuses one
/// that is still open (post-snapshot writes may change it) or invalid.
pub fn choose_target(volume: &Volume, want: Option<SnapshotId>) -> Result<SnapshotInfo> {
    let all = volume.snapshots()?;
    let info = match want {
        Some(id) => {
            all.into_iter()
                .find(|s| s.id == id)
                .ok_or_else(|| Error::SnapshotNotFound {
                    volume: volume.path().to_path_buf(),
                    id,
                })?
        }
        None => all
            .into_iter()
            .rev()
            .find(|s| s.state == SnapshotState::Sealed)
            .ok_or_else(|| Error::ReplicaRefused {
                volume: volume.uuid().to_string(),
                snapshot: 0,
                why: format!(
                    "volume {} has no sealed snapshot to push",
                    volume.path().display()
                ),
            })?,
    };
    match &info.state {
        SnapshotState::Sealed => Ok(info),
        SnapshotState::Open => Err(Error::ReplicaRefused {
            volume: volume.uuid().to_string(),
            snapshot: info.id,
            why: "it is still open (post-snapshot processing); push it once sealed".into(),
        }),
        SnapshotState::Invalid { reason } => Err(Error::SnapshotInvalid {
            id: info.id,
            reason: reason.clone(),
        }),
    }
}

/// The base: the newest snapshot older than `target` that the secondary holds
/// complete and the primary still has readable.
pub fn choose_base(
    volume: &Volume,
    target: SnapshotId,
    remote: &[ReplicaSnapshotInfo],
) -> Result<Option<SnapshotId>> {
    let local = volume.snapshots()?;
    let usable = |id: SnapshotId| {
        local
            .iter()
            .any(|s| s.id == id && !matches!(s.state, SnapshotState::Invalid { .. }))
    };
    Ok(remote
        .iter()
        .map(|r| r.id)
        .filter(|&id| id < target && usable(id))
        .max())
}

/// A push worked out: the plan for the secondary and the blocks to read.
#[derive(Debug, Clone)]
pub struct PushPlan {
    pub plan: Plan,
    /// Sorted block numbers to send.
    pub blocks: Vec<u64>,
}

/// The plan to push `target` (over `base`, if any) from `volume`.
pub fn make_plan(
    volume: &Volume,
    target: &SnapshotInfo,
    base: Option<SnapshotId>,
    source_node: &str,
) -> Result<PushPlan> {
    let n = volume.size() / volume.block_size() as u64;
    let blocks = match base {
        Some(b) => volume.changed_blocks(b, Some(target.id))?,
        None => (0..n).collect(),
    };
    Ok(PushPlan {
        plan: Plan {
            version: PROTOCOL_VERSION,
            volume: volume.uuid().to_string(),
            source_node: source_node.to_string(),
            size: volume.size(),
            block_size: volume.block_size(),
            snapshot: target.id,
            created_ms: target.created_ms,
            base,
            blocks: blocks.len() as u64,
        },
        blocks,
    })
}

/// One frame's worth of blocks, read and hashed.
#[derive(Debug)]
pub struct Batch {
    /// The blocks to send (those the secondary lacks).
    pub headers: Vec<BlockHeader>,
    /// Their bytes, non-zero blocks only, in order.
    pub data: Vec<u8>,
    /// Chaining values of every block read, sent or not.
    pub cvs: Vec<(u64, BlockCv)>,
}

/// Reads the planned blocks in batches of up to `batch_blocks`, in order,
/// skipping (from the frames, not from hashing) those in `skip`.
pub struct BatchReader {
    snap: Snapshot,
    blocks: Vec<u64>,
    skip: HashSet<u64>,
    /// The base's chaining values: a listed block that hashes the same at the same
    /// place is the same data (the engine lists blocks that *may* differ, e.g.
    /// copied ahead of a sequential writer), so it is not sent.
    base_cvs: Option<std::sync::Arc<Vec<BlockCv>>>,
    next: usize,
    batch_blocks: usize,
    block_size: u32,
}

impl std::fmt::Debug for BatchReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "BatchReader(snapshot {}, {}/{})",
            self.snap.id(),
            self.next,
            self.blocks.len()
        )
    }
}

impl BatchReader {
    pub fn new(
        snap: Snapshot,
        blocks: Vec<u64>,
        skip: HashSet<u64>,
        batch_blocks: usize,
    ) -> BatchReader {
        let block_size = snap.block_size();
        BatchReader {
            snap,
            blocks,
            skip,
            base_cvs: None,
            next: 0,
            batch_blocks: batch_blocks.max(1),
            block_size,
        }
    }

    /// Leaves out of the frames the blocks whose chaining value equals the base's.
    pub fn with_base_cvs(mut self, cvs: std::sync::Arc<Vec<BlockCv>>) -> BatchReader {
        self.base_cvs = Some(cvs);
        self
    }

    fn read_batch(&self, blocks: &[u64]) -> Result<Batch> {
        let bs = self.block_size as usize;
        let mut raw = vec![0u8; blocks.len() * bs];
        // Contiguous runs are read with one call each.
        let mut i = 0;
        while i < blocks.len() {
            let mut j = i + 1;
            while j < blocks.len() && blocks[j] == blocks[j - 1] + 1 {
                j += 1;
            }
            read_exact(&self.snap, &mut raw[i * bs..j * bs], blocks[i] * bs as u64)?;
            i = j;
        }
        let cvs = hash_blocks(&raw, blocks, self.block_size);
        let mut headers = Vec::new();
        let mut data = Vec::with_capacity(raw.len());
        for (k, &b) in blocks.iter().enumerate() {
            if self.skip.contains(&b)
                || self
                    .base_cvs
                    .as_ref()
                    .is_some_and(|base| base.get(b as usize) == Some(&cvs[k]))
            {
                continue;
            }
            let chunk = &raw[k * bs..(k + 1) * bs];
            let z = chunk.iter().all(|&x| x == 0);
            if !z {
                data.extend_from_slice(chunk);
            }
            headers.push(BlockHeader {
                b,
                cv: hex(&cvs[k]),
                z,
            });
        }
        Ok(Batch {
            headers,
            data,
            cvs: blocks.iter().copied().zip(cvs).collect(),
        })
    }
}

impl Iterator for BatchReader {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        if self.next >= self.blocks.len() {
            return None;
        }
        let end = (self.next + self.batch_blocks).min(self.blocks.len());
        let res = self.read_batch(&self.blocks[self.next..end]);
        self.next = end;
        Some(res)
    }
}

/// Chaining values of `blocks` whose data lies back to back in `raw`.
fn hash_blocks(raw: &[u8], blocks: &[u64], block_size: u32) -> Vec<BlockCv> {
    let contiguous = blocks.windows(2).all(|w| w[1] == w[0] + 1);
    match blocks.first() {
        Some(&first) if contiguous => block_cvs_parallel(raw, first, block_size, HASH_THREADS),
        _ => {
            let bs = block_size as usize;
            blocks
                .iter()
                .enumerate()
                .map(|(k, &b)| super::block_cv(&raw[k * bs..(k + 1) * bs], b, block_size))
                .collect()
        }
    }
}

fn read_exact(snap: &Snapshot, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = snap.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            return Err(Error::ReplicaRefused {
                volume: String::new(),
                snapshot: snap.id(),
                why: format!(
                    "the snapshot image ended at byte {} before its size",
                    offset + done as u64
                ),
            });
        }
        done += n;
    }
    Ok(())
}

/// Where the chaining values of pushed snapshot `id` are kept.
pub fn cvs_path(state_dir: &Path, id: SnapshotId) -> PathBuf {
    state_dir.join("replica-cvs").join(format!("{id}.cvs"))
}

/// Saves the chaining values of every block of snapshot `id`.
pub fn store_cvs(state_dir: &Path, id: SnapshotId, block_size: u32, cvs: &[BlockCv]) -> Result<()> {
    let dir = state_dir.join("replica-cvs");
    crate::perms::create_private_dir(&dir)?;
    let bytes = encode_cvs(id, block_size, cvs);
    crate::format::write_file_atomic(&cvs_path(state_dir, id), &bytes)
}

/// The saved chaining values of snapshot `id`; `Ok(None)` if none were saved.
/// A damaged or mismatched file is an error naming it.
pub fn load_cvs(
    state_dir: &Path,
    id: SnapshotId,
    blocks: u64,
    block_size: u32,
) -> Result<Option<Vec<BlockCv>>> {
    let path = cvs_path(state_dir, id);
    let want = CVS_HEADER as u64 + blocks * 32 + 32;
    // Check the size before reading: a file of the wrong length is refused
    // without loading it.
    match std::fs::metadata(&path) {
        Ok(m) if m.len() != want => {
            return Err(Error::ReplicaCorrupt {
                file: path.clone(),
                why: format!("{} bytes, expected {want} for {blocks} blocks", m.len()),
            })
        }
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("stat", &path, e)),
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
    parse_cvs(&path, &bytes, id, blocks, block_size).map(Some)
}

/// Decodes a chaining-values file (read from `path`, which errors name).
pub fn parse_cvs(
    path: &Path,
    bytes: &[u8],
    id: SnapshotId,
    blocks: u64,
    block_size: u32,
) -> Result<Vec<BlockCv>> {
    let corrupt = |why: &str| Error::ReplicaCorrupt {
        file: path.to_path_buf(),
        why: why.to_string(),
    };
    let want = (CVS_HEADER as u64)
        .saturating_add(blocks.saturating_mul(32))
        .saturating_add(32);
    if bytes.len() as u64 != want {
        return Err(corrupt(&format!(
            "{} bytes, expected {want} for {blocks} blocks",
            bytes.len()
        )));
    }
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt("fails its checksum"));
    }
    let mut header = [0u8; CVS_HEADER];
    header.copy_from_slice(&body[..CVS_HEADER]);
    let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().unwrap_or([0; 8]));
    if &header[..8] != CVS_MAGIC
        || u64_at(8) != id
        || u64_at(16) != blocks
        || header[24..28] != block_size.to_le_bytes()
    {
        return Err(corrupt("its header names another snapshot or geometry"));
    }
    Ok(body[CVS_HEADER..]
        .chunks_exact(32)
        .map(|c| c.try_into().unwrap_or([0; 32]))
        .collect())
}

/// The bytes of a chaining-values file, as [`store_cvs`] writes them.
pub fn encode_cvs(id: SnapshotId, block_size: u32, cvs: &[BlockCv]) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(CVS_HEADER + cvs.len() * 32 + 32);
    bytes.extend_from_slice(CVS_MAGIC);
    bytes.extend_from_slice(&id.to_le_bytes());
    bytes.extend_from_slice(&(cvs.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&block_size.to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    for cv in cvs {
        bytes.extend_from_slice(cv);
    }
    let sum = blake3::hash(&bytes);
    bytes.extend_from_slice(sum.as_bytes());
    bytes
}

/// Fills the missing chaining values in `cvs` by reading those blocks of `snap`.
pub fn fill_missing_cvs(
    snap: &Snapshot,
    cvs: &mut [Option<BlockCv>],
    batch_blocks: usize,
) -> Result<()> {
    let missing: Vec<u64> = cvs
        .iter()
        .enumerate()
        .filter(|(_, c)| c.is_none())
        .map(|(b, _)| b as u64)
        .collect();
    let reader = BatchReader::new(snap.clone(), missing, HashSet::new(), batch_blocks);
    for batch in reader {
        for (b, cv) in batch?.cvs {
            cvs[b as usize] = Some(cv);
        }
    }
    Ok(())
}

/// The whole-image blake3 (hex) from every block's chaining value. For a
/// one-block image (no tree) `single` gives the block's data.
pub fn image_hash(
    cvs: &[Option<BlockCv>],
    single: impl FnOnce() -> Result<Vec<u8>>,
) -> Result<String> {
    if cvs.len() == 1 {
        return Ok(blake3::hash(&single()?).to_hex().to_string());
    }
    image_root(cvs.len() as u64, |b| {
        cvs[b as usize].ok_or_else(|| Error::ReplicaRefused {
            volume: String::new(),
            snapshot: 0,
            why: format!("no chaining value for block {b}"),
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saved_chaining_values_load_back_and_damage_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cvs: Vec<BlockCv> = (0..5u8).map(|i| [i; 32]).collect();
        store_cvs(dir.path(), 4, 4096, &cvs).expect("store");
        assert_eq!(load_cvs(dir.path(), 4, 5, 4096).expect("load"), Some(cvs));
        assert_eq!(load_cvs(dir.path(), 9, 5, 4096).expect("missing"), None);
        let p = cvs_path(dir.path(), 4);
        let mut b = std::fs::read(&p).expect("read");
        b[40] ^= 1;
        std::fs::write(&p, &b).expect("write");
        let err = load_cvs(dir.path(), 4, 5, 4096)
            .expect_err("damaged")
            .to_string();
        assert!(err.contains("4.cvs") && err.contains("checksum"), "{err}");
    }

    #[test]
    fn a_full_then_incremental_plan_follows_the_diff_area_and_hashes_match_the_engine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bs = 4096u32;
        let v =
            Volume::create(&dir.path().join("v.img"), 16 * bs as u64, bs, None).expect("create");
        v.write_at(&vec![7u8; 3 * bs as usize], 0).expect("write");
        let snap = |v: &Volume| {
            let id = v.reserve_snapshot_id().expect("reserve");
            v.create_snapshot(id, &Default::default()).expect("create");
            v.seal_snapshot(id).expect("seal");
            id
        };
        let s1 = snap(&v);
        v.write_at(&[9u8; 10], 5 * bs as u64 + 3).expect("write");
        let s2 = snap(&v);
        let t1 = choose_target(&v, Some(s1)).expect("target");
        let full = make_plan(&v, &t1, None, "n1").expect("plan");
        assert_eq!(full.blocks.len(), 16);
        let t2 = choose_target(&v, None).expect("latest");
        assert_eq!(t2.id, s2);
        let remote = vec![ReplicaSnapshotInfo {
            id: s1,
            base: None,
            created_ms: 0,
            completed_ms: 0,
            blake3: String::new(),
            blocks: 16,
            data_bytes: 0,
            source_node: "n1".into(),
        }];
        let base = choose_base(&v, s2, &remote).expect("base");
        assert_eq!(base, Some(s1));
        let inc = make_plan(&v, &t2, base, "n1").expect("plan");
        assert_eq!(inc.blocks, vec![5]);
        let s = v.snapshot(s2).expect("snapshot");
        let mut cvs = vec![None; 16];
        fill_missing_cvs(&s, &mut cvs, 3).expect("fill");
        let ours = image_hash(&cvs, || unreachable_single()).expect("hash");
        assert_eq!(
            ours,
            crate::manifest::compute_image_hash(&s).expect("engine hash")
        );
    }

    fn unreachable_single() -> Result<Vec<u8>> {
        Err(Error::ReplicaRefused {
            volume: String::new(),
            snapshot: 0,
            why: "not a one-block image".into(),
        })
    }
}
