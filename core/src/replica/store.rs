//! The replica directory on the secondary: what arrived, checked, and how to read it.
//!
//! ```text
//! DIR/
//!   <volume uuid>/
//!     volume.json       envelope FFRVOLUM: uuid, size, block_size, source node
//!     <id>.snap         envelope FFRSNAPS: the record of a COMPLETE snapshot
//!     <id>.journal      block journal; the complete snapshot's index (see `journal`)
//!     <id>.data         the blocks this snapshot holds (appended, whole blocks)
//!     <id>.partial      envelope FFRPARTL: the plan of a transfer in progress
//!     <id>.lock         flock: one transfer per snapshot at a time
//! ```
//!
//! A replica snapshot is a copy-on-write layer: its own blocks (those sent for
//! it) over its base snapshot's image; a full copy has no base and holds every
//! block (all-zero blocks as a flag, no data). Reading block b walks the chain
//! from the snapshot to its root and takes the first layer holding b; every
//! block read from disk is checked against its chaining value, so a damaged or
//! truncated file is an error, never wrong data.
//!
//! **Complete means checked.** `<id>.snap` is written (atomically) only after
//! every block is durable and the image hash computed from the chain's chaining
//! values equals the hash the sender computed from its snapshot. Listing and
//! mounting show only snapshots with a `.snap` record, so a half-received
//! snapshot is never shown as complete.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::journal::{self, Entry, JournalHeader, RECORD_LEN};
use super::wire::{to_ranges, BlockHeader, Plan, VolumeListing, PROTOCOL_VERSION};
use super::{block_cv, block_cvs_parallel, hex, image_root, parse_hex, BlockCv};
use crate::error::{Error, Result};
use crate::format::{self, Kind};
use crate::manifest::{ManifestStatus, SnapshotManifest};
use crate::vfs::{LiveImage, SnapshotImage, VfsSource};
use crate::volume::{SnapshotId, SnapshotInfo, SnapshotState};

const VOLUME_KIND: Kind = Kind {
    magic: *b"FFRVOLUM",
    version: 1,
};
const SNAP_KIND: Kind = Kind {
    magic: *b"FFRSNAPS",
    version: 1,
};
const PARTIAL_KIND: Kind = Kind {
    magic: *b"FFRPARTL",
    version: 1,
};

/// Threads that check block hashes of one incoming frame.
const VERIFY_THREADS: usize = 2;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// `volume.json`: which volume this directory replicates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRecord {
    pub volume: String,
    pub size: u64,
    pub block_size: u32,
    pub source_node: String,
}

/// The record of one complete replica snapshot (`<id>.snap`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaSnapshotInfo {
    pub id: SnapshotId,
    /// The replica snapshot it is built on; `None` for a full copy.
    pub base: Option<SnapshotId>,
    /// When the snapshot was taken on the primary.
    pub created_ms: u64,
    /// When the secondary marked it complete.
    pub completed_ms: u64,
    /// Hex blake3 of the whole image, checked before completion.
    pub blake3: String,
    /// Blocks this layer holds (sent for it).
    pub blocks: u64,
    /// Bytes of block data this layer stores (zero blocks take none).
    pub data_bytes: u64,
    pub source_node: String,
}

/// A directory of replicas, one subdirectory per volume uuid.
#[derive(Debug, Clone)]
pub struct ReplicaStore {
    dir: PathBuf,
}

fn valid_uuid(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
}

impl ReplicaStore {
    /// Opens (creating if needed) the replica directory.
    pub fn open(dir: &Path) -> Result<ReplicaStore> {
        crate::perms::create_private_dir(dir)?;
        crate::perms::secure_tree(dir)?;
        Ok(ReplicaStore {
            dir: dir.to_path_buf(),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The uuids of the volumes held, sorted.
    pub fn volumes(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io("list", &self.dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("list", &self.dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if valid_uuid(&name) && ent.path().join("volume.json").is_file() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }

    /// The replica of volume `uuid`.
    pub fn volume(&self, uuid: &str) -> Result<ReplicaVolume> {
        if !valid_uuid(uuid) {
            return Err(Error::ReplicaNotFound {
                dir: self.dir.clone(),
                what: format!("volume {uuid:?} (not a volume uuid)"),
            });
        }
        let dir = self.dir.join(uuid);
        let path = dir.join("volume.json");
        if !path.is_file() {
            return Err(Error::ReplicaNotFound {
                dir: self.dir.clone(),
                what: format!("volume {uuid}"),
            });
        }
        let (record, _) =
            format::decode_json::<VolumeRecord>(VOLUME_KIND, &format::read_file(&path)?, &path)?;
        if record.volume != uuid {
            return Err(Error::ReplicaCorrupt {
                file: path,
                why: format!("names volume {}, not {uuid}", record.volume),
            });
        }
        Ok(ReplicaVolume {
            dir,
            record,
            layers: Mutex::new(HashMap::new()),
        })
    }

    /// Every volume (or only `only`) with its complete snapshots.
    pub fn list(&self, only: Option<&str>) -> Result<Vec<VolumeListing>> {
        let uuids = match only {
            Some(u) if !self.dir.join(u).join("volume.json").is_file() => return Ok(Vec::new()),
            Some(u) => vec![u.to_string()],
            None => self.volumes()?,
        };
        uuids
            .iter()
            .map(|u| {
                let v = self.volume(u)?;
                Ok(VolumeListing {
                    volume: u.clone(),
                    size: v.record.size,
                    block_size: v.record.block_size,
                    snapshots: v.snapshots()?,
                })
            })
            .collect()
    }

    /// Starts, or resumes, the transfer `plan` describes.
    pub fn begin(&self, plan: &Plan) -> Result<Incoming> {
        let refuse = |why: String| Error::ReplicaRefused {
            volume: plan.volume.clone(),
            snapshot: plan.snapshot,
            why,
        };
        if plan.version != PROTOCOL_VERSION {
            return Err(refuse(format!(
                "protocol version {} (this secondary speaks {PROTOCOL_VERSION})",
                plan.version
            )));
        }
        if !valid_uuid(&plan.volume) {
            return Err(refuse("the volume uuid is not one".into()));
        }
        crate::units::check_block_size(plan.block_size as u64)
            .map_err(|e| refuse(format!("block size: {e}")))?;
        if plan.size == 0 || !plan.size.is_multiple_of(plan.block_size as u64) {
            return Err(refuse(format!(
                "size {} is not a positive multiple of the block size {}",
                plan.size, plan.block_size
            )));
        }
        let nblocks = plan.size / plan.block_size as u64;
        if plan.blocks > nblocks || (plan.base.is_none() && plan.blocks != nblocks) {
            return Err(refuse(format!(
                "plans {} blocks of a {nblocks}-block volume{}",
                plan.blocks,
                if plan.base.is_none() {
                    " as a full copy"
                } else {
                    ""
                }
            )));
        }
        if plan.base.is_some_and(|b| b >= plan.snapshot) {
            return Err(refuse("the base must be an older snapshot".into()));
        }
        let vdir = self.dir.join(&plan.volume);
        crate::perms::create_private_dir(&vdir)?;
        let vol_path = vdir.join("volume.json");
        if vol_path.is_file() {
            let v = self.volume(&plan.volume)?;
            if v.record.size != plan.size || v.record.block_size != plan.block_size {
                return Err(refuse(format!(
                    "the replica here is {} bytes in blocks of {}, the plan says {} in blocks of {}",
                    v.record.size, v.record.block_size, plan.size, plan.block_size
                )));
            }
        } else {
            let rec = VolumeRecord {
                volume: plan.volume.clone(),
                size: plan.size,
                block_size: plan.block_size,
                source_node: plan.source_node.clone(),
            };
            format::write_file_atomic(&vol_path, &format::encode_json(VOLUME_KIND, &rec))?;
        }
        let volume = self.volume(&plan.volume)?;
        let id = plan.snapshot;
        if vdir.join(format!("{id}.snap")).exists() {
            return Err(refuse("it is already complete here".into()));
        }
        let base = match plan.base {
            Some(b) => Some(
                volume
                    .image(b)
                    .map_err(|e| refuse(format!("base snapshot {b} is not usable here: {e}")))?,
            ),
            None => None,
        };

        let lock_path = vdir.join(format!("{id}.lock"));
        let lock = crate::perms::private_file_options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| Error::io("open", &lock_path, e))?;
        // SAFETY: flock on a valid fd we own; released when `lock` is closed.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(refuse(
                "another push of this snapshot is in progress".into(),
            ));
        }

        let partial = vdir.join(format!("{id}.partial"));
        let jpath = vdir.join(format!("{id}.journal"));
        let dpath = vdir.join(format!("{id}.data"));
        let header = JournalHeader {
            snapshot: id,
            block_size: plan.block_size,
            base: plan.base,
            blocks: plan.blocks,
        };
        let resumable = partial.is_file()
            && format::read_file(&partial)
                .and_then(|b| format::decode_json::<Plan>(PARTIAL_KIND, &b, &partial))
                .is_ok_and(|(old, _)| {
                    Plan {
                        source_node: plan.source_node.clone(),
                        ..old
                    } == *plan
                });
        let loaded = if resumable {
            journal::load(&jpath, true)
                .ok()
                .filter(|l| l.header == header)
        } else {
            None
        };
        let open = |p: &Path| {
            crate::perms::private_file_options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(p)
                .map_err(|e| Error::io("open", p, e))
        };
        let (data, journal_file, have, data_end, journal_len) = match loaded {
            Some(l) => {
                let data = open(&dpath)?;
                let journal_file = open(&jpath)?;
                let bs = plan.block_size as u64;
                let data_end = l
                    .entries
                    .iter()
                    .filter(|e| !e.zero)
                    .map(|e| e.offset + bs)
                    .max()
                    .unwrap_or(0);
                let dlen = data
                    .metadata()
                    .map_err(|e| Error::io("stat", &dpath, e))?
                    .len();
                if dlen < data_end {
                    return Err(Error::ReplicaCorrupt {
                        file: dpath,
                        why: format!(
                            "{dlen} bytes, but its journal names data up to byte {data_end}"
                        ),
                    });
                }
                // Drop what was written after the last journaled block (it was in flight).
                data.set_len(data_end)
                    .map_err(|e| Error::io("truncate", &dpath, e))?;
                journal_file
                    .set_len(l.valid_len)
                    .map_err(|e| Error::io("truncate", &jpath, e))?;
                let have: HashMap<u64, Entry> = l.entries.iter().map(|e| (e.block, *e)).collect();
                (data, journal_file, have, data_end, l.valid_len)
            }
            None => {
                for p in [&dpath, &jpath] {
                    match std::fs::remove_file(p) {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => return Err(Error::io("remove", p, e)),
                    }
                }
                format::write_file_atomic(&partial, &format::encode_json(PARTIAL_KIND, plan))?;
                let data = open(&dpath)?;
                let journal_file = open(&jpath)?;
                journal_file
                    .write_all_at(&journal::encode_header(&header), 0)
                    .map_err(|e| Error::io("write", &jpath, e))?;
                journal_file
                    .sync_all()
                    .map_err(|e| Error::io("fsync", &jpath, e))?;
                format::sync_dir(&vdir)?;
                (data, journal_file, HashMap::new(), 0, RECORD_LEN as u64)
            }
        };
        let resumed = have.len() as u64;
        Ok(Incoming {
            volume,
            plan: plan.clone(),
            nblocks,
            base,
            data,
            data_path: dpath,
            journal: journal_file,
            journal_path: jpath,
            partial_path: partial,
            _lock: lock,
            data_end,
            journal_len,
            have,
            pending: Vec::new(),
            pending_bytes: 0,
            received: 0,
            resumed,
        })
    }
}

/// One replicated volume: its complete snapshots and their images.
pub struct ReplicaVolume {
    dir: PathBuf,
    record: VolumeRecord,
    /// Loaded layers by snapshot id (complete layers never change).
    layers: Mutex<HashMap<SnapshotId, Arc<Layer>>>,
}

impl std::fmt::Debug for ReplicaVolume {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaVolume")
            .field("dir", &self.dir)
            .field("record", &self.record)
            .finish()
    }
}

/// One snapshot's own blocks.
struct Layer {
    id: SnapshotId,
    data: File,
    data_path: PathBuf,
    index: HashMap<u64, Entry>,
}

impl ReplicaVolume {
    pub fn record(&self) -> &VolumeRecord {
        &self.record
    }

    fn blocks(&self) -> u64 {
        self.record.size / self.record.block_size as u64
    }

    /// The complete snapshots, by id.
    pub fn snapshots(&self) -> Result<Vec<ReplicaSnapshotInfo>> {
        let mut out = Vec::new();
        let rd = std::fs::read_dir(&self.dir).map_err(|e| Error::io("list", &self.dir, e))?;
        for ent in rd {
            let ent = ent.map_err(|e| Error::io("list", &self.dir, e))?;
            let name = ent.file_name().to_string_lossy().into_owned();
            if let Some(id) = name
                .strip_suffix(".snap")
                .and_then(|s| s.parse::<u64>().ok())
            {
                out.push(self.info(id)?);
            }
        }
        out.sort_by_key(|i| i.id);
        Ok(out)
    }

    /// The record of complete snapshot `id`.
    pub fn info(&self, id: SnapshotId) -> Result<ReplicaSnapshotInfo> {
        let path = self.dir.join(format!("{id}.snap"));
        if !path.is_file() {
            return Err(Error::ReplicaNotFound {
                dir: self.dir.clone(),
                what: format!("complete snapshot {id}"),
            });
        }
        let (info, _) = format::decode_json::<ReplicaSnapshotInfo>(
            SNAP_KIND,
            &format::read_file(&path)?,
            &path,
        )?;
        if info.id != id {
            return Err(Error::ReplicaCorrupt {
                file: path,
                why: format!("records snapshot {}", info.id),
            });
        }
        Ok(info)
    }

    fn layer(&self, id: SnapshotId) -> Result<Arc<Layer>> {
        if let Some(l) = self
            .layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&id)
        {
            return Ok(l.clone());
        }
        let info = self.info(id)?;
        let jpath = self.dir.join(format!("{id}.journal"));
        let data_path = self.dir.join(format!("{id}.data"));
        let corrupt = |file: &Path, why: String| Error::ReplicaCorrupt {
            file: file.to_path_buf(),
            why,
        };
        let l = journal::load(&jpath, false)?;
        if l.header.snapshot != id
            || l.header.base != info.base
            || l.header.block_size != self.record.block_size
        {
            return Err(corrupt(&jpath, format!("its header (snapshot {}, base {:?}) does not match the record of snapshot {id}", l.header.snapshot, l.header.base)));
        }
        let bs = self.record.block_size as u64;
        let n = self.blocks();
        let mut index = HashMap::with_capacity(l.entries.len());
        let mut data_end = 0;
        for e in &l.entries {
            if e.block >= n {
                return Err(corrupt(
                    &jpath,
                    format!("names block {} of a {n}-block volume", e.block),
                ));
            }
            if !e.zero {
                data_end = data_end.max(e.offset + bs);
            }
            index.insert(e.block, *e);
        }
        if index.len() as u64 != info.blocks {
            return Err(corrupt(
                &jpath,
                format!(
                    "holds {} blocks, the snapshot record says {}",
                    index.len(),
                    info.blocks
                ),
            ));
        }
        let data = File::open(&data_path).map_err(|e| Error::io("open", &data_path, e))?;
        let dlen = data
            .metadata()
            .map_err(|e| Error::io("stat", &data_path, e))?
            .len();
        if dlen < data_end {
            return Err(corrupt(
                &data_path,
                format!(
                    "{dlen} bytes, but its journal names data up to byte {data_end} (truncated)"
                ),
            ));
        }
        let layer = Arc::new(Layer {
            id,
            data,
            data_path,
            index,
        });
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, layer.clone());
        Ok(layer)
    }

    /// The image of complete snapshot `id`: its layer over its base's, down to a full copy.
    pub fn image(&self, id: SnapshotId) -> Result<ReplicaImage> {
        let mut chain = Vec::new();
        let mut next = Some(id);
        while let Some(cur) = next {
            if chain.len() > 100_000 || chain.iter().any(|l: &Arc<Layer>| l.id == cur) {
                return Err(Error::ReplicaCorrupt {
                    file: self.dir.join(format!("{id}.snap")),
                    why: "its base chain loops".into(),
                });
            }
            let info = self.info(cur)?;
            if info.base.is_some_and(|b| b >= cur) {
                return Err(Error::ReplicaCorrupt {
                    file: self.dir.join(format!("{cur}.snap")),
                    why: format!("base {:?} is not older", info.base),
                });
            }
            chain.push(self.layer(cur)?);
            next = info.base;
        }
        Ok(ReplicaImage {
            volume: self.record.volume.clone(),
            id,
            size: self.record.size,
            block_size: self.record.block_size,
            chain,
        })
    }
}

/// The point-in-time image of one replica snapshot. Read-only.
pub struct ReplicaImage {
    volume: String,
    id: SnapshotId,
    size: u64,
    block_size: u32,
    /// Newest first; the last is a full copy.
    chain: Vec<Arc<Layer>>,
}

impl std::fmt::Debug for ReplicaImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ReplicaImage({} snapshot {}, {} layers)",
            self.volume,
            self.id,
            self.chain.len()
        )
    }
}

impl ReplicaImage {
    pub fn id(&self) -> SnapshotId {
        self.id
    }

    fn lookup(&self, block: u64) -> Result<(&Layer, Entry)> {
        for l in &self.chain {
            if let Some(e) = l.index.get(&block) {
                return Ok((l, *e));
            }
        }
        let root = self
            .chain
            .last()
            .map(|l| l.data_path.clone())
            .unwrap_or_default();
        Err(Error::ReplicaCorrupt {
            file: root,
            why: format!(
                "block {block} of snapshot {} is in no layer of its chain",
                self.id
            ),
        })
    }

    /// The chaining value recorded for `block`.
    pub fn block_cv(&self, block: u64) -> Result<BlockCv> {
        Ok(self.lookup(block)?.1.cv)
    }

    /// Reads one whole block into `buf` and checks it against its chaining value.
    pub fn read_block(&self, block: u64, buf: &mut [u8]) -> Result<()> {
        let (layer, e) = self.lookup(block)?;
        if e.zero {
            buf.fill(0);
            return Ok(());
        }
        layer
            .data
            .read_exact_at(buf, e.offset)
            .map_err(|err| Error::ReplicaCorrupt {
                file: layer.data_path.clone(),
                why: format!("block {block} at byte {}: {err}", e.offset),
            })?;
        if self.size > self.block_size as u64 && block_cv(buf, block, self.block_size) != e.cv {
            return Err(Error::ReplicaCorrupt {
                file: layer.data_path.clone(),
                why: format!("block {block} at byte {} fails its blake3 check", e.offset),
            });
        }
        Ok(())
    }

    /// The whole-image blake3 (hex), from the blocks' chaining values.
    pub fn root(&self) -> Result<String> {
        let n = self.size / self.block_size as u64;
        if n == 1 {
            let mut buf = vec![0u8; self.block_size as usize];
            self.read_block(0, &mut buf)?;
            return Ok(blake3::hash(&buf).to_hex().to_string());
        }
        image_root(n, |b| self.block_cv(b))
    }

    /// Reads the image at `offset`; short only at the end.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = buf.len().min((self.size - offset) as usize);
        let bs = self.block_size as u64;
        let mut whole = vec![0u8; bs as usize];
        let mut done = 0;
        while done < n {
            let pos = offset + done as u64;
            let block = pos / bs;
            let within = (pos % bs) as usize;
            let take = (bs as usize - within).min(n - done);
            self.read_block(block, &mut whole)?;
            buf[done..done + take].copy_from_slice(&whole[within..within + take]);
            done += take;
        }
        Ok(n)
    }
}

impl SnapshotImage for ReplicaImage {
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        ReplicaImage::read_at(self, buf, offset)
    }
    fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
        Err(Error::VfsReadOnly {
            path: format!("snapshots/{}/volume.img", self.id),
            why: "a replica snapshot is read-only".into(),
        })
    }
    fn state(&self) -> Result<SnapshotState> {
        Ok(SnapshotState::Sealed)
    }
}

impl VfsSource for ReplicaVolume {
    fn describe(&self) -> String {
        format!(
            "replica of volume {} in {}",
            self.record.volume,
            self.dir.display()
        )
    }
    fn block_size(&self) -> u32 {
        self.record.block_size
    }
    fn live(&self) -> Option<&dyn LiveImage> {
        None
    }
    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Ok(ReplicaVolume::snapshots(self)?
            .into_iter()
            .map(|s| SnapshotInfo {
                id: s.id,
                created_ms: s.created_ms,
                state: SnapshotState::Sealed,
                diff_blocks: s.blocks,
                diff_bytes: s.data_bytes,
                diff_limit: None,
            })
            .collect())
    }
    fn open_snapshot(&self, id: SnapshotId) -> Result<Arc<dyn SnapshotImage>> {
        Ok(Arc::new(self.image(id)?))
    }
    fn manifest(&self, id: SnapshotId) -> Result<Option<SnapshotManifest>> {
        let info = self.info(id)?;
        let mut m = SnapshotManifest::bare(
            id,
            info.created_ms,
            ManifestStatus::Sealed,
            self.record.block_size,
            self.record.size,
        );
        m.initiator = Some(info.source_node);
        m.blake3 = Some(info.blake3);
        Ok(Some(m))
    }
}

/// A transfer being received: writes and journals blocks, then completes.
pub struct Incoming {
    volume: ReplicaVolume,
    plan: Plan,
    nblocks: u64,
    base: Option<ReplicaImage>,
    data: File,
    data_path: PathBuf,
    journal: File,
    journal_path: PathBuf,
    partial_path: PathBuf,
    /// Holds the flock that keeps a second push of the same snapshot out.
    _lock: File,
    /// Where the next block's data goes in the data file.
    data_end: u64,
    journal_len: u64,
    /// Every block written (journaled or pending), by block number.
    have: HashMap<u64, Entry>,
    /// Written but not yet fsynced and journaled.
    pending: Vec<Entry>,
    pending_bytes: u64,
    received: u64,
    resumed: u64,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Incoming({} snapshot {}, {} blocks held)",
            self.plan.volume,
            self.plan.snapshot,
            self.have.len()
        )
    }
}

impl Incoming {
    /// Blocks already durable from an earlier session, as `[start, end)` ranges.
    pub fn have_ranges(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<u64> = self.have.keys().copied().collect();
        v.sort_unstable();
        to_ranges(v)
    }

    /// Blocks recovered from the journal when the transfer began.
    pub fn resumed_blocks(&self) -> u64 {
        self.resumed
    }

    /// Block data written since the last [`Incoming::sync`].
    pub fn pending_bytes(&self) -> u64 {
        self.pending_bytes
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn refuse(&self, why: String) -> Error {
        Error::ReplicaRefused {
            volume: self.plan.volume.clone(),
            snapshot: self.plan.snapshot,
            why,
        }
    }

    /// Checks and writes one frame's blocks (`data` holds the non-zero ones, in order).
    /// Nothing is journaled until [`Incoming::sync`].
    pub fn put(&mut self, headers: &[BlockHeader], data: &[u8]) -> Result<()> {
        let bs = self.plan.block_size as usize;
        let nonzero = headers.iter().filter(|h| !h.z).count();
        if data.len() != nonzero * bs {
            return Err(self.refuse(format!(
                "a frame carries {} data bytes for {nonzero} blocks of {bs}",
                data.len()
            )));
        }
        let mut cvs = Vec::with_capacity(headers.len());
        for h in headers {
            if h.b >= self.nblocks {
                return Err(self.refuse(format!(
                    "block {} is beyond the volume's {} blocks",
                    h.b, self.nblocks
                )));
            }
            let cv = parse_hex(&h.cv).ok_or_else(|| {
                self.refuse(format!("block {}: {:?} is not a hex blake3", h.b, h.cv))
            })?;
            cvs.push(cv);
        }
        let single = self.nblocks == 1;
        let got = if single {
            Vec::new()
        } else {
            block_cvs_parallel_scattered(headers, data, self.plan.block_size)
        };
        let mut k = 0usize;
        for (i, h) in headers.iter().enumerate() {
            if single {
                // A one-block image has no chaining values; the image hash checks it at commit.
                continue;
            }
            let actual = if h.z {
                block_cv(&vec![0u8; bs], h.b, self.plan.block_size)
            } else {
                got[k]
            };
            if !h.z {
                k += 1;
            }
            if actual != cvs[i] {
                return Err(Error::ReplicaBlockHash {
                    volume: self.plan.volume.clone(),
                    snapshot: self.plan.snapshot,
                    block: h.b,
                    sent: h.cv.clone(),
                    got: hex(&actual),
                });
            }
        }
        if !data.is_empty() {
            self.data
                .write_all_at(data, self.data_end)
                .map_err(|e| Error::io("write", &self.data_path, e))?;
        }
        let mut at = self.data_end;
        for (i, h) in headers.iter().enumerate() {
            let e = Entry {
                block: h.b,
                offset: if h.z { 0 } else { at },
                zero: h.z,
                cv: cvs[i],
            };
            if !h.z {
                at += bs as u64;
            }
            self.have.insert(h.b, e);
            self.pending.push(e);
        }
        self.pending_bytes += data.len() as u64;
        self.data_end = at;
        self.received += headers.len() as u64;
        Ok(())
    }

    /// Makes the written blocks durable, then journals them (data first, so a
    /// journal record always names durable data).
    pub fn sync(&mut self) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        self.data
            .sync_data()
            .map_err(|e| Error::io("fsync", &self.data_path, e))?;
        let mut bytes = Vec::with_capacity(self.pending.len() * RECORD_LEN);
        for e in &self.pending {
            bytes.extend_from_slice(&journal::encode_record(e));
        }
        self.journal
            .write_all_at(&bytes, self.journal_len)
            .map_err(|e| Error::io("write", &self.journal_path, e))?;
        self.journal
            .sync_data()
            .map_err(|e| Error::io("fsync", &self.journal_path, e))?;
        self.journal_len += bytes.len() as u64;
        self.pending.clear();
        self.pending_bytes = 0;
        Ok(())
    }

    /// Blocks received in this session.
    pub fn received_blocks(&self) -> u64 {
        self.received
    }

    /// Every block is sent: make them durable, check the image hash against
    /// `expected` (the sender's), and only then mark the snapshot complete.
    /// On a hash mismatch the partial transfer is discarded (a resume would
    /// only rebuild the same wrong image).
    pub fn commit(mut self, expected: &str) -> Result<ReplicaSnapshotInfo> {
        self.sync()?;
        let id = self.plan.snapshot;
        if self.plan.base.is_none() && (self.have.len() as u64) < self.nblocks {
            return Err(self.refuse(format!(
                "a full copy holds {} of {} blocks at commit",
                self.have.len(),
                self.nblocks
            )));
        }
        // An incremental sender may leave out listed blocks equal to the base's;
        // the image hash below is what proves nothing needed is missing.
        if self.have.len() as u64 > self.plan.blocks {
            return Err(self.refuse(format!(
                "{} blocks received, more than the {} planned",
                self.have.len(),
                self.plan.blocks
            )));
        }
        let cv_of = |b: u64| -> Result<BlockCv> {
            match self.have.get(&b) {
                Some(e) => Ok(e.cv),
                None => match &self.base {
                    Some(img) => img.block_cv(b),
                    None => Err(Error::ReplicaRefused {
                        volume: self.plan.volume.clone(),
                        snapshot: id,
                        why: format!("block {b} was never sent"),
                    }),
                },
            }
        };
        let got = if self.nblocks == 1 {
            let mut buf = vec![0u8; self.plan.block_size as usize];
            match self.have.get(&0) {
                Some(e) if !e.zero => self
                    .data
                    .read_exact_at(&mut buf, e.offset)
                    .map_err(|err| Error::io("read", &self.data_path, err))?,
                Some(_) => {}
                None => match &self.base {
                    Some(img) => img.read_block(0, &mut buf)?,
                    None => return Err(self.refuse("block 0 was never sent".into())),
                },
            }
            blake3::hash(&buf).to_hex().to_string()
        } else {
            image_root(self.nblocks, cv_of)?
        };
        let vdir = self.volume.dir.clone();
        if got != expected {
            for p in [&self.partial_path, &self.journal_path, &self.data_path] {
                let _ = std::fs::remove_file(p);
            }
            return Err(Error::ReplicaImageHash {
                volume: self.plan.volume.clone(),
                snapshot: id,
                expected: expected.to_string(),
                got,
            });
        }
        let info = ReplicaSnapshotInfo {
            id,
            base: self.plan.base,
            created_ms: self.plan.created_ms,
            completed_ms: now_ms(),
            blake3: got,
            blocks: self.have.len() as u64,
            data_bytes: self.data_end,
            source_node: self.plan.source_node.clone(),
        };
        format::write_file_atomic(
            &vdir.join(format!("{id}.snap")),
            &format::encode_json(SNAP_KIND, &info),
        )?;
        std::fs::remove_file(&self.partial_path)
            .map_err(|e| Error::io("remove", &self.partial_path, e))?;
        format::sync_dir(&vdir)?;
        Ok(info)
    }
}

/// Chaining values of the non-zero blocks of a frame, whose data lies back to
/// back in `data`, hashed on [`VERIFY_THREADS`] threads.
fn block_cvs_parallel_scattered(
    headers: &[BlockHeader],
    data: &[u8],
    block_size: u32,
) -> Vec<BlockCv> {
    let blocks: Vec<u64> = headers.iter().filter(|h| !h.z).map(|h| h.b).collect();
    let contiguous = blocks.windows(2).all(|w| w[1] == w[0] + 1);
    match blocks.first() {
        Some(&first) if contiguous => block_cvs_parallel(data, first, block_size, VERIFY_THREADS),
        _ => {
            let bs = block_size as usize;
            let per = blocks.len().div_ceil(VERIFY_THREADS).max(1);
            let mut out = vec![[0u8; 32]; blocks.len()];
            std::thread::scope(|s| {
                for (t, chunk) in out.chunks_mut(per).enumerate() {
                    let blocks = &blocks;
                    s.spawn(move || {
                        for (k, cv) in chunk.iter_mut().enumerate() {
                            let i = t * per + k;
                            *cv = block_cv(&data[i * bs..(i + 1) * bs], blocks[i], block_size);
                        }
                    });
                }
            });
            out
        }
    }
}
