//! # freezeframe-fusefs
//!
//! The node's FUSE mount: a thin adapter from the kernel's FUSE requests onto
//! [`freezeframe_core::vfs::Vfs`], which decides what the tree holds. This crate only
//! numbers inodes, maps errors to errnos, picks caching per file and runs the session.
//!
//! ```text
//! <mountpoint>/live/volume.img               read-write, direct I/O through the engine
//! <mountpoint>/snapshots/<id>/volume.img     virtual snapshot (EROFS once sealed)
//! <mountpoint>/snapshots/<id>/manifest.json
//! <mountpoint>/snapshots/latest -> <id>
//! ```
//!
//! # Layout
//! - [`fs`]: the `fuser::Filesystem` implementation (inodes, errnos, caching).
//! - [`stale`]: finding and clearing a dead mount a killed daemon left behind.
//! - this file: [`mount`], [`MountConfig`], [`MountHandle`] and the crate's [`Error`].

pub mod fs;
pub mod stale;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use freezeframe_core::vfs::Vfs;

pub use stale::{clear_stale_mount, is_mounted};

/// Errors of mounting and unmounting; each names the mount point.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The FUSE mount itself failed (no /dev/fuse, no permission, bad mount point).
    #[error("cannot mount freezeframe at {path}: {source}")]
    Mount {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Something is already mounted there and it is alive: refuse to stack a second one.
    #[error("{path} is already a mount point ({fstype}); unmount it first")]
    AlreadyMounted { path: PathBuf, fstype: String },
    /// The mount point exists but cannot be used as one.
    #[error("mount point {path}: {source}")]
    MountPoint {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Unmounting failed (busy, or the mount vanished underneath).
    #[error("cannot unmount {path}: {source}")]
    Unmount {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountConfig {
    /// Let other users than the mounting one use the mount (`allow_other`).
    pub allow_other: bool,
    /// Request-handling threads. More than one so that a slow read (or a live write
    /// held during a freeze) does not stall every other request on the mount.
    pub threads: usize,
}

impl Default for MountConfig {
    fn default() -> Self {
        MountConfig {
            allow_other: false,
            threads: 4,
        }
    }
}

/// A live mount. Unmounts on [`MountHandle::unmount`] or on drop.
#[derive(Debug)]
pub struct MountHandle {
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
    vfs: Arc<Vfs>,
}

/// Mounts `vfs` at `mountpoint` (created if missing). A dead mount left there by a
/// killed process is cleared first; a live one is an error.
pub fn mount(vfs: Arc<Vfs>, mountpoint: &Path, config: MountConfig) -> Result<MountHandle> {
    stale::clear_stale_mount(mountpoint)?;
    if let Err(e) = std::fs::create_dir_all(mountpoint) {
        return Err(Error::MountPoint {
            path: mountpoint.to_path_buf(),
            source: e,
        });
    }
    let mountpoint = std::fs::canonicalize(mountpoint).map_err(|e| Error::MountPoint {
        path: mountpoint.to_path_buf(),
        source: e,
    })?;
    if let Some(fstype) = stale::mounted_fstype(&mountpoint) {
        return Err(Error::AlreadyMounted {
            path: mountpoint,
            fstype,
        });
    }
    let options = vec![
        fuser::MountOption::FSName("freezeframe".into()),
        // As a kernel option, not `MountOption::Subtype`: fuser's direct mount (as root)
        // drops `Subtype`, while the kernel and fusermount3 both honour `subtype=`, which
        // makes `mount` show the type as fuse.freezeframe.
        fuser::MountOption::CUSTOM("subtype=freezeframe".into()),
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoAtime,
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::RW,
    ];
    let mut fuse_config = fuser::Config::default();
    fuse_config.mount_options = options;
    fuse_config.acl = if config.allow_other {
        fuser::SessionACL::All
    } else {
        fuser::SessionACL::Owner
    };
    fuse_config.n_threads = Some(config.threads.max(1));
    // One /dev/fuse fd per thread: the kernel then hands requests to idle threads
    // without them contending on one queue.
    fuse_config.clone_fd = true;
    let filesystem = fs::FreezeFs::new(vfs.clone());
    let session = fuser::Session::new(filesystem, &mountpoint, &fuse_config)
        .and_then(fuser::Session::spawn)
        .map_err(|e| Error::Mount {
            path: mountpoint.clone(),
            source: e,
        })?;
    tune_readahead(&mountpoint);
    tracing::info!(mountpoint = %mountpoint.display(), source = %vfs.source().describe(), "mounted freezeframe");
    Ok(MountHandle {
        session: Some(session),
        mountpoint,
        vfs,
    })
}

/// Raises the mount's readahead window to [`fs::MAX_IO`]: the kernel starts a FUSE
/// mount at 128 KiB, which caps sequential reads of a snapshot at 128 KiB requests.
/// Best effort (needs root and sysfs); without it the mount is only slower.
fn tune_readahead(mountpoint: &Path) {
    use std::os::unix::fs::MetadataExt;
    let Ok(meta) = std::fs::metadata(mountpoint) else {
        return;
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    let knob = format!("/sys/class/bdi/{major}:{minor}/read_ahead_kb");
    match std::fs::write(&knob, format!("{}\n", fs::MAX_IO / 1024)) {
        Ok(()) => tracing::debug!(%knob, kib = fs::MAX_IO / 1024, "readahead raised"),
        Err(e) => tracing::debug!(%knob, error = %e, "readahead left at the kernel default"),
    }
}

impl MountHandle {
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    pub fn vfs(&self) -> &Arc<Vfs> {
        &self.vfs
    }

    /// Unmounts and waits for the request threads to finish. If the mount is busy
    /// (a process has a file open), it is detached lazily instead: it disappears from
    /// the namespace now and the session ends when the last user lets go.
    pub fn unmount(mut self) -> Result<()> {
        self.do_unmount()
    }

    fn do_unmount(&mut self) -> Result<()> {
        let Some(session) = self.session.take() else {
            return Ok(());
        };
        match session.umount_and_join() {
            Ok(()) => {
                tracing::info!(mountpoint = %self.mountpoint.display(), "unmounted freezeframe");
                Ok(())
            }
            Err(e) => {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed; detaching lazily");
                stale::lazy_unmount(&self.mountpoint).map_err(|source| Error::Unmount {
                    path: self.mountpoint.clone(),
                    source,
                })
            }
        }
    }
}

impl Drop for MountHandle {
    fn drop(&mut self) {
        if let Err(e) = self.do_unmount() {
            tracing::warn!(error = %e, "unmount on drop failed");
        }
    }
}
