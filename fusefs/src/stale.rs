//! Dead mounts. A daemon killed with its mount up leaves the kernel mount behind with
//! nobody serving it: every access fails with "Transport endpoint is not connected"
//! (ENOTCONN) and a new mount on top would fail or stack. [`clear_stale_mount`] finds
//! that case and detaches the dead mount so the next start mounts cleanly.

use std::io;
use std::path::Path;
use std::process::Command;

use crate::{Error, Result};

/// Clears a dead FUSE mount at `mountpoint`; returns whether there was one. A live mount
/// or a plain directory is left alone.
///
/// The probe is statfs(2), which FUSE always forwards to the server: a plain stat may be
/// answered from cached attributes for a while after the server died.
pub fn clear_stale_mount(mountpoint: &Path) -> Result<bool> {
    let dead = match mounted_fstype(mountpoint) {
        Some(fstype) if fstype == "fuse" || fstype.starts_with("fuse.") => {
            matches!(
                statfs_errno(mountpoint),
                Some(libc::ENOTCONN) | Some(libc::ECONNABORTED)
            )
        }
        // Not a FUSE mount point, but a stat through a dead mount above still says so.
        _ => std::fs::metadata(mountpoint).is_err_and(|e| e.raw_os_error() == Some(libc::ENOTCONN)),
    };
    if !dead {
        return Ok(false);
    }
    tracing::warn!(mountpoint = %mountpoint.display(), "clearing a dead FUSE mount left by a killed process");
    lazy_unmount(mountpoint).map_err(|source| Error::Unmount {
        path: mountpoint.to_path_buf(),
        source,
    })?;
    Ok(true)
}

/// The errno of statfs(2) on `path`, `None` if it succeeds.
fn statfs_errno(path: &Path) -> Option<i32> {
    let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: c_path is NUL-terminated and outlives the call; buf is a plain C struct
    // the call fills in.
    let mut buf: libc::statfs = unsafe { std::mem::zeroed() };
    let rc = unsafe { libc::statfs(c_path.as_ptr(), &mut buf) };
    (rc != 0).then(|| {
        io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO)
    })
}

/// Detaches the mount at `mountpoint` now (MNT_DETACH); the kernel finishes it once no
/// one uses it. Root does it directly; others go through `fusermount3 -uz`.
pub fn lazy_unmount(mountpoint: &Path) -> io::Result<()> {
    let c_path =
        std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes()).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "mount point path contains a NUL byte",
            )
        })?;
    // SAFETY: c_path is a valid NUL-terminated string that outlives the call.
    let rc = unsafe { libc::umount2(c_path.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        return Ok(());
    }
    let direct = io::Error::last_os_error();
    let out = Command::new("fusermount3")
        .arg("-uz")
        .arg(mountpoint)
        .output();
    match out {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(io::Error::other(format!(
            "umount2: {direct}; fusermount3 -uz: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        ))),
        Err(e) => Err(io::Error::other(format!(
            "umount2: {direct}; fusermount3 -uz could not run: {e}"
        ))),
    }
}

/// Whether `mountpoint` is a mount point of this mount namespace.
pub fn is_mounted(mountpoint: &Path) -> bool {
    mounted_fstype(mountpoint).is_some()
}

/// The filesystem type mounted at `mountpoint` (e.g. `fuse.freezeframe`), from
/// /proc/self/mountinfo; `None` if nothing is mounted there.
pub(crate) fn mounted_fstype(mountpoint: &Path) -> Option<String> {
    let want = std::fs::canonicalize(mountpoint).unwrap_or_else(|_| mountpoint.to_path_buf());
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().rev().find_map(|line| {
        // "<id> <parent> <maj:min> <root> <mount point> <opts> ... - <fstype> <source> <super opts>"
        let mut fields = line.split(' ');
        let point = fields.nth(4)?;
        let fstype = line.split(" - ").nth(1)?.split(' ').next()?;
        (Path::new(&unescape_mountinfo(point)) == want).then(|| fstype.to_string())
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo` octal.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_octal_escapes_are_decoded() {
        assert_eq!(
            unescape_mountinfo(r"/mnt/with\040space\134x"),
            "/mnt/with space\\x"
        );
        assert_eq!(unescape_mountinfo(r"/plain"), "/plain");
        assert_eq!(unescape_mountinfo(r"/trailing\04"), r"/trailing\04");
    }

    #[test]
    fn a_plain_directory_is_not_a_stale_mount() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(!clear_stale_mount(dir.path()).expect("plain dir"));
        assert!(!is_mounted(dir.path()));
    }
}
