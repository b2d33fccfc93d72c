//! Snapshot manifests: what a finished snapshot was — who asked for it, which nodes and
//! writers took part and how each phase went, its geometry, and the blake3 hash of the
//! whole image recorded at seal time ([`crate::seal_hash`]).
//!
//! One JSON file per snapshot in the volume's state directory,
//! `<state_dir>/manifests/<id>.json`, written atomically (temporary file, fsync, rename,
//! fsync of the directory) so a crash leaves either the old or the new manifest, never a
//! torn one. Files larger than [`MAX_MANIFEST_BYTES`] are refused rather than read.
//! The node's FUSE mount shows them as `snapshots/<id>/manifest.json`.

use std::fs::{self, File};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::volume::{Snapshot, SnapshotId, SnapshotState};

/// A manifest larger than this is corrupt, not a manifest: refuse it before parsing.
pub const MAX_MANIFEST_BYTES: u64 = 16 * 1024 * 1024;

/// Where a snapshot stands, as recorded in its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ManifestStatus {
    /// Committed; post-snapshot processing may still write to it.
    Open,
    /// Complete cluster-wide and read-only.
    Sealed,
    /// Unusable (diff area overflow); its data is gone.
    Invalid { reason: String },
}

impl From<&SnapshotState> for ManifestStatus {
    fn from(s: &SnapshotState) -> Self {
        match s {
            SnapshotState::Open => ManifestStatus::Open,
            SnapshotState::Sealed => ManifestStatus::Sealed,
            SnapshotState::Invalid { reason } => ManifestStatus::Invalid {
                reason: reason.clone(),
            },
        }
    }
}

/// The record of one snapshot, as stored in `manifests/<id>.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotManifest {
    pub id: SnapshotId,
    /// Commit time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The node the request reached; `None` when the manifest was generated from the
    /// catalog alone (the protocol report was never written, e.g. a library snapshot).
    pub initiator: Option<String>,
    pub status: ManifestStatus,
    pub block_size: u32,
    /// Image size in bytes.
    pub size: u64,
    /// The protocol report: per node, its writers, their outcome and phase timings.
    /// Kept as free JSON until the report format settles.
    #[serde(default)]
    pub nodes: serde_json::Value,
    /// First writer frozen to last writer thawed, cluster-wide, in ms.
    #[serde(default)]
    pub freeze_window_ms: Option<u64>,
    /// How long the initiator held the volume's live I/O, in ms.
    #[serde(default)]
    pub io_hold_ms: Option<u64>,
    /// Hex blake3 of the whole image, recorded once when the snapshot was sealed (or by
    /// the first `snapshot verify` of a snapshot without one); see [`crate::seal_hash`].
    #[serde(default)]
    pub blake3: Option<String>,
    /// Members left out of the snapshot (fenced, not attached), with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub excluded: Vec<crate::protocol::Excluded>,
    /// blake3 of this manifest's compact JSON without this field: a damaged
    /// manifest is refused, never served. Absent in manifests written before
    /// it existed (those are read as they are).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checksum: Option<String>,
}

/// The checksum [`SnapshotManifest::checksum`] holds for `m`.
fn content_sum(m: &SnapshotManifest) -> String {
    let mut bare = m.clone();
    bare.checksum = None;
    // Our own plain struct (maps are ordered): serializing cannot fail and is
    // the same bytes every time.
    let bytes = serde_json::to_vec(&bare).unwrap_or_default();
    blake3::hash(&bytes).to_hex().to_string()
}

impl SnapshotManifest {
    /// A manifest that knows only what the catalog knows (no protocol report yet).
    pub fn bare(
        id: SnapshotId,
        created_ms: u64,
        status: ManifestStatus,
        block_size: u32,
        size: u64,
    ) -> SnapshotManifest {
        SnapshotManifest {
            id,
            created_ms,
            initiator: None,
            status,
            block_size,
            size,
            nodes: serde_json::Value::Null,
            freeze_window_ms: None,
            io_hold_ms: None,
            blake3: None,
            excluded: Vec::new(),
            checksum: None,
        }
    }
}

/// The directory holding the manifests of a volume.
pub fn manifests_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("manifests")
}

/// The file of snapshot `id`'s manifest.
pub fn manifest_path(state_dir: &Path, id: SnapshotId) -> PathBuf {
    manifests_dir(state_dir).join(format!("{id}.json"))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::ManifestIo {
        path: path.to_path_buf(),
        source,
    }
}

/// The bytes of `m` as stored: pretty JSON with its checksum.
pub fn encode(m: &SnapshotManifest) -> Vec<u8> {
    let mut m = m.clone();
    m.checksum = Some(content_sum(&m));
    // Our own plain struct: serializing cannot fail.
    serde_json::to_vec_pretty(&m).unwrap_or_default()
}

/// Writes `m` to `manifests/<id>.json` atomically and durably; returns the file's path.
pub fn store(state_dir: &Path, m: &SnapshotManifest) -> Result<PathBuf> {
    let dir = manifests_dir(state_dir);
    crate::perms::create_private_dir(&dir)?;
    let path = manifest_path(state_dir, m.id);
    let tmp = dir.join(format!(".{}.json.tmp.{}", m.id, std::process::id()));
    let bytes = encode(m);
    let write = || -> std::io::Result<()> {
        let mut f = crate::perms::private_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)?;
        f.write_all(&bytes)?;
        f.write_all(b"\n")?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        // The rename is only durable once the directory entry is.
        File::open(&dir)?.sync_all()
    };
    if let Err(e) = write() {
        let _ = fs::remove_file(&tmp);
        return Err(Error::ManifestIo { path, source: e });
    }
    Ok(path)
}

/// Parses one manifest file, refusing oversized or malformed ones with the file named.
pub fn load_file(path: &Path) -> Result<SnapshotManifest> {
    let f = File::open(path).map_err(io_err(path))?;
    let len = f.metadata().map_err(io_err(path))?.len();
    if len > MAX_MANIFEST_BYTES {
        return Err(Error::ManifestCorrupt {
            path: path.to_path_buf(),
            reason: format!("{len} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have"),
        });
    }
    let mut bytes = Vec::with_capacity(len as usize);
    f.take(MAX_MANIFEST_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io_err(path))?;
    parse(path, &bytes)
}

/// Parses a manifest's bytes (read from `path`, which errors name).
pub fn parse(path: &Path, bytes: &[u8]) -> Result<SnapshotManifest> {
    if bytes.len() as u64 > MAX_MANIFEST_BYTES {
        return Err(Error::ManifestCorrupt {
            path: path.to_path_buf(),
            reason: format!(
                "{} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may have",
                bytes.len()
            ),
        });
    }
    let mut m: SnapshotManifest =
        serde_json::from_slice(bytes).map_err(|e| Error::ManifestCorrupt {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    if let Some(sum) = &m.checksum {
        let want = content_sum(&m);
        if *sum != want {
            return Err(Error::ManifestCorrupt {
                path: path.to_path_buf(),
                reason: format!("checksum mismatch (recorded {sum}, content hashes to {want}): the file is damaged"),
            });
        }
    }
    // Checked; the in-memory manifest carries none (store computes it anew).
    m.checksum = None;
    Ok(m)
}

/// The manifest of snapshot `id`, or `None` if none was stored. A file whose `id` field
/// disagrees with its name is corrupt.
pub fn load(state_dir: &Path, id: SnapshotId) -> Result<Option<SnapshotManifest>> {
    let path = manifest_path(state_dir, id);
    match fs::metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::ManifestIo { path, source: e }),
        Ok(_) => {}
    }
    let m = load_file(&path)?;
    if m.id != id {
        return Err(Error::ManifestCorrupt {
            path,
            reason: format!("names snapshot {} but the file is for {id}", m.id),
        });
    }
    Ok(Some(m))
}

/// Every stored manifest, ordered by snapshot id. Stray files (temporaries, other
/// names) are skipped; a corrupt `<id>.json` is an error naming it.
pub fn list(state_dir: &Path) -> Result<Vec<SnapshotManifest>> {
    let dir = manifests_dir(state_dir);
    let rd = match fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::ManifestIo {
                path: dir,
                source: e,
            })
        }
        Ok(rd) => rd,
    };
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(io_err(&dir))?;
        let name = entry.file_name();
        let Some(id) = name
            .to_str()
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<SnapshotId>().ok())
        else {
            continue;
        };
        if let Some(m) = load(state_dir, id)? {
            out.push(m);
        }
    }
    out.sort_by_key(|m| m.id);
    Ok(out)
}

/// Removes snapshot `id`'s manifest and its seal-time block hashes (no error if
/// there were none).
pub fn remove(state_dir: &Path, id: SnapshotId) -> Result<()> {
    crate::seal_hash::remove(state_dir, id)?;
    let path = manifest_path(state_dir, id);
    match fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(Error::ManifestIo { path, source: e })
        }
        _ => Ok(()),
    }
}

/// Size of each sequential read while hashing: large enough that the storage streams.
const HASH_CHUNK: usize = 4 * 1024 * 1024;

/// The blake3 hash (hex) of the whole point-in-time image of `snap`.
///
/// One thread reads the image in big sequential chunks while the calling thread hashes
/// the previous one, so the time is max(read, hash) rather than their sum. Fails (never
/// hashes zeros) if the snapshot turns invalid or a read comes up short.
pub fn compute_image_hash(snap: &Snapshot) -> Result<String> {
    compute_image_hash_with_progress(snap, &mut |_, _| {})
}

/// [`compute_image_hash`], calling `progress(done, total)` (bytes) after each chunk.
pub fn compute_image_hash_with_progress(
    snap: &Snapshot,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<String> {
    let size = snap.size();
    let (full_tx, full_rx) = mpsc::sync_channel::<Result<Vec<u8>>>(2);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(3);
    for _ in 0..3 {
        // Capacity 3, nothing received yet: cannot block or fail.
        let _ = empty_tx.send(vec![0u8; HASH_CHUNK]);
    }
    let reader_snap = snap.clone();
    let reader = std::thread::spawn(move || {
        let mut offset = 0u64;
        while offset < size {
            let Ok(mut buf) = empty_rx.recv() else { return };
            let want = HASH_CHUNK.min((size - offset) as usize);
            buf.resize(want, 0);
            let res = read_full(&reader_snap, &mut buf, offset).map(|()| buf);
            let failed = res.is_err();
            if full_tx.send(res).is_err() || failed {
                return;
            }
            offset += want as u64;
        }
    });
    let mut hasher = blake3::Hasher::new();
    let mut hashed = 0u64;
    let mut outcome = Ok(());
    while hashed < size {
        match full_rx.recv() {
            Ok(Ok(buf)) => {
                hasher.update(&buf);
                hashed += buf.len() as u64;
                progress(hashed, size);
                let _ = empty_tx.send(buf);
            }
            Ok(Err(e)) => {
                outcome = Err(e);
                break;
            }
            Err(_) => {
                outcome = Err(Error::VfsWrongKind {
                    path: format!("snapshot {}", snap.id()),
                    what: "the image reader thread died",
                });
                break;
            }
        }
    }
    drop(full_rx);
    drop(empty_tx);
    let _ = reader.join();
    outcome.map(|()| hasher.finalize().to_hex().to_string())
}

/// Reads exactly `buf.len()` bytes of the snapshot at `offset`.
fn read_full(snap: &Snapshot, buf: &mut [u8], offset: u64) -> Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = snap.read_at(&mut buf[done..], offset + done as u64)?;
        if n == 0 {
            return Err(Error::VfsWrongKind {
                path: format!("snapshot {} at byte {}", snap.id(), offset + done as u64),
                what: "image ended before its size",
            });
        }
        done += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(id: SnapshotId) -> SnapshotManifest {
        SnapshotManifest {
            id,
            created_ms: 1_763_000_000_000,
            initiator: Some("node-a".into()),
            status: ManifestStatus::Sealed,
            block_size: 65536,
            size: 1 << 20,
            nodes: serde_json::json!({"node-a": {"writers": {"db": "ok"}}}),
            freeze_window_ms: Some(12),
            io_hold_ms: Some(3),
            blake3: None,
            excluded: Vec::new(),
            checksum: None,
        }
    }

    #[test]
    fn a_flipped_byte_in_a_stored_manifest_is_refused_or_harmless() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = store(dir.path(), &sample(4)).expect("store");
        let good = std::fs::read(&path).expect("read");
        let mut refused = 0;
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x04;
            match parse(&path, &bad) {
                Err(_) => refused += 1,
                Ok(m) => assert_eq!(m, sample(4), "byte {i}: damage served as data"),
            }
        }
        assert!(
            refused > good.len() / 2,
            "only {refused} of {} flips refused",
            good.len()
        );
    }

    #[test]
    fn stored_manifests_load_back_and_list_in_id_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        store(dir.path(), &sample(7)).expect("store 7");
        store(dir.path(), &sample(3)).expect("store 3");
        std::fs::write(manifests_dir(dir.path()).join(".3.json.tmp.1"), b"junk").expect("stray");
        assert_eq!(
            load(dir.path(), 7).expect("load").expect("present"),
            sample(7)
        );
        assert_eq!(load(dir.path(), 5).expect("load"), None);
        let ids: Vec<_> = list(dir.path())
            .expect("list")
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, vec![3, 7]);
        remove(dir.path(), 3).expect("remove");
        assert_eq!(load(dir.path(), 3).expect("load"), None);
    }

    #[test]
    fn corrupt_manifest_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(manifests_dir(dir.path())).expect("mkdir");
        std::fs::write(
            manifest_path(dir.path(), 4),
            b"{\"id\": 4, \"created_ms\": ",
        )
        .expect("write");
        let err = load(dir.path(), 4)
            .expect_err("truncated JSON must fail")
            .to_string();
        assert!(
            err.contains("manifests/4.json") && err.contains("corrupt"),
            "{err}"
        );
        store(dir.path(), &sample(9)).expect("store");
        std::fs::rename(manifest_path(dir.path(), 9), manifest_path(dir.path(), 10))
            .expect("rename");
        let err = load(dir.path(), 10)
            .expect_err("wrong id must fail")
            .to_string();
        assert!(err.contains("names snapshot 9"), "{err}");
    }

    #[test]
    fn image_hash_is_of_the_point_in_time_data_and_progress_reaches_the_end() {
        use crate::volume::{SnapshotOptions, Volume};
        let dir = tempfile::tempdir().expect("tempdir");
        let size = 9 * 1024 * 1024 + 64 * 1024; // not a multiple of the hash chunk
        let vol = Volume::create(
            &dir.path().join("v.img"),
            size,
            65536,
            Some(&dir.path().join("state")),
        )
        .expect("volume");
        let before: Vec<u8> = (0..size as usize).map(|i| (i % 251) as u8).collect();
        vol.write_at(&before, 0).expect("write");
        let id = vol.reserve_snapshot_id().expect("reserve");
        vol.create_snapshot(id, &SnapshotOptions { diff_limit: None })
            .expect("snapshot");
        vol.write_at(&vec![0xEE; 5 * 1024 * 1024], 3 * 1024 * 1024)
            .expect("overwrite");
        let snap = vol.snapshot(id).expect("open snapshot");
        let want = blake3::hash(&before).to_hex().to_string();
        assert_eq!(compute_image_hash(&snap).expect("hash"), want);
        let mut reported = Vec::new();
        let got = compute_image_hash_with_progress(&snap, &mut |done, total| {
            reported.push((done, total))
        })
        .expect("hash");
        assert_eq!(got, want);
        assert_eq!(
            reported.last(),
            Some(&(size, size)),
            "progress ends at the whole image"
        );
    }
}
