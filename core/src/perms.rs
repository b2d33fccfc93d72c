//! Private state, whatever the umask (DESIGN.md §8, promise 6: "nobody else reads or
//! blocks it").
//!
//! Everything freezeframe keeps about a volume — the state directory (catalog, maps,
//! the diff area with old data, the lock files whose byte-range locks gate every
//! write), backup repositories and the replica store — belongs to the daemon's user
//! alone: directories 0700, files 0600. A user who cannot open `lock` or `claims`
//! cannot take a byte-range lock on them, so cannot stall snapshots or writes; a user
//! who cannot open `diff.dat` cannot read data that now exists only in a snapshot.
//!
//! The modes are set when things are created and **checked and repaired every time
//! they are opened** (a umask of 022, a `cp -r`, a restore from tape all undo them),
//! with one `WARN` line per repaired path, so an operator sees it happened.
//!
//! The live volume image file gets 0600 too. A block device is never chmodded (udev
//! owns device nodes); if it is group- or world-accessible, a warning says so.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::Path;

use crate::error::{Error, Result};

/// Mode of every private directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every private file.
pub const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and missing parents) and makes `dir` itself 0700.
pub fn create_private_dir(dir: &Path) -> Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)
        .map_err(|e| Error::io("create directory", dir, e))?;
    set_mode(dir, DIR_MODE)
}

/// Makes `dir` 0700 and every file below it 0600 (every directory 0700), repairing
/// what differs with one warning per path. Symbolic links are neither followed nor
/// changed; sockets and other special files are left alone. Returns the repaired paths.
pub fn secure_tree(dir: &Path) -> Result<Vec<std::path::PathBuf>> {
    let mut repaired = Vec::new();
    secure_dir(dir, &mut repaired)?;
    Ok(repaired)
}

fn secure_dir(dir: &Path, repaired: &mut Vec<std::path::PathBuf>) -> Result<()> {
    repair(dir, DIR_MODE, repaired)?;
    let rd = fs::read_dir(dir).map_err(|e| Error::io("list", dir, e))?;
    for entry in rd {
        let entry = entry.map_err(|e| Error::io("list", dir, e))?;
        let path = entry.path();
        let ft = entry.file_type().map_err(|e| Error::io("stat", &path, e))?;
        if ft.is_dir() {
            secure_dir(&path, repaired)?;
        } else if ft.is_file() {
            repair(&path, FILE_MODE, repaired)?;
        }
    }
    Ok(())
}

/// A volume and its state directory, as [`crate::volume::Volume::open`] checks them.
pub fn secure_volume(volume: &Path, state_dir: &Path) -> Result<()> {
    secure_tree(state_dir)?;
    secure_volume_file(volume)
}

/// The live volume: a regular file is made 0600 (repaired with a warning); a block
/// device is only reported when its group or others may open it.
pub fn secure_volume_file(path: &Path) -> Result<()> {
    let meta = fs::metadata(path).map_err(|e| Error::io("stat", path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if meta.file_type().is_block_device() {
        if mode & 0o066 != 0 {
            tracing::warn!(
                path = %path.display(),
                "volume device is accessible to group or others (mode {mode:04o}); \
                 freezeframe does not chmod devices: restrict it with a udev rule"
            );
        }
        return Ok(());
    }
    if meta.is_file() {
        let mut repaired = Vec::new();
        repair(path, FILE_MODE, &mut repaired)?;
    }
    Ok(())
}

fn repair(path: &Path, want: u32, repaired: &mut Vec<std::path::PathBuf>) -> Result<()> {
    let meta = fs::symlink_metadata(path).map_err(|e| Error::io("stat", path, e))?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode != want {
        set_mode(path, want)?;
        tracing::warn!(
            path = %path.display(),
            "private state had mode {mode:04o}; repaired to {want:04o}"
        );
        repaired.push(path.to_path_buf());
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io("chmod", path, e))
}

/// Opens options for a new private file (0600 from the first byte, whatever the umask).
pub fn private_file_options() -> fs::OpenOptions {
    use std::os::unix::fs::OpenOptionsExt;
    let mut o = fs::OpenOptions::new();
    o.mode(FILE_MODE);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).expect("stat").permissions().mode() & 0o7777
    }

    #[test]
    fn a_world_readable_tree_is_repaired_and_each_path_reported() {
        let d = tempfile::tempdir().expect("tempdir");
        let root = d.path().join("state");
        fs::create_dir_all(root.join("manifests")).expect("mkdir");
        fs::write(root.join("diff.dat"), b"secret").expect("write");
        fs::write(root.join("manifests/1.json"), b"{}").expect("write");
        fs::write(root.join("lock"), b"").expect("write");
        fs::set_permissions(root.join("lock"), fs::Permissions::from_mode(0o600)).expect("chmod");
        for p in ["", "manifests"] {
            fs::set_permissions(root.join(p), fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        for p in ["diff.dat", "manifests/1.json"] {
            fs::set_permissions(root.join(p), fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        std::os::unix::fs::symlink("/etc/passwd", root.join("link")).expect("symlink");
        let mut got = secure_tree(&root).expect("secure");
        got.sort();
        let mut want = vec![
            root.clone(),
            root.join("diff.dat"),
            root.join("manifests"),
            root.join("manifests/1.json"),
        ];
        want.sort();
        assert_eq!(got, want, "exactly the wrong paths are repaired");
        assert_eq!(mode(&root), 0o700);
        assert_eq!(mode(&root.join("manifests")), 0o700);
        assert_eq!(mode(&root.join("diff.dat")), 0o600);
        assert_eq!(mode(&root.join("lock")), 0o600);
        assert_ne!(
            mode(Path::new("/etc/passwd")),
            0o600,
            "a symlink's target is never touched"
        );
        assert!(secure_tree(&root).expect("again").is_empty(), "idempotent");
    }

    #[test]
    fn a_private_dir_is_0700_whatever_the_umask_and_a_volume_file_0600() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("a/b");
        create_private_dir(&dir).expect("create");
        assert_eq!(mode(&dir), 0o700);
        let img = d.path().join("v.img");
        fs::write(&img, b"x").expect("write");
        fs::set_permissions(&img, fs::Permissions::from_mode(0o666)).expect("chmod");
        secure_volume_file(&img).expect("secure");
        assert_eq!(mode(&img), 0o600);
    }
}
