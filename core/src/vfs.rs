//! The tree a node mounts, independent of FUSE:
//!
//! ```text
//! live/volume.img                 the live volume, read-write through the engine
//! snapshots/<id>/volume.img       the virtual snapshot (seed 003 read); writable only
//!                                 while the snapshot is Open (post-snapshot processing)
//! snapshots/<id>/manifest.json    the stored manifest, else one made from the catalog
//! snapshots/latest -> <id>        the newest Sealed (complete) snapshot
//! ```
//!
//! The snapshot listing comes from the shared catalog, so a snapshot deleted on another
//! node disappears here too. It is cached for [`LISTING_TTL`] at most and refetched at
//! once when a lookup misses, so a snapshot created a moment ago is found. An invalid
//! snapshot never yields data: opening or reading it fails.
//!
//! The data comes from a [`VfsSource`]: a [`Volume`] (a node's view) or, later, a
//! replica directory that has snapshots but no live volume. The FUSE adapter
//! (`freezeframe-fusefs`) only maps inodes and errnos onto [`Vfs`].

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::manifest::{self, ManifestStatus, SnapshotManifest};
use crate::volume::{Snapshot, SnapshotId, SnapshotInfo, SnapshotState, Volume};

/// How long a snapshot listing is reused before the catalog is read again.
pub const LISTING_TTL: Duration = Duration::from_millis(200);

/// The live volume as the tree needs it.
pub trait LiveImage: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    fn flush(&self) -> Result<()>;
}

/// One snapshot's point-in-time image as the tree needs it.
pub trait SnapshotImage: Send + Sync {
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Re-read from shared state (not cached).
    fn state(&self) -> Result<SnapshotState>;
}

/// Where the tree's data comes from.
pub trait VfsSource: Send + Sync {
    /// Words for log lines: the volume path, the replica directory.
    fn describe(&self) -> String;
    fn block_size(&self) -> u32;
    /// The live volume, if this source has one (a replica has none).
    fn live(&self) -> Option<&dyn LiveImage>;
    /// Every snapshot, fresh from the shared catalog.
    fn snapshots(&self) -> Result<Vec<SnapshotInfo>>;
    fn open_snapshot(&self, id: SnapshotId) -> Result<Arc<dyn SnapshotImage>>;
    /// The stored manifest of snapshot `id`, if any.
    fn manifest(&self, id: SnapshotId) -> Result<Option<SnapshotManifest>>;
}

impl LiveImage for Volume {
    fn size(&self) -> u64 {
        Volume::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        Volume::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Volume::write_at(self, buf, offset)
    }
    fn flush(&self) -> Result<()> {
        Volume::flush(self)
    }
}

impl SnapshotImage for Snapshot {
    fn size(&self) -> u64 {
        Snapshot::size(self)
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
        Snapshot::read_at(self, buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Snapshot::write_at(self, buf, offset)
    }
    fn state(&self) -> Result<SnapshotState> {
        Snapshot::state(self)
    }
}

impl VfsSource for Volume {
    fn describe(&self) -> String {
        format!("volume {}", self.path().display())
    }
    fn block_size(&self) -> u32 {
        Volume::block_size(self)
    }
    fn live(&self) -> Option<&dyn LiveImage> {
        Some(self)
    }
    fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
        Volume::snapshots(self)
    }
    fn open_snapshot(&self, id: SnapshotId) -> Result<Arc<dyn SnapshotImage>> {
        Ok(Arc::new(self.snapshot(id)?))
    }
    fn manifest(&self, id: SnapshotId) -> Result<Option<SnapshotManifest>> {
        manifest::load(self.state_dir(), id)
    }
}

/// A place in the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Node {
    Root,
    LiveDir,
    LiveImage,
    SnapshotsDir,
    /// `snapshots/latest`, a symlink.
    Latest,
    SnapshotDir(SnapshotId),
    SnapshotImage(SnapshotId),
    Manifest(SnapshotId),
}

/// What kind of entry a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
}

/// What the mount needs to know about a node to present it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub node: Node,
    pub kind: Kind,
    /// Bytes (files), target length (symlink), 0 (directories).
    pub size: u64,
    pub writable: bool,
    /// Contents and attributes can no longer change (a sealed snapshot's files): the
    /// kernel may cache them for long.
    pub stable: bool,
    /// Every read and write must reach the engine (no page cache): the live volume, an
    /// open snapshot that other nodes may be writing, generated text.
    pub direct_io: bool,
    /// Modification time, ms since the Unix epoch; `None` = the mount's start time.
    pub mtime_ms: Option<u64>,
}

/// An open file of the tree.
pub enum Handle {
    Live,
    Snapshot {
        id: SnapshotId,
        image: Arc<dyn SnapshotImage>,
    },
    /// Generated at open so that one open sees one consistent document.
    Manifest {
        id: SnapshotId,
        bytes: Arc<Vec<u8>>,
    },
}

impl std::fmt::Debug for Handle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Handle::Live => f.write_str("Handle::Live"),
            Handle::Snapshot { id, .. } => write!(f, "Handle::Snapshot({id})"),
            Handle::Manifest { bytes, .. } => write!(f, "Handle::Manifest({} bytes)", bytes.len()),
        }
    }
}

/// How the mount must treat an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    NotFound,
    ReadOnly,
    /// The data is gone or unreadable: report an I/O error, never zeros.
    Invalid,
    WrongKind,
    /// A post-snapshot write the snapshot's diff area has no room for.
    NoSpace,
    /// Anything else from the engine or the disks.
    Io,
}

/// Sorts an error for errno mapping, looking through the path wrapper at the engine's
/// own error (a snapshot deleted, sealed or invalidated underneath an open file).
pub fn classify(e: &Error) -> ErrorClass {
    match e {
        Error::VfsNotFound { .. } | Error::SnapshotNotFound { .. } => ErrorClass::NotFound,
        Error::VfsReadOnly { .. } | Error::SnapshotSealed { .. } => ErrorClass::ReadOnly,
        Error::VfsSnapshotInvalid { .. } | Error::SnapshotInvalid { .. } => ErrorClass::Invalid,
        Error::VfsWrongKind { .. } | Error::OutOfRange { .. } => ErrorClass::WrongKind,
        Error::DiffAreaFull { .. } => ErrorClass::NoSpace,
        Error::VfsEngine { source, .. } => classify(source),
        _ => ErrorClass::Io,
    }
}

struct Listing {
    fetched: Instant,
    infos: Arc<BTreeMap<SnapshotId, SnapshotInfo>>,
}

/// The tree over one [`VfsSource`]. Send + Sync; share it behind an `Arc`.
pub struct Vfs {
    source: Arc<dyn VfsSource>,
    listing: Mutex<Option<Listing>>,
    /// Open engine handles by snapshot id, so that each FUSE open does not reopen the
    /// snapshot; dropped when the snapshot leaves the listing.
    images: Mutex<HashMap<SnapshotId, Arc<dyn SnapshotImage>>>,
}

impl std::fmt::Debug for Vfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Vfs({})", self.source.describe())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic elsewhere while holding these caches leaves them merely stale.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The path of a node inside the mount, for messages.
pub fn node_path(node: Node) -> String {
    match node {
        Node::Root => "/".into(),
        Node::LiveDir => "live".into(),
        Node::LiveImage => "live/volume.img".into(),
        Node::SnapshotsDir => "snapshots".into(),
        Node::Latest => "snapshots/latest".into(),
        Node::SnapshotDir(id) => format!("snapshots/{id}"),
        Node::SnapshotImage(id) => format!("snapshots/{id}/volume.img"),
        Node::Manifest(id) => format!("snapshots/{id}/manifest.json"),
    }
}

fn not_found(path: String) -> Error {
    Error::VfsNotFound { path }
}

fn engine(node: Node, e: Error) -> Error {
    match e {
        Error::VfsNotFound { .. }
        | Error::VfsReadOnly { .. }
        | Error::VfsSnapshotInvalid { .. }
        | Error::VfsWrongKind { .. } => e,
        other => Error::VfsEngine {
            path: node_path(node),
            source: Box::new(other),
        },
    }
}

impl Vfs {
    pub fn new(source: Arc<dyn VfsSource>) -> Vfs {
        Vfs {
            source,
            listing: Mutex::new(None),
            images: Mutex::new(HashMap::new()),
        }
    }

    /// The usual case: a node's tree over its volume.
    pub fn for_volume(volume: Volume) -> Vfs {
        Vfs::new(Arc::new(volume))
    }

    pub fn source(&self) -> &Arc<dyn VfsSource> {
        &self.source
    }

    /// The snapshot listing, refetched if older than [`LISTING_TTL`] or if `force`.
    fn listing(&self, force: bool) -> Result<Arc<BTreeMap<SnapshotId, SnapshotInfo>>> {
        let mut cached = lock(&self.listing);
        if let Some(l) = cached.as_ref() {
            if !force && l.fetched.elapsed() < LISTING_TTL {
                return Ok(l.infos.clone());
            }
        }
        let infos: BTreeMap<_, _> = self
            .source
            .snapshots()
            .map_err(|e| engine(Node::SnapshotsDir, e))?
            .into_iter()
            .map(|i| (i.id, i))
            .collect();
        let infos = Arc::new(infos);
        lock(&self.images).retain(|id, _| infos.contains_key(id));
        *cached = Some(Listing {
            fetched: Instant::now(),
            infos: infos.clone(),
        });
        Ok(infos)
    }

    /// Catalog entry of snapshot `id`; a miss refetches once before saying NotFound.
    fn info(&self, id: SnapshotId, node: Node) -> Result<SnapshotInfo> {
        if let Some(i) = self.listing(false)?.get(&id) {
            return Ok(i.clone());
        }
        self.listing(true)?
            .get(&id)
            .cloned()
            .ok_or_else(|| not_found(node_path(node)))
    }

    fn latest(&self) -> Result<Option<SnapshotId>> {
        let l = self.listing(false)?;
        Ok(l.values()
            .rev()
            .find(|i| i.state == SnapshotState::Sealed)
            .map(|i| i.id))
    }

    fn dir(node: Node, mtime_ms: Option<u64>, stable: bool) -> Attr {
        Attr {
            node,
            kind: Kind::Dir,
            size: 0,
            writable: false,
            stable,
            direct_io: false,
            mtime_ms,
        }
    }

    /// Attributes of `node`, or NotFound if it does not (or no longer) exist.
    pub fn getattr(&self, node: Node) -> Result<Attr> {
        match node {
            Node::Root | Node::SnapshotsDir => Ok(Self::dir(node, None, false)),
            Node::LiveDir => match self.source.live() {
                Some(_) => Ok(Self::dir(node, None, true)),
                None => Err(not_found(node_path(node))),
            },
            Node::LiveImage => match self.source.live() {
                Some(live) => Ok(Attr {
                    node,
                    kind: Kind::File,
                    size: live.size(),
                    writable: true,
                    stable: false,
                    direct_io: true,
                    mtime_ms: None,
                }),
                None => Err(not_found(node_path(node))),
            },
            Node::Latest => match self.latest()? {
                Some(id) => Ok(Attr {
                    node,
                    kind: Kind::Symlink,
                    size: id.to_string().len() as u64,
                    writable: false,
                    stable: false,
                    direct_io: false,
                    mtime_ms: None,
                }),
                None => Err(not_found(node_path(node))),
            },
            Node::SnapshotDir(id) => {
                let info = self.info(id, node)?;
                // The directory itself can vanish (delete), so it is never "stable".
                Ok(Self::dir(node, Some(info.created_ms), false))
            }
            Node::SnapshotImage(id) => {
                let info = self.info(id, node)?;
                let sealed = info.state == SnapshotState::Sealed;
                let open = info.state == SnapshotState::Open;
                let size = self.image_size(id, node)?;
                Ok(Attr {
                    node,
                    kind: Kind::File,
                    size,
                    writable: open,
                    stable: sealed,
                    direct_io: !sealed,
                    mtime_ms: Some(info.created_ms),
                })
            }
            Node::Manifest(id) => {
                let info = self.info(id, node)?;
                let bytes = self.manifest_bytes(&info)?;
                Ok(Attr {
                    node,
                    kind: Kind::File,
                    size: bytes.len() as u64,
                    writable: false,
                    stable: false,
                    direct_io: true,
                    mtime_ms: Some(info.created_ms),
                })
            }
        }
    }

    fn image(&self, id: SnapshotId, node: Node) -> Result<Arc<dyn SnapshotImage>> {
        if let Some(img) = lock(&self.images).get(&id) {
            return Ok(img.clone());
        }
        let img = self.source.open_snapshot(id).map_err(|e| engine(node, e))?;
        lock(&self.images).insert(id, img.clone());
        Ok(img)
    }

    fn image_size(&self, id: SnapshotId, node: Node) -> Result<u64> {
        Ok(self.image(id, node)?.size())
    }

    /// The manifest as served: the stored one (else one made from the catalog), with
    /// the status always taken from the catalog so it is never stale.
    fn manifest_bytes(&self, info: &SnapshotInfo) -> Result<Vec<u8>> {
        let node = Node::Manifest(info.id);
        let mut m = match self.source.manifest(info.id).map_err(|e| engine(node, e))? {
            Some(m) => m,
            None => SnapshotManifest::bare(
                info.id,
                info.created_ms,
                ManifestStatus::from(&info.state),
                self.source.block_size(),
                self.image_size(info.id, node)?,
            ),
        };
        m.status = ManifestStatus::from(&info.state);
        let mut bytes = serde_json::to_vec_pretty(&m).map_err(|e| {
            engine(
                node,
                Error::ManifestCorrupt {
                    path: node_path(node).into(),
                    reason: e.to_string(),
                },
            )
        })?;
        bytes.push(b'\n');
        Ok(bytes)
    }

    /// The child `name` of directory `parent`.
    pub fn lookup(&self, parent: Node, name: &str) -> Result<Attr> {
        let child_path = || format!("{}/{name}", node_path(parent).trim_start_matches('/'));
        let child = match (parent, name) {
            (Node::Root, "live") => Node::LiveDir,
            (Node::Root, "snapshots") => Node::SnapshotsDir,
            (Node::LiveDir, "volume.img") => Node::LiveImage,
            (Node::SnapshotsDir, "latest") => Node::Latest,
            (Node::SnapshotsDir, n) => match n.parse::<SnapshotId>() {
                // Only the canonical spelling, so "007" is not a second name for 7.
                Ok(id) if id.to_string() == n => Node::SnapshotDir(id),
                _ => return Err(not_found(child_path())),
            },
            (Node::SnapshotDir(id), "volume.img") => Node::SnapshotImage(id),
            (Node::SnapshotDir(id), "manifest.json") => Node::Manifest(id),
            (Node::LiveImage | Node::SnapshotImage(_) | Node::Manifest(_) | Node::Latest, _) => {
                return Err(Error::VfsWrongKind {
                    path: node_path(parent),
                    what: "not a directory",
                })
            }
            _ => return Err(not_found(child_path())),
        };
        self.getattr(child)
    }

    /// The entries of a directory (without `.` and `..`).
    pub fn readdir(&self, node: Node) -> Result<Vec<(String, Attr)>> {
        match node {
            Node::Root => {
                let mut v = Vec::new();
                if self.source.live().is_some() {
                    v.push(("live".to_string(), self.getattr(Node::LiveDir)?));
                }
                v.push(("snapshots".to_string(), self.getattr(Node::SnapshotsDir)?));
                Ok(v)
            }
            Node::LiveDir => Ok(vec![("volume.img".into(), self.getattr(Node::LiveImage)?)]),
            Node::SnapshotsDir => {
                let listing = self.listing(false)?;
                let mut v: Vec<(String, Attr)> = listing
                    .values()
                    .map(|i| {
                        (
                            i.id.to_string(),
                            Self::dir(Node::SnapshotDir(i.id), Some(i.created_ms), false),
                        )
                    })
                    .collect();
                if let Ok(attr) = self.getattr(Node::Latest) {
                    v.push(("latest".into(), attr));
                }
                Ok(v)
            }
            Node::SnapshotDir(id) => {
                let info = self.info(id, node)?;
                let mut v = vec![(
                    "volume.img".to_string(),
                    self.getattr(Node::SnapshotImage(id))?,
                )];
                // A manifest that cannot be read must not hide the image; it fails on open.
                let manifest = self.getattr(Node::Manifest(id)).unwrap_or(Attr {
                    node: Node::Manifest(id),
                    kind: Kind::File,
                    size: 0,
                    writable: false,
                    stable: false,
                    direct_io: true,
                    mtime_ms: Some(info.created_ms),
                });
                v.push(("manifest.json".into(), manifest));
                Ok(v)
            }
            _ => Err(Error::VfsWrongKind {
                path: node_path(node),
                what: "not a directory",
            }),
        }
    }

    /// The target of a symlink.
    pub fn readlink(&self, node: Node) -> Result<String> {
        match node {
            Node::Latest => self
                .latest()?
                .map(|id| id.to_string())
                .ok_or_else(|| not_found(node_path(node))),
            _ => Err(Error::VfsWrongKind {
                path: node_path(node),
                what: "not a symbolic link",
            }),
        }
    }

    /// Opens a file. Opening a snapshot for writing that is no longer Open is ReadOnly;
    /// opening an invalid snapshot at all fails.
    pub fn open(&self, node: Node, write: bool) -> Result<Handle> {
        match node {
            Node::LiveImage => {
                self.getattr(node)?;
                Ok(Handle::Live)
            }
            Node::SnapshotImage(id) => {
                let info = self.info(id, node)?;
                match (&info.state, write) {
                    (SnapshotState::Invalid { reason }, _) => {
                        return Err(Error::VfsSnapshotInvalid {
                            path: node_path(node),
                            id,
                            reason: reason.clone(),
                        })
                    }
                    (SnapshotState::Sealed, true) => {
                        return Err(read_only(node, "the snapshot is complete (sealed)"))
                    }
                    _ => {}
                }
                Ok(Handle::Snapshot {
                    id,
                    image: self.image(id, node)?,
                })
            }
            Node::Manifest(id) => {
                if write {
                    return Err(read_only(
                        node,
                        "manifests are written by the node, not through the mount",
                    ));
                }
                let info = self.info(id, node)?;
                Ok(Handle::Manifest {
                    id,
                    bytes: Arc::new(self.manifest_bytes(&info)?),
                })
            }
            _ => Err(Error::VfsWrongKind {
                path: node_path(node),
                what: "not a regular file",
            }),
        }
    }

    /// Reads at `offset` into `buf`; returns the byte count (0 at or past the end).
    pub fn read(&self, h: &Handle, buf: &mut [u8], offset: u64) -> Result<usize> {
        match h {
            Handle::Live => {
                let live = self
                    .source
                    .live()
                    .ok_or_else(|| not_found(node_path(Node::LiveImage)))?;
                read_all(buf, offset, live.size(), |b, o| live.read_at(b, o))
                    .map_err(|e| engine(Node::LiveImage, e))
            }
            Handle::Snapshot { id, image } => {
                read_all(buf, offset, image.size(), |b, o| image.read_at(b, o))
                    .map_err(|e| self.explain(*id, image.as_ref(), e, false))
            }
            Handle::Manifest { bytes, .. } => {
                let start = (offset.min(bytes.len() as u64)) as usize;
                let n = buf.len().min(bytes.len() - start);
                buf[..n].copy_from_slice(&bytes[start..start + n]);
                Ok(n)
            }
        }
    }

    /// Writes `data` at `offset`. Writes past the end of an image are refused: a volume
    /// has a fixed size.
    pub fn write(&self, h: &Handle, data: &[u8], offset: u64) -> Result<usize> {
        let (node, size) = match h {
            Handle::Live => (
                Node::LiveImage,
                self.source.live().map(|l| l.size()).unwrap_or(0),
            ),
            Handle::Snapshot { id, image } => (Node::SnapshotImage(*id), image.size()),
            Handle::Manifest { id, .. } => {
                return Err(read_only(Node::Manifest(*id), "manifests are read-only"))
            }
        };
        let end = offset.checked_add(data.len() as u64);
        if end.is_none_or(|end| end > size) {
            return Err(Error::VfsWrongKind {
                path: node_path(node),
                what: "write past the end of the image (fixed size)",
            });
        }
        match h {
            Handle::Live => {
                let live = self
                    .source
                    .live()
                    .ok_or_else(|| not_found(node_path(node)))?;
                live.write_at(data, offset).map_err(|e| engine(node, e))?;
            }
            Handle::Snapshot { id, image } => {
                image
                    .write_at(data, offset)
                    .map_err(|e| self.explain(*id, image.as_ref(), e, true))?;
            }
            Handle::Manifest { .. } => {}
        }
        Ok(data.len())
    }

    /// fsync: the live volume is fdatasync'ed; snapshot writes are durable when they return.
    pub fn fsync(&self, h: &Handle) -> Result<()> {
        match h {
            Handle::Live => match self.source.live() {
                Some(l) => l.flush().map_err(|e| engine(Node::LiveImage, e)),
                None => Err(not_found(node_path(Node::LiveImage))),
            },
            _ => Ok(()),
        }
    }

    /// Turns an engine failure on a snapshot into what it means for the reader: the
    /// snapshot was sealed (ReadOnly), became invalid, or was deleted (NotFound).
    fn explain(&self, id: SnapshotId, image: &dyn SnapshotImage, e: Error, writing: bool) -> Error {
        let node = Node::SnapshotImage(id);
        match image.state() {
            Ok(SnapshotState::Invalid { reason }) => Error::VfsSnapshotInvalid {
                path: node_path(node),
                id,
                reason,
            },
            Ok(SnapshotState::Sealed) if writing => read_only(node, "the snapshot was sealed"),
            Ok(_) => engine(node, e),
            // The state is unreadable too: most likely deleted. Still an I/O error for
            // the reader, never a silent short read.
            Err(_) => engine(node, e),
        }
    }
}

fn read_only(node: Node, why: &str) -> Error {
    Error::VfsReadOnly {
        path: node_path(node),
        why: why.to_string(),
    }
}

/// Fills `buf` from `offset` up to the image end with as many engine reads as needed:
/// a short read from the kernel's point of view would look like end of file.
fn read_all(
    buf: &mut [u8],
    offset: u64,
    size: u64,
    mut read: impl FnMut(&mut [u8], u64) -> Result<usize>,
) -> Result<usize> {
    if offset >= size {
        return Ok(0);
    }
    let want = buf.len().min((size - offset) as usize);
    let mut done = 0;
    while done < want {
        let n = read(&mut buf[done..want], offset + done as u64)?;
        if n == 0 {
            break;
        }
        done += n;
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    //! The tree over a source without a live volume (what a replica directory will be),
    //! through the [`VfsSource`] seam.
    use super::*;

    struct Replica {
        snaps: Mutex<Vec<SnapshotInfo>>,
    }

    struct Image(Vec<u8>, SnapshotState);

    impl SnapshotImage for Image {
        fn size(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<usize> {
            let start = (offset as usize).min(self.0.len());
            let n = buf.len().min(self.0.len() - start);
            buf[..n].copy_from_slice(&self.0[start..start + n]);
            Ok(n)
        }
        fn write_at(&self, _buf: &[u8], _offset: u64) -> Result<()> {
            Err(Error::VfsWrongKind {
                path: "replica".into(),
                what: "replicas are not written through the tree",
            })
        }
        fn state(&self) -> Result<SnapshotState> {
            Ok(self.1.clone())
        }
    }

    impl VfsSource for Replica {
        fn describe(&self) -> String {
            "replica".into()
        }
        fn block_size(&self) -> u32 {
            4096
        }
        fn live(&self) -> Option<&dyn LiveImage> {
            None
        }
        fn snapshots(&self) -> Result<Vec<SnapshotInfo>> {
            Ok(lock(&self.snaps).clone())
        }
        fn open_snapshot(&self, id: SnapshotId) -> Result<Arc<dyn SnapshotImage>> {
            let state = lock(&self.snaps)
                .iter()
                .find(|i| i.id == id)
                .map(|i| i.state.clone())
                .ok_or(Error::VfsNotFound {
                    path: id.to_string(),
                })?;
            Ok(Arc::new(Image(vec![id as u8; 10_000], state)))
        }
        fn manifest(&self, _id: SnapshotId) -> Result<Option<SnapshotManifest>> {
            Ok(None)
        }
    }

    fn info(id: SnapshotId, state: SnapshotState) -> SnapshotInfo {
        SnapshotInfo {
            id,
            created_ms: 1_000 * id,
            state,
            diff_blocks: 0,
            diff_bytes: 0,
            diff_limit: None,
        }
    }

    #[test]
    fn a_replica_tree_has_no_live_volume_and_latest_is_the_newest_sealed_snapshot() {
        let source = Arc::new(Replica {
            snaps: Mutex::new(vec![
                info(3, SnapshotState::Sealed),
                info(5, SnapshotState::Sealed),
                info(6, SnapshotState::Open),
            ]),
        });
        let vfs = Vfs::new(source.clone());
        let names: Vec<String> = vfs
            .readdir(Node::Root)
            .expect("root")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["snapshots"]);
        assert_eq!(
            classify(&vfs.lookup(Node::Root, "live").expect_err("no live")),
            ErrorClass::NotFound
        );
        assert_eq!(vfs.readlink(Node::Latest).expect("latest"), "5");
        assert_eq!(
            classify(
                &vfs.lookup(Node::SnapshotsDir, "005")
                    .expect_err("not canonical")
            ),
            ErrorClass::NotFound
        );

        let img = vfs
            .lookup(Node::SnapshotDir(5), "volume.img")
            .expect("image");
        assert!(img.stable && !img.writable && img.size == 10_000);
        let open = vfs
            .lookup(Node::SnapshotDir(6), "volume.img")
            .expect("open image");
        assert!(!open.stable && open.writable && open.direct_io);
        let h = vfs.open(Node::SnapshotImage(5), false).expect("open");
        let mut buf = vec![0u8; 100];
        assert_eq!(vfs.read(&h, &mut buf, 9_950).expect("read at the end"), 50);
        assert_eq!(buf[..50], [5u8; 50]);
        assert_eq!(
            classify(&vfs.open(Node::SnapshotImage(5), true).expect_err("sealed")),
            ErrorClass::ReadOnly
        );

        let manifest = vfs.open(Node::Manifest(5), false).expect("manifest");
        let mut text = vec![0u8; 4096];
        let n = vfs.read(&manifest, &mut text, 0).expect("read manifest");
        let m: SnapshotManifest =
            serde_json::from_slice(&text[..n]).expect("generated manifest parses");
        assert_eq!(
            (m.id, m.size, m.status),
            (5, 10_000, ManifestStatus::Sealed)
        );

        // Invalid and deleted snapshots, seen without waiting for the listing to expire
        // on a lookup miss; an invalid one cannot be opened at all.
        lock(&source.snaps)[1].state = SnapshotState::Invalid {
            reason: "diff area full".into(),
        };
        lock(&source.snaps).push(info(7, SnapshotState::Sealed));
        assert!(
            vfs.lookup(Node::SnapshotsDir, "7").is_ok(),
            "a new snapshot is found on a lookup miss"
        );
        assert_eq!(
            classify(
                &vfs.open(Node::SnapshotImage(5), false)
                    .expect_err("invalid")
            ),
            ErrorClass::Invalid
        );
        lock(&source.snaps).retain(|i| i.id != 3);
        std::thread::sleep(LISTING_TTL + Duration::from_millis(20));
        assert_eq!(
            classify(&vfs.lookup(Node::SnapshotsDir, "3").expect_err("deleted")),
            ErrorClass::NotFound
        );
        assert_eq!(vfs.readlink(Node::Latest).expect("latest"), "7");
    }
}
