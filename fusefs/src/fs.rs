//! The `fuser::Filesystem` over [`Vfs`]: inode numbering, errno mapping and per-file
//! caching policy. Nothing here decides what the tree contains.
//!
//! Inodes are computed, not allocated: fixed numbers for the fixed directories and
//! `FIRST_SNAPSHOT_INO + 3 * id + {0 dir, 1 volume.img, 2 manifest.json}` for a snapshot.
//! Snapshot ids are never reused, so an inode always means the same thing and the kernel
//! may keep a sealed snapshot's pages across opens (`FOPEN_KEEP_CACHE`).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use freezeframe_core::vfs::{self, Attr, ErrorClass, Handle, Kind, Node, Vfs};
use freezeframe_core::volume::SnapshotId;
use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

/// Largest read and write request we ask the kernel for.
pub const MAX_IO: u32 = 1024 * 1024;
/// Attribute/entry lifetime for things that can no longer change (sealed snapshot files).
const STABLE_TTL: Duration = Duration::from_secs(3600);
/// Lifetime for everything else: short enough that a deleted snapshot vanishes and a
/// sealed one turns read-only about as fast as the listing refreshes.
const SHORT_TTL: Duration = vfs::LISTING_TTL;

const INO_ROOT: u64 = 1;
const INO_LIVE_DIR: u64 = 2;
const INO_LIVE_IMAGE: u64 = 3;
const INO_SNAPSHOTS: u64 = 4;
const INO_LATEST: u64 = 5;
const FIRST_SNAPSHOT_INO: u64 = 16;

/// The inode of `node`; `None` for a snapshot id too large to number (never in practice).
pub fn ino_of(node: Node) -> Option<u64> {
    let snap = |id: SnapshotId, k: u64| id.checked_mul(3)?.checked_add(FIRST_SNAPSHOT_INO + k);
    match node {
        Node::Root => Some(INO_ROOT),
        Node::LiveDir => Some(INO_LIVE_DIR),
        Node::LiveImage => Some(INO_LIVE_IMAGE),
        Node::SnapshotsDir => Some(INO_SNAPSHOTS),
        Node::Latest => Some(INO_LATEST),
        Node::SnapshotDir(id) => snap(id, 0),
        Node::SnapshotImage(id) => snap(id, 1),
        Node::Manifest(id) => snap(id, 2),
    }
}

/// The node of inode `ino`, if it is one of ours.
pub fn node_of(ino: u64) -> Option<Node> {
    Some(match ino {
        INO_ROOT => Node::Root,
        INO_LIVE_DIR => Node::LiveDir,
        INO_LIVE_IMAGE => Node::LiveImage,
        INO_SNAPSHOTS => Node::SnapshotsDir,
        INO_LATEST => Node::Latest,
        i if i >= FIRST_SNAPSHOT_INO => {
            let (id, k) = ((i - FIRST_SNAPSHOT_INO) / 3, (i - FIRST_SNAPSHOT_INO) % 3);
            match k {
                0 => Node::SnapshotDir(id),
                1 => Node::SnapshotImage(id),
                _ => Node::Manifest(id),
            }
        }
        _ => return None,
    })
}

/// What an errno is for a given operation: the same vfs error means different things
/// to a lookup and to a write.
#[derive(Clone, Copy)]
enum Op {
    Lookup,
    Open,
    Read,
    Write,
    Other,
}

fn errno_for(e: &freezeframe_core::Error, op: Op, ctx: &str) -> Errno {
    match (vfs::classify(e), op) {
        // On an open file, "not found" means the snapshot was deleted underneath it.
        (ErrorClass::NotFound, Op::Read | Op::Write) => {
            tracing::warn!(%ctx, error = %e, "snapshot deleted under an open file");
            Errno::EIO
        }
        (ErrorClass::NotFound, _) => Errno::ENOENT,
        (ErrorClass::ReadOnly, _) => Errno::EROFS,
        (ErrorClass::Invalid, _) => {
            tracing::warn!(%ctx, error = %e, "refusing an invalid snapshot");
            Errno::EIO
        }
        (ErrorClass::WrongKind, Op::Lookup) => Errno::ENOTDIR,
        (ErrorClass::WrongKind, Op::Open | Op::Read) => Errno::EISDIR,
        // A write past the end of a fixed-size image: what a block device says.
        (ErrorClass::WrongKind, Op::Write) => Errno::ENOSPC,
        (ErrorClass::WrongKind, Op::Other) => Errno::EINVAL,
        (ErrorClass::NoSpace, _) => Errno::ENOSPC,
        (ErrorClass::Io, _) => {
            tracing::warn!(%ctx, error = %e, "I/O error on the freezeframe mount");
            Errno::EIO
        }
    }
}

/// The filesystem the session runs.
pub struct FreezeFs {
    vfs: Arc<Vfs>,
    /// Open files by handle number.
    handles: Mutex<HashMap<u64, Arc<Handle>>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    /// Time shown for entries without one of their own (the live volume, the directories).
    started: SystemTime,
}

impl FreezeFs {
    pub fn new(vfs: Arc<Vfs>) -> FreezeFs {
        // SAFETY: getuid/getgid cannot fail and touch no memory.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        FreezeFs {
            vfs,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid,
            gid,
            started: SystemTime::now(),
        }
    }

    fn handle(&self, fh: FileHandle) -> Option<Arc<Handle>> {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&fh.0)
            .cloned()
    }

    fn file_attr(&self, a: &Attr) -> Option<FileAttr> {
        let ino = ino_of(a.node)?;
        let mtime = a
            .mtime_ms
            .map(|ms| UNIX_EPOCH + Duration::from_millis(ms))
            .unwrap_or(self.started);
        let (kind, perm, nlink) = match a.kind {
            Kind::Dir => (FileType::Directory, 0o555, 2),
            Kind::File => (
                FileType::RegularFile,
                if a.writable { 0o644 } else { 0o444 },
                1,
            ),
            Kind::Symlink => (FileType::Symlink, 0o777, 1),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size: a.size,
            blocks: a.size.div_ceil(512),
            atime: mtime,
            mtime,
            ctime: mtime,
            crtime: mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            // A large preferred I/O size makes cp, tar and friends use big requests.
            blksize: MAX_IO,
            flags: 0,
        })
    }

    fn ttl(a: &Attr) -> Duration {
        if a.stable {
            STABLE_TTL
        } else {
            SHORT_TTL
        }
    }

    fn node(ino: INodeNo) -> Result<Node, Errno> {
        node_of(ino.0).ok_or(Errno::ENOENT)
    }
}

fn file_type(k: Kind) -> FileType {
    match k {
        Kind::Dir => FileType::Directory,
        Kind::File => FileType::RegularFile,
        Kind::Symlink => FileType::Symlink,
    }
}

thread_local! {
    /// Each request thread reuses one read buffer instead of allocating per request.
    static READ_BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Filesystem for FreezeFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(nearest) = config.set_max_write(MAX_IO) {
            let _ = config.set_max_write(nearest);
        }
        if let Err(nearest) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(nearest);
        }
        // Enough asynchronous (readahead, direct I/O) requests in flight to keep every
        // request thread busy on a sequential read.
        let _ = config.set_max_background(64);
        let wanted = InitFlags::FUSE_ASYNC_DIO
            | InitFlags::FUSE_PARALLEL_DIROPS
            // mmap of the direct-I/O live image (some tools map the file they open).
            | InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP;
        let supported = wanted & config.capabilities();
        let _ = config.add_capabilities(supported);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let parent = match Self::node(parent) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        match self.vfs.lookup(parent, name) {
            Ok(a) => match self.file_attr(&a) {
                Some(fa) => reply.entry(&Self::ttl(&a), &fa, Generation(0)),
                None => reply.error(Errno::ENOENT),
            },
            Err(e) => reply.error(errno_for(
                &e,
                Op::Lookup,
                &format!("lookup {}/{name}", vfs::node_path(parent)),
            )),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let node = match Self::node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match self.vfs.getattr(node) {
            Ok(a) => match self.file_attr(&a) {
                Some(fa) => reply.attr(&Self::ttl(&a), &fa),
                None => reply.error(Errno::ENOENT),
            },
            Err(e) => reply.error(errno_for(&e, Op::Other, &vfs::node_path(node))),
        }
    }

    /// Only what a disk image allows: timestamps are accepted and ignored (tar and
    /// `cp -p` set them), a truncate to at most the image size is a no-op as on a block
    /// device (so `cp img live/volume.img` works), growing is ENOSPC, anything on a
    /// read-only node is EROFS.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let node = match Self::node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let a = match self.vfs.getattr(node) {
            Ok(a) => a,
            Err(e) => return reply.error(errno_for(&e, Op::Other, &vfs::node_path(node))),
        };
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        if let Some(size) = size {
            if !a.writable {
                return reply.error(Errno::EROFS);
            }
            if size > a.size {
                return reply.error(Errno::ENOSPC);
            }
        }
        match self.file_attr(&a) {
            Some(fa) => reply.attr(&Self::ttl(&a), &fa),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        let node = match Self::node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        match self.vfs.readlink(node) {
            Ok(target) => reply.data(target.as_bytes()),
            Err(e) => reply.error(errno_for(&e, Op::Other, &vfs::node_path(node))),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let node = match Self::node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let write = flags.acc_mode() != OpenAccMode::O_RDONLY;
        let attr = match self.vfs.getattr(node) {
            Ok(a) => a,
            Err(e) => return reply.error(errno_for(&e, Op::Open, &vfs::node_path(node))),
        };
        match self.vfs.open(node, write) {
            Ok(h) => {
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.handles
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(fh, Arc::new(h));
                let fopen = if attr.direct_io {
                    // Writes to the live volume may run in parallel: the engine serialises
                    // what must be serialised (copy-on-write claims), not the kernel.
                    FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES
                } else if attr.stable {
                    FopenFlags::FOPEN_KEEP_CACHE
                } else {
                    FopenFlags::empty()
                };
                reply.opened(FileHandle(fh), fopen);
            }
            Err(e) => reply.error(errno_for(&e, Op::Open, &vfs::node_path(node))),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        READ_BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            let want = (size as usize).min(MAX_IO as usize * 16);
            if buf.len() < want {
                buf.resize(want, 0);
            }
            match self.vfs.read(&h, &mut buf[..want], offset) {
                Ok(n) => reply.data(&buf[..n]),
                Err(e) => {
                    let ctx = node_of(ino.0).map(vfs::node_path).unwrap_or_default();
                    reply.error(errno_for(
                        &e,
                        Op::Read,
                        &format!("read {ctx} at byte {offset}"),
                    ))
                }
            }
        });
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match self.vfs.write(&h, data, offset) {
            Ok(n) => reply.written(n as u32),
            Err(e) => {
                let ctx = node_of(ino.0).map(vfs::node_path).unwrap_or_default();
                reply.error(errno_for(
                    &e,
                    Op::Write,
                    &format!("write {ctx} at byte {offset}"),
                ))
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Writes reach the engine before they are acknowledged: nothing is buffered here.
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let Some(h) = self.handle(fh) else {
            return reply.error(Errno::EBADF);
        };
        match self.vfs.fsync(&h) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno_for(
                &e,
                Op::Other,
                &node_of(ino.0).map(vfs::node_path).unwrap_or_default(),
            )),
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.handles
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let node = match Self::node(ino) {
            Ok(n) => n,
            Err(e) => return reply.error(e),
        };
        let entries = match self.vfs.readdir(node) {
            Ok(v) => v,
            Err(e) => return reply.error(errno_for(&e, Op::Other, &vfs::node_path(node))),
        };
        let parent = match node {
            Node::SnapshotDir(_) => INO_SNAPSHOTS,
            _ => INO_ROOT,
        };
        let dots = [
            (ino.0, FileType::Directory, ".".to_string()),
            (parent, FileType::Directory, "..".to_string()),
        ];
        let all = dots.into_iter().chain(
            entries
                .into_iter()
                .filter_map(|(name, a)| Some((ino_of(a.node)?, file_type(a.kind), name))),
        );
        for (i, (child, kind, name)) in all.enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let size = self.vfs.source().live().map(|l| l.size()).unwrap_or(0);
        let bsize = 4096u32;
        // Nothing can be created here: no free blocks, no free inodes.
        reply.statfs(size / bsize as u64, 0, 0, 0, 0, bsize, 255, bsize);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inode_numbers_round_trip_for_every_kind_of_node() {
        for node in [
            Node::Root,
            Node::LiveDir,
            Node::LiveImage,
            Node::SnapshotsDir,
            Node::Latest,
            Node::SnapshotDir(0),
            Node::SnapshotImage(1),
            Node::Manifest(7),
            Node::SnapshotImage(1 << 40),
        ] {
            let ino = ino_of(node).expect("numbered");
            assert_eq!(node_of(ino), Some(node), "inode {ino}");
        }
        assert_eq!(ino_of(Node::SnapshotDir(u64::MAX)), None);
        assert_eq!(node_of(0), None);
        assert_eq!(node_of(9), None);
    }
}
