//! The repository directory: config, layout, the writer lock, and finding
//! backups by id.
//!
//! ```text
//! REPO/config            envelope "FFBKCONF": JSON {repo_id, created_ms, pack_size}
//! REPO/lock              flock(2)ed exclusively by `run` and `forget`/gc
//! REPO/packs/<id>.pack   block data (see `pack`)
//! REPO/index/<id>.idx    what each pack holds (see `index`)
//! REPO/backups/<id>.backup  one manifest per backup (see `manifest`)
//! ```
//!
//! The lock is an advisory `flock`, which the kernel drops when its holder
//! dies, so a killed backup never leaves a stale lock behind.

use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::envelope;
use super::fsutil::{io_err, list_files, list_temps, read_limited, sync_dir, write_atomic};
use super::hash::{now_ms, unique_hex};
use super::manifest::{Manifest, ManifestHeader, MAX_MANIFEST_FILE};
use crate::error::{Error, Result};

const CONFIG_MAGIC: &[u8; 8] = b"FFBKCONF";
const CONFIG_VERSION: u32 = 1;
/// Default pack size: large enough for big sequential writes and few files,
/// small enough that gc rewrites little when one backup is forgotten.
pub const DEFAULT_PACK_SIZE: u64 = 32 << 20;
const MANIFEST_SUFFIX: &str = ".backup";

/// What `init` records.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    pub repo_id: String,
    pub created_ms: u64,
    /// Target size of pack files, bytes.
    pub pack_size: u64,
}

/// An open backup repository.
#[derive(Debug, Clone)]
pub struct Repository {
    pub(crate) root: PathBuf,
    pub(crate) config: RepoConfig,
}

/// Backups of a repository, oldest first, and manifests that could not be read.
#[derive(Debug, Default)]
pub struct Listing {
    pub backups: Vec<ManifestHeader>,
    pub unreadable: Vec<(PathBuf, String)>,
}

/// Held while a writer changes the repository.
#[derive(Debug)]
pub(crate) struct WriterLock {
    _file: File,
}

impl Repository {
    /// Creates a repository in `path` (a new or empty directory).
    pub fn init(path: &Path, pack_size: u64) -> Result<Repository> {
        if path.exists() {
            let mut entries = fs::read_dir(path).map_err(io_err("list", path))?;
            if entries.next().is_some() {
                return Err(Error::RepoExists {
                    path: path.to_path_buf(),
                    reason: if path.join("config").exists() {
                        "it already holds a backup repository".into()
                    } else {
                        "the directory is not empty".into()
                    },
                });
            }
        }
        if pack_size < (1 << 20) || pack_size > (1 << 30) {
            return Err(Error::RepoExists {
                path: path.to_path_buf(),
                reason: format!("pack size {pack_size} is outside 1 MiB..1 GiB"),
            });
        }
        crate::perms::create_private_dir(path)?;
        for sub in ["packs", "index", "backups"] {
            crate::perms::create_private_dir(&path.join(sub))?;
        }
        crate::perms::private_file_options()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path.join("lock"))
            .map_err(io_err("create", &path.join("lock")))?;
        let config = RepoConfig {
            repo_id: unique_hex(),
            created_ms: now_ms(),
            pack_size,
        };
        let json = serde_json::to_vec_pretty(&config).unwrap_or_default();
        write_atomic(
            &path.join("config"),
            &envelope::seal(CONFIG_MAGIC, CONFIG_VERSION, &json),
        )?;
        sync_dir(path)?;
        Ok(Repository {
            root: path.to_path_buf(),
            config,
        })
    }

    /// Opens the repository in `path`.
    pub fn open(path: &Path) -> Result<Repository> {
        let cfg_path = path.join("config");
        if !cfg_path.exists() {
            return Err(Error::RepoNotFound {
                path: path.to_path_buf(),
            });
        }
        crate::perms::secure_tree(path)?;
        let bytes = read_limited(&cfg_path, 1 << 20)?;
        let json = envelope::open(&cfg_path, CONFIG_MAGIC, CONFIG_VERSION, &bytes)?;
        let config: RepoConfig = serde_json::from_slice(json).map_err(|e| Error::RepoCorrupt {
            path: cfg_path.clone(),
            detail: format!("config is not valid: {e}"),
        })?;
        for sub in ["packs", "index", "backups"] {
            if !path.join(sub).is_dir() {
                return Err(Error::RepoCorrupt {
                    path: path.join(sub),
                    detail: "the repository directory is missing".into(),
                });
            }
        }
        Ok(Repository {
            root: path.to_path_buf(),
            config,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Takes the writer lock without waiting.
    pub(crate) fn lock_writer(&self) -> Result<WriterLock> {
        let path = self.root.join("lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err("open", &path))?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on an fd we own; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(Error::RepoLocked {
                    path: self.root.clone(),
                });
            }
            return Err(Error::RepoIo {
                action: "lock",
                path,
                source: err,
            });
        }
        Ok(WriterLock { _file: file })
    }

    /// Removes temporaries left by interrupted writers. Only call with the writer lock held.
    pub(crate) fn remove_temps(&self, _lock: &WriterLock) -> Result<u64> {
        let mut n = 0;
        for sub in ["packs", "index", "backups", ""] {
            let dir = self.root.join(sub);
            for t in list_temps(&dir)? {
                fs::remove_file(&t).map_err(io_err("remove leftover temporary", &t))?;
                n += 1;
            }
        }
        Ok(n)
    }

    pub(crate) fn manifest_path(&self, id: &str) -> PathBuf {
        self.root
            .join("backups")
            .join(format!("{id}{MANIFEST_SUFFIX}"))
    }

    /// Ids of every backup (from file names).
    pub(crate) fn backup_ids(&self) -> Result<Vec<String>> {
        Ok(list_files(&self.root.join("backups"), MANIFEST_SUFFIX)?
            .into_iter()
            .map(|n| n.trim_end_matches(MANIFEST_SUFFIX).to_string())
            .collect())
    }

    pub(crate) fn read_manifest_file(&self, id: &str) -> Result<Manifest> {
        let path = self.manifest_path(id);
        let bytes = read_limited(&path, MAX_MANIFEST_FILE)?;
        let m = Manifest::decode(&path, &bytes)?;
        if m.header.id != id {
            return Err(Error::RepoCorrupt {
                path,
                detail: format!(
                    "manifest says it is backup {} but is stored as {id}",
                    m.header.id
                ),
            });
        }
        Ok(m)
    }

    /// The header of a manifest, read without checking the whole file: only
    /// for choosing which manifest to load (which then is fully checked).
    pub(crate) fn peek_header(&self, id: &str) -> Option<ManifestHeader> {
        use std::io::Read;
        let mut head = Vec::new();
        File::open(self.manifest_path(id))
            .ok()?
            .take(24 + (1 << 20))
            .read_to_end(&mut head)
            .ok()?;
        let json_len = u32::from_le_bytes(head.get(20..24)?.try_into().ok()?) as usize;
        serde_json::from_slice(head.get(24..24usize.checked_add(json_len)?)?).ok()
    }

    /// Every readable manifest, oldest first, plus the unreadable ones.
    pub(crate) fn manifests(&self) -> Result<(Vec<Manifest>, Vec<(PathBuf, String)>)> {
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for id in self.backup_ids()? {
            match self.read_manifest_file(&id) {
                Ok(m) => ok.push(m),
                Err(e) => bad.push((self.manifest_path(&id), e.to_string())),
            }
        }
        ok.sort_by(|a: &Manifest, b: &Manifest| {
            (a.header.created_ms, &a.header.id).cmp(&(b.header.created_ms, &b.header.id))
        });
        Ok((ok, bad))
    }

    /// The backups in the repository, oldest first.
    pub fn list(&self) -> Result<Listing> {
        let (ms, unreadable) = self.manifests()?;
        Ok(Listing {
            backups: ms.into_iter().map(|m| m.header).collect(),
            unreadable,
        })
    }

    /// Resolves a backup id or unique id prefix.
    pub fn resolve_id(&self, id: &str) -> Result<String> {
        let ids = self.backup_ids()?;
        if ids.iter().any(|i| i == id) {
            return Ok(id.to_string());
        }
        let matches: Vec<&String> = if id.is_empty() {
            Vec::new()
        } else {
            ids.iter().filter(|i| i.starts_with(id)).collect()
        };
        match matches.as_slice() {
            [one] => Ok((*one).clone()),
            [] => Err(Error::BackupNotFound {
                id: id.to_string(),
                repo: self.root.clone(),
                hint: " (see `freezeframe backup list`)".into(),
            }),
            many => Err(Error::BackupNotFound {
                id: id.to_string(),
                repo: self.root.clone(),
                hint: format!(
                    ": the prefix matches {} backups ({}); give more characters",
                    many.len(),
                    many.iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            }),
        }
    }

    /// Loads one backup's manifest by id or unique id prefix.
    pub fn manifest(&self, id: &str) -> Result<Manifest> {
        let id = self.resolve_id(id)?;
        self.read_manifest_file(&id)
    }
}
