//! The hash a snapshot had when it was sealed, and `snapshot verify` comparing with it
//! (DESIGN.md §8, promise 4: "`verify` compares against the hash recorded at seal time").
//!
//! When a snapshot is sealed the daemon calls [`record_seal_hash`] in the background:
//! it reads the whole point-in-time image once, hashes every block, and records
//!
//! - the whole-image blake3 in the snapshot's manifest (`blake3`), and
//! - a compact per-block list in `<state_dir>/seal-hashes/<id>.blk` (format below),
//!   so that a later mismatch can name the **first differing block** instead of
//!   only saying "something changed".
//!
//! [`verify_snapshot`] hashes the image again. If a hash was recorded it only
//! compares: a mismatch is [`Error::SnapshotMismatch`] naming the first block whose
//! hash differs; nothing is rewritten. If none was recorded (a snapshot made by
//! `volume snapshot`, or sealed by a build without this), it records one and says so.
//!
//! ```text
//! seal-hashes/<id>.blk, little endian
//!  0        8           16         24          28    32            64
//!  +--------+-----------+----------+-----------+-----+-------------+------------------+----------+
//!  |FFSEAL01| snapshot  | blocks n | block_size| 0   | image blake3| n × 16 B         | blake3   |
//!  |        | u64       | u64      | u32       | u32 | 32 B        | per-block hashes | of all   |
//!  +--------+-----------+----------+-----------+-----+-------------+------------------+ before   |
//! ```
//!
//! A block's hash is the first 16 bytes of its blake3 chaining value at its offset in
//! the image (the same per-block value replicas use, see [`crate::replica`]), so the
//! image hash is the blake3 tree over the blocks and one read pass gives both. 16
//! bytes per block is 256 KiB per GiB of 64 KiB blocks. The file is refused (by name)
//! unless its size, header and checksum agree; a damaged or missing file costs only
//! the naming of the block, never the comparison itself.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::manifest::{self, ManifestStatus, SnapshotManifest};
use crate::replica::source::{image_hash, BatchReader};
use crate::replica::BlockCv;
use crate::volume::{Snapshot, SnapshotId, SnapshotState, Volume};

const MAGIC: &[u8; 8] = b"FFSEAL01";
const HEADER: usize = 64;
const PER_BLOCK: usize = 16;
/// Blocks read and hashed per batch.
const BATCH_BLOCKS: usize = 64;

/// What `snapshot verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub id: SnapshotId,
    /// The image's blake3 now.
    pub blake3: String,
    /// `compared`: equal to the hash recorded at seal time. `recorded`: no hash was
    /// recorded, this one is now. `not_recorded`: the snapshot is still open (its
    /// content may change), so nothing was recorded.
    pub outcome: VerifyOutcome,
    pub bytes: u64,
}

/// See [`VerifyReport::outcome`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum VerifyOutcome {
    Compared,
    Recorded,
    NotRecorded,
}

/// The per-block hash file of snapshot `id`.
pub fn seal_hashes_path(state_dir: &Path, id: SnapshotId) -> PathBuf {
    state_dir.join("seal-hashes").join(format!("{id}.blk"))
}

/// Removes snapshot `id`'s per-block hashes (no error if there were none).
pub fn remove(state_dir: &Path, id: SnapshotId) -> Result<()> {
    let path = seal_hashes_path(state_dir, id);
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Error::io("remove", path, e)),
        _ => Ok(()),
    }
}

/// Records, once, the image hash of sealed snapshot `id` (manifest `blake3` and the
/// per-block file). Returns the hash. If a hash is already recorded this only checks
/// that the image still matches it (a mismatch is an error, nothing is overwritten).
pub fn record_seal_hash(volume: &Volume, id: SnapshotId) -> Result<String> {
    verify_snapshot(volume, id, &mut |_, _| {}).map(|r| r.blake3)
}

/// Hashes snapshot `id`'s image and compares it with the hash recorded at seal time;
/// records one only when none exists (and only for a sealed snapshot).
/// `progress(done, total)` is called in bytes.
pub fn verify_snapshot(
    volume: &Volume,
    id: SnapshotId,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VerifyReport> {
    let snap = volume.snapshot(id)?;
    let state = snap.state()?;
    let state_dir = volume.state_dir();
    let (hash, cvs) = hash_image(&snap, progress)?;
    let stored = manifest::load(state_dir, id)?;
    if let Some(recorded) = stored.as_ref().and_then(|m| m.blake3.clone()) {
        if recorded == hash {
            return Ok(VerifyReport {
                id,
                blake3: hash,
                outcome: VerifyOutcome::Compared,
                bytes: snap.size(),
            });
        }
        let first_block = first_differing_block(state_dir, &snap, &cvs);
        return Err(Error::SnapshotMismatch {
            snapshot: id,
            recorded,
            actual: hash,
            first_block: first_block.as_ref().ok().copied().flatten(),
            block_size: snap.block_size(),
            note: match first_block {
                Ok(Some(_)) => String::new(),
                Ok(None) => "; no per-block hash differs (the per-block list was recorded after the change?)".into(),
                Err(e) => format!("; the first differing block cannot be named: {e}"),
            },
        });
    }
    if state != SnapshotState::Sealed {
        return Ok(VerifyReport {
            id,
            blake3: hash,
            outcome: VerifyOutcome::NotRecorded,
            bytes: snap.size(),
        });
    }
    store_block_hashes(state_dir, &snap, &hash, &cvs)?;
    let mut m = match stored {
        Some(m) => m,
        None => {
            let created_ms = volume
                .snapshots()?
                .into_iter()
                .find(|s| s.id == id)
                .map(|s| s.created_ms)
                .unwrap_or(0);
            SnapshotManifest::bare(
                id,
                created_ms,
                ManifestStatus::Sealed,
                snap.block_size(),
                snap.size(),
            )
        }
    };
    m.blake3 = Some(hash.clone());
    manifest::store(state_dir, &m)?;
    Ok(VerifyReport {
        id,
        blake3: hash,
        outcome: VerifyOutcome::Recorded,
        bytes: snap.size(),
    })
}

/// The image's blake3 and every block's chaining value, in one read pass.
fn hash_image(
    snap: &Snapshot,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(String, Vec<BlockCv>)> {
    let bs = u64::from(snap.block_size());
    let size = snap.size();
    let blocks = size.div_ceil(bs);
    let all: Vec<u64> = (0..blocks).collect();
    // Every block is "skipped" from the frames: only the chaining values are wanted.
    let skip: HashSet<u64> = all.iter().copied().collect();
    let mut cvs: Vec<Option<BlockCv>> = vec![None; blocks as usize];
    let mut done = 0u64;
    for batch in BatchReader::new(snap.clone(), all, skip, BATCH_BLOCKS) {
        for (b, cv) in batch?.cvs {
            cvs[b as usize] = Some(cv);
            done += bs;
        }
        progress(done.min(size), size);
    }
    let hash = image_hash(&cvs, || {
        let mut buf = vec![0u8; size as usize];
        let mut off = 0;
        while off < buf.len() {
            let n = snap.read_at(&mut buf[off..], off as u64)?;
            if n == 0 {
                break;
            }
            off += n;
        }
        Ok(buf)
    })?;
    Ok((
        hash,
        cvs.into_iter().map(|c| c.unwrap_or([0; 32])).collect(),
    ))
}

fn store_block_hashes(
    state_dir: &Path,
    snap: &Snapshot,
    hash: &str,
    cvs: &[BlockCv],
) -> Result<()> {
    let dir = state_dir.join("seal-hashes");
    crate::perms::create_private_dir(&dir)?;
    let mut bytes = Vec::with_capacity(HEADER + cvs.len() * PER_BLOCK + 32);
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&snap.id().to_le_bytes());
    bytes.extend_from_slice(&(cvs.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&snap.block_size().to_le_bytes());
    bytes.extend_from_slice(&0u32.to_le_bytes());
    let mut root = [0u8; 32];
    if let Ok(h) = blake3::Hash::from_hex(hash) {
        root = *h.as_bytes();
    }
    bytes.extend_from_slice(&root);
    for cv in cvs {
        bytes.extend_from_slice(&cv[..PER_BLOCK]);
    }
    let sum = blake3::hash(&bytes);
    bytes.extend_from_slice(sum.as_bytes());
    crate::format::write_file_atomic(&seal_hashes_path(state_dir, snap.id()), &bytes)
}

/// The first block whose recorded hash differs from `cvs`; `Ok(None)` if none does.
fn first_differing_block(
    state_dir: &Path,
    snap: &Snapshot,
    cvs: &[BlockCv],
) -> Result<Option<u64>> {
    let path = seal_hashes_path(state_dir, snap.id());
    let corrupt = |why: String| Error::SealHashCorrupt {
        file: path.clone(),
        why,
    };
    let want = (HEADER + cvs.len() * PER_BLOCK + 32) as u64;
    let len = match std::fs::metadata(&path) {
        Ok(m) => m.len(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(corrupt("no per-block hashes were recorded".into()))
        }
        Err(e) => return Err(Error::io("stat", &path, e)),
    };
    if len != want {
        return Err(corrupt(format!(
            "{len} bytes, expected {want} for {} blocks",
            cvs.len()
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| Error::io("read", &path, e))?;
    let (body, sum) = bytes.split_at(bytes.len() - 32);
    if blake3::hash(body).as_bytes() != sum {
        return Err(corrupt("fails its checksum".into()));
    }
    let u64_at = |at: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&body[at..at + 8]);
        u64::from_le_bytes(b)
    };
    if &body[..8] != MAGIC
        || u64_at(8) != snap.id()
        || u64_at(16) != cvs.len() as u64
        || body[24..28] != snap.block_size().to_le_bytes()
    {
        return Err(corrupt(
            "its header names another snapshot or geometry".into(),
        ));
    }
    Ok(body[HEADER..]
        .chunks_exact(PER_BLOCK)
        .zip(cvs)
        .position(|(rec, cv)| rec != &cv[..PER_BLOCK])
        .map(|b| b as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::volume::SnapshotOptions;
    use std::os::unix::fs::FileExt;

    fn volume(dir: &Path) -> Volume {
        let v = Volume::create(&dir.join("v.img"), 32 * 4096, 4096, None).expect("volume");
        let data: Vec<u8> = (0..32 * 4096).map(|i| (i % 251) as u8).collect();
        v.write_at(&data, 0).expect("write");
        v
    }

    fn sealed(v: &Volume) -> SnapshotId {
        let id = v.reserve_snapshot_id().expect("reserve");
        v.create_snapshot(id, &SnapshotOptions::default())
            .expect("create");
        v.seal_snapshot(id).expect("seal");
        id
    }

    #[test]
    fn a_recorded_hash_is_compared_and_a_changed_block_under_the_snapshot_is_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let v = volume(d.path());
        let id = sealed(&v);
        let h = record_seal_hash(&v, id).expect("record");
        let m = manifest::load(v.state_dir(), id)
            .expect("load")
            .expect("stored");
        assert_eq!(m.blake3.as_deref(), Some(h.as_str()));
        let r = verify_snapshot(&v, id, &mut |_, _| {}).expect("clean verify");
        assert_eq!(r.outcome, VerifyOutcome::Compared);
        // Block 9 is shared with the live volume (never overwritten through the engine):
        // change it behind the engine's back, as a stray `dd` would.
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join("v.img"))
            .expect("open raw");
        f.write_all_at(b"\xff\xfe", 9 * 4096 + 100).expect("flip");
        let err = verify_snapshot(&v, id, &mut |_, _| {}).expect_err("must mismatch");
        let text = err.to_string();
        assert!(text.contains("first differing block: 9"), "{text}");
        assert!(text.contains(&h), "names the recorded hash: {text}");
        let m = manifest::load(v.state_dir(), id)
            .expect("load")
            .expect("stored");
        assert_eq!(m.blake3.as_deref(), Some(h.as_str()), "never overwritten");
    }

    #[test]
    fn a_snapshot_without_a_recorded_hash_gets_one_on_first_verify() {
        let d = tempfile::tempdir().expect("tempdir");
        let v = volume(d.path());
        let id = sealed(&v);
        let r = verify_snapshot(&v, id, &mut |_, _| {}).expect("verify");
        assert_eq!(r.outcome, VerifyOutcome::Recorded);
        let plain = blake3::hash(&(0..32 * 4096).map(|i| (i % 251) as u8).collect::<Vec<u8>>());
        assert_eq!(
            r.blake3,
            plain.to_hex().to_string(),
            "the plain blake3 of the image"
        );
        let again = verify_snapshot(&v, id, &mut |_, _| {}).expect("verify");
        assert_eq!(again.outcome, VerifyOutcome::Compared);
    }

    #[test]
    fn a_damaged_block_list_still_fails_the_comparison_and_says_why_no_block_is_named() {
        let d = tempfile::tempdir().expect("tempdir");
        let v = volume(d.path());
        let id = sealed(&v);
        record_seal_hash(&v, id).expect("record");
        std::fs::write(seal_hashes_path(v.state_dir(), id), b"junk").expect("damage");
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(d.path().join("v.img"))
            .expect("open raw");
        f.write_all_at(b"\x01", 0).expect("flip");
        let text = verify_snapshot(&v, id, &mut |_, _| {})
            .expect_err("must mismatch")
            .to_string();
        assert!(
            text.contains("does not match")
                && text.contains("cannot be named")
                && text.contains(&format!("{id}.blk")),
            "{text}"
        );
    }
}
