//! Where a volume's state directory is, so every command finds it by itself.
//!
//! - File volume, default: the directory `PATH.ffstate/` beside the volume.
//! - File volume with `--state DIR`: `PATH.ffstate` is then a small *file*
//!   holding the absolute path of DIR (a directory there means the state itself).
//! - Block device (`/dev/...`): `--state DIR` is required (the state must be
//!   on shared storage, and there is nothing beside a device node), and the
//!   mapping is recorded in `/var/lib/freezeframe/devices/<escaped path>`
//!   (`FREEZEFRAME_DEVICE_DIR` overrides that directory, for tests).

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

fn is_device(volume: &Path) -> bool {
    volume.starts_with("/dev")
}

fn device_dir() -> PathBuf {
    std::env::var_os("FREEZEFRAME_DEVICE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/freezeframe/devices"))
}

/// The file or directory that records where the state of `volume` is.
pub(crate) fn pointer_path(volume: &Path) -> PathBuf {
    if is_device(volume) {
        // '%' first so the escape is reversible and distinct paths stay distinct.
        let escaped = volume
            .to_string_lossy()
            .replace('%', "%25")
            .replace('/', "%2F");
        device_dir().join(escaped)
    } else {
        let mut s = volume.as_os_str().to_os_string();
        s.push(".ffstate");
        PathBuf::from(s)
    }
}

/// Finds the state directory recorded for `volume`.
pub(crate) fn find(volume: &Path) -> Result<PathBuf> {
    let pointer = pointer_path(volume);
    let meta = std::fs::metadata(&pointer).map_err(|_| Error::NoState {
        volume: volume.to_path_buf(),
        looked: pointer.clone(),
    })?;
    if meta.is_dir() {
        return Ok(pointer);
    }
    let text = std::fs::read_to_string(&pointer)
        .map_err(|e| Error::io("read state pointer", &pointer, e))?;
    let dir = PathBuf::from(text.trim());
    if !dir.is_dir() {
        return Err(Error::NoState {
            volume: volume.to_path_buf(),
            looked: dir,
        });
    }
    Ok(dir)
}

/// The state pointer (directory or file) recorded for `path` if it is a freezeframe
/// volume, whatever the spelling: relative, through a symbolic link, or another
/// `/dev` name of the same device (each recorded device name is resolved).
pub(crate) fn recorded(path: &Path) -> Option<PathBuf> {
    let direct = pointer_path(path);
    if direct.exists() {
        return Some(direct);
    }
    let canon = path.canonicalize().ok()?;
    let via_canon = pointer_path(&canon);
    if via_canon.exists() {
        return Some(via_canon);
    }
    if !is_device(&canon) {
        return None;
    }
    for entry in std::fs::read_dir(device_dir()).ok()?.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let device = PathBuf::from(name.replace("%2F", "/").replace("%25", "%"));
        if device.canonicalize().ok().as_ref() == Some(&canon) {
            return Some(entry.path());
        }
    }
    None
}

/// Decides the state directory for a new volume and records a pointer to it
/// if it is not the default place. Returns the directory (not yet created).
pub(crate) fn choose(volume: &Path, state: Option<&Path>) -> Result<PathBuf> {
    let pointer = pointer_path(volume);
    if pointer.exists() {
        return Err(Error::StateExists {
            volume: volume.to_path_buf(),
            state: pointer,
        });
    }
    match state {
        None if is_device(volume) => Err(Error::StateDirRequired {
            path: volume.to_path_buf(),
        }),
        None => Ok(pointer),
        Some(dir) => {
            let abs = if dir.is_absolute() {
                dir.to_path_buf()
            } else {
                std::env::current_dir()
                    .map_err(|e| Error::io("resolve", dir, e))?
                    .join(dir)
            };
            Ok(abs)
        }
    }
}

/// Writes the pointer file once the state directory exists.
pub(crate) fn record(volume: &Path, state_dir: &Path) -> Result<()> {
    let pointer = pointer_path(volume);
    if pointer == state_dir {
        return Ok(());
    }
    if let Some(parent) = pointer.parent() {
        std::fs::create_dir_all(parent).map_err(|e| Error::io("create directory", parent, e))?;
    }
    let text = format!("{}\n", state_dir.display());
    crate::format::write_file_atomic(&pointer, text.as_bytes())
}
