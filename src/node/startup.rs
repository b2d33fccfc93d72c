//! What `node run` checks before it touches anything, and how it lets go at the end.
//!
//! **Before** (in this order, nothing written until all pass):
//! 1. the whole config ([`NodeConfig::check_for_run`]): paths exist, the certificate
//!    is this node's, `writer_group` exists;
//! 2. no live daemon for this node: the pid file does not name a running
//!    `freezeframe` process, and the control socket does not answer. A second
//!    `node run` is refused ("node n1 is already running as pid N") without writing
//!    the pid file or touching the mount, so the running node keeps its mount and
//!    `cluster down` still finds it;
//! 3. only then the missing last level of `run_dir` and `mount` is created, and the
//!    umask set to 077 so every file the daemon creates is private from the start.
//!
//! **After** ([`unmount_bounded`]): the FUSE unmount waits for the session to end,
//! which never happens if the mount was copied into another mount namespace (a
//! container started meanwhile) or a process keeps a file open. After a grace period
//! the mount is detached lazily (`umount2(MNT_DETACH)`, or `fusermount3 -uz`) and the
//! daemon exits anyway.

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use freezeframe_fusefs::MountHandle;

use crate::config::{NodeConfig, RunChecks};

/// How long a clean unmount may take at shutdown before the mount is detached.
pub const UNMOUNT_GRACE: Duration = Duration::from_secs(5);

/// Runs every check, then creates the run directory and mount point if needed.
pub fn preflight(cfg: &NodeConfig) -> Result<RunChecks> {
    let checks = cfg.check_for_run()?;
    if let Some(pid) = running_daemon(cfg) {
        bail!(
            "node {} is already running as pid {pid} (pid file {}); stop it first \
             (`kill {pid}` or `freezeframe cluster down`)",
            cfg.name(),
            cfg.pid_file().display()
        );
    }
    let control = cfg.control_socket();
    if std::os::unix::net::UnixStream::connect(&control).is_ok() {
        bail!(
            "node {} is already running: its control socket {} answers",
            cfg.name(),
            control.display()
        );
    }
    for (key, dir) in [
        ("run_dir", &cfg.raw.node.run_dir),
        ("mount", &cfg.raw.node.mount),
    ] {
        // Only a missing folder is created: a dead FUSE mount left by a killed daemon
        // fails stat with ENOTCONN (and mkdir with EEXIST); the mount code clears it.
        if std::fs::symlink_metadata(dir).is_err_and(|e| e.kind() == std::io::ErrorKind::NotFound) {
            std::fs::create_dir(dir).with_context(|| {
                format!(
                    "node {}: creating [node] {key} {}",
                    cfg.name(),
                    dir.display()
                )
            })?;
        }
    }
    // Everything the daemon creates from here on (pid file, sockets, state files) is
    // private from its first byte; modes that must be wider are set explicitly.
    // SAFETY: umask has no preconditions and cannot fail.
    unsafe { libc::umask(0o077) };
    Ok(checks)
}

/// The pid in the node's pid file if that process is alive and is a freezeframe
/// daemon (a stale pid file naming a reused pid is ignored).
fn running_daemon(cfg: &NodeConfig) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(cfg.pid_file())
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid <= 0 || pid as u32 == std::process::id() {
        return None;
    }
    is_freezeframe(pid).then_some(pid)
}

/// Whether process `pid` runs the freezeframe binary (also after it was rebuilt:
/// the kernel then shows the old file as "freezeframe (deleted)").
pub fn is_freezeframe(pid: i32) -> bool {
    let exe = std::fs::read_link(format!("/proc/{pid}/exe")).ok();
    let by_exe = exe
        .as_ref()
        .and_then(|p| p.file_name())
        .is_some_and(|n| n.to_string_lossy().starts_with("freezeframe"));
    let by_comm = std::fs::read_to_string(format!("/proc/{pid}/comm"))
        .is_ok_and(|c| c.trim() == "freezeframe");
    by_exe || by_comm
}

/// Binds the writer socket's permissions: 0600, or 0660 owned by `group`.
pub fn secure_writer_socket(path: &Path, group: Option<u32>) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Some(gid) = group else {
        return Ok(());
    };
    std::os::unix::fs::chown(path, None, Some(gid))
        .with_context(|| format!("giving {} to group {gid}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("chmod 0660 {}", path.display()))?;
    Ok(())
}

/// Unmounts, waiting at most `grace` for the FUSE session to end; then detaches the
/// mount lazily and returns, so SIGTERM always ends the daemon.
pub fn unmount_bounded(mount: MountHandle, mountpoint: &Path, grace: Duration) {
    let (tx, rx) = std::sync::mpsc::channel();
    // A plain thread, not the runtime's blocking pool: if the unmount never finishes,
    // this thread is abandoned when the process exits instead of holding the runtime.
    let spawned = std::thread::Builder::new()
        .name("ff-unmount".into())
        .spawn(move || {
            let r = mount.unmount();
            let _ = tx.send(r);
        });
    if let Err(e) = spawned {
        tracing::error!("cannot start the unmount thread: {e}");
        return;
    }
    match rx.recv_timeout(grace) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::warn!("unmount: {e}"),
        Err(_) => {
            tracing::warn!(
                mountpoint = %mountpoint.display(),
                "the FUSE session did not end within {} s (is the mount held in another \
                 mount namespace, or a file open?); detaching it lazily and exiting",
                grace.as_secs()
            );
            if let Err(e) = freezeframe_fusefs::stale::lazy_unmount(mountpoint) {
                tracing::warn!(mountpoint = %mountpoint.display(), "lazy unmount: {e}");
            }
        }
    }
}
