//! Small durable-file helpers for the repository: every state file is
//! written to a temporary name, fsynced, renamed into place and its
//! directory fsynced, so a crash leaves either the old or the new file —
//! never a torn one.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Prefix of every temporary file in the repository. Anything that starts
/// with it is debris of an interrupted writer and is removed by gc.
pub(crate) const TEMP_PREFIX: &str = ".tmp-";

/// Wraps an `io::Error` with what we were doing and to which file.
pub(crate) fn io_err(action: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.to_path_buf();
    move |source| Error::RepoIo {
        action,
        path,
        source,
    }
}

/// fsync a directory so renames and unlinks in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    let f = File::open(dir).map_err(io_err("open directory", dir))?;
    f.sync_all().map_err(io_err("fsync directory", dir))
}

/// A temporary file name in `dir` that no other writer uses.
pub(crate) fn temp_path(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!("{TEMP_PREFIX}{what}-{}", super::hash::unique_hex()))
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync,
/// rename, fsync of the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = temp_path(dir, "write");
    let result = (|| {
        let mut f = crate::perms::private_file_options()
            .write(true)
            .create_new(true)
            .open(&tmp)
            .map_err(io_err("create", &tmp))?;
        f.write_all(bytes).map_err(io_err("write", &tmp))?;
        f.sync_all().map_err(io_err("fsync", &tmp))?;
        fs::rename(&tmp, path).map_err(io_err("rename into place", path))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Reads a whole repository file, refusing files larger than `limit` so a
/// damaged or hostile file cannot make us allocate without bound.
pub(crate) fn read_limited(path: &Path, limit: u64) -> Result<Vec<u8>> {
    let meta = fs::metadata(path).map_err(io_err("stat", path))?;
    if meta.len() > limit {
        return Err(Error::RepoCorrupt {
            path: path.to_path_buf(),
            detail: format!(
                "file is {} bytes, more than the {} allowed for this kind of file",
                meta.len(),
                limit
            ),
        });
    }
    fs::read(path).map_err(io_err("read", path))
}

/// Names of the entries of `dir` (files only), sorted, skipping temporaries.
pub(crate) fn list_files(dir: &Path, suffix: &str) -> Result<Vec<String>> {
    let mut names = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(TEMP_PREFIX) || !name.ends_with(suffix) {
            continue;
        }
        names.push(name);
    }
    names.sort();
    Ok(names)
}

/// Temporary files left in `dir` by an interrupted writer.
pub(crate) fn list_temps(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err("list", dir))? {
        let entry = entry.map_err(io_err("list", dir))?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            out.push(entry.path());
        }
    }
    out.sort();
    Ok(out)
}
